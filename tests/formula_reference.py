"""Slow, literal numpy reference of compositional explanations: masks, counts, brute force
and a straightforward beam search.

Written from the definitions in `jaxdissect/formulas.py` with explicit masks and loops; the
only package code used is `Formula.mask`'s pixel logic (re-checked here by `formula_mask`),
`LabelSpace` and the tally's reference upsampling (`tests/reference.py`).

Tie-break of every ranking: higher score first, then shorter, then lower concept numbers in
order, then lower operator codes (OR < AND < AND NOT).
"""

from __future__ import annotations

import itertools

import numpy as np

from jaxdissect.formulas import Formula
from tests.reference import reference_upsample


def reference_masks(
    acts: np.ndarray,
    thresholds: np.ndarray,
    pixel_labels: np.ndarray,
    image_labels: np.ndarray,
    num_labels: int,
    tie_rule: str = "strict",
) -> tuple[np.ndarray, np.ndarray]:
    """(unit masks bool [N, s, K], concept masks bool [N, s, L]) of every image."""
    n, _, _, k = acts.shape
    sh, sw = pixel_labels.shape[2:]
    units = np.zeros((n, sh * sw, k), bool)
    concepts = np.zeros((n, sh * sw, num_labels), bool)
    for x in range(n):
        for u in range(k):
            up = reference_upsample(acts[x, :, :, u], (sh, sw))
            on = up > thresholds[u] if tie_rule == "strict" else up >= thresholds[u]
            units[x, :, u] = on.reshape(-1)
        for plane in pixel_labels[x]:
            for c in np.unique(plane):
                if 1 <= c < num_labels:
                    concepts[x, :, c] |= (plane == c).reshape(-1)
        for c in image_labels[x]:
            if 1 <= c < num_labels:
                concepts[x, :, c] = True
    return units, concepts


def formula_mask(formula: Formula, concepts: np.ndarray) -> np.ndarray:
    """The formula's mask over concept masks [..., L], written out by operator name."""
    out = concepts[..., formula.concepts[0]].copy()
    for op, c in zip(formula.ops, formula.concepts[1:], strict=True):
        if op == 0:
            out = out | concepts[..., c]
        elif op == 1:
            out = out & concepts[..., c]
        else:
            out = out & ~concepts[..., c]
    return out


def reference_counts(
    units: np.ndarray, concepts: np.ndarray, table: list[list[Formula]]
) -> dict[str, np.ndarray]:
    """and_label, formula_label [K, S, L], and_total, formula_total [K, S] (int64), S from the
    longest list; missing slots count 0."""
    k = units.shape[-1]
    slots = max(len(t) for t in table)
    nl = concepts.shape[-1]
    out = {
        "and_label": np.zeros((k, slots, nl), np.int64),
        "formula_label": np.zeros((k, slots, nl), np.int64),
        "and_total": np.zeros((k, slots), np.int64),
        "formula_total": np.zeros((k, slots), np.int64),
    }
    for u in range(k):
        m = units[..., u]
        for s, f in enumerate(table[u]):
            fm = formula_mask(f, concepts)
            out["and_total"][u, s] = (m & fm).sum()
            out["formula_total"][u, s] = fm.sum()
            for c in range(nl):
                out["and_label"][u, s, c] = (m & fm & concepts[..., c]).sum()
                out["formula_label"][u, s, c] = (fm & concepts[..., c]).sum()
    return out


def category_passes(
    units: np.ndarray, concepts: np.ndarray, category: np.ndarray, restriction: str
) -> np.ndarray:
    """bool [N, K, C]: image x passes the union restriction for category j and unit u.

    presence: x holds a pixel of some concept of category j (image-level concepts cover
    the image); overlap: such a pixel lies under M_u(x); none: always.
    """
    n, _, k = units.shape
    num_categories = int(np.max(category)) + 1
    out = np.zeros((n, k, num_categories), bool)
    for x in range(n):
        for u in range(k):
            for j in range(num_categories):
                for c in np.flatnonzero(np.asarray(category) == j):
                    here = concepts[x, :, c]
                    if restriction == "overlap":
                        here = here & units[x, :, u]
                    if restriction == "none" or here.any():
                        out[x, u, j] = True
    return out


def formula_rows(passes_u: np.ndarray, category: np.ndarray, formula: Formula) -> np.ndarray:
    """bool [N]: the images counted for `formula` (passing some category of its concepts)."""
    cats = sorted({int(category[c]) for c in formula.concepts})
    return passes_u[:, cats].any(1)


def score(m: np.ndarray, fm: np.ndarray, length: int, penalty: float = 1.0, rows=None) -> float:
    """Score of a formula mask fm [N, s] for a unit mask m [N, s]: dataset-level IoU, the
    unit's pixels counted only in the images `rows` (bool [N]; None: all; the union
    restriction as the dissection's: the concept's pixels count everywhere), times the
    length penalty."""
    if rows is not None:
        m = m & rows[:, None]
    inter = int((m & fm).sum())
    union = int((m | fm).sum())
    return (inter / union if union else 0.0) * penalty ** (length - 1)


def rank_key(item: tuple[float, Formula]) -> tuple:
    s, f = item
    return (-s, len(f), f.concepts, f.ops)


def all_formulas(candidates, max_length: int, ops=(0, 1, 2)):
    """Every left-deep formula of distinct concepts from `candidates`, length 1..max_length."""
    for length in range(1, max_length + 1):
        for cs in itertools.permutations(candidates, length):
            for os_ in itertools.product(ops, repeat=length - 1):
                yield Formula(tuple(int(c) for c in cs), tuple(os_))


def brute_force(
    units: np.ndarray,
    concepts: np.ndarray,
    candidates,
    max_length: int = 3,
    ops=(0, 1, 2),
    penalty: float = 1.0,
    passes: np.ndarray | None = None,
    category: np.ndarray | None = None,
) -> list[tuple[float, Formula]]:
    """Per unit the best (score, formula) over every formula, by `rank_key`; `passes`
    ([N, K, C], `category_passes`) and `category` [L]: under that union restriction."""
    formulas = list(all_formulas(candidates, max_length, ops))
    masks = [formula_mask(f, concepts) for f in formulas]
    best = []
    for u in range(units.shape[-1]):
        m = units[..., u]
        scored = [
            (score(m, fm, len(f), penalty, _rows(passes, category, u, f)), f)
            for f, fm in zip(formulas, masks, strict=True)
        ]
        best.append(min(scored, key=rank_key))
    return best


def _rows(passes, category, u, f):
    return None if passes is None else formula_rows(passes[:, u], category, f)


def beam(
    units: np.ndarray,
    concepts: np.ndarray,
    candidates,
    max_length: int = 3,
    beam_width: int = 5,
    ops=(0, 1, 2),
    penalty: float = 1.0,
    passes: np.ndarray | None = None,
    category: np.ndarray | None = None,
) -> list[list[tuple[float, Formula]]]:
    """Per unit the final beam, best first: Mu & Andreas's beam search written plainly
    (`passes`, `category`: under a union restriction, as `brute_force`)."""
    out = []
    for u in range(units.shape[-1]):
        m = units[..., u]
        scored = {
            Formula((int(c),)): score(
                m, concepts[..., c], 1, penalty, _rows(passes, category, u, Formula((int(c),)))
            )
            for c in candidates
        }
        kept = sorted(((s, f) for f, s in scored.items()), key=rank_key)[:beam_width]
        for _ in range(max_length - 1):
            pool = dict((f, s) for s, f in kept)
            for _, f in kept:
                for op in ops:
                    for c in candidates:
                        if int(c) in f.concepts:
                            continue
                        g = f.extend(op, int(c))
                        rows = _rows(passes, category, u, g)
                        pool[g] = score(m, formula_mask(g, concepts), len(g), penalty, rows)
            kept = sorted(((s, f) for f, s in pool.items()), key=rank_key)[:beam_width]
        out.append(kept)
    return out

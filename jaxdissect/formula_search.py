"""Searching formulas per unit: Mu & Andreas's beam search and a guaranteed-optimal mode.

Both work on exact counts: the length-1 tally (`formulas.FirstCounts`) and an `evaluate`
callback that, for a `formulas.FormulaTable` of S prefixes per unit, returns the counts of
all their one-concept extensions (`formulas.ExtensionCounts`: one pass over the probe set,
`formula_counts.formula_statistic`). The search itself is host-side numpy.

Score of a formula G: IoU(G) * penalty ** (len(G) - 1) (the paper's optional length
penalty; 1: none). Formulas use distinct concepts: one that repeats a concept has the mask of
a shorter formula or an empty one (e.g. (A OR B) AND NOT A = B AND NOT A).

Ranking, everywhere (the tie-break): higher score first, then the shorter formula, then the
lower concept numbers in order, then the lower operator codes (OR < AND < AND NOT).

Beam search (the paper's): the beam starts as the `beam` best single concepts; each step
extends every beam entry by every operator and every candidate concept not in it, pools
the extensions with the beam itself (a shorter formula stays if it scores better), and
keeps the `beam` best of the pool. One pass over the data per step. It differs from the
release (jayelm/compexp, `compute_best_iou`) in three ways: the first beam may hold
candidates of IoU 0 (the release keeps only IoU > 0); concepts already in a formula are
not tried again (the release tries every label); ties go by the ranking above, lower
concept numbers first (the release's go by insertion order), so commutative duplicates
(`3 AND 4`, `4 AND 3`) rank next to each other and can take two places of the beam.

Optimal mode (length <= 3): branch and bound over prefixes, seeded with the beam's best
score s*. With m = |M|, and for a concept or formula X: I_X = |M and X|, F_X = |X| - I_X
(its false positives), every formula G has IoU(G) = TP_G / (m + FP_G) with TP_G <= m. Under
a union restriction (`formulas`) the m of the denominator is m(G) = m(cats(G)), which only
grows as a formula is extended (more categories, more images): the bounds below hold with
each denominator's m read as the least m of any formula they cover (m(cats(P)) for the
extensions of a prefix P, the least single-category m over the candidates in max_C IoU(C))
and TP capped by |M|; without a restriction every m is |M|. Every
formula is equivalent to one whose commutative first pair (A OR B, A AND B) puts first the
concept with more true positives (I_A >= I_B, ties to the lower number), so only those are
searched. Admissible bounds, from counts already known:

- A formula extended by AND / AND NOT is a subset of it: TP <= I_P, FP >= 0, IoU <= I_P / m.
- P OR C: TP <= min(m, I_P + I_C), FP >= max(F_P, F_C), so IoU <= max_C min(m, I_P + I_C)
  / (m + max(F_P, F_C)) (evaluated over every C for the length-2 prefixes), and <= g(I_P,
  F_P) with g(x, f) = min(min(m, x + max_C I_C) / (m + f), x / (m + min_C F_C) +
  max_C IoU(C)) (the second since (x + I_C) / (m + F_C) = x / (m + F_C) + IoU(C)).
- All formulas starting with A (length 2 and 3), the first pair ordered as above:
  A AND B, A AND NOT B, and their AND / AND NOT extensions: <= I_A / m;
  (A AND B) OR C, (A AND NOT B) OR C: <= g(I_A, 0); A OR B: <= min(m, 2 I_A) / (m + F_A)
  (I_B <= I_A); (A OR B) AND C, (A OR B) AND NOT C: <= min(m, 2 I_A) / m;
  (A OR B) OR C: <= g(2 I_A, F_A).
  Scaled by penalty ** 1 or ** 2 for lengths 2 and 3 (0 < penalty <= 1).

A concept A whose bound is below the best score found so far is pruned; the survivors are
evaluated exactly as prefixes (all their length-2 extensions), in blocks of `slots` per
pass, best bound first, pruning again after each block; then the length-2 prefixes P (first
pair ordered) whose bound (I_P / m for AND and AND NOT, the max over C above for OR) times
penalty ** 2 is not below the best are evaluated the same way (all length-3 extensions). What is pruned cannot beat the answer, so
the answer's score is the maximum over all formulas. Each formula evaluated is ranked as
its first pair with the lower concept first when that pair is commutative (`B OR A` as
`A OR B`, AND too: the same mask), so every formula of the maximum score is ranked through
one evaluated, and the answer is the first of them by the ranking, as the beam's. Bounds
are compared with a relative margin of 1e-12 (float64 ratios of exact integers).

Cost: the bounds are loose where a unit's best IoU is low (any prefix covering more than
that share of the unit's mask survives the AND bound), so the number of passes depends on
the data; a random 128-unit layer with 80 concepts needed ~840 passes of 5 prefixes per
unit, against 2 for the beam (benchmarks/README.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from jaxdissect.formulas import (
    MAX_LENGTH,
    ExtensionCounts,
    FirstCounts,
    Formula,
    FormulaTable,
    extension_counts,
)
from jaxdissect.results import iou

Evaluate = Callable[[FormulaTable], ExtensionCounts]
DEFAULT_BEAM = 5
DEFAULT_LENGTH = 3
_MARGIN = 1e-12
_COMMUTATIVE = (0, 1)  # OR, AND


@dataclasses.dataclass(frozen=True)
class Scored:
    """A formula with its IoU and its score (IoU times the length penalty)."""

    score: float
    iou: float
    formula: Formula

    def rank(self) -> tuple:
        f = self.formula
        return (-self.score, len(f), f.concepts, f.ops)


@dataclasses.dataclass
class SearchStats:
    """What a search cost (passes over the data, prefixes evaluated per prefix length) and,
    from the beam, its best per unit after each step (`best[l - 1]`: length <= l)."""

    passes: int = 0
    prefixes: dict[int, int] = dataclasses.field(default_factory=dict)
    best: list[list[Scored]] = dataclasses.field(default_factory=list)


def check_options(
    max_length: int,
    beam: int,
    ops: Sequence[int],
    penalty: float,
    *,
    beam_name: str = "beam",
    penalty_name: str = "penalty",
) -> None:
    """Raise naming the parameter unless the search options are usable (`beam` and
    `penalty` by the names their caller calls them)."""
    if not 1 <= max_length <= MAX_LENGTH:
        raise ValueError(f"max_length={max_length}: must be 1..{MAX_LENGTH}")
    if beam < 1:
        raise ValueError(f"{beam_name}={beam}: must be >= 1")
    if not ops or any(op not in (0, 1, 2) for op in ops):
        raise ValueError(f"ops={tuple(ops)}: operator codes 0 (OR), 1 (AND), 2 (AND NOT)")
    if not 0 < penalty <= 1:
        raise ValueError(f"{penalty_name}={penalty}: must be in (0, 1]")


def _check_candidates(candidates: np.ndarray) -> None:
    if not candidates.any():
        raise ValueError("candidates: no concept has pixels in the probe set (check categories)")


def default_candidates(first: FirstCounts) -> np.ndarray:
    """bool [L]: concepts with pixels in the probe set (an empty concept adds nothing) and,
    under a union restriction, with a category."""
    out = np.asarray(first.label_pixels) > 0
    out[0] = False
    return out & (first.category_bits > 0)


def first_ious(first: FirstCounts) -> np.ndarray:
    """float64 [K, L]: IoU of every unit with every single concept (under the restriction
    of `first`, as the dissection's IoU)."""
    return iou(first.intersection, _single_totals(first), first.label_pixels[None, :])


def _single_totals(first: FirstCounts) -> np.ndarray:
    """int64 [K, L]: m of each concept alone (|M| without a restriction)."""
    return first.union_table[:, first.category_bits]


def _lower_first(formula: Formula) -> Formula:
    """The formula with its first pair in rank order: `B OR A` as `A OR B` when A < B (the
    same mask and categories, so the same score; AND too, AND NOT kept)."""
    c, ops = formula.concepts, formula.ops
    if len(c) > 1 and ops[0] in _COMMUTATIVE and c[1] < c[0]:
        return Formula((c[1], c[0], *c[2:]), ops)
    return formula


def _select(
    kept: list[Scored],
    prefixes: Sequence[Formula],
    scores: np.ndarray,
    ious: np.ndarray,
    width: int,
    *,
    commute: bool = False,
) -> list[Scored]:
    """The `width` best of `kept` and the extensions (scores [S, 3, L], -inf: excluded).

    commute: rank and return each extension as `_lower_first` (the optimal mode, which
    searches one order of each first pair); the beam keeps both orders.
    """
    flat = scores.reshape(-1)
    valid = np.flatnonzero(np.isfinite(flat))
    if not len(valid):
        return kept[:width]
    # Only the extensions scoring at least the (width + len(kept))-th best can be chosen
    # (kept formulas may reappear among them); ties at that score all stay.
    need = min(width + len(kept), len(valid))
    cut = np.partition(flat[valid], len(valid) - need)[len(valid) - need]
    idx = valid[flat[valid] >= cut]
    s_idx, o_idx, c_idx = np.unravel_index(idx, scores.shape)
    n = np.array([len(p) for p in prefixes])[s_idx]
    cs = np.full((len(idx), MAX_LENGTH), -1, np.int64)
    os_ = np.full((len(idx), MAX_LENGTH - 1), -1, np.int64)
    for j, s in enumerate(s_idx):
        p = prefixes[s]
        cs[j, : len(p)] = p.concepts
        cs[j, len(p)] = c_idx[j]
        os_[j, : len(p) - 1] = p.ops
        os_[j, len(p) - 1] = o_idx[j]
    if commute:
        swap = np.isin(os_[:, 0], _COMMUTATIVE) & (cs[:, 1] < cs[:, 0])
        cs[swap, :2] = cs[swap, 1::-1]
    # lexsort: last key is primary. Rank: -score, length, c0, c1, c2, o1, o2.
    order = np.lexsort((os_[:, 1], os_[:, 0], cs[:, 2], cs[:, 1], cs[:, 0], n, -flat[idx]))
    flat_iou = ious.reshape(-1)
    pool = list(kept)
    seen = {k.formula for k in kept}
    for i in order[:need]:
        f = prefixes[s_idx[i]].extend(int(o_idx[i]), int(c_idx[i]))
        f = _lower_first(f) if commute else f
        if f not in seen:
            seen.add(f)
            pool.append(Scored(float(flat[idx[i]]), float(flat_iou[idx[i]]), f))
    return sorted(pool, key=Scored.rank)[:width]


def _extension_scores(
    first: FirstCounts,
    counts: ExtensionCounts,
    per_unit: Sequence[Sequence[Formula]],
    ops: Sequence[int],
    candidates: np.ndarray,
    penalty: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ious) [K, S, 3, L] of every extension; -inf score where excluded."""
    inter, size = extension_counts(first, counts)
    ious = iou(inter, _extension_totals(first, per_unit, inter.shape[1]), size)
    k, slots, _, nl = ious.shape
    scores = np.full(ious.shape, -np.inf)
    op_ok = np.isin(np.arange(3), list(ops))
    for u in range(k):
        for s, p in enumerate(per_unit[u]):
            ok = candidates.copy()
            ok[list(p.concepts)] = False
            allowed = op_ok[:, None] & ok[None, :]
            factor = penalty ** len(p)
            scores[u, s] = np.where(allowed, ious[u, s] * factor, -np.inf)
    return scores, ious


def _extension_totals(
    first: FirstCounts, per_unit: Sequence[Sequence[Formula]], slots: int
) -> np.ndarray:
    """int64 [K, S, 1, L]: m of P op c for each unit's prefixes P (empty slots: 0)."""
    table, bits = first.union_table, first.category_bits
    out = np.zeros((len(per_unit), slots, 1, len(bits)), np.int64)
    for u, row in enumerate(per_unit):
        for s, p in enumerate(row):
            out[u, s, 0] = table[u, first.formula_bits(p.concepts) | bits]
    return out


def _first_beam(first: FirstCounts, candidates: np.ndarray, width: int) -> list[list[Scored]]:
    ious = first_ious(first)
    out = []
    for u in range(ious.shape[0]):
        cs = np.flatnonzero(candidates)
        order = np.lexsort((cs, -ious[u, cs]))[:width]
        out.append(
            [
                Scored(float(ious[u, cs[i]]), float(ious[u, cs[i]]), Formula((int(cs[i]),)))
                for i in order
            ]
        )
    return out


def beam_search(
    first: FirstCounts,
    evaluate: Evaluate,
    *,
    max_length: int = DEFAULT_LENGTH,
    beam: int = DEFAULT_BEAM,
    ops: Sequence[int] = (0, 1, 2),
    penalty: float = 1.0,
    candidates: np.ndarray | None = None,
    stats: SearchStats | None = None,
) -> list[list[Scored]]:
    """Per unit the final beam, best first (module doc); max_length - 1 passes of `evaluate`."""
    check_options(max_length, beam, ops, penalty)
    candidates = default_candidates(first) if candidates is None else np.asarray(candidates, bool)
    _check_candidates(candidates)
    kept = _first_beam(first, candidates, beam)
    if stats is not None:
        stats.best.append([row[0] for row in kept])
    for _ in range(max_length - 1):
        prefixes = [[s.formula for s in row] for row in kept]
        counts = evaluate(FormulaTable.of(prefixes, beam))
        if stats is not None:
            stats.passes += 1
            for row in prefixes:
                for f in row:
                    stats.prefixes[len(f)] = stats.prefixes.get(len(f), 0) + 1
        scores, ious = _extension_scores(first, counts, prefixes, ops, candidates, penalty)
        kept = [
            _select(
                kept[u],
                prefixes[u],
                scores[u, : len(prefixes[u])],
                ious[u, : len(prefixes[u])],
                beam,
            )
            for u in range(len(kept))
        ]
        if stats is not None:
            stats.best.append([row[0] for row in kept])
    return kept


def _g(x, f, m, lo, i_max, f_min, iou_max):
    """Bound on IoU(P OR C) over C for TP_P <= x, FP_P >= f, TP <= m and the union's m >= lo
    (module doc)."""
    a = np.minimum(m, x + i_max) / (lo + f)
    b = x / (lo + f_min) + iou_max
    return np.minimum(a, b)


def first_bounds(
    first: FirstCounts,
    candidates: np.ndarray,
    ops: Sequence[int],
    penalty: float,
    max_length: int,
) -> np.ndarray:
    """float64 [K, L]: the bound on the score of every formula of length 2..max_length whose
    first concept is A, its first pair ordered (module doc)."""
    m = np.asarray(first.unit_total, np.float64)[:, None]
    lo = np.maximum(_single_totals(first).astype(np.float64), 1.0)  # m(cats(A)) <= m(G)
    i = np.asarray(first.intersection, np.float64)
    f = np.asarray(first.label_pixels, np.float64)[None, :] - i
    i_max, f_min, iou_max = (x[:, None] for x in _or_parts(first, candidates))
    has_or, has_and = 0 in ops, (1 in ops or 2 in ops)
    zero = np.zeros_like(i)
    two = [i / lo if has_and else zero]
    if has_or:
        two.append(
            np.minimum(np.minimum(m, 2 * i) / (lo + f), _g(i, f, m, lo, i_max, f_min, iou_max))
        )
    bound = np.maximum.reduce(two) * penalty
    if max_length >= 3:
        three = [zero]
        if has_and:
            three.append(i / lo)  # (A AND|AND NOT B) AND|AND NOT C
            if has_or:
                three.append(np.minimum(m, 2 * i) / lo)  # (A OR B) AND|AND NOT C
        if has_or:
            three.append(_g(2 * i, f, m, lo, i_max, f_min, iou_max))  # (A OR B) OR C
            if has_and:
                three.append(_g(i, 0.0, m, lo, i_max, f_min, iou_max))  # (A AND B) OR C
        bound = np.maximum(bound, np.maximum.reduce(three) * penalty**2)
    return np.where(m > 0, bound, 0.0)


def _first_pair_ordered(first: FirstCounts, u: int, a: int, op: int, b: np.ndarray) -> np.ndarray:
    """bool [len(b)]: A op B is in the searched form (AND NOT always; OR, AND: A ranks first)."""
    if op == 2:
        return np.ones(len(b), bool)
    ia, ib = first.intersection[u, a], first.intersection[u, b]
    return (ia > ib) | ((ia == ib) & (a < b))


def optimal_search(
    first: FirstCounts,
    evaluate: Evaluate,
    *,
    max_length: int = DEFAULT_LENGTH,
    ops: Sequence[int] = (0, 1, 2),
    penalty: float = 1.0,
    candidates: np.ndarray | None = None,
    slots: int = DEFAULT_BEAM,
    start: Sequence[Scored] | None = None,
    stats: SearchStats | None = None,
) -> list[Scored]:
    """Per unit the formula of maximum score (module doc), proven by the bounds.

    start: a known formula per unit (the beam's best) whose score seeds the pruning.
    slots: prefixes per unit per pass over the data.
    """
    check_options(max_length, slots, ops, penalty, beam_name="slots")
    candidates = default_candidates(first) if candidates is None else np.asarray(candidates, bool)
    _check_candidates(candidates)
    stats = SearchStats() if stats is None else stats
    best = [row[0] for row in _first_beam(first, candidates, 1)]
    if start is not None:
        start = [dataclasses.replace(s, formula=_lower_first(s.formula)) for s in start]
        best = [min(a, b, key=Scored.rank) for a, b in zip(best, start, strict=True)]
    if max_length == 1:
        return best
    k, nl = first.intersection.shape
    table, bits = first.union_table.astype(np.float64), first.category_bits
    # Units whose best score is 0 have no concept meeting their mask: every formula scores 0.
    live = np.array([b.score > 0 for b in best])
    bounds = first_bounds(first, candidates, ops, penalty, max_length)
    i_c = np.asarray(first.intersection, np.float64)[:, candidates]
    f_c = np.asarray(first.label_pixels, np.float64)[candidates][None, :] - i_c
    queue: list[list[tuple[float, Formula]]] = []
    for u in range(k):
        if not live[u]:
            queue.append([])
            continue
        cs = np.flatnonzero(candidates)
        order = np.lexsort((cs, -bounds[u, cs]))
        queue.append([(float(bounds[u, cs[j]]), Formula((int(cs[j]),))) for j in order])
    second: list[list[tuple[float, Formula]]] = [[] for _ in range(k)]

    def run_blocks(queue, on_counts):
        # Each unit's queue is sorted by bound, best first: a unit is done at the first
        # prefix whose bound is below its best score.
        at = [0] * k
        while True:
            block = []
            for u in range(k):
                row = []
                floor = best[u].score * (1 - _MARGIN)
                while at[u] < len(queue[u]) and len(row) < slots and queue[u][at[u]][0] >= floor:
                    row.append(queue[u][at[u]][1])
                    at[u] += 1
                if len(row) < slots:
                    at[u] = len(queue[u])
                block.append(row)
            if not any(block):
                return
            counts = evaluate(FormulaTable.of(block, slots))
            stats.passes += 1
            for row in block:
                for f in row:
                    stats.prefixes[len(f)] = stats.prefixes.get(len(f), 0) + 1
            on_counts(block, counts)

    def after_first(block, counts):
        scores, ious = _extension_scores(first, counts, block, ops, candidates, penalty)
        inter, size = extension_counts(first, counts)
        for u in range(k):
            n = len(block[u])
            if not n:
                continue
            best[u] = _select([best[u]], block[u], scores[u, :n], ious[u, :n], 1, commute=True)[0]
            if max_length < 3:
                continue
            for s, p in enumerate(block[u]):
                a = p.concepts[0]
                for op in ops:
                    b = np.flatnonzero(np.isfinite(scores[u, s, op]))
                    b = b[_first_pair_ordered(first, u, a, op, b)]
                    ip = inter[u, s, op, b].astype(np.float64)
                    fp = size[u, s, op, b] - ip
                    pb = first.formula_bits(p.concepts) | bits[b]  # cats of A op B
                    ub = np.zeros(len(b))
                    if 1 in ops or 2 in ops:
                        ub = ip / np.maximum(table[u, pb], 1.0)
                    if 0 in ops:
                        # m of (A op B) OR C exactly, per B and C.
                        mg = table[u, pb[:, None] | bits[candidates][None, :]]
                        ub = np.maximum(ub, _or_bound(ip, fp, mg, i_c[u], f_c[u]))
                    ub = ub * penalty**2
                    for j in np.flatnonzero(ub >= best[u].score * (1 - _MARGIN)):
                        second[u].append((float(ub[j]), p.extend(op, int(b[j]))))

    run_blocks(queue, after_first)
    if max_length < 3:
        return best
    for u in range(k):
        second[u].sort(key=lambda t: (-t[0], t[1]))

    def after_second(block, counts):
        scores, ious = _extension_scores(first, counts, block, ops, candidates, penalty)
        for u in range(k):
            n = len(block[u])
            if n:
                best[u] = _select([best[u]], block[u], scores[u, :n], ious[u, :n], 1, commute=True)[
                    0
                ]

    run_blocks(second, after_second)
    return best


def _or_bound(ip: np.ndarray, fp: np.ndarray, m: np.ndarray, i_c: np.ndarray, f_c: np.ndarray):
    """max over C of min(m, I_P + I_C) / (m + max(F_P, F_C)), m [n, C] the union's m of
    P OR C: the bound on P OR C for prefixes with I_P = ip, F_P = fp [n] (module doc), in
    chunks of prefixes."""
    out = np.empty(len(ip))
    step = max(1, (1 << 22) // max(len(i_c), 1))
    for a in range(0, len(ip), step):
        x, f, mg = ip[a : a + step, None], fp[a : a + step, None], m[a : a + step]
        tp = np.minimum(mg, x + i_c[None])
        out[a : a + step] = (tp / np.maximum(mg + np.maximum(f, f_c[None]), 1.0)).max(1)
    return out


def _or_parts(first: FirstCounts, candidates: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per unit [K]: max_C I_C, min_C F_C and max_C I_C / (m_min + F_C) over the candidates
    (for g), m_min the least single-concept m (max_C IoU(C) without a restriction)."""
    i = np.asarray(first.intersection, np.float64)
    f = np.asarray(first.label_pixels, np.float64)[None, :] - i
    cand = candidates[None, :]
    i_max = np.where(cand, i, 0).max(1)
    f_min = np.where(cand, f, np.inf).min(1)
    f_min = np.where(np.isfinite(f_min), f_min, 0.0)
    single = _single_totals(first)
    m_min = np.where(cand, single, np.iinfo(np.int64).max).min(1, keepdims=True)
    m_min = np.where(candidates.any(), m_min, 0)
    iou_max = np.where(cand, iou(i, m_min, f + i), 0).max(1)
    return i_max, f_min, iou_max


__all__ = [
    "DEFAULT_BEAM",
    "DEFAULT_LENGTH",
    "Evaluate",
    "Scored",
    "SearchStats",
    "beam_search",
    "check_options",
    "default_candidates",
    "first_bounds",
    "first_ious",
    "optimal_search",
]

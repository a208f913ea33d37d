"""Compositional explanations (Mu & Andreas, NeurIPS 2020): logical formulas over concepts.

A formula is left-deep: a concept, then each further concept joined by an operator to the
formula so far, ((A op B) op C); operators OR, AND, AND NOT. Its mask on an image is pixel
logic over the concepts' masks (`jaxdissect.masks.concept_masks`: pixel labels of every
plane, image-level labels cover the whole image), and its IoU with unit u is dataset-level:
IoU(u, F) = |M_u and F| / |M_u or F|, sums over every pixel of every image. The canonical
text is `water`, `water OR river`, `(water OR river) AND NOT blue`.

Union restriction (`RESTRICTIONS`, as the dissection's, `jaxdissect.tally`), extended to
formulas through the categories of their concepts: an image x counts |M_u(x)| in the union
of F when it passes the restriction for some category of F's concepts: "none" (Mu &
Andreas's release, the default) every image; "presence" x holds a label of one of those
categories; "overlap" such a label lies under M_u(x) (or is an image-level label of x).
Every pixel of F lies in a mask of one of its concepts (the first concept is never negated,
and OR / AND / AND NOT add no pixel outside their operands), so F and M_u and F lie in the
images that pass: only |M_u| in the union changes, to m_u(cats(F)) = the sum of |M_u(x)|
over those images. The tally gives it for every set of categories from one array,
`FirstCounts.pattern_pixels`; a formula of length 1 scores as the dissection's IoU under the
same restriction.

Counts of the extensions of a formula P by every concept c (what the on-device statistic of
`jaxdissect.formula_counts` gives): with I_P = |M and P|, N_P = |P|, A_c = |M and P and L_c|,
B_c = |P and L_c| and the length-1 tally's I_c = |M and L_c|, N_c = |L_c|,

    P AND c:      |M and G| = A_c               |G| = B_c
    P OR c:       |M and G| = I_P + I_c - A_c   |G| = N_P + N_c - B_c
    P AND NOT c:  |M and G| = I_P - A_c         |G| = N_P - B_c

(inclusion-exclusion), and IoU = |M and G| / (|M| + |G| - |M and G|), 0 where that is 0.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import numpy as np

from jaxdissect import tally

# Operator codes, in this order everywhere (arrays, flags, tie-breaks).
OPS = ("OR", "AND", "AND NOT")
OP_FLAGS = ("or", "and", "and_not")
MAX_LENGTH = 3
NO_OP = -1
RESTRICTIONS = tally.RESTRICTIONS


@dataclasses.dataclass(frozen=True, order=True)
class Formula:
    """A left-deep formula: concepts [c0, c1, ...] and the operator codes joining them.

    Ordered (and so tie-broken) by its concepts, then its operators.
    """

    concepts: tuple[int, ...]
    ops: tuple[int, ...] = ()

    def __post_init__(self):
        if len(self.ops) != len(self.concepts) - 1 or not self.concepts:
            raise ValueError(f"a formula needs n >= 1 concepts and n - 1 ops, got {self}")
        if any(op not in range(len(OPS)) for op in self.ops):
            raise ValueError(f"operator codes are 0..{len(OPS) - 1}, got {self.ops}")

    def __len__(self) -> int:
        return len(self.concepts)

    def extend(self, op: int, concept: int) -> Formula:
        return Formula((*self.concepts, int(concept)), (*self.ops, int(op)))

    def text(self, names: Sequence[str]) -> str:
        """The canonical string, e.g. `(water OR river) AND NOT blue`."""
        out = str(names[self.concepts[0]])
        for i, (op, c) in enumerate(zip(self.ops, self.concepts[1:], strict=True)):
            left = f"({out})" if i > 0 else out
            out = f"{left} {OPS[op]} {names[c]}"
        return out

    def mask(self, concept_mask) -> np.ndarray:
        """The formula's mask from `concept_mask(c) -> bool array` (numpy, any shape)."""
        out = np.asarray(concept_mask(self.concepts[0]), bool)
        for op, c in zip(self.ops, self.concepts[1:], strict=True):
            m = np.asarray(concept_mask(c), bool)
            out = out | m if op == 0 else out & m if op == 1 else out & ~m
        return out


def parse_ops(names: Sequence[str]) -> tuple[int, ...]:
    """Operator codes of flag names (`or`, `and`, `and_not`); refuses unknown names."""
    out = []
    for name in names:
        if name not in OP_FLAGS:
            raise ValueError(f"operators={name!r}; allowed values: {', '.join(OP_FLAGS)}")
        out.append(OP_FLAGS.index(name))
    if not out:
        raise ValueError("operators=(none): give at least one of " + ", ".join(OP_FLAGS))
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class FormulaTable:
    """Per unit, S formulas as device arrays: concepts int32 [K, S, 3] and ops int32 [K, S, 2].

    Shorter formulas pad their ops with NO_OP (the mask stops changing); an empty slot has
    concept 0 (never a concept: an empty mask, every count 0).
    """

    concepts: np.ndarray
    ops: np.ndarray

    @classmethod
    def of(cls, per_unit: Sequence[Sequence[Formula]], slots: int) -> FormulaTable:
        k = len(per_unit)
        concepts = np.zeros((k, slots, MAX_LENGTH), np.int32)
        ops = np.full((k, slots, MAX_LENGTH - 1), NO_OP, np.int32)
        for u, formulas in enumerate(per_unit):
            if len(formulas) > slots:
                raise ValueError(f"unit {u}: {len(formulas)} formulas for {slots} slots")
            for s, f in enumerate(formulas):
                if len(f) > MAX_LENGTH:
                    raise ValueError(f"formula {f} is longer than {MAX_LENGTH}")
                concepts[u, s, : len(f)] = f.concepts
                ops[u, s, : len(f.ops)] = f.ops
        return cls(concepts, ops)


@dataclasses.dataclass(frozen=True)
class FirstCounts:
    """The length-1 tally: |M_u| [K], |M_u and L_c| [K, L], |L_c| [L], and for a union
    restriction (module doc) the label categories and the unit totals by restriction pattern.

    category: int [L], each label's primary category (-1: none); None: no restriction.
    pattern_pixels: int [K, 2**C]: the sum of |M_u(x)| over the images x whose set of
      categories passing the restriction for unit u is the bit set p (`tally`'s
      `patterns`); None: no restriction (every image passes every category).
    """

    unit_total: np.ndarray
    intersection: np.ndarray
    label_pixels: np.ndarray
    category: np.ndarray | None = None
    pattern_pixels: np.ndarray | None = None

    def __post_init__(self):
        if (self.category is None) != (self.pattern_pixels is None):
            raise ValueError("category and pattern_pixels: give both or neither")

    @functools.cached_property
    def union_table(self) -> np.ndarray:
        """int64 [K, 2**C]: m_u(S), |M_u| over the images passing some category of the bit
        set S (S = 0: 0). Without a restriction, [K, 2]: 0, |M_u|."""
        total = np.asarray(self.unit_total, np.int64)
        if self.pattern_pixels is None:
            return np.stack([np.zeros_like(total), total], axis=1)
        patterns = np.asarray(self.pattern_pixels, np.int64)
        p = np.arange(patterns.shape[1])
        return patterns @ ((p[:, None] & p[None, :]) != 0).astype(np.int64)

    @functools.cached_property
    def category_bits(self) -> np.ndarray:
        """int64 [L]: each label's category as a bit set (1 << category; 0 for none).
        Without a restriction every label is bit 1 (the one column of `union_table`)."""
        if self.category is None:
            return np.ones(np.shape(self.label_pixels), np.int64)
        cat = np.asarray(self.category, np.int64)
        return np.where(cat >= 0, np.left_shift(1, np.maximum(cat, 0)), 0)

    def formula_bits(self, concepts: Sequence[int]) -> int:
        """The bit set of a formula's concepts' categories."""
        bits = self.category_bits
        out = 0
        for c in concepts:
            out |= int(bits[c])
        return out


@dataclasses.dataclass(frozen=True)
class ExtensionCounts:
    """Exact counts of S prefix formulas per unit and of their extensions by every concept.

    and_label [K, S, L]: |M_u and P and L_c|; formula_label [K, S, L]: |P and L_c|;
    and_total [K, S]: |M_u and P|; formula_total [K, S]: |P| (int64).
    """

    and_label: np.ndarray
    formula_label: np.ndarray
    and_total: np.ndarray
    formula_total: np.ndarray


def extension_counts(first: FirstCounts, ext: ExtensionCounts) -> tuple[np.ndarray, np.ndarray]:
    """(|M and G|, |G|), int64 [K, S, 3, L], for G = P op c, op in OPS order (module doc)."""
    a, b = ext.and_label, ext.formula_label
    ip, np_ = ext.and_total[..., None], ext.formula_total[..., None]
    ic = first.intersection[:, None, :]
    nc = first.label_pixels[None, None, :]
    inter = np.stack([ip + ic - a, a, ip - a], axis=2)
    size = np.stack([np_ + nc - b, b, np_ - b], axis=2)
    return inter, size


__all__ = [
    "MAX_LENGTH",
    "NO_OP",
    "RESTRICTIONS",
    "OPS",
    "OP_FLAGS",
    "ExtensionCounts",
    "FirstCounts",
    "Formula",
    "FormulaTable",
    "extension_counts",
    "parse_ops",
]

"""Beam and optimal formula search against brute force and a plain numpy beam."""

import jax
import numpy as np
import pytest

from jaxdissect import formula_counts, formula_search, results, tally
from jaxdissect.data import synthetic
from jaxdissect.data.broden import Broden
from jaxdissect.formulas import ExtensionCounts, FirstCounts, Formula
from tests import formula_reference as ref


def _numpy_evaluate(units, concepts):
    """`evaluate` from explicit masks (the reference counts)."""

    def evaluate(table):
        k, slots = table.concepts.shape[:2]
        per_unit = []
        for u in range(k):
            row = []
            for s in range(slots):
                n = 1 + int((table.ops[u, s] >= 0).sum())
                row.append(
                    Formula(tuple(table.concepts[u, s, :n]), tuple(table.ops[u, s, : n - 1]))
                )
            per_unit.append(row)
        return ExtensionCounts(**ref.reference_counts(units, concepts, per_unit))

    return evaluate


def _first(units, concepts):
    u, c = units.astype(np.int64), concepts.astype(np.int64)
    return FirstCounts(u.sum((0, 1)), np.einsum("nsk,nsl->kl", u, c), c.sum((0, 1)))


CATEGORY = np.array([-1, 0, 0, 1, 1, 2, 2])  # of _random_case's 7 labels


def _restricted_case(seed):
    """_random_case and 3 more images holding only category-2 concepts (labels 5, 6), where
    unit 1 fires everywhere; elsewhere unit 1 is exactly (1 OR 2) AND NOT 3. Unrestricted,
    that formula scores low; counted only on the images of categories 0 and 1, it scores 1."""
    units, concepts = _random_case(seed)
    rng = np.random.default_rng(seed + 1000)
    extra_c = _blobs(rng, 3, 8, concepts.shape[-1], 5)
    extra_c[..., :5] = False
    extra_c[:, :4, 5] = True  # every extra image holds label 5
    extra_u = _blobs(rng, 3, 8, units.shape[-1], 6)
    extra_u[..., 1] = True
    extra_u[..., -1] = False
    units[..., 1] = ref.formula_mask(Formula((1, 2, 3), (0, 2)), concepts)
    return np.concatenate([units, extra_u]), np.concatenate([concepts, extra_c])


def _restricted_first(units, concepts, restriction):
    """FirstCounts under a union restriction, the patterns summed from the reference's
    per-image passes (`formula_reference.category_passes`)."""
    passes = ref.category_passes(units, concepts, CATEGORY, restriction)
    k = units.shape[-1]
    patterns = np.zeros((k, 2 ** passes.shape[-1]), np.int64)
    bits = (passes * (1 << np.arange(passes.shape[-1]))).sum(-1)  # [N, K]
    for x in range(units.shape[0]):
        for u in range(k):
            patterns[u, bits[x, u]] += units[x, :, u].sum()
    plain = _first(units, concepts)
    first = FirstCounts(
        plain.unit_total, plain.intersection, plain.label_pixels, CATEGORY, patterns
    )
    return first, passes


def _blobs(rng, n, side, num, scale):
    """bool [n, side*side, num]: random rectangles (overlapping concepts or units)."""
    out = np.zeros((n, side, side, num), bool)
    for x in range(n):
        for j in range(num):
            for _ in range(rng.integers(0, 3)):
                y0, x0 = rng.integers(0, side, 2)
                h, w = rng.integers(1, scale + 1, 2)
                out[x, y0 : y0 + h, x0 : x0 + w, j] = True
    return out.reshape(n, side * side, num)


def _random_case(seed, num_labels=7, k=5):
    rng = np.random.default_rng(seed)
    concepts = _blobs(rng, 6, 8, num_labels, 5)
    concepts[..., 0] = False  # label 0 is never a concept
    units = _blobs(rng, 6, 8, k, 6)
    # A unit close to a formula of its concepts, with noise.
    f = ref.formula_mask(Formula((1, 2, 3), (0, 2)), concepts)
    units[..., 0] = f ^ (rng.random(f.shape) < 0.05)
    units[..., -1] = False  # a unit that never fires
    return units, concepts


@pytest.mark.parametrize(
    "seed,ops,penalty,width,length",
    [
        (0, (0, 1, 2), 1.0, 5, 3),
        (1, (0, 1, 2), 0.9, 3, 3),
        (2, (0, 2), 1.0, 2, 2),
        (3, (1,), 1.0, 4, 3),
    ],
)
def test_beam_equals_a_plain_numpy_beam(seed, ops, penalty, width, length):
    units, concepts = _random_case(seed)
    cands = list(range(1, concepts.shape[-1]))
    got = formula_search.beam_search(
        _first(units, concepts),
        _numpy_evaluate(units, concepts),
        max_length=length,
        beam=width,
        ops=ops,
        penalty=penalty,
    )
    want = ref.beam(units, concepts, cands, length, width, ops, penalty)
    for u in range(units.shape[-1]):
        assert [(s.score, s.formula) for s in got[u]] == want[u], u


@pytest.mark.parametrize(
    "seed,ops,penalty,length",
    [
        (0, (0, 1, 2), 1.0, 3),
        (4, (0, 1, 2), 1.0, 3),
        (5, (0, 1, 2), 0.85, 3),
        (6, (0, 2), 1.0, 3),
        (7, (0, 1, 2), 1.0, 2),
        (8, (1, 2), 1.0, 3),
    ],
)
def test_optimal_equals_brute_force(seed, ops, penalty, length):
    units, concepts = _random_case(seed)
    cands = list(range(1, concepts.shape[-1]))
    first = _first(units, concepts)
    evaluate = _numpy_evaluate(units, concepts)
    stats = formula_search.SearchStats()
    start = [
        row[0]
        for row in formula_search.beam_search(
            first, evaluate, max_length=length, beam=1, ops=ops, penalty=penalty
        )
    ]
    got = formula_search.optimal_search(
        first,
        evaluate,
        max_length=length,
        ops=ops,
        penalty=penalty,
        slots=2,
        start=start,
        stats=stats,
    )
    want = ref.brute_force(units, concepts, cands, length, ops, penalty)
    for u in range(units.shape[-1]):
        assert got[u].score == pytest.approx(want[u][0], rel=1e-12, abs=0), u
        # Ties as the beam's: of `2 OR 1` and `1 OR 2` (one searched), `1 OR 2` (seed 0).
        assert got[u].formula == want[u][1], u
        # The answer's score is its own.
        f = got[u].formula
        assert ref.score(
            units[..., u], ref.formula_mask(f, concepts), len(f), penalty
        ) == pytest.approx(got[u].score, rel=1e-12)
    assert stats.passes >= 1


@pytest.mark.parametrize(
    "seed,restriction,ops,penalty,width",
    [
        (20, "presence", (0, 1, 2), 1.0, 5),
        (21, "overlap", (0, 1, 2), 0.9, 3),
        (22, "presence", (0, 2), 1.0, 2),
        (23, "none", (0, 1, 2), 1.0, 4),
    ],
)
def test_restricted_beam_and_optimal_equal_the_numpy_references(
    seed, restriction, ops, penalty, width
):
    """Under a union restriction (the images counted for a formula: those passing some
    category of its concepts), beam = the plain numpy beam and optimal = brute force."""
    units, concepts = _restricted_case(seed)
    first, passes = _restricted_first(units, concepts, restriction)
    cands = list(range(1, concepts.shape[-1]))
    evaluate = _numpy_evaluate(units, concepts)
    got = formula_search.beam_search(
        first, evaluate, max_length=3, beam=width, ops=ops, penalty=penalty
    )
    want = ref.beam(units, concepts, cands, 3, width, ops, penalty, passes, CATEGORY)
    for u in range(units.shape[-1]):
        assert [(s.score, s.formula) for s in got[u]] == want[u], u
    brute = ref.brute_force(units, concepts, cands, 3, ops, penalty, passes, CATEGORY)
    # Seeded with the beam, and unseeded (only the bounds prune).
    for start in ([row[0] for row in got], None):
        best = formula_search.optimal_search(
            first, evaluate, ops=ops, penalty=penalty, slots=2, start=start
        )
        for u in range(units.shape[-1]):
            assert best[u].score == pytest.approx(brute[u][0], rel=1e-12, abs=0), u
            assert best[u].formula == brute[u][1], u
            f = best[u].formula
            rows = ref.formula_rows(passes[:, u], CATEGORY, f)
            m, fm = units[..., u], ref.formula_mask(f, concepts)
            score = ref.score(m, fm, len(f), penalty, rows)
            assert score == pytest.approx(best[u].score, rel=1e-12)
    if restriction != "none":  # the restriction changes what is found
        plain = ref.brute_force(units, concepts, cands, 3, ops, penalty)
        assert any(b[0] != p[0] for b, p in zip(brute, plain, strict=True))
        if set(ops) >= {0, 2}:
            assert brute[1][0] >= penalty**2 > plain[1][0]


def test_beam_misses_the_optimum_where_optimal_finds_it():
    # M = X | Y. A = X, B = Y score 0.5 each; the decoy D = X | part of Y | noise scores more,
    # so a beam of 1 keeps D, and nothing removes D's noise: D OR B = 20 / 22 at best.
    units = np.zeros((1, 40, 1), bool)
    concepts = np.zeros((1, 40, 4), bool)
    x, y, noise = np.arange(0, 10), np.arange(10, 20), np.arange(30, 32)
    units[0, np.r_[x, y], 0] = True
    concepts[0, x, 1] = True
    concepts[0, y, 2] = True
    concepts[0, np.r_[x, y[:6], noise], 3] = True
    first = _first(units, concepts)
    evaluate = _numpy_evaluate(units, concepts)
    for length in (2, 3):
        beam = formula_search.beam_search(first, evaluate, max_length=length, beam=1)
        best = formula_search.optimal_search(
            first, evaluate, max_length=length, start=[b[0] for b in beam]
        )
        assert beam[0][0].score == pytest.approx(20 / 22)
        assert best[0].score == 1.0 and best[0].formula == Formula((1, 2), (0,))
        assert ref.brute_force(units, concepts, [1, 2, 3], length)[0][0] == 1.0


def test_optimal_prunes_with_the_bounds():
    units, concepts = _random_case(9, num_labels=12, k=3)
    first = _first(units, concepts)
    evaluate = _numpy_evaluate(units, concepts)
    stats = formula_search.SearchStats()
    formula_search.optimal_search(first, evaluate, stats=stats, slots=4)
    # Without pruning every concept of every live unit would be a length-1 prefix.
    assert stats.prefixes[1] < 11 * 2


@pytest.mark.parametrize(
    "seed,restriction",
    [(seed, None) for seed in range(10, 16)]
    + [(30, "presence"), (31, "overlap"), (32, "presence")],
)
def test_bounds_are_admissible_on_random_cases(seed, restriction):
    if restriction is None:
        units, concepts = _random_case(seed)
        first, passes = _first(units, concepts), None
    else:
        units, concepts = _restricted_case(seed)
        first, passes = _restricted_first(units, concepts, restriction)
    cands = np.arange(concepts.shape[-1]) > 0
    bounds = formula_search.first_bounds(first, cands, (0, 1, 2), 1.0, 3)
    formulas = [f for f in ref.all_formulas(range(1, concepts.shape[-1]), 3) if len(f) > 1]
    for u in range(units.shape[-1]):
        m = units[..., u]
        for f in formulas:
            a, b = f.concepts[:2]
            ia, ib = first.intersection[u, a], first.intersection[u, b]
            if f.ops[0] != 2 and (ib > ia or (ib == ia and b < a)):
                continue  # not in the searched form: the one with a and b swapped is
            rows = None if passes is None else ref.formula_rows(passes[:, u], CATEGORY, f)
            got = ref.score(m, ref.formula_mask(f, concepts), len(f), 1.0, rows)
            assert got <= bounds[u, a] + 1e-12, (u, f)


def test_options_are_checked():
    first = FirstCounts(np.ones(1), np.ones((1, 2)), np.ones(2))
    with pytest.raises(ValueError, match="max_length=4"):
        formula_search.beam_search(first, None, max_length=4)
    with pytest.raises(ValueError, match="penalty=1.5"):
        formula_search.beam_search(first, None, penalty=1.5)
    with pytest.raises(ValueError, match="beam=0"):
        formula_search.beam_search(first, None, beam=0)
    with pytest.raises(ValueError, match="^slots=0: must be >= 1"):
        formula_search.optimal_search(first, None, slots=0)
    # The settings' errors name their own fields, which the CLI writes as flags.
    from jaxdissect.compositional import SearchSettings
    from jaxdissect.formulas import parse_ops

    with pytest.raises(ValueError, match=r"^length_penalty=0.0: must be in \(0, 1\]"):
        SearchSettings(length_penalty=0.0)
    with pytest.raises(ValueError, match="^operators=.none.: give at least one of or, and"):
        parse_ops([])


@pytest.mark.optimized  # its time is the search's passes (tests/conftest.py)
def test_planted_formula_is_recovered_on_synthetic_broden_masks(tmp_path):
    probe = Broden.open(synthetic.generate_tiny(tmp_path / "broden", num_images=24))
    nl = probe.labels.num_labels
    n = len(probe)
    sh, sw = probe.seg_size
    planes = np.zeros((n, probe.max_planes, sh, sw), np.int32)
    image_labels = np.zeros((n, probe.max_image_labels), np.int32)
    for i in range(n):
        p, q = probe.read_labels(i)
        planes[i, : len(p)] = p
        image_labels[i, : len(q)] = q
    _, concept_masks = ref.reference_masks(
        np.zeros((n, 1, 1, 1), np.float32), np.ones(1, np.float32), planes, image_labels, nl
    )
    area = concept_masks.sum((0, 1))
    pixel_level = [c for c in range(1, nl) if 0 < area[c] < n * sh * sw / 4]
    # A, B: the two largest pixel-level concepts; C: the concept overlapping A | B most.
    a, b = sorted(pixel_level, key=lambda c: -area[c])[:2]
    ab = concept_masks[..., a] | concept_masks[..., b]
    overlap = [(int((ab & concept_masks[..., c]).sum()), c) for c in pixel_level if c not in (a, b)]
    c = max(overlap)[1]
    planted = Formula((a, b, c), (0, 2))
    unit = ref.formula_mask(planted, concept_masks)
    assert 0 < unit.sum() < ab.sum()  # C removes part of A | B
    # The unit's activations: its mask at the segmentation size, thresholded at 0.5.
    acts = np.stack([unit, ~unit], -1).reshape(n, sh, sw, 2).astype(np.float32)
    thresholds = np.full(2, 0.5, np.float32)
    batch = {"pixel_labels": planes, "image_labels": image_labels}
    primary = np.asarray(probe.labels.primary)
    step = jax.jit(
        lambda c, o: formula_counts.batch_formula_counts(acts, thresholds, c, o, batch, nl)
    )

    def evaluate(table):
        got = step(table.concepts, table.ops)
        return ExtensionCounts(**{k: np.asarray(v, np.int64) for k, v in got.items()})

    # Jitted (eager, each op compiled apart took longer than the three programs).
    batch_counts = jax.jit(
        tally.batch_counts, static_argnums=4, static_argnames=("restriction", "patterns")
    )
    for restriction in tally.RESTRICTIONS:
        counts = batch_counts(
            acts,
            thresholds,
            batch,
            primary,
            probe.labels.num_categories,
            restriction=restriction,
            patterns=True,
        )
        counts = {k: np.asarray(v, np.int64) for k, v in counts.items()}
        first = FirstCounts(
            counts["unit_total"],
            counts["intersection"],
            counts["label_pixels"],
            primary,
            counts["pattern_pixels"],
        )
        # Length 1 scores as the dissection's IoU under the same restriction.
        layer = results.layer_result("unit", counts, probe.labels)
        scored = formula_search.default_candidates(first)
        np.testing.assert_array_equal(
            formula_search.first_ious(first)[:, scored], layer.iou[:, scored]
        )
        beam = formula_search.beam_search(first, evaluate)
        best = formula_search.optimal_search(first, evaluate, start=[r[0] for r in beam])
        for found in (beam[0][0], best[0]):
            assert found.iou == 1.0, restriction
            np.testing.assert_array_equal(ref.formula_mask(found.formula, concept_masks), unit)

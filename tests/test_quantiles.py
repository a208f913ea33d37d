"""Tests of jaxdissect.quantiles against slow, obvious numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import quantiles as Q
from jaxdissect import statistics

# The sketch tests' time is running the sketch over millions of values (tests/conftest.py).
pytestmark = pytest.mark.optimized

Q_DEFAULT = 0.005

# Shared jitted entry points: tests reuse the same shapes, so each compiles once.
_exact_update = jax.jit(Q.exact_update)
_exact_merge = jax.jit(Q.exact_merge)
_sketch_update = jax.jit(Q.sketch_update)
_sketch_merge = jax.jit(Q.sketch_merge)

K = 8  # units in every stream below
ROWS = 32 * 49  # a ResNet layer4 batch: 32 images x 7 x 7
BIG_ROWS = 32 * 3136  # an early-layer batch: 32 images x 56 x 56
PAD_ROWS = 256  # fixed batch for the small exact tests (the tail is padding)
MAX_COUNT = 3_100_000  # one upper bound for every sketch below: one state shape


def _bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def _feed(update, state, x: np.ndarray, rows: int, valid: np.ndarray | None = None):
    """Feed x in batches of `rows`, padding the last batch with invalid garbage rows."""
    n = x.shape[0]
    valid = np.ones(n, bool) if valid is None else valid
    for start in range(0, n, rows):
        xb, vb = x[start : start + rows], valid[start : start + rows]
        if xb.shape[0] < rows:
            pad = rows - xb.shape[0]
            xb = np.concatenate([xb, np.full((pad, x.shape[1]), 1e30, np.float32)])
            vb = np.concatenate([vb, np.zeros(pad, bool)])
        state = update(state, xb, vb)
    return state


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize("n", [1, 2, 3, 7, 200, 201, 1000, 4321])
@pytest.mark.parametrize("q", [0.005, 0.01, 0.3, 0.5, 1 - 0.994995, 0.0, 1.0])
def test_reference_is_numpy_quantile_bitwise(n, q):
    rng = np.random.default_rng(n)
    v = np.concatenate(
        [
            rng.standard_normal((n, 3)),
            rng.integers(-3, 4, (n, 2)),  # ties
            np.full((n, 1), 2.5),  # all equal
            rng.lognormal(0, 3, (n, 1)),  # wide dynamic range
        ],
        axis=1,
    ).astype(np.float32)
    v[v == 0] = 0.0  # no signed zeros: the reference reads -0.0 as +0.0
    ours = Q.reference_threshold(v, q)
    theirs = np.quantile(v, 1 - q, axis=0)
    assert theirs.dtype == np.float32
    np.testing.assert_array_equal(_bits(ours), _bits(theirs))


def test_reference_formula_by_hand():
    # 1000 values 0..999: v = 999 * 0.995 = 994.005 -> a[994] + 0.005 * (a[995] - a[994]).
    v = np.arange(1000, dtype=np.float32)[::-1, None]
    assert Q.reference_threshold(v, 0.005)[0] == np.float32(994.005)


# ----------------------------------------------------------------------------- exact mode


def _exact_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 4321  # not a multiple of the batch size
    x = rng.standard_normal((n, K), dtype=np.float32)
    x[:, 1] = rng.integers(0, 5, n)  # heavy ties
    x[:, 2] = 3.0  # all equal
    x[:, 3] = 0.0  # all zero (a dead ReLU unit)
    x[:, 4] = -rng.lognormal(0, 2, n)  # all negative
    x[:, 5] = np.where(rng.random(n) < 0.5, -0.0, 0.0)  # signed zeros only
    x[:, 6] = np.sort(x[:, 6])  # sorted ascending stream
    x[:, 7] = np.sort(x[:, 7])[::-1]  # sorted descending stream
    return {
        "mixed": x,
        "tiny1": x[:1],
        "tiny2": x[:2],
        "tiny3": x[:3],
        "t_zero": x[:201],  # (n - 1) * (1 - q) = 199 up to rounding
        "one_batch": x[:PAD_ROWS],
    }


@pytest.mark.parametrize("case", list(_exact_cases()))
def test_exact_matches_reference_bitwise(case):
    x = _exact_cases()[case]
    state = Q.exact_init(K, total_count=5000)  # an upper bound is enough
    state = _feed(_exact_update, state, x, PAD_ROWS)
    assert Q.count_value(state.count) == x.shape[0]
    np.testing.assert_array_equal(_bits(Q.exact_threshold(state)), _bits(Q.reference_threshold(x)))


def test_exact_valid_mask_drops_rows():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, K), dtype=np.float32)
    valid = rng.random(3000) < 0.7
    x[~valid] = 1e9  # would dominate the tail if counted
    x[~valid, 0] = np.nan  # and must not count as non-finite either
    state = _feed(_exact_update, Q.exact_init(K, total_count=5000), x, PAD_ROWS, valid)
    assert Q.count_value(state.count) == valid.sum()
    assert not np.asarray(state.nonfinite).any()
    np.testing.assert_array_equal(
        _bits(Q.exact_threshold(state)), _bits(Q.reference_threshold(x[valid]))
    )


def test_exact_other_q():
    # A state sized for q answers any q' <= q (it holds the top k for q).
    x = _exact_cases()["mixed"]
    state = _feed(_exact_update, Q.exact_init(K, total_count=5000), x, PAD_ROWS)
    for q in (0.001, 0.002, 0.005):
        np.testing.assert_array_equal(
            _bits(Q.exact_threshold(state, q)), _bits(Q.reference_threshold(x, q))
        )
    with pytest.raises(ValueError, match="cannot answer"):
        Q.exact_threshold(state, q=0.3)


def test_exact_merge_associative_commutative_bitwise():
    x = _exact_cases()["mixed"]
    parts = [x[:1500], x[1500:1600], x[1600:]]
    a, b, c = (_feed(_exact_update, Q.exact_init(K, 5000), p, PAD_ROWS) for p in parts)
    left = _exact_merge(_exact_merge(a, b), c)
    right = _exact_merge(a, _exact_merge(b, c))
    swapped = _exact_merge(c, _exact_merge(b, a))
    stacked = jax.tree_util.tree_map(lambda *s: jnp.stack(s), a, b, c)  # like all_gather
    gathered = statistics.merge_devices(Q.exact_merge, stacked)
    on_host = _exact_merge(c, _exact_merge(*jax.device_get((b, a))))  # numpy leaves
    for other in (right, swapped, gathered, on_host):
        np.testing.assert_array_equal(_bits(left.top), _bits(other.top))
        assert Q.count_value(other.count) == x.shape[0]
    ref = Q.reference_threshold(x)
    for s in (left, right, swapped, gathered, on_host):
        np.testing.assert_array_equal(_bits(Q.exact_threshold(s)), _bits(ref))


def test_exact_rejects_more_values_than_sized_for():
    x = np.zeros((5001, K), np.float32)
    state = _feed(_exact_update, Q.exact_init(K, total_count=5000), x, PAD_ROWS)
    with pytest.raises(ValueError, match="total_count"):
        Q.exact_threshold(state)


@pytest.mark.parametrize("size", [64, 672, 16384])
def test_sketch_refuses_more_values_than_int32_ranks_whatever_its_size(size):
    with pytest.raises(ValueError, match="max_count=20000000000: .* a larger size does not"):
        Q.sketch_init(4, size=size, max_count=2 * 10**10)


def test_sketch_without_max_count_at_a_large_q_asks_for_it():
    # Sized for 2**32 values a unit by default: at q = 0.05 that overflows int32 ranks, and
    # the refusal named max_count=None and advised fewer values instead of passing max_count.
    with pytest.raises(ValueError, match="without max_count .* pass max_count"):
        Q.sketch_init(4, q=0.05)
    assert Q.sketch_init(4, q=0.05, max_count=10**6).levels.shape[0] == Q.sketch_levels(
        Q.DEFAULT_SIZE, 0.05, 10**6
    )


def test_nonfinite_are_counted_not_silent():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, K), dtype=np.float32)
    x[5, 0], x[6, 0], x[7, 0] = np.nan, np.inf, -np.inf
    x[:100, 1] = np.inf  # would be the whole tail if ranked on top
    exact = _feed(_exact_update, Q.exact_init(K, 5000), x, PAD_ROWS)
    sketch = _feed(_sketch_update, Q.sketch_init(K, max_count=MAX_COUNT), x[:600], ROWS)
    expected = [3, 100] + [0] * (K - 2)
    for state in (exact, sketch):
        np.testing.assert_array_equal(np.asarray(state.nonfinite), expected)
    # Non-finite values rank below every finite one (and the caller sees the count).
    ref = Q.reference_threshold(x)
    assert np.isfinite(ref[1]) and ref[1] < 4
    np.testing.assert_array_equal(_bits(Q.exact_threshold(exact)), _bits(ref))
    ref = Q.reference_threshold(x[:600])
    np.testing.assert_array_equal(_bits(Q.sketch_threshold(sketch)), _bits(ref))


def test_counts_beyond_int32():
    c = Q._count_zero()
    for n in (2**30 - 1, 2**30 - 1, 2**30 - 1, 12345):  # increments are chunk row counts
        c = Q._count_add(c, jnp.int32(n))
    total = 3 * (2**30 - 1) + 12345
    assert Q.count_value(c) == total
    assert Q.count_value(Q._count_merge(c, c)) == 2 * total
    assert Q._positions(4_000_000_000, 0.005)[0] == 4_000_000_000 - 1 - int(3999999999 * 0.995)


# ----------------------------------------------------------------------------- sketch mode


def test_sketch_is_exact_before_compacting():
    x = _exact_cases()["mixed"][:600]  # fewer values than one level holds
    state = _feed(_sketch_update, Q.sketch_init(K, max_count=MAX_COUNT), x, ROWS)
    assert not np.asarray(state.ncompact).any()
    assert Q.sketch_certified(state).all()
    np.testing.assert_array_equal(_bits(Q.sketch_threshold(state)), _bits(Q.reference_threshold(x)))


@pytest.mark.parametrize("order", ["random", "ascending"])
def test_sketch_certified_and_exact_on_a_small_probe_set(order):
    # 13 images of a 4x4 token grid: 208 values, q 0.005. The threshold reads descending
    # ranks 2 and 3; a cut kept only at rank >= ceil(1.5 q n) = 2 dropped rank 3.
    x = np.random.default_rng(3).standard_normal((208, K)).astype(np.float32)
    if order == "ascending":
        x = np.sort(x, axis=0)
    state = _feed(_sketch_update, Q.sketch_init(K, max_count=208), x, 128)
    assert Q.sketch_certified(state).all()
    np.testing.assert_array_equal(_bits(Q.sketch_threshold(state)), _bits(Q.reference_threshold(x)))


def _tail_columns(n: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Skewed / heavy-tailed / spiky units; n a multiple of 49 (hot 7x7 images)."""
    g = rng.standard_normal((n, 3), dtype=np.float32)
    spike = rng.standard_normal(n, dtype=np.float32)
    spike[rng.random(n) < 0.4] = 0.0
    spike[rng.random(n) < 0.2] = 1.5
    hot = rng.standard_normal((n // 49, 49), dtype=np.float32)
    hot[rng.random(n // 49) < 0.01] += 3.0  # 1% of images light up everywhere
    cols = {
        "relu": np.maximum(g[:, 0], 0),  # half exact zeros
        "lognormal": np.exp(1.5 * g[:, 1]),
        "abs-cauchy": np.abs(rng.standard_cauchy(n)),
        "pareto": rng.pareto(1.5, n),
        "spike-mixture": spike,
        "hot-images": hot.reshape(-1),
        "saturated": np.clip(3 * g[:, 2], 0, 6),  # 2.3% at exactly 6: T on the spike
        "dead": np.zeros(n),  # T = 0 on a spike of 100%
    }
    return np.stack(list(cols.values()), 1).astype(np.float32), list(cols)


def _check_accuracy(state, x: np.ndarray, names: list[str], ref: np.ndarray) -> None:
    t = np.asarray(Q.sketch_threshold(state))  # raises if not certified
    frac = (x > t).mean(0)
    for i, name in enumerate(names):
        if name in ("saturated", "dead"):
            # The quantile sits on a spike: exactly right, or it is wrong.
            assert t[i] == ref[i], name
            continue
        exact_frac = (x[:, i] > ref[i]).mean()
        assert abs(exact_frac / Q_DEFAULT - 1) < 1e-3  # the metric is meaningful
        rel = frac[i] / Q_DEFAULT - 1
        assert abs(rel) < 0.01, (name, rel)
    # Not secretly exact: the whole state per unit is far below the q*n tail values.
    size = sum(leaf.size for leaf in jax.tree_util.tree_leaves(state)) / x.shape[1]
    assert size < 0.5 * Q_DEFAULT * x.shape[0], size
    assert state.levels.shape[2] == Q.DEFAULT_SIZE


@pytest.fixture(scope="module")
def big_tail_data():
    """One data set for the accuracy tests: 30 large batches, or 1920 small ones."""
    n = BIG_ROWS * 30  # 3,010,560 values per unit
    x, names = _tail_columns(n, np.random.default_rng(12))
    return x, names, Q.reference_threshold(x)


def test_sketch_accuracy_small_batches(big_tail_data):
    x, names, ref = big_tail_data
    state = _feed(_sketch_update, Q.sketch_init(K, max_count=MAX_COUNT, seed=1), x, ROWS)
    _check_accuracy(state, x, names, ref)


def test_sketch_accuracy_large_batches(big_tail_data):
    x, names, ref = big_tail_data
    state = _feed(_sketch_update, Q.sketch_init(K, max_count=MAX_COUNT, seed=2), x, BIG_ROWS)
    _check_accuracy(state, x, names, ref)


def test_sketch_accuracy_after_merging_8_shards(big_tail_data):
    x, names, ref = big_tail_data
    shards = np.array_split(np.arange(x.shape[0] // BIG_ROWS) * BIG_ROWS, 8)
    valid = np.ones(BIG_ROWS, bool)  # as _feed passes: the program of the large batches
    states = []
    for i, starts in enumerate(shards):
        state = Q.sketch_init(K, max_count=MAX_COUNT, seed=100 + i)
        for s in starts:
            state = _sketch_update(state, x[s : s + BIG_ROWS], valid)
        states.append(state)
    # The devices' tree ((01)(23))((45)(67)): bitwise what merge_devices gives (pinned by
    # test_statistics.py::test_device_merge_is_the_pairwise_tree_bitwise), in the one
    # merge program the fold below uses too.
    tree = states
    while len(tree) > 1:
        tree = [_sketch_merge(a, b) for a, b in zip(tree[0::2], tree[1::2], strict=True)]
    tree = tree[0]
    assert Q.count_value(tree.count) == x.shape[0]
    _check_accuracy(tree, x, names, ref)
    # Another order: a left fold over the states in reverse, ((((76)5)4)...)0.
    folded = states[-1]
    for state in states[-2::-1]:
        folded = _sketch_merge(folded, state)
    assert not np.array_equal(np.asarray(folded.levels), np.asarray(tree.levels))
    _check_accuracy(folded, x, names, ref)


def test_sketch_deterministic_for_a_seed():
    x, _ = _tail_columns(ROWS * 60, np.random.default_rng(13))
    a = _feed(_sketch_update, Q.sketch_init(K, max_count=MAX_COUNT, seed=5), x, ROWS)
    b = _feed(_sketch_update, Q.sketch_init(K, max_count=MAX_COUNT, seed=5), x, ROWS)
    c = _feed(_sketch_update, Q.sketch_init(K, max_count=MAX_COUNT, seed=6), x, ROWS)
    assert np.asarray(a.ncompact).sum() > 0  # compactions happened, so the seed matters
    for leaf_a, leaf_b in zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(leaf_a), np.asarray(leaf_b))
    assert not np.array_equal(np.asarray(a.levels), np.asarray(c.levels))
    np.testing.assert_array_equal(_bits(Q.sketch_threshold(a)), _bits(Q.sketch_threshold(b)))


def test_sketch_data_order():
    rng = np.random.default_rng(14)
    n = ROWS * 120
    x = rng.standard_normal((n, K), dtype=np.float32)
    x[:, 1] = np.sort(x[:, 1])[::-1]  # descending
    x[:, 2] = np.sort(x[:, 2])  # ascending
    # A short early block of high values, then a long run of lower ones: early on the
    # block's lower part looks far below the tail, but the final quantile lies inside it.
    x[:, 0] = np.where(np.arange(n) < n // 40, 10 + rng.random(n), rng.random(n))
    ref_frac = (x > Q.reference_threshold(x)).mean(0)

    # Without max_count the prefilter adapts to the data seen so far and can be fooled,
    # but never silently: a certified threshold is accurate.
    adaptive = _feed(_sketch_update, Q.sketch_init(K), x, ROWS)
    assert adaptive.levels.shape[0] == Q.sketch_levels(Q.DEFAULT_SIZE)
    certified = Q.sketch_certified(adaptive)
    assert not certified[0] and certified[2:].all()
    with pytest.raises(ValueError, match="certify"):
        Q.sketch_threshold(adaptive)
    frac = (x > np.asarray(Q.sketch_threshold(adaptive, strict=False))).mean(0)
    ok = np.abs(frac / ref_frac - 1) < 0.01
    assert (ok | ~certified).all() and not ok[0]

    # With max_count nothing that could matter is dropped, whatever the order.
    known = _feed(_sketch_update, Q.sketch_init(K, max_count=MAX_COUNT), x, ROWS)
    frac = (x > np.asarray(Q.sketch_threshold(known))).mean(0)
    np.testing.assert_allclose(frac / ref_frac, 1, atol=0.01)


def test_merge_after_all_gather():
    # 8 "devices" as a named vmap axis: each all-gathers the shards' state pytrees and
    # merges them, as inside jax.shard_map.
    x = np.random.default_rng(15).standard_normal((8, 600, K), dtype=np.float32)
    states = [_feed(_exact_update, Q.exact_init(K, 5000), xs, PAD_ROWS) for xs in x]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)

    def per_device(state):
        return statistics.merge_devices(Q.exact_merge, jax.lax.all_gather(state, "d"))

    merged = jax.jit(jax.vmap(per_device, axis_name="d"))(stacked)
    ref = _bits(Q.reference_threshold(x.reshape(-1, K)))
    for d in (0, 7):
        one = jax.tree_util.tree_map(lambda a, d=d: a[d], merged)
        np.testing.assert_array_equal(_bits(Q.exact_threshold(one)), ref)

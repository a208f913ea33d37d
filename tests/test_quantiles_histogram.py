"""Histogram quantile mode (jaxdissect/quantiles/histogram.py): bitwise the numpy reference
on 16-bit activations, merged in any order and over 8 devices; refuses what it cannot hold."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import parallel, statistics
from jaxdissect import quantiles as Q
from jaxdissect.quantiles import histogram as H

K = 8
ROWS = 512
_update = jax.jit(Q.histogram_update)
_merge = jax.jit(Q.histogram_merge)


def _bits(a) -> np.ndarray:
    return np.asarray(a, np.float32).view(np.uint32)


def _round(x: np.ndarray, dtype: str) -> np.ndarray:
    """x as the driver hands it to statistics: rounded to `dtype`, then float32."""
    return np.asarray(jnp.asarray(x, jnp.float32).astype(dtype).astype(jnp.float32))


def _feed(state, x: np.ndarray, valid: np.ndarray | None = None):
    n = len(x)
    valid = np.ones(n, bool) if valid is None else valid
    for start in range(0, n, ROWS):
        xb, vb = x[start : start + ROWS], valid[start : start + ROWS]
        pad = ROWS - len(xb)
        if pad:  # garbage padding rows, not counted
            xb = np.concatenate([xb, np.full((pad, x.shape[1]), 7.0, np.float32)])
            vb = np.concatenate([vb, np.zeros(pad, bool)])
        state = _update(state, xb, vb)
    return state


def _cases(dtype: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 3001
    x = rng.standard_normal((n, K)).astype(np.float32) * 3
    x[:, 1] = rng.integers(0, 5, n)  # heavy ties
    x[:, 2] = 6.0  # all equal (a ReLU6 at its cap)
    x[:, 3] = 0.0  # a dead ReLU
    x[:, 4] = -rng.lognormal(0, 2, n)  # all negative
    x[:, 5] = np.where(rng.random(n) < 0.5, -0.0, 0.0)  # signed zeros only
    x[:, 6] = np.sort(x[:, 6])[::-1]  # descending stream
    x[:, 7] = rng.standard_normal(n) * 1e-6  # tiny values (float16 subnormals)
    x = _round(x, dtype)
    return {"mixed": x, "one": x[:1], "two": x[:2], "t_zero": x[:201], "batch": x[:ROWS]}


@pytest.mark.parametrize("dtype", H.DTYPES)
@pytest.mark.parametrize("q", [0.005, 0.3, 1 - 0.994995])
def test_histogram_is_the_reference_bitwise(dtype, q):
    for name, x in _cases(dtype).items():
        state = _feed(Q.histogram_init(K, dtype, total_count=5000, q=q), x)
        assert Q.count_value(state.count) == len(x)
        got, want = Q.histogram_threshold(state), Q.reference_threshold(x, q)
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"{dtype} {name}")
    # The cases reach every rank rule: ties, a single value, negative, zeros.
    assert np.unique(_cases(dtype)["mixed"][:, 1]).size == 5


def test_valid_mask_nonfinite_and_merges():
    x = _cases("float16")["mixed"]
    rng = np.random.default_rng(1)
    valid = rng.random(len(x)) < 0.7
    x = x.copy()
    x[~valid] = 1000.0  # would be the whole tail if counted
    x[5, 0], x[6, 0], x[7, 0] = np.nan, np.inf, -np.inf
    x[10:400, 4] = np.inf  # more non-finite values than the tail: -inf ranks below
    x[:, 6] = np.nan  # nothing finite: the threshold reads -inf, as the reference's
    parts = [slice(0, 1000), slice(1000, 1100), slice(1100, None)]
    a, b, c = (_feed(Q.histogram_init(K, "float16", 5000), x[p], valid[p]) for p in parts)
    ref = Q.reference_threshold(x[valid])
    want_nonfinite = (~np.isfinite(x[valid])).sum(0)
    stacked = jax.tree.map(lambda *s: jnp.stack(s), a, b, c)
    for merged in (
        _merge(_merge(a, b), c),
        _merge(c, _merge(b, a)),
        statistics.merge_devices(Q.histogram_merge, stacked),
    ):
        assert Q.count_value(merged.count) == valid.sum()
        np.testing.assert_array_equal(np.asarray(merged.nonfinite), want_nonfinite)
        np.testing.assert_array_equal(_bits(Q.histogram_threshold(merged)), _bits(ref))
    assert want_nonfinite[0] > 0 and want_nonfinite[4] > 200  # > the tail's ~11 values


def test_values_the_dtype_does_not_hold_are_refused():
    x = np.linspace(0, 1, 300, dtype=np.float32)[:, None].repeat(K, 1)  # not float16 values
    state = _feed(Q.histogram_init(K, "float16", 5000), x)
    with pytest.raises(ValueError, match="not representable in float16"):
        Q.histogram_threshold(state)
    with pytest.raises(ValueError, match="activation_dtype='float32'"):
        Q.histogram_init(K, "float32", 5000)
    with pytest.raises(ValueError, match="total_count=2147483648"):
        Q.histogram_init(K, "float16", 2**31)


def test_units_past_int32_slot_ids_are_refused():
    # Unit k's slots start at k * 2**16: 32768 units would wrap int32 ids (8 GB of counts).
    H.check_histogram("float16", 5000, 32767)
    with pytest.raises(ValueError, match=r"^quantile_mode='histogram' with 32768 units: at most"):
        H.check_histogram("float16", 5000, 32768)


def test_auto_picks_the_histogram_where_it_applies():
    pick = Q.resolve_mode
    assert pick("auto", 32, "float16", 10**6, upsampled=False) == "histogram"
    assert pick("auto", 32, "bfloat16", 10**6, upsampled=False) == "histogram"
    # Else exact mode where its state is small (7x7 maps), else the sketch.
    n = 63_305 * 7 * 7  # a full Broden's values a unit at 7x7: top-k 15.5K
    assert pick("auto", 512, "float16", n, upsampled=False) == "exact"  # 36 MB
    assert pick("auto", 1280, "float16", n, upsampled=False) == "sketch"  # 90 MB
    assert pick("auto", 1280, "float16", 600 * 49, upsampled=False) == "exact"
    big = 63_305 * 112 * 112  # top-k 4M values a unit
    assert pick("auto", 32, "float32", big, upsampled=False) == "sketch"
    assert pick("auto", 32, "float16", big, upsampled=True) == "sketch"
    assert pick("auto", H.AUTO_MAX_UNITS + 1, "float16", big, upsampled=False) == "sketch"
    assert pick("auto", 32, "float16", 2**31, upsampled=False) == "sketch"
    assert Q.exact.exact_state_bytes(512, n) == 512 * (15_511 + 2_048) * 4
    assert pick("exact", 32, "float16", 10**6, upsampled=False) == "exact"
    with pytest.raises(ValueError, match="threshold_on='upsampled'"):
        statistics.quantile_statistic(
            "l", 4, total_count=100, q=0.005, mode="histogram", upsample_to=(8, 8),
            activation_dtype="float16",
        )  # fmt: skip


def test_statistic_over_8_devices_equals_exact_mode():
    """The pass-1 statistic through the driver's per-device states: auto (histogram) and
    exact give the same thresholds, bitwise, on 8 devices and on 1."""
    rng = np.random.default_rng(2)
    acts = _round(rng.standard_normal((64, 6, 5, K)) * 2, "float16")
    got = {}
    for mode in ("auto", "exact"):
        stat = statistics.quantile_statistic(
            "l", K, total_count=64 * 30, q=0.01, mode=mode, activation_dtype="float16"
        )
        for devices in (1, 8):
            states = [stat.init(d) for d in range(devices)]
            for d, part in enumerate(np.array_split(np.arange(64), devices)):
                for i in range(0, len(part), 4):
                    rows = part[i : i + 4]
                    batch = {"acts": {"l": acts[rows]}, "valid": np.ones(len(rows), bool)}
                    states[d] = jax.jit(stat.update)(states[d], batch)
            stacked = jax.tree.map(lambda *s: jnp.stack(s), *states)
            merged = statistics.merge_devices(stat.merge, stacked)
            got[mode, devices] = stat.finalize(merged)["thresholds"]
    want = Q.reference_threshold(acts.reshape(-1, K), 0.01)
    for value in got.values():
        np.testing.assert_array_equal(_bits(value), _bits(want))
    assert len(jax.devices()) == 8 and parallel.data_mesh(8).devices.size == 8

"""Histogram mode: exact thresholds of 16-bit activations from counts of their values.

Activations kept as float16 or bfloat16 (`activation_dtype`) take at most 2**16 values, so a
unit's count per value determines every order statistic: T_k is `reference_threshold` of
the values, bitwise (the same order statistics, the same `_lerp32`), read from the
cumulative counts on the host. The update is one scatter-add of one id per value (the
unit's 2**16 slots, in the order of the values), in row chunks; merging adds the counts
(associative and commutative, exactly).

Values follow the conventions of `definition`: -0.0 counts as +0.0 (and, for bfloat16, a
subnormal as +0.0), NaN and +-inf are counted in `nonfinite` and rank below every finite
value, rows with valid=False are dropped. A value that the 16-bit type does not represent
exactly (the activations were not rounded to it) is counted in `inexact`, and
`histogram_threshold` refuses such a state rather than answer for other numbers.

Memory: K x 2**16 int32 counts (256 KB a unit); a count and a slot id are int32, so
`histogram_init` refuses more than 2**31 - 1 values a unit and more than `MAX_UNITS` (32767)
units. `resolve_mode` picks the mode of a layer for `auto`: this one where it applies and the
layer has at most `AUTO_MAX_UNITS` units (64 MB a device), else exact mode where its state
fits `AUTO_MAX_BYTES` (small maps: 7x7), else the sketch. The two exact modes compile and
step faster than the sketch (benchmarks/README.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdissect.parallel import filled
from jaxdissect.quantiles.chunks import _chunks
from jaxdissect.quantiles.counts import _count_add, _count_merge, _count_zero, count_value
from jaxdissect.quantiles.definition import _NEG_INF, DEFAULT_Q, _flush_zero, _lerp32, _positions
from jaxdissect.quantiles.exact import exact_state_bytes
from jaxdissect.tally import IN_BOUNDS

DTYPES = ("float16", "bfloat16")
SLOTS = 1 << 16
MAX_VALUES = 2**31 - 1  # per unit: the counts are int32
MAX_UNITS = MAX_VALUES // SLOTS  # slot ids k * 2**16 + s and the last slot K * 2**16 are int32


@struct.dataclass
class HistogramState:
    """Counts [K * 2**16 + 1] (unit k's value of order key s at k * 2**16 + s; the last slot
    takes dropped and non-finite values), rows seen (hi, lo), `nonfinite` [K], `inexact` [K]."""

    counts: jax.Array
    count: jax.Array
    nonfinite: jax.Array
    inexact: jax.Array
    dtype: str = struct.field(pytree_node=False)
    q: float = struct.field(pytree_node=False)


def check_histogram(dtype: str, total_count: int, num_units: int) -> None:
    """Raise, naming the parameter, unless histogram mode can hold these values and units."""
    if dtype not in DTYPES:
        raise ValueError(
            f"activation_dtype={dtype!r}: the histogram quantile mode needs 16-bit "
            f"activations ({', '.join(DTYPES)})"
        )
    if total_count > MAX_VALUES:
        raise ValueError(
            f"total_count={total_count}: more values a unit than the histogram's int32 "
            f"counts hold ({MAX_VALUES})"
        )
    if num_units > MAX_UNITS:
        raise ValueError(
            f"quantile_mode='histogram' with {num_units} units: at most {MAX_UNITS} (int32 "
            "slot ids, 2**16 a unit); use quantile_mode='exact' or 'sketch'"
        )


def histogram_init(
    num_units: int, dtype: str, total_count: int, q: float = DEFAULT_Q
) -> HistogramState:
    """Empty counts for `num_units` units of `dtype` activations, `total_count` values each."""
    check_histogram(dtype, total_count, num_units)
    return HistogramState(
        counts=filled((num_units * SLOTS + 1,), 0, np.int32),
        count=_count_zero(),
        nonfinite=filled((num_units,), 0, np.int32),
        inexact=filled((num_units,), 0, np.int32),
        dtype=dtype,
        q=float(q),
    )


def _order_key(bits: jax.Array) -> jax.Array:
    """int32 keys of 16-bit float patterns, ascending with the values (finite ones)."""
    return jnp.where(bits >= 0x8000, bits ^ 0xFFFF, bits ^ 0x8000)


def _value_of_key(keys: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of order keys (numpy; inverse of `_order_key`)."""
    keys = np.asarray(keys, np.int64)
    bits = np.where(keys >= 0x8000, keys ^ 0x8000, keys ^ 0xFFFF).astype(np.uint16)
    return bits.view(jnp.dtype(dtype)).astype(np.float32)


def histogram_update(
    state: HistogramState, x: jax.Array, valid: jax.Array | None = None
) -> HistogramState:
    """Add activations x [N, K] (rows with valid=False are ignored). jit-able."""
    num_units = state.nonfinite.shape[0]
    if x.shape[-1] != num_units:
        raise ValueError(f"x has {x.shape[-1]} units, state has {num_units}")
    dtype = jnp.dtype(state.dtype)
    base = (jnp.arange(num_units, dtype=jnp.int32) * SLOTS)[None, :]
    dump = num_units * SLOTS

    def step(state, chunk):
        xc, vc = chunk
        finite = jnp.isfinite(xc)
        ok = finite & vc[:, None]
        v = _flush_zero(jnp.where(ok, xc, 0.0))
        v16 = v.astype(dtype)  # (a bfloat16 subnormal is a float32 one: already 0)
        inexact = ok & (v16.astype(jnp.float32) != v)
        key = _order_key(jax.lax.bitcast_convert_type(v16, jnp.uint16).astype(jnp.int32))
        ids = jnp.where(ok, base + key, dump)
        counts = state.counts.at[ids.reshape(-1)].add(1, mode=IN_BOUNDS)
        return (
            state.replace(
                counts=counts,
                count=_count_add(state.count, jnp.sum(vc, dtype=jnp.int32)),
                nonfinite=state.nonfinite + jnp.sum(~finite & vc[:, None], 0, dtype=jnp.int32),
                inexact=state.inexact + jnp.sum(inexact, 0, dtype=jnp.int32),
            ),
            None,
        )

    xs, vs = _chunks(x, valid)
    if xs.shape[0] == 1:
        return step(state, (xs[0], vs[0]))[0]
    return jax.lax.scan(step, state, (xs, vs))[0]


def histogram_merge(a: HistogramState, b: HistogramState) -> HistogramState:
    """The counts of both states (exact; associative and commutative)."""
    if a.counts.shape != b.counts.shape or a.dtype != b.dtype or a.q != b.q:
        raise ValueError("histogram states differ in units, dtype or q")
    return a.replace(
        counts=a.counts + b.counts,
        count=_count_merge(a.count, b.count),
        nonfinite=a.nonfinite + b.nonfinite,
        inexact=a.inexact + b.inexact,
    )


def histogram_threshold(state: HistogramState, q: float | None = None) -> np.ndarray:
    """Bitwise `reference_threshold` of everything added (host-side), float32 [K]."""
    q = state.q if q is None else float(q)
    inexact = np.asarray(state.inexact)
    if inexact.any():
        units = np.flatnonzero(inexact)
        raise ValueError(
            f"units {units[:20].tolist()}: {int(inexact.sum())} values not representable in "
            f"{state.dtype}; the histogram quantile mode needs activations rounded to it"
        )
    n = count_value(state.count)
    j, jm1, t = _positions(n, q)
    num_units = state.nonfinite.shape[0]
    counts = np.asarray(state.counts[:-1]).reshape(num_units, SLOTS)
    # Descending cumulative counts: the value of descending rank r is the first key (from
    # the top) whose cumulative count exceeds r; past the finite values, -inf.
    below = np.cumsum(counts[:, ::-1], axis=1, dtype=np.int64)
    finite = below[:, -1]

    def ranked(r: int) -> np.ndarray:
        key = SLOTS - 1 - np.argmax(below > r, axis=1)
        return np.where(r < finite, _value_of_key(key, state.dtype), np.float32(_NEG_INF))

    return _lerp32(ranked(j), ranked(jm1), t)


AUTO_MAX_UNITS = 256
AUTO_MAX_BYTES = 64 << 20


def resolve_mode(
    mode: str,
    num_units: int,
    dtype: str,
    total_count: int,
    *,
    upsampled: bool,
    q: float = DEFAULT_Q,
) -> str:
    """The quantile mode a layer uses: `mode`, or for `auto` the histogram where the values
    are 16-bit (raw maps of a 16-bit `dtype`), fit its counts and the layer has at most
    AUTO_MAX_UNITS units; else exact mode where its state takes at most AUTO_MAX_BYTES;
    else the sketch."""
    if mode != "auto":
        return mode
    fits = dtype in DTYPES and not upsampled and total_count <= MAX_VALUES
    if fits and num_units <= AUTO_MAX_UNITS:
        return "histogram"
    if exact_state_bytes(num_units, total_count, q) <= AUTO_MAX_BYTES:
        return "exact"
    return "sketch"


__all__ = [
    "AUTO_MAX_BYTES",
    "AUTO_MAX_UNITS",
    "DTYPES",
    "MAX_UNITS",
    "MAX_VALUES",
    "SLOTS",
    "HistogramState",
    "check_histogram",
    "histogram_init",
    "histogram_merge",
    "histogram_threshold",
    "histogram_update",
    "resolve_mode",
]

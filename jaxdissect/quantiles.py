"""Per-unit activation thresholds: an exact top-k mode and a mergeable tail sketch.

Network Dissection thresholds unit k at T_k with P(a_k > T_k) = q over all spatial
activations of the unit on the whole probe set. Both modes here consume activation
batches reshaped to [rows, units] (rows = images x h x w), under `jax.jit`, and their
states are `flax.struct` pytrees that merge across devices or hosts.

Definition (the contract)
-------------------------
T_k is numpy's default quantile ``np.quantile(a_k, 1 - q)`` (method "linear", `1 - q`
passed as a Python float). For n values sorted in DESCENDING order d[0] >= d[1] >= ...:

    v = (n - 1) * (1 - q)         # float64, as numpy computes it
    g = floor(v); t = v - g       # float64
    j = n - 1 - g                 # d[j] = ascending a[g], d[j-1] = a[g+1]
    lo, hi = d[j], d[j - 1]       # float32
    diff = hi - lo                                   # float32
    T = lo + diff * f32(t)        if t < 0.5         # float32 ops throughout
    T = hi - diff * f32(1 - t)    otherwise          # (1 - t) computed in float64

which is numpy's `_lerp` with a weakly-typed Python float weight. When v >= n - 1 (only
n == 1 or q == 0) numpy uses the last element twice; so do we. Only the top
k = n - floor((n - 1)(1 - q)) values (about q*n + 1) are ever needed.
`reference_threshold` computes exactly this in plain numpy; `exact_threshold` is bitwise
equal to it, and both are bitwise equal to `np.quantile` on finite data.

Value conventions (both modes and the reference): -0.0 is read as +0.0 (so results do not
depend on the order in which signed zeros arrive). NaN and +-inf are counted per unit in
`nonfinite` and ranked BELOW every finite value (a row mask `valid=False` instead drops the
row from the count). A unit with nonfinite values therefore gets a threshold computed as if
they were the smallest values: callers should refuse results where `nonfinite > 0`.

Exact mode
----------
State: the top-k values per unit (descending) plus a small staging buffer. Each batch is
cut into row chunks; a chunk only matters through its values above the current k-th value,
so `lax.top_k` of the chunk with a small k (64 or 256, chosen per chunk by how many values
exceed the k-th value for the worst unit) is staged, and the staging buffer is sorted and
merged into the top-k when full. The top-k of a union does not depend on grouping or order,
so merges are associative and commutative bitwise. Memory: k + 2048 floats per unit.

Sketch mode (a relative-error compactor specialised to the upper tail)
---------------------------------------------------------------------
Per unit: L levels of `size` (B) floats, level h holding items of weight 2^h, each level
sorted descending. This is ReqSketch (Cormode, Karnin, Liberty, Thaler, Vesely, "Relative
Error Streaming Quantiles", PODS 2021) in its high-rank-accuracy orientation: a level that
reaches B items keeps its largest B/2 items untouched, and compacts the smallest s*k' of
the rest (k' = B/16 items per section, 8 sections, s = 1 + number of trailing ones of the
level's compaction counter, plus any excess): in that block, sorted, every other item (odd
or even, by a seed-derived coin per unit and compaction) moves up with doubled weight. A
compaction changes the estimated count of items >= y by 0 or +-2^h, with zero mean, and
only if y falls inside its block; the schedule makes such blocks rare for the largest
values, which is why the error is relative to the rank from the top. Three additions:

* Tail prefilter. Before each chunk the sketch's own estimate gives v_cut, the value at
  estimated rank rho*q*n from the top (rho = 4). Values below v_cut are dropped without
  being stored (only their row counts in n, and their max in `dropped_max`); values above
  are taken with `lax.top_k`; values equal to v_cut are counted in one weighted "tie" item
  per unit (so a dead ReLU unit, with its quantile on a spike at 0, stays cheap).
* Certificate. Dropping never changes the answer if the selected value d[j] is >= every
  dropped value: `sketch_certified` checks that (`sketch_threshold` raises otherwise). It
  can fail only if the data order is adversarial (say sorted descending), where the final
  quantile lies below values that looked far from the tail earlier.
* The schedule and sizes are shared by all units; the per-unit state is sorted arrays, so
  everything is `lax.top_k`, sorted merges (searchsorted + scatter) and gathers.

Accuracy (measured, tests/test_quantiles.py and benchmarks/bench_quantiles.py): with the
default B = 768, the fraction of a unit's values strictly above its threshold, at q = 0.005
and 3M values per unit, has relative error ~0.15-0.25% rms and <= 0.6% worst case over
hundreds of units (ReLU-Gaussian, log-normal, |Cauchy|, Pareto, spike mixtures, bursty
"hot image" streams, batches of 32x49 and 32x3136 rows, and after merging 8 shards). The
ReqSketch analysis gives rank error O(R / sqrt(k' B)) at rank R from the top, i.e. a
relative error independent of n; doubling B roughly divides the error by 1.4-2.

Memory per unit (floats): sketch = L * B with L = ceil(log2(rho*q*max_count / B)) + 2 levels
(levels beyond the data's need stay empty), versus exact k ~ q*n (+2048 staging):

    values per unit n        3.1M (7x7 layer)   200M (56x56)   3.2G (VGG conv1 224x224)
    exact top-k              15.5K              1.0M           16M
    sketch, max_count = n    6.9K (L=9)         11.5K (L=15)   14.6K (L=19)
    sketch, default 2^32     14.6K (L=19)       14.6K          14.6K

With max_count = n (the engine knows n) the sketch is ~2x below exact at 3M and ~100-1000x
below it for early layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

DEFAULT_Q = 0.005
DEFAULT_SIZE = 768
DEFAULT_RHO = 4.0
DEFAULT_MAX_COUNT = 2**32
SECTIONS = 8

_BASE = 1 << 30  # counts are (hi, lo) int32 pairs: hi * 2^30 + lo, so > 2^31 values fit
_CHUNK_VALUES = 1 << 22  # rows * units per scan step (bounds temporaries)
_MIN_CHUNK_ROWS = 2048
_STAGE = 2048  # exact mode staging columns
_F32_MAX = float(np.finfo(np.float32).max)
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- helpers


def _count_zero() -> jax.Array:
    return jnp.zeros((2,), jnp.int32)


def _count_add(c: jax.Array, n: jax.Array) -> jax.Array:
    lo = c[1] + n
    return jnp.stack([c[0] + lo // _BASE, lo % _BASE])


def _count_merge(a: jax.Array, b: jax.Array) -> jax.Array:
    lo = a[1] + b[1]
    return jnp.stack([a[0] + b[0] + lo // _BASE, lo % _BASE])


def count_value(count: jax.Array) -> int:
    """The number of rows a state has seen (host-side, exact)."""
    c = np.asarray(jax.device_get(count)).astype(np.int64)
    return int(c[..., 0]) * _BASE + int(c[..., 1])


def _count_f32(c: jax.Array) -> jax.Array:
    return c[0].astype(jnp.float32) * float(_BASE) + c[1].astype(jnp.float32)


def _positions(n: int, q: float) -> tuple[int, int, float]:
    """Descending indices (j, j-1) and weight t of numpy's linear quantile at 1 - q."""
    if n < 1:
        raise ValueError("no values: cannot compute a quantile")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    v = (n - 1) * (1.0 - q)
    if v >= n - 1:
        # numpy clips both neighbours to the last element and uses t = v - (-1).
        return 0, 0, v + 1.0
    g = math.floor(v)
    j = n - 1 - g
    return j, j - 1, v - g


def _lerp32(lo: np.ndarray, hi: np.ndarray, t: float) -> np.ndarray:
    """numpy's `_lerp(lo, hi, t)` for float32 arrays and a Python-float t."""
    lo = np.asarray(lo, np.float32)
    hi = np.asarray(hi, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = hi - lo
        if t < 0.5:
            return lo + diff * np.float32(t)
        return hi - diff * np.float32(1.0 - t)


def _top_count(total_count: int, q: float) -> int:
    """How many of the largest values the quantile at 1 - q can touch (j + 1)."""
    return _positions(total_count, q)[0] + 1


def reference_threshold(values: np.ndarray, q: float = DEFAULT_Q) -> np.ndarray:
    """Plain-numpy T_k for values [N, K]: the formula of the module docstring, float32."""
    v = np.asarray(values, np.float32)
    if v.ndim != 2:
        raise ValueError(f"values must be [N, K], got shape {v.shape}")
    v = np.where(np.isfinite(v), v, np.float32(_NEG_INF))
    v = np.where(v == 0, np.float32(0.0), v)  # -0.0 -> +0.0
    j, jm1, t = _positions(v.shape[0], q)
    d = np.sort(v, axis=0)[::-1]
    return _lerp32(d[j], d[jm1], t)


def _canonical(x: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, ...]:
    """(values with non-finite/padding rows as -inf, finite&valid mask, nonfinite [K], rows)."""
    finite = jnp.isfinite(x)
    if valid is None:
        rowmask = jnp.ones(x.shape[:1], bool)
    else:
        rowmask = jnp.asarray(valid, bool).reshape(x.shape[:1])
    good = finite & rowmask[:, None]
    nonfinite = jnp.sum(~finite & rowmask[:, None], axis=0, dtype=jnp.int32)
    xm = jnp.where(good, jnp.where(x == 0, jnp.float32(0.0), x), _NEG_INF)
    return xm, good, nonfinite, jnp.sum(rowmask, dtype=jnp.int32)


def _chunks(x: jax.Array, valid: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Split rows into equal chunks [c, rows, K] (padding rows invalid) for a scan."""
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"expected activations [rows, units], got shape {x.shape}")
    n, k = x.shape
    valid = jnp.ones((n,), bool) if valid is None else jnp.asarray(valid, bool).reshape(n)
    cmax = max(_MIN_CHUNK_ROWS, _CHUNK_VALUES // max(k, 1))
    nchunk = max(1, -(-n // cmax))
    rows = max(1, -(-n // nchunk))
    pad = nchunk * rows - n
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, k), x.dtype)])
        valid = jnp.concatenate([valid, jnp.zeros((pad,), bool)])
    return x.reshape(nchunk, rows, k), valid.reshape(nchunk, rows)


def _scan_chunks(step, state, x, valid):
    xs, vs = _chunks(x, valid)
    if xs.shape[0] == 1:
        return step(state, (xs[0], vs[0]))[0]
    return jax.lax.scan(step, state, (xs, vs))[0]


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _bitonic_stage(x: jax.Array, half: int, descending: jax.Array | None) -> jax.Array:
    """Compare-exchange x[i], x[i + half] within blocks of 2*half (larger first, or
    smaller first in blocks where `descending` is False)."""
    rows, width = x.shape
    y = x.reshape(rows, width // (2 * half), 2, half)
    hi = jnp.maximum(y[:, :, 0], y[:, :, 1])
    lo = jnp.minimum(y[:, :, 0], y[:, :, 1])
    if descending is not None:
        d = descending[None, :, None]
        hi, lo = jnp.where(d, hi, lo), jnp.where(d, lo, hi)
    return jnp.stack([hi, lo], axis=2).reshape(rows, width)


def _bitonic_merge(x: jax.Array) -> jax.Array:
    """Sort rows of a bitonic x [rows, 2^p] (descending then ascending) descending."""
    half = x.shape[1] // 2
    while half >= 1:
        x = _bitonic_stage(x, half, None)
        half //= 2
    return x


def _sort_desc(a: jax.Array) -> jax.Array:
    """Sort rows descending with a bitonic network (element-wise min/max: several times
    faster than XLA's comparison sort on CPU). Contains no NaN by construction."""
    rows, w0 = a.shape
    width = _pow2(w0)
    x = jnp.pad(a, ((0, 0), (0, width - w0)), constant_values=_NEG_INF)
    size = 2
    while size <= width:
        half = size // 2
        while half >= 1:
            block = np.arange(width // (2 * half)) * 2 * half // size
            descending = None if size == width else jnp.asarray(block % 2 == 0)
            x = _bitonic_stage(x, half, descending)
            half //= 2
        size *= 2
    return x[:, :w0]


def _merge_desc(a: jax.Array, b: jax.Array, width: int | None = None) -> jax.Array:
    """Merge rows of descending arrays a [K, P] and b [K, Q]; keep the first `width`."""
    p, q = a.shape[1], b.shape[1]
    width = p + q if width is None else width
    full = _pow2(p + q)
    pad = jnp.full((a.shape[0], full - p - q), _NEG_INF, a.dtype)
    # a then reversed b is bitonic; -inf padding in the middle keeps it so.
    return _bitonic_merge(jnp.concatenate([a, pad, b[:, ::-1]], axis=1))[:, :width]


def _tiers(rows: int, expected: float, small: int) -> list[int]:
    """Candidate counts per chunk to try, smallest first, ending with all rows."""
    m1 = min(rows, max(small, int(math.ceil(4 * expected / 32)) * 32))
    m2 = min(rows, 4 * m1)
    return sorted({m1, m2, rows})


def _switch_tier(needed: jax.Array, tiers: list[int]) -> jax.Array:
    index = jnp.int32(0)
    for i, m in enumerate(tiers[:-1]):
        index = jnp.where((needed > m) & (index == i), i + 1, index)
    return index


_GROUP = 64  # units per tier decision: one bursty unit only makes its group slower


def _extract(xa: jax.Array, n_above: jax.Array, tiers: list[int]) -> jax.Array:
    """Descending values of xa [K, C] (all but <= tier[-1] of them -inf), width C."""
    num_units, rows = xa.shape
    out = []
    for g in range(0, num_units, _GROUP):
        xg = xa[g : g + _GROUP]

        def branch(m, xg=xg):
            def f():
                if m == rows:
                    return _sort_desc(xg)
                top = jax.lax.top_k(xg, m)[0]
                return jnp.pad(top, ((0, 0), (0, rows - m)), constant_values=_NEG_INF)

            return f

        branches = [branch(m) for m in tiers]
        if len(branches) == 1:
            out.append(branches[0]())
        else:
            index = _switch_tier(jnp.max(n_above[g : g + _GROUP]), tiers)
            out.append(jax.lax.switch(index, branches))
    return jnp.concatenate(out) if len(out) > 1 else out[0]


# ----------------------------------------------------------------------------- exact mode


@struct.dataclass
class ExactState:
    """Running top-k per unit. `top` [K, k] descending (-inf = empty), `stage` [K, S]
    candidates not yet merged, `count` rows seen as (hi, lo) int32, `nonfinite` [K]."""

    top: jax.Array
    stage: jax.Array
    stage_fill: jax.Array
    count: jax.Array
    nonfinite: jax.Array
    total_count: int = struct.field(pytree_node=False)
    q: float = struct.field(pytree_node=False)


def exact_init(num_units: int, total_count: int, q: float = DEFAULT_Q) -> ExactState:
    """Empty exact state for `total_count` values per unit (known in advance)."""
    k = _top_count(int(total_count), q)
    return ExactState(
        top=jnp.full((num_units, k), _NEG_INF, jnp.float32),
        stage=jnp.full((num_units, _STAGE), _NEG_INF, jnp.float32),
        stage_fill=jnp.zeros((), jnp.int32),
        count=_count_zero(),
        nonfinite=jnp.zeros((num_units,), jnp.int32),
        total_count=int(total_count),
        q=float(q),
    )


def _exact_flush(state: ExactState, extra: jax.Array | None = None) -> ExactState:
    k = state.top.shape[1]
    staged = _sort_desc(state.stage)
    if extra is not None:
        staged = _merge_desc(staged, extra)
    return state.replace(
        top=_merge_desc(state.top, staged, width=k),
        stage=jnp.full_like(state.stage, _NEG_INF),
        stage_fill=jnp.zeros_like(state.stage_fill),
    )


def _exact_stage(state: ExactState, cand: jax.Array) -> ExactState:
    m = cand.shape[1]
    state = jax.lax.cond(
        state.stage_fill + m > state.stage.shape[1], _exact_flush, lambda s: s, state
    )
    stage = jax.lax.dynamic_update_slice(state.stage, cand, (0, state.stage_fill))
    return state.replace(stage=stage, stage_fill=state.stage_fill + m)


def exact_update(state: ExactState, x: jax.Array, valid: jax.Array | None = None) -> ExactState:
    """Add activations x [N, K] (rows with valid=False are ignored). jit-able."""
    if x.shape[-1] != state.top.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} units, state has {state.top.shape[0]}")

    def step(state, chunk):
        xc, vc = chunk
        xm, _, nonfinite, rows = _canonical(xc, vc)
        state = state.replace(
            count=_count_add(state.count, rows), nonfinite=state.nonfinite + nonfinite
        )
        # Values <= the k-th largest merged so far cannot enter the top-k (a stale k-th
        # value is only lower, so this stays exact while candidates sit in the stage).
        bound = state.top[:, -1]
        above = xm > bound[None, :]
        needed = jnp.max(jnp.sum(above, axis=0, dtype=jnp.int32))
        xt = jnp.where(above, xm, _NEG_INF).T
        rows_ = xt.shape[1]
        tiers = [m for m in (64, 256) if m < rows_] + [rows_]

        def branch(m):
            if m == rows_:
                return lambda s: _exact_flush(s, _sort_desc(xt))
            return lambda s: _exact_stage(s, jax.lax.top_k(xt, m)[0])

        branches = [branch(m) for m in tiers]
        if len(branches) == 1:
            return branches[0](state), None
        return jax.lax.switch(_switch_tier(needed, tiers), branches, state), None

    return _scan_chunks(step, state, x, valid)


def exact_merge(a: ExactState, b: ExactState) -> ExactState:
    """Top-k of the union of two exact states (bitwise associative and commutative)."""
    if a.top.shape != b.top.shape or a.total_count != b.total_count or a.q != b.q:
        raise ValueError("exact states differ in units, total_count or q")
    k = a.top.shape[1]
    top = _merge_desc(a.top, b.top, width=k)
    staged = _sort_desc(jnp.concatenate([a.stage, b.stage], axis=1))
    return a.replace(
        top=_merge_desc(top, staged, width=k),
        stage=jnp.full_like(a.stage, _NEG_INF),
        stage_fill=jnp.zeros_like(a.stage_fill),
        count=_count_merge(a.count, b.count),
        nonfinite=a.nonfinite + b.nonfinite,
    )


_exact_flush_jit = jax.jit(_exact_flush)


def exact_threshold(state: ExactState, q: float | None = None) -> jax.Array:
    """Bitwise `reference_threshold` of everything added. Host-side (reads the count)."""
    q = state.q if q is None else float(q)
    n = count_value(state.count)
    if n > state.total_count:
        raise ValueError(
            f"exact state saw {n} values per unit but was sized for total_count="
            f"{state.total_count}; re-create it with the right total_count"
        )
    j, jm1, t = _positions(n, q)
    if j >= state.top.shape[1]:
        raise ValueError(f"exact state sized for q={state.q} cannot answer q={q}")
    top = _exact_flush_jit(state).top
    picked = np.asarray(jax.device_get(top[:, jnp.array([j, jm1])]))
    return jnp.asarray(_lerp32(picked[:, 0], picked[:, 1], t))


# ----------------------------------------------------------------------------- sketch mode


@struct.dataclass
class SketchState:
    """Tail sketch per unit (see module docstring).

    levels [L, K, B] descending, -inf padded; fill / ncompact [L, K] int32; tie_val /
    tie_w [K]: one weighted item (tie_w copies of tie_val); dropped_max [K]: largest value
    ever discarded; nonfinite [K]; count (hi, lo) int32; step, key: coin stream.
    """

    levels: jax.Array
    fill: jax.Array
    ncompact: jax.Array
    tie_val: jax.Array
    tie_w: jax.Array
    dropped_max: jax.Array
    nonfinite: jax.Array
    count: jax.Array
    step: jax.Array
    key: jax.Array
    q: float = struct.field(pytree_node=False)
    rho: float = struct.field(pytree_node=False)


def sketch_levels(size: int, q: float, max_count: int, rho: float = DEFAULT_RHO) -> int:
    """Levels so that the top level can cover rank rho*q*max_count (plus 2 spare)."""
    need = max(2.0, rho * q * max_count / size)
    return int(math.ceil(math.log2(need))) + 2


def sketch_init(
    num_units: int,
    *,
    size: int = DEFAULT_SIZE,
    q: float = DEFAULT_Q,
    seed: int = 0,
    max_count: int = DEFAULT_MAX_COUNT,
    rho: float = DEFAULT_RHO,
) -> SketchState:
    """Empty sketch: `size` floats per level per unit; levels sized for `max_count` values.

    Give each device or host its own `seed` (e.g. fold in the device index) so that the
    shards' compaction coins are independent.
    """
    if size % (4 * SECTIONS) or size < 8 * SECTIONS:
        raise ValueError(f"size must be a multiple of {4 * SECTIONS} and >= {8 * SECTIONS}")
    num_levels = sketch_levels(size, q, max_count, rho)
    if size * 2**num_levels >= 2**31:
        raise ValueError("max_count too large for int32 rank sums; raise size")
    return SketchState(
        levels=jnp.full((num_levels, num_units, size), _NEG_INF, jnp.float32),
        fill=jnp.zeros((num_levels, num_units), jnp.int32),
        ncompact=jnp.zeros((num_levels, num_units), jnp.int32),
        tie_val=jnp.full((num_units,), _NEG_INF, jnp.float32),
        tie_w=jnp.zeros((num_units,), jnp.int32),
        dropped_max=jnp.full((num_units,), _NEG_INF, jnp.float32),
        nonfinite=jnp.zeros((num_units,), jnp.int32),
        count=_count_zero(),
        step=jnp.zeros((), jnp.uint32),
        key=jax.random.key_data(jax.random.key(seed)),
        q=float(q),
        rho=float(rho),
    )


def _to_ukey(v: jax.Array) -> jax.Array:
    """Order-preserving float32 -> uint32."""
    b = jax.lax.bitcast_convert_type(v, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(1 << 31))


def _from_ukey(u: jax.Array) -> jax.Array:
    b = jnp.where(u >> 31 == 1, u & jnp.uint32(0x7FFFFFFF), ~u)
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def _weight_ge(neg_levels, tie_val, tie_w, v):
    """Weighted count of stored items >= v per unit (int32 [K]); v finite [K]."""
    num_levels, num_units, size = neg_levels.shape
    flat = neg_levels.reshape(num_levels * num_units, size)
    queries = jnp.tile(-v, num_levels)
    search = jax.vmap(lambda a, x: jnp.searchsorted(a, x, side="right", method="scan"))
    counts = search(flat, queries).astype(jnp.int32).reshape(num_levels, num_units)
    shifts = jnp.arange(num_levels, dtype=jnp.int32)[:, None]
    return jnp.where(tie_val >= v, tie_w, 0) + jnp.sum(counts << shifts, axis=0)


def _select(levels, tie_val, tie_w, r):
    """Largest finite v with weighted count >= r (r int32 [K]), or -inf if none."""
    neg = -levels
    lo = _to_ukey(jnp.full(tie_val.shape, -_F32_MAX, jnp.float32))
    hi = _to_ukey(jnp.full(tie_val.shape, jnp.inf, jnp.float32))
    ok = _weight_ge(neg, tie_val, tie_w, _from_ukey(lo)) >= r

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        good = _weight_ge(neg, tie_val, tie_w, _from_ukey(mid)) >= r
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    return jnp.where(ok, _from_ukey(lo), _NEG_INF)


def _trailing_ones(x: jax.Array) -> jax.Array:
    u = x.astype(jnp.uint32)
    return (jax.lax.population_count(u ^ (u + 1)) - 1).astype(jnp.int32)


def _compact(temp, fill, ncomp, coin, size, is_top, pwidth):
    """One compaction of every unit whose level holds >= size items.

    temp [K, W] descending with `fill` finite items. Returns (level [K, size], fill,
    ncompact, promoted [K, pwidth] descending, max of a dropped top-level block [K]).
    """
    width = temp.shape[1]
    section = size // (2 * SECTIONS)
    need = fill >= size
    z = jnp.minimum(_trailing_ones(ncomp), SECTIONS - 1)
    start = size // 2 + (SECTIONS - 1 - z) * section
    start = start + ((fill - start) & 1)  # even block
    cols = jnp.arange(size)
    level = jnp.where(need[:, None] & (cols[None, :] >= start[:, None]), _NEG_INF, temp[:, :size])
    first = jnp.take_along_axis(temp, jnp.minimum(start, width - 1)[:, None], 1)[:, 0]
    dropped = jnp.where(need & is_top, first, _NEG_INF)
    # Every other item of the sorted block [start, fill), from a random parity.
    i = jnp.arange(pwidth)
    idx = start[:, None] + coin[:, None] + 2 * i[None, :]
    take = (need & ~is_top)[:, None] & (i[None, :] < ((fill - start) // 2)[:, None])
    promoted = jnp.where(take, jnp.take_along_axis(temp, jnp.minimum(idx, width - 1), 1), _NEG_INF)
    return (
        level,
        jnp.where(need, start, fill),
        ncomp + need.astype(jnp.int32),
        promoted,
        dropped,
    )


def _nfinite(a: jax.Array) -> jax.Array:
    return jnp.sum(jnp.isfinite(a), axis=1, dtype=jnp.int32)


def _cascade(levels, fill, ncomp, key, carry, extras=None):
    """Add descending items to the levels and compact upwards (a scan over levels).

    carry: [K, P] items for level 0; extras: [L, K, E] items to add at each level (or
    None). P must be >= B/2 + E so that what a level promotes fits in the carry. The top
    level drops its compacted block instead of promoting it. Returns (levels, fill,
    ncompact, max dropped [K]).
    """
    num_levels, num_units, size = levels.shape
    pwidth = carry.shape[1]
    ewidth = 0 if extras is None else extras.shape[2]
    assert pwidth >= size // 2 + ewidth, (pwidth, size, ewidth)

    def body(state, xs):
        carry, dropped = state
        lvl, f, nc, extra, h = xs
        incoming = carry if extra is None else _merge_desc(carry, extra)
        is_top = h == num_levels - 1

        def work(args):
            lvl, f, nc = args
            temp = _merge_desc(lvl, incoming)
            coin = jax.random.bits(jax.random.fold_in(key, h), (num_units,)) & 1
            return _compact(
                temp, f + _nfinite(incoming), nc, coin.astype(jnp.int32), size, is_top, pwidth
            )

        def idle(args):
            lvl, f, nc = args
            empty = jnp.full((num_units, pwidth), _NEG_INF, jnp.float32)
            return lvl, f, nc, empty, jnp.full((num_units,), _NEG_INF, jnp.float32)

        lvl, f, nc, carry, dmax = jax.lax.cond(
            jnp.any(jnp.isfinite(incoming[:, 0])), work, idle, (lvl, f, nc)
        )
        return (carry, jnp.maximum(dropped, dmax)), (lvl, f, nc)

    init = (carry, jnp.full((num_units,), _NEG_INF, jnp.float32))
    xs = (levels, fill, ncomp, extras, jnp.arange(num_levels))
    (_, dropped), (levels, fill, ncomp) = jax.lax.scan(body, init, xs)
    return levels, fill, ncomp, dropped


def _empty(num_units: int, width: int) -> jax.Array:
    return jnp.full((num_units, width), _NEG_INF, jnp.float32)


def _tie_extras(tie_val, tie_w, num_levels, size):
    """tie_w copies of tie_val as items [L, K, B/2]: binary digits, the rest at the top."""
    h = jnp.arange(num_levels)[:, None, None]
    cols = jnp.arange(size // 2)[None, None, :]
    copies = jnp.where(
        h < num_levels - 1, (tie_w[None, :, None] >> h) & 1, tie_w[None, :, None] >> h
    )
    return jnp.where(cols < copies, tie_val[None, :, None], _NEG_INF)


def _tie_cap(state: SketchState, n: jax.Array) -> jax.Array:
    num_levels, _, size = state.levels.shape
    cap = jnp.ceil(state.rho * state.q * n) + 1
    return jnp.minimum(cap, float(2 ** (num_levels - 1) * (size // 2))).astype(jnp.int32)


def _flush_ties(state: SketchState, which: jax.Array) -> SketchState:
    """Move the tie item of units `which` into the levels."""
    num_levels, _, size = state.levels.shape
    w = jnp.where(which, state.tie_w, 0)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    levels, fill, ncomp, dropped = _cascade(
        state.levels,
        state.fill,
        state.ncompact,
        jax.random.fold_in(key, 1),
        _empty(state.levels.shape[1], size),
        _tie_extras(state.tie_val, w, num_levels, size),
    )
    return state.replace(
        levels=levels,
        fill=fill,
        ncompact=ncomp,
        tie_w=jnp.where(which, 0, state.tie_w),
        dropped_max=jnp.maximum(state.dropped_max, dropped),
        step=state.step + 1,
    )


def _insert(state: SketchState, cand: jax.Array, n_cand: jax.Array) -> SketchState:
    """Insert descending candidates [K, M] (n_cand [K] finite) into level 0.

    In pieces of at most B/2: piece i takes every p-th candidate from i, so each piece
    spans the chunk's whole range like a random-order stream, and stays sorted.
    """
    num_units, width = cand.shape
    half = state.levels.shape[2] // 2
    pieces = jnp.maximum(1, (jnp.max(n_cand) + half - 1) // half)
    cols = jnp.arange(half)

    def one(i, state):
        idx = i + pieces * cols
        piece = jnp.where(idx < width, cand[:, jnp.minimum(idx, width - 1)], _NEG_INF)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
        levels, fill, ncomp, dropped = _cascade(
            state.levels, state.fill, state.ncompact, key, piece
        )
        return state.replace(
            levels=levels,
            fill=fill,
            ncompact=ncomp,
            dropped_max=jnp.maximum(state.dropped_max, dropped),
            step=state.step + 1,
        )

    return jax.lax.fori_loop(0, jnp.where(jnp.any(n_cand > 0), pieces, 0), one, state)


def sketch_update(state: SketchState, x: jax.Array, valid: jax.Array | None = None) -> SketchState:
    """Add activations x [N, K] (rows with valid=False are ignored). jit-able."""
    num_levels, num_units, size = state.levels.shape
    if x.shape[-1] != num_units:
        raise ValueError(f"x has {x.shape[-1]} units, state has {num_units}")

    def step(state, chunk):
        xc, vc = chunk
        xm, good, nonfinite, rows = _canonical(xc, vc)
        count = _count_add(state.count, rows)
        n = _count_f32(count)
        state = state.replace(count=count, nonfinite=state.nonfinite + nonfinite)
        r = jnp.clip(jnp.ceil(state.rho * state.q * n), 1, 2**31 - 1).astype(jnp.int32)
        cut = _select(state.levels, state.tie_val, state.tie_w, jnp.broadcast_to(r, (num_units,)))
        above = xm > cut[None, :]
        n_above = jnp.sum(above, axis=0, dtype=jnp.int32)
        n_equal = jnp.sum(good & (xm == cut[None, :]), axis=0, dtype=jnp.int32)
        below = jnp.max(jnp.where(good & (xm < cut[None, :]), xm, _NEG_INF), axis=0)
        dropped = jnp.maximum(state.dropped_max, below)

        # The tie item follows the cut: an old tie now below the cut is droppable, one
        # above it (the cut moved down) must be kept in the levels.
        moved = (state.tie_w > 0) & (state.tie_val != cut)
        dropped = jnp.maximum(
            dropped, jnp.where(moved & (state.tie_val < cut), state.tie_val, _NEG_INF)
        )
        state = state.replace(dropped_max=dropped)
        keep = moved & (state.tie_val > cut)
        state = jax.lax.cond(jnp.any(keep), _flush_ties, lambda s, _: s, state, keep)
        tie_w = jnp.where(moved, 0, state.tie_w) + n_equal
        cap = _tie_cap(state, n)
        over = tie_w > cap
        state = state.replace(
            tie_val=cut,
            tie_w=jnp.minimum(tie_w, cap),
            dropped_max=jnp.maximum(state.dropped_max, jnp.where(over, cut, _NEG_INF)),
        )

        xa = jnp.where(above, xm, _NEG_INF).T
        tiers = _tiers(xa.shape[1], state.rho * state.q * xa.shape[1], 64)
        return _insert(state, _extract(xa, n_above, tiers), n_above), None

    return _scan_chunks(step, state, x, valid)


def sketch_merge(a: SketchState, b: SketchState) -> SketchState:
    """Merge two sketches of the same shape (associative up to the sketch's error)."""
    if a.levels.shape != b.levels.shape or (a.q, a.rho) != (b.q, b.rho):
        raise ValueError("sketches differ in units, size, levels, q or rho")
    num_levels, _, size = a.levels.shape
    key = jax.random.wrap_key_data(a.key + b.key)
    key = jax.random.fold_in(key, jnp.maximum(a.step, b.step))
    ties = jnp.concatenate(
        [
            _tie_extras(a.tie_val, a.tie_w, num_levels, size),
            _tie_extras(b.tie_val, b.tie_w, num_levels, size),
        ],
        axis=2,
    )
    extras = jax.vmap(_merge_desc)(b.levels, _sort_desc(ties))
    num_units = a.levels.shape[1]
    levels, fill, ncomp, dropped = _cascade(
        a.levels,
        a.fill,
        a.ncompact | b.ncompact,
        jax.random.fold_in(key, 2),
        _empty(num_units, size // 2 + extras.shape[2]),
        extras,
    )
    return a.replace(
        levels=levels,
        fill=fill,
        ncompact=ncomp,
        tie_val=jnp.full_like(a.tie_val, _NEG_INF),
        tie_w=jnp.zeros_like(a.tie_w),
        dropped_max=jnp.maximum(jnp.maximum(a.dropped_max, b.dropped_max), dropped),
        nonfinite=a.nonfinite + b.nonfinite,
        count=_count_merge(a.count, b.count),
        step=jnp.maximum(a.step, b.step) + 1,
        key=jax.random.key_data(key),
    )


@jax.jit
def _select_many(levels, tie_val, tie_w, ranks):
    return jax.vmap(lambda r: _select(levels, tie_val, tie_w, jnp.broadcast_to(r, tie_val.shape)))(
        ranks
    )


def _sketch_answer(state: SketchState, q: float | None):
    q = state.q if q is None else float(q)
    n = count_value(state.count)
    j, jm1, t = _positions(n, q)
    ranks = jnp.array([j + 1, jm1 + 1], jnp.int32)
    vals = np.asarray(jax.device_get(_select_many(state.levels, state.tie_val, state.tie_w, ranks)))
    lo, hi = vals[0], vals[1]
    thresholds = _lerp32(lo, hi, t)
    representable = np.isfinite(lo)
    thresholds = np.where(representable, thresholds, np.float32(np.nan))
    dropped = np.asarray(jax.device_get(state.dropped_max))
    certified = representable & (lo >= dropped)
    return thresholds, certified


def sketch_certified(state: SketchState, q: float | None = None) -> np.ndarray:
    """bool [K]: True where no discarded value could have changed the threshold."""
    return _sketch_answer(state, q)[1]


def sketch_threshold(
    state: SketchState, q: float | None = None, *, strict: bool = True
) -> jax.Array:
    """Estimated T_k [K]. Host-side. With strict, raise if any unit is not certified."""
    thresholds, certified = _sketch_answer(state, q)
    if strict and not certified.all():
        bad = np.flatnonzero(~certified)
        raise ValueError(
            f"sketch cannot certify the threshold of units {bad[:10].tolist()}"
            f"{'...' if bad.size > 10 else ''}: values it discarded as far below the "
            "tail may lie above it (adversarially ordered data, or a sketch sized for fewer "
            "values). Use exact mode, a larger max_count/rho, or shuffle the probe set."
        )
    return jnp.asarray(thresholds)


# ----------------------------------------------------------------------------- merging


def merge_all(stacked: ExactState | SketchState) -> ExactState | SketchState:
    """Merge states stacked along a leading axis (e.g. after `lax.all_gather`).

    A pairwise tree over the static leading axis; jit-able.
    """
    merge = exact_merge if isinstance(stacked, ExactState) else sketch_merge
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    states = [jax.tree_util.tree_map(lambda a, i=i: a[i], stacked) for i in range(n)]
    return merge_list(states, merge)


def merge_list(states: Sequence, merge=None):
    """Merge a list of states pairwise (tree order, deterministic)."""
    if not states:
        raise ValueError("nothing to merge")
    if merge is None:
        merge = exact_merge if isinstance(states[0], ExactState) else sketch_merge
    states = list(states)
    while len(states) > 1:
        nxt = [merge(states[i], states[i + 1]) for i in range(0, len(states) - 1, 2)]
        if len(states) % 2:
            nxt.append(states[-1])
        states = nxt
    return states[0]

"""Sketch mode: a relative-error compactor specialised to the upper tail.

Per unit, L levels of B = `size` floats; level h holds items of weight 2^h, sorted
descending. This is ReqSketch (Cormode, Karnin, Liberty, Thaler, Vesely, "Relative Error
Streaming Quantiles", PODS 2021) oriented to high ranks: when a level reaches B items it
keeps its largest B/2 untouched and compacts the block of its smallest s*B/16 items
(8 sections of B/16; s = 1 + the trailing ones of the level's compaction counter) plus any
excess: of that sorted block every other item (odd or even positions, from a coin per
unit, level and step, hashed from the seed) moves up with doubled weight. A compaction
changes the estimated count of items >= y by 0 or +-2^h, with zero mean, and only if y is
inside its block; the schedule keeps the largest values out of blocks for long, so the
rank error is relative to the rank from the top, which is what q = 0.005 needs. The top
level drops its block instead of promoting it (only ranks far below q*n live there).

Items reach the levels through one routine: "add <= B/2 sorted items at level h, then
compact upwards" (a scan over levels). Units share all control flow (`lax.cond` on "any
unit"), so with hundreds of units some unit compacts at nearly every level and a cascade
costs about the same for 50 new values per unit as for B/2. Hence a stage: each chunk's
candidates are merged into an exact, weight-1 buffer of B floats per unit, which enters
level 0 as one piece once some unit has B/2 staged (or, when a chunk brings more, in
interleaved pieces of B/2). `sketch_merge` adds the other sketch's level h at level h.
Sorted merges and sorts use bitonic networks (roll + min/max in a fori_loop, quick to
compile; `jaxdissect.quantiles.bitonic`).

* Tail prefilter. Each unit keeps a cut: a stored value whose estimated rank from the top
  is at least r. Values below the cut are dropped without being stored (they count in n),
  values above it are taken with `lax.top_k` (per group of 64 units, 2-3 size tiers), and
  values equal to it go to one weighted "tie" item (so a unit whose quantile sits on a
  spike, like a dead ReLU at 0 or a ReLU6 at 6, stays cheap and exact). The cut is
  re-selected (bisection over float bits, at rank 1.4r-2r) only when its estimated rank
  leaves [r, 2r-4r]. With `max_count` given, r = max(1.5 q max_count, q max_count + 2):
  ranks only grow, so a dropped value ends with more values above it than the ranks the
  threshold reads, and can never reach the threshold, for any data order. Without it, r = 4 q n_seen, which assumes that the tail
  grows with n.
* Certificate. The threshold is exact with respect to dropping if the selected value
  d[j] is >= every dropped value; `dropped_max` bounds them (by the cut at the time).
  `sketch_certified` checks this and `sketch_threshold` raises if it fails, which happens
  only without `max_count` on adversarial orders (a short early block of large values
  followed by a long run of smaller ones, or a long descending-sorted stream).
* Before any compaction (the top B/2 values of a level are never compacted) the sketch
  is exact: for q*n < B/2 it returns the exact, bitwise, threshold.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdissect.parallel import filled
from jaxdissect.quantiles.bitonic import _merge_desc, _sort_desc
from jaxdissect.quantiles.chunks import _scan_chunks, _split, _switch_tier
from jaxdissect.quantiles.counts import (
    _count_add,
    _count_f32,
    _count_merge,
    _count_zero,
    count_value,
)
from jaxdissect.quantiles.definition import _NEG_INF, DEFAULT_Q, _lerp32, _positions

DEFAULT_SIZE = 672
DEFAULT_RHO = 4.0
DEFAULT_MAX_COUNT = 2**32  # levels when max_count is not given
_SAFE = 1.5  # with max_count known, the cut stays at estimated rank >= 1.5 q max_count (+2)
SECTIONS = 8
_F32_MAX = float(np.finfo(np.float32).max)


def _tiers(rows: int, expected: float, small: int) -> list[int]:
    """Candidate counts per chunk to try, smallest first, ending with all rows."""
    m1 = min(rows, max(small, int(math.ceil(4 * expected / 32)) * 32))
    m2 = min(rows, 4 * m1)
    return sorted({m1, m2, rows})


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


@struct.dataclass
class SketchState:
    """Tail sketch per unit (see module docstring).

    levels [L, K, B] descending, -inf padded; stage [K, B]: exact (weight 1) values waiting
    to enter level 0, fewer than B/2 per unit; fill / ncompact [L, K] int32; tie_val [K]:
    the unit's prefilter cut, also the value of one weighted item of tie_w [K] copies;
    dropped_max [K]: bound on every value discarded; nonfinite [K]; count (hi, lo) int32;
    step, key: the coin stream.
    """

    levels: jax.Array
    stage: jax.Array
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
    max_count: int | None = struct.field(pytree_node=False)


def sketch_levels(
    size: int, q: float = DEFAULT_Q, max_count: int | None = None, rho: float = DEFAULT_RHO
) -> int:
    """Levels so that the top level can cover rank rho*q*max_count (plus 2 spare)."""
    max_count = DEFAULT_MAX_COUNT if max_count is None else max_count
    need = max(2.0, rho * q * max_count / size)
    return int(math.ceil(math.log2(need))) + 2


def check_size(size: int, name: str = "size") -> None:
    """Refuse a sketch size the levels cannot hold: a multiple of 4 * SECTIONS, at least
    8 * SECTIONS. `name` is how the error calls the parameter."""
    if size % (4 * SECTIONS) or size < 8 * SECTIONS:
        raise ValueError(
            f"{name}={size}: must be a multiple of {4 * SECTIONS} and >= {8 * SECTIONS}"
        )


def sketch_init(
    num_units: int,
    *,
    size: int = DEFAULT_SIZE,
    q: float = DEFAULT_Q,
    seed: int = 0,
    max_count: int | None = None,
    rho: float = DEFAULT_RHO,
) -> SketchState:
    """Empty sketch: `size` floats per level per unit.

    max_count: the number of values per unit the whole run will add (or an upper bound),
      summed over all shards that will be merged. With it the state is sized for it and
      the prefilter never drops a value that could matter, whatever the data order.
      Without it the state is sized for 2^32 values (refused where int32 ranks cannot
      hold them: q above about 1/64) and the prefilter adapts to the values seen so far,
      which adversarial orders can fool (then `sketch_threshold` raises; see
      `sketch_certified`).
    Give each device or host its own `seed` (e.g. fold in the device index) so that the
    shards' compaction coins are independent.
    """
    check_size(size)
    num_levels = sketch_levels(size, q, max_count, rho)
    if size * 2**num_levels >= 2**31 and max_count is None:
        raise ValueError(
            f"sketch_init without max_count sizes the sketch for {DEFAULT_MAX_COUNT} values a "
            f"unit, more than int32 rank sums hold at q={q}: pass max_count (the values a unit "
            "over all shards that will be merged)"
        )
    if size * 2**num_levels >= 2**31:
        raise ValueError(
            f"max_count={max_count}: more values a unit than int32 rank sums hold at q={q} "
            f"(about 2**31 / (8 * rho * q) = {2**31 / (8 * rho * q):.3g}; a larger size does "
            "not help): threshold fewer values (raw maps rather than upsampled ones, or fewer "
            "images), or use the exact or histogram mode"
        )
    return SketchState(
        levels=filled((num_levels, num_units, size), _NEG_INF, np.float32),
        stage=filled((num_units, size), _NEG_INF, np.float32),
        fill=filled((num_levels, num_units), 0, np.int32),
        ncompact=filled((num_levels, num_units), 0, np.int32),
        tie_val=filled((num_units,), _NEG_INF, np.float32),
        tie_w=filled((num_units,), 0, np.int32),
        dropped_max=filled((num_units,), _NEG_INF, np.float32),
        nonfinite=filled((num_units,), 0, np.int32),
        count=_count_zero(),
        step=filled((), 0, np.uint32),
        key=jax.device_put(_seed_key(seed)),
        q=float(q),
        rho=float(rho),
        max_count=None if max_count is None else int(max_count),
    )


def _seed_key(seed: int) -> np.ndarray:
    """Two uint32 words from an integer seed (splitmix64)."""
    z = (int(seed) + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    z ^= z >> 31
    return np.array([z & 0xFFFFFFFF, z >> 32], np.uint32)


def _to_ukey(v: jax.Array) -> jax.Array:
    """Order-preserving float32 -> uint32."""
    b = jax.lax.bitcast_convert_type(v, jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(1 << 31))


def _from_ukey(u: jax.Array) -> jax.Array:
    b = jnp.where(u >> 31 == 1, u & jnp.uint32(0x7FFFFFFF), ~u)
    return jax.lax.bitcast_convert_type(b, jnp.float32)


def _count_ge(items: jax.Array, v: jax.Array) -> jax.Array:
    """Per row of descending items [..., K, B]: how many are >= v [K] (binary search by
    gathers, so the big arrays are never copied or negated)."""
    size = items.shape[-1]
    lo = jnp.zeros(items.shape[:-1], jnp.int32)
    hi = jnp.full(items.shape[:-1], size, jnp.int32)

    def step(_, lohi):
        lo, hi = lohi
        mid = (lo + hi) // 2
        val = jnp.take_along_axis(items, jnp.minimum(mid, size - 1)[..., None], -1)[..., 0]
        right = (mid < hi) & (val >= v)
        return jnp.where(right, mid + 1, lo), jnp.where(right, hi, mid)

    return jax.lax.fori_loop(0, size.bit_length(), step, (lo, hi))[0]


def _weight_ge(levels, stage, tie_val, tie_w, v):
    """Weighted count of stored items >= v per unit (int32 [K]); v finite [K]."""
    shifts = jnp.arange(levels.shape[0], dtype=jnp.int32)[:, None]
    total = jnp.sum(_count_ge(levels, v) << shifts, axis=0) + _count_ge(stage, v)
    return total + jnp.where(tie_val >= v, tie_w, 0)


def _select(levels, stage, tie_val, tie_w, r):
    """Largest finite v with weighted count >= r (r int32 [K]), or -inf if none."""
    lo = _to_ukey(jnp.full(tie_val.shape, -_F32_MAX, jnp.float32))
    hi = _to_ukey(jnp.full(tie_val.shape, jnp.inf, jnp.float32))
    ok = _weight_ge(levels, stage, tie_val, tie_w, _from_ukey(lo)) >= r

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        good = _weight_ge(levels, stage, tie_val, tie_w, _from_ukey(mid)) >= r
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
    # Snap to the smallest stored value >= the result: with denormals flushed (XLA on
    # CPU), a subnormal probe compares equal to 0 and the search ends on it.
    v = _from_ukey(lo)
    smallest = jnp.where((tie_w > 0) & (tie_val >= v), tie_val, jnp.inf)
    for items in (levels, stage[None]):
        counts = _count_ge(items, v)
        last = jnp.take_along_axis(items, jnp.maximum(counts - 1, 0)[..., None], -1)[..., 0]
        smallest = jnp.minimum(smallest, jnp.min(jnp.where(counts > 0, last, jnp.inf), axis=0))
    return jnp.where(ok, smallest, _NEG_INF)


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


def _cascade(state: SketchState, items: jax.Array, start: jax.Array) -> SketchState:
    """Add descending items [K, B/2] at level `start`, compacting upwards.

    What a level promotes has at most B/2 items again (it holds < B before, so at most
    B + B/2 - B/2 items form the block), which keeps the carry width fixed. Levels with
    nothing incoming are skipped by a `cond`. The top level drops its block instead of
    promoting it (recording its max in dropped_max). A scan over levels, not a
    while_loop with dynamic updates: those copied the whole [L, K, B] array per level.
    """
    num_levels, num_units, size = state.levels.shape
    half = size // 2
    units = jnp.arange(num_units, dtype=jnp.uint32)

    def body(carry_dropped, xs):
        carry, dropped = carry_dropped
        lvl, f, nc, h = xs
        incoming = jnp.where(h == start, items, carry)

        def work(args):
            lvl, f, nc = args
            temp = _merge_desc(lvl, incoming)
            coin = _hash(state.key, state.step, h.astype(jnp.uint32), units) & 1
            return _compact(
                temp,
                f + _nfinite(incoming),
                nc,
                coin.astype(jnp.int32),
                size,
                h == num_levels - 1,
                half,
            )

        def idle(args):
            lvl, f, nc = args
            return lvl, f, nc, _empty(num_units, half), jnp.full((num_units,), _NEG_INF)

        busy = jnp.any(jnp.isfinite(incoming[:, 0]))
        lvl, f, nc, carry, dmax = jax.lax.cond(busy, work, idle, (lvl, f, nc))
        return (carry, jnp.maximum(dropped, dmax)), (lvl, f, nc)

    init = (_empty(num_units, half), jnp.full((num_units,), _NEG_INF, jnp.float32))
    xs = (state.levels, state.fill, state.ncompact, jnp.arange(num_levels))
    (_, dropped), (levels, fill, ncomp) = jax.lax.scan(body, init, xs)
    return state.replace(
        levels=levels,
        fill=fill,
        ncompact=ncomp,
        dropped_max=jnp.maximum(state.dropped_max, dropped),
        step=state.step + 1,
    )


def _mix(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: a cheap bijective scrambler for coin flips."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _hash(key: jax.Array, step: jax.Array, level: jax.Array, units: jax.Array) -> jax.Array:
    """Deterministic pseudo-random uint32 per unit for (key, step, level)."""
    x = _mix(key[0] ^ _mix(key[1] ^ _mix(step ^ _mix(level + jnp.uint32(0x9E3779B9)))))
    return _mix(x ^ (units * jnp.uint32(0x27D4EB2F)))


def _empty(num_units: int, width: int) -> jax.Array:
    return jnp.full((num_units, width), _NEG_INF, jnp.float32)


def _tie_items(tie_val, tie_w, h, num_levels, half):
    """Level h's share of tie_w copies of tie_val: its binary digit, the rest at the top
    (at most B/2 there, see _tie_cap)."""
    h = jnp.clip(h, 0, num_levels - 1)
    copies = jnp.where(h < num_levels - 1, (tie_w >> h) & 1, tie_w >> h)
    cols = jnp.arange(half)[None, :]
    return jnp.where(cols < copies[:, None], tie_val[:, None], _NEG_INF)


def _cut_ranks(state: SketchState) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(r, hi, target): keep the cut at estimated rank in [r, hi], re-select at target.

    Every value the prefilter drops ranks below the cut, so its final rank exceeds r.
    With max_count known r = max(1.5 q max_count, q max_count + 2), beyond the ranks the
    threshold reads (up to ceil((n - 1) q) + 1): dropped values can never reach the
    threshold, in any order. Otherwise r = rho q n_seen, which assumes the tail keeps
    growing with n.
    """
    if state.max_count is not None:
        # The threshold reads descending ranks up to ceil((n - 1) q) + 1 (numpy's linear
        # interpolation; + 1 for float rounding of the position): a dropped value must rank
        # beyond them, which 1.5 q n alone does not give for small n (208 values, q 0.005).
        need = math.ceil(state.q * state.max_count) + 2
        r = jnp.int32(min(2**28, max(math.ceil(_SAFE * state.q * state.max_count), need)))
        return r, 2 * r, (r * 7) // 5
    n_seen = _count_f32(state.count)
    r = jnp.clip(jnp.ceil(state.rho * state.q * n_seen), 1, 2**28).astype(jnp.int32)
    return r, 4 * r, 2 * r


def _tie_cap(state: SketchState, r: jax.Array) -> jax.Array:
    """Copies of the cut value worth keeping: those beyond rank 2r can be dropped."""
    num_levels, _, size = state.levels.shape
    cap = jnp.minimum(2 * r + 1, 2 ** (num_levels - 1) * (size // 2))
    return cap.astype(jnp.int32)


def _insert(
    state: SketchState, cand: jax.Array, n_cand: jax.Array, tie_w: jax.Array
) -> SketchState:
    """Insert descending candidates [K, M] (n_cand [K] finite) and tie_w [K] copies of
    state.tie_val.

    Candidates join the stage (one merge); a cascade runs only once some unit has B/2
    staged values. Since the schedule is shared by all units, a cascade costs about as
    much for 50 values per unit as for B/2, so batching them is what keeps it cheap. If
    a chunk brings more than B/2 values for some unit, the stage goes in as one piece
    and the candidates as interleaved pieces of B/2 (piece i takes every p-th value from
    i, so each spans the whole range like a random-order stream). The tie copies go
    into the levels by binary digits (one job per level).
    """
    num_levels, num_units, size = state.levels.shape
    half = size // 2
    if cand.shape[1] < half:
        cand = jnp.pad(cand, ((0, 0), (0, half - cand.shape[1])), constant_values=_NEG_INF)
    cols = jnp.arange(half)

    def staged(state):
        stage = _merge_desc(state.stage, cand[:, :half], width=size)  # < B values

        def flush(state):
            state = _cascade(state, state.stage[:, :half], 0)
            return state.replace(
                stage=jnp.concatenate([state.stage[:, half:], _empty(num_units, half)], 1)
            )

        state = state.replace(stage=stage)
        full = jnp.max(_nfinite(stage)) >= half
        return jax.lax.cond(full, flush, lambda s: s, state)

    def pieces(state):
        # The stage (< B/2 values) goes in as one piece, then the candidates.
        count = (jnp.max(n_cand) + half - 1) // half
        width = cand.shape[1]
        state = _cascade(state, state.stage[:, :half], 0)

        def job(j, state):
            idx = j + count * cols
            piece = jnp.where(idx < width, cand[:, jnp.minimum(idx, width - 1)], _NEG_INF)
            return _cascade(state, piece, 0)

        state = state.replace(stage=_empty(num_units, size))
        return jax.lax.fori_loop(0, count, job, state)

    state = jax.lax.cond(jnp.max(n_cand) <= half, staged, pieces, state)

    def tie_job(h, state):
        return _cascade(state, _tie_items(state.tie_val, tie_w, h, num_levels, half), h)

    return jax.lax.fori_loop(0, jnp.where(jnp.any(tie_w > 0), num_levels, 0), tie_job, state)


def sketch_update(state: SketchState, x: jax.Array, valid: jax.Array | None = None) -> SketchState:
    """Add activations x [N, K] (rows with valid=False are ignored). jit-able."""
    num_levels, num_units, size = state.levels.shape
    if x.shape[-1] != num_units:
        raise ValueError(f"x has {x.shape[-1]} units, state has {num_units}")

    def step(state, chunk):
        xc, vc = chunk
        # The cut is sticky (it is the tie value): re-selected only for units whose cut
        # left its band of estimated ranks (see _cut_ranks).
        r, hi, target = _cut_ranks(state)
        prev = state.tie_val
        finite_prev = jnp.isfinite(prev)
        w = _weight_ge(
            state.levels,
            state.stage,
            state.tie_val,
            state.tie_w,
            jnp.where(finite_prev, prev, -_F32_MAX),
        )
        redo = ~finite_prev | (w < r) | (w > hi)
        cut = jax.lax.cond(
            jnp.any(redo),
            lambda: jnp.where(
                redo,
                _select(
                    state.levels,
                    state.stage,
                    state.tie_val,
                    state.tie_w,
                    jnp.full((num_units,), target),
                ),
                prev,
            ),
            lambda: prev,
        )
        xa, n_above, n_equal, nonfinite, rows = _split(xc, vc, cut)
        state = state.replace(
            count=_count_add(state.count, rows), nonfinite=state.nonfinite + nonfinite
        )
        # Every dropped value is below the cut: the cut bounds them (cheaper than a max).
        n_below = rows - n_above - n_equal - nonfinite
        below = jnp.where(n_below > 0, cut, _NEG_INF)

        # The tie item follows the cut. An old tie now below the cut is droppable; one
        # above it (the cut moved down) is moved into the levels.
        moved = (state.tie_w > 0) & (state.tie_val != cut)
        to_drop = moved & (state.tie_val < cut)
        to_levels = jnp.where(moved & (state.tie_val > cut), state.tie_w, 0)
        dropped = jnp.maximum(state.dropped_max, below)
        dropped = jnp.maximum(dropped, jnp.where(to_drop, state.tie_val, _NEG_INF))
        state = state.replace(dropped_max=dropped)

        tiers = _tiers(xa.shape[1], state.rho * state.q * xa.shape[1], 64)
        state = _insert(state, _extract(xa, n_above, tiers), n_above, to_levels)

        tie_w = jnp.where(moved, 0, state.tie_w) + n_equal
        cap = _tie_cap(state, r)
        over = tie_w > cap
        return state.replace(
            tie_val=cut,
            tie_w=jnp.minimum(tie_w, cap),
            dropped_max=jnp.maximum(state.dropped_max, jnp.where(over, cut, _NEG_INF)),
        ), None

    return _scan_chunks(step, state, x, valid)


def sketch_merge(a: SketchState, b: SketchState) -> SketchState:
    """Merge two sketches of the same shape (associative up to the sketch's error).

    b's level h goes into a's level h (two interleaved halves per level), and both tie
    items into the levels by binary digits; then compaction as usual. jit-able.
    """
    if a.levels.shape != b.levels.shape or (a.q, a.rho, a.max_count) != (
        b.q,
        b.rho,
        b.max_count,
    ):
        raise ValueError("sketches differ in units, size, levels, q, rho or max_count")
    num_levels, _, size = a.levels.shape
    half = size // 2
    # Commutative in (a, b); mixed so that merging equal keys gives a fresh stream.
    key = _mix(_mix(a.key + b.key) ^ jnp.uint32(0x6D657267))
    state = a.replace(
        stage=jnp.full_like(a.stage, _NEG_INF),
        ncompact=a.ncompact | b.ncompact,
        tie_w=jnp.zeros_like(a.tie_w),
        dropped_max=jnp.maximum(a.dropped_max, b.dropped_max),
        nonfinite=a.nonfinite + b.nonfinite,
        count=_count_merge(a.count, b.count),
        step=jnp.maximum(a.step, b.step),
        key=key,
    )
    # Jobs: 2 interleaved halves of each of a's stage, b's stage and b's levels (at
    # level 0, 0, h), then a's and b's tie digits per level.
    rows = jnp.concatenate([a.stage[None], b.stage[None], b.levels])  # [L + 2, K, B]
    halves = jnp.stack([rows[:, :, 0::2], rows[:, :, 1::2]], 1)
    halves = halves.reshape(2 * (num_levels + 2), *halves.shape[2:])
    n_rows = 2 * (num_levels + 2)

    def job(j, state):
        lvl = jnp.maximum(j // 2 - 2, 0)
        t = j - n_rows
        which = t // num_levels
        tie_val = jnp.where(which == 0, a.tie_val, b.tie_val)
        tie_w = jnp.where(which == 0, a.tie_w, b.tie_w)
        ties = _tie_items(tie_val, tie_w, t % num_levels, num_levels, half)
        is_row = j < n_rows
        items = jnp.where(is_row, halves[jnp.minimum(j, n_rows - 1)], ties)
        return _cascade(state, items, jnp.where(is_row, lvl, t % num_levels))

    state = jax.lax.fori_loop(0, n_rows + 2 * num_levels, job, state)
    return state.replace(tie_val=jnp.full_like(a.tie_val, _NEG_INF))


@jax.jit
def _select_many(levels, stage, tie_val, tie_w, ranks):
    def one(r):
        return _select(levels, stage, tie_val, tie_w, jnp.broadcast_to(r, tie_val.shape))

    return jax.vmap(one)(ranks)


def _sketch_answer(state: SketchState, q: float | None):
    q = state.q if q is None else float(q)
    n = count_value(state.count)
    j, jm1, t = _positions(n, q)
    ranks = jnp.array([j + 1, jm1 + 1], jnp.int32)
    vals = _select_many(state.levels, state.stage, state.tie_val, state.tie_w, ranks)
    vals = np.asarray(jax.device_get(vals))
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
    """Estimated T_k [K] (NaN where the sketch holds too few finite values). Host-side.

    With strict, raise if any unit is not certified (see `sketch_certified`).
    """
    thresholds, certified = _sketch_answer(state, q)
    if strict and not certified.all():
        bad = np.flatnonzero(~certified)
        units = f"{bad[:10].tolist()}{'...' if bad.size > 10 else ''}"
        if np.isnan(thresholds[bad]).any():
            raise ValueError(
                f"units {units}: too few finite values for the quantile "
                f"(non-finite counts: {np.asarray(state.nonfinite)[bad][:10].tolist()})"
            )
        raise ValueError(
            f"sketch cannot certify the threshold of units {units}: values it discarded "
            "as far below the tail may lie above it (a data order that fools the adaptive "
            "prefilter, or max_count below the real count). Pass max_count, use exact "
            "mode, or shuffle the probe set."
        )
    return jnp.asarray(thresholds)

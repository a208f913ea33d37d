"""Exact mode: each unit's top-k values, bitwise `reference_threshold`.

State: the top-k values per unit (descending) and a staging buffer. Batches are cut into
row chunks of ~2^20 values. Only values above the current k-th value can enter the top-k,
so a chunk is reduced with `lax.top_k` to its largest 64 or 256 values (whichever covers,
for every unit, all values above the k-th; else the whole chunk), staged, and the stage
is merged into the top-k when full (`lax.top_k` of the two together). The result is the
top-k of the union whatever the grouping or order, so merges are associative and
commutative bitwise.
Memory: k + max(2048, ~k/8) floats per unit (`exact_state_bytes`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdissect.parallel import filled
from jaxdissect.quantiles.bitonic import _pow2
from jaxdissect.quantiles.chunks import _scan_chunks, _split, _switch_tier
from jaxdissect.quantiles.counts import _count_add, _count_merge, _count_zero, count_value
from jaxdissect.quantiles.definition import _NEG_INF, DEFAULT_Q, _lerp32, _positions, _top_count

_STAGE_MIN, _STAGE_MAX = 2048, 65536  # exact mode staging columns


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


def _widths(total_count: int, q: float) -> tuple[int, int]:
    """(k, stage columns) of an exact state."""
    k = _top_count(int(total_count), q)
    # Each merge rewrites the top-k, so stage about k/8 candidates between merges.
    return k, min(_STAGE_MAX, max(_STAGE_MIN, _pow2(k) // 8))


def exact_state_bytes(num_units: int, total_count: int, q: float = DEFAULT_Q) -> int:
    """Bytes of an exact state's top-k and stage."""
    return num_units * sum(_widths(total_count, q)) * 4


def exact_init(num_units: int, total_count: int, q: float = DEFAULT_Q) -> ExactState:
    """Empty exact state for `total_count` values per unit (known in advance)."""
    k, stage = _widths(total_count, q)
    return ExactState(
        top=filled((num_units, k), _NEG_INF, np.float32),
        stage=filled((num_units, stage), _NEG_INF, np.float32),
        stage_fill=filled((), 0, np.int32),
        count=_count_zero(),
        nonfinite=filled((num_units,), 0, np.int32),
        total_count=int(total_count),
        q=float(q),
    )


def _top(k: int, *parts: jax.Array) -> jax.Array:
    """The `k` largest values of each row of the parts [K, *] together, descending.

    On CPU XLA's top-k compiles and runs faster here than a bitonic sort and merge
    (benchmarks/README.md); either gives the same values.
    """
    return jax.lax.top_k(jnp.concatenate(parts, axis=1), k)[0]


def _exact_flush(state: ExactState, extra: jax.Array | None = None) -> ExactState:
    """Merge the stage (and `extra` [K, m] candidates, any order) into the top-k."""
    extra = () if extra is None else (extra,)
    return state.replace(
        top=_top(state.top.shape[1], state.top, state.stage, *extra),
        stage=jnp.full_like(state.stage, _NEG_INF),
        stage_fill=jnp.zeros_like(state.stage_fill),
    )


def _exact_stage(state: ExactState, cand: jax.Array, used: int | jax.Array) -> ExactState:
    """Append candidates [K, m] of which the first `used` columns matter."""
    m = cand.shape[1]
    state = jax.lax.cond(
        state.stage_fill + m > state.stage.shape[1], _exact_flush, lambda s: s, state
    )
    stage = jax.lax.dynamic_update_slice(state.stage, cand, (0, state.stage_fill))
    return state.replace(stage=stage, stage_fill=state.stage_fill + used)


def exact_update(state: ExactState, x: jax.Array, valid: jax.Array | None = None) -> ExactState:
    """Add activations x [N, K] (rows with valid=False are ignored). jit-able."""
    if x.shape[-1] != state.top.shape[0]:
        raise ValueError(f"x has {x.shape[-1]} units, state has {state.top.shape[0]}")

    def step(state, chunk):
        xc, vc = chunk
        # Values <= the k-th largest merged so far cannot enter the top-k (a stale k-th
        # value is only lower, so this stays exact while candidates sit in the stage).
        xt, n_above, _, nonfinite, rows = _split(xc, vc, state.top[:, -1])
        state = state.replace(
            count=_count_add(state.count, rows), nonfinite=state.nonfinite + nonfinite
        )
        needed = jnp.max(n_above)
        rows_ = xt.shape[1]
        small = [m for m in (64, 256) if m < rows_ and m <= state.stage.shape[1] // 2]
        width = max(small, default=0)

        def staged(m):
            # Both small tiers write `width` columns (padding is -inf) but advance by m,
            # so that one staging append (and its flush) is traced.
            def f(s):
                top = jax.lax.top_k(xt, m)[0]
                top = jnp.pad(top, ((0, 0), (0, width - m)), constant_values=_NEG_INF)
                return _exact_stage(s, top, m)

            return f

        branches = [staged(m) for m in small] + [lambda s: _exact_flush(s, xt)]
        tiers = small + [rows_]
        if len(branches) == 1:
            return branches[0](state), None
        return jax.lax.switch(_switch_tier(needed, tiers), branches, state), None

    return _scan_chunks(step, state, x, valid)


def exact_merge(a: ExactState, b: ExactState) -> ExactState:
    """Top-k of the union of two exact states (bitwise associative and commutative)."""
    if a.top.shape != b.top.shape or a.total_count != b.total_count or a.q != b.q:
        raise ValueError("exact states differ in units, total_count or q")
    return a.replace(
        top=_top(a.top.shape[1], a.top, b.top, a.stage, b.stage),
        stage=jnp.full_like(a.stage, _NEG_INF),
        stage_fill=jnp.zeros_like(a.stage_fill),
        count=_count_merge(a.count, b.count),
        nonfinite=a.nonfinite + b.nonfinite,
    )


@jax.jit
def _flushed_columns(state: ExactState, columns: jax.Array) -> jax.Array:
    """Columns `columns` (int32 [2], in range) of the flushed top-k: [K, 2]. One program
    per state shape, and only these columns leave the device."""
    return jnp.take(_exact_flush(state).top, columns, axis=1)


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
    picked = np.asarray(jax.device_get(_flushed_columns(state, np.array([j, jm1], np.int32))))
    return jnp.asarray(_lerp32(picked[:, 0], picked[:, 1], t))

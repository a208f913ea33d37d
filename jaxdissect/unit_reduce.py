"""Per-unit reductions of maps: min, max or count over the rows of [N, K] values.

`x.max(axis=(0, 1, 2))` of a [B, h, w, K] map is a column reduction, which XLA:CPU emits
one output at a time, striding through the whole array for each unit (and it fuses two
reduction stages back into one). Here a scan folds blocks of `ROWS` rows into [ROWS, K]
accumulators with elementwise min, max or add, reading each value once, and the ROWS
partial results are reduced last. Min, max and integer sums are exact in any order.
The tie statistics use it; `benchmarks/bench_statistics.py` times them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxdissect import parallel

ROWS = 64
KINDS = ("min", "max", "sum")


def _identity(kind: str, dtype) -> jax.Array:
    if kind == "sum":
        return jnp.zeros((), dtype)
    big = jnp.inf if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).max
    return jnp.asarray(big if kind == "min" else -big, dtype)


def _combine(kind: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.minimum(a, b) if kind == "min" else jnp.maximum(a, b) if kind == "max" else a + b


def fold_rows(
    fn: Callable[..., Sequence[jax.Array]],
    kinds: Sequence[str],
    valid: jax.Array,
    *xs: jax.Array,
) -> tuple[jax.Array, ...]:
    """Per-unit reductions of `fn`'s values over the rows of `xs`.

    Args:
      fn: fn(valid [r, K], *blocks [r, K]) -> one [r, K] array per kind: bool (counted
        as int32) or numbers. Invalid rows must give the kind's identity (+inf for min,
        -inf for max, 0 for a sum), as the padding rows added here are invalid.
      kinds: "min", "max" or "sum" per output of fn.
      valid: bool [N]; xs: [N, K] arrays.

    Returns:
      one [K] array per kind (sums as int32).
    """
    if any(kind not in KINDS for kind in kinds):
        raise ValueError(f"kinds must be among {KINDS}, got {tuple(kinds)}")
    n, k = xs[0].shape
    rows = min(ROWS, max(n, 1))
    pad = -n % rows
    valid = jnp.asarray(valid, bool)
    if pad:
        valid = jnp.pad(valid, (0, pad))
        xs = tuple(jnp.pad(x, ((0, pad), (0, 0))) for x in xs)
    # Full-width: a [rows, 1] mask broadcast inside the loop is slower on XLA:CPU
    # (benchmarks/README.md).
    valid = jnp.broadcast_to(valid[:, None], (n + pad, k)).reshape(-1, rows, k)
    blocks = [x.reshape(-1, rows, k) for x in xs]

    def values(v, *bs):
        out = fn(v, *bs)
        if len(out) != len(kinds):
            raise ValueError(f"fn gave {len(out)} values for kinds {tuple(kinds)}")
        return [o.astype(jnp.int32) if o.dtype == bool else o for o in out]

    shapes = jax.eval_shape(values, valid[0], *(b[0] for b in blocks))
    init = tuple(
        parallel.varying_like(jnp.full((rows, k), _identity(kind, s.dtype), s.dtype), *xs)
        for kind, s in zip(kinds, shapes, strict=True)
    )

    def step(acc, block):
        new = values(*block)
        return tuple(_combine(kd, a, b) for kd, a, b in zip(kinds, acc, new, strict=True)), None

    acc, _ = jax.lax.scan(step, init, (valid, *blocks))
    return tuple(
        a.min(0) if kind == "min" else a.max(0) if kind == "max" else a.sum(0)
        for kind, a in zip(kinds, acc, strict=True)
    )

"""Bitonic sorting and merging networks over the rows of [K, W] float32 arrays."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdissect.quantiles.definition import _NEG_INF


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _sort_desc(a: jax.Array) -> jax.Array:
    """Sort rows of a [..., W] descending with a bitonic sorting network.

    Stages (block size, distance) run in a fori_loop of roll + min/max: O(W log^2 W)
    element-wise work that vectorises (on CPU, in place of XLA's comparison sort; see
    benchmarks/README.md), and one traced stage.
    """
    shape = a.shape
    a = a.reshape(-1, shape[-1])
    w0 = a.shape[1]
    full = _pow2(w0)
    x = jnp.pad(a, ((0, 0), (0, full - w0)), constant_values=_NEG_INF)
    logw = full.bit_length() - 1
    stages = [(1 << (b + 1), 1 << d) for b in range(logw) for d in range(b, -1, -1)]
    if not stages:
        return x[:, :w0].reshape(shape)
    sizes = jnp.array([sz for sz, _ in stages], jnp.int32)
    halves = jnp.array([h for _, h in stages], jnp.int32)
    cols = jnp.arange(full, dtype=jnp.int32)

    def stage(i, x):
        size, half = sizes[i], halves[i]
        first = ((cols & half) == 0)[None, :]
        descending = ((cols & size) == 0)[None, :]
        partner = jnp.where(first, jnp.roll(x, -half, axis=1), jnp.roll(x, half, axis=1))
        take_max = first == descending
        return jnp.where(take_max, jnp.maximum(x, partner), jnp.minimum(x, partner))

    x = jax.lax.fori_loop(0, len(stages), stage, x)
    return x[:, :w0].reshape(shape)


def _merge_desc(a: jax.Array, b: jax.Array, width: int | None = None) -> jax.Array:
    """Merge rows of descending arrays a [K, P] and b [K, Q]; keep the first `width`.

    A bitonic merge network (a, then b reversed, is bitonic): log2(P+Q) stages of
    element-wise min/max against a rolled copy; as a loop it compiles fast. On CPU it
    replaces XLA's sort or a searchsorted+scatter merge (see benchmarks/README.md).
    """
    p, q = a.shape[1], b.shape[1]
    width = p + q if width is None else width
    full = _pow2(p + q)
    pad = jnp.full((a.shape[0], full - p - q), _NEG_INF, a.dtype)
    x = jnp.concatenate([a, pad, b[:, ::-1]], axis=1)
    cols = jnp.arange(full)

    def stage(i, x):
        half = full >> (i + 1)
        first = ((cols & half) == 0)[None, :]
        partner = jnp.where(first, jnp.roll(x, -half, axis=1), jnp.roll(x, half, axis=1))
        return jnp.where(first, jnp.maximum(x, partner), jnp.minimum(x, partner))

    return jax.lax.fori_loop(0, full.bit_length() - 1, stage, x)[:, :width]

"""Activation batches in row chunks, each split against a per-unit cut."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdissect.quantiles.definition import _NEG_INF, _flush_zero

_CHUNK_VALUES = 1 << 20  # rows * units per scan step: transposes stay in cache
_MIN_CHUNK_ROWS = 2048


def _split(x: jax.Array, valid: jax.Array, cut: jax.Array):
    """One pass over a chunk x [C, K] against a per-unit cut [K].

    Returns (values > cut as [K, C], -inf elsewhere; per-unit counts of values > cut,
    == cut and non-finite; rows counted). Padding rows are ignored; non-finite values
    count as -inf.
    """
    rows = x.shape[0]
    finite = jnp.isfinite(x)
    rowmask = valid[:, None]
    xm = jnp.where(finite & rowmask, _flush_zero(x), _NEG_INF)
    c = cut[None, :]
    above = xm > c
    equal = (xm == c) & (xm > _NEG_INF)
    shift = max(1, rows.bit_length())
    if 2 * shift <= 31:  # both counts in one int32 reduction (XLA CPU: each costs a pass)
        total = jnp.sum(above.astype(jnp.int32) + (equal.astype(jnp.int32) << shift), axis=0)
        n_above, n_equal = total & ((1 << shift) - 1), total >> shift
    else:
        n_above = jnp.sum(above, axis=0, dtype=jnp.int32)
        n_equal = jnp.sum(equal, axis=0, dtype=jnp.int32)
    nonfinite = jnp.sum(~finite & rowmask, axis=0, dtype=jnp.int32)
    xa = jnp.where(above, xm, _NEG_INF).T
    return xa, n_above, n_equal, nonfinite, jnp.sum(valid, dtype=jnp.int32)


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


def _switch_tier(needed: jax.Array, tiers: list[int]) -> jax.Array:
    index = jnp.int32(0)
    for i, m in enumerate(tiers[:-1]):
        index = jnp.where((needed > m) & (index == i), i + 1, index)
    return index

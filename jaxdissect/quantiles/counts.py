"""Row counts beyond int32 as (hi, lo) int32 pairs: value = hi * 2^30 + lo."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_BASE = 1 << 30  # counts are (hi, lo) int32 pairs: hi * 2^30 + lo, so > 2^31 values fit


def _count_zero() -> jax.Array:
    return jnp.zeros((2,), jnp.int32)


def _count_add(c: jax.Array, n: jax.Array) -> jax.Array:
    # n < 2^30 (rows of one chunk), so lo + n cannot overflow int32.
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

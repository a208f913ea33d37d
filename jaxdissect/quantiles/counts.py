"""Row counts beyond int32: a stacked int32 [2] (hi, lo) pair of `widecount.WideCount`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.parallel import filled
from jaxdissect.tally import MAX_BATCH_COUNT
from jaxdissect.widecount import WideCount


def _count_zero() -> jax.Array:
    return filled((2,), 0, np.int32)


def _count_add(c: jax.Array, n: jax.Array) -> jax.Array:
    # n < 2^30 (rows of one chunk), so lo + n cannot overflow int32.
    w = WideCount(hi=c[0], lo=c[1]).add(n)
    return jnp.stack([w.hi, w.lo])


def _count_merge(a: jax.Array, b: jax.Array) -> jax.Array:
    w = WideCount(hi=a[0], lo=a[1]).merge(WideCount(hi=b[0], lo=b[1]))
    return jnp.stack([w.hi, w.lo])


def count_value(count: jax.Array) -> int:
    """The number of rows a state has seen (host-side, exact)."""
    c = np.asarray(jax.device_get(count)).astype(np.int64)
    return int(WideCount(hi=c[..., 0], lo=c[..., 1]).to_numpy())


def _count_f32(c: jax.Array) -> jax.Array:
    # hi * 2**LO_BITS + lo: the pair's base is the bound on a count added to it.
    return c[0].astype(jnp.float32) * float(MAX_BATCH_COUNT) + c[1].astype(jnp.float32)

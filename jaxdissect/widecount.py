"""Exact non-negative counts beyond int32, as (hi, lo) int32 pairs: value = hi * 2**30 + lo."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.parallel import filled

LO_BITS = 30
LO_MASK = (1 << LO_BITS) - 1


@flax.struct.dataclass
class WideCount:
    """Counts of any shape; 0 <= lo < 2**30, so adding one int32 count below 2**30 cannot
    overflow before the carry."""

    hi: jax.Array
    lo: jax.Array

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> WideCount:
        return cls(hi=filled(shape, 0, np.int32), lo=filled(shape, 0, np.int32))

    def add(self, x: jax.Array) -> WideCount:
        """Add int32 counts 0 <= x < 2**30."""
        lo = self.lo + jnp.asarray(x, jnp.int32)
        return WideCount(hi=self.hi + (lo >> LO_BITS), lo=lo & LO_MASK)

    def merge(self, other: WideCount) -> WideCount:
        lo = self.lo + other.lo
        return WideCount(hi=self.hi + other.hi + (lo >> LO_BITS), lo=lo & LO_MASK)

    def to_numpy(self) -> np.ndarray:
        """Exact int64 values on the host."""
        hi = np.asarray(self.hi).astype(np.int64)
        return (hi << LO_BITS) + np.asarray(self.lo).astype(np.int64)

"""Tie statistics counted on device: per unit, the minimum, maximum and number of
activations equal to its threshold, mergeable across batches and devices.

What they mean (dead, saturated and tied units) is `jaxdissect.ties`.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.parallel import filled
from jaxdissect.unit_reduce import fold_rows
from jaxdissect.widecount import WideCount


@flax.struct.dataclass
class TieState:
    """Running tie statistics of one layer's K units (see module docstring)."""

    minimum: jax.Array  # float32 [K], +inf before any value
    maximum: jax.Array  # float32 [K], -inf before any value
    at_threshold: WideCount  # [K]
    values: WideCount  # []


def ties_init(num_units: int) -> TieState:
    """Empty statistics for `num_units` units."""
    return TieState(
        minimum=filled((num_units,), np.inf, np.float32),
        maximum=filled((num_units,), -np.inf, np.float32),
        at_threshold=WideCount.zeros((num_units,)),
        values=WideCount.zeros(()),
    )


def ties_update(
    state: TieState, maps: jax.Array, thresholds: jax.Array, valid: jax.Array
) -> TieState:
    """Add a batch of maps [B, h, w, K] (rows with valid=False ignored); jit-able.

    `maps` are in the thresholds' domain (raw or upsampled), B * h * w < 2**30.
    """
    maps = jnp.asarray(maps, jnp.float32)
    b, h, w, k = maps.shape
    thresholds = jnp.asarray(thresholds, jnp.float32)
    rows = jnp.repeat(jnp.asarray(valid, bool), h * w)

    def values(keep, x):
        return (
            jnp.where(keep, x, jnp.inf),
            jnp.where(keep, x, -jnp.inf),
            keep & (x == thresholds),
        )

    low, high, at = fold_rows(values, ("min", "max", "sum"), rows, maps.reshape(-1, k))
    n = jnp.asarray(valid, bool).sum(dtype=jnp.int32) * (h * w)
    return TieState(
        minimum=jnp.minimum(state.minimum, low),
        maximum=jnp.maximum(state.maximum, high),
        at_threshold=state.at_threshold.add(at),
        values=state.values.add(n),
    )


def ties_merge(a: TieState, b: TieState) -> TieState:
    """Statistics of the union of two states (associative and commutative)."""
    return TieState(
        minimum=jnp.minimum(a.minimum, b.minimum),
        maximum=jnp.maximum(a.maximum, b.maximum),
        at_threshold=a.at_threshold.merge(b.at_threshold),
        values=a.values.merge(b.values),
    )


def ties_to_numpy(state: TieState) -> dict[str, np.ndarray]:
    """Host arrays: float32 minimum, maximum [K], int64 at_threshold [K], values []."""
    return {
        "minimum": np.asarray(state.minimum, np.float32),
        "maximum": np.asarray(state.maximum, np.float32),
        "at_threshold": state.at_threshold.to_numpy(),
        "values": state.values.to_numpy(),
    }

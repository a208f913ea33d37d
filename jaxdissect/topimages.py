"""Each unit's top images by maximum activation: a small mergeable state.

For the report's strips: per unit, the `k` images whose activation map has the
largest maximum, and (when asked) the unit's raw map on each of them, so that
the report never runs the network again. Ties go to the lower image index, so
the result does not depend on how images were split over devices or batches.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.parallel import filled


@flax.struct.dataclass
class TopImages:
    """values/indices: [k, K], best first; index -1 marks an empty slot.

    maps: None, or float32 [k, h, w, K]: unit K's map on image indices[t, K]
    (zeros in empty slots).
    """

    values: jax.Array
    indices: jax.Array
    maps: jax.Array | None = None


def init(num_units: int, k: int, map_size: tuple[int, int] | None = None) -> TopImages:
    """Empty state; with `map_size` (h, w) the maps of the top images are kept too."""
    maps = None
    if map_size is not None:
        maps = filled((k, *map_size, num_units), 0, np.float32)
    return TopImages(
        values=filled((k, num_units), -np.inf, np.float32),
        indices=filled((k, num_units), -1, np.int32),
        maps=maps,
    )


def _select(values: jax.Array, indices: jax.Array, maps: jax.Array | None, k: int) -> TopImages:
    # Sort by (value desc, index asc) with empty slots (index -1) last.
    key_idx = jnp.where(indices < 0, jnp.iinfo(jnp.int32).max, indices)
    order = jnp.lexsort((key_idx, -values), axis=0)[:k]
    if maps is not None:
        maps = jnp.take_along_axis(maps, order[:, None, None, :], axis=0)
    return TopImages(
        values=jnp.take_along_axis(values, order, axis=0),
        indices=jnp.take_along_axis(indices, order, axis=0),
        maps=maps,
    )


def update(state: TopImages, acts: jax.Array, index: jax.Array, valid: jax.Array) -> TopImages:
    """Fold in a batch: acts [B, h, w, K], image index [B], valid [B]."""
    k = state.values.shape[0]
    acts = acts.astype(jnp.float32)
    peak = acts.max(axis=(1, 2))  # [B, K]
    peak = jnp.where(valid[:, None], peak, -jnp.inf)
    idx = jnp.broadcast_to(jnp.where(valid, index, -1)[:, None], peak.shape).astype(jnp.int32)
    maps = None
    if state.maps is not None:
        if acts.shape[1:] != state.maps.shape[1:]:
            raise ValueError(f"acts {acts.shape} do not match the kept maps {state.maps.shape}")
        # Padding rows keep zero maps, like empty slots.
        maps = jnp.concatenate([state.maps, jnp.where(valid[:, None, None, None], acts, 0.0)])
    return _select(
        jnp.concatenate([state.values, peak]), jnp.concatenate([state.indices, idx]), maps, k
    )


def merge(a: TopImages, b: TopImages) -> TopImages:
    """Associative and commutative (an image's map is the same in every state)."""
    k = a.values.shape[0]
    maps = None if a.maps is None else jnp.concatenate([a.maps, b.maps])
    return _select(
        jnp.concatenate([a.values, b.values]), jnp.concatenate([a.indices, b.indices]), maps, k
    )

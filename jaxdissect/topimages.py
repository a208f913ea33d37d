"""Each unit's top images by maximum activation: a small mergeable state.

For the report's strips: per unit, the `k` images whose activation map has the
largest maximum. Ties go to the lower image index, so the result does not depend
on how images were split over devices or batches.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TopImages:
    """values/indices: [k, K], best first; index -1 marks an empty slot."""

    values: jax.Array
    indices: jax.Array


def init(num_units: int, k: int) -> TopImages:
    return TopImages(
        values=jnp.full((k, num_units), -jnp.inf, jnp.float32),
        indices=jnp.full((k, num_units), -1, jnp.int32),
    )


def _select(values: jax.Array, indices: jax.Array, k: int) -> TopImages:
    # Sort by (value desc, index asc) with empty slots (index -1) last.
    key_idx = jnp.where(indices < 0, jnp.iinfo(jnp.int32).max, indices)
    order = jnp.lexsort((key_idx, -values), axis=0)[:k]
    return TopImages(
        values=jnp.take_along_axis(values, order, axis=0),
        indices=jnp.take_along_axis(indices, order, axis=0),
    )


def update(state: TopImages, acts: jax.Array, index: jax.Array, valid: jax.Array) -> TopImages:
    """Fold in a batch: acts [B, h, w, K], image index [B], valid [B]."""
    k = state.values.shape[0]
    peak = acts.max(axis=(1, 2)).astype(jnp.float32)  # [B, K]
    peak = jnp.where(valid[:, None], peak, -jnp.inf)
    idx = jnp.broadcast_to(jnp.where(valid, index, -1)[:, None], peak.shape).astype(jnp.int32)
    return _select(jnp.concatenate([state.values, peak]), jnp.concatenate([state.indices, idx]), k)


def merge(a: TopImages, b: TopImages) -> TopImages:
    """Associative and commutative."""
    k = a.values.shape[0]
    return _select(
        jnp.concatenate([a.values, b.values]), jnp.concatenate([a.indices, b.indices]), k
    )

"""Masks of Network Dissection as plain jittable functions.

- A unit's mask on an image: its activation map upsampled to the segmentation size
  (`tally.upsample`: bilinear, half-pixel centres, edge clamping) and thresholded
  by the tie rule (`jaxdissect.tie_rule`): M_k(x) = S_k(x) > T_k (strict) or
  S_k(x) >= T_k (inclusive), as the tally counts it.
- A concept's mask on an image: pixels where any plane holds the label, or the
  whole image when it is an image-level label of the image; label 0 and numbers
  outside [1, num_labels) are never a concept.

The tally counts with fused versions of these (it never builds a concept mask);
compositional explanations, segmentations and tests build on these.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdissect.tally import upsample
from jaxdissect.tie_rule import active


def unit_masks(
    acts: jax.Array, thresholds: jax.Array, size: tuple[int, int], tie_rule: str = "strict"
) -> jax.Array:
    """bool [B, sh, sw, K]: each unit's thresholded upsampled map on each image.

    acts: [B, h, w, K] activations; thresholds: [K]; size: (sh, sw), static.
    """
    thresholds = jnp.asarray(thresholds, jnp.float32)
    if jnp.ndim(acts) != 4 or thresholds.shape != jnp.shape(acts)[-1:]:
        raise ValueError(
            f"acts {tuple(jnp.shape(acts))} and thresholds {thresholds.shape}: acts is "
            "[B, h, w, K] and thresholds [K], one a unit"
        )
    return active(upsample(acts, size), thresholds, tie_rule)


def unit_mask(
    act_map: jax.Array, threshold: jax.Array, size: tuple[int, int], tie_rule: str = "strict"
) -> jax.Array:
    """bool [sh, sw]: one unit's mask from its map [h, w] and threshold."""
    if jnp.ndim(act_map) != 2 or jnp.ndim(threshold) != 0:
        raise ValueError(
            f"act_map {tuple(jnp.shape(act_map))} and threshold {tuple(jnp.shape(threshold))}: "
            "one unit's map [h, w] and its threshold (unit_masks takes [B, h, w, K])"
        )
    maps = act_map[None, :, :, None]
    return unit_masks(maps, jnp.reshape(threshold, (1,)), size, tie_rule)[0, :, :, 0]


def concept_masks(
    pixel_labels: jax.Array,
    image_labels: jax.Array,
    concepts: jax.Array,
    num_labels: int | None = None,
) -> jax.Array:
    """bool [B, C, sh, sw]: the mask of each concept of `concepts` [C] on each image.

    pixel_labels: int [B, P, sh, sw] (planes); image_labels: int [B, Q] (0: none).
    Concepts 0 and (with `num_labels`) numbers >= num_labels give empty masks.
    """
    pixel_labels = jnp.asarray(pixel_labels)
    image_labels = jnp.asarray(image_labels)
    wide = jnp.asarray(concepts, jnp.int32)
    narrow = wide.astype(pixel_labels.dtype)  # the planes compared in their own type
    # A number the planes' type cannot hold is in no plane (257 in uint8 planes is not 1).
    fits = narrow.astype(jnp.int32) == wide
    real = wide > 0
    if num_labels is not None:
        real &= wide < num_labels
    c = narrow[None, :, None, None, None]
    pixel = (pixel_labels[:, None] == c).any(axis=2) & fits[None, :, None, None]  # [B, C, sh, sw]
    whole = (image_labels.astype(jnp.int32)[:, None, :] == wide[None, :, None]).any(axis=2)
    return (pixel | whole[:, :, None, None]) & real[None, :, None, None]


def concept_mask(
    pixel_labels: jax.Array, image_labels: jax.Array, concept: int | jax.Array
) -> jax.Array:
    """bool [sh, sw]: concept's mask on one image (pixel_labels [P, sh, sw], image_labels [Q])."""
    return concept_masks(
        jnp.asarray(pixel_labels)[None], jnp.asarray(image_labels)[None], jnp.reshape(concept, (1,))
    )[0, 0]

"""Significance of detectors: a permutation p-value for every (unit, concept) IoU, and
Benjamini-Hochberg control of the false discovery rate per layer.

The null hypothesis is "no association between the unit's masks and the concept's
masks": which image's concept masks are paired with which image's unit masks does not
matter. Under it the images' pairings are exchangeable, so drawing D random
permutations pi of the N images and pairing unit masks of image i with the concept
masks of image pi(i) gives D intersections I_pi[k, c] = sum_i |U_i,k & L_pi(i),c| drawn
from the null. Each unit's and each concept's total area is the same under every
pairing, so IoU = I / (|U| + |L| - I) is increasing in I, and the p-value of the
observed IoU is that of its intersection:

    p[k, c] = (1 + #{d : I_pi_d[k, c] >= I[k, c]}) / (1 + D)

which is a valid (slightly conservative) p-value for any D; the smallest attainable
p is 1 / (1 + D), so D sets the resolution (D = 999 resolves 0.001).

Why not an exact test at the pixel level (hypergeometric, or Fisher's exact test on
the 2x2 table of pixels): it assumes the pixels are independent draws, and they are
not. Both a unit's mask and a concept's mask are spatially smooth blobs (a unit's
mask is a thresholded, upsampled feature map: one active feature cell lights up a
whole patch), so neighbouring pixels agree; the effective number of independent
observations is closer to the number of images than of pixels, and the pixel-level
test calls nearly every overlap "significant". Permuting whole images keeps each
image's spatial structure on both sides and breaks only the pairing.

Spatial priors are kept too: a unit that fires at the top of every image and a
concept (sky) that sits at the top of every image overlap under every pairing, so
their p-value is not small unless the unit fires on sky more than on the top of
images that have none: the test asks for an association with the concept, not with
where the concept tends to be.

`benjamini_hochberg` controls the expected share of false discoveries among the
(unit, concept) pairs of one layer called significant at level alpha.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Draws of the permutation null unless the caller says otherwise (resolves p down to 0.005).
DEFAULT_DRAWS = 199
# Images per float32 block of the intersection counts: every partial sum stays below 2**24.
_EXACT_F32 = 2**24


def intersections(unit_masks: np.ndarray, concept_masks: np.ndarray) -> np.ndarray:
    """int64 [K, C]: sum over images and pixels of unit mask k AND concept mask c.

    `unit_masks` bool [N, P, K], `concept_masks` bool [N, P, C] (P pixels per image).
    """
    u = np.asarray(unit_masks, bool)
    c = np.asarray(concept_masks, bool)
    _check(u, c)
    return np.einsum("npk,npc->kc", u.astype(np.int64), c.astype(np.int64))


def _check(u: np.ndarray, c: np.ndarray) -> None:
    if u.ndim != 3 or c.ndim != 3 or u.shape[:2] != c.shape[:2]:
        raise ValueError(
            f"unit_masks {u.shape} and concept_masks {c.shape} must be [N, P, K] and [N, P, C] "
            "over the same images and pixels"
        )


def iou(inter: jax.Array, unit_area: jax.Array, concept_area: jax.Array) -> jax.Array:
    """float32 [K, C] IoU from intersections [K, C] and areas [K], [C] (0 where both are empty)."""
    inter = inter.astype(jnp.float32)
    union = unit_area.astype(jnp.float32)[:, None] + concept_area.astype(jnp.float32) - inter
    return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("block",))
def _exceedances(
    u: jax.Array, c: jax.Array, perms: jax.Array, observed: jax.Array, *, block: int
) -> tuple[jax.Array, jax.Array]:
    """int32 [K, C]: draws whose permuted intersection reaches `observed`; int32 [K]: draws
    whose best IoU over the concepts reaches the unit's observed best IoU."""
    n = u.shape[0]
    pad = (-n) % block
    unit_area = jnp.sum(u, (0, 1), dtype=jnp.int32)
    concept_area = jnp.sum(c, (0, 1), dtype=jnp.int32)
    best = jnp.max(iou(observed, unit_area, concept_area), axis=1)
    u = jnp.pad(u, ((0, pad), (0, 0), (0, 0)))
    blocks = u.reshape(-1, block, *u.shape[1:])

    def one(counts, perm):
        paired = jnp.pad(c[perm], ((0, pad), (0, 0), (0, 0))).reshape(-1, block, *c.shape[1:])

        def add(total: jax.Array, pair: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
            part = jnp.einsum("npk,npc->kc", pair[0], pair[1], preferred_element_type=jnp.float32)
            return total + part.astype(jnp.int32), None

        zero = jnp.zeros((u.shape[-1], c.shape[-1]), jnp.int32)
        inter, _ = jax.lax.scan(add, zero, (blocks, paired))
        drawn = jnp.max(iou(inter, unit_area, concept_area), axis=1)
        pairs, units = counts
        return (pairs + (inter >= observed), units + (drawn >= best)), None

    start = (
        jnp.zeros((u.shape[-1], c.shape[-1]), jnp.int32),
        jnp.zeros((u.shape[-1],), jnp.int32),
    )
    counts, _ = jax.lax.scan(one, start, perms)
    return counts


def permutations(num_images: int, draws: int, seed: int) -> np.ndarray:
    """int32 [draws, num_images]: uniform random permutations of the images (seeded)."""
    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1")
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_images, draws]))
    return np.stack([rng.permutation(num_images) for _ in range(draws)]).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PermutationTest:
    """p-values of one layer's detectors under the image-permutation null (module doc).

    Attributes:
      pair_p: float64 [K, C], p of each (unit, concept) intersection (hence IoU).
      unit_p: float64 [K], p of each unit's best IoU over all concepts, against the null
        distribution of the best (the max over concepts is taken in every draw too, so the
        choice of the label is paid for): "unit k detects some concept".
      observed: int64 [K, C], the observed intersections.
      draws: D.
    """

    pair_p: np.ndarray
    unit_p: np.ndarray
    observed: np.ndarray
    draws: int


def permutation_test(
    unit_masks: np.ndarray,
    concept_masks: np.ndarray,
    *,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> PermutationTest:
    """The image-permutation test of every (unit, concept) pair and of every unit's best IoU.

    A pair that never overlaps (observed 0) gets p = 1. The counts are exact: float32
    blocks of images whose sums stay below 2**24, added as integers. BH over the K unit
    p-values can only call a unit when 1 / (1 + D) <= alpha / K: take D >= K / alpha.
    """
    u = np.asarray(unit_masks, bool)
    c = np.asarray(concept_masks, bool)
    _check(u, c)
    n, p = u.shape[:2]
    observed = intersections(u, c)
    if n == 0:
        return PermutationTest(np.ones(observed.shape), np.ones(u.shape[2]), observed, draws)
    block = max(1, min(n, (_EXACT_F32 - 1) // max(p, 1)))
    perms = permutations(n, draws, seed)
    pairs, units = _exceedances(
        # 0/1 is exact in bfloat16 (half float32's memory); products sum in float32.
        jnp.asarray(u, jnp.bfloat16),
        jnp.asarray(c, jnp.bfloat16),
        jnp.asarray(perms),
        jnp.asarray(observed, jnp.int32),
        block=block,
    )
    pair_p = (1.0 + np.asarray(pairs, np.float64)) / (1.0 + draws)
    unit_p = (1.0 + np.asarray(units, np.float64)) / (1.0 + draws)
    return PermutationTest(pair_p, unit_p, observed, draws)


def benjamini_hochberg(p: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """bool, p's shape: the discoveries of the Benjamini-Hochberg step-up procedure at `alpha`
    over all of `p` (one family: e.g. every (unit, concept) pair of a layer)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha} must be in (0, 1)")
    p = np.asarray(p, np.float64)
    flat = p.reshape(-1)
    m = flat.size
    if m == 0:
        return np.zeros(p.shape, bool)
    if np.isnan(flat).any() or (flat < 0).any() or (flat > 1).any():
        raise ValueError("p-values must lie in [0, 1]")
    order = np.argsort(flat, kind="stable")
    passed = flat[order] <= alpha * np.arange(1, m + 1) / m
    out = np.zeros(m, bool)
    if passed.any():
        last = int(np.nonzero(passed)[0][-1])
        out[order[: last + 1]] = True
    return out.reshape(p.shape)


# --------------------------------------------------------------------------- masks of a layer


def layer_masks(
    tap: Any,
    path: str,
    thresholds: np.ndarray,
    source: Any,
    concepts: np.ndarray,
    *,
    input_spec: Any,
    stride: int = 1,
    tie_rule: str = "strict",
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """(unit masks bool [N, P, K], concept masks bool [N, P, C]) of every probe image.

    The masks of `jaxdissect.masks` at the segmentation size, on the pixel grid taken every
    `stride` pixels in both directions (P = ceil(sh / stride) * ceil(sw / stride)): the
    test's cost and memory scale with P. `tap` is a `capture.Tap` holding layer `path`;
    `thresholds` [K] the dissection's (raw activations).
    """
    from jaxdissect import masks

    if stride < 1:
        raise ValueError(f"stride={stride} must be >= 1")
    sh, sw = source.seg_size
    concepts_j = jnp.asarray(concepts, jnp.int32)
    thr = jnp.asarray(thresholds, jnp.float32)

    @jax.jit
    def unit_step(v: Any, images: jax.Array) -> jax.Array:
        acts = tap.fn(v, input_spec(images))[path].astype(jnp.float32)
        m = masks.unit_masks(acts, thr, (sh, sw), tie_rule)[:, ::stride, ::stride]
        return m.reshape(m.shape[0], -1, m.shape[-1])

    @jax.jit
    def concept_step(planes: jax.Array, image_labels: jax.Array) -> jax.Array:
        m = masks.concept_masks(planes, image_labels, concepts_j)[:, :, ::stride, ::stride]
        return jnp.moveaxis(m.reshape(m.shape[0], m.shape[1], -1), 1, 2)

    units, conc = [], []
    n = len(source)
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        images = np.stack([np.asarray(source.read_image(i), np.float32) for i in idx])
        labels = [source.read_labels(i) for i in idx]
        depth = max(1, max(p.shape[0] for p, _ in labels))
        width = max(1, max(len(q) for _, q in labels))
        planes = np.zeros((len(labels), depth, sh, sw), np.int32)
        image_labels = np.zeros((len(labels), width), np.int32)
        for j, (p, q) in enumerate(labels):
            planes[j, : p.shape[0]] = p
            image_labels[j, : len(q)] = q
        units.append(np.asarray(unit_step(tap.variables, images)))
        conc.append(np.asarray(concept_step(planes, image_labels)))
    return np.concatenate(units), np.concatenate(conc)

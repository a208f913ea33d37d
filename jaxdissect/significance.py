"""Significance of detectors: a permutation p-value for every (unit, concept) IoU, and
Benjamini-Hochberg (or -Yekutieli) control of the false discovery rate per layer.

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

The IoU tested is the masks' on the test's grid (every `stride`-th segmentation pixel each
way) with the union unrestricted (every image), not the dissection's (full resolution,
its restriction's union): a unit's best concept here can differ from its dissection
label, and the pair p of that label (`results.Significance.label_p`) is not corrected for
the label's choice as the best of the dissection's IoU.

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

`benjamini_hochberg` bounds the expected share of false discoveries among one family of
p-values called significant at level alpha (a dissection's family: the units of one
layer, each with its `unit_p`) when the p-values are independent or positively
regression dependent (PRDS). The units' p-values come from the same permutations, so
they are dependent and PRDS is not shown: BH's level is nominal.
`benjamini_yekutieli` (BH at alpha / sum_{i<=m} 1/i) holds it under any dependence, at
the price of fewer calls; `discoveries` picks one by name (`FDR_PROCEDURES`).

As a streaming statistic (`mask_statistic`): the test needs, for every pairing, image
i's unit masks with image pi(i)'s concept masks, which no per-image sum holds. A pass
(the dissection's pass 2, from its activation cache: no extra forward pass) stores every
image's unit and concept masks on the test's grid as packed bits, N P (K + C) / 8 bytes
(P: pixels of the grid, every `stride`-th of the segmentation's in both directions);
`packed_permutation_test` then streams the draws over blocks of images, unpacking one
block of unit masks and the block's permuted concept masks at a time, and draws the
permutations in chunks (never all D x N at once). Memory: the packed masks, one block
(at most `_BLOCK_BYTES` unpacked), and int32 counts [K, C].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxdissect import parallel, results, statistics, tally
from jaxdissect.tally import F32_EXACT
from jaxdissect.tie_rule import active, check_tie_rule

# False discovery rate procedures (`discoveries`): Benjamini-Hochberg, Benjamini-Yekutieli.
FDR_PROCEDURES = ("bh", "by")
FDR_NAMES = {"bh": "BH", "by": "BY"}
# Draws of the permutation null unless the caller says otherwise (resolves p down to 0.005).
DEFAULT_DRAWS = 199
# A test grid narrower than this (pixels each way) is warned about (`check_grid`).
MIN_GRID_SIDE = 7
# Bytes of one block's unpacked masks (bfloat16 unit and concept masks of its images).
_BLOCK_BYTES = 64 * 2**20
# Permutations drawn and sent to the device at a time.
_DRAW_CHUNK = 64


def _check(u: np.ndarray, c: np.ndarray) -> None:
    if u.ndim != 3 or c.ndim != 3 or u.shape[:2] != c.shape[:2]:
        raise ValueError(
            f"unit_masks {u.shape} and concept_masks {c.shape} must be [N, P, K] and [N, P, C] "
            "over the same images and pixels"
        )


# Counts compared exactly as limbs of this many bits (three: counts below 2**33), so that
# the limbs' products and their sums stay within int32.
_LIMB_BITS = 11
_LIMBS = 3


def _product_limbs(a: jax.Array, b: jax.Array) -> list[jax.Array]:
    """a * b, for int32 counts a, b >= 0, as 2 * _LIMBS - 1 int32 limbs (unnormalised)."""
    mask = (1 << _LIMB_BITS) - 1
    x = [(a >> (_LIMB_BITS * i)) & mask for i in range(_LIMBS)]
    y = [(b >> (_LIMB_BITS * i)) & mask for i in range(_LIMBS)]
    return [
        sum(x[i] * y[k - i] for i in range(_LIMBS) if 0 <= k - i < _LIMBS)
        for k in range(2 * _LIMBS - 1)
    ]


def at_least(n1: jax.Array, d1: jax.Array, n2: jax.Array, d2: jax.Array) -> jax.Array:
    """Exactly whether n1 / d1 >= n2 / d2, for int32 counts >= 0 and denominators > 0:
    the sign of n1 * d2 - n2 * d1, whose products need up to 62 bits, from int32 limbs."""
    limbs = [p - q for p, q in zip(_product_limbs(n1, d2), _product_limbs(n2, d1), strict=True)]
    for i in range(len(limbs) - 1):  # carry up: every limb but the top in [0, 2**bits)
        limbs[i + 1] = limbs[i + 1] + (limbs[i] >> _LIMB_BITS)
    # The lower limbs add less than one unit of the top one: the top's sign is the sign.
    return limbs[-1] >= 0


def _iou_fractions(
    inter: jax.Array, unit_area: jax.Array, concept_area: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """int32 (numerators, denominators) [K, C] of the IoUs: inter / union, 0 / 1 where both
    masks are empty."""
    union = unit_area[:, None] + concept_area[None, :] - inter
    return inter, jnp.maximum(union, 1)


def _best_fraction(num: jax.Array, den: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's largest fraction num / den (exactly), as (numerator, denominator) [K]."""

    def larger(best, column):
        n, d = column
        take = at_least(n, d, *best)
        return (jnp.where(take, n, best[0]), jnp.where(take, d, best[1])), None

    start = (jnp.zeros(num.shape[0], num.dtype), jnp.ones(num.shape[0], den.dtype))
    (n, d), _ = jax.lax.scan(larger, start, (num.T, den.T))
    return n, d


def pack(masks: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [..., ceil(X / 8)]: bool masks [..., X] packed along their last axis."""
    return jnp.packbits(jnp.asarray(masks, bool), axis=-1)


def _pairing(
    unit_bits: jax.Array,
    concept_bits: jax.Array,
    order: jax.Array,
    *,
    num_units: int,
    num_concepts: int,
    block: int,
) -> jax.Array:
    """int32 [K, C]: sum over images i of |U_i,k & L_order[i],c|, a block of images at a time."""
    n = unit_bits.shape[0]
    starts = jnp.arange(0, n, block, dtype=jnp.int32)

    def unpack(bits: jax.Array, rows: jax.Array, count: int, valid: jax.Array) -> jax.Array:
        m = jnp.unpackbits(jnp.take(bits, rows, axis=0), axis=-1, count=count)
        # 0/1 is exact in bfloat16; products sum in float32 below 2**24 per block.
        return (m * valid[:, None, None]).astype(jnp.bfloat16)

    def add(total: jax.Array, start: jax.Array) -> tuple[jax.Array, None]:
        idx = start + jnp.arange(block, dtype=jnp.int32)
        valid = (idx < n).astype(jnp.uint8)
        idx = jnp.minimum(idx, n - 1)
        u = unpack(unit_bits, idx, num_units, valid)
        c = unpack(concept_bits, jnp.take(order, idx), num_concepts, valid)
        part = jnp.einsum("npk,npc->kc", u, c, preferred_element_type=jnp.float32)
        return total + part.astype(jnp.int32), None

    zero = jnp.zeros((num_units, num_concepts), jnp.int32)
    total, _ = jax.lax.scan(add, zero, starts)
    return total


_STATIC = ("num_units", "num_concepts", "block")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _observed(unit_bits, concept_bits, *, num_units, num_concepts, block):
    """(intersections [K, C], unit areas [K], concept areas [C]), int32, of the true pairing."""
    n = unit_bits.shape[0]
    order = jnp.arange(n, dtype=jnp.int32)
    inter = _pairing(
        unit_bits, concept_bits, order, num_units=num_units, num_concepts=num_concepts, block=block
    )

    def area(bits: jax.Array, count: int) -> jax.Array:
        def add(total, start):
            rows = jax.lax.dynamic_slice_in_dim(bits, start, 1)
            m = jnp.unpackbits(rows, axis=-1, count=count)
            return total + jnp.sum(m, (0, 1), dtype=jnp.int32), None

        total, _ = jax.lax.scan(add, jnp.zeros((count,), jnp.int32), jnp.arange(n))
        return total

    return inter, area(unit_bits, num_units), area(concept_bits, num_concepts)


@functools.partial(jax.jit, static_argnames=_STATIC, donate_argnums=(0,))
def _exceedances(
    counts, unit_bits, concept_bits, perms, observed, unit_area, concept_area, **static
) -> tuple[jax.Array, jax.Array]:
    """counts plus, over the draws `perms` [D, N]: (int32 [K, C]) draws whose permuted
    intersection reaches `observed`, (int32 [K]) draws whose best IoU over the concepts
    reaches the unit's observed best IoU, the IoUs compared exactly as fractions of
    their counts (`at_least`)."""
    best = _best_fraction(*_iou_fractions(observed, unit_area, concept_area))

    def one(carry, perm):
        inter = _pairing(unit_bits, concept_bits, perm, **static)
        num, den = _iou_fractions(inter, unit_area, concept_area)
        # Without concepts the best IoU is 0 in every draw as observed: every draw reaches it.
        reaches = at_least(num, den, best[0][:, None], best[1][:, None]).any(axis=1) | (
            num.shape[1] == 0
        )
        pairs, units = carry
        return (pairs + (inter >= observed), units + reaches), None

    counts, _ = jax.lax.scan(one, counts, perms)
    return counts


def _check_draws(draws: int) -> None:
    if draws < 1:
        raise ValueError(f"draws={draws} must be >= 1")


def permutation_chunks(num_images: int, draws: int, seed: int, chunk: int) -> Iterator[np.ndarray]:
    """int32 [<= chunk, num_images] blocks of the seeded permutations of `permutations`."""
    _check_draws(draws)
    rng = np.random.default_rng(np.random.SeedSequence([seed, num_images, draws]))

    def blocks() -> Iterator[np.ndarray]:
        for start in range(0, draws, chunk):
            size = min(chunk, draws - start)
            yield np.stack([rng.permutation(num_images) for _ in range(size)]).astype(np.int32)

    return blocks()


def permutations(num_images: int, draws: int, seed: int) -> np.ndarray:
    """int32 [draws, num_images]: uniform random permutations of the images (seeded)."""
    return np.concatenate(list(permutation_chunks(num_images, draws, seed, draws)))


@dataclasses.dataclass(frozen=True)
class PermutationTest:
    """p-values of one layer's detectors under the image-permutation null (module doc).

    Attributes:
      pair_p: float64 [K, C], p of each (unit, concept) intersection (hence IoU).
      unit_p: float64 [K], p of each unit's best IoU over all concepts (on the test's
        grid, union unrestricted), against the null distribution of the best (the max
        over concepts is taken in every draw too, so the choice of the label is paid
        for): "unit k detects some concept".
      observed: int64 [K, C], the observed intersections.
      draws: D.
      unit_area, concept_area: int64 [K], [C], the masks' pixels over all images.
    """

    pair_p: np.ndarray
    unit_p: np.ndarray
    observed: np.ndarray
    draws: int
    unit_area: np.ndarray | None = None
    concept_area: np.ndarray | None = None

    def iou(self) -> np.ndarray:
        """float64 [K, C]: the observed IoU of every (unit, concept) pair on the test's grid."""
        return results.iou(self.observed, self.unit_area[:, None], self.concept_area[None, :])


def block_size(num_images: int, pixels: int, num_units: int, num_concepts: int) -> int:
    """Images per block: float32 sums stay exact, the unpacked block within `_BLOCK_BYTES`."""
    per_image = 2 * max(pixels, 1) * (num_units + num_concepts)
    exact = (F32_EXACT - 1) // max(pixels, 1)
    return max(1, min(num_images, exact, _BLOCK_BYTES // per_image))


def packed_permutation_test(
    unit_bits: np.ndarray | jax.Array,
    concept_bits: np.ndarray | jax.Array,
    num_units: int,
    num_concepts: int,
    *,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> PermutationTest:
    """The image-permutation test from packed masks (`pack`): unit_bits uint8 [N, P, ceil(K/8)],
    concept_bits uint8 [N, P, ceil(C/8)].

    A pair that never overlaps (observed 0) gets p = 1. The counts are exact: float32
    blocks of images whose sums stay below 2**24, added as integers. BH over the K unit
    p-values can only call a unit when 1 / (1 + D) <= alpha / K: take D >= K / alpha.
    """
    ub = jnp.asarray(unit_bits, jnp.uint8)
    cb = jnp.asarray(concept_bits, jnp.uint8)
    if ub.ndim != 3 or cb.ndim != 3 or ub.shape[:2] != cb.shape[:2]:
        raise ValueError(
            f"unit_bits {ub.shape} and concept_bits {cb.shape} must be [N, P, bytes] over the "
            "same images and pixels"
        )
    for name, count, bits in (("num_units", num_units, ub), ("num_concepts", num_concepts, cb)):
        if (count + 7) // 8 != bits.shape[-1]:
            raise ValueError(f"{name}={count} does not match {bits.shape[-1]} bytes of masks")
    _check_draws(draws)
    n, p = ub.shape[:2]
    k, c = num_units, num_concepts
    if n == 0:
        zero = np.zeros((k, c), np.int64)
        return PermutationTest(np.ones((k, c)), np.ones(k), zero, draws, zero[:, 0], zero[0])
    static = {"num_units": k, "num_concepts": c, "block": block_size(n, p, k, c)}
    observed, unit_area, concept_area = _observed(ub, cb, **static)
    counts = (jnp.zeros((k, c), jnp.int32), jnp.zeros((k,), jnp.int32))
    for perms in permutation_chunks(n, draws, seed, _DRAW_CHUNK):
        counts = _exceedances(
            counts, ub, cb, jnp.asarray(perms), observed, unit_area, concept_area, **static
        )
    pairs, units = counts
    pair_p = (1.0 + np.asarray(pairs, np.float64)) / (1.0 + draws)
    unit_p = (1.0 + np.asarray(units, np.float64)) / (1.0 + draws)
    return PermutationTest(
        pair_p,
        unit_p,
        np.asarray(observed, np.int64),
        draws,
        np.asarray(unit_area, np.int64),
        np.asarray(concept_area, np.int64),
    )


def permutation_test(
    unit_masks: np.ndarray,
    concept_masks: np.ndarray,
    *,
    draws: int = DEFAULT_DRAWS,
    seed: int = 0,
) -> PermutationTest:
    """The image-permutation test of every (unit, concept) pair and of every unit's best IoU,
    from bool masks [N, P, K] and [N, P, C] (`packed_permutation_test` of their bits)."""
    u = np.asarray(unit_masks, bool)
    c = np.asarray(concept_masks, bool)
    _check(u, c)
    _check_draws(draws)
    return packed_permutation_test(pack(u), pack(c), u.shape[2], c.shape[2], draws=draws, seed=seed)


def check_fdr(procedure: str, name: str = "procedure") -> None:
    if procedure not in FDR_PROCEDURES:
        raise ValueError(f"{name}={procedure!r}: must be one of {', '.join(FDR_PROCEDURES)}")


def benjamini_hochberg(p: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """bool, p's shape: the discoveries of the Benjamini-Hochberg step-up procedure at `alpha`
    over all of `p` (one family: e.g. every (unit, concept) pair of a layer); its false
    discovery rate is at most alpha for independent or PRDS p-values (module doc)."""
    return _step_up(p, alpha, 1.0)


def benjamini_yekutieli(p: np.ndarray, alpha: float = 0.05) -> np.ndarray:
    """bool, p's shape: the discoveries of the Benjamini-Yekutieli procedure at `alpha` over
    all of `p`: BH's step-up at alpha / sum_{i<=m} 1/i, m = p.size; its false discovery
    rate is at most alpha whatever the p-values' dependence."""
    return _step_up(p, alpha, _divisor(np.size(p), "by"))


def discoveries(p: np.ndarray, alpha: float = 0.05, procedure: str = "bh") -> np.ndarray:
    """bool, p's shape: the discoveries of `procedure` (`FDR_PROCEDURES`) at `alpha`."""
    check_fdr(procedure)
    return (benjamini_hochberg if procedure == "bh" else benjamini_yekutieli)(p, alpha)


def _divisor(m: int, procedure: str) -> float:
    """What divides alpha in the step-up rule of m p-values: 1 (BH), sum_{i<=m} 1/i (BY)."""
    return float(np.sum(1.0 / np.arange(1, m + 1))) if procedure == "by" and m > 1 else 1.0


def _step_up(p: np.ndarray, alpha: float, divisor: float) -> np.ndarray:
    """The step-up rule: the r smallest p are called, r the largest with
    p_(r) <= alpha r / (m divisor)."""
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
    passed = flat[order] <= alpha * np.arange(1, m + 1) / (m * divisor)
    out = np.zeros(m, bool)
    if passed.any():
        last = int(np.nonzero(passed)[0][-1])
        out[order[: last + 1]] = True
    return out.reshape(p.shape)


# ----------------------------------------------------------------------------- as a statistic


def grid_unit_masks(
    acts: jax.Array,
    thresholds: jax.Array,
    size: tuple[int, int],
    stride: int,
    tie_rule: str = "strict",
) -> jax.Array:
    """bool [B, ceil(sh/stride), ceil(sw/stride), K]: `masks.unit_masks(acts, thresholds, size,
    tie_rule)[:, ::stride, ::stride]`, upsampled only at the grid's pixels (same values)."""
    up = tally.upsample(acts, size, stride)
    return active(up, jnp.asarray(thresholds, jnp.float32), tie_rule)


def grid_concept_masks(
    pixel_labels: jax.Array, image_labels: jax.Array, concepts: jax.Array, stride: int
) -> jax.Array:
    """bool [B, ceil(sh/stride), ceil(sw/stride), C]: `masks.concept_masks` on the grid."""
    from jaxdissect import masks

    m = masks.concept_masks(pixel_labels[:, :, ::stride, ::stride], image_labels, concepts)
    return jnp.moveaxis(m, 1, -1)


def mask_statistic(
    layer: str,
    thresholds: np.ndarray,
    concepts: Sequence[int] | np.ndarray,
    *,
    num_images: int,
    seg_size: tuple[int, int],
    stride: int = 1,
    tie_rule: str = "strict",
) -> statistics.Statistic:
    """Every image's unit and concept masks on the test's grid, as packed bits (module doc).

    The state holds uint8 [N, P, ceil(K/8)] and [N, P, ceil(C/8)] (P = ceil(sh / stride) *
    ceil(sw / stride)); each image's row is written at its index, and merge is a bitwise OR
    (a shard's rows are zero elsewhere). The thresholds ride in the state. finalize gives
    {"unit_bits", "concept_bits"} for `packed_permutation_test`.
    """
    if stride < 1:
        raise ValueError(f"stride={stride} must be >= 1")
    check_tie_rule(tie_rule)
    thresholds = np.asarray(thresholds, np.float32)
    concepts = np.asarray(concepts, np.int32)
    k, c = thresholds.shape[0], concepts.shape[0]
    sh, sw = (int(s) for s in seg_size)
    check_grid((sh, sw), stride)
    gh, gw = grid_shape((sh, sw), stride)
    pixels = gh * gw

    def init(shard: int):
        return {
            "thresholds": jax.device_put(thresholds),
            "units": parallel.filled((num_images, pixels, (k + 7) // 8), 0, np.uint8),
            "concepts": parallel.filled((num_images, pixels, (c + 7) // 8), 0, np.uint8),
        }

    def update(state, batch):
        acts = batch["acts"][layer]
        b = acts.shape[0]
        u = grid_unit_masks(acts, state["thresholds"], (sh, sw), stride, tie_rule)
        l_ = grid_concept_masks(
            batch["pixel_labels"], batch["image_labels"], jnp.asarray(concepts), stride
        )
        rows = jnp.where(batch["valid"], batch["index"], num_images)  # padding: dropped
        return {
            "thresholds": state["thresholds"],
            "units": state["units"].at[rows].set(pack(u.reshape(b, pixels, k)), mode="drop"),
            "concepts": state["concepts"].at[rows].set(pack(l_.reshape(b, pixels, c)), mode="drop"),
        }

    def merge(a, b):
        return {
            "thresholds": a["thresholds"],
            "units": a["units"] | b["units"],
            "concepts": a["concepts"] | b["concepts"],
        }

    def finalize(state):
        return {
            "unit_bits": np.asarray(state["units"]),
            "concept_bits": np.asarray(state["concepts"]),
        }

    key = (
        "significance_masks",
        layer,
        k,
        concepts.tobytes(),
        num_images,
        (sh, sw),
        stride,
        tie_rule,
    )
    return statistics.Statistic(init, update, merge, finalize, key)


def fewest_callable(num_units: int, draws: int, alpha: float, procedure: str = "bh") -> int | None:
    """Fewest of `num_units` units `procedure` can call at `alpha` with `draws` permutations:
    the smallest p is 1 / (draws + 1), and the step-up rule calls r units only where
    p <= alpha r / K (BY: alpha r / (K sum_{i<=K} 1/i)), compared as `discoveries` does.
    None where not even all K can be called (the smallest p is above alpha / divisor)."""
    check_fdr(procedure)
    if num_units <= 0:
        return 0
    smallest = 1 / (draws + 1)
    divisor = _divisor(num_units, procedure)

    def calls(r: int) -> bool:
        return smallest <= alpha * r / (num_units * divisor)

    if not calls(num_units):
        return None
    r = max(1, int(np.ceil(smallest * num_units * divisor / alpha)))
    while r > 1 and calls(r - 1):
        r -= 1
    while not calls(r):
        r += 1
    return r


def _lone_callable(num_units: int, draws: int, alpha: float, procedure: str) -> bool:
    return fewest_callable(num_units, draws, alpha, procedure) in (0, 1)


def least_draws(num_units: int, alpha: float, procedure: str = "bh") -> int:
    """Fewest draws with which `procedure` can call a lone detector among `num_units` at
    `alpha` (its p, 1 / (draws + 1), at most alpha / K; BY: alpha / (K sum 1/i))."""
    divisor = _divisor(max(num_units, 1), procedure)
    d = max(1, int(np.ceil(max(num_units, 1) * divisor / alpha)) - 1)
    while d > 1 and _lone_callable(num_units, d - 1, alpha, procedure):
        d -= 1
    while not _lone_callable(num_units, d, alpha, procedure):
        d += 1
    return d


def resolution_note(num_units: int, draws: int, alpha: float, procedure: str = "bh") -> str | None:
    """One line saying that `draws` cannot call a lone detector among `num_units` at
    `alpha` under `procedure` (and how many draws can), or None where a lone detector
    can be called."""
    fewest = fewest_callable(num_units, draws, alpha, procedure)
    if fewest is not None and fewest <= 1:
        return None
    calls = (
        f"calls no unit of these {num_units}"
        if fewest is None
        else f"calls units only in groups of at least {fewest}"
    )
    return (
        f"note: with --significance_draws={draws} the smallest p is {1 / (draws + 1):.2g}, "
        f"so {FDR_NAMES[procedure]} {calls}: a lone detector needs --significance_draws >= "
        f"{least_draws(num_units, alpha, procedure)}"
    )


def grid_shape(seg_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """(rows, columns) of the test's grid: every `stride`-th pixel of the segmentation."""
    return -(-int(seg_size[0]) // stride), -(-int(seg_size[1]) // stride)


def check_grid(seg_size: tuple[int, int], stride: int) -> None:
    """Log a WARNING (each test built, so once per layer) when the test's grid is narrower than
    `MIN_GRID_SIDE` pixels: so few pixels per image leave the masks too coarse for small
    p-values (on a 3x3 grid every unit's p was 1.0)."""
    gh, gw = grid_shape(seg_size, stride)
    if min(gh, gw) < MIN_GRID_SIDE:
        logging.warning(
            "the permutation test's grid is %dx%d (segmentation %dx%d, every "
            "--significance_stride=%d-th pixel), under %dx%d: p-values cannot be small "
            "on masks this coarse; lower --significance_stride",
            gh,
            gw,
            int(seg_size[0]),
            int(seg_size[1]),
            stride,
            MIN_GRID_SIDE,
            MIN_GRID_SIDE,
        )


def masks_bytes(num_images: int, seg_size: tuple[int, int], stride: int, k: int, c: int) -> int:
    """Bytes of `mask_statistic`'s state (per device): the test's memory bound with one block."""
    gh, gw = grid_shape(seg_size, stride)
    return num_images * gh * gw * ((k + 7) // 8 + (c + 7) // 8)

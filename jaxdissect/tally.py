"""On-device IoU tally of Network Dissection: exact integer counts, batch by batch.

Definitions (the slow numpy reference in `tests/reference.py` implements them literally):

- S_k(x): the activation map A_k(x) [h, w] of unit k on image x resized to the segmentation
  size [sh, sw] by bilinear interpolation with half-pixel centres and edge clamping. Along
  one axis, output i samples the input at src = (i + 0.5) * n_in / n_out - 0.5, clamped to
  [0, n_in - 1], and takes a[i0] + f * (a[i1] - a[i0]) with i0 = floor(src),
  i1 = min(i0 + 1, n_in - 1), f = src - i0 (src exact in integer arithmetic, so an integer
  position is its own tap; f rounded to float32); rows first, then columns. Written so, a
  plateau keeps its value exactly (a[i1] == a[i0] gives a[i0], fused multiply-add or not),
  and a unit capped at its threshold never passes it by a rounding (the weighted sum
  (1 - f) * a[i0] + f * a[i1] rounds a constant map above itself in places). A non-finite
  value spoils the outputs that sample it (inf - inf is NaN: never active). For
  upsampling this is what `jax.image.resize(..., "bilinear")` and PIL's float bilinear
  resize compute (to a few float32 ulps). For downsampling (h > sh) it is deliberately NOT
  antialiased: it equals `jax.image.resize(..., "bilinear", antialias=False)`, so that a
  unit's mask samples its own map instead of a blurred one, and the same formula serves
  every size. Values are float32; another implementation of the formula may round an ulp
  differently (fused multiply-adds), which matters only for values within an ulp of a
  threshold and never on a plateau.
- M_k(x) = S_k(x) > T_k with `tie_rule="strict"` (NetDissect-Lite; the default: consistent
  with P(a > T) = q, and a dead unit, T = 0 on a ReLU map of zeros, marks nothing), or
  S_k(x) >= T_k with `tie_rule="inclusive"` (the paper's formula). They differ only where
  values equal T: `jaxdissect.ties` measures and classifies such units
  (`jaxdissect.tie_rule.active` is the one definition of the comparison).
- L_c(x), the mask of concept c: the OR over planes of (plane == c) for pixel labels, so a
  label repeated at one pixel in two planes counts once; the whole image when c is an
  image-level label of x (a label that is both is the whole image). Label 0 never counts,
  nor do numbers outside [1, num_labels).
- Counts, summed over images: intersection[k, c] = sum_x |M_k(x) & L_c(x)|;
  label_pixels[c] = sum_x |L_c(x)|; unit_total[k] = sum_x |M_k(x)|;
  unit_pixels[k, j] = sum of |M_k(x)| over the images x that pass the category-j
  restriction; images = number of valid examples.
- Restriction of the union (`restriction`):
  - "presence" (the paper, original release; default): x counts for category j when it has
    some label (pixel in any plane, or image-level) whose primary category is j.
  - "overlap" (NetDissect-Lite): x counts for j when some pixel label of primary category j
    lies under M_k(x), or x has an image-level label of category j (then any active pixel
    suffices). Membership is by the label's primary category, as Lite's `labelcat` (the
    one-hot of each label's primary category) tests it and as the IoU pairs a label with its
    primary category's union.
  - "none" (PNAS 2020): every image counts for every category.
- IoU[k, c] = intersection / (unit_pixels[k, primary[c]] + label_pixels[c] - intersection)
  is computed on the host by `jaxdissect.results`.
- Padding examples (valid=False) count nothing.

Exactness: per-batch counts are int32 and must stay below 2**30 (a batch holds at most
B * sh * sw < 2**30 pixels, checked from the shapes; an engine that psums counts over
devices must keep the global batch under that bound). The running tally keeps each count as
a pair (hi, lo) of int32 with value hi * 2**30 + lo, so that Broden at full scale (2.3e9
pixels) is exact with x64 disabled; `tally_to_numpy` joins the pairs as int64 on the host.

Counting methods (`method`):
- "segment": scatter-adds (`.at[ids].add`, i.e. segment sums) of the mask rows over
  (image, label) ids, plane by plane, one image per step on CPU so that the image's mask
  (kept as 1-byte bools) stays in cache; partial sums are uint16 (exact: a per-image sum is
  at most sh * sw <= 65535). Per-image sums also give the "overlap" restriction, and plane
  0's sums the unit totals, for free. The fastest method on CPU. On a layer of more than
  `unit_block` units where at most a quarter of them may fire in the image (a unit can
  fire only if its map's largest value, plus a rounding margin, passes the threshold:
  upsampled values are convex combinations of the map's), only those are counted, in
  blocks of `unit_block` (a wide layer's units are mostly silent on one image).
- "compact": per image, the labels it holds get slots 0..S-1 (`slots`, default 64) in
  label order; a multi-hot [pixels, S] matrix times the mask [pixels, units] on the matrix
  unit gives that image's counts, scattered into the [units, labels] tally by slot. An
  image holding more than S labels takes further rounds of S (a loop of data-dependent
  length: exact for any number of labels). Work per image is pixels x S x units instead
  of pixels x labels x units: 1198 / 64 ~ 19 times less than "matmul" at Broden's size,
  without its [pixels, labels] one-hot in memory. Exact for the same reason as "matmul"
  (0/1 operands, per-image sums < 2**24 in float32 accumulation).
- "matmul": a multi-hot [pixels, labels] matrix times the mask [pixels, units], dense over
  all labels. The slowest; kept as a second, independent formulation.
- "auto": "segment" on CPU, "compact" elsewhere (GPUs and TPUs: matrix units, and
  scatter-adds of many pixels into one label's row contend there).
  `benchmarks/bench_tally.py` prints each method's time and XLA's flop and byte counts;
  the figures are in benchmarks/README.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdissect import parallel, unit_reduce
from jaxdissect.interpolation import interpolation_taps
from jaxdissect.labelspace import LabelSpace
from jaxdissect.results import COUNT_KEYS
from jaxdissect.tie_rule import active, check_tie_rule
from jaxdissect.widecount import LO_BITS, WideCount

RESTRICTIONS = ("presence", "overlap", "none")
METHODS = ("auto", "segment", "compact", "matmul")
DEFAULT_SLOTS = 64
DEFAULT_UNIT_BLOCK = 128

# Bound on any per-batch count (and so on the pixels of one batch).
MAX_BATCH_COUNT = 1 << LO_BITS
# float32 accumulates integers exactly below 2**24: bound for the matmul method.
F32_EXACT = 1 << 24
# Memory budget of one chunk's largest buffer off CPU (multi-hot matrix, segment sums).
_CHUNK_BYTES = 1 << 30
# Gathers and scatters whose indices are in range by construction (label ids cleaned by
# `clean_labels`, segment ids built from them): no bounds handling in the compiled code.
IN_BOUNDS = lax.GatherScatterMode.PROMISE_IN_BOUNDS


# --------------------------------------------------------------------------- upsampling


def upsample(acts: jax.Array, size: tuple[int, int], stride: int = 1) -> jax.Array:
    """Bilinear resize of NHWC maps [B, h, w, K] to [B, sh, sw, K] (see module docstring).

    stride: only every `stride`-th output row and column, [B, ceil(sh/stride),
    ceil(sw/stride), K]: `upsample(acts, size)[:, ::stride, ::stride]`, same values,
    without computing the others.

    Written as two-tap gathers along each axis rather than matmuls with the interpolation
    matrices: the gathers fuse with the threshold comparison into one elementwise pass
    (the output is the big array).
    """
    if jnp.ndim(acts) != 4:
        raise ValueError(f"acts {tuple(jnp.shape(acts))}: must be [B, h, w, K] maps")
    if np.ndim(size) != 1 or len(size) != 2:
        raise ValueError(f"size={size!r}: must be the (height, width) to upsample to")
    if stride < 1:
        raise ValueError(f"stride={stride}: must be >= 1")
    sh, sw = size
    _, h, w, _ = acts.shape
    acts = jnp.asarray(acts, jnp.float32)
    y0, y1, fy = (t[::stride] for t in interpolation_taps(sh, h))
    x0, x1, fx = (t[::stride] for t in interpolation_taps(sw, w))
    top = acts[:, y0]
    rows = top + (acts[:, y1] - top) * fy[None, :, None, None]
    left = rows[:, :, x0]
    return left + (rows[:, :, x1] - left) * fx[None, None, :, None]


# --------------------------------------------------------------------------- counting


def _dedupe(ids: jax.Array, axis: int) -> jax.Array:
    """Zero every entry equal to an earlier entry along `axis` (small axis: planes, Q)."""
    if ids.shape[axis] <= 1:
        return ids
    ids = jnp.moveaxis(ids, axis, 0)
    out = [ids[0]]
    for p in range(1, ids.shape[0]):
        dup = jnp.zeros(ids[p].shape, bool)
        for q in range(p):
            dup |= ids[p] == ids[q]
        out.append(jnp.where(dup, 0, ids[p]))
    return jnp.moveaxis(jnp.stack(out), 0, axis)


def clean_labels(
    pix: jax.Array, img: jax.Array, valid: jax.Array, num_labels: int
) -> tuple[jax.Array, jax.Array]:
    """Label ids where each (pixel, label) occurs once: 0 stands for "nothing here".

    Numbers outside [1, num_labels) and every label of a padding example become 0; repeated
    image-level labels and a label repeated at a pixel in several planes keep their first
    occurrence; a pixel label that is also an image-level label of the image is dropped from
    the planes (the whole image covers it). pix: int32 [B, P, sh, sw]; img: int32 [B, Q].
    """
    pix = jnp.where((pix > 0) & (pix < num_labels) & valid[:, None, None, None], pix, 0)
    img = jnp.where((img > 0) & (img < num_labels) & valid[:, None], img, 0)
    img = _dedupe(img, axis=1)
    for q in range(img.shape[1]):
        pix = jnp.where(pix == img[:, q, None, None, None], 0, pix)
    return _dedupe(pix, axis=1), img


def _category_hits(cats: jax.Array, num_categories: int, axes: tuple[int, ...]) -> jax.Array:
    """any(cats == j) over `axes`, for each category j (last axis of the result)."""
    return jnp.stack([jnp.any(cats == j, axis=axes) for j in range(num_categories)], axis=-1)


def _resolve_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "segment" if jax.default_backend() == "cpu" else "compact"
    return method


def images_per_chunk(chunk: int | None, batch: int, bytes_per_image: int) -> int:
    """Images per inner step, at most `batch`: `chunk`, or by default one on CPU (the image's
    mask stays in cache) and elsewhere as many as keep the chunk's largest buffer
    (`bytes_per_image` an image) within `_CHUNK_BYTES` (parallelism)."""
    if chunk is None:
        chunk = 1 if jax.default_backend() == "cpu" else max(1, _CHUNK_BYTES // bytes_per_image)
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: must be >= 1")
    return min(chunk, batch)


def _resolve_chunk(
    chunk: int | None, method: str, batch: int, pixels: int, labels: int, units: int
) -> int:
    """Images per inner step of `method` (`images_per_chunk`)."""
    largest = {  # bytes of an image's largest buffer
        "segment": labels * units * 4,  # int32 sums [L, K]
        "compact": pixels * units * 4,  # [pixels, K] mask rows
        "matmul": pixels * labels * 2,  # [pixels, L] multi-hot matrix
    }[method]
    chunk = images_per_chunk(chunk, batch, largest)
    if method == "matmul" and chunk * pixels >= F32_EXACT:
        raise ValueError(
            f"matmul method: {chunk} images x {pixels} pixels per chunk would exceed float32's "
            "exact integer range; use a smaller chunk"
        )
    if method == "compact" and pixels >= F32_EXACT:
        raise ValueError(f"compact method: {pixels} pixels per image exceed float32's exact range")
    return chunk


def batch_counts(
    acts: jax.Array,
    thresholds: jax.Array,
    batch: Mapping[str, jax.Array],
    primary: jax.Array,
    num_categories: int,
    *,
    restriction: str = "presence",
    method: str = "auto",
    chunk: int | None = None,
    slots: int = DEFAULT_SLOTS,
    tie_rule: str = "strict",
    patterns: bool = False,
    unit_block: int = DEFAULT_UNIT_BLOCK,
) -> dict[str, jax.Array]:
    """Exact int32 counts of one batch (pure; jit with `num_categories` and keywords static).

    Args:
      acts: float32 [B, h, w, K] activations (NHWC).
      thresholds: float32 [K]; a pixel is active when its upsampled value is > threshold
        (`tie_rule="strict"`) or >= threshold (`"inclusive"`).
      batch: loader batch with "pixel_labels" int32 [B, P, sh, sw], "image_labels" int32
        [B, Q] and optionally "valid" bool [B]; other keys are ignored.
      primary: int32 [L], the primary category of every label number (-1: none).
      num_categories: C, the number of categories.
      restriction: "presence", "overlap" or "none" (see module docstring).
      method: "segment", "compact", "matmul" or "auto" (see module docstring).
      chunk: images per inner step (None: a default per method).
      slots: labels per image per round of the "compact" method.
      unit_block: units per round of the "segment" method on layers of more units (see
        module docstring).
      tie_rule: "strict" or "inclusive" (see module docstring).
      patterns: also count "pattern_pixels" [K, 2**C]: the sum of |M_k(x)| over the images
        x whose set of categories passing the restriction for unit k is the bit set p
        (bit j: category j). unit_pixels[k, j] is its sum over the p holding bit j; a
        formula's restricted union needs any union of categories (`jaxdissect.formulas`).

    Returns:
      {"intersection": [K, L], "label_pixels": [L], "unit_pixels": [K, C],
       "unit_total": [K], "images": []} (and "pattern_pixels"), all int32; no global state,
      so an engine may call this per device shard and psum the results.
    """
    if restriction not in RESTRICTIONS:
        raise ValueError(f"restriction must be one of {RESTRICTIONS}, got {restriction!r}")
    check_tie_rule(tie_rule)
    acts = jnp.asarray(acts, jnp.float32)
    thresholds = jnp.asarray(thresholds, jnp.float32)
    pix = jnp.asarray(batch["pixel_labels"], jnp.int32)
    img = jnp.asarray(batch["image_labels"], jnp.int32)
    primary = jnp.asarray(primary, jnp.int32)
    b, _, _, k = acts.shape
    _, p, sh, sw = pix.shape
    if pix.shape[0] != b or img.shape[0] != b:
        raise ValueError("acts, pixel_labels and image_labels must share the batch size")
    if img.ndim != 2:
        raise ValueError(f"image_labels must be [B, Q], got shape {img.shape}")
    if thresholds.shape != (k,):
        raise ValueError(f"thresholds must have shape ({k},), got {thresholds.shape}")
    num_labels, c, s = primary.shape[0], num_categories, sh * sw
    check_batch_bound(b, (sh, sw))
    valid = jnp.asarray(batch.get("valid", jnp.ones((b,), bool)), bool)
    method = _resolve_method(method)
    chunk = _resolve_chunk(chunk, method, b, s, num_labels, k)
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    if unit_block < 1:
        raise ValueError(f"unit_block must be >= 1, got {unit_block}")
    check_patterns(num_categories, patterns)

    pix, img = clean_labels(pix, img, valid, num_labels)

    cat_of = primary.at[0].set(-1)  # label 0 never has a category
    img_cat = _category_hits(cat_of[img], c, axes=(1,))  # [B, C]

    per_image_overlap = restriction == "overlap"
    pad = -b % chunk
    acts_c = jnp.pad(acts, ((0, pad), (0, 0), (0, 0), (0, 0)))
    pix_c = jnp.pad(pix, ((0, pad), (0, 0), (0, 0), (0, 0)))
    valid_c = jnp.pad(valid, (0, pad))
    n = (b + pad) // chunk
    xs = (
        acts_c.reshape(n, chunk, *acts.shape[1:]),
        pix_c.reshape(n, chunk, p, sh, sw),
        valid_c.reshape(n, chunk),
    )
    steps = {
        "segment": functools.partial(_segment_step, unit_block=unit_block),
        "compact": functools.partial(_compact_step, slots=slots),
        "matmul": _matmul_step,
    }
    step = functools.partial(
        steps[method],
        thresholds=thresholds,
        tie_rule=tie_rule,
        cat_of=cat_of,
        num_labels=num_labels,
        num_categories=c,
        per_image_overlap=per_image_overlap,
    )
    # Running sums [L, K]; [K, L] where the segment method counts blocks of units (rows).
    by_unit = method == "segment" and k > unit_block
    shape = (k, num_labels) if by_unit else (num_labels, k)
    init = parallel.varying_like(jnp.zeros(shape, jnp.int32), acts, pix, valid, thresholds)
    inter, (unit_img, overlap) = lax.scan(step, init, xs)
    if by_unit:
        inter = inter.T
    unit_img = unit_img.reshape(n * chunk, k)[:b]  # [B, K]: |M_k(x)|

    # Image-level labels: the whole image is the concept mask.
    inter = inter + jax.ops.segment_sum(
        jnp.broadcast_to(unit_img[:, None, :], (*img.shape, k)).reshape(-1, k),
        img.reshape(-1),
        num_segments=num_labels,
        mode=IN_BOUNDS,
    )
    inter = inter.at[0].set(0)

    label_pixels = jnp.zeros((num_labels,), jnp.int32)
    for plane in range(p):
        label_pixels = label_pixels.at[pix[:, plane].reshape(-1)].add(1, mode=IN_BOUNDS)
    label_pixels = label_pixels.at[img.reshape(-1)].add(s, mode=IN_BOUNDS).at[0].set(0)

    unit_total = unit_img.sum(0)
    if restriction == "none":
        unit_pixels = jnp.broadcast_to(unit_total[:, None], (k, c))
        passes = jnp.ones((b, c, 1), jnp.int32)
    elif restriction == "presence":
        pix_cat = _category_hits(cat_of[pix], c, axes=(1, 2, 3))  # [B, C]
        passes = (pix_cat | img_cat).astype(jnp.int32)
        # Broadcast-and-sum rather than an integer dot (tiny; integer dots vary by backend).
        unit_pixels = (passes[:, None, :] * unit_img[:, :, None]).sum(0)
        passes = passes[:, :, None]
    else:
        overlap = overlap.reshape(n * chunk, c, k)[:b]
        passes = (overlap | img_cat[:, :, None]).astype(jnp.int32)  # [B, C, K]
        unit_pixels = (passes * unit_img[:, None, :]).sum(0).T

    out = {
        "intersection": inter.T,
        "label_pixels": label_pixels,
        "unit_pixels": unit_pixels.astype(jnp.int32),
        "unit_total": unit_total,
        "images": valid.sum(dtype=jnp.int32),
    }
    if patterns:
        # Pattern of (image, unit): its passing categories as bits; segment sums by
        # pattern * K + unit.
        bits = (passes << jnp.arange(c, dtype=jnp.int32)[None, :, None]).sum(1)  # [B, K|1]
        ids = jnp.broadcast_to(bits, (b, k)) * k + jnp.arange(k, dtype=jnp.int32)[None, :]
        out["pattern_pixels"] = (
            jax.ops.segment_sum(unit_img.reshape(-1), ids.reshape(-1), num_segments=k << c)
            .reshape(1 << c, k)
            .T
        )
    return out


MAX_PATTERN_CATEGORIES = 12


def check_patterns(num_categories: int, patterns: bool) -> None:
    """Raise unless per-pattern counts (2**C per unit) are affordable."""
    if patterns and num_categories > MAX_PATTERN_CATEGORIES:
        raise ValueError(
            f"patterns=True with {num_categories} categories: 2**{num_categories} counts per "
            f"unit; at most {MAX_PATTERN_CATEGORIES} categories (restrict them)"
        )


def _matrix_dtype():
    """Operand type of the counting matmuls: 0/1 are exact in bfloat16, which matrix units
    take at full rate; CPUs without bf16 units prefer float32."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def _chunk_mask(acts, valid, thresholds, size, tie_rule):
    """Active pixels of a chunk: bool [c, sh, sw, K], nothing for padding examples."""
    return active(upsample(acts, size), thresholds, tie_rule) & valid[:, None, None, None]


def _may_fire(acts, valid, thresholds, tie_rule) -> jax.Array:
    """bool [K]: False only for units with no active pixel in the chunk's upsampled maps.

    Every upsampled value is a convex combination of the map's values, so it is at most
    the map's largest value plus float32 rounding (two two-tap stages: under 8 ulps of the
    largest magnitude; the margin is 2**-20 of it). NaN values are skipped (they make no
    pixel active); a unit whose bound is NaN or infinite is kept.
    """
    c, h, w, k = acts.shape
    row_valid = jnp.broadcast_to(valid[:, None], (c, h * w)).reshape(-1)

    def values(v, a):
        seen = v & ~jnp.isnan(a)
        return jnp.where(seen, a, -jnp.inf), jnp.where(seen, a, jnp.inf)

    hi, lo = unit_reduce.fold_rows(values, ("max", "min"), row_valid, acts.reshape(-1, k))
    bound = hi + jnp.maximum(jnp.abs(hi), jnp.abs(lo)) * 2.0**-20
    return (hi > -jnp.inf) & (active(bound, thresholds, tie_rule) | jnp.isnan(bound))


def _segment_step(inter, xs, *, thresholds, tie_rule, num_labels, unit_block, **kw):
    """Counts of one chunk into `inter`: [L, K] for at most `unit_block` units, else [K, L].
    Where at most a quarter of the units may fire (a layer of many units at a high
    threshold: most images wake few of them), only those are counted, `unit_block` at a
    time (a loop of data-dependent length: exact for any number); units that cannot fire
    count nothing. Else all units at once (a block's rows are shorter, and a scatter pays
    per row)."""
    acts, pix, valid = xs
    c, k = acts.shape[0], acts.shape[-1]

    def every_unit(inter):
        part, out = _segment_counts(acts, pix, valid, thresholds, tie_rule, num_labels, **kw)
        return inter + (part if k <= unit_block else part.T), out

    if k <= unit_block:
        return every_unit(inter)
    fires = _may_fire(acts, valid, thresholds, tie_rule)
    n_fire = fires.sum(dtype=jnp.int32)
    order = jnp.nonzero(fires, size=k + (-k % unit_block), fill_value=0)[0].astype(jnp.int32)

    def firing_units(inter):
        unit_img = jnp.zeros((c, k), jnp.int32)
        overlap = jnp.zeros((c, kw["num_categories"] if kw["per_image_overlap"] else 0, k), bool)
        fresh = parallel.varying_like((unit_img, overlap), acts, pix, valid, thresholds)
        carry = (inter, *fresh)

        def one_block(r, carry):
            inter, unit_img, overlap = carry
            idx = lax.dynamic_slice(order, (r * unit_block,), (unit_block,))
            live = r * unit_block + jnp.arange(unit_block) < n_fire
            # A padding slot (not live) repeats the first unit, with no active pixel: adds 0.
            part, (img_b, ovl_b) = _segment_counts(
                jnp.take(acts, idx, axis=-1),
                pix,
                valid,
                thresholds[idx],
                tie_rule,
                num_labels,
                live=live,
                **kw,
            )
            return (
                inter.at[idx].add(part.T, mode=IN_BOUNDS),
                unit_img.at[:, idx].add(img_b, mode=IN_BOUNDS),
                overlap.at[:, :, idx].max(ovl_b, mode=IN_BOUNDS),
            )

        inter, unit_img, overlap = lax.fori_loop(0, -(-n_fire // unit_block), one_block, carry)
        return inter, (unit_img, overlap)

    return lax.cond(4 * n_fire <= k, firing_units, every_unit, inter)


def _segment_counts(
    acts,
    pix,
    valid,
    thresholds,
    tie_rule,
    num_labels,
    *,
    cat_of,
    num_categories,
    per_image_overlap,
    live=None,
):
    """Scatter-add counts of a chunk: ([L, K] int32 intersections, ([c, K] |M_k(x)|,
    [c, C|0, K] overlap)); units not `live` (bool [K]) count nothing."""
    c, _, sh, sw = pix.shape
    k = acts.shape[-1]
    s = sh * sw
    mask = _chunk_mask(acts, valid, thresholds, (sh, sw), tie_rule)
    if live is not None:
        mask = mask & live
    # Plane 0's sums per image are |M_k(x)| (without planes, the mask's sums).
    part, unit_img = segment_sums(
        mask.reshape(c * s, k),
        pix + (jnp.arange(c, dtype=jnp.int32) * num_labels)[:, None, None, None],
        jnp.uint16 if s <= 0xFFFF else jnp.int32,
        num_labels,
    )
    part = part.at[:, 0].set(0)
    if per_image_overlap:
        hit = (part > 0).astype(jnp.float32)
        onehot = jax.nn.one_hot(cat_of, num_categories, dtype=jnp.float32)  # [L, C]
        overlap = jnp.einsum("blk,lj->bjk", hit, onehot) > 0
    else:
        overlap = jnp.zeros((c, 0, k), bool)
    return part.astype(jnp.int32).sum(0), (unit_img, overlap)


def segment_sums(
    rows: jax.Array, ids: jax.Array, dtype, num_labels: int, *, hold_plane0: bool = False
) -> tuple[jax.Array, jax.Array]:
    """The segment method's sums of a chunk of c images: ([c, L, K] `dtype`, [c, K] int32).

    rows: bool [c * s, K], pixel-major; ids: int32 [c, P, ...] (s pixels after the planes
    axis), image * L + label of each pixel in each plane. The first result sums the rows by
    (image, label) over every plane; segment (image, 0) gathers unlabelled pixels and may
    wrap, for the caller to discard. The second is plane 0's sums per image, which are the
    rows' sums (every pixel lies in exactly one of an image's segments of one plane): read
    from the partial sums, they spare a second pass over the full-size rows. Without planes
    (P = 0: only image-level labels) the first is zeros and the second the rows' sums.

    `dtype`: uint16 where a per-image sum fits (at most the image's pixels: labels are
    deduplicated over the planes, `clean_labels`), else int32. The rows stay in memory as
    1-byte bools, widened inside each scatter: left alone, XLA stores them widened once for
    all planes (memory traffic). `hold_plane0` puts plane 0's sums and the partial sums
    behind a barrier before the other planes' scatters, where XLA would otherwise copy the
    partial sums (`formula_counts`). Timings: benchmarks/README.md.
    """
    c = ids.shape[0]
    k = rows.shape[-1]
    if ids.shape[1] == 0:  # no pixel planes: no label sums; the rows' sums per image
        return jnp.zeros((c, num_labels, k), dtype), rows.reshape(c, -1, k).sum(1, dtype=jnp.int32)
    rows = lax.optimization_barrier(rows)
    part = jnp.zeros((c * num_labels, k), dtype)
    part = part.at[ids[:, 0].reshape(-1)].add(rows.astype(dtype), mode=IN_BOUNDS)
    plane0 = part.reshape(c, num_labels, k).sum(1, dtype=jnp.int32)
    if hold_plane0:
        plane0, part = lax.optimization_barrier((plane0, part))
    for plane in range(1, ids.shape[1]):
        part = part.at[ids[:, plane].reshape(-1)].add(rows.astype(dtype), mode=IN_BOUNDS)
    return part.reshape(c, num_labels, k), plane0


def _compact_step(
    inter, xs, *, thresholds, tie_rule, cat_of, num_labels, num_categories, per_image_overlap, slots
):
    acts, pix, valid = xs
    c, planes, sh, sw = pix.shape
    k = acts.shape[-1]
    s = sh * sw
    dtype = _matrix_dtype()
    mask = _chunk_mask(acts, valid, thresholds, (sh, sw), tie_rule)
    unit_img = mask.reshape(c, s, k).sum(1, dtype=jnp.int32)
    overlap = parallel.varying_like(
        jnp.zeros((c, num_categories if per_image_overlap else 0, k), bool), acts, pix, valid
    )
    if planes == 0:
        return inter, (unit_img, overlap)
    rows = mask.reshape(c, s, k).astype(dtype)
    ids = jnp.moveaxis(pix, 1, -1).reshape(c, s, planes)
    image = jnp.arange(c, dtype=jnp.int32)[:, None]
    # Which labels each image holds, and each one's rank among them (its slot, in rounds).
    present = (
        jnp.zeros((c, num_labels), bool).at[image, pix.reshape(c, -1)].set(True, mode=IN_BOUNDS)
    )
    present = present.at[:, 0].set(False)
    rank = jnp.cumsum(present, axis=1, dtype=jnp.int32) - 1
    rounds = (present.sum(1, dtype=jnp.int32).max() + slots - 1) // slots
    label_ids = jnp.broadcast_to(jnp.arange(num_labels, dtype=jnp.int32), (c, num_labels))
    onehot_cat = jax.nn.one_hot(cat_of, num_categories, dtype=jnp.float32)  # [L, C]

    def one_round(r, carry):
        inter, overlap = carry
        slot = rank - r * slots
        slot = jnp.where(present & (slot >= 0) & (slot < slots), slot, slots)  # slots: dropped
        table = jnp.zeros((c, slots), jnp.int32).at[image, slot].set(label_ids, mode="drop")
        # Deduplicated planes and distinct labels per slot: a 0/1 multi-hot.
        hot = (ids[:, :, :, None] == table[:, None, None, :]).any(2) & (table[:, None, :] > 0)
        part = jnp.einsum(
            "bsj,bsk->bjk", hot.astype(dtype), rows, preferred_element_type=jnp.float32
        ).astype(jnp.int32)  # [c, S, K]
        inter = inter.at[table.reshape(-1)].add(part.reshape(c * slots, k), mode=IN_BOUNDS)
        if per_image_overlap:
            hit = (part > 0).astype(jnp.float32)
            overlap = overlap | (jnp.einsum("bjk,bjq->bqk", hit, onehot_cat[table]) > 0)
        return inter, overlap

    inter, overlap = lax.fori_loop(0, rounds, one_round, (inter, overlap))
    return inter, (unit_img, overlap)


def _matmul_step(
    inter, xs, *, thresholds, tie_rule, cat_of, num_labels, num_categories, per_image_overlap
):
    acts, pix, valid = xs
    c, planes, sh, sw = pix.shape
    k = acts.shape[-1]
    s = sh * sw
    dtype = _matrix_dtype()
    mask = _chunk_mask(acts, valid, thresholds, (sh, sw), tie_rule)
    rows = mask.reshape(c * s, k).astype(dtype)
    unit_img = mask.reshape(c, s, k).sum(1, dtype=jnp.int32)
    ids = jnp.moveaxis(pix, 1, -1).reshape(c * s, planes)
    # Deduplicated planes: each (pixel, label > 0) is hit once, so the sum is multi-hot.
    multihot = jax.nn.one_hot(ids, num_labels, dtype=dtype).sum(1)
    part = lax.dot_general(
        multihot, rows, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    part = part.astype(jnp.int32).at[0].set(0)
    if per_image_overlap:
        cats = jax.nn.one_hot(cat_of[ids], num_categories, dtype=dtype).sum(1)
        overlap = (
            jnp.einsum(
                "bsj,bsk->bjk",
                cats.reshape(c, s, num_categories),
                rows.reshape(c, s, k),
                preferred_element_type=jnp.float32,
            )
            > 0
        )
    else:
        overlap = jnp.zeros((c, 0, k), bool)
    return inter + part, (unit_img, overlap)


# --------------------------------------------------------------------------- running tally


@flax.struct.dataclass
class TallyState:
    """Running exact counts of one layer (see module docstring for their meaning)."""

    intersection: WideCount  # [K, L]
    label_pixels: WideCount  # [L]
    unit_pixels: WideCount  # [K, C]
    unit_total: WideCount  # [K]
    images: jax.Array  # int32 []
    pattern_pixels: WideCount | None = None  # [K, 2**C] (`batch_counts`'s `patterns`)

    def count_keys(self) -> tuple[str, ...]:
        return COUNT_KEYS + (() if self.pattern_pixels is None else ("pattern_pixels",))


def tally_init(num_units: int, labels: LabelSpace, *, patterns: bool = False) -> TallyState:
    """Zero tally for `num_units` units over the labels and categories of `labels`
    (`patterns`: with the counts by restriction pattern, see `batch_counts`)."""
    nl, nc = labels.num_labels, labels.num_categories
    check_patterns(nc, patterns)
    return TallyState(
        intersection=WideCount.zeros((num_units, nl)),
        label_pixels=WideCount.zeros((nl,)),
        unit_pixels=WideCount.zeros((num_units, nc)),
        unit_total=WideCount.zeros((num_units,)),
        images=parallel.filled((), 0, np.int32),
        pattern_pixels=WideCount.zeros((num_units, 1 << nc)) if patterns else None,
    )


def tally_add(state: TallyState, counts: Mapping[str, jax.Array]) -> TallyState:
    """Add one batch's counts (from `batch_counts`, possibly psummed; each < 2**30)."""
    return state.replace(
        **{key: getattr(state, key).add(counts[key]) for key in state.count_keys()},
        images=state.images + jnp.asarray(counts["images"], jnp.int32),
    )


def tally_merge(a: TallyState, b: TallyState) -> TallyState:
    """Sum of two tallies (associative and commutative: shards, resumed runs)."""
    return a.replace(
        **{key: getattr(a, key).merge(getattr(b, key)) for key in a.count_keys()},
        images=a.images + b.images,
    )


def tally_to_numpy(state: TallyState) -> dict[str, np.ndarray]:
    """Exact int64 counts on the host: the counted arrays and a 0-d "images"."""
    out = {key: getattr(state, key).to_numpy() for key in state.count_keys()}
    out["images"] = np.asarray(state.images).astype(np.int64)
    return out


def check_batch_bound(batch_size: int, size: tuple[int, int], devices: int = 1) -> None:
    """Raise if psummed per-batch counts of `devices` shards could reach 2**30."""
    if batch_size * devices * math.prod(size) >= MAX_BATCH_COUNT:
        raise ValueError(
            f"{devices} x {batch_size} images of {size[0]}x{size[1]} pixels per step can "
            "overflow the exact int32 per-step counts; use smaller batches"
        )

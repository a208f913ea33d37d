"""Slow, literal numpy reference of Network Dissection's tally, IoU and unit labels.

Written straight from the definitions in `jaxdissect/tally.py` and `jaxdissect/results.py`,
with per-image, per-unit, per-label loops and without calling the package's fast code (only
`LabelSpace` is shared). Thresholds are inputs: computing quantiles is another module's job.

- Upsampling: half-pixel centres with edge clamping, rows then columns, each output value
  a[i0] + f * (a[i1] - a[i0]) in float32, the source position an exact fraction of
  integers and f its fractional part (rounded to float64, then float32).
- Mask: S > T (tie_rule "strict") or S >= T ("inclusive").
- Tie statistics of a unit, over the values its threshold was computed on (raw or upsampled
  maps): minimum, maximum, how many equal T; dead (minimum == maximum), saturated (more than
  the quantile's share at T and T == maximum), tied (more than that share at T otherwise).
- Concept mask of label c in image x: pixels where any plane equals c, or the whole image
  when c is an image-level label of x; label 0 and numbers >= num_labels never count.
- Union restriction for category j: "presence" (x has some label of primary category j),
  "overlap" (some concept of primary category j meets the mask), "none" (always).
- IoU = I / (U[primary] + G - I), 0 where the denominator is 0 or the label has no
  primary category. Best label of a category: highest IoU, ties to the lowest label
  number; best category: highest best IoU, ties to the last category. A unit is
  interpretable when its best IoU > iou_threshold. A unit has no label (-1, no category)
  when it has no active pixel, when its IoU is 0 for every concept, or when it is dead.
"""

from __future__ import annotations

import math

import numpy as np

from jaxdissect.labelspace import LabelSpace


def reference_tap(i: int, n_out: int, n_in: int) -> tuple[int, int, np.float32]:
    """Output i's taps along one axis: the source position (i + 0.5) * n_in / n_out - 0.5,
    clamped to [0, n_in - 1], as the exact fraction num / den of Python integers."""
    num, den = (2 * i + 1) * n_in - n_out, 2 * n_out
    num = min(max(num, 0), (n_in - 1) * den)
    lo = num // den
    hi = min(lo + 1, n_in - 1)
    return lo, hi, np.float32((num - lo * den) / den)


def reference_upsample(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of one map a [h, w] to `size` from the half-pixel formula."""
    h, w = a.shape
    sh, sw = size
    a = a.astype(np.float32)

    rows = np.zeros((sh, w), np.float32)
    for y in range(sh):
        lo, hi, f = reference_tap(y, sh, h)
        for x in range(w):
            rows[y, x] = a[lo, x] + f * (a[hi, x] - a[lo, x])
    out = np.zeros((sh, sw), np.float32)
    for x in range(sw):
        lo, hi, f = reference_tap(x, sw, w)
        for y in range(sh):
            out[y, x] = rows[y, lo] + f * (rows[y, hi] - rows[y, lo])
    return out


def reference_counts(
    acts: np.ndarray,
    thresholds: np.ndarray,
    pixel_labels: np.ndarray,
    image_labels: np.ndarray,
    labels: LabelSpace,
    restriction: str = "presence",
    valid: np.ndarray | None = None,
    tie_rule: str = "strict",
    patterns: bool = False,
) -> dict[str, np.ndarray]:
    """Counts of the tally (int64) for activations [N, h, w, K] and labels of N images
    (`patterns`: and pattern_pixels [K, 2**C], |M_k(x)| summed by the bit set of the
    categories x passes for unit k)."""
    n, _, _, k = acts.shape
    nl, nc = labels.num_labels, labels.num_categories
    sh, sw = pixel_labels.shape[2:]
    primary = labels.primary
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    inter = np.zeros((k, nl), np.int64)
    label_pixels = np.zeros(nl, np.int64)
    unit_pixels = np.zeros((k, nc), np.int64)
    unit_total = np.zeros(k, np.int64)
    pattern_pixels = np.zeros((k, 2**nc), np.int64)
    for x in range(n):
        if not valid[x]:
            continue
        # Concept masks of this image.
        concepts: dict[int, np.ndarray] = {}
        for plane in pixel_labels[x]:
            for c in np.unique(plane):
                c = int(c)
                if 1 <= c < nl:
                    concepts[c] = concepts.get(c, np.zeros((sh, sw), bool)) | (plane == c)
        for c in image_labels[x]:
            c = int(c)
            if 1 <= c < nl:
                concepts[c] = np.ones((sh, sw), bool)
        for c, region in concepts.items():
            label_pixels[c] += int(region.sum())
        present = {int(primary[c]) for c in concepts if primary[c] >= 0}
        for unit in range(k):
            up = reference_upsample(acts[x, :, :, unit], (sh, sw))
            if tie_rule == "strict":
                active = up > thresholds[unit]
            elif tie_rule == "inclusive":
                active = up >= thresholds[unit]
            else:
                raise ValueError(tie_rule)
            size = int(active.sum())
            unit_total[unit] += size
            overlapping = set()
            for c, region in concepts.items():
                both = int((active & region).sum())
                inter[unit, c] += both
                if both > 0 and primary[c] >= 0:
                    overlapping.add(int(primary[c]))
            bits = 0
            for j in range(nc):
                if restriction == "none":
                    counts_for_j = True
                elif restriction == "presence":
                    counts_for_j = j in present
                elif restriction == "overlap":
                    counts_for_j = j in overlapping
                else:
                    raise ValueError(restriction)
                if counts_for_j:
                    unit_pixels[unit, j] += size
                    bits += 2**j
            pattern_pixels[unit, bits] += size
    out = {
        "intersection": inter,
        "label_pixels": label_pixels,
        "unit_pixels": unit_pixels,
        "unit_total": unit_total,
        "images": np.int64(valid.sum()),
    }
    if patterns:
        out["pattern_pixels"] = pattern_pixels
    return out


def reference_ties(
    maps: np.ndarray,
    thresholds: np.ndarray,
    quantile: float,
    valid: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Tie statistics and state of every unit of maps [N, h, w, K], value by value."""
    n, h, w, k = maps.shape
    valid = np.ones(n, bool) if valid is None else np.asarray(valid, bool)
    out: dict[str, list] = {"minimum": [], "maximum": [], "at_threshold": [], "state": []}
    values = int(valid.sum()) * h * w
    for unit in range(k):
        low, high, at = math.inf, -math.inf, 0
        for x in range(n):
            if not valid[x]:
                continue
            for y in range(h):
                for z in range(w):
                    v = float(maps[x, y, z, unit])
                    low, high = min(low, v), max(high, v)
                    at += v == float(thresholds[unit])
        heavy = at > quantile * values
        if low == high:
            state = "dead"
        elif heavy and float(thresholds[unit]) == high:
            state = "saturated"
        elif heavy:
            state = "tied"
        else:
            state = ""
        for key, value in zip(out, (low, high, at, state), strict=True):
            out[key].append(value)
    return {
        "minimum": np.asarray(out["minimum"], np.float32),
        "maximum": np.asarray(out["maximum"], np.float32),
        "at_threshold": np.asarray(out["at_threshold"], np.int64),
        "values": np.int64(values),
        "state": np.asarray(out["state"], object),
    }


def reference_iou(counts: dict[str, np.ndarray], labels: LabelSpace) -> np.ndarray:
    """IoU [K, L] from counts, label by label."""
    inter = counts["intersection"]
    k, nl = inter.shape
    iou = np.zeros((k, nl), np.float64)
    for unit in range(k):
        for c in range(1, nl):
            j = int(labels.primary[c])
            if j < 0:
                continue
            union = counts["unit_pixels"][unit, j] + counts["label_pixels"][c] - inter[unit, c]
            if union > 0:
                iou[unit, c] = inter[unit, c] / union
    return iou


def reference_unit_labels(
    iou: np.ndarray,
    labels: LabelSpace,
    iou_threshold: float = 0.04,
    categories: tuple[str, ...] | None = None,
    unit_total: np.ndarray | None = None,
    states: np.ndarray | None = None,
) -> list[dict]:
    """Per unit: best label per category and overall, with plain loops.

    With `unit_total` (active pixels) and `states` (tie states), units without active pixels
    or dead get no label, overall or per category; so do units whose IoU is 0 for every
    concept.
    """
    # Scored in the label space's order, whatever order they are named in.
    categories = [c for c in labels.categories if categories is None or c in categories]
    units = []
    for unit in range(iou.shape[0]):
        per_category = {}
        for name in categories:
            j = labels.categories.index(name)
            best, best_iou = -1, 0.0
            for c in range(iou.shape[1]):
                if labels.primary[c] == j and (best < 0 or iou[unit, c] > best_iou):
                    best, best_iou = c, float(iou[unit, c])
            # A category whose concepts all miss the unit (IoU 0) has no best label.
            per_category[name] = (best if best_iou > 0 else -1, best_iou)
        best_cat = None
        for name in categories:  # a later category as good replaces the best: ties -> last
            if best_cat is None or per_category[name][1] >= per_category[best_cat][1]:
                best_cat = name
        label, score = per_category[best_cat]
        silent = unit_total is not None and unit_total[unit] == 0
        dead = states is not None and states[unit] == "dead"
        if silent or dead or score == 0.0:
            label, score, best_cat = -1, 0.0, None
            # Nor a best label in any category: a unit that cannot fire has no label at all.
            per_category = {name: (-1, 0.0) for name in categories}
        units.append(
            {
                "unit": unit,
                "category": best_cat,
                "label": label,
                "iou": score,
                "interpretable": score > iou_threshold,
                "per_category": per_category,
            }
        )
    return units


def reference_top_images(acts: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices int [T, K], values float32 [T, K]) of each unit's `top` images by the
    maximum of its map [N, h, w, K], ties to the lower index; slots past N hold -1, -inf."""
    n, k = acts.shape[0], acts.shape[-1]
    indices = np.full((top, k), -1, np.int64)
    values = np.full((top, k), -np.inf, np.float32)
    for unit in range(k):
        peaks = [float(acts[i, ..., unit].max()) for i in range(n)]
        order = sorted(range(n), key=lambda i: (-peaks[i], i))[:top]
        for t, i in enumerate(order):
            indices[t, unit], values[t, unit] = i, peaks[i]
    return indices, values


def reference_dissect(
    acts: np.ndarray,
    thresholds: np.ndarray,
    pixel_labels: np.ndarray,
    image_labels: np.ndarray,
    labels: LabelSpace,
    restriction: str = "presence",
    iou_threshold: float = 0.04,
    valid: np.ndarray | None = None,
    categories: tuple[str, ...] | None = None,
    tie_rule: str = "strict",
    quantile: float = 0.005,
) -> dict:
    """Counts, IoU, tie statistics of the raw maps, per-unit labels and the layer summary."""
    counts = reference_counts(
        acts, thresholds, pixel_labels, image_labels, labels, restriction, valid, tie_rule
    )
    iou = reference_iou(counts, labels)
    ties = reference_ties(acts, thresholds, quantile, valid)
    units = reference_unit_labels(
        iou, labels, iou_threshold, categories, counts["unit_total"], ties["state"]
    )
    detectors: dict[int, int] = {}
    for u in units:
        if u["interpretable"]:
            detectors[u["label"]] = detectors.get(u["label"], 0) + 1
    return {
        "counts": counts,
        "iou": iou,
        "ties": ties,
        "units": units,
        "interpretable_units": sum(u["interpretable"] for u in units),
        "unique_detectors": len(detectors),
        "detector_counts": detectors,
    }


def random_probe(
    seed: int = 0,
    *,
    num_images: int = 11,
    act_size: tuple[int, int] = (4, 6),
    seg_size: tuple[int, int] = (16, 12),
    num_units: int = 7,
    planes: int = 3,
    image_slots: int = 2,
    num_labels: int = 300,
    dyadic: bool = True,
) -> dict:
    """Small random probe set covering the tally's corner cases.

    Five categories (color, object, part: pixel; scene, texture: image-level), label
    numbers up to num_labels - 1 (>= 256) with some unused (-1), images without labels,
    image-level 0 padding, labels repeated at a pixel in two planes, labels in a plane
    other than their category's, an image-level label also painted in a pixel plane,
    out-of-range numbers, a dead unit (zero maps, threshold 0), a ReLU unit with
    threshold 0, thresholds equal to attainable upsampled values, and (dyadic, 6 units or more)
    a last unit clipped at 0.5 with threshold 0.5.

    With dyadic=True activations are multiples of 1/16 and the sizes scale by 4 and 2,
    so every upsampled value is exact in float32 and ties with thresholds are real ties.
    """
    rng = np.random.default_rng(seed)
    categories = ("color", "object", "part", "scene", "texture")
    image_level = (False, False, False, True, True)
    primary = rng.integers(0, len(categories), num_labels).astype(np.int32)
    primary[0] = -1
    primary[rng.choice(np.arange(1, num_labels), num_labels // 10, replace=False)] = -1
    names = tuple(["-"] + [f"label{i}" for i in range(1, num_labels)])
    labels = LabelSpace(categories, names, primary, image_level)
    pixel_ids = np.flatnonzero(np.isin(primary, [0, 1, 2]))
    image_ids = np.flatnonzero(np.isin(primary, [3, 4]))

    n, k = num_images, num_units
    h, w = act_size
    sh, sw = seg_size
    acts = np.maximum(rng.normal(size=(n, h, w, k)), 0).astype(np.float32)
    if dyadic:
        acts = np.round(acts * 16) / 16
    acts[..., 0] = 0.0  # dead unit
    thresholds = rng.uniform(0.2, 1.0, k).astype(np.float32)
    thresholds[0] = 0.0
    thresholds[1] = 0.0  # ReLU unit with threshold 0: active wherever the map is > 0
    # Thresholds equal to values the maps take (strictness matters for these).
    for unit in range(2, min(k, 4)):
        thresholds[unit] = acts[0, 0, 0, unit] if dyadic else thresholds[unit]
    if dyadic and k >= 6:
        # The last unit is clipped at a cap (ReLU6-like), its threshold at the cap: saturated.
        acts[..., -1] = np.minimum(acts[..., -1], 0.5)
        thresholds[-1] = 0.5

    # Blocky pixel labels: 4x4 blocks, plane p mostly empty for p > 0.
    blocks = rng.choice(pixel_ids, size=(n, planes, sh // 4, sw // 4))
    blocks[:, 1:][rng.random(blocks[:, 1:].shape) < 0.6] = 0
    blocks[:, 0][rng.random(blocks[:, 0].shape) < 0.2] = 0
    pixel_labels = np.repeat(np.repeat(blocks, 4, axis=2), 4, axis=3).astype(np.int32)
    if planes > 1:
        same = rng.random((n, sh, sw)) < 0.3
        pixel_labels[:, 1][same] = pixel_labels[:, 0][same]  # repeats across planes
    pixel_labels[rng.random(pixel_labels.shape) < 0.01] = num_labels + 5  # out of range
    pixel_labels[rng.random(pixel_labels.shape) < 0.01] = -3
    image_labels = rng.choice(image_ids, size=(n, image_slots)).astype(np.int32)
    image_labels[rng.random(image_labels.shape) < 0.3] = 0
    if image_slots > 1:
        image_labels[3, 1] = image_labels[3, 0]  # a repeated image-level label
    image_labels[4, 0] = pixel_ids[0]  # a pixel-category label given image-level
    pixel_labels[4, 0, :4, :4] = image_labels[4, 0]
    pixel_labels[5, -1, 2:9, 3:7] = pixel_ids[-1]
    pixel_labels[2] = 0  # an image without any label
    image_labels[2] = 0
    return {
        "labels": labels,
        "acts": acts,
        "thresholds": thresholds,
        "pixel_labels": pixel_labels,
        "image_labels": image_labels,
    }

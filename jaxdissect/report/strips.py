"""Per-unit strips of top images, dimmed outside the unit's mask."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image

from jaxdissect import store
from jaxdissect.tie_rule import active

# The Lite release's report keeps 20% of the image outside the unit's mask.
DIM_OUTSIDE = 0.2
OUTLINE_COLOR = (255, 214, 0)


def save_png(path: str | os.PathLike[str], array: ArrayLike) -> Path:
    """Save a uint8 [H, W], [H, W, 3] or [H, W, 4] array as a PNG, atomically."""
    arr = np.asarray(array)
    if arr.dtype != np.uint8:
        raise ValueError(f"save_png wants uint8, got {arr.dtype}")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"save_png wants [H, W], [H, W, 3] or [H, W, 4], got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"cannot save an empty image {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return store.write_bytes(path, buf.getvalue())


def _mask_outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (image borders count as inside)."""
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~interior


def dimmed(image: np.ndarray) -> np.ndarray:
    """`image * 0.2` truncated to uint8: how a pixel outside the mask is shown."""
    return (np.asarray(image).astype(np.float64) * DIM_OUTSIDE).astype(np.uint8)


def dim_outside(image: np.ndarray, mask: np.ndarray, dim: np.ndarray | None = None) -> np.ndarray:
    """`image * (0.2 + 0.8 * mask)` truncated to uint8, as the Lite release does.

    dim: `dimmed(image)`, where the caller keeps it for several masks of one image.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"dim_outside wants a uint8 image, got {image.dtype}")
    dim = dimmed(image) if dim is None else np.asarray(dim, np.uint8)
    # In uint8, dim + (image - dim) * mask is exact (modular) and twice np.where's speed.
    return dim + (image - dim) * np.asarray(mask, np.uint8)[..., None]


def unit_strip(
    images: ArrayLike,
    maps: ArrayLike,
    threshold: float,
    *,
    gap: int = 3,
    valid: ArrayLike | None = None,
    outline: bool = False,
    background: int = 255,
    tie_rule: str = "strict",
) -> np.ndarray:
    """The top images side by side, each dimmed outside the unit's mask.

    The mask is `map > threshold` (`tie_rule="strict"`) or `map >= threshold` (`"inclusive"`),
    the tally's rule (`jaxdissect.tie_rule`).

    images: uint8 [T, H, W, 3]; maps: [T, H, W], the unit's activation already
    upsampled to image size. `valid` ([T] bool, e.g. `indices >= 0` from
    topimages) marks filled slots; empty ones are skipped. `outline` draws the
    mask's boundary in yellow (off by default so pixels match the Lite report).
    Returns uint8 [H, n*W + (n-1)*gap, 3]; one blank tile if no slot is filled.
    """
    imgs = np.asarray(images)
    m = np.asarray(maps)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[3] != 3:
        raise ValueError(f"images must be uint8 [T, H, W, 3], got {imgs.dtype} {imgs.shape}")
    if m.shape != imgs.shape[:3]:
        raise ValueError(f"maps {m.shape} must match images {imgs.shape[:3]}")
    masks = active(m, threshold, tie_rule)  # NaN: inactive
    tiles = dim_outside(imgs, masks)
    if outline:
        for tile, mask in zip(tiles, masks, strict=True):
            tile[_mask_outline(mask)] = OUTLINE_COLOR
    return tile_strip(tiles, gap=gap, valid=valid, background=background)


def tile_strip(
    tiles: ArrayLike, *, gap: int = 3, valid: ArrayLike | None = None, background: int = 255
) -> np.ndarray:
    """The tiles (uint8 [T, H, W, 3]) side by side, `gap` pixels of `background` apart;
    slots with `valid` False ([T] bool) are left out. One blank tile if none is left."""
    tiles = np.asarray(tiles)
    if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[3] != 3:
        raise ValueError(f"tiles must be uint8 [T, H, W, 3], got {tiles.dtype} {tiles.shape}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    t, h, w, _ = tiles.shape
    keep: Sequence[int]
    if valid is None:
        keep = range(t)
    else:
        v = np.asarray(valid, dtype=bool)
        if v.shape != (t,):
            raise ValueError(f"valid must be [{t}], got {v.shape}")
        keep = np.flatnonzero(v).tolist()
    n = len(keep)
    width = w if n == 0 else n * w + (n - 1) * gap
    strip = np.full((h, width, 3), background, np.uint8)
    for slot, i in enumerate(keep):
        x = slot * (w + gap)
        strip[:, x : x + w] = tiles[i]
    return strip

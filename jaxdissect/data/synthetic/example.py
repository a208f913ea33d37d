"""One example: image `index` of a data set rendered with its label planes, before writing."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from types import MappingProxyType

import numpy as np

from jaxdissect.data.synthetic.colours import color_plane
from jaxdissect.data.synthetic.painter import Painter
from jaxdissect.data.synthetic.recipes import RECIPE_P, RECIPES, surface_image, texture_image
from jaxdissect.data.synthetic.scene_rule import object_areas, scene_for
from jaxdissect.data.synthetic.vocabulary import LABEL_NUMBERS

# Sources of images (folder under images/) and their share of the data set.
SOURCES = ("scenes", "textures", "surfaces")
_SOURCE_P = (0.70, 0.20, 0.10)


# Share of scene images whose materials are annotated (OpenSurfaces covers few).
_MATERIAL_ANNOTATED_P = 0.6


@dataclasses.dataclass(frozen=True)
class Example:
    """One rendered image with its labels, before it is written.

    Attributes:
      source: folder under images/ ("scenes", "textures" or "surfaces").
      recipe: the scene recipe used ("" outside scene images).
      image: uint8 [S, S, 3].
      planes: pixel category -> int32 [sh, sw] planes (only categories with data).
      image_labels: image-level category -> label numbers (only categories with data).
    """

    source: str
    recipe: str
    image: np.ndarray
    planes: Mapping[str, tuple[np.ndarray, ...]]
    image_labels: Mapping[str, tuple[int, ...]]


def nearest_index(n_out: int, n_in: int) -> np.ndarray:
    # The source pixel PIL's NEAREST resize picks: floor((i + 0.5) * n_in / n_out).
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


MIN_SIZE = 16  # the smallest image side the drawers render


def seg_size(size: int) -> int:
    """Segmentation side for image side `size` (Broden: 224 -> 112, 227 -> 113, 384 -> 192)."""
    return size // 2


def _image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 0, index]))


def render(index: int, *, seed: int = 0, size: int = 224) -> Example:
    """Renders image `index` of the data set of `seed` at `size` x `size`."""
    if size < MIN_SIZE:
        raise ValueError(f"size={size}: must be >= {MIN_SIZE}")
    rng = _image_rng(seed, index)
    source = SOURCES[int(rng.choice(len(SOURCES), p=_SOURCE_P))]
    recipe = ""
    image_labels: dict[str, tuple[int, ...]] = {}
    if source == "scenes":
        weights = np.array(list(RECIPE_P.values()))
        recipe = tuple(RECIPE_P)[int(rng.choice(len(weights), p=weights / weights.sum()))]
        pt = Painter(size, rng, annotate_materials=rng.random() < _MATERIAL_ANNOTATED_P)
        textures = RECIPES[recipe](pt)
    elif source == "textures":
        pt = Painter(size, rng, annotate_materials=False)
        textures = texture_image(pt)
    else:
        pt = Painter(size, rng, annotate_materials=True)
        textures = surface_image(pt)
    image = pt.finish()

    s2 = seg_size(size)
    idx = nearest_index(s2, size)
    sub = np.ix_(idx, idx)
    planes: dict[str, tuple[np.ndarray, ...]] = {
        "color": (color_plane(image, (s2, s2)).astype(np.int32),)
    }
    if source == "scenes":
        obj = pt.obj[sub]
        planes["object"] = (obj,)
        parts = tuple(p[sub] for p in pt.part)
        parts = parts if parts[1].any() else parts[:1]
        if parts[0].any():
            planes["part"] = parts
        image_labels["scene"] = (LABEL_NUMBERS[scene_for(object_areas(obj))],)
    if pt.annotate_materials:
        mat = pt.mat[sub]
        if mat.any():
            planes["material"] = (mat,)
    if textures:
        image_labels["texture"] = tuple(LABEL_NUMBERS[t] for t in textures)
    return Example(source, recipe, image, MappingProxyType(planes), MappingProxyType(image_labels))

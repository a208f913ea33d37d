"""A synthetic Broden: procedurally drawn scenes written in the real Broden on-disk format.

`generate(out_dir, num_images=...)` writes a `broden1_S`-like folder (index.csv,
category.csv, label.csv, c_<cat>.csv, images/...) that any Broden reader opens
as it opens the real release. The content has structure that a vision network
can learn and that dissection can find:

- scene images (like ADE20K): street, park, forest, beach, bedroom ... Objects
  (car, person, tree, house ...) are drawn with perspective and occlusion,
  with their parts (wheel, head, roof ...) and parts of parts (eye, hubcap,
  knob ...) on extra planes, and materials as surface appearance (wood grain,
  brick, metal, fabric, glass ...). The scene label is a function of the
  visible objects (`scene_for`), so a scene classifier has a reason to grow
  object detectors. Indoor walls carry a wallpaper pattern: the image's texture.
- texture images (like DTD): a full-frame pattern (striped, dotted,
  chequered ...) at varied scale, orientation and colour; texture + colour only.
- surface images (like OpenSurfaces): a few material patches; material + colour.

Colour labels are computed per pixel from the rendered colour (after lighting
and noise) by the nearest of the 11 Broden colour prototypes in CIELAB, so
every pixel has one. Frequencies are long-tailed, some images lack some
categories (empty cells), several labels are >= 256 (green channel used), and
`water`, `door` and `lamp` each belong to two categories, as in the release.

Label numbers are fixed, whatever the number of images: colours 1-11, objects
from 12, then a gap, parts from 250 (so that part and material labels straddle
256), materials, scenes, textures. Labels absent from a small run are still
listed, with frequency 0. Every image is rendered from its own RNG derived from
(seed, image index): the output bytes depend on neither the worker count nor
the order of work.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

import numpy as np
from PIL import Image

# ---------------------------------------------------------------------------
# Vocabulary

CATEGORIES = ("color", "object", "part", "material", "scene", "texture")
IMAGE_LEVEL = frozenset({"scene", "texture"})


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


COLOR_NAMES = _words("black blue brown grey green orange pink purple red white yellow")
COLORS = tuple(f"{c}-c" for c in COLOR_NAMES)
OBJECTS = _words(
    "sky grass road sidewalk tree building car person wall floor water house mountain sand"
    " signboard streetlight fence ceiling door bed sofa table chair lamp painting windowpane"
    " bus bicycle dog bench ball boat flower rock"
)
# door and lamp are also objects: they keep their object numbers.
PARTS = _words(
    "head leg torso arm trunk window wheel leaves roof door eye mouth hair headlight hubcap"
    " pole lamp chimney knob back seat top cushion headboard pillow shade base frame hull sail"
    " tail"
)
# water is also an object.
MATERIALS = _words(
    "wood painted glass metal fabric brick foliage stone tile skin water wallpaper carpet"
    " plastic leather paper"
)
SCENES = _words(
    "street-s park-s forest-s highway-s yard-s bedroom-s living_room-s beach-s skyscraper-s"
    " field-s lake-s mountain-s dining_room-s corridor-s playground-s harbor-s desert-s"
)
TEXTURES = _words(
    "striped dotted chequered zigzagged grid banded cracked crosshatched blotchy honeycombed"
    " spiralled marbled"
)
# First number of the part block: leaves numbers 46..249 unused so that part
# and material labels straddle 256 (e.g. window = 255, wheel = 256 = R 0, G 1).
PART_BASE = 250
SYNONYMS = MappingProxyType(
    {
        "person": ("individual", "someone"),
        "car": ("auto", "automobile"),
        "building": ("edifice",),
        "sofa": ("couch",),
        "signboard": ("sign",),
        "fabric": ("cloth",),
        "grey-c": ("gray-c",),
    }
)


def _number_labels() -> tuple[Mapping[str, int], Mapping[str, tuple[str, ...]]]:
    numbers: dict[str, int] = {}
    cats: dict[str, list[str]] = {}
    nxt = 1
    blocks = zip(CATEGORIES, (COLORS, OBJECTS, PARTS, MATERIALS, SCENES, TEXTURES), strict=True)
    for cat, names in blocks:
        if cat == "part":
            nxt = max(nxt, PART_BASE)
        for name in names:
            cats.setdefault(name, []).append(cat)
            if name not in numbers:
                numbers[name] = nxt
                nxt += 1
    return MappingProxyType(numbers), MappingProxyType({k: tuple(v) for k, v in cats.items()})


# Label name -> global number, and label name -> its categories (vocabulary order).
LABEL_NUMBERS, LABEL_CATEGORIES = _number_labels()
CATEGORY_LABELS = MappingProxyType(
    dict(zip(CATEGORIES, (COLORS, OBJECTS, PARTS, MATERIALS, SCENES, TEXTURES), strict=True))
)

# Sources of images (folder under images/) and their share of the data set.
SOURCES = ("scenes", "textures", "surfaces")
_SOURCE_P = (0.70, 0.20, 0.10)
# Long-tailed scene frequencies (recipes; the label itself comes from `scene_for`).
_RECIPE_P = MappingProxyType(
    {
        "street": 0.20,
        "park": 0.11,
        "forest": 0.09,
        "highway": 0.07,
        "yard": 0.07,
        "bedroom": 0.07,
        "living_room": 0.06,
        "beach": 0.05,
        "skyscraper": 0.05,
        "field": 0.04,
        "lake": 0.04,
        "mountain": 0.035,
        "dining_room": 0.03,
        "corridor": 0.025,
        "playground": 0.02,
        "harbor": 0.015,
        "desert": 0.015,
    }
)
# Share of scene images whose materials are annotated (OpenSurfaces covers few).
_MATERIAL_ANNOTATED_P = 0.6
TRAIN_FRACTION = 0.7
JPEG_QUALITY = 90
# Sizes for a dataset small enough to build inside other tests (~1 s).
TINY = MappingProxyType({"num_images": 32, "size": 64})
GENERATOR_VERSION = 1

# ---------------------------------------------------------------------------
# Colour naming


def _zipf(n: int, s: float = 1.0) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB [..., 3] -> float32 CIELAB (D65) [..., 3]."""
    lin = _SRGB_LINEAR[np.asarray(rgb, dtype=np.uint8)]
    xyz = lin @ _RGB_TO_XYZ_T
    t = xyz / _D65
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    )
    return lab.astype(np.float32)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


_v = np.arange(256, dtype=np.float64) / 255
_SRGB_LINEAR = _readonly(
    np.where(_v <= 0.04045, _v / 12.92, ((_v + 0.055) / 1.055) ** 2.4).astype(np.float32)
)
_RGB_TO_XYZ_T = _readonly(
    np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
        dtype=np.float32,
    ).T.copy()
)
_D65 = _readonly(np.array([0.9505, 1.0, 1.089], dtype=np.float32))
del _v

# Several sRGB prototypes per colour name (light and dark variants), so that a
# dark grey is grey and not black only because grey's single prototype is mid-grey.
_COLOR_PROTOTYPES = MappingProxyType(
    {
        "black": ((12, 12, 12), (40, 38, 40)),
        "blue": ((40, 70, 200), (100, 150, 225), (25, 40, 110), (140, 185, 235)),
        "brown": ((120, 70, 35), (155, 105, 65), (80, 50, 28), (180, 140, 100)),
        "grey": ((128, 128, 128), (88, 88, 92), (168, 168, 168), (200, 200, 205)),
        "green": ((40, 150, 50), (25, 90, 35), (120, 190, 80), (85, 120, 45)),
        "orange": ((240, 130, 20), (215, 100, 25), (250, 170, 70)),
        "pink": ((245, 160, 190), (220, 100, 150), (250, 200, 210)),
        "purple": ((120, 50, 150), (170, 100, 190), (75, 30, 95)),
        "red": ((200, 25, 30), (150, 20, 25), (230, 60, 60)),
        "white": ((250, 250, 250), (232, 232, 236)),
        "yellow": ((245, 225, 50), (200, 190, 60), (250, 240, 140)),
    }
)
_PROTO_LAB = _readonly(
    _srgb_to_lab(np.array([p for n in COLOR_NAMES for p in _COLOR_PROTOTYPES[n]], np.uint8))
)
_PROTO_INDEX = _readonly(
    np.array([i for i, n in enumerate(COLOR_NAMES) for _ in _COLOR_PROTOTYPES[n]], np.int32)
)


def color_names(rgb: np.ndarray) -> np.ndarray:
    """Broden colour of each pixel: index into `COLOR_NAMES` of the nearest prototype in CIELAB.

    Args:
      rgb: uint8 [..., 3] sRGB pixels.

    Returns:
      int32 [...]: 0..10; the label number is that + 1 (`LABEL_NUMBERS["black-c"] == 1`).
    """
    lab = _srgb_to_lab(rgb)
    # Per channel over [..., prototypes]: elementwise, so exactly reproducible (no BLAS).
    d = (lab[..., 0, None] - _PROTO_LAB[:, 0]) ** 2
    d += (lab[..., 1, None] - _PROTO_LAB[:, 1]) ** 2
    d += (lab[..., 2, None] - _PROTO_LAB[:, 2]) ** 2
    return _PROTO_INDEX[np.argmin(d, axis=-1)]


def color_plane(image: np.ndarray, seg_size: tuple[int, int]) -> np.ndarray:
    """Colour label numbers at segmentation size: box-filter the image, then name each pixel."""
    sh, sw = seg_size
    small = np.asarray(Image.fromarray(image).resize((sw, sh), Image.Resampling.BOX))
    return color_names(small) + LABEL_NUMBERS[COLORS[0]]


# ---------------------------------------------------------------------------
# Scenes from objects


def scene_for(object_areas: Mapping[str, float]) -> str:
    """The scene label of an image, from the fraction of the image each visible object covers.

    Indoor scenes are told apart by their furniture, outdoor ones by water,
    roads, buildings, sand, mountains, trees and balls, in this order.
    """

    def has(name: str, above: float = 0.0) -> bool:
        return object_areas.get(name, 0.0) > above

    if has("floor"):
        if has("bed"):
            return "bedroom-s"
        if has("sofa"):
            return "living_room-s"
        if has("table"):
            return "dining_room-s"
        return "corridor-s"
    if has("water"):
        if has("boat") and (has("building") or has("house")):
            return "harbor-s"
        return "beach-s" if has("sand") else "lake-s"
    if has("road"):
        return "street-s" if has("sidewalk") else "highway-s"
    if has("building"):
        return "skyscraper-s"
    if has("house"):
        return "yard-s"
    if has("sand"):
        return "desert-s"
    if has("mountain", 0.12):
        return "mountain-s"
    if has("tree", 0.3):
        return "forest-s"
    if has("ball"):
        return "playground-s"
    if has("tree"):
        return "park-s"
    return "field-s"


# ---------------------------------------------------------------------------
# Shapes: (bbox in [0, 1] image coordinates, inside(X, Y) -> bool); X is [1, w]
# and Y is [h, 1] (pixel centres of the bbox window), so masks broadcast.

Shape = tuple[tuple[float, float, float, float], Callable[[np.ndarray, np.ndarray], np.ndarray]]
Colour = np.ndarray | Callable[[np.ndarray, np.ndarray], np.ndarray]
_TAU = 2 * math.pi


def _rect(x0: float, y0: float, x1: float, y1: float) -> Shape:
    def inside(xs, ys):
        return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)

    return (x0, y0, x1, y1), inside


def _rounded(x0: float, y0: float, x1: float, y1: float, r: float) -> Shape:
    cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 - r, (y1 - y0) / 2 - r

    def inside(X, Y):
        dx = np.maximum(np.abs(X - cx) - hx, 0)
        dy = np.maximum(np.abs(Y - cy) - hy, 0)
        return dx * dx + dy * dy <= r * r

    return (x0, y0, x1, y1), inside


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> Shape:
    return (
        cx - rx,
        cy - ry,
        cx + rx,
        cy + ry,
    ), lambda X, Y: ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1.0


def _ring(cx: float, cy: float, ro: float, ri: float) -> Shape:
    def inside(X, Y):
        d = (X - cx) ** 2 + (Y - cy) ** 2
        return (d <= ro * ro) & (d >= ri * ri)

    return (cx - ro, cy - ro, cx + ro, cy + ro), inside


def _capsule(xa: float, ya: float, xb: float, yb: float, r: float) -> Shape:
    dx, dy = xb - xa, yb - ya
    n2 = max(dx * dx + dy * dy, 1e-12)

    def inside(X, Y):
        t = np.clip(((X - xa) * dx + (Y - ya) * dy) / n2, 0, 1)
        return (X - xa - t * dx) ** 2 + (Y - ya - t * dy) ** 2 <= r * r

    return (min(xa, xb) - r, min(ya, yb) - r, max(xa, xb) + r, max(ya, yb) + r), inside


def _polygon(points: Iterable[tuple[float, float]]) -> Shape:
    """A convex polygon, vertices in either orientation."""
    pts = [(float(x), float(y)) for x, y in points]
    edges = list(zip(pts, pts[1:] + pts[:1], strict=True))

    def inside(X, Y):
        pos = neg = True
        for (xa, ya), (xb, yb) in edges:
            c = (xb - xa) * (Y - ya) - (yb - ya) * (X - xa)
            pos = pos & (c >= 0)
            neg = neg & (c <= 0)
        return pos | neg

    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys)), inside


def _masked(shape: Shape, cond: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Shape:
    bbox, inside = shape
    return bbox, lambda X, Y: inside(X, Y) & cond(X, Y)


# ---------------------------------------------------------------------------
# Colours and surfaces

_PALETTE = MappingProxyType(
    {
        "red": (0.80, 0.10, 0.10),
        "dark_red": (0.50, 0.08, 0.08),
        "orange": (0.93, 0.50, 0.10),
        "yellow": (0.95, 0.85, 0.15),
        "green": (0.20, 0.60, 0.20),
        "dark_green": (0.10, 0.33, 0.12),
        "light_green": (0.50, 0.76, 0.30),
        "olive": (0.40, 0.45, 0.18),
        "blue": (0.15, 0.30, 0.78),
        "light_blue": (0.50, 0.70, 0.92),
        "navy": (0.08, 0.12, 0.40),
        "teal": (0.10, 0.50, 0.55),
        "purple": (0.45, 0.20, 0.60),
        "lilac": (0.68, 0.45, 0.78),
        "pink": (0.96, 0.62, 0.74),
        "magenta": (0.85, 0.35, 0.60),
        "brown": (0.45, 0.28, 0.14),
        "tan": (0.70, 0.55, 0.35),
        "dark_brown": (0.28, 0.17, 0.09),
        "beige": (0.86, 0.78, 0.62),
        "white": (0.95, 0.95, 0.94),
        "light_grey": (0.76, 0.76, 0.76),
        "grey": (0.50, 0.50, 0.51),
        "dark_grey": (0.25, 0.25, 0.26),
        "black": (0.07, 0.07, 0.08),
        "skin_light": (0.96, 0.78, 0.66),
        "skin_mid": (0.80, 0.58, 0.42),
        "skin_dark": (0.42, 0.27, 0.18),
    }
)
_BRIGHT = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "teal", "magenta")


def _frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)


def _hash2(i: np.ndarray, j: np.ndarray, salt: float) -> np.ndarray:
    """Deterministic pseudo-random values in [0, 1) per integer cell (i, j)."""
    return _frac(np.sin(i * 12.9898 + j * 78.233 + salt) * 43758.5453)


def _waves(rng: np.random.Generator, n: int, kmin: float, kmax: float) -> Callable:
    """Smooth noise: a sum of n random plane waves with spatial frequency in [kmin, kmax]."""
    k = rng.uniform(kmin, kmax, n) * _TAU
    th = rng.uniform(0, _TAU, n)
    ph = rng.uniform(0, _TAU, n)
    kx, ky = (k * np.cos(th)).astype(np.float32), (k * np.sin(th)).astype(np.float32)
    ph = ph.astype(np.float32)
    scale = np.float32(1 / math.sqrt(n))

    def noise(X, Y):
        acc = 0.0
        for a, b, c in zip(kx, ky, ph, strict=True):
            acc = acc + np.sin(a * X + b * Y + c)
        return acc * scale

    return noise


def _mix(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float32)[..., None]
    return a * (1 - w) + b * w


def _lit(base: np.ndarray, g: np.ndarray) -> np.ndarray:
    return base * np.asarray(g, np.float32)[..., None]


class _Painter:
    """Draws one image: colour, object, part (two planes) and material label maps."""

    def __init__(self, size: int, rng: np.random.Generator, annotate_materials: bool):
        self.size = size
        self.rng = rng
        self.annotate_materials = annotate_materials
        self.img = np.zeros((size, size, 3), np.float32)
        self.obj = np.zeros((size, size), np.int32)
        self.part = np.zeros((2, size, size), np.int32)
        self.mat = np.zeros((size, size), np.int32)
        self.grid = (np.arange(size, dtype=np.float32) + 0.5) / size

    # -- colours
    def col(self, name: str, jitter: float = 0.06) -> np.ndarray:
        base = np.asarray(_PALETTE[name], np.float32)
        j = self.rng.uniform(1 - jitter, 1 + jitter, 3).astype(np.float32)
        return np.clip(base * j, 0, 1)

    def pick(self, names: tuple[str, ...], p: Iterable[float] | None = None) -> str:
        if p is None:
            return names[int(self.rng.integers(len(names)))]
        cum = np.cumsum(np.asarray(list(p), np.float64))
        return names[
            min(int(np.searchsorted(cum, self.rng.random() * cum[-1], "right")), len(names) - 1)
        ]

    # -- drawing
    def paint(
        self,
        shape: Shape,
        colour: Colour,
        obj: str | None = None,
        part: str | None = None,
        part2: str | None = None,
        mat: str | None = None,
    ) -> None:
        """Paints `shape`: every label plane is overwritten under it (occlusion)."""
        (x0, y0, x1, y1), inside = shape
        s = self.size
        j0, j1 = max(math.floor(x0 * s), 0), min(math.ceil(x1 * s), s)
        i0, i1 = max(math.floor(y0 * s), 0), min(math.ceil(y1 * s), s)
        if j0 >= j1 or i0 >= i1:
            return
        X, Y = self.grid[None, j0:j1], self.grid[i0:i1, None]
        h, w = i1 - i0, j1 - j0
        m = np.broadcast_to(inside(X, Y), (h, w))
        if not m.any():
            return
        rgb = colour(X, Y) if callable(colour) else np.asarray(colour, np.float32)
        win = np.s_[i0:i1, j0:j1]
        np.copyto(self.img[win], rgb, where=m[..., None])
        if not self.annotate_materials:
            mat = None
        planes = ((self.obj, obj), (self.part[0], part), (self.part[1], part2), (self.mat, mat))
        for plane, name in planes:
            np.copyto(plane[win], LABEL_NUMBERS[name] if name else 0, where=m)

    # -- surfaces: callables (X, Y) -> rgb
    def surface(self, kind: str, base: np.ndarray | None = None) -> Colour:
        """Appearance of a material (or ground) kind; `base` overrides its usual colour."""
        r = self.rng
        if base is None:
            base = self.col(
                {
                    "wood": self.pick(("brown", "tan", "dark_brown"), (3, 2, 1)),
                    "brick": self.pick(("dark_red", "brown", "red"), (3, 2, 1)),
                    "metal": self.pick(("grey", "light_grey", "dark_grey")),
                    "fabric": self.pick(_BRIGHT),
                    "glass": self.pick(("light_blue", "teal", "dark_grey", "navy"), (4, 1, 2, 1)),
                    "stone": self.pick(("grey", "light_grey", "beige", "dark_grey")),
                    "tile": self.pick(("white", "beige", "light_grey", "teal", "tan")),
                    "plastic": self.pick(_BRIGHT),
                    "foliage": self.pick(("green", "dark_green", "olive", "light_green")),
                    "skin": self.pick(("skin_light", "skin_mid", "skin_dark")),
                    "water": self.pick(("blue", "teal", "navy", "light_blue"), (3, 2, 1, 1)),
                    "carpet": self.pick(("red", "blue", "grey", "beige", "purple", "green")),
                    "leather": self.pick(("black", "dark_brown", "brown")),
                    "paper": self.pick(("white", "beige", "yellow")),
                    "painted": self.pick(("white", "beige", "light_grey", "yellow", "pink")),
                    "grass": self.pick(
                        ("green", "light_green", "olive", "dark_green"), (4, 2, 1, 1)
                    ),
                    "sand": self.pick(("beige", "tan", "yellow"), (4, 2, 1)),
                    "asphalt": self.pick(("dark_grey", "grey", "black"), (4, 2, 1)),
                }.get(kind, "grey")
            )
        th = r.uniform(0, math.pi)
        c, s = np.float32(math.cos(th)), np.float32(math.sin(th))
        low = _waves(r, 3, 1.0, 4.0)
        if kind == "wood":
            axis = r.choice((0.0, math.pi / 2)) + r.uniform(-0.2, 0.2)
            c, s = np.float32(math.cos(axis)), np.float32(math.sin(axis))
            freq = np.float32(r.uniform(40, 110) * _TAU)
            grain = _waves(r, 3, 2.0, 7.0)
            return lambda X, Y: _lit(
                base, 0.72 + 0.28 * np.sin((X * c + Y * s) * freq + 2.5 * grain(X, Y)) ** 2
            )
        if kind == "brick":
            bw = r.uniform(0.035, 0.07)
            bh = bw * r.uniform(0.38, 0.5)
            mortar = self.col(self.pick(("light_grey", "beige", "grey")))
            salt = r.uniform(0, 100)

            def brick(X, Y):
                row = np.floor(Y / bh)
                xo = X / bw + 0.5 * (row % 2)
                col = np.floor(xo)
                joint = (_frac(Y / bh) < 0.14) | (_frac(xo) < 0.07)
                tone = 0.8 + 0.35 * _hash2(row, col, salt)
                return np.where(joint[..., None], mortar, _lit(base, tone))

            return brick
        if kind == "metal":
            w = r.uniform(0.05, 0.2)
            off = r.uniform(0, 1)
            sheen = np.float32(r.uniform(0.2, 0.45))

            def metal(X, Y):
                t = X * c + Y * s
                band = np.exp(-(((_frac(t / (4 * w) + off) - 0.5) / 0.12) ** 2))
                shade = _lit(base, 0.82 + 0.18 * np.cos(t * 9.0))
                return shade + sheen * band[..., None] * (1 - shade)

            return metal
        if kind == "fabric":
            k = np.float32(r.uniform(120, 220) * _TAU)
            return lambda X, Y: _lit(
                base, 0.9 + 0.06 * np.sin(X * k) * np.sin(Y * k) + 0.06 * low(X, Y)
            )
        if kind == "glass":
            w = r.uniform(0.03, 0.08)
            off = r.uniform(0, 1)

            def glass(X, Y):
                t = (X - Y) / w + off
                streak = (_frac(t / 3) < 0.25).astype(np.float32)
                g = _lit(base, 0.85 + 0.1 * low(X, Y))
                return g + 0.35 * streak[..., None] * (1 - g)

            return glass
        if kind in ("stone", "sand", "asphalt", "carpet"):
            amp = {"stone": 0.22, "sand": 0.12, "asphalt": 0.16, "carpet": 0.25}[kind]
            mid = _waves(r, 4, 6.0, 20.0)

            def speckled(X, Y):
                h, w = np.broadcast_shapes(X.shape, Y.shape)
                sp = r.random((h, w), dtype=np.float32) - 0.5
                return _lit(base, 0.9 + 0.08 * mid(X, Y) + amp * sp)

            return speckled
        if kind == "tile":
            p = r.uniform(0.04, 0.1)
            grout = self.col(self.pick(("light_grey", "grey", "white")))
            salt = r.uniform(0, 100)

            def tile(X, Y):
                i, j = np.floor(Y / p), np.floor(X / p)
                joint = (_frac(Y / p) < 0.08) | (_frac(X / p) < 0.08)
                return np.where(
                    joint[..., None], grout, _lit(base, 0.9 + 0.15 * _hash2(i, j, salt))
                )

            return tile
        if kind == "plastic":
            return lambda X, Y: _plastic(base, X, Y)
        if kind in ("foliage", "grass"):
            if kind == "grass":
                # Short vertical blades: fine in x, stretched in y.
                blades = _waves(r, 3, 40.0, 80.0)
                stretch = np.float32(0.15)
                return lambda X, Y: _lit(
                    base, 0.88 + 0.07 * blades(X, Y * stretch) + 0.07 * low(X, Y)
                )
            blobs = _waves(r, 5, 15.0, 40.0)
            return lambda X, Y: _lit(base, 0.8 + 0.22 * np.tanh(blobs(X, Y)))
        if kind == "water":
            k = np.float32(r.uniform(60, 140) * _TAU)
            wig = _waves(r, 2, 2.0, 6.0)

            def water(X, Y):
                rip = np.sin(Y * k + 4 * wig(X, Y))
                g = _lit(base, 0.88 + 0.1 * low(X, Y))
                return g + 0.3 * (rip > 0.93)[..., None] * (1 - g)

            return water
        if kind == "leather":
            fine = _waves(r, 4, 40.0, 90.0)
            return lambda X, Y: _lit(base, 0.85 + 0.1 * np.abs(fine(X, Y)) + 0.05 * low(X, Y))
        if kind == "wallpaper":
            raise ValueError("wallpaper surfaces come from `pattern_surface`")
        # painted, skin, paper and anything plain: nearly flat.
        return lambda X, Y: _lit(base, 0.95 + 0.05 * low(X, Y))

    def pattern_surface(self, family: str) -> Colour:
        """A two-colour (or smooth) surface drawn with texture `family`."""
        bg_name = self.pick(tuple(_PALETTE))
        fg_name = self.pick(tuple(n for n in _PALETTE if n != bg_name))
        bg, fg = self.col(bg_name), self.col(fg_name)
        pat = _pattern(family, self.rng)
        return lambda X, Y: _mix(bg, fg, pat(X, Y))

    # -- output
    def finish(self) -> np.ndarray:
        """Applies lighting and sensor noise; returns the uint8 image."""
        r, s = self.rng, self.size
        gx, gy = r.uniform(-0.25, 0.25, 2)
        exposure = r.uniform(0.88, 1.08)
        X, Y = self.grid[None, :], self.grid[:, None]
        light = (exposure * (1 + gx * (X - 0.5) + gy * (Y - 0.5))).astype(np.float32)
        sigma = np.float32(r.uniform(0.01, 0.03))
        noise = r.standard_normal((s, s, 3), dtype=np.float32) * sigma
        img = self.img * light[..., None] + noise
        return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _plastic(base: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    # A soft highlight at the upper left of the painted window: reads as a glossy curved surface.
    x0, x1, y0, y1 = X.min(), X.max(), Y.min(), Y.max()
    hx, hy = x0 + 0.35 * (x1 - x0), y0 + 0.3 * (y1 - y0)
    rad = max(x1 - x0, y1 - y0, 1e-3) * 0.35
    g = np.exp(-((X - hx) ** 2 + (Y - hy) ** 2) / (rad * rad))
    d = np.clip(
        1 - 0.35 * ((X - (x0 + x1) / 2) ** 2 + (Y - (y0 + y1) / 2) ** 2) / (rad * rad * 4), 0.6, 1
    )
    shade = _lit(base, d)
    return shade + 0.45 * g[..., None] * (1 - shade)


def _pattern(family: str, rng: np.random.Generator) -> Callable:
    """Texture family -> weight(X, Y) in [0, 1] at random scale, orientation and phase."""
    th = rng.uniform(0, math.pi)
    c, s = np.float32(math.cos(th)), np.float32(math.sin(th))
    p = np.float32(rng.uniform(0.03, 0.11))
    ox, oy = (np.float32(v) for v in rng.uniform(0, 1, 2))

    def uv(X, Y):
        return (X - ox) * c + (Y - oy) * s, -(X - ox) * s + (Y - oy) * c

    f32 = np.float32
    if family == "striped":
        duty = rng.uniform(0.3, 0.6)
        return lambda X, Y: (_frac(uv(X, Y)[0] / p) < duty).astype(f32)
    if family == "dotted":
        rad2 = rng.uniform(0.15, 0.3) ** 2

        def dotted(X, Y):
            u, v = uv(X, Y)
            return (((_frac(u / p) - 0.5) ** 2 + (_frac(v / p) - 0.5) ** 2) < rad2).astype(f32)

        return dotted
    if family == "chequered":

        def chequered(X, Y):
            u, v = uv(X, Y)
            return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(f32)

        return chequered
    if family == "zigzagged":
        amp = rng.uniform(0.5, 1.2)
        q = p * rng.uniform(1.0, 2.0)
        duty = rng.uniform(0.35, 0.55)

        def zigzag(X, Y):
            u, v = uv(X, Y)
            tri = np.abs(_frac(u / q) - 0.5) * 2
            return (_frac(v / p + amp * tri) < duty).astype(f32)

        return zigzag
    if family == "grid":
        lw = rng.uniform(0.1, 0.22)

        def grid(X, Y):
            u, v = uv(X, Y)
            return ((_frac(u / p) < lw) | (_frac(v / p) < lw)).astype(f32)

        return grid
    if family == "crosshatched":
        q = p * 0.5
        lw = rng.uniform(0.15, 0.3)

        def hatch(X, Y):
            u, v = uv(X, Y)
            a, b = (u + v) * f32(0.7071), (u - v) * f32(0.7071)
            return ((_frac(a / q) < lw) | (_frac(b / q) < lw)).astype(f32)

        return hatch
    if family == "banded":
        q = p * rng.uniform(2.5, 4.0)
        return lambda X, Y: (
            0.5
            + 0.5
            * np.sin(uv(X, Y)[0] * (_TAU / q) + 0.8 * np.sin(uv(X, Y)[0] * (_TAU / (2.3 * q))))
        )
    if family == "cracked":
        k = int(np.clip(0.6 / (p * p), 10, 48))
        pts = rng.uniform(-0.1, 1.1, (k, 2)).astype(f32)
        width = f32(rng.uniform(0.004, 0.009))

        def cracked(X, Y):
            d = (X[..., None] - pts[:, 0]) ** 2 + (Y[..., None] - pts[:, 1]) ** 2
            two = np.sqrt(np.partition(d, 1, axis=-1)[..., :2])
            return ((two[..., 1] - two[..., 0]) < width).astype(f32)

        return cracked
    if family == "blotchy":
        blobs = _waves(rng, 6, 0.4 / p, 0.9 / p)
        t = rng.uniform(-0.3, 0.3)
        return lambda X, Y: (blobs(X, Y) > t).astype(f32)
    if family == "honeycombed":
        size = p * 1.3
        bw = rng.uniform(0.1, 0.22)

        def honeycomb(X, Y):
            u, v = uv(X, Y)
            q = (u * f32(math.sqrt(3) / 3) - v / 3) / size
            rr = (v * f32(2 / 3)) / size
            cx, cz = q, rr
            cy = -cx - cz
            rx, ry, rz = np.round(cx), np.round(cy), np.round(cz)
            dx, dy, dz = np.abs(rx - cx), np.abs(ry - cy), np.abs(rz - cz)
            fix_x = (dx > dy) & (dx > dz)
            fix_z = ~fix_x & (dz >= dy)
            rx = np.where(fix_x, -ry - rz, rx)
            rz = np.where(fix_z, -rx - ry, rz)
            hx = size * f32(math.sqrt(3)) * (rx + rz / 2)
            hy = size * f32(1.5) * rz
            lx, ly = u - hx, v - hy
            d = np.maximum(
                np.abs(lx), np.maximum(np.abs(0.5 * lx + 0.866 * ly), np.abs(0.5 * lx - 0.866 * ly))
            )
            return (d > size * f32(0.866) * (1 - bw)).astype(f32)

        return honeycomb
    if family == "spiralled":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        arms = int(rng.integers(1, 4))

        def spiral(X, Y):
            r = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2)
            a = np.arctan2(Y - cy, X - cx)
            return (_frac(r / p + arms * a / _TAU) < 0.5).astype(f32)

        return spiral
    if family == "marbled":
        warp = _waves(rng, 4, 1.5, 5.0)

        def marbled(X, Y):
            u, _ = uv(X, Y)
            return (np.abs(np.sin(u / p * f32(math.pi / 3) + 2.5 * warp(X, Y))) < 0.18).astype(f32)

        return marbled
    raise ValueError(f"unknown texture family {family!r}")


# ---------------------------------------------------------------------------
# Objects. Each draws at horizontal centre x with its base (ground contact) at
# yb and u = its perspective scale (about the height of a person there).


def _draw_sorted(items: list[tuple[float, Callable[[], None]]]) -> None:
    # Far objects (base higher in the image) first, so nearer ones occlude them.
    for _, draw in sorted(items, key=lambda t: t[0]):
        draw()


def _car(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 0.45 * u
    w = h * pt.rng.uniform(2.1, 2.5)
    d = 1 if pt.rng.random() < 0.5 else -1
    body = pt.col(
        pt.pick(
            (
                "red",
                "blue",
                "white",
                "black",
                "grey",
                "light_grey",
                "yellow",
                "green",
                "orange",
                "navy",
            ),
            (5, 4, 5, 4, 4, 3, 1, 1, 0.5, 1),
        )
    )
    metal = pt.surface("metal", body)
    cab = [
        (x - d * 0.32 * w, yb - 0.58 * h),
        (x + d * 0.28 * w, yb - 0.58 * h),
        (x + d * 0.12 * w, yb - h),
        (x - d * 0.22 * w, yb - h),
    ]
    pt.paint(_polygon(cab), metal, obj="car", mat="metal")
    pt.paint(
        _rounded(x - w / 2, yb - 0.64 * h, x + w / 2, yb - 0.16 * h, 0.1 * h),
        metal,
        obj="car",
        mat="metal",
    )
    glass = pt.surface("glass")
    ins = 0.08 * h
    mid = x - d * 0.05 * w
    for xa, xb in ((x - d * 0.3 * w, mid - d * 0.01 * w), (mid + d * 0.01 * w, x + d * 0.25 * w)):
        lo, hi = min(xa, xb), max(xa, xb)
        win = _masked(_rect(lo, yb - h + ins, hi, yb - 0.6 * h), _polygon(cab)[1])
        pt.paint(win, glass, obj="car", part="window", mat="glass")
    dl, dr = sorted((x - d * 0.12 * w, x + d * 0.12 * w))
    pt.paint(
        _rect(dl, yb - 0.58 * h, dr, yb - 0.2 * h),
        pt.surface("metal", body * 0.85),
        obj="car",
        part="door",
        mat="metal",
    )
    kx = dr - 0.03 * w if d > 0 else dl + 0.03 * w
    pt.paint(
        _rect(kx - 0.02 * w, yb - 0.48 * h, kx + 0.02 * w, yb - 0.45 * h),
        pt.col("dark_grey"),
        obj="car",
        part="door",
        part2="knob",
        mat="metal",
    )
    pt.paint(
        _ellipse(x + d * 0.47 * w, yb - 0.5 * h, 0.035 * w, 0.06 * h),
        pt.col(pt.pick(("white", "yellow"))),
        obj="car",
        part="headlight",
        mat="glass",
    )
    r = 0.2 * h
    tyre = pt.col(pt.pick(("black", "dark_grey"), (3, 1)))
    for wx in (x - 0.3 * w, x + 0.3 * w):
        pt.paint(_ellipse(wx, yb - r, r, r), tyre, obj="car", part="wheel")
        pt.paint(
            _ellipse(wx, yb - r, 0.5 * r, 0.5 * r),
            pt.surface("metal", pt.col("light_grey")),
            obj="car",
            part="wheel",
            part2="hubcap",
            mat="metal",
        )


def _bus(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 0.9 * u
    w = h * pt.rng.uniform(2.6, 3.4)
    d = 1 if pt.rng.random() < 0.5 else -1
    body = pt.col(pt.pick(("yellow", "red", "blue", "white", "green"), (3, 3, 2, 2, 1)))
    pt.paint(
        _rounded(x - w / 2, yb - h, x + w / 2, yb - 0.12 * h, 0.06 * h),
        pt.surface("metal", body),
        obj="bus",
        mat="metal",
    )
    glass = pt.surface("glass")
    n = int(pt.rng.integers(4, 7))
    span = 0.8 * w
    step = span / n
    for k in range(n):
        x0 = x - span / 2 + k * step
        pt.paint(
            _rect(x0 + 0.08 * step, yb - 0.88 * h, x0 + 0.92 * step, yb - 0.58 * h),
            glass,
            obj="bus",
            part="window",
            mat="glass",
        )
    dx = x + d * 0.4 * w
    pt.paint(
        _rect(dx - 0.06 * w, yb - 0.9 * h, dx + 0.06 * w, yb - 0.14 * h),
        pt.surface("glass", pt.col("dark_grey")),
        obj="bus",
        part="door",
        mat="glass",
    )
    r = 0.14 * h
    for wx in (x - 0.32 * w, x + 0.28 * w):
        pt.paint(_ellipse(wx, yb - r, r, r), pt.col("black"), obj="bus", part="wheel")
        pt.paint(
            _ellipse(wx, yb - r, 0.5 * r, 0.5 * r),
            pt.col("light_grey"),
            obj="bus",
            part="wheel",
            part2="hubcap",
            mat="metal",
        )


def _bicycle(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 0.5 * u
    r = 0.36 * h
    frame = pt.surface("metal", pt.col(pt.pick(("red", "blue", "black", "green", "white"))))
    lw = 0.035 * h
    xa, xb = x - 0.62 * h, x + 0.62 * h
    cy = yb - r
    top = yb - 0.85 * h
    for seg in (
        (xa, cy, x, cy),
        (x, cy, x - 0.15 * h, top),
        (x - 0.15 * h, top, xb - 0.15 * h, top),
        (xb - 0.15 * h, top, xb, cy),
        (xa, cy, x - 0.15 * h, top),
        (xb - 0.15 * h, top, xb - 0.05 * h, yb - h),
    ):
        pt.paint(_capsule(*seg, lw), frame, obj="bicycle", mat="metal")
    for wx in (xa, xb):
        pt.paint(_ring(wx, cy, r, r - 2.5 * lw), pt.col("black"), obj="bicycle", part="wheel")


def _person(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = u * pt.rng.uniform(0.85, 1.05)
    skin_name = pt.pick(("skin_light", "skin_mid", "skin_dark"))
    skin = pt.surface("skin", pt.col(skin_name, 0.04))
    shirt_base = pt.col(pt.pick(_BRIGHT + ("black", "grey", "navy", "brown")))
    shirt = pt.surface(pt.pick(("fabric", "leather"), (6, 1)), shirt_base)
    pants = pt.surface(
        "fabric", pt.col(pt.pick(("navy", "black", "dark_grey", "brown", "blue", "tan", "beige")))
    )
    stride = pt.rng.uniform(0.0, 0.08) * h
    lw = 0.055 * h
    hip = yb - 0.48 * h
    for dx in (-1, 1):
        pt.paint(
            _capsule(x + dx * 0.05 * h, hip, x + dx * (0.05 * h + stride), yb - lw, lw),
            pants,
            obj="person",
            part="leg",
            mat="fabric",
        )
    pt.paint(
        _rounded(x - 0.13 * h, yb - 0.81 * h, x + 0.13 * h, yb - 0.45 * h, 0.05 * h),
        shirt,
        obj="person",
        part="torso",
        mat="fabric",
    )
    bare = pt.rng.random() < 0.4
    for dx in (-1, 1):
        swing = pt.rng.uniform(-0.08, 0.12) * h
        pt.paint(
            _capsule(
                x + dx * 0.14 * h,
                yb - 0.77 * h,
                x + dx * (0.19 * h) + swing,
                yb - 0.5 * h,
                0.04 * h,
            ),
            skin if bare else shirt,
            obj="person",
            part="arm",
            mat="skin" if bare else "fabric",
        )
    hy = yb - 0.9 * h
    pt.paint(_ellipse(x, hy, 0.075 * h, 0.09 * h), skin, obj="person", part="head", mat="skin")
    hair = pt.col(pt.pick(("black", "dark_brown", "brown", "yellow", "grey")))
    pt.paint(
        _ellipse(x, hy - 0.045 * h, 0.08 * h, 0.055 * h),
        hair,
        obj="person",
        part="head",
        part2="hair",
    )
    eye = pt.col("black")
    for dx in (-1, 1):
        pt.paint(
            _ellipse(x + dx * 0.03 * h, hy + 0.005 * h, 0.012 * h, 0.012 * h),
            eye,
            obj="person",
            part="head",
            part2="eye",
        )
    pt.paint(
        _ellipse(x, hy + 0.045 * h, 0.025 * h, 0.009 * h),
        pt.col("dark_red"),
        obj="person",
        part="head",
        part2="mouth",
    )


def _dog(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 0.42 * u
    d = 1 if pt.rng.random() < 0.5 else -1
    fur = pt.surface(
        "fabric", pt.col(pt.pick(("brown", "tan", "black", "white", "dark_brown", "beige")))
    )
    lw = 0.06 * h
    for dx in (-0.3, -0.18, 0.2, 0.32):
        pt.paint(
            _capsule(x + dx * h, yb - 0.55 * h, x + dx * h, yb - lw, lw), fur, obj="dog", part="leg"
        )
    pt.paint(
        _capsule(x - d * 0.4 * h, yb - 0.62 * h, x - d * 0.62 * h, yb - 0.85 * h, 0.04 * h),
        fur,
        obj="dog",
        part="tail",
    )
    pt.paint(_ellipse(x, yb - 0.6 * h, 0.45 * h, 0.18 * h), fur, obj="dog", part="torso")
    hx, hy = x + d * 0.45 * h, yb - 0.85 * h
    pt.paint(_ellipse(hx, hy, 0.16 * h, 0.14 * h), fur, obj="dog", part="head")
    pt.paint(
        _ellipse(hx + d * 0.06 * h, hy - 0.03 * h, 0.025 * h, 0.025 * h),
        pt.col("black"),
        obj="dog",
        part="head",
        part2="eye",
    )


def _tree(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = u * pt.rng.uniform(1.6, 2.6)
    bark = pt.surface("wood", pt.col(pt.pick(("dark_brown", "brown", "grey"), (3, 2, 1))))
    season = pt.pick(
        ("green", "dark_green", "light_green", "olive", "orange", "yellow", "red"),
        (8, 5, 3, 2, 1, 1, 0.5),
    )
    leaves = pt.surface("foliage", pt.col(season))
    tw = h * pt.rng.uniform(0.05, 0.08)
    pt.paint(_rect(x - tw, yb - 0.6 * h, x + tw, yb), bark, obj="tree", part="trunk", mat="wood")
    if pt.rng.random() < 0.3 and season in ("green", "dark_green", "olive"):
        for k in range(3):
            y0 = yb - h + k * 0.22 * h
            wk = (0.16 + 0.09 * k) * h
            pt.paint(
                _polygon([(x, y0), (x + wk, y0 + 0.35 * h), (x - wk, y0 + 0.35 * h)]),
                leaves,
                obj="tree",
                part="leaves",
                mat="foliage",
            )
        return
    for _ in range(int(pt.rng.integers(3, 6))):
        cx = x + pt.rng.uniform(-0.18, 0.18) * h
        cy = yb - h * pt.rng.uniform(0.6, 0.85)
        rad = h * pt.rng.uniform(0.16, 0.26)
        pt.paint(
            _ellipse(cx, cy, rad, rad * pt.rng.uniform(0.8, 1.1)),
            leaves,
            obj="tree",
            part="leaves",
            mat="foliage",
        )


def _house(pt: _Painter, x: float, yb: float, u: float, w: float | None = None) -> None:
    h = 1.5 * u
    w = w or h * pt.rng.uniform(1.1, 1.6)
    wall_kind = pt.pick(("brick", "wood", "painted"), (3, 2, 3))
    wall = pt.surface(wall_kind)
    roof = pt.surface(
        "tile", pt.col(pt.pick(("red", "dark_red", "brown", "dark_grey", "navy"), (3, 2, 2, 2, 1)))
    )
    ry = yb - 0.6 * h
    if pt.rng.random() < 0.5:
        cxh = x + w * pt.rng.uniform(0.15, 0.3)
        pt.paint(
            _rect(cxh - 0.05 * w, yb - 1.05 * h, cxh + 0.05 * w, ry),
            pt.surface("brick"),
            obj="house",
            part="chimney",
            mat="brick",
        )
    if pt.rng.random() < 0.6:
        shape = _polygon([(x - 0.58 * w, ry), (x + 0.58 * w, ry), (x, yb - h)])
    else:
        shape = _polygon(
            [(x - 0.58 * w, ry), (x + 0.58 * w, ry), (x + 0.35 * w, yb - h), (x - 0.35 * w, yb - h)]
        )
    pt.paint(shape, roof, obj="house", part="roof", mat="tile")
    pt.paint(_rect(x - w / 2, ry, x + w / 2, yb), wall, obj="house", mat=wall_kind)
    dx = x + w * pt.rng.uniform(-0.3, 0.3)
    dw, dh = 0.09 * w, 0.3 * h
    pt.paint(
        _rect(dx - dw, yb - dh, dx + dw, yb),
        pt.surface("wood", pt.col(pt.pick(("brown", "dark_brown", "red", "white", "navy")))),
        obj="house",
        part="door",
        mat="wood",
    )
    pt.paint(
        _ellipse(dx + 0.6 * dw, yb - 0.45 * dh, 0.02 * w, 0.02 * w),
        pt.col("yellow"),
        obj="house",
        part="door",
        part2="knob",
        mat="metal",
    )
    frame = pt.col(pt.pick(("white", "dark_brown", "black")))
    glass = pt.surface("glass")
    for wx in (x - 0.3 * w, x + 0.3 * w):
        if abs(wx - dx) < 0.22 * w:
            continue
        ww, wh = 0.1 * w, 0.1 * h
        wy = yb - 0.33 * h
        pt.paint(
            _rect(wx - ww, wy - wh, wx + ww, wy + wh),
            frame,
            obj="house",
            part="window",
            mat="painted",
        )
        pt.paint(
            _rect(wx - 0.8 * ww, wy - 0.8 * wh, wx + 0.8 * ww, wy + 0.8 * wh),
            glass,
            obj="house",
            part="window",
            mat="glass",
        )


def _building(pt: _Painter, x: float, yb: float, w: float, h: float) -> None:
    kind = pt.pick(("glass", "stone", "brick"), (2, 3, 1))
    facade = pt.surface(
        kind,
        pt.col(pt.pick(("grey", "light_grey", "beige", "tan", "light_blue", "dark_grey", "brown")))
        if kind != "brick"
        else None,
    )
    pt.paint(_rect(x - w / 2, yb - h, x + w / 2, yb), facade, obj="building", mat=kind)
    px = w / max(int(w / 0.03), 2)
    py = px * pt.rng.uniform(1.0, 1.6)
    fill = pt.rng.uniform(0.45, 0.7)
    x0, y0 = x - w / 2, yb - h

    def grid(xs, ys):
        return (
            (_frac((xs - x0) / px) > 1 - fill)
            & (_frac((ys - y0) / py) > 1 - fill)
            & (ys < yb - 0.05 * h)
        )

    glass = pt.surface(
        "glass",
        pt.col(pt.pick(("light_blue", "dark_grey", "navy", "black", "yellow"), (3, 3, 2, 1, 0.5))),
    )
    pt.paint(
        _masked(_rect(x0 + 0.5 * px, y0 + 0.5 * py, x + w / 2 - 0.3 * px, yb), grid),
        glass,
        obj="building",
        part="window",
        mat="glass",
    )


def _streetlight(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 1.6 * u
    d = 1 if pt.rng.random() < 0.5 else -1
    metal = pt.surface("metal", pt.col(pt.pick(("dark_grey", "black", "grey", "dark_green"))))
    lw = 0.018 * h
    pt.paint(_capsule(x, yb, x, yb - h, lw), metal, obj="streetlight", part="pole", mat="metal")
    pt.paint(
        _capsule(x, yb - h, x + d * 0.14 * h, yb - h, lw),
        metal,
        obj="streetlight",
        part="pole",
        mat="metal",
    )
    pt.paint(
        _ellipse(x + d * 0.14 * h, yb - h + 0.02 * h, 0.05 * h, 0.025 * h),
        pt.col(pt.pick(("white", "yellow"))),
        obj="streetlight",
        part="lamp",
        mat="glass",
    )


def _signboard(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 0.95 * u
    pt.paint(
        _capsule(x, yb, x, yb - 0.7 * h, 0.015 * h),
        pt.surface("metal"),
        obj="signboard",
        part="pole",
        mat="metal",
    )
    face = pt.col(pt.pick(("red", "blue", "green", "yellow", "white"), (3, 3, 2, 2, 1)))
    border = pt.col("white")
    cy, r = yb - 0.8 * h, 0.16 * h
    kind = pt.rng.integers(3)
    if kind == 0:
        outer, inner = _ellipse(x, cy, r, r), _ellipse(x, cy, 0.82 * r, 0.82 * r)
    elif kind == 1:
        outer, inner = (
            _rect(x - r, cy - 0.7 * r, x + r, cy + 0.7 * r),
            _rect(x - 0.86 * r, cy - 0.56 * r, x + 0.86 * r, cy + 0.56 * r),
        )
    else:
        outer = _polygon([(x, cy - r), (x + r, cy), (x, cy + r), (x - r, cy)])
        inner = _polygon(
            [(x, cy - 0.8 * r), (x + 0.8 * r, cy), (x, cy + 0.8 * r), (x - 0.8 * r, cy)]
        )
    pt.paint(outer, border, obj="signboard", mat="metal")
    pt.paint(inner, pt.surface("metal", face), obj="signboard", mat="metal")


def _fence(pt: _Painter, x0: float, x1: float, yb: float, u: float) -> None:
    h = 0.45 * u
    kind = pt.pick(("wood", "metal"), (2, 1))
    colour = pt.surface(
        kind,
        pt.col(pt.pick(("white", "brown", "tan")))
        if kind == "wood"
        else pt.col(pt.pick(("dark_grey", "black", "dark_green"))),
    )
    p = max(0.08 * h, 2.5 / pt.size)
    duty = pt.rng.uniform(0.35, 0.6)

    def pickets(X, Y):
        rail = (np.abs(Y - (yb - 0.3 * h)) < 0.04 * h) | (np.abs(Y - (yb - 0.75 * h)) < 0.04 * h)
        return (_frac((X - x0) / p) < duty) | rail

    pt.paint(_masked(_rect(x0, yb - h, x1, yb), pickets), colour, obj="fence", mat=kind)


def _bench(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 0.4 * u
    w = h * pt.rng.uniform(2.2, 3.0)
    kind = pt.pick(("wood", "metal"), (3, 1))
    wood = pt.surface(kind)
    legs = pt.surface("metal", pt.col(pt.pick(("black", "dark_grey"))))
    for lx in (x - 0.4 * w, x + 0.4 * w):
        pt.paint(
            _rect(lx - 0.02 * w, yb - 0.5 * h, lx + 0.02 * w, yb),
            legs,
            obj="bench",
            part="leg",
            mat="metal",
        )
    pt.paint(
        _rect(x - w / 2, yb - h, x + w / 2, yb - 0.65 * h), wood, obj="bench", part="back", mat=kind
    )
    pt.paint(
        _rect(x - w / 2, yb - 0.55 * h, x + w / 2, yb - 0.45 * h),
        wood,
        obj="bench",
        part="seat",
        mat=kind,
    )


def _ball(pt: _Painter, x: float, yb: float, u: float) -> None:
    r = 0.1 * u * pt.rng.uniform(0.7, 1.3)
    kind = pt.pick(("plastic", "leather"), (3, 1))
    base = pt.col(
        pt.pick(
            ("red", "blue", "yellow", "orange", "white", "green", "pink"), (3, 2, 2, 2, 2, 1, 1)
        )
    )
    pt.paint(_ellipse(x, yb - r, r, r), lambda X, Y: _plastic(base, X, Y), obj="ball", mat=kind)


def _boat(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 0.5 * u
    w = h * pt.rng.uniform(1.6, 2.4)
    kind = pt.pick(("wood", "painted", "metal"), (2, 2, 1))
    hull = pt.surface(
        kind,
        pt.col(pt.pick(("white", "red", "blue", "brown", "navy", "yellow")))
        if kind != "wood"
        else None,
    )
    if pt.rng.random() < 0.6:
        pt.paint(
            _capsule(x, yb - 0.3 * h, x, yb - 1.6 * h, 0.02 * h),
            pt.col("dark_brown"),
            obj="boat",
            mat="wood",
        )
        sail = pt.surface("fabric", pt.col(pt.pick(("white", "white", "red", "yellow", "blue"))))
        pt.paint(
            _polygon(
                [
                    (x + 0.03 * h, yb - 1.55 * h),
                    (x + 0.03 * h, yb - 0.45 * h),
                    (x + 0.6 * w * 0.8, yb - 0.45 * h),
                ]
            ),
            sail,
            obj="boat",
            part="sail",
            mat="fabric",
        )
    pt.paint(
        _polygon(
            [
                (x - w / 2, yb - 0.4 * h),
                (x + w / 2, yb - 0.4 * h),
                (x + 0.35 * w, yb),
                (x - 0.35 * w, yb),
            ]
        ),
        hull,
        obj="boat",
        part="hull",
        mat=kind,
    )


def _flowers(pt: _Painter, x: float, yb: float, u: float) -> None:
    petal = pt.col(
        pt.pick(("pink", "purple", "red", "yellow", "white", "lilac", "magenta", "orange"))
    )
    centre = pt.col("yellow")
    for _ in range(int(pt.rng.integers(3, 9))):
        r = 0.04 * u * pt.rng.uniform(0.7, 1.3)
        cx = x + pt.rng.uniform(-0.3, 0.3) * u
        cy = yb - pt.rng.uniform(0, 0.15) * u
        pt.paint(_ellipse(cx, cy, r, r), petal, obj="flower")
        pt.paint(_ellipse(cx, cy, 0.35 * r, 0.35 * r), centre, obj="flower")


def _rock(pt: _Painter, x: float, yb: float, u: float) -> None:
    r = 0.25 * u * pt.rng.uniform(0.5, 1.5)
    ang = np.sort(pt.rng.uniform(0, _TAU, 7))
    pts = [
        (x + r * math.cos(a) * pt.rng.uniform(0.8, 1.2), yb - 0.5 * r + 0.5 * r * math.sin(a))
        for a in ang
    ]
    pt.paint(_polygon(pts), pt.surface("stone"), obj="rock", mat="stone")


# ---------------------------------------------------------------------------
# Backgrounds


def _sky(pt: _Painter, horizon: float) -> None:
    kind = pt.pick(("clear", "overcast", "dusk"), (6, 3, 1))
    top, bottom = {
        "clear": (pt.col("blue", 0.1), pt.col("light_blue", 0.05)),
        "overcast": (pt.col("light_grey", 0.08), pt.col("white", 0.03)),
        "dusk": (
            pt.col(pt.pick(("purple", "navy", "blue"))),
            pt.col(pt.pick(("orange", "pink", "yellow"))),
        ),
    }[kind]
    hz = max(horizon, 0.05)
    pt.paint(
        _rect(0, 0, 1, horizon + 0.01),
        lambda X, Y: _mix(top, bottom, np.clip(Y / hz, 0, 1) ** 0.8),
        obj="sky",
    )
    cloud = pt.col(pt.pick(("white", "light_grey")), 0.03)
    for _ in range(int(pt.rng.poisson(2.0 if kind == "clear" else 4.0))):
        cx, cy = pt.rng.uniform(0, 1), pt.rng.uniform(0.02, max(horizon - 0.05, 0.03))
        for _ in range(int(pt.rng.integers(2, 5))):
            pt.paint(
                _ellipse(
                    cx + pt.rng.uniform(-0.08, 0.08),
                    cy + pt.rng.uniform(-0.02, 0.02),
                    pt.rng.uniform(0.04, 0.1),
                    pt.rng.uniform(0.02, 0.04),
                ),
                cloud,
                obj="sky",
            )


def _mountains(pt: _Painter, horizon: float, height: float) -> None:
    colour = pt.col(
        pt.pick(("grey", "dark_grey", "brown", "olive", "navy", "tan"), (3, 2, 2, 2, 1, 1))
    )
    x = pt.rng.uniform(-0.3, 0.1)
    while x < 1.0:
        w = pt.rng.uniform(0.35, 0.8)
        peak = horizon - height * pt.rng.uniform(0.5, 1.0)
        px = x + w * pt.rng.uniform(0.35, 0.65)
        base = horizon + 0.01
        pt.paint(
            _polygon([(x, base), (px, peak), (x + w, base)]),
            pt.surface("stone", colour * np.float32(pt.rng.uniform(0.85, 1.1))),
            obj="mountain",
        )
        if pt.rng.random() < 0.4:
            t = pt.rng.uniform(0.2, 0.35)
            pt.paint(
                _polygon(
                    [
                        (px - (px - x) * t, peak + (base - peak) * t),
                        (px, peak),
                        (px + (x + w - px) * t, peak + (base - peak) * t),
                    ]
                ),
                pt.col("white", 0.03),
                obj="mountain",
            )
        x += w * pt.rng.uniform(0.4, 0.8)


def _ground(pt: _Painter, horizon: float, kind: str, y1: float = 1.0) -> None:
    obj = {"grass": "grass", "sand": "sand", "water": "water", "sidewalk": "sidewalk"}[kind]
    mat = {"water": "water", "sidewalk": pt.pick(("stone", "tile"), (3, 1))}.get(kind)
    surf = pt.surface(mat if kind == "sidewalk" else kind)
    pt.paint(_rect(0, horizon, 1, y1), surf, obj=obj, mat=mat)


def _skyline(pt: _Painter, horizon: float, houses: float) -> None:
    x = pt.rng.uniform(-0.15, 0.0)
    while x < 1.0:
        w = pt.rng.uniform(0.1, 0.3)
        if pt.rng.random() < houses:
            _house(pt, x + w / 2, horizon + 0.02, w / 1.4 / 1.5 * pt.rng.uniform(1.0, 1.3), w=w)
        else:
            _building(pt, x + w / 2, horizon + 0.02, w, pt.rng.uniform(0.12, horizon + 0.05))
        x += w + pt.rng.uniform(0.0, 0.06)


def _depth(
    pt: _Painter, horizon: float, near: float = 1.0, far: float = 0.04
) -> tuple[float, float]:
    """A random base line below the horizon, biased to far, and its perspective scale."""
    yb = horizon + far + (near - horizon - far) * pt.rng.random() ** 1.3
    return yb, 1.15 * (yb - horizon)


# ---------------------------------------------------------------------------
# Scene recipes: each draws one image and returns its texture labels.


def _recipe_street(pt: _Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.3, 0.48)
    _sky(pt, hz)
    _skyline(pt, hz, houses=0.3)
    _ground(pt, hz, "sidewalk")
    vx, tw = r.uniform(0.35, 0.65), r.uniform(0.02, 0.07)
    bl, br = r.uniform(-0.35, 0.15), r.uniform(0.85, 1.35)
    pt.paint(
        _polygon([(vx - tw, hz), (vx + tw, hz), (br, 1.0), (bl, 1.0)]),
        pt.surface("asphalt"),
        obj="road",
    )

    def edges(y):
        t = (y - hz) / (1 - hz)
        return vx - tw + (bl - vx + tw) * t, vx + tw + (br - vx - tw) * t

    line = pt.col(pt.pick(("white", "yellow")))
    cb = (bl + br) / 2
    for k in range(8):
        ta, tb = (k + 0.2) / 8, (k + 0.6) / 8
        ya, yb_ = hz + ta * (1 - hz), hz + tb * (1 - hz)
        xa, xb = vx + (cb - vx) * ta, vx + (cb - vx) * tb
        wa, wb = 0.004 + 0.012 * ta, 0.004 + 0.012 * tb
        pt.paint(
            _polygon([(xa - wa, ya), (xa + wa, ya), (xb + wb, yb_), (xb - wb, yb_)]),
            line,
            obj="road",
        )
    items: list[tuple[float, Callable[[], None]]] = []
    for _ in range(int(r.integers(0, 5))):
        yb, u = _depth(pt, hz)
        lo, hi = edges(yb)
        x = r.uniform(lo + 0.3 * u, hi - 0.3 * u) if hi - lo > 0.6 * u else (lo + hi) / 2
        fn = _bus if r.random() < 0.1 else _car
        items.append((yb, lambda fn=fn, x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    for _ in range(int(r.poisson(1.5))):
        yb, u = _depth(pt, hz)
        lo, hi = edges(yb)
        x = lo - 0.1 * r.random() if r.random() < 0.5 else hi + 0.1 * r.random()
        fn = _person if r.random() < 0.85 else _bicycle
        items.append((yb, lambda fn=fn, x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    for fn, rate in ((_streetlight, 0.8), (_signboard, 0.5), (_tree, 0.5), (_dog, 0.05)):
        for _ in range(int(r.poisson(rate))):
            yb, u = _depth(pt, hz)
            lo, hi = edges(yb)
            x = lo - r.uniform(0.01, 0.1) if r.random() < 0.5 else hi + r.uniform(0.01, 0.1)
            items.append((yb, lambda fn=fn, x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    _draw_sorted(items)
    return []


def _recipe_highway(pt: _Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.35, 0.5)
    _sky(pt, hz)
    if r.random() < 0.5:
        _mountains(pt, hz, r.uniform(0.05, 0.15))
    _ground(pt, hz, "grass")
    vx, tw = r.uniform(0.3, 0.7), r.uniform(0.03, 0.1)
    bl, br = r.uniform(-0.6, 0.0), r.uniform(1.0, 1.6)
    pt.paint(
        _polygon([(vx - tw, hz), (vx + tw, hz), (br, 1.0), (bl, 1.0)]),
        pt.surface("asphalt"),
        obj="road",
    )
    items = []
    for _ in range(int(r.integers(1, 6))):
        yb, u = _depth(pt, hz)
        t = (yb - hz) / (1 - hz)
        lo, hi = vx - tw + (bl - vx + tw) * t, vx + tw + (br - vx - tw) * t
        x = r.uniform(lo + 0.3 * u, hi - 0.3 * u) if hi - lo > 0.6 * u else (lo + hi) / 2
        fn = _bus if r.random() < 0.15 else _car
        items.append((yb, lambda fn=fn, x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    for fn, rate in ((_tree, 1.0), (_signboard, 0.6), (_fence, 0.2)):
        for _ in range(int(r.poisson(rate))):
            yb, u = _depth(pt, hz, far=0.01)
            x = r.uniform(-0.1, 0.2) if r.random() < 0.5 else r.uniform(0.8, 1.1)
            if fn is _fence:
                items.append((yb, lambda x=x, yb=yb, u=u: _fence(pt, x - 0.3, x + 0.3, yb, u)))
            else:
                items.append((yb, lambda fn=fn, x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    _draw_sorted(items)
    return []


def _outdoor_objects(
    pt: _Painter, hz: float, rates: Mapping[str, float], near: float = 1.0
) -> list:
    fns = {
        "tree": _tree,
        "person": _person,
        "dog": _dog,
        "bench": _bench,
        "ball": _ball,
        "flower": _flowers,
        "rock": _rock,
        "bicycle": _bicycle,
        "fence": None,
    }
    items = []
    for name, rate in rates.items():
        for _ in range(int(pt.rng.poisson(rate))):
            yb, u = _depth(pt, hz, near=near)
            x = pt.rng.uniform(-0.05, 1.05)
            if name == "fence":
                x0 = pt.rng.uniform(-0.2, 0.6)
                items.append(
                    (
                        yb,
                        lambda x0=x0, yb=yb, u=u: _fence(
                            pt, x0, x0 + pt.rng.uniform(0.3, 0.9), yb, u
                        ),
                    )
                )
            else:
                items.append((yb, lambda fn=fns[name], x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    return items


def _recipe_park(pt: _Painter) -> list[str]:
    hz = pt.rng.uniform(0.3, 0.5)
    _sky(pt, hz)
    _ground(pt, hz, "grass")
    _draw_sorted(
        _outdoor_objects(
            pt,
            hz,
            {
                "tree": 2.0,
                "person": 1.2,
                "bench": 0.6,
                "dog": 0.3,
                "flower": 0.8,
                "fence": 0.2,
                "bicycle": 0.1,
            },
        )
    )
    return []


def _recipe_forest(pt: _Painter) -> list[str]:
    hz = pt.rng.uniform(0.2, 0.4)
    _sky(pt, hz)
    _ground(pt, hz, "grass")
    _draw_sorted(
        _outdoor_objects(pt, hz, {"tree": 12.0, "rock": 0.5, "person": 0.15, "flower": 0.3})
    )
    return []


def _recipe_field(pt: _Painter) -> list[str]:
    hz = pt.rng.uniform(0.3, 0.6)
    _sky(pt, hz)
    _ground(pt, hz, "grass")
    _draw_sorted(
        _outdoor_objects(pt, hz, {"flower": 2.0, "fence": 0.4, "rock": 0.4, "person": 0.2})
    )
    return []


def _recipe_playground(pt: _Painter) -> list[str]:
    hz = pt.rng.uniform(0.3, 0.5)
    _sky(pt, hz)
    _ground(pt, hz, "grass")
    items = _outdoor_objects(
        pt, hz, {"person": 2.5, "fence": 0.5, "tree": 0.6, "bench": 0.3, "dog": 0.2}
    )
    for _ in range(int(pt.rng.integers(1, 4))):
        yb, u = _depth(pt, hz)
        x = pt.rng.uniform(0.05, 0.95)
        items.append((yb, lambda x=x, yb=yb, u=u: _ball(pt, x, yb, u)))
    _draw_sorted(items)
    return []


def _recipe_yard(pt: _Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.35, 0.55)
    _sky(pt, hz)
    _ground(pt, hz, "grass")
    items = _outdoor_objects(
        pt,
        hz,
        {"tree": 1.0, "person": 0.5, "dog": 0.3, "fence": 0.7, "flower": 0.6, "ball": 0.1},
        near=1.0,
    )
    yb = hz + r.uniform(0.1, 0.3)
    u = 1.15 * (yb - hz)
    x = r.uniform(0.3, 0.7)
    items.append((yb, lambda: _house(pt, x, yb, u * r.uniform(1.0, 1.6))))
    _draw_sorted(items)
    return []


def _recipe_skyscraper(pt: _Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.55, 0.85)
    _sky(pt, hz)
    x = r.uniform(-0.2, 0.0)
    blocks = []
    while x < 1.0:
        w = r.uniform(0.15, 0.4)
        blocks.append((x + w / 2, w, r.uniform(0.3, hz + 0.1)))
        x += w + r.uniform(-0.05, 0.05)
    for bx, w, h in blocks:
        _building(pt, bx, hz + 0.01, w, h)
    _ground(pt, hz, "sidewalk")
    _draw_sorted(_outdoor_objects(pt, hz, {"person": 1.5, "tree": 0.3, "bicycle": 0.1}))
    return []


def _recipe_beach(pt: _Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.3, 0.5)
    shore = hz + r.uniform(0.1, 0.3)
    _sky(pt, hz)
    _ground(pt, hz, "water", y1=shore + 0.01)
    pt.paint(_rect(0, shore, 1, 1), pt.surface("sand"), obj="sand")
    items = _outdoor_objects(
        pt, shore - 0.08, {"person": 1.5, "ball": 0.6, "rock": 0.3, "dog": 0.1}
    )
    for _ in range(int(r.poisson(0.8))):
        yb = r.uniform(hz + 0.02, shore)
        u = 1.15 * (yb - hz)
        x = r.uniform(0.0, 1.0)
        items.append((yb, lambda x=x, yb=yb, u=u: _boat(pt, x, yb, u)))
    _draw_sorted(items)
    return []


def _recipe_lake(pt: _Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.3, 0.5)
    _sky(pt, hz)
    if r.random() < 0.7:
        _mountains(pt, hz, r.uniform(0.1, 0.25))
    _ground(pt, hz, "water")
    items = []
    shore = hz + 0.02
    for _ in range(int(r.poisson(3.0))):
        x = r.uniform(-0.05, 1.05)
        items.append((hz, lambda x=x: _tree(pt, x, shore, 0.04 + 0.04 * r.random())))
    for _ in range(int(r.poisson(1.0))):
        yb, u = _depth(pt, hz)
        x = r.uniform(0.0, 1.0)
        items.append((yb, lambda x=x, yb=yb, u=u: _boat(pt, x, yb, u)))
    _draw_sorted(items)
    return []


def _recipe_harbor(pt: _Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.35, 0.55)
    _sky(pt, hz)
    _skyline(pt, hz, houses=0.4)
    _ground(pt, hz + 0.01, "water")
    items = []
    for _ in range(int(r.integers(2, 6))):
        yb, u = _depth(pt, hz)
        x = r.uniform(0.0, 1.0)
        items.append((yb, lambda x=x, yb=yb, u=u: _boat(pt, x, yb, u)))
    _draw_sorted(items)
    return []


def _recipe_mountain(pt: _Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.45, 0.7)
    _sky(pt, hz)
    _mountains(pt, hz, r.uniform(0.25, 0.45))
    _ground(pt, hz, "grass")
    _draw_sorted(_outdoor_objects(pt, hz, {"rock": 1.5, "tree": 0.8, "person": 0.2, "fence": 0.2}))
    return []


def _recipe_desert(pt: _Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.35, 0.6)
    _sky(pt, hz)
    if r.random() < 0.6:
        _mountains(pt, hz, r.uniform(0.05, 0.15))
    _ground(pt, hz, "sand")
    _draw_sorted(_outdoor_objects(pt, hz, {"rock": 2.0, "person": 0.2}))
    return []


def _wall_item(pt: _Painter, kind: str, x: float, fy: float) -> None:
    r = pt.rng
    if kind == "door":
        w, h = r.uniform(0.1, 0.16), fy * r.uniform(0.55, 0.8)
        pt.paint(
            _rect(x - w / 2, fy - h, x + w / 2, fy + 0.005),
            pt.surface("wood", pt.col(pt.pick(("brown", "dark_brown", "white", "tan", "navy")))),
            obj="door",
            mat="wood",
        )
        kx = x + 0.35 * w
        pt.paint(
            _ellipse(kx, fy - 0.45 * h, 0.012, 0.012),
            pt.col(pt.pick(("yellow", "light_grey"))),
            obj="door",
            part="knob",
            mat="metal",
        )
    elif kind == "painting":
        w, h = r.uniform(0.12, 0.3), r.uniform(0.1, 0.25)
        cy = fy * r.uniform(0.35, 0.55)
        pt.paint(
            _rect(x - w / 2, cy - h / 2, x + w / 2, cy + h / 2),
            pt.surface("wood", pt.col(pt.pick(("dark_brown", "yellow", "black", "tan")))),
            obj="painting",
            part="frame",
            mat="wood",
        )
        pt.paint(
            _rect(x - 0.42 * w, cy - 0.4 * h, x + 0.42 * w, cy + 0.4 * h),
            pt.pattern_surface(pt.pick(("blotchy", "banded", "marbled"))),
            obj="painting",
            mat="painted",
        )
    else:
        w, h = r.uniform(0.15, 0.3), r.uniform(0.15, 0.3)
        cy = fy * r.uniform(0.35, 0.5)
        frame = pt.col(pt.pick(("white", "dark_brown", "light_grey")))
        pt.paint(
            _rect(x - w / 2, cy - h / 2, x + w / 2, cy + h / 2),
            frame,
            obj="windowpane",
            part="frame",
            mat="painted",
        )
        glass = pt.surface("glass", pt.col(pt.pick(("light_blue", "white", "light_grey"))))
        for gx in (-1, 1):
            for gy in (-1, 1):
                x0 = x + (0.04 * w if gx > 0 else -0.44 * w)
                y0 = cy + (0.04 * h if gy > 0 else -0.44 * h)
                pt.paint(
                    _rect(x0, y0, x0 + 0.4 * w, y0 + 0.4 * h), glass, obj="windowpane", mat="glass"
                )


def _sofa(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 0.45 * u
    w = h * pt.rng.uniform(2.0, 2.8)
    kind = pt.pick(("fabric", "leather"), (3, 1))
    cover = pt.surface(kind)
    pt.paint(
        _rounded(x - w / 2, yb - h, x + w / 2, yb - 0.45 * h, 0.05 * h),
        cover,
        obj="sofa",
        part="back",
        mat=kind,
    )
    n = int(pt.rng.integers(2, 4))
    seat_w = 0.8 * w / n
    for k in range(n):
        x0 = x - 0.4 * w + k * seat_w
        pt.paint(
            _rounded(x0 + 0.01 * w, yb - 0.5 * h, x0 + seat_w - 0.01 * w, yb - 0.1 * h, 0.04 * h),
            cover,
            obj="sofa",
            part="cushion",
            mat=kind,
        )
    for ax in (x - 0.45 * w, x + 0.45 * w):
        pt.paint(
            _rounded(ax - 0.06 * w, yb - 0.7 * h, ax + 0.06 * w, yb - 0.08 * h, 0.04 * h),
            cover,
            obj="sofa",
            part="arm",
            mat=kind,
        )
    pt.paint(
        _rect(x - 0.45 * w, yb - 0.1 * h, x + 0.45 * w, yb),
        pt.col("dark_brown"),
        obj="sofa",
        part="base",
        mat="wood",
    )


def _bed(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 0.5 * u
    w = h * pt.rng.uniform(2.0, 2.8)
    d = 1 if pt.rng.random() < 0.5 else -1
    hx = x - d * 0.47 * w
    pt.paint(
        _rect(hx - 0.04 * w, yb - h, hx + 0.04 * w, yb),
        pt.surface("wood"),
        obj="bed",
        part="headboard",
        mat="wood",
    )
    pt.paint(
        _rect(x - 0.45 * w, yb - 0.5 * h, x + 0.47 * w, yb - 0.15 * h),
        pt.surface("fabric", pt.col(pt.pick(("white", "beige", "light_blue", "pink")))),
        obj="bed",
        mat="fabric",
    )
    pt.paint(
        _rect(x - 0.1 * w * d, yb - 0.55 * h, x + 0.48 * w * d, yb - 0.12 * h)
        if d > 0
        else _rect(x - 0.48 * w, yb - 0.55 * h, x + 0.1 * w, yb - 0.12 * h),
        pt.surface("fabric"),
        obj="bed",
        mat="fabric",
    )
    pt.paint(
        _ellipse(hx + d * 0.14 * w, yb - 0.58 * h, 0.1 * w, 0.08 * h),
        pt.surface("fabric", pt.col(pt.pick(("white", "light_grey", "yellow")))),
        obj="bed",
        part="pillow",
        mat="fabric",
    )
    for lx in (x - 0.43 * w, x + 0.43 * w):
        pt.paint(
            _rect(lx - 0.02 * w, yb - 0.15 * h, lx + 0.02 * w, yb),
            pt.col("dark_brown"),
            obj="bed",
            part="leg",
            mat="wood",
        )


def _table(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 0.4 * u
    w = h * pt.rng.uniform(1.5, 2.5)
    kind = pt.pick(("wood", "glass", "metal"), (5, 1, 1))
    top = pt.surface(kind)
    for lx in (x - 0.42 * w, x + 0.42 * w, x - 0.3 * w, x + 0.3 * w):
        pt.paint(
            _rect(
                lx - 0.025 * w,
                yb - 0.9 * h,
                lx + 0.025 * w,
                yb - (0.06 * h if abs(lx - x) < 0.35 * w else 0),
            ),
            pt.surface("wood") if kind == "wood" else pt.surface("metal"),
            obj="table",
            part="leg",
            mat="wood" if kind == "wood" else "metal",
        )
    pt.paint(
        _rect(x - w / 2, yb - h, x + w / 2, yb - 0.88 * h), top, obj="table", part="top", mat=kind
    )


def _chair(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 0.5 * u
    w = 0.45 * h
    d = 1 if pt.rng.random() < 0.5 else -1
    kind = pt.pick(("wood", "plastic", "metal"), (4, 2, 1))
    surf = pt.surface(kind)
    for lx in (x - 0.45 * w, x + 0.45 * w):
        pt.paint(
            _rect(lx - 0.05 * w, yb - 0.5 * h, lx + 0.05 * w, yb),
            surf,
            obj="chair",
            part="leg",
            mat=kind,
        )
    bx = x - d * 0.45 * w
    pt.paint(
        _rect(bx - 0.06 * w, yb - h, bx + 0.06 * w, yb - 0.5 * h),
        surf,
        obj="chair",
        part="back",
        mat=kind,
    )
    pt.paint(
        _rect(x - w / 2, yb - 0.55 * h, x + w / 2, yb - 0.47 * h),
        surf,
        obj="chair",
        part="seat",
        mat=kind,
    )


def _lamp(pt: _Painter, x: float, yb: float, u: float) -> None:
    h = 0.7 * u
    pt.paint(
        _ellipse(x, yb - 0.02 * h, 0.08 * h, 0.02 * h),
        pt.surface("metal"),
        obj="lamp",
        part="base",
        mat="metal",
    )
    pt.paint(
        _capsule(x, yb - 0.03 * h, x, yb - 0.8 * h, 0.012 * h),
        pt.surface("metal"),
        obj="lamp",
        part="pole",
        mat="metal",
    )
    kind = pt.pick(("fabric", "paper"))
    shade = pt.surface(kind, pt.col(pt.pick(("white", "beige", "yellow", "red", "pink"))))
    pt.paint(
        _polygon(
            [
                (x - 0.08 * h, yb - h),
                (x + 0.08 * h, yb - h),
                (x + 0.14 * h, yb - 0.75 * h),
                (x - 0.14 * h, yb - 0.75 * h),
            ]
        ),
        shade,
        obj="lamp",
        part="shade",
        mat=kind,
    )


def _indoor(
    pt: _Painter, furniture: Mapping[str, float], wall_items: Mapping[str, float]
) -> list[str]:
    r = pt.rng
    fy = r.uniform(0.5, 0.72)
    textures: list[str] = []
    if r.random() < 0.7:
        fam = TEXTURES[int(r.choice(len(TEXTURES), p=_zipf(len(TEXTURES), 0.8)))]
        textures.append(fam)
        pt.paint(_rect(0, 0, 1, fy), pt.pattern_surface(fam), obj="wall", mat="wallpaper")
    else:
        pt.paint(_rect(0, 0, 1, fy), pt.surface("painted"), obj="wall", mat="painted")
    if r.random() < 0.4:
        pt.paint(
            _rect(0, 0, 1, r.uniform(0.04, 0.12)),
            pt.surface("painted", pt.col("white", 0.03)),
            obj="ceiling",
            mat="painted",
        )
    floor_kind = pt.pick(("wood", "tile", "carpet"), (4, 2, 2))
    pt.paint(_rect(0, fy, 1, 1), pt.surface(floor_kind), obj="floor", mat=floor_kind)
    for kind, rate in wall_items.items():
        for _ in range(int(r.poisson(rate))):
            _wall_item(pt, kind, r.uniform(0.05, 0.95), fy)
    fns = {
        "sofa": _sofa,
        "bed": _bed,
        "table": _table,
        "chair": _chair,
        "lamp": _lamp,
        "person": _person,
        "dog": _dog,
    }
    items = []
    for name, rate in furniture.items():
        n = int(r.poisson(rate)) if rate < 1 or name in ("chair", "person") else int(rate)
        for _ in range(n):
            yb = fy + (1 - fy) * r.uniform(0.15, 0.95)
            u = 0.7 + 1.2 * (yb - fy) / (1 - fy)
            u *= 0.55
            x = r.uniform(0.1, 0.9)
            items.append((yb, lambda fn=fns[name], x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    _draw_sorted(items)
    return textures


def _recipe_bedroom(pt: _Painter) -> list[str]:
    return _indoor(
        pt,
        {"bed": 1, "lamp": 0.6, "person": 0.1, "chair": 0.2},
        {"windowpane": 0.6, "painting": 0.7, "door": 0.3},
    )


def _recipe_living_room(pt: _Painter) -> list[str]:
    return _indoor(
        pt,
        {"sofa": 1, "table": 0.6, "lamp": 0.6, "person": 0.3, "dog": 0.1, "chair": 0.3},
        {"windowpane": 0.7, "painting": 0.9, "door": 0.2},
    )


def _recipe_dining_room(pt: _Painter) -> list[str]:
    return _indoor(
        pt,
        {"table": 1, "chair": 2.5, "lamp": 0.3, "person": 0.3},
        {"windowpane": 0.6, "painting": 0.8, "door": 0.2},
    )


def _recipe_corridor(pt: _Painter) -> list[str]:
    return _indoor(pt, {"person": 0.4, "lamp": 0.1}, {"door": 2.5, "painting": 0.5})


_RECIPES = MappingProxyType(
    {
        "street": _recipe_street,
        "park": _recipe_park,
        "forest": _recipe_forest,
        "highway": _recipe_highway,
        "yard": _recipe_yard,
        "bedroom": _recipe_bedroom,
        "living_room": _recipe_living_room,
        "beach": _recipe_beach,
        "skyscraper": _recipe_skyscraper,
        "field": _recipe_field,
        "lake": _recipe_lake,
        "mountain": _recipe_mountain,
        "dining_room": _recipe_dining_room,
        "corridor": _recipe_corridor,
        "playground": _recipe_playground,
        "harbor": _recipe_harbor,
        "desert": _recipe_desert,
    }
)


def _texture_image(pt: _Painter) -> list[str]:
    r = pt.rng
    p = _zipf(len(TEXTURES), 0.8)
    first = int(r.choice(len(TEXTURES), p=p))
    families = [TEXTURES[first]]
    pt.paint(_rect(0, 0, 1, 1), pt.pattern_surface(families[0]))
    if r.random() < 0.15:
        # A second pattern over the first, like DTD images with two texture labels.
        second = TEXTURES[int(r.choice([i for i in range(len(TEXTURES)) if i != first]))]
        pat = _pattern(second, r)
        fg = pt.col(pt.pick(tuple(_PALETTE)))
        pt.paint(((0, 0, 1, 1), lambda X, Y: pat(X, Y) > 0.5), fg)
        families.append(second)
    return families


def _surface_image(pt: _Painter) -> list[str]:
    r = pt.rng
    kinds = (
        "wood",
        "fabric",
        "brick",
        "stone",
        "metal",
        "tile",
        "glass",
        "carpet",
        "painted",
        "leather",
        "foliage",
        "plastic",
        "paper",
        "skin",
        "water",
    )
    p = _zipf(len(kinds), 0.7)
    k = int(r.integers(2, 5))
    pts = r.uniform(0, 1, (k, 2)).astype(np.float32)
    g = pt.grid
    region = np.argmin(
        (g[None, :, None] - pts[:, 0]) ** 2 + (g[:, None, None] - pts[:, 1]) ** 2, axis=-1
    )
    for i in range(k):
        kind = kinds[int(r.choice(len(kinds), p=p))]
        pt.paint(((0, 0, 1, 1), lambda X, Y, i=i: region == i), pt.surface(kind), mat=kind)
    return []


# ---------------------------------------------------------------------------
# One example


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


def _nearest_index(n_out: int, n_in: int) -> np.ndarray:
    # The source pixel PIL's NEAREST resize picks: floor((i + 0.5) * n_in / n_out).
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def seg_size(size: int) -> int:
    """Segmentation side for image side `size` (Broden: 224 -> 112, 227 -> 113, 384 -> 192)."""
    return size // 2


def _image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, 0, index]))


def render(index: int, *, seed: int = 0, size: int = 224) -> Example:
    """Renders image `index` of the data set of `seed` at `size` x `size`."""
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = _image_rng(seed, index)
    source = SOURCES[int(rng.choice(len(SOURCES), p=_SOURCE_P))]
    recipe = ""
    image_labels: dict[str, tuple[int, ...]] = {}
    if source == "scenes":
        weights = np.array(list(_RECIPE_P.values()))
        recipe = tuple(_RECIPE_P)[int(rng.choice(len(weights), p=weights / weights.sum()))]
        pt = _Painter(size, rng, annotate_materials=rng.random() < _MATERIAL_ANNOTATED_P)
        textures = _RECIPES[recipe](pt)
    elif source == "textures":
        pt = _Painter(size, rng, annotate_materials=False)
        textures = _texture_image(pt)
    else:
        pt = _Painter(size, rng, annotate_materials=True)
        textures = _surface_image(pt)
    image = pt.finish()

    s2 = seg_size(size)
    idx = _nearest_index(s2, size)
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


def object_areas(object_plane: np.ndarray) -> dict[str, float]:
    """Fraction of the plane each object label covers (the input of `scene_for`)."""
    counts = np.bincount(np.asarray(object_plane).ravel())
    out = {}
    for name in OBJECTS:
        n = LABEL_NUMBERS[name]
        if n < len(counts) and counts[n]:
            out[name] = counts[n] / object_plane.size
    return out


# ---------------------------------------------------------------------------
# Writing


def encode_labels(plane: np.ndarray) -> np.ndarray:
    """int label plane -> uint8 RGB with label = R + 256 * G (blue 0)."""
    plane = np.asarray(plane, np.int64)
    if plane.min() < 0 or plane.max() >= 1 << 16:
        raise ValueError("label numbers must be in [0, 65535] to fit R + 256 * G")
    rgb = np.zeros((*plane.shape, 3), np.uint8)
    rgb[..., 0] = plane & 0xFF
    rgb[..., 1] = plane >> 8
    return rgb


def _write_example(
    root: pathlib.Path, index: int, ex: Example
) -> tuple[dict[str, str], list[tuple[str, int, float]]]:
    """Writes one example's files; returns its index.csv cells and its label statistics."""
    images = root / "images"
    stem = f"{ex.source}/{index:06d}"
    (images / ex.source).mkdir(parents=True, exist_ok=True)
    Image.fromarray(ex.image).save(images / f"{stem}.jpg", quality=JPEG_QUALITY)
    cells: dict[str, str] = {"image": f"{stem}.jpg"}
    stats: list[tuple[str, int, float]] = []
    for cat, planes in ex.planes.items():
        paths = []
        for k, plane in enumerate(planes):
            # Parts are numbered by level, like the release's ADE20K `_part_1.png`.
            multi = cat == "part" or len(planes) > 1
            name = f"{stem}_{cat}_{k + 1}.png" if multi else f"{stem}_{cat}.png"
            Image.fromarray(encode_labels(plane), "RGB").save(images / name)
            paths.append(name)
        cells[cat] = ";".join(paths)
        # Coverage of a label in a category counts a pixel once, whichever planes hold it.
        flat = [p.ravel() for p in planes]
        counts = np.zeros(max(int(p.max()) for p in flat) + 1, np.int64)
        for k, row in enumerate(flat):
            keep = np.ones(row.shape, bool)
            for prev in flat[:k]:
                keep &= prev != row
            counts += np.bincount(row[keep], minlength=len(counts))
        counts[0] = 0
        stats.extend((cat, int(n), float(counts[n]) / flat[0].size) for n in np.flatnonzero(counts))
    for cat, labels in ex.image_labels.items():
        cells[cat] = ";".join(str(n) for n in labels)
        stats.extend((cat, n, 1.0) for n in labels)
    return cells, stats


def _work(
    task: tuple[str, int, int, int],
) -> tuple[int, dict[str, str], list[tuple[str, int, float]]]:
    root, index, seed, size = task
    cells, stats = _write_example(pathlib.Path(root), index, render(index, seed=seed, size=size))
    return index, cells, stats


def _splits(num_images: int, seed: int) -> list[str]:
    order = np.random.default_rng(np.random.SeedSequence([seed, 1])).permutation(num_images)
    n_train = round(TRAIN_FRACTION * num_images)
    split = ["val"] * num_images
    for i in order[:n_train]:
        split[int(i)] = "train"
    return split


def _fmt(x: float) -> str:
    return f"{x:f}"


def _write_tables(
    root: pathlib.Path,
    rows: list[dict[str, str]],
    freq: Mapping[tuple[str, int], int],
    cov: Mapping[tuple[str, int], float],
) -> tuple[str, ...]:
    """Writes label.csv, category.csv, c_<cat>.csv and index.csv (last); returns category order."""
    name_of = {n: k for k, n in LABEL_NUMBERS.items()}
    first = {c: min(LABEL_NUMBERS[n] for n in CATEGORY_LABELS[c]) for c in CATEGORIES}
    # The release orders categories by their first label number (joinseg.py).
    cats = tuple(sorted(CATEGORIES, key=lambda c: (first[c], CATEGORIES.index(c))))
    with open(root / "label.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for number in sorted(name_of):
            name = name_of[number]
            incats = sorted(
                LABEL_CATEGORIES[name], key=lambda c: (-freq.get((c, number), 0), cats.index(c))
            )
            w.writerow(
                [
                    number,
                    name,
                    ";".join(f"{c}({freq.get((c, number), 0)})" for c in incats),
                    sum(freq.get((c, number), 0) for c in incats),
                    _fmt(sum(cov.get((c, number), 0.0) for c in incats)),
                    ";".join(SYNONYMS.get(name, ())),
                ]
            )
    with open(root / "category.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "first", "last", "count", "frequency"])
        for c in cats:
            numbers = [LABEL_NUMBERS[n] for n in CATEGORY_LABELS[c]]
            w.writerow(
                [
                    c,
                    min(numbers),
                    max(numbers),
                    len(numbers),
                    sum(freq.get((c, n), 0) for n in numbers),
                ]
            )
    for c in cats:
        numbers = sorted(
            (LABEL_NUMBERS[n] for n in CATEGORY_LABELS[c]),
            key=lambda n: (-freq.get((c, n), 0), -cov.get((c, n), 0.0), n),
        )
        with open(root / f"c_{c}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["code", "number", "name", "frequency", "coverage"])
            for code, n in enumerate(numbers, start=1):
                w.writerow([code, n, name_of[n], freq.get((c, n), 0), _fmt(cov.get((c, n), 0.0))])
    with open(root / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        header = ["image", "split", "ih", "iw", "sh", "sw", *cats]
        w.writerow(header)
        for row in rows:
            w.writerow([row.get(h, "") for h in header])
    return cats


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork: workers inherit the imported modules (importing jaxdissect.data pulls
    # in jax, ~2 s a process under spawn); the workers never touch jax.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def generate(
    out_dir: str | os.PathLike,
    *,
    num_images: int,
    size: int = 224,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> pathlib.Path:
    """Writes a synthetic Broden of `num_images` images at `size` into `out_dir`.

    The folder is built under a temporary name beside `out_dir` and renamed at
    the end, so an interrupted run never leaves a folder that looks complete.

    Args:
      out_dir: the dataset folder to create (like `broden1_224`).
      num_images: number of images (70% train, 30% val).
      size: image side; segmentations are `size // 2`.
      seed: everything is a function of (seed, image index).
      workers: processes; None = all cores (1 for small sets). The output bytes
        do not depend on it.
      overwrite: replace an existing `out_dir` (else FileExistsError).
      progress: called with (done, total) as images complete.

    Returns:
      The dataset folder.
    """
    out = pathlib.Path(out_dir).expanduser().absolute()
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    if workers is None:
        workers = 1 if num_images < 64 else min(os.cpu_count() or 1, 8)
    workers = max(1, min(workers, num_images))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tasks = [(str(tmp), i, seed, size) for i in range(num_images)]
        results: list[tuple[int, dict[str, str], list[tuple[str, int, float]]]] = []
        if workers == 1:
            for t in tasks:
                results.append(_work(t))
                if progress:
                    progress(len(results), num_images)
        else:
            chunk = max(1, min(16, num_images // (workers * 4)))
            with _pool_context().Pool(workers) as pool:
                for res in pool.imap_unordered(_work, tasks, chunksize=chunk):
                    results.append(res)
                    if progress:
                        progress(len(results), num_images)
        results.sort(key=lambda t: t[0])
        split = _splits(num_images, seed)
        s2 = seg_size(size)
        rows = []
        freq: dict[tuple[str, int], int] = {}
        cov: dict[tuple[str, int], float] = {}
        for index, cells, stats in results:
            rows.append(
                {**cells, "split": split[index], "ih": size, "iw": size, "sh": s2, "sw": s2}
            )
            for cat, label, fraction in stats:
                freq[(cat, label)] = freq.get((cat, label), 0) + 1
                cov[(cat, label)] = cov.get((cat, label), 0.0) + fraction
        info = {
            "generator": "jaxdissect.data.synthetic",
            "version": GENERATOR_VERSION,
            "num_images": num_images,
            "size": size,
            "seed": seed,
        }
        (tmp / "synthetic.json").write_text(json.dumps(info, indent=1) + "\n")
        _write_tables(tmp, rows, freq, cov)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def generate_tiny(out_dir: str | os.PathLike, *, seed: int = 0, **kwargs) -> pathlib.Path:
    """A small synthetic Broden for tests (`TINY`: 32 images at 64 x 64, ~1 s)."""
    return generate(out_dir, **{**TINY, **kwargs}, seed=seed)

"""The synthetic Broden's categories, label names and fixed label numbers.

Label numbers are fixed, whatever the number of images: colours 1-11, objects
from 12, then a gap, parts from 250 (so that part and material labels straddle
256), materials, scenes, textures. `water`, `door` and `lamp` each belong to two
categories, as in the release.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

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

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

Labels absent from a small run are still listed, with frequency 0. Every image
is rendered from its own RNG derived from (seed, image index): the output bytes
depend on neither the worker count nor the order of work.

Modules, in the order an image is made: `vocabulary` (categories, label names
and numbers), `raster` (shapes, noise), `patterns` (texture families),
`painter` (label planes, palette, material surfaces), `objects` (outdoor and street
objects), `indoor` (wall items, furniture) and `backgrounds` (drawers), `recipes` (one image per scene, texture or surface
recipe), `scene_rule` (the scene label from the visible objects), `colours`
(per-pixel colour labels), `example` (one rendered image with its planes) and
`writer` (the on-disk data set).
"""

from jaxdissect.data.synthetic.colours import color_names, color_plane
from jaxdissect.data.synthetic.example import SOURCES, Example, render, seg_size
from jaxdissect.data.synthetic.scene_rule import object_areas, scene_for
from jaxdissect.data.synthetic.vocabulary import (
    CATEGORIES,
    CATEGORY_LABELS,
    COLOR_NAMES,
    COLORS,
    IMAGE_LEVEL,
    LABEL_CATEGORIES,
    LABEL_NUMBERS,
    MATERIALS,
    OBJECTS,
    PART_BASE,
    PARTS,
    SCENES,
    SYNONYMS,
    TEXTURES,
)
from jaxdissect.data.synthetic.writer import (
    GENERATOR_VERSION,
    JPEG_QUALITY,
    TINY,
    TRAIN_FRACTION,
    encode_labels,
    generate,
    generate_tiny,
)

__all__ = [
    "CATEGORIES",
    "CATEGORY_LABELS",
    "COLORS",
    "COLOR_NAMES",
    "GENERATOR_VERSION",
    "IMAGE_LEVEL",
    "JPEG_QUALITY",
    "LABEL_CATEGORIES",
    "LABEL_NUMBERS",
    "MATERIALS",
    "OBJECTS",
    "PARTS",
    "PART_BASE",
    "SCENES",
    "SOURCES",
    "SYNONYMS",
    "TEXTURES",
    "TINY",
    "TRAIN_FRACTION",
    "Example",
    "color_names",
    "color_plane",
    "encode_labels",
    "generate",
    "generate_tiny",
    "object_areas",
    "render",
    "scene_for",
    "seg_size",
]

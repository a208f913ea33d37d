"""A tiny Broden writer for tests: every byte of the folder under the test's control.

`write_broden` writes the release's layout (category.csv, label.csv,
c_<cat>.csv, index.csv, images/) from plain specs and returns what a correct
reader must give back. `tiny_broden` writes a ready-made six-category set with
Broden's quirks (labels >= 256, several part planes, a label in two
categories, an image-level 0, train and val rows).

Bad inputs are made by passing verbatim strings (`RowSpec.cells`, a `str`
entry in `pixel`/`image_labels`) or by editing the files afterwards
(`edit_csv`, deleting or truncating files).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image

BRODEN_CATEGORIES = ("color", "object", "part", "material", "scene", "texture")


@dataclasses.dataclass(frozen=True)
class LabelSpec:
    """One label: a row of label.csv and one row in each c_<cat>.csv of `coverage`."""

    number: int
    name: str
    coverage: Mapping[str, float]  # category -> coverage written to c_<category>.csv
    frequency: int = 1
    syns: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """One index.csv row.

    Attributes:
      image: path relative to images/; `.png` is written losslessly, `.jpg` as JPEG.
      split: the split cell.
      pixel: category -> planes; an int array [sh, sw] is written as a PNG
        (label = R + 256 * G) next to the image, a `str` goes into the cell
        verbatim (no file written).
      image_labels: category -> label numbers (written as given, 0 included) or
        a verbatim cell string.
      rgb: uint8 [ih, iw, 3] pixels; default a deterministic pattern.
      cells: verbatim overrides of any index.csv cell (e.g. {"ih": "x"}).
      write_image: False leaves the image file out.
    """

    image: str
    split: str = "train"
    pixel: Mapping[str, Sequence[np.ndarray | str]] = dataclasses.field(default_factory=dict)
    image_labels: Mapping[str, Sequence[int] | str] = dataclasses.field(default_factory=dict)
    rgb: np.ndarray | None = None
    cells: Mapping[str, str] = dataclasses.field(default_factory=dict)
    write_image: bool = True


@dataclasses.dataclass(frozen=True)
class Written:
    """What a correct reader returns for each row (split 'all', no max_images).

    Attributes:
      root: the dataset folder.
      images: uint8 [ih, iw, 3] per row, as decoded back from the written file.
      planes: int32 [P_i, sh, sw] per row, pixel categories in category order.
      image_labels: per row, image-level labels in category order, 0 and repeats dropped.
    """

    root: pathlib.Path
    images: list[np.ndarray]
    planes: list[np.ndarray]
    image_labels: list[tuple[int, ...]]


def encode_labels(labels: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] RGB encoding of a label plane: R = label % 256, G = label // 256."""
    labels = np.asarray(labels, dtype=np.int64)
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    return rgb


def default_rgb(row: int, size: tuple[int, int]) -> np.ndarray:
    """A deterministic, row-dependent uint8 [h, w, 3] image."""
    h, w = size
    x = np.arange(h * w * 3, dtype=np.int64).reshape(h, w, 3)
    return ((x * (2 * row + 3) + 17 * row) % 256).astype(np.uint8)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _save(rgb: np.ndarray, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(rgb).save(path, format="JPEG", quality=95)
    else:
        Image.fromarray(rgb).save(path, format="PNG")


def write_broden(
    root: str | pathlib.Path,
    *,
    categories: Sequence[str],
    labels: Sequence[LabelSpec],
    rows: Sequence[RowSpec],
    image_size: tuple[int, int] = (8, 8),
    seg_size: tuple[int, int] = (4, 4),
    columns: Sequence[str] | None = None,
    image_level: Sequence[str] = ("scene", "texture"),
) -> Written:
    """Writes a Broden folder at `root` and returns what a reader should give back.

    Args:
      categories: category.csv order.
      labels: label.csv rows (and c_<cat>.csv rows through `LabelSpec.coverage`).
      rows: index.csv rows.
      image_size, seg_size: (h, w) written to every row's ih,iw / sh,sw.
      columns: index.csv category columns in file order (default: `categories`).
      image_level: categories whose expected labels go to `Written.image_labels`.
    """
    root = pathlib.Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    columns = list(categories if columns is None else columns)

    (root / "category.csv").write_text(
        _csv_text(
            ["name", "first", "last", "count", "frequency"],
            [[c, 0, 0, sum(c in lab.coverage for lab in labels), len(rows)] for c in categories],
        )
    )
    (root / "label.csv").write_text(
        _csv_text(
            ["number", "name", "category", "frequency", "coverage", "syns"],
            [
                [
                    lab.number,
                    lab.name,
                    ";".join(f"{c}({lab.frequency})" for c in lab.coverage),
                    lab.frequency,
                    f"{sum(lab.coverage.values()):f}",
                    ";".join(lab.syns),
                ]
                for lab in labels
            ],
        )
    )
    for c in categories:
        members = [lab for lab in labels if c in lab.coverage]
        (root / f"c_{c}.csv").write_text(
            _csv_text(
                ["code", "number", "name", "frequency", "coverage"],
                [
                    [code, lab.number, lab.name, lab.frequency, repr(float(lab.coverage[c]))]
                    for code, lab in enumerate(members, start=1)
                ],
            )
        )

    index_rows, images, planes, image_labels = [], [], [], []
    for r, spec in enumerate(rows):
        rgb = default_rgb(r, image_size) if spec.rgb is None else spec.rgb
        image_path = root / "images" / spec.image
        if spec.write_image:
            _save(rgb, image_path)
            with Image.open(image_path) as im:
                images.append(np.asarray(im.convert("RGB")))
        else:
            images.append(rgb)
        stem = spec.image.rsplit(".", 1)[0]
        cells = {
            "image": spec.image,
            "split": spec.split,
            "ih": str(image_size[0]),
            "iw": str(image_size[1]),
            "sh": str(seg_size[0]),
            "sw": str(seg_size[1]),
        }
        row_planes: dict[str, list[np.ndarray]] = {}
        for c, entries in spec.pixel.items():
            names = []
            for k, entry in enumerate(entries, start=1):
                if isinstance(entry, str):
                    names.append(entry)
                    continue
                name = f"{stem}_{c}_{k}.png"
                _save(encode_labels(entry), root / "images" / name)
                names.append(name)
                row_planes.setdefault(c, []).append(np.asarray(entry, dtype=np.int32))
            cells[c] = ";".join(names)
        row_labels: list[int] = []
        for c, entry in spec.image_labels.items():
            if isinstance(entry, str):
                cells[c] = entry
                continue
            cells[c] = ";".join(str(n) for n in entry)
        for c in categories:
            entry = spec.image_labels.get(c)
            if c in image_level and entry is not None and not isinstance(entry, str):
                for n in entry:
                    if n != 0 and n not in row_labels:
                        row_labels.append(n)
        cells.update(spec.cells)
        index_rows.append(
            [cells.get(col, "") for col in ("image", "split", "ih", "iw", "sh", "sw", *columns)]
        )
        ordered = [p for c in categories for p in row_planes.get(c, [])]
        planes.append(np.stack(ordered) if ordered else np.zeros((0, *seg_size), dtype=np.int32))
        image_labels.append(tuple(row_labels))

    (root / "index.csv").write_text(
        _csv_text(["image", "split", "ih", "iw", "sh", "sw", *columns], index_rows)
    )
    return Written(root, images, planes, image_labels)


def edit_csv(
    path: str | pathlib.Path, edit: Callable[[list[list[str]]], list[list[str]] | None]
) -> None:
    """Rewrites a CSV file through `edit(rows)` (rows[0] is the header; edit in place or return)."""
    path = pathlib.Path(path)
    rows = list(csv.reader(io.StringIO(path.read_text(), newline="")))
    result = edit(rows)
    rows = rows if result is None else result
    path.write_text(_csv_text(rows[0], rows[1:]))


def tiny_broden(root: str | pathlib.Path) -> Written:
    """Writes a 5-image, six-category Broden (8x8 images, 4x4 segmentations).

    Labels: 1 black-c, 2 red-c (color); 3 sky (object); 4 wood (material 3.0 and
    object 1.0: primary material); 5 head, 300 wheel (part, 300 needs G = 1);
    6 street-s, 7 bedroom-s (scene); 8 dotted (texture); 9 cloth (object and
    material with equal coverage: primary material, the later category).
    Rows 0-2 are train, 3-4 val; row 1 has two part planes; row 2 has an
    image-level texture 0 (dropped); row 4 has no pixel data except color.
    """
    labels = [
        LabelSpec(1, "black-c", {"color": 10.0}),
        LabelSpec(2, "red-c", {"color": 4.0}),
        LabelSpec(3, "sky", {"object": 2.0}),
        LabelSpec(4, "wood", {"material": 3.0, "object": 1.0}, syns=("timber",)),
        LabelSpec(5, "head", {"part": 1.0}),
        LabelSpec(300, "wheel", {"part": 0.5}),
        LabelSpec(6, "street-s", {"scene": 2.0}),
        LabelSpec(7, "bedroom-s", {"scene": 1.0}),
        LabelSpec(8, "dotted", {"texture": 1.0}),
        LabelSpec(9, "cloth", {"object": 0.25, "material": 0.25}),
    ]
    a = np.array([[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 1, 1], [2, 2, 2, 2]])
    sky = np.array([[3, 3, 3, 3], [3, 3, 0, 0], [0, 4, 4, 0], [0, 9, 0, 0]])
    part1 = np.array([[0, 5, 5, 0], [0, 5, 5, 0], [300, 300, 0, 0], [0, 0, 0, 0]])
    part2 = np.array([[0, 0, 0, 0], [0, 5, 0, 0], [0, 300, 300, 300], [0, 0, 0, 0]])
    wood = np.array([[0, 0, 0, 0], [0, 0, 0, 0], [4, 4, 4, 4], [4, 9, 9, 4]])
    rows = [
        RowSpec(
            "ade20k/a.png",
            "train",
            pixel={"color": [a], "object": [sky], "part": [part1]},
            image_labels={"scene": [6]},
        ),
        RowSpec(
            "ade20k/b.png",
            "train",
            pixel={"color": [a.T], "object": [sky.T], "part": [part1, part2]},
            image_labels={"scene": [7]},
        ),
        RowSpec(
            "dtd/c.png",
            "train",
            pixel={"color": [2 - (a == 1)]},
            image_labels={"texture": [0, 8]},
        ),
        RowSpec(
            "opensurfaces/d.png",
            "val",
            pixel={"color": [a[::-1]], "material": [wood]},
        ),
        RowSpec("pascal/e.png", "val", pixel={"color": [a[:, ::-1]]}),
    ]
    return write_broden(root, categories=BRODEN_CATEGORIES, labels=labels, rows=rows)


# Three labels of three categories (two pixel, one image-level), as small folders list them.
LABELS = [
    LabelSpec(1, "sky", {"object": 1.0}),
    LabelSpec(2, "street-s", {"scene": 1.0}),
    LabelSpec(3, "red-c", {"color": 1.0}),
]

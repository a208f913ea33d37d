"""Reader for an unzipped Broden folder (`broden1_224`, `broden1_227`, `broden1_384`).

The layout is the one NetDissect's `joinseg.py` wrote for the release:

- `category.csv` (`name,...`): the categories, in this order everywhere.
- `label.csv` (`number,name,category,frequency,coverage,syns`): one row per
  label number >= 1; the release has no row for 0 ("unlabeled").
- `c_<cat>.csv` (`code,number,name,frequency,coverage`): the labels of one
  category with their coverage in it; a label's primary category is the one
  where its coverage is largest.
- `index.csv` (`image,split,ih,iw,sh,sw,<cat>...`): one row per image. A
  pixel-category cell lists `;`-separated PNG paths (label = R + 256 * G), an
  image-level cell lists `;`-separated label numbers; empty means no data.

Nothing about the categories is hard-coded: their order comes from
category.csv, and whether one is image-level from its index.csv cells
(numbers vs paths, by majority over the whole file; a column mixing both is an
error at the odd row). Only a category with no data in any row falls back to
Broden's names (`scene`, `texture` are image-level, the rest pixel), which
cannot matter for counts since it has no data. Image-level label 0 (present
in ~2,000 rows of the release) is dropped, as are repeats of a label in one
image. A label's primary category is the one with the largest coverage in its
c_<cat>.csv, ties going to the later category (as NetDissect-Lite); labels in
no c_<cat>.csv, label 0 and unused numbers get -1. Label PNGs are decoded to
RGB first, so any lossless re-encoding (palette, grayscale) reads the same.

`Broden.open` checks the CSV files, then walks every file the selected rows
list: each must be a regular file (a FIFO would hang the reader) and stay
inside the folder through any symlink; its size and modification time (or, with
`data_hash="content"`, its bytes) go into the fingerprint that keys every
stored stage, so an added, removed or edited file invalidates them. With
`check_headers` (the default) a second walk reads each image's and label PNG's
header: size and mode are checked before any pass. Given `header_memo` (a folder),
a scan that passed is remembered there under the fingerprint and its check version,
and an open of the same files skips it (the per-file stat or content that the
fingerprint holds is what would change if a file did). Headers are checked again,
decoding and PNG label numbers for the first time, when an example is read
(`check_labels` does it alone).
Images of any PIL mode become 8-bit RGB as `jaxdissect.data.images` says, or
are refused. Every problem raises `BrodenFormatError`, naming the file (and
index.csv line) and how to fix it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import operator
import os
import pathlib
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from jaxdissect import store
from jaxdissect.data import images
from jaxdissect.data.files import DatasetFiles, Fingerprint, check_data_hash, check_regular
from jaxdissect.labelspace import LabelSpace

INDEX_FILE = "index.csv"
LABEL_FILE = "label.csv"
CATEGORY_FILE = "category.csv"
IMAGES_DIR = "images"
SPLITS = ("train", "val", "all")
META_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
# Used only for a category column that holds no data in any row, where the
# cells cannot tell: Broden's scene (ADE20K) and texture (DTD) are per image.
KNOWN_IMAGE_LEVEL = frozenset({"scene", "texture"})
# R + 256 * G of an 8-bit PNG cannot exceed this.
_PNG_LABEL_LIMIT = 1 << 16
# A bound on label numbers so that a typo cannot allocate gigabytes.
_MAX_LABEL_NUMBER = 1 << 24
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
_SAFE_CATEGORY = re.compile(r"[A-Za-z0-9_.\-]+")
# PIL modes whose RGB conversion is exact (8 bits per channel).
_PNG_MODES = frozenset({"RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1"})


class BrodenFormatError(ValueError):
    """A Broden folder does not match the expected on-disk format."""


@dataclasses.dataclass(frozen=True)
class Record:
    """One row of `index.csv`.

    Attributes:
      line: 1-based line number in index.csv (for error messages).
      image: image path relative to `images/`.
      split: the row's split (`train` or `val` in the release).
      ih, iw: image size; sh, sw: segmentation size.
      pixel: category -> PNG paths relative to `images/`; only categories with data.
      image_labels: category -> label numbers, label 0 and repeats dropped;
        only categories with at least one label left.
    """

    line: int
    image: str
    split: str
    ih: int
    iw: int
    sh: int
    sw: int
    pixel: dict[str, tuple[str, ...]]
    image_labels: dict[str, tuple[int, ...]]

    @property
    def num_planes(self) -> int:
        """Number of pixel label planes of this image (all categories)."""
        return sum(len(p) for p in self.pixel.values())


@dataclasses.dataclass(frozen=True, eq=False)
class _Table:
    """A parsed CSV file: header, data rows with their 1-based line numbers, raw bytes."""

    name: str
    header: tuple[str, ...]
    rows: tuple[tuple[int, tuple[str, ...]], ...]
    raw: bytes

    def column(self, name: str) -> int:
        return self.header.index(name)


def _read_table(root: pathlib.Path, name: str, required: tuple[str, ...], what: str) -> _Table:
    """Reads and structurally checks one CSV file of the dataset."""
    path = root / name
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise BrodenFormatError(
            f"{path}: file not found ({what}). Point the reader at the unzipped "
            "broden1_<size> folder, the one that holds index.csv, label.csv, "
            "category.csv, the c_<category>.csv files and images/."
        ) from None
    except OSError as e:
        raise BrodenFormatError(f"{path}: cannot read ({e}); check its permissions.") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BrodenFormatError(
            f"{path}: not UTF-8 text (byte {e.start}); the file is corrupt, re-extract it."
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise BrodenFormatError(
                f"{path}: empty file, expected a header line starting with "
                f"{','.join(required)}; the file is truncated, re-extract it."
            )
        header = tuple(h.strip() for h in header)
        seen = set()
        for h in header:
            if h in seen:
                raise BrodenFormatError(
                    f"{path} line 1: column {h!r} appears twice in the header; "
                    "each column must appear once."
                )
            seen.add(h)
        missing = [c for c in required if c not in header]
        if missing:
            raise BrodenFormatError(
                f"{path} line 1: missing column(s) {', '.join(missing)}; the header is "
                f"{','.join(header)!r} but must contain {','.join(required)}. "
                "Restore the file from the Broden release."
            )
        rows = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # blank line, e.g. a trailing newline
            if len(row) != len(header):
                raise BrodenFormatError(
                    f"{path} line {reader.line_num}: {len(row)} fields but the header has "
                    f"{len(header)}; the row is truncated or has a stray comma or quote."
                )
            rows.append((reader.line_num, tuple(row)))
    except csv.Error as e:
        raise BrodenFormatError(
            f"{path} line {reader.line_num}: not valid CSV ({e}); re-extract the file."
        ) from None
    return _Table(name, header, tuple(rows), raw)


def _is_decimal(s: str) -> bool:
    # isascii: str.isdigit alone accepts other scripts' digits.
    return s.isascii() and s.isdigit()


def _parse_int(text: str, where: str, column: str, *, minimum: int) -> int:
    """Parses a decimal integer >= minimum, or raises naming file, line and column."""
    s = text.strip()
    if not _is_decimal(s) or int(s) < minimum:
        raise BrodenFormatError(
            f"{where}: column {column!r} holds {text!r}, expected a whole number >= {minimum}; "
            "fix or restore the file."
        )
    return int(s)


def _parse_float(text: str, where: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise BrodenFormatError(
            f"{where}: column {column!r} holds {text!r}, expected a finite decimal number; "
            "fix or restore the file."
        )
    return value


def _escapes(path: str) -> bool:
    """True for paths that would leave `images/`: empty, absolute, drive letter, `..`."""
    parts = path.replace("\\", "/").split("/")
    return not parts[0] or ".." in parts or bool(_WINDOWS_DRIVE.match(path))


def _escape_error(path: str, where: str, what: str) -> BrodenFormatError:
    return BrodenFormatError(
        f"{where}: {what} path {path!r} is empty or escapes the dataset folder; paths must be "
        f"relative to {IMAGES_DIR}/ without '..' (the index.csv is corrupt or was edited)."
    )


def _split_cell(cell: str) -> list[str]:
    # Empty pieces ("3;;4", a trailing ';') carry nothing, as in NetDissect.
    if ";" not in cell:  # the common case, kept cheap: 63k rows x 6 columns
        cell = cell.strip()
        return [cell] if cell else []
    return [t for t in (t.strip() for t in cell.split(";")) if t]


def _unique(values: list[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(values))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Broden:
    """A Broden probe set opened from a local folder.

    Build it with `Broden.open(root)`. Examples have fixed shapes across the
    dataset (see `__getitem__`) so that batches can be jitted. Reading methods
    are pure and safe to call from several threads.

    Attributes:
      root: the dataset folder.
      labels: the label space (categories in category.csv order).
      records: the selected index.csv rows, in file order.
      image_size: (ih, iw), common to all records.
      seg_size: (sh, sw), common to all records.
      max_planes: P, the most pixel label planes of any selected record (>= 1).
      max_image_labels: Q, the most image-level labels of any selected record (>= 1).
      known_labels: bool [>= 65536], True at 0 and every number label.csv defines
        (indexed by a PNG's R + 256 * G without bounds checks).
      coverage: float64 [num_categories, num_labels], each label's coverage in each
        c_<cat>.csv, NaN where absent: `primary_categories(coverage, use)` recomputes
        primaries over a subset of categories.
      split, max_images: the selection `open` was given.
    """

    root: pathlib.Path
    labels: LabelSpace
    records: tuple[Record, ...]
    image_size: tuple[int, int]
    seg_size: tuple[int, int]
    max_planes: int
    max_image_labels: int
    known_labels: np.ndarray = dataclasses.field(repr=False)
    coverage: np.ndarray = dataclasses.field(repr=False)
    split: str = "all"
    max_images: int | None = None
    _fingerprint: str = dataclasses.field(default="", repr=False)

    @classmethod
    def open(
        cls,
        root: str | pathlib.Path,
        *,
        split: str = "all",
        max_images: int | None = None,
        data_hash: str = "stat",
        check_headers: bool = True,
        header_memo: str | pathlib.Path | None = None,
    ) -> Broden:
        """Reads and checks the CSV files of the Broden folder `root`, then the files they list.

        Args:
          root: the unzipped `broden1_<size>` folder.
          split: `train`, `val` or `all` (also any other split value present in index.csv).
          max_images: keep only the first N rows after the split filter.
          data_hash: how the selected rows' files enter the fingerprint: `stat` (size and
            modification time) or `content` (their bytes, read in full).
          check_headers: also open every listed image and label PNG for its header (size,
            mode) before returning.
          header_memo: a folder remembering header scans that passed, by fingerprint:
            an open of the same files skips the scan (None: always scan).
        """
        root = pathlib.Path(root).expanduser()
        if not root.is_dir():
            raise BrodenFormatError(
                f"{root}: not a folder. Download and unzip broden1_224 (or _227/_384) "
                "and pass the folder that holds index.csv."
            )
        if max_images is not None and max_images < 0:
            raise ValueError(f"max_images must be >= 0 or None, got {max_images}")
        check_data_hash(data_hash)

        category_table = _read_table(root, CATEGORY_FILE, ("name",), "the list of categories")
        categories = _parse_categories(root, category_table)
        label_table = _read_table(
            root, LABEL_FILE, ("number", "name"), "the label numbers and names"
        )
        names, known = _parse_labels(root, label_table)
        cat_tables = [
            _read_table(root, f"c_{c}.csv", ("number", "coverage"), f"the labels of category {c!r}")
            for c in categories
        ]
        coverage = _category_coverage(root, categories, cat_tables, known)
        index_table = _read_table(
            root, INDEX_FILE, META_COLUMNS, "the list of images and their label files"
        )
        image_level = _infer_image_level(root, categories, index_table)
        labels = LabelSpace(
            categories=categories,
            names=names,
            primary=primary_categories(coverage),
            image_level=image_level,
        )
        all_records = _parse_index(root, index_table, labels, known)
        image_size, seg_size = _common_sizes(root, all_records)

        present = sorted({r.split for r in all_records})
        if split not in SPLITS and split not in present:
            raise BrodenFormatError(
                f"{root / INDEX_FILE}: unknown split {split!r}; use one of "
                f"{', '.join(sorted(set(SPLITS) | set(present)))}."
            )
        records = [r for r in all_records if split == "all" or r.split == split]
        if max_images is not None:
            records = records[:max_images]
        if not records:
            if not all_records:
                why = "it has no image rows"
            else:
                why = (
                    f"no rows are left after split={split!r}, max_images={max_images} "
                    f"(it has {len(all_records)} rows, splits: {', '.join(present)})"
                )
            raise BrodenFormatError(
                f"{root / INDEX_FILE}: empty index: {why}; choose another split or "
                "max_images, or restore the file."
            )

        digest = Fingerprint("jaxdissect-broden-v2", data_hash)
        for table in (category_table, label_table, *cat_tables, index_table):
            digest.add_bytes(table.name, table.raw)
        digest.add_bytes("selection", f"split={split}\0max_images={max_images}".encode())
        _walk_files(root, labels, records, digest)
        fingerprint = digest.hexdigest()
        if check_headers:
            memo = _header_memo_path(header_memo, fingerprint)
            if memo is None or not memo.is_file():
                _check_headers(root, labels, records)
                if memo is not None:
                    store.write_bytes(memo, b"")

        return cls(
            root=root,
            labels=labels,
            records=tuple(records),
            image_size=image_size,
            seg_size=seg_size,
            max_planes=max(1, max(r.num_planes for r in records)),
            max_image_labels=max(
                1, max(len(_flat_image_labels(labels.categories, r)) for r in records)
            ),
            known_labels=known,
            coverage=coverage,
            split=split,
            max_images=max_images,
            _fingerprint=fingerprint,
        )

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        # The default would print every record and label (63k + 1.2k on the release).
        return (
            f"Broden(root={str(self.root)!r}, split={self.split!r}, images={len(self)}, "
            f"labels={self.labels.num_labels}, image_size={self.image_size}, "
            f"seg_size={self.seg_size}, max_planes={self.max_planes}, "
            f"max_image_labels={self.max_image_labels})"
        )

    def fingerprint(self) -> str:
        """Hash of the CSV files' bytes, the selection, and every file the selected rows list
        (by size and mtime, or content: `open`'s `data_hash`), for cache keys."""
        return self._fingerprint

    def _record(self, i: int) -> tuple[int, Record]:
        i = operator.index(i)
        n = len(self.records)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range for a Broden of {n} images")
        i %= n
        return i, self.records[i]

    def _where(self, rec: Record, column: str) -> str:
        return f"{self.root / INDEX_FILE} line {rec.line}, column {column!r}"

    def read_image(self, i: int) -> np.ndarray:
        """Decodes image i: uint8 [ih, iw, 3] RGB."""
        _, rec = self._record(i)
        path = self.root / IMAGES_DIR / rec.image
        where = self._where(rec, "image")
        with _open_image(path, where, "image") as im:
            _check_image_header(self.root, rec, path, where, im)
            # Any accepted mode becomes 8-bit RGB; the array is taken before the file closes.
            return _decode(im, path)

    def read_labels(
        self, i: int, categories: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decodes the labels of image i, of every category or only of `categories`.

        The label files and cells of categories left out are not read at all (as
        NetDissect-Lite), so a label listed in two categories keeps only the pixels of
        the selected one.

        Returns:
          int32 [P_i, sh, sw]: the (selected) pixel categories' planes, in category.csv
          order then cell order (0 = unlabeled), and int32 [Q_i]: the image-level
          labels in the same order, without 0 and without repeats.
        """
        _, rec = self._record(i)
        cats = selected_categories(self.labels, categories)
        pngs = [(cat, png) for cat in cats for png in rec.pixel.get(cat, ())]
        planes = np.zeros((len(pngs), rec.sh, rec.sw), dtype=np.int32)
        for k, (cat, png) in enumerate(pngs):
            planes[k] = self._read_png(rec, cat, png)
        image_labels = np.asarray(_flat_image_labels(cats, rec), dtype=np.int32)
        return planes, image_labels

    def _read_png(self, rec: Record, cat: str, png: str) -> np.ndarray:
        path = self.root / IMAGES_DIR / png
        where = self._where(rec, cat)
        with _open_image(path, where, "segmentation PNG") as im:
            _check_png_header(self.root, rec, path, where, im)
            rgb = _decode(im, path)
        # uint8 * 256 overflows: widen before combining the channels.
        label = rgb[..., 0].astype(np.int32) | (rgb[..., 1].astype(np.int32) << 8)
        bad = ~self.known_labels[label]
        if bad.any():
            numbers = np.unique(label[bad])
            shown = ", ".join(str(n) for n in numbers[:10]) + (" ..." if len(numbers) > 10 else "")
            raise BrodenFormatError(
                f"{path} ({where}): label number(s) {shown} are not in "
                f"{self.root / LABEL_FILE}; the PNG and label.csv come from different Broden "
                "releases or the PNG is corrupt. Re-extract the dataset."
            )
        return label

    def label_shape(self, categories: Sequence[str] | None = None) -> tuple[int, int]:
        """(P, Q): the most pixel planes and image labels of any record, over `categories`
        (None: all), at least 1 each; `read_labels(i, categories)` fits in them."""
        cats = selected_categories(self.labels, categories)
        planes = max(sum(len(r.pixel.get(c, ())) for c in cats) for r in self.records)
        scalars = max(len(_flat_image_labels(cats, r)) for r in self.records)
        return max(1, planes), max(1, scalars)

    def check_labels(self, i: int) -> None:
        """Decodes every label of image i and checks it (file, size, mode, label numbers).

        Raises BrodenFormatError naming the file and index.csv line; meant for pass 1, so
        that a broken label file stops a run before pass 2 rather than during it.
        """
        self.read_labels(i)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """Example i with fixed shapes across the dataset.

        Returns:
          image: float32 [ih, iw, 3], RGB values 0..255 (normalising is the model's job).
          pixel_labels: int32 [P, sh, sw], padded with all-0 planes.
          image_labels: int32 [Q], padded with 0.
          index: int32 scalar, the position i.
        """
        i, _ = self._record(i)
        image = self.read_image(i).astype(np.float32)
        planes, image_labels = self.read_labels(i)
        pixel_labels = np.zeros((self.max_planes, *self.seg_size), dtype=np.int32)
        pixel_labels[: len(planes)] = planes
        padded = np.zeros((self.max_image_labels,), dtype=np.int32)
        padded[: len(image_labels)] = image_labels
        return {
            "image": image,
            "pixel_labels": pixel_labels,
            "image_labels": padded,
            "index": np.asarray(i, dtype=np.int32),
        }


def _flat_image_labels(categories: Sequence[str], rec: Record) -> tuple[int, ...]:
    # One image-level label applies to the whole image once, whichever category lists it.
    return _unique([n for c in categories for n in rec.image_labels.get(c, ())])


def selected_categories(labels: LabelSpace, categories: Sequence[str] | None) -> tuple[str, ...]:
    """The categories to read, in the label space's order: all (None) or `categories`.

    Raises ValueError naming `categories=` and the known names for a name not in `labels`.
    """
    if categories is None:
        return labels.categories
    if isinstance(categories, str):
        raise ValueError(f"categories={categories!r}: give a sequence of names, not a string")
    unknown = [c for c in categories if c not in labels.categories]
    if unknown:
        raise ValueError(
            f"categories={list(categories)!r}: {', '.join(map(repr, unknown))} not in the "
            f"dataset; its categories are {', '.join(labels.categories)}"
        )
    return tuple(c for c in labels.categories if c in categories)


class _open_image:
    """Context manager: opens an image file lazily, mapping failures to BrodenFormatError."""

    def __init__(self, path: pathlib.Path, where: str, what: str, *, checked: bool = False):
        self.path, self.where, self.what, self.checked = path, where, what, checked
        self.image: Image.Image | None = None

    def __enter__(self) -> Image.Image:
        # A FIFO would block Image.open forever: refused from its stat, before opening
        # (unless `checked`: the caller has just stat'ed it).
        if not self.checked:
            check_regular(self.path, self.where, self.what, BrodenFormatError)
        try:
            self.image = Image.open(self.path)
        except FileNotFoundError:
            raise BrodenFormatError(
                f"{self.path}: {self.what} not found (listed at {self.where}); the images/ "
                "folder is incomplete, re-extract the dataset."
            ) from None
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise BrodenFormatError(
                f"{self.path}: cannot read {self.what} ({type(e).__name__}: {e}; listed at "
                f"{self.where}); the file is corrupt or not an image, re-extract it."
            ) from None
        return self.image

    def __exit__(self, *exc) -> None:
        if self.image is not None:
            self.image.close()


def _check_image_header(
    root: pathlib.Path, rec: Record, path: pathlib.Path, where: str, im: Image.Image
) -> None:
    """Size and mode of an opened (not yet decoded) image against its index.csv row."""
    if im.size != (rec.iw, rec.ih):
        raise BrodenFormatError(
            f"{path}: image is {im.size[1]}x{im.size[0]} (h x w) but "
            f"{root / INDEX_FILE} line {rec.line} says ih,iw = {rec.ih},{rec.iw}; "
            "the image or index.csv comes from another Broden resolution, re-extract "
            "the dataset."
        )
    try:
        images.check_mode(im.mode)
    except images.UnsupportedImageMode as e:
        raise BrodenFormatError(f"{path} ({where}): {e}.") from None


def _check_png_header(
    root: pathlib.Path, rec: Record, path: pathlib.Path, where: str, im: Image.Image
) -> None:
    """Size and mode of an opened (not yet decoded) label PNG against its index.csv row."""
    if im.size != (rec.sw, rec.sh):
        raise BrodenFormatError(
            f"{path}: segmentation is {im.size[1]}x{im.size[0]} (h x w) but "
            f"{root / INDEX_FILE} line {rec.line} says sh,sw = {rec.sh},{rec.sw}; "
            "the PNG or index.csv comes from another Broden resolution, re-extract "
            "the dataset."
        )
    if im.mode not in _PNG_MODES or _sixteen_bit(im):
        mode = repr(im.mode) if im.mode not in _PNG_MODES else f"{im.mode} with 16-bit channels"
        raise BrodenFormatError(
            f"{path}: PNG mode {mode} is not 8-bit RGB ({where}); Broden label PNGs "
            "store label = R + 256 * G in 8-bit channels. Re-extract the file."
        )


def _sixteen_bit(im: Image.Image) -> bool:
    """Whether a PNG stores 16 bits a channel (PIL opens 16-bit RGB as mode RGB, high bytes)."""
    return any(";16" in str(tile.args) for tile in getattr(im, "tile", ()))


def _decode(im: Image.Image, path: pathlib.Path) -> np.ndarray:
    """uint8 [h, w, 3] RGB of `im`, fully decoded (truncated files fail here) or BrodenFormatError."""
    try:
        im.load()
        return images.to_rgb8(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BrodenFormatError(
            f"{path}: cannot decode ({type(e).__name__}: {e}); the file is truncated or "
            "corrupt, re-extract it."
        ) from None


def _record_files(labels: LabelSpace, rec: Record) -> list[tuple[str, str]]:
    """(path relative to images/, index.csv column) of every file of a row: image, then PNGs."""
    files = [(rec.image, "image")]
    for cat in labels.categories:
        files.extend((png, cat) for png in rec.pixel.get(cat, ()))
    return files


def _record_paths(root: pathlib.Path, labels: LabelSpace, records: Sequence[Record]):
    """(record, path relative to images/, full path, where, what) of every listed file."""
    images_dir = os.path.join(root, IMAGES_DIR)
    index = root / INDEX_FILE
    for rec in records:
        for rel, column in _record_files(labels, rec):
            where = f"{index} line {rec.line}, column {column!r}"
            what = "image" if column == "image" else "segmentation PNG"
            yield rec, rel, os.path.join(images_dir, rel), where, what


def _walk_files(
    root: pathlib.Path, labels: LabelSpace, records: Sequence[Record], digest: Fingerprint
) -> None:
    """Checks every file of `records` (regular, inside `root`) and adds it to `digest`."""
    tree = DatasetFiles(root, BrodenFormatError)
    for _, rel, path, where, what in _record_paths(root, labels, records):
        digest.add_file(rel, path, tree.stat(path, where, what))


def _check_headers(root: pathlib.Path, labels: LabelSpace, records: Sequence[Record]) -> None:
    """Opens every file of `records` (already checked regular) for its header."""
    for rec, _, path, where, what in _record_paths(root, labels, records):
        check = _check_image_header if what == "image" else _check_png_header
        with _open_image(pathlib.Path(path), where, what, checked=True) as im:
            check(root, rec, pathlib.Path(path), where, im)


# Version of the header checks: a memo of an older version's scan is not trusted.
_HEADER_CHECKS = 2


def _header_memo_path(memo: str | pathlib.Path | None, fingerprint: str) -> pathlib.Path | None:
    if memo is None:
        return None
    return pathlib.Path(memo).expanduser() / f"broden-headers-v{_HEADER_CHECKS}-{fingerprint}"


def _parse_categories(root: pathlib.Path, table: _Table) -> tuple[str, ...]:
    col = table.column("name")
    categories: list[str] = []
    for line, row in table.rows:
        name = row[col].strip()
        where = f"{root / table.name} line {line}"
        if not _SAFE_CATEGORY.fullmatch(name) or name in (".", ".."):
            raise BrodenFormatError(
                f"{where}: category name {name!r} is empty or not a plain name "
                "(letters, digits, '_', '-', '.'); it names the file c_<name>.csv."
            )
        if name in categories:
            raise BrodenFormatError(f"{where}: category {name!r} is listed twice.")
        categories.append(name)
    if not categories:
        raise BrodenFormatError(
            f"{root / table.name}: lists no categories; restore it from the Broden release."
        )
    return tuple(categories)


def _parse_labels(root: pathlib.Path, table: _Table) -> tuple[tuple[str, ...], np.ndarray]:
    """Label names indexed by number, and a boolean table of the numbers label.csv defines."""
    num_col, name_col = table.column("number"), table.column("name")
    by_number: dict[int, str] = {}
    for line, row in table.rows:
        where = f"{root / table.name} line {line}"
        number = _parse_int(row[num_col], where, "number", minimum=0)
        if number >= _MAX_LABEL_NUMBER:
            raise BrodenFormatError(
                f"{where}: label number {number} is implausibly large "
                f"(>= {_MAX_LABEL_NUMBER}); fix or restore the file."
            )
        if number in by_number:
            raise BrodenFormatError(f"{where}: label number {number} is defined twice.")
        by_number[number] = row[name_col]
    # The release has no row 0; if a file has one, 0 still means "unlabeled".
    by_number.pop(0, None)
    if not by_number:
        raise BrodenFormatError(
            f"{root / table.name}: defines no labels; restore it from the Broden release."
        )
    size = max(by_number) + 1
    names = ["-"] + [by_number.get(n, "") for n in range(1, size)]
    known = np.zeros(max(size, _PNG_LABEL_LIMIT), dtype=bool)
    known[0] = True
    known[list(by_number)] = True
    return tuple(names), known


def _category_coverage(
    root: pathlib.Path,
    categories: tuple[str, ...],
    tables: list[_Table],
    known: np.ndarray,
) -> np.ndarray:
    """float64 [num_categories, num_labels]: coverage from c_<cat>.csv, NaN where absent."""
    num_labels = int(np.flatnonzero(known).max()) + 1
    coverage = np.full((len(categories), num_labels), np.nan)
    for ic, table in enumerate(tables):
        num_col, cov_col = table.column("number"), table.column("coverage")
        for line, row in table.rows:
            where = f"{root / table.name} line {line}"
            number = _parse_int(row[num_col], where, "number", minimum=1)
            if number >= len(known) or not known[number]:
                raise BrodenFormatError(
                    f"{where}: label number {number} is not in {root / LABEL_FILE}; the "
                    f"category files and label.csv come from different releases."
                )
            if not np.isnan(coverage[ic, number]):
                raise BrodenFormatError(
                    f"{where}: label number {number} is listed twice in category "
                    f"{categories[ic]!r}."
                )
            coverage[ic, number] = _parse_float(row[cov_col], where, "coverage")
    return coverage


def primary_categories(coverage: np.ndarray, use: Sequence[bool] | None = None) -> np.ndarray:
    """Primary category of every label: the one with the largest coverage.

    Ties go to the later category, as `max((coverage, index))` in NetDissect-Lite.
    Labels in no (used) category get -1 (NetDissect-Lite would give them the last
    category, with coverage 0; they are concepts of no category).

    Args:
      coverage: float [num_categories, num_labels], NaN where a label is not in a
        category (`Broden.coverage`).
      use: optional per-category flags; primaries are chosen among these only.
        NetDissect-Lite computes primaries over the categories it scores (it
        leaves out material, so e.g. `wood` becomes an object).

    Returns:
      int32 [num_labels], indices into the categories, or -1.
    """
    cov = np.where(np.isnan(coverage), -np.inf, coverage)
    if use is not None:
        cov[~np.asarray(use, dtype=bool)] = -np.inf
    last = len(cov) - 1 - np.argmax(cov[::-1], axis=0)  # argmax keeps the first of ties
    return np.where(np.isfinite(cov).any(axis=0), last, -1).astype(np.int32)


def _infer_image_level(
    root: pathlib.Path, categories: tuple[str, ...], table: _Table
) -> tuple[bool, ...]:
    """Per category: True when its index.csv cells hold label numbers rather than PNG paths.

    Decided by the majority of non-empty cells of the column over the whole file
    (mixed columns are rejected later, at the odd row). A category without data
    anywhere (or without a column) falls back to `KNOWN_IMAGE_LEVEL`.
    """
    where = f"{root / table.name} line 1"
    for name in table.header:
        if name not in META_COLUMNS and name not in categories:
            raise BrodenFormatError(
                f"{where}: column {name!r} is not a category of {root / CATEGORY_FILE} "
                f"({', '.join(categories)}); index.csv and category.csv come from different "
                "releases, restore them."
            )
    flags = []
    for cat in categories:
        numeric = paths = 0
        if cat in table.header:
            col = table.column(cat)
            for _, row in table.rows:
                tokens = _split_cell(row[col])
                if tokens:
                    if _is_decimal(tokens[0]):
                        numeric += 1
                    else:
                        paths += 1
        if numeric == paths == 0:
            flags.append(cat in KNOWN_IMAGE_LEVEL)
        else:
            flags.append(numeric > paths)
    return tuple(flags)


def _parse_index(
    root: pathlib.Path, table: _Table, labels: LabelSpace, known: np.ndarray
) -> list[Record]:
    path = root / table.name
    col = table.column
    meta = [col(c) for c in META_COLUMNS]
    cats = [
        (cat, col(cat), labels.image_level[ic])
        for ic, cat in enumerate(labels.categories)
        if cat in table.header
    ]
    records = []
    # Messages are built only on failure: this loop runs over ~63k rows at every open.
    for line, row in table.rows:
        image, split, *sizes = (row[k].strip() for k in meta)
        if _escapes(image):
            raise _escape_error(image, f"{path} line {line}, column 'image'", "image")
        if not split:
            raise BrodenFormatError(f"{path} line {line}: empty 'split'; expected train or val.")
        if all(_is_decimal(v) and v[0] != "0" for v in sizes):
            ih, iw, sh, sw = map(int, sizes)
        else:
            ih, iw, sh, sw = (
                _parse_int(v, f"{path} line {line}", c, minimum=1)
                for v, c in zip(sizes, META_COLUMNS[2:], strict=True)
            )
        pixel: dict[str, tuple[str, ...]] = {}
        image_labels: dict[str, tuple[int, ...]] = {}
        for cat, k, is_image_level in cats:
            tokens = _split_cell(row[k])
            if not tokens:
                continue
            if is_image_level:
                numbers = []
                for t in tokens:
                    if not _is_decimal(t):
                        raise BrodenFormatError(
                            f"{path} line {line}, column {cat!r}: {t!r} is not a label number; "
                            f"{cat!r} is an image-level category (its other cells hold "
                            ";-separated decimal label numbers). Fix or restore index.csv."
                        )
                    n = int(t)
                    if n >= len(known) or not known[n]:
                        raise BrodenFormatError(
                            f"{path} line {line}, column {cat!r}: label number {n} is not in "
                            f"{root / LABEL_FILE}; index.csv and label.csv come from different "
                            "releases."
                        )
                    # The release has ~2,000 images with a literal image-level 0: never a concept.
                    if n:
                        numbers.append(n)
                if numbers:
                    image_labels[cat] = _unique(numbers)
            else:
                for t in tokens:
                    if _is_decimal(t):
                        raise BrodenFormatError(
                            f"{path} line {line}, column {cat!r}: {t!r} is a label number but "
                            f"{cat!r} is a pixel category (its other cells hold ;-separated PNG "
                            "paths). Fix or restore index.csv."
                        )
                    if _escapes(t):
                        raise _escape_error(
                            t, f"{path} line {line}, column {cat!r}", "segmentation PNG"
                        )
                pixel[cat] = tuple(tokens)
        records.append(Record(line, image, split, ih, iw, sh, sw, pixel, image_labels))
    return records


def _common_sizes(
    root: pathlib.Path, records: list[Record]
) -> tuple[tuple[int, int], tuple[int, int]]:
    if not records:
        return (0, 0), (0, 0)
    first = records[0]
    image_size, seg_size = (first.ih, first.iw), (first.sh, first.sw)
    for r in records:
        if (r.ih, r.iw) != image_size or (r.sh, r.sw) != seg_size:
            raise BrodenFormatError(
                f"{root / INDEX_FILE} line {r.line}: sizes ih,iw,sh,sw = {r.ih},{r.iw},"
                f"{r.sh},{r.sw} differ from line {first.line} ({first.ih},{first.iw},"
                f"{first.sh},{first.sw}); one dataset must have one resolution. Do not mix "
                "rows of broden1_224/227/384."
            )
    return image_size, seg_size

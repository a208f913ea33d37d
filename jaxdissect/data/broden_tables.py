"""The CSV files of a Broden folder, read and checked: categories, labels, coverage, rows.

- `category.csv` (`name,...`): the categories, in this order everywhere.
- `label.csv` (`number,name,category,frequency,coverage,syns`): one row per
  label number in [1, 65535] (what a PNG's R + 256 * G holds); the release has no row
  for 0 ("unlabeled").
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
no c_<cat>.csv, label 0 and unused numbers get -1. Every problem raises
`BrodenFormatError`, naming the file and line and how to fix it.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import pathlib
import posixpath
import re
from collections.abc import Sequence

import numpy as np

from jaxdissect.data.files import check_regular
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
# The largest label number: a label PNG encodes R + 256 * G in 16 bits, and index.csv's
# image-level numbers must be label.csv's, so a typo cannot widen the label space past it.
_MAX_LABEL_NUMBER = (1 << 16) - 1
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")
_SAFE_CATEGORY = re.compile(r"[A-Za-z0-9_.\-]+")


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
    check_regular(path, None, what, BrodenFormatError)  # a FIFO would hang the read
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


# The most digits a number in a Broden table is read with: longer ones are out of every
# range, and refused before int() (which refuses over 4,300 digits, naming nothing).
_MAX_DIGITS = 18


def _shown(text: str) -> str:
    """`text` for a message: repr'd, cut after 40 characters."""
    return repr(text) if len(text) <= 40 else f"{text[:40]!r}... ({len(text)} characters)"


def _parse_int(text: str, where: str, column: str, *, minimum: int) -> int:
    """Parses a decimal integer >= minimum, or raises naming file, line and column."""
    s = text.strip()
    if not _is_decimal(s) or len(s) > _MAX_DIGITS or int(s) < minimum:
        raise BrodenFormatError(
            f"{where}: column {column!r} holds {_shown(text)}, expected a whole number >= "
            f"{minimum}; fix or restore the file."
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
    """True for paths that would leave `images/` (empty, absolute, drive letter, `..`) or
    that no file can have (a NUL character)."""
    parts = path.replace("\\", "/").split("/")
    return not parts[0] or ".." in parts or bool(_WINDOWS_DRIVE.match(path)) or "\0" in path


def _escape_error(path: str, where: str, what: str) -> BrodenFormatError:
    return BrodenFormatError(
        f"{where}: {what} path {path!r} is empty, holds a NUL character or escapes the dataset "
        f"folder; paths must be relative to {IMAGES_DIR}/ without '..' (the index.csv is "
        "corrupt or was edited)."
    )


def _split_cell(cell: str) -> list[str]:
    # Empty pieces ("3;;4", a trailing ';') carry nothing, as in NetDissect.
    if ";" not in cell:  # the common case, kept cheap: 63k rows x 6 columns
        cell = cell.strip()
        return [cell] if cell else []
    return [t for t in (t.strip() for t in cell.split(";")) if t]


def unique(values: list[int]) -> tuple[int, ...]:
    return tuple(dict.fromkeys(values))


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
        if number > _MAX_LABEL_NUMBER:
            raise BrodenFormatError(
                f"{where}: label number {number} is above {_MAX_LABEL_NUMBER}, the largest a "
                "label PNG encodes (R + 256 * G); fix the row or restore the file."
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
    known = np.zeros(_MAX_LABEL_NUMBER + 1, dtype=bool)
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
    anywhere falls back to `KNOWN_IMAGE_LEVEL`. Every category needs a column.
    """
    where = f"{root / table.name} line 1"
    for name in table.header:
        if name not in META_COLUMNS and name not in categories:
            raise BrodenFormatError(
                f"{where}: column {name!r} is not a category of {root / CATEGORY_FILE} "
                f"({', '.join(categories)}); index.csv and category.csv come from different "
                "releases, restore them."
            )
    missing = [cat for cat in categories if cat not in table.header]
    if missing:
        raise BrodenFormatError(
            f"{where}: no column for {', '.join(map(repr, missing))}, a category of "
            f"{root / CATEGORY_FILE}; add the column (empty cells: no data) or remove the "
            "category from category.csv and its c_<category>.csv."
        )
    flags = []
    for cat in categories:
        numeric = paths = 0
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
    first_line: dict[str, int] = {}  # image -> the line that lists it
    # Messages are built only on failure: this loop runs over ~63k rows at every open.
    for line, row in table.rows:
        image, split, *sizes = (row[k].strip() for k in meta)
        if _escapes(image):
            raise _escape_error(image, f"{path} line {line}, column 'image'", "image")
        if first_line.setdefault(posixpath.normpath(image), line) != line:
            raise BrodenFormatError(
                f"{path} line {line}: image {image!r} is listed again (first at line "
                f"{first_line[posixpath.normpath(image)]}); it would count twice. Delete "
                "the repeated row."
            )
        if not split:
            raise BrodenFormatError(f"{path} line {line}: empty 'split'; expected train or val.")
        if all(_is_decimal(v) and v[0] != "0" and len(v) <= _MAX_DIGITS for v in sizes):
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
                    n = int(t) if len(t) <= _MAX_DIGITS else len(known)
                    if n >= len(known) or not known[n]:
                        number = n if len(t) <= _MAX_DIGITS else _shown(t)
                        raise BrodenFormatError(
                            f"{path} line {line}, column {cat!r}: label number {number} is not in "
                            f"{root / LABEL_FILE}; index.csv and label.csv come from different "
                            "releases."
                        )
                    # The release has ~2,000 images with a literal image-level 0: never a concept.
                    if n:
                        numbers.append(n)
                if numbers:
                    image_labels[cat] = unique(numbers)
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


def first_image_size(root: str | pathlib.Path) -> tuple[int, int] | None:
    """(ih, iw) of the first row of `root`'s index.csv (every row's, in a valid folder), read
    without parsing the folder; None where there is no such file or cell (opening the
    folder then says what is wrong)."""
    path = pathlib.Path(root) / INDEX_FILE
    if not path.is_file():  # nor a FIFO, which would hang the read
        return None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header, row = next(reader), next(reader)
            return int(row[header.index("ih")]), int(row[header.index("iw")])
    except (OSError, UnicodeDecodeError, StopIteration, ValueError, IndexError):
        return None


@dataclasses.dataclass(frozen=True, eq=False)
class Tables:
    """What the CSV files of a Broden folder say.

    Attributes:
      labels: the label space (categories in category.csv order, primaries, image-level).
      records: every index.csv row, in file order.
      known_labels: bool [65536], True at 0 and every number label.csv defines.
      coverage: float64 [num_categories, num_labels], NaN where absent.
      image_size, seg_size: (ih, iw) and (sh, sw), common to all rows.
      files: (file name, bytes) of every CSV file read, for the fingerprint.
    """

    labels: LabelSpace
    records: tuple[Record, ...]
    known_labels: np.ndarray
    coverage: np.ndarray
    image_size: tuple[int, int]
    seg_size: tuple[int, int]
    files: tuple[tuple[str, bytes], ...]


_IN_CATEGORY = re.compile(r"\s*([^()]+?)\s*\(\d+\)\s*")  # label.csv's "material(36)"


def _check_category_files(
    root: pathlib.Path,
    categories: tuple[str, ...],
    label_table: _Table,
    coverage: np.ndarray,
    records: list[Record],
) -> None:
    """The c_<cat>.csv files against the other tables. A category with data in index.csv
    whose c_<cat>.csv lists no label is refused (its labels would silently go unscored);
    labels that label.csv's `category` column puts in a category its c_<cat>.csv does not
    list are logged (scored in their other categories only, or not at all)."""
    from absl import logging

    listed = ~np.isnan(coverage)
    for ic, cat in enumerate(categories):
        if listed[ic].any():
            continue
        used = next((r for r in records if cat in r.pixel or cat in r.image_labels), None)
        if used is not None:
            raise BrodenFormatError(
                f"{root / f'c_{cat}.csv'}: lists no label, but {root / INDEX_FILE} line "
                f"{used.line} has {cat!r} data; restore c_{cat}.csv from the release (or "
                f"remove {cat!r} from category.csv and index.csv)."
            )
    if "category" not in label_table.header:
        return
    num_col, cat_col = label_table.column("number"), label_table.column("category")
    index = {c: ic for ic, c in enumerate(categories)}
    missing: dict[str, list[int]] = {}
    for line, row in label_table.rows:  # numbers checked by `_parse_labels`: parsed alike
        number = _parse_int(
            row[num_col], f"{root / label_table.name} line {line}", "number", minimum=0
        )
        for token in row[cat_col].split(";"):
            m = _IN_CATEGORY.fullmatch(token)
            ic = index.get(m.group(1)) if m else None
            if ic is not None and number and not listed[ic, number]:
                missing.setdefault(categories[ic], []).append(number)
    for cat, numbers in missing.items():
        logging.warning(
            "%s puts %d label(s) in %r that %s does not list (e.g. %d): they are not scored "
            "as %r; restore %s if it was cut",
            root / LABEL_FILE,
            len(numbers),
            cat,
            root / f"c_{cat}.csv",
            numbers[0],
            cat,
            f"c_{cat}.csv",
        )


def read_tables(root: pathlib.Path) -> Tables:
    """Reads and checks category.csv, label.csv, every c_<cat>.csv and index.csv of `root`."""
    category_table = _read_table(root, CATEGORY_FILE, ("name",), "the list of categories")
    categories = _parse_categories(root, category_table)
    label_table = _read_table(root, LABEL_FILE, ("number", "name"), "the label numbers and names")
    names, known = _parse_labels(root, label_table)
    cat_tables = [
        _read_table(root, f"c_{c}.csv", ("number", "coverage"), f"the labels of category {c!r}")
        for c in categories
    ]
    coverage = _category_coverage(root, categories, cat_tables, known)
    index_table = _read_table(
        root, INDEX_FILE, META_COLUMNS, "the list of images and their label files"
    )
    labels = LabelSpace(
        categories=categories,
        names=names,
        primary=primary_categories(coverage),
        image_level=_infer_image_level(root, categories, index_table),
    )
    records = _parse_index(root, index_table, labels, known)
    _check_category_files(root, categories, label_table, coverage, records)
    image_size, seg_size = _common_sizes(root, records)
    return Tables(
        labels=labels,
        records=tuple(records),
        known_labels=known,
        coverage=coverage,
        image_size=image_size,
        seg_size=seg_size,
        files=tuple(
            (t.name, t.raw) for t in (category_table, label_table, *cat_tables, index_table)
        ),
    )

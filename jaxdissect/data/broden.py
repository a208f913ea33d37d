"""Reader for an unzipped Broden folder (`broden1_224`, `broden1_227`, `broden1_384`).

`Broden.open` reads and checks the CSV files (`broden_tables`: the layout NetDissect's
`joinseg.py` wrote for the release), then walks every file the selected rows list
(`broden_images`): each must be a regular file inside the folder; its size, mtime and
ctime (or, with `data_hash="content"`, its bytes) go into the fingerprint
that keys every stored stage, so an added, removed or edited file invalidates them. With
`check_headers` (the default) a second walk reads each image's and label PNG's header:
size and mode are checked before any pass. Given `header_memo` (a folder), a scan that
passed is remembered there under the fingerprint and its check version, and an open of
the same files skips it (the per-file stat or content that the fingerprint holds is what
would change if a file did). Headers are checked again, decoding and PNG label numbers
for the first time, when an example is read (`check_labels` does it alone). Label PNGs
are decoded to RGB first, so any lossless re-encoding (palette, grayscale) reads the
same. Every problem raises `BrodenFormatError`, naming the file (and index.csv line) and
how to fix it.
"""

from __future__ import annotations

import dataclasses
import operator
import pathlib
from collections.abc import Sequence

import numpy as np

from jaxdissect import store
from jaxdissect.data import broden_images, files
from jaxdissect.data.broden_tables import (
    IMAGES_DIR,
    INDEX_FILE,
    LABEL_FILE,
    SPLITS,
    BrodenFormatError,
    Record,
    primary_categories,
    read_tables,
    unique,
)
from jaxdissect.data.files import Fingerprint, check_data_hash
from jaxdissect.labelspace import LabelSpace


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
      known_labels: bool [65536], True at 0 and every number label.csv defines
        (indexed by a PNG's R + 256 * G without bounds checks).
      coverage: float64 [num_categories, num_labels], each label's coverage in each
        c_<cat>.csv, NaN where absent: `primary_categories(coverage, use)` recomputes
        primaries over a subset of categories.
      split, max_images: the selection `open` was given.
      tables_hash: `files.tables_hash` of the CSV files.
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
    tables_hash: str | None = dataclasses.field(default=None, repr=False)
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
          data_hash: how the selected rows' files enter the fingerprint: `stat` (size,
            mtime and ctime: `files.Fingerprint`) or `content` (their bytes, read in full).
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

        tables = read_tables(root)
        labels, all_records = tables.labels, tables.records

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
                given = f"split={split!r}" + (
                    "" if max_images is None else f", max_images={max_images}"
                )
                why = (
                    f"no rows are left after {given} "
                    f"(it has {len(all_records)} rows, splits: {', '.join(present)})"
                )
            fix = "another split" if max_images is None else "another split or max_images"
            raise BrodenFormatError(
                f"{root / INDEX_FILE}: empty index: {why}; choose {fix}, or restore the file."
            )

        digest = Fingerprint("jaxdissect-broden-v2", data_hash)
        for name, raw in tables.files:
            digest.add_bytes(name, raw)
        digest.add_bytes("selection", f"split={split}\0max_images={max_images}".encode())
        broden_images.walk_files(root, labels, records, digest)
        fingerprint = digest.hexdigest()
        if check_headers:
            memo = broden_images.header_memo_path(header_memo, fingerprint)
            if memo is None or not memo.is_file():
                broden_images.check_headers(root, labels, records)
                if memo is not None:
                    store.write_bytes(memo, b"")

        return cls(
            root=root,
            labels=labels,
            records=tuple(records),
            image_size=tables.image_size,
            seg_size=tables.seg_size,
            max_planes=max(1, max(r.num_planes for r in records)),
            max_image_labels=max(
                1, max(len(_flat_image_labels(labels.categories, r)) for r in records)
            ),
            known_labels=tables.known_labels,
            coverage=tables.coverage,
            split=split,
            max_images=max_images,
            tables_hash=files.tables_hash(tables.files),
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
        (by size and times, or content: `open`'s `data_hash`), for cache keys."""
        return self._fingerprint

    def identity(self, count: int | None = None) -> str | None:
        """`files.probe_identity` of these rows (or of the first `count`)."""
        return files.probe_identity(
            self.tables_hash, self.split, len(self) if count is None else count
        )

    def _record(self, i: int) -> tuple[int, Record]:
        i = operator.index(i)
        n = len(self.records)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range for a Broden of {n} images")
        i %= n
        return i, self.records[i]

    def read_image(self, i: int) -> np.ndarray:
        """Decodes image i: uint8 [ih, iw, 3] RGB."""
        _, rec = self._record(i)
        path = self.root / IMAGES_DIR / rec.image
        where = broden_images.listed_at(self.root / INDEX_FILE, rec, "image")
        with broden_images.open_image(path, where, "image") as im:
            broden_images.check_image_header(self.root, rec, path, where, im)
            # Any accepted mode becomes 8-bit RGB; the array is taken before the file closes.
            return broden_images.decode(im, path)

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
        cats = self.labels.select(categories)
        pngs = [(cat, png) for cat in cats for png in rec.pixel.get(cat, ())]
        planes = np.zeros((len(pngs), rec.sh, rec.sw), dtype=np.int32)
        for k, (cat, png) in enumerate(pngs):
            planes[k] = self._read_png(rec, cat, png)
        image_labels = np.asarray(_flat_image_labels(cats, rec), dtype=np.int32)
        return planes, image_labels

    def _read_png(self, rec: Record, cat: str, png: str) -> np.ndarray:
        path = self.root / IMAGES_DIR / png
        where = broden_images.listed_at(self.root / INDEX_FILE, rec, cat)
        with broden_images.open_image(path, where, "segmentation PNG", checksums=True) as im:
            broden_images.check_png_header(self.root, rec, path, where, im)
            rgb = broden_images.decode(im, path)
            broden_images.check_palette_indices(im, path, where)
            broden_images.check_label_colours(rgb, im.mode, path, where)
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
        cats = self.labels.select(categories)
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
    return unique([n for c in categories for n in rec.image_labels.get(c, ())])


__all__ = [
    "IMAGES_DIR",
    "SPLITS",
    "Broden",
    "BrodenFormatError",
    "Record",
    "primary_categories",
]

"""Broden as a TFDS dataset: build `array_record` files once, read them at random.

The builder reads the user's unzipped `broden1_S` folder (real or synthetic)
through `jaxdissect.data.broden.Broden` and writes, per example:

- `image`: the image file's bytes (JPEG in the release), not re-encoded.
  `TfdsBroden` decodes them with PIL as `Broden.read_image` decodes the file,
  so pixels match bit for bit (no TensorFlow; and no OpenCV, whose JPEG
  decoder TFDS would prefer if it were installed).
- `pixel_labels`: the example's own label planes, uint16 [P_i, sh, sw],
  zlib-compressed raw bytes (exact, and cheaper to decode than PNG planes).
  Broden labels are R + 256 * G of a PNG, so uint16 always holds them.
- `image_labels`: int32 [Q_i].
- `plane_categories`: int32 [P_i], the category (index into the label space's
  categories) each plane comes from; `category_image_labels` and
  `image_label_categories`: int32, every category's image-level labels with
  their category. With them `read_labels(i, categories)` keeps only the
  selected categories' planes and labels, as `Broden.read_labels` does.
- `index`: the example's position in the folder's full (`all`) ordering.

Records are written unshuffled (sorted by `index`) and `TfdsBroden` checks
every example's `index` on read, so it serves examples in the folder's order.
The label space, each label's coverage per category (to choose primary
categories among selected ones), padding sizes and source fingerprints live in
the build's `metadata.json`: a build is readable without the original folder.

No TensorFlow is needed: build with `file_format="array_record"` and read with
`as_data_source`; `as_dataset` / `tfrecord` would need TensorFlow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import operator
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from google.protobuf import json_format
from PIL import Image

from jaxdissect.data import files, images
from jaxdissect.data.broden import IMAGES_DIR, Broden
from jaxdissect.data.files import Fingerprint, add_folder_files, check_data_hash
from jaxdissect.labelspace import LabelSpace

RESOLUTIONS = (224, 227, 384)
# What identifies a build made before `tables_hash` was recorded (its metadata).
_OLD_BUILD_IDENTITY = ("labels", "coverage", "image_size", "seg_size", "record_splits")
SPLITS = ("train", "val")
# Bumped when the layout of `metadata.json` or of the features changes.
METADATA_FORMAT = 2
# The fix for a build whose files cannot be read.
REBUILD = "build it again with jaxdissect.data.tfds_broden.build(broden_dir, data_dir)"
# What TFDS, protobuf and json raise on a build whose JSON files (dataset_info.json,
# features.json, metadata.json) were damaged or edited, and what reading a field that is
# missing or of another type raises: `opened` makes them one line naming the build.
_DAMAGED = (ValueError, TypeError, KeyError, AttributeError, IndexError, OSError, ImportError)
_DAMAGED += (NotImplementedError, OverflowError, json_format.ParseError)

_CITATION = """\
@inproceedings{bau2017network,
  title={Network Dissection: Quantifying Interpretability of Deep Visual Representations},
  author={Bau, David and Zhou, Bolei and Khosla, Aditya and Oliva, Aude and Torralba, Antonio},
  booktitle={CVPR},
  year={2017}
}
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Broden cannot be downloaded automatically. Obtain `broden1_224` (or
`broden1_227`, `broden1_384`; or generate a synthetic one with
`jaxdissect.data.synthetic.generate`), unzip it, and pass the folder as the
manual directory: either the `broden1_S` folder itself (the one holding
`index.csv`, `label.csv`, `category.csv` and `images/`) or a folder containing
`broden1_S/`. With `jaxdissect.data.tfds_broden.build(broden_dir, data_dir,
resolution=S)` this is `broden_dir`; with TFDS directly use
`download_and_prepare(file_format="array_record",
download_config=tfds.download.DownloadConfig(manual_dir=...))`.
"""


@dataclasses.dataclass(eq=False)
class BrodenConfig(tfds.core.BuilderConfig):
    """One Broden release: images S x S, segmentations (S/2) x (S/2)."""

    resolution: int = 224


def _features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            # Given the file's bytes (JPEG in the release), which TFDS stores as they are.
            "image": tfds.features.Image(shape=(None, None, 3)),
            "pixel_labels": tfds.features.Tensor(
                shape=(None, None, None), dtype=np.uint16, encoding="zlib"
            ),
            "image_labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "plane_categories": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "category_image_labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "image_label_categories": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int64),
        }
    )


def find_broden_root(manual_dir: str | os.PathLike[str], resolution: int) -> Path:
    """The `broden1_S` folder in or at `manual_dir`; a clear error when absent."""
    manual = Path(manual_dir)
    for candidate in (manual, manual / f"broden1_{resolution}"):
        if (candidate / "index.csv").is_file():
            return candidate
    if not manual.exists():
        problem = f"Broden folder {manual} does not exist."
    else:
        problem = (
            f"No Broden data in {manual}: expected {manual / 'index.csv'} or "
            f"{manual / f'broden1_{resolution}' / 'index.csv'}."
        )
    raise FileNotFoundError(f"{problem}\n{MANUAL_DOWNLOAD_INSTRUCTIONS}")


def _labels_to_json(labels: LabelSpace) -> dict[str, Any]:
    return {
        "categories": list(labels.categories),
        "names": list(labels.names),
        "primary": [int(p) for p in labels.primary],
        "image_level": [bool(b) for b in labels.image_level],
    }


def _coverage_to_json(coverage: np.ndarray) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in coverage]


def _coverage_from_json(rows: list[list[float | None]]) -> np.ndarray:
    return np.asarray([[np.nan if v is None else v for v in row] for row in rows], np.float64)


def _labels_from_json(d: dict[str, Any]) -> LabelSpace:
    return LabelSpace(
        categories=tuple(d["categories"]),
        names=tuple(d["names"]),
        primary=np.asarray(d["primary"], dtype=np.int32),
        image_level=tuple(bool(b) for b in d["image_level"]),
    )


class OwnCodePath:
    """Mixin for builders defined inside a package: their `code_path` is their own file.

    TFDS's default needs the `importlib_resources` backport there; the answer is
    simply the file that defines the class.
    """

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))


class BrodenBuilder(OwnCodePath, tfds.core.GeneratorBasedBuilder):
    """TFDS builder of Broden from a manually downloaded `broden1_S` folder."""

    name = "broden"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        BrodenConfig(
            name=str(r),
            resolution=r,
            description=f"broden1_{r}: images {r}x{r}, segmentations {r // 2}x{r // 2}.",
        )
        for r in RESOLUTIONS
    ]
    DEFAULT_CONFIG_NAME = "224"
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Broden (broadly and densely labeled): the probe set of Network Dissection. "
                "Label 0 means unlabeled; label planes are zero-padded on read."
            ),
            features=_features(),
            homepage="http://netdissect.csail.mit.edu/",
            citation=_CITATION,
            metadata=tfds.core.MetadataDict(),
            # Records sorted by `index`: reads in folder order stay sequential.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        resolution = self.builder_config.resolution
        try:
            manual = dl_manager.manual_dir
        except AssertionError as e:
            # TFDS reports a missing or empty manual dir (with our instructions) this way.
            raise FileNotFoundError(str(e)) from None
        root = find_broden_root(manual, resolution)
        broden = Broden.open(root)
        if tuple(broden.image_size) != (resolution, resolution):
            ih, iw = broden.image_size
            raise ValueError(
                f"{root} holds {ih}x{iw} images but the builder config is {resolution}: "
                f"use config '{ih}' or the broden1_{resolution} folder."
            )
        record_splits = [r.split for r in broden.records]
        unknown = set(record_splits) - set(SPLITS)
        if unknown:
            raise ValueError(f"{root}/index.csv has unknown splits {sorted(unknown)}")
        present = [s for s in SPLITS if s in record_splits]
        per_split = {"all": broden}
        for s in present:
            # The `all` open above has checked every file's header already.
            per_split[s] = Broden.open(root, split=s, check_headers=False)
        self.info.metadata.update(
            {
                "format": METADATA_FORMAT,
                "resolution": resolution,
                "source": str(root),
                "labels": _labels_to_json(broden.labels),
                "coverage": _coverage_to_json(broden.coverage),
                "image_size": [int(s) for s in broden.image_size],
                "seg_size": [int(s) for s in broden.seg_size],
                # One letter per example of the `all` ordering: t(rain) or v(al).
                "record_splits": "".join(s[0] for s in record_splits),
                "tables_hash": broden.tables_hash,
                "splits": {
                    s: {
                        "num_examples": len(b),
                        "max_planes": int(b.max_planes),
                        "max_image_labels": int(b.max_image_labels),
                        "fingerprint": b.fingerprint(),
                    }
                    for s, b in per_split.items()
                },
            }
        )
        # TFDS refuses to write an empty split: a folder may hold only one.
        return {
            s: self._generate_examples(broden, [i for i, r in enumerate(record_splits) if r == s])
            for s in present
        }

    def _generate_examples(
        self, broden: Broden, indices: list[int]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        categories = broden.labels.categories
        for i in indices:
            # Decoding once checks the file (size, truncation) with Broden's own errors.
            broden.read_image(i)
            # Category by category: each plane and image-level label keeps its category.
            per_category = [broden.read_labels(i, (c,)) for c in categories]
            planes = np.concatenate([p for p, _ in per_category])
            listed = np.concatenate([q for _, q in per_category])
            yield (
                i,
                {
                    "image": _image_path(broden, i).read_bytes(),
                    # Exact: PNG labels are R + 256 * G, below 2**16.
                    "pixel_labels": planes.astype(np.uint16),
                    "image_labels": np.asarray(list(dict.fromkeys(listed.tolist())), np.int32),
                    "plane_categories": np.repeat(
                        np.arange(len(categories), dtype=np.int32),
                        [len(p) for p, _ in per_category],
                    ),
                    "category_image_labels": listed.astype(np.int32),
                    "image_label_categories": np.repeat(
                        np.arange(len(categories), dtype=np.int32),
                        [len(q) for _, q in per_category],
                    ),
                    "index": i,
                },
            )


def _image_path(broden: Broden, i: int) -> Path:
    return Path(broden.root) / IMAGES_DIR / broden.records[i].image


def decode_image(data: bytes) -> np.ndarray:
    """uint8 [h, w, 3] RGB pixels of encoded image bytes, decoded like `Broden`."""
    with Image.open(io.BytesIO(data)) as im:
        return images.to_rgb8(im)


def config_for(resolution: int) -> BrodenConfig | str:
    """The builder config of a resolution: a release's, or a custom one (e.g. tiny test data)."""
    if resolution in RESOLUTIONS:
        return str(resolution)
    return BrodenConfig(
        name=str(resolution), resolution=resolution, description="custom resolution"
    )


def build(
    broden_dir: str | os.PathLike[str],
    data_dir: str | os.PathLike[str],
    *,
    resolution: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Build (or reuse) the TFDS array_record files of a Broden folder.

    Args:
      broden_dir: the unzipped `broden1_S` folder (or a folder containing it).
      data_dir: TFDS data directory; the build lands in
        `data_dir/broden/<resolution>/<version>/`.
      resolution: the image size S; by default the folder's.
      overwrite: rebuild even if a build exists. Without it, an existing build
        is reused if it comes from the same source (fingerprint), else an error.

    Returns:
      The build directory, to pass to `TfdsBroden`.
    """
    if resolution is None:
        candidates = [Path(broden_dir)] + [Path(broden_dir) / f"broden1_{r}" for r in RESOLUTIONS]
        root = next((c for c in candidates if (c / "index.csv").is_file()), None)
        if root is None:
            find_broden_root(broden_dir, RESOLUTIONS[0])  # Raises the explanatory error.
        ih, iw = Broden.open(root).image_size
        if ih != iw:
            raise ValueError(f"{root}: images are {ih}x{iw}, Broden's are square")
        resolution = ih
    else:
        root = find_broden_root(broden_dir, resolution)
    config = config_for(resolution)
    path = Path(BrodenBuilder(config=config, data_dir=os.fspath(data_dir)).data_dir)
    if (path / "dataset_info.json").is_file():
        if overwrite:
            # TFDS cannot overwrite through a builder that loaded the old build's info.
            shutil.rmtree(path)
        else:
            built = tfds.builder_from_directory(path).info.metadata
            expected = Broden.open(root).fingerprint()
            if built.get("splits", {}).get("all", {}).get("fingerprint") != expected:
                raise FileExistsError(
                    f"{path} holds a build of another Broden ({built.get('source')}), or of "
                    "this one before some of its files changed; pass overwrite=True or another "
                    "data_dir."
                )
            return path
    builder = BrodenBuilder(config=config, data_dir=os.fspath(data_dir))
    builder.download_and_prepare(
        file_format="array_record",
        # Offline by design: never look for a prepared copy on GCS.
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(root), try_download_gcs=False
        ),
    )
    return path


def find_builds(path: str | os.PathLike[str]) -> dict[int, list[Path]]:
    """The finished build directories under `path` (a TFDS data dir or its `broden/`
    folder), by resolution in ascending order (none: empty)."""
    path = Path(path)
    base = path / BrodenBuilder.name if (path / BrodenBuilder.name).is_dir() else path
    # Unfinished builds live in `incomplete.*` folders, not version-named ones.
    found: dict[int, list[Path]] = {}
    for f in sorted(base.glob("*/*/dataset_info.json")):
        if f.parent.parent.name.isdigit() and tfds.core.Version.is_valid(f.parent.name):
            found.setdefault(int(f.parent.parent.name), []).append(f.parent)
    return dict(sorted(found.items()))


def find_build(path: str | os.PathLike[str], resolution: int | None = None) -> Path:
    """The build directory (holding `dataset_info.json`) at or under `path`.

    `path` is a build directory, a TFDS data dir, or its `broden/` folder; `resolution`
    picks among builds at several; with several versions the newest is taken.
    """
    path = Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    builds = find_builds(path)
    if not builds:
        raise FileNotFoundError(
            f"No TFDS Broden build under {path}: build one with "
            "jaxdissect.data.tfds_broden.build(broden_dir, data_dir)."
        )
    if resolution is None and len(builds) > 1:
        raise ValueError(
            f"{path} holds Broden builds at resolutions {', '.join(map(str, builds))}: pass "
            f"resolution= one of them, or the build's own folder (e.g. {builds[max(builds)][0]})"
        )
    if resolution is not None and resolution not in builds:
        raise FileNotFoundError(
            f"No TFDS Broden build at resolution {resolution} under {path} (it holds "
            f"{', '.join(map(str, builds))}): pass one of those, or build one with "
            "jaxdissect.data.tfds_broden.build(broden_dir, data_dir, resolution=...)."
        )
    found = builds[next(iter(builds)) if resolution is None else resolution]
    return max(found, key=lambda d: tfds.core.Version(d.name))


class TfdsBroden:
    """Random-access Broden read from a TFDS build, in the folder's order.

    `TfdsBroden(d, split)[i]` equals `Broden.open(folder, split=split)[i]`
    field by field; `loader.batches` serves either.

    The fingerprint is the source folder's (stored at build time) and the stat (or,
    with `data_hash="content"`, the bytes) of every file of the build.

    Attributes:
      builder_dir: the build directory.
      split: "all", "train" or "val".
      labels: the `LabelSpace`.
      coverage: as `Broden.coverage`.
      image_size, seg_size: as `Broden` reports them.
      max_planes, max_image_labels: P and Q, the padded sizes of this split.
      source_fingerprint: `Broden.fingerprint()` of the folder's split when it was built.
      tables_hash: the folder's `Broden.tables_hash` (None in older builds).
    """

    def __init__(
        self,
        data_dir_or_builder_dir: str | os.PathLike[str],
        split: str = "all",
        *,
        resolution: int | None = None,
        data_hash: str = "stat",
    ):
        if split not in ("all", *SPLITS):
            raise ValueError(f"split must be 'all', 'train' or 'val', not {split!r}")
        check_data_hash(data_hash)
        self.builder_dir = find_build(data_dir_or_builder_dir, resolution)
        self.split, self.data_hash = split, data_hash
        with opened(self.builder_dir, REBUILD):
            builder = tfds.builder_from_directory(self.builder_dir)
            meta = dict(builder.info.metadata)
            features = builder.info.features.to_json()
        if meta.get("format") != METADATA_FORMAT:
            raise ValueError(
                f"{self.builder_dir} was built with metadata format {meta.get('format')}, "
                f"this code reads {METADATA_FORMAT}: rebuild it"
            )
        if features != _features().to_json():  # the records would decode to other fields
            raise ValueError(
                f"{self.builder_dir}: its features.json describes other features than this "
                f"code's builder writes (edited, or written by other code); {REBUILD}"
            )
        with opened(self.builder_dir, REBUILD, "metadata.json"):
            info = meta["splits"].get(split)
            if info is None:
                raise BuildError(f"{self.builder_dir} has no {split!r} examples")
            self.labels = _labels_from_json(meta["labels"])
            self.coverage = _coverage_from_json(meta["coverage"])
            self.image_size = _positive_pair(meta["image_size"], "image_size")
            self.seg_size = _positive_pair(meta["seg_size"], "seg_size")
            self.resolution = operator.index(meta["resolution"])
            self.max_planes = operator.index(info["max_planes"])
            self.max_image_labels = operator.index(info["max_image_labels"])
            self.source_fingerprint = str(info["fingerprint"])
            self.tables_hash = meta.get("tables_hash")  # None in builds that predate it
            record_splits = np.frombuffer(meta["record_splits"].encode("ascii"), dtype=np.uint8)
            if self.coverage.shape != (len(self.labels.categories), len(self.labels.names)):
                raise ValueError(f"coverage of shape {self.coverage.shape}")
            if min(self.max_planes, self.max_image_labels) < 0:
                raise ValueError("negative max_planes or max_image_labels")
            if not np.isin(record_splits, [ord(s[0]) for s in SPLITS]).all():
                raise ValueError("record_splits holds other letters than t and v")
        self._fingerprint = _build_fingerprint(self.builder_dir, self.source_fingerprint, data_hash)
        self.metadata = meta

        # Position of every `all` example inside its TFDS split (records are sorted by index).
        position = np.zeros(len(record_splits), dtype=np.int64)
        split_ids = np.zeros(len(record_splits), dtype=np.int64)
        for k, s in enumerate(SPLITS):
            mask = record_splits == ord(s[0])
            position[mask] = np.arange(int(mask.sum()))
            split_ids[mask] = k
        keep = (
            np.arange(len(record_splits))
            if split == "all"
            else np.flatnonzero(record_splits == ord(split[0]))
        )
        # Per example of this view: global index, TFDS split, position in it.
        self._global = keep
        self._split_id = split_ids[keep]
        self._position = position[keep]
        if len(keep) != info.get("num_examples"):
            raise ValueError(f"{self.builder_dir}: metadata disagrees on the size of {split!r}")
        present = sorted({int(k) for k in self._split_id})
        with opened(self.builder_dir, REBUILD):
            self._sources = {
                k: builder.as_data_source(
                    split=SPLITS[k], decoders={"image": tfds.decode.SkipDecoding()}
                )
                for k in present
            }
        for k, source in self._sources.items():
            check_readable(source, f"{self.builder_dir}, the {SPLITS[k]!r} split", REBUILD)

    def __len__(self) -> int:
        return len(self._global)

    def __reduce__(self):
        # Reopen from the directory: TFDS sources hold open files.
        return (_reopen, (os.fspath(self.builder_dir), self.split, self.data_hash))

    def fingerprint(self) -> str:
        """Hash of the source folder's split fingerprint and of the build's files."""
        return self._fingerprint

    def identity(self, count: int | None = None) -> str | None:
        """`files.probe_identity` of this split (or of its first `count`): that of the folder
        it was built from. A build that predates `tables_hash` is identified by its own
        label metadata instead (equal for copies of it, never equal to a folder's)."""
        tables = self.tables_hash
        if tables is None:
            described = {k: self.metadata[k] for k in _OLD_BUILD_IDENTITY}
            tables = (
                "tfds-metadata:"
                + hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
            )
        return files.probe_identity(tables, self.split, len(self) if count is None else count)

    def _raw(self, i: int) -> tuple[int, dict[str, Any]]:
        """Example `i` (negative counts from the end) as stored: (i >= 0, record)."""
        i = operator.index(i)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range for a Broden of {n} images")
        i %= n
        k = int(self._split_id[i])
        try:
            ex = self._sources[k][int(self._position[i])]
        except (RuntimeError, OSError) as e:  # damage between the records the open checked
            where = f"{self.builder_dir}, the {SPLITS[k]!r} split, example {i}"
            raise unreadable(where, e, REBUILD) from None
        if int(ex["index"]) != int(self._global[i]):
            raise RuntimeError(
                f"{self.builder_dir}: the record of example {self._global[i]} holds example "
                f"{int(ex['index'])}: the build is not in index order, rebuild it"
            )
        return i, ex

    def read_image(self, i: int) -> np.ndarray:
        """Decodes image i: uint8 [ih, iw, 3] RGB."""
        return decode_image(self._raw(i)[1]["image"])

    def read_labels(
        self, i: int, categories: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Unpadded labels of image i: int32 [P_i, sh, sw] planes and int32 [Q_i].

        With `categories`, only those categories' planes and image-level labels, as
        `Broden.read_labels` gives them (the others are dropped before any use).
        """
        _, ex = self._raw(i)
        if categories is None:
            return (
                ex["pixel_labels"].astype(np.int32),
                np.asarray(ex["image_labels"], dtype=np.int32),
            )
        keep = [self.labels.categories.index(c) for c in self.labels.select(categories)]
        planes = ex["pixel_labels"][np.isin(ex["plane_categories"], keep)]
        listed = ex["category_image_labels"][np.isin(ex["image_label_categories"], keep)]
        image_labels = np.asarray(list(dict.fromkeys(listed.tolist())), dtype=np.int32)
        return planes.astype(np.int32), image_labels

    def check_labels(self, i: int) -> None:
        """Decodes the labels of image i (checked against label.csv when the build was made)."""
        self.read_labels(i)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        """Example i, the same arrays as `Broden.__getitem__`."""
        i, ex = self._raw(i)
        planes = ex["pixel_labels"]
        if planes.shape[1:] != self.seg_size or len(planes) > self.max_planes:
            raise ValueError(
                f"{self.builder_dir}, example {i}: label planes of shape {planes.shape}, "
                f"metadata.json says at most {self.max_planes} of {self.seg_size}; {REBUILD}"
            )
        pixel = np.zeros((self.max_planes, *self.seg_size), dtype=np.int32)
        pixel[: len(planes)] = planes
        image_labels = np.zeros((self.max_image_labels,), dtype=np.int32)
        image_labels[: len(ex["image_labels"])] = ex["image_labels"]
        return {
            "image": decode_image(ex["image"]).astype(np.float32),
            "pixel_labels": pixel,
            "image_labels": image_labels,
            "index": np.asarray(i, dtype=np.int32),
        }


class BuildError(ValueError):
    """A build refused with its own message (`opened` passes it on as it is)."""


@contextlib.contextmanager
def opened(build: str | os.PathLike[str], advice: str, what: str = "metadata") -> Iterator[None]:
    """Reading a build's metadata: what a damaged or edited JSON file of it raises (`_DAMAGED`)
    becomes one ValueError naming the build, `what` was read, the error's first line and
    `advice`."""
    try:
        yield
    except BuildError:
        raise
    except _DAMAGED as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if _denied(e):
            raise ValueError(
                f"{build}: its {what} cannot be read ({type(e).__name__}: {first}); "
                f"{_DENIED_ADVICE}"
            ) from None
        raise ValueError(
            f"{build}: its {what} is damaged or was edited ({type(e).__name__}: {first}); {advice}"
        ) from None


_DENIED_ADVICE = "check that this user may read the build's files"


def _denied(error: BaseException) -> bool:
    """Whether `error` (or what it was raised from) is a refused permission, not damage:
    TFDS and array_record wrap the OSError, or keep only its words."""
    while error is not None:
        if isinstance(error, PermissionError) or "Permission denied" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _positive_pair(value: Any, name: str) -> tuple[int, int]:
    pair = tuple(operator.index(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} {list(value)}: not two sizes >= 1")
    return pair


def check_readable(source: Any, where: str, advice: str) -> None:
    """Read the first and the last record of a TFDS data source: a missing or damaged
    array_record file is one line (`where`, the error, `advice`) when the data opens, not
    an error from inside a pass."""
    try:
        for i in {0, len(source) - 1} if len(source) else ():
            source[i]
    except (RuntimeError, OSError, ValueError) as e:
        raise unreadable(where, e, advice) from None


def unreadable(where: str, error: Exception, advice: str) -> ValueError:
    """The one-line error of array_record files that cannot be read: `where`, the first
    line of `error`, `advice`."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    advice = _DENIED_ADVICE if _denied(error) else advice
    return ValueError(f"{where}: its array_record files cannot be read ({first}); {advice}")


def _reopen(builder_dir: str, split: str, data_hash: str) -> TfdsBroden:
    return TfdsBroden(builder_dir, split, data_hash=data_hash)


def _build_fingerprint(builder_dir: Path, source: str, data_hash: str) -> str:
    """Hash of the source fingerprint and every file of the build (shards, JSON files)."""
    digest = Fingerprint("jaxdissect-tfds-broden-v1", data_hash)
    digest.add_bytes("source", source.encode())
    add_folder_files(digest, builder_dir, f"the TFDS build {builder_dir}")
    return digest.hexdigest()

"""Open the probe set a flag names: a Broden folder, its TFDS build, or the synthetic one."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxdissect.data import synthetic_cache
from jaxdissect.data.broden import Broden
from jaxdissect.data.files import check_data_hash


class Subset:
    """The first `n` examples of a random-access source (TFDS builds have no max_images)."""

    def __init__(self, source: Any, n: int):
        self.source, self.n = source, min(n, len(source))
        for name in ("labels", "image_size", "seg_size", "max_planes", "max_image_labels"):
            setattr(self, name, getattr(source, name))
        if hasattr(source, "coverage"):
            self.coverage = source.coverage

    def __len__(self) -> int:
        return self.n

    def _check(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"example {i} outside [0, {self.n})")
        return i

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return self.source[self._check(i)]

    def read_image(self, i: int) -> np.ndarray:
        return self.source.read_image(self._check(i))

    def read_labels(
        self, i: int, categories: Sequence[str] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.source.read_labels(self._check(i), categories)

    def check_labels(self, i: int) -> None:
        self.source.check_labels(self._check(i))

    def fingerprint(self) -> str:
        return f"{self.source.fingerprint()}:first{self.n}"

    def identity(self) -> str | None:
        return self.source.identity(self.n)


def identity_of(source: Any) -> str | None:
    """`source.identity()` (what the probe set is, wherever stored: `files.probe_identity`),
    or None for a source without one."""
    identity = getattr(source, "identity", None)
    return identity() if identity is not None else None


def probe_record(source: Any, description: str) -> dict[str, str | None]:
    """How results.json settings record a probe set: `dataset` (its description: name,
    split, image count), `dataset_fingerprint` (its files) and `dataset_identity`."""
    return {
        "dataset": description,
        "dataset_fingerprint": source.fingerprint(),
        "dataset_identity": identity_of(source),
    }


def probe_relation(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """Two `probe_record`s (keys may be missing or None in older results): "other" where
    their identities differ (or, where either is unknown, their descriptions), "copy" where
    the descriptions are equal but the files differ (another copy, or the same files stored
    again), else "same" (a TFDS build of a folder is the same probe set as the folder)."""
    ia, ib = a.get("dataset_identity"), b.get("dataset_identity")
    if ia is not None and ib is not None:
        if ia != ib:
            return "other"
    elif a.get("dataset") != b.get("dataset"):
        return "other"
    fa, fb = a.get("dataset_fingerprint"), b.get("dataset_fingerprint")
    if a.get("dataset") == b.get("dataset") and None not in (fa, fb) and fa != fb:
        return "copy"
    return "same"


DEFAULT_RESOLUTION = 224
DEFAULT_SYNTHETIC_IMAGES = 600


DEFAULT_CACHE_ROOT = "~/.cache/jaxdissect"


def cache_root() -> pathlib.Path:
    """Where generated data sets and compiled programs are cached ($JAXDISSECT_CACHE, else
    `DEFAULT_CACHE_ROOT`)."""
    return pathlib.Path(os.environ.get("JAXDISSECT_CACHE") or DEFAULT_CACHE_ROOT).expanduser()


def check_synthetic(synthetic_images: int, resolution: int) -> None:
    """Refuse, naming the parameter, what no synthetic Broden can be generated at."""
    from jaxdissect.data.synthetic.example import MIN_SIZE

    if synthetic_images < 1:
        raise ValueError(f"synthetic_images={synthetic_images}: must be >= 1")
    if resolution < MIN_SIZE:
        raise ValueError(
            f"resolution={resolution}: a synthetic Broden's side must be >= {MIN_SIZE}"
        )


def synthetic_path(
    cache_dir: pathlib.Path, num_images: int, size: int, seed: int = 0
) -> pathlib.Path:
    return pathlib.Path(cache_dir) / f"synthetic_broden-{size}-n{num_images}-seed{seed}"


def _broden_folders_near(path: pathlib.Path) -> list[pathlib.Path]:
    """Broden folders (holding index.csv) a --data of `path` may have meant: the folder of
    a file in one (its index.csv, its images/), or the folders inside `path`."""
    if (path.parent / "index.csv").is_file():
        return [path.parent]
    if path.is_dir():
        try:
            return sorted(p for p in path.iterdir() if (p / "index.csv").is_file())
        except OSError:
            return []
    return []


def open_probe(
    data: str,
    *,
    split: str = "all",
    max_images: int | None = None,
    resolution: int = DEFAULT_RESOLUTION,
    synthetic_images: int = DEFAULT_SYNTHETIC_IMAGES,
    cache_dir: str | pathlib.Path | None = None,
    data_hash: str = "stat",
    name: str = "--data",
) -> tuple[Any, str]:
    """(source, description) for `--data`: 'synthetic', a Broden folder or a TFDS build.

    `data_hash` (`stat` or `content`) is how the files the run reads enter the source's
    fingerprint, which keys every stored stage (see `Broden.open`). A synthetic Broden is
    generated once into `cache_dir` (default `cache_root()`) and checked on every reuse
    (`synthetic_cache.ensure`). Of a TFDS data dir holding builds at several resolutions,
    the one at `resolution` is read. `name` is how errors call `data` (the flag that
    gave it).
    """
    cache_dir = cache_root() if cache_dir is None else cache_dir
    check_data_hash(data_hash)
    memo = pathlib.Path(cache_dir).expanduser() / "checked"  # header scans that passed

    def open_folder(root: pathlib.Path) -> Broden:
        return Broden.open(
            root, split=split, max_images=max_images, data_hash=data_hash, header_memo=memo
        )

    if data == "synthetic":
        check_synthetic(synthetic_images, resolution)
        root = synthetic_cache.ensure(
            synthetic_path(pathlib.Path(cache_dir).expanduser(), synthetic_images, resolution),
            num_images=synthetic_images,
            size=resolution,
            data_hash=data_hash,
        )
        source = open_folder(root)
        return source, f"synthetic Broden {resolution} ({split}, {len(source)} images)"
    path = pathlib.Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{name}={data}: no such folder. Give an unzipped Broden folder (e.g. broden1_224, "
            "holding index.csv), a TFDS build of it, or 'synthetic'"
        )
    if (path / "index.csv").exists():
        source = open_folder(path)
        return source, f"{path.name} ({split}, {len(source)} images)"
    from jaxdissect.data import tfds_broden

    try:
        build = tfds_broden.find_build(path, None)
    except FileNotFoundError as e:
        what = (
            "is a file, not a Broden folder (holding index.csv) or a TFDS build"
            if path.is_file()
            else "holds neither index.csv (a Broden folder) nor a TFDS build"
        )
        near = " or ".join(f"{name}={p}" for p in _broden_folders_near(path)[:3])
        hint = f"; did you mean {near} (holding index.csv)?" if near else f": {e}"
        raise FileNotFoundError(f"{name}={data} {what}{hint}") from e
    except ValueError:  # builds at several resolutions: `resolution` picks one
        builds = tfds_broden.find_builds(path)
        if resolution not in builds:
            raise ValueError(
                f"{name}={data} holds Broden builds at resolutions "
                f"{', '.join(map(str, builds))}, none at {resolution}: pass --resolution= one "
                f"of them, or {name}= the build's own folder (e.g. {builds[max(builds)][0]})"
            ) from None
        build = tfds_broden.find_build(path, resolution)
    source = tfds_broden.TfdsBroden(build, split, data_hash=data_hash)
    if max_images is not None:
        source = Subset(source, max_images)
    return source, f"TFDS {build} ({split}, {len(source)} images)"

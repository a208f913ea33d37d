"""The classification task the experiments train networks on.

Offline, the scene labels of a Broden: the classes are the scene labels present
in the train split (images without exactly one scene label, e.g. texture and
surface images, are left out); the val split gives the validation accuracy.
Any TFDS image-classification build serves too (`classification_task`). `train_batches` is a random-access
grain dataset: the data order is a pure function of (seed, step), so a resumed
training run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from jaxdissect import store


@dataclasses.dataclass(frozen=True)
class SceneSplit:
    """Decoded images of one split with their class: uint8 [N, H, W, 3], int32 [N]."""

    images: np.ndarray
    labels: np.ndarray
    source_indices: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def key(self) -> str:
        """Which images (by index in their source) of which classes the split holds, not
        their pixels (the same split at another resolution keeps its key)."""
        return store.key_of(images=self.source_indices.tolist(), labels=self.labels.tolist())


@dataclasses.dataclass(frozen=True)
class SceneTask:
    """The scene classification task: classes and the two splits.

    Attributes:
      class_labels: Broden label number of each class, ascending (the class index
        for a TFDS classification build).
      class_names: their names.
      train, val: the splits (val keeps only images of a training class).
      description: where the data came from.
      fingerprint: of the data (both splits' sources and the classes).
    """

    class_labels: tuple[int, ...]
    class_names: tuple[str, ...]
    train: SceneSplit
    val: SceneSplit
    description: str
    fingerprint: str

    def __post_init__(self) -> None:
        if not len(self.val):
            raise ValueError(
                f"{self.description or 'the data'}: the validation split holds no image of "
                f"the {self.num_classes} training classes, so no accuracy can be measured: "
                "use a larger probe set"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_labels)

    @property
    def resolution(self) -> int:
        return int(self.train.images.shape[1])


def _image_labels(source: Any, i: int) -> tuple[int, ...]:
    records = getattr(source, "records", None)
    if records is not None:  # a Broden folder: the labels are in index.csv, no PNG to decode
        return tuple(n for ns in records[i].image_labels.values() for n in ns)
    return tuple(int(n) for n in source.read_labels(i)[1])


def _task_labels(source: Any, category: str) -> list[int | None]:
    """Each image's single label of `category`, or None (none, or ambiguous)."""
    wanted = set(source.labels.labels_in(category).tolist())
    out: list[int | None] = []
    for i in range(len(source)):
        found = {n for n in _image_labels(source, i) if n in wanted}
        out.append(found.pop() if len(found) == 1 else None)
    return out


def _decode_all(source: Any, indices: Sequence[int], num_threads: int) -> np.ndarray:
    if not len(indices):
        h, w = source.image_size
        return np.zeros((0, h, w, 3), np.uint8)
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        images = list(pool.map(lambda i: np.asarray(source.read_image(int(i)), np.uint8), indices))
    return np.stack(images)


def scene_task(
    train_source: Any,
    val_source: Any,
    *,
    category: str = "scene",
    description: str = "",
    max_train: int | None = None,
    num_threads: int = 2,
) -> SceneTask:
    """The classification task of `category` labels (image-level) on two Broden splits.

    Images are decoded once and kept in memory (the synthetic sets are small).
    """
    if category not in train_source.labels.categories:
        raise ValueError(f"the data has no {category!r} category to classify")
    train_labels = _task_labels(train_source, category)
    classes = sorted({n for n in train_labels if n is not None})
    if len(classes) < 2:
        raise ValueError(
            f"the train split has {len(classes)} {category} classes; at least 2 are needed"
        )
    class_of = {n: k for k, n in enumerate(classes)}

    def split(source: Any, labels: list[int | None], limit: int | None) -> SceneSplit:
        keep = [i for i, n in enumerate(labels) if n in class_of][:limit]
        dropped = sum(n is not None and n not in class_of for n in labels)
        if dropped:
            logging.info("%d images of classes absent from the train split left out", dropped)
        return SceneSplit(
            images=_decode_all(source, keep, num_threads),
            labels=np.asarray([class_of[labels[i]] for i in keep], np.int32),
            source_indices=np.asarray(keep, np.int64),
        )

    train = split(train_source, train_labels, max_train)
    val = split(val_source, _task_labels(val_source, category), None)
    names = tuple(train_source.labels.names[n] for n in classes)
    fingerprint = store.key_of(
        train=train_source.fingerprint(),
        val=val_source.fingerprint(),
        classes=classes,
        max_train=max_train,
    )
    return SceneTask(tuple(classes), names, train, val, description, fingerprint)


def open_scene_task(
    data: str,
    *,
    resolution: int,
    synthetic_images: int,
    cache_dir: str | os.PathLike[str],
    max_train: int | None = None,
    num_threads: int = 2,
    name: str = "--data",
) -> SceneTask:
    """The task of `--data`: the scenes of 'synthetic', a Broden folder or its TFDS build;
    or the classes of any TFDS image-classification build (`classification_task`). `name`
    is how errors call `data`."""
    from jaxdissect.data import open_probe, tfds_classification

    if data != "synthetic" and os.path.isdir(os.path.expanduser(data)):
        build = tfds_classification.find_build(os.path.expanduser(data))
        if build is not None:
            return classification_task(
                build, resolution=resolution, max_train=max_train, num_threads=num_threads
            )
    kwargs = dict(
        resolution=resolution, synthetic_images=synthetic_images, cache_dir=cache_dir, name=name
    )
    train_source, description = open_probe(data, split="train", **kwargs)
    val_source, _ = open_probe(data, split="val", **kwargs)
    return scene_task(
        train_source,
        val_source,
        description=f"{description}, val {len(val_source)} images",
        max_train=max_train,
        num_threads=num_threads,
    )


def classification_task(
    build: str | os.PathLike[str],
    *,
    resolution: int,
    max_train: int | None = None,
    num_threads: int = 2,
) -> SceneTask:
    """The task of a TFDS image-classification build (features `image`, `label`):
    its `train` split and its validation split, at `resolution` px, in memory. The
    fingerprint holds the build's files (by stat), so a rebuild with other examples is
    other data even where its dataset_info.json is unchanged."""
    from jaxdissect.data import tfds_classification
    from jaxdissect.data.files import Fingerprint, add_folder_files

    build = pathlib.Path(build)
    about = tfds_classification.describe(build)

    def split(name: str, limit: int | None) -> SceneSplit:
        images, labels = tfds_classification.read_split(
            build, name, resolution, limit=limit, num_threads=num_threads
        )
        return SceneSplit(images, labels, np.arange(len(labels), dtype=np.int64))

    train = split(tfds_classification.TRAIN_SPLIT, max_train)
    val = split(about["val_split"], None)
    names = tuple(about["class_names"])
    # The files: a rebuild may keep dataset_info.json and change the examples.
    files = Fingerprint("jaxdissect-tfds-classification-v1")
    add_folder_files(files, build, f"the TFDS build {build}")
    fingerprint = store.key_of(
        info=store.read_json_object(build / "dataset_info.json", tfds_classification.REBUILD),
        files=files.hexdigest(),
        resolution=resolution,
        max_train=max_train,
    )
    description = (
        f"TFDS {about['name']} ({build}; {tfds_classification.TRAIN_SPLIT} {len(train)}, "
        f"{about['val_split']} {len(val)} images)"
    )
    return SceneTask(tuple(range(len(names))), names, train, val, description, fingerprint)


class _Examples:
    """A `SceneSplit` as a grain source of {image, label} dicts."""

    def __init__(self, split: SceneSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"image": self.split.images[i], "label": self.split.labels[i]}


def _flip(example: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    if rng.random() < 0.5:
        return {**example, "image": example["image"][:, ::-1]}
    return example


def train_batches(
    split: SceneSplit, batch_size: int, *, seed: int, flip: bool = True
) -> grain.MapDataset:
    """Random-access training batches: `ds[step]` is step's batch, the same on every run.

    Each epoch is a fresh permutation (grain shuffles per repetition), and a
    batch may straddle two epochs; the flip of each example is seeded by its
    position in the stream.
    """
    if len(split) < 1:
        raise ValueError("the training split is empty")
    ds = grain.MapDataset.source(_Examples(split)).shuffle(seed=seed).repeat(None)
    if flip:
        ds = ds.random_map(_flip, seed=seed + 1)
    return ds.batch(batch_size, drop_remainder=True)


def eval_batches(
    split: SceneSplit, batch_size: int, *, dtype: Any = None
) -> list[dict[str, np.ndarray]]:
    """Fixed-shape batches of `split` in order, the last padded (`valid` False); images of
    `dtype` (default: the split's)."""
    out = []
    for start in range(0, len(split), batch_size):
        n = min(batch_size, len(split) - start)
        images = np.zeros((batch_size, *split.images.shape[1:]), dtype or split.images.dtype)
        labels = np.zeros((batch_size,), np.int32)
        images[:n] = split.images[start : start + n]
        labels[:n] = split.labels[start : start + n]
        out.append({"image": images, "label": labels, "valid": np.arange(batch_size) < n})
    return out

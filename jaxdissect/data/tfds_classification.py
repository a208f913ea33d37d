"""Any TFDS image-classification build as a training task (no TensorFlow).

A build directory (the one holding `dataset_info.json`, made by
`download_and_prepare(file_format="array_record")` or `tfds build
--file_format=array_record`) whose features hold an `image` and a `label`
`ClassLabel`, as imagenette, cifar10 or a dataset of the user's own. It is
read through `as_data_source` (random access, no TensorFlow): each image is
made 8-bit RGB (`_rgb8`), its shorter side resized to the training resolution and its centre
cropped square, and the split is kept in memory as uint8.
"""

from __future__ import annotations

import concurrent.futures
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxdissect import store
from jaxdissect.data.images import scale16

TRAIN_SPLIT = "train"
# The first of these that the build has is the validation split.
VAL_SPLITS = ("validation", "val", "test")
REBUILD = "prepare the build again with tfds"


def find_build(path: str | os.PathLike[str]) -> Path | None:
    """The classification build at or under `path` (two levels down at most), or None.

    None when no build there has an `image` and a ClassLabel `label`; several such
    builds (versions) under `path` are an error naming them.
    """
    path = Path(path)
    candidates = [path / "dataset_info.json"]
    candidates += sorted(path.glob("*/dataset_info.json")) + sorted(
        path.glob("*/*/dataset_info.json")
    )
    found = [f.parent for f in candidates if f.is_file() and _is_classification(f.parent)]
    if len(found) > 1:
        raise ValueError(
            f"{path} holds several classification builds: {[str(f) for f in found]}; "
            "pass the one to use"
        )
    return found[0] if found else None


def _is_classification(build: Path) -> bool:
    features = _features(build)
    return "image" in features and _class_label(features.get("label")) is not None


def _features(build: Path) -> dict[str, Any]:
    """The top-level features of a build, read from its `features.json` (no builder made)."""
    spec = build / "features.json"
    if not spec.is_file():
        return {}
    doc = store.read_json_object(spec, REBUILD)
    features = doc.get("featuresDict", {})
    features = features.get("features", {}) if isinstance(features, dict) else None
    if not isinstance(features, dict):
        raise ValueError(f"{spec}: featuresDict.features is not a JSON object; {REBUILD}")
    return features


def _class_label(feature: Any) -> Any:
    if not isinstance(feature, dict):
        return None
    return feature.get("classLabel")


def _rgb8(image: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] RGB of a decoded TFDS image: grey (1 channel, or 2 with alpha)
    repeated, alpha dropped, 16-bit values scaled round(v * 255 / 65535) as
    `images.scale16` scales them; other dtypes or channel counts raise ValueError."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ValueError(f"an image of shape {image.shape}, not [h, w, 1 to 4 channels]")
    if image.dtype == np.uint16:
        image = scale16(image)
    elif image.dtype != np.uint8:
        raise ValueError(f"{image.dtype} pixels of unknown range, not 8- or 16-bit")
    if image.shape[2] <= 2:
        return np.repeat(image[:, :, :1], 3, axis=2)
    return image[:, :, :3]


def _square(image: np.ndarray, resolution: int) -> np.ndarray:
    """RGB uint8 [resolution, resolution, 3]: shorter side resized, centre cropped."""
    image = _rgb8(image)
    if image.shape[:2] == (resolution, resolution):
        return np.ascontiguousarray(image, dtype=np.uint8)
    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    pil = Image.fromarray(image).resize(size, Image.BILINEAR)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(pil.crop((left, top, left + resolution, top + resolution)), np.uint8)


def read_split(
    build: Path,
    split: str,
    resolution: int,
    limit: int | None = None,
    num_threads: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, r, r, 3], labels int32 [N]) of one split, in the build's order."""
    import tensorflow_datasets as tfds

    from jaxdissect.data.tfds_broden import check_readable, opened

    with opened(build, REBUILD):
        source = tfds.builder_from_directory(os.fspath(build)).as_data_source(split=split)
    check_readable(source, f"{build}, the {split!r} split", "prepare the build again")
    n = len(source) if limit is None else min(limit, len(source))

    def one(i: int) -> tuple[np.ndarray, int]:
        try:
            example = source[i]  # TFDS decodes the image here
            image = _square(np.asarray(example["image"]), resolution)
        except (RuntimeError, ValueError, OSError) as e:
            raise ValueError(f"{build} ({split}, example {i}): unreadable image: {e}") from e
        return image, int(example["label"])

    images = np.zeros((n, resolution, resolution, 3), np.uint8)
    labels = np.zeros((n,), np.int32)
    with concurrent.futures.ThreadPoolExecutor(max(1, num_threads)) as pool:
        for i, (image, label) in enumerate(pool.map(one, range(n))):
            images[i], labels[i] = image, label
    return images, labels


def describe(build: Path) -> dict[str, Any]:
    """Class names, split names and sizes of a build (from its metadata)."""
    import tensorflow_datasets as tfds

    from jaxdissect.data.tfds_broden import opened

    with opened(build, REBUILD):
        info = tfds.builder_from_directory(os.fspath(build)).info
        splits = {name: int(s.num_examples) for name, s in info.splits.items()}
        class_names = list(info.features["label"].names)
    if TRAIN_SPLIT not in splits:
        raise ValueError(f"{build} has no {TRAIN_SPLIT!r} split (it has {sorted(splits)})")
    val = next((s for s in VAL_SPLITS if s in splits), None)
    if val is None:
        raise ValueError(
            f"{build} has no validation split: it has {sorted(splits)}, and one of "
            f"{list(VAL_SPLITS)} is needed for the validation accuracy"
        )
    return {
        "name": info.name,
        "class_names": class_names,
        "splits": splits,
        "val_split": val,
    }

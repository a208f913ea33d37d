"""Training on any TFDS image-classification build (not only Broden's scenes)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxdissect import scenes
from jaxdissect.data import synthetic, tfds_broden, tfds_classification
from tests.experiment_testing import run_script

CLASSES = ["red", "green", "blue"]


def _image(label: int, i: int, shape: tuple[int, int]) -> np.ndarray:
    """A flat colour per class; the other channels carry the example number."""
    a = np.full((*shape, 3), i % 50, np.uint8)
    a[..., label] = 200
    return a


class TinyColours(tfds_broden.OwnCodePath, tfds.core.GeneratorBasedBuilder):
    """Three colour classes; `train` at the builder's shape, `test` non-square, some grey."""

    VERSION = tfds.core.Version("1.0.0")
    SPLITS = {"train": 24, "test": 9}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=CLASSES),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        return {name: self._generate_examples(name, n) for name, n in self.SPLITS.items()}

    def _generate_examples(self, split: str, n: int):
        shape = (16, 16) if split == "train" else (24, 40)
        for i in range(n):
            label = i % len(CLASSES)
            yield (
                f"{split}-{i}",
                {"image": Image.fromarray(_image(label, i, shape)), "label": label},
            )


class NoValidation(TinyColours):
    SPLITS = {"train": 6}


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> pathlib.Path:
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = TinyColours(data_dir=str(data_dir))
    builder.download_and_prepare(file_format="array_record")
    return data_dir


def test_finds_the_build_and_reads_its_splits_exactly(build):
    found = tfds_classification.find_build(build)
    assert found == build / "tiny_colours" / "1.0.0"
    task = scenes.open_scene_task(str(build), resolution=16, synthetic_images=0, cache_dir=build)
    assert task.class_names == tuple(CLASSES) and task.num_classes == 3
    assert (len(task.train), len(task.val)) == (24, 9)
    # Records are shuffled on write: match each image to the one written, by its pixels.
    written = {_image(i % 3, i, (16, 16)).tobytes(): i % 3 for i in range(24)}
    pairs = zip(task.train.images, task.train.labels, strict=True)
    got = {img.tobytes(): int(lab) for img, lab in pairs}
    assert got == written
    # 24x40 -> shorter side to 16 and the centre cropped: flat colours stay flat.
    assert task.val.images.shape == (9, 16, 16, 3)
    for img, lab in zip(task.val.images, task.val.labels, strict=True):
        assert (img[..., lab] == 200).all()


class GreyAlpha(TinyColours, skip_registration=True):
    """Two-channel PNGs: a grey level per class and an alpha channel."""

    name = "grey_alpha"
    SPLITS = {"train": 3, "test": 3}

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Image(shape=(None, None, 2), encoding_format="png")
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image": image, "label": tfds.features.ClassLabel(names=CLASSES)}
            ),
        )

    def _generate_examples(self, split: str, n: int):
        shape = (16, 16) if split == "train" else (24, 40)
        for i in range(n):
            image = np.zeros((*shape, 2), np.uint8)
            image[..., 0], image[..., 1] = 60 * (i % 3 + 1), 128
            yield f"{split}-{i}", {"image": Image.fromarray(image, "LA"), "label": i % 3}


def test_grey_alpha_images_become_rgb(tmp_path):
    """A two-channel (grey, alpha) build reads as RGB grey, alpha dropped, at the training
    resolution and resized to it."""
    GreyAlpha(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    found = tfds_classification.find_build(tmp_path)
    for split in ("train", "test"):
        images, labels = tfds_classification.read_split(found, split, 16)
        assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
        for image, label in zip(images, labels, strict=True):
            assert (image == 60 * (label + 1)).all(), (split, label, image[0, 0])


def test_sixteen_bit_images_are_scaled_not_wrapped():
    """16-bit pixels (a uint16 build decoded by OpenCV, TFDS's choice where installed) are
    scaled to 8 bits, round(v * 255 / 65535), as the Broden reader does: not wrapped."""
    wide = np.array([0, 255, 256, 40000, 65535], np.uint16)
    want = ((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    grey = tfds_classification._square(np.tile(wide, (5, 1)), 5)  # at the resolution
    assert grey.dtype == np.uint8
    np.testing.assert_array_equal(grey, np.tile(want[None, :, None], (5, 1, 3)))
    flat = tfds_classification._square(np.full((8, 12, 3), 40000, np.uint16), 4)
    assert (flat == want[3]).all(), flat[0, 0]
    with pytest.raises(ValueError, match="float32"):
        tfds_classification._square(np.zeros((4, 4, 3), np.float32), 4)


def test_square_handles_grey_and_alpha():
    grey = np.arange(30 * 20, dtype=np.uint8).reshape(30, 20)
    out = tfds_classification._square(grey, 10)
    assert out.shape == (10, 10, 3) and (out[..., 0] == out[..., 2]).all()
    rgba = np.zeros((10, 10, 4), np.uint8)
    assert tfds_classification._square(rgba, 10).shape == (10, 10, 3)


def test_train_script_learns_a_tfds_classification_build(build, tmp_path):
    out = tmp_path / "run"
    # 20 images: the val split holds images of training classes (16: none, refused as such)
    broden = synthetic.generate(tmp_path / "broden", num_images=20, size=48, workers=1)
    run_script(
        "train",
        f"--data={build}",
        "--resolution=16",
        "--width=0.25",
        "--optimizer=adam",
        "--learning_rate=0.005",
        "--steps=20",
        "--batch_size=8",
        "--save_steps=20",
        "--log_every=20",
        "--devices=1",
        "--noprogress",
        f"--output_dir={out}",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"] == CLASSES
    settings = json.loads((out / "settings.json").read_text())
    assert settings["data"]["val_images"] == 9 and "tiny_colours" in settings["data"]["description"]
    assert summary["val_accuracy"] == 1.0  # flat colours: trivially separable

    # The rotation study dissects on a Broden and checks accuracy on the training task.
    rot = tmp_path / "rotation"
    run_script(
        "rotation",
        f"--weights={out / 'weights' / 'step_000020'}",
        "--layer=conv5",
        "--amounts=0,1",
        f"--data={broden}",
        f"--eval_data={build}",
        "--resolution=48",
        "--split=all",
        "--batch_size=16",
        "--quantile_mode=exact",
        "--devices=1",
        "--noprogress",
        "--noreport",
        f"--output_dir={rot}",
    )
    points = json.loads((rot / "rotation.json").read_text())["points"]
    assert [p["accuracy_folded"] for p in points] == [1.0, 1.0]
    with pytest.raises(ValueError, match="--data's classes are not those"):
        run_script(
            "rotation",
            f"--weights={out / 'weights' / 'step_000020'}",
            f"--data={broden}",
            "--resolution=48",
            f"--output_dir={tmp_path / 'refused'}",
        )


def test_a_build_without_a_validation_split_is_refused(tmp_path):
    NoValidation(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    with pytest.raises(ValueError, match="no validation split.*'train'"):
        scenes.open_scene_task(str(tmp_path), resolution=16, synthetic_images=0, cache_dir=tmp_path)


def test_several_builds_are_named(build, tmp_path):
    for version in ("1.0.0", "2.0.0"):
        (tmp_path / "x" / version).mkdir(parents=True)
        for name in ("dataset_info.json", "features.json"):
            src = build / "tiny_colours" / "1.0.0" / name
            (tmp_path / "x" / version / name).write_text(src.read_text())
    with pytest.raises(ValueError, match="several classification builds"):
        tfds_classification.find_build(tmp_path)


@pytest.mark.parametrize("name", ["features.json", "dataset_info.json"])
def test_a_damaged_json_file_of_a_build_is_one_line(build, tmp_path, name):
    copy = shutil.copytree(tfds_classification.find_build(build), tmp_path / "1.0.0")
    (copy / name).write_text("[")
    with pytest.raises(ValueError, match=rf"^{copy}.*; prepare the build again with tfds$"):
        scenes.open_scene_task(str(copy), resolution=16, synthetic_images=0, cache_dir=tmp_path)
    if name == "features.json":  # JSON, but not the features: an AttributeError before
        (copy / name).write_text('{"featuresDict": []}')
        with pytest.raises(ValueError, match=rf"{copy / name}: featuresDict.features is not"):
            tfds_classification.find_build(copy)


def test_a_damaged_split_is_one_line(build, tmp_path):
    copy = shutil.copytree(tfds_classification.find_build(build), tmp_path / "1.0.0")
    (train,) = copy.glob("*-train.array_record*")
    os.truncate(train, 100)
    with pytest.raises(ValueError, match="the 'train' split: its array_record files cannot be"):
        tfds_classification.read_split(copy, "train", 16)
    assert len(tfds_classification.read_split(copy, "test", 16)[1]) == 9


def test_an_example_tfds_cannot_decode_is_one_line_naming_it(build, monkeypatch):
    """An example whose image TFDS's own decoder refuses (a 16-bit PNG without OpenCV) is
    one line naming the build, the split and the example, not TFDS's error."""
    import tensorflow_datasets as tfds

    real = tfds.builder_from_directory

    class Refusing:
        def __init__(self, source):
            self.source = source

        def __len__(self):
            return len(self.source)

        def __getitem__(self, i):
            if i == 1:
                raise ValueError("cannot decode")
            return self.source[i]

    def builder(path):
        b = real(path)
        b.as_data_source = lambda split, _as=b.as_data_source: Refusing(_as(split=split))
        return b

    monkeypatch.setattr(tfds, "builder_from_directory", builder)
    found = tfds_classification.find_build(build)
    with pytest.raises(ValueError, match=r"\(train, example 1\): unreadable image: cannot decode"):
        tfds_classification.read_split(found, "train", 16)


class Relabelled(TinyColours, skip_registration=True):
    """TinyColours with every label moved to the next class: the same dataset_info.json."""

    name = "tiny_colours"

    def _generate_examples(self, split: str, n: int):
        for key, example in super()._generate_examples(split, n):
            yield key, {**example, "label": (example["label"] + 1) % len(CLASSES)}


def test_a_rebuild_with_other_labels_is_other_data(build, tmp_path):
    Relabelled(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    info = "tiny_colours/1.0.0/dataset_info.json"
    assert (tmp_path / info).read_text() == (build / info).read_text()
    old, new = (
        scenes.open_scene_task(str(d), resolution=16, synthetic_images=0, cache_dir=d)
        for d in (build, tmp_path)
    )
    assert old.fingerprint != new.fingerprint

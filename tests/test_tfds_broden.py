"""TFDS build of Broden: same examples and batches as the folder, splits, metadata, errors."""

from __future__ import annotations

import builtins
import json
import os
import pickle
import re
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxdissect.data import loader, probe, synthetic, tfds_broden
from jaxdissect.data.broden import Broden
from jaxdissect.data.tfds_broden import TfdsBroden
from tests.broden_testing import LabelSpec, RowSpec, tiny_broden, write_broden

SPLITS = ("all", "train", "val")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """name -> (folder, build dir): synthetic JPEGs, and PNG images with Broden's quirks."""
    tmp = tmp_path_factory.mktemp("tfds_broden")
    roots = {
        "synthetic": synthetic.generate_tiny(tmp / "synthetic", num_images=16),
        # Labels >= 256, two part planes, an image-level 0, rows without pixel data.
        "quirks": tiny_broden(tmp / "quirks").root,
    }
    return {
        name: (root, tfds_broden.build(root, tmp / f"tfds_{name}")) for name, root in roots.items()
    }


def assert_same_example(a: dict, b: dict, where: str) -> None:
    assert a.keys() == b.keys(), where
    for key in a:
        x, y = a[key], b[key]
        assert type(x) is type(y), (where, key, type(x), type(y))
        assert (x.dtype, x.shape) == (y.dtype, y.shape), (where, key)
        assert x.tobytes() == y.tobytes(), (where, key)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("name", ["synthetic", "quirks"])
def test_every_example_identical(datasets, name, split):
    root, build_dir = datasets[name]
    folder, built = Broden.open(root, split=split), TfdsBroden(build_dir, split)
    assert len(built) == len(folder) > 0
    for i in range(len(folder)):
        assert_same_example(folder[i], built[i], f"{name}/{split}[{i}]")
        image, (planes, image_labels) = built.read_image(i), built.read_labels(i)
        np.testing.assert_array_equal(image, folder.read_image(i))
        assert image.dtype == np.uint8
        want_planes, want_image_labels = folder.read_labels(i)
        assert planes.dtype == want_planes.dtype and image_labels.dtype == np.int32
        np.testing.assert_array_equal(planes, want_planes)
        np.testing.assert_array_equal(image_labels, want_image_labels)
    assert_same_example(folder[-1], built[-1], f"{name}/{split}[-1]")
    with pytest.raises(IndexError):
        built[len(built)]
    # The same probe set however stored; its first images another one.
    assert built.identity() == folder.identity() is not None
    first = probe.Subset(built, 1).identity()
    assert first == Broden.open(root, split=split, max_images=1).identity()
    assert (first == built.identity()) == (len(built) == 1)
    # A build made before its tables were recorded: its label metadata identify it (copies
    # of it alike), never as its folder.
    old, old_copy = TfdsBroden(build_dir, split), TfdsBroden(build_dir, split)
    old.tables_hash = old_copy.tables_hash = None
    assert old.identity() == old_copy.identity() not in (None, folder.identity())


@pytest.mark.parametrize("split", ["all", "val"])
@pytest.mark.parametrize("name", ["synthetic", "quirks"])
def test_identical_batches_through_loader(datasets, name, split):
    root, build_dir = datasets[name]
    folder, built = Broden.open(root, split=split), TfdsBroden(build_dir, split)
    for size, kwargs in ((3, {"num_threads": 2}), (1, {"num_threads": 0, "start_batch": 1})):
        got = list(loader.batches(built, size, **kwargs))
        want = list(loader.batches(folder, size, **kwargs))
        assert len(got) == len(want) > 0
        for k, (a, b) in enumerate(zip(want, got, strict=True)):
            assert_same_example(a, b, f"{name}/{split} batch {k} {kwargs}")


SELECTIONS = (("object",), ("color", "scene"), ("object", "part", "texture"), ("material",))


@pytest.mark.parametrize("name", ["synthetic", "quirks"])
def test_selected_categories_as_the_folder(datasets, name):
    root, build_dir = datasets[name]
    folder, built = Broden.open(root), TfdsBroden(build_dir)
    np.testing.assert_array_equal(built.coverage, folder.coverage)  # primaries of a selection
    for categories in SELECTIONS:
        for i in range(len(folder)):
            for got, want in zip(
                built.read_labels(i, categories), folder.read_labels(i, categories), strict=True
            ):
                assert (got.dtype, got.shape) == (want.dtype, want.shape), (categories, i)
                np.testing.assert_array_equal(got, want)


def test_image_label_of_two_categories_kept_by_either(tmp_path):
    labels = [
        LabelSpec(1, "sky", {"object": 1.0}),
        LabelSpec(2, "street-s", {"scene": 1.0, "texture": 0.5}),
        LabelSpec(3, "dotted", {"texture": 1.0}),
    ]
    sky = np.ones((4, 4), np.int32)
    rows = [
        RowSpec("a.png", pixel={"object": [sky]}, image_labels={"scene": [2], "texture": [3, 2]}),
        RowSpec("b.png", "val", image_labels={"texture": [2]}),
    ]
    root = write_broden(
        tmp_path / "src", categories=("object", "scene", "texture"), labels=labels, rows=rows
    ).root
    folder, built = Broden.open(root), TfdsBroden(tfds_broden.build(root, tmp_path / "data"))
    want = {(): ([1], [2, 3]), ("scene",): ([0], [2]), ("texture",): ([0], [3, 2])}
    for categories in ((), ("scene",), ("texture",), ("object", "texture")):
        for i in range(2):
            for source in (folder, built):
                planes, image_labels = source.read_labels(i, categories or None)
                if i == 0 and categories in want:
                    assert [len(planes)] == want[categories][0]
                    assert image_labels.tolist() == want[categories][1]
                np.testing.assert_array_equal(
                    image_labels, folder.read_labels(i, categories or None)[1]
                )
    assert built.read_labels(1, ("scene",))[1].tolist() == []
    assert built.read_labels(1, ("texture",))[1].tolist() == [2]


def test_stored_bytes_are_the_image_file(datasets):
    """TFDS keeps the JPEG as it is: its own (PIL) decoding equals reading the file."""
    root, build_dir = datasets["synthetic"]
    folder = Broden.open(root)
    builder = tfds.builder_from_directory(build_dir)
    assert set(builder.info.splits) <= {"train", "val"}
    for split in builder.info.splits:
        raw = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        decoded = builder.as_data_source(split)
        for k in range(len(raw)):
            i = int(raw[k]["index"])
            assert raw[k]["image"][:2] == b"\xff\xd8"  # JPEG, not re-encoded to PNG
            assert raw[k]["image"] == (root / "images" / folder.records[i].image).read_bytes()
            np.testing.assert_array_equal(decoded[k]["image"], folder.read_image(i))


@pytest.mark.parametrize("name", ["synthetic", "quirks"])
def test_splits(datasets, name):
    root, build_dir = datasets[name]
    folder = Broden.open(root)
    builder = tfds.builder_from_directory(build_dir)
    counts = {s: sum(r.split == s for r in folder.records) for s in ("train", "val")}
    assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
        s: c for s, c in counts.items() if c
    }
    sizes = {s: len(TfdsBroden(build_dir, s)) for s in SPLITS}
    assert sizes == {"all": len(folder), **counts}
    # The `all` view interleaves the splits in index.csv order.
    whole = TfdsBroden(build_dir, "all")
    train_positions = [i for i, r in enumerate(folder.records) if r.split == "train"]
    train = TfdsBroden(build_dir, "train")
    for k, i in enumerate(train_positions):
        np.testing.assert_array_equal(train.read_image(k), whole.read_image(i))
    with pytest.raises(ValueError, match="split must be"):
        TfdsBroden(build_dir, "test")


def test_metadata_round_trip(datasets, tmp_path):
    root, build_dir = datasets["quirks"]
    # Self-contained: readable with the source folder gone.
    source = shutil.copytree(root, tmp_path / "src")
    moved = tfds_broden.build(source, tmp_path / "data")
    sources = {split: Broden.open(source, split=split).fingerprint() for split in SPLITS}
    shutil.rmtree(source)
    for split in SPLITS:
        folder, built = Broden.open(root, split=split), TfdsBroden(moved, split)
        assert built.labels.categories == folder.labels.categories
        assert built.labels.names == folder.labels.names
        assert built.labels.image_level == folder.labels.image_level
        assert built.labels.primary.dtype == np.int32
        np.testing.assert_array_equal(built.labels.primary, folder.labels.primary)
        assert built.image_size == folder.image_size and built.seg_size == folder.seg_size
        assert built.max_planes == folder.max_planes
        assert built.max_image_labels == folder.max_image_labels
        assert built.source_fingerprint == sources[split]
    assert TfdsBroden(moved, "train").max_planes != TfdsBroden(moved, "val").max_planes
    # A data dir, its broden/ folder and the build dir all name the build.
    for path in (tmp_path / "data", tmp_path / "data" / "broden", moved):
        assert TfdsBroden(path).builder_dir == moved
    assert pickle.loads(pickle.dumps(TfdsBroden(moved, "val")))[1]["index"] == 1


def test_missing_manual_folder(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"(?s)Broden folder .*nowhere does not exist.*unzip"
    ):
        tfds_broden.build(tmp_path / "nowhere", tmp_path / "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"No Broden data in .*index\.csv"):
        tfds_broden.build(tmp_path / "empty", tmp_path / "data", resolution=224)
    # Through TFDS directly, without a manual dir: the instructions, not an AssertionError.
    builder = tfds_broden.BrodenBuilder(config="224", data_dir=tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="unzip it, and pass the folder"):
        builder.download_and_prepare(file_format="array_record")
    with pytest.raises(FileNotFoundError, match="No TFDS Broden build"):
        TfdsBroden(tmp_path / "data")


def test_a_data_path_beside_a_broden_folder_names_it(tmp_path):
    """--data given the folder above broden1_*, its index.csv or its images/: the error
    names the folder that holds index.csv."""
    for name in ("broden1_8", "broden1_16"):
        tiny_broden(tmp_path / name)
    a, b = tmp_path / "broden1_16", tmp_path / "broden1_8"
    cases = [
        (tmp_path, "holds neither", f"--data={a} or --data={b}"),
        (b / "index.csv", "is a file, not a Broden folder", f"--data={b}"),
        (b / "images", "holds neither", f"--data={b}"),
    ]
    for path, what, meant in cases:
        message = rf"^--data={re.escape(str(path))} {what} .*; did you mean {re.escape(meant)} \("
        with pytest.raises(FileNotFoundError, match=message):
            probe.open_probe(str(path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds neither .*: No TFDS Broden build"):
        probe.open_probe(str(empty))


def test_reuse_wrong_resolution_and_overwrite(datasets, tmp_path):
    root, build_dir = datasets["quirks"]
    data_dir = build_dir.parent.parent.parent
    stamp = (build_dir / "dataset_info.json").stat().st_mtime_ns
    assert tfds_broden.build(root, data_dir) == build_dir  # Reused, not rebuilt.
    assert (build_dir / "dataset_info.json").stat().st_mtime_ns == stamp
    other = tiny_broden(tmp_path / "other").root
    with open(other / "index.csv", "a") as f:
        f.write("\n")  # Same examples, another fingerprint.
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tfds_broden.build(other, data_dir)
    with pytest.raises(ValueError, match="8x8 images but the builder config is 224"):
        tfds_broden.build(other, tmp_path / "data224", resolution=224)
    shutil.copytree(data_dir, tmp_path / "data")
    rebuilt = tfds_broden.build(other, tmp_path / "data", overwrite=True)
    assert TfdsBroden(rebuilt).source_fingerprint == Broden.open(other).fingerprint()
    assert TfdsBroden(build_dir).source_fingerprint == Broden.open(root).fingerprint()


def test_no_tensorflow(datasets):
    _, build_dir = datasets["synthetic"]
    TfdsBroden(build_dir)[0]
    assert "tensorflow" not in sys.modules


def test_fingerprint_covers_the_build_files(datasets, tmp_path):
    _, build_dir = datasets["quirks"]
    copy = shutil.copytree(build_dir, tmp_path / "build")  # copy2 keeps mtimes, not ctimes
    keys = {m: TfdsBroden(copy, data_hash=m).fingerprint() for m in ("stat", "content")}
    assert keys["stat"] != TfdsBroden(build_dir).fingerprint()  # a copy is new data to stat
    assert keys["content"] == TfdsBroden(build_dir, data_hash="content").fingerprint()
    assert keys["stat"] != keys["content"]
    assert (
        pickle.loads(pickle.dumps(TfdsBroden(copy, data_hash="content"))).fingerprint()
        == (keys["content"])
    )
    shards = sorted(copy.glob("*.array_record*"))
    assert shards
    for path in (*shards, copy / "dataset_info.json", copy / "features.json"):
        before = TfdsBroden(copy).fingerprint()
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1000))
        assert TfdsBroden(copy).fingerprint() != before, path
        assert TfdsBroden(copy, data_hash="content").fingerprint() == keys["content"], path
        # The mtime set back: the ctime still moved.
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert TfdsBroden(copy).fingerprint() != before, path
    # Moving the build's folder keeps its key.
    key = TfdsBroden(copy).fingerprint()
    moved = copy.rename(tmp_path / "moved")
    assert TfdsBroden(moved).fingerprint() == key
    with pytest.raises(ValueError, match="data_hash='sha1'"):
        TfdsBroden(moved, data_hash="sha1")


def test_a_missing_or_damaged_shard_is_one_line_at_open(datasets, tmp_path):
    """Before any pass: a split's array_record file removed or cut short names the build and
    the split, with what to do; the other split still opens."""
    _, build_dir = datasets["synthetic"]
    for damage, message in [
        (lambda p: p.unlink(), "No such file"),
        (lambda p: os.truncate(p, 100), "at least 64KB"),
    ]:
        copy = shutil.copytree(build_dir, tmp_path / f"build{len(message)}")
        (val,) = copy.glob("*-val.array_record*")
        damage(val)
        for split in ("val", "all"):
            with pytest.raises(
                ValueError, match=f"the 'val' split: its array_record .*{message}.*build it again"
            ):
                TfdsBroden(copy, split)
        assert len(TfdsBroden(copy, "train")) == len(TfdsBroden(build_dir, "train"))


def _edit_json(path, edit):
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document))


DAMAGED_METADATA = {
    "dataset_info.json cut": (
        lambda d: (d / "dataset_info.json").write_text('{"name": "bro'),
        r"its metadata is damaged or was edited \(ParseError: ",
    ),
    "features.json dtype": (
        lambda d: _edit_json(
            d / "features.json",
            lambda f: f["featuresDict"]["features"]["pixel_labels"]["tensor"].update(dtype="x"),
        ),
        r"its metadata is damaged or was edited \(",
    ),
    "no index feature": (  # decoded records lacked it: a KeyError when read
        lambda d: _edit_json(
            d / "features.json", lambda f: f["featuresDict"]["features"].pop("index")
        ),
        r"its features.json describes other features than this code's builder writes",
    ),
    "no splits": (
        lambda d: _edit_json(d / "metadata.json", lambda m: m.pop("splits")),
        r"its metadata.json is damaged or was edited \(KeyError: 'splits'\)",
    ),
    "seg_size 0": (
        lambda d: _edit_json(d / "metadata.json", lambda m: m.update(seg_size=[32, 0])),
        r"\(ValueError: seg_size \[32, 0\]: not two sizes >= 1\)",
    ),
    "record_splits a dict": (
        lambda d: _edit_json(d / "metadata.json", lambda m: m.update(record_splits={})),
        r"its metadata.json is damaged or was edited \(AttributeError: ",
    ),
}


@pytest.mark.parametrize("case", list(DAMAGED_METADATA))
def test_a_damaged_or_edited_json_file_of_a_build_is_one_line(datasets, tmp_path, case):
    """What TFDS, protobuf, json or a missing field raised past the reader (a ParseError,
    KeyError, TypeError or AttributeError) is one line naming the build and the fix."""
    _, build_dir = datasets["synthetic"]
    copy = shutil.copytree(build_dir, tmp_path / "build")
    damage, message = DAMAGED_METADATA[case]
    damage(copy)
    with pytest.raises(ValueError, match=message) as info:
        TfdsBroden(copy)
    text = str(info.value)
    assert text.startswith(f"{copy}: ") and text.endswith(tfds_broden.REBUILD)
    assert "\n" not in text


@pytest.mark.parametrize("name", ["metadata.json", "features.json", "array_record"])
def test_a_build_file_this_user_may_not_read_is_not_called_damaged(
    datasets, tmp_path, monkeypatch, name
):
    """A refused permission is one line saying so and what to check, not "damaged ...
    build it again". Root reads anything: simulated by raising what `open` raises then, or
    what array_record's reader says (its words only, in a RuntimeError)."""
    _, build_dir = datasets["synthetic"]
    if name == "array_record":

        class Denied:
            def __len__(self):
                return 1

            def __getitem__(self, i):
                raise RuntimeError("open() failed: Permission denied; opening x.array_record")

        with pytest.raises(ValueError) as info:
            tfds_broden.check_readable(Denied(), str(build_dir), tfds_broden.REBUILD)
    else:
        build_dir = shutil.copytree(build_dir, tmp_path / "build")  # opened by nothing yet
        real_open = builtins.open

        def denied(file, *args, **kwargs):
            if os.path.basename(os.fspath(file)) == name:
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", denied)
        with pytest.raises(ValueError) as info:
            TfdsBroden(build_dir)
    text = str(info.value)
    assert text.startswith(f"{build_dir}") and "Permission denied" in text, text
    assert (
        "damaged" not in text
        and text.endswith("; check that this user may read the build's files")
        and "\n" not in text
    )


def test_damage_between_the_checked_records_is_one_line_when_read(datasets, tmp_path):
    """The open reads a split's first and last record; damage in the middle is found by the
    read of its example, in one line naming the build, the split, the example and the fix."""
    _, build_dir = datasets["synthetic"]
    copy = shutil.copytree(build_dir, tmp_path / "build")
    (train,) = copy.glob("*-train.array_record*")
    data = bytearray(train.read_bytes())
    middle = 13000  # inside a middle record's chunk (the file is padded past its records)
    data[middle : middle + 400] = bytes(b ^ 0xFF for b in data[middle : middle + 400])
    train.write_bytes(bytes(data))
    source = TfdsBroden(copy, "train")
    with pytest.raises(ValueError, match=r"'train' split, example \d+: its array_record .*again"):
        for i in range(len(source)):
            source[i]


def test_resolution_picks_among_builds_in_one_data_dir(datasets, tmp_path):
    """A data dir holding builds at two resolutions: `resolution` (--resolution) picks one;
    another resolution is refused in one line naming those held and the build's folder."""
    from jaxdissect.data import open_probe

    _, build_dir = datasets["synthetic"]
    for r in ("32", "64"):
        shutil.copytree(build_dir, tmp_path / "broden" / r / build_dir.name)
    with pytest.raises(ValueError, match="resolutions 32, 64: pass resolution="):
        tfds_broden.find_build(tmp_path)
    assert tfds_broden.find_build(tmp_path, 32) == tmp_path / "broden" / "32" / build_dir.name
    for r in (32, 64):
        source, description = open_probe(str(tmp_path), resolution=r)
        assert source.builder_dir == tmp_path / "broden" / str(r) / build_dir.name, description
    with pytest.raises(ValueError, match="resolutions 32, 64, none at 224: pass --resolution="):
        open_probe(str(tmp_path), resolution=224)

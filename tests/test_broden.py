"""The Broden reader: exact read-back, label space, splits, the format read from the files
(its errors: test_broden_errors.py)."""

from __future__ import annotations

import os
import pathlib
import re

import numpy as np
import pytest
from PIL import Image

from jaxdissect.data.broden import Broden, BrodenFormatError, primary_categories
from tests.broden_testing import (
    BRODEN_CATEGORIES,
    LABELS,
    LabelSpec,
    RowSpec,
    default_rgb,
    edit_csv,
    tiny_broden,
    write_broden,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_broden(tmp_path_factory.mktemp("tiny"))


# --- reading back what was written -------------------------------------------------------


def test_reads_back_images_and_labels_exactly(tiny):
    ds = Broden.open(tiny.root)
    assert len(ds) == 5
    for i in range(len(ds)):
        np.testing.assert_array_equal(ds.read_image(i), tiny.images[i])
        assert ds.read_image(i).dtype == np.uint8
        planes, image_labels = ds.read_labels(i)
        assert planes.dtype == np.int32 and image_labels.dtype == np.int32
        np.testing.assert_array_equal(planes, tiny.planes[i])
        assert tuple(image_labels) == tiny.image_labels[i]


def test_labels_need_the_green_channel_and_several_planes(tiny):
    ds = Broden.open(tiny.root)
    planes, _ = ds.read_labels(1)
    assert planes.shape == (4, 4, 4)  # color, object, part x2
    assert (planes[2:] == 300).any()  # R=44, G=1
    np.testing.assert_array_equal(planes[3], tiny.planes[1][3])


def test_unselected_categories_are_not_read(tmp_path):
    w = tiny_broden(tmp_path)
    ds = Broden.open(tmp_path)
    # Row 3 holds color and material (wood, cloth) planes: without material, its material
    # PNG is never opened (deleting it breaks only a full read).
    (tmp_path / "images" / "opensurfaces" / "d_material_1.png").unlink()
    planes, image_labels = ds.read_labels(3, ("object", "color", "scene"))
    np.testing.assert_array_equal(planes, w.planes[3][:1])
    assert image_labels.tolist() == []
    with pytest.raises(BrodenFormatError, match="d_material_1.png"):
        ds.read_labels(3)
    # Row 1 (color, object, part x2; scene 7): category.csv order whatever the selection's.
    planes, image_labels = ds.read_labels(1, ("part", "color"))
    np.testing.assert_array_equal(planes, w.planes[1][[0, 2, 3]])
    assert image_labels.tolist() == []
    planes, image_labels = ds.read_labels(1, ("scene",))
    assert planes.shape == (0, 4, 4) and image_labels.tolist() == [7]
    assert ds.read_labels(2, ("scene",))[1].tolist() == []
    assert ds.read_labels(2, ("texture",))[1].tolist() == [8]
    with pytest.raises(ValueError, match="categories=materials: materials not in"):
        ds.read_labels(0, ["materials"])


def test_label_shape_pads_only_for_the_categories_read(tiny):
    ds = Broden.open(tiny.root)
    assert ds.label_shape() == (ds.max_planes, ds.max_image_labels) == (4, 1)
    assert ds.label_shape(("part",)) == (2, 1)  # row 1: two part planes; no image label
    assert ds.label_shape(("scene", "texture")) == (1, 1)  # no planes: one all-0 plane
    for i in range(len(ds)):
        planes, scalars = ds.read_labels(i, ("part",))
        assert len(planes) <= 2 and len(scalars) <= 1


def test_image_level_zero_is_dropped(tiny):
    ds = Broden.open(tiny.root)
    assert ds.records[2].image_labels == {"texture": (8,)}
    _, image_labels = ds.read_labels(2)
    assert image_labels.tolist() == [8]


def test_label_space(tiny):
    labels = Broden.open(tiny.root).labels
    assert labels.categories == BRODEN_CATEGORIES
    assert labels.image_level == (False, False, False, False, True, True)
    assert labels.num_labels == 301
    assert labels.names[0] == "-" and labels.names[300] == "wheel" and labels.names[4] == "wood"
    assert labels.names[10] == ""
    assert labels.category_of(0) is None and labels.category_of(10) is None
    assert labels.category_of(1) == "color"
    assert labels.category_of(4) == "material"  # coverage 3.0 beats object's 1.0
    assert labels.category_of(9) == "material"  # tie with object: the later category
    assert labels.category_of(300) == "part"
    assert labels.category_of(6) == "scene" and labels.category_of(8) == "texture"
    assert labels.labels_in("part").tolist() == [5, 300]


def test_primary_over_a_subset_of_categories(tiny):
    ds = Broden.open(tiny.root)
    assert ds.coverage.shape == (6, 301)
    assert ds.coverage[3, 4] == 3.0 and ds.coverage[1, 4] == 1.0 and np.isnan(ds.coverage[2, 4])
    np.testing.assert_array_equal(primary_categories(ds.coverage), ds.labels.primary)
    # NetDissect-Lite scores without material: its labels fall back to object.
    no_material = [c != "material" for c in ds.labels.categories]
    primary = primary_categories(ds.coverage, no_material)
    assert primary[4] == primary[9] == 1
    assert primary[0] == -1 and primary[10] == -1 and primary[300] == 2


def test_records(tiny):
    ds = Broden.open(tiny.root)
    r = ds.records[1]
    assert (r.line, r.image, r.split) == (3, "ade20k/b.png", "train")
    assert (r.ih, r.iw, r.sh, r.sw) == (8, 8, 4, 4)
    assert r.pixel["part"] == ("ade20k/b_part_1.png", "ade20k/b_part_2.png")
    assert r.image_labels == {"scene": (7,)}
    assert "material" not in r.pixel
    assert (ds.image_size, ds.seg_size) == ((8, 8), (4, 4))
    assert (ds.max_planes, ds.max_image_labels) == (4, 1)


def test_getitem_fixed_shapes_and_padding(tiny):
    ds = Broden.open(tiny.root)
    for i in range(len(ds)):
        ex = ds[i]
        assert set(ex) == {"image", "pixel_labels", "image_labels", "index"}
        assert ex["image"].dtype == np.float32 and ex["image"].shape == (8, 8, 3)
        assert ex["pixel_labels"].dtype == np.int32 and ex["pixel_labels"].shape == (4, 4, 4)
        assert ex["image_labels"].dtype == np.int32 and ex["image_labels"].shape == (1,)
        assert ex["index"].dtype == np.int32 and ex["index"].shape == () and ex["index"] == i
        np.testing.assert_array_equal(ex["image"], tiny.images[i].astype(np.float32))
        p = len(tiny.planes[i])
        np.testing.assert_array_equal(ex["pixel_labels"][:p], tiny.planes[i])
        assert not ex["pixel_labels"][p:].any()
        q = len(tiny.image_labels[i])
        assert tuple(ex["image_labels"][:q]) == tiny.image_labels[i]
        assert not ex["image_labels"][q:].any()
    assert ds[-1]["index"] == 4
    with pytest.raises(IndexError):
        ds[5]


def test_split_and_max_images(tiny):
    train = Broden.open(tiny.root, split="train")
    assert [r.line for r in train.records] == [2, 3, 4]
    val = Broden.open(tiny.root, split="val")
    assert [r.line for r in val.records] == [5, 6]
    # Positions are within the selection; the record keeps its index.csv line.
    assert val[1]["index"] == 1
    np.testing.assert_array_equal(val.read_image(1), tiny.images[4])
    assert (val.max_planes, val.max_image_labels) == (2, 1)  # Q stays >= 1
    first = Broden.open(tiny.root, max_images=2)
    assert [r.line for r in first.records] == [2, 3]
    assert [r.line for r in Broden.open(tiny.root, split="val", max_images=1).records] == [5]
    assert len(Broden.open(tiny.root, split="all", max_images=99)) == 5


def test_fingerprint(tiny, tmp_path):
    a = Broden.open(tiny.root)
    assert re.fullmatch(r"[0-9a-f]{64}", a.fingerprint())
    assert a.fingerprint() == Broden.open(tiny.root).fingerprint()
    others = {
        Broden.open(tiny.root, split="train").fingerprint(),
        Broden.open(tiny.root, max_images=3).fingerprint(),
        a.fingerprint(),
        Broden.open(tiny.root, data_hash="content").fingerprint(),
    }
    assert len(others) == 4
    copy = tiny_broden(tmp_path / "copy")
    content = Broden.open(tiny.root, data_hash="content").fingerprint()
    assert Broden.open(copy.root, data_hash="content").fingerprint() == content  # not location
    moved = tmp_path / "moved"
    copy.root.rename(moved)  # a move keeps sizes and times
    stat_key = Broden.open(moved).fingerprint()
    label_csv = moved / "label.csv"
    label_csv.write_text(label_csv.read_text().replace("wheel", "wheels"))
    assert Broden.open(moved).fingerprint() != stat_key
    assert Broden.open(moved, data_hash="content").fingerprint() != content
    with pytest.raises(ValueError, match="data_hash='md5'"):
        Broden.open(tiny.root, data_hash="md5")


def _row_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted((root / "images").rglob("*.*"))


def test_fingerprint_sees_every_listed_file(tmp_path):
    """Each image or label PNG of a selected row, edited, changes the key (both modes)."""
    root = tiny_broden(tmp_path / "b").root
    files = _row_files(root)
    assert len(files) > 5
    for path in files:
        before = {m: Broden.open(root, data_hash=m).fingerprint() for m in ("stat", "content")}
        data = path.read_bytes()
        st = path.stat()
        # Same size, other bytes, the mtime set back (as `touch -r` does): the ctime moved.
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
        assert Broden.open(root).fingerprint() != before["stat"], path
        assert Broden.open(root, data_hash="content").fingerprint() != before["content"], path
        path.write_bytes(data)
        # The bytes back, but the file was written: stat sees a change, content does not.
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert Broden.open(root).fingerprint() != before["stat"], path
        assert Broden.open(root, data_hash="content").fingerprint() == before["content"], path


def test_fingerprint_covers_only_the_selected_rows(tmp_path):
    root = tiny_broden(tmp_path / "b").root
    first = Broden.open(root, max_images=1)
    key = first.fingerprint()
    last = Broden.open(root).records[-1]
    os.utime(root / "images" / last.image, ns=(1, 10**18))
    assert Broden.open(root, max_images=1).fingerprint() == key  # not read by this selection
    os.utime(root / "images" / first.records[0].image, ns=(1, 10**18))
    assert Broden.open(root, max_images=1).fingerprint() != key


def test_repr_is_short(tiny):
    text = repr(Broden.open(tiny.root))
    assert "images=5" in text and len(text) < 300


# --- the format is read, not assumed -----------------------------------------------------


def test_column_order_is_read_from_the_files(tmp_path):
    plane = np.full((4, 4), 1)
    color = np.full((4, 4), 3)
    w = write_broden(
        tmp_path,
        categories=("scene", "object", "color"),
        columns=("color", "scene", "object"),
        labels=LABELS,
        rows=[
            RowSpec(
                "x.png", pixel={"object": [plane], "color": [color]}, image_labels={"scene": [2]}
            )
        ],
    )
    ds = Broden.open(tmp_path)
    assert ds.labels.categories == ("scene", "object", "color")
    assert ds.labels.image_level == (True, False, False)
    planes, image_labels = ds.read_labels(0)
    np.testing.assert_array_equal(planes, w.planes[0])
    assert planes[0, 0, 0] == 1 and planes[1, 0, 0] == 3  # category.csv order
    assert image_labels.tolist() == [2]


def test_kind_is_inferred_from_cells_and_empty_columns_fall_back(tmp_path):
    labels = [
        LabelSpec(1, "sunny", {"weather": 1.0}),
        LabelSpec(2, "sky", {"scene": 1.0}),
    ]
    write_broden(
        tmp_path,
        categories=("weather", "scene", "texture", "foo"),
        labels=labels,
        rows=[
            RowSpec("a.png", pixel={"scene": [np.full((4, 4), 2)]}, image_labels={"weather": [1]}),
            RowSpec("b.png"),
        ],
        image_level=("weather",),
    )
    ds = Broden.open(tmp_path)
    # weather holds numbers, scene holds PNGs; texture and foo hold nothing anywhere.
    assert ds.labels.image_level == (True, False, True, False)
    planes, image_labels = ds.read_labels(0)
    assert planes.shape == (1, 4, 4) and image_labels.tolist() == [1]
    planes, image_labels = ds.read_labels(1)
    assert planes.shape == (0, 4, 4) and image_labels.shape == (0,)
    assert (ds.max_planes, ds.max_image_labels) == (1, 1)


def test_label_csv_row_zero_and_repeated_image_labels(tmp_path):
    w = write_broden(
        tmp_path,
        categories=("object", "scene", "texture"),
        labels=[*LABELS[:2], LabelSpec(3, "dotted", {"texture": 1.0})],
        rows=[RowSpec("a.png", image_labels={"scene": [2, 2, 0], "texture": [3, 2]})],
    )
    edit_csv(tmp_path / "label.csv", lambda rows: rows.insert(1, ["0", "-", "", "0", "0", ""]))
    ds = Broden.open(tmp_path)
    assert ds.labels.names[0] == "-"
    assert ds.records[0].image_labels == {"scene": (2,), "texture": (3, 2)}
    assert ds.read_labels(0)[1].tolist() == [2, 3] == list(w.image_labels[0])


def test_label_numbers_read_alike_in_every_check(tiny, tmp_path):
    """label.csv's numbers parse as one: a number the label table took (whitespace around
    it, Unicode's included) raised a bare ValueError in the category files' check."""
    root = tiny_broden(tmp_path).root

    def pad(rows):
        rows[3][0] = "\x1e" + rows[3][0] + " "

    edit_csv(root / "label.csv", pad)
    got, want = Broden.open(root).labels, Broden.open(tiny.root).labels
    assert got.names == want.names and got.categories == want.categories
    np.testing.assert_array_equal(got.primary, want.primary)


def test_jpeg_and_grayscale_images_become_rgb(tmp_path):
    write_broden(tmp_path, categories=("object",), labels=LABELS[:1], rows=[RowSpec("a.jpg")])
    Image.fromarray(default_rgb(0, (8, 8))[..., 0]).save(tmp_path / "images" / "a.jpg")
    image = Broden.open(tmp_path).read_image(0)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all()

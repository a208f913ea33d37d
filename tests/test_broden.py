"""The Broden reader: exact read-back, label space, splits, and every format error."""

from __future__ import annotations

import os
import pathlib
import re
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxdissect.data.broden import Broden, BrodenFormatError, primary_categories
from tests.broden_testing import (
    BRODEN_CATEGORIES,
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

LABELS = [
    LabelSpec(1, "sky", {"object": 1.0}),
    LabelSpec(2, "street-s", {"scene": 1.0}),
    LabelSpec(3, "red-c", {"color": 1.0}),
]


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


def test_jpeg_and_grayscale_images_become_rgb(tmp_path):
    write_broden(tmp_path, categories=("object",), labels=LABELS[:1], rows=[RowSpec("a.jpg")])
    Image.fromarray(default_rgb(0, (8, 8))[..., 0]).save(tmp_path / "images" / "a.jpg")
    image = Broden.open(tmp_path).read_image(0)
    assert image.shape == (8, 8, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all()


# --- errors ------------------------------------------------------------------------------


def base(tmp_path: pathlib.Path, rows=None, **kwargs):
    """Two pixel categories and one image-level; rows default to two good ones."""
    plane = np.array([[1, 1, 0, 0]] * 4)
    if rows is None:
        rows = [
            RowSpec("a.png", pixel={"object": [plane]}, image_labels={"scene": [2]}),
            RowSpec("b.png", "val", pixel={"object": [plane.T], "color": [plane * 3]}),
        ]
    kwargs.setdefault("categories", ("color", "object", "scene"))
    kwargs.setdefault("labels", LABELS)
    return write_broden(tmp_path, rows=rows, **kwargs)


def raises(match: str, *parts: str):
    """pytest.raises for BrodenFormatError whose message contains `match` and every part."""

    class Checker:
        def __enter__(self):
            self.ctx = pytest.raises(BrodenFormatError, match=re.escape(match))
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            for part in parts:
                assert part in message, f"{part!r} not in {message!r}"
            return handled

    return Checker()


@pytest.mark.parametrize("name", ["index.csv", "label.csv", "category.csv", "c_object.csv"])
def test_missing_csv_file(tmp_path, name):
    base(tmp_path)
    (tmp_path / name).unlink()
    with raises("file not found", str(tmp_path / name)):
        Broden.open(tmp_path)


def test_missing_folder(tmp_path):
    with raises("not a folder", str(tmp_path / "nope")):
        Broden.open(tmp_path / "nope")


@pytest.mark.parametrize(
    ("name", "column"),
    [
        ("index.csv", "sh"),
        ("label.csv", "name"),
        ("category.csv", "name"),
        ("c_scene.csv", "coverage"),
    ],
)
def test_missing_column(tmp_path, name, column):
    base(tmp_path)

    def drop(rows):
        k = rows[0].index(column)
        return [r[:k] + r[k + 1 :] for r in rows]

    edit_csv(tmp_path / name, drop)
    with raises("missing column", str(tmp_path / name), "line 1", column):
        Broden.open(tmp_path)


def test_missing_image_and_png(tmp_path):
    base(tmp_path)
    ds = Broden.open(tmp_path)
    (tmp_path / "images" / "b.png").unlink()
    (tmp_path / "images" / "b_color_1.png").unlink()
    ds.read_image(0)  # files gone after open: found when read
    with raises("image not found", str(tmp_path / "images" / "b.png"), "line 3"):
        ds.read_image(1)
    with raises("not found", str(tmp_path / "images" / "b_color_1.png"), "line 3", "'color'"):
        ds.read_labels(1)
    with raises("not found", "b.png"):
        ds[1]
    # Gone before open: found by open's walk, whatever check_headers says.
    for check_headers in (True, False):
        with raises("image not found", str(tmp_path / "images" / "b.png"), "line 3", "'image'"):
            Broden.open(tmp_path, check_headers=check_headers)


def test_corrupt_and_truncated_files(tmp_path):
    base(tmp_path)
    images = tmp_path / "images"
    (images / "a.png").write_bytes(b"this is not an image")
    data = (images / "b_object_1.png").read_bytes()
    (images / "b_object_1.png").write_bytes(data[: len(data) // 2])
    ds = Broden.open(tmp_path, check_headers=False)
    with raises("cannot read image", str(images / "a.png"), "line 2"):
        ds.read_image(0)
    with raises("cannot", str(images / "b_object_1.png")):
        ds.read_labels(1)
    with raises("cannot", str(images / "b_object_1.png"), "line 3"):
        ds.check_labels(1)
    # The header scan finds the unreadable header at open; a truncated body needs decoding.
    with raises("cannot read image", str(images / "a.png"), "line 2"):
        Broden.open(tmp_path)
    base(tmp_path)
    (images / "b_object_1.png").write_bytes(data[: len(data) // 2])
    with raises("cannot", str(images / "b_object_1.png"), "line 3"):
        Broden.open(tmp_path).check_labels(1)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        (RowSpec("a.png", pixel={"object": [np.ones((4, 5), int)]}), "segmentation is 4x5"),
        (RowSpec("a.png", rgb=np.zeros((8, 9, 3), np.uint8)), "image is 8x9"),
    ],
)
def test_header_scan_finds_bad_sizes_at_open(tmp_path, row, match):
    base(tmp_path, rows=[RowSpec("z.png"), row])
    ds = Broden.open(tmp_path, check_headers=False)  # without the scan: found when read
    with raises(match, "line 3"):
        ds[1]
    with raises(match, "line 3"):
        Broden.open(tmp_path)


def test_header_scan_finds_a_16_bit_label_png_at_open(tmp_path):
    base(tmp_path, rows=[RowSpec("a.png", pixel={"object": [np.ones((4, 4), int)]})])
    png = tmp_path / "images" / "a_object_1.png"
    Image.fromarray(np.ones((4, 4), np.uint16)).save(png)
    with raises("PNG mode 'I;16' is not 8-bit RGB", str(png), "line 2", "'object'"):
        Broden.open(tmp_path)
    with raises("PNG mode 'I;16' is not 8-bit RGB", str(png)):
        Broden.open(tmp_path, check_headers=False).check_labels(0)


def test_header_memo_skips_a_scan_that_passed_on_the_same_files(tmp_path, monkeypatch):
    from jaxdissect.data import broden_images

    root, memo = tmp_path / "b", tmp_path / "memo"
    base(root, rows=[RowSpec("a.png"), RowSpec("b.png")])
    scans = []
    real = broden_images.check_headers
    monkeypatch.setattr(broden_images, "check_headers", lambda *a: (scans.append(1), real(*a))[1])
    first = Broden.open(root, header_memo=memo)
    assert len(scans) == 1 and len(list(memo.iterdir())) == 1
    again = Broden.open(root, header_memo=memo)
    assert len(scans) == 1 and again.fingerprint() == first.fingerprint()
    Broden.open(root)  # no memo: always scans
    assert len(scans) == 2
    # A file changed (size and mtime): a new fingerprint, scanned again, and refused.
    png = root / "images" / "b.png"
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(png)
    os.utime(png, ns=(1, 1))
    with raises("image is 9x8", "line 3"):
        Broden.open(root, header_memo=memo)
    assert len(scans) == 3 and len(list(memo.iterdir())) == 1  # a failed scan is not kept


def _png_rgb16(rgb: np.ndarray) -> bytes:
    """A 16-bit-a-channel RGB PNG (PIL cannot write one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].astype(">u2").tobytes() for i in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_a_16_bit_rgb_label_png_is_refused_not_read_as_its_high_bytes(tmp_path):
    # PIL opens it as mode RGB and keeps the high byte: label 1 would silently read as 0.
    base(tmp_path, rows=[RowSpec("a.png", pixel={"object": [np.ones((4, 4), int)]})])
    png = tmp_path / "images" / "a_object_1.png"
    rgb = np.zeros((4, 4, 3), np.uint16)
    rgb[..., 0] = 1
    png.write_bytes(_png_rgb16(rgb))
    with raises("16-bit channels", str(png), "line 2"):
        Broden.open(tmp_path)
    with raises("16-bit channels", str(png)):
        Broden.open(tmp_path, check_headers=False).check_labels(0)


@pytest.mark.parametrize("mode", ["L", "1"])
def test_a_greyscale_label_png_is_refused_unless_all_zero(tmp_path, mode):
    # Grey v reads as R = G = v, label v * 257: a mask of label numbers (1) would be 257.
    base(tmp_path, rows=[RowSpec("a.png", pixel={"object": [np.ones((4, 4), int)]})])
    png = tmp_path / "images" / "a_object_1.png"
    Image.fromarray(np.ones((4, 4), np.uint8) * (255 if mode == "1" else 1)).convert(mode).save(png)
    with raises(f"greyscale PNG (mode {mode})", str(png), "line 2", "R = label % 256"):
        Broden.open(tmp_path).read_labels(0)
    Image.fromarray(np.zeros((4, 4), np.uint8)).convert(mode).save(png)  # label 0 everywhere
    planes, _ = Broden.open(tmp_path).read_labels(0)
    assert planes.shape == (1, 4, 4) and not planes.any()


def test_a_label_file_that_is_not_a_png_is_refused_by_its_format(tmp_path):
    base(tmp_path, rows=[RowSpec("a.png", pixel={"object": [np.ones((4, 4), int)]})])
    png = tmp_path / "images" / "a_object_1.png"
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 1
    Image.fromarray(rgb).save(png, format="JPEG", quality=100)
    with raises("a JPEG file", str(png), "line 2", "must be PNG"):
        Broden.open(tmp_path)


def test_truncated_jpeg(tmp_path):
    base(
        tmp_path,
        rows=[
            RowSpec(
                "a.jpg", rgb=np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8)
            )
        ],
    )
    path = tmp_path / "images" / "a.jpg"
    path.write_bytes(path.read_bytes()[:300])
    with raises("cannot", str(path)):
        Broden.open(tmp_path).read_image(0)


def test_png_label_not_in_label_csv(tmp_path):
    base(tmp_path, rows=[RowSpec("a.png", pixel={"object": [np.array([[1, 4, 4, 0]] * 4)]})])
    ds = Broden.open(tmp_path)
    with raises(
        "label number(s) 4 are not in", str(tmp_path / "images" / "a_object_1.png"), "line 2"
    ):
        ds.read_labels(0)
    big = np.array([[1, 256 * 7, 0, 0]] * 4)
    base(tmp_path, rows=[RowSpec("a.png", pixel={"object": [big]})])
    with raises("1792", "label.csv"):
        Broden.open(tmp_path).read_labels(0)


def test_a_category_file_cut_to_its_header_is_refused(tmp_path):
    base(tmp_path)  # index.csv has object data on lines 2 and 3
    (tmp_path / "c_object.csv").write_text("code,number,name,frequency,coverage\n")
    with raises(str(tmp_path / "c_object.csv"), "lists no label", "line 2 has 'object' data"):
        Broden.open(tmp_path)


def test_labels_a_category_file_leaves_out_are_logged(tmp_path, caplog):
    labels = [*LABELS, LabelSpec(4, "blue-c", {"color": 1.0})]
    base(tmp_path, labels=labels)
    with caplog.at_level("WARNING"):
        Broden.open(tmp_path)
    assert not caplog.records  # the writer's tables agree
    c_color = tmp_path / "c_color.csv"
    c_color.write_text("".join(c_color.read_text().splitlines(keepends=True)[:2]))
    with caplog.at_level("WARNING"):
        ds = Broden.open(tmp_path)
    assert ds.labels.category_of(4) is None  # not scored: what the warning says
    (message,) = [r.getMessage() for r in caplog.records]
    assert "puts 1 label(s) in 'color' that" in message and "c_color.csv" in message


def test_identity_is_the_tables_split_and_count_not_the_files(tmp_path):
    import shutil

    base(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    a, copy = Broden.open(tmp_path / "a"), Broden.open(tmp_path / "copy")
    assert a.identity() == copy.identity() and a.fingerprint() != copy.fingerprint()
    assert Broden.open(tmp_path / "a", split="val").identity() != a.identity()
    assert Broden.open(tmp_path / "a", max_images=1).identity() == a.identity(count=1)
    assert a.identity(count=1) != a.identity()
    label_csv = tmp_path / "copy" / "label.csv"
    label_csv.write_text(label_csv.read_text().replace("sky", "skies"))
    assert Broden.open(tmp_path / "copy").identity() != a.identity()


def test_an_image_listed_twice_is_refused(tmp_path):
    base(tmp_path, rows=[RowSpec("a.png"), RowSpec("b.png"), RowSpec("c.png")])
    index = tmp_path / "index.csv"
    lines = index.read_text().splitlines(keepends=True)
    assert lines[2].startswith("b.png,")
    index.write_text("".join(lines + ["./" + lines[2]]))
    with raises("line 5: image './b.png' is listed again (first at line 3)"):
        Broden.open(tmp_path)


def test_image_label_not_in_label_csv(tmp_path):
    base(tmp_path, rows=[RowSpec("a.png"), RowSpec("b.png", image_labels={"scene": [2, 17]})])
    with raises("label number 17 is not in", "index.csv line 3", "'scene'"):
        Broden.open(tmp_path)


def test_png_size_differs(tmp_path):
    base(tmp_path, rows=[RowSpec("a.png", pixel={"object": [np.ones((4, 5), int)]})])
    with raises("segmentation is 4x5", "a_object_1.png", "line 2", "sh,sw = 4,4"):
        Broden.open(tmp_path).read_labels(0)


def test_image_size_differs(tmp_path):
    base(tmp_path, rows=[RowSpec("a.png", rgb=np.zeros((8, 9, 3), np.uint8))])
    with raises("image is 8x9", str(tmp_path / "images" / "a.png"), "line 2", "ih,iw = 8,8"):
        Broden.open(tmp_path).read_image(0)


@pytest.mark.parametrize(
    ("column", "cell"),
    [
        ("image", "../outside.png"),
        ("image", "/etc/passwd"),
        ("object", "a/../../x.png"),
        ("object", "ok.png;/abs.png"),
        ("color", "C:\\x.png"),
        ("image", "a\0.png"),  # no file name holds NUL: os.stat raised a bare ValueError
        ("object", "ok.png;b\0.png"),
    ],
)
def test_path_escapes_the_dataset(tmp_path, column, cell):
    base(tmp_path, rows=[RowSpec("a.png", cells={column: cell})])
    with raises("escapes the dataset folder", "index.csv line 2", repr(column)):
        Broden.open(tmp_path)


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


def test_empty_index(tmp_path):
    base(tmp_path, rows=[])
    with raises("empty index", "no image rows", "index.csv"):
        Broden.open(tmp_path)


def test_empty_after_filtering(tmp_path):
    base(tmp_path, rows=[RowSpec("a.png")])
    with raises("empty index", "split='val'", "index.csv"):
        Broden.open(tmp_path, split="val")
    with raises("empty index", "max_images=0"):
        Broden.open(tmp_path, max_images=0)


def test_unknown_category_column(tmp_path):
    base(tmp_path, columns=("color", "object", "scene", "weather"))
    with raises("column 'weather' is not a category", "index.csv line 1"):
        Broden.open(tmp_path)


def test_category_without_a_column(tmp_path):
    # A column cut from index.csv would read as a category without data in any image.
    base(tmp_path)
    edit_csv(tmp_path / "index.csv", lambda rows: [r[:-1] for r in rows])
    with raises("no column for 'scene'", "index.csv line 1", "add the column"):
        Broden.open(tmp_path)


def test_records_with_different_sizes(tmp_path):
    base(tmp_path, rows=[RowSpec("a.png"), RowSpec("b.png", cells={"sh": "5"}, write_image=False)])
    with raises("differ from line 2", "index.csv line 3"):
        Broden.open(tmp_path)


def test_unknown_split(tmp_path):
    base(tmp_path)
    with raises("unknown split 'test'", "train", "val", "all"):
        Broden.open(tmp_path, split="test")


@pytest.mark.parametrize(
    ("name", "match", "line"),
    [
        ("index.csv", "column 'ih' holds 'x'", "line 2"),
        ("index.csv", "column 'sw' holds '-4'", "line 3"),
        ("label.csv", "column 'number' holds '1.5'", "line 2"),
        ("c_object.csv", "column 'coverage' holds 'lots'", "line 2"),
        ("c_scene.csv", "column 'number' holds 'two'", "line 2"),
    ],
)
def test_malformed_number(tmp_path, name, match, line):
    base(tmp_path)
    column, value = re.match(r"column '(\w+)' holds '(.*)'", match).groups()
    row = int(line.split()[1]) - 1

    def set_cell(rows):
        rows[row][rows[0].index(column)] = value

    edit_csv(tmp_path / name, set_cell)
    with raises(match, str(tmp_path / name), line):
        Broden.open(tmp_path)


def test_malformed_image_level_number(tmp_path):
    base(
        tmp_path,
        rows=[
            RowSpec("a.png", image_labels={"scene": [2]}),
            RowSpec("b.png", image_labels={"scene": "2;3a"}),
        ],
    )
    with raises("'3a' is not a label number", "index.csv line 3", "'scene'"):
        Broden.open(tmp_path)


def test_number_in_a_pixel_column(tmp_path):
    plane = np.ones((4, 4), int)
    rows = [RowSpec(f"{k}.png", pixel={"object": [plane]}) for k in range(2)]
    rows.append(RowSpec("c.png", pixel={"object": ["1"]}))
    base(tmp_path, rows=rows)
    with raises("'1' is a label number but 'object' is a pixel category", "index.csv line 4"):
        Broden.open(tmp_path)


def test_wrong_field_count(tmp_path):
    base(tmp_path)
    edit_csv(tmp_path / "index.csv", lambda rows: rows[2].append("extra"))
    with raises("fields but the header has", "index.csv line 3"):
        Broden.open(tmp_path)


def test_duplicate_label_number(tmp_path):
    base(tmp_path)
    edit_csv(tmp_path / "label.csv", lambda rows: rows.append(["2", "again", "", "1", "1", ""]))
    with raises("label number 2 is defined twice", "label.csv line 5"):
        Broden.open(tmp_path)


def test_label_number_a_png_cannot_hold(tmp_path):
    # One stray row must not size the label space (and every [units, labels] count array).
    base(tmp_path)
    edit_csv(tmp_path / "label.csv", lambda rows: rows.append(["65535", "top", "", "1", "1", ""]))
    assert Broden.open(tmp_path).labels.num_labels == 65536
    edit_csv(
        tmp_path / "label.csv", lambda rows: rows.append(["5000000", "typo", "", "1", "1", ""])
    )
    with raises("label number 5000000 is above 65535", "label.csv line 6", "fix the row"):
        Broden.open(tmp_path)


def test_label_listed_twice_in_a_category(tmp_path):
    base(tmp_path)
    edit_csv(tmp_path / "c_object.csv", lambda rows: rows.append(["2", "1", "sky", "1", "1.0"]))
    with raises("listed twice in category 'object'", "c_object.csv line 3"):
        Broden.open(tmp_path)


def test_category_file_names_unknown_label(tmp_path):
    base(tmp_path)
    edit_csv(tmp_path / "c_color.csv", lambda rows: rows.append(["2", "42", "x", "1", "1.0"]))
    with raises("label number 42 is not in", "c_color.csv line 3"):
        Broden.open(tmp_path)


def test_error_is_a_value_error(tmp_path):
    assert issubclass(BrodenFormatError, ValueError)
    with pytest.raises(ValueError):
        Broden.open(tmp_path / "nope")


# --- files that would hang the reader or read from elsewhere --------------------------------


def test_fifo_is_refused_before_opening(tmp_path):
    base(tmp_path)
    path = tmp_path / "images" / "b.png"
    ds = Broden.open(tmp_path)
    path.unlink()
    os.mkfifo(path)  # opening it for reading would block forever
    with raises("is a FIFO (named pipe), not a regular file", str(path), "line 3"):
        Broden.open(tmp_path, check_headers=False)
    with raises("is a FIFO (named pipe), not a regular file", str(path), "line 3"):
        ds.read_image(1)


def test_directory_in_place_of_a_label_png_is_refused(tmp_path):
    base(tmp_path)
    path = tmp_path / "images" / "b_color_1.png"
    path.unlink()
    path.mkdir()
    with raises("is a directory, not a regular file", str(path), "line 3", "'color'"):
        Broden.open(tmp_path)


def test_symlink_leaving_the_dataset_is_refused(tmp_path):
    root = tmp_path / "broden"
    base(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    image = root / "images" / "b.png"
    (outside / "b.png").write_bytes(image.read_bytes())
    image.unlink()
    image.symlink_to(outside / "b.png")
    with raises("outside the dataset folder", str(image), "line 3", str(outside / "b.png")):
        Broden.open(root)
    # A folder symlink that leaves the dataset, on the way to the file, is refused too.
    image.unlink()
    (root / "images" / "sub").symlink_to(outside, target_is_directory=True)
    edit_csv(
        root / "index.csv",
        lambda rows: [[c.replace("b.png", "sub/b.png") for c in r] for r in rows],
    )
    with raises("outside the dataset folder", "sub/b.png", "line 3"):
        Broden.open(root)


def test_symlinks_inside_the_dataset_and_a_linked_root_are_read(tmp_path):
    root = tmp_path / "broden"
    written = base(root)
    image = root / "images" / "b.png"
    kept = root / "images" / "kept" / "b.png"
    kept.parent.mkdir()
    image.rename(kept)
    image.symlink_to(kept)
    link = tmp_path / "link"  # a user's /data/broden -> /mnt/... is fine
    link.symlink_to(root, target_is_directory=True)
    ds = Broden.open(link)
    np.testing.assert_array_equal(ds.read_image(1), written.images[1])
    image.unlink()
    image.symlink_to(root / "images" / "missing.png")
    with raises("is a symlink to", str(link / "images" / "b.png"), "line 3"):
        Broden.open(link)

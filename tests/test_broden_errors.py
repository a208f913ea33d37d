"""The Broden reader's refusals: every format error, damaged and hostile files, each one
line naming the file and row."""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxdissect.data.broden import Broden, BrodenFormatError
from jaxdissect.data.broden_tables import first_image_size
from tests.broden_testing import (
    LABELS,
    LabelSpec,
    RowSpec,
    edit_csv,
    write_broden,
)

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


def _png(shape: tuple[int, int], depth: int, colour: int, rows: bytes, plte: bytes = b"") -> bytes:
    """A PNG written chunk by chunk (PIL writes neither 16-bit RGB nor a short palette)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", shape[1], shape[0], depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + (chunk(b"PLTE", plte) if plte else b"")
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _png_rgb16(rgb: np.ndarray) -> bytes:
    """A 16-bit-a-channel RGB PNG."""
    rows = b"".join(b"\x00" + rgb[i].astype(">u2").tobytes() for i in range(rgb.shape[0]))
    return _png(rgb.shape[:2], 16, 2, rows)


def test_a_palette_label_png_indexing_past_its_palette_is_refused(tmp_path):
    """PIL reads a pixel past the palette as black: label 0, where the file meant another."""
    base(tmp_path)
    path = tmp_path / "images" / "b_object_1.png"
    index = np.array([[0, 1, 1, 0]] * 4, np.uint8)
    palette = bytes([0, 0, 0, 1, 0, 0])  # label 0, then label 1 (sky)
    rows = lambda a: b"".join(b"\x00" + r.tobytes() for r in a)  # noqa: E731
    path.write_bytes(_png((4, 4), 8, 3, rows(index), palette))
    ds = Broden.open(tmp_path)
    np.testing.assert_array_equal(ds.read_labels(1)[0][1], index)  # a good palette PNG reads
    index[0, 0] = 5
    path.write_bytes(_png((4, 4), 8, 3, rows(index), palette))
    with raises("indexes colour 5 of a 2-colour palette", str(path), "line 3"):
        ds.read_labels(1)


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


def test_empty_index(tmp_path):
    base(tmp_path, rows=[])
    with raises("empty index", "no image rows", "index.csv"):
        Broden.open(tmp_path)


def test_empty_after_filtering(tmp_path):
    base(tmp_path, rows=[RowSpec("a.png")])
    with raises("empty index", "split='val'", "index.csv") as e:
        Broden.open(tmp_path, split="val")
    assert "max_images" not in str(e.value)  # not given: it said max_images=None
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


def test_a_label_png_damaged_in_its_pixel_data_is_refused_never_read_as_other_labels(tmp_path):
    """One bit flipped in each byte of a label PNG's compressed pixels (IDAT), in turn: PIL
    decodes without the chunk's CRC, and some flips decode to other labels that label.csv
    knows. Every one is refused, naming the file and its CRC."""
    plane = np.random.default_rng(0).integers(0, 2, (16, 16))  # sky (1) and unlabelled
    rows = [RowSpec("a.png", pixel={"object": [plane]})]
    base(tmp_path, rows=rows, image_size=(32, 32), seg_size=(16, 16))
    path = tmp_path / "images" / "a_object_1.png"
    data = path.read_bytes()
    ds = Broden.open(tmp_path, check_headers=False)
    np.testing.assert_array_equal(ds.read_labels(0)[0][0], plane)
    start = data.index(b"IDAT") + 4
    (length,) = struct.unpack(">I", data[start - 8 : start - 4])
    for offset in range(start, start + length):
        damaged = bytearray(data)
        damaged[offset] ^= 1
        path.write_bytes(bytes(damaged))
        with raises("'IDAT' chunk at byte 33 fails its CRC", str(path), "line 2"):
            ds.read_labels(0)
    # The check passes an intact file's chunks, and ignores what is no PNG (refused later).
    path.write_bytes(data)
    np.testing.assert_array_equal(ds.read_labels(0)[0][0], plane)


@contextlib.contextmanager
def _opened_for_writing_after(fifo: pathlib.Path, seconds: float):
    """A writer opens and closes `fifo` after `seconds` (a reader waiting on it then reads
    end of file): a test of a FIFO refused fails, rather than hangs, where it is read."""
    done = threading.Event()

    def writer():
        if not done.wait(seconds):
            with open(fifo, "wb"):
                pass

    threading.Thread(target=writer, daemon=True).start()
    try:
        yield
    finally:
        done.set()


@pytest.mark.parametrize("name", ["index.csv", "label.csv", "category.csv", "c_object.csv"])
def test_a_fifo_or_folder_in_place_of_a_table_is_refused_not_waited_on(tmp_path, name):
    base(tmp_path)
    path = tmp_path / name
    path.unlink()
    os.mkfifo(path)
    with (
        _opened_for_writing_after(path, 10),
        raises("is a FIFO (named pipe), not a regular file; reading it could hang", str(path)),
    ):
        Broden.open(tmp_path)
    assert name != "index.csv" or first_image_size(tmp_path) is None  # nor waits
    path.unlink()
    path.mkdir()
    with raises("is a directory, not a regular file", str(path)):
        Broden.open(tmp_path)


@pytest.mark.parametrize(
    ("name", "column", "row"),
    [("index.csv", "ih", 1), ("index.csv", "scene", 1), ("label.csv", "number", 2)],
)
def test_a_number_of_thousands_of_digits_is_refused_naming_its_cell(tmp_path, name, column, row):
    """Python's int() refuses over 4,300 digits in a message naming no file: such a number
    is out of every range, and refused as one in the file's own message."""
    base(tmp_path)

    def set_cell(rows):
        rows[row][rows[0].index(column)] = "1" * 5000

    edit_csv(tmp_path / name, set_cell)
    with raises(f"{tmp_path / name} line {row + 1}", "'1111", "... (5000 characters)"):
        Broden.open(tmp_path)

"""Images of every PIL mode to 8-bit RGB, each against a conversion written here from the pixels."""

from __future__ import annotations

import io
import pathlib

import numpy as np
import pytest
from PIL import Image

from jaxdissect.data import images
from jaxdissect.data.broden import Broden, BrodenFormatError
from tests.broden_testing import LabelSpec, RowSpec, write_broden

SIZE = (6, 5)  # h, w
RNG = np.random.default_rng(0)


def _u8(*channels: int) -> np.ndarray:
    return RNG.integers(0, 256, (*SIZE, *channels), dtype=np.uint8)


def _palette() -> np.ndarray:
    return RNG.integers(0, 256, (256, 3), dtype=np.uint8)


def _grey(v: np.ndarray) -> np.ndarray:
    return np.repeat(v[..., None], 3, axis=-1)


def _reopened(im: Image.Image, fmt: str) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    buf.seek(0)
    out = Image.open(buf)
    assert out.mode == im.mode, (fmt, im.mode, out.mode)
    return out


def _case(mode: str) -> tuple[Image.Image, np.ndarray, float]:
    """(image of `mode`, expected uint8 RGB computed from its pixels, tolerance)."""
    h, w = SIZE
    if mode == "RGB":
        a = _u8(3)
        return Image.fromarray(a), a, 0
    if mode == "L":
        a = _u8()
        return Image.fromarray(a), _grey(a), 0
    if mode == "1":
        a = _u8() > 127
        return Image.fromarray(a), _grey(a.astype(np.uint8) * 255), 0
    if mode in ("P", "PA"):
        a, pal = _u8(len(mode)), _palette()
        im = Image.frombytes(mode, (w, h), a.tobytes())
        im.putpalette(pal.tobytes())
        return im, pal[a[..., 0]], 0
    if mode in ("LA", "RGBA", "RGBX"):
        a = _u8(len(mode))
        expected = _grey(a[..., 0]) if mode == "LA" else a[..., :3]  # alpha / padding dropped
        return Image.frombytes(mode, (w, h), a.tobytes()), expected, 0
    if mode == "CMYK":
        a = _u8(4)
        c, k = a[..., :3].astype(float), a[..., 3:].astype(float)
        return Image.frombytes(mode, (w, h), a.tobytes()), np.round((255 - c) * (255 - k) / 255), 0
    if mode == "YCbCr":
        a = _u8(3)
        y, cb, cr = (a[..., i].astype(float) for i in range(3))
        rgb = np.stack(
            [
                y + 1.402 * (cr - 128),
                y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                y + 1.772 * (cb - 128),
            ],
            axis=-1,
        )
        # PIL's fixed-point JPEG formulas: within 1 of the exact ones.
        return Image.frombytes(mode, (w, h), a.tobytes()), np.round(rgb.clip(0, 255)), 1
    if mode.startswith("I;16"):
        v = RNG.integers(0, 1 << 16, SIZE).astype(np.uint16)
        v[0, :3] = (0, 65535, 116 * 257)  # ends of the range, and the grey
        order = ">u2" if mode == "I;16B" else "<u2"
        im = Image.frombytes(mode, (w, h), v.astype(order).tobytes())
        return im, _grey(np.round(v / 257.0)), 0  # scaled, never clipped
    raise AssertionError(mode)


CONVERTED = ["RGB", "L", "1", "P", "PA", "LA", "RGBA", "RGBX", "CMYK", "YCbCr"]
SIXTEEN = ["I;16", "I;16L", "I;16B", "I;16N"]


@pytest.mark.parametrize("mode", CONVERTED + SIXTEEN)
def test_every_mode_converts_like_an_independent_conversion(mode):
    im, expected, tolerance = _case(mode)
    assert im.mode == mode
    got = images.to_rgb8(im)
    assert got.dtype == np.uint8 and got.shape == (*SIZE, 3)
    assert np.abs(got.astype(float) - expected).max() <= tolerance


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("1", "PNG"),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("I;16", "PNG"),
        ("CMYK", "TIFF"),
        ("CMYK", "JPEG"),
        ("YCbCr", "TIFF"),
        ("I;16B", "TIFF"),
    ],
)
def test_files_of_each_mode(mode, fmt):
    im, expected, tolerance = _case(mode)
    reopened = _reopened(im, fmt)
    if fmt == "JPEG":  # lossy: the expected colours come from the CMYK values decoded
        a = np.asarray(reopened).astype(float)
        expected = np.round((255 - a[..., :3]) * (255 - a[..., 3:]) / 255)
    got = images.to_rgb8(reopened)
    assert np.abs(got.astype(float) - expected).max() <= tolerance


@pytest.mark.parametrize("mode", ["I", "F", "La", "RGBa", "LAB", "HSV"])
def test_modes_without_an_exact_conversion_are_refused(mode):
    with pytest.raises(images.UnsupportedImageMode, match=f"PIL mode '{mode}'"):
        images.to_rgb8(Image.new(mode, (2, 2)))


def _one_image_broden(tmp_path, save) -> pathlib.Path:
    """A one-row Broden whose image a.png is written by `save(path)`."""
    write_broden(
        tmp_path,
        categories=("object",),
        labels=[LabelSpec(1, "car", {"object": 0.5})],
        rows=[RowSpec("a.png")],
        image_size=SIZE,
        seg_size=(3, 3),
    )
    save(tmp_path / "images" / "a.png")
    return tmp_path


def test_16_bit_grey_image_keeps_its_brightness(tmp_path):
    """The issue's case: mean 116 (16-bit 116 * 257) was read as all-white."""
    v = np.full(SIZE, 116 * 257, np.uint16)
    v[0, 0] = 65535
    root = _one_image_broden(tmp_path, lambda p: Image.fromarray(v).save(p))
    assert Image.open(root / "images" / "a.png").mode == "I;16"
    ds = Broden.open(root)
    np.testing.assert_array_equal(ds.read_image(0), _grey(np.round(v / 257.0)).astype(np.uint8))
    assert ds[0]["image"].mean() == pytest.approx(116 + 139 / (SIZE[0] * SIZE[1]))


def test_refused_mode_names_the_file_and_row(tmp_path):
    # A float TIFF under the listed name: its range is unknown, so it is refused.
    root = _one_image_broden(tmp_path, lambda p: Image.new("F", SIZE[::-1]).save(p, "TIFF"))
    path = root / "images" / "a.png"
    for open_and_read in (
        lambda: Broden.open(root),  # the header scan
        lambda: Broden.open(root, check_headers=False).read_image(0),
    ):
        with pytest.raises(BrodenFormatError) as info:
            open_and_read()
        message = str(info.value)
        assert str(path) in message and "index.csv line 2" in message, message
        assert "PIL mode 'F'" in message, message

"""Pixels of an opened image of any PIL mode as 8-bit RGB, or a refusal that says why.

- RGB is taken as it is; 1, L, P (palette expanded), RGBX, CMYK and YCbCr go
  through PIL's own conversion to RGB.
- LA, PA and RGBA: the alpha channel is dropped (the colour channels are kept
  as stored, not composited on a background).
- 16-bit greyscale (I;16, I;16L, I;16B, I;16N) is scaled to 8 bits,
  round(v * 255 / 65535), never clipped. (16-bit RGB PNGs reach us as RGB:
  PIL's decoder keeps the high byte.)
- Every other mode (I: 32-bit integers, F: floats, premultiplied alpha, LAB,
  HSV, ...) has no range or colour space we could convert without guessing: it
  is refused with `UnsupportedImageMode`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Modes PIL converts to RGB exactly as the mode means it.
_PIL_RGB_MODES = frozenset({"1", "L", "P", "RGBX", "CMYK", "YCbCr", "LA", "PA", "RGBA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
RGB8_MODES = frozenset({"RGB"}) | _PIL_RGB_MODES | _SIXTEEN_BIT_MODES

_REFUSED_WHY = {
    "I": "32-bit integer pixels of unknown range",
    "F": "32-bit float pixels of unknown range",
    "La": "premultiplied alpha",
    "RGBa": "premultiplied alpha",
    "LAB": "CIELAB colours",
    "HSV": "HSV colours",
}


class UnsupportedImageMode(ValueError):
    """An image's PIL mode has no exact conversion to 8-bit RGB."""


def check_mode(mode: str) -> None:
    """Raises `UnsupportedImageMode` unless `to_rgb8` converts images of this mode."""
    if mode not in RGB8_MODES:
        why = _REFUSED_WHY.get(mode, "not a mode this reader knows")
        raise UnsupportedImageMode(
            f"PIL mode {mode!r} ({why}) has no exact 8-bit RGB conversion; save the image as "
            "8-bit RGB or greyscale (JPEG or PNG)"
        )


def scale16(values: np.ndarray) -> np.ndarray:
    """uint8 of 16-bit values: round(v * 255 / 65535), exactly (integer arithmetic)."""
    return ((np.asarray(values).astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb8(im: Image.Image) -> np.ndarray:
    """uint8 [h, w, 3] RGB pixels of `im` (decoded here if it is not yet)."""
    check_mode(im.mode)
    if im.mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if im.mode in _SIXTEEN_BIT_MODES:
        grey = scale16(np.asarray(im))  # any byte order becomes native
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.array(im.convert("RGB"), dtype=np.uint8)

"""Colour labels: each pixel named by the nearest of the 11 Broden colour prototypes in CIELAB."""

from __future__ import annotations

from types import MappingProxyType

import numpy as np
from PIL import Image

from jaxdissect.data.synthetic.vocabulary import COLOR_NAMES, COLORS, LABEL_NUMBERS


def _srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """uint8 sRGB [..., 3] -> float32 CIELAB (D65) [..., 3]."""
    lin = _SRGB_LINEAR[np.asarray(rgb, dtype=np.uint8)]
    xyz = lin @ _RGB_TO_XYZ_T
    t = xyz / _D65
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.stack(
        [116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])],
        axis=-1,
    )
    return lab.astype(np.float32)


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


_v = np.arange(256, dtype=np.float64) / 255
_SRGB_LINEAR = _readonly(
    np.where(_v <= 0.04045, _v / 12.92, ((_v + 0.055) / 1.055) ** 2.4).astype(np.float32)
)
_RGB_TO_XYZ_T = _readonly(
    np.array(
        [[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]],
        dtype=np.float32,
    ).T.copy()
)
_D65 = _readonly(np.array([0.9505, 1.0, 1.089], dtype=np.float32))
del _v

# Several sRGB prototypes per colour name (light and dark variants), so that a
# dark grey is grey and not black only because grey's single prototype is mid-grey.
_COLOR_PROTOTYPES = MappingProxyType(
    {
        "black": ((12, 12, 12), (40, 38, 40)),
        "blue": ((40, 70, 200), (100, 150, 225), (25, 40, 110), (140, 185, 235)),
        "brown": ((120, 70, 35), (155, 105, 65), (80, 50, 28), (180, 140, 100)),
        "grey": ((128, 128, 128), (88, 88, 92), (168, 168, 168), (200, 200, 205)),
        "green": ((40, 150, 50), (25, 90, 35), (120, 190, 80), (85, 120, 45)),
        "orange": ((240, 130, 20), (215, 100, 25), (250, 170, 70)),
        "pink": ((245, 160, 190), (220, 100, 150), (250, 200, 210)),
        "purple": ((120, 50, 150), (170, 100, 190), (75, 30, 95)),
        "red": ((200, 25, 30), (150, 20, 25), (230, 60, 60)),
        "white": ((250, 250, 250), (232, 232, 236)),
        "yellow": ((245, 225, 50), (200, 190, 60), (250, 240, 140)),
    }
)
_PROTO_LAB = _readonly(
    _srgb_to_lab(np.array([p for n in COLOR_NAMES for p in _COLOR_PROTOTYPES[n]], np.uint8))
)
_PROTO_INDEX = _readonly(
    np.array([i for i, n in enumerate(COLOR_NAMES) for _ in _COLOR_PROTOTYPES[n]], np.int32)
)


def color_names(rgb: np.ndarray) -> np.ndarray:
    """Broden colour of each pixel: index into `COLOR_NAMES` of the nearest prototype in CIELAB.

    Args:
      rgb: uint8 [..., 3] sRGB pixels.

    Returns:
      int32 [...]: 0..10; the label number is that + 1 (`LABEL_NUMBERS["black-c"] == 1`).
    """
    lab = _srgb_to_lab(rgb)
    # Per channel over [..., prototypes]: elementwise, so exactly reproducible (no BLAS).
    d = (lab[..., 0, None] - _PROTO_LAB[:, 0]) ** 2
    d += (lab[..., 1, None] - _PROTO_LAB[:, 1]) ** 2
    d += (lab[..., 2, None] - _PROTO_LAB[:, 2]) ** 2
    return _PROTO_INDEX[np.argmin(d, axis=-1)]


def color_plane(image: np.ndarray, seg_size: tuple[int, int]) -> np.ndarray:
    """Colour label numbers at segmentation size: box-filter the image, then name each pixel."""
    sh, sw = seg_size
    small = np.asarray(Image.fromarray(image).resize((sw, sh), Image.Resampling.BOX))
    return color_names(small) + LABEL_NUMBERS[COLORS[0]]

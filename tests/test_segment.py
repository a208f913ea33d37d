"""Regions and painting of jaxdissect/segment.py against a per-pixel loop."""

from __future__ import annotations

import numpy as np
import pytest

from jaxdissect import segment


def _loop(masks, names, scores):
    """Per pixel: the name of the covering mask with the highest score (ties: first name)."""
    order = list(dict.fromkeys(names))
    h, w, m = masks.shape
    out = np.full((h, w), None, object)
    for y in range(h):
        for x in range(w):
            best = None
            for name in order:
                s = max(
                    (scores[j] for j in range(m) if names[j] == name and masks[y, x, j]),
                    default=None,
                )
                if s is not None and (best is None or s > best[1]):
                    best = (name, s)
            out[y, x] = None if best is None else best[0]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_painting_equals_the_loop(seed):
    rng = np.random.default_rng(seed)
    masks = rng.random((9, 7, 6)) < 0.3
    masks[..., 5] = False  # a unit that does not fire: no region
    names = ["sky", "tree", "sky", "road", "tree", "car"]
    scores = [0.1, 0.3, 0.3, 0.05, 0.2, 0.9]  # sky ties tree at 0.3: sky comes first
    painted, regions = segment.regions_of(
        masks, names, ["c"] * 6, scores, units=[10, 11, 12, 13, 14, 15]
    )
    want = _loop(masks, names, scores)
    got = np.array([[regions[p].name if p >= 0 else None for p in row] for row in painted])
    np.testing.assert_array_equal(got, want)
    assert [r.name for r in regions] == ["sky", "tree", "road"]
    sky = regions[0]
    assert sky.units == (10, 12) and sky.score == 0.3
    union = masks[..., 0] | masks[..., 2]
    assert sky.pixels == union.sum() and sky.painted == (want == "sky").sum()
    ys, xs = np.nonzero(union)
    assert sky.bbox == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_nothing_fires():
    painted, regions = segment.regions_of(np.zeros((4, 5, 2), bool), ["a", "b"], ["c", "c"], [1, 2])
    assert regions == [] and (painted == -1).all()
    painted, regions = segment.regions_of(np.zeros((4, 5, 0), bool), [], [], [])
    assert regions == [] and painted.shape == (4, 5)


def test_overlay_blends_only_painted_pixels():
    image = np.full((2, 2, 3), 100, np.uint8)
    painted = np.array([[0, -1], [-1, 0]])
    out = segment.overlay(image, painted, np.array([[200, 0, 0]], np.uint8))
    assert (out[0, 1] == 100).all() and out[0, 0, 0] > 100 and out[0, 0, 1] < 100


def test_bad_masks_name_the_shape():
    with pytest.raises(ValueError, match="expected"):
        segment.regions_of(np.zeros((4, 5, 3), bool), ["a"], ["c"], [1.0])


def test_a_long_name_is_cut_with_an_ellipsis_to_fit():
    assert segment.fit_text("sky (object)", 12, len) == "sky (object)"
    assert segment.fit_text("playground-s (scene)", 10, len) == "playgroun\u2026"
    assert segment.fit_text("a b c", 3, len) == "a\u2026"  # no space before the ellipsis
    assert segment.fit_text("abc", 0, len) == "\u2026"


def test_legend_entries_stay_under_their_panel():
    """Long label names are cut to the legend column's width: they ran into the next panel's
    legend, and the figure grew to hold them."""
    import io

    from PIL import Image

    image = np.full((32, 32, 3), 128, np.uint8)
    painted = np.zeros((32, 32), np.int64)
    painted[16:] = 1

    def width(name: str) -> int:
        regions = [
            segment.Region(name, "scene", "unit", (0,), 0.1, 512, 512, (0, 0, 32, 16)),
            segment.Region("sky", "object", "unit", (1,), 0.1, 512, 512, (0, 16, 32, 32)),
        ]
        png = segment.figure_png(image, [("units", painted, regions)] * 2)
        return Image.open(io.BytesIO(png)).width

    short, long = width("sea"), width("playground " * 30)
    assert long <= short * 1.02, (short, long)
    assert segment.legend_text_width(420) == (420 - (0.8 + 2 * 2.8 + 2.0) * 700 / 72) / 2

"""The dissection report: strips, plots and static HTML pages from made-up results."""

from __future__ import annotations

import functools
import html.parser
import os
import re
import subprocess
import sys
import urllib.parse
import xml.etree.ElementTree as ET
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from jaxdissect import report, results, tally
from jaxdissect.report import LayerPage, RunInfo, UnitCard, build

XSS = "<script>alert(1)</script>"
AMP = 'Tom & Jerry\'s "cart"'
MATH = "$x^2$ price"
CATEGORIES = ("object", "part", "scene", "texture", "color")


def _upsample(maps: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """The tally's upsampling (`tally.upsample`) of one unit's maps [T, h, w] to [T, H, W]."""
    size = (size, size) if isinstance(size, int) else size
    return np.asarray(tally.upsample(np.asarray(maps, np.float32)[..., None], size))[..., 0]


def _upsample_f64(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Plain numpy reference of the bilinear formula (`jaxdissect.tally`'s docstring: half-pixel
    centres, edge clamping, rows then columns) in float64, rounded to float32 once."""
    m = np.asarray(maps, np.float64)
    for axis, n_out in ((1, size[0]), (2, size[1])):
        n_in = m.shape[axis]
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        i0 = np.floor(src).astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        shape = [1, 1, 1]
        shape[axis] = n_out
        f = (src - i0).reshape(shape)
        m = np.take(m, i0, axis=axis) * (1.0 - f) + np.take(m, i1, axis=axis) * f
    return m.astype(np.float32)


def _layer(
    rng: np.random.Generator, out: Path, name: str, stem: str, k: int, labels: list[str], thr: float
) -> LayerPage:
    """A layer of `k` units with random IoUs, small strips and some runners-up."""
    units = []
    for u in range(k):
        label = labels[u % len(labels)]
        cat = CATEGORIES[u % len(CATEGORIES)]
        iou = float(np.round(rng.uniform(0.0, 0.3), 4))
        runners = tuple(
            (labels[(u + j) % len(labels)], CATEGORIES[(u + j) % len(CATEGORIES)], iou / (j + 1))
            for j in (1, 2)
        )
        strip = None
        if u % 4 != 3:  # some units without a strip
            imgs = rng.integers(0, 256, (3, 12, 12, 3), dtype=np.uint8)
            maps = _upsample(rng.uniform(0, 1, (3, 3, 3)).astype(np.float32), 12)
            rel = f"strips/{stem}/unit {u:04d}#.png"  # space and '#' must still resolve
            report.save_png(out / rel, report.unit_strip(imgs, maps, 0.6, outline=u % 2 == 0))
            strip = rel
        units.append(UnitCard(u, label, cat, iou, runners, strip))
    detecting = [c for c in units if c.iou > thr]
    counts: dict[tuple[str, str], int] = {}
    for c in detecting:
        counts[(c.label, c.category)] = counts.get((c.label, c.category), 0) + 1
    unique = dict.fromkeys(CATEGORIES, 0)
    for _, cat in counts:
        unique[cat] += 1
    return LayerPage(
        layer=name,
        num_units=k,
        iou_threshold=thr,
        interpretable_units=len(detecting),
        unique_detectors=unique,
        detectors_per_concept=[(lab, cat, n) for (lab, cat), n in counts.items()],
        units=tuple(units),
        downloads=(("tally.csv", f"{stem}/tally.csv"),),
    )


def build_report(out: Path) -> tuple[Path, list[LayerPage]]:
    """A three-layer report; the last layer has no detector at all (a random network)."""
    rng = np.random.default_rng(0)
    labels = [XSS, AMP, MATH, "café", "grass", "sky", "dog", "wheel", "striped", "red"]
    layers = [
        _layer(rng, out, "layer4", "layer4", 12, labels, 0.04),
        _layer(rng, out, "blocks/3", "blocks_3", 9, labels[::-1], 0.04),
        _layer(rng, out, "random/conv5", "random_conv5", 5, ["grass", XSS], 0.5),
    ]
    for stem in ("layer4", "blocks_3", "random_conv5"):
        (out / stem).mkdir(exist_ok=True)
        (out / stem / "tally.csv").write_text("unit,category,label,score\n")
    assert layers[2].interpretable_units == 0
    run = RunInfo(
        title=f"Dissection of {XSS}",
        model="resnet18 & co",
        dataset="broden1_224",
        settings={"quantile": 0.005, "iou_threshold": 0.04, "label": XSS, "layers": ("a", "b")},
    )
    return report.write_report(out, run, layers), layers


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[LayerPage]]:
    return build_report(tmp_path_factory.mktemp("report"))


class _Links(html.parser.HTMLParser):
    """Collects href/src attributes and the text of elements."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts += 1
        for key, value in attrs:
            if key in ("href", "src") and value is not None:
                self.links.append((tag, value))


def _pages(index: Path) -> list[Path]:
    return sorted(index.parent.glob("*.html"))


def test_files_written(built: tuple[Path, list[LayerPage]]) -> None:
    index, _ = built
    out = index.parent
    names = {p.name for p in _pages(index)}
    assert names == {
        "index.html",
        "layer-layer4.html",
        "layer-blocks_3.html",
        "layer-random_conv5.html",
    }
    assert (out / "plots" / "unique-detectors.svg").is_file()
    for stem in ("layer4", "blocks_3", "random_conv5"):
        assert (out / "plots" / f"{stem}-concepts.svg").is_file()
    # Atomic writes leave no temp files behind.
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_labels_escaped(built: tuple[Path, list[LayerPage]]) -> None:
    index, _ = built
    for page in _pages(index):
        text = page.read_text("utf-8")
        assert XSS not in text, page.name
        assert AMP not in text, page.name
        parser = _Links()
        parser.feed(text)
        # Only the page's own inline script: none on the index, one on layer pages.
        assert parser.scripts == (0 if page.name == "index.html" else 1), page.name
    layer = (index.parent / "layer-layer4.html").read_text("utf-8")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in layer
    assert "Tom &amp; Jerry&#39;s &#34;cart&#34;" in layer
    assert "café" in layer


def test_links_relative_and_present(built: tuple[Path, list[LayerPage]]) -> None:
    index, _ = built
    out = index.parent
    count = 0
    for page in _pages(index):
        parser = _Links()
        parser.feed(page.read_text("utf-8"))
        for tag, link in parser.links:
            url = urllib.parse.urlsplit(link)
            assert not url.scheme and not url.netloc and not link.startswith("/"), link
            target = out / urllib.parse.unquote(url.path)
            assert target.is_file(), (page.name, tag, link)
            count += 1
    assert count > 40


def test_layer_pages_content(built: tuple[Path, list[LayerPage]]) -> None:
    index, layers = built
    for page, stem in zip(layers, ("layer4", "blocks_3", "random_conv5"), strict=True):
        text = (index.parent / f"layer-{stem}.html").read_text("utf-8")
        cards = re.findall(
            r'<article class="card[^"]*" id="unit-(\d+)"[^>]*data-iou="([^"]+)"', text
        )
        assert len(cards) == page.num_units
        ious = [float(v) for _, v in cards]
        assert ious == sorted(ious, reverse=True)  # IoU order, as the sort select says
        below = text.count('class="card below"')
        assert below == page.num_units - page.interpretable_units
        # Runners-up are other categories' best labels, not the unit's next best concepts.
        assert 'title="best label of each other category"' in text
        assert "next best" not in text
    summary = index.read_text("utf-8")
    for stem in ("layer4", "blocks_3", "random_conv5"):
        assert f'href="layer-{stem}.html"' in summary
    assert "blocks/3" in summary


def test_report_deterministic(built: tuple[Path, list[LayerPage]], tmp_path: Path) -> None:
    index, _ = built
    again, _ = build_report(tmp_path)
    a = {
        p.relative_to(index.parent): p.read_bytes() for p in index.parent.rglob("*") if p.is_file()
    }
    b = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_layer_file_stems() -> None:
    stems = report.layer_file_stems(["blocks/3", "blocks_3", "Blocks_3", "../x", "", "a b"])
    assert stems[0] == "blocks_3"
    assert len({s.lower() for s in stems}) == len(stems)
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s) for s in stems), stems
    with pytest.raises(ValueError, match="duplicate"):
        report.layer_file_stems(["a", "a"])


def test_the_readme_gives_the_layer_file_stem_rule() -> None:
    """results.json holds no file names, so the README gives the rule for a reader of it: a
    clash or a long name is cut to 91 characters plus `-` and sha1("<name>\\0<n>")[:8]."""
    import hashlib

    def hashed(name: str, base: str, n: int = 0) -> str:
        digest = hashlib.sha1(f"{name}\0{n}".encode()).hexdigest()
        return f"{base[:91]}-{digest[:8]}"

    long = "x" * 101
    assert report.layer_file_stems(["a/b", "A_b", long, "?"]) == [
        "a_b",
        hashed("A_b", "A_b"),
        hashed(long, long),
        "layer",
    ]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rule = readme.split("Outputs in the output directory", 1)[1].split("One module", 1)[0]
    assert "91" in rule and "SHA-1 of `<name>\\0<n>`" in rule and "`settings.layers`" in rule


def test_strip_dimming_exact() -> None:
    rng = np.random.default_rng(1)
    t, h, w, gap = 4, 10, 7, 3
    imgs = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    maps = rng.normal(size=(t, h, w)).astype(np.float32)
    strip = report.unit_strip(imgs, maps, 0.3, gap=gap)
    assert strip.dtype == np.uint8 and strip.shape == (h, t * w + (t - 1) * gap, 3)
    for i in range(t):
        mask = (maps[i] > 0.3)[..., None]
        want = (imgs[i] * (0.2 + 0.8 * mask)).astype(np.uint8)
        np.testing.assert_array_equal(strip[:, i * (w + gap) : i * (w + gap) + w], want)
        if i < t - 1:
            assert (strip[:, i * (w + gap) + w : (i + 1) * (w + gap)] == 255).all()
    # From its tiles: the same strip.
    tiles = report.strips.dim_outside(imgs, maps > 0.3)
    np.testing.assert_array_equal(report.strips.tile_strip(tiles, gap=gap), strip)
    with pytest.raises(ValueError, match="tiles must be uint8"):
        report.strips.tile_strip(maps)


def test_strip_skips_empty_slots_and_outlines() -> None:
    rng = np.random.default_rng(2)
    imgs = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    maps = np.zeros((3, 8, 8), np.float32)
    maps[:, 2:6, 2:6] = 1.0
    strip = report.unit_strip(imgs, maps, 0.5, gap=2, valid=[True, False, True])
    assert strip.shape == (8, 18, 3)
    full = report.unit_strip(imgs, maps, 0.5, gap=2)
    np.testing.assert_array_equal(strip[:, 10:], full[:, 20:])
    lined = report.unit_strip(imgs, maps, 0.5, gap=2, outline=True)
    changed = (lined != full).any(axis=2)[:, :8]
    ring = np.zeros((8, 8), bool)
    ring[2:6, 2:6] = True
    ring[3:5, 3:5] = False
    assert not changed[~ring].any()  # only the mask's boundary is drawn on
    assert (lined[:, :8][ring] == report.strips.OUTLINE_COLOR).all()
    blank = report.unit_strip(imgs, maps, 0.5, valid=[False, False, False])
    assert blank.shape == (8, 8, 3) and (blank == 255).all()
    with pytest.raises(ValueError):
        report.unit_strip(imgs.astype(np.float32), maps, 0.5)
    with pytest.raises(ValueError):
        report.unit_strip(imgs, maps[:, :4], 0.5)


def test_upsample_matches_pil() -> None:
    """The float64 reference below and the tally's upsampling are PIL's bilinear resize."""
    rng = np.random.default_rng(3)
    maps = rng.normal(size=(2, 5, 7)).astype(np.float32)
    exact = _upsample_f64(maps, (40, 21))
    up = _upsample(maps, (40, 21))
    assert exact.shape == up.shape == (2, 40, 21) and exact.dtype == up.dtype == np.float32
    for i in range(2):
        pil = Image.fromarray(maps[i], mode="F").resize((21, 40), Image.Resampling.BILINEAR)
        np.testing.assert_allclose(exact[i], np.asarray(pil), atol=1e-5)
        np.testing.assert_allclose(up[i], np.asarray(pil), atol=1e-5)
    for upsample in (_upsample, _upsample_f64):
        const = upsample(np.full((1, 3, 3), 2.5, np.float32), (9, 9))
        np.testing.assert_allclose(const, 2.5)


def test_strip_masks_are_the_pixels_the_tally_counts() -> None:
    """On maps thresholded where rounding matters (a value the tally's upsampling gives
    and float64 interpolation does not), a strip shows exactly the tally's pixels."""
    rng = np.random.default_rng(6)
    t, k, size = 4, 3, (112, 112)
    maps = (rng.normal(size=(t, 7, 7, k)) * 3).astype(np.float32)
    up = np.asarray(jax.jit(tally.upsample, static_argnums=1)(maps, size))
    thresholds = np.zeros(k, np.float32)
    for u in range(k):
        exact = _upsample_f64(maps[..., u], size)  # float64, rounded once
        i, y, x = np.argwhere(exact != up[..., u])[0]
        thresholds[u] = min(exact[i, y, x], up[i, y, x, u])
    on = build.strip_masks(maps, thresholds, np.arange(k), size, "strict")  # [k, t, H, W]
    count = jax.jit(functools.partial(tally.batch_counts, num_categories=1))
    labels = {"pixel_labels": np.zeros((1, 1, *size), np.int32), "image_labels": np.zeros((1, 1))}
    primary = np.array([-1, 0], np.int32)
    differs = False
    for i in range(t):
        want = np.asarray(count(maps[i : i + 1], thresholds, labels, primary)["unit_total"])
        np.testing.assert_array_equal(on[:, i].sum((1, 2)), want)
        exact = [_upsample_f64(maps[i : i + 1, ..., u], size) > thresholds[u] for u in range(k)]
        differs |= [m.sum() for m in exact] != want.tolist()
    assert differs  # the test can fail: float64 interpolation marks other pixels
    # A block's padding leaves the units asked for alone.
    one = build.strip_masks(maps, thresholds, np.array([2]), size, "strict", block=3)
    np.testing.assert_array_equal(one[0], on[2])
    with pytest.raises(ValueError, match="block=1"):
        build.strip_masks(maps, thresholds, np.arange(k), size, "strict", block=1)


def _one_unit_strip_width(tmp_path, top, maps, thresholds, seg_size, image, height) -> int:
    """The width of the strip the report draws for one unit ("head" unit 0) of `maps` on
    its `top` images (grey squares of side `image`, labels at `seg_size`)."""

    class Source:
        def __init__(self):
            self.seg_size = seg_size

        def read_image(self, i: int) -> np.ndarray:
            return np.full((image, image, 3), 10 * i, np.uint8)

    build.write_dissection_report(
        tmp_path,
        "m",
        "d",
        {},
        [_red_layer(intersection=[3], unit_total=[5], images=len(top))],
        {"head": thresholds},
        {"head": top},
        {"head": maps},
        Source(),
        tie_rule="strict",
        strip_height=height,
    )
    return Image.open(tmp_path / "strips/head/unit0000.jpg").width


def test_shown_at_matches_a_loop_over_output_pixels() -> None:
    """A pixel of the strip's grid is on where any mask pixel under it is: source rows
    [i*h//H, max((i+1)*h//H, i*h//H + 1)), likewise columns, growing and shrinking."""

    def reference(masks, size):
        h, w = masks.shape[-2:]
        out = np.zeros(masks.shape[:-2] + tuple(size), bool)
        for i in range(size[0]):
            r0 = i * h // size[0]
            r1 = max((i + 1) * h // size[0], r0 + 1)
            for j in range(size[1]):
                c0 = j * w // size[1]
                c1 = max((j + 1) * w // size[1], c0 + 1)
                out[..., i, j] = masks[..., r0:r1, c0:c1].any(axis=(-2, -1))
        return out

    rng = np.random.default_rng(7)
    for hw, size in [((13, 13), (12, 12)), ((7, 9), (20, 4)), ((5, 5), (5, 5)), ((6, 11), (6, 3))]:
        masks = rng.random((3, 2) + hw) < 0.15
        view = np.moveaxis(np.moveaxis(masks, 0, -1).copy(), -1, 0)  # not contiguous
        np.testing.assert_array_equal(build.shown_at(view, size), reference(masks, size))


def test_dim_outside_is_the_lite_formula_exactly() -> None:
    """image * (0.2 + 0.8 * mask) truncated to uint8, for every byte value, with the dimmed
    copy given or not; a non-uint8 image is refused."""
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    mask = np.random.default_rng(3).random((16, 16)) < 0.5
    want = (image * (0.2 + 0.8 * mask[..., None])).astype(np.uint8)
    np.testing.assert_array_equal(report.strips.dim_outside(image, mask), want)
    dim = report.strips.dimmed(image)
    np.testing.assert_array_equal(report.strips.dim_outside(image, mask, dim), want)
    with pytest.raises(ValueError, match="uint8 image"):
        report.strips.dim_outside(image.astype(np.float32), mask)


def test_strips_show_the_mask_at_the_label_resolution_the_tally_counted(tmp_path):
    """Labels at 13 px, strips 12 px high (as broden1_227's 113 px labels under 112 px
    strips): a 7x7 map whose one cell passes T upsamples to one pixel at 13 px and to none
    at 12 px. The tally counted that pixel, so the strip draws the image (two slots, not
    one), its mask the tally's shown at the strip's size (`shown_at`)."""

    top = np.array([[0], [1]], np.int32)
    maps = np.zeros((2, 7, 7, 1), np.float32)
    maps[0, 3, 3, 0] = 1.0
    maps[1, :, :, 0] = 1.0
    thresholds = np.array([0.9], np.float32)
    seg = build.strip_masks(maps, thresholds, np.array([0]), (13, 13), "strict")
    assert (
        seg[0, 0].sum() == 1
        and not build.strip_masks(maps, thresholds, np.array([0]), (12, 12), "strict")[0, 0].any()
    )
    shown = build.shown_at(seg, (12, 12))
    assert shown.shape == (1, 2, 12, 12) and shown[0, 0].sum() == 1 and shown[0, 1].all()
    np.testing.assert_array_equal(build.shown_at(seg, (13, 13)), seg)
    wide = build.shown_at(seg, (26, 26))  # a larger strip: the pixel as a 2x2 block
    assert wide[0, 0].sum() == 4 and wide[0, 0, 12:14, 12:14].all()

    width = _one_unit_strip_width(tmp_path, top, maps, thresholds, (13, 13), 26, 12)
    assert width == 12 + 3 + 12


def test_upsample_keeps_a_nan_or_infinity_local() -> None:
    """A non-finite value reaches only the output pixels that sample it (the tally's
    upsampling, which the strips' masks use)."""
    rng = np.random.default_rng(4)
    maps = rng.normal(size=(3, 7, 5)).astype(np.float32) * 10.0
    up = _upsample(maps, (112, 30))
    for bad in (np.nan, np.inf):
        spoiled = maps.copy()
        spoiled[1, 3, 2] = bad
        out = _upsample(spoiled, (112, 30))
        np.testing.assert_array_equal(out[[0, 2]], up[[0, 2]])
        changed = out[1] != up[1]
        rows, cols = np.flatnonzero(changed.any(1)), np.flatnonzero(changed.any(0))
        # Output rows sampling input row 3 (of 7) and columns sampling column 2 (of 5) only.
        assert rows.min() >= 3 * 16 - 8 and rows.max() < 4 * 16 + 8, rows
        assert cols.min() >= 2 * 6 - 3 and cols.max() < 3 * 6 + 3, cols
        assert changed.sum() < changed.size / 4


SVG = "{http://www.w3.org/2000/svg}"


def _svg(path: Path) -> ET.Element:
    """The parsed SVG (a label that broke the markup fails here)."""
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    assert float(root.get("width")) > 100 and float(root.get("height")) > 100
    return root


def _bars(root: ET.Element) -> list[tuple[str, float, float, float, str]]:
    """(title, x, bottom, height, fill) of each bar, in drawing order."""
    return [
        (
            r.find(f"{SVG}title").text,
            float(r.get("x")),
            float(r.get("y")) + float(r.get("height")),
            float(r.get("height")),
            r.get("fill"),
        )
        for r in root.iter(f"{SVG}rect")
        if r.get("class") == "bar"
    ]


def _texts(root: ET.Element) -> list[str]:
    return [t.text for t in root.iter(f"{SVG}text")]


def test_detectors_per_concept_svg(tmp_path: Path) -> None:
    odd = "a<b&\"c'\x01"  # markup, and a character XML does not allow
    dets = [("dog", "object", 5), ("wheel", "part", 2), (MATH, "object", 3), ("sky", "scene", 0)]
    dets.append((odd, "part", 2))
    root = _svg(report.plot_detectors_per_concept(tmp_path / "a.svg", dets, title="l4"))
    # Categories by total (object 8, part 4), then count, then label; no bar for 0 units.
    order = [("dog", "object", 5), (MATH, "object", 3), (odd, "part", 2), ("wheel", "part", 2)]
    bars = _bars(root)
    shown = [lab.replace("\x01", "\ufffd") for lab, _, _ in order]
    titles = [f"{lab} ({cat}): {n}" for lab, (_, cat, n) in zip(shown, order, strict=True)]
    assert [b[0] for b in bars] == titles
    assert [b[1] for b in bars] == sorted(b[1] for b in bars)
    assert len({round(b[2], 6) for b in bars}) == 1  # one baseline
    per_unit = [b[3] / n for b, (_, _, n) in zip(bars, order, strict=True)]
    np.testing.assert_allclose(per_unit, per_unit[0], rtol=1e-3)
    colors = report.category_colors(["object", "part"])
    assert [b[4] for b in bars] == [colors[cat] for _, cat, _ in order]
    texts = _texts(root)
    assert texts[0] == "l4: 4 unique detectors, 12 units"
    assert [t for t in texts if t in shown] == shown
    # No detector at all (random network): an empty graph with a note, not a crash.
    empty = _svg(report.plot_detectors_per_concept(tmp_path / "b.svg", [], iou_threshold=0.04))
    assert not _bars(empty) and "no unit above IoU threshold 0.04" in _texts(empty)
    many = [(f"concept {i}", CATEGORIES[i % 5], 1 + i % 7) for i in range(120)]
    wide = _svg(report.plot_detectors_per_concept(tmp_path / "c.svg", many))
    assert float(wide.get("width")) > float(root.get("width"))
    # Very many bars are squeezed into the widest graph rather than cut off.
    most = [(f"c{i}", "object", 1) for i in range(1000)]
    widest = _svg(report.plot_detectors_per_concept(tmp_path / "d.svg", most))
    right = max(b[1] for b in _bars(widest))
    assert float(widest.get("width")) <= 4800 and right < float(widest.get("width"))
    with pytest.raises(ValueError, match="path: the plot is SVG"):
        report.plot_detectors_per_concept(tmp_path / "e.png", dets)


def test_unique_detectors_svg(tmp_path: Path) -> None:
    units = [{"object": 3, "part": 4}, {"object": 0, "part": 0}, {"color": 9}]
    layers = ["conv1", XSS, "c"]
    root = _svg(report.plot_unique_detectors(tmp_path / "d.svg", layers, units))
    bars = _bars(root)
    assert [b[0] for b in bars] == ["conv1, object: 3", "conv1, part: 4", "c, color: 9"]
    # Stacked: part sits on object; heights proportional to the counts.
    assert bars[1][2] == pytest.approx(bars[0][2] - bars[0][3])
    np.testing.assert_allclose(
        [b[3] / n for b, n in zip(bars, (3, 4, 9), strict=True)], bars[0][3] / 3, rtol=1e-3
    )
    texts = _texts(root)
    assert {"7", "0", "9", XSS, "object", "part", "color"} <= set(texts)
    empty = _svg(report.plot_unique_detectors(tmp_path / "e.svg", [], []))
    assert not _bars(empty) and "no layer" in _texts(empty)
    with pytest.raises(ValueError):
        report.plot_unique_detectors(tmp_path / "f.svg", ["x"], [])


def test_report_plots_need_no_matplotlib() -> None:
    code = (
        "import sys, tempfile, pathlib\n"
        "from jaxdissect import report\n"
        "d = pathlib.Path(tempfile.mkdtemp())\n"
        "report.plot_detectors_per_concept(d / 'a.svg', [('x', 'object', 1)])\n"
        "report.plot_unique_detectors(d / 'b.svg', ['l'], [{'object': 1}])\n"
        "assert 'matplotlib' not in sys.modules\n"
        "assert 'jax' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_atomic_write_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.png"
    report.save_png(target, np.zeros((2, 2, 3), np.uint8))
    before = target.read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        report.save_png(target, np.ones((3, 3, 3), np.uint8))
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    with pytest.raises(ValueError):
        report.save_png(tmp_path / "y.png", np.zeros((2, 2), np.float32))


@pytest.mark.parametrize(
    "fraction, text",
    [(0.9987, "99.87%"), (0.995, "99.5%"), (0.0248, "2.48%"), (1.5e-5, "0.0015%")],
)
def test_a_cards_tie_share_is_a_plain_percentage(fraction, text):
    """A tied unit's card gives its share of activations at T without exponent notation."""
    from types import SimpleNamespace

    from jaxdissect import ties

    result = SimpleNamespace(
        state=np.array([ties.TIED], object),
        counts={"unit_total": np.array([7])},
        ties=SimpleNamespace(tie_fraction=np.array([fraction])),
    )
    assert build._state_text(result, 0) == f"{ties.TIED}: {text} of activations at T"


class _GreySource:
    """A probe set of 8x8 label maps whose image i is grey level 10 i."""

    seg_size = (8, 8)

    def read_image(self, i: int) -> np.ndarray:
        return np.full((8, 8, 3), 10 * i, np.uint8)


def _red_layer(intersection: list[int], unit_total: list[int], images: int) -> results.LayerResult:
    """A layer "head" of one unit per entry, scored on one concept (red-c, 10 pixels)."""
    from jaxdissect.labelspace import LabelSpace

    labels = LabelSpace(("color",), ("-", "red-c"), np.array([-1, 0], np.int32), (False,))
    counts = {
        "intersection": np.array([[0, n] for n in intersection]),
        "label_pixels": np.array([0, 10]),
        "unit_pixels": np.array(unit_total)[:, None],
        "unit_total": np.array(unit_total),
        "images": np.int64(images),
    }
    return results.layer_result("head", counts, labels)


def test_a_strip_draws_only_the_top_images_where_the_unit_fires(tmp_path):
    """A ReLU unit tied at T = 0 firing in one image shows that image alone: its other top
    images (maximum 0 = T) are wholly dimmed under the strict rule and are left out (they
    were drawn, arbitrary images by index); under the inclusive rule they fire and are drawn."""

    top = np.array([[5, 0], [1, 1], [2, -1]], np.int32)  # [T, K]; -1: an empty slot
    maps = np.zeros((3, 2, 2, 2), np.float32)
    maps[0, 0, 0, 0] = 0.03  # unit 0 fires in its first top image only
    maps[:2, ..., 1] = 1.0  # unit 1 fires in both of its filled slots
    thresholds = np.array([0.0, 0.5], np.float32)
    assert build.drawn_ranks(top, maps, thresholds, "strict").T.tolist() == [
        [True, False, False],
        [True, True, False],
    ]
    assert build.drawn_ranks(top, maps, thresholds, "inclusive")[:, 0].all()

    layer = _red_layer(intersection=[3, 4], unit_total=[5, 6], images=6)
    widths = {}
    for rule in ("strict", "inclusive"):
        out = tmp_path / rule
        build.write_dissection_report(
            out,
            "m",
            "d",
            {},
            [layer],
            {"head": thresholds},
            {"head": top},
            {"head": maps},
            _GreySource(),
            tie_rule=rule,
            strip_height=8,
        )
        widths[rule] = [Image.open(out / f"strips/head/unit000{k}.jpg").width for k in (0, 1)]
    assert widths == {"strict": [8, 8 + 3 + 8], "inclusive": [3 * 8 + 2 * 3, 8 + 3 + 8]}


def test_a_report_leaves_no_strip_of_an_earlier_run_beside_its_own(tmp_path):
    """strips/<layer>/ holds this report's strips only: one that a run killed before its
    results.json left (no rerun knows to remove it) of a unit that now gets no strip is gone,
    so that nothing finding strips by file name (ablation.html) shows it as this run's."""

    layer = _red_layer(intersection=[3, 0], unit_total=[5, 0], images=2)  # unit 1: no strip
    maps = np.ones((1, 2, 2, 2), np.float32)
    stale = tmp_path / "strips" / "head" / "unit0001.jpg"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier run's")
    build.write_dissection_report(
        tmp_path,
        "m",
        "d",
        {},
        [layer],
        {"head": np.array([0.5, 0.5], np.float32)},
        {"head": np.array([[0, 1]], np.int32)},
        {"head": maps},
        _GreySource(),
        tie_rule="strict",
        strip_height=8,
    )
    assert sorted(p.name for p in stale.parent.iterdir()) == ["unit0000.jpg"]


def test_a_top_image_whose_upsampled_mask_is_empty_is_left_out(tmp_path):
    """A raw peak just above T that upsamples to no pixel at the strip's size (one interior
    cell of a 4x4 map at 1.0, T = 0.9: at most 0.5625 upsampled) is not drawn, wholly
    dimmed; the slot where the unit's mask has pixels is."""

    top = np.array([[0], [1]], np.int32)
    maps = np.zeros((2, 4, 4, 1), np.float32)
    maps[0, 1, 1, 0] = 1.0
    maps[1, :, :, 0] = 1.0
    thresholds = np.array([0.9], np.float32)
    assert build.drawn_ranks(top, maps, thresholds, "strict")[:, 0].all()  # raw peaks pass
    assert _one_unit_strip_width(tmp_path, top, maps, thresholds, (8, 8), 8, 8) == 8

"""The HTML report: index.html plus one page per layer, static and self-contained.

Pages use only relative links, inline CSS and inline JavaScript, so the folder
can be opened from the file system, moved or zipped. Everything is rendered by
jinja2 with autoescaping on: label names are data and always show as text.
"""

from __future__ import annotations

import dataclasses
import math
import os
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jinja2
from PIL import Image

from jaxdissect import store
from jaxdissect.report import plots
from jaxdissect.report.page import fmt
from jaxdissect.results import TALLY_UNIT_OFFSET, layer_file_stems

_TEMPLATES = Path(__file__).parent / "templates"
PLOTS_DIR = "plots"
STRIPS_DIR = "strips"
INDEX = "index.html"
CROSS_PLOT = f"{PLOTS_DIR}/unique-detectors.svg"


def layer_page_name(stem: str) -> str:
    """A layer's page, relative to the report folder (stem: `results.layer_file_stems`)."""
    return f"layer-{stem}.html"


def concept_plot_name(stem: str) -> str:
    """A layer's detectors-per-concept plot, relative to the report folder."""
    return f"{PLOTS_DIR}/{stem}-concepts.svg"


def report_files(stems: Sequence[str]) -> list[str]:
    """Every file and folder the report of layers of these stems writes, relative to the
    report folder: index.html first."""
    per_layer = [
        name
        for stem in stems
        for name in (layer_page_name(stem), concept_plot_name(stem), f"{STRIPS_DIR}/{stem}")
    ]
    return [INDEX, CROSS_PLOT, *per_layer]


@dataclasses.dataclass(frozen=True)
class UnitCard:
    """One unit's result. `unit` is the 0-based channel index, shown as is; the page says
    that tally.csv numbers it `unit + TALLY_UNIT_OFFSET` (NetDissect-Lite).

    `label` and `category` are "" for a unit without a label; `state` says why, or flags a
    labelled unit with a tied threshold ("" for an ordinary unit).
    """

    unit: int
    label: str
    category: str
    iou: float
    # (label, category, iou): the best label of each other category, highest IoU first.
    runners_up: tuple[tuple[str, str, float], ...] = ()
    # Path of the unit's strip PNG relative to the layer page (i.e. to the report folder).
    strip: str | None = None
    state: str = ""
    # The unit's permutation p-value and Benjamini-Hochberg call (None: test not run).
    p: float | None = None
    significant: bool | None = None


@dataclasses.dataclass(frozen=True)
class LayerPage:
    """One dissected layer: `layer` is the name asked for, `path` its module path ("": same)."""

    layer: str
    num_units: int
    iou_threshold: float
    interpretable_units: int
    unique_detectors: dict[str, int]  # category -> unique detectors, zeros included
    detectors_per_concept: list[tuple[str, str, int]]  # (label, category, units), any order
    units: tuple[UnitCard, ...]
    # (text, relative path) of files to link from the page, e.g. ("tally.csv", "layer4/tally.csv").
    downloads: tuple[tuple[str, str], ...] = ()
    path: str = ""
    # Units that cannot fire (no active pixel, or dead), and units per non-empty state.
    cannot_fire: int = 0
    states: dict[str, int] = dataclasses.field(default_factory=dict)
    # The permutation test: (interpretable and significant units, as results.json's
    # `interpretable_and_significant`, alpha, draws, the FDR procedure's name: "BH" or
    # "BY"); None where it did not run.
    significance: tuple[int, float, int, str] | None = None


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What was dissected, shown at the top of the index."""

    title: str
    model: str
    dataset: str
    settings: dict[str, Any]


def _url(path: str | os.PathLike[str], base: Path) -> str:
    """A relative URL for a file path (absolute paths are made relative to `base`)."""
    p = os.fspath(path)
    if os.path.isabs(p):
        p = os.path.relpath(p, base)
    # Quote so that '#', '?', '%' and spaces in file names still resolve.
    return urllib.parse.quote(Path(p).as_posix(), safe="/")


def _sort_iou(x: float) -> str:
    # Non-finite IoUs sort last under "IoU, high first".
    return repr(float(x)) if math.isfinite(x) else "-1"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["iou"] = fmt
    env.filters["sort_iou"] = _sort_iou
    return env


def _categories(layers: Sequence[LayerPage]) -> list[str]:
    """All categories in order of first appearance."""
    cats: dict[str, None] = {}
    for page in layers:
        cats.update(dict.fromkeys(page.unique_detectors))
        cats.update(dict.fromkeys(c for _, c, _ in page.detectors_per_concept))
        cats.update(dict.fromkeys(u.category for u in page.units if u.category))
    return list(cats)


def write_report(
    out_dir: str | os.PathLike[str], run: RunInfo, layers: Sequence[LayerPage]
) -> Path:
    """Write index.html, a page and a bar graph per layer, and the cross-layer plot.

    Strip images are not written here: each UnitCard points at its own JPEG.
    Every file is written atomically; index.html last. Returns index.html's path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stems = layer_file_stems([p.layer for p in layers])
    categories = _categories(layers)
    colors = plots.category_colors(categories)
    env = _environment()

    plots.plot_unique_detectors(
        out / CROSS_PLOT,
        [p.layer for p in layers],
        [p.unique_detectors for p in layers],
        categories=categories,
        colors=colors,
    )

    entries = []
    for page, stem in zip(layers, stems, strict=True):
        bars = concept_plot_name(stem)
        plots.plot_detectors_per_concept(
            out / bars,
            page.detectors_per_concept,
            title=page.layer,
            iou_threshold=page.iou_threshold,
            colors=colors,
        )
        entry = {
            "page": page,
            "href": layer_page_name(stem),
            "bars": bars,
            "unique_total": sum(page.unique_detectors.values()),
        }
        entries.append(entry)

    for entry in entries:
        html = _render_layer(env, out, run, entry, entries, categories, colors)
        store.write_text(out / entry["href"], html)

    html = env.get_template("index.html").render(
        run=run,
        entries=entries,
        tested=any(p.significance is not None for p in layers),
        categories=categories,
        colors=colors,
        cross_plot=CROSS_PLOT,
        settings=[(str(k), _setting(v)) for k, v in run.settings.items()],
    )
    return store.write_text(out / INDEX, html)


def _render_layer(
    env: jinja2.Environment,
    out: Path,
    run: RunInfo,
    entry: dict[str, Any],
    entries: list[dict[str, Any]],
    categories: list[str],
    colors: dict[str, str],
) -> str:
    page: LayerPage = entry["page"]
    units = sorted(page.units, key=lambda u: (-_sort_key(u.iou), u.unit))
    cards = []
    aspects = []
    for u in units:
        size = _image_size(out / u.strip) if u.strip is not None else None
        if size is not None:
            aspects.append(size[0] / size[1])
        cards.append(
            {
                "card": u,
                "strip": _url(u.strip, out) if u.strip is not None else None,
                "size": size,
                "detects": math.isfinite(u.iou) and u.iou > page.iou_threshold,
            }
        )
    # Wide strips (10 top images) get wider cards so each image stays >= ~64 px tall.
    aspect = sorted(aspects)[len(aspects) // 2] if aspects else 4.0
    card_min = int(min(max(aspect * 64 + 24, 340), 1200))
    present = {u.category for u in units if u.category}
    return env.get_template("layer.html").render(
        run=run,
        entry=entry,
        entries=entries,
        cards=cards,
        card_min=card_min,
        colors=colors,
        unit_categories=[c for c in categories if c in present],
        downloads=[(t, _url(p, out)) for t, p in page.downloads],
        tally_unit_offset=TALLY_UNIT_OFFSET,
        tested=page.significance is not None,
    )


def _image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the image header, or None if it cannot be read."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError):
        return None


def _sort_key(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _setting(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, list | tuple):
        return ", ".join(_setting(x) for x in v)
    return str(v)

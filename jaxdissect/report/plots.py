"""Report plots: detectors per concept for one layer, unique detectors across layers.

The dissection report's two bar graphs are SVG written here directly (label names
escaped; the browser lays out the text). The studies' figures use
`matplotlib.figure.Figure` (never pyplot), imported only where one is drawn, so no
global figure state is created and no GUI backend is touched.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import re
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from xml.sax.saxutils import escape

from jaxdissect import store

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Fixed colours for Broden's categories so they match across every plot of a report.
_KNOWN = {
    "object": "#4e79a7",
    "part": "#f28e2b",
    "scene": "#59a14f",
    "material": "#b07aa1",
    "texture": "#e15759",
    "color": "#edc948",
}
_SPARE = ("#76b7b2", "#ff9da7", "#9c755f", "#bab0ac", "#17becf", "#8c564b", "#7f7f7f")
_DPI = 100
# SVG bar graphs, in CSS pixels.
_BAR_SLOT = 16  # one concept's bar and its gap
_MAX_WIDTH = 4800  # wider graphs squeeze their bars
_PLOT_HEIGHT = 230
_GRID = "#dddddd"
_INK = "#333333"
# Characters XML 1.0 does not allow: a label holding one is drawn with U+FFFD there.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def category_colors(categories: Iterable[str]) -> dict[str, str]:
    """A colour per category: fixed for Broden's, spare colours (sorted) for others."""
    cats = list(dict.fromkeys(categories))
    colors = {c: _KNOWN[c] for c in cats if c in _KNOWN}
    others = sorted(c for c in cats if c not in _KNOWN)
    for i, c in enumerate(others):
        colors[c] = _SPARE[i % len(_SPARE)]
    return colors


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    buf = io.BytesIO()
    # Fixed metadata keeps the PNG bytes deterministic across runs.
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    return store.write_bytes(path, buf.getvalue())


def _plain(texts: Iterable[object]) -> None:
    # Labels are data: '$' must not start mathtext.
    for t in texts:
        t.set_parse_math(False)  # type: ignore[attr-defined]


def _note(ax: Axes, text: str) -> None:
    ax.text(
        0.5,
        0.5,
        text,
        ha="center",
        va="center",
        transform=ax.transAxes,
        color="#666666",
        fontsize=11,
        parse_math=False,
    )


def _svg_text(
    x: float,
    y: float,
    text: str,
    *,
    size: float = 10,
    anchor: str = "start",
    rotate: float = 0,
    color: str = _INK,
    bold: bool = False,
) -> str:
    """One SVG <text>; `text` is data, escaped. `y` is the middle of the line."""
    turn = f' transform="rotate({rotate:g} {x:.1f} {y:.1f})"' if rotate else ""
    weight = ' font-weight="bold"' if bold else ""
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" dy="0.35em" font-size="{size:g}" fill="{color}"'
        f' text-anchor="{anchor}"{weight}{turn}>{_svg_escape(text)}</text>'
    )


def _svg_escape(text: str) -> str:
    """`text` as SVG character data: markup escaped, characters XML does not allow as U+FFFD."""
    return escape(_NOT_XML.sub("\ufffd", text))


def _text_width(text: str, size: float) -> float:
    """A generous estimate of `text`'s width in a sans-serif font (no font metrics here)."""
    return 0.62 * size * len(text)


def _integer_ticks(top: float) -> list[int]:
    """0, step, ..., up to the first multiple of step >= `top` (at least 1), in at most 6
    ticks; the step is 1, 2 or 5 times a power of ten."""
    top = max(top, 1)
    steps = (m * 10**e for e in itertools.count() for m in (1, 2, 5))
    step = next(s for s in steps if math.ceil(top / s) <= 5)
    return list(range(0, step * math.ceil(top / step) + 1, step))


def _svg_axes(left: float, top: float, width: float, height: float, ticks: list[int]) -> list[str]:
    """Horizontal grid lines with their labels and the y axis of a bar graph."""
    parts = []
    for t in ticks:
        y = top + height - height * t / ticks[-1]
        parts.append(
            f'<line x1="{left:.1f}" y1="{y:.1f}" x2="{left + width:.1f}" y2="{y:.1f}"'
            f' stroke="{_GRID}" stroke-width="0.8"/>'
        )
        parts.append(_svg_text(left - 5, y, str(t), anchor="end"))
    parts.append(
        f'<line x1="{left:.1f}" y1="{top:.1f}" x2="{left:.1f}" y2="{top + height:.1f}"'
        f' stroke="{_INK}" stroke-width="1"/>'
    )
    return parts


def _svg_bar(x: float, y: float, width: float, height: float, color: str, title: str) -> str:
    return (
        f'<rect class="bar" x="{x:.2f}" y="{y:.2f}" width="{width:.2f}" height="{height:.2f}"'
        f' fill="{color}"><title>{_svg_escape(title)}</title></rect>'
    )


def _write_svg(path: str | os.PathLike[str], width: float, height: float, parts: list[str]) -> Path:
    """Write an SVG document of `parts` atomically; `path` must name an .svg file."""
    if Path(path).suffix.lower() != ".svg":
        raise ValueError(f"path: the plot is SVG; name the file .svg, not {Path(path).name!r}")
    w, h = math.ceil(width), math.ceil(height)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}"'
        f' viewBox="0 0 {w} {h}" font-family="DejaVu Sans, Arial, Helvetica, sans-serif">'
    )
    body = "\n".join([head, f'<rect width="{w}" height="{h}" fill="white"/>', *parts, "</svg>"])
    return store.write_text(path, body + "\n")


def _svg_swatch(x: float, y: float, name: str, color: str) -> list[str]:
    """A legend entry: a colour square and its name, centred on line `y` from `x`."""
    return [
        f'<rect class="swatch" x="{x:.1f}" y="{y - 5:.1f}" width="10" height="10" fill="{color}"/>',
        _svg_text(x + 14, y, name, size=11),
    ]


def plot_detectors_per_concept(
    path: str | os.PathLike[str],
    detectors: Sequence[tuple[str, str, int]],
    *,
    title: str = "",
    iou_threshold: float | None = None,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """SVG bar graph of units per concept (label, category, count), grouped by category.

    Categories are ordered by their total count, bars within a category by count
    (then label), as in the original tool's graph. With no detector at all (e.g.
    a random network) it draws an empty graph with a note instead of failing.
    """
    rows = [(str(lab), str(cat), int(n)) for lab, cat, n in detectors if int(n) > 0]
    totals: dict[str, int] = {}
    for _, cat, n in rows:
        totals[cat] = totals.get(cat, 0) + n
    cat_order = sorted(totals, key=lambda c: (-totals[c], c))
    rank = {c: i for i, c in enumerate(cat_order)}
    rows.sort(key=lambda r: (rank[r[1]], -r[2], r[0]))
    colors = dict(colors) if colors is not None else category_colors(cat_order)
    for c in cat_order:
        colors.setdefault(c, category_colors([c])[c])

    n = len(rows)
    thr = f" (IoU threshold {iou_threshold:g})" if iou_threshold is not None else ""
    heading = f"{n} unique detectors, {sum(r[2] for r in rows)} units{thr}"
    heading = f"{title}: {heading}" if title else heading
    left, top, right = 52.0, 56.0, 16.0
    slot = min(_BAR_SLOT, (_MAX_WIDTH - left - right) / max(n, 1))
    legend_width = sum(30 + _text_width(c, 11) for c in cat_order)
    width = max(650.0, left + n * slot + right, 16 + legend_width, 16 + _text_width(heading, 13))
    longest = max((_text_width(r[0], 10) for r in rows), default=0.0)
    height = top + _PLOT_HEIGHT + 12 + longest + 8
    ticks = _integer_ticks(max((r[2] for r in rows), default=0))
    parts = [_svg_text(8, 16, heading, size=13, bold=True)]
    x = 8.0
    for c in cat_order:
        parts += _svg_swatch(x, 38, c, colors[c])
        x += 30 + _text_width(c, 11)
    parts += _svg_axes(left, top, n * slot if n else width - left - right, _PLOT_HEIGHT, ticks)
    parts.append(
        _svg_text(14, top + _PLOT_HEIGHT / 2, "units", size=11, anchor="middle", rotate=-90)
    )
    bottom = top + _PLOT_HEIGHT
    for i, (label, cat, count) in enumerate(rows):
        h = _PLOT_HEIGHT * count / ticks[-1]
        x = left + i * slot
        parts.append(
            _svg_bar(
                x + 0.1 * slot, bottom - h, 0.8 * slot, h, colors[cat], f"{label} ({cat}): {count}"
            )
        )
        parts.append(_svg_text(x + slot / 2, bottom + 6, label, anchor="end", rotate=-90))
    if n == 0:
        below = f" {iou_threshold:g}" if iou_threshold is not None else ""
        parts.append(
            _svg_text(
                (width + left - right) / 2,
                top + _PLOT_HEIGHT / 2,
                f"no unit above IoU threshold{below}",
                size=12,
                anchor="middle",
                color="#666666",
            )
        )
    return _write_svg(path, width, height, parts)


def plot_unique_detectors(
    path: str | os.PathLike[str],
    layers: Sequence[str],
    unique: Sequence[Mapping[str, int]],
    *,
    categories: Sequence[str] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """SVG stacked bars of unique detectors by category, one bar per layer (in the order given)."""
    if len(layers) != len(unique):
        raise ValueError(f"{len(layers)} layers but {len(unique)} unique-detector dicts")
    if categories is None:
        categories = list(dict.fromkeys(c for u in unique for c in u))
    colors = dict(colors) if colors is not None else category_colors(categories)
    for c in categories:
        colors.setdefault(c, category_colors([c])[c])

    n = len(layers)
    names = [str(x) for x in layers]
    totals = [sum(int(u.get(c, 0)) for c in categories) for u in unique]
    longest = max((_text_width(x, 10) for x in names), default=0.0)
    rotate = n > 4 or longest > _text_width("x" * 10, 10)
    top, slot = 34.0, 70.0
    # A label turned 30 degrees reaches cos(30 deg) of its length left of its bar's middle.
    left = max(56.0, 0.87 * longest - slot / 2 + 8) if rotate else 56.0
    plot_width = max(n, 3) * slot
    legend_x = left + plot_width + 16
    legend_width = 20 + max((_text_width(c, 11) for c in categories), default=0.0)
    width = legend_x + legend_width + 8
    below = longest * 0.5 + 14 if rotate else 22  # sin(30 deg) of the label, or a line
    height = top + _PLOT_HEIGHT + below + 8
    ticks = _integer_ticks(max(totals, default=0) * 1.12)
    parts = [_svg_text(8, 16, "Unique detectors by category", size=14, bold=True)]
    parts += _svg_axes(left, top, plot_width, _PLOT_HEIGHT, ticks)
    parts.append(
        _svg_text(
            14, top + _PLOT_HEIGHT / 2, "unique detectors", size=11, anchor="middle", rotate=-90
        )
    )
    bottom = top + _PLOT_HEIGHT
    scale = _PLOT_HEIGHT / ticks[-1]
    for i, (name, counts, total) in enumerate(zip(names, unique, totals, strict=True)):
        x = left + i * slot + slot / 2
        y = bottom
        for c in categories:
            v = int(counts.get(c, 0))
            if v > 0:
                parts.append(
                    _svg_bar(
                        x - 0.325 * slot,
                        y - v * scale,
                        0.65 * slot,
                        v * scale,
                        colors[c],
                        f"{name}, {c}: {v}",
                    )
                )
                y -= v * scale
        parts.append(_svg_text(x, y - 8, str(total), size=10, anchor="middle"))
        if rotate:
            parts.append(_svg_text(x, bottom + 8, name, anchor="end", rotate=-30))
        else:
            parts.append(_svg_text(x, bottom + 12, name, anchor="middle"))
    if n == 0:
        parts.append(
            _svg_text(
                left + plot_width / 2,
                top + _PLOT_HEIGHT / 2,
                "no layer",
                size=12,
                anchor="middle",
                color="#666666",
            )
        )
    for j, c in enumerate(categories):
        parts += _svg_swatch(legend_x, top + 8 + 18 * j, c, colors[c])
    return _write_svg(path, width, height, parts)


def plot_ablation_curves(
    path: str | os.PathLike[str],
    ns: Sequence[int],
    curves: Mapping[str, tuple[Sequence[float | None], Sequence[float | None]]],
    *,
    title: str = "",
    ylabel: str = "accuracy",
) -> Path:
    """Accuracy (or `ylabel`) against N units removed (Bau et al. 2020, fig. 5): per class,
    its own (thin) and the other classes' mean (thin, dashed); the means over classes bold."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    x = [max(n, 0.5) for n in ns]  # N = 0 drawn at 0.5 on the log axis

    def arr(v: Sequence[float | None]) -> list[float]:
        return [math.nan if a is None else float(a) for a in v]

    owns, rests = [], []
    for own, rest in curves.values():
        owns.append(arr(own))
        rests.append(arr(rest))
        ax.plot(x, owns[-1], color="#e15759", alpha=0.25, linewidth=0.8)
        ax.plot(x, rests[-1], color="#4e79a7", alpha=0.25, linewidth=0.8, linestyle="--")
    if owns:
        mean = [sum(col) / len(col) for col in zip(*owns, strict=True)]
        ax.plot(x, mean, "o-", color="#e15759", label="the class (mean over classes)")
        mean = [sum(col) / len(col) for col in zip(*rests, strict=True)]
        ax.plot(x, mean, "o--", color="#4e79a7", label="the other classes (mean)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [str(n) for n in ns])
    ax.set_xlabel("units removed (the class's most important first)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.grid(color="#dddddd", linewidth=0.6)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(textwrap.fill(title, 80), loc="left", fontsize=9, parse_math=False)
    return _save(fig, path)


def plot_iou_scatter(
    path: str | os.PathLike[str],
    single: Sequence[float],
    vector: Sequence[float],
    categories: Sequence[str],
    *,
    title: str = "",
) -> Path:
    """Held-out IoU of each concept's vector against its best single unit's (Net2Vec, fig. 3),
    coloured by category; points above the diagonal are concepts the vector does better."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.6, 5.0), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    colors = category_colors(categories)
    top = max([0.05, *single, *vector]) * 1.05
    ax.plot([0, top], [0, top], color="#999999", linewidth=0.8, linestyle="--")
    for cat, color in colors.items():
        xs = [s for s, c in zip(single, categories, strict=True) if c == cat]
        ys = [v for v, c in zip(vector, categories, strict=True) if c == cat]
        ax.scatter(xs, ys, s=14, color=color, label=f"{cat} ({len(xs)})", alpha=0.8)
    if not single:
        _note(ax, "no concept to plot")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("best single unit, held-out IoU")
    ax.set_ylabel("concept vector, held-out IoU")
    ax.grid(color="#dddddd", linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    if single:
        leg = ax.legend(fontsize=8, frameon=False, loc="upper left")
        _plain(leg.get_texts())
    ax.set_title(textwrap.fill(title, 70), loc="left", fontsize=9, parse_math=False)
    return _save(fig, path)


def plot_iou_by_length(
    path: str | os.PathLike[str],
    curves: Mapping[str, Sequence[float]],
    *,
    title: str = "",
) -> Path:
    """Mean IoU of each unit's best formula against the longest formula allowed, per layer
    (compositional explanations: Mu & Andreas 2020, fig. 3)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2, 3.6), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    longest = 1
    for name, values in curves.items():
        lengths = list(range(1, len(values) + 1))
        longest = max(longest, len(values))
        ax.plot(lengths, list(values), "o-", label=name)
    if not curves:
        _note(ax, "no layer")
    ax.set_xticks(list(range(1, longest + 1)))
    ax.set_xlabel("formula length (concepts), at most")
    ax.set_ylabel("mean IoU of the best formula")
    ax.set_ylim(bottom=0)
    ax.grid(color="#dddddd", linewidth=0.6)
    if curves:
        leg = ax.legend(fontsize=8, frameon=False)
        _plain(leg.get_texts())
    ax.spines[["top", "right"]].set_visible(False)
    ax.set_title(textwrap.fill(title, 64), loc="left", fontsize=9, parse_math=False)
    return _save(fig, path)


def plot_training_curves(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, float]], *, title: str = ""
) -> Path:
    """Training loss, and training and validation accuracy, against the step."""
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[float], list[float]]:
        got = [(r["step"], r[key]) for r in rows if not math.isnan(r.get(key, float("nan")))]
        return [g[0] for g in got], [g[1] for g in got]

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    loss_ax.plot(*series("train_loss"), color="#4e79a7", label="train")
    loss_ax.plot(*series("val_loss"), "o-", color="#e15759", label="val")
    loss_ax.set_ylabel("cross-entropy")
    acc_ax.plot(*series("train_accuracy"), color="#4e79a7", label="train (batch)")
    acc_ax.plot(*series("val_accuracy"), "o-", color="#e15759", label="val")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0, 1)
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("step")
        ax.grid(color="#dddddd", linewidth=0.6)
        ax.legend(fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    loss_ax.set_title(title, loc="left", fontsize=10, parse_math=False)
    return _save(fig, path)

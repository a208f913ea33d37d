"""Report plots: detectors per concept for one layer, unique detectors across layers.

Uses `matplotlib.figure.Figure` directly (never pyplot), so no global figure
state is created or leaks between calls, and no GUI backend is touched.
"""

from __future__ import annotations

import io
import math
import os
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from jaxdissect import store

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


def plot_detectors_per_concept(
    path: str | os.PathLike[str],
    detectors: Sequence[tuple[str, str, int]],
    *,
    title: str = "",
    iou_threshold: float | None = None,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Bar graph of units per concept (label, category, count), grouped by category.

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
    # Grow with the number of bars so labels stay readable; cap the pixel width.
    width = min(max(6.5, 0.16 * n + 1.8), 48.0)
    fig = Figure(figsize=(width, 4.0), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    thr = f" (IoU threshold {iou_threshold:g})" if iou_threshold is not None else ""
    heading = f"{n} unique detectors, {sum(r[2] for r in rows)} units{thr}"
    heading = f"{title}: {heading}" if title else heading
    ax.set_ylabel("units")
    ax.spines[["top", "right"]].set_visible(False)
    if n == 0:
        ax.set_title(heading, loc="left", fontsize=10, parse_math=False)
        below = f" {iou_threshold:g}" if iou_threshold is not None else ""
        _note(ax, f"no unit above IoU threshold{below}")
        ax.set_xticks([])
        ax.set_ylim(0, 1)
        ax.set_yticks([0, 1])
        return _save(fig, path)

    xs = range(n)
    ax.bar(xs, [r[2] for r in rows], color=[colors[r[1]] for r in rows], width=0.8)
    ax.set_xlim(-0.7, n - 0.3)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r[0] for r in rows], rotation=90, fontsize=7)
    _plain(ax.get_xticklabels())
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    handles = [Patch(color=colors[c], label=c) for c in cat_order]
    # Heading and legend on top at the left: wide graphs scroll sideways in the
    # report, and a legend inside the axes would cover bars.
    leg = fig.legend(
        handles,
        cat_order,
        loc="outside upper left",
        ncols=len(cat_order),
        title=heading,
        alignment="left",
        fontsize=8,
        title_fontsize=10,
        frameon=False,
    )
    _plain([*leg.get_texts(), leg.get_title()])
    return _save(fig, path)


def plot_unique_detectors(
    path: str | os.PathLike[str],
    layers: Sequence[str],
    unique: Sequence[Mapping[str, int]],
    *,
    categories: Sequence[str] | None = None,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Stacked bars of unique detectors by category, one bar per layer (in the order given)."""
    if len(layers) != len(unique):
        raise ValueError(f"{len(layers)} layers but {len(unique)} unique-detector dicts")
    if categories is None:
        categories = list(dict.fromkeys(c for u in unique for c in u))
    colors = dict(colors) if colors is not None else category_colors(categories)
    for c in categories:
        colors.setdefault(c, category_colors([c])[c])

    n = len(layers)
    longest = max((len(str(x)) for x in layers), default=0)
    rotate = n > 4 or longest > 10
    width = min(max(5.5, 0.7 * n + 3.0), 30.0)
    height = 3.6 + (min(longest, 40) * 0.06 if rotate else 0.0)
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title("Unique detectors by category", loc="left", fontsize=11)
    ax.set_ylabel("unique detectors")
    ax.spines[["top", "right"]].set_visible(False)
    xs = list(range(n))
    bottom = [0] * n
    handles = []
    for c in categories:
        vals = [int(u.get(c, 0)) for u in unique]
        bars = ax.bar(xs, vals, bottom=bottom, color=colors[c], width=0.65)
        handles.append(bars)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    top = max(bottom, default=0)
    for x, total in zip(xs, bottom, strict=True):
        ax.text(x, total + max(top, 1) * 0.01, str(total), ha="center", va="bottom", fontsize=8)
    ax.set_ylim(0, max(1, math.ceil(top * 1.12)))
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xticks(xs)
    ax.set_xticklabels(
        [str(x) for x in layers], rotation=30 if rotate else 0, ha="right" if rotate else "center"
    )
    _plain(ax.get_xticklabels())
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    if n == 0:
        _note(ax, "no layer")
    if categories:
        leg = ax.legend(
            handles,
            list(categories),
            fontsize=8,
            frameon=False,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
        )
        _plain(leg.get_texts())
    return _save(fig, path)


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

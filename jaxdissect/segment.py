"""Segmenting any image with a dissected layer's units (NetDissect, extended version).

Each labelled unit's mask on the image (its map upsampled to the image's size, compared
with the dissection's threshold by its tie rule: `jaxdissect.masks.unit_masks`) is a region
of its label; units sharing a label make one region, the union of their masks. A pixel is
painted with the label of the region covering it whose best unit has the highest IoU in the
dissection among the units firing at that pixel (ties: the first region); `regions` lists
every region, overlaps included.
Concept vectors (`jaxdissect.concept_vectors.predict`) give regions the same way, from
w . m(x) + b > 0 over the inputs they were trained on (all units' masks, or their upsampled
activations for the `raw` variant).
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

# Share of the overlay colour where a pixel is painted.
_BLEND = 0.55
# The figure's resolution, and its legends' columns and font size (points).
_DPI = 100
_LEGEND_COLUMNS = 2
_LEGEND_FONT = 7
# matplotlib's legend spacing (its defaults), in font sizes: the room a column's text has.
_LEGEND_SPACING = (
    ("borderpad", 0.4),
    ("handlelength", 2.0),
    ("handletextpad", 0.8),
    ("columnspacing", 2.0),
)
ELLIPSIS = "\u2026"


@dataclasses.dataclass(frozen=True)
class Region:
    """Pixels one label covers on the image.

    Attributes:
      name, category: the label.
      source: `unit` (a dissected unit's label) or `vector` (a concept vector).
      units: the units labelled with it (source `unit`).
      score: the best IoU among its units that fire on the image (the dissection's unit IoU,
        or the vector's held-out IoU).
      pixels: pixels the region covers; painted: pixels painted with it.
      bbox: [x0, y0, x1, y1] (x1, y1 exclusive) of the covered pixels, None when empty.
    """

    name: str
    category: str | None
    source: str
    units: tuple[int, ...]
    score: float
    pixels: int
    painted: int
    bbox: tuple[int, int, int, int] | None


def regions_of(
    masks: np.ndarray,
    names: Sequence[str],
    categories: Sequence[str | None],
    scores: Sequence[float],
    *,
    source: str = "unit",
    units: Sequence[int] | None = None,
) -> tuple[np.ndarray, list[Region]]:
    """(painted int [H, W]: index into the regions or -1, the regions with any pixel).

    masks: bool [H, W, M], one mask per labelled unit (or per concept vector), named
    `names[m]` with `scores[m]`; masks with the same name are one region.
    """
    masks = np.asarray(masks, bool)
    if masks.ndim != 3 or masks.shape[-1] != len(names) or len(scores) != len(names):
        raise ValueError(f"masks {masks.shape}: expected [H, W, {len(names)}], one per name")
    units = list(range(len(names))) if units is None else list(units)
    order = list(dict.fromkeys(names))
    score = np.asarray(scores, np.float64)
    # Per pixel and region: the best score among the region's units that fire there.
    maps, members, cats = [], [], []
    for name in order:
        idx = [m for m, n in enumerate(names) if n == name]
        maps.append(np.where(masks[..., idx], score[idx], -np.inf).max(-1))
        members.append(tuple(sorted(int(units[m]) for m in idx)))
        cats.append(categories[idx[0]])
    keep = [r for r in range(len(order)) if np.isfinite(maps[r]).any()]
    if not keep:
        return np.full(masks.shape[:2], -1, np.int64), []
    stack = np.stack([maps[r] for r in keep])  # [R, H, W]
    first = np.argmax(stack, axis=0)  # ties: the first region
    painted = np.where(np.isfinite(stack).any(0), first, -1)
    best = [float(stack[i].max()) for i in range(len(keep))]
    stack = np.isfinite(stack)
    regions = []
    for i, r in enumerate(keep):
        ys, xs = np.nonzero(stack[i])
        regions.append(
            Region(
                name=order[r],
                category=cats[r],
                source=source,
                units=members[r] if source == "unit" else (),
                score=best[i],
                pixels=int(stack[i].sum()),
                painted=int((painted == i).sum()),
                bbox=(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1),
            )
        )
    return painted, regions


def palette(n: int) -> np.ndarray:
    """uint8 [n, 3]: distinct colours (matplotlib's tab20, then repeated)."""
    from matplotlib import colormaps

    colors = np.asarray(colormaps["tab20"].colors)
    return (colors[np.arange(n) % len(colors)] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, painted: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: the image with each painted pixel blended with its region's colour."""
    out = image.astype(np.float32)
    hit = painted >= 0
    out[hit] = (1 - _BLEND) * out[hit] + _BLEND * colors[painted[hit]].astype(np.float32)
    return out.round().clip(0, 255).astype(np.uint8)


def fit_text(text: str, max_width: float, width: Callable[[str], float]) -> str:
    """`text` if its `width` is at most `max_width`, else its longest prefix followed by an
    ellipsis that is (the ellipsis alone where none is)."""
    if width(text) <= max_width:
        return text
    lo, hi = 0, len(text) - 1  # the longest prefix that fits lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if width(text[:mid].rstrip() + ELLIPSIS) <= max_width:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + ELLIPSIS


def legend_text_width(panel_width: float) -> float:
    """Pixels a legend entry's text may take so that the legend (`_LEGEND_COLUMNS` columns,
    font `_LEGEND_FONT` points at `_DPI`) fits a panel `panel_width` pixels wide."""
    s = dict(_LEGEND_SPACING)
    font = _LEGEND_FONT * _DPI / 72
    cols = _LEGEND_COLUMNS
    spacing = 2 * s["borderpad"] + cols * (s["handlelength"] + s["handletextpad"])
    spacing += (cols - 1) * s["columnspacing"]
    return max(0.0, (panel_width - spacing * font) / cols)


def figure_png(
    image: np.ndarray,
    panels: Sequence[tuple[str, np.ndarray, list[Region]]],
    *,
    max_legend: int = 16,
) -> bytes:
    """PNG bytes: the image, then each (title, painted, regions) panel as an overlay with a
    legend of its regions (most painted pixels first, at most `max_legend`), each entry cut
    with an ellipsis to its column's width so that it stays under its panel (glyphs the font
    lacks, e.g. CJK, show as boxes)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.font_manager import FontProperties
    from matplotlib.patches import Patch

    fig = Figure(figsize=(4.2 * (1 + len(panels)), 5.2), dpi=_DPI)
    renderer = FigureCanvasAgg(fig).get_renderer()
    font = FontProperties(size=_LEGEND_FONT)

    def text_width(text: str) -> float:
        return renderer.get_text_width_height_descent(text, font, ismath=False)[0]

    axes = fig.subplots(1, 1 + len(panels), squeeze=False)[0]
    # A legend is centred under its panel: it may be as wide as the panels' pitch (pixels).
    x0 = [ax.get_position(original=True).x0 for ax in axes]
    pitch = (x0[1] - x0[0] if len(axes) > 1 else 1.0) * fig.get_figwidth() * _DPI
    max_text = legend_text_width(pitch)
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=10)
    for ax, (title, painted, regions) in zip(axes[1:], panels, strict=True):
        colors = palette(max(1, len(regions)))
        ax.imshow(overlay(image, painted, colors))
        ax.set_title(title, fontsize=10, parse_math=False)
        shown = sorted(range(len(regions)), key=lambda r: -regions[r].painted)[:max_legend]
        handles = [
            Patch(
                color=colors[r] / 255.0,
                label=fit_text(f"{regions[r].name} ({regions[r].category})", max_text, text_width),
            )
            for r in shown
            if regions[r].painted
        ]
        if handles:
            leg = ax.legend(
                handles=handles,
                fontsize=_LEGEND_FONT,
                loc="upper center",
                bbox_to_anchor=(0.5, -0.02),
                ncol=_LEGEND_COLUMNS,
                frameon=False,
                **dict(_LEGEND_SPACING),
            )
            for t in leg.get_texts():
                t.set_parse_math(False)
        else:
            ax.text(0.5, -0.08, "no labelled unit fires", transform=ax.transAxes, ha="center")
    for ax in axes:
        ax.set_axis_off()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def region_records(regions: Sequence[Region], total: int) -> list[dict[str, Any]]:
    """JSON records of the regions, with each one's share of the image's pixels."""
    return [{**dataclasses.asdict(r), "share": r.pixels / total if total else 0.0} for r in regions]

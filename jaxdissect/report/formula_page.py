"""compositional.html: a card per unit with its formula, and its top images twice, dimmed
outside the unit's mask and outside the formula's mask, side by side.

Rendered by jinja2 with autoescaping on: label names (inside formulas) are data.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxdissect.report import page
from jaxdissect.report.strips import dim_outside

_PAGE = page.template(
    "Compositional explanations: {{ s.model }}",
    """\
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 10px; }
.card { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 6px 8px; }
.card img { width: 100%; height: auto; display: block; image-rendering: pixelated; }
.formula { font-family: ui-monospace, monospace; }
th:first-child, td:first-child { text-align: left; }
""",
    """\
<h1>Compositional explanations: {{ s.model }}</h1>
<p class="muted">{{ s.dataset }}; formulas of up to {{ s.max_length }} concepts ({{ ops }}),
{{ s.mode }} search{% if s.mode == "beam" %} (beam {{ s.beam }}){% endif %}, length penalty
{{ s.length_penalty }}, union restriction {{ s.union_restriction }}. Each strip pairs a top image dimmed outside the
unit's mask (left) with the same image dimmed outside the formula's mask (right).</p>
<img src="{{ plot }}" alt="mean IoU against formula length">
{% for layer in layers %}
<h2 id="layer-{{ loop.index0 }}">{{ layer.name }}</h2>
<table><tr><th>formula length, at most</th>{% for v in layer.mean_by_length %}<th>{{ loop.index }}</th>{% endfor %}</tr>
<tr><td>mean IoU of the beam's best (units that fire)</td>{% for v in layer.mean_by_length %}<td>{{ fmt(v) }}</td>{% endfor %}</tr></table>
{% if layer.beam_not_optimal is not none %}<p>Beam search missed the optimal formula for
{{ layer.beam_not_optimal }} of {{ layer.units_that_fire }} units; the optimal formulas'
mean IoU is {{ fmt(layer.mean_iou) }}.</p>{% endif %}
<div class="cards">
{% for u in layer.cards %}<div class="card"><b>unit {{ u.unit }}</b>:
<span class="formula">{{ u.formula }}</span> (IoU {{ fmt(u.iou) }})<br>
<span class="muted">best single label: {{ u.label }} (IoU {{ fmt(u.label_iou) }}){% if "beam_is_optimal" in u and not u.beam_is_optimal %};
beam found <span class="formula">{{ u.beam_formula }}</span> ({{ fmt(u.beam_iou) }}){% endif %}</span>
{% if u.strip %}<img src="{{ u.strip }}" alt="unit {{ u.unit }}: unit mask | formula mask">{% endif %}
</div>{% endfor %}
</div>
{% endfor %}
""",
)


def pair_strip(
    images: np.ndarray, unit_masks: np.ndarray, formula_masks: np.ndarray, *, gap: int = 6
) -> np.ndarray:
    """uint8 [H, ...]: per image, the image dimmed outside the unit's mask, then dimmed
    outside the formula's mask (1 px apart), the pairs `gap` px apart on white.

    images uint8 [T, H, W, 3]; unit_masks, formula_masks bool [T, H, W].
    """
    images = np.asarray(images)
    t, h, w, _ = images.shape
    if unit_masks.shape != (t, h, w) or formula_masks.shape != (t, h, w):
        raise ValueError(
            f"masks {unit_masks.shape}, {formula_masks.shape} must match images {images.shape[:3]}"
        )
    pair = 2 * w + 1
    width = max(pair, t * pair + (t - 1) * gap)
    out = np.full((h, width, 3), 255, np.uint8)
    for i in range(t):
        x = i * (pair + gap)
        out[:, x : x + w] = dim_outside(images[i], unit_masks[i])
        out[:, x + w + 1 : x + pair] = dim_outside(images[i], formula_masks[i])
    return out


def write_page(
    out: pathlib.Path,
    settings: Mapping[str, Any],
    layers: Sequence[Mapping[str, Any]],
    *,
    plot: str,
) -> pathlib.Path:
    """Write out/compositional.html. layers: per layer `name`, `mean_by_length`,
    `beam_not_optimal` and `mean_iou` (None and unused in beam mode), `units_that_fire` and
    `cards` (unit rows of `compositional.unit_rows` with a `strip` path relative to `out`,
    or None)."""
    return page.write(
        out / "compositional.html",
        _PAGE,
        s=settings,
        ops=", ".join(o.upper().replace("_", " ") for o in settings["operators"]),
        layers=layers,
        plot=plot,
    )

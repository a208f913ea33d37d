"""concept_vectors.html: every concept's vector against its best single unit, sorted by the
gain, with the scatter plot and each vector's top-weighted units and their own labels.

Rendered by jinja2 with autoescaping on: concept and label names are data and show as text.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from jaxdissect.report import page

_PAGE = page.template(
    "Concept vectors: {{ s.layer }}",
    """\
td.l, th.l { text-align: left; }
.up { color: #2b7a3d; } .down { color: #a33; }
""",
    """\
<h1>Concept vectors: {{ s.layer }}</h1>
<p class="muted">{{ s.model }}, layer {{ s.layer }} ({{ s.units }} units), {{ s.variant }} probe;
trained on {{ s.train_images }} images, scored on {{ s.heldout_images }} held-out images
(set IoU, prediction &gt; 0.5). The single unit is the one with the best IoU on the training
images; its IoU is recomputed on the held-out images.</p>
<p><b>{{ m.beats }} of {{ m.scored }}</b> concepts ({{ pct(m.beats_share) }}) are segmented
better by their vector than by their best single unit; mean gain {{ fmt(m.mean_gain) }}
(median {{ fmt(m.median_gain) }}).</p>
<img src="concept_vectors.png" alt="vector against single-unit IoU">
<table>
<tr><th class="l">concept</th><th class="l">category</th><th>vector IoU</th><th>unit IoU</th>
<th>gain</th><th class="l">single unit</th><th class="l">top-weighted units (weight: label)</th></tr>
{% for c in concepts %}<tr><td class="l">{{ c.name }}</td><td class="l">{{ c.category }}</td>
<td>{{ fmt(c.iou) }}</td><td>{{ fmt(c.single_iou) }}</td>
<td class="{{ 'up' if c.gain > 0 else 'down' if c.gain < 0 else '' }}">{{ fmt(c.gain) }}</td>
<td class="l">{{ "none" if c.single_unit is none else c.single_unit }}{% if c.single_unit_label %} ({{ c.single_unit_label }}){% endif %}</td>
<td class="l">{% for u in c.top_units %}{{ u.unit }} {{ fmt(u.weight) }}{% if u.label %}:
{{ u.label }}{% endif %}{% if not loop.last %}; {% endif %}{% endfor %}</td></tr>
{% endfor %}</table>
""",
)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def write_page(out: pathlib.Path, document: Mapping[str, Any]) -> pathlib.Path:
    """Write out/concept_vectors.html for a concept_vectors.json `document` (scored concepts,
    highest gain first)."""
    scored = [c for c in document["concepts"] if c["scored"]]
    return page.write(
        out / "concept_vectors.html",
        _PAGE,
        s=document["settings"],
        m=document["summary"],
        concepts=sorted(scored, key=lambda c: -c["gain"]),
        pct=_pct,
    )

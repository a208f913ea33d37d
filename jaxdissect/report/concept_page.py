"""concept_vectors.html: every concept's vector against its best single unit, sorted by the
gain, with the scatter plot and each vector's top-weighted units and their own labels.

Rendered by jinja2 with autoescaping on: concept and label names are data and show as text.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jinja2

from jaxdissect.store import write_text

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="generator" content="jaxdissect">
<title>Concept vectors: {{ s.layer }}</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; color: #1d2330; background: #f6f7f9; margin: 0; }
main { max-width: 1300px; margin: 0 auto; padding: 16px 24px 48px; }
table { border-collapse: collapse; background: #fff; }
th, td { padding: 3px 8px; border-bottom: 1px solid #dde1e8; text-align: right; }
td.l, th.l { text-align: left; }
.muted { color: #5b6474; }
.up { color: #2b7a3d; } .down { color: #a33; }
</style></head><body><main>
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
<td class="l">{{ c.single_unit }}{% if c.single_unit_label %} ({{ c.single_unit_label }}){% endif %}</td>
<td class="l">{% for u in c.top_units %}{{ u.unit }} {{ fmt(u.weight) }}{% if u.label %}:
{{ u.label }}{% endif %}{% if not loop.last %}; {% endif %}{% endfor %}</td></tr>
{% endfor %}</table>
</main></body></html>
"""


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def write_page(out: pathlib.Path, document: Mapping[str, Any]) -> pathlib.Path:
    """Write out/concept_vectors.html for a concept_vectors.json `document` (scored concepts,
    highest gain first)."""
    scored = [c for c in document["concepts"] if c["scored"]]
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    html = env.from_string(_PAGE).render(
        s=document["settings"],
        m=document["summary"],
        concepts=sorted(scored, key=lambda c: -c["gain"]),
        fmt=_fmt,
        pct=_pct,
    )
    path = out / "concept_vectors.html"
    write_text(path, html)
    return path

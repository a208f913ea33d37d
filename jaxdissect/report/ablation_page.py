"""ablation.html: per class, its most important units (cards with their dissection strips and
labels) and its accuracy against N units removed, beside the other classes' mean.

Rendered by jinja2 with autoescaping on: class and label names are data and show as text.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from jaxdissect import results
from jaxdissect.report import page

_PAGE = page.template(
    "Unit ablation: {{ s.layer }}",
    """\
th:first-child, td:first-child { text-align: left; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(380px, 1fr)); gap: 10px; }
.card { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 6px 8px; }
.card img { max-width: 100%; height: auto; display: block; }
""",
    """\
<h1>Unit ablation: {{ s.layer }}</h1>
<p class="muted">{{ s.weights }}, {{ s.units }} units ablated ({{ value }}), {{ s.eval_images }}
images ({{ s.task }}); units ranked per class by the drop of its accuracy (or agreement) when
each alone is ablated.
{% if dissection %}<a href="index.html">The dissection</a>.{% endif %}</p>
<img src="ablation.png" alt="accuracy against units removed">
{% for c in classes %}
<h2 id="class-{{ loop.index0 }}">{{ c.class }}</h2>
<p class="muted">{{ c.examples }} images.</p>
<table><tr><th>units removed</th>{% for n in c.curve.n %}<th>{{ n }}</th>{% endfor %}</tr>
<tr><td>{{ c.class }}</td>{% for v in c.curve.class_accuracy %}<td>{{ fmt(v) }}</td>{% endfor %}</tr>
<tr><td>other classes (mean)</td>{% for v in c.curve.others_accuracy %}<td>{{ fmt(v) }}</td>{% endfor %}</tr>
</table>
<h3>Most important units</h3>
<div class="cards">
{% for u in c.units %}<div class="card"><b>unit {{ u.unit }}</b>: drop {{ fmt(u.drop) }};
{% if u.name %}{{ u.name }} ({{ u.category }}, IoU {{ fmt(u.iou) }}{% if not u.interpretable %},
below the threshold{% endif %}){% else %}<span class="muted">no label</span>{% endif %}
{% if strips.get(u.unit) %}<img src="{{ strips[u.unit] }}" alt="unit {{ u.unit }}">{% endif %}
</div>{% endfor %}
</div>
{% endfor %}
""",
)


def write_page(
    out: pathlib.Path, document: Mapping[str, Any], *, strips_dir: pathlib.Path | None = None
) -> pathlib.Path:
    """Write out/ablation.html for an ablation.json `document`; strips are linked where
    `strips_dir` holds unit<k>.jpg (the dissection report's)."""
    strips: dict[int, str] = {}
    if strips_dir is not None and strips_dir.is_dir():
        for c in document["classes"]:
            for u in c["units"]:
                path = strips_dir / f"unit{int(u['unit']):04d}.jpg"
                if path.is_file():
                    strips[int(u["unit"])] = pathlib.Path(os.path.relpath(path, out)).as_posix()
    return page.write(
        out / "ablation.html",
        _PAGE,
        s=document["settings"],
        value=document["value"],
        classes=document["classes"],
        strips=strips,
        dissection=(out / "index.html").is_file(),
    )


def strips_dir(out: pathlib.Path, layers: Sequence[str], layer: str) -> pathlib.Path | None:
    """The folder of `layer`'s unit strips in the report of a dissection of `layers` in `out`
    (None where `layer` is not one of them): named, as that run's files are, by the stems of
    all its layers together (`results.layer_file_stems`; `a/b` beside `a_b` is hashed)."""
    layers = list(layers)
    if layer not in layers:
        return None
    return out / "strips" / results.layer_file_stems(layers)[layers.index(layer)]


def relink(out: pathlib.Path, layers: Sequence[str]) -> pathlib.Path | None:
    """Write out/ablation.html again from its ablation.json, linking the report of the
    dissection of `layers` in `out` as it is now: a rerun of the dissection the page was
    made from keeps the page (`pipeline.dissect`) but may write another report, or none,
    in place of the one whose strips and index.html it linked. None where there is no page."""
    if not (out / "ablation.html").is_file():
        return None
    try:
        document = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
        layer = document["settings"]["layer"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return write_page(out, document, strips_dir=strips_dir(out, layers, layer))

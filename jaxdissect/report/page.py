"""The one-file HTML pages of the study scripts (ablation, concept vectors, formulas): one
head and style, rendered by jinja2 with autoescaping on (class, concept and label names are
data and show as text), written atomically."""

from __future__ import annotations

import math
import pathlib
from typing import Any

import jinja2

from jaxdissect.store import write_text

_STYLE = """\
body { font: 14px/1.45 system-ui, sans-serif; color: #1d2330; background: #f6f7f9; margin: 0; }
main { max-width: 1300px; margin: 0 auto; padding: 16px 24px 48px; }
table { border-collapse: collapse; background: #fff; }
th, td { padding: 3px 8px; border-bottom: 1px solid #dde1e8; text-align: right; }
.muted { color: #5b6474; }
"""


def template(title: str, style: str, body: str) -> str:
    """A page's jinja2 template: `title` (a template expression too), the shared style and
    the page's own `style`, then `body` inside <main>."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="generator" content="jaxdissect">\n'
        f"<title>{title}</title>\n<style>\n{_STYLE}{style}</style></head><body><main>\n"
        f"{body}</main></body></html>\n"
    )


def fmt(v: float | None) -> str:
    """A score as every page prints it: 4 decimals (an IoU of 0.0404, a detector, and one
    of 0.0396 read apart), `-` for none, `n/a` for a non-finite one."""
    if v is None:
        return "-"
    return f"{v:.4f}" if math.isfinite(v) else "n/a"


def write(path: pathlib.Path, page: str, **context: Any) -> pathlib.Path:
    """Render the template `page` with `context` (and `fmt`) into `path`."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    write_text(path, env.from_string(page).render(fmt=fmt, **context))
    return pathlib.Path(path)

"""The study scripts' one-file pages (jaxdissect/report/page.py): names escaped, scores
formatted, the shared style present."""

from __future__ import annotations

from jaxdissect.report import ablation_page, formula_page, page
from jaxdissect.report import html as layer_html

HOSTILE = "<script>x</script>"


def test_scores_read_apart_at_the_detector_threshold() -> None:
    # 0.0404 detects (IoU > 0.04) and 0.0396 does not: every page prints them apart,
    # the layer pages (the `iou` filter) and the study pages (`fmt`) alike.
    for f in (page.fmt, layer_html._environment().filters["iou"]):
        assert (f(0.0404), f(0.0396), f(0.5)) == ("0.0404", "0.0396", "0.5000")
        assert (f(float("nan")), f(float("inf"))) == ("n/a", "n/a")
    assert page.fmt(None) == "-"


def _check(html: str) -> None:
    assert "<script>x" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    assert "system-ui" in html and ".muted" in html  # the shared style


def test_ablation_page_escapes_names(tmp_path):
    unit = {"unit": 2, "drop": 0.25, "name": "a&b", "category": "object", "iou": 0.1}
    doc = {
        "settings": {"layer": "conv5", "weights": "w", "units": 8, "eval_images": 9},
        "value": "zero",
        "classes": [
            {
                "class": HOSTILE,
                "examples": 3,
                "curve": {"n": [0, 1], "class_accuracy": [1.0, None], "others_accuracy": [1, 0.5]},
                "units": [{**unit, "interpretable": False}],
            }
        ],
    }
    doc["settings"]["task"] = "labels"
    html = ablation_page.write_page(tmp_path, doc).read_text()
    _check(html)
    assert "a&amp;b" in html and "<td>-</td>" in html and "0.5000" in html


def test_formula_page_escapes_names(tmp_path):
    settings = {
        "model": "m",
        "dataset": "d",
        "max_length": 3,
        "operators": ["or", "and_not"],
        "mode": "beam",
        "beam": 5,
        "length_penalty": 1.0,
        "union_restriction": "none",
    }
    card = {
        "unit": 1,
        "formula": f"{HOSTILE} OR b",
        "iou": 0.5,
        "label": "a&b",
        "label_iou": 0.25,
        "strip": None,
    }
    layer = {
        "name": "layer4",
        "mean_by_length": [0.1, 0.2],
        "beam_not_optimal": None,
        "units_that_fire": 1,
        "cards": [card],
    }
    html = formula_page.write_page(tmp_path, settings, [layer], plot="p.png").read_text()
    _check(html)
    assert "OR, AND NOT" in html and "a&amp;b" in html and "0.2500" in html

"""The study scripts' one-file pages (jaxdissect/report/page.py): names escaped, scores
formatted, the shared style present."""

from __future__ import annotations

from jaxdissect.report import ablation_page, formula_page

HOSTILE = "<script>x</script>"


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
    assert "a&amp;b" in html and "<td>-</td>" in html and "0.500" in html


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
    assert "OR, AND NOT" in html and "a&amp;b" in html and "0.250" in html

"""The structure of results.json that its readers rely on, checked when it is read.

`results.read_results_json` refuses a file whose fields the readers index (the scripts
built on a finished dissection, comparisons, the follow-ons' digest) are missing or of
another JSON type, in one line naming the file and the field (`layers[1].units[3].iou`),
instead of a KeyError or TypeError deep in a reader (`jaxdissect.json_check`). Fields
that older files may lack are checked only where present; a reader that needs one says
so (`require`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from jaxdissect.json_check import check_fields, check_items, damaged

FIX = "run the dissection again to rewrite it"

# Per record kind: field -> (JSON type, required), "?" after a type allows null.
SETTINGS = {
    "layers": ("list", False),
    "layer_paths": ("object", False),
    "input_spec": ("object", False),
    "token_layouts": ("object", False),
    "model": ("text", False),
    "model_key": ("text", False),
    "model_fields": ("text", False),
    "model_code": ("text", False),
    "seed": ("whole number", False),
    "tie_rule": ("text", False),
    "activation_dtype": ("text", False),
}
INPUT_SPEC = {
    "size": ("whole number", True),
    "mean": ("list", True),
    "std": ("list", True),
    "scale": ("number", False),
    "bgr": ("true or false", False),
}
LAYER = {
    "layer": ("text", True),
    "path": ("text", False),
    "num_units": ("whole number", True),
    "categories": ("list", True),
    "iou_threshold": ("number", True),
    "units": ("list", True),
    "summary": ("object", True),
}
SUMMARY = {
    "interpretable_units": ("whole number", True),
    "unique_detectors": ("whole number", True),
    "interpretable_by_category": ("object", True),
    "unique_by_category": ("object", True),
}
UNIT = {
    "unit": ("whole number", True),
    "label": ("whole number", True),
    "name": ("text?", True),
    "category": ("text?", True),
    "iou": ("number", True),
    "interpretable": ("true or false", True),
}


def check_document(document: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Raise `DamagedFile` naming `path` and the field where `document` (a results.json
    of the current format) lacks a field its readers index or holds another type there."""
    check_fields(
        document, {"settings": ("object", True), "layers": ("list", True)}, "the file", path, FIX
    )
    settings = document["settings"]
    check_fields(settings, SETTINGS, "settings", path, FIX)
    records = document["layers"]
    for i, record in enumerate(records):
        check_fields(record, LAYER, f"layers[{i}]", path, FIX)
    names = settings.get("layers", [r["layer"] for r in records])
    check_items(names, "text", "settings.layers", path, FIX)
    if len(set(names)) != len(names):
        raise damaged(path, "settings.layers", f"name a layer twice: {names}", FIX)
    if [r["layer"] for r in records] != names:
        raise damaged(
            path, "layers", f"are {[r['layer'] for r in records]}, settings.layers {names}", FIX
        )
    for name in ("layer_paths", "token_layouts"):
        if name in settings:
            check_items(settings[name], "text", f"settings.{name}", path, FIX)
    if "layer_paths" in settings and (missing := set(names) - set(settings["layer_paths"])):
        raise damaged(path, "settings.layer_paths", f"lacks {sorted(missing)}", FIX)
    if "input_spec" in settings:
        spec = settings["input_spec"]
        check_fields(spec, INPUT_SPEC, "settings.input_spec", path, FIX)
        for name in ("mean", "std"):
            if len(spec[name]) != 3:
                raise damaged(path, f"settings.input_spec.{name}", "does not hold 3 numbers", FIX)
            check_items(spec[name], "number", f"settings.input_spec.{name}", path, FIX)
        if spec["size"] < 1 or 0 in spec["std"]:
            raise damaged(path, "settings.input_spec", "has a size under 1 or a std of 0", FIX)
    for i, record in enumerate(records):
        where = f"layers[{i}]"
        check_items(record["categories"], "text", f"{where}.categories", path, FIX)
        check_fields(record["summary"], SUMMARY, f"{where}.summary", path, FIX)
        for name in ("interpretable_by_category", "unique_by_category"):
            check_items(
                record["summary"][name], "whole number", f"{where}.summary.{name}", path, FIX
            )
        units = record["units"]
        if len(units) != record["num_units"]:
            raise damaged(
                path,
                f"{where}.units",
                f"holds {len(units)} units, num_units {record['num_units']}",
                FIX,
            )
        for k, unit in enumerate(units):
            check_fields(unit, UNIT, f"{where}.units[{k}]", path, FIX)


def require(settings: Mapping[str, Any], name: str, path: str | os.PathLike) -> Any:
    """`settings[name]` (checked by `check_document` where present), or `DamagedFile`
    naming `path` where a reader needs a field the file lacks."""
    if name not in settings:
        raise damaged(path, f"settings.{name}", "is missing", FIX)
    return settings[name]

"""The structure of results.json that its readers rely on, checked when it is read.

`results.read_results_json` refuses a file whose fields the readers index (the scripts
built on a finished dissection, comparisons, the follow-ons' digest) are missing or of
another JSON type, in one line naming the file and the field (`layers[1].units[3].iou`),
instead of a KeyError or TypeError deep in a reader. Fields that older files may lack
are checked only where present; a reader that needs one says so (`require`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# JSON types by name. A bool is not a number here, though Python's bool is an int.
_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "list": (list,),
    "text": (str,),
    "whole number": (int,),
    "number": (int, float),
    "true or false": (bool,),
}

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


class DamagedResults(ValueError):
    """A results.json whose structure is not the one written (edited or damaged)."""


def _is(value: Any, kind: str) -> bool:
    if kind.endswith("?"):
        return value is None or _is(value, kind[:-1])
    return isinstance(value, _TYPES[kind]) and (kind == "true or false") == isinstance(value, bool)


def _damaged(path: str | os.PathLike, where: str, problem: str) -> DamagedResults:
    return DamagedResults(
        f"{path}: {where} {problem}; the file was edited or damaged: run the dissection "
        "again to rewrite it"
    )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fields(
    record: Any, fields: Mapping[str, tuple[str, bool]], where: str, path: str | os.PathLike
) -> None:
    if not isinstance(record, dict):
        raise _damaged(path, where, f"is {_shown(record)}, not an object")
    for name, (kind, required) in fields.items():
        if name not in record:
            if required:
                raise _damaged(path, f"{where}.{name}", "is missing")
            continue
        if not _is(record[name], kind):
            raise _damaged(path, f"{where}.{name}", f"is {_shown(record[name])}, not {kind}")


def _items(values: Any, kind: str, where: str, path: str | os.PathLike) -> None:
    """Every element of a list, or value of an object, is of `kind`."""
    pairs = values.items() if isinstance(values, dict) else enumerate(values)
    for key, value in pairs:
        if not _is(value, kind):
            raise _damaged(path, f"{where}[{key!r}]", f"is {_shown(value)}, not {kind}")


def check_document(document: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Raise `DamagedResults` naming `path` and the field where `document` (a results.json
    of the current format) lacks a field its readers index or holds another type there."""
    _fields(document, {"settings": ("object", True), "layers": ("list", True)}, "the file", path)
    settings = document["settings"]
    _fields(settings, SETTINGS, "settings", path)
    records = document["layers"]
    for i, record in enumerate(records):
        _fields(record, LAYER, f"layers[{i}]", path)
    names = settings.get("layers", [r["layer"] for r in records])
    _items(names, "text", "settings.layers", path)
    if len(set(names)) != len(names):
        raise _damaged(path, "settings.layers", f"name a layer twice: {names}")
    if [r["layer"] for r in records] != names:
        raise _damaged(
            path, "layers", f"are {[r['layer'] for r in records]}, settings.layers {names}"
        )
    for name in ("layer_paths", "token_layouts"):
        if name in settings:
            _items(settings[name], "text", f"settings.{name}", path)
    if "layer_paths" in settings and (missing := set(names) - set(settings["layer_paths"])):
        raise _damaged(path, "settings.layer_paths", f"lacks {sorted(missing)}")
    if "input_spec" in settings:
        spec = settings["input_spec"]
        _fields(spec, INPUT_SPEC, "settings.input_spec", path)
        for name in ("mean", "std"):
            if len(spec[name]) != 3:
                raise _damaged(path, f"settings.input_spec.{name}", "does not hold 3 numbers")
            _items(spec[name], "number", f"settings.input_spec.{name}", path)
        if spec["size"] < 1 or 0 in spec["std"]:
            raise _damaged(path, "settings.input_spec", "has a size under 1 or a std of 0")
    for i, record in enumerate(records):
        where = f"layers[{i}]"
        _items(record["categories"], "text", f"{where}.categories", path)
        _fields(record["summary"], SUMMARY, f"{where}.summary", path)
        for name in ("interpretable_by_category", "unique_by_category"):
            _items(record["summary"][name], "whole number", f"{where}.summary.{name}", path)
        units = record["units"]
        if len(units) != record["num_units"]:
            raise _damaged(
                path, f"{where}.units", f"holds {len(units)} units, num_units {record['num_units']}"
            )
        for k, unit in enumerate(units):
            _fields(unit, UNIT, f"{where}.units[{k}]", path)


def require(settings: Mapping[str, Any], name: str, path: str | os.PathLike) -> Any:
    """`settings[name]` (checked by `check_document` where present), or `DamagedResults`
    naming `path` where a reader needs a field the file lacks."""
    if name not in settings:
        raise _damaged(path, f"settings.{name}", "is missing")
    return settings[name]

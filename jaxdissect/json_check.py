"""Checking a JSON document this library reads back (one it wrote, perhaps edited since):
the fields its readers index are there with the JSON types they index them as, or one
error names the file and the field (`layers[1].units[3].iou`) and says what to do.

A schema is a mapping field -> (JSON type, required); the type is one of `TYPES`' names,
with "?" after it where null is allowed too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

# JSON types by name. A bool is not a number here, though Python's bool is an int.
TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "list": (list,),
    "text": (str,),
    "whole number": (int,),
    "number": (int, float),
    "true or false": (bool,),
}
Schema = Mapping[str, tuple[str, bool]]


class DamagedFile(ValueError):
    """A JSON file whose structure is not the one written (edited or damaged)."""


def is_kind(value: Any, kind: str) -> bool:
    """Whether `value` (as `json` reads it) is of the JSON type `kind` (`TYPES`, "?": or null)."""
    if kind.endswith("?"):
        return value is None or is_kind(value, kind[:-1])
    return isinstance(value, TYPES[kind]) and (kind == "true or false") == isinstance(value, bool)


def damaged(path: str | os.PathLike, where: str, problem: str, fix: str) -> DamagedFile:
    return DamagedFile(f"{path}: {where} {problem}; the file was edited or damaged: {fix}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_fields(
    record: Any, schema: Schema, where: str, path: str | os.PathLike, fix: str
) -> None:
    """`record` is an object whose fields `schema` names are there where required and of
    their types where there, or `DamagedFile`."""
    if not isinstance(record, dict):
        raise damaged(path, where, f"is {_shown(record)}, not an object", fix)
    for name, (kind, required) in schema.items():
        if name not in record:
            if required:
                raise damaged(path, f"{where}.{name}", "is missing", fix)
            continue
        if not is_kind(record[name], kind):
            raise damaged(path, f"{where}.{name}", f"is {_shown(record[name])}, not {kind}", fix)


def check_items(values: Any, kind: str, where: str, path: str | os.PathLike, fix: str) -> None:
    """Every element of the list, or value of the object, `values` is of `kind`."""
    pairs = values.items() if isinstance(values, dict) else enumerate(values)
    for key, value in pairs:
        if not is_kind(value, kind):
            raise damaged(path, f"{where}[{key!r}]", f"is {_shown(value)}, not {kind}", fix)

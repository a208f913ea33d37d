"""Settings dataclasses' fields: allowed values, flag names, documentation, checks.

A field declared with `setting(default, choices=..., flag=...)` carries its
allowed values and, where the command line names it differently, its flag's
name; `check_choices` validates an instance against them (`check_fields`: and its
seeds), and
`attribute_docs` reads each field's help from the class's `Attributes:`
docstring section. `jaxdissect.cli` builds absl flags from these.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from collections.abc import Sequence
from typing import Any

CHOICES = "choices"
FLAG = "flag"


def setting(default: Any, *, choices: Sequence[str] | None = None, flag: str | None = None) -> Any:
    """A dataclass field with its allowed values and its flag's name (if not the field's)."""
    metadata: dict[str, Any] = {}
    if choices is not None:
        metadata[CHOICES] = tuple(choices)
    if flag is not None:
        metadata[FLAG] = flag
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(obj: Any) -> None:
    """Raise `ValueError('name=value: allowed values: ...')` for a field outside its choices."""
    for f in dataclasses.fields(obj):
        allowed = f.metadata.get(CHOICES)
        value = getattr(obj, f.name)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{f.name}={value!r}: allowed values: {', '.join(allowed)}")


def check_seed(seed: int, name: str = "seed") -> None:
    """Refuse a seed outside [0, 2**63) (what numpy's and JAX's generators both take), naming
    it `name` (a script: its flag)."""
    if seed < 0:
        raise ValueError(f"{name}={seed}: must be >= 0")
    if seed >= 2**63:
        raise ValueError(f"{name}={seed}: must be < 2**63")


def check_fields(obj: Any) -> None:
    """`check_choices`, and `check_seed` of every field named `seed` or `*_seed`."""
    check_choices(obj)
    for f in dataclasses.fields(obj):
        if f.name == "seed" or f.name.endswith("_seed"):
            check_seed(getattr(obj, f.name), f.name)


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> its text in the class docstring's `Attributes:` section.

    An entry `a, b: text` documents both fields; continuation lines are joined.
    """
    doc = inspect.getdoc(cls) or ""
    lines = doc.split("\n")
    try:
        start = lines.index("Attributes:") + 1
    except ValueError:
        return {}
    entries: list[tuple[list[str], str]] = []
    entry_indent = None
    for line in lines[start:]:
        if line and not line.startswith(" "):
            break  # the next section
        text = line.strip()
        if not text:
            continue
        indent = len(line) - len(line.lstrip())
        entry_indent = indent if entry_indent is None else entry_indent
        match = re.fullmatch(r"([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*): (.*)", text)
        if indent == entry_indent and match:
            entries.append((match.group(1).split(", "), match.group(2)))
        elif entries:
            names, body = entries[-1]
            entries[-1] = (names, f"{body} {text}")
    return {name: body for names, body in entries for name in names}

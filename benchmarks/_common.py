"""Helpers shared by the benchmark scripts (each script puts this folder on sys.path)."""

from __future__ import annotations

import resource
from collections.abc import Mapping, Sequence


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux's getrusage reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def refuse_below(values: Mapping[str, int], least: int | Mapping[str, int] = 1) -> None:
    """Exit with one line naming the first flag of `values` (name -> value) under `least`
    (one bound for all, or each flag's)."""
    for name, value in values.items():
        bound = least if isinstance(least, int) else least[name]
        if value < bound:
            raise SystemExit(f"error: --{name}={value}: must be >= {bound}")


def whole_numbers(name: str, text: str | Sequence[str], least: int = 1) -> list[int]:
    """Flag `name`'s comma-separated whole numbers (`text`, or absl's list of them), each
    >= `least`; else exit with one line naming the flag."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        numbers = [int(p) for p in parts if p]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < least:
        raise SystemExit(
            f"error: --{name}={','.join(parts)}: expected whole numbers >= {least}, comma-separated"
        )
    return numbers


def refuse_unknown(name: str, given: Sequence[str], known: Sequence[str]) -> None:
    """Exit with one line naming flag `name` if `given` is empty or holds a name not in
    `known`."""
    if not given or any(g not in known for g in given):
        raise SystemExit(f"error: --{name}={','.join(given)}: expected some of {', '.join(known)}")

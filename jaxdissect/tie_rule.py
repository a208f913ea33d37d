"""The unit mask's comparison with its threshold, one definition for the tally and the report.

`strict`: S > T (NetDissect-Lite; the default). `inclusive`: S >= T (the paper's formula).
They differ only where values equal T (see `jaxdissect.ties`). No JAX import: the report
uses it on numpy arrays, the tally on jax arrays.
"""

from __future__ import annotations

from typing import Any

TIE_RULES = ("strict", "inclusive")


def check_tie_rule(tie_rule: str) -> None:
    """Raise naming the parameter unless `tie_rule` is one of TIE_RULES."""
    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule={tie_rule!r}; allowed values: {', '.join(TIE_RULES)}")


def active(values: Any, thresholds: Any, tie_rule: str = "strict") -> Any:
    """The unit mask: values > thresholds (strict) or >= (inclusive); numpy or jax arrays.

    NaN is never active.
    """
    check_tie_rule(tie_rule)
    return values > thresholds if tie_rule == "strict" else values >= thresholds

"""Probe data: the Broden reader and the batch loader."""

from jaxdissect.data.broden import Broden, BrodenFormatError, Record, primary_categories
from jaxdissect.data.probe import open_probe

__all__ = [
    "Broden",
    "BrodenFormatError",
    "Record",
    "batches",
    "num_batches",
    "open_probe",
    "primary_categories",
]


def __getattr__(name: str):
    """The loader (grain, which imports JAX) on first use: reading a probe set or the flags
    of a script that runs no model needs neither."""
    if name in ("batches", "num_batches"):
        from jaxdissect.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

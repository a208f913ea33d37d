"""Probe data: the Broden reader and the batch loader."""

from jaxdissect.data.broden import Broden, BrodenFormatError, Record, primary_categories
from jaxdissect.data.loader import batches, num_batches
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

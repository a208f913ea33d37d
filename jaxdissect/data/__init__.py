"""Probe data: the Broden reader and the batch loader."""

from jaxdissect.data.broden import Broden, BrodenFormatError, Record
from jaxdissect.data.loader import batches, num_batches

__all__ = ["Broden", "BrodenFormatError", "Record", "batches", "num_batches"]

"""Helpers shared by the benchmark scripts (each script puts this folder on sys.path)."""

from __future__ import annotations

import resource


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, MiB (Linux's getrusage reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

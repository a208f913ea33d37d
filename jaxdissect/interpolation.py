"""The bilinear interpolation of a unit's map to the label resolution (numpy, no JAX).

Half-pixel centres with edge clamping, rows then columns (the definition is in
`jaxdissect.tally`'s docstring): `tally.upsample` takes its taps from here, and every
upsampled map goes through it (the tally, the masks, the significance test's grid, the
report's strips).
"""

from __future__ import annotations

import numpy as np


def interpolation_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel, edge-clamped linear taps: (i0, i1, f) with out[i] = a[i0] + f (a[i1] - a[i0])."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int32)
    i1 = np.minimum(i0 + 1, n_in - 1).astype(np.int32)
    return i0, i1, (src - i0).astype(np.float32)

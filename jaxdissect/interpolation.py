"""The bilinear interpolation of a unit's map to the label resolution (numpy, no JAX).

Half-pixel centres with edge clamping, rows then columns (the definition is in
`jaxdissect.tally`'s docstring): `tally.upsample` takes its taps from here, and every
upsampled map goes through it (the tally, the masks, the significance test's grid, the
report's strips).
"""

from __future__ import annotations

import numpy as np


def interpolation_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel, edge-clamped linear taps: (i0, i1, f) with out[i] = a[i0] + f (a[i1] - a[i0]).

    The source position (i + 1/2) n_in / n_out - 1/2 = num / den is exact in integers
    (num = (2i + 1) n_in - n_out, den = 2 n_out), so i0 is its floor even where it is an
    integer, and f = (num - i0 den) / den is rounded to float64, then float32.
    """
    den = 2 * n_out
    num = (2 * np.arange(n_out, dtype=np.int64) + 1) * n_in - n_out
    num = np.clip(num, 0, (n_in - 1) * den)
    i0 = num // den
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = ((num - i0 * den) / den).astype(np.float32)
    return i0.astype(np.int32), i1.astype(np.int32), f

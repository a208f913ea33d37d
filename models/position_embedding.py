"""A ViT's learned position embedding resampled to another patch grid (numpy, at load time).

DINOv2 trains at 518 px (a 37 x 37 grid of 14 px patches) and interpolates its position
embedding to the grid of each input as it runs, with `torch.nn.functional.interpolate(...,
mode="bicubic")`: its first backbones with a scale factor of (side + 0.1) / 37 and no
antialiasing, its backbones with registers to the grid's size with antialiasing;
transformers' `Dinov2Model` to the size without antialiasing, its `Dinov2WithRegistersModel`
as DINOv2 does. The grid of a dissection is fixed, so the embedding is resampled once, by
the same arithmetic:

* `bicubic_matrix`: torch's `upsample_bicubic2d` (align_corners=False): the source of output
  pixel i is (i + 1/2) / scale - 1/2, four taps of Keys' cubic with a = -0.75, indices
  clamped to the edge;
* `antialiased_bicubic_matrix`: torch's `_upsample_bicubic2d_aa` (PIL's resampling): Keys'
  cubic with a = -0.5, widened by the downscaling factor, weights normalised per pixel.

Rows then columns, in float64, the result rounded to the embedding's dtype.
"""

from __future__ import annotations

import math

import numpy as np


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distances `x` (0 beyond 2)."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(n_in: int, n_out: int, scale: float | None = None) -> np.ndarray:
    """[n_out, n_in] weights of torch's bicubic resampling without antialiasing; `scale`: the
    scale factor given to `interpolate` (None: n_out / n_in, as a size gives)."""
    step = n_in / n_out if scale is None else 1.0 / scale
    src = (np.arange(n_out) + 0.5) * step - 0.5
    first = np.floor(src)
    t = src - first
    weights = np.zeros((n_out, n_in))
    for k in range(-1, 3):
        taps = np.clip(first + k, 0, n_in - 1).astype(np.int64)
        np.add.at(weights, (np.arange(n_out), taps), _cubic(t - k, -0.75))
    return weights


def antialiased_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's antialiased bicubic resampling to size `n_out`."""
    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    inverse = 1.0 / max(scale, 1.0)
    weights = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = scale * (i + 0.5)
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n_in)
        row = _cubic((np.arange(lo, hi) - centre + 0.5) * inverse, -0.5)
        weights[i, lo:hi] = row / row.sum()
    return weights


def _side(pos: np.ndarray) -> int:
    m = math.isqrt(pos.shape[1]) if pos.ndim == 3 else 0
    if pos.ndim != 3 or pos.shape[0] != 1 or m * m != pos.shape[1]:
        raise ValueError(f"a position embedding of shape {pos.shape} is no square grid")
    return m


def resample_timm(pos: np.ndarray, side: int) -> np.ndarray:
    """`pos` [1, M*M, D] resampled to [1, side*side, D] as timm resamples a checkpoint's
    embedding to a model of another grid at load (`resample_abs_pos_embed`: antialiased
    bicubic to the size)."""
    return _separable(pos, antialiased_bicubic_matrix(_side(pos), side))


def _separable(pos: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """`pos`'s square grid resampled by `weights` [side, M] along rows, then columns."""
    side, m = weights.shape
    grid = pos[0].reshape(m, m, -1).astype(np.float64)
    out = np.einsum("ij,jkd,lk->ild", weights, grid, weights)
    return out.reshape(1, side * side, -1).astype(pos.dtype)


def resample_transformers_dinov2(pos: np.ndarray, side: int) -> np.ndarray:
    """`pos` [1, M*M, D] resampled to [1, side*side, D] as Hugging Face transformers'
    `Dinov2Model` interpolates it today (`Dinov2Embeddings.interpolate_pos_encoding`:
    bicubic to the size, no antialiasing; its earlier releases used DINOv2's own rule,
    `resample_dinov2`)."""
    m = _side(pos)
    return pos if side == m else _separable(pos, bicubic_matrix(m, side))


def resample_dinov2(pos: np.ndarray, side: int, *, registers: bool) -> np.ndarray:
    """`pos` [1, M*M, D] (a square grid of patches, no class row) resampled to [1, side*side,
    D] as DINOv2 interpolates it for a side x side grid: with antialiasing to the size where
    the backbone has `registers` (timm's rule), else with the scale factor (side + 0.1) / M."""
    m = _side(pos)
    if side == m:  # DINOv2 uses its embedding as it is at its own grid
        return pos
    if registers:
        return resample_timm(pos, side)
    return _separable(pos, bicubic_matrix(m, side, scale=(side + 0.1) / m))

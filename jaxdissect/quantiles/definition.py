"""The threshold's definition (numpy's linear quantile), the value conventions, and a
plain-numpy reference of both.

Definition (the contract)
-------------------------
T_k is numpy's default quantile ``np.quantile(a_k, 1 - q)`` (method "linear", `1 - q`
passed as a Python float). For n values sorted in DESCENDING order d[0] >= d[1] >= ...:

    v = (n - 1) * (1 - q)         # float64, as numpy computes it
    g = floor(v); t = v - g       # float64
    j = n - 1 - g                 # d[j] = ascending a[g], d[j-1] = a[g+1]
    lo, hi = d[j], d[j - 1]       # float32
    diff = hi - lo                                   # float32
    T = lo + diff * f32(t)        if t < 0.5         # float32 ops throughout
    T = hi - diff * f32(1 - t)    otherwise          # (1 - t) computed in float64

which is numpy's `_lerp` with a weakly-typed Python float weight. When v >= n - 1 (only
n == 1 or q == 0) numpy uses the last element twice; so do we. Only the top
k = n - floor((n - 1)(1 - q)) values (about q*n + 1) are ever needed.
`reference_threshold` computes exactly this in plain numpy; `exact_threshold` is bitwise
equal to it, and both are bitwise equal to `np.quantile` on finite data without
subnormals (see the conventions below).

Value conventions (both modes and the reference): -0.0 and subnormals are read as +0.0
(so results depend neither on the order in which signed zeros arrive nor on whether the
platform flushes denormals, as XLA on CPU does). NaN and +-inf are counted per unit in
`nonfinite` and ranked BELOW every finite value (a row mask `valid=False` instead drops the
row from the count). A unit with nonfinite values therefore gets a threshold computed as if
they were the smallest values: callers should refuse results where `nonfinite > 0`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_Q = 0.005
_NEG_INF = float("-inf")


def _positions(n: int, q: float) -> tuple[int, int, float]:
    """Descending indices (j, j-1) and weight t of numpy's linear quantile at 1 - q."""
    if n < 1:
        raise ValueError("no values: cannot compute a quantile")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    v = (n - 1) * (1.0 - q)
    if v >= n - 1:
        # numpy clips both neighbours to the last element and uses t = v - (-1).
        return 0, 0, v + 1.0
    g = math.floor(v)
    j = n - 1 - g
    return j, j - 1, v - g


def _lerp32(lo: np.ndarray, hi: np.ndarray, t: float) -> np.ndarray:
    """numpy's `_lerp(lo, hi, t)` for float32 arrays and a Python-float t."""
    lo = np.asarray(lo, np.float32)
    hi = np.asarray(hi, np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = hi - lo
        if t < 0.5:
            return lo + diff * np.float32(t)
        return hi - diff * np.float32(1.0 - t)


def _top_count(total_count: int, q: float) -> int:
    """How many of the largest values the quantile at 1 - q can touch (j + 1)."""
    return _positions(total_count, q)[0] + 1


def reference_threshold(values: np.ndarray, q: float = DEFAULT_Q) -> np.ndarray:
    """Plain-numpy T_k for values [N, K]: the formula of the module docstring, float32."""
    v = np.asarray(values, np.float32)
    if v.ndim != 2:
        raise ValueError(f"values must be [N, K], got shape {v.shape}")
    v = np.where(np.isfinite(v), v, np.float32(_NEG_INF))
    v = _flush_zero(v)
    n = v.shape[0]
    j, jm1, t = _positions(n, q)
    # Ascending positions n-1-j and n-1-jm1 are the descending d[j] and d[j-1].
    part = np.partition(v, sorted({n - 1 - j, n - 1 - jm1}), axis=0)
    return _lerp32(part[n - 1 - j], part[n - 1 - jm1], t)


def _flush_zero(x):
    """-0.0 and subnormals -> +0.0 (works for numpy and jax arrays alike)."""
    xp = jnp if isinstance(x, jax.Array) else np
    return xp.where(xp.abs(x) < np.finfo(np.float32).tiny, xp.float32(0.0), x)

"""Raster primitives: shapes as (bbox, inside test), smooth noise and colour blending."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np

# Shapes: (bbox in [0, 1] image coordinates, inside(X, Y) -> bool); X is [1, w]
# and Y is [h, 1] (pixel centres of the bbox window), so masks broadcast.

Shape = tuple[tuple[float, float, float, float], Callable[[np.ndarray, np.ndarray], np.ndarray]]
Colour = np.ndarray | Callable[[np.ndarray, np.ndarray], np.ndarray]
TAU = 2 * math.pi


def rect(x0: float, y0: float, x1: float, y1: float) -> Shape:
    def inside(xs, ys):
        return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)

    return (x0, y0, x1, y1), inside


def rounded(x0: float, y0: float, x1: float, y1: float, r: float) -> Shape:
    cx, cy, hx, hy = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 - r, (y1 - y0) / 2 - r

    def inside(X, Y):
        dx = np.maximum(np.abs(X - cx) - hx, 0)
        dy = np.maximum(np.abs(Y - cy) - hy, 0)
        return dx * dx + dy * dy <= r * r

    return (x0, y0, x1, y1), inside


def ellipse(cx: float, cy: float, rx: float, ry: float) -> Shape:
    return (
        cx - rx,
        cy - ry,
        cx + rx,
        cy + ry,
    ), lambda X, Y: ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2 <= 1.0


def ring(cx: float, cy: float, ro: float, ri: float) -> Shape:
    def inside(X, Y):
        d = (X - cx) ** 2 + (Y - cy) ** 2
        return (d <= ro * ro) & (d >= ri * ri)

    return (cx - ro, cy - ro, cx + ro, cy + ro), inside


def capsule(xa: float, ya: float, xb: float, yb: float, r: float) -> Shape:
    dx, dy = xb - xa, yb - ya
    n2 = max(dx * dx + dy * dy, 1e-12)

    def inside(X, Y):
        t = np.clip(((X - xa) * dx + (Y - ya) * dy) / n2, 0, 1)
        return (X - xa - t * dx) ** 2 + (Y - ya - t * dy) ** 2 <= r * r

    return (min(xa, xb) - r, min(ya, yb) - r, max(xa, xb) + r, max(ya, yb) + r), inside


def polygon(points: Iterable[tuple[float, float]]) -> Shape:
    """A convex polygon, vertices in either orientation."""
    pts = [(float(x), float(y)) for x, y in points]
    edges = list(zip(pts, pts[1:] + pts[:1], strict=True))

    def inside(X, Y):
        pos = neg = True
        for (xa, ya), (xb, yb) in edges:
            c = (xb - xa) * (Y - ya) - (yb - ya) * (X - xa)
            pos = pos & (c >= 0)
            neg = neg & (c <= 0)
        return pos | neg

    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return (min(xs), min(ys), max(xs), max(ys)), inside


def masked(shape: Shape, cond: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Shape:
    bbox, inside = shape
    return bbox, lambda X, Y: inside(X, Y) & cond(X, Y)


def frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)


def hash2(i: np.ndarray, j: np.ndarray, salt: float) -> np.ndarray:
    """Deterministic pseudo-random values in [0, 1) per integer cell (i, j)."""
    return frac(np.sin(i * 12.9898 + j * 78.233 + salt) * 43758.5453)


def waves(rng: np.random.Generator, n: int, kmin: float, kmax: float) -> Callable:
    """Smooth noise: a sum of n random plane waves with spatial frequency in [kmin, kmax]."""
    k = rng.uniform(kmin, kmax, n) * TAU
    th = rng.uniform(0, TAU, n)
    ph = rng.uniform(0, TAU, n)
    kx, ky = (k * np.cos(th)).astype(np.float32), (k * np.sin(th)).astype(np.float32)
    ph = ph.astype(np.float32)
    scale = np.float32(1 / math.sqrt(n))

    def noise(X, Y):
        acc = 0.0
        for a, b, c in zip(kx, ky, ph, strict=True):
            acc = acc + np.sin(a * X + b * Y + c)
        return acc * scale

    return noise


def mix(a: np.ndarray, b: np.ndarray, w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float32)[..., None]
    return a * (1 - w) + b * w


def lit(base: np.ndarray, g: np.ndarray) -> np.ndarray:
    return base * np.asarray(g, np.float32)[..., None]

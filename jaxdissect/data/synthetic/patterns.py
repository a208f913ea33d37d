"""Texture families (striped, dotted, chequered ...) as weight maps in [0, 1]."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from jaxdissect.data.synthetic.raster import TAU, frac, waves


def pattern(family: str, rng: np.random.Generator) -> Callable:
    """Texture family -> weight(X, Y) in [0, 1] at random scale, orientation and phase."""
    th = rng.uniform(0, math.pi)
    c, s = np.float32(math.cos(th)), np.float32(math.sin(th))
    p = np.float32(rng.uniform(0.03, 0.11))
    ox, oy = (np.float32(v) for v in rng.uniform(0, 1, 2))

    def uv(X, Y):
        return (X - ox) * c + (Y - oy) * s, -(X - ox) * s + (Y - oy) * c

    f32 = np.float32
    if family == "striped":
        duty = rng.uniform(0.3, 0.6)
        return lambda X, Y: (frac(uv(X, Y)[0] / p) < duty).astype(f32)
    if family == "dotted":
        rad2 = rng.uniform(0.15, 0.3) ** 2

        def dotted(X, Y):
            u, v = uv(X, Y)
            return (((frac(u / p) - 0.5) ** 2 + (frac(v / p) - 0.5) ** 2) < rad2).astype(f32)

        return dotted
    if family == "chequered":

        def chequered(X, Y):
            u, v = uv(X, Y)
            return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(f32)

        return chequered
    if family == "zigzagged":
        amp = rng.uniform(0.5, 1.2)
        q = p * rng.uniform(1.0, 2.0)
        duty = rng.uniform(0.35, 0.55)

        def zigzag(X, Y):
            u, v = uv(X, Y)
            tri = np.abs(frac(u / q) - 0.5) * 2
            return (frac(v / p + amp * tri) < duty).astype(f32)

        return zigzag
    if family == "grid":
        lw = rng.uniform(0.1, 0.22)

        def grid(X, Y):
            u, v = uv(X, Y)
            return ((frac(u / p) < lw) | (frac(v / p) < lw)).astype(f32)

        return grid
    if family == "crosshatched":
        q = p * 0.5
        lw = rng.uniform(0.15, 0.3)

        def hatch(X, Y):
            u, v = uv(X, Y)
            a, b = (u + v) * f32(0.7071), (u - v) * f32(0.7071)
            return ((frac(a / q) < lw) | (frac(b / q) < lw)).astype(f32)

        return hatch
    if family == "banded":
        q = p * rng.uniform(2.5, 4.0)
        return lambda X, Y: (
            0.5
            + 0.5 * np.sin(uv(X, Y)[0] * (TAU / q) + 0.8 * np.sin(uv(X, Y)[0] * (TAU / (2.3 * q))))
        )
    if family == "cracked":
        k = int(np.clip(0.6 / (p * p), 10, 48))
        pts = rng.uniform(-0.1, 1.1, (k, 2)).astype(f32)
        width = f32(rng.uniform(0.004, 0.009))

        def cracked(X, Y):
            d = (X[..., None] - pts[:, 0]) ** 2 + (Y[..., None] - pts[:, 1]) ** 2
            two = np.sqrt(np.partition(d, 1, axis=-1)[..., :2])
            return ((two[..., 1] - two[..., 0]) < width).astype(f32)

        return cracked
    if family == "blotchy":
        blobs = waves(rng, 6, 0.4 / p, 0.9 / p)
        t = rng.uniform(-0.3, 0.3)
        return lambda X, Y: (blobs(X, Y) > t).astype(f32)
    if family == "honeycombed":
        size = p * 1.3
        bw = rng.uniform(0.1, 0.22)

        def honeycomb(X, Y):
            u, v = uv(X, Y)
            q = (u * f32(math.sqrt(3) / 3) - v / 3) / size
            rr = (v * f32(2 / 3)) / size
            cx, cz = q, rr
            cy = -cx - cz
            rx, ry, rz = np.round(cx), np.round(cy), np.round(cz)
            dx, dy, dz = np.abs(rx - cx), np.abs(ry - cy), np.abs(rz - cz)
            fix_x = (dx > dy) & (dx > dz)
            fix_z = ~fix_x & (dz >= dy)
            rx = np.where(fix_x, -ry - rz, rx)
            rz = np.where(fix_z, -rx - ry, rz)
            hx = size * f32(math.sqrt(3)) * (rx + rz / 2)
            hy = size * f32(1.5) * rz
            lx, ly = u - hx, v - hy
            d = np.maximum(
                np.abs(lx), np.maximum(np.abs(0.5 * lx + 0.866 * ly), np.abs(0.5 * lx - 0.866 * ly))
            )
            return (d > size * f32(0.866) * (1 - bw)).astype(f32)

        return honeycomb
    if family == "spiralled":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        arms = int(rng.integers(1, 4))

        def spiral(X, Y):
            r = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2)
            a = np.arctan2(Y - cy, X - cx)
            return (frac(r / p + arms * a / TAU) < 0.5).astype(f32)

        return spiral
    if family == "marbled":
        warp = waves(rng, 4, 1.5, 5.0)

        def marbled(X, Y):
            u, _ = uv(X, Y)
            return (np.abs(np.sin(u / p * f32(math.pi / 3) + 2.5 * warp(X, Y))) < 0.18).astype(f32)

        return marbled
    raise ValueError(f"unknown texture family {family!r}")

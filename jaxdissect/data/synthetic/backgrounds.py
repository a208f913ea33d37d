"""Backgrounds of outdoor scenes: sky, mountains, ground, skyline."""

from __future__ import annotations

import numpy as np

from jaxdissect.data.synthetic import objects
from jaxdissect.data.synthetic.painter import Painter
from jaxdissect.data.synthetic.raster import ellipse, mix, polygon, rect


def sky(pt: Painter, horizon: float) -> None:
    kind = pt.pick(("clear", "overcast", "dusk"), (6, 3, 1))
    top, bottom = {
        "clear": (pt.col("blue", 0.1), pt.col("light_blue", 0.05)),
        "overcast": (pt.col("light_grey", 0.08), pt.col("white", 0.03)),
        "dusk": (
            pt.col(pt.pick(("purple", "navy", "blue"))),
            pt.col(pt.pick(("orange", "pink", "yellow"))),
        ),
    }[kind]
    hz = max(horizon, 0.05)
    pt.paint(
        rect(0, 0, 1, horizon + 0.01),
        lambda X, Y: mix(top, bottom, np.clip(Y / hz, 0, 1) ** 0.8),
        obj="sky",
    )
    cloud = pt.col(pt.pick(("white", "light_grey")), 0.03)
    for _ in range(int(pt.rng.poisson(2.0 if kind == "clear" else 4.0))):
        cx, cy = pt.rng.uniform(0, 1), pt.rng.uniform(0.02, max(horizon - 0.05, 0.03))
        for _ in range(int(pt.rng.integers(2, 5))):
            pt.paint(
                ellipse(
                    cx + pt.rng.uniform(-0.08, 0.08),
                    cy + pt.rng.uniform(-0.02, 0.02),
                    pt.rng.uniform(0.04, 0.1),
                    pt.rng.uniform(0.02, 0.04),
                ),
                cloud,
                obj="sky",
            )


def mountains(pt: Painter, horizon: float, height: float) -> None:
    colour = pt.col(
        pt.pick(("grey", "dark_grey", "brown", "olive", "navy", "tan"), (3, 2, 2, 2, 1, 1))
    )
    x = pt.rng.uniform(-0.3, 0.1)
    while x < 1.0:
        w = pt.rng.uniform(0.35, 0.8)
        peak = horizon - height * pt.rng.uniform(0.5, 1.0)
        px = x + w * pt.rng.uniform(0.35, 0.65)
        base = horizon + 0.01
        pt.paint(
            polygon([(x, base), (px, peak), (x + w, base)]),
            pt.surface("stone", colour * np.float32(pt.rng.uniform(0.85, 1.1))),
            obj="mountain",
        )
        if pt.rng.random() < 0.4:
            t = pt.rng.uniform(0.2, 0.35)
            pt.paint(
                polygon(
                    [
                        (px - (px - x) * t, peak + (base - peak) * t),
                        (px, peak),
                        (px + (x + w - px) * t, peak + (base - peak) * t),
                    ]
                ),
                pt.col("white", 0.03),
                obj="mountain",
            )
        x += w * pt.rng.uniform(0.4, 0.8)


def ground(pt: Painter, horizon: float, kind: str, y1: float = 1.0) -> None:
    obj = {"grass": "grass", "sand": "sand", "water": "water", "sidewalk": "sidewalk"}[kind]
    mat = {"water": "water", "sidewalk": pt.pick(("stone", "tile"), (3, 1))}.get(kind)
    surf = pt.surface(mat if kind == "sidewalk" else kind)
    pt.paint(rect(0, horizon, 1, y1), surf, obj=obj, mat=mat)


def skyline(pt: Painter, horizon: float, houses: float) -> None:
    x = pt.rng.uniform(-0.15, 0.0)
    while x < 1.0:
        w = pt.rng.uniform(0.1, 0.3)
        if pt.rng.random() < houses:
            objects.house(
                pt, x + w / 2, horizon + 0.02, w / 1.4 / 1.5 * pt.rng.uniform(1.0, 1.3), w=w
            )
        else:
            objects.building(pt, x + w / 2, horizon + 0.02, w, pt.rng.uniform(0.12, horizon + 0.05))
        x += w + pt.rng.uniform(0.0, 0.06)

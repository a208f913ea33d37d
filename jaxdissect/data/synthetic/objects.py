"""Object drawers of streets, parks and shores (indoor ones: `indoor`): each paints one
object with its parts and materials.

Each draws at horizontal centre x with its base (ground contact) at yb and
u = its perspective scale (about the height of a person there).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from jaxdissect.data.synthetic.painter import BRIGHT, Painter, plastic
from jaxdissect.data.synthetic.raster import (
    TAU,
    capsule,
    ellipse,
    frac,
    masked,
    polygon,
    rect,
    ring,
    rounded,
)


def draw_sorted(items: list[tuple[float, Callable[[], None]]]) -> None:
    # Far objects (base higher in the image) first, so nearer ones occlude them.
    for _, draw in sorted(items, key=lambda t: t[0]):
        draw()


def car(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 0.45 * u
    w = h * pt.rng.uniform(2.1, 2.5)
    d = 1 if pt.rng.random() < 0.5 else -1
    body = pt.col(
        pt.pick(
            (
                "red",
                "blue",
                "white",
                "black",
                "grey",
                "light_grey",
                "yellow",
                "green",
                "orange",
                "navy",
            ),
            (5, 4, 5, 4, 4, 3, 1, 1, 0.5, 1),
        )
    )
    metal = pt.surface("metal", body)
    cab = [
        (x - d * 0.32 * w, yb - 0.58 * h),
        (x + d * 0.28 * w, yb - 0.58 * h),
        (x + d * 0.12 * w, yb - h),
        (x - d * 0.22 * w, yb - h),
    ]
    pt.paint(polygon(cab), metal, obj="car", mat="metal")
    pt.paint(
        rounded(x - w / 2, yb - 0.64 * h, x + w / 2, yb - 0.16 * h, 0.1 * h),
        metal,
        obj="car",
        mat="metal",
    )
    glass = pt.surface("glass")
    ins = 0.08 * h
    mid = x - d * 0.05 * w
    for xa, xb in ((x - d * 0.3 * w, mid - d * 0.01 * w), (mid + d * 0.01 * w, x + d * 0.25 * w)):
        lo, hi = min(xa, xb), max(xa, xb)
        win = masked(rect(lo, yb - h + ins, hi, yb - 0.6 * h), polygon(cab)[1])
        pt.paint(win, glass, obj="car", part="window", mat="glass")
    dl, dr = sorted((x - d * 0.12 * w, x + d * 0.12 * w))
    pt.paint(
        rect(dl, yb - 0.58 * h, dr, yb - 0.2 * h),
        pt.surface("metal", body * 0.85),
        obj="car",
        part="door",
        mat="metal",
    )
    kx = dr - 0.03 * w if d > 0 else dl + 0.03 * w
    pt.paint(
        rect(kx - 0.02 * w, yb - 0.48 * h, kx + 0.02 * w, yb - 0.45 * h),
        pt.col("dark_grey"),
        obj="car",
        part="door",
        part2="knob",
        mat="metal",
    )
    pt.paint(
        ellipse(x + d * 0.47 * w, yb - 0.5 * h, 0.035 * w, 0.06 * h),
        pt.col(pt.pick(("white", "yellow"))),
        obj="car",
        part="headlight",
        mat="glass",
    )
    r = 0.2 * h
    tyre = pt.col(pt.pick(("black", "dark_grey"), (3, 1)))
    for wx in (x - 0.3 * w, x + 0.3 * w):
        pt.paint(ellipse(wx, yb - r, r, r), tyre, obj="car", part="wheel")
        pt.paint(
            ellipse(wx, yb - r, 0.5 * r, 0.5 * r),
            pt.surface("metal", pt.col("light_grey")),
            obj="car",
            part="wheel",
            part2="hubcap",
            mat="metal",
        )


def bus(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 0.9 * u
    w = h * pt.rng.uniform(2.6, 3.4)
    d = 1 if pt.rng.random() < 0.5 else -1
    body = pt.col(pt.pick(("yellow", "red", "blue", "white", "green"), (3, 3, 2, 2, 1)))
    pt.paint(
        rounded(x - w / 2, yb - h, x + w / 2, yb - 0.12 * h, 0.06 * h),
        pt.surface("metal", body),
        obj="bus",
        mat="metal",
    )
    glass = pt.surface("glass")
    n = int(pt.rng.integers(4, 7))
    span = 0.8 * w
    step = span / n
    for k in range(n):
        x0 = x - span / 2 + k * step
        pt.paint(
            rect(x0 + 0.08 * step, yb - 0.88 * h, x0 + 0.92 * step, yb - 0.58 * h),
            glass,
            obj="bus",
            part="window",
            mat="glass",
        )
    dx = x + d * 0.4 * w
    pt.paint(
        rect(dx - 0.06 * w, yb - 0.9 * h, dx + 0.06 * w, yb - 0.14 * h),
        pt.surface("glass", pt.col("dark_grey")),
        obj="bus",
        part="door",
        mat="glass",
    )
    r = 0.14 * h
    for wx in (x - 0.32 * w, x + 0.28 * w):
        pt.paint(ellipse(wx, yb - r, r, r), pt.col("black"), obj="bus", part="wheel")
        pt.paint(
            ellipse(wx, yb - r, 0.5 * r, 0.5 * r),
            pt.col("light_grey"),
            obj="bus",
            part="wheel",
            part2="hubcap",
            mat="metal",
        )


def bicycle(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 0.5 * u
    r = 0.36 * h
    frame = pt.surface("metal", pt.col(pt.pick(("red", "blue", "black", "green", "white"))))
    lw = 0.035 * h
    xa, xb = x - 0.62 * h, x + 0.62 * h
    cy = yb - r
    top = yb - 0.85 * h
    for seg in (
        (xa, cy, x, cy),
        (x, cy, x - 0.15 * h, top),
        (x - 0.15 * h, top, xb - 0.15 * h, top),
        (xb - 0.15 * h, top, xb, cy),
        (xa, cy, x - 0.15 * h, top),
        (xb - 0.15 * h, top, xb - 0.05 * h, yb - h),
    ):
        pt.paint(capsule(*seg, lw), frame, obj="bicycle", mat="metal")
    for wx in (xa, xb):
        pt.paint(ring(wx, cy, r, r - 2.5 * lw), pt.col("black"), obj="bicycle", part="wheel")


def person(pt: Painter, x: float, yb: float, u: float) -> None:
    h = u * pt.rng.uniform(0.85, 1.05)
    skin_name = pt.pick(("skin_light", "skin_mid", "skin_dark"))
    skin = pt.surface("skin", pt.col(skin_name, 0.04))
    shirt_base = pt.col(pt.pick(BRIGHT + ("black", "grey", "navy", "brown")))
    shirt = pt.surface(pt.pick(("fabric", "leather"), (6, 1)), shirt_base)
    pants = pt.surface(
        "fabric", pt.col(pt.pick(("navy", "black", "dark_grey", "brown", "blue", "tan", "beige")))
    )
    stride = pt.rng.uniform(0.0, 0.08) * h
    lw = 0.055 * h
    hip = yb - 0.48 * h
    for dx in (-1, 1):
        pt.paint(
            capsule(x + dx * 0.05 * h, hip, x + dx * (0.05 * h + stride), yb - lw, lw),
            pants,
            obj="person",
            part="leg",
            mat="fabric",
        )
    pt.paint(
        rounded(x - 0.13 * h, yb - 0.81 * h, x + 0.13 * h, yb - 0.45 * h, 0.05 * h),
        shirt,
        obj="person",
        part="torso",
        mat="fabric",
    )
    bare = pt.rng.random() < 0.4
    for dx in (-1, 1):
        swing = pt.rng.uniform(-0.08, 0.12) * h
        pt.paint(
            capsule(
                x + dx * 0.14 * h,
                yb - 0.77 * h,
                x + dx * (0.19 * h) + swing,
                yb - 0.5 * h,
                0.04 * h,
            ),
            skin if bare else shirt,
            obj="person",
            part="arm",
            mat="skin" if bare else "fabric",
        )
    hy = yb - 0.9 * h
    pt.paint(ellipse(x, hy, 0.075 * h, 0.09 * h), skin, obj="person", part="head", mat="skin")
    hair = pt.col(pt.pick(("black", "dark_brown", "brown", "yellow", "grey")))
    pt.paint(
        ellipse(x, hy - 0.045 * h, 0.08 * h, 0.055 * h),
        hair,
        obj="person",
        part="head",
        part2="hair",
    )
    eye = pt.col("black")
    for dx in (-1, 1):
        pt.paint(
            ellipse(x + dx * 0.03 * h, hy + 0.005 * h, 0.012 * h, 0.012 * h),
            eye,
            obj="person",
            part="head",
            part2="eye",
        )
    pt.paint(
        ellipse(x, hy + 0.045 * h, 0.025 * h, 0.009 * h),
        pt.col("dark_red"),
        obj="person",
        part="head",
        part2="mouth",
    )


def dog(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 0.42 * u
    d = 1 if pt.rng.random() < 0.5 else -1
    fur = pt.surface(
        "fabric", pt.col(pt.pick(("brown", "tan", "black", "white", "dark_brown", "beige")))
    )
    lw = 0.06 * h
    for dx in (-0.3, -0.18, 0.2, 0.32):
        pt.paint(
            capsule(x + dx * h, yb - 0.55 * h, x + dx * h, yb - lw, lw), fur, obj="dog", part="leg"
        )
    pt.paint(
        capsule(x - d * 0.4 * h, yb - 0.62 * h, x - d * 0.62 * h, yb - 0.85 * h, 0.04 * h),
        fur,
        obj="dog",
        part="tail",
    )
    pt.paint(ellipse(x, yb - 0.6 * h, 0.45 * h, 0.18 * h), fur, obj="dog", part="torso")
    hx, hy = x + d * 0.45 * h, yb - 0.85 * h
    pt.paint(ellipse(hx, hy, 0.16 * h, 0.14 * h), fur, obj="dog", part="head")
    pt.paint(
        ellipse(hx + d * 0.06 * h, hy - 0.03 * h, 0.025 * h, 0.025 * h),
        pt.col("black"),
        obj="dog",
        part="head",
        part2="eye",
    )


def tree(pt: Painter, x: float, yb: float, u: float) -> None:
    h = u * pt.rng.uniform(1.6, 2.6)
    bark = pt.surface("wood", pt.col(pt.pick(("dark_brown", "brown", "grey"), (3, 2, 1))))
    season = pt.pick(
        ("green", "dark_green", "light_green", "olive", "orange", "yellow", "red"),
        (8, 5, 3, 2, 1, 1, 0.5),
    )
    leaves = pt.surface("foliage", pt.col(season))
    tw = h * pt.rng.uniform(0.05, 0.08)
    pt.paint(rect(x - tw, yb - 0.6 * h, x + tw, yb), bark, obj="tree", part="trunk", mat="wood")
    if pt.rng.random() < 0.3 and season in ("green", "dark_green", "olive"):
        for k in range(3):
            y0 = yb - h + k * 0.22 * h
            wk = (0.16 + 0.09 * k) * h
            pt.paint(
                polygon([(x, y0), (x + wk, y0 + 0.35 * h), (x - wk, y0 + 0.35 * h)]),
                leaves,
                obj="tree",
                part="leaves",
                mat="foliage",
            )
        return
    for _ in range(int(pt.rng.integers(3, 6))):
        cx = x + pt.rng.uniform(-0.18, 0.18) * h
        cy = yb - h * pt.rng.uniform(0.6, 0.85)
        rad = h * pt.rng.uniform(0.16, 0.26)
        pt.paint(
            ellipse(cx, cy, rad, rad * pt.rng.uniform(0.8, 1.1)),
            leaves,
            obj="tree",
            part="leaves",
            mat="foliage",
        )


def house(pt: Painter, x: float, yb: float, u: float, w: float | None = None) -> None:
    h = 1.5 * u
    w = w or h * pt.rng.uniform(1.1, 1.6)
    wall_kind = pt.pick(("brick", "wood", "painted"), (3, 2, 3))
    wall = pt.surface(wall_kind)
    roof = pt.surface(
        "tile", pt.col(pt.pick(("red", "dark_red", "brown", "dark_grey", "navy"), (3, 2, 2, 2, 1)))
    )
    ry = yb - 0.6 * h
    if pt.rng.random() < 0.5:
        cxh = x + w * pt.rng.uniform(0.15, 0.3)
        pt.paint(
            rect(cxh - 0.05 * w, yb - 1.05 * h, cxh + 0.05 * w, ry),
            pt.surface("brick"),
            obj="house",
            part="chimney",
            mat="brick",
        )
    if pt.rng.random() < 0.6:
        shape = polygon([(x - 0.58 * w, ry), (x + 0.58 * w, ry), (x, yb - h)])
    else:
        shape = polygon(
            [(x - 0.58 * w, ry), (x + 0.58 * w, ry), (x + 0.35 * w, yb - h), (x - 0.35 * w, yb - h)]
        )
    pt.paint(shape, roof, obj="house", part="roof", mat="tile")
    pt.paint(rect(x - w / 2, ry, x + w / 2, yb), wall, obj="house", mat=wall_kind)
    dx = x + w * pt.rng.uniform(-0.3, 0.3)
    dw, dh = 0.09 * w, 0.3 * h
    pt.paint(
        rect(dx - dw, yb - dh, dx + dw, yb),
        pt.surface("wood", pt.col(pt.pick(("brown", "dark_brown", "red", "white", "navy")))),
        obj="house",
        part="door",
        mat="wood",
    )
    pt.paint(
        ellipse(dx + 0.6 * dw, yb - 0.45 * dh, 0.02 * w, 0.02 * w),
        pt.col("yellow"),
        obj="house",
        part="door",
        part2="knob",
        mat="metal",
    )
    frame = pt.col(pt.pick(("white", "dark_brown", "black")))
    glass = pt.surface("glass")
    for wx in (x - 0.3 * w, x + 0.3 * w):
        if abs(wx - dx) < 0.22 * w:
            continue
        ww, wh = 0.1 * w, 0.1 * h
        wy = yb - 0.33 * h
        pt.paint(
            rect(wx - ww, wy - wh, wx + ww, wy + wh),
            frame,
            obj="house",
            part="window",
            mat="painted",
        )
        pt.paint(
            rect(wx - 0.8 * ww, wy - 0.8 * wh, wx + 0.8 * ww, wy + 0.8 * wh),
            glass,
            obj="house",
            part="window",
            mat="glass",
        )


def building(pt: Painter, x: float, yb: float, w: float, h: float) -> None:
    kind = pt.pick(("glass", "stone", "brick"), (2, 3, 1))
    facade = pt.surface(
        kind,
        pt.col(pt.pick(("grey", "light_grey", "beige", "tan", "light_blue", "dark_grey", "brown")))
        if kind != "brick"
        else None,
    )
    pt.paint(rect(x - w / 2, yb - h, x + w / 2, yb), facade, obj="building", mat=kind)
    px = w / max(int(w / 0.03), 2)
    py = px * pt.rng.uniform(1.0, 1.6)
    fill = pt.rng.uniform(0.45, 0.7)
    x0, y0 = x - w / 2, yb - h

    def grid(xs, ys):
        return (
            (frac((xs - x0) / px) > 1 - fill)
            & (frac((ys - y0) / py) > 1 - fill)
            & (ys < yb - 0.05 * h)
        )

    glass = pt.surface(
        "glass",
        pt.col(pt.pick(("light_blue", "dark_grey", "navy", "black", "yellow"), (3, 3, 2, 1, 0.5))),
    )
    pt.paint(
        masked(rect(x0 + 0.5 * px, y0 + 0.5 * py, x + w / 2 - 0.3 * px, yb), grid),
        glass,
        obj="building",
        part="window",
        mat="glass",
    )


def streetlight(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 1.6 * u
    d = 1 if pt.rng.random() < 0.5 else -1
    metal = pt.surface("metal", pt.col(pt.pick(("dark_grey", "black", "grey", "dark_green"))))
    lw = 0.018 * h
    pt.paint(capsule(x, yb, x, yb - h, lw), metal, obj="streetlight", part="pole", mat="metal")
    pt.paint(
        capsule(x, yb - h, x + d * 0.14 * h, yb - h, lw),
        metal,
        obj="streetlight",
        part="pole",
        mat="metal",
    )
    pt.paint(
        ellipse(x + d * 0.14 * h, yb - h + 0.02 * h, 0.05 * h, 0.025 * h),
        pt.col(pt.pick(("white", "yellow"))),
        obj="streetlight",
        part="lamp",
        mat="glass",
    )


def signboard(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 0.95 * u
    pt.paint(
        capsule(x, yb, x, yb - 0.7 * h, 0.015 * h),
        pt.surface("metal"),
        obj="signboard",
        part="pole",
        mat="metal",
    )
    face = pt.col(pt.pick(("red", "blue", "green", "yellow", "white"), (3, 3, 2, 2, 1)))
    border = pt.col("white")
    cy, r = yb - 0.8 * h, 0.16 * h
    kind = pt.rng.integers(3)
    if kind == 0:
        outer, inner = ellipse(x, cy, r, r), ellipse(x, cy, 0.82 * r, 0.82 * r)
    elif kind == 1:
        outer, inner = (
            rect(x - r, cy - 0.7 * r, x + r, cy + 0.7 * r),
            rect(x - 0.86 * r, cy - 0.56 * r, x + 0.86 * r, cy + 0.56 * r),
        )
    else:
        outer = polygon([(x, cy - r), (x + r, cy), (x, cy + r), (x - r, cy)])
        inner = polygon(
            [(x, cy - 0.8 * r), (x + 0.8 * r, cy), (x, cy + 0.8 * r), (x - 0.8 * r, cy)]
        )
    pt.paint(outer, border, obj="signboard", mat="metal")
    pt.paint(inner, pt.surface("metal", face), obj="signboard", mat="metal")


def fence(pt: Painter, x0: float, x1: float, yb: float, u: float) -> None:
    h = 0.45 * u
    kind = pt.pick(("wood", "metal"), (2, 1))
    colour = pt.surface(
        kind,
        pt.col(pt.pick(("white", "brown", "tan")))
        if kind == "wood"
        else pt.col(pt.pick(("dark_grey", "black", "dark_green"))),
    )
    p = max(0.08 * h, 2.5 / pt.size)
    duty = pt.rng.uniform(0.35, 0.6)

    def pickets(X, Y):
        rail = (np.abs(Y - (yb - 0.3 * h)) < 0.04 * h) | (np.abs(Y - (yb - 0.75 * h)) < 0.04 * h)
        return (frac((X - x0) / p) < duty) | rail

    pt.paint(masked(rect(x0, yb - h, x1, yb), pickets), colour, obj="fence", mat=kind)


def bench(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 0.4 * u
    w = h * pt.rng.uniform(2.2, 3.0)
    kind = pt.pick(("wood", "metal"), (3, 1))
    wood = pt.surface(kind)
    legs = pt.surface("metal", pt.col(pt.pick(("black", "dark_grey"))))
    for lx in (x - 0.4 * w, x + 0.4 * w):
        pt.paint(
            rect(lx - 0.02 * w, yb - 0.5 * h, lx + 0.02 * w, yb),
            legs,
            obj="bench",
            part="leg",
            mat="metal",
        )
    pt.paint(
        rect(x - w / 2, yb - h, x + w / 2, yb - 0.65 * h), wood, obj="bench", part="back", mat=kind
    )
    pt.paint(
        rect(x - w / 2, yb - 0.55 * h, x + w / 2, yb - 0.45 * h),
        wood,
        obj="bench",
        part="seat",
        mat=kind,
    )


def ball(pt: Painter, x: float, yb: float, u: float) -> None:
    r = 0.1 * u * pt.rng.uniform(0.7, 1.3)
    kind = pt.pick(("plastic", "leather"), (3, 1))
    base = pt.col(
        pt.pick(
            ("red", "blue", "yellow", "orange", "white", "green", "pink"), (3, 2, 2, 2, 2, 1, 1)
        )
    )
    pt.paint(ellipse(x, yb - r, r, r), lambda X, Y: plastic(base, X, Y), obj="ball", mat=kind)


def boat(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 0.5 * u
    w = h * pt.rng.uniform(1.6, 2.4)
    kind = pt.pick(("wood", "painted", "metal"), (2, 2, 1))
    hull = pt.surface(
        kind,
        pt.col(pt.pick(("white", "red", "blue", "brown", "navy", "yellow")))
        if kind != "wood"
        else None,
    )
    if pt.rng.random() < 0.6:
        pt.paint(
            capsule(x, yb - 0.3 * h, x, yb - 1.6 * h, 0.02 * h),
            pt.col("dark_brown"),
            obj="boat",
            mat="wood",
        )
        sail = pt.surface("fabric", pt.col(pt.pick(("white", "white", "red", "yellow", "blue"))))
        pt.paint(
            polygon(
                [
                    (x + 0.03 * h, yb - 1.55 * h),
                    (x + 0.03 * h, yb - 0.45 * h),
                    (x + 0.6 * w * 0.8, yb - 0.45 * h),
                ]
            ),
            sail,
            obj="boat",
            part="sail",
            mat="fabric",
        )
    pt.paint(
        polygon(
            [
                (x - w / 2, yb - 0.4 * h),
                (x + w / 2, yb - 0.4 * h),
                (x + 0.35 * w, yb),
                (x - 0.35 * w, yb),
            ]
        ),
        hull,
        obj="boat",
        part="hull",
        mat=kind,
    )


def flowers(pt: Painter, x: float, yb: float, u: float) -> None:
    petal = pt.col(
        pt.pick(("pink", "purple", "red", "yellow", "white", "lilac", "magenta", "orange"))
    )
    centre = pt.col("yellow")
    for _ in range(int(pt.rng.integers(3, 9))):
        r = 0.04 * u * pt.rng.uniform(0.7, 1.3)
        cx = x + pt.rng.uniform(-0.3, 0.3) * u
        cy = yb - pt.rng.uniform(0, 0.15) * u
        pt.paint(ellipse(cx, cy, r, r), petal, obj="flower")
        pt.paint(ellipse(cx, cy, 0.35 * r, 0.35 * r), centre, obj="flower")


def rock(pt: Painter, x: float, yb: float, u: float) -> None:
    r = 0.25 * u * pt.rng.uniform(0.5, 1.5)
    ang = np.sort(pt.rng.uniform(0, TAU, 7))
    pts = [
        (x + r * math.cos(a) * pt.rng.uniform(0.8, 1.2), yb - 0.5 * r + 0.5 * r * math.sin(a))
        for a in ang
    ]
    pt.paint(polygon(pts), pt.surface("stone"), obj="rock", mat="stone")

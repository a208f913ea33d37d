"""Indoor drawers: what hangs on a room's back wall, and its furniture.

Each draws as the object drawers do (`objects`): at horizontal centre x with its
base at yb and u = its perspective scale; `wall_item` at x on the back wall whose
floor line is at fy.
"""

from __future__ import annotations

from jaxdissect.data.synthetic.painter import Painter
from jaxdissect.data.synthetic.raster import (
    capsule,
    ellipse,
    polygon,
    rect,
    rounded,
)


def wall_item(pt: Painter, kind: str, x: float, fy: float) -> None:
    r = pt.rng
    if kind == "door":
        w, h = r.uniform(0.1, 0.16), fy * r.uniform(0.55, 0.8)
        pt.paint(
            rect(x - w / 2, fy - h, x + w / 2, fy + 0.005),
            pt.surface("wood", pt.col(pt.pick(("brown", "dark_brown", "white", "tan", "navy")))),
            obj="door",
            mat="wood",
        )
        kx = x + 0.35 * w
        pt.paint(
            ellipse(kx, fy - 0.45 * h, 0.012, 0.012),
            pt.col(pt.pick(("yellow", "light_grey"))),
            obj="door",
            part="knob",
            mat="metal",
        )
    elif kind == "painting":
        w, h = r.uniform(0.12, 0.3), r.uniform(0.1, 0.25)
        cy = fy * r.uniform(0.35, 0.55)
        pt.paint(
            rect(x - w / 2, cy - h / 2, x + w / 2, cy + h / 2),
            pt.surface("wood", pt.col(pt.pick(("dark_brown", "yellow", "black", "tan")))),
            obj="painting",
            part="frame",
            mat="wood",
        )
        pt.paint(
            rect(x - 0.42 * w, cy - 0.4 * h, x + 0.42 * w, cy + 0.4 * h),
            pt.pattern_surface(pt.pick(("blotchy", "banded", "marbled"))),
            obj="painting",
            mat="painted",
        )
    else:
        w, h = r.uniform(0.15, 0.3), r.uniform(0.15, 0.3)
        cy = fy * r.uniform(0.35, 0.5)
        frame = pt.col(pt.pick(("white", "dark_brown", "light_grey")))
        pt.paint(
            rect(x - w / 2, cy - h / 2, x + w / 2, cy + h / 2),
            frame,
            obj="windowpane",
            part="frame",
            mat="painted",
        )
        glass = pt.surface("glass", pt.col(pt.pick(("light_blue", "white", "light_grey"))))
        for gx in (-1, 1):
            for gy in (-1, 1):
                x0 = x + (0.04 * w if gx > 0 else -0.44 * w)
                y0 = cy + (0.04 * h if gy > 0 else -0.44 * h)
                pt.paint(
                    rect(x0, y0, x0 + 0.4 * w, y0 + 0.4 * h), glass, obj="windowpane", mat="glass"
                )


def sofa(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 0.45 * u
    w = h * pt.rng.uniform(2.0, 2.8)
    kind = pt.pick(("fabric", "leather"), (3, 1))
    cover = pt.surface(kind)
    pt.paint(
        rounded(x - w / 2, yb - h, x + w / 2, yb - 0.45 * h, 0.05 * h),
        cover,
        obj="sofa",
        part="back",
        mat=kind,
    )
    n = int(pt.rng.integers(2, 4))
    seat_w = 0.8 * w / n
    for k in range(n):
        x0 = x - 0.4 * w + k * seat_w
        pt.paint(
            rounded(x0 + 0.01 * w, yb - 0.5 * h, x0 + seat_w - 0.01 * w, yb - 0.1 * h, 0.04 * h),
            cover,
            obj="sofa",
            part="cushion",
            mat=kind,
        )
    for ax in (x - 0.45 * w, x + 0.45 * w):
        pt.paint(
            rounded(ax - 0.06 * w, yb - 0.7 * h, ax + 0.06 * w, yb - 0.08 * h, 0.04 * h),
            cover,
            obj="sofa",
            part="arm",
            mat=kind,
        )
    pt.paint(
        rect(x - 0.45 * w, yb - 0.1 * h, x + 0.45 * w, yb),
        pt.col("dark_brown"),
        obj="sofa",
        part="base",
        mat="wood",
    )


def bed(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 0.5 * u
    w = h * pt.rng.uniform(2.0, 2.8)
    d = 1 if pt.rng.random() < 0.5 else -1
    hx = x - d * 0.47 * w
    pt.paint(
        rect(hx - 0.04 * w, yb - h, hx + 0.04 * w, yb),
        pt.surface("wood"),
        obj="bed",
        part="headboard",
        mat="wood",
    )
    pt.paint(
        rect(x - 0.45 * w, yb - 0.5 * h, x + 0.47 * w, yb - 0.15 * h),
        pt.surface("fabric", pt.col(pt.pick(("white", "beige", "light_blue", "pink")))),
        obj="bed",
        mat="fabric",
    )
    pt.paint(
        rect(x - 0.1 * w * d, yb - 0.55 * h, x + 0.48 * w * d, yb - 0.12 * h)
        if d > 0
        else rect(x - 0.48 * w, yb - 0.55 * h, x + 0.1 * w, yb - 0.12 * h),
        pt.surface("fabric"),
        obj="bed",
        mat="fabric",
    )
    pt.paint(
        ellipse(hx + d * 0.14 * w, yb - 0.58 * h, 0.1 * w, 0.08 * h),
        pt.surface("fabric", pt.col(pt.pick(("white", "light_grey", "yellow")))),
        obj="bed",
        part="pillow",
        mat="fabric",
    )
    for lx in (x - 0.43 * w, x + 0.43 * w):
        pt.paint(
            rect(lx - 0.02 * w, yb - 0.15 * h, lx + 0.02 * w, yb),
            pt.col("dark_brown"),
            obj="bed",
            part="leg",
            mat="wood",
        )


def table(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 0.4 * u
    w = h * pt.rng.uniform(1.5, 2.5)
    kind = pt.pick(("wood", "glass", "metal"), (5, 1, 1))
    top = pt.surface(kind)
    for lx in (x - 0.42 * w, x + 0.42 * w, x - 0.3 * w, x + 0.3 * w):
        pt.paint(
            rect(
                lx - 0.025 * w,
                yb - 0.9 * h,
                lx + 0.025 * w,
                yb - (0.06 * h if abs(lx - x) < 0.35 * w else 0),
            ),
            pt.surface("wood") if kind == "wood" else pt.surface("metal"),
            obj="table",
            part="leg",
            mat="wood" if kind == "wood" else "metal",
        )
    pt.paint(
        rect(x - w / 2, yb - h, x + w / 2, yb - 0.88 * h), top, obj="table", part="top", mat=kind
    )


def chair(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 0.5 * u
    w = 0.45 * h
    d = 1 if pt.rng.random() < 0.5 else -1
    kind = pt.pick(("wood", "plastic", "metal"), (4, 2, 1))
    surf = pt.surface(kind)
    for lx in (x - 0.45 * w, x + 0.45 * w):
        pt.paint(
            rect(lx - 0.05 * w, yb - 0.5 * h, lx + 0.05 * w, yb),
            surf,
            obj="chair",
            part="leg",
            mat=kind,
        )
    bx = x - d * 0.45 * w
    pt.paint(
        rect(bx - 0.06 * w, yb - h, bx + 0.06 * w, yb - 0.5 * h),
        surf,
        obj="chair",
        part="back",
        mat=kind,
    )
    pt.paint(
        rect(x - w / 2, yb - 0.55 * h, x + w / 2, yb - 0.47 * h),
        surf,
        obj="chair",
        part="seat",
        mat=kind,
    )


def lamp(pt: Painter, x: float, yb: float, u: float) -> None:
    h = 0.7 * u
    pt.paint(
        ellipse(x, yb - 0.02 * h, 0.08 * h, 0.02 * h),
        pt.surface("metal"),
        obj="lamp",
        part="base",
        mat="metal",
    )
    pt.paint(
        capsule(x, yb - 0.03 * h, x, yb - 0.8 * h, 0.012 * h),
        pt.surface("metal"),
        obj="lamp",
        part="pole",
        mat="metal",
    )
    kind = pt.pick(("fabric", "paper"))
    shade = pt.surface(kind, pt.col(pt.pick(("white", "beige", "yellow", "red", "pink"))))
    pt.paint(
        polygon(
            [
                (x - 0.08 * h, yb - h),
                (x + 0.08 * h, yb - h),
                (x + 0.14 * h, yb - 0.75 * h),
                (x - 0.14 * h, yb - 0.75 * h),
            ]
        ),
        shade,
        obj="lamp",
        part="shade",
        mat=kind,
    )

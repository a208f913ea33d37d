"""The painter: one image's colour and label planes, its palette and material surfaces."""

from __future__ import annotations

import math
from collections.abc import Iterable
from types import MappingProxyType

import numpy as np

from jaxdissect.data.synthetic.patterns import pattern
from jaxdissect.data.synthetic.raster import TAU, Colour, Shape, frac, hash2, lit, mix, waves
from jaxdissect.data.synthetic.vocabulary import LABEL_NUMBERS

PALETTE = MappingProxyType(
    {
        "red": (0.80, 0.10, 0.10),
        "dark_red": (0.50, 0.08, 0.08),
        "orange": (0.93, 0.50, 0.10),
        "yellow": (0.95, 0.85, 0.15),
        "green": (0.20, 0.60, 0.20),
        "dark_green": (0.10, 0.33, 0.12),
        "light_green": (0.50, 0.76, 0.30),
        "olive": (0.40, 0.45, 0.18),
        "blue": (0.15, 0.30, 0.78),
        "light_blue": (0.50, 0.70, 0.92),
        "navy": (0.08, 0.12, 0.40),
        "teal": (0.10, 0.50, 0.55),
        "purple": (0.45, 0.20, 0.60),
        "lilac": (0.68, 0.45, 0.78),
        "pink": (0.96, 0.62, 0.74),
        "magenta": (0.85, 0.35, 0.60),
        "brown": (0.45, 0.28, 0.14),
        "tan": (0.70, 0.55, 0.35),
        "dark_brown": (0.28, 0.17, 0.09),
        "beige": (0.86, 0.78, 0.62),
        "white": (0.95, 0.95, 0.94),
        "light_grey": (0.76, 0.76, 0.76),
        "grey": (0.50, 0.50, 0.51),
        "dark_grey": (0.25, 0.25, 0.26),
        "black": (0.07, 0.07, 0.08),
        "skin_light": (0.96, 0.78, 0.66),
        "skin_mid": (0.80, 0.58, 0.42),
        "skin_dark": (0.42, 0.27, 0.18),
    }
)
BRIGHT = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "teal", "magenta")


class Painter:
    """Draws one image: colour, object, part (two planes) and material label maps."""

    def __init__(self, size: int, rng: np.random.Generator, annotate_materials: bool):
        self.size = size
        self.rng = rng
        self.annotate_materials = annotate_materials
        self.img = np.zeros((size, size, 3), np.float32)
        self.obj = np.zeros((size, size), np.int32)
        self.part = np.zeros((2, size, size), np.int32)
        self.mat = np.zeros((size, size), np.int32)
        self.grid = (np.arange(size, dtype=np.float32) + 0.5) / size

    # -- colours
    def col(self, name: str, jitter: float = 0.06) -> np.ndarray:
        base = np.asarray(PALETTE[name], np.float32)
        j = self.rng.uniform(1 - jitter, 1 + jitter, 3).astype(np.float32)
        return np.clip(base * j, 0, 1)

    def pick(self, names: tuple[str, ...], p: Iterable[float] | None = None) -> str:
        if p is None:
            return names[int(self.rng.integers(len(names)))]
        cum = np.cumsum(np.asarray(list(p), np.float64))
        return names[
            min(int(np.searchsorted(cum, self.rng.random() * cum[-1], "right")), len(names) - 1)
        ]

    # -- drawing
    def paint(
        self,
        shape: Shape,
        colour: Colour,
        obj: str | None = None,
        part: str | None = None,
        part2: str | None = None,
        mat: str | None = None,
    ) -> None:
        """Paints `shape`: every label plane is overwritten under it (occlusion)."""
        (x0, y0, x1, y1), inside = shape
        s = self.size
        j0, j1 = max(math.floor(x0 * s), 0), min(math.ceil(x1 * s), s)
        i0, i1 = max(math.floor(y0 * s), 0), min(math.ceil(y1 * s), s)
        if j0 >= j1 or i0 >= i1:
            return
        X, Y = self.grid[None, j0:j1], self.grid[i0:i1, None]
        h, w = i1 - i0, j1 - j0
        m = np.broadcast_to(inside(X, Y), (h, w))
        if not m.any():
            return
        rgb = colour(X, Y) if callable(colour) else np.asarray(colour, np.float32)
        win = np.s_[i0:i1, j0:j1]
        np.copyto(self.img[win], rgb, where=m[..., None])
        if not self.annotate_materials:
            mat = None
        planes = ((self.obj, obj), (self.part[0], part), (self.part[1], part2), (self.mat, mat))
        for plane, name in planes:
            np.copyto(plane[win], LABEL_NUMBERS[name] if name else 0, where=m)

    # -- surfaces: callables (X, Y) -> rgb
    def surface(self, kind: str, base: np.ndarray | None = None) -> Colour:
        """Appearance of a material (or ground) kind; `base` overrides its usual colour."""
        r = self.rng
        if base is None:
            base = self.col(
                {
                    "wood": self.pick(("brown", "tan", "dark_brown"), (3, 2, 1)),
                    "brick": self.pick(("dark_red", "brown", "red"), (3, 2, 1)),
                    "metal": self.pick(("grey", "light_grey", "dark_grey")),
                    "fabric": self.pick(BRIGHT),
                    "glass": self.pick(("light_blue", "teal", "dark_grey", "navy"), (4, 1, 2, 1)),
                    "stone": self.pick(("grey", "light_grey", "beige", "dark_grey")),
                    "tile": self.pick(("white", "beige", "light_grey", "teal", "tan")),
                    "plastic": self.pick(BRIGHT),
                    "foliage": self.pick(("green", "dark_green", "olive", "light_green")),
                    "skin": self.pick(("skin_light", "skin_mid", "skin_dark")),
                    "water": self.pick(("blue", "teal", "navy", "light_blue"), (3, 2, 1, 1)),
                    "carpet": self.pick(("red", "blue", "grey", "beige", "purple", "green")),
                    "leather": self.pick(("black", "dark_brown", "brown")),
                    "paper": self.pick(("white", "beige", "yellow")),
                    "painted": self.pick(("white", "beige", "light_grey", "yellow", "pink")),
                    "grass": self.pick(
                        ("green", "light_green", "olive", "dark_green"), (4, 2, 1, 1)
                    ),
                    "sand": self.pick(("beige", "tan", "yellow"), (4, 2, 1)),
                    "asphalt": self.pick(("dark_grey", "grey", "black"), (4, 2, 1)),
                }.get(kind, "grey")
            )
        th = r.uniform(0, math.pi)
        c, s = np.float32(math.cos(th)), np.float32(math.sin(th))
        low = waves(r, 3, 1.0, 4.0)
        if kind == "wood":
            axis = r.choice((0.0, math.pi / 2)) + r.uniform(-0.2, 0.2)
            c, s = np.float32(math.cos(axis)), np.float32(math.sin(axis))
            freq = np.float32(r.uniform(40, 110) * TAU)
            grain = waves(r, 3, 2.0, 7.0)
            return lambda X, Y: lit(
                base, 0.72 + 0.28 * np.sin((X * c + Y * s) * freq + 2.5 * grain(X, Y)) ** 2
            )
        if kind == "brick":
            bw = r.uniform(0.035, 0.07)
            bh = bw * r.uniform(0.38, 0.5)
            mortar = self.col(self.pick(("light_grey", "beige", "grey")))
            salt = r.uniform(0, 100)

            def brick(X, Y):
                row = np.floor(Y / bh)
                xo = X / bw + 0.5 * (row % 2)
                col = np.floor(xo)
                joint = (frac(Y / bh) < 0.14) | (frac(xo) < 0.07)
                tone = 0.8 + 0.35 * hash2(row, col, salt)
                return np.where(joint[..., None], mortar, lit(base, tone))

            return brick
        if kind == "metal":
            w = r.uniform(0.05, 0.2)
            off = r.uniform(0, 1)
            sheen = np.float32(r.uniform(0.2, 0.45))

            def metal(X, Y):
                t = X * c + Y * s
                band = np.exp(-(((frac(t / (4 * w) + off) - 0.5) / 0.12) ** 2))
                shade = lit(base, 0.82 + 0.18 * np.cos(t * 9.0))
                return shade + sheen * band[..., None] * (1 - shade)

            return metal
        if kind == "fabric":
            k = np.float32(r.uniform(120, 220) * TAU)
            return lambda X, Y: lit(
                base, 0.9 + 0.06 * np.sin(X * k) * np.sin(Y * k) + 0.06 * low(X, Y)
            )
        if kind == "glass":
            w = r.uniform(0.03, 0.08)
            off = r.uniform(0, 1)

            def glass(X, Y):
                t = (X - Y) / w + off
                streak = (frac(t / 3) < 0.25).astype(np.float32)
                g = lit(base, 0.85 + 0.1 * low(X, Y))
                return g + 0.35 * streak[..., None] * (1 - g)

            return glass
        if kind in ("stone", "sand", "asphalt", "carpet"):
            amp = {"stone": 0.22, "sand": 0.12, "asphalt": 0.16, "carpet": 0.25}[kind]
            mid = waves(r, 4, 6.0, 20.0)

            def speckled(X, Y):
                h, w = np.broadcast_shapes(X.shape, Y.shape)
                sp = r.random((h, w), dtype=np.float32) - 0.5
                return lit(base, 0.9 + 0.08 * mid(X, Y) + amp * sp)

            return speckled
        if kind == "tile":
            p = r.uniform(0.04, 0.1)
            grout = self.col(self.pick(("light_grey", "grey", "white")))
            salt = r.uniform(0, 100)

            def tile(X, Y):
                i, j = np.floor(Y / p), np.floor(X / p)
                joint = (frac(Y / p) < 0.08) | (frac(X / p) < 0.08)
                return np.where(joint[..., None], grout, lit(base, 0.9 + 0.15 * hash2(i, j, salt)))

            return tile
        if kind == "plastic":
            return lambda X, Y: plastic(base, X, Y)
        if kind in ("foliage", "grass"):
            if kind == "grass":
                # Short vertical blades: fine in x, stretched in y.
                blades = waves(r, 3, 40.0, 80.0)
                stretch = np.float32(0.15)
                return lambda X, Y: lit(
                    base, 0.88 + 0.07 * blades(X, Y * stretch) + 0.07 * low(X, Y)
                )
            blobs = waves(r, 5, 15.0, 40.0)
            return lambda X, Y: lit(base, 0.8 + 0.22 * np.tanh(blobs(X, Y)))
        if kind == "water":
            k = np.float32(r.uniform(60, 140) * TAU)
            wig = waves(r, 2, 2.0, 6.0)

            def water(X, Y):
                rip = np.sin(Y * k + 4 * wig(X, Y))
                g = lit(base, 0.88 + 0.1 * low(X, Y))
                return g + 0.3 * (rip > 0.93)[..., None] * (1 - g)

            return water
        if kind == "leather":
            fine = waves(r, 4, 40.0, 90.0)
            return lambda X, Y: lit(base, 0.85 + 0.1 * np.abs(fine(X, Y)) + 0.05 * low(X, Y))
        if kind == "wallpaper":
            raise ValueError("wallpaper surfaces come from `pattern_surface`")
        # painted, skin, paper and anything plain: nearly flat.
        return lambda X, Y: lit(base, 0.95 + 0.05 * low(X, Y))

    def pattern_surface(self, family: str) -> Colour:
        """A two-colour (or smooth) surface drawn with texture `family`."""
        bg_name = self.pick(tuple(PALETTE))
        fg_name = self.pick(tuple(n for n in PALETTE if n != bg_name))
        bg, fg = self.col(bg_name), self.col(fg_name)
        pat = pattern(family, self.rng)
        return lambda X, Y: mix(bg, fg, pat(X, Y))

    # -- output
    def finish(self) -> np.ndarray:
        """Applies lighting and sensor noise; returns the uint8 image."""
        r, s = self.rng, self.size
        gx, gy = r.uniform(-0.25, 0.25, 2)
        exposure = r.uniform(0.88, 1.08)
        X, Y = self.grid[None, :], self.grid[:, None]
        light = (exposure * (1 + gx * (X - 0.5) + gy * (Y - 0.5))).astype(np.float32)
        sigma = np.float32(r.uniform(0.01, 0.03))
        noise = r.standard_normal((s, s, 3), dtype=np.float32) * sigma
        img = self.img * light[..., None] + noise
        return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def plastic(base: np.ndarray, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    # A soft highlight at the upper left of the painted window: reads as a glossy curved surface.
    x0, x1, y0, y1 = X.min(), X.max(), Y.min(), Y.max()
    hx, hy = x0 + 0.35 * (x1 - x0), y0 + 0.3 * (y1 - y0)
    rad = max(x1 - x0, y1 - y0, 1e-3) * 0.35
    g = np.exp(-((X - hx) ** 2 + (Y - hy) ** 2) / (rad * rad))
    d = np.clip(
        1 - 0.35 * ((X - (x0 + x1) / 2) ** 2 + (Y - (y0 + y1) / 2) ** 2) / (rad * rad * 4), 0.6, 1
    )
    shade = lit(base, d)
    return shade + 0.45 * g[..., None] * (1 - shade)

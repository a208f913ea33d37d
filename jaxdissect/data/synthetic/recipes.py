"""Image recipes: each draws one image and returns its texture labels.

Scene recipes (street, park, bedroom ...), texture images (like DTD) and
surface images (like OpenSurfaces).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np

from jaxdissect.data.synthetic import indoor, objects
from jaxdissect.data.synthetic.backgrounds import ground, mountains, sky, skyline
from jaxdissect.data.synthetic.objects import draw_sorted
from jaxdissect.data.synthetic.painter import PALETTE, Painter
from jaxdissect.data.synthetic.patterns import pattern
from jaxdissect.data.synthetic.raster import polygon, rect
from jaxdissect.data.synthetic.vocabulary import TEXTURES

# Long-tailed scene frequencies (recipes; the label itself comes from `scene_for`).
RECIPE_P = MappingProxyType(
    {
        "street": 0.20,
        "park": 0.11,
        "forest": 0.09,
        "highway": 0.07,
        "yard": 0.07,
        "bedroom": 0.07,
        "living_room": 0.06,
        "beach": 0.05,
        "skyscraper": 0.05,
        "field": 0.04,
        "lake": 0.04,
        "mountain": 0.035,
        "dining_room": 0.03,
        "corridor": 0.025,
        "playground": 0.02,
        "harbor": 0.015,
        "desert": 0.015,
    }
)


def _zipf(n: int, s: float = 1.0) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w / w.sum()


def _depth(
    pt: Painter, horizon: float, near: float = 1.0, far: float = 0.04
) -> tuple[float, float]:
    """A random base line below the horizon, biased to far, and its perspective scale."""
    yb = horizon + far + (near - horizon - far) * pt.rng.random() ** 1.3
    return yb, 1.15 * (yb - horizon)


# ---------------------------------------------------------------------------
# Scene recipes: each draws one image and returns its texture labels.


def _recipe_street(pt: Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.3, 0.48)
    sky(pt, hz)
    skyline(pt, hz, houses=0.3)
    ground(pt, hz, "sidewalk")
    vx, tw = r.uniform(0.35, 0.65), r.uniform(0.02, 0.07)
    bl, br = r.uniform(-0.35, 0.15), r.uniform(0.85, 1.35)
    pt.paint(
        polygon([(vx - tw, hz), (vx + tw, hz), (br, 1.0), (bl, 1.0)]),
        pt.surface("asphalt"),
        obj="road",
    )

    def edges(y):
        t = (y - hz) / (1 - hz)
        return vx - tw + (bl - vx + tw) * t, vx + tw + (br - vx - tw) * t

    line = pt.col(pt.pick(("white", "yellow")))
    cb = (bl + br) / 2
    for k in range(8):
        ta, tb = (k + 0.2) / 8, (k + 0.6) / 8
        ya, yb_ = hz + ta * (1 - hz), hz + tb * (1 - hz)
        xa, xb = vx + (cb - vx) * ta, vx + (cb - vx) * tb
        wa, wb = 0.004 + 0.012 * ta, 0.004 + 0.012 * tb
        pt.paint(
            polygon([(xa - wa, ya), (xa + wa, ya), (xb + wb, yb_), (xb - wb, yb_)]),
            line,
            obj="road",
        )
    items: list[tuple[float, Callable[[], None]]] = []
    for _ in range(int(r.integers(0, 5))):
        yb, u = _depth(pt, hz)
        lo, hi = edges(yb)
        x = r.uniform(lo + 0.3 * u, hi - 0.3 * u) if hi - lo > 0.6 * u else (lo + hi) / 2
        fn = objects.bus if r.random() < 0.1 else objects.car
        items.append((yb, lambda fn=fn, x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    for _ in range(int(r.poisson(1.5))):
        yb, u = _depth(pt, hz)
        lo, hi = edges(yb)
        x = lo - 0.1 * r.random() if r.random() < 0.5 else hi + 0.1 * r.random()
        fn = objects.person if r.random() < 0.85 else objects.bicycle
        items.append((yb, lambda fn=fn, x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    for fn, rate in (
        (objects.streetlight, 0.8),
        (objects.signboard, 0.5),
        (objects.tree, 0.5),
        (objects.dog, 0.05),
    ):
        for _ in range(int(r.poisson(rate))):
            yb, u = _depth(pt, hz)
            lo, hi = edges(yb)
            x = lo - r.uniform(0.01, 0.1) if r.random() < 0.5 else hi + r.uniform(0.01, 0.1)
            items.append((yb, lambda fn=fn, x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    draw_sorted(items)
    return []


def _recipe_highway(pt: Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.35, 0.5)
    sky(pt, hz)
    if r.random() < 0.5:
        mountains(pt, hz, r.uniform(0.05, 0.15))
    ground(pt, hz, "grass")
    vx, tw = r.uniform(0.3, 0.7), r.uniform(0.03, 0.1)
    bl, br = r.uniform(-0.6, 0.0), r.uniform(1.0, 1.6)
    pt.paint(
        polygon([(vx - tw, hz), (vx + tw, hz), (br, 1.0), (bl, 1.0)]),
        pt.surface("asphalt"),
        obj="road",
    )
    items = []
    for _ in range(int(r.integers(1, 6))):
        yb, u = _depth(pt, hz)
        t = (yb - hz) / (1 - hz)
        lo, hi = vx - tw + (bl - vx + tw) * t, vx + tw + (br - vx - tw) * t
        x = r.uniform(lo + 0.3 * u, hi - 0.3 * u) if hi - lo > 0.6 * u else (lo + hi) / 2
        fn = objects.bus if r.random() < 0.15 else objects.car
        items.append((yb, lambda fn=fn, x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    for fn, rate in ((objects.tree, 1.0), (objects.signboard, 0.6), (objects.fence, 0.2)):
        for _ in range(int(r.poisson(rate))):
            yb, u = _depth(pt, hz, far=0.01)
            x = r.uniform(-0.1, 0.2) if r.random() < 0.5 else r.uniform(0.8, 1.1)
            if fn is objects.fence:
                items.append(
                    (yb, lambda x=x, yb=yb, u=u: objects.fence(pt, x - 0.3, x + 0.3, yb, u))
                )
            else:
                items.append((yb, lambda fn=fn, x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    draw_sorted(items)
    return []


def _outdoor_objects(pt: Painter, hz: float, rates: Mapping[str, float], near: float = 1.0) -> list:
    fns = {
        "tree": objects.tree,
        "person": objects.person,
        "dog": objects.dog,
        "bench": objects.bench,
        "ball": objects.ball,
        "flower": objects.flowers,
        "rock": objects.rock,
        "bicycle": objects.bicycle,
        "fence": None,
    }
    items = []
    for name, rate in rates.items():
        for _ in range(int(pt.rng.poisson(rate))):
            yb, u = _depth(pt, hz, near=near)
            x = pt.rng.uniform(-0.05, 1.05)
            if name == "fence":
                x0 = pt.rng.uniform(-0.2, 0.6)
                items.append(
                    (
                        yb,
                        lambda x0=x0, yb=yb, u=u: objects.fence(
                            pt, x0, x0 + pt.rng.uniform(0.3, 0.9), yb, u
                        ),
                    )
                )
            else:
                items.append((yb, lambda fn=fns[name], x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    return items


def _recipe_park(pt: Painter) -> list[str]:
    hz = pt.rng.uniform(0.3, 0.5)
    sky(pt, hz)
    ground(pt, hz, "grass")
    draw_sorted(
        _outdoor_objects(
            pt,
            hz,
            {
                "tree": 2.0,
                "person": 1.2,
                "bench": 0.6,
                "dog": 0.3,
                "flower": 0.8,
                "fence": 0.2,
                "bicycle": 0.1,
            },
        )
    )
    return []


def _recipe_forest(pt: Painter) -> list[str]:
    hz = pt.rng.uniform(0.2, 0.4)
    sky(pt, hz)
    ground(pt, hz, "grass")
    draw_sorted(
        _outdoor_objects(pt, hz, {"tree": 12.0, "rock": 0.5, "person": 0.15, "flower": 0.3})
    )
    return []


def _recipe_field(pt: Painter) -> list[str]:
    hz = pt.rng.uniform(0.3, 0.6)
    sky(pt, hz)
    ground(pt, hz, "grass")
    draw_sorted(_outdoor_objects(pt, hz, {"flower": 2.0, "fence": 0.4, "rock": 0.4, "person": 0.2}))
    return []


def _recipe_playground(pt: Painter) -> list[str]:
    hz = pt.rng.uniform(0.3, 0.5)
    sky(pt, hz)
    ground(pt, hz, "grass")
    items = _outdoor_objects(
        pt, hz, {"person": 2.5, "fence": 0.5, "tree": 0.6, "bench": 0.3, "dog": 0.2}
    )
    for _ in range(int(pt.rng.integers(1, 4))):
        yb, u = _depth(pt, hz)
        x = pt.rng.uniform(0.05, 0.95)
        items.append((yb, lambda x=x, yb=yb, u=u: objects.ball(pt, x, yb, u)))
    draw_sorted(items)
    return []


def _recipe_yard(pt: Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.35, 0.55)
    sky(pt, hz)
    ground(pt, hz, "grass")
    items = _outdoor_objects(
        pt,
        hz,
        {"tree": 1.0, "person": 0.5, "dog": 0.3, "fence": 0.7, "flower": 0.6, "ball": 0.1},
        near=1.0,
    )
    yb = hz + r.uniform(0.1, 0.3)
    u = 1.15 * (yb - hz)
    x = r.uniform(0.3, 0.7)
    items.append((yb, lambda: objects.house(pt, x, yb, u * r.uniform(1.0, 1.6))))
    draw_sorted(items)
    return []


def _recipe_skyscraper(pt: Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.55, 0.85)
    sky(pt, hz)
    x = r.uniform(-0.2, 0.0)
    blocks = []
    while x < 1.0:
        w = r.uniform(0.15, 0.4)
        blocks.append((x + w / 2, w, r.uniform(0.3, hz + 0.1)))
        x += w + r.uniform(-0.05, 0.05)
    for bx, w, h in blocks:
        objects.building(pt, bx, hz + 0.01, w, h)
    ground(pt, hz, "sidewalk")
    draw_sorted(_outdoor_objects(pt, hz, {"person": 1.5, "tree": 0.3, "bicycle": 0.1}))
    return []


def _recipe_beach(pt: Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.3, 0.5)
    shore = hz + r.uniform(0.1, 0.3)
    sky(pt, hz)
    ground(pt, hz, "water", y1=shore + 0.01)
    pt.paint(rect(0, shore, 1, 1), pt.surface("sand"), obj="sand")
    items = _outdoor_objects(
        pt, shore - 0.08, {"person": 1.5, "ball": 0.6, "rock": 0.3, "dog": 0.1}
    )
    for _ in range(int(r.poisson(0.8))):
        yb = r.uniform(hz + 0.02, shore)
        u = 1.15 * (yb - hz)
        x = r.uniform(0.0, 1.0)
        items.append((yb, lambda x=x, yb=yb, u=u: objects.boat(pt, x, yb, u)))
    draw_sorted(items)
    return []


def _recipe_lake(pt: Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.3, 0.5)
    sky(pt, hz)
    if r.random() < 0.7:
        mountains(pt, hz, r.uniform(0.1, 0.25))
    ground(pt, hz, "water")
    items = []
    shore = hz + 0.02
    for _ in range(int(r.poisson(3.0))):
        x = r.uniform(-0.05, 1.05)
        items.append((hz, lambda x=x: objects.tree(pt, x, shore, 0.04 + 0.04 * r.random())))
    for _ in range(int(r.poisson(1.0))):
        yb, u = _depth(pt, hz)
        x = r.uniform(0.0, 1.0)
        items.append((yb, lambda x=x, yb=yb, u=u: objects.boat(pt, x, yb, u)))
    draw_sorted(items)
    return []


def _recipe_harbor(pt: Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.35, 0.55)
    sky(pt, hz)
    skyline(pt, hz, houses=0.4)
    ground(pt, hz + 0.01, "water")
    items = []
    for _ in range(int(r.integers(2, 6))):
        yb, u = _depth(pt, hz)
        x = r.uniform(0.0, 1.0)
        items.append((yb, lambda x=x, yb=yb, u=u: objects.boat(pt, x, yb, u)))
    draw_sorted(items)
    return []


def _recipe_mountain(pt: Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.45, 0.7)
    sky(pt, hz)
    mountains(pt, hz, r.uniform(0.25, 0.45))
    ground(pt, hz, "grass")
    draw_sorted(_outdoor_objects(pt, hz, {"rock": 1.5, "tree": 0.8, "person": 0.2, "fence": 0.2}))
    return []


def _recipe_desert(pt: Painter) -> list[str]:
    r = pt.rng
    hz = r.uniform(0.35, 0.6)
    sky(pt, hz)
    if r.random() < 0.6:
        mountains(pt, hz, r.uniform(0.05, 0.15))
    ground(pt, hz, "sand")
    draw_sorted(_outdoor_objects(pt, hz, {"rock": 2.0, "person": 0.2}))
    return []


def _indoor(
    pt: Painter, furniture: Mapping[str, float], wall_items: Mapping[str, float]
) -> list[str]:
    r = pt.rng
    fy = r.uniform(0.5, 0.72)
    textures: list[str] = []
    if r.random() < 0.7:
        fam = TEXTURES[int(r.choice(len(TEXTURES), p=_zipf(len(TEXTURES), 0.8)))]
        textures.append(fam)
        pt.paint(rect(0, 0, 1, fy), pt.pattern_surface(fam), obj="wall", mat="wallpaper")
    else:
        pt.paint(rect(0, 0, 1, fy), pt.surface("painted"), obj="wall", mat="painted")
    if r.random() < 0.4:
        pt.paint(
            rect(0, 0, 1, r.uniform(0.04, 0.12)),
            pt.surface("painted", pt.col("white", 0.03)),
            obj="ceiling",
            mat="painted",
        )
    floor_kind = pt.pick(("wood", "tile", "carpet"), (4, 2, 2))
    pt.paint(rect(0, fy, 1, 1), pt.surface(floor_kind), obj="floor", mat=floor_kind)
    for kind, rate in wall_items.items():
        for _ in range(int(r.poisson(rate))):
            indoor.wall_item(pt, kind, r.uniform(0.05, 0.95), fy)
    fns = {
        "sofa": indoor.sofa,
        "bed": indoor.bed,
        "table": indoor.table,
        "chair": indoor.chair,
        "lamp": indoor.lamp,
        "person": objects.person,
        "dog": objects.dog,
    }
    items = []
    for name, rate in furniture.items():
        n = int(r.poisson(rate)) if rate < 1 or name in ("chair", "person") else int(rate)
        for _ in range(n):
            yb = fy + (1 - fy) * r.uniform(0.15, 0.95)
            u = 0.7 + 1.2 * (yb - fy) / (1 - fy)
            u *= 0.55
            x = r.uniform(0.1, 0.9)
            items.append((yb, lambda fn=fns[name], x=x, yb=yb, u=u: fn(pt, x, yb, u)))
    draw_sorted(items)
    return textures


def _recipe_bedroom(pt: Painter) -> list[str]:
    return _indoor(
        pt,
        {"bed": 1, "lamp": 0.6, "person": 0.1, "chair": 0.2},
        {"windowpane": 0.6, "painting": 0.7, "door": 0.3},
    )


def _recipe_living_room(pt: Painter) -> list[str]:
    return _indoor(
        pt,
        {"sofa": 1, "table": 0.6, "lamp": 0.6, "person": 0.3, "dog": 0.1, "chair": 0.3},
        {"windowpane": 0.7, "painting": 0.9, "door": 0.2},
    )


def _recipe_dining_room(pt: Painter) -> list[str]:
    return _indoor(
        pt,
        {"table": 1, "chair": 2.5, "lamp": 0.3, "person": 0.3},
        {"windowpane": 0.6, "painting": 0.8, "door": 0.2},
    )


def _recipe_corridor(pt: Painter) -> list[str]:
    return _indoor(pt, {"person": 0.4, "lamp": 0.1}, {"door": 2.5, "painting": 0.5})


RECIPES = MappingProxyType(
    {
        "street": _recipe_street,
        "park": _recipe_park,
        "forest": _recipe_forest,
        "highway": _recipe_highway,
        "yard": _recipe_yard,
        "bedroom": _recipe_bedroom,
        "living_room": _recipe_living_room,
        "beach": _recipe_beach,
        "skyscraper": _recipe_skyscraper,
        "field": _recipe_field,
        "lake": _recipe_lake,
        "mountain": _recipe_mountain,
        "dining_room": _recipe_dining_room,
        "corridor": _recipe_corridor,
        "playground": _recipe_playground,
        "harbor": _recipe_harbor,
        "desert": _recipe_desert,
    }
)


def texture_image(pt: Painter) -> list[str]:
    r = pt.rng
    p = _zipf(len(TEXTURES), 0.8)
    first = int(r.choice(len(TEXTURES), p=p))
    families = [TEXTURES[first]]
    pt.paint(rect(0, 0, 1, 1), pt.pattern_surface(families[0]))
    if r.random() < 0.15:
        # A second pattern over the first, like DTD images with two texture labels.
        second = TEXTURES[int(r.choice([i for i in range(len(TEXTURES)) if i != first]))]
        pat = pattern(second, r)
        fg = pt.col(pt.pick(tuple(PALETTE)))
        pt.paint(((0, 0, 1, 1), lambda X, Y: pat(X, Y) > 0.5), fg)
        families.append(second)
    return families


def surface_image(pt: Painter) -> list[str]:
    r = pt.rng
    kinds = (
        "wood",
        "fabric",
        "brick",
        "stone",
        "metal",
        "tile",
        "glass",
        "carpet",
        "painted",
        "leather",
        "foliage",
        "plastic",
        "paper",
        "skin",
        "water",
    )
    p = _zipf(len(kinds), 0.7)
    k = int(r.integers(2, 5))
    pts = r.uniform(0, 1, (k, 2)).astype(np.float32)
    g = pt.grid
    region = np.argmin(
        (g[None, :, None] - pts[:, 0]) ** 2 + (g[:, None, None] - pts[:, 1]) ** 2, axis=-1
    )
    for i in range(k):
        kind = kinds[int(r.choice(len(kinds), p=p))]
        pt.paint(((0, 0, 1, 1), lambda X, Y, i=i: region == i), pt.surface(kind), mat=kind)
    return []

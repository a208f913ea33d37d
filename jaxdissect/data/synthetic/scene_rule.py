"""The scene label of an image, a function of the objects it shows."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from jaxdissect.data.synthetic.vocabulary import LABEL_NUMBERS, OBJECTS


def scene_for(object_areas: Mapping[str, float]) -> str:
    """The scene label of an image, from the fraction of the image each visible object covers.

    Indoor scenes are told apart by their furniture, outdoor ones by water,
    roads, buildings, sand, mountains, trees and balls, in this order.
    """

    def has(name: str, above: float = 0.0) -> bool:
        return object_areas.get(name, 0.0) > above

    if has("floor"):
        if has("bed"):
            return "bedroom-s"
        if has("sofa"):
            return "living_room-s"
        if has("table"):
            return "dining_room-s"
        return "corridor-s"
    if has("water"):
        if has("boat") and (has("building") or has("house")):
            return "harbor-s"
        return "beach-s" if has("sand") else "lake-s"
    if has("road"):
        return "street-s" if has("sidewalk") else "highway-s"
    if has("building"):
        return "skyscraper-s"
    if has("house"):
        return "yard-s"
    if has("sand"):
        return "desert-s"
    if has("mountain", 0.12):
        return "mountain-s"
    if has("tree", 0.3):
        return "forest-s"
    if has("ball"):
        return "playground-s"
    if has("tree"):
        return "park-s"
    return "field-s"


def object_areas(object_plane: np.ndarray) -> dict[str, float]:
    """Fraction of the plane each object label covers (the input of `scene_for`)."""
    counts = np.bincount(np.asarray(object_plane).ravel())
    out = {}
    for name in OBJECTS:
        n = LABEL_NUMBERS[name]
        if n < len(counts) and counts[n]:
            out[name] = counts[n] / object_plane.size
    return out


def defining_objects(
    max_objects: int = 3, areas: tuple[float, ...] = (0.2, 0.5)
) -> dict[str, set[str]]:
    """Per scene, the objects of `scene_for`'s minimal sets for it: sets of up to
    `max_objects` objects (each covering one of `areas`) that give the scene and lose it
    when any one object is removed (`field-s`, the scene of no object, gets none)."""
    import itertools

    out: dict[str, set[str]] = {}
    for area in areas:
        for size in range(max_objects + 1):
            for objs in itertools.combinations(OBJECTS, size):
                scene = scene_for(dict.fromkeys(objs, area))
                if all(scene_for(dict.fromkeys(set(objs) - {o}, area)) != scene for o in objs):
                    out.setdefault(scene, set()).update(objs)
    return out

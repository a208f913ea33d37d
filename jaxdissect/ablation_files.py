"""An ablation study's outputs: its units joined with their dissection labels, the
classes' curves, ablation.json / ablation_units.csv / ablation_classes.csv / ablation.png,
and the finding (`jaxdissect.ablation` computes the study)."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxdissect import store
from jaxdissect.ablation import AblationResult
from jaxdissect.evaluate import class_accuracy


def unit_labels(layer_record: Mapping[str, Any] | None, num_units: int) -> list[dict[str, Any]]:
    """Per unit {name, category, iou, interpretable} from a results.json layer record."""
    if layer_record is None:
        return [{"name": None, "category": None, "iou": 0.0, "interpretable": False}] * num_units
    units = layer_record["units"]
    if len(units) != num_units:
        raise ValueError(
            f"the dissection of {layer_record['layer']} has {len(units)} units, the ablated "
            f"layer {num_units}: dissect the same weights and layer"
        )
    keys = ("name", "category", "iou", "interpretable")
    return [{k: u.get(k) for k in keys} for u in units]


def joined(
    result: AblationResult,
    class_names: Sequence[str],
    labels: Sequence[Mapping[str, Any]],
    *,
    top_units: int = 8,
    top_classes: int = 3,
) -> dict[str, Any]:
    """The JSON document: per unit its label and the classes it matters most for; per class
    its most important units with their labels and its accuracy against N units removed."""
    drop = result.drop
    base = class_accuracy(result.base, result.total)
    units = []
    for k in range(drop.shape[0]):
        d = np.nan_to_num(drop[k], nan=-np.inf)
        most = np.argsort(-d, kind="stable")[:top_classes]
        units.append(
            {
                "unit": k,
                **dict(labels[k]),
                "mean_drop": float(np.nanmean(drop[k])) if np.isfinite(drop[k]).any() else None,
                "classes": [
                    {"class": class_names[c], "drop": float(drop[k, c])}
                    for c in most
                    if np.isfinite(drop[k, c])
                ],
            }
        )
    classes = []
    for c, name in enumerate(class_names):
        own, rest = result.curve(c)
        if result.total[c] == 0:  # no images: no ranking, so no units removed for it
            own, rest = np.full_like(own, np.nan), np.r_[rest[:1], np.full(len(rest) - 1, np.nan)]
        classes.append(
            {
                "class": name,
                "examples": int(result.total[c]),
                "accuracy": None if np.isnan(base[c]) else float(base[c]),
                "units": [
                    {"unit": int(k), "drop": float(drop[k, c]), **dict(labels[k])}
                    for k in (result.order[c, :top_units] if result.total[c] else ())
                ],
                "curve": {
                    "n": [0, *result.ns],
                    "class_accuracy": [_num(v) for v in own],
                    "others_accuracy": [_num(v) for v in rest],
                },
            }
        )
    return {"value": result.value, "units": units, "classes": classes}


def _num(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def mean_curves(result: AblationResult) -> tuple[np.ndarray, np.ndarray]:
    """Over the classes with examples: mean (class accuracy, others' mean) at N = 0, ns."""
    rows = [result.curve(c) for c in range(len(result.total)) if result.total[c] > 0]
    own = np.mean([r[0] for r in rows], axis=0)
    rest = np.mean([r[1] for r in rows], axis=0)
    return own, rest


def write_ablation_files(
    out: pathlib.Path,
    result: AblationResult,
    class_names: Sequence[str],
    labels: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    *,
    measure: str = "accuracy",
) -> dict[str, Any]:
    """ablation.json, ablation_units.csv, ablation_classes.csv and ablation.png (its axis
    and title name `measure`, e.g. agreement with the intact network); the document."""
    import csv

    from jaxdissect.report import plots

    doc = joined(result, class_names, labels)
    own, rest = mean_curves(result)
    document = {
        "settings": dict(settings),
        "classes_mean_curve": {
            "n": [0, *result.ns],
            "class_accuracy": [_num(v) for v in own],
            "others_accuracy": [_num(v) for v in rest],
        },
        **dict(extra or {}),
        **doc,
    }
    store.write_json(out / "ablation.json", document)
    with store.atomic_open(out / "ablation_units.csv", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            ["unit", "label", "category", "iou", "interpretable", "mean_drop"]
            + [f"drop_{c}" for c in class_names]
        )
        for k, u in enumerate(doc["units"]):
            w.writerow(
                [
                    k,
                    u["name"] or "",
                    u["category"] or "",
                    f"{u['iou']:.4f}",
                    int(bool(u["interpretable"])),
                    u["mean_drop"],
                ]
                + ["" if np.isnan(v) else f"{v:.6f}" for v in result.drop[k]]
            )
    with store.atomic_open(out / "ablation_classes.csv", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "n_removed", "class_accuracy", "others_accuracy", "removed_units"])
        for c, entry in enumerate(doc["classes"]):
            curve = entry["curve"]
            for i, n in enumerate(curve["n"]):
                if n and not entry["examples"]:
                    continue  # a class without images has no units to remove
                removed = " ".join(str(int(k)) for k in result.order[c, :n])
                w.writerow(
                    [
                        entry["class"],
                        n,
                        curve["class_accuracy"][i],
                        curve["others_accuracy"][i],
                        removed,
                    ]
                )
    plots.plot_ablation_curves(
        out / "ablation.png",
        [0, *result.ns],
        {
            e["class"]: (e["curve"]["class_accuracy"], e["curve"]["others_accuracy"])
            for e in doc["classes"]
            if e["examples"]  # as mean_curves: the classes with images
        },
        title=f"{settings.get('layer', '')}: each class's top N units ({result.value}) removed",
        ylabel=measure,
    )
    return document


def finding(
    result: AblationResult,
    class_names: Sequence[str],
    labels: Sequence[Mapping[str, Any]],
    *,
    defining: Mapping[str, set[str]] | None = None,
    top: int = 4,
) -> dict[str, Any]:
    """What the study shows, in numbers: the mean drop of the class and of the others at each
    N; with `defining` ({class: concept names}), the share of each class's top units labelled
    with one of its defining concepts against the share of all the layer's units."""
    mine, rest = mean_curves(result)
    out: dict[str, Any] = {
        "n": [0, *result.ns],
        "class_drop": (mine[0] - mine).tolist(),
        "others_drop": (rest[0] - rest).tolist(),
    }
    if defining is not None:
        names = [u.get("name") if u.get("interpretable") else None for u in labels]
        hits, chance, per_class = [], [], {}
        own, own_chance = [], []  # units labelled with the class's own scene
        for c, cls in enumerate(class_names):
            want = set(defining.get(cls, ()))
            if not want or result.total[c] == 0:
                continue
            units = [int(k) for k in result.order[c, :top]]
            got = [names[k] for k in units]
            hit = sum(n in want for n in got) / len(units)
            base = sum(n in want for n in names) / len(names)
            hits.append(hit)
            chance.append(base)
            own.append(sum(n == cls for n in got) / len(units))
            own_chance.append(sum(n == cls for n in names) / len(names))
            per_class[cls] = {
                "defining": sorted(want),
                "top_units": units,
                "labels": got,
                "share_defining": hit,
                "layer_share_defining": base,
            }
        out["top"] = top
        out["share_top_units_defining"] = float(np.mean(hits)) if hits else None
        out["share_layer_units_defining"] = float(np.mean(chance)) if chance else None
        out["share_top_units_the_class"] = float(np.mean(own)) if own else None
        out["share_layer_units_the_class"] = float(np.mean(own_chance)) if own_chance else None
        out["per_class"] = per_class
    return out

"""The report of a dissection from its results: unit strips, cards and pages.

A unit that cannot fire (no active pixel over the probe set, or dead) gets no strip: its
top images would be arbitrary and dimmed all over. Strips dim with the run's tie rule
(`jaxdissect.tie_rule`), so they show the mask the tally counted.
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from jaxdissect import results, store, ties
from jaxdissect.report import html as report_html
from jaxdissect.report import strips as report_strips


def unit_cards(
    result: results.LayerResult, strip_paths: Mapping[int, str], runners_up: int
) -> tuple[report_html.UnitCard, ...]:
    """A card per unit: its label (none for units without one), state and runners-up."""
    labels = result.labels
    test = result.significance
    cards = []
    for k in range(result.num_units):
        best = int(result.best_label[k])
        others = []
        if best >= 0:
            order = np.argsort(-result.category_iou[k], kind="stable")
            others = [
                (
                    labels.names[int(result.category_label[k, c])],
                    labels.categories[result.categories[c]],
                    float(result.category_iou[k, c]),
                )
                for c in order
                if int(result.category_label[k, c]) not in (-1, best)
            ][:runners_up]
        cards.append(
            report_html.UnitCard(
                unit=k,
                label=labels.names[best] if best >= 0 else "",
                category=labels.categories[int(result.best_category[k])] if best >= 0 else "",
                iou=float(result.best_iou[k]),
                runners_up=tuple(others),
                strip=strip_paths.get(k),
                state=_state_text(result, k),
                p=None if test is None else float(test.p[k]),
                significant=None if test is None else bool(test.significant[k]),
            )
        )
    return tuple(cards)


def _state_text(result: results.LayerResult, k: int) -> str:
    """What the card says about a unit's state ("" for an ordinary unit)."""
    state = str(result.state[k])
    if state not in (ties.SATURATED, ties.TIED):
        return state
    if int(result.counts["unit_total"][k]) == 0:
        return f"{state}, {results.NO_ACTIVE_PIXELS}"
    if result.ties is not None:
        return f"{state}: {100 * result.ties.tie_fraction[k]:.2g}% of activations at T"
    return state


def write_dissection_report(
    out: pathlib.Path,
    model_name: str,
    dataset_name: str,
    run_settings: Mapping[str, Any],
    layer_results: Sequence[results.LayerResult],
    thresholds: Mapping[str, np.ndarray],
    top_indices: Mapping[str, np.ndarray],
    maps: Mapping[str, np.ndarray],
    source: Any,
    *,
    tie_rule: str,
    strip_height: int = 112,
    runners_up: int = 3,
) -> pathlib.Path:
    """Strips of every unit that can fire, then the HTML pages; returns index.html's path.

    Per layer, keyed by its module path (`LayerResult.path`): `thresholds` [K],
    `top_indices` [T, K] (-1: empty slot) and the units' maps on their top images
    `maps` [T, h, w, K]. Files are named after the layers' names (`LayerResult.layer`).
    """

    @functools.lru_cache(maxsize=4096)
    def thumb(index: int) -> np.ndarray:
        image = Image.fromarray(np.asarray(source.read_image(index), np.uint8))
        w = max(1, round(image.width * strip_height / image.height))
        return np.asarray(image.resize((w, strip_height), Image.BILINEAR))

    def write_strip(r: results.LayerResult, k: int, path: pathlib.Path) -> None:
        idx = top_indices[r.path][:, k]
        filled = idx >= 0
        images = np.stack([thumb(int(i)) if i >= 0 else thumb(int(idx[0])) for i in idx])
        unit_maps = report_strips.upsample_maps(maps[r.path][:, :, :, k], images.shape[1:3])
        strip = report_strips.unit_strip(
            images, unit_maps, float(thresholds[r.path][k]), valid=filled, tie_rule=tie_rule
        )
        save_jpeg(path, strip)

    pages = []
    stems = results.layer_file_stems([r.layer for r in layer_results])
    for r, stem in zip(layer_results, stems, strict=True):
        strip_dir = out / "strips" / stem
        shown = (top_indices[r.path] >= 0).any(0) & ~np.asarray(r.cannot_fire, bool)
        files = {int(k): strip_dir / f"unit{k:04d}.jpg" for k in np.flatnonzero(shown)}
        # In threads: resizing, masking and JPEG encoding release the GIL.
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for done in [pool.submit(write_strip, r, k, p) for k, p in files.items()]:
                done.result()
        strip_paths = {k: str(p.relative_to(out)) for k, p in files.items()}
        summary = results.layer_summary(r)
        pages.append(
            report_html.LayerPage(
                layer=r.layer,
                num_units=r.num_units,
                iou_threshold=r.iou_threshold,
                interpretable_units=summary.interpretable_units,
                unique_detectors=dict(summary.unique_by_category),
                detectors_per_concept=[(c.name, c.category, c.units) for c in summary.concepts],
                units=unit_cards(r, strip_paths, runners_up),
                downloads=(("tally.csv", results.tally_csv_name(stem)),),
                path=r.path,
                cannot_fire=summary.cannot_fire,
                states={name: n for name, n in summary.states.items() if n},
                significance=None
                if r.significance is None
                else (
                    int(r.significance.significant.sum()),
                    r.significance.alpha,
                    r.significance.draws,
                ),
            )
        )
    run = report_html.RunInfo(
        title=f"Network Dissection of {model_name}",
        model=model_name,
        dataset=dataset_name,
        settings={k: v for k, v in run_settings.items() if k != "thresholds"},
    )
    return report_html.write_report(out, run, pages)


def save_jpeg(path: pathlib.Path, array: np.ndarray) -> None:
    """Save a uint8 [H, W, 3] array as a JPEG (quality 88), atomically."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=88)
    store.write_bytes(path, buf.getvalue())

"""The report of a dissection from its results: unit strips, cards and pages.

A strip shows only the top images where the unit fires, those whose map maximum passes
the unit's threshold by the run's tie rule (`drawn_ranks`): a ReLU unit tied at T = 0 that
fires in one image shows that one image, not nine more wholly dimmed ones. A unit that
cannot fire (no active pixel over the probe set, or dead) gets no strip. Strips dim with
the same tie rule (`jaxdissect.tie_rule`) and at the label resolution, so they show the
mask the tally counted (`shown_at` the strip's size).
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from jaxdissect import masks as masks_lib
from jaxdissect import outdir, results, significance, store, ties
from jaxdissect.report import html as report_html
from jaxdissect.report import strips as report_strips
from jaxdissect.tie_rule import active

# Units whose strip masks are computed at once (one compiled program a layer).
_MASK_BLOCK = 64


def unit_cards(
    result: results.LayerResult, strip_paths: Mapping[int, str], runners_up: int
) -> tuple[report_html.UnitCard, ...]:
    """A card per unit: its label (none for units without one), state and runners-up (the
    best label of each other category with IoU > 0, highest first; results.json keeps no
    other label of the unit's own category)."""
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
        return f"{state}: {100 * result.ties.tie_fraction[k]:.4g}% of activations at T"
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
    def thumb(index: int) -> tuple[np.ndarray, np.ndarray]:
        """A top image at the strips' height, and its dimmed copy."""
        image = Image.fromarray(np.asarray(source.read_image(index), np.uint8))
        w = max(1, round(image.width * strip_height / image.height))
        small = np.asarray(image.resize((w, strip_height), Image.BILINEAR))
        return small, report_strips.dimmed(small)

    def write_block(
        r: results.LayerResult,
        drawn: np.ndarray,
        units: np.ndarray,
        block: int,
        files: Mapping[int, pathlib.Path],
    ) -> None:
        """The strips of `units` (at most `block`): their masks computed at once, then JPEGs.

        drawn: bool [T, K], `drawn_ranks` of the layer; each unit has a drawn slot. Of
        those, a slot whose mask (the tally's, at the label resolution) has no pixel is left
        out too (a raw peak just above T can upsample to nothing), unless that leaves none."""
        idx = top_indices[r.path][:, units]  # [T, n]; -1: an empty slot
        keep = drawn[:, units]
        size = thumb(int(idx[keep[:, 0], 0][0]))[0].shape[:2]
        seg_size = tuple(source.seg_size)  # where the tally counted the units' masks
        seg = strip_masks(maps[r.path], thresholds[r.path], units, seg_size, tie_rule, block)
        on = shown_at(seg, size)
        for j, k in enumerate(units.tolist()):
            ok = keep[:, j] & seg[j].reshape(len(seg[j]), -1).any(1)
            ok = ok if ok.any() else keep[:, j]
            first = int(idx[ok, j][0])
            top = [thumb(int(i) if o else first) for i, o in zip(idx[:, j], ok, strict=True)]
            images, dims = (np.stack([t[c] for t in top]) for c in (0, 1))
            tiles = report_strips.dim_outside(images, on[j], dims)
            strip = report_strips.tile_strip(tiles, valid=ok)
            save_jpeg(files[k], strip)

    threads = os.cpu_count() or 1  # thumbnails, tiles and JPEG encoding release the GIL
    pages = []
    stems = results.layer_file_stems([r.layer for r in layer_results])
    for r, stem in zip(layer_results, stems, strict=True):
        strip_dir = out / report_html.STRIPS_DIR / stem
        # Only this report's strips: one a killed run left (no results.json names it for a
        # rerun to remove) would show beside them where strips are found by name (ablation.html).
        outdir.remove_path(strip_dir)
        drawn = drawn_ranks(top_indices[r.path], maps[r.path], thresholds[r.path], tie_rule)
        shown = drawn.any(0) & ~np.asarray(r.cannot_fire, bool)
        files = {int(k): strip_dir / f"unit{k:04d}.jpg" for k in np.flatnonzero(shown)}
        units = np.fromiter(files, np.int64, len(files))
        # One compiled program a layer: blocks of one size, at least one a thread.
        block = max(1, min(_MASK_BLOCK, -(-len(units) // threads)))
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            done = [
                pool.submit(write_block, r, drawn, units[i : i + block], block, files)
                for i in range(0, len(units), block)
            ]
            for d in done:
                d.result()
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
                    int((r.interpretable & r.significance.significant).sum()),
                    r.significance.alpha,
                    r.significance.draws,
                    significance.FDR_NAMES[r.significance.procedure],
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


def drawn_ranks(
    top_indices: np.ndarray, maps: np.ndarray, thresholds: np.ndarray, tie_rule: str
) -> np.ndarray:
    """bool [T, K]: the top-image slots a unit's strip draws: filled (index >= 0) and with
    the unit's map maximum on the image passing its threshold by `tie_rule`, i.e. the top
    images where the unit fires. top_indices [T, K]; maps [T, h, w, K]; thresholds [K]."""
    peak = np.asarray(maps, np.float32).max(axis=(1, 2))
    return (np.asarray(top_indices) >= 0) & active(
        peak, np.asarray(thresholds, np.float32), tie_rule
    )


def strip_masks(
    maps: np.ndarray,
    thresholds: np.ndarray,
    units: np.ndarray,
    size: tuple[int, int],
    tie_rule: str,
    block: int | None = None,
) -> np.ndarray:
    """bool [n, T, H, W]: the masks of the n `units` on their top images at the strips' size.

    maps: [T, h, w, K], every unit's maps on its top images; thresholds [K]. The masks are
    `masks.unit_masks`, the tally's own upsampling and comparison: at the label resolution a
    strip shows the pixels the tally counted. The units are padded to `block` (default n),
    so that blocks of one size share one program.
    """
    n = len(units)
    pad = (block or n) - n
    if pad < 0:
        raise ValueError(f"block={block} is less than the {n} units given")
    unit_maps = np.pad(np.asarray(maps[..., units], np.float32), ((0, 0),) * 3 + ((0, pad),))
    unit_thresholds = np.pad(np.asarray(thresholds[units], np.float32), (0, pad))
    on = _unit_masks(unit_maps, unit_thresholds, size=tuple(size), tie_rule=tie_rule)
    return np.ascontiguousarray(np.moveaxis(np.asarray(on), -1, 0)[:n])


_unit_masks = jax.jit(masks_lib.unit_masks, static_argnames=("size", "tie_rule"))


def shown_at(masks: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool [..., H, W] of bool [..., h, w] masks: a pixel of the larger grid is on where the
    mask pixel under it is, one of the smaller where any mask pixel under it is (a pixel the
    tally counted never vanishes from a smaller strip); the identity where sizes agree."""
    for axis, n in ((-2, size[0]), (-1, size[1])):
        m = masks.shape[axis]
        if n > m:  # every pixel of the larger grid lies over one mask pixel
            masks = masks.take(np.arange(n) * m // n, axis=axis)
        elif n < m:
            masks = np.logical_or.reduceat(masks, np.arange(n) * m // n, axis=axis)
    return masks


def save_jpeg(path: pathlib.Path, array: np.ndarray) -> None:
    """Save a uint8 [H, W, 3] array as a JPEG (quality 88), atomically."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=88)
    store.write_bytes(path, buf.getvalue())

r"""Compositional explanations (Mu & Andreas, NeurIPS 2020): each unit labelled by a logical
formula of up to --max_length concepts (OR, AND, AND NOT), found by beam search or, with
--mode=optimal, by a branch and bound that proves the best formula.

  python experiments/compositional.py --flagfile=experiments/configs/compositional_demo.flags

The layers are dissected first (thresholds; a finished dissection in --output_dir is reused
from its stored stages), then one pass counts every unit against every concept under
--formula_restriction (default none, as the paper's release; presence / overlap restrict
the unit's pixels in a formula's union to the images passing one of its concepts'
categories, as the dissection's --restriction does for single concepts) and keeps the
activations, and each beam step (and each block of prefixes of the optimal mode) is one
more pass over the cached activations with exact counts on the devices
(jaxdissect/formula_counts.py, jaxdissect/formula_search.py).
Writes to --output_dir: compositional.json, compositional-<layer>.csv (per unit the formula,
its IoU, the best single label and its IoU; beam against optimal in optimal mode),
plots/compositional_length.png (mean IoU against formula length, per layer),
compositional.html (cards: formula, top images with the unit's mask beside the formula's),
and the dissection itself.
"""

from __future__ import annotations

import os
import pathlib
import time

from absl import app, flags

from jaxdissect import cli

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    from jaxdissect import compositional

    cli.define_model_flags(fv)
    cli.define_model_option_flags(fv)
    cli.define_input_flags(fv)
    flags.DEFINE_list("layers", ["conv5"], "Layers to explain.", flag_values=fv)
    cli.define_dataclass_flags(compositional.SearchSettings, fv)
    flags.DEFINE_integer(
        "page_units", 48, "Units (highest IoU first) with a card on the page.", flag_values=fv
    )
    flags.DEFINE_integer("page_images", 4, "Top images per card.", flag_values=fv)
    flags.DEFINE_string(
        "output_dir",
        None,
        "Default: runs/compositional_<model> (_<weights' name> for weights from a file or folder).",
        flag_values=fv,
    )
    cli.define_dissection_flags(fv)


def run(fv: flags.FlagValues = FLAGS):
    """Explain the layers as the flags say; returns the compositional.json document."""
    started = time.perf_counter()
    from jaxdissect import compositional

    if not fv.weights and not fv.model:
        raise ValueError("give --weights (a training export) or --model")
    settings, options = cli.settings_from_flags(fv), cli.options_from_flags(fv)
    search = cli.from_flags(compositional.SearchSettings, fv)
    if search.mode != "optimal":  # (ignored before)
        why = f"only --mode=optimal uses it (--mode={search.mode}); leave it out, or give "
        cli.refuse_given(fv, ["optimal_slots"], why + "--mode=optimal")
    probe = cli.probe_from_flags(fv)
    cli.check_input_size(fv.input_size)
    cli.check_layers(fv.layers)
    for name in ("page_units", "page_images"):
        if fv[name].value < 0:
            raise ValueError(f"--{name}={fv[name].value}: must be >= 0")
    trained = cli.check_model_flags(fv)
    name = cli.run_name(fv.model, fv.weights)
    output_dir = fv.output_dir or os.path.join("runs", f"compositional_{name}")
    cli.check_devices(fv, batch_size=settings.batch_size)
    with cli.claim_output_dir(output_dir):
        doc = _explain(fv, trained, settings, options, search, probe, output_dir)
    for layer in doc["layers"]:
        by_length = ", ".join(f"{v:.3f}" for v in layer["mean_iou_by_length"])
        line = (
            f"{layer['layer']}: mean IoU by formula length (beam) {by_length}; "
            f"{layer['passes']} passes, {layer['seconds_per_step']:.1f} s per step "
            f"({layer['forward_passes_per_step']:.2f} forward passes)"
        )
        if layer["beam_not_optimal"] is not None:
            line += (
                f"; beam missed the optimum for {layer['beam_not_optimal']} units; "
                f"optimal formulas' mean IoU {layer['mean_iou']:.3f}"
            )
        print(line)
    cli.report_elapsed(started, os.path.join(output_dir, "compositional.json"))
    return doc


def _explain(fv, trained, settings, options, search, probe, output_dir):
    import csv
    import dataclasses
    import pathlib

    import numpy as np

    from jaxdissect import (
        capture,
        compositional,
        driver,
        engine,
        finished,
        parallel,
        pipeline,
        results,
        store,
        training,
    )
    from jaxdissect.models import load as model_load
    from jaxdissect.report import formula_page, plots

    out = pathlib.Path(output_dir)
    # The probe set first: a missing or bad one fails before the model loads.
    source, dataset_name = probe.open()
    search.check_labels(source.labels)
    if trained:
        loaded = training.load_trained(fv.weights)
    else:
        loaded = model_load.load(
            fv.model, weights=fv.weights or None, options=cli.model_options(fv), seed=settings.seed
        )
    info = cli.model_info(loaded, fv.input_norm, fv.input_size)
    spec = info.input_spec
    mesh = parallel.data_mesh(fv.devices)
    dissected = pipeline.dissect(
        info,
        fv.layers,
        source,
        settings,
        out,
        dataset_name=dataset_name,
        mesh=mesh,
        options=options,
    )
    settings = engine.in_label_order(settings, source.labels)  # as results.json's
    labels = engine.restrict_categories(
        source.labels, settings.categories, getattr(source, "coverage", None)
    )
    names = labels.names
    size = info.input_spec.size  # as the dissection fed the images (--input_size)
    layouts = finished.recorded_token_layouts(out)  # the tokens read as the dissection did
    cannot_fire = {r.layer: r.cannot_fire for r in dissected}  # dead units get no formula
    # The layers as the dissection named them: a `re:` pattern is every layer it matches.
    explained = [r.layer for r in dissected]
    layers, curves = [], {}
    for layer, stem in zip(explained, results.layer_file_stems(explained), strict=True):
        stats = store.load_arrays(out / results.stats_npz_name(stem))
        thresholds, top_indices = stats["thresholds"], stats["top_indices"]
        tap = capture.make_tap(
            loaded.module,
            loaded.variables,
            [layer],
            input_shape=(size, size, 3),
            apply_kwargs=loaded.apply_kwargs,
            token_layout=layouts.get(layer),
        )
        found = compositional.explain_layer(
            tap,
            thresholds,
            source,
            labels,
            search,
            input_spec=spec,
            mesh=mesh,
            batch_size=settings.batch_size,
            activation_dtype=settings.activation_dtype,
            tie_rule=settings.tie_rule,
            categories=settings.categories,
            activation_cache=options.activation_cache,
            work_dir=out / ".work",
            num_threads=options.num_threads,
            progress=options.progress,
            cannot_fire=cannot_fire[layer],
        )
        forward_s = driver.forward_seconds(tap, spec, source, settings.batch_size)
        rows = compositional.unit_rows(found, names)
        with store.atomic_open(out / f"compositional-{stem}.csv", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        steps = found.passes[1:]
        step_s = float(np.mean([p["seconds"] for p in steps])) if steps else 0.0
        summary = compositional.layer_summary(found, rows)
        curves[layer] = summary["mean_iou_by_length"]
        record = {
            "layer": layer,
            "path": tap.layers[0],
            "units": len(rows),
            **summary,
            "passes": len(found.passes),
            "prefixes": {str(k): v for k, v in sorted(found.prefixes.items())},
            "pass_seconds": [p["seconds"] for p in found.passes],
            "seconds_per_step": step_s,
            "forward_seconds": forward_s,
            "forward_passes_per_step": step_s / forward_s if forward_s else 0.0,
            "units_detail": rows,
        }
        named = [r for r in rows if r["formula"]]
        shown = sorted(named, key=lambda r: (-r["iou"], r["unit"]))[: fv.page_units]
        cards = []
        for r in shown:
            strip = _strip(
                out,
                stem,
                tap,
                spec,
                source,
                thresholds,
                top_indices,
                r["unit"],
                found.best()[r["unit"]].formula,
                fv.page_images,
                settings.tie_rule,
                settings.categories,
                settings.activation_dtype,
            )
            cards.append({**r, "strip": strip})
        layers.append((record, cards))
    plot = plots.plot_iou_by_length(
        out / "plots" / "compositional_length.png", curves, title=f"{info.name}, {dataset_name}"
    )
    doc_settings = {
        **dataclasses.asdict(search),
        "model": info.name,
        "weights": fv.weights,
        "dataset": dataset_name,
        "images": len(source),
        "layers": explained,
        "tie_rule": settings.tie_rule,
        "categories": settings.categories,
        "union_restriction": search.formula_restriction,
        "devices": int(mesh.devices.size),
    }
    formula_page.write_page(
        out,
        doc_settings,
        [
            {
                "name": rec["layer"],
                "mean_by_length": rec["mean_iou_by_length"],
                "mean_iou": rec["mean_iou"],
                "beam_not_optimal": rec["beam_not_optimal"],
                "units_that_fire": rec["units_that_fire"],
                "cards": cards,
            }
            for rec, cards in layers
        ],
        plot=os.path.relpath(plot, out),
    )
    doc = {"settings": doc_settings, "layers": [rec for rec, _ in layers]}
    store.write_json(out / "compositional.json", doc)
    _remove_stale(
        out, results.layer_file_stems(explained), [c["strip"] for _, cs in layers for c in cs]
    )
    return doc


def _remove_stale(out: pathlib.Path, stems: list[str], strips: list[str]) -> None:
    """Remove what an earlier run of this script wrote in `out` that this one did not: the
    compositional-<stem>.csv and formula_strips/<stem>/ of layers no longer asked for, and
    strips of units no longer shown (compositional.json and its page name only this run's)."""
    import shutil

    tables = {f"compositional-{stem}.csv" for stem in stems}
    for path in out.glob("compositional-*.csv"):
        if path.name not in tables:
            path.unlink()
    kept = {out / s for s in strips}
    root = out / "formula_strips"
    for folder in root.iterdir() if root.is_dir() else ():
        if folder.name not in stems and folder.is_dir():
            shutil.rmtree(folder)
        elif folder.name not in stems:
            folder.unlink()
        elif folder.is_dir():
            for png in folder.glob("unit*.png"):
                if png not in kept:
                    png.unlink()


def strip_unit_masks(
    tap, input_spec, images, unit, thresholds, seg_size, tie_rule, activation_dtype
):
    """bool [n, sh, sw]: `unit`'s masks on `images` (uint8 [n, H, W, 3]) as the search
    counted them: its activations rounded to `activation_dtype`, upsampled to `seg_size`
    and compared with its threshold by `tie_rule`."""
    import jax.numpy as jnp
    import numpy as np

    from jaxdissect import masks

    acts = tap.fn(tap.variables, input_spec(jnp.asarray(images, jnp.float32)))[tap.layers[0]]
    acts = acts[..., unit : unit + 1].astype(activation_dtype).astype(jnp.float32)
    on = masks.unit_masks(acts, thresholds[unit : unit + 1], tuple(seg_size), tie_rule)
    return np.asarray(on)[..., 0]


def _strip(
    out,
    stem,
    tap,
    input_spec,
    source,
    thresholds,
    top_indices,
    unit,
    formula,
    count,
    tie_rule,
    categories,
    activation_dtype,
):
    """Write the unit's pair strip (unit mask | formula mask on its top images) at the
    segmentation size; its path relative to `out`, or None without top images."""
    import numpy as np
    from PIL import Image

    from jaxdissect.report import formula_page, strips

    idx = [int(i) for i in top_indices[:count, unit] if i >= 0]
    if not idx:
        return None
    sh, sw = source.seg_size
    images = np.stack([np.asarray(source.read_image(i), np.uint8) for i in idx])
    unit_masks = strip_unit_masks(
        tap, input_spec, images, unit, thresholds, (sh, sw), tie_rule, activation_dtype
    )
    small, formula_masks = [], []
    for j, i in enumerate(idx):
        small.append(np.asarray(Image.fromarray(images[j]).resize((sw, sh), Image.BILINEAR)))
        planes, image_labels = (
            source.read_labels(i) if categories is None else source.read_labels(i, categories)
        )
        formula_masks.append(
            formula.mask(lambda c, p=planes, q=image_labels: (p == c).any(0) | (c in q))
        )
    strip = formula_page.pair_strip(np.stack(small), unit_masks, np.stack(formula_masks))
    path = out / "formula_strips" / stem / f"unit{unit:04d}.png"
    strips.save_png(path, strip)
    return os.path.relpath(path, out)


main = cli.script_main(run)


if __name__ == "__main__":
    define_flags()
    app.run(main)

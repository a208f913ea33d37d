r"""Which detectors are significant: a permutation p-value for every unit of a layer, and
false discovery rate control (Benjamini-Hochberg or -Yekutieli), beside the IoU > 0.04 rule; and
the paper's baselines as reference distributions.

  python experiments/significance.py --flagfile=experiments/configs/significance_small_cnn.flags

The layer is dissected on the probe set with the engine's permutation test
(`--significance_draws`, `--significance_alpha`, `--significance_fdr`,
`--significance_stride`, `--significance_seed`; jaxdissect/significance.py says why whole images are permuted
and not pixels): pass 2 packs every image's unit and concept masks on the test's grid,
then the draws stream over them. Per unit: the p-value of its best IoU over all concepts
(the max is taken in every draw too) and whether the FDR procedure calls it. That IoU is the test's, on
its grid (every --significance_stride-th pixel) with the union unrestricted, not the
dissection's (full resolution, --restriction's union). BH's rate (--significance_fdr=bh,
the default) is nominal, as the p-values share the permutations; BY's (=by) holds under
any dependence, with fewer calls (jaxdissect/significance.py).

--baseline tests a reference network instead of the one given: `random_init` (the same
architecture with random weights, seed --seed) or `rotated` (the layer's units rotated
by a Haar-random Q, seed --rotation_seed, as experiments/rotation.py at t = 1). Their
best IoU per unit is the distribution a detector of the trained layer is measured against.
Writes significance.json and significance-<layer>.csv, and the dissection (results.json,
tally-<layer>.csv with the p-values), to --output_dir. In significance.json, per unit:
`label`, `iou` and `interpretable` are the dissection's; `p` is the test's (its best IoU
over all concepts); `label_p` is the pair p of the dissection's label under the test's
IoU, not corrected for the label's choice as the best: not a test of the label, do not
threshold it (under a true null far more than 5% of units have it below 0.05; `p` is the
test); the summary's
`interpretable_and_significant`, `interpretable_not_significant` and
`significant_not_interpretable` cross the two statistics (the dissection's IoU > the
threshold, the test's FDR call); `fewest_callable` is the fewest units the FDR procedure can
call with these draws (null where it can call none of the layer's units).
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from jaxdissect import cli

FLAGS = flags.FLAGS
BASELINES = ("none", "random_init", "rotated")
# Quantiles of the units' best IoU reported in the summary.
IOU_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    cli.define_model_flags(fv)
    cli.define_model_option_flags(fv)
    flags.DEFINE_string("layer", "conv5", "The layer whose detectors are tested.", flag_values=fv)
    flags.DEFINE_enum(
        "baseline",
        "none",
        list(BASELINES),
        "Test a reference instead: the same architecture at a random init (random_init), or "
        "the layer's units randomly rotated (rotated).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "rotation_seed", 0, "Seed of the rotation of --baseline=rotated.", flag_values=fv
    )
    flags.DEFINE_string("output_dir", None, "Default: runs/significance_<layer>.", flag_values=fv)
    cli.define_input_flags(fv)
    cli.define_dissection_flags(
        fv,
        settings_defaults={"significance_draws": 999},
        split="val",
        synthetic_images=4000,
        resolution=96,
    )


def run(fv: flags.FlagValues = FLAGS):
    """Run the test as the flags say; returns the significance.json document."""
    started = time.perf_counter()
    from jaxdissect import significance

    if not fv.weights and not fv.model:
        raise ValueError("give --weights (a training export) or --model")
    if fv.significance_draws < 1:  # engine.Settings allows 0: no test, as in dissect.py
        raise ValueError(f"--significance_draws={fv.significance_draws}: must be >= 1")
    settings, options = cli.settings_from_flags(fv), cli.options_from_flags(fv)
    probe = cli.probe_from_flags(fv)
    cli.check_input_size(fv.input_size)
    if fv.baseline == "rotated":
        from jaxdissect import config

        config.check_seed(fv.rotation_seed, "--rotation_seed")
    else:  # (ignored before)
        cli.refuse_given(
            fv,
            ["rotation_seed"],
            "only --baseline=rotated rotates the layer; leave it out, or give "
            f"--baseline=rotated (--baseline={fv.baseline})",
        )
    trained = cli.check_model_flags(fv)
    output_dir = fv.output_dir or os.path.join("runs", f"significance_{fv.layer}")
    cli.check_devices(fv, batch_size=settings.batch_size)
    with cli.claim_output_dir(output_dir):
        doc = _test(fv, trained, settings, options, probe, output_dir)
    s = doc["summary"]
    draws, alpha, fdr = (
        settings.significance_draws,
        settings.significance_alpha,
        settings.significance_fdr,
    )
    print(
        f"{fv.layer}{'' if fv.baseline == 'none' else f' ({fv.baseline})'}: "
        f"{s['significant']} of {s['units']} units significant "
        f"({significance.FDR_NAMES[fdr]} at {alpha}, {draws} draws); "
        f"{s['interpretable']} pass IoU > {s['iou_threshold']}, "
        f"{s['interpretable_and_significant']} both, {s['interpretable_not_significant']} "
        f"interpretable but not significant; best IoU median {s['best_iou_quantiles']['0.5']:.3f}"
    )
    if note := significance.resolution_note(s["units"], draws, alpha, fdr):
        print(note)
    cli.report_elapsed(started, os.path.join(output_dir, "significance.json"))
    return doc


def _model(fv, trained, settings):
    """(the `pipeline.ModelInfo` to dissect, the layer's name in its results, the loaded model)."""
    from jaxdissect import pipeline, rotation, store, training
    from jaxdissect.models import load as model_load

    if trained:
        (arch, options), weights = training.export_model(fv.weights), fv.weights
    else:
        arch, weights, options = fv.model, fv.weights or None, cli.model_options(fv)
    if fv.baseline == "random_init":
        loaded = model_load.load(arch, weights=None, options=options, seed=settings.seed)
    elif trained:
        loaded = training.load_trained(fv.weights)
    else:
        loaded = model_load.load(arch, weights=weights, options=options, seed=settings.seed)
    info = cli.model_info(loaded, fv.input_norm, fv.input_size)
    size = info.input_spec.size
    # --layer is one layer: a pattern matching several is refused before any dissection.
    path, k = rotation.resolve_layer(loaded.module, loaded.variables, fv.layer, size)
    if fv.baseline != "rotated":
        return info, fv.layer, loaded
    name = rotation.amount_name(fv.layer, 1.0)
    fn, variables = rotation.rotated_fan(
        loaded.module,
        loaded.variables,
        path,
        {name: rotation.random_rotation(k, fv.rotation_seed)},
        input_size=size,
        apply_kwargs=loaded.apply_kwargs,
        token_layout=info.token_layout,
    )
    key = store.key_of(base=info.key, layer=path, seed=fv.rotation_seed, study="rotated_baseline")
    # Its stage key covers the base's (weights, definition, library code, token layout): a
    # change of the model's code with the same weights is another baseline.
    rotated = pipeline.ModelInfo(
        fn,
        variables,
        info.input_spec,
        f"{info.name}, {fv.layer} rotated",
        key,
        wraps=info.stage_key,
    )
    return rotated, name, loaded


def _test(fv, trained, settings, options, probe, output_dir):
    import csv
    import pathlib

    import numpy as np

    from jaxdissect import (
        capture,
        driver,
        finished,
        parallel,
        pipeline,
        results,
        significance,
        store,
    )

    out = pathlib.Path(output_dir)
    source, dataset_name = probe.open()
    info, layer, loaded = _model(fv, trained, settings)
    mesh = parallel.data_mesh(fv.devices)
    t0 = time.perf_counter()
    [r] = pipeline.dissect(
        info, [layer], source, settings, out, dataset_name=dataset_name, mesh=mesh, options=options
    )
    dissect_s = time.perf_counter() - t0
    # The cost in forward passes over the probe set (the layer's capture, compiled beforehand).
    size = info.input_spec.size
    tap = capture.make_tap(
        loaded.module,
        loaded.variables,
        [fv.layer],
        input_shape=(size, size, 3),
        apply_kwargs=loaded.apply_kwargs,
        token_layout=finished.recorded_token_layouts(out).get(fv.layer),
    )
    forward_s = driver.forward_seconds(tap, info.input_spec, source, settings.batch_size)
    test = r.significance
    label_p = test.label_p(r.best_label)
    names = source.labels.names
    units = []
    for k in range(r.num_units):
        label = int(r.best_label[k])
        units.append(
            {
                "unit": k,
                "label": names[label] if label >= 0 else None,
                "iou": float(r.best_iou[k]),
                "interpretable": bool(r.interpretable[k]),
                "p": float(test.p[k]),
                "label_p": None if np.isnan(label_p[k]) else float(label_p[k]),
                "significant": bool(test.significant[k]),
            }
        )
    interp, significant = r.interpretable, test.significant
    draws, alpha = settings.significance_draws, settings.significance_alpha
    doc = {
        "settings": {
            "weights": fv.weights,
            "model": fv.model,
            "layer": fv.layer,
            "path": r.path,
            "baseline": fv.baseline,
            "rotation_seed": fv.rotation_seed if fv.baseline == "rotated" else None,
            "init_seed": settings.seed if fv.baseline == "random_init" else None,
            "draws": draws,
            "alpha": alpha,
            "fdr": settings.significance_fdr,
            "stride": settings.significance_stride,
            "permutation_seed": settings.significance_seed,
            "dataset": dataset_name,
            "images": len(source),
            "concepts": len(test.concepts),
        },
        "summary": {
            "units": r.num_units,
            "iou_threshold": r.iou_threshold,
            "interpretable": int(interp.sum()),
            "significant": int(significant.sum()),
            "interpretable_and_significant": int((interp & significant).sum()),
            "interpretable_not_significant": int((interp & ~significant).sum()),
            "significant_not_interpretable": int((~interp & significant).sum()),
            "fewest_callable": significance.fewest_callable(
                r.num_units, draws, alpha, settings.significance_fdr
            ),
            "best_iou_quantiles": {
                f"{q:g}": float(np.quantile(r.best_iou, q)) for q in IOU_QUANTILES
            },
        },
        "cost": {
            "dissect_and_test_s": dissect_s,
            "forward_s": forward_s,
            "forward_pass_equivalents": dissect_s / forward_s if forward_s else None,
        },
        "units": units,
    }
    store.write_json(out / "significance.json", doc)
    stem = results.layer_file_stems([fv.layer])[0]
    with store.atomic_open(out / f"significance-{stem}.csv", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(units[0]))
        w.writeheader()
        w.writerows(units)
    return doc


main = cli.script_main(run)


if __name__ == "__main__":
    define_flags()
    app.run(main)

r"""Which detectors are significant: a permutation p-value for every unit of a layer, and
Benjamini-Hochberg control of the false discovery rate, beside the IoU > 0.04 rule.

  python experiments/significance.py --flagfile=experiments/configs/significance_small_cnn.flags

The layer is dissected on the probe set (thresholds, labels); then every image's unit
masks and concept masks (on the segmentation grid taken every --mask_stride pixels)
are kept, and --draws random permutations of the images pair unit masks with other
images' concept masks: the null of no association (jaxdissect/significance.py says
why whole images are permuted and not pixels). Per unit: the p-value of its best IoU
over all concepts (the max is taken in every draw too) and whether BH at --alpha calls
it. The paper's baseline of the same network at random initialisation is the same
command on the step-0 export of its training run.
Writes significance.json and significance-<layer>.csv, and the dissection, to --output_dir.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from jaxdissect import cli

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string(
        "weights",
        None,
        "A training export (runs/train_*/weights/step_N), or with --model any weights "
        "experiments/dissect.py takes ('pretrained', an orbax dir, '').",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "model", None, "Architecture when --weights is no training export.", flag_values=fv
    )
    flags.DEFINE_string("layer", "conv5", "The layer whose detectors are tested.", flag_values=fv)
    flags.DEFINE_integer(
        "draws",
        999,
        "Random permutations of the images (p resolves to 1/(draws+1)).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "alpha", 0.05, "False discovery rate of BH over the layer's units.", flag_values=fv
    )
    flags.DEFINE_integer(
        "mask_stride",
        2,
        "Test on the segmentation grid taken every N pixels (memory, time).",
        flag_values=fv,
    )
    flags.DEFINE_integer("permutation_seed", 0, "Seed of the permutations.", flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Default: runs/significance_<layer>.", flag_values=fv)
    cli.define_dissection_flags(fv, split="val", synthetic_images=4000, resolution=96)


def run(fv: flags.FlagValues = FLAGS):
    """Run the test as the flags say; returns the significance.json document."""
    started = time.perf_counter()
    import numpy as np

    from jaxdissect.models import load as model_load

    if not fv.weights and not fv.model:
        raise ValueError("give --weights (a training export) or --model")
    settings, options = cli.settings_from_flags(fv), cli.options_from_flags(fv)
    probe = cli.probe_from_flags(fv)
    if fv.draws < 1:
        raise ValueError(f"--draws={fv.draws}: must be >= 1")
    if not 0 < fv.alpha < 1:
        raise ValueError(f"--alpha={fv.alpha}: must be in (0, 1)")
    if fv.mask_stride < 1:
        raise ValueError(f"--mask_stride={fv.mask_stride}: must be >= 1")
    if settings.threshold_on != "raw":
        raise ValueError(f"--threshold_on={settings.threshold_on}: the test supports raw only")
    trained = bool(fv.weights) and os.path.isfile(os.path.join(fv.weights, "meta.json"))
    if not trained:
        if fv.weights and not os.path.exists(fv.weights):
            raise FileNotFoundError(model_load.missing_weights_advice(fv.model or "", fv.weights))
        if not fv.model:
            raise ValueError(
                f"--weights={fv.weights} is not a training export (no meta.json): give --model"
            )
        model_load.check_request(fv.model, fv.weights or None)
    output_dir = fv.output_dir or os.path.join("runs", f"significance_{fv.layer}")
    with cli.claim_output_dir(output_dir):
        doc = _test(fv, trained, settings, options, probe, output_dir)
    s = doc["summary"]
    print(
        f"{fv.layer}: {s['significant']} of {s['units']} units significant (BH at "
        f"{fv.alpha}, {fv.draws} draws); {s['interpretable']} pass IoU > "
        f"{s['iou_threshold']}, {s['interpretable_and_significant']} both, "
        f"{s['interpretable_not_significant']} interpretable but not significant"
    )
    if s["fewest_callable"] > 1:
        print(
            f"note: with --draws={fv.draws} the smallest p is {1 / (fv.draws + 1):.2g}, so BH "
            f"calls units only in groups of at least {s['fewest_callable']}: a lone detector "
            f"needs --draws >= {int(np.ceil(s['units'] / fv.alpha)) - 1}"
        )
    cli.report_elapsed(started, os.path.join(output_dir, "significance.json"))
    return doc


def _test(fv, trained, settings, options, probe, output_dir):
    import csv
    import pathlib

    import numpy as np

    from jaxdissect import capture, parallel, pipeline, results, significance, store, training
    from jaxdissect.models import load as model_load

    out = pathlib.Path(output_dir)
    if trained:
        loaded = training.load_trained(fv.weights)
    else:
        loaded = model_load.load(fv.model, weights=fv.weights or None)
    source, dataset_name = probe.open()
    info = cli.model_info(loaded)
    mesh = parallel.data_mesh(fv.devices)
    [layer_result] = pipeline.dissect(
        info,
        [fv.layer],
        source,
        settings,
        out,
        dataset_name=dataset_name,
        mesh=mesh,
        options=options,
    )
    stem = results.layer_file_stems([fv.layer])[0]
    with np.load(out / results.stats_npz_name(stem)) as stats:
        thresholds = stats["thresholds"]
    size = loaded.input_spec.size
    tap = capture.make_tap(
        loaded.module,
        loaded.variables,
        [fv.layer],
        input_shape=(size, size, 3),
        apply_kwargs=loaded.apply_kwargs,
    )
    path = tap.layers[0]
    # Labels with no pixel in the probe set have IoU 0 with every unit under every pairing.
    present = np.asarray(layer_result.counts["label_pixels"]) > 0
    concepts = np.nonzero(present)[0].astype(np.int32)
    concepts = concepts[concepts > 0]
    t0 = time.perf_counter()
    u, c = significance.layer_masks(
        tap,
        path,
        thresholds,
        source,
        concepts,
        input_spec=loaded.input_spec,
        stride=fv.mask_stride,
        tie_rule=settings.tie_rule,
        batch_size=settings.batch_size,
    )
    masks_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = significance.permutation_test(u, c, draws=fv.draws, seed=fv.permutation_seed)
    test_s = time.perf_counter() - t0
    # The cost in forward passes over the probe set (compiled beforehand).
    fwd = jax_forward(tap, loaded.input_spec)
    images = np.stack(
        [
            np.asarray(source.read_image(i), np.float32)
            for i in range(min(len(source), settings.batch_size))
        ]
    )
    fwd(tap.variables, images).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(0, len(source), settings.batch_size):
        fwd(tap.variables, images).block_until_ready()
    forward_s = time.perf_counter() - t0
    significant = significance.benjamini_hochberg(test.unit_p, fv.alpha)
    ua, ca = u.sum((0, 1)), c.sum((0, 1))
    union = ua[:, None] + ca[None, :] - test.observed
    iou = np.where(union > 0, test.observed / np.maximum(union, 1), 0.0)
    best = iou.argmax(1)
    names = source.labels.names
    units = []
    for k in range(layer_result.num_units):
        label = int(layer_result.best_label[k])
        units.append(
            {
                "unit": k,
                "label": names[label] if label >= 0 else None,
                "iou": float(layer_result.best_iou[k]),
                "interpretable": bool(layer_result.interpretable[k]),
                "p": float(test.unit_p[k]),
                "significant": bool(significant[k]),
                "test_concept": names[int(concepts[best[k]])],
                "test_iou": float(iou[k, best[k]]),
            }
        )
    interp = layer_result.interpretable
    doc = {
        "settings": {
            "weights": fv.weights,
            "model": fv.model,
            "layer": fv.layer,
            "path": path,
            "draws": fv.draws,
            "alpha": fv.alpha,
            "mask_stride": fv.mask_stride,
            "permutation_seed": fv.permutation_seed,
            "dataset": dataset_name,
            "images": len(source),
            "pixels_per_image": int(u.shape[1]),
            "concepts": len(concepts),
        },
        "summary": {
            "units": layer_result.num_units,
            "iou_threshold": layer_result.iou_threshold,
            "interpretable": int(interp.sum()),
            "significant": int(significant.sum()),
            "interpretable_and_significant": int((interp & significant).sum()),
            "interpretable_not_significant": int((interp & ~significant).sum()),
            "significant_not_interpretable": int((~interp & significant).sum()),
            # BH calls r units only if their p <= alpha r / K; the smallest p is 1 / (draws + 1).
            "fewest_callable": int(np.ceil(layer_result.num_units / (fv.alpha * (fv.draws + 1)))),
        },
        "cost": {
            "masks_s": masks_s,
            "test_s": test_s,
            "forward_s": forward_s,
            "forward_pass_equivalents": (masks_s + test_s) / forward_s if forward_s else None,
        },
        "units": units,
    }
    store.write_json(out / "significance.json", doc)
    with (
        store.atomic_path(out / f"significance-{stem}.csv") as tmp,
        open(tmp, "w", newline="") as f,
    ):
        w = csv.DictWriter(f, fieldnames=list(units[0]))
        w.writeheader()
        w.writerows(units)
    return doc


def jax_forward(tap, input_spec):
    """The jitted capture of the layer alone: the unit of cost."""
    import jax

    layer = tap.layers[0]
    return jax.jit(lambda v, x: tap.fn(v, input_spec(x))[layer])


main = cli.script_main(run)


if __name__ == "__main__":
    define_flags()
    app.run(main)

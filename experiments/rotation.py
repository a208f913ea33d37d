r"""Rotate a layer's units by Q^t and dissect: is interpretability axis-aligned?

  python experiments/rotation.py --flagfile=experiments/configs/rotation_small_cnn.flags

Q is a random rotation of the layer's units (seeded, Haar); Q^t for t in
--amounts goes from no rotation (t=0) to the full one (t=1). Every amount is
dissected, and (for a network trained by experiments/train.py) the rotated
network's validation accuracy measured twice: with the inverse rotation folded
into the layer's consumers (the modules that read its output get the unrotated units
back: where only modules read it, the network computes what it did up to float rounding,
by construction, which checks that only what dissection sees is rotated; a function
between modules, e.g. nn.relu, sees rotated units, and max_output_change shows it), and
with the rotation simply inserted, the rest of the network seeing the rotated units.
Writes rotation.csv, rotation.json, rotation.png and the dissection
(results.json, tally-<layer>-t<t>.csv, <t> to 3 decimals with `_` for the point: t0_500)
to --output_dir.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from jaxdissect import cli

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    cli.define_model_flags(fv)
    cli.define_model_option_flags(fv)
    flags.DEFINE_string("layer", "conv5", "The layer whose units are rotated.", flag_values=fv)
    flags.DEFINE_list(
        "amounts", ["0", "0.2", "0.4", "0.6", "0.8", "1"], "Values of t.", flag_values=fv
    )
    flags.DEFINE_integer("rotation_seed", 0, "Seed of the random rotation Q.", flag_values=fv)
    flags.DEFINE_bool(
        "accuracy",
        True,
        "Evaluate the rotated network on the val split of its task (training exports only).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "eval_data",
        None,
        "The task of the accuracy check, as experiments/train.py's --data (default: --data); "
        "e.g. the TFDS classification build the network was trained on.",
        flag_values=fv,
    )
    flags.DEFINE_string("output_dir", None, "Default: runs/rotation_<layer>.", flag_values=fv)
    cli.define_input_flags(fv)
    cli.define_dissection_flags(fv, split="val", synthetic_images=4000, resolution=96)


def run(fv: flags.FlagValues = FLAGS):
    """Run the study as the flags say; returns the `rotation.RotationPoint`s."""
    started = time.perf_counter()
    if not fv.weights and not fv.model:
        raise ValueError("give --weights (a training export) or --model")
    # Every flag is checked before anything slow starts.
    settings, options = cli.settings_from_flags(fv), cli.options_from_flags(fv)
    probe = cli.probe_from_flags(fv)
    cli.check_input_size(fv.input_size)
    from jaxdissect import config, rotation

    amounts = rotation.check_amounts(cli.parse_numbers(fv.amounts, "--amounts"), "--amounts")
    config.check_seed(fv.rotation_seed, "--rotation_seed")
    trained = cli.check_model_flags(fv)
    if fv["accuracy"].present and fv.accuracy and not trained:  # (no accuracy, silently)
        raise ValueError(
            "--accuracy: only a training export's accuracy is measured (--weights of "
            f"train.py); --model={fv.model} has no task here: leave it out"
        )
    if fv.eval_data and not (trained and fv.accuracy):  # (ignored before)
        raise ValueError(
            f"--eval_data={fv.eval_data}: only a training export's accuracy is measured "
            "(--weights of train.py, with --accuracy); leave it out"
        )
    output_dir = fv.output_dir or os.path.join("runs", f"rotation_{fv.layer}")
    cli.check_devices(fv, batch_size=settings.batch_size)
    with cli.claim_output_dir(output_dir):
        points = _rotate(fv, trained, settings, options, probe, amounts, output_dir)
    for p in points:
        acc = (
            ""
            if p.accuracy_folded is None
            else f", accuracy {p.accuracy_folded:.4f} folded, {p.accuracy_inserted:.4f} inserted"
        )
        print(
            f"t={p.amount:g}: {p.unique_detectors} unique detectors, "
            f"{p.interpretable_units}/{p.num_units} interpretable units{acc}"
        )
    cli.report_elapsed(started, os.path.join(output_dir, "rotation.json"))
    return points


def _rotate(fv, trained, settings, options, probe, amounts, output_dir):
    from jaxdissect import parallel, rotation, training
    from jaxdissect.models import load as model_load

    # The probe set first: a missing or bad one fails before the model is loaded.
    source, dataset_name = probe.open()
    if trained:
        loaded = training.load_trained(fv.weights)
    else:
        loaded = model_load.load(
            fv.model, weights=fv.weights or None, options=cli.model_options(fv), seed=settings.seed
        )
    eval_images = eval_labels = None
    if fv.accuracy and trained:
        task = cli.training_task(fv)
        eval_images, eval_labels = task.val.images, task.val.labels
    return rotation.rotation_study(
        cli.model_info(loaded, fv.input_norm, fv.input_size),
        fv.layer,
        amounts,
        source,
        settings,
        output_dir,
        dataset_name=dataset_name,
        seed=fv.rotation_seed,
        mesh=parallel.data_mesh(fv.devices),
        options=options,
        eval_images=eval_images,
        eval_labels=eval_labels,
    )


main = cli.script_main(run)


if __name__ == "__main__":
    define_flags()
    app.run(main)

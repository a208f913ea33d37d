r"""Dissect the checkpoints of a training run: unique detectors against iteration and accuracy.

  python experiments/training_dynamics.py --flagfile=experiments/configs/dynamics_small_cnn.flags

Takes the weights/step_N exports of an experiments/train.py run (all, or
--steps), dissects --layers of every one in a single pass over the probe set,
and writes dynamics.csv, dynamics.json, dynamics.png (unique detectors by
category against iteration) and dynamics_accuracy.png (against validation
accuracy), with the dissection's results.json and tally CSVs, to --output_dir.
"""

from __future__ import annotations

import os
import time

from absl import app, flags

from jaxdissect import cli

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string("run", None, "An experiments/train.py output directory.", flag_values=fv)
    flags.DEFINE_list("steps", [], "Exported steps to dissect (default: all).", flag_values=fv)
    flags.DEFINE_list("layers", ["conv3", "conv5"], "Layers to dissect.", flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Default: <run>/dynamics.", flag_values=fv)
    cli.define_dissection_flags(fv, split="val", synthetic_images=4000, resolution=96)
    fv["run"].field_name = "run_dir"  # `studies.run_checkpoints`' errors name them
    fv["steps"].field_name = "steps"


def run(fv: flags.FlagValues = FLAGS) -> list[dict]:
    """Run the study as the flags say; returns its rows (one per checkpoint and layer)."""
    started = time.perf_counter()
    from jaxdissect import parallel, studies
    from jaxdissect.models import load as model_load

    if not fv.run:
        raise ValueError("--run (a training output directory) is required")
    # Every flag is checked before anything slow starts.
    settings, options = cli.settings_from_flags(fv), cli.options_from_flags(fv)
    probe = cli.probe_from_flags(fv)
    cli.check_layers(fv.layers)
    if not os.path.isdir(fv.run):
        raise FileNotFoundError(
            f"--run={fv.run}: no such training run; train first: {model_load.TRAIN_COMMAND}"
        )
    steps = cli.parse_numbers(fv.steps, "--steps", int) if fv.steps else None
    checkpoints = studies.run_checkpoints(fv.run, steps)
    output_dir = fv.output_dir or os.path.join(fv.run, "dynamics")
    cli.check_devices(fv, batch_size=settings.batch_size)
    with cli.claim_output_dir(output_dir):
        source, dataset_name = probe.open()
        rows = studies.dynamics_study(
            checkpoints,
            fv.layers,
            source,
            settings,
            output_dir,
            dataset_name=dataset_name,
            mesh=parallel.data_mesh(fv.devices),
            options=options,
        )
    for r in rows:
        print(
            f"step {r['step']} {r['layer']}: {r['unique_detectors']} unique detectors, "
            f"{r['interpretable_units']}/{r['num_units']} interpretable, "
            f"val accuracy {r['val_accuracy']}"
        )
    cli.report_elapsed(started, os.path.join(output_dir, "dynamics.json"))
    return rows


main = cli.script_main(run)


if __name__ == "__main__":
    define_flags()
    app.run(main)

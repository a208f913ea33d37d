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

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    from jaxdissect import training

    flags.DEFINE_string("run", None, "An experiments/train.py output directory.", flag_values=fv)
    flags.DEFINE_list("steps", [], "Exported steps to dissect (default: all).", flag_values=fv)
    flags.DEFINE_list("layers", ["conv3", "conv5"], "Layers to dissect.", flag_values=fv)
    flags.DEFINE_string("output_dir", None, "Default: <run>/dynamics.", flag_values=fv)
    training.define_dissection_flags(fv)


def run(fv: flags.FlagValues = FLAGS) -> list[dict]:
    """Run the study as the flags say; returns its rows (one per checkpoint and layer)."""
    from jaxdissect import parallel, training

    training.quiet_library_logs()
    if not fv.run:
        raise ValueError("--run (a training output directory) is required")
    checkpoints = training.run_checkpoints(fv.run, [int(s) for s in fv.steps] if fv.steps else None)
    source, dataset_name = training.probe_from_flags(fv)
    rows = training.dynamics_study(
        checkpoints,
        fv.layers,
        source,
        training.settings_from_flags(fv),
        fv.output_dir or os.path.join(fv.run, "dynamics"),
        dataset_name=dataset_name,
        mesh=parallel.data_mesh(fv.devices),
        options=training.options_from_flags(fv),
    )
    for r in rows:
        print(
            f"step {r['step']} {r['layer']}: {r['unique_detectors']} unique detectors, "
            f"{r['interpretable_units']}/{r['num_units']} interpretable, "
            f"val accuracy {r['val_accuracy']}"
        )
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run(FLAGS)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        logging.error("%s: %s", type(e).__name__, e)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    define_flags()
    app.run(main)

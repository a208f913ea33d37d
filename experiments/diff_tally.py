r"""Compare two tally.csv files of one layer unit by unit: a dissection against
NetDissect-Lite's (its settings: README, "The main job"), or two dissections.

  python experiments/diff_tally.py --a=runs/resnet18_places365/tally-layer4.csv \
    --b=NetDissect-Lite/result/pytorch_resnet18_places365/tally.csv

Prints how many units get the same label, how many are detectors (IoU above
--iou_threshold) in each, how many of those agree, and the largest IoU difference;
with --output, writes the units whose labels differ (unit, then each file's category,
label and score) as CSV.
"""

from __future__ import annotations

import os

from absl import flags

from jaxdissect import cli

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string("a", None, "A tally.csv (NetDissect-Lite's schema).", flag_values=fv)
    flags.DEFINE_string("b", None, "Another tally.csv of the same layer.", flag_values=fv)
    flags.DEFINE_float(
        "iou_threshold", 0.04, "A unit is a detector where its score is above this.", flag_values=fv
    )
    flags.DEFINE_string(
        "output", None, "Write the units whose labels differ to this CSV file.", flag_values=fv
    )


def run(fv: flags.FlagValues = FLAGS):
    """Compare the two files as the flags say; returns the `tally_diff.TallyDiff`."""
    from jaxdissect import tally_diff

    for name in ("a", "b"):
        path = fv[name].value
        if not path:
            raise ValueError(f"--{name} is required: a tally.csv")
        if not os.path.isfile(path):
            what = "a folder, not a file" if os.path.isdir(path) else "no such file"
            raise FileNotFoundError(f"--{name}={path}: {what}")
    if not 0 <= fv.iou_threshold < 1:
        raise ValueError(f"--iou_threshold={fv.iou_threshold}: must be in [0, 1)")
    if fv.output and os.path.isdir(fv.output):
        raise ValueError(f"--output={fv.output}: a folder, not a file; name the CSV file to write")
    tallies = [tally_diff.read_tally_csv(fv[name].value) for name in ("a", "b")]
    diff = tally_diff.diff_tallies(*tallies, iou_threshold=fv.iou_threshold, names=("--a", "--b"))
    print(f"a: {fv.a}\nb: {fv.b}\n{tally_diff.summary(diff)}")
    if fv.output:
        tally_diff.write_differing_csv(fv.output, diff)
        print(f"{len(diff.differing)} units whose labels differ: {fv.output}")
    return diff


main = cli.script_main(run, runs_jax=False)


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)

"""Random cases against the numpy references, and random hostile inputs, for campaigns
longer than the suite:

    python -m tests.fuzz_reference --target=tally --seeds=0:500
    python -m tests.fuzz_reference --target=results --seeds=0:5000
    python -m tests.fuzz_reference --target=quantiles --seeds=0:100
    python -m tests.fuzz_reference --target=sketch --seeds=0:100
    python -m tests.fuzz_reference --target=formulas --seeds=0:200
    python -m tests.fuzz_reference --target=search --seeds=0:1000
    python -m tests.fuzz_reference --target=engine --seeds=0:200
    python -m tests.fuzz_reference --target=broden --seeds=0:2000
    python -m tests.fuzz_reference --target=weights --seeds=0:5000
    python -m tests.fuzz_reference --target=results_json --seeds=0:2000
    python -m tests.fuzz_reference --target=converted --seeds=0:500
    python -m tests.fuzz_reference --target=tfds --seeds=0:1000
    python -m tests.fuzz_reference --target=flags --seeds=0:3000
    python -m tests.fuzz_reference --target=checkpoint --seeds=0:500
    python -m tests.fuzz_reference --target=train_checkpoint --seeds=0:500

Targets (each case draws its shapes, data and settings from its seed):
- tally: `tally.batch_counts` in padded batches (every method, restriction and tie rule;
  chunk, slots, unit blocks, restriction patterns) on random shapes and label sets
  (out-of-range numbers, labels repeated across planes, image-level labels in the pixel
  planes, attained thresholds), against `reference.reference_counts`.
- results: `results.layer_result` (IoU, best label per category and overall, detectors)
  on random counts with equal IoUs within and across categories, zero unions, silent
  units and a random subset of scored categories, against `reference.reference_iou` and
  `reference.reference_unit_labels`.
- quantiles: exact and histogram modes, in random batches with padding rows, merged over
  random splits, against `quantiles.reference_threshold`, bitwise; float16 and bfloat16
  values with ties, -0.0, -inf and wide exponents.
- sketch: the quantile sketch (`max_count` given), in 1-3 shards merged, on columns that
  fool prefilters (ascending, descending, an early block of large values, ties, spikes):
  bitwise the reference before it compacts, else certified and within 5% in the count
  above the threshold.
- formulas: `formula_counts.batch_formula_counts` (random formulas of length 1-3 a unit,
  out-of-range concepts, chunks, tie rules) on the tally's random probes, against
  `formula_reference.reference_counts`.
- search: formula search (`formula_search`) on random unit and concept masks, plain or
  under a union restriction, random operators, length penalty, length, beam and slots:
  the beam against `formula_reference.beam`, the optimal mode (seeded by the beam or not)
  against `formula_reference.brute_force`.
- engine: a whole dissection of `test_engine.SmallCNN` (random weights, probe size, layers,
  devices, batch, activation dtype, quantile mode and level, restriction, tie rule,
  categories, activation cache, tally method; `--threshold_on=upsampled` too, on 16-bit
  maps) against the reference thresholds, counts and best labels, from activations computed
  with the engine's per-device batch shape (XLA:CPU's convolutions round by batch shape).
- broden: hostile inputs. A tiny synthetic Broden with one random mutation (a CSV, PNG or
  JPEG's bytes changed, inserted, deleted or cut; a CSV line repeated; a CSV cell replaced
  by a hostile token) opens and reads back every record, or raises a user error
  (`cli.USER_ERRORS`, not a decoding error) that names the mutated file; any other
  exception, or an error naming no file, fails the case.
- weights: hostile weight files. One of a few small weight files (torch.save zip and
  legacy formats, a wrapped training checkpoint, safetensors, .npz, a whole pickled
  module in both torch formats, a TorchScript archive) with random bytes changed, inserted, deleted or cut, or one zip member's bytes changed (a valid zip of
  corrupt records), loads or raises a `weight_file.CheckpointError` that starts with
  its path; any other exception fails the case.
- results_json: hostile results files. A finished run's results.json with one field
  deleted, replaced by a value of another JSON type, added to, or an element repeated, is
  with its checksum or without one (older files), is read by every reader of a finished
  run (`finished.read_layer`, the comparisons' `studies` readers, the follow-ons' digest),
  each of which raises a user error naming the file or reads, with a checksum, what was
  written.
- converted: a converted checkpoint (`models/convert.py`'s folder) whose meta.json has a
  field deleted or replaced, or an option added, loads or raises a user error naming the
  folder or the option.
- tfds: a TFDS Broden build (`tfds_broden.build`) whose JSON files (dataset_info.json,
  features.json, metadata.json) have a field deleted or replaced, or whose files have
  bytes changed or are cut, opens and reads back every example or raises a user error
  naming the build.
- flags: experiments/dissect.py given one or two of its flags at hostile values (empty,
  negative, huge, NaN, paths that do not exist, separators, other scripts' letters) on a
  tiny probe set and the small test CNN: absl refuses the value, or the script stops in
  one line (`cli.script_main`'s `error: ...`), or it reaches the dissection (stopped
  there); a traceback or a message of several lines fails the case.
- checkpoint: a pass's resume checkpoint (`checkpoint.StreamCheckpoint` of a small
  sharded state) with one of its files' bytes changed or cut restores the state saved,
  or is dropped (the pass starts again), or is refused in one line naming its folder;
  other numbers, or any other error, fail the case.
- train_checkpoint: a training run's checkpoints (`training_checkpoints`, steps 5 and 10)
  with a file of step 10's bytes changed or cut resume at step 10 with the state, the
  metrics rows and the unlogged metrics saved, or at step 5 (step 10 deleted), or are
  refused in one line naming the folder.

Cases compile as the tests do (JAX_DISABLE_MOST_OPTIMIZATIONS=1 unless set; 8 CPU
devices). Optimised, XLA:CPU contracts multiply-adds in the upsampling, which the
references do not: counts then differ where an upsampled value lies within an ulp of its
threshold (`tally`'s module docstring). Unoptimised, some fusions still contract (where one
upsampled value is the exact cancellation of others, its sign can flip), and the compact
and matmul methods compute a chunk's mask inside two consumers (unit totals,
intersections) that may round such a pixel differently. A tally case whose counts differ
only so, each between the reference's with every threshold moved a few ulps up and down,
is counted apart as `ulp at a threshold`. Exit status 1 if any other case failed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable

if __name__ == "__main__":  # the tests' compilation (tests/conftest.py) unless set
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

from tests import fuzz_inputs, fuzz_numbers  # noqa: E402

# -------------------------------------------------------------------------------- main


def campaign(case: Callable[[int], tuple[str, list[str]]], seeds: range) -> dict[str, int]:
    """Run `case` for every seed, printing each failure; counts of passed / ulp / failed."""
    tally = {"passed": 0, fuzz_numbers.ULP: 0, "failed": 0}
    for seed in seeds:
        try:
            desc, bad = case(seed)
        except Exception:  # a crash is a failure of its case, not of the campaign
            desc, bad = "raised", [traceback.format_exc(limit=3)]
        outcome = (
            "passed" if not bad else fuzz_numbers.ULP if bad == [fuzz_numbers.ULP] else "failed"
        )
        tally[outcome] += 1
        if outcome != "passed":
            print(f"seed {seed}: {outcome}: {bad}  ({desc})", flush=True)
        if (seed - seeds.start + 1) % 100 == 0:
            print(f"through seed {seed}: {tally}", flush=True)
            # Each case compiles new programs: free them (a process that keeps thousands of
            # executables runs out of XLA:CPU's code memory: "Unable to allocate section").
            jax.clear_caches()
    return tally


def _seeds(text: str) -> range:
    try:
        first, stop = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give first:stop, e.g. 0:100") from None
    return range(first, stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target",
        choices=(
            *("tally", "results", "quantiles", "sketch", "formulas", "search", "engine"),
            *("broden", "weights", "results_json", "converted", "tfds", "flags"),
            *("checkpoint", "train_checkpoint"),
        ),
        required=True,
    )
    parser.add_argument("--seeds", type=_seeds, default="0:100", help="first:stop")
    parser.add_argument("--threshold_on", choices=("raw", "upsampled"), default="raw")
    args = parser.parse_args(argv)
    jax.config.update("jax_num_cpu_devices", 8)
    if not jax.config.read("jax_disable_most_optimizations"):
        print("note: optimised compilation; expect ulp disagreements (see the docstring)")
    work = pathlib.Path(tempfile.mkdtemp(prefix="fuzz-"))
    base = fuzz_inputs.broden_base(work) if args.target in ("broden", "flags") else None
    bases = fuzz_inputs.weights_bases(work / "weights") if args.target == "weights" else None
    run = fuzz_inputs.results_json_run(work)[0] if args.target == "results_json" else None
    converted = fuzz_inputs.converted_base(work) if args.target == "converted" else None
    tfds_build = fuzz_inputs.tfds_base(work) if args.target == "tfds" else None
    saved = fuzz_inputs.checkpoint_base(work) if args.target == "checkpoint" else None
    trained = fuzz_inputs.train_checkpoint_base(work) if args.target == "train_checkpoint" else None
    case = {
        "tally": fuzz_numbers.tally_case,
        "results": fuzz_numbers.results_case,
        "quantiles": fuzz_numbers.quantile_case,
        "sketch": fuzz_numbers.sketch_case,
        "formulas": fuzz_numbers.formula_case,
        "search": fuzz_numbers.search_case,
        "engine": lambda seed: fuzz_numbers.engine_case(seed, args.threshold_on, work),
        "broden": lambda seed: fuzz_inputs.broden_case(seed, base),
        "weights": lambda seed: fuzz_inputs.weights_case(seed, bases),
        "results_json": lambda seed: fuzz_inputs.results_json_case(seed, run),
        "converted": lambda seed: fuzz_inputs.converted_case(seed, converted),
        "tfds": lambda seed: fuzz_inputs.tfds_case(seed, tfds_build),
        "flags": lambda seed: fuzz_inputs.flags_case(seed, base),
        "checkpoint": lambda seed: fuzz_inputs.checkpoint_case(seed, saved),
        "train_checkpoint": lambda seed: fuzz_inputs.train_checkpoint_case(seed, trained),
    }[args.target]
    start = time.perf_counter()
    outcome = campaign(case, args.seeds)
    seeds = f"{args.seeds.start}:{args.seeds.stop}"
    print(f"{args.target} seeds {seeds}: {outcome} in {time.perf_counter() - start:.0f} s")
    return int(outcome["failed"] > 0)


if __name__ == "__main__":
    sys.exit(main())

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
import types
from collections.abc import Callable, Iterable

if __name__ == "__main__":  # the tests' compilation (tests/conftest.py) unless set
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import flax.struct  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdissect import engine, parallel, quantiles, results  # noqa: E402
from jaxdissect.labelspace import LabelSpace  # noqa: E402
from tests import reference  # noqa: E402

ULP = "ulp at a threshold"


# ------------------------------------------------------------------------------- tally


def tally_probe(rng: np.random.Generator) -> dict:
    """A random probe in the form of `reference.random_probe`, of any shape."""
    n = int(rng.integers(1, 10))
    h, w = (int(v) for v in rng.integers(1, 9, 2))
    sh, sw = (int(v) for v in rng.integers(1, 25, 2))
    k = int(rng.choice([1, 2, 5, 17, 40, 70]))
    planes, slots = int(rng.integers(0, 4)), int(rng.integers(0, 3))
    num_labels, num_categories = int(rng.choice([2, 7, 60, 300])), int(rng.integers(1, 6))
    image_level = tuple(bool(b) for b in rng.random(num_categories) < 0.4)
    primary = rng.integers(0, num_categories, num_labels).astype(np.int32)
    primary[0] = -1
    primary[rng.random(num_labels) < 0.1] = -1  # labels of no category
    labels = LabelSpace(
        tuple(f"cat{i}" for i in range(num_categories)),
        ("-", *(f"label{i}" for i in range(1, num_labels))),
        primary,
        image_level,
    )
    kind = rng.integers(0, 3)
    if kind == 0:  # ReLU maps on a grid of quarters: plateaus and exact ties
        acts = np.round(np.maximum(rng.normal(size=(n, h, w, k)), 0) * 4) / 4
    elif kind == 1:
        acts = rng.normal(size=(n, h, w, k))
    else:  # a few signed integers: interpolations that land on the thresholds
        acts = rng.integers(-2, 3, (n, h, w, k)).astype(float)
    acts = acts.astype(np.float32)
    if k > 1 and rng.random() < 0.5:
        acts[..., 0] = 0.0  # a dead unit
    if rng.random() < 0.5:  # thresholds at values the maps take
        thresholds = acts.reshape(-1, k)[rng.integers(0, n * h * w, k), np.arange(k)]
    else:
        thresholds = np.quantile(acts.reshape(-1, k), rng.uniform(0.5, 0.999), axis=0)
    pix = rng.integers(0, num_labels, (n, planes, sh, sw)).astype(np.int32)
    if planes and rng.random() < 0.5:  # one label an image and plane
        pix = np.broadcast_to(pix[:, :, :1, :1], pix.shape).copy()
    pix[rng.random(pix.shape) < 0.3] = 0
    pix[rng.random(pix.shape) < 0.02] = num_labels + 3
    pix[rng.random(pix.shape) < 0.02] = -1
    if planes > 1:
        same = rng.random((n, sh, sw)) < 0.3
        pix[:, 1][same] = pix[:, 0][same]
    img = rng.integers(0, num_labels, (n, slots)).astype(np.int32)
    img[rng.random(img.shape) < 0.3] = 0
    if slots and planes and rng.random() < 0.5:
        pix[0, 0, 0, 0] = img[0, 0]
    return {
        "labels": labels,
        "acts": acts,
        "thresholds": np.asarray(thresholds, np.float32),
        "pixel_labels": pix,
        "image_labels": img,
    }


def tally_case(seed: int) -> tuple[str, list[str]]:
    """(description, mismatches) of one random tally case."""
    from tests.test_tally import _run_tally

    rng = np.random.default_rng(seed)
    probe = tally_probe(rng)
    method = str(rng.choice(["segment", "compact", "matmul"]))
    restriction = str(rng.choice(["presence", "overlap", "none"]))
    kwargs = {"method": method, "tie_rule": str(rng.choice(["strict", "inclusive"]))}
    if rng.random() < 0.5:
        kwargs["chunk"] = int(rng.integers(1, 5))
    if method == "compact":
        kwargs["slots"] = int(rng.integers(1, 8))
    if method == "segment" and rng.random() < 0.6:
        kwargs["unit_block"] = int(rng.integers(1, 8))
    if rng.random() < 0.3 and probe["labels"].num_categories <= 5:
        kwargs["patterns"] = True

    def reference_at(thresholds: np.ndarray) -> dict[str, np.ndarray]:
        fields = ("acts", "pixel_labels", "image_labels", "labels")
        acts, pix, img, labels = (probe[f] for f in fields)
        return reference.reference_counts(
            acts,
            thresholds,
            pix,
            img,
            labels,
            restriction,
            tie_rule=kwargs["tie_rule"],
            patterns=kwargs.get("patterns", False),
        )

    want = reference_at(probe["thresholds"])
    got = _run_tally(probe, restriction, **kwargs)
    bad = [key for key in want if not np.array_equal(got[key], want[key])]
    if bad:
        # Every count but the patterns' grows with the masks: between the reference's at
        # thresholds a few ulps above (smaller masks) and below, the difference is rounding
        # at a threshold; the patterns then only have to add up to the unit's counts.
        ulps = 16 * np.finfo(np.float32).eps * np.maximum(np.abs(probe["thresholds"]), 1)
        above, below = (
            reference_at(probe["thresholds"] + ulps),
            reference_at(probe["thresholds"] - ulps),
        )
        monotone = [k for k in bad if k != "pattern_pixels"]
        within = all(((above[k] <= got[k]) & (got[k] <= below[k])).all() for k in monotone)
        if "pattern_pixels" in bad:
            c = probe["labels"].num_categories
            bits = (np.arange(2**c)[:, None] >> np.arange(c)[None, :]) & 1
            within &= np.array_equal(got["pattern_pixels"].sum(1), got["unit_total"])
            within &= np.array_equal(got["pattern_pixels"] @ bits, got["unit_pixels"])
        if within:
            bad = [ULP]
    shapes = f"acts {probe['acts'].shape} pixel_labels {probe['pixel_labels'].shape}"
    return f"{restriction} {kwargs} {shapes}", bad


# ----------------------------------------------------------------------------- results


def results_case(seed: int) -> tuple[str, list[str]]:
    """(description, mismatches) of one random layer of counts scored by
    `results.layer_result` against `reference.reference_iou` and `reference_unit_labels`:
    equal IoUs within and across categories (copied columns), zero unions, silent units,
    labels of no category, a random subset of scored categories and IoU threshold."""
    rng = np.random.default_rng(seed)
    k, num_labels, num_categories = (int(v) for v in rng.integers(1, 12, 3))
    num_labels += 1
    primary = rng.integers(-1, num_categories, num_labels).astype(np.int32)
    primary[0] = -1
    labels = LabelSpace(
        tuple(f"cat{j}" for j in range(num_categories)),
        ("-", *(f"label{i}" for i in range(1, num_labels))),
        primary,
        tuple(bool(b) for b in rng.random(num_categories) < 0.3),
    )
    label_pixels = rng.integers(0, 50, num_labels) * (rng.random(num_labels) < 0.8)
    unit_total = rng.integers(0, 80, k) * (rng.random(k) < 0.85)
    unit_pixels = (rng.random((k, num_categories)) * (unit_total[:, None] + 1)).astype(np.int64)
    cap = np.minimum(label_pixels[None, :], unit_pixels[:, np.maximum(primary, 0)])
    intersection = (rng.random((k, num_labels)) * (cap + 1)).astype(np.int64)
    intersection[:, primary < 0] = 0
    for _ in range(int(rng.integers(0, 4))):  # a label's counts copied to another: equal IoUs
        a, b = rng.integers(1, num_labels, 2)
        if primary[a] >= 0 and primary[b] >= 0:
            label_pixels[b] = label_pixels[a]
            unit_pixels[:, primary[b]] = unit_pixels[:, primary[a]]
            intersection[:, b] = intersection[:, a]
    # Counts as a tally's: no intersection above its label's or its unit's category's pixels.
    cap = np.minimum(label_pixels[None, :], unit_pixels[:, np.maximum(primary, 0)])
    intersection = np.minimum(intersection, cap)
    counts = {
        "intersection": intersection,
        "label_pixels": label_pixels.astype(np.int64),
        "unit_pixels": unit_pixels,
        "unit_total": unit_total.astype(np.int64),
    }
    categories = None
    if rng.random() < 0.4:
        categories = tuple(c for c in labels.categories if rng.random() < 0.6) or (
            labels.categories[0],
        )
    threshold = float(rng.choice([0.0, 0.04, 0.2]))
    desc = f"{k} units, {num_labels} labels, {num_categories} categories, scored {categories}"
    got = results.layer_result(
        "layer", counts, labels, iou_threshold=threshold, categories=categories
    )
    iou = reference.reference_iou(counts, labels)
    want = reference.reference_unit_labels(iou, labels, threshold, categories, unit_total)
    bad = [] if np.array_equal(got.iou, iou) else ["iou"]
    scored = labels.categories if categories is None else categories
    scored = [c for c in labels.categories if c in scored]
    for u, ref in enumerate(want):
        cat = int(got.best_category[u])
        name = labels.categories[cat] if cat >= 0 else None
        if (int(got.best_label[u]), name, float(got.best_iou[u])) != (
            ref["label"],
            ref["category"],
            ref["iou"],
        ):
            bad.append(f"unit {u} best")
        if bool(got.interpretable[u]) != ref["interpretable"]:
            bad.append(f"unit {u} interpretable")
        for col, c in enumerate(scored):
            if int(got.category_label[u, col]) != ref["per_category"][c][0]:
                bad.append(f"unit {u} {c}")
    return desc, bad


# --------------------------------------------------------------------------- quantiles


def quantile_case(seed: int) -> tuple[str, list[str]]:
    """(description, mismatches) of one random quantile case (exact and histogram modes)."""
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 3000)), int(rng.choice([1, 3, 8, 33]))
    q = float(rng.choice([1e-4, 0.005, 0.01, 0.05, 0.3, 0.5, 0.999]))
    dtype = str(rng.choice(["float16", "bfloat16"]))
    kind = rng.integers(0, 4)
    if kind == 0:
        x = rng.normal(size=(n, k))
    elif kind == 1:  # few values: ties everywhere
        x = rng.integers(-2, 3, (n, k)).astype(float)
    elif kind == 2:  # mostly zeros
        x = np.maximum(rng.normal(size=(n, k)), 0) * (rng.random((n, k)) < 0.05)
    else:  # wide exponents: subnormals and overflow to inf in 16 bits
        x = rng.normal(size=(n, k)) * 10.0 ** rng.integers(-8, 5, (n, k))
    x = x.astype(np.float32)
    x[rng.random(x.shape) < 0.01] = -0.0
    if rng.random() < 0.3:
        x[rng.random(x.shape) < 0.01] = -np.inf
    x = x.astype(jnp.dtype(dtype)).astype(np.float32)
    want = quantiles.reference_threshold(x, q)
    modes = {
        "exact": (
            lambda: quantiles.exact_init(k, n, q),
            quantiles.exact_update,
            quantiles.exact_merge,
            quantiles.exact_threshold,
        ),
        "histogram": (
            lambda: quantiles.histogram_init(k, dtype, n, q),
            quantiles.histogram_update,
            quantiles.histogram_merge,
            quantiles.histogram_threshold,
        ),
    }
    bad = []
    for mode, (init, update, merge, threshold) in modes.items():
        cuts = rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, 4))), replace=False)
        states = []
        for part in np.split(np.arange(n), np.sort(cuts)):
            state, batch = init(), int(rng.integers(1, 700))
            for i in range(0, len(part), batch):
                rows, pad = part[i : i + batch], int(rng.integers(0, 5))
                xb = np.concatenate([x[rows], np.full((pad, k), 7.0, np.float32)])
                valid = np.arange(len(xb)) < len(rows)
                state = jax.jit(update)(state, xb, valid)
            states.append(state)
        state = states[0]
        for other in states[1:]:
            state = jax.jit(merge)(state, other)
        got = np.asarray(threshold(state, q), np.float32)
        if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            bad.append(mode)
    return f"n={n} k={k} q={q} {dtype} kind={kind}", bad


def sketch_case(seed: int, rows: int = 256, units: int = 8) -> tuple[str, list[str]]:
    """(description, mismatches) of one random sketch (`max_count` given, as the engine
    does): bitwise the reference while q * n < size / 2 (nothing compacted yet), else
    certified and within 5% of the reference's count above the threshold; streams in
    1-3 shards (seeds as the engine's devices) merged, over orders that fool prefilters."""
    from jaxdissect.statistics import shard_seed

    rng = np.random.default_rng(seed)
    q = float(rng.choice([0.005, 0.05]))
    n = rows * int(rng.integers(1, 81))
    g = rng.normal(size=(n, units))
    columns = {
        "normal": g[:, 0],
        "relu": np.maximum(g[:, 1], 0),
        "ties": np.round(g[:, 2]),
        "lognormal": np.exp(1.5 * g[:, 3]),
        "ascending": np.sort(g[:, 4]),
        "descending": np.sort(g[:, 5])[::-1],
        "early block": np.where(np.arange(n) < n // 40, 10 + g[:, 6] ** 2, g[:, 6]),
        "saturated": np.clip(3 * g[:, 7], 0, 6),
    }
    x = np.stack(list(columns.values()), 1).astype(np.float32)
    shards = np.array_split(np.arange(n // rows), int(rng.integers(1, 4)))
    update, merge = jax.jit(quantiles.sketch_update), jax.jit(quantiles.sketch_merge)
    states = []
    for i, batches in enumerate(shards):
        state = quantiles.sketch_init(units, q=q, seed=shard_seed(seed, i), max_count=n)
        for b in batches:
            state = update(state, x[b * rows : (b + 1) * rows], np.ones(rows, bool))
        states.append(state)
    state = states[0]
    for other in states[1:]:
        state = merge(state, other)
    desc = f"q={q} n={n} {len(shards)} shards"
    want = quantiles.reference_threshold(x, q)
    if not quantiles.sketch_certified(state).all():
        return desc, ["not certified"]
    got = np.asarray(quantiles.sketch_threshold(state), np.float32)
    if q * n < quantiles.DEFAULT_SIZE / 2:
        exact = got.view(np.uint32) == want.view(np.uint32)
        return desc, [
            f"{name} not exact" for name, ok in zip(columns, exact, strict=True) if not ok
        ]
    above, want_above = (x > got).sum(0), (x > want).sum(0)
    err = np.abs(above - want_above) / np.maximum(want_above, 1)
    return desc, [
        f"{name} off by {e:.1%}" for name, e in zip(columns, err, strict=True) if e > 0.05
    ]


# ---------------------------------------------------------------------------- formulas


def formula_case(seed: int) -> tuple[str, list[str]]:
    """(description, mismatches) of one random batch of formula counts
    (`formula_counts.batch_formula_counts`: random formulas of length 1-3 per unit, out-of-
    range concepts included) against `formula_reference.reference_counts`."""
    from tests import test_formula_counts as cases

    rng = np.random.default_rng(seed)
    probe = tally_probe(rng)
    slots, tie_rule = int(rng.integers(1, 11)), str(rng.choice(["strict", "inclusive"]))
    chunk = int(rng.integers(1, 5)) if rng.random() < 0.5 else None
    got, want = cases.counts_of_random_formulas(probe, rng, slots, chunk, tie_rule)
    shapes = f"acts {probe['acts'].shape} pixel_labels {probe['pixel_labels'].shape}"
    desc = f"{slots} slots, chunk {chunk}, {tie_rule}, {shapes}"
    return desc, [key for key in want if not np.array_equal(got[key], want[key])]


# ------------------------------------------------------------------------------ search


def search_case(seed: int) -> tuple[str, list[str]]:
    """(description, mismatches) of one random formula search: the beam against the plain
    numpy beam, the optimal mode against brute force, under a random union restriction."""
    from jaxdissect import formula_search
    from tests import formula_reference
    from tests import test_formula_search as cases

    rng = np.random.default_rng(seed)
    restriction = str(rng.choice(["plain", "presence", "overlap", "none"]))
    if restriction == "plain":
        num_labels, k = int(rng.integers(4, 10)), int(rng.integers(1, 7))
        units, concepts = cases._random_case(seed, num_labels=num_labels, k=k)
    else:  # the 7 labels of `cases.CATEGORY`
        units, concepts = cases._restricted_case(seed)
    num_labels, k = concepts.shape[-1], units.shape[-1]
    if rng.random() < 0.4:  # two concepts of one mask: ties everywhere
        a, b = rng.choice(np.arange(1, num_labels), 2, replace=False)
        concepts[..., b] = concepts[..., a]
    if rng.random() < 0.3:  # a unit that is exactly a concept (IoU 1)
        units[..., 0] = concepts[..., rng.integers(1, num_labels)]
    if rng.random() < 0.2 and k > 1:  # a unit that fires everywhere
        units[..., 1] = True
    if restriction == "plain":
        first, passes, category = cases._first(units, concepts), None, None
    else:
        first, passes = cases._restricted_first(units, concepts, restriction)
        category = cases.CATEGORY
    ops = tuple(o for o in (0, 1, 2) if rng.random() < 0.7) or (int(rng.integers(0, 3)),)
    penalty = float(rng.choice([1.0, 0.9, 0.7]))
    length, width, slots = int(rng.integers(1, 4)), int(rng.integers(1, 7)), int(rng.integers(1, 5))
    desc = (
        f"{restriction}, {concepts.shape[-1]} labels, {units.shape[-1]} units, ops {ops}, "
        f"penalty {penalty}, length {length}, beam {width}, slots {slots}"
    )
    # Concepts with pixels (an empty one adds nothing) and, restricted, a category.
    candidates = [
        c
        for c in range(1, concepts.shape[-1])
        if concepts[..., c].any() and (category is None or category[c] >= 0)
    ]
    evaluate = cases._numpy_evaluate(units, concepts)
    beam = formula_search.beam_search(
        first, evaluate, max_length=length, beam=width, ops=ops, penalty=penalty
    )
    want_beam = formula_reference.beam(
        units, concepts, candidates, length, width, ops, penalty, passes, category
    )
    bad = [
        f"unit {u} beam"
        for u in range(units.shape[-1])
        if [(b.score, b.formula) for b in beam[u]] != want_beam[u]
    ]
    brute = formula_reference.brute_force(
        units, concepts, candidates, length, ops, penalty, passes, category
    )
    start = [row[0] for row in beam] if rng.random() < 0.7 else None
    best = formula_search.optimal_search(
        first, evaluate, max_length=length, ops=ops, penalty=penalty, slots=slots, start=start
    )
    for u in range(units.shape[-1]):
        score, formula = brute[u]
        if abs(best[u].score - score) > 1e-12 * abs(score) or best[u].formula != formula:
            bad.append(f"unit {u} optimal: {best[u].formula} {best[u].score} != {formula} {score}")
    return desc, bad


# ------------------------------------------------------------------------------ engine


def engine_case(
    seed: int,
    threshold_on: str = "raw",
    work: pathlib.Path | None = None,
) -> tuple[str, list[str]]:
    """(description, mismatches) of one random dissection of the small test CNN."""
    from jaxdissect.data import synthetic
    from jaxdissect.data.broden import Broden
    from jaxdissect.models.load import init_variables
    from tests import test_engine

    rng = np.random.default_rng(seed)
    work = pathlib.Path(tempfile.mkdtemp() if work is None else work)
    n = int(rng.choice([5, 9, 13, 20]))
    root = work / f"broden{n}"
    probe = Broden.open(root if root.exists() else synthetic.generate_tiny(root, num_images=n))
    model = test_engine.SmallCNN()
    variables = init_variables(model, jnp.zeros((1, 32, 32, 3)), seed=int(rng.integers(0, 100)))
    devices = int(rng.choice([1, 2, 4, 8]))
    batch = devices * int(rng.choice([1, 2, 4]))
    # float32 maps upsampled inside pass 1's program may round a value differently from the
    # reference by an ulp or a few even unoptimised (one of its fusions contracts): the
    # upsampled campaign keeps to 16-bit maps, where it agrees bitwise.
    dtypes = ["float16", "bfloat16"] + (["float32"] if threshold_on == "raw" else [])
    dtype = str(rng.choice(dtypes))
    modes = ["exact", "auto"] + (
        ["histogram"] if dtype != "float32" and threshold_on == "raw" else []
    )
    categories = None
    if rng.random() < 0.3:
        every = probe.labels.categories
        categories = tuple(c for c in every if rng.random() < 0.6) or every[:1]
    settings = engine.Settings(
        quantile=float(rng.choice([0.005, 0.05, 0.2])),
        quantile_mode=str(rng.choice(modes)),
        threshold_on=threshold_on,
        restriction=str(rng.choice(["presence", "overlap", "none"])),
        tie_rule=str(rng.choice(["strict", "inclusive"])),
        activation_dtype=dtype,
        batch_size=batch,
        categories=categories,
    )
    layers = tuple(x for x in ("conv1", "conv2", "conv3") if rng.random() < 0.6) or ("conv2",)
    cache = str(rng.choice(["none", "host", "device"]))
    method = str(rng.choice(["auto", "segment", "compact", "matmul"]))
    desc = (
        f"{n} images, {devices} devices, batch {batch}, layers {layers}, cache {cache}, "
        f"method {method}, {settings}"
    )
    got = test_engine._run(
        model,
        variables,
        probe,
        settings,
        layers,
        parallel.data_mesh(devices),
        activation_cache=cache,
        tally_method=method,
    )
    per_device = batch // devices

    @jax.jit
    def forward(x):
        _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        return state["intermediates"]

    images = np.stack([np.asarray(probe.read_image(i)) for i in range(len(probe))])
    acts = {layer: [] for layer in layers}
    for i in range(0, len(probe), per_device):
        x = images[i : i + per_device]
        x = np.concatenate([x, np.zeros((per_device - len(x), *x.shape[1:]), x.dtype)])
        out = forward(test_engine.SPEC(jnp.asarray(x)))
        for layer in layers:
            a = np.asarray(out[layer]["__call__"][0]).astype(dtype).astype(np.float32)
            acts[layer].extend(a[: len(probe) - i])
    if categories is None:
        examples = [probe[i] for i in range(len(probe))]
        pixel = np.stack([e["pixel_labels"] for e in examples])
        scalar = np.stack([e["image_labels"] for e in examples])
        labels = probe.labels
    else:
        pixel, scalar = test_engine._literal_labels(probe, categories)
        labels = engine.restrict_categories(probe.labels, categories, probe.coverage)
    bad = []
    for layer in layers:
        a = np.stack(acts[layer])
        values = a
        if threshold_on == "upsampled":
            values = np.zeros((len(a), *probe.seg_size, a.shape[-1]), np.float32)
            for x, u in np.ndindex(len(a), a.shape[-1]):
                values[x, :, :, u] = reference.reference_upsample(a[x, :, :, u], probe.seg_size)
        thresholds = quantiles.reference_threshold(
            values.reshape(-1, values.shape[-1]), settings.quantile
        )
        if not np.array_equal(got[layer].thresholds.view(np.uint32), thresholds.view(np.uint32)):
            bad.append(f"{layer} thresholds")
            continue
        ref = reference.reference_dissect(
            a,
            thresholds,
            pixel,
            scalar,
            labels,
            restriction=settings.restriction,
            tie_rule=settings.tie_rule,
            quantile=settings.quantile,
        )
        bad += [
            f"{layer} {key}"
            for key in results.COUNT_KEYS
            if not np.array_equal(got[layer].counts[key], ref["counts"][key])
        ]
        result = results.layer_result(layer, got[layer].counts, labels)
        if result.best_label.tolist() != [u["label"] for u in ref["units"]]:
            bad.append(f"{layer} labels")
    return desc, bad


# ------------------------------------------------------------------------------- broden

# What a mutated CSV cell becomes: numbers out of range or malformed, paths that escape or
# cannot exist, separators, other scripts' digits, markup.
HOSTILE_CELLS = (
    *("", "-1", "0", "65536", "1e3", " 12 ", "NaN", "0x10", "999999999999999999999"),
    *("\u0661\u0662", "12\x00", "1;1", "3;;4", "1;999", "0;0", "a;b", '"', "<script>"),
    *("x.png", "../x.png", "/etc/passwd", "ade20k", "train", "val", "test", "32", "16"),
    *("label", "object(3)", "color(1);object(2)", "\u00e9t\u00e9"),
)


def broden_case(seed: int, base: pathlib.Path) -> tuple[str, list[str]]:
    """(description, failures) of one mutation of the Broden folder `base` (a copy of it
    is mutated, opened and read back, then removed)."""
    import csv
    import io
    import random
    import shutil

    from jaxdissect import cli
    from jaxdissect.data.broden import Broden

    rng = random.Random(seed)
    root = base.with_name(f"{base.name}-{seed}")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(base, root)
    kind = rng.choice(["csv", "csv", "csv", "png", "jpg"])
    path = rng.choice(sorted(p for p in root.rglob(f"*.{kind}")))
    data = bytearray(path.read_bytes())
    ops = ["change", "insert", "delete", "cut"] + (["line", *["cell"] * 5] if kind == "csv" else [])
    op = rng.choice(ops)
    if op == "change":
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == "insert":
        data.insert(rng.randrange(len(data) + 1), rng.choice(b',;\n0123456789-. "\x00a\xff'))
    elif op == "delete":
        i = rng.randrange(len(data))
        del data[i : i + rng.randint(1, 4)]
    elif op == "cut":
        del data[rng.randrange(len(data)) :]
    else:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")))
        r = rng.randrange(len(rows))
        if op == "line":
            rows.insert(r, rows[r])
        elif rows[r]:
            c = rng.randrange(len(rows[r]))
            rows[r][c] = rng.choice(HOSTILE_CELLS)
            op = f"cell {r},{c} = {rows[r][c]!r}"
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows(rows)
        data = bytearray(text.getvalue().encode())
    path.write_bytes(bytes(data))
    desc = f"{op} in {path.relative_to(root)}"
    try:
        source = Broden.open(root)
        for i in range(len(source)):
            source.read_image(i)
            source.read_labels(i)
        return desc, []
    except UnicodeDecodeError as e:  # a ValueError, but says nothing of the file
        return desc, [f"UnicodeDecodeError: {e}"]
    except cli.USER_ERRORS as e:
        named = str(path) in str(e) or path.name in str(e)
        return desc, [] if named else [f"{type(e).__name__} names no file: {e}"]
    finally:
        shutil.rmtree(root, ignore_errors=True)


def broden_base(work: pathlib.Path) -> pathlib.Path:
    """The tiny Broden the broden cases mutate: 8 images of 32 px, every category."""
    from jaxdissect.data import synthetic

    return synthetic.generate_tiny(work / "broden", num_images=8, size=32)


# ------------------------------------------------------------------------------ weights


def weights_bases(work: pathlib.Path) -> list[pathlib.Path]:
    """Small weight files of every format `checkpoint_io` and `npz_file` read, in `work`."""
    import torch
    from safetensors.torch import save_file

    from tests.model_testing import torchscript_save

    generator = torch.Generator().manual_seed(0)
    state = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "bn.running_mean": torch.zeros(4),
        "bn.num_batches_tracked": torch.tensor(3),
        "fc.weight": torch.randn(2, 4, generator=generator).half(),
        "fc.bias": torch.randn(2, generator=generator).to(torch.bfloat16),
        "strided": torch.randn(6, 4, generator=generator)[::2],
    }
    work.mkdir(parents=True, exist_ok=True)
    torch.save(state, work / "zip.pth")
    torch.save(state, work / "legacy.pth", _use_new_zipfile_serialization=False)
    torch.save({"state_dict": state, "epoch": 3, "arch": "resnet18"}, work / "wrapped.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(work / "st.safetensors"))
    np.savez(work / "w.npz", **{k: v.float().numpy() for k, v in state.items()})
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save(module, work / "whole.pth")
    torch.save(module, work / "whole_legacy.pth", _use_new_zipfile_serialization=False)
    torchscript_save(module.eval(), torch.zeros(1, 3, 5, 5), work / "script.pt")
    names = ("zip.pth", "legacy.pth", "wrapped.pth", "st.safetensors", "w.npz", "whole.pth")
    return [work / n for n in (*names, "whole_legacy.pth", "script.pt")]


def weights_case(seed: int, bases: list[pathlib.Path]) -> tuple[str, list[str]]:
    """(description, failures) of one mutated copy of one of `bases` (removed after)."""
    import io
    import random
    import zipfile

    from jaxdissect.models import checkpoint_io, npz_file

    rng = random.Random(seed)
    base = rng.choice(bases)
    data = bytearray(base.read_bytes())
    op = rng.choice(["change", "change", "insert", "delete", "cut", "member"])
    if op == "change":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif op == "insert":
        at = rng.randrange(len(data) + 1)
        data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    elif op == "delete":
        at = rng.randrange(len(data))
        del data[at : at + rng.randint(1, 8)]
    elif op == "cut":
        del data[rng.randrange(len(data)) :]
    elif zipfile.is_zipfile(base):  # a valid zip whose one member's bytes are corrupt
        out = io.BytesIO()
        with zipfile.ZipFile(base) as old, zipfile.ZipFile(out, "w") as new:
            victim = rng.choice(old.namelist())
            for name in old.namelist():
                member = bytearray(old.read(name))
                if name == victim and member:
                    for _ in range(rng.randint(1, 3)):
                        member[rng.randrange(len(member))] = rng.randrange(256)
                    if rng.random() < 0.3:
                        del member[rng.randrange(len(member)) :]
                new.writestr(name, bytes(member))
        data, op = bytearray(out.getvalue()), f"member {victim}"
    path = base.with_name(f"m{seed}{base.suffix}")
    path.write_bytes(bytes(data))
    desc = f"{op} of {base.name}"
    load = npz_file.load_npz if base.suffix == ".npz" else checkpoint_io.load_state_dict
    try:
        load(path)
        return desc, []
    except checkpoint_io.CheckpointError as e:
        return desc, [] if str(e).startswith(f"{path}: ") else [f"names no file: {e}"]
    finally:
        path.unlink()


# ---------------------------------------------------------------------------- results_json

# What a mutated results.json field becomes.
HOSTILE_VALUES = (None, "x", "", -1, 0, 3.5, 1e308, True, [], [1, 2], {}, {"a": 1})


def results_json_run(work: pathlib.Path) -> tuple[pathlib.Path, LabelSpace]:
    """A finished run's folder as the scripts built on one read it: results.json of two
    layers (written by `results.write_results_json` with the settings the pipeline writes)
    and their stats npz."""
    from jaxdissect import store

    rng = np.random.default_rng(0)
    labels = LabelSpace(
        ("color", "object", "scene"),
        ("-", "red-c", "sky", "car", "street-s"),
        np.array([-1, 0, 1, 1, 2], np.int32),
        (False, False, True),
    )
    layers = []
    for name, k in (("conv1", 3), ("top", 4)):
        inter = rng.integers(0, 50, (k, 5))
        counts = {
            "intersection": inter,
            "label_pixels": np.full(5, 100),
            "unit_pixels": np.full((k, 3), 100),
            "unit_total": np.full(k, 100),
            "images": np.int64(10),
        }
        layers.append(results.layer_result(name, counts, labels, path=f"Net/{name}"))
    settings = {
        "model": "small",
        "model_key": "k",
        "dataset": "tiny",
        "tie_rule": "strict",
        "layers": ["conv1", "top"],
        "layer_paths": {"conv1": "Net/conv1", "top": "Net/top"},
        "input_spec": {"size": 32, "mean": [0, 0, 0], "std": [1, 1, 1], "scale": 1.0, "bgr": False},
    }
    out = work / "run"
    out.mkdir(parents=True, exist_ok=True)
    results.write_results_json(out / "results.json", layers, settings)
    for stem, layer in zip(results.layer_file_stems(settings["layers"]), layers, strict=True):
        thresholds = np.ones(layer.num_units, np.float32)
        store.save_arrays(out / results.stats_npz_name(stem), {"thresholds": thresholds})
    return out, labels


def _json_paths(value: object, prefix: tuple = ()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _json_paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:3]):
            yield from _json_paths(v, (*prefix, i))


def results_json_case(seed: int, run: pathlib.Path) -> tuple[str, list[str]]:
    """(description, failures) of one structural mutation of `run`'s results.json (a field
    deleted, replaced by a value of another type, added, or an element repeated), with its
    checksum or without one, read by every reader of a finished run: each raises a user
    error naming the file or reads, with a checksum, what was written."""
    import copy
    import json
    import random
    import shutil

    from jaxdissect import cli, finished, pipeline, studies

    rng = random.Random(seed)
    document = json.loads((run / "results.json").read_text())
    checked = rng.random() < 0.5  # else a file without the checksum (or one crafted anew)
    if not checked:
        del document["checksum"]
    path = rng.choice([p for p in _json_paths(document) if p])
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    op = rng.choice(["delete", "value", "value", "add", "repeat"])
    target = parent[path[-1]]
    if op == "delete":
        del parent[path[-1]]
    elif op == "value":
        parent[path[-1]] = rng.choice(HOSTILE_VALUES)
    elif op == "add" and isinstance(target, dict):
        target[rng.choice(["zz", "mean", "layer", "units", "size"])] = rng.choice(HOSTILE_VALUES)
    elif op == "add" and isinstance(target, list):
        target.append(rng.choice(HOSTILE_VALUES))
    elif isinstance(target, list) and target:
        target.append(copy.deepcopy(target[0]))
    else:
        parent[path[-1]] = [target]
    desc = f"{op} at {'.'.join(map(str, path))}{'' if checked else ', no checksum'}"
    out = run.with_name(f"{run.name}-{seed}")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run, out)
    (out / "results.json").write_text(json.dumps(document))

    def readers(folder: pathlib.Path) -> dict:
        return {
            "read_layer": lambda: [finished.read_layer(folder, name) for name in ("conv1", "top")],
            "results_rows": lambda: studies.results_rows("x", folder),
            "results_rows of top": lambda: studies.results_rows("x", folder, ["top"]),
            "results_method": lambda: studies.results_method(folder),
            "probe_set": lambda: studies.probe_set(folder),
            "follow-ons' digest": lambda: pipeline._finished_digest(folder, ["conv1", "top"]),
        }

    intact = {name: repr(read()) for name, read in readers(run).items()}
    failures = []
    try:
        for name, read in readers(out).items():
            try:
                got = repr(read()).replace(str(out), str(run))
            except cli.USER_ERRORS as e:
                if "results.json" not in str(e) and str(out) not in str(e):
                    failures.append(f"{name}: {type(e).__name__} names no file: {e}")
            except Exception as e:  # any other is the finding
                failures.append(f"{name}: {type(e).__name__}: {e}")
            else:  # (a digest is a key: one of other content, or none, is the right one)
                if checked and got != intact[name] and name != "follow-ons' digest":
                    failures.append(f"{name}: read other values than the file's as written")
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return desc, failures


# ---------------------------------------------------------------------------- converted


def converted_base(work: pathlib.Path) -> pathlib.Path:
    """A converted ResNet-18 of 3 classes (zero weights), as models/convert.py writes it."""
    from jaxdissect.models import zoo
    from jaxdissect.models.convert import save_variables, variables_template

    meta = {"arch": "resnet18", "num_classes": 3, "options": {}, "input_size": 32}
    save_variables(
        work / "resnet18", variables_template(zoo.build("resnet18", num_classes=3)), meta
    )
    return work / "resnet18"


def converted_case(seed: int, base: pathlib.Path) -> tuple[str, list[str]]:
    """(description, failures) of one mutation of `base`'s meta.json, loaded as
    `--model=resnet18 --weights=<copy>` (the copy removed after)."""
    import json
    import random
    import shutil

    from jaxdissect import cli
    from jaxdissect.models import load as model_load

    rng = random.Random(seed)
    meta = json.loads((base / "meta.json").read_text())
    key = rng.choice([*meta, "options.x", "options.width", "options.dtype", "extra"])
    value = rng.choice((*HOSTILE_VALUES, "resnet18", "alexnet", 10**30))
    if key.startswith("options."):
        meta["options"] = meta["options"] if isinstance(meta.get("options"), dict) else {}
        meta["options"][key[8:]] = value
        desc = f"{key} = {value!r}"
    elif rng.random() < 0.3:
        meta.pop(key, None)
        desc = f"{key} deleted"
    else:
        meta[key], desc = value, f"{key} = {value!r}"
    folder = base.with_name(f"{base.name}-{seed}")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(base, folder)
    (folder / "meta.json").write_text(json.dumps(meta))
    try:
        model_load.load("resnet18", weights=str(folder))
        return desc, []
    except cli.USER_ERRORS as e:
        names = (str(folder), "option", "num_classes", f"{key.removeprefix('options.')}=")
        named = any(text in str(e) for text in names)
        return desc, [] if named else [f"{type(e).__name__} names no file or option: {e}"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------- tfds


def tfds_base(work: pathlib.Path) -> pathlib.Path:
    """A TFDS build of a tiny synthetic Broden (6 images of 32 px)."""
    from jaxdissect.data import synthetic, tfds_broden

    root = synthetic.generate_tiny(work / "broden-for-tfds", num_images=6, size=32)
    return tfds_broden.build(root, work / "tfds")


def tfds_case(seed: int, build: pathlib.Path) -> tuple[str, list[str]]:
    """(description, failures) of one mutation of a copy of `build`, opened and read."""
    import json
    import random
    import shutil

    from jaxdissect import cli
    from jaxdissect.data import tfds_broden

    rng = random.Random(seed)
    copy = build.parent / f"copy-{seed}" / build.name
    shutil.rmtree(copy.parent, ignore_errors=True)
    shutil.copytree(build, copy)
    path = copy / rng.choice(sorted(p.name for p in build.iterdir() if p.is_file()))
    if path.suffix == ".json" and rng.random() < 0.7:
        document = json.loads(path.read_text())
        where = rng.choice([p for p in _json_paths(document) if p])
        parent = document
        for key in where[:-1]:
            parent = parent[key]
        if rng.random() < 0.3:
            del parent[where[-1]]
            desc = f"{'.'.join(map(str, where))} deleted in {path.name}"
        else:
            parent[where[-1]] = rng.choice(HOSTILE_VALUES)
            desc = f"{'.'.join(map(str, where))} = {parent[where[-1]]!r} in {path.name}"
        path.write_text(json.dumps(document))
    else:
        data = bytearray(path.read_bytes())
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            desc = f"bytes changed in {path.name}"
        else:
            del data[rng.randrange(len(data)) :]
            desc = f"{path.name} cut"
        path.write_bytes(bytes(data))
    try:
        source = tfds_broden.TfdsBroden(copy)
        for i in range(len(source)):
            source[i]
            source.read_labels(i)
        return desc, []
    except cli.USER_ERRORS as e:
        return desc, [] if str(copy) in str(e) else [f"{type(e).__name__} names no build: {e}"]
    finally:
        shutil.rmtree(copy.parent, ignore_errors=True)


# -------------------------------------------------------------------------------- flags

FLAG_VALUES = (
    *("", "0", "-1", "1", "2", "0.5", "1.5", "1e308", "nan", "inf", "-inf", "99999999999999999999"),
    *(
        "x",
        "a,b",
        ",",
        "=",
        "true",
        "none",
        "/nonexistent",
        "..",
        "~",
        "conv1",
        "top,top",
        "\u00e9",
    ),
)
# Flags left alone: one a process acts on before any JAX call, and absl's own.
_FLAGS_LEFT = ("distributed", "flagfile", "undefok", "only_check_args", "v", "verbosity")


class _Stopped(Exception):
    """Raised in place of the dissection: the flags were taken."""


def flags_case(seed: int, data: pathlib.Path) -> tuple[str, list[str]]:
    """(description, failures) of dissect.py run (in this process) with one or two of its
    flags at hostile values, the dissection itself replaced by a stop."""
    import random

    from absl import flags

    from jaxdissect import cli, pipeline
    from tests.experiment_testing import script

    dissect = script("dissect")
    fv = flags.FlagValues()
    dissect.define_flags(fv)
    own = sorted(n for n in fv.flag_values_dict() if n not in _FLAGS_LEFT)
    rng = random.Random(seed)
    picks = [(rng.choice(own), rng.choice(FLAG_VALUES)) for _ in range(rng.randint(1, 2))]
    desc = " ".join(f"--{n}={v!r}" for n, v in picks)
    base = [f"--data={data}", "--model=tests.fixtures.small_model:make", "--weights="]
    base += ["--noprogress", "--noreport", "--devices=1", "--batch_size=4"]
    base += [f"--output_dir={data.parent / f'flags-out-{seed}'}"]
    try:
        fv(["prog", *base, *(f"--{n}={v}" for n, v in picks)])
    except flags.Error:
        return desc, []  # absl's refusal: one line and the usage hint
    dissect_before = pipeline.dissect

    def stop(*args, **kwargs):
        raise _Stopped

    pipeline.dissect = stop
    try:
        cli.script_main(lambda: dissect.run(fv), fv, split_cpu=False)(["prog"])
        return desc, []
    except _Stopped:
        return desc, []
    except SystemExit as e:
        text = str(e.code).strip()
        return desc, [] if "\n" not in text else [f"several lines: {text[:300]}"]
    finally:
        pipeline.dissect = dissect_before


# --------------------------------------------------------------------------- checkpoint


def _damaged_copy(
    folder: pathlib.Path, seed: int, candidates: Callable[[pathlib.Path], Iterable[pathlib.Path]]
) -> tuple[pathlib.Path, str]:
    """(copy, description): a copy of the checkpoint `folder` with one of the files
    `candidates(copy)` yields changed in 1-3 bytes, or cut, as `seed` draws."""
    import random
    import shutil

    rng = random.Random(seed)
    copy = folder.with_name(f"{folder.name}-{seed}")
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(folder, copy)
    path = rng.choice(sorted(p for p in candidates(copy) if p.is_file()))
    data = bytearray(path.read_bytes())
    if data and rng.random() < 0.5:
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        desc = f"bytes changed in {path.relative_to(copy)}"
    else:
        del data[rng.randrange(max(len(data), 1)) :]
        desc = f"{path.relative_to(copy)} cut"
    path.write_bytes(bytes(data))
    return copy, desc


def checkpoint_base(work: pathlib.Path) -> tuple[pathlib.Path, dict]:
    """(folder, state): a `StreamCheckpoint` of a small state on 8 devices after batch 3."""
    from jaxdissect.checkpoint import StreamCheckpoint

    mesh = parallel.data_mesh()
    sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = {
        "counts": jax.device_put(jnp.arange(8 * 64, dtype=jnp.int32).reshape(8, 64), sharded),
        "values": jax.device_put(jnp.linspace(0, 1, 8 * 16).reshape(8, 16), sharded),
    }
    checkpoint = StreamCheckpoint(work / "checkpoint", every=1)
    checkpoint.maybe_save(3, state)
    checkpoint.close()
    return work / "checkpoint", state


def checkpoint_case(seed: int, base: tuple[pathlib.Path, dict]) -> tuple[str, list[str]]:
    """(description, failures) of one damaged copy of the checkpoint `base`, restored."""
    import shutil

    from jaxdissect.checkpoint import StreamCheckpoint

    folder, state = base
    copy, desc = _damaged_copy(
        folder, seed, lambda c: (p for p in c.rglob("*") if not p.name.startswith("digest"))
    )
    try:
        checkpoint = StreamCheckpoint(copy, every=1)
    except ValueError as e:  # orbax cannot open it: one line naming the folder
        first = str(e).splitlines()[0]
        return desc, [] if str(copy) in first and "\n" not in str(e) else [f"error: {e}"]
    try:
        got, step = checkpoint.restore(state)
        if step and any(not np.array_equal(got[k], state[k]) for k in state):
            return desc, ["restored other numbers"]
        return desc, []
    finally:
        checkpoint.close()
        shutil.rmtree(copy, ignore_errors=True)


# ---------------------------------------------------------------------- train_checkpoint


@flax.struct.dataclass
class _TrainState:
    step: jax.Array
    params: dict


_TRAIN_CONFIG = types.SimpleNamespace(checkpoint_every=5, keep_checkpoints=2, save_steps=())


def train_checkpoint_base(work: pathlib.Path) -> tuple[pathlib.Path, dict[int, _TrainState]]:
    """(folder, state by step): a training run's checkpoints (`training_checkpoints`) of a
    small state at steps 5 and 10, each with unlogged train metrics."""
    from jaxdissect import training_checkpoints

    states = {
        step: _TrainState(
            step=jnp.asarray(step, jnp.int32),
            params={"w": jnp.linspace(0, 1, 96).reshape(8, 12) * step, "b": jnp.arange(12.0)},
        )
        for step in (5, 10)
    }
    folder = work / "train_checkpoints"
    manager = training_checkpoints.checkpoint_manager(folder, _TRAIN_CONFIG)
    for step, state in states.items():
        metrics = [{"loss": np.float32(step), "accuracy": np.float32(0.5)}]
        training_checkpoints.save_state(manager, state, _train_rows(step), metrics)
    manager.close()
    return folder, states


def _train_rows(step: int) -> list[dict[str, float]]:
    """The metrics rows the campaign's checkpoint of `step` keeps."""
    return [{"step": float(s), "train_loss": s / 7} for s in range(0, step + 1, 5)]


def train_checkpoint_case(
    seed: int, base: tuple[pathlib.Path, dict[int, _TrainState]]
) -> tuple[str, list[str]]:
    """(description, failures) of one damaged copy of the step-10 checkpoint, resumed: the
    step-10 state, or (it deleted) the step-5 one, or one line naming the folder."""
    import shutil

    from jaxdissect import training_checkpoints

    folder, states = base
    copy, desc = _damaged_copy(folder, seed, lambda c: (c / "10").rglob("*"))
    try:
        manager = training_checkpoints.checkpoint_manager(copy, _TRAIN_CONFIG)
    except ValueError as e:  # orbax cannot open it: one line naming the folder
        ok = str(copy) in str(e) and "\n" not in str(e)
        return desc, [] if ok else [f"error: {e}"]
    try:
        template = jax.tree.map(jnp.zeros_like, states[5])
        got = training_checkpoints.restore_state(manager, template)
        if got is None:
            return desc, ["nothing restored: the step-5 checkpoint was intact"]
        want = states[int(got.step)]
        same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), got, want)
        pending = training_checkpoints.restore_pending(manager, int(got.step))
        rows = training_checkpoints.restore_rows(manager, int(got.step))
        if (
            not all(jax.tree.leaves(same))
            or [float(m["loss"]) for m in pending] != [float(got.step)]
            or rows != _train_rows(int(got.step))
        ):
            return desc, [f"restored other numbers (step {int(got.step)})"]
        return desc, []
    finally:
        manager.close()
        shutil.rmtree(copy, ignore_errors=True)


# -------------------------------------------------------------------------------- main


def campaign(case: Callable[[int], tuple[str, list[str]]], seeds: range) -> dict[str, int]:
    """Run `case` for every seed, printing each failure; counts of passed / ulp / failed."""
    tally = {"passed": 0, ULP: 0, "failed": 0}
    for seed in seeds:
        try:
            desc, bad = case(seed)
        except Exception:  # a crash is a failure of its case, not of the campaign
            desc, bad = "raised", [traceback.format_exc(limit=3)]
        outcome = "passed" if not bad else ULP if bad == [ULP] else "failed"
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
    base = broden_base(work) if args.target in ("broden", "flags") else None
    bases = weights_bases(work / "weights") if args.target == "weights" else None
    run = results_json_run(work)[0] if args.target == "results_json" else None
    converted = converted_base(work) if args.target == "converted" else None
    tfds_build = tfds_base(work) if args.target == "tfds" else None
    saved = checkpoint_base(work) if args.target == "checkpoint" else None
    trained = train_checkpoint_base(work) if args.target == "train_checkpoint" else None
    case = {
        "tally": tally_case,
        "results": results_case,
        "quantiles": quantile_case,
        "sketch": sketch_case,
        "formulas": formula_case,
        "search": search_case,
        "engine": lambda seed: engine_case(seed, args.threshold_on, work),
        "broden": lambda seed: broden_case(seed, base),
        "weights": lambda seed: weights_case(seed, bases),
        "results_json": lambda seed: results_json_case(seed, run),
        "converted": lambda seed: converted_case(seed, converted),
        "tfds": lambda seed: tfds_case(seed, tfds_build),
        "flags": lambda seed: flags_case(seed, base),
        "checkpoint": lambda seed: checkpoint_case(seed, saved),
        "train_checkpoint": lambda seed: train_checkpoint_case(seed, trained),
    }[args.target]
    start = time.perf_counter()
    outcome = campaign(case, args.seeds)
    seeds = f"{args.seeds.start}:{args.seeds.stop}"
    print(f"{args.target} seeds {seeds}: {outcome} in {time.perf_counter() - start:.0f} s")
    return int(outcome["failed"] > 0)


if __name__ == "__main__":
    sys.exit(main())

"""Each statistic of both passes alone, per layer of the main job (Lite0's five default
layers, batch 32, 600 images): pass 1's thresholds (`--quantile_mode`, default `auto`, the
engine's choice per layer) and top images, pass 2's tally and tie statistics; each jitted
alone on device-resident random normal maps rounded to float16 and random labels (3
planes at 112 x 112, ~30 labels an image, 1,198 labels); compile + first batch and the
median of the next batches, and that median times the job's 19 batches.

  python benchmarks/bench_statistics.py
  python benchmarks/bench_statistics.py --layers=head_preclip --statistics=tally
"""

from __future__ import annotations

import time

import jax
import numpy as np
from _common import refuse_below, refuse_unknown  # the benchmarks folder: sys.path[0]
from absl import app, flags

from jaxdissect import statistics
from jaxdissect.labelspace import LabelSpace

SHAPES = {
    "stem_preclip": (112, 112, 32),
    "stage3": (56, 56, 24),
    "stage4": (28, 28, 40),
    "stage6": (14, 14, 112),
    "head_preclip": (7, 7, 1280),
}
STATISTICS = ("q", "top", "tally", "ties")
BATCH, IMAGES, LABELS, PLANES, SEG = 32, 600, 1198, 3, (112, 112)

flags.DEFINE_list("layers", list(SHAPES), "Layers (of SHAPES) to time.")
flags.DEFINE_list("statistics", list(STATISTICS), "Statistics to time.")
flags.DEFINE_string("quantile_mode", "auto", "Threshold mode of the q statistic.")
flags.DEFINE_integer("batches", 6, "Timed batches after the first.")
FLAGS = flags.FLAGS


def _labels(rng) -> LabelSpace:
    categories = ("object", "part", "material", "color", "scene", "texture")
    primary = np.concatenate([[-1], rng.integers(0, 4, LABELS - 1)]).astype(np.int32)
    return LabelSpace(
        categories=categories,
        names=tuple(f"label{i}" for i in range(LABELS)),
        primary=primary,
        image_level=(False,) * 4 + (True, True),
    )


def _batches(rng, name: str, shape: tuple[int, int, int], n: int) -> list[dict]:
    out = []
    for step in range(n):
        acts = rng.standard_normal((BATCH, *shape)).astype(np.float16).astype(np.float32)
        pixel = (rng.integers(0, 30, (BATCH, PLANES, *SEG)) * 37 % LABELS).astype(np.int32)
        batch = {
            "acts": {name: acts},
            "valid": np.ones(BATCH, bool),
            "index": np.arange(step * BATCH, (step + 1) * BATCH, dtype=np.int32),
            "pixel_labels": pixel,
            "image_labels": rng.integers(0, LABELS, (BATCH, 4)).astype(np.int32),
        }
        out.append(jax.device_put(batch))
    return out


def _statistic(what: str, name: str, shape, labels: LabelSpace) -> statistics.Statistic:
    h, w, k = shape
    thresholds = np.full((k,), 2.6, np.float32)  # ~0.5% of a standard normal above
    if what == "q":
        return statistics.quantile_statistic(
            name,
            k,
            total_count=h * w * IMAGES,
            q=0.005,
            mode=FLAGS.quantile_mode,
            activation_dtype="float16",
        )
    if what == "top":
        return statistics.top_images_statistic(name, k, 10, (h, w))
    if what == "tally":
        return statistics.tally_statistic(name, thresholds, labels, restriction="presence")
    return statistics.ties_statistic(name, thresholds)


def _check_flags() -> None:
    """One line naming the flag at fault (an unknown --statistics timed the ties statistic
    under that name; an unknown --layers was a KeyError)."""
    for flag, known in (("layers", SHAPES), ("statistics", STATISTICS)):
        refuse_unknown(flag, FLAGS[flag].value, list(known))
    refuse_below({"batches": FLAGS.batches})


def main(argv) -> None:
    del argv
    _check_flags()
    rng = np.random.default_rng(0)
    labels = _labels(rng)
    for name in FLAGS.layers:
        shape = SHAPES[name]
        batches = _batches(rng, name, shape, 3)
        for what in FLAGS.statistics:
            stat = _statistic(what, name, shape, labels)
            update = jax.jit(stat.update)
            t0 = time.perf_counter()
            state = jax.block_until_ready(update(jax.device_put(stat.init(0)), batches[0]))
            first = time.perf_counter() - t0
            times = []
            for step in range(1, FLAGS.batches + 1):
                t0 = time.perf_counter()
                state = jax.block_until_ready(update(state, batches[step % 3]))
                times.append(time.perf_counter() - t0)
            median = float(np.median(times))
            print(
                f"{name:13s} {what:6s} compile + first {first:5.2f} s; median "
                f"{median * 1e3:7.1f} ms a batch; x {IMAGES // BATCH + 1} batches "
                f"{median * (IMAGES // BATCH + 1):5.2f} s",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)

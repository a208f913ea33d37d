"""Pass 1's statistics alone, per layer of the main job (Lite0's five default layers,
batch 32, thresholds for 600 images): the quantile sketch and the top images, each jitted
alone, on random normal maps; compile + first batch, the next batches, and the median of
the rest.

  python benchmarks/bench_pass1_statistics.py
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxdissect import statistics

SHAPES = {
    "stem_preclip": (112, 112, 32),
    "stage3": (56, 56, 24),
    "stage4": (28, 28, 40),
    "stage6": (14, 14, 112),
    "head_preclip": (7, 7, 1280),
}
BATCH, IMAGES = 32, 600


def _batch(name: str, acts: np.ndarray, step: int) -> dict:
    index = np.arange(step * BATCH, (step + 1) * BATCH, dtype=np.int32)
    return {"acts": {name: acts}, "valid": np.ones(BATCH, bool), "index": index}


def main() -> None:
    rng = np.random.default_rng(0)
    for name, (h, w, k) in SHAPES.items():
        acts = [rng.standard_normal((BATCH, h, w, k)).astype(np.float32) for _ in range(3)]
        stats = {
            "sketch": statistics.quantile_statistic(
                name, k, total_count=h * w * IMAGES, q=0.005, mode="sketch"
            ),
            "top": statistics.top_images_statistic(name, k, 10, (h, w)),
        }
        for what, stat in stats.items():
            update = jax.jit(stat.update)
            t0 = time.perf_counter()
            state = jax.block_until_ready(update(stat.init(0), _batch(name, acts[0], 0)))
            first = time.perf_counter() - t0
            times = []
            for step in range(1, IMAGES // BATCH):
                batch = _batch(name, acts[step % 3] * (1 + 0.01 * step), step)
                t0 = time.perf_counter()
                state = jax.block_until_ready(update(state, batch))
                times.append(time.perf_counter() - t0)
            print(
                f"{name:13s} {what:6s} compile + first {first:6.2f} s; batches 1-4 "
                f"{', '.join(f'{t:.3f}' for t in times[:4])} s; median of the rest "
                f"{np.median(times[4:]):.3f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()

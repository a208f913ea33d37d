"""Speed and accuracy of jaxdissect.quantiles on this machine.

.venv/bin/python benchmarks/bench_quantiles.py speed [--units 512] [--batches 20]
.venv/bin/python benchmarks/bench_quantiles.py accuracy [--seeds 4] [--n 3002720]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from jaxdissect import quantiles as Q


def _stream(rows: int, units: int, seed: int) -> np.ndarray:
    """ReLU-like activations with bursty 'hot images' (49 positions per image)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, units), dtype=np.float32)
    hot = rng.random((rows // 49 + 1, units)) < 0.01
    x += 3.0 * np.repeat(hot, 49, axis=0)[:rows]
    return np.maximum(x, 0)


def speed(units: int, batches: int) -> None:
    for rows in (32 * 49, 32 * 3136):
        xs = [_stream(rows, units, s) for s in range(min(batches, 4))]
        n_total = rows * batches * 50  # as if this were 1/50 of the probe set
        for name, init, update in (
            ("sketch", lambda: Q.sketch_init(units, max_count=n_total), Q.sketch_update),
            ("exact", lambda: Q.exact_init(units, n_total), Q.exact_update),
        ):
            upd = jax.jit(update)
            state = init()
            t0 = time.perf_counter()
            state = jax.block_until_ready(upd(state, xs[0]))
            compile_s = time.perf_counter() - t0
            # Warm the stream so that thresholds/cuts are in steady state before timing.
            for i in range(batches // 2):
                state = upd(state, xs[i % len(xs)])
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            for i in range(batches):
                state = upd(state, xs[i % len(xs)])
            jax.block_until_ready(state)
            dt = (time.perf_counter() - t0) / batches
            print(
                f"{name:6s} K={units} rows={rows:6d}: {dt * 1e3:8.1f} ms/batch "
                f"{rows * units / dt / 1e6:7.1f} M values/s (first call {compile_s:.1f} s)",
                flush=True,
            )


def _columns(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    x = rng.standard_normal(n)
    spike = rng.standard_normal(n)
    spike[rng.random(n) < 0.4] = 0.0
    spike[rng.random(n) < 0.2] = 1.5
    burst = rng.standard_normal(n).reshape(-1, 49)
    burst[rng.random(burst.shape[0]) < 0.01] += 3.0
    return {
        "relu": np.maximum(x, 0),
        "lognormal": rng.lognormal(0.0, 1.5, n),
        "abs-cauchy": np.abs(rng.standard_cauchy(n)),
        "pareto": rng.pareto(1.5, n),
        "spike-mix": spike,
        "hot-images": burst.reshape(-1),
    }


def accuracy(seeds: int, n: int) -> None:
    q = 0.005
    worst: dict[str, list[float]] = {}
    for seed in range(seeds):
        cols = _columns(n, np.random.default_rng(seed))
        names = list(cols)
        x = np.stack([cols[k] for k in names], 1).astype(np.float32)
        for rows, shards in ((32 * 49, 1), (32 * 3136, 1), (32 * 49, 8)):
            upd = jax.jit(Q.sketch_update)
            parts = np.array_split(np.arange(n // rows) * rows, shards)
            states = []
            for i, starts in enumerate(parts):
                st = Q.sketch_init(len(names), max_count=n, seed=seed * 100 + i)
                for s in starts:
                    st = upd(st, x[s : s + rows])
                states.append(st)
            st = Q.merge_list(states)
            used = x[: (n // rows) * rows]
            t = np.asarray(Q.sketch_threshold(st))
            err = (used > t).mean(0) / q - 1
            for name, e in zip(names, err, strict=True):
                worst.setdefault(f"{name} rows={rows} shards={shards}", []).append(float(e))
    for key, errs in worst.items():
        e = np.abs(errs)
        print(f"{key:40s} rms {np.sqrt(np.mean(e**2)):.4f} worst {e.max():.4f} (n={len(e)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["speed", "accuracy"])
    ap.add_argument("--units", type=int, default=512)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--n", type=int, default=32 * 3136 * 30)
    args = ap.parse_args()
    if args.what == "speed":
        speed(args.units, args.batches)
    else:
        accuracy(args.seeds, args.n)


if __name__ == "__main__":
    main()

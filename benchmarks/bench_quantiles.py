"""Speed and accuracy of jaxdissect.quantiles on this machine.

.venv/bin/python benchmarks/bench_quantiles.py speed [--units 512] [--batches 20]
.venv/bin/python benchmarks/bench_quantiles.py accuracy [--seeds 4] [--n 3002720]
.venv/bin/python benchmarks/bench_quantiles.py merge [--units 512] [--shards 8]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from _common import refuse_below  # the benchmarks folder: sys.path[0]

from jaxdissect import quantiles as Q
from jaxdissect import statistics


def _stream(rows: int, units: int, seed: int) -> np.ndarray:
    """ReLU-like activations with bursty 'hot images' (49 positions per image)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, units), dtype=np.float32)
    hot = rng.random((rows // 49 + 1, units)) < 0.01
    x += 3.0 * np.repeat(hot, 49, axis=0)[:rows]
    return np.maximum(x, 0)


def _time(update, state, xs, batches):
    """(seconds per batch, compile seconds); also returns process CPU per batch."""
    state = jax.block_until_ready(state)
    t0 = time.perf_counter()
    upd = jax.jit(update).lower(state, xs[0]).compile()
    compile_s = time.perf_counter() - t0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(batches):
        state = upd(state, xs[i % len(xs)])
    jax.block_until_ready(state)
    return (time.perf_counter() - t0) / batches, compile_s, (time.process_time() - c0) / batches


def speed(units: int, batches: int) -> None:
    """Per-batch cost over a Broden-sized probe set (63,305 images).

    sketch, early: the first batches of a run (real max_count) while the tail fills up:
      almost every value passes the prefilter.
    sketch, mid-run: after half of max_count has been seen (warmed up with large calls).
      For 32x3136 batches max_count is scaled to 4M values (mid-run = 2M seen), which
      re-selects cuts ~50x more often than the real 199M would: pessimistic.
    exact, mid-run: a top-k whose k-th value sits at the 2q quantile, as at mid-run.
    """
    images = 63305
    warm_rows = 100352
    for rows, k_units, early in ((32 * 49, units, 10), (32 * 3136, units, 2), (32 * 3136, 64, 4)):
        n_total = images * rows // 32
        xs = [_stream(rows, k_units, s) for s in range(3)]
        levels = Q.sketch_levels(Q.DEFAULT_SIZE, max_count=n_total)
        tag = f"K={k_units:4d} rows={rows:6d}"

        state = Q.sketch_init(k_units, max_count=n_total)
        dt, compile_s, cpu = _time(Q.sketch_update, state, xs, early)
        print(
            f"sketch early   {tag}: {dt * 1e3:8.1f} ms/batch, cpu {cpu * 1e3:.0f} ms "
            f"(compile {compile_s:.1f} s; state {levels}x{Q.DEFAULT_SIZE} floats/unit "
            f"for n={n_total:,})",
            flush=True,
        )
        max_count = min(n_total, 40 * warm_rows)
        state = Q.sketch_init(k_units, max_count=max_count)
        upd = jax.jit(Q.sketch_update)
        warm = [_stream(warm_rows, k_units, 10 + s) for s in range(2)]
        for i in range(max_count // 2 // warm_rows):
            state = upd(state, warm[i % 2])
        state = jax.block_until_ready(state)  # else the timing waits for the warm-up
        dt, _, cpu = _time(Q.sketch_update, state, xs, batches)
        print(
            f"sketch mid-run {tag}: {dt * 1e3:8.1f} ms/batch, cpu {cpu * 1e3:.0f} ms, "
            f"{rows * k_units / dt / 1e6:.1f} M values/s (max_count {max_count:,})",
            flush=True,
        )

        ex = Q.exact_init(k_units, n_total)
        k = ex.top.shape[1]
        if k_units * k > 2e7:  # e.g. k = 993K at 56x56: what the sketch is for
            print(f"exact          {tag}: skipped (k={k:,} per unit)")
            continue
        u = np.random.default_rng(0).random((k_units, k)) * 2 * Q.DEFAULT_Q
        top = -np.sort(-np.asarray(jax.scipy.special.ndtri(1 - u)), axis=1)
        ex = ex.replace(top=jax.numpy.asarray(top, jax.numpy.float32))
        ex = ex.replace(count=Q._count_add(ex.count, jax.numpy.int32(n_total // 2)))
        dt, compile_s, cpu = _time(Q.exact_update, ex, xs, batches)
        print(
            f"exact mid-run  {tag}: {dt * 1e3:8.1f} ms/batch, cpu {cpu * 1e3:.0f} ms, "
            f"{rows * k_units / dt / 1e6:.1f} M values/s (compile {compile_s:.1f} s; "
            f"k={k:,} + stage {ex.stage.shape[1]:,} floats/unit)",
            flush=True,
        )


def merge(units: int, shards: int, batches: int) -> None:
    """A pass of exact mode from its empty state (600 images of 7x7, as the main job's
    head), then the closing merge of `shards` devices' states (`statistics.merge_program`)
    in either mode, each shard fed `batches` batches of 32x49 rows: compile and run."""
    rows, n_total = 32 * 49, 600 * 49
    xs = [_stream(rows, units, s) for s in range(3)]
    dt, compile_s, _ = _time(Q.exact_update, Q.exact_init(units, n_total), xs, n_total // rows)
    print(f"exact from empty K={units}: {dt * 1e3:.1f} ms/batch (compile {compile_s:.2f} s)")
    for mode, init, update, merge_fn in (
        ("exact", lambda s: Q.exact_init(units, n_total), Q.exact_update, Q.exact_merge),
        (
            "sketch",
            lambda s: Q.sketch_init(units, seed=s, max_count=n_total),
            Q.sketch_update,
            Q.sketch_merge,
        ),
    ):
        upd = jax.jit(update)
        states = []
        for s in range(shards):
            state = init(s)
            for i in range(batches):
                state = upd(state, xs[(s + i) % len(xs)])
            states.append(jax.device_get(state))
        stacked = jax.tree.map(lambda *x: np.stack(x), *states)
        t0 = time.perf_counter()
        program = statistics.merge_program.lower(merge_fn, stacked).compile()
        compile_s = time.perf_counter() - t0
        jax.block_until_ready(program(stacked))
        t0 = time.perf_counter()
        jax.block_until_ready(program(stacked))
        print(
            f"{mode} merge of {shards} shards K={units}: compile {compile_s:.2f} s, "
            f"run {time.perf_counter() - t0:.3f} s",
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


def accuracy(seeds: int, n: int, adaptive: bool) -> None:
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
                max_count = None if adaptive else n
                st = Q.sketch_init(len(names), max_count=max_count, seed=seed * 100 + i)
                for s in starts:
                    st = upd(st, x[s : s + rows])
                states.append(st)
            stacked = jax.tree.map(lambda *a: np.stack(a), *jax.device_get(states))
            st = statistics.merge_devices(Q.sketch_merge, stacked)
            used = x[: (n // rows) * rows]
            t = np.asarray(Q.sketch_threshold(st, strict=False))
            uncertified = int((~Q.sketch_certified(st)).sum())
            if uncertified:
                print(f"seed {seed} rows={rows} shards={shards}: {uncertified} uncertified")
            err = (used > t).mean(0) / q - 1
            for name, e in zip(names, err, strict=True):
                worst.setdefault(f"{name} rows={rows} shards={shards}", []).append(float(e))
    for key, errs in worst.items():
        e = np.abs(errs)
        print(f"{key:40s} rms {np.sqrt(np.mean(e**2)):.4f} worst {e.max():.4f} (n={len(e)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["speed", "accuracy", "merge"])
    ap.add_argument("--units", type=int, default=512)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--n", type=int, default=32 * 3136 * 30)
    ap.add_argument("--adaptive", action="store_true", help="sketch without max_count")
    ap.add_argument("--shards", type=int, default=8)
    args = ap.parse_args()
    refuse_below({n: getattr(args, n) for n in ("units", "batches", "seeds", "shards")})
    if args.n < 32 * 3136 or args.n % 49:  # a batch of the larger shape, whole images
        raise SystemExit(f"error: --n={args.n}: must be a multiple of 49, >= {32 * 3136}")
    if args.what == "speed":
        speed(args.units, args.batches)
    elif args.what == "merge":
        merge(args.units, args.shards, args.batches)
    else:
        accuracy(args.seeds, args.n, args.adaptive)


if __name__ == "__main__":
    main()

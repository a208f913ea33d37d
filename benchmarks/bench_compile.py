r"""The compile share of the main job: a first run, then a second in a new process.

Runs `experiments/dissect.py` (any flags after `--`) twice in fresh processes that
share one cache directory (`JAXDISSECT_CACHE`: the synthetic data and JAX's
persistent compilation cache) but write to separate output directories (so the
second run recomputes everything rather than reusing stored stages). Per run: the
wall time, and the time JAX spent tracing, lowering and compiling (JAX's monitoring
events; a persistent-cache hit is recorded as a backend compile too, timing the cache
read, and counted among the executables), as a share of the wall;
with compilations in background threads these sum over threads, so the wall time with
any of them in progress (the union of their intervals) is given too.

  python benchmarks/bench_compile.py --cache_dir /tmp/jdcache-fresh
  python benchmarks/bench_compile.py --cache_dir /tmp/jd -- --model=resnet18 --layers=layer4

An empty `--cache_dir` makes the first run generate the data and compile everything.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("cache_dir", "", "JAXDISSECT_CACHE of both runs (default: a new temp dir).")
flags.DEFINE_integer("runs", 2, "Runs, each in a new process.")
flags.DEFINE_bool("child", False, "Internal: one run of the main job, print JSON.")
FLAGS = flags.FLAGS

_SCRIPT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "dissect.py"
)


def _child(args: list[str]) -> dict:
    import jax
    from jax._src import dispatch

    spent = {"compile": 0.0, "executables": 0, "trace": 0.0, "lower": 0.0}
    intervals = []  # (start, end) of every trace, lowering and compile, any thread
    events = (
        dispatch.BACKEND_COMPILE_EVENT,
        dispatch.JAXPR_TRACE_EVENT,
        dispatch.JAXPR_TO_MLIR_MODULE_EVENT,
    )

    def listener(event: str, duration: float, **kwargs) -> None:
        if event in events:
            now = time.perf_counter()
            intervals.append((now - duration, now))
        if event == dispatch.BACKEND_COMPILE_EVENT:
            spent["compile"] += duration
            spent["executables"] += 1
        elif event == dispatch.JAXPR_TRACE_EVENT:
            spent["trace"] += duration
        elif event == dispatch.JAXPR_TO_MLIR_MODULE_EVENT:
            spent["lower"] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    sys.argv = [_SCRIPT, *args]
    t = time.perf_counter()
    try:
        runpy.run_path(_SCRIPT, run_name="__main__")
    except SystemExit as e:
        if e.code not in (None, 0):
            raise
    wall = time.perf_counter() - t
    jit_s = spent["compile"] + spent["trace"] + spent["lower"]
    return {
        **spent,
        "wall_s": wall,
        "jit_s": jit_s,
        "jit_share": jit_s / wall,
        "jit_wall_s": _union(intervals),
        "jit_wall_share": _union(intervals) / wall,
    }


def _union(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by any of the intervals (concurrent compilations count once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def main(argv):
    extra = argv[1:]
    if FLAGS.child:
        print("RESULT " + json.dumps(_child(extra)), flush=True)
        return
    cache = FLAGS.cache_dir or tempfile.mkdtemp(prefix="jdcache-")
    env = {**os.environ, "JAXDISSECT_CACHE": cache}
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for i in range(FLAGS.runs):
            cmd = [sys.executable, __file__, "--child", "--", *extra]
            cmd.append(f"--output_dir={os.path.join(out, f'run{i}')}")
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if res.returncode or not line:
                print(res.stdout[-2000:], res.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"run {i + 1} failed")
            row = json.loads(line[0][7:])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmain job ({' '.join(extra) or 'defaults'}), JAXDISSECT_CACHE={cache}")
    for i, r in enumerate(rows):
        print(
            f"run {i + 1}: wall {r['wall_s']:.1f} s; trace {r['trace']:.1f} s, lower "
            f"{r['lower']:.1f} s, compile {r['compile']:.1f} s ({r['executables']} executables): "
            f"{100 * r['jit_share']:.0f}% of the wall; some compilation in progress "
            f"{r['jit_wall_s']:.1f} s ({100 * r['jit_wall_share']:.0f}%)"
        )


if __name__ == "__main__":
    app.run(main)

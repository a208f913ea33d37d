"""The benchmark scripts' flags: a bad value is one line naming the flag, before any work
(a case or two of each script's checks: every case starts a Python with JAX), and what
they time: compiled once, outside the timed calls."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bench(
    name: str,
    *argv: str,
    cache: pathlib.Path,
    env: dict[str, str] | None = None,
    merged: bool = False,
) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAXDISSECT_CACHE": str(cache), "PYTHONPATH": str(ROOT), **(env or {})}
    script = ROOT / "benchmarks" / f"{name}.py"
    return subprocess.run(
        [sys.executable, str(script), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merged else subprocess.PIPE,
        text=True,
        env=env,
        cwd=cache,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--multiples=1,x"], "--multiples=1,x: expected whole numbers >= 1, comma-separated"),
        (["--repeats=0", "--num_images=0"], "--repeats=0: must be >= 1"),
    ],
)
def test_bench_engine_refuses_bad_flags_in_one_line(tmp_path, argv, message):
    out = _bench("bench_engine", *argv, f"--cache_dir={tmp_path}", cache=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [f"error: {message}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing generated


def _module(name: str):
    if str(ROOT / "benchmarks") not in sys.path:  # as for a script run: its folder first
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reads=all,imags"], "--reads=all,imags: expected some of all, images, labels"),
        (["--threads=1,x"], "--threads=1,x: expected whole numbers >= 0, comma-separated"),
        (["--workers=0"], "--workers=0: expected whole numbers >= 1, comma-separated"),
        (["--repeats=0"], "--repeats=0: must be >= 1"),
        (["--num_images=0"], "--num_images=0: must be >= 1"),
    ],
)
def test_bench_data_refuses_bad_flags_in_one_line(argv, message):
    with pytest.raises(SystemExit, match=f"^error: {re.escape(message)}$"):
        _module("bench_data").parse_args(argv)


def test_bench_data_times_processes_alone_with_no_threads():
    # --threads= --workers=2 times the process-based loader alone (accepted before the
    # checks moved to _common.whole_numbers, which refused the empty list); both empty is
    # nothing to time.
    args = _module("bench_data").parse_args(["--threads=", "--workers=2"])
    assert (args.threads, args.workers) == ("", "2")
    with pytest.raises(SystemExit, match=r"^error: --threads=: expected whole numbers >= 0"):
        _module("bench_data").parse_args(["--threads=", "--workers="])


@pytest.mark.slow
def test_bench_vit_times_dissections_that_compile_nothing(tmp_path):
    # After the compiling round, a round's dissection reuses the compiled steps (each round
    # compiled both passes again: a ratio of ~14 forward passes, most of it compilation).
    out = _bench(
        "bench_vit",
        "--arch=vit_ti16",
        "--layers=block0",  # the network after it is never compiled
        "--num_images=2",
        "--batch_size=2",
        "--rounds=1",
        f"--cache_dir={tmp_path}",
        cache=tmp_path,
        env={"JAX_LOG_COMPILES": "1", "PYTHONUNBUFFERED": "1"},
        merged=True,
    )
    log = out.stdout  # with the log, in order
    assert out.returncode == 0, log[-3000:]
    assert "round 0: forward" in log
    timed = log[log.index("vit_ti16 block0 (192 units), 2 images") :]
    assert "Finished XLA compilation" not in timed, timed[:3000]


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--statistics=tallly", "--layers=head_preclip"],
            "--statistics=tallly: expected some of q, top, tally, ties",
        ),
        (
            ["--layers=head", "--statistics=q"],
            "--layers=head: expected some of stem_preclip, stage3, stage4, stage6, head_preclip",
        ),
    ],
)
def test_bench_statistics_refuses_unknown_names_in_one_line(tmp_path, argv, message):
    out = _bench("bench_statistics", *argv, "--batches=1", cache=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [f"error: {message}"]
    assert out.stdout == ""


@pytest.mark.slow
def test_bench_ablation_times_a_permutation_test_that_compiles_nothing(tmp_path):
    # The warm-up ran 8 images and 1 draw, so the timed test compiled its programs again
    # for N images and D draws (3.5 s of compilation in a 0.003 s test).
    out = _bench(
        "bench_ablation",
        "--num_images=2",
        "--batch_size=2",
        "--units=1",
        "--masks_per_call=1",
        "--classes=2",
        "--draws=2",
        "--concepts=4",
        cache=tmp_path,
        env={"JAX_LOG_COMPILES": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert '"test_s"' in out.stdout
    for program in ("_observed", "_exceedances"):
        assert out.stderr.count(f"Finished XLA compilation of jit({program})") == 1, program


_CACHE_HIT = """
import sys, jax, jax.numpy as jnp
from jax._src import dispatch
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
events, hits = [], []
jax.monitoring.register_event_duration_secs_listener(
    lambda e, d, **k: events.append(e) if e == dispatch.BACKEND_COMPILE_EVENT else None
)
jax.monitoring.register_event_listener(
    lambda e, **k: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None
)
jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(8)).block_until_ready()
print(len(events), len(hits))
"""


def test_bench_compile_says_a_persistent_cache_hit_counts_as_a_backend_compile(tmp_path):
    # bench_compile's "compile" and "executables" are JAX's backend-compile events, which
    # JAX records around its persistent-cache lookup: a second process's hits count too.
    runs = [
        subprocess.run(
            [sys.executable, "-c", _CACHE_HIT, str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout.split()
        for _ in range(2)
    ]
    (events1, hits1), (events2, hits2) = [[int(x) for x in r] for r in runs]
    assert hits1 == 0 and events1 >= 1
    assert hits2 == events1 and events2 == events1  # every hit recorded as a compile
    doc = ast.get_docstring(ast.parse((ROOT / "benchmarks" / "bench_compile.py").read_text()))
    assert "a persistent-cache hit is recorded as a backend compile too" in " ".join(doc.split())


def test_bench_open_leaves_no_memo_folder_behind(tmp_path):
    from jaxdissect.data import synthetic

    data, temp = tmp_path / "broden", tmp_path / "temp"
    synthetic.generate(data, num_images=2, size=32, seed=0)
    temp.mkdir()
    out = _bench(
        "bench_open", f"--data={data}", "--repeats=1", cache=tmp_path, env={"TMPDIR": str(temp)}
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "content + headers" in out.stdout
    assert [p.name for p in temp.iterdir() if p.name.startswith("bench_open_memo_")] == []


_TINY_ABLATION = ("--num_images=1", "--batch_size=1", "--classes=2", "--masks_per_call=512")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--units=513"], "--units=513: layer4 has 512 units (0: all)"),
    ],
)
def test_bench_ablation_refuses_a_unit_count_the_layer_lacks(tmp_path, argv, message):
    # Each ran and reported --units as ablated (np.eye(512)[:513] holds 512 masks, [:-1] 511).
    out = _bench("bench_ablation", *_TINY_ABLATION, *argv, cache=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:]
    assert out.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert out.stdout == ""


def test_bench_vit_says_which_thresholds_it_measures():
    # Its docstring said "sketch thresholds"; the engine's `auto` takes exact mode there.
    from jaxdissect import engine
    from jaxdissect.quantiles import histogram

    dtype = engine.Settings().activation_dtype
    assert histogram.resolve_mode("auto", 384, dtype, 128 * 196, upsampled=False) == "exact"
    assert histogram.resolve_mode("auto", 384, dtype, 37_000 * 196, upsampled=False) == "sketch"
    doc = " ".join(
        ast.get_docstring(ast.parse((ROOT / "benchmarks/bench_vit.py").read_text())).split()
    )
    assert "sketch thresholds" not in doc
    assert "exact for block11's 384 units up to ~36,000 images" in doc


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--repeats=0"], "--repeats=0: must be >= 1"),
        (["--batch_sizes=1,x"], "--batch_sizes=1,x: expected whole numbers >= 1, comma-separated"),
    ],
)
def test_bench_forward_refuses_bad_flags_in_one_line(tmp_path, argv, message):
    # --repeats=0 printed 0 img/s; the others failed in the child and exited 0, table empty.
    out = _bench("bench_forward", "--batch_sizes=1", *argv, cache=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:]
    assert out.stderr.strip().splitlines() == [f"error: {message}"]


def test_suite_compile_sums_only_this_session(tmp_path):
    # A worker file an earlier session left in $SUITE_COMPILE_DIR was summed into the totals.
    sums = tmp_path / "sums"
    sums.mkdir()
    stale = {"files": {"tests/test_old.py": {"wall": 999.0}}, "programs": {"old": [3, 500.0]}}
    (sums / "gw5.json").write_text(json.dumps(stale))
    (tmp_path / "test_tiny.py").write_text("def test_one():\n    assert True\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}  # no worker
    env |= {"SUITE_COMPILE_DIR": str(sums), "PYTHONPATH": str(ROOT / "benchmarks")}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "suite_compile", "-p", "no:cacheprovider"]
        + ["-n", "0", "-q", "test_tiny.py"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:]
    assert "test_tiny.py" in out.stdout
    assert "test_old.py" not in out.stdout and "999.0" not in out.stdout
    assert sorted(p.name for p in sums.iterdir()) == ["main.json"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods=segment,bogus"], "--methods=segment,bogus: expected some of auto, segment, "),
        (["--repeats=0"], "--repeats=0: must be >= 1"),
    ],
)
def test_bench_tally_refuses_bad_flags_in_one_line(tmp_path, argv, message):
    out = _bench(
        "bench_tally", "--batch_size=2", "--units=8", "--seg_size=16", *argv, cache=tmp_path
    )
    assert out.returncode == 1, out.stdout[-2000:]
    assert out.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("flag", ["slots"])
def test_bench_formulas_refuses_counts_under_one_in_one_line(tmp_path, flag):
    # --repeats=0 was an UnboundLocalError, --slots=0 or --units=0 a traceback from JAX.
    argv = ("--batch_size=2", "--units=8", "--slots=1", "--seg_size=16", f"--{flag}=0")
    out = _bench("bench_formulas", *argv, cache=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:]
    assert out.stderr.strip().splitlines()[-1] == f"error: --{flag}=0: must be >= 1"
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["accuracy", "--n=1000"], "--n=1000: must be a multiple of 49, >= 100352"),
        (["speed", "--units=0"], "--units=0: must be >= 1"),
    ],
)
def test_bench_quantiles_refuses_bad_flags_in_one_line(tmp_path, argv, message):
    # Each was a traceback (a reshape, an empty merge, an empty sketch).
    out = _bench("bench_quantiles", *argv, cache=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:]
    assert out.stderr.strip().splitlines() == [f"error: {message}"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data=/no/such/broden"], "--data: /no/such/broden: not a folder."),
        (["--data=/no/such/broden", "--repeats=0"], "--repeats=0: must be >= 1"),
    ],
)
def test_bench_open_refuses_bad_flags_in_one_line(tmp_path, argv, message):
    out = _bench("bench_open", *argv, cache=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


@pytest.mark.parametrize("flag", ["draws"])
def test_bench_significance_memory_refuses_counts_under_one(tmp_path, flag):
    argv = ("--num_images=20", "--units=8", "--concepts=8", f"--{flag}=0")
    out = _bench("bench_significance_memory", *argv, cache=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:]
    assert out.stderr.strip().splitlines() == [f"error: --{flag}=0: must be >= 1"]


@pytest.mark.parametrize("flag", ["rounds"])
def test_bench_vit_refuses_counts_under_one(tmp_path, flag):
    tiny = ("--arch=vit_ti16", "--num_images=2", "--batch_size=2", f"--cache_dir={tmp_path}")
    out = _bench("bench_vit", *tiny, f"--{flag}=0", cache=tmp_path)
    assert out.returncode == 1, out.stdout[-2000:]
    assert out.stderr.strip().splitlines() == [f"error: --{flag}=0: must be >= 1"]

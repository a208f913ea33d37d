"""The benchmark scripts' flags: a bad value is one line naming the flag, before any work."""

from __future__ import annotations

import importlib.util
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
        (["--multiples=0"], "--multiples=0: expected whole numbers >= 1, comma-separated"),
        (["--repeats=0", "--num_images=0"], "--repeats=0: must be >= 1"),
        (["--num_images=0"], "--num_images=0: must be >= 1"),
        (["--batch_size=0", "--num_images=0"], "--batch_size=0: must be >= 1"),
    ],
)
def test_bench_engine_refuses_bad_flags_in_one_line(tmp_path, argv, message):
    out = _bench("bench_engine", *argv, f"--cache_dir={tmp_path}", cache=tmp_path)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [f"error: {message}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing generated


def _module(name: str):
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


@pytest.mark.slow
def test_bench_vit_times_dissections_that_compile_nothing(tmp_path):
    # After the compiling round, a round's dissection reuses the compiled steps (each round
    # compiled both passes again: a ratio of ~14 forward passes, most of it compilation).
    out = _bench(
        "bench_vit",
        "--arch=vit_ti16",
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
    timed = log[log.index("vit_ti16 block11 (192 units), 2 images") :]
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

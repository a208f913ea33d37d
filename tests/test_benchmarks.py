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


def _bench(name: str, *argv: str, cache: pathlib.Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAXDISSECT_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    script = ROOT / "benchmarks" / f"{name}.py"
    return subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
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

"""A dissection killed with SIGKILL or interrupted (Ctrl-C) resumes from its checkpoint and
ends identical."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from jaxdissect.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return synthetic.generate_tiny(tmp_path_factory.mktemp("resume") / "broden", num_images=24)


def _command(data, out, *extra):
    return [
        sys.executable,
        str(ROOT / "experiments" / "dissect.py"),
        "--model=tests.fixtures.small_model:make",
        "--weights=",
        f"--data={data}",
        f"--output_dir={out}",
        "--batch_size=2",
        "--checkpoint_every=1",
        "--progress=false",
        "--activation_cache=disk",
        "--loader_threads=0",
        "--top_images=3",
        *extra,
    ]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


def _steps(out, stage):
    root = out / ".work" / "checkpoints"
    return [
        int(p.name)
        for d in root.glob(f"{stage}-*/*-devices")
        for p in d.iterdir()
        if p.name.isdigit()
    ]


def _outputs(out):
    doc = json.loads((out / "results.json").read_text())
    doc["settings"].pop("thresholds")  # compared separately below, exactly
    tallies = {p.name: p.read_text() for p in sorted(out.glob("tally-*.csv"))}
    return doc, tallies, json.loads((out / "results.json").read_text())["settings"]["thresholds"]


def _kill_during(command, out, stage, sig=signal.SIGKILL):
    """Start the run, send `sig` once `stage` has checkpointed 3 batches; return that step
    and the run's stderr."""
    proc = subprocess.Popen(
        command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 300
    seen = []
    while time.time() < deadline and proc.poll() is None:
        seen = [s for s in _steps(out, stage) if s >= 3] if out.exists() else []
        if seen:
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail(f"the run finished before it could be killed during {stage}")
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == (-sig if sig == signal.SIGKILL else 130), stderr[-3000:]
    return max(seen), stderr


@pytest.mark.slow
def test_killed_runs_resume_identically(tiny_data, tmp_path):
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    subprocess.run(_command(tiny_data, ref), env=_env(), check=True, capture_output=True)

    # Killed in pass 1, restarted and killed again in pass 2, restarted to the end.
    step, _ = _kill_during(_command(tiny_data, killed), killed, "pass1")
    assert 3 <= step < 12  # mid-pass: 24 images in batches of 2
    assert not (killed / "results.json").exists()  # a killed run leaves no complete result
    # Ctrl-C, as a checkpoint may be being written: one line, exit status 130.
    _, stderr = _kill_during(
        _command(tiny_data, killed, "--verbosity=-1"), killed, "pass2", signal.SIGINT
    )
    assert stderr.strip().splitlines()[-1] == "interrupted: run the same command again to resume"
    assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]
    assert not (killed / "results.json").exists()
    checkpoints = killed / ".work" / "checkpoints"
    assert [p.name.split("-")[0] for p in checkpoints.iterdir()] == ["pass2"]  # pass 1 stored
    run = subprocess.run(
        _command(tiny_data, killed, "--verbosity=0"), env=_env(), capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "pass2: resuming after batch" in run.stderr
    assert list(checkpoints.iterdir()) == []  # both passes stored: nothing left to resume
    for out in (ref, killed):  # disk caches are deleted once both passes are stored
        assert not list((out / ".work").glob("activations/**/*.npy"))
    got, want = _outputs(killed), _outputs(ref)
    assert got[2] == want[2]  # thresholds, bit for bit (JSON floats round-trip exactly)
    assert got[1] == want[1]  # tally CSVs
    assert got[0]["layers"] == want[0]["layers"]

"""The experiment scripts end to end at tiny size, and their flagfiles.

Each script is loaded from its file and run through `run(flag_values)` (what
its `main` calls) on flags parsed by a fresh `FlagValues`, so that the four
scripts' flags do not collide. The runs are made once per session (once for
all pytest-xdist workers): tests/test_findings.py and tests/test_training.py
read the same outputs.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import json
import os
import pathlib
import re
import shutil
import types
from collections.abc import Callable

import numpy as np
import pytest
from absl import app, flags

from jaxdissect import cli, store, training
from jaxdissect.data import synthetic

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The tiny training run: 256 synthetic images at 48 px, a half-width small CNN trained to about
# 0.6 validation accuracy (a network that learnt something: tests/test_findings.py reads it).
TINY_IMAGES, TINY_SIZE, TINY_STEPS = 256, 48, 300
SAVE_STEPS = (0, 150, 300)
TRAIN_ARGS = (
    "--width=0.5",
    "--optimizer=adam",
    "--learning_rate=0.002",
    f"--steps={TINY_STEPS}",
    "--batch_size=16",
    "--warmup_steps=20",
    f"--save_steps={','.join(map(str, SAVE_STEPS))}",
    "--checkpoint_every=100",
    "--log_every=50",
    # One device: 8 fake CPU devices on 2 cores double the time; tests/test_training.py
    # covers the sharded path.
    "--devices=1",
)
# exact thresholds: on tiny probe sets the sketch would only add noise.
PROBE_ARGS = (
    "--split=all",
    "--batch_size=16",
    "--quantile_mode=exact",
    "--devices=1",
    "--noprogress",
)


_SHARED: dict[str, pathlib.Path] = {}


@pytest.fixture(scope="session", autouse=True)
def shared_workspace(tmp_path_factory) -> pathlib.Path:
    """The session's directory for the tiny runs, one for all pytest-xdist workers.

    Modules that use the runs import this fixture (it is autouse).
    """
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # pytest-N/, shared by the workers' popen-gwK/
    _SHARED["root"] = base / "jaxdissect-experiments"
    _SHARED["root"].mkdir(exist_ok=True)
    return _SHARED["root"]


def workspace() -> pathlib.Path:
    return _SHARED["root"]


def once(name: str) -> Callable[[Callable[[pathlib.Path], object]], Callable[[], pathlib.Path]]:
    """`fn(out)` fills `workspace() / name` once per session, whatever the xdist workers."""

    def decorate(fn: Callable[[pathlib.Path], object]) -> Callable[[], pathlib.Path]:
        @functools.cache
        def get() -> pathlib.Path:
            out, done = workspace() / name, workspace() / f"{name}.done"
            with open(workspace() / f"{name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits, then reads
                if not done.exists():
                    shutil.rmtree(out, ignore_errors=True)
                    fn(out)
                    done.touch()
            return out

        return get

    return decorate


@once("broden")
def tiny_broden(out: pathlib.Path) -> None:
    synthetic.generate(out, num_images=TINY_IMAGES, size=TINY_SIZE, workers=1)


def script(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"_experiment_{name}", ROOT / "experiments" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(name: str, *argv: str) -> flags.FlagValues:
    fv = flags.FlagValues()
    script(name).define_flags(fv)
    fv(["prog", *argv])
    return fv


def run_script(name: str, *argv: str):
    return script(name).run(parse(name, *argv))


def data_args() -> tuple[str, ...]:
    return (f"--data={tiny_broden()}", f"--resolution={TINY_SIZE}")


@once("train")
def trained_run(out: pathlib.Path) -> None:
    run_script("train", *data_args(), *TRAIN_ARGS, f"--output_dir={out}", "--noprogress")


@once("dynamics")
def dynamics_run(out: pathlib.Path) -> None:
    run_script(
        "training_dynamics",
        f"--run={trained_run()}",
        f"--steps=0,{TINY_STEPS}",
        "--layers=conv3,conv5",
        *data_args(),
        *PROBE_ARGS,
        f"--output_dir={out}",
    )


@once("rotation")
def rotation_run(out: pathlib.Path) -> None:
    run_script(
        "rotation",
        f"--weights={trained_run() / 'weights' / f'step_{TINY_STEPS:06d}'}",
        "--layer=conv5",
        "--amounts=0,0.5,1",
        *data_args(),
        *PROBE_ARGS,
        f"--output_dir={out}",
    )


def test_train_script_writes_a_resumable_dissectable_run():
    out = trained_run()
    for name in ("settings.json", "metrics.csv", "summary.json", "training.png"):
        assert (out / name).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == TINY_STEPS
    assert [k["step"] for k in summary["kept_steps"]] == list(SAVE_STEPS)
    assert 0 <= summary["val_accuracy"] <= 1
    assert summary["elapsed_s"] >= summary["elapsed_s_this_session"] > 0
    rows = training.read_metrics(out / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(0, TINY_STEPS + 1, 50))
    assert not np.isnan(rows[-1]["val_accuracy"]) and np.isnan(rows[1]["val_accuracy"])
    assert [s for s, _ in training.list_weights(out)] == list(SAVE_STEPS)
    # Running the finished run again changes nothing.
    before = {name: (out / name).read_text() for name in ("metrics.csv", "summary.json")}
    result = run_script("train", *data_args(), *TRAIN_ARGS, f"--output_dir={out}", "--noprogress")
    assert result.resumed_from == TINY_STEPS
    assert {name: (out / name).read_text() for name in before} == before


def test_training_dynamics_script():
    out = dynamics_run()
    rows = store.read_rows_csv(out / "dynamics.csv")
    assert [(r["step"], r["layer"]) for r in rows] == [
        (str(s), layer) for s in (0, TINY_STEPS) for layer in ("conv3", "conv5")
    ]
    assert {"val_accuracy", "unique_detectors", "unique_color", "share_texture"} <= set(rows[0])
    for name in ("dynamics.json", "dynamics.png", "dynamics_accuracy.png", "results.json"):
        assert (out / name).is_file()
    assert json.loads((out / "dynamics.json").read_text())["elapsed_s"] > 0


def test_rotation_script():
    out = rotation_run()
    doc = json.loads((out / "rotation.json").read_text())
    points = doc["points"]
    assert [p["amount"] for p in points] == [0.0, 0.5, 1.0]
    assert doc["settings"]["units"] == 128 and doc["elapsed_s"] > 0
    for p in points:
        assert p["max_output_change"] < 1e-4  # folded: the network is unchanged
    assert points[0]["accuracy_inserted"] == points[0]["accuracy_folded"]
    assert (out / "rotation.png").is_file() and (out / "rotation.csv").is_file()


def test_compare_script(tmp_path):
    weights = trained_run() / "weights" / f"step_{TINY_STEPS:06d}"
    rows = run_script(
        "compare",
        f"--results=dynamics={dynamics_run()}",
        f"--dissect=tiny||{weights}|conv1",
        *data_args(),
        *PROBE_ARGS,
        "--max_images=32",
        f"--output_dir={tmp_path}",
    )
    assert [(r["name"], r["layer"]) for r in rows] == [("tiny", "conv1")] + [
        ("dynamics", f"step{s:06d}-{layer}")
        for s in (0, TINY_STEPS)
        for layer in ("conv3", "conv5")
    ]
    assert rows[0]["path"] == "features/1" and rows[0]["num_units"] == 16
    table = store.read_rows_csv(tmp_path / "compare.csv")
    assert len(table) == len(rows) and "share_color" in table[0]
    assert (tmp_path / "tiny" / "results.json").is_file()
    assert json.loads((tmp_path / "compare.json").read_text())["elapsed_s"] > 0
    for name in ("compare_unique.png", "compare_unique_stacked.png", "compare_interpretable.png"):
        assert (tmp_path / name).is_file()


@pytest.mark.parametrize(
    "flagfile", sorted(p.name for p in (ROOT / "experiments" / "configs").glob("*.flags"))
)
def test_flagfiles_parse_and_say_how_to_run_them(flagfile):
    """Every flagfile names its script's command, parses with that script's flags, and
    builds the settings the script would."""
    path = ROOT / "experiments" / "configs" / flagfile
    text = path.read_text()
    assert text.startswith("#") and f"--flagfile=experiments/configs/{flagfile}" in text
    name = re.search(r"python experiments/(\w+)\.py --flagfile", text).group(1)
    fv = parse(name, f"--flagfile={path}")
    assert fv.output_dir and fv.output_dir.startswith("runs/")
    if name == "train":
        cli.from_flags(training.TrainConfig, fv)
    else:
        cli.settings_from_flags(fv), cli.options_from_flags(fv)
        cli.from_flags(cli.Probe, fv)


def test_scripts_fail_clearly_without_their_inputs():
    with pytest.raises(ValueError, match="--run"):
        run_script("training_dynamics")
    with pytest.raises(ValueError, match="--weights"):
        run_script("rotation")
    with pytest.raises(ValueError, match="nothing to compare"):
        run_script("compare")
    with pytest.raises(ValueError, match="NAME|MODEL|WEIGHTS|LAYERS"):
        script("compare").parse_entry("a|b")


def test_script_main_says_what_is_wrong_in_one_line():
    def missing_input():
        raise FileNotFoundError("no such run: runs/x")

    def bug():
        raise RuntimeError("a bug")

    with pytest.raises(SystemExit, match="^error: no such run: runs/x$"):
        cli.script_main(missing_input)(["prog"])
    with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback
        cli.script_main(bug)(["prog"])
    with pytest.raises(app.UsageError, match="unexpected arguments"):
        cli.script_main(lambda: None)(["prog", "extra"])

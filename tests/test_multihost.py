"""Several hosts: `dissect.py --distributed` as 2 processes (2 CPU devices each, gloo
collectives over loopback) gives exactly the files of 1 process with 4 devices."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import random
import shutil
import socket
import subprocess
import types

import numpy as np
import pytest

from jaxdissect.data import synthetic
from tests.experiment_testing import DISSECT_IMPORTS, QUICK, ScriptProcesses

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    """A port no socket holds, below the kernel's ephemeral range: other processes' outgoing
    connections and port-0 binds draw from that range, so a port from it (a port-0 bind's)
    could be taken in the seconds before the coordinator binds it."""
    low = int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = range(max(1024, low - 10000), low)
    for port in random.sample(ports, min(len(ports), 100)):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port below the ephemeral range ({low})")


@pytest.fixture
def ranks():
    """A fork server for each process of a 2-process job (process 0's also runs the 1-process
    job): every run its own process of dissect.py, without a fresh interpreter's imports."""
    warm = (*DISSECT_IMPORTS, "jaxdissect.models.small_cnn")
    with ScriptProcesses(*warm) as rank0, ScriptProcesses(*warm) as rank1:
        yield [rank0, rank1]


DISSECT = ROOT / "experiments" / "dissect.py"


def _dissect(
    scripts: ScriptProcesses,
    out: pathlib.Path,
    data: pathlib.Path,
    devices: int,
    *extra: str,
    script: pathlib.Path = DISSECT,
) -> subprocess.CompletedProcess:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return scripts.run(
        script,
        "--model=jaxdissect.models.small_cnn:small_cnn",
        "--model_option=image_size=48",
        "--model_option=num_classes=5",
        "--weights=",
        f"--data={data}",
        "--resolution=48",
        "--layers=conv5",
        "--quantile_mode=exact",
        "--batch_size=8",
        "--checkpoint_every=2",  # orbax stream checkpoints written by both processes
        "--noprogress",
        "--noreport",
        f"--output_dir={out}",
        *extra,
        env=env,
        cwd=ROOT,
    )


def _finish(done: subprocess.CompletedProcess, what: str, returncode: int = 0) -> str:
    log = done.stdout + done.stderr
    assert done.returncode == returncode, f"{what} exited {done.returncode}:\n{log[-3000:]}"
    return log


def _two_processes(
    ranks,
    out: pathlib.Path,
    data: list[pathlib.Path],
    *extra: list[str],
    devices=(2, 2),
    script: pathlib.Path = DISSECT,
):
    """The 2 processes of a job on `data[i]`, process i also given `extra[i]` and `devices[i]`
    CPU devices, run at once (`script`: dissect.py, or one that runs it)."""
    port = _free_port()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = [
            pool.submit(
                _dissect,
                ranks[i],
                out,
                data[i],
                devices[i],
                "--distributed",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
                *(extra[i] if extra else ()),
                script=script,
            )
            for i in range(2)
        ]
        return [run.result() for run in runs]


def test_each_host_may_set_its_own_progress_cache_and_reading(monkeypatch):
    """The same-job check compares every flag of dissect.py but those a host may set its own
    way without changing the results (how it joins, reads, caches and shows progress)."""
    from jaxdissect import parallel
    from tests.experiment_testing import parse, script

    dissect = script("dissect")
    compared = []
    monkeypatch.setattr(parallel, "check_same_job", compared.append)
    model = types.SimpleNamespace(key="weights")
    for argv in ([], ["--noprogress", "--activation_cache=disk", "--cache_budget_bytes=9"]):
        dissect.check_same_job(parse("dissect", *argv), _Probe(), model)
    assert compared[0] == compared[1]
    assert {"--batch_size", "--tie_rule", "the model weights"} <= set(compared[0])
    for own in ("progress", "activation_cache", "cache_budget_bytes", "data", "loader_threads"):
        assert f"--{own}" not in compared[0]


class _Probe:
    """A probe set with an identity, as the same-job check reads it."""

    def identity(self) -> str:
        return "probe"

    def __len__(self) -> int:
        return 3


@pytest.mark.slow
def test_the_multi_host_flags_without_distributed_are_refused(tmp_path):
    """--coordinator_address, --num_processes and --process_id without --distributed ran
    one lone process over the whole probe set (each host alike), silently."""
    from tests.experiment_testing import run_script

    for flag in ("--coordinator_address=127.0.0.1:1234", "--num_processes=2", "--process_id=1"):
        with pytest.raises(ValueError, match=f"^{flag}: only a multi-host job"):
            run_script(
                "dissect",
                flag,
                "--model=tests.fixtures.small_model:make",
                "--weights=",
                "--synthetic_images=8",
                "--resolution=64",
                "--layers=conv1",
                *QUICK,
                f"--output_dir={tmp_path / 'out'}",
            )
    assert not (tmp_path / "out").exists()


def test_two_processes_match_one(tmp_path, ranks):
    data = tmp_path / "broden"
    synthetic.generate(data, num_images=36, size=48, workers=1)  # 36: a partial last batch
    copy = tmp_path / "copy"  # process 1's host holds its own copy: other file times
    shutil.copytree(data, copy)
    _finish(_dissect(ranks[0], tmp_path / "one", data, 4), "the 1-process run")
    for i, p in enumerate(_two_processes(ranks, tmp_path / "two", [data, copy])):
        _finish(p, f"process {i} of the 2-process run")

    # The output_dir's lock file names its holder's pid: the one file that differs.
    def outputs(d):
        return sorted(p.name for p in d.iterdir() if p.is_file() and p.name != ".lock")

    files = outputs(tmp_path / "one")
    assert files == outputs(tmp_path / "two")
    assert "results.json" in files and sum(f.startswith("tally-") for f in files) == 1
    for name in files:
        a, b = tmp_path / "one" / name, tmp_path / "two" / name
        if name.endswith(".npz"):
            with np.load(a) as x, np.load(b) as y:
                assert sorted(x.files) == sorted(y.files)
                for k in x.files:
                    np.testing.assert_array_equal(x[k], y[k], err_msg=f"{name}:{k}")
        else:
            assert a.read_bytes() == b.read_bytes(), name

    # Processes given other flags or probe sets are refused, every one, before pass 1.
    other = ["--tie_rule=inclusive", "--max_images=9"]
    for i, p in enumerate(_two_processes(ranks, tmp_path / "other", [data, copy], [], other)):
        log = _finish(p, f"process {i} of the 2-process run given other flags", 1)
        assert (
            "error: the processes of this multi-host job differ in --max_images (process 1 "
            "against process 0); --tie_rule (process 1 against process 0); the probe set "
        ) in log


def test_an_output_dir_in_use_stops_every_process(tmp_path, ranks):
    """Process 0 alone takes the output_dir's lock: where another run holds it, every process
    stops with the one line (process 1 waited in the job's first collective, then printed a
    traceback)."""
    from jaxdissect import outdir

    data = tmp_path / "broden"
    synthetic.generate(data, num_images=8, size=48, workers=1)
    with outdir.locked(tmp_path / "out"):  # another run's (this test's pid)
        runs = _two_processes(ranks, tmp_path / "out", [data, data])
    for i, p in enumerate(runs):
        log = _finish(p, f"process {i} of the 2-process run", 1)
        assert f"error: --output_dir={tmp_path / 'out'} is in use by pid {os.getpid()} " in log
        assert "Traceback" not in log


def test_an_error_of_one_process_stops_every_process(tmp_path, ranks):
    """A host's own --data missing (checked before the job joins) or unreadable (read after):
    that process says why, the other that it stopped, each in one line (the other waited
    to join, or in the job's first collective, then printed a traceback)."""
    data = tmp_path / "broden"
    synthetic.generate(data, num_images=8, size=48, workers=1)
    broken = tmp_path / "broken"
    shutil.copytree(data, broken)
    (broken / "index.csv").write_text("not an index\n")
    for i, other in enumerate([tmp_path / "missing", broken]):
        runs = _two_processes(ranks, tmp_path / f"out{i}", [data, other])
        log0 = _finish(runs[0], "process 0, given the data", 1)
        log1 = _finish(runs[1], f"process 1, given {other.name}", 1)
        assert (
            "error: process 1 of this multi-host job stopped with an error (its output says "
            "which): fix it there and start every process again"
        ) in log0
        assert f"error: --data={other}" in log1 or f"error: {other}" in log1, log1[-2000:]
        assert "Traceback" not in log0 + log1


def test_processes_of_other_device_counts_are_refused(tmp_path, ranks):
    """Each process feeds its devices an equal share of every batch: a job whose processes
    have other numbers of devices is refused in one line saying so (it said "cannot reshape
    array of size 3 into shape (2,2)")."""
    data = tmp_path / "broden"
    synthetic.generate(data, num_images=8, size=48, workers=1)
    extra = ["--batch_size=6"]
    for i, p in enumerate(
        _two_processes(ranks, tmp_path / "out", [data, data], extra, extra, devices=(2, 1))
    ):
        log = _finish(p, f"process {i}", 1)
        assert (
            "error: the processes of this multi-host job have other numbers of devices "
            "(process 0: 2, process 1: 1): give every process as many"
        ) in log


# Training by a job of `argv[2]` processes (this one `argv[3]`), joined at port `argv[1]`.
_TRAIN = """
import sys, jax
from jaxdissect import parallel, scenes, training
from jaxdissect.data.broden import Broden
port, processes, process, data, out = sys.argv[1:]
if processes != "1":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", int(processes), int(process))
task = scenes.scene_task(*(Broden.open(data, split=s) for s in ("train", "val")))
config = training.TrainConfig(width=0.125, steps=2, batch_size=4, save_steps=(2,))
training.train(config, task, out, mesh=parallel.data_mesh(), progress=False, log_every=1)
"""


@pytest.mark.slow
def test_two_processes_train_and_export_as_one(tmp_path, ranks):
    """Process 0 exports a training run's weights alone (orbax's barriers waited for the
    other process, which was in its next step: both died), and 2 processes of 1 device
    export the weights of 1 process of 2 devices."""
    from jaxdissect.models import convert

    data = synthetic.generate(tmp_path / "broden", num_images=32, size=48, workers=1)
    script = tmp_path / "train.py"
    script.write_text(_TRAIN)

    def train(i: int, processes: int, out: pathlib.Path, port: int = 0):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={3 - processes}"}
        argv = (str(port), str(processes), str(i), str(data), str(out))
        done = ranks[i].run(script, *argv, env=env, cwd=ROOT, timeout=240)
        _finish(done, f"process {i} of {processes}")

    port = _free_port()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for run in [pool.submit(train, i, 2, tmp_path / "two", port) for i in range(2)]:
            run.result()
    train(0, 1, tmp_path / "one")
    meta = [convert.read_meta(tmp_path / d / "weights" / "step_000002") for d in ("one", "two")]
    assert meta[0][convert.VARIABLES_FINGERPRINT] == meta[1][convert.VARIABLES_FINGERPRINT]


# dissect.py with JAX's shutdown timeout 1 s (5 minutes: a real run's report can take longer)
# and 3 s spent on writing results.json before it is written (last argument "fail": then failing).
_SLOW_RESULTS = f"""
import functools, runpy, sys, time
import jax
from jaxdissect import results
jax.distributed.initialize = functools.partial(
    jax.distributed.initialize, shutdown_timeout_seconds=1
)
write = results.write_results_json
def slow(*args, **kwargs):
    time.sleep(3)
    if fail:
        raise ValueError("results.json: cannot be written")
    return write(*args, **kwargs)
results.write_results_json = slow
fail = sys.argv.pop() == "fail"
sys.argv[0] = {str(DISSECT)!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_every_process_waits_for_process_0s_results(tmp_path, ranks):
    """Process 1 exits once process 0 has written the results, however long that takes (it
    exited at once, and where process 0 wrote for longer than JAX's shutdown timeout, the
    coordination service aborted process 0 before results.json), or with an error once
    process 0 has failed to."""
    data = tmp_path / "broden"
    synthetic.generate(data, num_images=8, size=48, workers=1)
    script = tmp_path / "slow_results.py"
    script.write_text(_SLOW_RESULTS)
    out = tmp_path / "out"
    runs = _two_processes(ranks, out, [data, data], ["ok"], ["ok"], script=script)
    for i, p in enumerate(runs):
        _finish(p, f"process {i}")
    assert (out / "results.json").is_file()
    fail = ["fail"]
    runs = _two_processes(ranks, tmp_path / "fail", [data, data], fail, fail, script=script)
    assert "error: results.json: cannot be written" in _finish(runs[0], "process 0", 1)
    assert "error: process 0 of this multi-host job stopped" in _finish(runs[1], "process 1", 1)

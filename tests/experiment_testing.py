"""Running the experiment scripts inside tests, and the tiny synthetic Broden they train on.

Each script is loaded from its file and run through `run(flag_values)` (what
its `main` calls) on flags parsed by a fresh `FlagValues`, so that the
scripts' flags do not collide.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
from absl import flags

from jaxdissect import outdir, results
from jaxdissect.data import synthetic
from jaxdissect.report import html as report_html

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 256 synthetic images at 48 px: enough for a half-width small CNN to learn the scenes.
TINY_IMAGES, TINY_SIZE = 256, 48
# A quick dissection for a script's test: exact thresholds, one device, no report.
QUICK = ("--quantile_mode=exact", "--batch_size=8", "--devices=1", "--noreport", "--noprogress")


def tiny_broden(out: pathlib.Path) -> pathlib.Path:
    """Writes the tiny synthetic Broden the experiment tests train and dissect on."""
    return synthetic.generate(out, num_images=TINY_IMAGES, size=TINY_SIZE, workers=1)


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


# Forks one child per request: `python SCRIPT ARGV` as a fresh interpreter runs it (its
# `__main__`, argv, sys.path[0], environment, folder, stdin/stdout/stderr); its pid back at
# once, its exit status (a file) once it ends. Ctrl-C raises KeyboardInterrupt whatever
# SIGINT's disposition the test process passed on (a library of an earlier test may ignore
# it in this worker, and Python then never installs its handler: CI once saw a Ctrl-C
# followed by a normal finish).
_FORK_SERVER = """
import gc, importlib, json, os, runpy, signal, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
gc.freeze()  # the children leave the imported objects to the OS at exit
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        for fd, path in enumerate((os.devnull, job["stdout"], job["stderr"])):
            os.dup2(os.open(path, os.O_RDWR), fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.alarm(job["timeout"])
        sys.argv, sys.path[0] = [job["script"], *job["argv"]], os.path.dirname(job["script"])
        runpy.run_path(job["script"], run_name="__main__")
        sys.exit(0)  # the interpreter's status at a script's end
    print(pid, flush=True)
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    with open(job["status"] + ".tmp", "w") as f:
        f.write(str(status))
    os.replace(job["status"] + ".tmp", job["status"])
"""


class ScriptRun:
    """A script's run started by `ScriptProcesses.start`: its pid, `poll`, `wait`,
    `send_signal` and `communicate` as `subprocess.Popen`'s (stdout and stderr as text)."""

    def __init__(self, pid: int, folder: tempfile.TemporaryDirectory):
        self.pid, self._folder = pid, folder
        self._status = pathlib.Path(folder.name, "status")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self._status.exists():
            self.returncode = int(self._status.read_text())
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.01)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        folder = pathlib.Path(self._folder.name)
        out = ((folder / "stdout").read_text(), (folder / "stderr").read_text())
        self._folder.cleanup()
        return out


# What experiments/dissect.py imports (a fork server's `warm` modules for its runs).
DISSECT_IMPORTS = (
    *("absl.app", "flax.nnx", "jaxdissect.pipeline", "jaxdissect.data.synthetic"),
    "jaxdissect.models.load",
)


class ScriptProcesses:
    """Runs scripts as `python SCRIPT ARGV` does, each run its own process (its exit status,
    stdout and one-line-or-not stderr are a real process's), forked from one that imported
    `warm` once: without a fresh interpreter's seconds of imports a run. A context manager:
    its exit ends the server."""

    def __init__(self, *warm: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self._server = subprocess.Popen(
            [sys.executable, "-c", _FORK_SERVER, *warm],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )

    def start(
        self,
        script: str | os.PathLike[str],
        *argv: str,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: int = 300,
    ) -> ScriptRun:
        """Start `python SCRIPT ARGV` (one run at a time: wait for it before the next)."""
        folder = tempfile.TemporaryDirectory()
        out, err = pathlib.Path(folder.name, "stdout"), pathlib.Path(folder.name, "stderr")
        out.touch(), err.touch()
        job = {
            "script": os.path.abspath(script),
            "argv": list(argv),
            "env": dict(os.environ if env is None else env),
            "cwd": os.path.abspath(cwd or os.getcwd()),
            "stdout": str(out),
            "stderr": str(err),
            "status": os.path.join(folder.name, "status"),
            "timeout": timeout,
        }
        self._server.stdin.write(json.dumps(job) + "\n")
        self._server.stdin.flush()
        return ScriptRun(int(self._server.stdout.readline()), folder)

    def run(
        self,
        script: str | os.PathLike[str],
        *argv: str,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        timeout: int = 300,
    ) -> subprocess.CompletedProcess:
        """Run `python SCRIPT ARGV` to its end."""
        started = self.start(script, *argv, env=env, cwd=cwd, timeout=timeout)
        stdout, stderr = started.communicate()
        return subprocess.CompletedProcess([script, *argv], started.returncode, stdout, stderr)

    def close(self) -> None:
        self._server.stdin.close()
        self._server.wait(timeout=60)

    def __enter__(self) -> ScriptProcesses:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def unaccounted_files(out: pathlib.Path) -> list[str]:
    """Files in `out` that neither its dissection (results.json, tallies, stats, report) nor
    `outdir.FOLLOW_ON_OUTPUTS` name: a follow-on's output a rerun would leave behind."""
    stems = results.layer_file_stems(
        json.loads((out / "results.json").read_text())["settings"]["layers"]
    )
    known = {
        out / name
        for name in (
            "results.json",
            outdir.LOCK_FILE,
            *report_html.report_files(stems),
            *(results.tally_csv_name(s) for s in stems),
            *(results.stats_npz_name(s) for s in stems),
        )
    }
    known |= set(outdir.follow_on_files(out))
    return sorted(
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file()
        and ".work" not in p.relative_to(out).parts
        and not known.intersection((p, *p.parents))
    )


def mesh_of(platform: str, device_kind: str) -> types.SimpleNamespace:
    """A stand-in mesh of one device of another backend, for stage keys."""
    device = types.SimpleNamespace(platform=platform, device_kind=device_kind)
    return types.SimpleNamespace(devices=np.array([device], dtype=object))

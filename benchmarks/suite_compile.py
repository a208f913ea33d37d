"""Where the test suite's time goes to JAX: a pytest plugin that sums, per test file and
per jitted program, the time JAX spent tracing, lowering and compiling (its monitoring
events), and the compile time its persistent cache saved.

  PYTHONPATH=benchmarks python -m pytest -n 2 -p suite_compile
  PYTHONPATH=benchmarks python -m pytest -n 0 -p suite_compile tests/test_engine.py

Each process (an xdist worker, or pytest without xdist) writes its sums to
`$SUITE_COMPILE_DIR` (default: a temp directory named in the summary); the session's first
process empties it of earlier sessions' sums when it starts and prints the totals when the
session ends. Compile times sum over threads (the driver compiles ahead in background
threads), so a test's compile may exceed its wall time. Tests that start subprocesses (the
multi-host and resume tests, the CLI) count only their own process.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import tempfile
import time

import jax.monitoring
import pytest
from jax._src import dispatch

_EVENTS = {
    dispatch.BACKEND_COMPILE_EVENT: "compile",
    dispatch.JAXPR_TRACE_EVENT: "trace",
    dispatch.JAXPR_TO_MLIR_MODULE_EVENT: "lower",
    "/jax/compilation_cache/compile_time_saved_sec": "saved",
}
_KINDS = ("wall", "compile", "trace", "lower", "saved")


class _Sums:
    """One process's sums: per test file (wall and each kind), per compiled program."""

    def __init__(self) -> None:
        self.test: collections.Counter[str] = collections.Counter()
        self.files: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.programs: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])

    def event(self, event: str, duration: float, **kwargs) -> None:
        kind = _EVENTS.get(event)
        if kind is None:
            return
        self.test[kind] += duration
        if kind == "compile":
            entry = self.programs[str(kwargs.get("fun_name", "?"))]
            entry[0] += 1
            entry[1] += duration


def _directory() -> pathlib.Path:
    path = os.environ.get("SUITE_COMPILE_DIR")
    if not path:  # made once by the session's first process, inherited by its workers
        path = os.environ["SUITE_COMPILE_DIR"] = tempfile.mkdtemp(prefix="suite-compile-")
    pathlib.Path(path).mkdir(parents=True, exist_ok=True)
    return pathlib.Path(path)


_KEY = pytest.StashKey[_Sums]()


def pytest_configure(config) -> None:
    sums = _Sums()
    config.stash[_KEY] = sums
    directory = _directory()
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # an earlier session's sums are not this one's
        for path in directory.glob("*.json"):
            path.unlink()
    jax.monitoring.register_event_duration_secs_listener(sums.event)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    sums = item.config.stash[_KEY]
    sums.test.clear()
    start = time.perf_counter()
    yield
    sums.test["wall"] += time.perf_counter() - start
    sums.files[item.nodeid.split("::")[0]].update(sums.test)


def pytest_sessionfinish(session) -> None:
    sums = session.config.stash[_KEY]
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    out = {"files": sums.files, "programs": sums.programs}
    (_directory() / f"{name}.json").write_text(json.dumps(out))


def pytest_terminal_summary(terminalreporter) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    files: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    programs: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    directory = _directory()
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        for f, kinds in data["files"].items():
            files[f].update(kinds)
        for p, (n, t) in data["programs"].items():
            programs[p][0] += n
            programs[p][1] += t
    write = terminalreporter.write_line
    total = collections.Counter()
    for kinds in files.values():
        total.update(kinds)
    write(f"\nJAX time in the tests, s (sums from {directory}):")
    write("  " + "  ".join(f"{k:>8}" for k in _KINDS) + "  file")
    rows = sorted(files.items(), key=lambda kv: -kv[1]["wall"])
    for f, kinds in [("all", total), *rows[:25]]:
        write("  " + "  ".join(f"{kinds[k]:8.1f}" for k in _KINDS) + f"  {f}")
    write("  compiled programs: count, compile s")
    for p, (n, t) in sorted(programs.items(), key=lambda kv: -kv[1][1])[:15]:
        write(f"  {int(n):6d} {t:8.1f}  {p}")

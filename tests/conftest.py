"""Test session setup: 8 fake CPU devices, so multi-device code runs everywhere; one
persistent compilation cache per test session, shared by the xdist workers and the
scripts the tests start (an identical step is compiled once a session, not once a test);
and XLA without LLVM's optimisations but for the tests marked `optimized`."""

import os
import shutil
import tempfile

# Before JAX initialises its backend: tests of sharded code use meshes of 1 and 8 devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Made by the session's first process (the xdist controller, or pytest without xdist) and
# inherited by its workers and every subprocess; `cli.enable_compilation_cache` uses it too.
if "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxdissect-tests-xla-")
# Compiling is most of the suite's time. Without LLVM's optimisations (XLA's own HLO passes
# still run) a program compiles in about two thirds of the time and computes the same but
# for rounding: optimised XLA:CPU code contracts a * b + c into one fused multiply-add, as
# GPUs do, and unoptimised code rounds twice, as numpy does (mostly: some fusions still
# contract, see tests/fuzz_reference.py). Tests marked `optimized` compile
# as users' runs do: those whose subject is that rounding (upsampling against a threshold)
# and those whose time is running, not compiling. JAX_DISABLE_MOST_OPTIMIZATIONS=0 compiles
# every test so.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

try:  # pytest >= 9: items' node ids are structured
    from _pytest.nodeid import NodeId
except ImportError:  # older pytest: xdist's own suffix works
    NodeId = None

from jaxdissect import cli  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
cli.enable_compilation_cache()  # as the scripts do, in the session's directory

# pytest is the application here: it parses absl flags (as `absl.app.run` does for the
# scripts), which grain needs when it starts worker processes.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

_UNOPTIMIZED = jax.config.read("jax_disable_most_optimizations")  # the session's choice


@pytest.hookimpl(tryfirst=True)  # before the test's fixtures are set up
def pytest_runtest_setup(item) -> None:
    """An `optimized` test (its fixtures and the scripts it starts too) compiles with every
    optimisation; the others as the session chose. `optimized(False)` on a test of an
    `optimized` module: as the session chose. Switching drops the compiled programs, which
    JAX's in-memory caches would otherwise reuse across the two."""
    mark = item.get_closest_marker("optimized")  # the test's own before its module's
    unoptimized = _UNOPTIMIZED and (mark is None or mark.args[:1] == (False,))
    if jax.config.read("jax_disable_most_optimizations") != unoptimized:
        jax.config.update("jax_disable_most_optimizations", unoptimized)
        os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = str(int(unoptimized))
        jax.clear_caches()


def pytest_unconfigure(config) -> None:
    """The session's first process removes the session's compilation cache."""
    if not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def _group(item) -> str | None:
    mark = item.get_closest_marker("xdist_group")
    return (mark.args[0] if mark.args else mark.kwargs.get("name")) if mark else None


@pytest.hookimpl(trylast=True)  # after xdist's own suffixing, which this completes
def pytest_collection_modifyitems(config, items) -> None:
    """The longest work first, so that no long test starts last on `-n 2`: the tests of an
    `xdist_group` (one worker runs a group, its module fixtures built once; the largest
    groups first, as xdist's `--loadscope-reorder` orders them anyway), then the tests marked
    `slow`, then the rest, each in collection order."""
    sizes: dict[str, int] = {}
    for item in items:
        if (name := _group(item)) is not None:
            sizes[name] = sizes.get(name, 0) + 1
    first = {name: i for i, name in enumerate(dict.fromkeys(filter(None, map(_group, items))))}

    def rank(item) -> tuple:
        name = _group(item)
        if name is not None:
            return (0, -sizes[name], first[name])
        return (1 if item.get_closest_marker("slow") else 2,)

    items[:] = sorted(items, key=rank)  # stable: collection order within a rank
    if getattr(config.option, "loadgroup", False):  # an xdist worker under --dist loadgroup
        for item in items:
            _suffix_group(item)


def _suffix_group(item) -> None:
    """`--dist loadgroup` schedules by a `@group` suffix of the node id. pytest-xdist 3.8
    writes it to `item._nodeid`, which pytest 9 no longer reads (`item.nodeid` comes from
    `item._id`): without this every test was its own unit, groups were split over the
    workers and their module fixtures built on each (pytest-xdist issue 1386; PR 1388 sets
    the structured id as here). One group a test, as every `xdist_group` here is."""
    name = _group(item)
    if NodeId is None or name is None or item.nodeid.endswith(f"@{name}"):
        return
    item._id = NodeId.parse(f"{item.nodeid}@{name}")

"""The folder batch loader: shapes, padding, resuming, per-process slices, order."""

from __future__ import annotations

import logging
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from absl import flags

from jaxdissect.data import loader
from jaxdissect.data.broden import Broden, BrodenFormatError
from jaxdissect.data.loader import batches, num_batches
from tests.broden_testing import tiny_broden

KEYS = {"image", "pixel_labels", "image_labels", "valid", "index"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return Broden.open(tiny_broden(tmp_path_factory.mktemp("tiny")).root)


class ArraySource:
    """n examples in memory, each recognisable by its position."""

    def __init__(self, n: int, image_shape=(2, 3, 3)):
        self.n, self.image_shape = n, image_shape

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return {
            "image": np.full(self.image_shape, i + 1, np.float32),
            "pixel_labels": np.full((2, 2, 2), i + 1, np.int32),
            "image_labels": np.full((1,), i + 1, np.int32),
            "index": np.asarray(i, np.int32),
        }


def collect(*args, **kwargs) -> list[dict[str, np.ndarray]]:
    return list(batches(*args, **kwargs))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype, k
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_num_batches():
    assert [num_batches(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(3, 0)


def test_broden_batches_shapes_padding_and_content(tiny):
    out = collect(tiny, 2)
    assert len(out) == 3
    for b in out:
        assert set(b) == KEYS
        assert b["image"].shape == (2, 8, 8, 3) and b["image"].dtype == np.float32
        assert b["pixel_labels"].shape == (2, 4, 4, 4) and b["pixel_labels"].dtype == np.int32
        assert b["image_labels"].shape == (2, 1) and b["image_labels"].dtype == np.int32
        assert b["valid"].dtype == np.bool_ and b["index"].dtype == np.int32
    assert out[2]["valid"].tolist() == [True, False]
    assert out[2]["index"].tolist() == [4, -1]
    for k in ("image", "pixel_labels", "image_labels"):
        assert not out[2][k][1].any()
    # Batches are exactly the stacked examples.
    for i in range(len(tiny)):
        b, j = divmod(i, 2)
        ex = tiny[i]
        for k, v in ex.items():
            np.testing.assert_array_equal(out[b][k][j], v, err_msg=k)
        assert out[b]["valid"][j]


def test_full_batches_need_no_padding(tiny):
    out = collect(tiny, 5)
    assert len(out) == 1 and out[0]["valid"].all()
    assert out[0]["index"].tolist() == [0, 1, 2, 3, 4]


def test_start_batch_resumes(tiny):
    full = collect(tiny, 2)
    assert_batches_equal(collect(tiny, 2, start_batch=1), full[1:])
    assert_batches_equal(collect(tiny, 2, start_batch=2), full[2:])
    assert collect(tiny, 2, start_batch=3) == []
    with pytest.raises(ValueError, match="start_batch 4"):
        batches(tiny, 2, start_batch=4)


@pytest.mark.parametrize("n", [8, 9, 5])
def test_process_slices_partition_each_global_batch(n):
    source = ArraySource(n)
    whole = collect(source, 4)
    parts = [collect(source, 4, process_index=p, process_count=2) for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole) == num_batches(n, 4)
    for k, b in enumerate(whole):
        for key in b:
            joined = np.concatenate([parts[0][k][key], parts[1][k][key]])
            np.testing.assert_array_equal(joined, b[key], err_msg=key)
        assert parts[0][k]["image"].shape == (2, 2, 3, 3)
    # Resuming works per process too.
    assert_batches_equal(
        collect(source, 4, start_batch=1, process_index=1, process_count=2), parts[1][1:]
    )


def test_process_slice_of_pure_padding():
    out = collect(ArraySource(5), 4, process_index=1, process_count=2)
    assert out[1]["valid"].tolist() == [False, False]
    assert out[1]["index"].tolist() == [-1, -1]
    assert out[0]["index"].tolist() == [2, 3]


def test_four_processes_one_row_each():
    source = ArraySource(6)
    rows = [collect(source, 4, process_index=p, process_count=4) for p in range(4)]
    assert [[b["index"][0] for b in r] for r in rows] == [[0, 4], [1, 5], [2, -1], [3, -1]]


def test_deterministic_across_runs_and_thread_counts(tiny):
    reference = collect(tiny, 3, num_threads=0)
    for threads in (1, 2, 4):
        assert_batches_equal(collect(tiny, 3, num_threads=threads), reference)
    assert_batches_equal(collect(tiny, 3), reference)


def test_bad_arguments():
    source = ArraySource(5)
    with pytest.raises(ValueError, match="does not split evenly over 3 processes"):
        batches(source, 4, process_count=3)
    with pytest.raises(ValueError, match="process_index 2"):
        batches(source, 4, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="batch_size"):
        batches(source, 0)
    with pytest.raises(ValueError, match="num_threads"):
        batches(source, 2, num_threads=-1)


def test_empty_source_yields_nothing():
    assert collect(ArraySource(0), 4) == []


def test_source_errors_reach_the_consumer(tiny, tmp_path):
    root = tiny_broden(tmp_path).root
    ds = Broden.open(root)
    (root / "images" / "dtd" / "c.png").unlink()  # after open, whose walk would find it
    with pytest.raises(BrodenFormatError, match="c.png"):
        collect(ds, 2, num_threads=2)


def test_shape_mismatch_is_explained():
    class Ragged(ArraySource):
        def __getitem__(self, i):
            ex = super().__getitem__(i)
            if i == 1:
                ex["image"] = np.zeros((3, 3, 3), np.float32)
            return ex

    with pytest.raises(ValueError, match="disagree on the shape of 'image'"):
        collect(Ragged(3), 2, num_threads=0)


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("grain-prefetch")]


def test_stopping_early_releases_threads():
    gen = batches(ArraySource(40), 2, num_threads=2)
    next(gen)
    gen.close()
    deadline = time.monotonic() + 5
    while _prefetch_threads() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _prefetch_threads()


def test_default_threads_follow_the_usable_cores():
    cores = len(os.sched_getaffinity(0))
    assert loader.default_threads() == max(1, min(4, cores))
    assert loader.default_threads(limit=1) == 1


def test_decoding_advice_only_where_threads_hold_an_accelerator_back(monkeypatch):
    from jaxdissect import parallel

    monkeypatch.setattr(parallel, "usable_cores", lambda: 16)
    many = loader.WORKERS_WORTH_IT
    advice = loader.decoding_advice("gpu", many, None, 0)
    assert "--loader_workers=14" in advice and "4 thread(s) on gpu" in advice
    assert "2 thread(s)" in loader.decoding_advice("tpu", many, 2, 0)
    assert loader.decoding_advice("cpu", many, None, 0) is None
    assert loader.decoding_advice("gpu", many - 1, None, 0) is None
    assert loader.decoding_advice("gpu", many, None, 14) is None
    monkeypatch.setattr(parallel, "usable_cores", lambda: 3)
    assert loader.decoding_advice("gpu", many, None, 0) is None


def test_worker_processes_give_the_same_batches(tiny, tmp_path):
    """Decoding in processes: same batches in the same order, resumed and sliced too (one
    pool: image 3, then a padding row, from two workers; a pool starts in seconds)."""
    sliced = {"start_batch": 1, "process_index": 1, "process_count": 2}
    assert_batches_equal(
        collect(tiny, 2, num_workers=2, **sliced), collect(tiny, 2, num_threads=0, **sliced)
    )
    root = tiny_broden(tmp_path).root
    ds = Broden.open(root)
    (root / "images" / "dtd" / "c.png").unlink()  # after open, whose walk would find it
    with pytest.raises(BrodenFormatError, match="c.png"):
        collect(ds, 2, num_workers=1)
    with pytest.raises(ValueError, match="num_workers"):
        batches(tiny, 2, num_workers=-1)
    unpicklable = ArraySource(4)
    unpicklable.lock = threading.Lock()
    with pytest.raises(ValueError, match=r"ArraySource does not \(TypeError.*--loader_workers=0"):
        collect(unpicklable, 2, num_workers=1)


def test_workers_leave_the_absl_flags_to_the_application():
    """The loader never marks absl flags parsed: unparsed, workers are refused in one line."""
    # Unparsing resets --verbosity, which sets absl's logger to WARNING: put it back, or
    # later tests in this process would see no INFO records.
    level = logging.getLogger("absl").level
    flags.FLAGS.unparse_flags()
    try:
        with pytest.raises(ValueError, match=r"num_workers=2 needs parsed absl flags"):
            batches(ArraySource(8), 2, num_workers=2)
        assert not flags.FLAGS.is_parsed()
    finally:
        flags.FLAGS.mark_as_parsed()
        logging.getLogger("absl").setLevel(level)


class PlatformSource(ArraySource):
    """Reports, in its image, whether JAX in this process may use only the CPU."""

    def __getitem__(self, i):
        import jax

        ex = super().__getitem__(i)
        ex["image"][...] = jax.config.jax_platforms == "cpu"
        return ex


def test_workers_stay_off_the_accelerators_and_stop_with_their_consumer(monkeypatch):
    """Workers inherit the environment: one that allows every platform must not reach
    them. A consumer that stops early stops them (the same pool: one start)."""
    monkeypatch.setenv("JAX_PLATFORMS", "")
    gen = batches(PlatformSource(400), 4, num_workers=1)
    assert (next(gen)["image"] == 1).all()
    assert multiprocessing.active_children()
    gen.close()
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children()


# Its source is its own (cloudpickle sends it by value): neither it nor its workers import
# this module, and pytest with it.
_KILLED_PARENT = """
import multiprocessing, sys, time
import numpy as np
from absl import flags
from jaxdissect.data import loader
class Source:
    def __len__(self):
        return 100000
    def __getitem__(self, i):
        return {"image": np.zeros((2, 2, 3), np.float32), "index": np.asarray(i, np.int32)}
if __name__ == "__main__":
    flags.FLAGS.mark_as_parsed()
    it = loader.batches(Source(), 2, num_workers=2)
    next(it)
    pids = [p.pid for p in multiprocessing.active_children() if "Tracker" not in p.name]
    print(*pids, flush=True)
    time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped by its new parent, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_exit_when_their_parent_is_killed(tmp_path):
    """SIGKILL runs no clean-up in the parent: its decoding processes must still go."""
    script = tmp_path / "parent.py"
    script.write_text(_KILLED_PARENT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, env=env)
    try:
        workers = [int(p) for p in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(_alive(p) for p in workers)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers)

"""The activation cache's host copy: each device's rows land in place."""

import errno
import json
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdissect import actcache, cli, parallel


@pytest.mark.parametrize("spec", [P(parallel.AXIS), P()], ids=["sharded", "replicated"])
def test_copy_local_rows(spec):
    mesh = parallel.data_mesh(8)
    rows = np.random.default_rng(0).normal(size=(16, 3, 2, 5)).astype(np.float16)
    x = jax.device_put(rows, NamedSharding(mesh, spec))
    out = np.full((20, 3, 2, 5), np.nan, np.float16)
    actcache.copy_local_rows(x, out[2:18])
    np.testing.assert_array_equal(out[2:18], rows)
    assert np.isnan(out[:2]).all() and np.isnan(out[18:]).all()
    with pytest.raises(ValueError, match="do not fill"):
        actcache.copy_local_rows(x, out[:17])


def test_host_cache_keeps_rows_put_while_its_pages_are_written(monkeypatch):
    """A host cache writes its pages once on a thread; rows put before that thread is done
    wait for it rather than being overwritten."""
    started, release = threading.Event(), threading.Event()
    page_in = actcache._page_in

    def slow(arrays):
        started.set()
        release.wait(10)
        page_in(arrays)

    monkeypatch.setattr(actcache, "_page_in", slow)
    cache = actcache.ActivationCache("host", {"a": (3, 2)}, 2, 4, np.float16)
    assert started.wait(10)
    rows = np.random.default_rng(1).normal(size=(4, 3, 2)).astype(np.float16) + 1
    threading.Timer(0.2, release.set).start()
    cache.put(0, {"a": jax.device_put(rows)})
    np.testing.assert_array_equal(cache.get(0)["a"], rows)


def _disk(directory, shapes=None):
    shapes = shapes or {"a": (2, 3)}
    return actcache.ActivationCache("disk", shapes, 10, 2, np.float16, directory)


def _put(cache, batches):
    for b in batches:
        cache.put(b, {"a": jnp.full((2, 2, 3), b, jnp.float16)})


def test_a_disk_cache_vouches_only_for_the_batches_it_recorded(tmp_path):
    first = _disk(tmp_path)
    first.resume_at(4)  # a run that started at a checkpoint: new files, nothing before 4
    assert (first.lo, first.hi) == (4, 4)
    _put(first, range(4, 8))
    first.flush()  # before the checkpoint after batch 8
    _put(first, [8])  # killed before the next checkpoint: batch 8 is not vouched for

    again = _disk(tmp_path)
    again.resume_at(8)
    assert (again.lo, again.hi) == (4, 8)  # not [0, 8): batches 0-3 were never written
    assert [int(again.get(b)["a"][0, 0, 0]) for b in range(4, 8)] == [4, 5, 6, 7]
    again.resume_at(2)  # a checkpoint before what the files hold: none of it is usable
    assert (again.lo, again.hi) == (2, 2)
    _put(again, range(2, 10))
    again.flush()
    whole = _disk(tmp_path)
    whole.resume_at(10)
    assert (whole.lo, whole.hi) == (2, 10)

    (tmp_path / "rows-p0.json").write_text("{")  # unreadable: vouches for nothing
    damaged = _disk(tmp_path)
    damaged.resume_at(6)
    assert (damaged.lo, damaged.hi) == (6, 6)
    grown = _disk(tmp_path, {"a": (2, 3), "b": (1, 1)})  # a new layer file: nothing kept
    grown.resume_at(6)
    assert (grown.lo, grown.hi) == (6, 6)
    grown.discard()
    assert not tmp_path.exists()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.float16, np.float32])
def test_a_disk_cache_holds_every_activation_dtype(tmp_path, dtype):
    """bfloat16 rows (--activation_dtype=bfloat16 --activation_cache=disk) failed to be
    written ("No cast function available": its .npy header reads back as void) and a
    resumed run could not have kept them; they round-trip bitwise, and resume."""
    rows = np.random.default_rng(2).normal(size=(2, 2, 3)).astype(dtype)
    rows[0, 0, :2] = [-0.0, 3e4]
    cache = actcache.ActivationCache("disk", {"a": (2, 3)}, 4, 2, dtype, tmp_path)
    cache.put(0, {"a": jnp.asarray(rows)})
    cache.flush()
    got = cache.get(0)["a"]
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got.view(np.uint8), rows.view(np.uint8))
    again = actcache.ActivationCache("disk", {"a": (2, 3)}, 4, 2, dtype, tmp_path)
    again.resume_at(1)
    assert (again.lo, again.hi) == (0, 1)
    np.testing.assert_array_equal(again.get(0)["a"].view(np.uint8), rows.view(np.uint8))


@pytest.mark.parametrize("batch", [4, 7])
def test_a_disk_cache_changed_on_disk_is_started_afresh(tmp_path, batch, caplog):
    """A byte of a vouched-for batch changed on disk (between a killed run and its resume):
    nothing is kept, so pass 2 runs the network rather than read other activations."""
    shapes = {"a": (2, 3), "b": (1, 1)}
    first = _disk(tmp_path, shapes)
    first.resume_at(4)
    for b in range(4, 8):
        first.put(b, {"a": jnp.full((2, 2, 3), b, jnp.float16), "b": jnp.ones((2, 1, 1))})
    first.flush()
    intact = _disk(tmp_path, shapes)
    intact.resume_at(8)
    assert (intact.lo, intact.hi) == (4, 8)
    del first, intact
    layer = np.load(tmp_path / "layer0-p0.npy", mmap_mode="r+")
    layer[batch * 2 + 1, 1, 2] = 99  # one value of the batch's second row
    layer.flush()
    del layer
    damaged = _disk(tmp_path, shapes)
    with caplog.at_level("WARNING"):
        damaged.resume_at(8)
    assert (damaged.lo, damaged.hi) == (8, 8)
    assert f"batch {batch}'s rows are not those it recorded" in caplog.text
    again = _disk(tmp_path, shapes)  # its record was rewritten: it vouches for nothing
    again.resume_at(8)
    assert (again.lo, again.hi) == (8, 8)


def test_a_disk_cache_record_without_crcs_vouches_for_nothing(tmp_path):
    """A record from code that wrote no CRCs, or whose CRCs do not cover its batches."""
    first = _disk(tmp_path)
    first.resume_at(0)
    _put(first, range(3))
    first.flush()
    rows = tmp_path / "rows-p0.json"
    doc = json.loads(rows.read_text())
    assert len(doc["crc32"]) == 3
    for edited in ({"lo": 0, "hi": 3}, {**doc, "crc32": doc["crc32"][:2]}):
        rows.write_text(json.dumps(edited))
        cache = _disk(tmp_path)
        cache.resume_at(3)
        assert (cache.lo, cache.hi) == (3, 3)


def test_cgroup_limits_what_auto_sees_as_free(tmp_path, monkeypatch):
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    v2.mkdir()
    (v2 / "memory.max").write_text("1000000\n")
    (v2 / "memory.current").write_text("700000\n")
    (v2 / "memory.stat").write_text("anon 500000\ninactive_file 100000\nactive_file 100000\n")
    assert actcache.cgroup_free_bytes(v2) == 1_000_000 - (700_000 - 100_000)
    for limit in ("max\n", "garbled\n"):
        (v2 / "memory.max").write_text(limit)
        assert actcache.cgroup_free_bytes(v2) is None
    (v1 / "memory" / "memory.limit_in_bytes").write_text("2000000\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text("2500000\n")  # over: nothing free
    assert actcache.cgroup_free_bytes(v1) == 0
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # no limit
    assert actcache.cgroup_free_bytes(v1) is None
    assert actcache.cgroup_free_bytes(tmp_path / "none") is None
    # Under a limit, `auto` keeps no host cache the container cannot hold.
    monkeypatch.setattr(actcache, "cgroup_free_bytes", lambda: 3 << 20)
    assert actcache.available_host_bytes() == 3 << 20
    assert actcache.choose_kind("auto", 2 << 20, tmp_path) == "disk"  # (CPU: no device kind)


def test_a_disk_cache_file_of_another_shape_is_started_afresh(tmp_path):
    """Files of a run with another process count (other rows per process, the same key)
    are a cache's: rebuilt, vouching for nothing, rather than refused."""
    old = actcache.ActivationCache("disk", {"a": (2, 3)}, 10, 4, np.float16, tmp_path)
    for b in range(3):
        old.put(b, {"a": jnp.full((4, 2, 3), b, jnp.float16)})
    old.flush()
    cache = _disk(tmp_path)  # 2 rows a batch in this process now
    cache.resume_at(2)
    assert (cache.lo, cache.hi) == (2, 2)
    _put(cache, [2])
    assert int(cache.get(2)["a"][0, 0, 0]) == 2
    assert np.load(tmp_path / "layer0-p0.npy", mmap_mode="r").shape == (20, 2, 3)


def test_a_disk_cache_writes_rows_whole_when_the_system_writes_part_at_a_time(
    tmp_path, monkeypatch
):
    pwrite = actcache.os.pwrite
    monkeypatch.setattr(actcache.os, "pwrite", lambda fd, data, at: pwrite(fd, data[:5], at))
    cache = _disk(tmp_path)
    cache.resume_at(0)
    _put(cache, range(3))
    assert [int(cache.get(b)["a"][1, 1, 2]) for b in range(3)] == [0, 1, 2]
    cache.flush()
    again = _disk(tmp_path)
    again.resume_at(3)
    assert (again.lo, again.hi) == (0, 3)  # the CRCs recorded are the rows' on disk


def test_a_disk_cache_write_the_disk_refuses_is_an_error_naming_the_file(tmp_path, monkeypatch):
    """A disk filled by another writer during the run: an ENOSPC naming the layer's file,
    which the scripts say in one line (a write through a memmap was a SIGBUS)."""
    cache = _disk(tmp_path)
    cache.resume_at(0)
    _put(cache, [0])

    def full(fd, data, at):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(actcache.os, "pwrite", full)
    with pytest.raises(OSError) as e:
        _put(cache, [1])
    assert e.value.errno == errno.ENOSPC
    assert e.value.filename == str(tmp_path / "layer0-p0.npy")
    assert cli.full_disk_message(e.value).startswith(f"{tmp_path}: No space left on device")


def test_a_disk_cache_file_with_a_damaged_header_is_started_afresh(tmp_path):
    first = _disk(tmp_path)
    first.resume_at(0)
    _put(first, range(2))
    first.flush()
    del first
    path = tmp_path / "layer0-p0.npy"
    with open(path, "r+b") as f:
        f.write(b"garbage")
    cache = _disk(tmp_path)
    cache.resume_at(2)
    assert (cache.lo, cache.hi) == (2, 2)
    _put(cache, [2])
    assert int(cache.get(2)["a"][0, 0, 0]) == 2
    assert np.load(path, mmap_mode="r").shape == (20, 2, 3)

"""The activation cache's host copy: each device's rows land in place."""

import threading

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdissect import actcache, parallel


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

"""The activation cache's host copy: each device's rows land in place."""

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

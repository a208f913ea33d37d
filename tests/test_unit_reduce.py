"""`fold_rows` equals numpy's min, max and counts over the rows, at any row count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import unit_reduce


def _values(keep, x):
    return (
        jnp.where(keep, x, jnp.inf),
        jnp.where(keep, x, -jnp.inf),
        keep & (x > 0.5),
        jnp.where(keep & jnp.isfinite(x), jnp.round(x * 100), 0).astype(jnp.int32),
    )


def _reference(x, valid):
    kept = x[valid]
    big = np.full(x.shape[1], np.inf, np.float32)
    return (
        kept.min(0) if len(kept) else big,
        kept.max(0) if len(kept) else -big,
        (kept > 0.5).sum(0),
        np.where(np.isfinite(kept), np.round(kept * 100), 0).astype(np.int32).sum(0),
    )


@pytest.mark.parametrize("rows", [1, 63, 64, 65, 128, 1000])
def test_fold_rows_equals_numpy(rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 5)).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.integers(0, flat.size, 3)] = np.inf
    flat[rng.integers(0, flat.size, 3)] = -np.inf
    x[:, 4] = 0.5  # ties at the comparison
    valid = rng.random(rows) < 0.8
    got = jax.jit(lambda x, v: unit_reduce.fold_rows(_values, ("min", "max", "sum", "sum"), v, x))(
        x, valid
    )
    for g, want in zip(got, _reference(x, valid), strict=True):
        np.testing.assert_array_equal(np.asarray(g), want)
    assert got[2].dtype == jnp.int32 and got[0].dtype == jnp.float32


def test_nan_propagates_through_min_and_max():
    x = np.zeros((70, 2), np.float32)
    x[69, 1] = np.nan  # in the padded last block
    low, high = unit_reduce.fold_rows(lambda k, x: (x, x), ("min", "max"), np.ones(70, bool), x)
    assert np.isnan(low[1]) and np.isnan(high[1]) and low[0] == 0 and high[0] == 0


def test_several_inputs_and_integer_extremes():
    a = np.arange(-50, 50, dtype=np.int32).reshape(100, 1)
    b = np.ones((100, 1), np.int32)
    low, high, total = unit_reduce.fold_rows(
        lambda k, a, b: (jnp.where(k, a, jnp.iinfo(jnp.int32).max), a, jnp.where(k, a * b, 0)),
        ("min", "max", "sum"),
        np.arange(100) >= 10,
        a,
        b,
    )
    assert (int(low[0]), int(high[0]), int(total[0])) == (-40, 49, sum(range(-40, 50)))


def test_inside_shard_map_on_8_devices():
    mesh = jax.make_mesh((8,), ("data",))
    x = np.random.default_rng(0).standard_normal((8 * 70, 3)).astype(np.float32)

    def local(x):
        low, high = unit_reduce.fold_rows(
            lambda k, x: (x, x), ("min", "max"), jnp.ones(x.shape[0], bool), x
        )
        return low[None], high[None]

    # The loop's carry is typed as varying over `data` (shard_map checks it).
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P("data")))
    low, high = jax.shard_map(
        local, mesh=mesh, in_specs=jax.P("data"), out_specs=(jax.P("data"), jax.P("data"))
    )(sharded)
    np.testing.assert_array_equal(np.asarray(low), x.reshape(8, 70, 3).min(1))
    np.testing.assert_array_equal(np.asarray(high), x.reshape(8, 70, 3).max(1))


def test_bad_kinds_and_outputs_are_named():
    x = np.ones((3, 2), np.float32)
    with pytest.raises(ValueError, match="kinds"):
        unit_reduce.fold_rows(lambda k, x: (x,), ("mean",), np.ones(3, bool), x)
    with pytest.raises(ValueError, match="2 values for kinds"):
        unit_reduce.fold_rows(lambda k, x: (x, x), ("min",), np.ones(3, bool), x)

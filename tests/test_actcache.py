"""The activation cache's host copy: each device's rows land in place."""

import threading

import jax
import jax.numpy as jnp
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


def test_pass2_reads_no_batch_a_killed_run_of_another_cache_kind_never_wrote(tmp_path):
    """Killed with a host cache (checkpoint 2), killed with a disk cache started at the
    checkpoint (checkpoint 4), finished with a disk cache: the counts are a clean run's."""
    import flax.linen as nn

    from jaxdissect import capture, engine
    from jaxdissect.data import synthetic
    from jaxdissect.data.broden import Broden
    from jaxdissect.models.load import init_variables
    from jaxdissect.preprocess import InputSpec

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.relu(nn.Conv(4, (3, 3), strides=4, name="conv")(x)).mean((1, 2))

    class Killed:
        def __init__(self, source, at=None):
            self.source, self.at = source, at

        def __len__(self):
            return len(self.source)

        def __getattr__(self, name):
            return getattr(self.source, name)

        def read_image(self, i):
            if i == self.at:
                raise KeyboardInterrupt(f"killed at image {i}")
            return self.source.read_image(i)

    probe = Broden.open(synthetic.generate_tiny(tmp_path / "broden", num_images=24, size=32))
    model = Net()
    tap = capture.make_tap(
        model, init_variables(model, jnp.zeros((1, 32, 32, 3))), "conv", input_shape=(32, 32, 3)
    )
    settings = engine.Settings(quantile=0.05, quantile_mode="exact", batch_size=4)

    def run(source, cache, work_dir=None):
        return engine.Dissector(
            tap,
            source,
            settings,
            input_spec=InputSpec(32, (120.0,) * 3, (60.0,) * 3),
            model_key="net",
            mesh=parallel.data_mesh(1),
            progress=False,
            num_threads=0,
            work_dir=work_dir,
            activation_cache=cache,
            checkpoint_every=2,
        ).run(tap.variables)["conv"]

    clean = run(probe, "none")
    for cache, at in (("host", 13), ("disk", 17)):  # killed in batches 3 and 4
        with pytest.raises(KeyboardInterrupt):
            run(Killed(probe, at), cache, tmp_path / "work")
    resumed = run(probe, "disk", tmp_path / "work")
    np.testing.assert_array_equal(resumed.thresholds, clean.thresholds)
    for key, counts in clean.counts.items():
        np.testing.assert_array_equal(resumed.counts[key], counts, err_msg=key)
    assert not list((tmp_path / "work").rglob("*.npy"))  # the disk cache is gone
    # A killed disk run's files are removed by a run that finishes with another kind.
    with pytest.raises(KeyboardInterrupt):
        run(Killed(probe, 9), "disk", tmp_path / "again")
    assert list((tmp_path / "again").rglob("*.npy"))
    run(probe, "host", tmp_path / "again")
    assert not list((tmp_path / "again").rglob("*.npy"))

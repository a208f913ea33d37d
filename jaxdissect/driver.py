"""One pass over the probe set for any statistic: sharded, bounded, resumable.

`run_pass` streams a source's batches through a `Forward` (the network and its
layer capture, compiled once and shared by every pass) or the activation cache,
and folds them into a `statistics.Statistic` with a `jax.shard_map` step over the
`data` mesh axis: every device keeps its own state (own sketch seed), nothing
crosses devices inside a step, and the per-device states are merged at the end by
the statistic's own `merge` (`statistics.merge_devices`). The driver also bounds
the steps in flight, checkpoints the state with orbax every N batches (a killed
pass resumes where it stopped and ends identical), shows progress, and stores a
finished stage's outputs under their keys (`stage_outputs`). It knows nothing of
what a statistic computes: a new statistic or a third pass adds no code here.

Compiled steps live in a `Steps` cache owned by the caller: passes and Dissectors
given the same cache reuse one jitted function per statistic key (and per
forward), so `jax.jit`'s own executable cache serves them all; a process compiles
each (model, layers, batch shape) once.
"""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from jaxdissect import actcache, parallel, statistics, store
from jaxdissect.checkpoint import StreamCheckpoint
from jaxdissect.data import loader
from jaxdissect.preprocess import InputSpec

CACHE_MODES = (None, "write", "read")
_T = TypeVar("_T")


class Steps:
    """Jitted steps by key, owned by the caller and shared by every pass given it.

    A key must name everything the built step closes over; `jax.jit` then keeps one
    executable per argument signature of that one function object. Key None: built
    anew each time (nothing shared).
    """

    def __init__(self):
        self._built: dict[Hashable, Any] = {}

    def get(self, key: Hashable | None, build: Callable[[], _T]) -> _T:
        if key is None:
            return build()
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]


def partial_shard_map(f: Callable, **kwargs) -> Callable:
    """`jax.shard_map` for per-device steps without collectives.

    Each device updates its own statistics; nothing crosses devices inside a
    step, so the varying-manual-axes type check (which would make every loop
    carry in the statistics' code carry `pcast` annotations) is off.
    """
    return jax.shard_map(f, check_vma=False, **kwargs)


def _squeeze(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[0], tree)


def _expand(tree: Any) -> Any:
    return jax.tree.map(lambda x: x[None], tree)


class Forward:
    """The network's captured activations of a sharded batch, compiled once.

    `fn(variables, preprocessed images) -> {layer: [B, h, w, K]}` (a `capture.Tap`'s
    `fn`); activations come back rounded to `dtype` and stored in it, as every
    statistic and the activation cache see them. Calls with the same batch shape
    reuse one compiled executable, in every pass that holds this object.
    """

    def __init__(
        self,
        fn: Callable[[Any, jax.Array], dict[str, jax.Array]],
        input_spec: InputSpec,
        dtype: Any,
        mesh: jax.sharding.Mesh,
    ):
        self.dtype = jnp.dtype(dtype)
        self.mesh = mesh

        def local(variables, images):
            acts = fn(variables, input_spec(images))
            return {k: v.astype(self.dtype) for k, v in acts.items()}

        self._step = jax.jit(
            partial_shard_map(
                local, mesh=mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P(parallel.AXIS)
            )
        )

    def __call__(self, variables: Any, images: jax.Array) -> dict[str, jax.Array]:
        return self._step(variables, images)


def update_step(statistic: statistics.Statistic, mesh: jax.sharding.Mesh) -> Callable:
    """`step(states, acts, batch) -> states`: per-device `statistic.update`, states donated."""

    def local(state, acts, batch):
        fields = {**batch, "acts": {k: v.astype(jnp.float32) for k, v in acts.items()}}
        return _expand(statistic.update(_squeeze(state), fields))

    data = P(parallel.AXIS)
    return jax.jit(
        partial_shard_map(local, mesh=mesh, in_specs=(data, data, data), out_specs=data),
        donate_argnums=(0,),
    )


def run_pass(
    name: str,
    statistic: statistics.Statistic,
    source: loader.Source,
    *,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    forward: Forward | None = None,
    variables: Any = None,
    cache: actcache.ActivationCache | None = None,
    cache_mode: str | None = None,
    checkpoint_dir: str | pathlib.Path | None = None,
    checkpoint_every: int = 50,
    progress: bool = False,
    description: str = "",
    num_threads: int | None = None,
    num_workers: int = 0,
    steps: Steps | None = None,
) -> dict[str, Any]:
    """Fold every batch of `source` into `statistic`; return its finalized, merged result.

    Args:
      name: the pass's name (logs, checkpoint directory).
      statistic: what to compute (`statistics.group` for several).
      source: examples with `index` and, where activations are not all cached,
        `image` (`loader.Source`); labels if a statistic reads them.
      mesh, batch_size: the `data` mesh and the global batch (divisible by its devices).
      forward, variables: the network; needed unless every batch is cached.
      cache, cache_mode: `write` fills `cache` with each batch's activations,
        `read` takes a batch's activations from it where it has them.
      checkpoint_dir: where the pass's state is checkpointed every
        `checkpoint_every` batches and resumed from (None: no checkpoints). Its name
        must be a key of everything the state depends on.
      steps: compiled steps to reuse and add to (None: compiled for this pass alone).
    """
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode={cache_mode!r}; allowed values: write, read, None")
    if cache_mode is not None and cache is None:
        raise ValueError(f"cache_mode={cache_mode!r} needs a cache")
    parallel.check_batch_size(batch_size, mesh)
    num_batches = loader.num_batches(len(source), batch_size)
    shards = int(mesh.devices.size)
    state = jax.device_put(statistics.stack_shards(statistic, shards), parallel.sharded(mesh))
    ckpt, start = None, 0
    if checkpoint_dir is not None:
        ckpt = StreamCheckpoint(checkpoint_dir, checkpoint_every)
        state, start = ckpt.restore(state)
        if start:
            logging.info("%s: resuming after batch %d of %d", name, start, num_batches)
    if cache_mode == "write":
        cache.resume_at(start)
    if forward is not None:
        variables = parallel.replicate(variables, mesh)
    steps = Steps() if steps is None else steps
    step = steps.get(
        None if statistic.key is None else ("update", statistic.key, mesh),
        lambda: update_step(statistic, mesh),
    )
    # The merge is a static argument of a jitted reduction: one function object per key.
    merge = steps.get(
        None if statistic.key is None else ("merge", statistic.key), lambda: statistic.merge
    )

    def before_checkpoint():
        # Cached rows must be on disk before a checkpoint says they were computed.
        if cache is not None:
            cache.flush()

    bar = _Bar(f"{name} {description}".strip(), start, batch_size, len(source), progress)
    batches = loader.batches(
        source,
        batch_size,
        start_batch=start,
        num_threads=num_threads,
        num_workers=num_workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    in_flight = parallel.InFlight()
    first = True
    for b, batch in enumerate(batches, start=start):
        batch = dict(batch)
        images = batch.pop("image", None)
        if first:  # compiling the forward and the step takes a while: say so first
            logging.info("%s: compiling the steps (first batch) ...", name)
            t0 = time.time()
        if cache_mode == "read" and cache.has(b):
            acts = cache.get(b)
            if cache.kind != "device":
                acts = parallel.put_batch(acts, mesh)
        elif images is None or forward is None:
            raise RuntimeError(f"{name}: batch {b} is neither cached nor read with images")
        else:
            acts = forward(variables, parallel.put_batch({"image": images}, mesh)["image"])
            if cache_mode == "write" and cache.enabled:
                cache.put(b, acts)
        state = step(state, acts, parallel.put_batch(batch, mesh))
        if first:
            logging.info("%s: steps traced and compiled in %.1f s", name, time.time() - t0)
            first = False
        in_flight.add(state)
        bar.update(b + 1)
        if ckpt is not None and (b + 1) % checkpoint_every == 0:
            before_checkpoint()
            ckpt.maybe_save(b + 1, state)
    bar.close()
    if ckpt is not None:
        before_checkpoint()
        ckpt.maybe_save(num_batches, state, force=True)
        ckpt.close()
    merged = statistics.merge_devices(merge, parallel.gather_to_host(state))
    return statistic.finalize(jax.device_get(merged))


def stage_outputs(
    root: pathlib.Path | None,
    stage: str,
    keys: Mapping[str, str],
    descriptions: Mapping[str, Mapping[str, Any]],
    compute: Callable[[], Mapping[str, Mapping[str, np.ndarray]]],
) -> dict[str, dict[str, np.ndarray]]:
    """Per-part arrays of a stage (parts: layers), loaded if all are stored under their
    `keys` in `root`, else computed and stored (by process 0)."""
    if root is None:
        return dict(compute())
    stages = {part: store.Stage(root, stage, key) for part, key in keys.items()}
    if all(s.done for s in stages.values()):
        logging.info(
            "%s: reusing stored results (%s)", stage, ", ".join(str(s.dir) for s in stages.values())
        )
        return {part: store.load_arrays(s.path("arrays.npz")) for part, s in stages.items()}
    result = dict(compute())
    if jax.process_index() == 0:
        for part, s in stages.items():
            store.save_arrays(s.path("arrays.npz"), result[part])
            s.mark_done(descriptions[part])
    return result


class _Bar:
    """A tqdm bar in images with images/s and ETA (quiet when disabled or not process 0)."""

    def __init__(self, desc: str, start: int, batch_size: int, num_images: int, enabled: bool):
        self.batch_size, self.num_images = batch_size, num_images
        self.bar = None
        if enabled and jax.process_index() == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=num_images,
                initial=min(start * batch_size, num_images),
                desc=desc,
                unit="img",
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def update(self, batches_done: int) -> None:
        if self.bar is not None:
            self.bar.n = min(batches_done * self.batch_size, self.num_images)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["CACHE_MODES", "Forward", "Steps", "partial_shard_map", "run_pass", "stage_outputs"]

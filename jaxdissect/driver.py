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
each (model, layers, batch shape) once. A group's parts (`Statistic.parts`: a pass's
layers) are separate programs, and a pass's first batch compiles the forward, every
part and the closing merge of the devices' states at once in the cache's background
threads (`compile_ahead`), so the compiler keeps every core busy and no compile waits
at the pass's end; a caller may start a later pass's compilations early. Identical
programs (the same layer of a stack's members) compile once: a second waits for the
first and reads its executable from JAX's persistent compilation cache.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import os
import pathlib
import threading
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
COMPILE_THREADS = 2  # background compilations at once (at most the CPU count)
_T = TypeVar("_T")


class Steps:
    """Jitted steps by key, owned by the caller and shared by every pass given it.

    A key must name everything the built step closes over; `jax.jit` then keeps one
    executable per argument signature of that one function object. Key None: built
    anew each time (nothing shared). A statistic's keys are claimed (`claim`) before its
    steps are built: an equal key whose update or merge closes over another constant is
    refused, not given the first statistic's step.

    `compile_ahead` compiles a jitted function for given argument shapes in one of
    `compile_threads` background threads (XLA's compiler releases the GIL, so several
    programs compile at once, and while a pass runs); `ready` waits for them before the
    first call, which then finds the executable in JAX's own caches. 0 threads: every
    program compiles at its first call. Where JAX's persistent compilation cache is on,
    a program whose lowered text equals one compiling in another thread waits for it and
    then reads its executable from that cache (one compile, not two at once).
    """

    def __init__(self, compile_threads: int | None = None):
        if compile_threads is None:
            compile_threads = min(COMPILE_THREADS, os.cpu_count() or 1)
        if compile_threads < 0:
            raise ValueError(f"compile_threads={compile_threads}: must be >= 0")
        self._built: dict[Hashable, Any] = {}
        self._threads = compile_threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ahead: dict[Hashable, concurrent.futures.Future] = {}
        self._pending: dict[Any, list[concurrent.futures.Future]] = {}
        self._programs: dict[bytes, threading.Lock] = {}  # by lowered text's digest
        self._programs_lock = threading.Lock()
        self._claims = statistics.KeyClaims("driver.Steps", " (seen before by these steps)")

    def claim(self, statistic: statistics.Statistic) -> None:
        """Record what `statistic`'s key and its parts' keys stand for; ValueError where one
        came before with other code or constants (`statistics.KeyClaims`)."""
        self._claims.add(statistic)

    def get(self, key: Hashable | None, build: Callable[[], _T]) -> _T:
        if key is None:
            return build()
        if key not in self._built:
            self._built[key] = build()
        return self._built[key]

    def compile_ahead(
        self, fn: Any, *args: Any, lowered: Any = None, static: int = 0
    ) -> concurrent.futures.Future | None:
        """Start compiling jitted `fn` for arguments like `args` (arrays, or
        `jax.ShapeDtypeStruct`s with their shardings) in the background; the first
        `static` arguments are `fn`'s static ones, passed as they are; `lowered`: its
        `fn.lower(*args)` where the caller has it. Asking again for the same function
        and signature returns the first request's future; None without threads."""
        if not self._threads:
            return None
        fixed, like = args[:static], jax.tree.map(_like, args[static:])
        key = (fn, fixed, jax.tree.structure(like), tuple(jax.tree.leaves(like)))
        if key not in self._ahead:

            def work():
                program = fn.lower(*fixed, *like) if lowered is None else lowered
                with self._one_compile(program):
                    return program.compile()

            self._ahead[key] = self._executor().submit(work)
            self._pending.setdefault(fn, []).append(self._ahead[key])
        return self._ahead[key]

    @contextlib.contextmanager
    def _one_compile(self, program: Any):
        """Held while `program` (a `jax.stages.Lowered`) compiles: equal programs in turn,
        so the later ones read the first's executable from JAX's persistent cache. Without
        that cache there is nothing to read, and equal programs compile at once."""
        if not (jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir):
            yield
            return
        digest = hashlib.sha256(program.as_text().encode()).digest()
        with self._programs_lock:
            lock = self._programs.setdefault(digest, threading.Lock())
        with lock:
            yield

    def finalize(self, statistic: statistics.Statistic, state: Any) -> Any:
        """`statistic.finalize(state)`, a group's parts in the background threads at once
        (a part's finalize may compile: the sketch's threshold search, per layer)."""
        if not statistic.parts or self._threads < 2:
            return statistic.finalize(state)
        pool = self._executor()
        futures = {n: pool.submit(s.finalize, state[n]) for n, s in statistic.parts.items()}
        return {name: future.result() for name, future in futures.items()}

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self._threads, thread_name_prefix="jaxdissect-compile"
            )
        return self._pool

    def ready(self, fn: _T) -> _T:
        """`fn` once the compilations asked of it have finished (their errors raised here)."""
        for future in self._pending.pop(fn, ()):
            future.result()
        return fn


def _like(x: Any) -> jax.ShapeDtypeStruct:
    """An array's shape, dtype and sharding (as a jitted call keys its executables)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))


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

        # Outputs keep the `data` sharding (on one device XLA would otherwise hand some back
        # replicated, and a step fed them would compile again for those shardings).
        self._step = jax.jit(
            partial_shard_map(
                local, mesh=mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P(parallel.AXIS)
            ),
            out_shardings=parallel.sharded(mesh),
        )

    @property
    def program(self) -> Any:
        """The jitted, sharded forward: `program(variables, images)`."""
        return self._step

    def __call__(self, variables: Any, images: jax.Array) -> dict[str, jax.Array]:
        return self._step(variables, images)


def update_step(statistic: statistics.Statistic, mesh: jax.sharding.Mesh) -> Callable:
    """`step(states, acts, batch) -> states`: per-device `statistic.update`, states donated."""

    def local(state, acts, batch):
        fields = {**batch, "acts": {k: v.astype(jnp.float32) for k, v in acts.items()}}
        return _expand(statistic.update(_squeeze(state), fields))

    data = P(parallel.AXIS)
    # The new state keeps the old one's sharding (see `Forward`): one executable per step.
    return jax.jit(
        partial_shard_map(local, mesh=mesh, in_specs=(data, data, data), out_specs=data),
        out_shardings=parallel.sharded(mesh),
        donate_argnums=(0,),
    )


def _programs(
    statistic: statistics.Statistic, mesh: jax.sharding.Mesh, steps: Steps
) -> dict[str | None, Callable]:
    """A pass's jitted update steps: one per part of a group (`Statistic.parts`), each its
    own program (compiled apart, at once, and shared by any pass with that part), else one
    (name None)."""
    steps.claim(statistic)
    parts = statistic.parts or {None: statistic}
    return {
        name: steps.get(
            None if s.key is None else ("update", s.key, mesh), lambda s=s: update_step(s, mesh)
        )
        for name, s in parts.items()
    }


def _apply(programs: Mapping[str | None, Callable], steps: Steps, state, acts, batch):
    if None in programs:
        return steps.ready(programs[None])(state, acts, batch)
    return {name: steps.ready(p)(state[name], acts, batch) for name, p in programs.items()}


def state_like(statistic: statistics.Statistic, mesh: jax.sharding.Mesh) -> Any:
    """Shapes of a pass's initial state as `run_pass` holds it (every shard's, stacked and
    sharded on `data`), without computing it."""
    shards = int(mesh.devices.size)
    sharding = parallel.sharded(mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((shards, *x.shape), x.dtype, sharding=sharding),
        jax.eval_shape(lambda: statistic.init(0)),
    )


def batch_like(example: Mapping[str, Any], batch_size: int, mesh: jax.sharding.Mesh) -> dict:
    """Shapes of the global batch the steps see (`image` left out) when a source's examples
    look like `example` (the fields `loader.batches` adds included)."""
    example = {
        **{k: np.asarray(v) for k, v in example.items() if k != "image"},
        "index": np.zeros((), np.int32),
        "valid": np.zeros((), bool),
    }
    sharding = parallel.sharded(mesh)
    return {
        k: jax.ShapeDtypeStruct((batch_size, *v.shape), v.dtype, sharding=sharding)
        for k, v in example.items()
    }


def compile_ahead(
    statistic: statistics.Statistic,
    batch: Mapping[str, Any],
    *,
    mesh: jax.sharding.Mesh,
    steps: Steps,
    state: Any = None,
    acts: Any = None,
    forward: Forward | Callable | None = None,
    variables: Any = None,
    images: Any = None,
) -> Any:
    """Start compiling a pass's programs in `steps`' background threads: the forward for
    `images` (where it is a `Forward`) and the statistic's update steps for `state`
    (default: its initial state's shapes), `batch` (the fields without the images) and
    the activations `acts`, else the forward's output. Arguments are arrays or
    `jax.ShapeDtypeStruct`s with shardings, replicated `variables` included. Returns the
    activations' shapes (None, and no step compiled, where neither gives them)."""
    if acts is None and isinstance(forward, Forward) and images is not None:
        acts = _forward_ahead(forward, steps, variables, images)
    if acts is None:
        return None
    state = state_like(statistic, mesh) if state is None else state
    return _steps_ahead(_programs(statistic, mesh, steps), steps, state, acts, batch)


def _forward_ahead(forward: Forward, steps: Steps, variables, images) -> Any:
    """Lower the forward here, compile it in the background; its output's shapes."""
    like = jax.tree.map(_like, (variables, images))
    lowered = forward.program.lower(*like)
    steps.compile_ahead(forward.program, *like, lowered=lowered)
    return lowered.out_info


def _first_ahead(programs, steps: Steps, state, acts, batch, merge, compile_next) -> None:
    acts = _steps_ahead(programs, steps, state, acts, batch)
    _merge_ahead(merge, steps, state)
    if compile_next is not None:
        compile_next(acts)


def _merge_ahead(merge: Callable, steps: Steps, state: Any) -> None:
    """Compile the pass's closing merge of the per-device states (`run_pass` gathers them
    to the host, then `statistics.merge_devices`) in the background."""
    host = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    if statistics.shard_count(host) > 1:  # one device: nothing to merge
        steps.compile_ahead(statistics.merge_program, merge, host, static=1)


def _steps_ahead(programs, steps: Steps, state, acts, batch) -> Any:
    acts = jax.tree.map(_like, acts)
    for name, program in programs.items():
        steps.compile_ahead(program, state if name is None else state[name], acts, batch)
    return acts


def _leaf_types(state: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{leaf path: (per-device shape, dtype)} of a stacked state (metadata only)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): (tuple(np.shape(x)[1:]), x.dtype) for p, x in flat}


def _check_state(name: str, statistic: statistics.Statistic, initial: Mapping, state: Any) -> None:
    """ValueError where the first batch's update changed the state's leaves, shapes or
    dtypes (`initial`: `_leaf_types` before it): each batch would compile again, or exact
    counts would turn into floats."""
    now = _leaf_types(state)
    if now == initial:
        return
    path = next(p for p in [*initial, *now] if initial.get(p) != now.get(p))
    shown = {
        k: "no leaf" if v is None else f"{v[1]}[{', '.join(map(str, v[0]))}]"
        for k, v in (("before", initial.get(path)), ("after", now.get(path)))
    }
    who, key = "the statistic's", statistic.key
    part = next((n for n in statistic.parts or () if path.startswith(f"[{n!r}]")), None)
    if part is not None:
        who, key = f"part {part!r}'s", statistic.parts[part].key
        path = path[len(f"[{part!r}]") :]
    raise ValueError(
        f"run_pass {name!r}: {who} update changed its state at {path}: {shown['before']} -> "
        f"{shown['after']}; update must return a state of init's structure, shapes and dtypes"
        + ("" if key is None else f" (key {repr(key)[:100]})")
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
    compile_next: Callable[[Any], None] | None = None,
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
        must be a key of everything the state depends on but the mesh: the state of a
        mesh of n devices lives in its subfolder `{n}-devices`.
      steps: compiled steps to reuse and add to (None: compiled for this pass alone).
      compile_next: called with the activations' shapes once this pass's programs are
        compiling (at its first batch), to start a later pass's (`compile_ahead`).
    """
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode={cache_mode!r}; allowed values: write, read, None")
    if cache_mode is not None and cache is None:
        raise ValueError(f"cache_mode={cache_mode!r} needs a cache")
    parallel.check_32_bit()
    parallel.check_batch_size(batch_size, mesh)
    num_batches = loader.num_batches(len(source), batch_size)
    shards = int(mesh.devices.size)
    state = jax.device_put(statistics.stack_shards(statistic, shards), parallel.sharded(mesh))
    ckpt, start = None, 0
    if checkpoint_dir is not None:
        ckpt = StreamCheckpoint(
            pathlib.Path(checkpoint_dir) / f"{shards}-devices", checkpoint_every
        )
        state, start = ckpt.restore(state)
        if start:
            logging.info("%s: resuming after batch %d of %d", name, start, num_batches)
    if cache_mode == "write":
        cache.resume_at(start)
    if forward is not None:
        variables = parallel.replicate(variables, mesh)
    steps = Steps() if steps is None else steps
    programs = _programs(statistic, mesh, steps)
    # The merge is a static argument of a jitted reduction: one function object per key.
    merge = steps.get(
        None if statistic.key is None else ("merge", statistic.key), lambda: statistic.merge
    )

    def flush_cache():
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
    first, initial = True, _leaf_types(state)
    for b, batch in enumerate(batches, start=start):
        batch = dict(batch)
        images = batch.pop("image", None)
        fields = parallel.put_batch(batch, mesh)
        if first:  # compiling the forward and the step takes a while: say so first
            logging.info("%s: compiling the steps (first batch) ...", name)
            t0 = time.time()
        if cache_mode == "read" and cache.has(b):
            acts = cache.get(b)
            if cache.kind != "device":
                acts = parallel.put_batch(acts, mesh)
            if first:
                _first_ahead(programs, steps, state, acts, fields, merge, compile_next)
        elif images is None or forward is None:
            raise RuntimeError(f"{name}: batch {b} is neither cached nor read with images")
        else:
            images = parallel.put_batch({"image": images}, mesh)["image"]
            is_forward = isinstance(forward, Forward)
            if first and is_forward:  # the forward and every step compile at once
                acts_like = _forward_ahead(forward, steps, variables, images)
                _first_ahead(programs, steps, state, acts_like, fields, merge, compile_next)
            acts = steps.ready(forward.program)(variables, images) if is_forward else None
            if not is_forward:  # any callable: its output gives the steps' shapes
                acts = forward(variables, images)
                if first:
                    _first_ahead(programs, steps, state, acts, fields, merge, compile_next)
            if cache_mode == "write" and cache.enabled:
                cache.put(b, acts)
        state = _apply(programs, steps, state, acts, fields)
        if first:
            logging.info("%s: steps traced and compiled in %.1f s", name, time.time() - t0)
            _check_state(name, statistic, initial, state)
            first = False
        in_flight.add(state)
        bar.update(b + 1)
        if ckpt is not None and (b + 1) % checkpoint_every == 0:
            flush_cache()
            ckpt.maybe_save(b + 1, state)
    bar.close()
    # No checkpoint of the finished pass: its caller stores the result next (a stage), and
    # a run killed before that resumes from the last periodic checkpoint, as mid-pass.
    flush_cache()
    if ckpt is not None:
        ckpt.close()
    steps.ready(statistics.merge_program)
    merged = statistics.merge_devices(merge, parallel.gather_to_host(state))
    return steps.finalize(statistic, jax.device_get(merged))


def stage_outputs(
    root: pathlib.Path | None,
    stage: str,
    keys: Mapping[str, str],
    descriptions: Mapping[str, Mapping[str, Any]],
    compute: Callable[[], Mapping[str, Mapping[str, np.ndarray]]],
) -> dict[str, dict[str, np.ndarray]]:
    """Per-part arrays of a stage (parts: layers), loaded if all are stored under their
    `keys` in `root`, else computed and stored (by process 0). Every process of a
    multi-host job decides alike: process 0 says whether they are stored (`root` is on a
    file system all share), and all compute where any cannot read them."""
    if root is None:
        return dict(compute())
    stages = {part: store.Stage(root, stage, key) for part, key in keys.items()}
    if parallel.process_0s(all(s.done for s in stages.values())):
        logging.info(
            "%s: reusing stored results (%s)", stage, ", ".join(str(s.dir) for s in stages.values())
        )
        try:
            loaded = {part: store.load_arrays(s.path("arrays.npz")) for part, s in stages.items()}
        except (OSError, ValueError) as e:  # damaged after it was stored: computed again
            logging.warning("%s: a stored result is unreadable (%s); computing it again", stage, e)
            loaded = None
        if parallel.all_processes(loaded is not None):
            return loaded
        if jax.process_index() == 0:
            for s in stages.values():
                s.reset()
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


__all__ = [
    "CACHE_MODES",
    "Forward",
    "Steps",
    "batch_like",
    "compile_ahead",
    "partial_shard_map",
    "run_pass",
    "stage_outputs",
    "state_like",
]


def forward_seconds(tap: Any, input_spec: InputSpec, source: Any, batch_size: int) -> float:
    """Seconds of `tap`'s first layer's forward pass over `source` (compiled first, one batch
    of its first images repeated, no decoding): the unit the scripts give costs in."""
    layer = tap.layers[0]
    fwd = jax.jit(lambda v, x: tap.fn(v, input_spec(x))[layer])
    n = min(len(source), batch_size)
    images = np.stack([np.asarray(source.read_image(i), np.float32) for i in range(n)])
    fwd(tap.variables, images).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(0, len(source), batch_size):
        fwd(tap.variables, images).block_until_ready()
    return time.perf_counter() - t0

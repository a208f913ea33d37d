"""One data-parallel code path for 1 CPU, 8 GPUs or a pod: a 1-D `data` mesh.

Batches are split over the `data` axis of a mesh spanning every device of every
host. Each device keeps its own streaming statistics (a leading device axis,
sharded over `data`, each device's own initial state: `statistics.stack_shards`),
updated by `jax.shard_map` steps with no communication (`driver.run_pass`); the
per-device states are merged once at the end with the statistics' own associative
merges (`statistics.merge_devices`). So 1 device and 8 devices run the same code and give the
same integer counts.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "data"

# The most JAX CPU devices `split_cpu` makes of one host.
MAX_CPU_DEVICES = 8


def cpu_device_count(cores: int) -> int:
    """JAX CPU devices for a host of `cores` cores: the largest power of two <= `cores`
    and <= `MAX_CPU_DEVICES` (so that batches of 8, 16, 32 ... split evenly)."""
    n = 1
    while n * 2 <= min(cores, MAX_CPU_DEVICES):
        n *= 2
    return n


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # not on Linux


def split_cpu(cores: int | None = None) -> int | None:
    """Make JAX's CPU backend `cpu_device_count(cores)` devices (default: the cores this
    process may run on), so that a CPU run's data-parallel steps execute concurrently (one
    XLA:CPU program leaves cores idle; the devices share one thread pool). Per-device
    statistics merge exactly, so counts, exact and histogram thresholds do not change.

    Returns the count set, or None where the user set one (`JAX_NUM_CPU_DEVICES`,
    `jax_num_cpu_devices`, XLA_FLAGS' `--xla_force_host_platform_device_count`) or JAX's
    backends have started. Call before any JAX computation; other backends ignore it.
    """
    if jax.config.jax_num_cpu_devices != -1:
        return None
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    if cores is None:
        cores = usable_cores()
    n = cpu_device_count(cores)
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # backends already initialised: their device count stays
        return None
    return n


def initialize_distributed(
    enabled: bool,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Join a multi-host job when `enabled` (one process otherwise).

    On TPU pods and SLURM/Kubernetes clusters JAX finds the coordinator itself,
    so the other arguments may stay None; elsewhere pass them (from flags).
    """
    if not enabled:
        return
    # Collectives between CPU processes (a multi-process CPU job, or CPU-side work of
    # a GPU job) need a backend; gloo ships with jaxlib. GPU and TPU ignore it.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )
    logging.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    check_devices_per_process()


def check_devices_per_process() -> None:
    """Raise, in one line naming each process's count, unless every process of a multi-host
    job has as many devices as process 0 (each process feeds its devices an equal share of
    every batch). Read from the job's device list: no collective, every process alike."""
    counts = collections.Counter(d.process_index for d in jax.devices())
    if len(set(counts.values())) > 1:
        each = ", ".join(f"process {p}: {n}" for p, n in sorted(counts.items()))
        raise ValueError(
            f"the processes of this multi-host job have other numbers of devices ({each}): "
            "give every process as many (CUDA_VISIBLE_DEVICES, or on CPU XLA_FLAGS' "
            "--xla_force_host_platform_device_count)"
        )


def job_digests(values: Mapping[str, Any]) -> np.ndarray:
    """One SHA-256 of each value's `repr`, in `values`' order: [len(values), 32] uint8."""
    return np.stack(
        [
            np.frombuffer(hashlib.sha256(repr(v).encode()).digest(), np.uint8)
            for v in values.values()
        ]
    ).reshape(len(values), 32)


def job_disagreements(names: list[str], digests: np.ndarray) -> dict[str, list[int]]:
    """Of `names`, each whose digest (`digests`: [processes, names, 32], every process's
    `job_digests`) differs from process 0's, with the processes that hold another."""
    differ = (digests != digests[:1]).any(axis=-1)  # [processes, names]
    return {
        name: [int(p) for p in np.flatnonzero(differ[:, i])]
        for i, name in enumerate(names)
        if differ[:, i].any()
    }


def _allgather(rows: np.ndarray) -> np.ndarray:
    """Every process's `rows`, stacked on a new leading axis."""
    return np.asarray(multihost_utils.process_allgather(rows))


def check_same_job(
    values: Mapping[str, Any], allgather: Callable[[np.ndarray], np.ndarray] = _allgather
) -> None:
    """Raise, in one line naming what differs and where, unless every process of a
    multi-host job holds equal `values` ({what: value}, e.g. {"--batch_size": 8, "the probe
    set": identity}); a value's `repr` is compared. A no-op in one process.

    allgather: every process's [n, 32] uint8 array, stacked (`process_allgather`).
    """
    if allgather is _allgather and jax.process_count() == 1:
        return
    names = list(values)
    what = allgather(job_digests({"names": names}))
    if job_disagreements(["names"], what):
        raise ValueError(
            "the processes of this multi-host job run other versions of the script "
            "(other settings); run the same jaxdissect on every process"
        )
    differ = job_disagreements(names, allgather(job_digests(values)))
    if differ:
        where = "; ".join(
            f"{name} (process {', '.join(map(str, ps))} against process 0)"
            for name, ps in differ.items()
        )
        raise ValueError(
            f"the processes of this multi-host job differ in {where}: give every "
            "process the same job"
        )


def process_0s(value: Any) -> Any:
    """Process 0's `value` (a bool, number or numpy array of a shape every process
    shares), on every process: one decision for all. `value` itself in one process."""
    if jax.process_count() == 1:
        return value
    out = np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(value)))
    return out.item() if out.ndim == 0 else out


class AnotherProcessStopped(ValueError):
    """Another process of a multi-host job met an error (`stop_together`); a ValueError, as
    the bad input it follows is, so that scripts say it in one line."""


def stop_together(error: BaseException | None) -> None:
    """Where a process of a multi-host job met an error (`error`: this process's, or None),
    stop every one, rather than leave the others waiting in the job's next collective for
    a process that has stopped: `error` is raised where it was met, `AnotherProcessStopped`
    naming those processes on the others. In one process, `error` is raised if given."""
    if jax.process_count() == 1:
        if error is not None:
            raise error
        return
    failed = np.flatnonzero(~_allgather(np.asarray(error is None, np.bool_)))
    if error is not None:
        raise error
    if len(failed):
        raise AnotherProcessStopped(
            f"process {', '.join(map(str, failed))} of this multi-host job stopped with an "
            "error (its output says which): fix it there and start every process again"
        )


@contextlib.contextmanager
def stopping_together(barrier: str | None = None) -> Iterator[None]:
    """Run the block (one without collectives) on every process; where it raised on any
    process of a multi-host job, stop every one (`stop_together`). With `barrier`
    (`barrier_key`), every process first waits there for the others, however long one's
    block takes (process 0 writing the results)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - raised again, here and (named) on the others
        if barrier is not None:
            wait_for_every_process(barrier)
        stop_together(e)
        raise
    if barrier is not None:
        wait_for_every_process(barrier)
    stop_together(None)


# The most bytes of process 0's error that `process_0_holds` repeats on the other processes.
_MESSAGE_BYTES = 1024


@contextlib.contextmanager
def process_0_holds(hold: contextlib.AbstractContextManager) -> Iterator[None]:
    """Run the block with `hold` (an output directory's lock, `outdir.locked`) held by
    process 0 alone, once every process knows that process 0 took it: where taking it raised
    there (another run holds it), process 0 raises that error and every other process an
    `outdir.OutputDirBusy` with its message, rather than go on to wait in a collective for a
    process that has stopped. `with hold` itself in one process."""
    from jaxdissect import outdir

    if jax.process_count() == 1:
        with hold:
            yield
        return
    with contextlib.ExitStack() as stack:
        error = None
        if jax.process_index() == 0:
            try:
                stack.enter_context(hold)
            except Exception as e:  # noqa: BLE001 - said on every process, raised here
                error = e
        text = "" if error is None else str(error) or type(error).__name__
        data = text.encode()[:_MESSAGE_BYTES]
        message = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
        message[0], message[1 : 1 + len(data)] = error is not None, np.frombuffer(data, np.uint8)
        message = process_0s(message)
        if error is not None:
            raise error
        if message[0]:
            text = bytes(message[1:]).rstrip(b"\0").decode(errors="ignore")
            raise outdir.OutputDirBusy(f"{text} (process 0 could not hold the output directory)")
        yield


# How long the other processes of a multi-host job wait for process 0 (`wait_for_every_process`).
WAIT_S = 7 * 24 * 3600


def barrier_key(what: str) -> str:
    """A barrier's name for `wait_for_every_process`: `what` and a number process 0 draws,
    the same on every process and new to the job (a broadcast: call it where every process
    is, e.g. at the start of the work the barrier ends)."""
    return f"jaxdissect:{what}:{process_0s(secrets.randbits(31))}"


def wait_for_every_process(key: str) -> None:
    """Wait until every process of a multi-host job gets here (nothing in one process),
    however long another takes (process 0 writing the results and report): a barrier of
    JAX's coordination service named `key` (`barrier_key`; heartbeats go on), not a
    collective, which would time out. A process that exits first leaves the others
    `jax.distributed`'s shutdown timeout (5 minutes) to exit too, after which the service
    aborts them, mid-write."""
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    multihost.get_barrier_sync_fn()(key=key, timeout_ms=WAIT_S * 1000)


def every_process_text(text: str) -> str:
    """One digest of every process's `text`, in process order, on every process (`text`
    itself in one process): a key that changes when any process's does."""
    if jax.process_count() == 1:
        return text
    mine = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    return hashlib.sha256(np.ascontiguousarray(_allgather(mine), np.uint8).tobytes()).hexdigest()


def all_processes(flag: bool) -> bool:
    """Whether `flag` holds on every process (`flag` itself in one process)."""
    if jax.process_count() == 1:
        return flag
    return bool(_allgather(np.asarray(flag, np.bool_)).all())


def data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over the first `num_devices` devices (default: all, all hosts). Under
    several processes every device is in it: each process feeds its own devices."""
    check_devices_per_process()
    devices = jax.devices()
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(
                f"num_devices={num_devices} but {len(devices)} devices are visible "
                f"({devices[0].platform}); use a number from 1 to {len(devices)}"
            )
        if jax.process_count() > 1 and num_devices != len(devices):
            raise ValueError(
                f"num_devices={num_devices} with {jax.process_count()} processes: every "
                f"process's devices must be in the mesh; leave it out (all {len(devices)})"
            )
        devices = devices[:num_devices]
    return jax.sharding.Mesh(np.asarray(devices), (AXIS,))


def check_32_bit() -> None:
    """Refuse JAX's 64-bit mode: the passes are 32-bit programs (int32 indices and loop
    counters, float32 maps; counts past int32 go through their own wide counters), which
    `jax_enable_x64` would make mix int64 with int32."""
    if jax.config.jax_enable_x64:
        raise ValueError(
            "JAX_ENABLE_X64 is set (jax_enable_x64=True): dissection runs 32-bit programs; "
            "unset it, or call jax.config.update('jax_enable_x64', False) first"
        )


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh, name: str = "batch_size") -> None:
    """Raise, naming the parameter `name`, unless `batch_size` splits over the mesh."""
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"{name}={batch_size} is not divisible by the {n} devices of the mesh; "
            f"use a multiple of {n}"
        )


def sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading axis split over devices."""
    return NamedSharding(mesh, P(AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


class InFlight:
    """Bounds the steps dispatched but not yet finished to `depth`.

    JAX dispatches asynchronously: a loop that never waits runs ahead of the device,
    and every queued step keeps its input batch alive, so memory grows with how far
    the loop gets ahead (only the runtime's own queue limit stops it). `add(out)`
    after each step waits for the step `depth` steps back, which
    keeps the device busy while the next batch is read and sent. `out` may be
    donated to the next step: what is waited on is a small copy taken at once.
    """

    def __init__(self, depth: int = 2):
        self.depth = depth
        self._tokens: collections.deque[jax.Array] = collections.deque()

    def add(self, out: Any) -> None:
        leaves = [x for x in jax.tree_util.tree_leaves(out) if isinstance(x, jax.Array)]
        if not leaves:
            return
        self._tokens.append(jax.numpy.copy(min(leaves, key=lambda x: x.size)))
        while len(self._tokens) > self.depth:
            self._tokens.popleft().block_until_ready()


def varying_like(x: jax.Array, *refs: jax.Array) -> jax.Array:
    """`x` typed as varying over the manual mesh axes that `refs` vary over.

    Inside `jax.shard_map` a scan's carry must have the type of the body's output, which
    varies over the axes the data are sharded on; a fresh zeros does not.
    """
    axes: set[str] = set()
    for ref in refs:
        manual = getattr(jax.typeof(ref), "manual_axis_type", None)
        axes |= set(getattr(manual, "varying", ()))
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x


def filled(shape: tuple[int, ...], value: Any, dtype: Any) -> jax.Array:
    """`jnp.full(shape, value, dtype)` made on the host and put on the default device.

    Eager `jnp.full` and `jnp.zeros` compile an XLA program for every new shape, and a
    statistic's initial state has one per layer and field; a transfer compiles nothing.
    """
    return jax.device_put(np.full(shape, value, dtype))


def put_batch(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """This process's rows of a global batch -> global arrays sharded on `data`."""
    sharding = sharded(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def put_global_batch(
    batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
) -> dict[str, jax.Array]:
    """A global batch, held whole by every process -> global arrays sharded on `data`."""
    n, pc, pi = len(next(iter(batch.values()))), jax.process_count(), jax.process_index()
    rows = slice(pi * n // pc, (pi + 1) * n // pc)
    return put_batch({k: np.asarray(v)[rows] for k, v in batch.items()}, mesh)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    return jax.device_put(tree, replicated(mesh))


def gather_to_host(tree: Any) -> Any:
    """Every process gets the full value of (possibly multi-host) global arrays."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)

"""Fixed-shape, in-order batches over any random-access source of examples.

A source is anything with `len(source)` and `source[i]` returning the example
dict of `jaxdissect.data.broden.Broden` (`image`, `pixel_labels`,
`image_labels`, `index`, all with the same shapes for every i). Dissection
visits every image exactly once, so there is no shuffling: batch k holds
examples k*B .. k*B+B-1, the last one padded with zero examples.

Decoding runs in a grain thread pool, one task a batch, with up to `num_threads`
batches decoding at once (and so held in memory), overlapping the consumer's
work; or, with `num_workers` > 0, in grain worker processes that each decode
whole batches (batch w, w + N, ... in worker w of N, handed back in order
through shared memory). Label PNG decoding holds the GIL, so threads alone
may not feed a GPU from a many-core host; processes pay a start-up and a copy of
every batch through shared memory, and suit hosts with cores to spare.
Measurements: benchmarks/README.md (`benchmarks/bench_data.py`).
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import cloudpickle
import grain
import numpy as np
from absl import flags

from jaxdissect import parallel

# Images from which decoding processes pay for their start on an accelerator host (twice
# the break-even of one H200 host's figures, benchmarks/README.md "One GPU").
WORKERS_WORTH_IT = 4096


class Source(Protocol):
    """What `batches` needs from a data source."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> Mapping[str, np.ndarray]: ...


def num_batches(num_examples: int, batch_size: int) -> int:
    """Number of (global) batches that cover `num_examples`, the last one padded."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_examples < 0:
        raise ValueError(f"num_examples must be >= 0, got {num_examples}")
    return -(-num_examples // batch_size)


def default_threads(limit: int = 4) -> int:
    """Decoding threads by default: the CPU cores this process may use, at most `limit`.

    Decoding holds the GIL for much of each example, so threads past a few contend
    rather than help; many-core hosts feed accelerators with `num_workers` instead.
    """
    return max(1, min(limit, parallel.usable_cores()))


def decoding_advice(
    platform: str, num_images: int, num_threads: int | None, num_workers: int
) -> str | None:
    """A hint where decoding in threads will likely hold an accelerator back, else None.

    On accelerators the network outruns label decoding in threads (under the GIL);
    worker processes scale with the cores but cost a few seconds' start a pass, worth it
    from some thousands of images on. `platform`: `jax.default_backend()`.
    """
    if platform == "cpu" or num_workers or num_images < WORKERS_WORTH_IT:
        return None
    cores = parallel.usable_cores()
    if cores < 4:
        return None
    threads = default_threads() if num_threads is None else num_threads
    return (
        f"decoding {num_images} images in {threads} thread(s) on {platform}: label decoding "
        f"holds the GIL and will likely hold the {platform} back; decoding processes "
        f"(--loader_workers={cores - 2}, num_workers) or a TFDS build of the dataset are "
        "faster (benchmarks/README.md)"
    )


def batches(
    source: Source,
    batch_size: int,
    *,
    start_batch: int = 0,
    num_threads: int | None = None,
    num_workers: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields the batches of `source` in order, from global batch `start_batch` on.

    Every batch has the same shapes, in the dtypes of the source's examples: `image`
    [b, H, W, 3], `pixel_labels` [b, P, sh, sw], `image_labels` [b, Q], plus any other
    key the examples have, and `valid` bool [b] and `index` int32 [b] (-1 for padding),
    where b = batch_size // process_count. Padding rows are zeros with `valid=False`.

    Args:
      source: random-access examples (a `Broden`, a TFDS-backed source ...).
      batch_size: the global batch size B.
      start_batch: first global batch to yield (to resume an interrupted run).
      num_threads: decoding threads (None: `default_threads()`); 0 decodes in the
        calling thread. Ignored with worker processes.
      num_workers: decoding processes (0: none, decode in threads). The source
        must pickle (with cloudpickle); each worker starts a fresh Python (spawn),
        which takes a few seconds.
      process_index, process_count: with several hosts, each process yields only
        rows [process_index * b, (process_index + 1) * b) of every global batch.
    """
    n = len(source)
    total = num_batches(n, batch_size)
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index {process_index} must be in [0, process_count={process_count})"
        )
    if batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} does not split evenly over {process_count} processes; "
            f"use a multiple of {process_count}"
        )
    if not 0 <= start_batch <= total:
        raise ValueError(
            f"start_batch {start_batch} is outside [0, {total}] ({n} examples in batches of "
            f"{batch_size})"
        )
    if num_threads is None:
        num_threads = default_threads()
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0, got {num_threads}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    local = batch_size // process_count
    count = (total - start_batch) * local
    offset = process_index * local

    def position(k: int) -> int:
        """Global example position of this process's k-th row (from start_batch on)."""
        b, j = divmod(k, local)
        return (start_batch + b) * batch_size + offset + j

    # Padding copies the shapes of a real example; only decode one if some row needs it.
    padding = None
    if count and position(count - 1) >= n:
        padding = {k: np.zeros_like(v) for k, v in source[0].items()}
        padding["index"] = np.asarray(-1, dtype=np.int32)
        padding["valid"] = np.asarray(False)

    def fetch(k: int) -> dict[str, Any]:
        g = position(k)
        if g >= n:
            return padding
        example = dict(source[g])
        example.setdefault("index", np.asarray(g, dtype=np.int32))
        example["valid"] = np.asarray(True)
        return example

    def fetch_batch(b: int) -> dict[str, np.ndarray]:
        return _stack([fetch(k) for k in range(b * local, (b + 1) * local)])

    # One task a batch: grain's per-task cost is paid under the GIL, which decoding,
    # itself mostly under the GIL, cannot spare.
    batched = grain.MapDataset.range(count // local).map(fetch_batch)
    if not num_workers:
        # Up to num_threads batches decode at once, and no more are held ahead.
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads)
        return _iterate(batched.to_iter_dataset(options))
    _check_picklable(source)
    # grain reads one of its absl flags when it starts workers, which fails before the
    # flags are parsed; parsing is the application's (absl.app.run does it), not ours.
    if not flags.FLAGS.is_parsed():
        raise ValueError(
            f"num_workers={num_workers} needs parsed absl flags (grain reads one when it starts "
            "worker processes): run under absl.app.run, or call "
            "absl.flags.FLAGS.mark_as_parsed() first, or use num_workers=0"
        )
    dataset = batched.to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    ).mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2),
        worker_init_fn=functools.partial(_init_worker, parent=os.getpid()),
    )
    return _iterate(dataset)


def _check_picklable(source: Source) -> None:
    try:
        cloudpickle.dumps(source)
    except Exception as e:  # what pickling raises varies: TypeError, PicklingError ...
        raise ValueError(
            f"decoding processes (num_workers, --loader_workers) need a source that pickles, "
            f"and {type(source).__name__} does not ({type(e).__name__}: {e}); decode in "
            "threads (--loader_workers=0) or give the source a __reduce__ that reopens it"
        ) from e


def _init_worker(worker_index: int, worker_count: int, *, parent: int) -> None:
    """Set-up of a decoding process: off the accelerators, and gone with its parent.

    JAX in a worker would claim the GPUs' memory (it preallocates) if anything in a
    source touched a jax array. A parent killed outright (SIGKILL, OOM) runs no clean-up:
    its workers would wait forever on their full buffers, holding shared memory, so each
    one watches for its parent (pid `parent`: a parent gone before this runs counts too)
    to go, and then exits.
    """
    del worker_index, worker_count
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        sys.modules["jax"].config.update("jax_platforms", "cpu")

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="jaxdissect-parent-watch", daemon=True).start()


def _iterate(dataset: grain.IterDataset) -> Iterator[dict[str, np.ndarray]]:
    iterator = iter(dataset)
    try:
        yield from iterator
    finally:
        # Stops the prefetch threads when the consumer stops early.
        iterator.close()


def _stack(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stacks examples key by key, with a clear error when shapes differ."""
    out = {}
    for key in examples[0]:
        values = [np.asarray(e[key]) for e in examples]
        shapes = {v.shape for v in values}
        if len(shapes) > 1:
            raise ValueError(
                f"examples disagree on the shape of {key!r}: {sorted(shapes)}; a source must "
                "give every example the same shapes (pad them)"
            )
        out[key] = np.stack(values)
    return out

"""Resumable streaming state: orbax checkpoints of a pass, every N batches.

A pass's state (sketches, tallies, top images: sharded jax.Arrays) is saved
with the number of batches it has consumed. A run killed at any moment
restarts from the last complete checkpoint (orbax finalises a checkpoint
atomically) and, since batches are read in a fixed order, ends with the same
state as an uninterrupted run.

Orbax's array files carry no checksum, so a checkpoint damaged on disk could restore
other numbers: each process writes the sha256 of its shards of the state beside the
checkpoint (`digest-p<process>-<step>`), and a restore whose state does not match its
digest on every process (or that fails, or has no digest) is dropped with a warning:
the pass starts again, losing time, never numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxdissect import parallel, store


def state_digest(state: Any) -> str:
    """sha256 of this process's shards of `state` (paths, shard indices, dtypes, shapes,
    bytes), in a fixed order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        digest.update(jax.tree_util.keystr(path).encode())
        shards = getattr(leaf, "addressable_shards", None)
        if shards is None:
            parts = [("", np.asarray(leaf))]
        else:
            ordered = sorted(shards, key=lambda s: (str(s.index), s.device.id))
            parts = [(str(s.index), np.asarray(s.data)) for s in ordered]
        for index, data in parts:
            digest.update(f"{index}|{data.dtype.str}|{data.shape}".encode())
            digest.update(np.ascontiguousarray(data).tobytes())
    return digest.hexdigest()


class StreamCheckpoint:
    """Checkpoints of one pass under `directory`, keeping the latest only."""

    def __init__(self, directory: str | os.PathLike, every: int):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 batch, got {every}")
        self.every = every
        self.directory = pathlib.Path(os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # noqa: BLE001 - orbax parses a step's metadata at once
            raise ValueError(
                f"{self.directory}: a resume checkpoint there is damaged ({type(e).__name__}: "
                f"{str(e).strip()[:200]}); remove {self.directory} to start the pass again"
            ) from None

    def _digest_path(self, step: int) -> pathlib.Path:
        return self.directory / f"digest-p{jax.process_index()}-{step}"

    def restore(self, template: Any) -> tuple[Any, int]:
        """(state, batches done) of the latest checkpoint, or (template, 0): none, or one
        that is damaged (unreadable, or not the state its digest says) on any process."""
        step = self._manager.latest_step()
        if step is None:
            return template, 0
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template
        )
        state, problem = None, ""
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
            recorded = json.loads(self._digest_path(step).read_text(encoding="utf-8"))["sha256"]
            if recorded != state_digest(state):
                problem = "its arrays are not the state that was saved"
        except FileNotFoundError:
            problem = "it has no digest (written by older code, or killed before the digest)"
        except Exception as e:  # noqa: BLE001 - orbax's, tensorstore's, json's: all mean damage
            problem = f"it cannot be read ({type(e).__name__}: {str(e).strip()[:200]})"
        if parallel.all_processes(not problem):
            return state, int(step)
        logging.warning(
            "%s: the checkpoint after batch %d is damaged%s; starting the pass again",
            self.directory,
            step,
            f" ({problem})" if problem else " on another process",
        )
        if jax.process_index() == 0:
            shutil.rmtree(self.directory / str(step), ignore_errors=True)
        parallel.all_processes(True)  # every process sees it gone before it looks again
        self._manager.reload()
        return template, 0

    def maybe_save(self, batches_done: int, state: Any, *, force: bool = False) -> bool:
        if not force and batches_done % self.every:
            return False
        if self._manager.latest_step() == batches_done:
            return False
        # The digest first: a run killed after orbax finalises the step finds it there.
        store.write_json(self._digest_path(batches_done), {"sha256": state_digest(state)})
        self._manager.save(batches_done, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()
        for old in self.directory.glob(f"digest-p{jax.process_index()}-*"):
            if old != self._digest_path(batches_done):
                old.unlink(missing_ok=True)
        return True

    def close(self) -> None:
        self._manager.close()

"""Resumable streaming state: orbax checkpoints of a pass, every N batches.

A pass's state (sketches, tallies, top images: sharded jax.Arrays) is saved
with the number of batches it has consumed. A run killed at any moment
restarts from the last complete checkpoint (orbax finalises a checkpoint
atomically) and, since batches are read in a fixed order, ends with the same
state as an uninterrupted run.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class StreamCheckpoint:
    """Checkpoints of one pass under `directory`, keeping the latest only."""

    def __init__(self, directory: str | os.PathLike, every: int):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 batch, got {every}")
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def restore(self, template: Any) -> tuple[Any, int]:
        """(state, batches done) of the latest checkpoint, or (template, 0)."""
        step = self._manager.latest_step()
        if step is None:
            return template, 0
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template
        )
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        return state, int(step)

    def maybe_save(self, batches_done: int, state: Any, *, force: bool = False) -> bool:
        if not force and batches_done % self.every:
            return False
        if self._manager.latest_step() == batches_done:
            return False
        self._manager.save(batches_done, args=ocp.args.StandardSave(state), force=True)
        self._manager.wait_until_finished()
        return True

    def close(self) -> None:
        self._manager.close()

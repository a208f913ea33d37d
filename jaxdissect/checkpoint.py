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
the pass starts again, losing time, never numbers. Process 0's digest also records the
sha256 of every file of the finished step: a step whose files changed
is dropped before orbax reads it (a read that fails leaves orbax's other reads running
past its closed event loop, each printing a traceback). `save` and `verified_restore`
serve any orbax manager's steps (a training run's checkpoints too).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import os
import pathlib
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from jaxdissect import parallel, store


def open_manager(
    directory: pathlib.Path, options: ocp.CheckpointManagerOptions, then: str
) -> ocp.CheckpointManager:
    """orbax's manager of the checkpoints in `directory`; one whose metadata orbax cannot
    parse (it reads every step's at once) is a ValueError naming the folder, its removal
    letting the caller `then` (e.g. "start the pass again")."""
    try:
        return ocp.CheckpointManager(directory, options=options)
    except Exception as e:  # noqa: BLE001 - orbax's and json's errors: all mean damage
        raise ValueError(
            f"{directory}: a checkpoint there is damaged ({type(e).__name__}: "
            f"{str(e).strip()[:200]}); remove {directory} to {then}"
        ) from None


def state_digest(state: Any, extra: Any = None) -> str:
    """sha256 of this process's shards of `state` (paths, shard indices, dtypes, shapes,
    bytes), in a fixed order, and of `extra` (JSON) where given."""
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
    if extra is not None:
        digest.update(json.dumps(extra, sort_keys=True).encode())
    return digest.hexdigest()


def digest_path(directory: pathlib.Path, step: int) -> pathlib.Path:
    """This process's digest of the checkpoint of `step` in an orbax manager's `directory`."""
    return directory / f"digest-p{jax.process_index()}-{step}"


def _write_digest(
    directory: pathlib.Path, step: int, state: Any, extra: Any = None
) -> dict[str, Any]:
    """Record the digest of `state` (and `extra`) as the checkpoint of `step`'s, and return
    it; written before orbax's save, so a run killed after orbax finalises the step finds
    it."""
    digest = {"sha256": state_digest(state, extra)}
    store.write_json(digest_path(directory, step), digest)
    return digest


def _file_digests(folder: pathlib.Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by its path relative to it."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            digests[path.relative_to(folder).as_posix()] = hashlib.file_digest(
                f, "sha256"
            ).hexdigest()
    return digests


def _record_files(directory: pathlib.Path, step: int, digest: dict[str, Any]) -> None:
    """Add the sha256 of every file of the finished checkpoint of `step` to process 0's
    `digest` (the files of every process: orbax's folder is one all processes share)."""
    if jax.process_index() == 0:
        files = _file_digests(directory / str(step))
        store.write_json(digest_path(directory, step), {**digest, "files": files})


def _files_problem(directory: pathlib.Path, step: int) -> str:
    """Why the files of `step` are not those `_record_files` recorded ('' if they are, or
    if this process recorded none)."""
    try:
        recorded = json.loads(digest_path(directory, step).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""  # no record (another process's, or a step of older code): orbax decides
    if not isinstance(recorded, dict):
        return "its digest's record of its files is damaged"
    try:
        found = _file_digests(directory / str(step))
    except OSError as e:
        return f"its files cannot be read ({e.strerror})"
    changed = sorted(set(recorded) ^ set(found) | {f for f in found if recorded.get(f) != found[f]})
    return f"its files are not those saved ({', '.join(changed[:3])})" if changed else ""


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, *, extra: Any = None, **kwargs: Any
) -> bool:
    """`manager.save(step, state, **kwargs)` with its digests: the state's (with `extra`,
    JSON the step keeps too) before the save, the files' once it is finished, and those
    of steps the manager no longer keeps removed. A disk without room for this process's
    shards of `state` (free space checked first, on every process at once: a process that
    raised alone would leave the others waiting in orbax's save; or orbax's write refused)
    is an OSError ENOSPC naming the manager's folder, which the scripts say in one line."""
    directory = pathlib.Path(str(manager.directory))
    needed = 0
    for leaf in jax.tree.leaves(state):
        shards = getattr(leaf, "addressable_shards", None)
        if shards is None:
            needed += np.asarray(leaf).nbytes
        else:  # replicas of a block (a replicated state's devices) are written once
            needed += sum({str(s.index): s.data.nbytes for s in shards}.values())
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    stats = os.statvfs(existing)
    room = needed <= stats.f_bavail * stats.f_frsize
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    if not parallel.all_processes(room):
        if room:
            full.strerror += " on another process's disk"
        raise full
    digest = _write_digest(directory, step, state, extra)
    try:
        saved = manager.save(step, args=ocp.args.StandardSave(state), **kwargs)
    except Exception as e:
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            raise full from None
        raise
    manager.wait_until_finished()
    if saved:
        _record_files(directory, step, digest)
    _remove_digests(directory, manager.all_steps())
    return saved


def _remove_digests(directory: pathlib.Path, keep: Iterable[int]) -> None:
    """Delete this process's digests of steps not in `keep`."""
    kept = {digest_path(directory, s) for s in keep}
    for path in directory.glob(f"digest-p{jax.process_index()}-*"):
        if path not in kept:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def orbax_reads_quiet() -> Iterator[Callable[[], Any]]:
    """While the block runs, the exceptions orbax's read coroutines raise as they are closed
    mid-read (where another shard of a damaged checkpoint failed first) are dropped instead
    of printed as "Exception ignored in": the failure they follow is reported once, in one
    line. Others reach the hook as before. The block calls what this yields (a full garbage
    collection) once a read has failed and its exception is handled, so that those
    coroutines close while the hook is on; a read that succeeded leaves none (a collection
    after every restore walked the whole heap: seconds in a long-lived process)."""
    previous = sys.unraisablehook
    marker = f"{os.sep}orbax{os.sep}"

    def hook(unraisable: Any) -> None:
        code = getattr(unraisable.object, "cr_code", None)
        if code is None or marker not in code.co_filename:
            previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield gc.collect
    finally:
        sys.unraisablehook = previous


def verified_restore(
    manager: ocp.CheckpointManager,
    step: int,
    template: Any,
    *,
    extra: Callable[[], Any] | None = None,
    what: str,
    then: str,
) -> Any | None:
    """The state of `step`'s checkpoint (shaped and sharded as `template`) if on every
    process it restores and matches its digest (with `extra()`, read from the checkpoint
    too); else None, the step deleted and a warning logged that `what` is damaged, `then`
    what happens: a damaged checkpoint costs time, never other numbers."""
    directory = pathlib.Path(str(manager.directory))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), template
    )
    state, problem = None, _files_problem(directory, step)
    # Every process restores (orbax's restore is collective) or none does.
    if parallel.all_processes(not problem):
        with orbax_reads_quiet() as settle:  # around the handling: its traceback holds the reads
            try:
                state = manager.restore(step, args=ocp.args.StandardRestore(abstract))
                got = state_digest(state, None if extra is None else extra())
                digest = json.loads(digest_path(directory, step).read_text(encoding="utf-8"))
                if digest["sha256"] != got:
                    problem = "its arrays are not the state that was saved"
            except FileNotFoundError:
                problem = "it has no digest (written by older code, or killed before the digest)"
            except Exception as e:  # noqa: BLE001 - orbax's, tensorstore's, json's: all mean damage
                reason = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore")[0]
                problem = f"it cannot be read ({type(e).__name__}: {reason[:200]})"
            if problem:
                settle()
    if parallel.all_processes(not problem):
        return state
    logging.warning(
        "%s: %s is damaged%s; %s",
        directory,
        what,
        f" ({problem})" if problem else " on another process",
        then,
    )
    if jax.process_index() == 0:
        shutil.rmtree(directory / str(step), ignore_errors=True)
    parallel.all_processes(True)  # every process sees it gone before it looks again
    manager.reload()
    return None


class StreamCheckpoint:
    """Checkpoints of one pass under `directory`, keeping the latest only."""

    def __init__(self, directory: str | os.PathLike, every: int):
        if every < 1:
            raise ValueError(f"checkpoint interval must be >= 1 batch, got {every}")
        self.every = every
        self.directory = pathlib.Path(os.path.abspath(directory))
        options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
        self._manager = open_manager(self.directory, options, "start the pass again")

    def restore(self, template: Any) -> tuple[Any, int]:
        """(state, batches done) of the latest checkpoint, or (template, 0): none, or one
        that is damaged (unreadable, or not the state its digest says) on any process."""
        step = self._manager.latest_step()
        if step is None:
            return template, 0
        state = verified_restore(
            self._manager,
            step,
            template,
            what=f"the checkpoint after batch {step}",
            then="starting the pass again",
        )
        return (template, 0) if state is None else (state, int(step))

    def maybe_save(self, batches_done: int, state: Any, *, force: bool = False) -> bool:
        if not force and batches_done % self.every:
            return False
        if self._manager.latest_step() == batches_done:
            return False
        save(self._manager, batches_done, state, force=True)
        return True

    def close(self) -> None:
        self._manager.close()

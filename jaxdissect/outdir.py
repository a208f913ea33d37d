"""An output directory: created and checked up front, held by one run at a time.

`prepare` creates the directory and proves it writable, with one-line errors;
`locked` holds an exclusive `fcntl.flock` on `<dir>/.lock` for the duration of
a run. The OS releases the lock when the holding process exits or is killed,
so a stale `.lock` file never blocks anything; the file records the holder's
pid and command for the message a second run prints, and is emptied on release.
Taking the lock removes the temporary files a killed holder was writing.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import pathlib
import shlex
import sys
import tempfile
from collections.abc import Iterator

from jaxdissect import store

LOCK_FILE = ".lock"
# What the follow-on scripts (compositional.py, significance.py, ablation.py,
# concept_vectors.py) write beside the dissection they build on, as glob patterns: computed
# from its thresholds and labels, they go when a rerun replaces that dissection with another
# (`remove_follow_ons`).
FOLLOW_ON_OUTPUTS = (
    "compositional.json",
    "compositional.html",
    "compositional-*.csv",
    "formula_strips",
    "plots/compositional_length.png",
    "significance.json",
    "significance-*.csv",
    "ablation.json",
    "ablation.html",
    "ablation.png",
    "ablation_units.csv",
    "ablation_classes.csv",
    "concept_vectors.json",
    "concept_vectors.csv",
    "concept_vectors.npz",
    "concept_vectors.png",
    "concept_vectors.html",
)


# The lock files held by `locked` in the calls this one is inside, as (pid, device, inode):
# a hold of one of them inside another goes on under it. Not told by the pid the file
# records: a run of another host or container may have this process's pid (and a forked
# child holds none). A context variable: another thread's hold is another run's.
_HELD: contextvars.ContextVar[frozenset[tuple[int, int, int]]] = contextvars.ContextVar(
    "jaxdissect_held_locks", default=frozenset()
)


class OutputDirBusy(RuntimeError):
    """Another process holds the output directory's lock."""


def prepare(path: str | os.PathLike[str], name: str = "output_dir") -> pathlib.Path:
    """Create `path` (and parents) and check that files can be written in it.

    `name` is how errors call the parameter (a CLI passes its flag, `--output_dir`).
    """
    out = pathlib.Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"{name}={path} is an existing file, not a folder: choose another {name} "
            "or move the file away"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except NotADirectoryError:
        raise ValueError(
            f"{name}={path}: a part of this path is a file, not a folder: choose another {name}"
        ) from None
    except OSError as e:
        raise ValueError(
            f"{name}={path} is not writable ({e.strerror}): choose a folder you can write to"
        ) from None
    # A run rewrites files in place only in its lock file and creates files in every folder
    # of an earlier run's (another user's run may have made them).
    lock = out / LOCK_FILE
    unwritable = [lock] if lock.exists() and not os.access(lock, os.W_OK) else []
    unwritable += (
        pathlib.Path(folder)
        for folder, _, _ in os.walk(out)
        if not os.access(folder, os.W_OK | os.X_OK)
    )
    if unwritable:
        raise ValueError(
            f"{name}={path} holds {unwritable[0]}, which this user may not write (another "
            f"user's run?): choose another {name}, or ask its owner to remove it"
        )
    return out


@contextlib.contextmanager
def locked(path: str | os.PathLike[str], name: str = "output_dir") -> Iterator[pathlib.Path]:
    """Hold `<path>/.lock` (created with `path`) while the block runs.

    Raises `OutputDirBusy` naming the holder's pid and command when another
    process, or another thread of this one, holds it; a block inside a hold of `path`
    that this call is within goes on under it. `name` is how the message calls the
    parameter.
    """
    out = pathlib.Path(path).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_FILE, "a+", encoding="utf-8") as f:
        stat = os.fstat(f.fileno())
        mine = (os.getpid(), stat.st_dev, stat.st_ino)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if mine not in _HELD.get():
                raise OutputDirBusy(
                    f"{name}={path} is in use by {holder}: wait for that run to finish, or "
                    f"choose another {name}"
                ) from None
            enclosed = True  # only this process writes the file while it holds the lock
        else:
            enclosed = False
        if enclosed:
            yield out
            return
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} ({shlex.join(sys.argv)})\n")
        f.flush()
        # What a killed holder was writing (a stage, a strip): only the holder writes here.
        store.remove_temporaries(out)
        token = _HELD.set(_HELD.get() | {mine})
        try:
            yield out
        finally:  # cleared while held: the next holder's file never names this process
            _HELD.reset(token)
            f.seek(0)
            f.truncate()
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_path(path: pathlib.Path) -> None:
    """Remove the file or folder `path` (a symlink itself, not what it names), if there."""
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def remove_if_unused(out: pathlib.Path) -> None:
    """Remove the folder `out` where it holds nothing but its lock (held by this process)."""
    if [p.name for p in out.iterdir()] == [LOCK_FILE]:
        (out / LOCK_FILE).unlink()
        with contextlib.suppress(OSError):  # kept where another run has just created its lock
            out.rmdir()


def follow_on_files(out: pathlib.Path) -> list[pathlib.Path]:
    """The follow-on scripts' outputs in `out` (`FOLLOW_ON_OUTPUTS`), sorted."""
    return sorted({path for pattern in FOLLOW_ON_OUTPUTS for path in out.glob(pattern)})


def remove_follow_ons(out: pathlib.Path) -> list[str]:
    """Remove the follow-on scripts' outputs in `out` (files and folders), and the folders
    of `out` they leave empty; their names relative to `out`."""
    found = follow_on_files(out)
    for path in found:
        remove_path(path)
        if path.parent != out:
            with contextlib.suppress(OSError):  # kept where something else is in it
                path.parent.rmdir()
    return [path.relative_to(out).as_posix() for path in found]

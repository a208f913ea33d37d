"""Keyed, atomic storage of stage outputs and the files every output is written with.

Every stage output lives under a key that hashes everything it depends on (model
weights, the model's definition and this library's code (`code_keys`), layer, every
setting of the stage, the data index), so changing a flag or a model's code can never
reuse a stale result, and two layers can never share one. Files are written to a temporary name and
renamed, and a stage is complete only when its `DONE` marker exists: a partial result is
never taken for a complete one. The atomic writers (text, JSON, CSV rows, arrays) serve
every other output file too.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import pathlib
import re
import shutil
import time
import uuid
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from tokenize import TokenError
from typing import IO, Any

import numpy as np
from absl import logging

DONE = "DONE"


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, pathlib.Path):
        return str(value)
    return value


def key_of(**parts: Any) -> str:
    """A short stable hash of JSON-able `parts` (order of keys does not matter)."""
    text = json.dumps(_canonical(parts), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def host_array(leaf: Any) -> np.ndarray:
    """A pytree leaf as a numpy array; a typed PRNG key (an NNX module's `Rngs`, a Dropout's
    stream) as its key data, which numpy cannot hold otherwise."""
    import jax

    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def weights_fingerprint(module: Any, variables: Any) -> str | None:
    """`fingerprint_tree` of a model's weights: `variables`, else an NNX module's state;
    None for a function, whose weights nothing here can see."""
    if variables is not None:
        return fingerprint_tree(variables)
    from flax import nnx

    return fingerprint_tree(nnx.state(module)) if isinstance(module, nnx.Module) else None


def fingerprint_tree(tree: Any) -> str:
    """Hash of a pytree of arrays (model weights): shapes, dtypes and bytes."""
    import jax

    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        arr = host_array(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:20]


# The temporary files `atomic_path` writes beside their destinations.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp")


def remove_temporaries(folder: str | os.PathLike, older_than_s: float = 60.0) -> int:
    """Remove the temporary files `atomic_path` left under `folder` (a process killed while
    writing), those untouched for `older_than_s` seconds; returns how many. Only for a
    folder no other process writes to (an output directory whose lock is held)."""
    removed, now = 0, time.time()
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if _TEMPORARY.fullmatch(name):
                with contextlib.suppress(FileNotFoundError):
                    if now - os.lstat(path).st_mtime >= older_than_s:
                        os.unlink(path)
                        removed += 1
    return removed


def _new_file_beside(path: pathlib.Path) -> tuple[IO[bytes], pathlib.Path]:
    """A new empty file `.<name>.<random>.tmp` beside `path`, open for writing, and its path;
    made with the mode any file the user writes gets (`open`'s 0o666 less the umask;
    `tempfile.mkstemp` would make it 0600)."""
    while True:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            return open(tmp, "xb"), tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yield a temporary file beside `path`, open for binary writing; on success it is closed
    and renamed into place, otherwise removed."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f, tmp = _new_file_beside(path)
    replaced = False
    try:
        with f:
            yield f
        os.replace(tmp, path)
        replaced = True
    except OSError as e:
        if e.errno is not None and e.filename is None:  # a write's names no file: this one
            e.filename = str(path)
        raise
    finally:
        if not replaced:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside `path`; rename it into place on success."""
    with _atomic_file(path) as f:
        f.close()
        yield pathlib.Path(f.name)


@contextlib.contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", *, newline: str | None = None
) -> Iterator[IO[Any]]:
    """`open(path, mode)` for writing (text as UTF-8) through a temporary file beside it,
    flushed to disk and renamed into place on success: a reader never sees a partial file."""
    encoding = None if "b" in mode else "utf-8"
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding, newline=newline) as f:
        yield f
        f.flush()
        os.fsync(f.fileno())


def write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """`data` written atomically (an interrupted write leaves the old file, or none)."""
    with _atomic_file(path) as f:
        f.write(data)
    return pathlib.Path(path)


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """UTF-8 `text` written atomically."""
    return write_bytes(path, text.encode("utf-8"))


# The field of a JSON output that its readers check its values against.
CHECKSUM = "checksum"


def json_checksum(document: Mapping[str, Any]) -> str:
    """`key_of` a JSON object's fields but `CHECKSUM`: the same however its file is laid out
    (indented, keys reordered), another for any other value."""
    return key_of(document={k: v for k, v in document.items() if k != CHECKSUM})


def write_json(path: str | os.PathLike, obj: Any, *, checksum: bool = False) -> None:
    """`obj` as indented JSON, written atomically; with `checksum`, an object with its
    `json_checksum` as the field `CHECKSUM`, for `read_json_object(checked=True)`."""
    if checksum:
        obj = {**obj, CHECKSUM: json_checksum(obj)}
    write_text(path, json.dumps(_canonical(obj), indent=1, sort_keys=False) + "\n")


def read_json_object(path: str | os.PathLike, fix: str, *, checked: bool = False) -> dict[str, Any]:
    """The JSON object in the file `path`; a file cut short, altered or holding another JSON
    value raises one ValueError naming it and ending in `fix` (what to do), a missing one
    FileNotFoundError. `checked`: so does one whose `CHECKSUM` is not that of its values
    (changed since it was written); a file without one (an older version's, or one whose
    checksum was deleted) is read with a warning that its values are not verified."""
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path}: not readable JSON ({e}); {fix}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: holds {type(document).__name__}, not a JSON object; {fix}")
    if checked and CHECKSUM not in document:
        logging.warning(
            "%s: no %s (written by an older version, or removed): its values are read unverified",
            path,
            CHECKSUM,
        )
    elif checked and document[CHECKSUM] != json_checksum(document):
        raise ValueError(
            f"{path}: its {CHECKSUM} is not that of its values: the file was edited or "
            f"damaged since it was written; {fix}"
        )
    return document


def _cell(value: Any) -> str:
    """A CSV cell: empty for None and NaN, floats to 6 significant digits."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def write_rows_csv(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str] | None = None,
) -> pathlib.Path:
    """Rows as a CSV written atomically: `columns`, or every key in first-seen order
    (missing cells empty)."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_open(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for row in rows:
            w.writerow({k: _cell(row.get(k)) for k in columns})
    return pathlib.Path(path)


def read_rows_csv(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a CSV with a header, as {column: text}."""
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """An .npz written atomically (loaded back with pickling disabled)."""
    with _atomic_file(path) as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz file; a file cut short or altered raises one ValueError naming it
    (a missing one FileNotFoundError)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    # SyntaxError, TokenError: numpy parses a member's .npy header as Python text.
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, SyntaxError, TokenError) as e:
        raise ValueError(f"{path}: not readable arrays ({type(e).__name__}: {e})") from None


class Stage:
    """A directory for one keyed stage output, complete once marked done."""

    def __init__(self, root: str | os.PathLike, name: str, key: str):
        self.dir = pathlib.Path(root) / f"{name}-{key}"
        self.name, self.key = name, key

    @property
    def done(self) -> bool:
        return (self.dir / DONE).exists()

    def path(self, filename: str) -> pathlib.Path:
        return self.dir / filename

    def mark_done(self, description: Mapping[str, Any]) -> None:
        """Record what was computed, then the marker (last, so a crash leaves it incomplete)."""
        write_json(self.dir / "key.json", {"stage": self.name, "key": self.key, **description})
        write_text(self.dir / DONE, "")

    def reset(self) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)

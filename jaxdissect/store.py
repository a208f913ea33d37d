"""Keyed, atomic storage of stage outputs and resumable streaming checkpoints.

Every stage output lives under a key that hashes everything it depends on (model
weights, the model's definition and this library's code, layer, every setting of the
stage, the data index), so changing a flag or a model's code can never reuse a stale
result, and two layers can never share one. Files are written to a temporary name and
renamed, and a stage is complete only when its `DONE` marker exists: a partial result is
never taken for a complete one. The atomic writers (text, JSON, CSV rows, arrays) serve
every other output file too.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import inspect
import json
import os
import pathlib
import re
import shutil
import sys
import uuid
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from typing import IO, Any

import numpy as np

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


def fingerprint_tree(tree: Any) -> str:
    """Hash of a pytree of arrays (model weights): shapes, dtypes and bytes."""
    import jax

    h = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        arr = np.asarray(leaf)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{arr.dtype}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()[:20]


def source_fingerprint(*roots: str | os.PathLike[str]) -> str:
    """Hash of the Python source under `roots` (files, or folders walked for .py files)."""
    files, seen = set(), set()
    for root in map(pathlib.Path, roots):
        if root.is_dir():
            for folder, dirs, names in os.walk(root, followlinks=True):
                seen.add(os.path.realpath(folder))
                dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(folder, d)) not in seen]
                files.update(pathlib.Path(folder) / n for n in names if n.endswith(".py"))
        elif root.is_file():
            files.add(root)
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: (p.name, str(p))):
        h.update(path.name.encode())
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:20]


def code_fingerprint() -> str:
    """Hash of this library's own source (a stage computed by other code is not reused)."""
    return source_fingerprint(pathlib.Path(__file__).parent)


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def definition_key(
    module: Any, apply_kwargs: Mapping[str, Any] | None = None, *, source: bool = True
) -> str:
    """Key of what a model computes beyond its weights: a Linen module's fields (its repr,
    memory addresses dropped), `apply_kwargs` and (`source`) the source of the packages
    or files that define its class and the classes of modules among its fields (a wrapped
    model's), with what else defines the computation (`_computation`): an NNX module's
    graph (its static attributes), a function's closure cells, defaults and
    `functools.partial` arguments, and the code of classes and functions defined where no
    file is (a notebook, a REPL). Code a model reads from elsewhere (an environment
    variable, another package) is not covered."""
    import functools

    import flax.linen as nn

    target = module.func if isinstance(module, functools.partial) else module
    while isinstance(target, functools.partial):
        target = target.func
    if isinstance(module, nn.Module):
        fields, defined = repr(module), _module_classes(module)
    elif inspect.isfunction(module):  # a plain-function model
        fields, defined = module.__qualname__, {module}
    elif isinstance(module, functools.partial) and inspect.isfunction(target):
        fields, defined = type(module).__qualname__, {target}
    else:
        fields, defined = type(module).__qualname__, {type(module)}
    roots = {root for obj in defined for root in _defining_source(obj)} if source else ()
    computation = _computation(module, defined) if source else None
    return key_of(
        fields=_ADDRESS.sub("", fields),
        extra=_ADDRESS.sub("", repr(sorted(dict(apply_kwargs or {}).items()))),
        source=source_fingerprint(*sorted(roots)) if source else None,
        **({"computation": computation} if computation else {}),
    )


def _computation(module: Any, defined: set[Any]) -> list[Any]:
    """What defines `module`'s computation beyond its fields and defining files: an NNX
    module's graphdef (static attributes; addresses dropped), a function's or partial's
    constants (`statistics._function_constants`: closure cells, defaults, partial
    arguments, code of functions among them), and the code of classes and functions
    defined where no file is; empty where nothing is (a Linen module or a function
    without them, from a file), so that their keys stay as they were."""
    import functools

    from flax import nnx

    from jaxdissect import statistics

    parts: list[Any] = []
    classes = {obj for obj in defined if isinstance(obj, type)}
    if isinstance(module, nnx.Module):
        parts.append(_ADDRESS.sub("", repr(nnx.graphdef(module))))
        classes |= {type(node) for _, node in nnx.iter_graph(module)}
    for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__)):
        for base in cls.__mro__:
            if not _defining_source(base):
                parts.extend(
                    [base.__qualname__, name, _code_key(code)] for name, code in _class_code(base)
                )
    if isinstance(module, functools.partial) or inspect.isfunction(module):
        # A function from a file without closure cells is its file's (keyed as it was).
        fileless = not _defining_source(next(iter(defined)))
        if fileless or isinstance(module, functools.partial) or module.__closure__:
            parts.extend(
                [fn, name, _code_key(v) if inspect.iscode(v) else repr(v)]
                for (fn, name), v in statistics._function_constants(module, "model")
            )
    return parts


def _class_code(cls: type) -> Iterator[tuple[str, Any]]:
    """(name, code object) of the functions `cls` itself defines (methods, static and
    class methods, properties' accessors), by name."""
    for name, value in sorted(vars(cls).items()):
        value = getattr(value, "__func__", value)  # staticmethod, classmethod
        accessors = [value.fget, value.fset, value.fdel] if isinstance(value, property) else [value]
        for fn in accessors:
            if inspect.isfunction(fn):
                yield name, inspect.unwrap(fn).__code__  # Flax wraps a Linen module's methods


def _code_key(code: Any) -> list[Any]:
    """A code object as JSON-able text that is the same in every process: its bytecode,
    names and constants (code among them, recursively); line numbers left out."""
    consts = []
    for c in code.co_consts:
        if inspect.iscode(c):
            consts.append(_code_key(c))
        elif isinstance(c, frozenset):  # its order follows string hashing, per process
            consts.append(sorted(map(repr, c)))
        else:
            consts.append(repr(c))
    return [code.co_name, code.co_code.hex(), list(code.co_names), list(code.co_varnames), consts]


def _module_classes(module: Any) -> set[type]:
    """`module`'s class, and those of the Linen modules among its dataclass fields."""
    import dataclasses

    import flax.linen as nn

    found, todo = set(), [module]
    while todo:
        m = todo.pop()
        found.add(type(m))
        if isinstance(m, nn.Module):
            values = (getattr(m, f.name, None) for f in dataclasses.fields(m))
            todo.extend(v for v in values if isinstance(v, nn.Module) and type(v) not in found)
    return found


def _defining_source(obj: Any) -> list[str]:
    """The folders of the top-level package that defines `obj` (a class or function), or
    its module's file."""
    top = sys.modules.get((getattr(obj, "__module__", None) or "").split(".")[0])
    if top is None:
        return []
    if hasattr(top, "__path__"):
        return list(top.__path__)
    return [top.__file__] if getattr(top, "__file__", None) else []


def _new_file_beside(path: pathlib.Path) -> pathlib.Path:
    """A new empty file `.<name>.<random>.tmp` beside `path`, made with the mode any file
    the user writes gets (0o666 less the umask; `tempfile.mkstemp` would make it 0600)."""
    while True:
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary path beside `path`; rename it into place on success."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_file_beside(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return pathlib.Path(path)


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """UTF-8 `text` written atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(_canonical(obj), indent=1, sort_keys=False) + "\n")


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
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an .npz file; a file cut short or altered raises one ValueError naming it
    (a missing one FileNotFoundError)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
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

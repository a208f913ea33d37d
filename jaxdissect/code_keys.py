"""Keys of the code a stage is computed by: this library's source and the stack's versions
(`code_fingerprint`), a model's definition with the code and constants its computation
reaches (`definition_key`), and the devices' backend (`backend_of`). A stage keyed by them
is not reused after any of them changes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import pathlib
import re
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from jaxdissect.store import key_of


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


# The packages whose versions change what a stage computes (decoding, layers, rounding).
STACK = ("jax", "jaxlib", "flax", "numpy", "Pillow")


def code_fingerprint() -> str:
    """Hash of this library's own source and of the versions of `STACK` (a stage computed
    by other code, or after an upgrade of the stack, is not reused)."""
    import importlib.metadata

    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return key_of(
        source=source_fingerprint(pathlib.Path(__file__).parent),
        versions={name: version(name) for name in STACK},
    )


def backend_of(mesh: Any) -> list[tuple[str, str]]:
    """The platforms and device kinds of `mesh`'s devices ([["gpu", "NVIDIA H100 80GB
    HBM3"]]): what a stage computed on them is keyed by, as the backend's default float32
    matmul precision follows it (TensorFloat-32 on recent NVIDIA GPUs, float32 on CPU)."""
    return sorted({(d.platform, d.device_kind) for d in mesh.devices.flat})


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


# ----------------------------------------------------------------------------- constants

# Functions inside functions' closures are followed this deep (recursive helpers end).
CLOSURE_DEPTH = 3
OPAQUE = object()  # a closed-over value that is not compared (an array, any object)


def plain_constant(value: Any) -> Any:
    """`value` as a comparable constant where it is a plain one (None, a number, string,
    dtype, or a tuple or list of them: as a tuple, NaN as the string "nan"), else OPAQUE."""
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int, str, bytes, np.dtype)):
        return value
    if isinstance(value, (float, complex)):
        return "nan" if value != value else value
    if isinstance(value, (tuple, list)):
        items = tuple(plain_constant(v) for v in value)
        return OPAQUE if any(v is OPAQUE for v in items) else items
    return OPAQUE


# A constant's label: (the function holding it, e.g. "update" or "update's helper"; the
# name it is bound to there, None for the function's code itself).
Label = tuple[str, str | None]


def function_constants(
    fn: Any, label: str, depth: int = 0, keyed: Callable[[Any], Any] | None = None
) -> Iterator[tuple[Label, Any]]:
    """(label, value) of what a function visibly depends on: its code, and the plain
    defaults, closure cells and partial arguments it carries (functions among them
    followed). Other callables (a jitted function, an object) give nothing. Other values
    are left out, or given as `keyed(value)` where that is not `OPAQUE`."""
    if isinstance(fn, functools.partial):
        yield from function_constants(fn.func, label, depth, keyed)
        named = {**{f"argument {i}": a for i, a in enumerate(fn.args)}, **fn.keywords}
        for name, value in named.items():
            yield from _value_constants(value, label, name, depth, keyed)
        return
    if not isinstance(fn, types.FunctionType):
        return
    code = fn.__code__
    yield (label, None), code
    positional = code.co_varnames[: code.co_argcount]
    defaults = fn.__defaults__ or ()
    bound = dict(zip(positional[len(positional) - len(defaults) :], defaults, strict=True))
    bound.update(fn.__kwdefaults__ or {})
    for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=True):
        try:
            bound[name] = cell.cell_contents
        except ValueError:  # a cell not filled yet
            continue
    for name, value in bound.items():
        yield from _value_constants(value, label, name, depth, keyed)


def _value_constants(
    value: Any, label: str, name: str, depth: int, keyed: Callable[[Any], Any] | None = None
) -> Iterator[tuple[Label, Any]]:
    if isinstance(value, (types.FunctionType, functools.partial)):
        if depth < CLOSURE_DEPTH:
            yield from function_constants(value, f"{label}'s {name}", depth + 1, keyed)
        return
    plain = plain_constant(value)
    if plain is OPAQUE and keyed is not None:
        plain = keyed(value)
    if plain is not OPAQUE:
        yield (label, name), plain


def definition_key(
    module: Any, apply_kwargs: Mapping[str, Any] | None = None, *, source: bool = True
) -> str:
    """`_definition_key` with arrays written whole and every value exactly (numpy's repr
    abbreviates arrays over 1,000 values and rounds floats to 8 digits)."""
    with np.printoptions(threshold=sys.maxsize, floatmode="unique"):
        return _definition_key(module, apply_kwargs, source=source)


def _definition_key(
    module: Any, apply_kwargs: Mapping[str, Any] | None = None, *, source: bool = True
) -> str:
    """Key of what a model computes beyond its weights: a Linen module's fields (its repr,
    memory addresses dropped), `apply_kwargs` and (`source`) the source of the packages
    or files that define its class and the classes of modules among its fields (a wrapped
    model's), with what else defines the computation (`_computation`): an NNX module's
    graph (its static attributes), a function's closure cells, defaults, the values of the
    globals it reads and `functools.partial` arguments, a bound method's object (modules,
    dicts, lists, arrays and dataclasses among them by value), and the code of classes and
    functions defined where no file is (a notebook, a REPL). Code a model reads from
    elsewhere (an environment variable, another package) is not covered; a value it cannot
    key is logged."""
    import flax.linen as nn

    target = _unpartial(module)
    if isinstance(module, nn.Module):
        fields, defined = repr(module), _module_classes(module)
    elif inspect.isfunction(module):  # a plain-function model
        fields, defined = module.__qualname__, {module}
    elif isinstance(module, functools.partial) and inspect.isfunction(target):
        fields, defined = type(module).__qualname__, {target}
    elif inspect.ismethod(target):  # a bound method (`Net(2).apply`), or a partial of one
        fields, defined = f"{target.__qualname__} of {target.__self__!r}", {type(target.__self__)}
        fields = fields if target is module else f"{type(module).__qualname__} of {fields}"
    else:
        fields, defined = type(module).__qualname__, {type(module)}
    computation = _computation(module, defined) if source else None
    roots = {root for obj in defined for root in _defining_source(obj)} if source else set()
    roots |= _reached_sources(defined) if source else set()
    return key_of(
        fields=_ADDRESS.sub("", fields),
        extra=_ADDRESS.sub("", repr(sorted(dict(apply_kwargs or {}).items()))),
        source=source_fingerprint(*sorted(roots)) if source else None,
        **({"computation": computation} if computation else {}),
    )


def _unpartial(fn: Any) -> Any:
    """The function a (nested) `functools.partial` wraps; `fn` itself otherwise."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return fn


def _nnx_key(module: Any, classes: set[Any]) -> str:
    """An NNX module's graphdef as text (its static attributes; addresses dropped, so the
    same in every process); the classes of its nodes are added to `classes`."""
    from flax import nnx

    classes |= {type(node) for _, node in nnx.iter_graph(module)}
    return _ADDRESS.sub("", repr(nnx.graphdef(module)))


def _computation(module: Any, defined: set[Any]) -> list[Any]:
    """What defines `module`'s computation beyond its fields and defining files: an NNX
    module's graphdef (static attributes; addresses dropped), a function's or partial's
    constants (`function_constants`: closure cells, defaults, partial
    arguments, code of functions among them), the values of the globals its functions
    read, a bound method's object (each value by `_value_key`, which adds the classes of
    the modules among them to `defined`), and the code of classes and functions defined
    where no file is; empty where nothing is (a Linen module or a function reading no
    value but code, from a file), so that their keys stay as they were. Values it cannot
    key are named in one warning."""
    import flax.linen as nn
    from flax import nnx

    unkeyed: list[str] = []

    def keyed(value: Any) -> Any:  # code (`_SKIPPED`) is left out of the constants
        key = _value_key(value, defined, unkeyed)
        return OPAQUE if key is _SKIPPED else key

    head: list[Any] = []
    if isinstance(module, nnx.Module):
        head.append(_nnx_key(module, defined))
    values: list[Any] = []
    target = _unpartial(module)
    if inspect.ismethod(target):
        values.append(["bound to", repr(keyed(target.__self__))])
    if isinstance(module, functools.partial) or inspect.isfunction(module):
        # A function from a file without closure cells is its file's (keyed as it was).
        fileless = inspect.isfunction(target) and not _defining_source(target)
        if fileless or isinstance(module, functools.partial) or module.__closure__:
            values.extend(
                [fn, name, _code_key(v) if inspect.iscode(v) else repr(v)]
                for (fn, name), v in function_constants(module, "model", keyed=keyed)
            )
        values.extend(_global_values(module, keyed))
    if isinstance(module, nnx.Module | nn.Module):
        # The user's classes and functions (`_module_classes`): the globals their code reads,
        # by value (a file's constant set at run time, a notebook's), and the code of the
        # functions they call that no file defines.
        for obj in sorted((o for o in defined if _is_users(o)), key=_qualified):
            functions = [obj] if inspect.isfunction(obj) else _class_functions(obj)
            for function in functions:
                values.extend(_global_values(function, keyed))
            if inspect.isfunction(obj) and not _defining_source(obj):
                head.append([obj.__qualname__, None, _code_key(obj.__code__)])
    for cls in sorted((obj for obj in defined if isinstance(obj, type)), key=_qualified):
        for base in cls.__mro__:
            if not _defining_source(base):
                head.extend(
                    [base.__qualname__, name, _code_key(code)] for name, code in _class_code(base)
                )
    if unkeyed:
        from absl import logging

        logging.warning(
            "the model's stage key cannot see %s: a change of them is not noticed (pass the "
            "model a value the key covers: a number, string, dict, list, array or module)",
            ", ".join(sorted(set(unkeyed))),
        )
    return head + values


def _global_values(fn: Any, keyed: Any) -> list[Any]:
    """[function, name, key] of each value (not a module, class or function: code is keyed
    by its file) that `fn`, a partial's function, and the functions among their closure
    cells and among the globals they read from the same module, read as a global, by
    `keyed`; functions defined where no file is give their code too."""
    found, todo, seen = [], [fn], set()
    while todo:
        f = todo.pop()
        while isinstance(f, functools.partial):
            todo.extend(v for v in (*f.args, *f.keywords.values()) if callable(v))
            f = f.func
        if not isinstance(f, types.FunctionType) or f in seen:
            continue
        seen.add(f)
        cells = []
        for cell in f.__closure__ or ():
            with contextlib.suppress(ValueError):  # a cell not filled yet
                cells.append(cell.cell_contents)
        todo.extend(c for c in cells if isinstance(c, (types.FunctionType, functools.partial)))
        for name in sorted(_code_names(f.__code__)):
            if name not in f.__globals__:
                continue
            value = f.__globals__[name]
            if isinstance(value, types.FunctionType):
                if value.__globals__ is f.__globals__ and value not in seen:
                    todo.append(value)
                    if not _defining_source(value):
                        found.append([f.__qualname__, name, _code_key(value.__code__)])
                continue
            if isinstance(value, (types.ModuleType, type, types.BuiltinFunctionType)):
                continue
            key = keyed(value)
            if key is not OPAQUE:
                found.append([f.__qualname__, name, repr(key)])
    return found


def _code_names(code: Any) -> set[str]:
    """The global and attribute names `code` and the code objects inside it use."""
    names = set(code.co_names)
    for c in code.co_consts:
        if inspect.iscode(c):
            names |= _code_names(c)
    return names


_SKIPPED = ("code",)  # `_value_key` of a callable that is not a function (a jitted one)
_VALUE_DEPTH = 8  # values inside values are followed this deep


def _value_key(value: Any, classes: set[Any], unkeyed: list[str], depth: int = 0) -> Any:
    """`value` as JSON-able text that is the same in every process: a plain value as
    itself, a Linen module by its repr, an NNX module by its graphdef (their classes added
    to `classes`, so that their code is keyed), a bound method by its object, a dict, list,
    tuple or set by its items, an array by its dtype, shape and bytes, a dataclass or an
    object of a class with a file by its class and attributes; functions and other
    callables give `_SKIPPED` (their code is keyed by its file); anything else is named in
    `unkeyed`."""
    import dataclasses

    import flax.linen as nn
    import jax
    from flax import nnx

    plain = plain_constant(value)
    if plain is not OPAQUE:
        return repr(plain) if isinstance(plain, (bytes, np.dtype)) else plain
    again = functools.partial(_value_key, classes=classes, unkeyed=unkeyed, depth=depth + 1)
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if depth > _VALUE_DEPTH:
        unkeyed.append(f"a {name} nested deeper than {_VALUE_DEPTH}")
        return name
    if isinstance(value, nn.Module):
        classes |= _module_classes(value)
        return ["linen", _ADDRESS.sub("", repr(value))]
    if isinstance(value, nnx.Module):
        return ["nnx", _nnx_key(value, classes)]
    if inspect.ismethod(value):
        return ["method", value.__qualname__, again(value.__self__)]
    if isinstance(value, type):
        classes.add(value)
        return ["class", value.__module__, value.__qualname__]
    if isinstance(value, types.ModuleType):
        return ["module", value.__name__]
    if isinstance(value, Mapping):
        return [
            "dict",
            [[str(k), again(v)] for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))],
        ]
    if isinstance(value, list | tuple):
        return [type(value).__name__, [again(v) for v in value]]
    if isinstance(value, set | frozenset):
        return ["set", sorted(repr(again(v)) for v in value)]
    if isinstance(value, np.ndarray | jax.Array):
        arr = np.ascontiguousarray(np.asarray(value))
        return ["array", str(arr.dtype), list(arr.shape), hashlib.sha256(arr.tobytes()).hexdigest()]
    if dataclasses.is_dataclass(value):
        classes.add(type(value))
        return [
            name,
            [[f.name, again(getattr(value, f.name, None))] for f in dataclasses.fields(value)],
        ]
    if isinstance(value, types.FunctionType | types.BuiltinFunctionType):
        return ["function", value.__module__, value.__qualname__]
    if callable(value):
        return _SKIPPED
    if _is_users(type(value)) and hasattr(value, "__dict__"):
        classes.add(type(value))
        return [name, again(dict(vars(value)))]
    unkeyed.append(f"a {name}")
    return name


def _qualified(obj: Any) -> tuple[str, str]:
    return obj.__module__ or "", obj.__qualname__


def _class_functions(cls: type) -> list[types.FunctionType]:
    """The functions `cls` and its user-defined bases define (`_class_code`'s)."""
    return [
        function
        for base in cls.__mro__
        if _is_users(base)
        for name, value in sorted(vars(base).items())
        for function in _accessors(value)
    ]


def _accessors(value: Any) -> list[types.FunctionType]:
    """The functions of a class attribute: a method, static or class method (unwrapped, as
    Flax wraps a Linen module's), or a property's accessors."""
    value = getattr(value, "__func__", value)
    accessors = [value.fget, value.fset, value.fdel] if isinstance(value, property) else [value]
    return [inspect.unwrap(fn) for fn in accessors if inspect.isfunction(fn)]


def _class_code(cls: type) -> Iterator[tuple[str, Any]]:
    """(name, code object) of the functions `cls` itself defines (methods, static and
    class methods, properties' accessors), by name."""
    for name, value in sorted(vars(cls).items()):
        for fn in _accessors(value):
            yield name, fn.__code__


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


def _module_classes(module: Any) -> set[Any]:
    """`module`'s class, those of the Linen modules among its dataclass fields, and the
    user's functions among them (`act=my_activation`, or a partial of one: their repr names
    them only), whose files and values are keyed as the classes' are."""
    import dataclasses

    import flax.linen as nn

    found, todo = set(), [module]
    while todo:
        m = todo.pop()
        found.add(type(m))
        if isinstance(m, nn.Module):
            values = [getattr(m, f.name, None) for f in dataclasses.fields(m)]
            todo.extend(v for v in values if isinstance(v, nn.Module) and type(v) not in found)
            functions = (_unpartial(v) for v in values)
            found |= {f for f in functions if inspect.isfunction(f) and _is_users(f)}
    return found


def _defining_source(obj: Any) -> list[str]:
    """The folders of the top-level package that defines `obj` (a class or function), or
    its module's file; none where that is no file (a notebook, `python -`: '<stdin>')."""
    return _top_module_roots(getattr(obj, "__module__", None) or "")


def _top_module_roots(name: str) -> list[str]:
    """The folders of the loaded top-level package of module `name`, or its file ([]: not
    loaded, or no file)."""
    top = sys.modules.get(name.split(".")[0])
    if top is None:
        return []
    if hasattr(top, "__path__"):
        return list(top.__path__)
    file = getattr(top, "__file__", None)
    return [file] if file and os.path.isfile(file) else []


def _users(paths: list[str]) -> list[str]:
    """`paths`, or [] where any lies in the standard library, an installed package or this
    library."""
    return [] if not paths or any(map(_is_library, paths)) else paths


def _reached_sources(defined: set[Any]) -> set[str]:
    """The files (or package folders) of the user's own modules that the modules defining
    `defined` reach: through their globals (`from helpers import Block`) and through the
    imports inside their functions (`import helpers` in `__call__`, found in the bytecode,
    located without importing where not yet imported), followed on through each module so
    reached (a module of a package too: `mypkg/net.py`'s imports). Modules of the standard
    library, installed packages and this library are not followed."""

    def module_of(value: Any) -> types.ModuleType | None:
        if isinstance(value, types.ModuleType):
            return value
        if isinstance(value, type) or inspect.isfunction(value):
            name = value.__module__ or ""
        else:
            name = type(value).__module__
        return sys.modules.get(name)

    def roots_of(module: types.ModuleType) -> list[str]:
        """The user's file or package folders of `module`'s top-level module ([]: a
        library's, or none)."""
        return _users(_top_module_roots(module.__name__))

    todo = [m for m in {module_of(obj) for obj in defined} if m is not None and roots_of(m)]
    seen, found = {id(m) for m in todo}, set()
    while todo:
        module = todo.pop()
        values = [value for _, value in sorted(vars(module).items())]
        for name in sorted(_imported_in_functions(module)):
            if (imported := sys.modules.get(name)) is not None:
                values.append(imported)
            else:  # not run yet: located, its own imports unseen
                found |= set(_unimported_roots(name.split(".")[0]))
        for value in values:
            reached = module_of(value)
            if reached is None or id(reached) in seen:
                continue
            seen.add(id(reached))
            if roots := roots_of(reached):
                found |= set(roots)
                todo.append(reached)
    return found


def _imported_in_functions(module: types.ModuleType) -> set[str]:
    """The names of the modules imported inside the functions and methods `module` defines
    (its module-level imports are among its globals); relative imports left out."""
    import dis

    def code_of(value: Any) -> list[types.CodeType]:
        """The code of a function, unwrapped (Flax wraps a module's methods, and callable
        class attributes: an `InputSpec`, which has none)."""
        try:
            function = inspect.unwrap(getattr(value, "__func__", value))  # static, class
        except ValueError:  # a cycle of __wrapped__
            return []
        return [function.__code__] if inspect.isfunction(function) else []

    codes = []
    for value in vars(module).values():
        if getattr(value, "__module__", None) != module.__name__:
            continue
        if isinstance(value, type):
            for member in vars(value).values():
                codes.extend(code_of(member))
        else:
            codes.extend(code_of(value))
    names = set()
    while codes:
        code = codes.pop()
        codes.extend(c for c in code.co_consts if inspect.iscode(c))
        for ins in dis.get_instructions(code):
            if ins.opname == "IMPORT_NAME" and isinstance(ins.argval, str) and ins.argval:
                names.add(ins.argval)
    return names


def _unimported_roots(name: str) -> list[str]:
    """The user's file or package folders of a top-level module not imported yet, located
    on the path without running it ([]: none, or a library's)."""
    import importlib.util

    if not name or name in sys.builtin_module_names:
        return []
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    paths = list(spec.submodule_search_locations or ())
    if not paths and spec.origin and os.path.isfile(spec.origin):
        paths = [spec.origin]
    return _users(paths)


def _is_users(obj: Any) -> bool:
    """Whether `obj` (a class or function) is defined outside the standard library, the
    installed packages and this library: in the user's own files, or where no file is."""
    return not any(_is_library(root) for root in _defining_source(obj))


def _is_library(path: str) -> bool:
    """Whether `path` lies in the standard library, among installed packages (or in the
    Python installation or environment) or in this library."""
    import site
    import sysconfig

    places = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(__file__)}
    places |= {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    places |= set(getattr(site, "getsitepackages", list)()) | {site.getusersitepackages()}
    real = os.path.realpath(path)
    return any(real == p or real.startswith(p + os.sep) for p in map(os.path.realpath, places))

"""torch.save files read into numpy, without torch and without running code.

* zip `.pth` (torch >= 1.6): `<prefix>/data.pkl` plus one `<prefix>/data/<key>` record
  per storage and a `<prefix>/byteorder` record (`load_zip`);
* legacy `.pth` / `.pth.tar` (torch < 1.6, or `_use_new_zipfile_serialization=False`):
  magic number, protocol version, sys info, the pickled object, the list of storage
  keys, then each storage as an element count and its raw bytes (`load_legacy`).

Pickles are read by `_RestrictedUnpickler`, whose `find_class` hands out only
the few globals a state dict needs (`ALLOWED_GLOBALS`) and maps torch's tensor
rebuild functions to `torch_tensors`' (references cut out of the storages once read); an `argparse.Namespace` (a training script's
arguments, saved beside its weights) is read as an inert record of its attributes.
Any other global (a class of a pickled `nn.Module`, `os.system`, ...) is never imported:
the pickle gets an inert `PickledObject` type in its place, which records what the pickle
hands it. A whole pickled module (`torch.save(model)`, as NetDissect-Lite's DenseNet-161
and ResNet-50 Places365 files) is then read as data: each such record with a module's
`_parameters`, `_buffers` and `_modules` becomes its state dict (`ModuleWeights`). Other
stand-ins (a training script's config object beside the weights) stay inert records;
`checkpoint_io.load_state_dict` refuses weights that hold one (`refusal_in`), naming it.
A TorchScript archive (`torch.jit.save`: OpenAI's CLIP `.pt` files) is a zip file of this
kind whose `data.pkl` holds the root module as a `__torch__.` object of its attributes: its
tensors and submodules' are read as its state dict the same way; its code is never read.
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import io
import os
import pickle
import pickletools
import struct
import zipfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np

from jaxdissect.models import torch_tensors
from jaxdissect.models.weight_file import (
    COPY_AGAIN,
    Budget,
    CheckpointError,
    UnsafeCheckpointError,
    zip_member,
)

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STATE_DICT_ADVICE = (
    "Save the weights as a state dict instead: torch.save(model.state_dict(), path)."
)
# The state torch.nn.Module pickles: a record holding these three mappings is a module.
_MODULE_FIELDS = ("_parameters", "_buffers", "_modules")
# The most classes and functions one pickle may name outside the tables (a whole model
# names tens): each costs a type, and a crafted file could name millions.
_MAX_STAND_INS = 4096


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    # A Parameter is its data here.
    del requires_grad, backward_hooks
    return data


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> Any:
    # Extra Python attributes of a Parameter are not weights.
    del requires_grad, backward_hooks, state
    return data


@dataclasses.dataclass(frozen=True)
class _TensorClass:
    """Stands in for `torch.Tensor`, named by `_rebuild_from_type_v2` as a tensor's type."""


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # A tensor pickled with Python attributes (`t.note = ...`) is its data: the attributes
    # are not weights. A subclass of Tensor (a stand-in type) is refused by its name.
    del state
    if isinstance(new_type, type) and issubclass(new_type, PickledObject):
        raise UnsafeCheckpointError(
            new_type.qualified,
            f"refusing to load {new_type.qualified}: the weights are tensors of this "
            "subclass of torch.Tensor, and unpickling them would run its code. Save plain "
            "tensors instead: {k: v.as_subclass(torch.Tensor) for k, v in state.items()}",
        )
    if not isinstance(new_type, _TensorClass):
        raise CheckpointError(f"a tensor rebuilt as {new_type!r}, not as a torch.Tensor")
    if not isinstance(func, _Callable) or not isinstance(args, tuple):
        raise CheckpointError("a tensor with attributes whose rebuild is not torch's")
    return func(*args)


# Elements the callables a pickle may call (set, frozenset, OrderedDict; an
# argparse.Namespace's state) may still copy in the current unpickling: a pickle names each
# element it holds at least once, but may hand one long list to such a call again and again
# (a few bytes a call), and the copies would then grow with the square of its length.
_COPIES_LEFT: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "_COPIES_LEFT", default=None
)


def _charge(value: Any) -> None:
    """Count the elements of `value` (a call's argument) against `_COPIES_LEFT`."""
    left = _COPIES_LEFT.get()
    if left is None:
        return
    try:
        left[0] -= len(value)
    except TypeError:  # no length: the call itself refuses it
        return
    if left[0] < 0:
        raise CheckpointError(
            "the pickle copies more elements than it holds (one container handed to a "
            "set, OrderedDict or Namespace again and again): it is crafted"
        )


def _copying(make: Callable[..., Any]) -> Callable[..., Any]:
    """`make` (a container type), each argument's elements counted first (`_charge`)."""

    def copy(*args: Any) -> Any:
        for arg in args:
            _charge(arg)
        return make(*args)

    copy.__name__ = make.__name__
    return copy


class Namespace:
    """Stands in for an `argparse.Namespace` in a checkpoint: its attributes, as data.

    Unpickling makes an empty instance and sets its attributes from the pickled dict
    (`__setstate__`); no code of the file runs.
    """

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointError(f"argparse.Namespace with state {type(state).__name__}")
        _charge(state)
        self.__dict__.update({str(k): v for k, v in state.items()})

    def __repr__(self) -> str:
        return f"Namespace({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class PickledObject:
    """Stands in for an object of a class (or a call of a function) a pickle names outside
    `ALLOWED_GLOBALS`: the arguments and state the pickle hands it, as data. The global is
    never imported; each unpickler makes one subclass per name (`qualified`, and `named`:
    its module and name)."""

    qualified: str = "?"
    named: tuple[str, str] = ("?", "?")

    def __new__(cls, *args: Any, **kwargs: Any) -> PickledObject:
        record = object.__new__(cls)
        record.args, record.state = args, None
        return record

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self.qualified}, not run>"


class ModuleWeights(collections.OrderedDict):
    """The state dict of a pickled `nn.Module` (`qualified`: its class), as `state_dict()`
    gives it: each module's parameters, then its persistent buffers, then its children's,
    keys joined with '.'. `dilated`: the convolutions the record dilates (path -> its
    `dilation`), which no state dict shows."""

    def __init__(self, qualified: str, items: Any = ()):
        super().__init__(items)
        self.qualified = qualified
        self.dilated: dict[str, Any] = {}


def _stand_in(module: str, name: str) -> type[PickledObject]:
    return type(name, (PickledObject,), {"qualified": f"{module}.{name}", "named": (module, name)})


def _stand_ins(obj: Any) -> list[type[PickledObject]]:
    """The stand-in types in `obj` (instances or the types themselves, in containers or an
    `argparse.Namespace`), each once, in the order met."""
    found: dict[type[PickledObject], None] = {}
    seen: set[int] = set()  # containers the pickle shares are walked once (`_once`)

    def walk(obj: Any) -> None:
        if isinstance(obj, Mapping | list | tuple | Namespace):
            if id(obj) in seen:
                return
            seen.add(id(obj))
        if isinstance(obj, type) and issubclass(obj, PickledObject):
            found.setdefault(obj)
        elif isinstance(obj, PickledObject):
            found.setdefault(type(obj))
        elif isinstance(obj, Mapping):
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list | tuple):
            for value in obj:
                walk(value)
        elif isinstance(obj, Namespace):
            walk(vars(obj))

    walk(obj)
    return list(found)


def stand_in_names(obj: Any) -> list[str]:
    """The classes and functions `obj` holds stand-ins of (`PickledObject`), each once."""
    return [t.qualified for t in _stand_ins(obj)]


def refusal_in(obj: Any) -> UnsafeCheckpointError | None:
    """The refusal of the first class or function `obj` holds a stand-in of: weights it
    would take code to rebuild (None: none)."""
    if not (found := _stand_ins(obj)):
        return None
    refusal = _refusal(*found[0].named)
    assert isinstance(refusal, UnsafeCheckpointError)  # storages are never stood in for
    return refusal


def _reconstructor(cls: Any, base: Any, state: Any) -> PickledObject:
    """`copyreg._reconstructor` (pickle protocols 0 and 1) for a stand-in class only."""
    del base, state  # the state comes by BUILD
    if not (isinstance(cls, type) and issubclass(cls, PickledObject)):
        raise CheckpointError(f"copyreg._reconstructor of {cls!r}")
    return cls.__new__(cls)


def _module_state(obj: Any) -> dict[str, Any] | None:
    """The state of `obj` where it is a pickled module's (holding `_MODULE_FIELDS`), else
    None."""
    state = obj.state if isinstance(obj, PickledObject) else None
    if isinstance(state, tuple) and state:  # (dict, slots) of an object with __slots__
        state = state[0]
    if isinstance(state, dict) and all(isinstance(state.get(f), Mapping) for f in _MODULE_FIELDS):
        return state
    return None


# The most module records the state dicts of one pickle's modules may visit, and characters
# their keys may hold in all (real models: thousands of modules, keys of tens of
# characters). A crafted file sharing each submodule under two names makes 2**depth visits
# (and keys) from a few kilobytes; one naming each of hundreds of nested submodules by one
# long string (pickled once) makes keys of a total length quadratic in it; one naming such
# a module under many roots makes it again for each.
_MAX_MODULE_VISITS = 2**16
_MAX_KEY_CHARS = 2**24


class _KeyCount:
    """What the state dicts of the pickled modules of one pickle have cost so far
    (`qualified`: the module whose state dict is being made)."""

    def __init__(self) -> None:
        self.qualified, self.visits, self.chars = "?", 0, 0

    def visit(self) -> None:
        self.visits += 1
        if self.visits > _MAX_MODULE_VISITS:
            raise CheckpointError(
                f"the pickled module {self.qualified} holds more than {_MAX_MODULE_VISITS} "
                "submodules (counting each shared one once per name): not a model's"
            )

    def join(self, prefix: str, name: Any) -> str:
        """`prefix` + `name`, counted."""
        name = str(name)
        self.chars += len(prefix) + len(name)
        if self.chars > _MAX_KEY_CHARS:
            raise CheckpointError(
                f"the pickled module {self.qualified} names its weights by more than "
                f"{_MAX_KEY_CHARS} characters in all: not a model's"
            )
        return prefix + name


# A convolution's `dilation` where it dilates nothing.
_UNDILATED = (None, 1, (1,), (1, 1), (1, 1, 1), [1, 1])


def _module_weights(root: PickledObject, state: dict[str, Any], keys: _KeyCount) -> ModuleWeights:
    """The state dict of the module record `root` of state `state` (`_module_state`;
    tensors not yet cut out), its cost counted in `keys`."""
    out = ModuleWeights(root.qualified)
    keys.qualified = root.qualified

    def visit(record: PickledObject, state: dict[str, Any], prefix: str, path: tuple[int, ...]):
        if id(record) in path:
            raise CheckpointError(f"the pickled module {record.qualified} contains itself")
        keys.visit()
        transient = state.get("_non_persistent_buffers_set") or ()
        dilation = state.get("dilation")
        if record.qualified.split(".")[-1].startswith("Conv") and dilation not in _UNDILATED:
            out.dilated[prefix.rstrip(".") or "(the model)"] = dilation
        entries = [*state["_parameters"].items()]
        entries += [(k, v) for k, v in state["_buffers"].items() if k not in transient]
        for name, value in entries:
            if value is None:
                continue
            if not isinstance(value, torch_tensors.TensorRef | torch_tensors.Marker):
                raise CheckpointError(
                    f"{prefix}{name} of the pickled {record.qualified} is a "
                    f"{type(value).__name__}, not a tensor"
                )
            out[keys.join(prefix, name)] = value
        for name, child in state["_modules"].items():
            if child is None:
                continue
            if (child_state := _module_state(child)) is None:
                raise CheckpointError(
                    f"submodule {prefix}{name} of the pickled {record.qualified} is a "
                    f"{type(child).__name__}, not a module"
                )
            visit(child, child_state, keys.join(prefix, name) + ".", (*path, id(record)))

    visit(root, state, "", ())
    return out


def _script_module_state(obj: Any) -> dict[str, Any] | None:
    """The attributes of `obj` where it is a TorchScript module's record (an object of a
    `__torch__.` class whose state is a dict of its attributes, `training` among them), else
    None."""
    if not isinstance(obj, PickledObject) or not obj.named[0].startswith("__torch__"):
        return None
    state = obj.state
    return state if isinstance(state, dict) and isinstance(state.get("training"), bool) else None


def _script_module_weights(
    root: PickledObject, state: dict[str, Any], keys: _KeyCount
) -> ModuleWeights:
    """The state dict of the TorchScript module record `root` (`torch.jit.save`): its tensor
    attributes (parameters and buffers), then its submodules', keys joined with '.'; other
    attributes (flags, numbers) are not weights."""
    out = ModuleWeights(root.qualified)
    keys.qualified = root.qualified

    def visit(record: PickledObject, state: dict[str, Any], prefix: str, path: tuple[int, ...]):
        if id(record) in path:
            raise CheckpointError(f"the scripted module {record.qualified} contains itself")
        keys.visit()
        children = []
        for name, value in state.items():
            if isinstance(value, torch_tensors.TensorRef | torch_tensors.Marker):
                out[keys.join(prefix, name)] = value
            elif (child_state := _script_module_state(value)) is not None:
                children.append((name, value, child_state))
        for name, child, child_state in children:
            visit(child, child_state, keys.join(prefix, name) + ".", (*path, id(record)))

    visit(root, state, "", ())
    return out


def _modules_as_weights(obj: Any) -> Any:
    """`obj` with each pickled module in it (at the top or in containers) replaced by its
    `ModuleWeights`: an `nn.Module` pickled whole, or a TorchScript module (the root of a
    `torch.jit.save` archive). Their cost is counted together (`_KeyCount`)."""
    keys = _KeyCount()

    @_once
    def walk(obj: Any) -> Any:
        if (state := _module_state(obj)) is not None:
            return _module_weights(obj, state, keys)
        if (state := _script_module_state(obj)) is not None:
            return _script_module_weights(obj, state, keys)
        return _rebuild(obj, walk)

    return walk(obj)


def _once(walk: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`walk` that makes one result per container or record (by identity), as the pickle
    shares it: a crafted pickle nesting `[x, x]` in itself n times (a few bytes each,
    memoised) would otherwise be walked, and copied, 2**n times, and a list naming one
    pickled module n times would make its state dict n times."""
    done: dict[int, Any] = {}

    def once(obj: Any) -> Any:
        if not isinstance(obj, dict | list | tuple | PickledObject):
            return walk(obj)
        if id(obj) not in done:  # `obj` stays alive in the pickle's tree: ids are not reused
            done[id(obj)] = walk(obj)
        return done[id(obj)]

    return once


def _rebuild(obj: Any, walk: Callable[[Any], Any]) -> Any:
    """A container of `obj`'s kind (`ModuleWeights`, OrderedDict, dict, list, tuple) of
    `walk` of each of its elements; anything else as it is."""
    if isinstance(obj, ModuleWeights):
        out = ModuleWeights(obj.qualified, ((k, walk(v)) for k, v in obj.items()))
        out.dilated = dict(obj.dilated)
        return out
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, walk(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: walk(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [walk(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(walk(v) for v in obj)
    return obj


class _Callable:
    """A rebuild function as one unpickler hands it out: a fresh object that calls it.

    A pickle's BUILD opcode would otherwise set attributes (`__defaults__`, ...) on the
    module's own function, changing every later load in the process.
    """

    __slots__ = ("_function", "name")

    def __init__(self, function: Callable[..., Any]):
        self._function = function
        self.name = function.__name__  # the global's, as the table names it (`_named`)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        raise CheckpointError(
            f"the pickle sets the state of {self.name}, which no torch.save "
            "file does: it is crafted"
        )


def _named(table: dict[tuple[str, str], Any]) -> dict[tuple[str, str], Any]:
    """`table` with each `_Callable` named as the global it stands for."""
    for (_, name), value in table.items():
        if isinstance(value, _Callable):
            value.name = name
    return table


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What `find_class` hands out, made anew for each unpickler (see `_Callable`)."""
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): _Callable(_copying(collections.OrderedDict)),
        ("argparse", "Namespace"): Namespace,
        ("torch._utils", "_rebuild_tensor"): _Callable(torch_tensors.rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _Callable(torch_tensors.rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): _Callable(torch_tensors.rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _Callable(_rebuild_parameter_with_state),
        # A tensor with Python attributes.
        ("torch._tensor", "_rebuild_from_type_v2"): _Callable(_rebuild_from_type_v2),
        ("torch", "Tensor"): _TensorClass(),
        # Tensors of dtypes without a typed storage keep their bytes in an untyped one.
        ("torch", "UntypedStorage"): torch_tensors.StorageType("Byte"),
        ("torch.storage", "UntypedStorage"): torch_tensors.StorageType("Byte"),
    }
    for name in torch_tensors.STORAGE_DTYPES:
        # torch.cuda.*Storage: checkpoints saved from the GPU (older CSAIL models).
        for module in ("torch", "torch.cuda"):
            table[(module, f"{name}Storage")] = torch_tensors.StorageType(name)
    for name, dtype in torch_tensors.V3_DTYPES.items():
        table[("torch", name)] = torch_tensors.DType(dtype)
    # Quantised tensors: inert markers, so that the refusal can name the tensors.
    table[("torch._utils", "_rebuild_qtensor")] = _Callable(torch_tensors.rebuild_qtensor)
    for name in torch_tensors.QUANTIZED_STORAGES:
        for module in ("torch", "torch.cuda"):
            table[(module, f"{name}Storage")] = torch_tensors.StorageType(name)
    for name in torch_tensors.QSCHEMES:
        table[("torch", name)] = torch_tensors.Marker(name)
    # Sparse and meta tensors: markers too, refused naming the tensors and what to save.
    for name in ("_rebuild_sparse_tensor", "_rebuild_sparse_csr_tensor"):
        table[("torch._utils", name)] = _Callable(torch_tensors.rebuild_sparse)
    table[("torch._utils", "_rebuild_meta_tensor_no_storage")] = _Callable(
        torch_tensors.rebuild_meta
    )
    return _named(table)


def _module_globals() -> dict[tuple[str, str], Any]:
    """What whole pickled modules name beside tensors, handed out as data or rebuilt here:
    torch 0.4's `Parameter(data, requires_grad)` is its data; a set (a module's
    `_non_persistent_buffers_set`) is a set; protocol 0 and 1 objects are stand-ins."""
    table: dict[tuple[str, str], Any] = {
        ("torch.nn.parameter", "Parameter"): _Callable(_rebuild_parameter),
        ("copyreg", "_reconstructor"): _Callable(_reconstructor),
    }
    for builtins in ("builtins", "__builtin__"):  # Python 3, Python 2
        table[(builtins, "set")] = _Callable(_copying(set))
        table[(builtins, "frozenset")] = _Callable(_copying(frozenset))
    return _named(table)


# (module, name) pairs that pickles may name; everything else is refused.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(_allowed_globals())


def _refusal(module: str, name: str) -> CheckpointError:
    qualified = f"{module}.{name}"
    if module in ("torch", "torch.cuda") and name.endswith("Storage"):
        supported = ", ".join(f"{n}Storage" for n in torch_tensors.STORAGE_DTYPES)
        return CheckpointError(f"unsupported storage type {qualified}; supported: {supported}")
    if module.startswith(("torch.nn", "__main__", "__torch__")):
        message = (
            f"refusing to load {qualified}: the file pickles it, but not as a whole "
            "nn.Module whose weights can be read as data (a damaged file? copy or download "
            "it again), and unpickling it would run code from the file. "
            f"{_STATE_DICT_ADVICE}"
        )
    elif name[:1].isupper():
        message = (
            f"refusing to load {qualified}: the file holds a pickled Python object (a whole "
            "model, or an object saved beside the weights), and unpickling it would run code "
            f"from the file. {_STATE_DICT_ADVICE}"
        )
    else:
        message = (
            f"refusing to load global {qualified}: a state dict of tensors never needs it, "
            "and calling it could run code from the file. Only tensors, storages and "
            f"OrderedDict are allowed. {_STATE_DICT_ADVICE}"
        )
    return UnsafeCheckpointError(qualified, message)


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `ALLOWED_GLOBALS` (and, for whole modules,
    `_module_globals`), hands out a `PickledObject` type for any other global, and records
    the storages it meets."""

    def __init__(self, file: BinaryIO, *, encoding: str, legacy: bool):
        super().__init__(file, encoding=encoding)
        self._table = {**_module_globals(), **_allowed_globals()}
        self._stand_ins: dict[tuple[str, str], type[PickledObject]] = {}
        self._legacy = legacy
        self.storages: dict[str, torch_tensors.Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self._table:
            return self._table[key]
        if key not in self._stand_ins:
            refusal = _refusal(module, name)
            if not isinstance(refusal, UnsafeCheckpointError):
                raise refusal
            if len(self._stand_ins) == _MAX_STAND_INS:
                raise CheckpointError(
                    f"the pickle names more than {_MAX_STAND_INS} classes and functions: "
                    "not a model's"
                )
            self._stand_ins[key] = _stand_in(module, name)
        return self._stand_ins[key]

    @property
    def refusal(self) -> UnsafeCheckpointError | None:
        """The refusal of the first global stood in for (None: none)."""
        return refusal_in(next(iter(self._stand_ins.values()), None))

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointError(f"unsupported persistent id {pid!r}")
        typename = _text(pid[0])
        if typename == "module":
            # Legacy files name a pickled module's class here, beside its source code.
            if len(pid) != 4 or not (
                isinstance(pid[1], type) and issubclass(pid[1], PickledObject)
            ):
                raise CheckpointError(f"malformed module id {pid[:2]!r}")
            return pid[1]
        if typename != "storage":
            raise CheckpointError(f"unsupported persistent id type {typename!r}")
        if self._legacy:
            if len(pid) != 6:
                raise CheckpointError(f"malformed legacy storage id {pid!r}")
            _, kind, key, _location, numel, view = pid
        else:
            if len(pid) != 5:
                raise CheckpointError(f"malformed storage id {pid!r}")
            _, kind, key, _location, numel = pid
            view = None
        if not isinstance(kind, torch_tensors.StorageType):
            raise CheckpointError(f"storage of unsupported type {kind!r}")
        key = _text(key)
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"storage {key} has a bad size {numel!r}")
        root = self.storages.setdefault(key, torch_tensors.Storage(key, kind, numel))
        if root.kind != kind or root.numel != numel:
            raise CheckpointError(f"storage {key} is described two different ways")
        if view is None:
            return root
        view_key, view_offset, view_numel = view
        if (
            not isinstance(view_offset, int)
            or not isinstance(view_numel, int)
            or view_offset < 0
            or view_numel < 0
            or view_offset + view_numel > numel
        ):
            raise CheckpointError(f"storage view {_text(view_key)} lies outside storage {key}")
        return torch_tensors.Storage(key, kind, numel, view_offset, view_numel)


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _materialize(obj: Any, arrays: Mapping[str, np.ndarray], budget: Budget) -> Any:
    """Replace every `torch_tensors.TensorRef` in nested containers by its numpy array.

    Tensors that view the same elements (one tensor the pickle names several times, or
    tied weights: views of one storage with the same offset, size, stride and dtype) are
    cut once, and every place holding one gets that array.
    """
    cut: dict[torch_tensors.TensorRef, np.ndarray] = {}  # equal refs: the same storage view

    @_once
    def walk(obj: Any) -> Any:
        if isinstance(obj, torch_tensors.TensorRef):
            if obj not in cut:
                cut[obj] = torch_tensors.cut(obj, arrays[obj.storage.key], budget)
            return cut[obj]
        if isinstance(obj, torch_tensors.Storage):
            raise CheckpointError("the file holds a bare storage, not a tensor")
        return _rebuild(obj, walk)

    return walk(obj)


# How far a memo index may run past the objects a pickle has memoised so far: picklers
# number them 0, 1, 2, ..., and CPython's unpickler grows (and zeroes) its memo to twice the
# index it is given: 16 GiB for a crafted LONG_BINPUT of 2**30, in a pickle of 9 bytes.
_MEMO_SLACK = 2**16


def _refused_opcode(file: BinaryIO) -> str | None:
    """Why the pickle is refused before the unpickler runs, where it is: its first protocol-5
    opcode (out-of-band data: `BYTEARRAY8`, `NEXT_BUFFER`, `READONLY_BUFFER`; torch.save
    writes protocol 2, and CPython's unpickler prints a SystemError on a damaged
    `BYTEARRAY8`), or a memo index far past the objects memoised before it (`_MEMO_SLACK`).
    None where there is neither before its STOP, or it cannot be read up to one (the
    unpickler names that fault). The file is left where it was."""
    start = file.tell()
    memoised = 0
    try:
        while True:
            at = file.tell() - start
            op = pickletools.code2op.get(file.read(1).decode("latin-1"))
            if op is None or op.name == "STOP":
                return None
            if op.proto >= 5:
                return (
                    f"opcode {op.name} at byte {at} (protocol 5's out-of-band data, which "
                    "weight files do not hold)"
                )
            arg = op.arg.reader(file) if op.arg is not None else None
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                if not isinstance(arg, int) or not 0 <= arg <= memoised + _MEMO_SLACK:
                    return (
                        f"opcode {op.name} at byte {at} stores object {arg!r} of its memo "
                        f"after {memoised} (no pickler numbers them so)"
                    )
                memoised += 1
            elif op.name == "MEMOIZE":
                memoised += 1
    except (ValueError, UnicodeDecodeError, OverflowError, MemoryError):
        return None  # a damaged argument: the unpickler names it
    finally:
        file.seek(start)


def _unpickle(
    file: BinaryIO, *, legacy: bool, encoding: str = "utf-8"
) -> tuple[Any, dict[str, torch_tensors.Storage]]:
    refused = _refused_opcode(file)
    if refused is not None:
        raise CheckpointError(f"corrupt or unsupported pickle: {refused}; {COPY_AGAIN}")
    unpickler = _RestrictedUnpickler(file, encoding=encoding, legacy=legacy)
    copies = _COPIES_LEFT.set([max(_pickle_bytes(file), 2**16)])
    try:
        obj = unpickler.load()
        if unpickler.refusal is not None:  # stand-ins, some of them modules perhaps
            obj = _modules_as_weights(obj)
    except (CheckpointError, UnicodeDecodeError):
        raise
    except (EOFError, pickle.UnpicklingError) as err:
        if isinstance(err, EOFError) or "truncated" in str(err):
            raise CheckpointError(f"the pickle ends early; {COPY_AGAIN}") from err
        bad = CheckpointError(f"corrupt or unsupported pickle: {err!r}")
        raise unpickler.refusal or bad from err
    except Exception as err:  # any other failure of a crafted pickle is a bad file
        # (one that names a global outside the tables: the first such, by name)
        bad = CheckpointError(f"corrupt or unsupported pickle: {err!r}")
        raise unpickler.refusal or bad from err
    finally:
        _COPIES_LEFT.reset(copies)
    return obj, unpickler.storages


def _pickle_bytes(file: BinaryIO) -> int:
    """The bytes from `file`'s position to its end (a `BytesIO` or a file on disk)."""
    if isinstance(file, io.BytesIO):
        return len(file.getbuffer()) - file.tell()
    return os.fstat(file.fileno()).st_size - file.tell()


def load_zip(path: str, encoding: str) -> Any:
    budget = Budget.of(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{path}: a zip file without exactly one <archive>/data.pkl "
                "(not a torch.save or torch.jit.save file)"
            )
        prefix = pickles[0][: -len("data.pkl")]
        big_endian = False
        if f"{prefix}byteorder" in names:
            byteorder = zip_member(archive, f"{prefix}byteorder", budget)
            big_endian = archive.read(byteorder).strip() == b"big"
        # Every member is checked before it is read: its declared size bounds what zipfile
        # unpacks, and a record of the wrong size is refused before its bytes are read.
        pickled = zip_member(archive, pickles[0], budget)
        obj, storages = _unpickle(
            io.BytesIO(archive.read(pickled)), legacy=False, encoding=encoding
        )
        torch_tensors.refuse_unread(obj, path)
        arrays = {}
        for key, storage in storages.items():
            record = f"{prefix}data/{key}"
            if record not in names:
                raise CheckpointError(f"{path}: storage record {record} is missing")
            info = zip_member(archive, record, budget)
            torch_tensors.check_storage_bytes(info.file_size, storage)
            arrays[key] = torch_tensors.storage_array(archive.read(info), storage, big_endian)
    return _materialize(obj, arrays, budget)


def load_legacy(path: str, encoding: str) -> Any:
    budget = Budget.of(path)
    with open(path, "rb") as file:
        try:
            magic, _ = _unpickle(file, legacy=True)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as err:
            raise CheckpointError(f"{path}: not a torch weight file ({err})") from err
        if magic != _LEGACY_MAGIC:
            # A bare pickle of an object: refused by the class it names, as torch.load would
            # have run it.
            raise refusal_in(magic) or CheckpointError(
                f"{path}: not a torch weight file (no legacy magic number)"
            )
        protocol, _ = _unpickle(file, legacy=True)
        if protocol != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: unsupported legacy protocol {protocol!r}")
        # The saving machine's byte order (`little_endian`) does not change the file's: torch
        # writes each storage's size and elements little-endian, and reads them so.
        _unpickle(file, legacy=True)
        obj, storages = _unpickle(file, legacy=True, encoding=encoding)
        torch_tensors.refuse_unread(obj, path)
        keys, _ = _unpickle(file, legacy=True)
        if not isinstance(keys, list):
            raise CheckpointError(f"{path}: malformed list of storage keys")
        arrays = {}
        for raw_key in keys:
            key = _text(raw_key)
            if key not in storages:
                raise CheckpointError(f"{path}: data for unknown storage {key}")
            storage = storages[key]
            header = file.read(8)
            if len(header) != 8:
                raise CheckpointError(f"{path}: ends before storage {key}; {COPY_AGAIN}")
            (numel,) = struct.unpack("<q", header)
            if numel != storage.numel:
                raise CheckpointError(
                    f"{path}: storage {key} holds {numel} elements, expected {storage.numel}"
                )
            nbytes = numel * storage.kind.dtype.itemsize
            if nbytes > budget.file_size - file.tell():  # before asking read() for them
                raise CheckpointError(f"{path}: ends inside storage {key}; {COPY_AGAIN}")
            budget.take(nbytes, f"storage {key}")
            data = file.read(nbytes)
            if len(data) != nbytes:
                raise CheckpointError(f"{path}: ends inside storage {key}; {COPY_AGAIN}")
            arrays[key] = torch_tensors.storage_array(data, storage, big_endian=False)
        missing = sorted(set(storages) - set(arrays))
        if missing:
            raise CheckpointError(f"{path}: no data for storages {missing}")
    return _materialize(obj, arrays, budget)

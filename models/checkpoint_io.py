"""Read PyTorch and safetensors weight files into numpy, without torch and without running code.

Supported files:

* zip `.pth` (torch >= 1.6): `<prefix>/data.pkl` plus one `<prefix>/data/<key>` record
  per storage and a `<prefix>/byteorder` record;
* legacy `.pth` / `.pth.tar` (torch < 1.6, or `_use_new_zipfile_serialization=False`):
  magic number, protocol version, sys info, the pickled object, the list of storage
  keys, then each storage as an element count and its raw bytes;
* `.safetensors`;
* `.npz` (numpy's zip of arrays, as big_vision writes its checkpoints), read
  with `allow_pickle=False`: `load_npz`.

Pickles are read by `_RestrictedUnpickler`, whose `find_class` hands out only
the few globals a state dict needs (`ALLOWED_GLOBALS`) and maps torch's tensor
rebuild functions to numpy ones here; an `argparse.Namespace` (a training script's
arguments, saved beside its weights) is read as an inert record of its attributes.
Any other global (a pickled `nn.Module`, `os.system`, ...) raises
`UnsafeCheckpointError` before it could run. Every error names the file.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import pickle
import stat
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import numpy as np

from jaxdissect.models.torch_import import WeightMappingError, strip_prefix

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STATE_DICT_ADVICE = (
    "Save the weights as a state dict instead: torch.save(model.state_dict(), path)."
)
# Keys under which training scripts nest the state dict (CSAIL Places365 and Lightning:
# 'state_dict'; torchvision's reference scripts and DeiT: 'model').
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_COPY_AGAIN = "it is truncated or corrupt: copy or download it again"


class CheckpointError(ValueError):
    """A weight file cannot be read (corrupt, unsupported, or not a state dict)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle asks for a global that is not needed to rebuild tensors; nothing was run."""

    def __init__(self, global_name: str, message: str):
        super().__init__(message)
        self.global_name = global_name


# Storage type name (torch.<Name>Storage) -> numpy dtype of its elements as stored.
# bfloat16 is read as raw uint16 and widened to float32 (numpy has no bfloat16).
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "Float": np.dtype(np.float32),
    "Double": np.dtype(np.float64),
    "Half": np.dtype(np.float16),
    "BFloat16": np.dtype(np.uint16),
    "Long": np.dtype(np.int64),
    "Int": np.dtype(np.int32),
    "Short": np.dtype(np.int16),
    "Char": np.dtype(np.int8),
    "Byte": np.dtype(np.uint8),
    "Bool": np.dtype(np.bool_),
    "ComplexFloat": np.dtype(np.complex64),
    "ComplexDouble": np.dtype(np.complex128),
}
# Storages of quantised tensors: named so that the file can be refused with the tensors' names.
_QUANTIZED_STORAGES = ("QInt8", "QUInt8", "QInt32", "QUInt4x2", "QUInt2x4")
_QSCHEMES = (
    "per_tensor_affine",
    "per_channel_affine",
    "per_channel_affine_float_qparams",
    "per_tensor_symmetric",
    "per_channel_symmetric",
)
_QUANTIZED_ADVICE = (
    "Quantised weights are not supported: save the float model's state dict (before "
    "quantisation), or dequantise each tensor (t.dequantize()) before torch.save."
)
# torch dtypes that `_rebuild_tensor_v3` names (it is used for dtypes without a typed storage).
_V3_DTYPES: dict[str, np.dtype] = {
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
}


# The memory reading one weight file may take (storage records, pickles and the tensors cut
# out of them, zero-stride ones at the size they expand to): this many times the file's size
# (a storage, then its tensors, bfloat16 ones widened to twice their bytes) plus this many
# bytes, so that a crafted file of a few bytes cannot ask for more.
_BUDGET_PER_FILE_BYTE = 3
_BUDGET_EXTRA_BYTES = 2**30
# More dimensions than any weight has (numpy's own limit is 64).
_MAX_RANK = 32
# Zip compression methods read: torch stores its records (ZIP_STORED), np.savez_compressed
# deflates (at most about 1000:1, and zipfile never inflates past a member's declared size).
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}


@dataclasses.dataclass
class _Budget:
    """Bytes that reading the weight file `path` may still allocate (one budget per read)."""

    path: str
    file_size: int
    used: int = 0

    @classmethod
    def of(cls, path: str) -> _Budget:
        return cls(path, os.path.getsize(path))

    @property
    def limit(self) -> int:
        return _BUDGET_PER_FILE_BYTE * self.file_size + _BUDGET_EXTRA_BYTES

    def take(self, nbytes: int, what: str) -> None:
        """Count `nbytes` about to be allocated for `what`; refuse them past the limit."""
        self.used += nbytes
        if self.used > self.limit:
            raise CheckpointError(
                f"{self.path}: {what} would take the memory read from this file to "
                f"{self.used} bytes, past the {self.limit} that any weight file of "
                f"{self.file_size} bytes needs ({_BUDGET_PER_FILE_BYTE} x its size + "
                f"{_BUDGET_EXTRA_BYTES >> 20} MiB): it is crafted or corrupt. Copy or download "
                "it again or, if it is genuine, save the weights again with torch.save(model."
                "state_dict(), path) or np.savez."
            )


def _check_shape(shape: tuple[int, ...], itemsize: int, what: str) -> None:
    """Refuse a shape numpy cannot make: more dims than a weight has, or bytes past int64.

    Zero dims count as 1: numpy refuses an empty shape whose other dims overflow.
    """
    if len(shape) > _MAX_RANK:
        raise CheckpointError(
            f"{what} has {len(shape)} dimensions, more than the {_MAX_RANK} any weight has; "
            f"{_COPY_AGAIN}"
        )
    if math.prod(max(n, 1) for n in shape) * itemsize >= 2**63:
        raise CheckpointError(f"{what} of shape {shape} is too large for any array; {_COPY_AGAIN}")


def _zip_member(archive: zipfile.ZipFile, name: str, budget: _Budget) -> zipfile.ZipInfo:
    """The entry `name` of `archive`, once its method is one read and its size fits `budget`."""
    info = archive.getinfo(name)
    if info.flag_bits & 0x1:
        raise CheckpointError(
            f"{budget.path}: member {name} is encrypted; save the file again without a password"
        )
    if info.compress_type not in _ZIP_METHODS:
        raise CheckpointError(
            f"{budget.path}: member {name} is compressed with zip method {info.compress_type}, "
            f"not one of {sorted(_ZIP_METHODS.values())}; save it again with torch.save "
            "(or np.savez), which never use another"
        )
    budget.take(info.file_size, f"member {name} ({info.file_size} bytes unpacked)")
    return info


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands in for a `torch.<Name>Storage` class named by a pickle."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return _STORAGE_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class _DType:
    """Stands in for a `torch.<dtype>` object named by a pickle (only for `_rebuild_tensor_v3`)."""

    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A storage named by a persistent id; its bytes are read once the pickle is done."""

    key: str
    kind: _StorageType
    numel: int
    # Legacy storage views: element offset and length inside the root storage `key`.
    view_offset: int = 0
    view_numel: int | None = None


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    """A tensor to cut out of a storage after the pickle is read (legacy storages come last)."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype | None = None  # _rebuild_tensor_v3: elements reinterpret a byte storage


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values held as their uint16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _as_int_tuple(values: Any, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"tensor {what} is not a tuple of ints: {values!r}") from err
    if any(v < 0 for v in out):
        raise CheckpointError(f"tensor {what} has a negative entry: {out}")
    return out


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointError(f"bad storage offset {storage_offset!r}")
    size_t, stride_t = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise CheckpointError(f"tensor size {size_t} and stride {stride_t} differ in rank")
    return _TensorRef(storage, storage_offset, size_t, stride_t)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    # requires_grad, hooks and conj/neg metadata do not change the stored values.
    del requires_grad, backward_hooks, metadata
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> _TensorRef:
    del requires_grad, backward_hooks, metadata
    if not isinstance(dtype, _DType):
        raise CheckpointError(f"_rebuild_tensor_v3 with dtype {dtype!r}")
    ref = _rebuild_tensor(storage, storage_offset, size, stride)
    return dataclasses.replace(ref, dtype=dtype.dtype)


@dataclasses.dataclass(frozen=True)
class _Marker:
    """Stands in for a torch object the pickle names only to describe a quantised tensor."""

    name: str


def _rebuild_qtensor(*args: Any) -> _Marker:
    # Nothing is rebuilt: the file is refused, naming the tensors, once the pickle is read.
    del args
    return _Marker("quantised tensor")


def _quantized_keys(obj: Any, prefix: str = "") -> list[str]:
    """Key paths of the quantised tensors in nested containers."""
    if isinstance(obj, _Marker):
        return [prefix or "<top>"]
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return []
    return [
        k for key, v in items for k in _quantized_keys(v, f"{prefix}{'.' if prefix else ''}{key}")
    ]


def _refuse_quantized(obj: Any, path: str) -> None:
    keys = _quantized_keys(obj)
    if keys:
        shown = ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        raise CheckpointError(f"{path}: quantised tensor(s) {shown}. {_QUANTIZED_ADVICE}")


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


class Namespace:
    """Stands in for an `argparse.Namespace` in a checkpoint: its attributes, as data.

    Unpickling makes an empty instance and sets its attributes from the pickled dict
    (`__setstate__`); no code of the file runs.
    """

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise CheckpointError(f"argparse.Namespace with state {type(state).__name__}")
        self.__dict__.update({str(k): v for k, v in state.items()})

    def __repr__(self) -> str:
        return f"Namespace({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


class _Callable:
    """A rebuild function as one unpickler hands it out: a fresh object that calls it.

    A pickle's BUILD opcode would otherwise set attributes (`__defaults__`, ...) on the
    module's own function, changing every later load in the process.
    """

    __slots__ = ("_function",)

    def __init__(self, function: Callable[..., Any]):
        self._function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        raise CheckpointError(
            f"the pickle sets the state of {self._function.__name__}, which no torch.save "
            "file does: it is crafted"
        )


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """What `find_class` hands out, made anew for each unpickler (see `_Callable`)."""
    table: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("argparse", "Namespace"): Namespace,
        ("torch._utils", "_rebuild_tensor"): _Callable(_rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _Callable(_rebuild_tensor_v2),
        ("torch._utils", "_rebuild_tensor_v3"): _Callable(_rebuild_tensor_v3),
        ("torch._utils", "_rebuild_parameter"): _Callable(_rebuild_parameter),
        ("torch._utils", "_rebuild_parameter_with_state"): _Callable(_rebuild_parameter_with_state),
        # Tensors of dtypes without a typed storage keep their bytes in an untyped one.
        ("torch", "UntypedStorage"): _StorageType("Byte"),
        ("torch.storage", "UntypedStorage"): _StorageType("Byte"),
    }
    for name in _STORAGE_DTYPES:
        # torch.cuda.*Storage: checkpoints saved from the GPU (older CSAIL models).
        for module in ("torch", "torch.cuda"):
            table[(module, f"{name}Storage")] = _StorageType(name)
    for name, dtype in _V3_DTYPES.items():
        table[("torch", name)] = _DType(dtype)
    # Quantised tensors: inert markers, so that the refusal can name the tensors.
    table[("torch._utils", "_rebuild_qtensor")] = _Callable(_rebuild_qtensor)
    for name in _QUANTIZED_STORAGES:
        for module in ("torch", "torch.cuda"):
            table[(module, f"{name}Storage")] = _StorageType(name)
    for name in _QSCHEMES:
        table[("torch", name)] = _Marker(name)
    return table


# (module, name) pairs that pickles may name; everything else is refused.
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(_allowed_globals())


def _refusal(module: str, name: str) -> CheckpointError:
    qualified = f"{module}.{name}"
    if module in ("torch", "torch.cuda") and name.endswith("Storage"):
        supported = ", ".join(f"{n}Storage" for n in _STORAGE_DTYPES)
        return CheckpointError(f"unsupported storage type {qualified}; supported: {supported}")
    if module.startswith(("torch.nn", "__main__", "__torch__")):
        message = (
            f"refusing to load {qualified}: the file holds a pickled object (a whole "
            "nn.Module?), not a state dict of tensors, and unpickling it would run code "
            f"from the file. {_STATE_DICT_ADVICE}"
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
    """Unpickler that resolves only `ALLOWED_GLOBALS` and records storages it meets."""

    def __init__(self, file: BinaryIO, *, encoding: str, legacy: bool):
        super().__init__(file, encoding=encoding)
        self._table = _allowed_globals()
        self._legacy = legacy
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._table[(module, name)]
        except KeyError:
            raise _refusal(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointError(f"unsupported persistent id {pid!r}")
        typename = _text(pid[0])
        if typename == "module":
            # Legacy files keep the source code of pickled modules here.
            raise UnsafeCheckpointError(
                "module",
                "refusing to load a pickled nn.Module (the file holds a whole model, not a "
                f"state dict; unpickling it would run code from the file). {_STATE_DICT_ADVICE}",
            )
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
        if not isinstance(kind, _StorageType):
            raise CheckpointError(f"storage of unsupported type {kind!r}")
        key = _text(key)
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(f"storage {key} has a bad size {numel!r}")
        root = self.storages.setdefault(key, _Storage(key, kind, numel))
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
        return _Storage(key, kind, numel, view_offset, view_numel)


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _check_storage_bytes(nbytes: int, storage: _Storage) -> None:
    """Refuse `nbytes` of data for `storage` unless they are its elements' bytes."""
    itemsize = storage.kind.dtype.itemsize
    if nbytes != storage.numel * itemsize:
        raise CheckpointError(
            f"storage {storage.key}: {nbytes} bytes for {storage.numel} elements "
            f"of {itemsize} bytes"
        )


def _storage_array(data: bytes, storage: _Storage, big_endian: bool) -> np.ndarray:
    dtype = storage.kind.dtype
    _check_storage_bytes(len(data), storage)
    array = np.frombuffer(data, dtype.newbyteorder(">" if big_endian else "<"))
    return array.astype(dtype, copy=False)


def _cut(ref: _TensorRef, flat: np.ndarray, budget: _Budget) -> np.ndarray:
    """The tensor `ref` describes, as a C-contiguous copy out of its storage's elements."""
    storage = ref.storage
    if storage.view_numel is not None:
        flat = flat[storage.view_offset : storage.view_offset + storage.view_numel]
    bf16 = storage.kind.name == "BFloat16"
    if ref.dtype is not None:
        # v3 tensors index elements of `ref.dtype` in a byte storage.
        usable = len(flat) - len(flat) % ref.dtype.itemsize
        flat = flat[:usable].view(ref.dtype)
    # Zero strides repeat elements, so the bytes made are counted, not the storage's. A
    # tensor without elements counts as if its zero dims were 1: numpy refuses a shape
    # whose other dims overflow.
    itemsize = 4 if bf16 else flat.dtype.itemsize
    _check_shape(ref.size, itemsize, f"a tensor of storage {storage.key}")
    what = f"tensor of size {ref.size}, stride {ref.stride}"
    budget.take(math.prod(max(n, 1) for n in ref.size) * itemsize, what)
    # The stride of a dim of size 1 steps nowhere: zeroed, a crafted one cannot overflow.
    stride = tuple(0 if n == 1 else s for n, s in zip(ref.size, ref.stride, strict=True))
    if any(s == 0 for s in ref.size):
        out = np.zeros(ref.size, flat.dtype)
    else:
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, stride, strict=True))
        # Checked here because as_strided would read past the buffer without complaint.
        if last >= len(flat):
            raise CheckpointError(
                f"tensor of size {ref.size}, stride {ref.stride}, offset {ref.offset} "
                f"reads past its storage {storage.key} of {len(flat)} elements"
            )
        view = np.lib.stride_tricks.as_strided(
            flat[ref.offset :],
            shape=ref.size,
            strides=tuple(s * flat.dtype.itemsize for s in stride),
            writeable=False,
        )
        out = np.array(view, copy=True, order="C")
    if bf16:
        out = widen_bfloat16(out)
    return out


def _materialize(obj: Any, arrays: Mapping[str, np.ndarray], budget: _Budget) -> Any:
    """Replace every `_TensorRef` in nested containers by its numpy array.

    Tensors that view the same elements (one tensor the pickle names several times, or
    tied weights: views of one storage with the same offset, size, stride and dtype) are
    cut once, and every place holding one gets that array.
    """
    cut: dict[_TensorRef, np.ndarray] = {}  # equal refs: the same storage view

    def walk(obj: Any) -> Any:
        if isinstance(obj, _TensorRef):
            if obj not in cut:
                cut[obj] = _cut(obj, arrays[obj.storage.key], budget)
            return cut[obj]
        if isinstance(obj, _Storage):
            raise CheckpointError("the file holds a bare storage, not a tensor")
        if isinstance(obj, collections.OrderedDict):
            return collections.OrderedDict((k, walk(v)) for k, v in obj.items())
        if isinstance(obj, dict):
            return {k: walk(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [walk(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(walk(v) for v in obj)
        return obj

    return walk(obj)


def _unpickle(
    file: BinaryIO, *, legacy: bool, encoding: str = "utf-8"
) -> tuple[Any, dict[str, _Storage]]:
    unpickler = _RestrictedUnpickler(file, encoding=encoding, legacy=legacy)
    try:
        obj = unpickler.load()
    except (CheckpointError, UnicodeDecodeError):
        raise
    except (EOFError, pickle.UnpicklingError) as err:
        if isinstance(err, pickle.UnpicklingError) and "truncated" not in str(err):
            raise CheckpointError(f"corrupt or unsupported pickle: {err!r}") from err
        raise CheckpointError(f"the pickle ends early; {_COPY_AGAIN}") from err
    except Exception as err:  # any other failure of a crafted pickle is a bad file
        raise CheckpointError(f"corrupt or unsupported pickle: {err!r}") from err
    return obj, unpickler.storages


def _load_zip(path: str, encoding: str) -> Any:
    budget = _Budget.of(path)
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{path}: a zip file without exactly one <archive>/data.pkl "
                "(not a torch.save file; TorchScript archives are not supported)"
            )
        prefix = pickles[0][: -len("data.pkl")]
        big_endian = False
        if f"{prefix}byteorder" in names:
            byteorder = _zip_member(archive, f"{prefix}byteorder", budget)
            big_endian = archive.read(byteorder).strip() == b"big"
        # Every member is checked before it is read: its declared size bounds what zipfile
        # unpacks, and a record of the wrong size is refused before its bytes are read.
        pickled = _zip_member(archive, pickles[0], budget)
        obj, storages = _unpickle(
            io.BytesIO(archive.read(pickled)), legacy=False, encoding=encoding
        )
        _refuse_quantized(obj, path)
        arrays = {}
        for key, storage in storages.items():
            record = f"{prefix}data/{key}"
            if record not in names:
                raise CheckpointError(f"{path}: storage record {record} is missing")
            info = _zip_member(archive, record, budget)
            _check_storage_bytes(info.file_size, storage)
            arrays[key] = _storage_array(archive.read(info), storage, big_endian)
    return _materialize(obj, arrays, budget)


def _load_legacy(path: str, encoding: str) -> Any:
    budget = _Budget.of(path)
    with open(path, "rb") as file:
        try:
            magic, _ = _unpickle(file, legacy=True)
        except UnsafeCheckpointError:
            raise
        except CheckpointError as err:
            raise CheckpointError(f"{path}: not a torch weight file ({err})") from err
        if magic != _LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a torch weight file (no legacy magic number)")
        protocol, _ = _unpickle(file, legacy=True)
        if protocol != _LEGACY_PROTOCOL:
            raise CheckpointError(f"{path}: unsupported legacy protocol {protocol!r}")
        sys_info, _ = _unpickle(file, legacy=True)
        big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
        obj, storages = _unpickle(file, legacy=True, encoding=encoding)
        _refuse_quantized(obj, path)
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
                raise CheckpointError(f"{path}: ends before storage {key}; {_COPY_AGAIN}")
            (numel,) = struct.unpack(">q" if big_endian else "<q", header)
            if numel != storage.numel:
                raise CheckpointError(
                    f"{path}: storage {key} holds {numel} elements, expected {storage.numel}"
                )
            nbytes = numel * storage.kind.dtype.itemsize
            if nbytes > budget.file_size - file.tell():  # before asking read() for them
                raise CheckpointError(f"{path}: ends inside storage {key}; {_COPY_AGAIN}")
            budget.take(nbytes, f"storage {key}")
            data = file.read(nbytes)
            if len(data) != nbytes:
                raise CheckpointError(f"{path}: ends inside storage {key}; {_COPY_AGAIN}")
            arrays[key] = _storage_array(data, storage, big_endian)
        missing = sorted(set(storages) - set(arrays))
        if missing:
            raise CheckpointError(f"{path}: no data for storages {missing}")
    return _materialize(obj, arrays, budget)


def _is_safetensors(path: str) -> bool:
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as file:
        head = file.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 1 << 30


# safetensors dtypes that numpy holds (bfloat16 through ml_dtypes); FP8, FP4, ... are not read.
_SAFETENSORS_DTYPES = frozenset(
    [
        "F64",
        "F32",
        "F16",
        "BF16",
        "I64",
        "U64",
        "I32",
        "U32",
        "I16",
        "U16",
        "I8",
        "U8",
        "BOOL",
        "C64",
    ]
)


def _unread_safetensors_dtypes(path: str) -> dict[str, list[str]]:
    """Dtype -> tensors of it in a `.safetensors` header, for dtypes numpy does not hold."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(min(length, os.path.getsize(path))))
        dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, struct.error, TypeError, KeyError, AttributeError):
        return {}
    unread: dict[str, list[str]] = {}
    for key, dtype in dtypes.items():
        if dtype not in _SAFETENSORS_DTYPES:
            unread.setdefault(str(dtype), []).append(key)
    return unread


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, ValueError, TypeError, AttributeError, KeyError) as err:
        unread = _unread_safetensors_dtypes(path)
        if unread:
            shown = "; ".join(
                f"{dtype} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})"
                for dtype, keys in unread.items()
            )
            raise CheckpointError(
                f"{path}: tensors of a dtype numpy cannot hold: {shown}. Save the weights as "
                "float32, float16 or bfloat16 (e.g. dequantise FP8 ones)."
            ) from None
        raise CheckpointError(
            f"{path}: not a readable .safetensors file ({err}); {_COPY_AGAIN} "
            "(or re-export it with safetensors' save_file)."
        ) from None
    # bfloat16 comes back as ml_dtypes.bfloat16, which most numpy code cannot use.
    return {
        k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in tensors.items()
    }


def _named(err: CheckpointError, path: str) -> CheckpointError:
    """`err` with its message starting with `path` (errors met inside a pickle lack it)."""
    if str(err).startswith(f"{path}: "):
        return err
    if isinstance(err, UnsafeCheckpointError):
        return UnsafeCheckpointError(err.global_name, f"{path}: {err}")
    return CheckpointError(f"{path}: {err}")


def _check_readable(path: str) -> None:
    """Refuse a missing path, a directory, what is no regular file (a FIFO or a device:
    reading would block or never end) and a file this process may not open (permissions),
    before any read of it counts an OSError as damage."""
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise CheckpointError(f"{path}: is a directory, not a weight file")
        if not stat.S_ISREG(mode):
            raise CheckpointError(
                f"{path}: not a regular file (a FIFO, socket or device: reading it could "
                "block or never end); give the weight file itself"
            )
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as err:
        raise CheckpointError(
            f"{path}: cannot be opened ({err.strerror or type(err).__name__}); check that "
            "this user may read it"
        ) from None


def load_checkpoint(path: str | os.PathLike[str]) -> Any:
    """Everything a torch or safetensors weight file holds, tensors as numpy arrays.

    Unlike `load_state_dict`, wrappers such as `{'epoch': ..., 'state_dict': ...}`
    are returned as they are; an `argparse.Namespace` comes back as a `Namespace`.

    Raises:
      UnsafeCheckpointError: the pickle names a global outside `ALLOWED_GLOBALS`.
      CheckpointError: the file is missing, not a readable weight file, truncated or
        corrupt (each message starts with the path).
    """
    path = os.fspath(path)
    _check_readable(path)
    if _is_safetensors(path):
        return _load_safetensors(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: is empty; copy or download it again")
    with open(path, "rb") as file:
        zip_header = file.read(4) == b"PK\x03\x04"
    try:
        is_zip = zipfile.is_zipfile(path)
    except zipfile.BadZipFile as err:  # an end record zipfile refuses (a multi-disk one)
        raise CheckpointError(f"{path}: {_COPY_AGAIN} ({err})") from None
    if zip_header and not is_zip:  # a zip's directory is at its end: the end is missing
        raise CheckpointError(f"{path}: a zip file without its directory; {_COPY_AGAIN}")
    loader: Callable[[str, str], Any] = _load_zip if is_zip else _load_legacy
    try:
        try:
            return loader(path, "utf-8")
        except UnicodeDecodeError:
            # Python 2 pickles hold byte strings; torch's own advice for them is latin1.
            return loader(path, "latin1")
    except RecursionError as err:  # a crafted self-referential container
        raise CheckpointError(f"{path}: nested too deeply to be a state dict") from err
    except CheckpointError as err:
        raise _named(err, path) from None
    # A record's bytes fail their CRC, the zip's offsets point outside the file, or its
    # entries ask for a zip version zipfile does not read (NotImplementedError).
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as err:
        raise CheckpointError(f"{path}: {_COPY_AGAIN} ({err})") from None
    except (  # crafted contents that reach past the checks above
        KeyError,
        AttributeError,
        TypeError,
        ValueError,
        OverflowError,
        IndexError,
        RuntimeError,
        MemoryError,
    ) as err:
        raise CheckpointError(
            f"{path}: not a state dict this reader takes ({type(err).__name__}: {err})"
        ) from err


def _state_dict_of(obj: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    """The state dict in `obj`: itself, or the one mapping under a `WRAPPER_KEYS` key."""
    if all(isinstance(v, np.ndarray) for v in obj.values()):
        return obj
    wrapped = [k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    if len(wrapped) > 1:
        raise CheckpointError(
            f"{path}: weights under several keys {wrapped}; save the ones to dissect alone: "
            f"torch.save(checkpoint[{wrapped[0]!r}], path)"
        )
    if wrapped:
        return obj[wrapped[0]]
    return obj


def load_state_dict(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The state dict in a weight file: torch key -> numpy array.

    Unwraps training checkpoints that keep it under one of `WRAPPER_KEYS`
    (`{'epoch': ..., 'state_dict': ..., 'args': Namespace(...)}`; several such keys are
    refused), strips a DataParallel `module.` prefix, and widens bfloat16 to float32.

    Raises:
      UnsafeCheckpointError: the file would need code to load (e.g. a whole pickled model).
      CheckpointError: the file is unreadable or holds no state dict.
    """
    path = os.fspath(path)
    obj = load_checkpoint(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    obj = _state_dict_of(obj, path)
    not_arrays = [
        f"{k}: {type(v).__name__}" for k, v in obj.items() if not isinstance(v, np.ndarray)
    ]
    if not_arrays:
        shown = ", ".join(not_arrays[:5]) + (", ..." if len(not_arrays) > 5 else "")
        raise CheckpointError(
            f"{path}: not a state dict of tensors; {len(not_arrays)} entries are not tensors "
            f"({shown}). A wrapped checkpoint should keep its weights under one of "
            f"{WRAPPER_KEYS}."
        )
    try:
        return strip_prefix({str(k): v for k, v in obj.items()})
    except WeightMappingError as err:
        raise CheckpointError(f"{path}: {err}") from None


def _npz_member_header(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: str
) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) that the `.npy` member `info` declares, once they fit its size."""
    name = info.filename
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(member)
            else:
                raise ValueError(f".npy format version {version} (read: 1.0, 2.0)")
        except (ValueError, SyntaxError, tokenize.TokenError) as err:  # numpy parses the text
            raise CheckpointError(
                f"{path}: member {name} has no readable .npy header ({err}); {_COPY_AGAIN}"
            ) from None
        header_bytes = member.tell()
    if dtype.hasobject:
        raise CheckpointError(
            f"{path}: member {name} holds pickled objects ({dtype}); only numeric arrays are "
            "read. Save the parameters as numeric arrays: np.savez(path, **flat_params)."
        )
    if dtype.names is not None or dtype.subdtype is not None:
        raise CheckpointError(
            f"{path}: member {name} holds records of dtype {dtype}, not numbers; save each "
            "field as its own array: np.savez(path, **flat_params)."
        )
    _check_shape(shape, dtype.itemsize, f"{path}: member {name}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != info.file_size - header_bytes:
        raise CheckpointError(
            f"{path}: member {name} declares shape {shape} of {dtype} ({nbytes} bytes) but "
            f"holds {info.file_size - header_bytes} bytes; {_COPY_AGAIN}"
        )
    return shape, dtype


def _check_npz(path: str) -> None:
    """Refuse a file `np.load` would misread, or fill past `_Budget`, before it reads it."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a weight file")
    with open(path, "rb") as file:
        head = file.read(6)
    if not zipfile.is_zipfile(path):
        if head == b"\x93NUMPY":
            raise CheckpointError(
                f"{path}: holds one array (np.save), not a .npz of arrays: np.savez(path, **params)"
            )
        # A zip's directory is at its end: with the header but no directory, the end is cut.
        cut = head[:4] == b"PK\x03\x04"
        raise CheckpointError(
            f"{path}: not a readable .npz file ({'a zip without its directory' if cut else 'not a zip'}"
            f"); {_COPY_AGAIN}, or save it with np.savez(path, **flat_params)"
        )
    budget = _Budget.of(path)
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                torch_file = info.filename.endswith("data.pkl")
                raise CheckpointError(
                    f"{path}: member {info.filename} is not a .npy array, so this is not a .npz "
                    "of arrays"
                    + (
                        " (it is a torch.save file: name it .pth)"
                        if torch_file
                        else "; save only the parameters: np.savez(path, **flat_params)"
                    )
                )
            _zip_member(archive, info.filename, budget)
            _, dtype = _npz_member_header(archive, info, path)
            if dtype.kind == "V" and dtype.itemsize == 2:  # widened to float32 below
                budget.take(2 * info.file_size, f"member {info.filename} as float32")


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of a `.npz` file by key (big_vision: `/`-joined parameter paths).

    Read with `allow_pickle=False`: an object array is refused, never unpickled. Every
    member's `.npy` header is checked against its size first (`_check_npz`).
    bfloat16 arrays (stored by big_vision as 2-byte voids) are widened to float32.

    Raises:
      CheckpointError: the file is not a readable `.npz` of numeric arrays.
    """
    path = os.fspath(path)
    _check_readable(path)
    try:
        _check_npz(path)
        with np.load(path, allow_pickle=False) as data:
            arrays = {str(k): data[k] for k in data.files}
    except CheckpointError:
        raise
    except (  # NotImplementedError: zipfile's, of a version or compression it does not read
        ValueError,
        OSError,
        zipfile.BadZipFile,
        EOFError,
        zlib.error,
        MemoryError,
        NotImplementedError,
    ) as err:
        raise CheckpointError(f"{path}: not a readable .npz file ({err}); {_COPY_AGAIN}") from None
    return {
        k: widen_bfloat16(v.view(np.uint16)) if v.dtype.kind == "V" and v.dtype.itemsize == 2 else v
        for k, v in arrays.items()
    }

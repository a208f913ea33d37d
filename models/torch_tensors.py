"""The tensors of a torch pickle: stand-ins for the storage types and dtypes it names, the
references its rebuild functions make (a storage, offset, size and stride), markers of
quantised tensors, and each tensor cut out of its storage's elements once those are read.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdissect.models.weight_file import (
    MAX_RANK,
    Budget,
    CheckpointError,
    check_shape,
    widen_bfloat16,
)

# Storage type name (torch.<Name>Storage) -> numpy dtype of its elements as stored.
# bfloat16 is read as raw uint16 and widened to float32 (numpy has no bfloat16).
STORAGE_DTYPES: dict[str, np.dtype] = {
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
QUANTIZED_STORAGES = ("QInt8", "QUInt8", "QInt32", "QUInt4x2", "QUInt2x4")
QSCHEMES = (
    "per_tensor_affine",
    "per_channel_affine",
    "per_channel_affine_float_qparams",
    "per_tensor_symmetric",
    "per_channel_symmetric",
)
QUANTIZED_ADVICE = (
    "Quantised weights are not supported: save the float model's state dict (before "
    "quantisation), or dequantise each tensor (t.dequantize()) before torch.save."
)
# torch dtypes that `rebuild_tensor_v3` names (it is used for dtypes without a typed storage).
V3_DTYPES: dict[str, np.dtype] = {
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
}


class _Sealed:
    """A stand-in the unpickler makes: a pickle's BUILD opcode, which would write its
    attributes (a frozen dataclass's too) after they were checked, is refused."""

    def __setstate__(self, state: Any) -> None:
        raise CheckpointError(
            f"the pickle sets the state of a {type(self).__name__}, which no torch.save "
            "file does: it is crafted"
        )


@dataclasses.dataclass(frozen=True)
class StorageType(_Sealed):
    """Stands in for a `torch.<Name>Storage` class named by a pickle."""

    name: str

    @property
    def dtype(self) -> np.dtype:
        return STORAGE_DTYPES[self.name]


@dataclasses.dataclass(frozen=True)
class DType(_Sealed):
    """Stands in for a `torch.<dtype>` object named by a pickle (only for `rebuild_tensor_v3`)."""

    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class Storage(_Sealed):
    """A storage named by a persistent id; its bytes are read once the pickle is done."""

    key: str
    kind: StorageType
    numel: int
    # Legacy storage views: element offset and length inside the root storage `key`.
    view_offset: int = 0
    view_numel: int | None = None


@dataclasses.dataclass(frozen=True)
class TensorRef(_Sealed):
    """A tensor to cut out of a storage after the pickle is read (legacy storages come last)."""

    storage: Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: np.dtype | None = None  # rebuild_tensor_v3: elements reinterpret a byte storage
    # torch's lazy conjugate and negative views (`c.conj()`, `c.conj().imag`): the stored
    # elements are the tensor's conjugated or negated.
    conj: bool = False
    neg: bool = False


def _as_int_tuple(values: Any, what: str) -> tuple[int, ...]:
    try:
        rank = len(values)
    except TypeError as err:
        raise CheckpointError(f"tensor {what} is not a tuple of ints: {values!r}") from err
    if rank > MAX_RANK:  # before a copy: a pickle may hand one long list to every tensor
        raise CheckpointError(
            f"tensor {what} has {rank} dimensions, more than the {MAX_RANK} any weight has"
        )
    try:
        out = tuple(int(v) for v in values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"tensor {what} is not a tuple of ints: {values!r}") from err
    if any(v < 0 for v in out):
        raise CheckpointError(f"tensor {what} has a negative entry: {out}")
    return out


def rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> TensorRef:
    if not isinstance(storage, Storage):
        raise CheckpointError(f"tensor rebuilt from {type(storage).__name__}, not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointError(f"bad storage offset {storage_offset!r}")
    size_t, stride_t = _as_int_tuple(size, "size"), _as_int_tuple(stride, "stride")
    if len(size_t) != len(stride_t):
        raise CheckpointError(f"tensor size {size_t} and stride {stride_t} differ in rank")
    return TensorRef(storage, storage_offset, size_t, stride_t)


def _with_metadata(ref: TensorRef, metadata: Any) -> TensorRef:
    """`ref` with the conj and neg bits of torch's tensor `metadata` (`{'neg': True}`)."""
    if not metadata:
        return ref
    if not isinstance(metadata, Mapping):
        raise CheckpointError(
            f"tensor metadata of type {type(metadata).__name__}: only conj and neg bits are read"
        )
    if len(metadata) > 2 or not {*metadata} <= {"conj", "neg"}:  # by length before a copy
        shown = ", ".join(repr(k)[:40] for k in list(metadata)[:3])
        raise CheckpointError(
            f"tensor metadata of {len(metadata)} keys ({shown}): only conj and neg bits are read"
        )
    return dataclasses.replace(
        ref, conj=metadata.get("conj") is True, neg=metadata.get("neg") is True
    )


def rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorRef:
    # requires_grad and hooks do not change the values; conj/neg bits do.
    del requires_grad, backward_hooks
    return _with_metadata(rebuild_tensor(storage, storage_offset, size, stride), metadata)


def rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> TensorRef:
    del requires_grad, backward_hooks
    if isinstance(dtype, type) and isinstance(getattr(dtype, "qualified", None), str):
        # A dtype outside `V3_DTYPES` (torch.float8_e4m3fn, torch.complex32): its stand-in
        # type (`torch_file.PickledObject`), never imported. Refused naming the tensors.
        return Marker(f"tensor of dtype {dtype.qualified}")
    if not isinstance(dtype, DType):
        raise CheckpointError(f"rebuild_tensor_v3 with dtype {dtype!r}")
    ref = rebuild_tensor(storage, storage_offset, size, stride)
    return _with_metadata(dataclasses.replace(ref, dtype=dtype.dtype), metadata)


@dataclasses.dataclass(frozen=True)
class Marker(_Sealed):
    """Stands in for a tensor this reader does not make (`name`: what it is; `UNREAD`), or a
    torch object the pickle names only to describe a quantised tensor (a qscheme)."""

    name: str


def rebuild_qtensor(*args: Any) -> Marker:
    # Nothing is rebuilt: the file is refused, naming the tensors, once the pickle is read.
    del args
    return Marker("quantised tensor")


def rebuild_sparse(*args: Any) -> Marker:
    del args
    return Marker("sparse tensor")


def rebuild_meta(*args: Any) -> Marker:
    del args
    return Marker("meta tensor")


# Kinds of tensors made as `Marker`s -> what to do about them (dtypes: `UNREAD_DTYPE_ADVICE`).
UNREAD = {
    "quantised tensor": QUANTIZED_ADVICE,
    "sparse tensor": (
        "Sparse weights are not read: save them dense, {k: v.to_dense() for k, v in "
        "state.items()}, before torch.save."
    ),
    "meta tensor": (
        "Tensors on the meta device hold no values: save the state dict of a model whose "
        "weights were loaded or trained."
    ),
}
UNREAD_DTYPE_ADVICE = (
    "numpy holds no such dtype: save the weights as float32, float16 or bfloat16 (e.g. "
    "v.float() for each tensor)."
)


def _marker_keys(
    obj: Any, path: tuple[str, ...] = (), seen: set[int] | None = None
) -> list[tuple[tuple[str, ...], str]]:
    """(key path as a tuple of keys, `Marker.name`) of each marker in nested containers. A
    container the pickle shares is walked once, at its first path (nested in itself n times
    it would be 2**n); paths are joined only to be shown (`_dotted`: a chain of containers
    keyed by one long string would make joined paths of a total length quadratic in it)."""
    seen = set() if seen is None else seen
    if isinstance(obj, Marker):
        return [(path, obj.name)]
    if isinstance(obj, Mapping | list | tuple):
        if id(obj) in seen:
            return []
        seen.add(id(obj))
    if isinstance(obj, Mapping):
        items = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return []
    return [k for key, v in items for k in _marker_keys(v, (*path, str(key)), seen)]


def _dotted(path: tuple[str, ...], most: int = 200) -> str:
    """`path` joined with '.', cut after about `most` characters ('<top>' where empty)."""
    out, length = [], 0
    for part in path:
        if length + len(part) > most:
            return ".".join([*out, part[: max(most - length, 0)]]) + "..."
        out.append(part)
        length += len(part) + 1
    return ".".join(out) or "<top>"


def refuse_unread(obj: Any, path: str) -> None:
    """Refuse `obj` where it holds tensors made as `Marker`s, naming those of the first kind
    met (a qscheme met alone counts as a quantised tensor) and what to do about them."""
    found = [(p, "quantised tensor" if name in QSCHEMES else name) for p, name in _marker_keys(obj)]
    if not found:
        return
    kind = found[0][1]
    keys = [p for p, name in found if name == kind]
    shown = ", ".join(map(_dotted, keys[:5]))
    shown += f" ... ({len(keys)} in all)" if len(keys) > 5 else ""
    if kind in UNREAD:
        raise CheckpointError(f"{path}: {kind}(s) {shown}. {UNREAD[kind]}")
    what = kind.removeprefix("tensor of dtype ")
    raise CheckpointError(f"{path}: tensor(s) {shown} of dtype {what}: {UNREAD_DTYPE_ADVICE}")


def check_storage_bytes(nbytes: int, storage: Storage) -> None:
    """Refuse `nbytes` of data for `storage` unless they are its elements' bytes."""
    itemsize = storage.kind.dtype.itemsize
    if nbytes != storage.numel * itemsize:
        raise CheckpointError(
            f"storage {storage.key}: {nbytes} bytes for {storage.numel} elements "
            f"of {itemsize} bytes"
        )


def storage_array(data: bytes, storage: Storage, big_endian: bool) -> np.ndarray:
    dtype = storage.kind.dtype
    check_storage_bytes(len(data), storage)
    array = np.frombuffer(data, dtype.newbyteorder(">" if big_endian else "<"))
    return array.astype(dtype, copy=False)


def cut(ref: TensorRef, flat: np.ndarray, budget: Budget) -> np.ndarray:
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
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0  # noqa: E731
    if not (
        whole(ref.offset)
        and all(map(whole, (*ref.size, *ref.stride)))
        and len(ref.size) == len(ref.stride)
    ):  # checked when rebuilt; again here, where a wrong one would read outside the buffer
        raise CheckpointError(
            f"tensor of storage {storage.key}: offset {ref.offset!r}, size {ref.size!r}, "
            f"stride {ref.stride!r} are not whole numbers >= 0 of one rank"
        )
    check_shape(ref.size, itemsize, f"a tensor of storage {storage.key}")
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
    if ref.conj:
        np.conjugate(out, out=out)
    if ref.neg:
        np.negative(out, out=out)
    return out

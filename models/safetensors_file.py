"""`.safetensors` files read into numpy (bfloat16 widened to float32)."""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from jaxdissect.models.weight_file import COPY_AGAIN, CheckpointError


def is_safetensors(path: str) -> bool:
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


def load_safetensors(path: str) -> dict[str, np.ndarray]:
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
            f"{path}: not a readable .safetensors file ({err}); {COPY_AGAIN} "
            "(or re-export it with safetensors' save_file)."
        ) from None
    # bfloat16 comes back as ml_dtypes.bfloat16, which most numpy code cannot use.
    return {
        k: v.astype(np.float32) if v.dtype.name == "bfloat16" else v for k, v in tensors.items()
    }

"""What every reader of a weight file shares: its errors, the memory budget of one read,
and the checks of a path, a declared shape and a zip member made before they are read."""

from __future__ import annotations

import dataclasses
import math
import os
import stat
import zipfile

import numpy as np

COPY_AGAIN = "it is truncated or corrupt: copy or download it again"


class CheckpointError(ValueError):
    """A weight file cannot be read (corrupt, unsupported, or not a state dict)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle asks for a global that is not needed to rebuild tensors; nothing was run."""

    def __init__(self, global_name: str, message: str):
        super().__init__(message)
        self.global_name = global_name


# The memory reading one weight file may take (storage records, pickles and the tensors cut
# out of them, zero-stride ones at the size they expand to): this many times the file's size
# (a storage, then its tensors, bfloat16 ones widened to twice their bytes) plus this many
# bytes, so that a crafted file of a few bytes cannot ask for more.
_BUDGET_PER_FILE_BYTE = 3
_BUDGET_EXTRA_BYTES = 2**30
# More dimensions than any weight has (numpy's own limit is 64).
MAX_RANK = 32
# Zip compression methods read: torch stores its records (ZIP_STORED), np.savez_compressed
# deflates (at most about 1000:1, and zipfile never inflates past a member's declared size).
_ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}


@dataclasses.dataclass
class Budget:
    """Bytes that reading the weight file `path` may still allocate (one budget per read)."""

    path: str
    file_size: int
    used: int = 0

    @classmethod
    def of(cls, path: str) -> Budget:
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


def check_shape(shape: tuple[int, ...], itemsize: int, what: str) -> None:
    """Refuse a shape numpy cannot make: more dims than a weight has, or bytes past int64.

    Zero dims count as 1: numpy refuses an empty shape whose other dims overflow.
    """
    if len(shape) > MAX_RANK:
        raise CheckpointError(
            f"{what} has {len(shape)} dimensions, more than the {MAX_RANK} any weight has; "
            f"{COPY_AGAIN}"
        )
    if math.prod(max(n, 1) for n in shape) * itemsize >= 2**63:
        raise CheckpointError(f"{what} of shape {shape} is too large for any array; {COPY_AGAIN}")


def zip_member(archive: zipfile.ZipFile, name: str, budget: Budget) -> zipfile.ZipInfo:
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


def widen_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 values held as their uint16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def check_readable(path: str) -> None:
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

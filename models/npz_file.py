"""`.npz` files (numpy's zip of arrays, as big_vision writes its checkpoints) read with
`allow_pickle=False`, every member's header checked against its size first."""

from __future__ import annotations

import math
import os
import tokenize
import zipfile
import zlib

import numpy as np

from jaxdissect.models.weight_file import (
    COPY_AGAIN,
    Budget,
    CheckpointError,
    check_readable,
    check_shape,
    widen_bfloat16,
    zip_member,
)


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
                f"{path}: member {name} has no readable .npy header ({err}); {COPY_AGAIN}"
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
    if not all(type(n) is int and n >= 0 for n in shape):  # numpy's parser takes -1, True
        raise CheckpointError(
            f"{path}: member {name} declares shape {shape}, not of whole numbers >= 0; {COPY_AGAIN}"
        )
    check_shape(shape, dtype.itemsize, f"{path}: member {name}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != info.file_size - header_bytes:
        raise CheckpointError(
            f"{path}: member {name} declares shape {shape} of {dtype} ({nbytes} bytes) but "
            f"holds {info.file_size - header_bytes} bytes; {COPY_AGAIN}"
        )
    return shape, dtype


def _check_npz(path: str) -> None:
    """Refuse a file `np.load` would misread, or fill past `Budget`, before it reads it."""
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
            f"); {COPY_AGAIN}, or save it with np.savez(path, **flat_params)"
        )
    budget = Budget.of(path)
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
            zip_member(archive, info.filename, budget)
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
    check_readable(path)
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
        raise CheckpointError(f"{path}: not a readable .npz file ({err}); {COPY_AGAIN}") from None
    return {
        k: widen_bfloat16(v.view(np.uint16)) if v.dtype.kind == "V" and v.dtype.itemsize == 2 else v
        for k, v in arrays.items()
    }

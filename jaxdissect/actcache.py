"""Pass-1 activations kept for pass 2, so the network runs once where memory allows.

Activations are stored per batch, exactly as pass 1 saw them (already rounded
to the run's `activation_dtype`, a 16-bit type by default), so pass 2 gives the
same counts whether it reads the cache or runs the network again. Where a
batch is missing (e.g. a run resumed after a kill lost its in-memory cache),
pass 2 recomputes it.

Kinds: `device` (accelerator memory), `host` (numpy in RAM), `disk` (.npy files
under the run's work dir, written with pwrite and read through a memmap), `none`.
`auto` picks the first that fits.

A disk cache outlives a killed run; beside its files, `rows-p<process>.json` records the
batches [lo, hi) they hold and each batch's CRC-32 per layer, written after the rows are
flushed. A resumed run keeps only what that record vouches for (another run, of another
cache kind, may have stopped between the files' creation and today) and only if every
batch it keeps still has its recorded CRC (a file changed on disk is started afresh: pass 2
then runs the network again); a record that is missing or unreadable vouches for nothing.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pathlib
import threading
import zlib
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging

from jaxdissect import store

KINDS = ("auto", "device", "host", "disk", "none")


def copy_local_rows(x: jax.Array, out: np.ndarray) -> None:
    """Copy this process's rows of `x`, sharded on its leading axis, into `out`, shard by
    shard."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    base, filled = shards[0].index[0].start or 0, 0
    for s in shards:
        start = (s.index[0].start or 0) - base
        if start == filled:  # else a replica of a row block already copied
            data = np.asarray(s.data)
            out[start : start + len(data)] = data
            filled += len(data)
    if filled != len(out):
        raise ValueError(f"this process's {filled} rows of {x.shape} do not fill {out.shape}")


def _page_in(arrays: list[np.ndarray]) -> None:
    """Write every page of `arrays` once (numpy releases the GIL while it does)."""
    for arr in arrays:
        arr[...] = 0


def available_host_bytes() -> int:
    """Host memory free now (0 where unknown), within the container's memory limit where a
    cgroup sets one."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0
    limited = cgroup_free_bytes()
    return free if limited is None else min(free, limited)


def cgroup_free_bytes(root: pathlib.Path = pathlib.Path("/sys/fs/cgroup")) -> int | None:
    """What this process's cgroup may still use: its memory limit less its usage, the page
    cache it could drop (inactive files) not counted as used; None without a limit.
    cgroup v2 (`memory.max`) or v1 (`memory/memory.limit_in_bytes`)."""
    for limit_file, usage_file, stat_file, inactive in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        (
            "memory/memory.limit_in_bytes",
            "memory/memory.usage_in_bytes",
            "memory/memory.stat",
            "total_inactive_file",
        ),
    ):
        try:
            limit = (root / limit_file).read_text(encoding="utf-8").strip()
            usage = int((root / usage_file).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 1 << 60:  # v1: ~2**63
            return None
        try:
            stats = dict(
                line.split() for line in (root / stat_file).read_text(encoding="utf-8").splitlines()
            )
            usage -= min(usage, int(stats.get(inactive, 0)))
        except (OSError, ValueError):
            pass
        return max(0, int(limit) - usage)
    return None


def _available_device_bytes() -> int:
    dev = jax.local_devices()[0]
    if dev.platform == "cpu":
        return 0  # device memory is host memory: prefer the numpy cache
    stats = dev.memory_stats() or {}
    return (
        int(stats.get("bytes_limit", 0) - stats.get("bytes_in_use", 0)) * jax.local_device_count()
    )


def choose_kind(
    requested: str,
    needed_bytes: int,
    work_dir: pathlib.Path | None,
    budget_bytes: int | None = None,
) -> str:
    """Resolve `auto` to the first kind whose memory holds `needed_bytes` with room to spare."""
    if requested not in KINDS:
        raise ValueError(f"activation_cache={requested!r}; allowed: {', '.join(KINDS)}")
    if requested != "auto":
        if requested == "disk" and work_dir is None:
            raise ValueError("activation_cache='disk' needs an output directory")
        return requested
    if budget_bytes is not None:
        return "host" if needed_bytes <= budget_bytes else ("disk" if work_dir else "none")
    if needed_bytes * 2 < _available_device_bytes():
        return "device"
    if needed_bytes * 2 < available_host_bytes():
        return "host"
    if work_dir is not None:
        free = os.statvfs(work_dir).f_bavail * os.statvfs(work_dir).f_frsize
        if needed_bytes * 1.2 < free:
            return "disk"
    return "none"


class NoRoom(OSError):
    """The disk under a disk cache cannot hold its files (ENOSPC or EDQUOT)."""


def _check_room(directory: pathlib.Path, paths: list[pathlib.Path]) -> None:
    """Raise `NoRoom` unless the disk holds what the (sparse) files `paths` still need, so
    that a run without room keeps no cache rather than stop when the disk fills. (Checked,
    not reserved: glibc's `posix_fallocate` writes every block where a filesystem, NFS
    among them, cannot allocate; a disk filled by another writer during the run makes a
    row's write an ENOSPC.)"""
    sizes = [p.stat() for p in paths]
    needed = sum(max(0, st.st_size - st.st_blocks * 512) for st in sizes)
    stats = os.statvfs(directory)
    if needed > stats.f_bavail * stats.f_frsize:
        raise NoRoom(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))


def _process_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """This process's files of a disk cache: the layers' arrays and their rows' record."""
    p = jax.process_index()
    return [*sorted(directory.glob(f"layer*-p{p}.npy")), _rows_file(directory)]


def _rows_file(directory: pathlib.Path) -> pathlib.Path:
    return directory / f"rows-p{jax.process_index()}.json"


def _recorded_rows(
    directory: pathlib.Path, num_layers: int
) -> tuple[int, int, list[list[int]]] | None:
    """(lo, hi, CRC-32 of each batch's rows per layer) of the batches [lo, hi) this
    process's disk-cache files hold, as last recorded; None where no record vouches."""
    try:
        doc = json.loads(_rows_file(directory).read_text(encoding="utf-8"))
        lo, hi = int(doc["lo"]), int(doc["hi"])
        crcs = [[int(c) for c in batch] for batch in doc["crc32"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not 0 <= lo <= hi or len(crcs) != hi - lo or any(len(c) != num_layers for c in crcs):
        return None
    return lo, hi, crcs


def _row_bytes(rows: np.ndarray) -> memoryview:
    """`rows`' bytes (bfloat16 has no buffer format of its own: read as bytes)."""
    return memoryview(np.ascontiguousarray(rows).reshape(-1).view(np.uint8))


def _rows_crc(rows: np.ndarray) -> int:
    return zlib.crc32(_row_bytes(rows))


def _file_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a disk-cache file stores `dtype` as: itself where a .npy header names it,
    else unsigned integers of its width (bfloat16's header would read back as void, which
    does not cast to it); the file is read back viewed as `dtype`."""
    descr = np.lib.format.dtype_to_descr(dtype)
    return dtype if np.lib.format.descr_to_dtype(descr) == dtype else np.dtype(f"u{dtype.itemsize}")


def _holds(path: pathlib.Path, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether `path` is a disk-cache file of `shape` and `dtype` (a `_file_dtype`); one of
    another process count or batch split under the same key, or with a damaged header, is
    deleted."""
    if not path.exists():
        return False
    try:
        arr = np.lib.format.open_memmap(path, mode="r")
    except (OSError, ValueError) as e:
        logging.warning("activation cache %s is unreadable (%s): starting it afresh", path, e)
    else:
        if arr.shape == shape and arr.dtype == dtype:
            return True
        logging.info(
            "activation cache %s holds %s %s, not %s %s: starting it afresh",
            *(path, arr.shape, arr.dtype, shape, dtype),
        )
        del arr
    path.unlink()
    return False


def _write_at(file: io.FileIO, rows: np.ndarray, offset: int) -> None:
    """Write `rows`' bytes at `offset` of `file` (pwrite may write part at a time); an
    error names the file."""
    data = _row_bytes(rows)
    try:
        while data:
            written = os.pwrite(file.fileno(), data, offset)
            data, offset = data[written:], offset + written
    except OSError as e:
        raise OSError(e.errno, e.strerror, file.name) from None


def remove_files(directory: pathlib.Path | None) -> None:
    """Delete this process's disk-cache files in `directory`, and the folder once empty
    (other processes remove their own)."""
    if directory is None or not directory.is_dir():
        return
    for path in _process_files(directory):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # other processes' files are still there
        directory.rmdir()


class ActivationCache:
    """Per-batch activations of several layers; batches [lo, hi) are present."""

    def __init__(
        self,
        kind: str,
        shapes: Mapping[str, tuple[int, int, int]],
        num_batches: int,
        local_batch: int,
        dtype: np.dtype,
        directory: pathlib.Path | None = None,
    ):
        self.kind = kind
        self.directory = directory if kind == "disk" else None
        self.num_batches, self.local_batch = num_batches, local_batch
        self.dtype = np.dtype(dtype)
        self.lo = self.hi = 0
        self._written: tuple[int, int] | None = None  # a disk cache's batches on disk
        self._crcs: dict[int, list[int]] = {}  # a disk cache's batches' CRCs, per layer
        self._device: dict[int, dict[str, jax.Array]] = {}
        self._arrays: dict[str, np.ndarray] = {}
        self._files: dict[str, io.FileIO] = {}  # a disk cache's files, for writing rows
        self._paging: threading.Thread | None = None
        if kind == "disk":
            directory.mkdir(parents=True, exist_ok=True)
            recorded = _recorded_rows(directory, len(shapes))
            if recorded is not None:
                lo, hi, crcs = recorded
                self._written = (lo, hi)
                self._crcs = dict(zip(range(lo, hi), crcs, strict=True))
        if kind == "host":
            for layer, shape in shapes.items():
                self._arrays[layer] = np.empty((num_batches * local_batch, *shape), self.dtype)
        if kind == "disk":
            for i, (layer, shape) in enumerate(shapes.items()):
                path = directory / f"layer{i}-p{jax.process_index()}.npy"
                full = (num_batches * local_batch, *shape)
                stored = _file_dtype(self.dtype)
                if not _holds(path, full, stored):
                    self._written = None  # a new file holds nothing yet
                    np.lib.format.open_memmap(path, mode="w+", dtype=stored, shape=full)
                # Rows are read through the map and written with pwrite: a write the disk
                # cannot hold is then an ENOSPC, where a write through the map is a SIGBUS.
                array = np.lib.format.open_memmap(path, mode="r")
                self._arrays[layer] = array.view(self.dtype)
                self._files[layer] = io.FileIO(str(path), "r+")
        if kind == "disk":
            try:
                _check_room(directory, _process_files(directory)[:-1])
            except NoRoom:
                self.clear()
                raise
        if kind == "host":
            # The first write to fresh memory is where filling the cache costs (the kernel,
            # or a VM's host, maps the pages): done here on a thread, while pass 1 starts.
            arrays = list(self._arrays.values())
            self._paging = threading.Thread(target=_page_in, args=(arrays,), daemon=True)
            self._paging.start()

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def host_bytes(self) -> int:
        """Host memory the cache's arrays take (a disk cache's are files)."""
        return sum(a.nbytes for a in self._arrays.values()) if self.kind == "host" else 0

    def resume_at(self, batch: int) -> None:
        """Pass 1 (re)starts at `batch`: a disk cache keeps the batches before it that its
        record vouches for, [lo, batch) (rows are flushed and recorded before each
        checkpoint) if they still have their recorded CRCs; memory caches start empty."""
        written = self._written
        if (
            self.kind == "disk"
            and written is not None
            and written[0] <= batch <= written[1]
            and self._intact(range(written[0], batch))
        ):
            self.lo, self.hi = written[0], batch
        else:
            self.lo = self.hi = batch
            self._device.clear()
        self._crcs = {b: c for b, c in self._crcs.items() if self.lo <= b < self.hi}
        self._record()  # rows from `batch` on are rewritten: no longer vouched for

    def _intact(self, batches: range) -> bool:
        """Whether the files' rows of `batches` have the CRCs recorded for them."""
        for b in batches:
            rows = slice(b * self.local_batch, (b + 1) * self.local_batch)
            if [_rows_crc(arr[rows]) for arr in self._arrays.values()] != self._crcs.get(b):
                logging.warning(
                    "activation cache %s: batch %d's rows are not those it recorded (changed "
                    "on disk); starting the cache afresh",
                    self.directory,
                    b,
                )
                return False
        return True

    def _paged_in(self) -> None:
        """Wait for the arrays' pages to be written once (before any row is)."""
        if self._paging is not None:
            self._paging.join()
            self._paging = None

    def put(self, batch: int, acts: Mapping[str, jax.Array]) -> None:
        if not self.enabled:
            return
        self._paged_in()
        assert batch == self.hi, (batch, self.hi)
        if self.kind == "device":
            self._device[batch] = dict(acts)
        else:
            rows = slice(batch * self.local_batch, (batch + 1) * self.local_batch)
            if self.kind == "host":
                for layer, x in acts.items():
                    copy_local_rows(x, self._arrays[layer][rows])
            else:
                crcs = []
                for layer, x in acts.items():
                    arr = self._arrays[layer]
                    buf = np.empty((self.local_batch, *arr.shape[1:]), arr.dtype)
                    copy_local_rows(x, buf)
                    offset = arr.offset + rows.start * buf[0].nbytes
                    _write_at(self._files[layer], buf, offset)
                    crcs.append(_rows_crc(buf))
                self._crcs[batch] = crcs
        self.hi = batch + 1

    def flush(self) -> None:
        """Write a disk cache's rows to its files, then record the batches they hold."""
        for file in self._files.values():
            os.fsync(file.fileno())
        self._record()

    def _record(self) -> None:
        if self.kind == "disk" and self.directory is not None:
            crcs = [self._crcs[b] for b in range(self.lo, self.hi)]
            store.write_json(
                _rows_file(self.directory), {"lo": self.lo, "hi": self.hi, "crc32": crcs}
            )
            self._written = (self.lo, self.hi)

    def has(self, batch: int) -> bool:
        return self.enabled and self.lo <= batch < self.hi

    def get(self, batch: int) -> dict[str, jax.Array] | dict[str, np.ndarray]:
        """Device arrays (device kind) or this process's numpy rows (host, disk)."""
        if self.kind == "device":
            return self._device[batch]
        self._paged_in()
        rows = slice(batch * self.local_batch, (batch + 1) * self.local_batch)
        return {layer: arr[rows] for layer, arr in self._arrays.items()}

    def clear(self) -> None:
        self._paged_in()
        self._device.clear()
        self._arrays.clear()
        for file in self._files.values():
            file.close()
        self._files.clear()
        self._crcs.clear()
        self.lo = self.hi = 0

    def discard(self) -> None:
        """`clear`, and a disk cache's files deleted: for a cache nothing will read again."""
        self.clear()
        remove_files(self.directory)

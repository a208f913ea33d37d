"""The files a data set reads: checked before they are opened, and fingerprinted.

`DatasetFiles.stat` refuses, with the file and where it is listed, what would
hang or read data from elsewhere: a FIFO, socket, device or directory in place
of a file, and a symlink (of the file or of a folder above it) that resolves
outside the data set's folder. `Fingerprint` hashes the files a run reads, by
size, modification and status-change time (`stat`, the default: one `lstat` a file)
or by content (`content`: every byte read and hashed), so that stage caches keyed on
it notice any added, removed or modified file. The status-change time (ctime) moves
with every write and every `touch`, and cannot be set back: an edit is seen even when
the file's size and mtime are restored; a copy of the files is new data to it (moving
the folder is not).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import stat
from collections.abc import Sequence

DATA_HASHES = ("stat", "content")

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def check_data_hash(data_hash: str) -> None:
    """Raises ValueError naming `data_hash` unless it is one of `DATA_HASHES`."""
    if data_hash not in DATA_HASHES:
        raise ValueError(f"data_hash={data_hash!r}: use one of {', '.join(DATA_HASHES)}")


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def regular_file_error(
    path: str | os.PathLike[str], mode: int, where: str | None, what: str
) -> str:
    """The message refusing `path` (listed at `where`, where one lists it) whose `st_mode` is
    not a regular file."""
    listed = f" (listed at {where})" if where else ""
    return (
        f"{os.fspath(path)}: {what} is {_kind(mode)}, not a regular file{listed}; "
        "reading it could hang or read something else. Replace it by the data set's file."
    )


def check_regular(
    path: str | os.PathLike[str], where: str | None, what: str, error: type[Exception]
) -> None:
    """Raises `error` if `path` exists and is not a regular file (one `stat`, no open).

    A missing or unreadable path passes: opening it reports that.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise error(regular_file_error(path, mode, where, what))


class DatasetFiles:
    """Stats files under a data set's folder, refusing those that would read elsewhere or hang.

    Attributes:
      root: the folder (as given); symlinks inside it must resolve inside its real path.
    """

    def __init__(self, root: str | os.PathLike[str], error: type[Exception]):
        self.root = os.fspath(root)
        self._real_root = os.path.realpath(self.root)
        self._error = error
        # Folder path -> its real path, or None when that is inside the root.
        self._escaping_dirs: dict[str, str | None] = {}

    def _inside(self, real: str) -> bool:
        return real == self._real_root or real.startswith(self._real_root.rstrip(os.sep) + os.sep)

    def _escape(self, path: str, real: str, where: str, what: str) -> Exception:
        return self._error(
            f"{path}: {what} resolves to {real}, outside the dataset folder {self.root} "
            f"(a symlink; listed at {where}); copy the file into the dataset folder instead."
        )

    def stat(self, path: str, where: str, what: str) -> os.stat_result:
        """The `stat` of regular file `path` (listed at `where`), following inside symlinks."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise self._error(
                f"{path}: {what} not found (listed at {where}); the images/ folder is "
                "incomplete, re-extract the dataset."
            ) from None
        except OSError as e:
            raise self._error(
                f"{path}: cannot read {what} ({e}; listed at {where}); check its permissions."
            ) from None
        parent = os.path.dirname(path)
        if parent not in self._escaping_dirs:
            real = os.path.realpath(parent)
            self._escaping_dirs[parent] = None if self._inside(real) else real
        escaped = self._escaping_dirs[parent]
        if escaped is not None:
            raise self._escape(path, os.path.join(escaped, os.path.basename(path)), where, what)
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            if not self._inside(real):
                raise self._escape(path, real, where, what)
            try:
                st = os.stat(path)
            except OSError as e:
                raise self._error(
                    f"{path}: {what} is a symlink to {real}, which cannot be read ({e}; listed "
                    f"at {where}); restore the file."
                ) from None
        if not stat.S_ISREG(st.st_mode):
            raise self._error(regular_file_error(path, st.st_mode, where, what))
        return st


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tables_hash(files: Sequence[tuple[str, bytes]]) -> str:
    """Hex sha256 of a Broden folder's CSV files (name, bytes): equal for its copies and
    for a TFDS build of it, whatever their paths or file times."""
    digest = hashlib.sha256(b"jaxdissect-broden-tables-v1\0")
    for name, raw in files:
        digest.update(f"{name}\0{len(raw)}\0".encode())
        digest.update(raw)
    return digest.hexdigest()


def probe_identity(tables: str | None, split: str, count: int) -> str | None:
    """What a probe set is, independent of where and how it is stored: its tables' hash,
    split and number of images (the first `count` of the split, in index order); None
    where the tables are not known."""
    if tables is None:
        return None
    return hashlib.sha256(f"{tables}\0{split}\0{count}".encode()).hexdigest()


class Fingerprint:
    """A sha256 over named byte strings and files, the files by stat or by content."""

    def __init__(self, tag: str, data_hash: str = "stat"):
        check_data_hash(data_hash)
        self.data_hash = data_hash
        self._digest = hashlib.sha256(f"{tag}\0data_hash={data_hash}\0".encode())

    def add_bytes(self, name: str, data: bytes) -> None:
        self._digest.update(f"{name}\0{len(data)}\0".encode())
        self._digest.update(data)

    def add_file(self, name: str, path: str | os.PathLike[str], st: os.stat_result) -> None:
        """Adds file `path` under `name` (a path relative to the data set: moving it is free)."""
        if self.data_hash == "stat":
            stamp = f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
            self._digest.update(f"{name}\0{stamp}\n".encode())
        else:
            self._digest.update(f"{name}\0{file_sha256(path)}\n".encode())

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def add_folder_files(digest: Fingerprint, folder: str | os.PathLike[str], where: str) -> None:
    """Adds every file directly in `folder` (a TFDS build: its shards and JSON files) to
    `digest`, by name; `where` says in errors what the folder is."""
    tree = DatasetFiles(folder, ValueError)
    for path in sorted(p for p in pathlib.Path(folder).iterdir() if not p.is_dir()):
        digest.add_file(path.name, path, tree.stat(os.fspath(path), where, "build file"))

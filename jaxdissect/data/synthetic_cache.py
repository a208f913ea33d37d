"""The cached synthetic Broden (`--data=synthetic`): generated once, checked on every reuse.

When `ensure` generates the set, it records the set's fingerprint (`Broden.fingerprint`
of all its rows: the CSV tables and every file they list) by `stat` and by `content` in
`CACHE_RECORD` inside the folder. A reuse checks synthetic.json against this generator
(name, version, size, image count, seed), then the stat fingerprint (one `lstat` a file),
and only where that moved (a copy, a `touch`) the content one, which is the only check
under `data_hash="content"`. A set that fails any check (an edited, missing or added
listed file, another generator version, no record) is generated again, with one line
saying why. Runs sharing the cache hold a lock while they check or generate: one
generates, the others then read that set; folders left by a killed generation are
removed.
"""

from __future__ import annotations

import fcntl
import json
import pathlib
import shutil

from absl import logging

from jaxdissect import store
from jaxdissect.data.broden import Broden
from jaxdissect.data.broden_tables import BrodenFormatError
from jaxdissect.data.files import DATA_HASHES, check_data_hash

CACHE_RECORD = "cache_record.json"
# Bumped when what `CACHE_RECORD` holds changes.
RECORD_FORMAT = 1


def _fingerprint(root: pathlib.Path, data_hash: str) -> str:
    return Broden.open(root, data_hash=data_hash, check_headers=False).fingerprint()


def _expected(num_images: int, size: int, seed: int) -> dict[str, object]:
    """synthetic.json's fields as this generator writes them."""
    from jaxdissect.data.synthetic.writer import GENERATOR, GENERATOR_VERSION

    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "num_images": num_images,
        "size": size,
        "seed": seed,
    }


def stale(root: pathlib.Path, *, num_images: int, size: int, seed: int, data_hash: str) -> str:
    """Why the set at `root` is not the one this generator writes ('' when it is)."""
    try:
        info = json.loads((root / "synthetic.json").read_text(encoding="utf-8"))
        record = json.loads((root / CACHE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"it has no readable synthetic.json and {CACHE_RECORD}"
    expected = _expected(num_images, size, seed)
    made = info if isinstance(info, dict) else {}
    differ = [k for k, v in expected.items() if made.get(k) != v]
    if differ:
        said = ", ".join(f"{k}={made.get(k)!r}" for k in differ)
        wanted = ", ".join(f"{k}={expected[k]!r}" for k in differ)
        return f"its synthetic.json says {said}, this generator writes {wanted}"
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        return f"its {CACHE_RECORD} is of another format"
    try:
        if data_hash == "stat" and _fingerprint(root, "stat") == record.get("stat"):
            return ""
        if _fingerprint(root, "content") != record.get("content"):
            return "its files differ from those generated"
        if data_hash == "stat":  # the same bytes with new times (a copy): remember them
            record["stat"] = _fingerprint(root, "stat")
            store.write_json(root / CACHE_RECORD, record)
    except (BrodenFormatError, OSError, ValueError) as e:
        return str(e).splitlines()[0]
    return ""


def _remove_leftovers(root: pathlib.Path) -> None:
    """Removes the temporary folders of a generation of `root` that was killed."""
    for pattern in (f".{root.name}.partial-*", f".{root.name}.old-*"):
        for path in root.parent.glob(pattern):
            logging.info("removing %s, left by a generation that did not finish", path)
            shutil.rmtree(path, ignore_errors=True)


def ensure(
    root: str | pathlib.Path,
    *,
    num_images: int,
    size: int,
    seed: int = 0,
    data_hash: str = "stat",
) -> pathlib.Path:
    """The synthetic Broden at `root`, generated (and its fingerprints recorded) unless
    the one there passes the checks (`stale`, by `data_hash`)."""
    from jaxdissect.data import synthetic

    check_data_hash(data_hash)
    root = pathlib.Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _remove_leftovers(root)
        if (root / "index.csv").exists():
            why = stale(root, num_images=num_images, size=size, seed=seed, data_hash=data_hash)
            if not why:
                return root
            logging.warning("%s: %s; generating it again", root, why)
        elif root.exists():
            logging.warning("%s: no index.csv (a set not finished); generating it again", root)
        print(
            f"Generating a synthetic Broden ({num_images} images at {size}) in {root} (once) ...",
            flush=True,
        )
        try:
            synthetic.generate(
                root, num_images=num_images, size=size, seed=seed, overwrite=root.exists()
            )
        except OSError as e:
            if e.filename is None:  # PIL's and numpy's writes name no file: the set's folder
                raise OSError(e.errno, e.strerror, str(root)) from e
            raise
        record = {"format": RECORD_FORMAT, **{h: _fingerprint(root, h) for h in DATA_HASHES}}
        store.write_json(root / CACHE_RECORD, record)
    return root

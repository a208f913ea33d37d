"""What `Broden.open` costs: CSVs alone, plus the fingerprint walk (stat or content), plus headers.

  python benchmarks/bench_open.py --data /tmp/synth10k   # a folder from make_synthetic_broden.py

Each configuration is opened `--repeats` times (the page cache warm after the
first) and the best and median wall times are printed, with the files walked.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import refuse_below  # the benchmarks folder: sys.path[0]

from jaxdissect.data import broden_images  # noqa: E402
from jaxdissect.data.broden import Broden  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a Broden folder")
    p.add_argument("--repeats", type=int, default=3)
    return p.parse_args(argv)


def _time(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    refuse_below({"repeats": args.repeats})
    try:
        ds = Broden.open(args.data, check_headers=False)
    except (ValueError, OSError) as e:  # its message names the folder
        raise SystemExit(f"error: --data: {e}") from None
    files = sum(len(broden_images.record_files(ds.labels, r)) for r in ds.records)
    size = sum((ds.root / broden_images.IMAGES_DIR / p).stat().st_size
               for r in ds.records for p, _ in broden_images.record_files(ds.labels, r))  # fmt: skip
    print(f"{args.data}: {len(ds)} images, {files} files, {size / 2**20:.0f} MiB")

    walk = broden_images.walk_files
    try:
        broden_images.walk_files = lambda *a, **k: None  # the CSVs alone
        base = _time(lambda: Broden.open(args.data, check_headers=False), args.repeats)
    finally:
        broden_images.walk_files = walk
    print(f"  CSVs only (no walk)        best {base[0]:6.2f} s  median {base[1]:6.2f} s")
    with tempfile.TemporaryDirectory(prefix="bench_open_memo_") as memo:  # removed at the end
        Broden.open(args.data, header_memo=memo)  # the scan passes once and is remembered
        for label, kwargs in (
            ("stat", {"data_hash": "stat", "check_headers": False}),
            ("stat + headers (default)", {"data_hash": "stat", "check_headers": True}),
            ("stat + headers, memo warm", {"data_hash": "stat", "header_memo": memo}),
            ("content", {"data_hash": "content", "check_headers": False}),
            ("content + headers", {"data_hash": "content", "check_headers": True}),
        ):
            best, median = _time(lambda kw=kwargs: Broden.open(args.data, **kw), args.repeats)
            print(
                f"  {label:26s} best {best:6.2f} s  median {median:6.2f} s  "
                f"(+{(best - base[0]) / files * 1e6:5.1f} us a file over the CSVs)"
            )


if __name__ == "__main__":
    main()

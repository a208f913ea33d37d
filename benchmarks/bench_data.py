"""Loader throughput from a Broden folder and from its TFDS build, and the build time.

Generates a synthetic Broden once into `--cache_dir` (reused on later runs),
builds its TFDS array_record files (timed; `--reuse_build` skips it), then
times full in-order passes of `loader.batches` over each source:

    .venv/bin/python benchmarks/bench_data.py --num_images 1024 --threads 1,2 --workers 2

Both sources are read from the page cache after the first pass (warm-up), so
the figures measure decoding and assembly, not disk. `--reads` also times what
each pass of the engine reads: pass 1 the images alone, pass 2 (with the
activation cache) the label maps alone, so that pass 2's loading cost next to
pass 1's is known where loading, not the network, limits the speed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from _common import (  # the benchmarks folder: sys.path[0]
    refuse_below,
    refuse_unknown,
    whole_numbers,
)
from absl import flags

from jaxdissect import engine
from jaxdissect.data import loader, synthetic, tfds_broden
from jaxdissect.data.broden import Broden


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cache_dir",
        default=os.path.join(os.path.expanduser("~"), ".cache", "jaxdissect", "bench_data"),
        help="where the synthetic Broden and its TFDS build are kept",
    )
    p.add_argument("--num_images", type=int, default=1024)
    p.add_argument("--size", type=int, default=224, help="image size S (segmentations S/2)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--threads", default="1,2", help="comma-separated loader thread counts")
    p.add_argument("--workers", default="", help="comma-separated loader process counts (e.g. 2,8)")
    p.add_argument("--repeats", type=int, default=2, help="timed passes per setting (best kept)")
    p.add_argument("--reuse_build", action="store_true", help="do not rebuild the TFDS files")
    p.add_argument(
        "--reads",
        default="all,images,labels",
        help="what to read: all (the loader), images (pass 1), labels (pass 2 with a cache)",
    )
    return _checked(p.parse_args(argv))


_READS = ("all", "images", "labels")


def _checked(args: argparse.Namespace) -> argparse.Namespace:
    """`args`, or one line naming the flag at fault (an unknown --reads timed a pass that
    read nothing; a bad count was a traceback)."""
    refuse_below({n: getattr(args, n) for n in ("num_images", "size", "batch_size", "repeats")})
    refuse_unknown("reads", args.reads.split(",") if args.reads else [], _READS)
    if args.threads or not args.workers:  # empty beside --workers: no thread-based loader
        whole_numbers("threads", args.threads, 0)
    if args.workers:  # empty: no process-based loader
        whole_numbers("workers", args.workers)
    return args


def dataset_dir(cache_dir: Path, num_images: int, size: int) -> Path:
    """The synthetic Broden of this size, generated on first use."""
    out = cache_dir / f"broden1_{size}_n{num_images}"
    if not (out / "index.csv").is_file():
        t0 = time.perf_counter()
        synthetic.generate(out, num_images=num_images, size=size, seed=0, overwrite=True)
        print(f"generated {num_images} synthetic images in {time.perf_counter() - t0:.1f} s")
    return out


def time_pass(source: loader.Source, batch_size: int, threads: int, workers: int = 0):
    """(seconds of a full in-order pass of `loader.batches`, seconds to its first batch)."""
    t0 = time.perf_counter()
    n, first = 0, None
    for batch in loader.batches(source, batch_size, num_threads=threads, num_workers=workers):
        n += int(batch["valid"].sum())
        first = first or time.perf_counter() - t0
    elapsed = time.perf_counter() - t0
    assert n == len(source), (n, len(source))
    return elapsed, first


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read an absl flag.
    cache_dir = Path(args.cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    root = dataset_dir(cache_dir, args.num_images, args.size)
    data_dir = cache_dir / f"tfds_{args.size}_{args.num_images}"

    if args.reuse_build and tfds_broden_exists(data_dir):
        build_s = None
    else:
        t0 = time.perf_counter()
        tfds_broden.build(root, data_dir, overwrite=True)
        build_s = time.perf_counter() - t0

    sources = {
        "folder": Broden.open(root),
        "tfds": tfds_broden.TfdsBroden(data_dir),
    }
    n = len(sources["folder"])
    decoders = [("threads", int(t)) for t in args.threads.split(",") if t]
    decoders += [("workers", int(w)) for w in args.workers.split(",") if w]
    print(
        f"\n{n} images {args.size}x{args.size}, batch {args.batch_size}, "
        f"P={sources['folder'].max_planes}, Q={sources['folder'].max_image_labels}, "
        f"{os.cpu_count()} CPUs"
    )
    if build_s is not None:
        size_mb = sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file()) / 1e6
        print(f"TFDS build: {build_s:.1f} s ({n / build_s:.0f} images/s), {size_mb:.0f} MB")
    print(f"{'source':8} {'reads':>7} {'decoders':>10} {'images/s':>9} {'s/pass':>7} {'1st s':>6}")
    for name, source in sources.items():
        time_pass(source, args.batch_size, 2)  # Warm-up: page cache, imports.
        for reads in args.reads.split(","):
            if reads == "all":
                view = source
            else:
                view = engine.Fields(source, images=reads == "images", labels=reads == "labels")
            for kind, count in decoders:
                kw = (
                    {"threads": count, "workers": 0}
                    if kind == "threads"
                    else {"threads": 0, "workers": count}
                )
                best, first = min(
                    time_pass(view, args.batch_size, **kw) for _ in range(args.repeats)
                )
                label = f"{count} {kind[0]}"
                print(f"{name:8} {reads:>7} {label:>10} {n / best:9.0f} {best:7.2f} {first:6.2f}")
    sys.stdout.flush()


def tfds_broden_exists(data_dir: Path) -> bool:
    try:
        tfds_broden.find_build(data_dir)
    except (FileNotFoundError, ValueError):
        return False
    return True


if __name__ == "__main__":
    main()

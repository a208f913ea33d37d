"""Loader throughput from a Broden folder and from its TFDS build, and the build time.

Generates a synthetic Broden once into `--cache_dir` (reused on later runs),
builds its TFDS array_record files (timed; `--reuse_build` skips it), then
times full in-order passes of `loader.batches` over each source:

    .venv/bin/python benchmarks/bench_data.py --num_images 1024 --threads 1,2

Both sources are read from the page cache after the first pass (warm-up), so
the figures measure decoding and assembly, not disk.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

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
    p.add_argument("--repeats", type=int, default=2, help="timed passes per setting (best kept)")
    p.add_argument("--reuse_build", action="store_true", help="do not rebuild the TFDS files")
    return p.parse_args(argv)


def dataset_dir(cache_dir: Path, num_images: int, size: int) -> Path:
    """The synthetic Broden of this size, generated on first use."""
    out = cache_dir / f"broden1_{size}_n{num_images}"
    if not (out / "index.csv").is_file():
        t0 = time.perf_counter()
        synthetic.generate(out, num_images=num_images, size=size, seed=0, overwrite=True)
        print(f"generated {num_images} synthetic images in {time.perf_counter() - t0:.1f} s")
    return out


def time_pass(source: loader.Source, batch_size: int, threads: int) -> float:
    """Seconds for one full in-order pass of `loader.batches` over `source`."""
    t0 = time.perf_counter()
    n = 0
    for batch in loader.batches(source, batch_size, num_threads=threads):
        n += int(batch["valid"].sum())
    elapsed = time.perf_counter() - t0
    assert n == len(source), (n, len(source))
    return elapsed


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
    threads = [int(t) for t in args.threads.split(",")]
    print(
        f"\n{n} images {args.size}x{args.size}, batch {args.batch_size}, "
        f"P={sources['folder'].max_planes}, Q={sources['folder'].max_image_labels}, "
        f"{os.cpu_count()} CPUs"
    )
    if build_s is not None:
        size_mb = sum(f.stat().st_size for f in data_dir.rglob("*") if f.is_file()) / 1e6
        print(f"TFDS build: {build_s:.1f} s ({n / build_s:.0f} images/s), {size_mb:.0f} MB")
    print(f"{'source':8} {'threads':>7} {'images/s':>9} {'s/pass':>7}")
    for name, source in sources.items():
        time_pass(source, args.batch_size, max(threads))  # Warm-up: page cache, imports.
        for t in threads:
            best = min(time_pass(source, args.batch_size, t) for _ in range(args.repeats))
            print(f"{name:8} {t:7d} {n / best:9.0f} {best:7.2f}")
    sys.stdout.flush()


def tfds_broden_exists(data_dir: Path) -> bool:
    try:
        tfds_broden.find_build(data_dir)
    except (FileNotFoundError, ValueError):
        return False
    return True


if __name__ == "__main__":
    main()

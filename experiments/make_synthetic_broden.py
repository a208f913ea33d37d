"""Writes a synthetic Broden (real on-disk format) for tests and experiments.

Example:
  .venv/bin/python experiments/make_synthetic_broden.py \
      --out_dir=/tmp/synthetic_broden_224 --num_images=2000 --size=224 --workers=2
"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging

from jaxdissect import cli
from jaxdissect.data import synthetic

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Dataset folder to create.", required=True)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 2000, "Number of images (70% train, 30% val).")
_SIZE = flags.DEFINE_integer("size", 224, "Image side; segmentations are size // 2.")
_SEED = flags.DEFINE_integer("seed", 0, "Everything is a function of (seed, image index).")
_WORKERS = flags.DEFINE_integer(
    "workers", 0, "Worker processes; 0 = all cores. The output does not depend on it."
)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out_dir.")
for _flag in (_OUT_DIR, _NUM_IMAGES, _SIZE, _SEED, _OVERWRITE):  # `generate`'s errors name them
    flags.FLAGS[_flag.name].field_name = _flag.name
_TINY = flags.DEFINE_bool(
    "tiny",
    False,
    f"Tiny set for tests: {synthetic.TINY['num_images']} images at "
    f"{synthetic.TINY['size']} (instead of --num_images and --size).",
)


def run() -> None:
    num_images, size = _NUM_IMAGES.value, _SIZE.value
    if _TINY.value:
        why = "--tiny sets the number of images and the size; leave one of them out"
        cli.refuse_given(flags.FLAGS, ("num_images", "size"), why)  # (overridden before)
        num_images, size = synthetic.TINY["num_images"], synthetic.TINY["size"]
    if _WORKERS.value < 0:  # 0 is the library's None
        raise ValueError(f"--workers={_WORKERS.value}: must be >= 1, or 0 for all cores")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - last[0] > 5:
            last[0] = now
            logging.info("%d / %d images", done, total)

    start = time.perf_counter()
    out = synthetic.generate(
        _OUT_DIR.value,
        num_images=num_images,
        size=size,
        seed=_SEED.value,
        workers=_WORKERS.value or None,
        overwrite=_OVERWRITE.value,
        progress=progress,
    )
    seconds = time.perf_counter() - start
    print(
        f"wrote {out}: {num_images} images at {size} in {seconds:.1f} s "
        f"({num_images / seconds:.1f} images/s)",
        file=sys.stdout,
    )


main = cli.script_main(run, runs_jax=False)

if __name__ == "__main__":
    app.run(main)

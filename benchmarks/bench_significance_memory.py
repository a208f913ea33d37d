r"""Peak memory of the permutation test on packed masks, above the masks themselves.

Random masks of --num_images images (--pixels pixels, --units units, --concepts concepts,
10% density) are packed 500 images at a time (the full bool arrays are never held), then
`significance.packed_permutation_test` runs --draws draws. Prints the peak RSS above the
RSS with the packed inputs held (getrusage), and the time.

  python benchmarks/bench_significance_memory.py --num_images 20000
"""

from __future__ import annotations

import pathlib
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import peak_rss_mib, refuse_below  # noqa: E402

flags.DEFINE_integer("num_images", 4000, "Images.")
flags.DEFINE_integer("pixels", 49, "Pixels per image on the test's grid.")
flags.DEFINE_integer("units", 256, "Units.")
flags.DEFINE_integer("concepts", 300, "Concepts.")
flags.DEFINE_integer("draws", 2, "Permutation draws.")
FLAGS = flags.FLAGS
_CHUNK = 500


def main(argv):
    del argv
    # Else a traceback, or (--units=0) a test of nothing.
    refuse_below(
        {n: FLAGS[n].value for n in ("num_images", "pixels", "units", "concepts", "draws")}
    )
    from jaxdissect import significance

    rng = np.random.default_rng(0)

    def packed(count: int) -> np.ndarray:
        parts = []
        for start in range(0, FLAGS.num_images, _CHUNK):
            n = min(_CHUNK, FLAGS.num_images - start)
            parts.append(
                np.packbits(rng.random((n, FLAGS.pixels, count), np.float32) < 0.1, axis=-1)
            )
        return np.concatenate(parts)

    units, concepts = packed(FLAGS.units), packed(FLAGS.concepts)
    base = peak_rss_mib()
    t0 = time.perf_counter()
    significance.packed_permutation_test(
        units, concepts, FLAGS.units, FLAGS.concepts, draws=FLAGS.draws
    )
    elapsed = time.perf_counter() - t0
    inputs = (units.nbytes + concepts.nbytes) / 2**20
    print(
        f"{FLAGS.num_images} images, packed inputs {inputs:.1f} MiB: peak RSS "
        f"{peak_rss_mib() - base:.0f} MiB above them, {elapsed:.1f} s for {FLAGS.draws} draws"
    )


if __name__ == "__main__":
    app.run(main)

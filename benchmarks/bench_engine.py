r"""Speed and memory of the whole dissection against a forward pass alone.

For a ResNet-18 (random weights: speed does not depend on them) at 224 on a
synthetic Broden, in one process per data size:
  - forward: the network over every image (loader included), capturing the layer;
  - dissection: both passes (sketch thresholds, top images, exact IoU tally);
  - their ratio, images/s, and the peak host memory (ru_maxrss) of the process.
Sizes N, 2N, 4N show whether memory grows with the data (it must not, apart
from the activation cache: `auto` by default, as in dissect.py; `none` makes
pass 2 run the network again). Peak RSS is read after the data is opened, after
the forward pass and after the dissection, so that growth can be placed.

  python benchmarks/bench_engine.py --num_images 256 --batch_size 32 --layers layer4

Prints one line per size, a summary table, and the marginal cost between
consecutive sizes (what a further image costs once compilation and set-up are
paid: the figure that scales to a full Broden).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags

flags.DEFINE_integer("num_images", 256, "Images of the smallest run (runs N, 2N, 4N).")
flags.DEFINE_list("multiples", ["1", "2", "4"], "Data sizes as multiples of --num_images.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_string("arch", "resnet18", "Architecture of models/zoo.")
flags.DEFINE_list("layers", ["layer4"], "Layers to dissect.")
flags.DEFINE_enum(
    "activation_cache",
    "auto",
    ["auto", "device", "host", "disk", "none"],
    "Activation cache (auto: as dissect.py; none: pass 2 runs the network again).",
)
flags.DEFINE_enum("quantile_mode", "sketch", ["sketch", "exact"], "Threshold statistic.")
flags.DEFINE_integer("loader_workers", 0, "Decoding processes (0: threads), as dissect.py.")
flags.DEFINE_enum(
    "tally_method", "auto", ["auto", "segment", "compact", "matmul"], "IoU tally counting method."
)
flags.DEFINE_string("cache_dir", "~/.cache/jaxdissect/bench_engine", "Synthetic data cache.")
flags.DEFINE_bool("child", False, "Internal: run one size and print JSON.")
FLAGS = flags.FLAGS


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child() -> dict:
    import jax
    import numpy as np

    from jaxdissect import capture, engine, parallel
    from jaxdissect.data import loader, open_probe
    from jaxdissect.models import load

    source, _ = open_probe(
        "synthetic",
        synthetic_images=FLAGS.num_images,
        cache_dir=os.path.expanduser(FLAGS.cache_dir),
    )
    rss_data = _peak_rss_mb()
    model = load.load(FLAGS.arch, weights=None)
    spec = model.input_spec
    tap = capture.make_tap(
        model.module,
        model.variables,
        FLAGS.layers,
        input_shape=(spec.size, spec.size, 3),
        apply_kwargs=model.apply_kwargs,
    )
    mesh = parallel.data_mesh()
    settings = engine.Settings(batch_size=FLAGS.batch_size, quantile_mode=FLAGS.quantile_mode)

    # Forward alone over the same data, loader included (the pass-1 reading path).
    fwd = jax.jit(lambda v, x: tap.fn(v, spec(x)))
    variables = parallel.replicate(tap.variables, mesh)
    fields = engine._Fields(source, images=True, labels=False)

    def forward_pass() -> float:
        t = time.perf_counter()
        out = None
        in_flight = parallel.InFlight()  # as the engine's loop: 2 batches in flight
        for batch in loader.batches(fields, FLAGS.batch_size, num_workers=FLAGS.loader_workers):
            out = fwd(variables, parallel.put_batch({"x": batch["image"]}, mesh)["x"])
            in_flight.add(out)
        jax.block_until_ready(out)
        return time.perf_counter() - t

    forward_pass()  # compile
    t_forward = forward_pass()
    rss_forward = _peak_rss_mb()

    def dissect() -> tuple[float, dict]:
        d = engine.Dissector(
            tap,
            source,
            settings,
            input_spec=spec,
            model_key="bench",
            mesh=mesh,
            activation_cache=FLAGS.activation_cache,
            progress=False,
            tally_method=FLAGS.tally_method,
            num_workers=FLAGS.loader_workers,
        )
        t = time.perf_counter()
        d.run(tap.variables)
        return time.perf_counter() - t, d.timings

    dissect()  # compile
    t_dissect, timings = dissect()
    n = len(source)
    return {
        "images": n,
        "devices": int(mesh.devices.size),
        "platform": jax.devices()[0].platform,
        "forward_s": t_forward,
        "dissect_s": t_dissect,
        "pass1_s": timings["pass1_s"],
        "pass2_s": timings["pass2_s"],
        "forward_img_s": n / t_forward,
        "dissect_img_s": n / t_dissect,
        "ratio": t_dissect / t_forward,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_data_mb": rss_data,
        "rss_after_forward_mb": rss_forward,
        "cache_kind": timings.get("cache", FLAGS.activation_cache),
        "units": int(np.sum([tap.shapes[layer][2] for layer in tap.layers])),
    }


def main(argv):
    del argv
    if FLAGS.child:
        print("RESULT " + json.dumps(_child()), flush=True)
        return
    rows = []
    for m in FLAGS.multiples:
        n = FLAGS.num_images * int(m)
        args = [a for a in sys.argv[1:] if not a.startswith("--num_images")]
        cmd = [sys.executable, __file__, "--child", f"--num_images={n}", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"child run with {n} images failed")
        row = json.loads(line[0][7:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"\n{FLAGS.arch} {','.join(FLAGS.layers)} at 224, batch {FLAGS.batch_size}, "
        f"cache={FLAGS.activation_cache}, tally={FLAGS.tally_method}, loader_workers={FLAGS.loader_workers}, {rows[0]['devices']} {rows[0]['platform']} device(s)"
    )
    print(
        f"{'images':>7} {'forward img/s':>14} {'dissect img/s':>14} {'pass1 s':>8} "
        f"{'pass2 s':>8} {'ratio':>6} {'peak RSS MB: data / forward / end':>34}"
    )
    for r in rows:
        print(
            f"{r['images']:>7} {r['forward_img_s']:>14.1f} {r['dissect_img_s']:>14.1f} "
            f"{r['pass1_s']:>8.1f} {r['pass2_s']:>8.1f} {r['ratio']:>6.2f} "
            f"{r['rss_after_data_mb']:>16.0f} / {r['rss_after_forward_mb']:>5.0f} / "
            f"{r['peak_rss_mb']:>5.0f}"
        )
    # Fixed costs (compiling both passes' steps, setting up) weigh on small runs; the
    # difference between two sizes is what each further image costs.
    for a, b in zip(rows, rows[1:], strict=False):
        extra = b["images"] - a["images"]
        fwd = extra / (b["forward_s"] - a["forward_s"])
        dis = extra / (b["dissect_s"] - a["dissect_s"])
        print(
            f"marginal {a['images']}->{b['images']} images: forward {fwd:.1f} img/s, "
            f"dissection {dis:.1f} img/s, ratio {fwd / dis:.2f}"
        )


if __name__ == "__main__":
    app.run(main)

r"""A ViT dissection against its forward pass, alternating in one process.

Random-weight `--arch` (a zoo ViT) at 224 on a synthetic Broden: after one compiling
round, each round times the forward pass alone over the images (loader included,
capturing the layers) and then a whole dissection (both passes; thresholds in the
engine's `auto` mode: exact for block11's 384 units up to ~36,000 images, the sketch
beyond; activation cache `auto`), so that a change in the machine's load hits both alike.

  python benchmarks/bench_vit.py --arch=vit_s16 --layers=block11 --num_images=128 --rounds=2
"""

from __future__ import annotations

import os
import time

from _common import refuse_below  # the benchmarks folder: sys.path[0]
from absl import app, flags

flags.DEFINE_string("arch", "vit_s16", "A ViT of models/zoo.")
flags.DEFINE_list("layers", ["block11"], "Layers to dissect.")
flags.DEFINE_integer("num_images", 128, "Images of the synthetic Broden.")
flags.DEFINE_integer("rounds", 2, "Timed rounds after the compiling one.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_string("cache_dir", "~/.cache/jaxdissect/bench_engine", "Synthetic data cache.")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    # Else a traceback, or (--rounds=0) no figure at all.
    refuse_below({n: FLAGS[n].value for n in ("num_images", "batch_size", "rounds")})
    import jax

    from jaxdissect import capture, driver, engine, parallel
    from jaxdissect.data import loader, open_probe
    from jaxdissect.models import load

    source, _ = open_probe(
        "synthetic",
        synthetic_images=FLAGS.num_images,
        cache_dir=os.path.expanduser(FLAGS.cache_dir),
    )
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
    settings = engine.Settings(batch_size=FLAGS.batch_size)
    fwd = jax.jit(lambda v, x: tap.fn(v, spec(x)))
    variables = parallel.replicate(tap.variables, mesh)
    fields = engine.Fields(source, images=True, labels=False)

    def forward() -> float:
        t = time.perf_counter()
        out, in_flight = None, parallel.InFlight()
        for batch in loader.batches(fields, FLAGS.batch_size):
            out = fwd(variables, parallel.put_batch({"x": batch["image"]}, mesh)["x"])
            in_flight.add(out)
        jax.block_until_ready(out)
        return time.perf_counter() - t

    steps = driver.Steps()  # shared: after the compiling round, the dissections compile nothing

    def dissect() -> tuple[float, dict]:
        d = engine.Dissector(
            tap,
            source,
            settings,
            input_spec=spec,
            model_key="bench",
            mesh=mesh,
            progress=False,
            steps=steps,
        )
        t = time.perf_counter()
        d.run(tap.variables)
        return time.perf_counter() - t, d.timings

    forward(), dissect()  # compile
    units = sum(tap.shapes[layer][2] for layer in tap.layers)
    print(f"{FLAGS.arch} {','.join(FLAGS.layers)} ({units} units), {len(source)} images")
    for r in range(FLAGS.rounds):
        f = forward()
        d, timings = dissect()
        print(
            f"round {r}: forward {f:.1f} s, dissection {d:.1f} s (pass 1 "
            f"{timings['pass1_s']:.1f} s, pass 2 {timings['pass2_s']:.1f} s), ratio {d / f:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)

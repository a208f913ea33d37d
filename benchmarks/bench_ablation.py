r"""Cost of unit ablation and of the permutation test, in forward-pass equivalents.

Ablation: a ResNet-18 (random weights: speed does not depend on them) at 224 with
--classes outputs; every unit of --layer ablated alone (K masks) on --num_images
images, through `ablation.Ablator` (the layer's output captured once per batch, the
layers after it run once per mask). The forward pass is the plain network over the
same images (`evaluate.Evaluator`); both are timed after a compiling call.

Significance: `significance.permutation_test` of K units against C concepts on N
images of P pixels each, D draws, against the same forward pass; timed after a
compiling call of the same shapes.

  python benchmarks/bench_ablation.py --num_images 1000 --layer layer4
"""

from __future__ import annotations

import json
import time

import numpy as np
from _common import refuse_below  # the benchmarks folder: sys.path[0]
from absl import app, flags

flags.DEFINE_integer("num_images", 1000, "Validation images.")
flags.DEFINE_integer("batch_size", 50, "Images per batch.")
flags.DEFINE_string("layer", "layer4", "The ablated layer (512 units for layer4).")
flags.DEFINE_integer("classes", 365, "Classifier outputs.")
flags.DEFINE_integer("masks_per_call", 64, "Unit masks per compiled call.")
flags.DEFINE_integer("units", 0, "Ablate only the first N units (0: all).")
flags.DEFINE_integer("draws", 0, "Permutation draws of the significance benchmark (0: skip).")
flags.DEFINE_integer("pixels", 49, "Pixels per image in the permutation test (7x7 grid).")
flags.DEFINE_integer("concepts", 1197, "Concepts in the permutation test (Broden: 1,197).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    at_least = {"num_images": 1, "batch_size": 1, "classes": 1, "masks_per_call": 1, "units": 0}
    at_least.update(draws=0, pixels=1, concepts=1)
    refuse_below({name: FLAGS[name].value for name in at_least}, at_least)
    import jax.numpy as jnp

    from jaxdissect import ablation, evaluate, significance
    from jaxdissect.models import zoo
    from jaxdissect.models.load import init_variables
    from jaxdissect.preprocess import InputSpec

    spec = InputSpec(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), scale=1 / 255)
    model = zoo.build("resnet18", num_classes=FLAGS.classes)
    variables = init_variables(model, jnp.zeros((1, 224, 224, 3)), train=False)
    rng = np.random.default_rng(0)
    b = FLAGS.batch_size
    batches = []
    for start in range(0, FLAGS.num_images, b):
        n = min(b, FLAGS.num_images - start)
        batches.append(
            {
                "image": rng.integers(0, 256, (b, 224, 224, 3)).astype(np.float32),
                "label": rng.integers(0, FLAGS.classes, b).astype(np.int32),
                "valid": np.arange(b) < n,
            }
        )
    kw = {"train": False}
    plain = evaluate.Evaluator(lambda v, x: model.apply(v, spec(x), **kw))
    plain(variables, batches[:1])
    t0 = time.perf_counter()
    plain(variables, batches)
    forward_s = time.perf_counter() - t0
    ab = ablation.Ablator(model, spec, FLAGS.layer, apply_kwargs=kw)
    k = ab._layer_step(variables, batches[0]["image"])(variables, batches[0]["image"]).shape[-1]
    if FLAGS.units > k:  # else it reported --units as ablated where only k were
        raise SystemExit(f"error: --units={FLAGS.units}: {FLAGS.layer} has {k} units (0: all)")
    k_used = FLAGS.units or k
    masks = np.eye(k, dtype=bool)[:k_used]
    m = FLAGS.masks_per_call
    ab.counts(variables, batches[:1], masks[:m], num_classes=FLAGS.classes, masks_per_call=m)
    t0 = time.perf_counter()
    ab.counts(variables, batches, masks, num_classes=FLAGS.classes, masks_per_call=m)
    ablation_s = time.perf_counter() - t0
    out = {
        "images": FLAGS.num_images,
        "layer": FLAGS.layer,
        "units": int(k),
        "units_ablated": int(k_used),
        "forward_s": forward_s,
        "ablation_s": ablation_s,
        "forward_pass_equivalents": ablation_s / forward_s,
    }
    if FLAGS.draws:
        u = rng.random((FLAGS.num_images, FLAGS.pixels, k)) < 0.05
        c = rng.random((FLAGS.num_images, FLAGS.pixels, FLAGS.concepts)) < 0.02
        # The same call first: it compiles for these shapes (images, draw chunks), so the
        # timed call compiles nothing.
        significance.permutation_test(u, c, draws=FLAGS.draws)
        t0 = time.perf_counter()
        significance.permutation_test(u, c, draws=FLAGS.draws)
        test_s = time.perf_counter() - t0
        out.update(
            draws=FLAGS.draws,
            pixels=FLAGS.pixels,
            concepts=FLAGS.concepts,
            test_s=test_s,
            test_forward_pass_equivalents=test_s / forward_s,
        )
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    app.run(main)

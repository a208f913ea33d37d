r"""Speed and work of the formula counts (one beam step's pass), at Broden's sizes.

The batch of `bench_tally.py` (512 units 7x7 -> 112x112, 1,377 labels, 5 pixel planes,
2 image-level slots) and a beam of S formulas of length 2 per unit (random concepts and
operators): milliseconds per batch of `formula_counts.batch_formula_counts`, its XLA flop
and byte counts per image (the batch as one chunk), the tally's `segment` method on the
same batch, and a ResNet-18 forward pass to layer4 on 224x224 images of the same batch size
(random init): a beam step over N images costs about (counts / forward) forward passes
when the activations come from the cache.

  python benchmarks/bench_formulas.py [--batch_size 32] [--slots 5]
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import formula_counts, tally

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import refuse_below  # noqa: E402
from bench_tally import POOLS, _batch, _labels  # noqa: E402


def _timed(run, *args, repeats: int) -> float:
    jax.block_until_ready(run(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = run(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--slots", type=int, default=5)
    parser.add_argument("--seg_size", type=int, default=112)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    refuse_below(
        {n: getattr(args, n) for n in ("batch_size", "units", "slots", "seg_size", "repeats")}
    )

    primary, ids = _labels()
    nl = len(primary)
    rng = np.random.default_rng(0)
    data = _batch(rng, args.batch_size, args.seg_size, args.units, 7, ids)
    k, s = args.units, args.slots
    concepts = np.zeros((k, s, 3), np.int32)
    concepts[:, :, :2] = rng.integers(1, nl, (k, s, 2))
    ops = np.full((k, s, 2), -1, np.int32)
    ops[:, :, 0] = rng.integers(0, 3, (k, s))
    batch = {key: jnp.asarray(data[key]) for key in ("pixel_labels", "image_labels")}
    acts, thresholds = jnp.asarray(data["acts"]), jnp.asarray(data["thresholds"])
    b = args.batch_size
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), batch {b}, "
        f"{k} units x {s} formulas, 7x7 -> {args.seg_size}x{args.seg_size}, {nl} labels, "
        f"{data['pixel_labels'].shape[1]} planes"
    )
    count = functools.partial(formula_counts.batch_formula_counts, num_labels=nl)
    run = jax.jit(count)
    t0 = time.perf_counter()
    run.lower(acts, thresholds, concepts, ops, batch).compile()
    print(f"compile (trace, lower, XLA) of the counts: {time.perf_counter() - t0:.1f} s")
    step_s = _timed(run, acts, thresholds, concepts, ops, batch, repeats=args.repeats)
    cost = (
        jax.jit(functools.partial(count, chunk=b))
        .lower(acts, thresholds, concepts, ops, batch)
        .compile()
        .cost_analysis()
    )
    cost = cost[0] if isinstance(cost, list) else cost
    tally_run = jax.jit(
        functools.partial(
            tally.batch_counts, primary=primary, num_categories=len(POOLS), method="segment"
        )
    )
    tally_s = _timed(tally_run, acts, thresholds, batch, repeats=args.repeats)

    from jaxdissect import capture
    from jaxdissect.models import zoo
    from jaxdissect.models.load import init_variables

    model = zoo.build("resnet18", num_classes=365)
    variables = init_variables(model, jnp.zeros((1, 224, 224, 3)), train=False)
    tap = capture.make_tap(
        model, variables, ["layer4"], input_shape=(224, 224, 3), apply_kwargs={"train": False}
    )
    fwd = jax.jit(lambda v, x: tap.fn(v, x)[tap.layers[0]])
    images = jnp.asarray(rng.standard_normal((b, 224, 224, 3)), jnp.float32)
    forward_s = _timed(fwd, tap.variables, images, repeats=args.repeats)
    print(f"{'what':>28} {'ms/batch':>9} {'ms/img':>8}")
    for name, sec in (
        ("formula counts (a beam step)", step_s),
        ("tally, segment (length 1)", tally_s),
        ("ResNet-18 forward to layer4", forward_s),
    ):
        print(f"{name:>28} {sec * 1e3:>9.0f} {sec / b * 1e3:>8.1f}")
    print(
        f"formula counts per image: {cost.get('flops', float('nan')) / b / 1e9:.3f} GFLOP, "
        f"{cost.get('bytes accessed', float('nan')) / b / 1e6:.0f} MB accessed (XLA)"
    )
    print(f"a beam step = {step_s / forward_s:.2f} forward passes (activations cached)")


if __name__ == "__main__":
    main()

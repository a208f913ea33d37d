r"""Speed and work of the IoU tally's counting methods, at Broden's sizes.

One batch of ResNet-18 layer4-like maps (7x7x512) against 112x112 label maps in
5 pixel planes (colour, object, two part planes, material: each plane a grid of
8x8 blocks with a few labels drawn from its category's pool, so that an image
holds 20-40 labels, as a Broden image holds tens) and 2 image-level slots
(scene, texture), over the paper's category sizes (1,376 labels; Broden's
label.csv numbers 1,197 because some labels belong to two categories).
For each method: milliseconds per batch and images/s on this machine's default
backend, and XLA's count of flops and bytes accessed per image (compiled with
the whole batch as one chunk, so loops are counted once: exact for "compact"
when every image fits its slots, which the printed label counts show). Every
method's counts are checked identical to the first method's.

  python benchmarks/bench_tally.py [--batch_size 32] [--methods segment,compact,matmul]
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import refuse_below, refuse_unknown  # the benchmarks folder: sys.path[0]

from jaxdissect import tally

# Broden's label pools by primary category (pixel categories first).
POOLS = {"color": 11, "object": 584, "part": 234, "material": 32, "scene": 468, "texture": 47}
PLANES = (("color", 11), ("object", 12), ("part", 6), ("part", 4), ("material", 6))


def _labels() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Primary category of every label number, and each category's label numbers."""
    primary, ids, start = [-1], {}, 1
    for j, (name, n) in enumerate(POOLS.items()):
        ids[name] = np.arange(start, start + n)
        primary += [j] * n
        start += n
    return np.asarray(primary, np.int32), ids


def _batch(rng, b: int, seg: int, units: int, act: int, ids) -> dict[str, np.ndarray]:
    block = 8  # label regions of 8x8 pixels
    pix = np.zeros((b, len(PLANES), seg, seg), np.int32)
    for i in range(b):
        for p, (cat, per_image) in enumerate(PLANES):
            held = rng.integers(max(1, per_image // 2), per_image + 1)
            pool = rng.choice(ids[cat], size=held, replace=False)
            grid = rng.choice(pool, size=(seg // block, seg // block))
            plane = np.kron(grid, np.ones((block, block), np.int32))
            if cat in ("part", "material"):  # these cover only part of an image
                plane[rng.random((seg, seg)) < 0.5] = 0
            pix[i, p] = plane
    image = np.stack([rng.choice(ids["scene"], b), rng.choice(ids["texture"], b)], 1)
    acts = np.maximum(rng.standard_normal((b, act, act, units), dtype=np.float32), 0)
    return {
        "acts": acts,
        "thresholds": np.full((units,), 1.5, np.float32),
        "pixel_labels": pix,
        "image_labels": image.astype(np.int32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--units", type=int, default=512)
    parser.add_argument("--act_size", type=int, default=7)
    parser.add_argument("--seg_size", type=int, default=112)
    parser.add_argument("--methods", default="segment,compact,matmul")
    parser.add_argument("--restriction", default="presence", choices=tally.RESTRICTIONS)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    # Else a traceback: a division by zero, an empty array's reduction.
    refuse_below(
        {n: getattr(args, n) for n in ("batch_size", "units", "act_size", "seg_size", "repeats")}
    )
    refuse_unknown("methods", args.methods.split(",") if args.methods else [], tally.METHODS)

    primary, ids = _labels()
    rng = np.random.default_rng(0)
    data = _batch(rng, args.batch_size, args.seg_size, args.units, args.act_size, ids)
    held = [len(np.setdiff1d(np.unique(x), [0])) for x in data["pixel_labels"]]
    print(
        f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), batch "
        f"{args.batch_size}, {args.units} units {args.act_size}x{args.act_size} -> "
        f"{args.seg_size}x{args.seg_size}, {len(primary)} labels, {len(PLANES)} planes, "
        f"pixel labels per image {min(held)}-{max(held)} (slots {tally.DEFAULT_SLOTS}), "
        f"restriction {args.restriction}"
    )
    batch = {k: jnp.asarray(data[k]) for k in ("pixel_labels", "image_labels")}
    acts, thresholds = jnp.asarray(data["acts"]), jnp.asarray(data["thresholds"])
    first = None
    print(f"{'method':>8} {'ms/batch':>9} {'img/s':>9} {'GFLOP/img':>10} {'MB/img':>8}")
    for method in args.methods.split(","):
        count = functools.partial(
            tally.batch_counts,
            primary=primary,
            num_categories=len(POOLS),
            restriction=args.restriction,
            method=method,
        )
        run = jax.jit(count).lower(acts, thresholds, batch).compile()
        one_chunk = jax.jit(functools.partial(count, chunk=args.batch_size))
        cost = one_chunk.lower(acts, thresholds, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        out = jax.block_until_ready(run(acts, thresholds, batch))
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            out = run(acts, thresholds, batch)
        jax.block_until_ready(out)
        dt = (time.perf_counter() - t0) / args.repeats
        counts = {k: np.asarray(v) for k, v in out.items()}
        if first is None:
            first = counts
        for k in first:
            np.testing.assert_array_equal(counts[k], first[k], err_msg=f"{method}: {k}")
        b = args.batch_size
        print(
            f"{method:>8} {dt * 1e3:>9.1f} {b / dt:>9.0f} "
            f"{cost.get('flops', float('nan')) / b / 1e9:>10.3f} "
            f"{cost.get('bytes accessed', float('nan')) / b / 1e6:>8.1f}"
        )
    print("counts identical across methods")


if __name__ == "__main__":
    main()

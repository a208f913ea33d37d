"""Map a PyTorch state dict onto Flax variables whose module paths mirror torch's.

The models in this package name their Flax submodules exactly like the torch
modules of the torchvision (or original) layout: torch key
`layer4.1.conv2.weight` lives at Flax path `('layer4', '1', 'conv2', 'kernel')`.
So one mechanical rule maps every architecture:

  Conv weight  [O, I/g, kh, kw]  -> params/.../kernel [kh, kw, I/g, O]
  Linear weight [O, I]           -> params/.../kernel [I, O]
  bias                           -> params/.../bias
  BatchNorm weight / bias        -> params/.../scale / bias
  running_mean / running_var     -> batch_stats/.../mean / var
  num_batches_tracked            -> dropped

Reading the files is `models.checkpoint_io`'s job (and `npz_file`'s); this module only maps arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

IGNORED_SUFFIXES = ("num_batches_tracked",)


class WeightMappingError(ValueError):
    """A state dict does not fit the model's variables.

    Attributes:
      unmatched: the checkpoint keys with no model variable, where that is the reason.
      missing: the model variables (`/`-joined paths) with no checkpoint key, likewise.
    """

    def __init__(self, message: str, *, unmatched: Sequence[str] = (), missing: Sequence[str] = ()):
        super().__init__(message)
        self.unmatched = tuple(unmatched)
        self.missing = tuple(missing)


class RenamedKeys(dict):
    """A state dict being renamed, each name taken once: a second checkpoint key renamed to
    a name already taken (two keys of one weight, e.g. a file holding two namings) is
    refused, not read over the first (`update` goes through the same check)."""

    def __setitem__(self, name: str, value: Any) -> None:
        if name in self:
            raise WeightMappingError(
                f"two checkpoint keys are both {name!r} once renamed; save the state dict of "
                "one model only"
            )
        super().__setitem__(name, value)

    def update(self, *others: Mapping[str, Any], **named: Any) -> None:
        for other in (*others, named):
            for name, value in dict(other).items():
                self[name] = value


def _flax_key(torch_key: str, array: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    *path, leaf = torch_key.split(".")
    path = tuple(path)
    if leaf == "weight":
        if array.ndim == 4:
            return ("params", *path, "kernel"), np.transpose(array, (2, 3, 1, 0))
        if array.ndim == 2:
            return ("params", *path, "kernel"), np.transpose(array, (1, 0))
        if array.ndim == 1:
            return ("params", *path, "scale"), array
        raise WeightMappingError(f"{torch_key}: weight of unsupported rank {array.ndim}")
    if leaf == "bias":
        return ("params", *path, "bias"), array
    if leaf == "running_mean":
        return ("batch_stats", *path, "mean"), array
    if leaf == "running_var":
        return ("batch_stats", *path, "var"), array
    if leaf == "relative_position_bias_table":  # Swin's [(2w-1)**2, heads], as it is
        return ("params", *path, leaf), array
    raise WeightMappingError(f"{torch_key}: no rule for a parameter named {leaf!r}")


def _renamed(
    state_dict: Mapping[str, Any], rename: Callable[[str], str], removed: str
) -> dict[str, Any]:
    """`state_dict` with every key `rename`d (`removed`: what renaming strips from it).

    Raises:
      WeightMappingError: two keys are then one.
    """
    out: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in state_dict.items():
        name = rename(key)
        if name in out:
            longer, shorter = sorted((source[name], key), key=len, reverse=True)
            raise WeightMappingError(
                f"holds both {longer!r} and {shorter!r}, which name the same weight once "
                f"{removed!r} is stripped; save the state dict of one model only"
            )
        out[name], source[name] = value, key
    return out


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Drop a DataParallel-style prefix from every key that has it.

    Raises:
      WeightMappingError: a key is there both with and without the prefix.
    """
    return _renamed(state_dict, lambda key: key.removeprefix(prefix), prefix)


# Prefixes that wrappers put before a model's keys, stripped (nested, in any order) where
# the keys then fit the model better: DataParallel/DDP's `module.`, a LightningModule holding
# the network as `self.model`, and the module `torch.compile(model)` returns, whose state
# dict names each key `_orig_mod.<key>` (`_orig_mod.module.<key>` for a compiled DDP).
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
# DataParallel around a submodule puts `module.` inside the keys: the PyTorch ImageNet
# example wraps AlexNet's and VGG's `features` alone, so the Places365 AlexNet file holds
# `features.module.0.weight` for `features.0.weight`. Removed where the keys then fit.
INNER_WRAPPER = ".module."
MAPPING_ADVICE = (
    "check the architecture and num_classes, or strip a wrapper prefix (e.g. 'module.')"
)


def _map_keys(
    state_dict: Mapping[str, Any],
    expected: Mapping[tuple[str, ...], Any],
    rename: Callable[[str], str | None] | None,
) -> tuple[dict[tuple[str, ...], np.ndarray], dict[tuple[str, ...], str], list[str]]:
    """(Flax path -> array, Flax path -> torch key, torch keys with no model variable)."""
    mapped: dict[tuple[str, ...], np.ndarray] = {}
    torch_keys: dict[tuple[str, ...], str] = {}
    unmatched: list[str] = []
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] in IGNORED_SUFFIXES:
            continue
        name = rename(key) if rename is not None else key
        if name is None:
            continue
        try:
            path, array = _flax_key(name, np.asarray(value))
        except WeightMappingError:  # no rule for its name or rank: no variable takes it
            unmatched.append(key)
            continue
        if path not in expected:
            unmatched.append(key)
            continue
        if path in mapped:  # e.g. a renamed key beside the name it is renamed to
            raise WeightMappingError(
                f"{torch_keys[path]!r} and {key!r} both map to {'/'.join(path)}; save the state "
                "dict of one model only"
            )
        mapped[path] = array
        torch_keys[path] = key
    return mapped, torch_keys, unmatched


def _strip_inner(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Every `INNER_WRAPPER` inside a key made one '.' (`_renamed`'s error where two keys are
    then one)."""
    return _renamed(state_dict, lambda key: key.replace(INNER_WRAPPER, "."), INNER_WRAPPER)


def _wrapper_strips(state_dict: Mapping[str, Any]) -> list[dict[str, Any]]:
    """`state_dict` with `WRAPPER_PREFIXES` stripped and `INNER_WRAPPER` removed, in every
    order that applies (each at most once; fewer strips first)."""
    out, frontier = [], [(state_dict, ())]
    while frontier:
        deeper = []
        for keys, used in frontier:
            for prefix in (*WRAPPER_PREFIXES, INNER_WRAPPER):
                inner = prefix == INNER_WRAPPER
                applies = (prefix in k if inner else k.startswith(prefix) for k in keys)
                if prefix in used or not any(applies):
                    continue
                try:
                    stripped = _strip_inner(keys) if inner else strip_prefix(keys, prefix)
                except WeightMappingError:
                    continue
                out.append(stripped)
                deeper.append((stripped, (*used, prefix)))
        frontier = deeper
    return out


def torch_to_flax(
    state_dict: Mapping[str, Any],
    variables: Mapping[str, Any],
    *,
    rename: Callable[[str], str | None] | None = None,
    advice: str = MAPPING_ADVICE,
) -> dict[str, Any]:
    """Return a copy of `variables` with every leaf taken from `state_dict`.

    `WRAPPER_PREFIXES` (DDP's `module.`, Lightning's `model.`, torch.compile's `_orig_mod.`,
    nested in any order) are stripped, and DataParallel's `module.` inside keys
    (`INNER_WRAPPER`) removed, where the keys then fit the model with fewer unmatched keys on
    either side.

    Args:
      state_dict: torch key -> array (numpy, or anything `np.asarray` takes).
      variables: the Flax variables of the model (e.g. from `model.init`),
        used for the expected paths, shapes and dtypes.
      rename: optional hook applied to each torch key first; return None to
        skip a key on purpose (e.g. an auxiliary head the Flax model lacks).
      advice: what to check when keys or shapes do not match (ends the message).

    Raises:
      WeightMappingError: in one line, naming the unmatched keys on both sides, or the
        shapes that differ.
    """
    expected = traverse_util.flatten_dict(dict(variables))
    mapped, torch_keys, unmatched = _map_keys(state_dict, expected, rename)
    for candidate in _wrapper_strips(state_dict) if unmatched else ():
        try:
            stripped = _map_keys(candidate, expected, rename)
        except WeightMappingError:  # a rename hook refuses a key once stripped: keep them
            continue
        if len(stripped[2]) - len(stripped[0]) < len(unmatched) - len(mapped):
            mapped, torch_keys, unmatched = stripped
    return fit_variables(
        mapped, variables, source_keys=torch_keys, unmatched=unmatched, advice=advice
    )


def _some(names: Sequence[str], shown: int = 5) -> str:
    """`names` sorted as a list, cut after `shown`: "['a', 'b', ...]"."""
    names = sorted(names)
    text = repr(names[:shown])
    return text[:-1] + ", ...]" if len(names) > shown else text


def fit_variables(
    mapped: Mapping[tuple[str, ...], np.ndarray], variables: Mapping[str, Any], **check: Any
) -> dict[str, Any]:
    """`variables` (real or abstract) filled from `mapped` (Flax path -> array), checked
    by `check_fit` (`check`: its keyword arguments)."""
    check_fit(mapped, variables, **check)
    expected = traverse_util.flatten_dict(dict(variables))
    # A copy, so that later changes to the state dict cannot reach the Flax variables.
    out = {p: np.array(mapped[p], dtype=expected[p].dtype, copy=True) for p in expected}
    return traverse_util.unflatten_dict(out)


def check_fit(
    mapped: Mapping[tuple[str, ...], np.ndarray],
    variables: Mapping[str, Any],
    *,
    source_keys: Mapping[tuple[str, ...], str],
    unmatched: Sequence[str],
    advice: str,
    name: Callable[[tuple[str, ...]], str] = "/".join,
) -> None:
    """Fail unless `mapped` (Flax path -> array) fills `variables` (real or abstract):
    every path, float where the model's are, the same shapes.

    Args:
      mapped: the checkpoint's arrays by Flax variable path.
      variables: the model's variables, for the expected paths, shapes and dtypes.
      source_keys: the checkpoint's own name of each mapped path (for messages).
      unmatched: checkpoint keys that map to no model variable.
      advice: what to check when keys or shapes do not match (ends the message).
      name: a model variable's name in messages (default: its path, `/`-joined).

    Raises:
      WeightMappingError: in one line, naming the unmatched keys on both sides (a few of
        each, and their counts), integer arrays where the model needs floats, or the
        shapes that differ.
    """
    expected = traverse_util.flatten_dict(dict(variables))
    # Casting integer (quantised) values to float would give weights scaled by 1/scale.
    not_float = [
        f"{source_keys[p]} is {mapped[p].dtype}"
        for p in mapped
        if p in expected
        and np.issubdtype(np.dtype(expected[p].dtype), np.floating)
        and not np.issubdtype(mapped[p].dtype, np.floating)
    ]
    if not_float:
        shown = ", ".join(not_float[:5]) + (
            f" ... ({len(not_float)} in all)" if len(not_float) > 5 else ""
        )
        raise WeightMappingError(
            f"integer or quantised weights, where the model needs floats: {shown}. "
            "Save the float model's weights instead (of a quantised model: each tensor "
            "dequantised, t.dequantize())."
        )

    missing = sorted(name(p) for p in expected if p not in mapped)
    if unmatched or missing:
        sides = [
            f"{what} ({len(names)}): {_some(names)}"
            for what, names in (
                ("checkpoint keys with no model variable", unmatched),
                ("model variables with no checkpoint key", missing),
            )
            if names
        ]
        raise WeightMappingError(
            f"checkpoint does not match the model: {'; '.join(sides)}"
            + (f"; {advice}" if advice else ""),
            unmatched=unmatched,
            missing=missing,
        )
    # `variables` may be real arrays or abstract shapes (jax.eval_shape): read .shape/.dtype only.
    shape_errors = [
        f"{name(p)}: checkpoint {mapped[p].shape} vs model {tuple(expected[p].shape)}"
        for p in expected
        if mapped[p].shape != tuple(expected[p].shape)
    ]
    if shape_errors:
        more = f"; ... ({len(shape_errors)} in all)" if len(shape_errors) > 3 else ""
        raise WeightMappingError(
            f"shape mismatch: {'; '.join(shape_errors[:3])}{more}"
            + (f"; {advice}" if advice else "")
        )


def stacked_qkv(qkv: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """timm's fused `qkv` of each block's separate query, key and value (in that order).

    Raises:
      WeightMappingError: a block has some of them only.
    """
    out = {}
    for name, parts in qkv.items():
        if sorted(parts) != ["key", "query", "value"]:
            raise WeightMappingError(
                f"{name}: the checkpoint has {', '.join(sorted(parts))} of this block's "
                "attention but not all of query, key and value"
            )
        out[name] = np.concatenate([parts["query"], parts["key"], parts["value"]])
    return out

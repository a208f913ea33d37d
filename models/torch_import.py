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

Reading the files is `models.checkpoint_io`'s job; this module only maps arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import traverse_util

IGNORED_SUFFIXES = ("num_batches_tracked",)


class WeightMappingError(ValueError):
    """A state dict does not fit the model's variables."""


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
    raise WeightMappingError(f"{torch_key}: no rule for a parameter named {leaf!r}")


def strip_prefix(state_dict: Mapping[str, Any], prefix: str = "module.") -> dict[str, Any]:
    """Drop a DataParallel-style prefix from every key that has it."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def torch_to_flax(
    state_dict: Mapping[str, Any],
    variables: Mapping[str, Any],
    *,
    rename: Callable[[str], str | None] | None = None,
) -> dict[str, Any]:
    """Return a copy of `variables` with every leaf taken from `state_dict`.

    Args:
      state_dict: torch key -> array (numpy, or anything `np.asarray` takes).
      variables: the Flax variables of the model (e.g. from `model.init`),
        used for the expected paths, shapes and dtypes.
      rename: optional hook applied to each torch key first; return None to
        skip a key on purpose (e.g. an auxiliary head the Flax model lacks).

    Raises:
      WeightMappingError: listing the unmatched keys on both sides, or a shape
        that differs.
    """
    expected = traverse_util.flatten_dict(dict(variables))
    mapped: dict[tuple[str, ...], np.ndarray] = {}
    torch_keys: dict[tuple[str, ...], str] = {}
    unmatched_torch: list[str] = []
    for key, value in state_dict.items():
        if key.rsplit(".", 1)[-1] in IGNORED_SUFFIXES:
            continue
        name = rename(key) if rename is not None else key
        if name is None:
            continue
        path, array = _flax_key(name, np.asarray(value))
        if path not in expected:
            unmatched_torch.append(key)
            continue
        mapped[path] = array
        torch_keys[path] = key

    # Casting integer (quantised) values to float would give weights scaled by 1/scale.
    not_float = [
        f"{torch_keys[p]} is {mapped[p].dtype}"
        for p in mapped
        if np.issubdtype(np.dtype(expected[p].dtype), np.floating)
        and not np.issubdtype(mapped[p].dtype, np.floating)
    ]
    if not_float:
        raise WeightMappingError(
            f"integer or quantised weights, where the model needs floats: {', '.join(not_float)}. "
            "Save the float model's weights instead (of a quantised model: each tensor "
            "dequantised, t.dequantize())."
        )

    missing = sorted("/".join(p) for p in expected if p not in mapped)
    if unmatched_torch or missing:
        raise WeightMappingError(
            "state dict does not match the model.\n"
            f"  checkpoint keys with no model variable ({len(unmatched_torch)}): "
            f"{sorted(unmatched_torch)}\n"
            f"  model variables with no checkpoint key ({len(missing)}): {missing}\n"
            "Check --arch and --num_classes, or strip a wrapper prefix (e.g. 'module.')."
        )
    # `variables` may be real arrays or abstract shapes (jax.eval_shape): read .shape/.dtype only.
    shape_errors = [
        f"{'/'.join(p)}: checkpoint {mapped[p].shape} vs model {tuple(expected[p].shape)}"
        for p in expected
        if mapped[p].shape != tuple(expected[p].shape)
    ]
    if shape_errors:
        raise WeightMappingError("shape mismatch:\n  " + "\n  ".join(shape_errors))
    # A copy, so that later changes to the state dict cannot reach the Flax variables.
    out = {p: np.array(mapped[p], dtype=expected[p].dtype, copy=True) for p in expected}
    return traverse_util.unflatten_dict(out)

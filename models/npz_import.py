"""big_vision `.npz` checkpoints onto Flax variables whose parameter paths are big_vision's.

A big_vision `.npz` is a flat dict of arrays under `/`-joined parameter paths
(`Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel`), possibly under `params/`
(optax-era checkpoints) or `opt/target/` (Flax-optimizer checkpoints); a two-tower
(SigLIP) checkpoint's image tower is its `img/` keys, the rest left out, and a scanned
encoder's stacked `encoderblock` is split into its blocks. Older
checkpoints are brought to today's names as big_vision's `fix_old_checkpoints`
does: pre-Linen module numbering (`MlpBlock_3`, `LayerNorm_2`) renumbered per
name, the position embedding moved out of `Transformer/`, and a position
embedding that covers the class token split into `cls` and the patches'.
Reading is `npz_file.load_npz` (`allow_pickle=False`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from jaxdissect.models import npz_file, torch_import

_NUMBERED = re.compile(r"(.*)_(\d+)$")
# A two-tower (SigLIP) checkpoint's image tower lives under `img/`, beside `txt/`, `t`, `b`.
TWO_TOWER_IMAGE = "img/embedding/kernel"
# A `scan=True` encoder's one stacked block (big_vision's `scan_to_pyloop` undoes it).
SCANNED_BLOCKS = "Transformer/encoderblock/"


def _renumber(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Pre-Linen names (`LayerNorm_0`, `LayerNorm_2`) numbered 0, 1, ... per name and parent."""
    children: dict[str, set[str]] = {}
    for key in flat:
        parts = key.split("/")
        for depth in range(len(parts)):
            children.setdefault("/".join(parts[:depth]), set()).add(parts[depth])
    renames: dict[str, dict[str, str]] = {}
    for parent, names in children.items():
        groups: dict[str, list[tuple[int, str]]] = {}
        for name in names:
            m = _NUMBERED.fullmatch(name)
            if m:
                groups.setdefault(m.group(1), []).append((int(m.group(2)), name))
        for prefix, numbered in groups.items():
            for new_index, (_, name) in enumerate(sorted(numbered)):
                renames.setdefault(parent, {})[name] = f"{prefix}_{new_index}"
    out: dict[str, np.ndarray] = {}
    for key, value in flat.items():
        parts = key.split("/")
        new = [renames.get("/".join(parts[:d]), {}).get(p, p) for d, p in enumerate(parts)]
        out["/".join(new)] = value
    return out


def _unscanned(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A `scan=True` encoder's blocks (`Transformer/encoderblock/...`, each array stacked
    over the blocks on its first axis: SigLIP So400m's) as `encoderblock_{i}`, as big_vision's
    `scan_to_pyloop` does."""
    scanned = SCANNED_BLOCKS
    out = {k: v for k, v in flat.items() if not k.startswith(scanned)}
    for key, value in flat.items():
        if key.startswith(scanned):
            for i, block in enumerate(np.asarray(value)):
                name = f"Transformer/encoderblock_{i}/{key[len(scanned) :]}"
                if name in out:
                    raise torch_import.WeightMappingError(
                        f"{key} and {name} both hold block {i}'s weight: not one model's"
                    )
                out[name] = block
    return out


def big_vision_params(
    flat: Mapping[str, np.ndarray], patches: int | None = None
) -> dict[str, np.ndarray]:
    """The model parameters of a big_vision checkpoint's flat arrays, in today's names.

    An old layout's position embedding covers [class token, patches]: it is told by one row
    more than the model's `patches` where given, else by a square grid plus one."""
    for prefix in ("params/", "opt/target/"):
        if any(k.startswith(prefix) for k in flat):
            flat = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
            break
    if TWO_TOWER_IMAGE in flat:  # SigLIP's: the image tower (big_vision's `file.npz:img`)
        from absl import logging

        image = {k[len("img/") :]: v for k, v in flat.items() if k.startswith("img/")}
        logging.info(
            "two-tower checkpoint: its image tower (img/) read, %d other keys (the text "
            "tower's, t, b) left out",
            len(flat) - len(image),
        )
        flat = image
    flat = _unscanned(flat)
    flat = _renumber(flat)
    for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
        if old in flat:
            flat["pos_embedding"] = flat.pop(old)
    pos = flat.get("pos_embedding")
    if pos is not None and pos.ndim == 3:
        side = int(np.sqrt(pos.shape[1]))
        old_layout = (
            side * side + 1 == pos.shape[1] if patches is None else (pos.shape[1] == patches + 1)
        )
        if old_layout:  # [class token, patches]
            cls = flat.get("cls")
            if cls is not None and np.shape(cls) != pos[:, :1].shape:
                raise torch_import.WeightMappingError(
                    f"cls {np.shape(cls)} does not fit the class token's row "
                    f"{pos[:, :1].shape} of pos_embedding {pos.shape}: not one model's"
                )
            flat["pos_embedding"] = pos[:, 1:]
            if "cls" in flat:
                flat["cls"] = flat["cls"] + pos[:, :1]
    return flat


def _advice(flat: Mapping[str, Any], params: Mapping[str, Any]) -> str:
    model = {"/".join(p): v.shape for p, v in traverse_util.flatten_dict(dict(params)).items()}
    hints = ["Check --model and its --model_option settings (variant, num_classes, image_size)."]
    registers = flat.get("reg")
    if registers is not None and "reg" not in model:
        count = registers.shape[1] if registers.ndim == 3 else "<its count>"
        hints.append(f"The checkpoint has register tokens: --model_option num_registers={count}.")
    if "reg" in model and registers is None:
        hints.append("The checkpoint has no register tokens: --model_option num_registers=0.")
    if "cls" in flat and "cls" not in model:
        hints.append(
            "The checkpoint has a class token: --model_option pool_type=tok, or "
            "class_token=true beside another pool_type."
        )
    if "cls" in model and "cls" not in flat:
        hints.append("The checkpoint has no class token: --model_option pool_type=gap.")
    if any(k.startswith("pre_logits/") for k in flat) and not any(
        k.startswith("pre_logits/") for k in model
    ):
        hints.append("The checkpoint has a pre_logits layer: --model_option rep_size=<its width>.")
    head, ours = np.shape(flat.get("head/kernel")), model.get("head/kernel", ())
    if len(head) == len(ours) == 2 and head[0] == 2 * ours[0] and "pre_logits" not in params:
        hints.append(
            "The checkpoint's head reads twice the width (the class token beside the "
            "patch tokens' mean: DINOv2's linear classifiers): --model_option "
            "pool_type=tok+gap."
        )
    if "head/kernel" in model and "head/kernel" not in flat:
        hints.append("The checkpoint has no head: --model_option num_classes=0.")
    if "pos_embedding" in model and "pos_embedding" not in flat:
        hints.append(
            "The checkpoint has no learned position embedding: posemb=sincos2d (none for BEiT's)."
        )
    if any(k.startswith("MAPHead_0/") for k in flat) and "MAPHead_0" not in params:
        hints.append("The checkpoint has an attention-pooling head: --model_option pool_type=map.")
    if "MAPHead_0" in params and not any(k.startswith("MAPHead_0/") for k in flat):
        hints.append("The checkpoint has no attention-pooling head: pool_type=gap or tok.")
    for key, option, what in (
        ("embedding/bias", "patch_bias", "bias in its patch embedding"),
        ("norm_pre/scale", "pre_norm", "LayerNorm before the first block (norm_pre)"),
        ("Transformer/encoderblock_0/ls1", "layer_scale", "LayerScale in its blocks"),
        ("fc_norm/scale", "fc_norm", "LayerNorm after pooling (fc_norm)"),
        ("dist", "distilled", "distillation token (DeiT's)"),
        (
            "Transformer/encoderblock_0/relative_position_bias_table",
            "rel_pos_bias",
            "relative position bias in its blocks (BEiT's)",
        ),
    ):
        if (key in flat) != (key in model):
            has = key in flat
            hints.append(
                f"The checkpoint has {'a' if has else 'no'} {what}: --model_option "
                f"{option}={'true' if has else 'false'}."
            )
    return " ".join(hints)


def fit_big_vision(flat: Mapping[str, np.ndarray], variables: Mapping[str, Any]) -> dict[str, Any]:
    """`variables` ({'params': ...}, real or abstract) filled from big_vision's flat parameters.

    Raises:
      torch_import.WeightMappingError: listing checkpoint keys with no model parameter
        and model parameters with no checkpoint key (with a hint at the option that
        differs), or shapes that differ.
    """
    params = variables["params"]
    pos = params.get("pos_embedding") if hasattr(params, "get") else None
    flat = big_vision_params(flat, None if pos is None else int(pos.shape[1]))
    extra = sorted(set(variables) - {"params"})
    if extra:
        raise torch_import.WeightMappingError(
            f"a big_vision checkpoint holds parameters only; the model also has {extra}"
        )
    mapped = {("params", *k.split("/")): np.asarray(v) for k, v in flat.items()}
    expected = {("params", *p) for p in traverse_util.flatten_dict(dict(params))}
    unmatched = sorted(k for k in flat if ("params", *k.split("/")) not in expected)
    return torch_import.fit_variables(
        {p: a for p, a in mapped.items() if p in expected},
        variables,
        source_keys={p: "/".join(p[1:]) for p in mapped},
        unmatched=unmatched,
        advice=_advice(flat, params),
        name=lambda p: "/".join(p[1:]),  # big_vision's names: no `params/`
    )


def load_npz_variables(path: str | os.PathLike[str], variables: Mapping[str, Any]) -> dict:
    """`variables` filled from the big_vision `.npz` at `path` (see `fit_big_vision`)."""
    return fit_big_vision(npz_file.load_npz(path), variables)

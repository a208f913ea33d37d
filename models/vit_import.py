"""ViT state dicts in their owners' names -> timm's names -> big_vision's parameters.

timm's, torchvision's, Hugging Face's (ViT, DeiT, BEiT, data2vec, DINOv2, CLIP, SigLIP),
open_clip's (and OpenAI CLIP's) and DINOv2's own layouts are first brought to timm's names
(`vit_state_dict_as_timm`), then to big_vision's flat parameters (`timm_vit_to_big_vision`),
which `models/vit.py`'s ViT takes (`npz_import.fit_big_vision`). Keys with no rule keep
their names on the way, so that the fit lists them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdissect.models.torch_import import RenamedKeys, WeightMappingError, stacked_qkv

# Hugging Face transformers' ViT (`ViTModel`, and `ViTForImageClassification` under `vit.`),
# DeiT (`deit.`), BEiT and data2vec (`beit.`, `data2vec_vision.`) and DINOv2 (`Dinov2Model`,
# `Dinov2WithRegistersModel`; their classifiers' backbones under `dinov2.`,
# `dinov2_with_registers.`) -> timm's names, per block `encoder.layer.{i}.` -> `blocks.{i}.`.
_HF_VIT_PREFIXES = (
    "vit.",
    "deit.",
    "beit.",
    "data2vec_vision.",
    "dinov2.",
    "dinov2_with_registers.",
)
_HF_VIT_NAMES = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",  # DeiT's
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "layernorm": "norm",
    "pooler.layernorm": "fc_norm",  # BEiT's mean pooling
    "encoder.relative_position_bias": "rel_pos_bias",  # BEiT's table shared by the blocks
    "classifier": "head",
    "cls_classifier": "head",  # DeiTForImageClassificationWithTeacher's two heads
    "distillation_classifier": "head_dist",
}
_HF_VIT_BLOCK_NAMES = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    # DINOv2's (its LayerScale's `lambda1` is timm's `gamma`)
    "norm1": "norm1",
    "layer_scale1": "ls1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale2": "ls2",
    "mlp.weights_in": "mlp.fc1",  # DINOv2 giant's SwiGLU, both halves
    "mlp.weights_out": "mlp.fc2",
    "mlp.down_proj": "mlp.fc2",  # the same, its halves apart (`gate_proj`, `up_proj`)
    # BEiT's relative position bias (its index buffer too, dropped when mapped)
    "attention.attention.relative_position_bias": "attn",
}
_HF_VIT_BLOCKS = r"encoder\.layer\.(\d+)\.(.+)"
HF_VIT_MARK = "embeddings.patch_embeddings.projection.weight"  # ViT's and DINOv2's
_HF_DINOV2_MARK = re.compile(r"(.+\.)?encoder\.layer\.\d+\.layer_scale1\.lambda1")


def is_hf_dinov2(state_dict: Mapping[str, Any]) -> bool:
    """Whether a Hugging Face ViT state dict is a DINOv2's (told by its LayerScale)."""
    return any(_HF_DINOV2_MARK.fullmatch(k) for k in state_dict)


def _timm_name(
    name: str, blocks: str, block_names: Mapping[str, str], names: Mapping[str, str]
) -> str | None:
    """timm's name of a ViT parameter `name` (`<stem>.<leaf>`): a block's part, where the
    stem matches the pattern `blocks` (groups: the block's index, the part) and the part is
    in `block_names`, else a stem in `names`, else None (no rule)."""
    stem, _, leaf = name.rpartition(".")
    if (block := re.fullmatch(blocks, stem)) and block[2] in block_names:
        return f"blocks.{block[1]}.{block_names[block[2]]}.{leaf}"
    if stem in names:
        return f"{names[stem]}.{leaf}"
    return None


def hf_vit_to_timm(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A Hugging Face ViT, DeiT, BEiT / data2vec-vision or DINOv2 state dict (`ViTModel`,
    `ViTForImageClassification`, `DeiTForImageClassificationWithTeacher`,
    `BeitForImageClassification`, `Dinov2Model`, ...) in timm's names: a block's separate
    query, key and value stacked into timm's fused `qkv` (in that order; BEiT's key has no
    bias: 0); `ViTModel`'s pooler (a tanh Dense on the class token) as big_vision's
    `pre_logits`; DeiT's distillation token and classifier as timm's; BEiT's `lambda_1`,
    `lambda_2` as `gamma_1`, `gamma_2`, its mean pooling's norm as `fc_norm`; DINOv2's
    `mask_token` and `register_tokens` as in DINOv2's own files, its giant's SwiGLU
    (`weights_in`, or `gate_proj` and `up_proj` apart) packed as timm's; the classifier as the head
    (a `Dinov2ForImageClassification`'s reads the class token beside the patch tokens' mean:
    `pool_type="tok+gap"`); a `ViTMAEForPreTraining`'s decoder left out (logged). Keys with no
    rule here keep their names, so that loading lists them."""
    from absl import logging

    dinov2 = is_hf_dinov2(state_dict)
    out = RenamedKeys()
    qkv: dict[str, dict[str, np.ndarray]] = {}
    gated: dict[str, dict[str, np.ndarray]] = {}  # a SwiGLU's halves apart
    if decoder := [k for k in state_dict if k.startswith("decoder.")]:
        logging.info(
            "%d keys of a ViTMAEForPreTraining's decoder (its pixel reconstruction) left out: "
            "the encoder is the ViT",
            len(decoder),
        )
    for key, value in state_dict.items():
        if key.startswith("decoder."):
            continue
        name = next((key.removeprefix(p) for p in _HF_VIT_PREFIXES if key.startswith(p)), key)
        stem, _, leaf = name.rpartition(".")
        block = re.fullmatch(_HF_VIT_BLOCKS, stem)
        if block and (part := re.fullmatch(r"attention\.attention\.(query|key|value)", block[2])):
            qkv.setdefault(f"blocks.{block[1]}.attn.qkv.{leaf}", {})[part[1]] = np.asarray(value)
            continue
        if block and (half := re.fullmatch(r"mlp\.(gate|up)_proj", block[2])):
            gated.setdefault(f"blocks.{block[1]}.mlp.fc1.{leaf}", {})[half[1]] = np.asarray(value)
            continue
        if stem == "pooler.dense":  # big_vision's name (timm has no such layer)
            array = np.asarray(value)
            out[f"pre_logits/{'kernel' if leaf == 'weight' else leaf}"] = array.T
            continue
        if name == "embeddings.mask_token" or dinov2 and name == "embeddings.register_tokens":
            out[name.removeprefix("embeddings.")] = np.asarray(value)
            continue
        if (layer := re.fullmatch(r"encoder\.layer\.(\d+)", stem)) and leaf in _BEIT_SCALES:
            out[f"blocks.{layer[1]}.{_BEIT_SCALES[leaf]}"] = np.asarray(value)
            continue
        timm = _timm_name(name, _HF_VIT_BLOCKS, _HF_VIT_BLOCK_NAMES, _HF_VIT_NAMES)
        if timm and leaf == "lambda1":
            timm = f"{timm.removesuffix('.lambda1')}.gamma"
        out[timm or _HF_VIT_NAMES.get(name, name)] = np.asarray(value)
    for name, parts in qkv.items():  # BEiT's key has no bias
        if name.endswith(".bias") and sorted(parts) == ["query", "value"]:
            parts["key"] = np.zeros_like(parts["query"])
    for name, halves in gated.items():  # [gate; up], as the fused SwiGLU holds them
        if sorted(halves) != ["gate", "up"]:
            raise WeightMappingError(f"{name}: the checkpoint has one half of a SwiGLU only")
        out[name] = np.concatenate([halves["gate"], halves["up"]])
    out.update(stacked_qkv(qkv))
    return out


# Hugging Face BEiT's LayerScale, a parameter of each layer -> timm BEiT's.
_BEIT_SCALES = {"lambda_1": "gamma_1", "lambda_2": "gamma_2"}


# open_clip's (and OpenAI CLIP's) image tower `visual.` -> timm's names (timm's own
# conversion of OpenAI CLIP), per block `visual.transformer.resblocks.{i}.` -> `blocks.{i}.`.
_OPEN_CLIP_NAMES = {
    "conv1": "patch_embed.proj",
    "ln_pre": "norm_pre",
    "ln_post": "norm",
}
_OPEN_CLIP_BLOCK_NAMES = {
    "ln_1": "norm1",
    "attn.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_OPEN_CLIP_BLOCKS = r"transformer\.resblocks\.(\d+)\.(.+)"
OPEN_CLIP_MARK = "visual.class_embedding"


def open_clip_vit_to_timm(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The image tower of an open_clip / OpenAI CLIP ViT state dict in timm's names: the
    `visual.` keys only (the text tower's are dropped); the class embedding and position
    embedding gain timm's leading axis, the fused `in_proj` is timm's `qkv`, and the
    projection `proj` [width, embed] is a bias-free head (timm's `head`, bias 0). Keys with
    no rule here keep their names, so that loading lists them."""
    out = RenamedKeys()
    for key, value in state_dict.items():
        if not key.startswith("visual."):
            continue
        name, array = key.removeprefix("visual."), np.asarray(value)
        stem, _, leaf = name.rpartition(".")
        block = re.fullmatch(_OPEN_CLIP_BLOCKS, stem)
        if name == "class_embedding":
            out["cls_token"] = array.reshape(1, 1, -1)
        elif name == "positional_embedding":
            out["pos_embed"] = array[None]
        elif name == "proj":
            out["head.weight"] = array.T
            out["head.bias"] = np.zeros(array.shape[1], array.dtype)
        elif block and block[2] == "attn" and leaf in ("in_proj_weight", "in_proj_bias"):
            out[f"blocks.{block[1]}.attn.qkv.{leaf.removeprefix('in_proj_')}"] = array
        else:
            timm = _timm_name(name, _OPEN_CLIP_BLOCKS, _OPEN_CLIP_BLOCK_NAMES, _OPEN_CLIP_NAMES)
            out[timm or key] = array
    return out


# Hugging Face transformers' CLIP and SigLIP vision towers (`CLIPModel`, `SiglipModel`,
# their vision models: under `vision_model.`) -> timm's names, per block
# `encoder.layers.{i}.` -> `blocks.{i}.`; SigLIP's attention-pooling `head` -> timm's
# `attn_pool`.
_HF_CLIP_NAMES = {
    "embeddings.patch_embedding": "patch_embed.proj",
    "pre_layrnorm": "norm_pre",  # transformers' spelling
    "post_layernorm": "norm",
    "head.attention.out_proj": "attn_pool.proj",
    "head.layernorm": "attn_pool.norm",
    "head.mlp.fc1": "attn_pool.mlp.fc1",
    "head.mlp.fc2": "attn_pool.mlp.fc2",
}
_HF_CLIP_BLOCK_NAMES = {
    "layer_norm1": "norm1",
    "self_attn.out_proj": "attn.proj",
    "layer_norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_CLIP_BLOCKS = r"encoder\.layers\.(\d+)\.(.+)"
HF_CLIP_MARK = "vision_model.embeddings.class_embedding"
HF_VISION_MARK = "vision_model.embeddings.patch_embedding.weight"  # CLIP's and SigLIP's


def hf_clip_vit_to_timm(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The vision tower of a Hugging Face CLIP or SigLIP state dict in timm's names: the
    `vision_model.` keys (the text tower's are left out, and the `position_ids` buffer), a
    block's separate query, key and value stacked as timm's `qkv`, `visual_projection`
    (CLIP's, bias-free, where the file has it) as the head with bias 0, and SigLIP's
    attention-pooling `head` as timm's `attn_pool` (its `probe` the `latent`, its fused
    `in_proj` split into `q` and `kv`). Keys with no rule here keep their names, so that
    loading lists them."""
    out = RenamedKeys()
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        array = np.asarray(value)
        if key == "visual_projection.weight":
            out["head.weight"] = array
            out["head.bias"] = np.zeros(array.shape[0], array.dtype)
            continue
        if not key.startswith("vision_model."):
            continue
        name = key.removeprefix("vision_model.")
        stem, _, leaf = name.rpartition(".")
        block = re.fullmatch(_HF_CLIP_BLOCKS, stem)
        if name == "embeddings.class_embedding":
            out["cls_token"] = array.reshape(1, 1, -1)
        elif name == "embeddings.position_embedding.weight":
            out["pos_embed"] = array[None]
        elif name == "embeddings.position_ids":
            continue  # a buffer of 0..N, no weight
        elif name == "head.probe":
            out["attn_pool.latent"] = array
        elif stem == "head.attention" and leaf in ("in_proj_weight", "in_proj_bias"):
            width = array.shape[0] // 3
            out[f"attn_pool.q.{leaf.removeprefix('in_proj_')}"] = array[:width]
            out[f"attn_pool.kv.{leaf.removeprefix('in_proj_')}"] = array[width:]
        elif block and (part := re.fullmatch(r"self_attn\.([qkv])_proj", block[2])):
            which = {"q": "query", "k": "key", "v": "value"}[part[1]]
            qkv.setdefault(f"blocks.{block[1]}.attn.qkv.{leaf}", {})[which] = array
        else:
            timm = _timm_name(name, _HF_CLIP_BLOCKS, _HF_CLIP_BLOCK_NAMES, _HF_CLIP_NAMES)
            out[timm or key] = array
    out.update(stacked_qkv(qkv))
    return out


# torchvision's `VisionTransformer` (vit_b_16, ...) -> timm's names, per block
# `encoder.layers.encoder_layer_{i}.` -> `blocks.{i}.` (its MLP a Sequential: `mlp.0`,
# `mlp.3`; `mlp.linear_1`, `mlp.linear_2` before torchvision 0.13).
_TORCHVISION_VIT_NAMES = {
    "conv_proj": "patch_embed.proj",
    "encoder.ln": "norm",
    "heads.head": "head",
}
_TORCHVISION_VIT_BLOCK_NAMES = {
    "ln_1": "norm1",
    "self_attention.out_proj": "attn.proj",
    "ln_2": "norm2",
    "mlp.0": "mlp.fc1",
    "mlp.3": "mlp.fc2",
    "mlp.linear_1": "mlp.fc1",
    "mlp.linear_2": "mlp.fc2",
}
_TORCHVISION_VIT_BLOCKS = r"encoder\.layers\.encoder_layer_(\d+)\.(.+)"
TORCHVISION_VIT_MARK = "encoder.pos_embedding"


def torchvision_vit_to_timm(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A torchvision `VisionTransformer` state dict in timm's names (`class_token`,
    `encoder.pos_embedding` over [class token, patches], the fused `in_proj` as `qkv`).
    Keys with no rule here (a `heads.pre_logits` layer, ...) keep their names, so that
    loading lists them."""
    out = RenamedKeys()
    for key, value in state_dict.items():
        array = np.asarray(value)
        stem, _, leaf = key.rpartition(".")
        block = re.fullmatch(_TORCHVISION_VIT_BLOCKS, stem)
        if key == "class_token":
            out["cls_token"] = array
        elif key == TORCHVISION_VIT_MARK:
            out["pos_embed"] = array
        elif block and block[2] == "self_attention" and leaf.startswith("in_proj_"):
            out[f"blocks.{block[1]}.attn.qkv.{leaf.removeprefix('in_proj_')}"] = array
        else:
            names = (_TORCHVISION_VIT_BLOCK_NAMES, _TORCHVISION_VIT_NAMES)
            out[_timm_name(key, _TORCHVISION_VIT_BLOCKS, *names) or key] = array
    return out


# DINOv2's own checkpoints (torch hub's `dinov2_vits14_pretrain.pth`, ...) and BEiT's
# pre-training ones hold the mask token of their masked-image training, unused at inference.
DINOV2_MARK = "mask_token"
# BEiT's pre-training checkpoints (`beit_base_patch16_224_pt22k.pth`): one relative position
# table that every block reads, and the head predicting the masked patches' visual tokens.
BEIT_SHARED_TABLE = "rel_pos_bias.relative_position_bias_table"
BEIT_TOKEN_HEAD = "lm_head."


def vit_state_dict_as_timm(state_dict: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(the layout's name, the state dict in timm's names) of a ViT state dict in timm's
    (and DINOv2's), torchvision's, Hugging Face's (ViT, DINOv2, CLIP, SigLIP) or open_clip's
    names."""
    if any(k.endswith(HF_VIT_MARK) for k in state_dict):
        source = "Hugging Face DINOv2" if is_hf_dinov2(state_dict) else "Hugging Face"
        return source, hf_vit_to_timm(state_dict)
    if OPEN_CLIP_MARK in state_dict:
        return "open_clip", open_clip_vit_to_timm(state_dict)
    if HF_VISION_MARK in state_dict:
        family = "CLIP" if HF_CLIP_MARK in state_dict else "SigLIP"
        return f"Hugging Face {family}", hf_clip_vit_to_timm(state_dict)
    if TORCHVISION_VIT_MARK in state_dict:
        return "torchvision", torchvision_vit_to_timm(state_dict)
    return "timm", dict(state_dict)


def trained_input_norm(state_dict: Mapping[str, Any]) -> str | None:
    """The `--input_norm` a ViT state dict's naming says its weights were trained with:
    `clip` for open_clip's and Hugging Face's CLIP towers, `torchvision` (ImageNet's mean and
    std) for torchvision's ViTs and DINOv2's (its own files and Hugging Face's); None where
    the naming does not tell (timm's, Hugging Face's ViTs, SigLIP's [-1, 1])."""
    if OPEN_CLIP_MARK in state_dict or HF_CLIP_MARK in state_dict:
        return "clip"
    own_dinov2 = DINOV2_MARK in state_dict and any(".ls1." in k for k in state_dict)
    hf_dinov2 = any(k.endswith(HF_VIT_MARK) for k in state_dict) and is_hf_dinov2(state_dict)
    if TORCHVISION_VIT_MARK in state_dict or own_dinov2 or hf_dinov2:
        return "torchvision"
    return None


def timm_vit_to_big_vision(
    state_dict: Mapping[str, Any], num_heads: int, patches: int | None = None
) -> dict[str, np.ndarray]:
    """A timm `VisionTransformer` state dict as big_vision's flat (`/`-joined) ViT parameters.

    timm's fused `qkv` is split into query, key and value kernels [D, heads, D/heads];
    `pos_embed` over [class token, patches] becomes the patches' `pos_embedding`, its
    first row added to `cls` (big_vision prepends the class token after the position
    embedding), unless it has a row per patch only (timm's `no_embed_class`: DeiT III, its
    DINOv2 with registers), told by the model's `patches` where given, else by a square
    count; `norm_pre` (CLIP's) and each block's LayerScale `ls1`/`ls2` keep their names under
    big_vision's modules; register tokens (timm's `reg_token`, DINOv2's `register_tokens`)
    are `reg`, DINOv2's `mask_token` is left out, and timm's `fc_norm` (a norm after pooling)
    is `fc_norm`. Keys with no rule here are kept under their timm names, so that loading
    lists them as unexpected. DeiT's distillation token and head are `dist` and `head_dist`; BEiT's
    blocks' `q_bias` and `v_bias` the query's and value's biases (the key's 0), `gamma_1` and
    `gamma_2` the LayerScale, `relative_position_bias_table` kept by name (a pre-training
    checkpoint's one table, `rel_pos_bias.`, is each block's; its `lm_head` left out, logged).
    """
    from absl import logging

    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    out = RenamedKeys()

    def take(key: str) -> np.ndarray:
        if key not in sd:
            raise WeightMappingError(
                f"the timm state dict has no {key!r} beside its other keys of that layer (a "
                "ViT without some biases, e.g. timm's qkv_bias=False, has no mapping here)"
            )
        return sd.pop(key)

    def dense(prefix: str, name: str) -> None:
        out[f"{name}/kernel"] = take(f"{prefix}.weight").T
        out[f"{name}/bias"] = take(f"{prefix}.bias")

    def norm(prefix: str, name: str) -> None:
        out[f"{name}/scale"] = take(f"{prefix}.weight")
        out[f"{name}/bias"] = take(f"{prefix}.bias")

    if "patch_embed.proj.weight" in sd:
        out["embedding/kernel"] = np.transpose(take("patch_embed.proj.weight"), (2, 3, 1, 0))
    if "patch_embed.proj.bias" in sd:  # none in CLIP's image towers
        out["embedding/bias"] = take("patch_embed.proj.bias")
    if "norm_pre.weight" in sd:
        norm("norm_pre", "norm_pre")
    sd.pop(DINOV2_MARK, None)
    shared_table = sd.pop(BEIT_SHARED_TABLE, None)
    if shared_table is not None:
        sd.pop("rel_pos_bias.relative_position_index", None)  # computed, not read
    if token_head := [k for k in sd if k.startswith(BEIT_TOKEN_HEAD)]:
        logging.info(
            "%d keys of BEiT's masked-image-modeling head (lm_head) left out: the encoder is the "
            "ViT",
            len(token_head),
        )
        for key in token_head:
            del sd[key]
    for registers in ("reg_token", "register_tokens"):
        if registers in sd:
            out["reg"] = take(registers)
    if "pos_embed" in sd:
        pos = take("pos_embed")
        if "cls_token" in sd:  # and DeiT's distillation token after it
            tokens = {"cls": "cls_token", "dist": "dist_token"} if "dist_token" in sd else {}
            tokens = tokens or {"cls": "cls_token"}
            rows = pos.shape[1] if pos.ndim == 3 else 0
            if patches and rows in (patches, patches + len(tokens)):
                per_patch = rows == patches
            else:  # another grid (resampled after): a square count has no class row
                per_patch = math.isqrt(rows) ** 2 == rows
            for i, (name, key) in enumerate(tokens.items()):  # [tokens, patches]
                out[name] = take(key) if per_patch else take(key) + pos[:, i : i + 1]
            pos = pos if per_patch else pos[:, len(tokens) :]
        out["pos_embedding"] = pos
    elif "cls_token" in sd:  # no position embedding (BEiT's: relative position biases)
        out["cls"] = take("cls_token")
    # Keys of other names under `blocks.` have no rule: listed as unexpected by name.
    blocks = sorted({int(k.split(".")[1]) for k in sd if re.match(r"blocks\.\d+\.", k)})
    for i in blocks:
        t, b = f"blocks.{i}", f"Transformer/encoderblock_{i}"
        attn = f"{b}/MultiHeadDotProductAttention_0"
        if f"{t}.norm1.weight" in sd:
            norm(f"{t}.norm1", f"{b}/LayerNorm_0")
        if f"{t}.attn.q_bias" in sd and f"{t}.attn.qkv.bias" not in sd:  # BEiT's: no key bias
            q_bias, v_bias = take(f"{t}.attn.q_bias"), take(f"{t}.attn.v_bias")
            sd[f"{t}.attn.qkv.bias"] = np.concatenate([q_bias, np.zeros_like(q_bias), v_bias])
        if f"{t}.attn.qkv.weight" in sd:
            w, bias = take(f"{t}.attn.qkv.weight"), take(f"{t}.attn.qkv.bias")
            d = w.shape[1] if w.ndim == 2 else 0
            if w.shape != (3 * d, d) or bias.shape != (3 * d,) or d % num_heads:
                raise WeightMappingError(
                    f"{t}.attn.qkv weight {w.shape} and bias {bias.shape} do not split into "
                    f"query, key and value of {num_heads} heads (needs ({3 * d}, {d}) and "
                    f"({3 * d},), width {d} a multiple of {num_heads}): check the model's width "
                    "and heads"
                )
            for j, name in enumerate(("query", "key", "value")):
                rows = slice(j * d, (j + 1) * d)
                out[f"{attn}/{name}/kernel"] = w[rows].T.reshape(d, num_heads, d // num_heads)
                out[f"{attn}/{name}/bias"] = bias[rows].reshape(num_heads, d // num_heads)
        if f"{t}.attn.proj.weight" in sd:
            w = take(f"{t}.attn.proj.weight")
            if w.ndim != 2 or w.shape[1] % num_heads:
                raise WeightMappingError(
                    f"{t}.attn.proj weight {w.shape} does not split into {num_heads} heads: "
                    "check the model's width and heads"
                )
            out[f"{attn}/out/kernel"] = w.T.reshape(num_heads, -1, w.shape[0])
            out[f"{attn}/out/bias"] = take(f"{t}.attn.proj.bias")
        if f"{t}.norm2.weight" in sd:
            norm(f"{t}.norm2", f"{b}/LayerNorm_1")
        for scale, beit in (("ls1", "gamma_1"), ("ls2", "gamma_2")):
            for key in (f"{t}.{scale}.gamma", f"{t}.{beit}"):
                if key in sd:
                    out[f"{b}/{scale}"] = take(key)
        if f"{t}.attn.relative_position_bias_table" in sd:  # BEiT's
            out[f"{b}/relative_position_bias_table"] = take(
                f"{t}.attn.relative_position_bias_table"
            )
            sd.pop(f"{t}.attn.relative_position_index", None)  # computed, not read
        elif shared_table is not None:
            out[f"{b}/relative_position_bias_table"] = shared_table
        # DINOv2's fused SwiGLU: `w12` (both halves), `w3`, as timm's packed `fc1`, `fc2`.
        mlp = (("fc1", "Dense_0"), ("fc2", "Dense_1"), ("w12", "Dense_0"), ("w3", "Dense_1"))
        for fc, dense_name in mlp:
            if f"{t}.mlp.{fc}.weight" in sd:
                dense(f"{t}.mlp.{fc}", f"{b}/MlpBlock_0/{dense_name}")
    if "attn_pool.latent" in sd:  # timm's AttentionPoolLatent: big_vision's MAPHead
        head, d = "MAPHead_0", sd["attn_pool.latent"].shape[-1]
        out[f"{head}/probe"] = take("attn_pool.latent")
        mha = f"{head}/MultiHeadDotProductAttention_0"
        kv_w, kv_b = take("attn_pool.kv.weight"), take("attn_pool.kv.bias")
        parts = {
            "query": (take("attn_pool.q.weight"), take("attn_pool.q.bias")),
            "key": (kv_w[:d], kv_b[:d]),
            "value": (kv_w[d:], kv_b[d:]),
        }
        for name, (w, b) in parts.items():
            out[f"{mha}/{name}/kernel"] = w.T.reshape(d, num_heads, d // num_heads)
            out[f"{mha}/{name}/bias"] = b.reshape(num_heads, d // num_heads)
        w = take("attn_pool.proj.weight")
        out[f"{mha}/out/kernel"] = w.T.reshape(num_heads, d // num_heads, d)
        out[f"{mha}/out/bias"] = take("attn_pool.proj.bias")
        norm("attn_pool.norm", f"{head}/LayerNorm_0")
        dense("attn_pool.mlp.fc1", f"{head}/MlpBlock_0/Dense_0")
        dense("attn_pool.mlp.fc2", f"{head}/MlpBlock_0/Dense_1")
    if "norm.weight" in sd:
        norm("norm", "Transformer/encoder_norm")
    if "fc_norm.weight" in sd:  # timm's norm after pooling (MAE's fine-tuned ViTs)
        norm("fc_norm", "fc_norm")
    if "head.weight" in sd:
        dense("head", "head")
    if "head_dist.weight" in sd:  # DeiT's distillation head
        dense("head_dist", "head_dist")
    out.update(sd)  # no rule: reported by name when the parameters are fitted
    return out

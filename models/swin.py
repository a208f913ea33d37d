"""Swin Transformer T/S/B (Liu et al., 2021) in torchvision's layout (`swin_t`, ...); timm's
and Hugging Face's names load too.

Paths: `features` -> `0` (patch embedding: `0` conv 4x4 stride 4, `2` LayerNorm), then
stages `1`, `3`, `5`, `7` (blocks `N` -> `norm1`, `attn` (`qkv`, `proj` and the
`relative_position_bias_table`), `norm2`, `mlp` -> `0` Linear, `1` GELU, `3` Linear) and
patch merging `2`, `4`, `6` (`norm`, `reduction`), then `norm`, the mean over the map, `head`.
Blocks attend within 7x7 windows, every second one within windows shifted by 3 (none where
the map is no larger than a window), as torchvision's `shifted_window_attention` computes it:
the map padded to whole windows, the shifted regions masked by -100, no stochastic depth at
inference. Every stage's output is a map [B, H, W, C]. Aliases: `stem` (56 pixels square at
224) and `stage1`..`stage4` (the stages' outputs: 56, 28, 14 and 7).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.models import torch_import
from jaxdissect.models.layers import FOUR_STAGE_ALIASES, GELU, layer_norm
from jaxdissect.preprocess import TORCHVISION, InputSpec

# torchvision's: LayerNorm epsilon 1e-5, 7x7 windows, 4x4 patches, MLP ratio 4.
_EPSILON = 1e-5
_WINDOW = 7
_PATCH = 4
# Variant -> (embedding width, blocks per stage, heads per stage).
VARIANTS: dict[str, tuple[int, tuple[int, ...], tuple[int, ...]]] = {
    "t": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "s": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "b": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}
# The additive mask between tokens of different regions of a shifted window (torchvision's).
_MASKED = -100.0


def _layer_norm(name: str) -> nn.LayerNorm:
    return layer_norm(_EPSILON, name)


def relative_position_index(window: int) -> np.ndarray:
    """[window**2 * window**2] index into the bias table of each (query, key) pair of a
    window's tokens (row-major), as torchvision's `define_relative_coords` builds it."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    flat = coords.reshape(2, -1)
    relative = (flat[:, :, None] - flat[:, None, :]).transpose(1, 2, 0) + (window - 1)
    return (relative[..., 0] * (2 * window - 1) + relative[..., 1]).reshape(-1)


def shift_mask(height: int, width: int, window: int, shift: tuple[int, int]) -> np.ndarray:
    """[windows, window**2, window**2] additive mask of a shifted window partition of a
    height x width map (multiples of `window`): 0 within a region, -100 across regions."""
    regions = np.zeros((height, width))
    h_slices = ((0, -window), (-window, -shift[0]), (-shift[0], None))
    w_slices = ((0, -window), (-window, -shift[1]), (-shift[1], None))
    for count, (h, w) in enumerate((h, w) for h in h_slices for w in w_slices):
        regions[h[0] : h[1], w[0] : w[1]] = count
    regions = regions.reshape(height // window, window, width // window, window)
    regions = regions.transpose(0, 2, 1, 3).reshape(-1, window * window)
    differ = regions[:, None, :] - regions[:, :, None]
    return np.where(differ != 0, _MASKED, 0.0).astype(np.float32)


class ShiftedWindowAttention(nn.Module):
    """Multi-head self-attention within (shifted) windows, with a learned bias per relative
    position and head (torchvision's `ShiftedWindowAttention`)."""

    num_heads: int
    window: int = _WINDOW
    shift: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        ws, heads = self.window, self.num_heads
        table = self.param(
            "relative_position_bias_table",
            nn.initializers.truncated_normal(0.02),
            ((2 * ws - 1) ** 2, heads),
            jnp.float32,
        )
        x = jnp.pad(x, ((0, 0), (0, -h % ws), (0, -w % ws), (0, 0)))
        ph, pw = x.shape[1], x.shape[2]
        shift = (0 if ws >= ph else self.shift, 0 if ws >= pw else self.shift)
        if any(shift):
            x = jnp.roll(x, (-shift[0], -shift[1]), axis=(1, 2))
        nh, nw, n = ph // ws, pw // ws, ws * ws
        x = x.reshape(b, nh, ws, nw, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
        qkv = nn.Dense(3 * c, name="qkv")(x).reshape(-1, n, 3, heads, c // heads)
        q, k, v = qkv.transpose(2, 0, 3, 1, 4)
        attn = (q * (c // heads) ** -0.5) @ k.swapaxes(-2, -1)
        bias = table[relative_position_index(ws)].reshape(n, n, heads).transpose(2, 0, 1)
        attn = attn + bias.astype(attn.dtype)
        if any(shift):
            mask = jnp.asarray(shift_mask(ph, pw, ws, shift), attn.dtype)
            attn = (attn.reshape(b, nh * nw, heads, n, n) + mask[None, :, None]).reshape(
                -1, heads, n, n
            )
        x = (jax.nn.softmax(attn, axis=-1) @ v).swapaxes(1, 2).reshape(-1, n, c)
        x = nn.Dense(c, name="proj")(x)
        x = x.reshape(b, nh, nw, ws, ws, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c)
        if any(shift):
            x = jnp.roll(x, shift, axis=(1, 2))
        return x[:, :h, :w]


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        return nn.Dense(c, name="3")(GELU(name="1")(nn.Dense(4 * c, name="0")(x)))


class SwinBlock(nn.Module):
    """x + attn(norm1(x)), then x + mlp(norm2(x)) (torchvision's `SwinTransformerBlock`)."""

    num_heads: int
    shift: int = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        attn = ShiftedWindowAttention(self.num_heads, shift=self.shift, name="attn")
        x = x + attn(_layer_norm("norm1")(x))
        return x + _Mlp(name="mlp")(_layer_norm("norm2")(x))


class PatchMerging(nn.Module):
    """Each 2x2 neighbourhood's channels side by side (padded to even sides), normalised and
    reduced to twice the width (torchvision's `PatchMerging`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)))
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1
        )
        return nn.Dense(2 * c, use_bias=False, name="reduction")(_layer_norm("norm")(x))


class _PatchEmbedding(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.width, (_PATCH, _PATCH), strides=_PATCH, padding="VALID", name="0")(x)
        return _layer_norm("2")(x)


class _Stage(nn.Module):
    blocks: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.blocks):
            x = SwinBlock(self.num_heads, 0 if i % 2 == 0 else _WINDOW // 2, name=str(i))(x)
        return x


class _Features(nn.Module):
    width: int
    depths: tuple[int, ...]
    heads: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _PatchEmbedding(self.width, name="0")(x)
        for i, (blocks, heads) in enumerate(zip(self.depths, self.heads, strict=True)):
            if i:
                x = PatchMerging(name=str(2 * i))(x)
            x = _Stage(blocks, heads, name=str(2 * i + 1))(x)
        return x


class SwinTransformer(nn.Module):
    """torchvision's Swin Transformer (v1); `__call__(x, train=False)` takes NHWC input
    normalised by `input_spec` (no dropout or batch statistics: the same in training and
    evaluation).

    Attributes:
      width: the patch embedding's channels (each stage doubles them).
      depths: blocks of the four stages.
      heads: attention heads of the four stages.
      num_classes: logits of `head`; 0 builds none (the output is the pooled features).
      input_spec: the input normalisation the weights expect.
    """

    width: int = VARIANTS["t"][0]
    depths: tuple[int, ...] = VARIANTS["t"][1]
    heads: tuple[int, ...] = VARIANTS["t"][2]
    num_classes: int = 1000
    input_spec: InputSpec = TORCHVISION

    layer_aliases: ClassVar[Mapping[str, str]] = FOUR_STAGE_ALIASES
    default_layers: ClassVar[tuple[str, ...]] = ("stage4",)

    def __post_init__(self):
        if len(self.depths) != 4 or len(self.heads) != 4:
            raise ValueError(f"depths={self.depths!r}, heads={self.heads!r}: four stages each")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = _Features(self.width, tuple(self.depths), tuple(self.heads), name="features")(x)
        x = _layer_norm("norm")(x).mean(axis=(1, 2))
        if not self.num_classes:  # no head: the pooled features
            return x
        return nn.Dense(self.num_classes, name="head")(x)

    def import_state_dict(
        self, state_dict: Mapping[str, Any], variables: Mapping[str, Any]
    ) -> dict[str, Any]:
        """`variables` filled from a torchvision `swin_*` state dict, a timm one
        (`timm_to_torchvision`) or a Hugging Face one (`hf_to_torchvision`); buffers
        (relative position indices, which `relative_position_index` computes, and timm's
        attention masks) left out."""
        if any(k.startswith(("patch_embed.", "layers.")) for k in state_dict):
            state_dict = timm_to_torchvision(state_dict)
        elif any(k.startswith(("swin.", "embeddings.", "encoder.")) for k in state_dict):
            state_dict = hf_to_torchvision(state_dict)
        weights = {k: v for k, v in state_dict.items() if not k.endswith(_BUFFERS)}
        return torch_import.torch_to_flax(weights, variables)


# Buffers of torchvision's and timm's Swin blocks: computed here, not read.
_BUFFERS = (".relative_position_index", ".attn_mask")
# timm's Swin block parts -> torchvision's.
_TIMM_BLOCK = {"mlp.fc1": "mlp.0", "mlp.fc2": "mlp.3"}


def timm_to_torchvision(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A timm `swin_*` state dict in torchvision's names: `patch_embed.proj` / `.norm`,
    `layers.{i}.blocks.{j}` (`mlp.fc1`, `mlp.fc2`), each stage's patch merging
    `layers.{i}.downsample` (at the start of stage i since timm 0.9, at the end of stage i
    before), `norm`, `head.fc` (or `head`). Keys with no rule are kept, so that loading lists
    them."""
    # Before timm 0.9 the first stage ends with the merge; since, the second starts with it.
    merge_after = any(k.startswith("layers.0.downsample.") for k in state_dict)
    out = torch_import.RenamedKeys()
    for key, value in state_dict.items():
        stem, _, leaf = key.rpartition(".")
        block = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", stem)
        merge = re.fullmatch(r"layers\.(\d+)\.downsample\.(norm|reduction)", stem)
        if block:
            part = _TIMM_BLOCK.get(block[3], block[3])
            out[f"features.{2 * int(block[1]) + 1}.{block[2]}.{part}.{leaf}"] = value
        elif merge:
            index = 2 * int(merge[1]) + (2 if merge_after else 0)
            out[f"features.{index}.{merge[2]}.{leaf}"] = value
        elif stem in ("patch_embed.proj", "patch_embed.norm"):
            out[f"features.0.{0 if stem.endswith('proj') else 2}.{leaf}"] = value
        elif stem in ("head.fc", "head"):
            out[f"head.{leaf}"] = value
        else:
            out[key] = value
    return out


def _variant(name: str, num_classes: int, input_spec: InputSpec) -> SwinTransformer:
    width, depths, heads = VARIANTS[name]
    return SwinTransformer(width, depths, heads, num_classes, input_spec)


def swin_t(*, num_classes: int = 1000, input_spec: InputSpec = TORCHVISION) -> SwinTransformer:
    """torchvision Swin-T (28,288,354 parameters at 1000 classes)."""
    return _variant("t", num_classes, input_spec)


def swin_s(*, num_classes: int = 1000, input_spec: InputSpec = TORCHVISION) -> SwinTransformer:
    """torchvision Swin-S (49,606,258 parameters at 1000 classes)."""
    return _variant("s", num_classes, input_spec)


def swin_b(*, num_classes: int = 1000, input_spec: InputSpec = TORCHVISION) -> SwinTransformer:
    """torchvision Swin-B (87,768,224 parameters at 1000 classes)."""
    return _variant("b", num_classes, input_spec)


# Hugging Face's Swin (`SwinModel`; `SwinForImageClassification` under `swin.`) block parts
# -> torchvision's.
_HF_BLOCK = {
    "layernorm_before": "norm1",
    "attention.output.dense": "attn.proj",
    "layernorm_after": "norm2",
    "intermediate.dense": "mlp.0",
    "output.dense": "mlp.3",
}
_HF_NAMES = {
    "embeddings.patch_embeddings.projection": "features.0.0",
    "embeddings.norm": "features.0.2",
    "layernorm": "norm",
    "classifier": "head",
}


def hf_to_torchvision(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face `SwinModel` / `SwinForImageClassification` state dict in torchvision's
    names: `encoder.layers.{i}.blocks.{j}` (its separate query, key and value stacked as
    `qkv`), each stage's patch merging `encoder.layers.{i}.downsample` (at its end),
    `layernorm`, `classifier`. Keys with no rule are kept, so that loading lists them."""
    out = torch_import.RenamedKeys()
    qkv: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        name = key.removeprefix("swin.")
        stem, _, leaf = name.rpartition(".")
        block = re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", stem)
        merge = re.fullmatch(r"encoder\.layers\.(\d+)\.downsample\.(norm|reduction)", stem)
        prefix = block and f"features.{2 * int(block[1]) + 1}.{block[2]}"
        if block and (part := re.fullmatch(r"attention\.self\.(query|key|value)", block[3])):
            qkv.setdefault(f"{prefix}.attn.qkv.{leaf}", {})[part[1]] = np.asarray(value)
        elif block and block[3] == "attention.self":  # its bias table and index buffer
            out[f"{prefix}.attn.{leaf}"] = value
        elif block and block[3] in _HF_BLOCK:
            out[f"{prefix}.{_HF_BLOCK[block[3]]}.{leaf}"] = value
        elif merge:
            out[f"features.{2 * int(merge[1]) + 2}.{merge[2]}.{leaf}"] = value
        elif stem in _HF_NAMES:
            out[f"{_HF_NAMES[stem]}.{leaf}"] = value
        else:
            out[key] = value
    out.update(torch_import.stacked_qkv(qkv))
    return out

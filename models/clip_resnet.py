"""CLIP's ResNet image towers (OpenAI's `ModifiedResNet`: RN50, RN101, RN50x4, RN50x16,
RN50x64) in its layout.

The differences from torchvision's ResNet: a stem of three 3x3 convolutions (`conv1`..
`conv3`, `bn1`..`bn3`, `relu1`..`relu3`) and a 2x2 average pool (`avgpool`); a Bottleneck
strides by a 2x2 average pool after its 3x3 conv (`avgpool`) and its shortcut by one before
its 1x1 conv (`downsample` -> `-1` pool, `0` conv, `1` BN); and attention pooling
(`attnpool`: the mean token, prepended, attends over the 7x7 grid (9x9, 12x12, 14x14 for
RN50x4, x16, x64) with a
learned `positional_embedding`; `q_proj`, `k_proj`, `v_proj`, `c_proj` to the embedding).
The output is the image embedding (`embed_dim` wide). Weights: OpenAI's own `.pt`
(TorchScript, read as data) or open_clip's checkpoint, their `visual.` keys. `layer1`..
`layer4` are the stages (layer4: the units of OpenAI's "Multimodal Neurons" study).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxdissect.models.layers import (
    AvgPool2d,
    BatchNorm2d,
    Identity,
    ReLU,
    bias_free_conv2d,
    kaiming_normal_fan_out,
    linear,
)
from jaxdissect.preprocess import CLIP, InputSpec

_conv = functools.partial(bias_free_conv2d, kernel_init=kaiming_normal_fan_out)
# Variant -> (blocks per stage, width, embedding width, input resolution).
VARIANTS: dict[str, tuple[tuple[int, int, int, int], int, int, int]] = {
    "RN50": ((3, 4, 6, 3), 64, 1024, 224),
    "RN101": ((3, 4, 23, 3), 64, 512, 224),
    "RN50x4": ((4, 6, 10, 6), 80, 640, 288),
    "RN50x16": ((6, 8, 18, 8), 96, 768, 384),
    "RN50x64": ((3, 15, 36, 10), 128, 1024, 448),
}
# open_clip's and OpenAI's whole CLIP: the image tower under this prefix.
VISUAL = "visual."


class Bottleneck(nn.Module):
    """1x1, 3x3, (2x2 average pool where it strides), 1x1 with 4x the channels; shortcut."""

    planes: int
    stride: int = 1
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        def bn(name: str) -> nn.Module:
            return BatchNorm2d(use_running_average=not self.train, name=name)

        out = ReLU(name="relu1")(bn("bn1")(_conv(self.planes, 1, 1, 0, x, "conv1")(x)))
        out = ReLU(name="relu2")(bn("bn2")(_conv(self.planes, 3, 1, 1, out, "conv2")(out)))
        if self.stride > 1:
            out = AvgPool2d(self.stride, name="avgpool")(out)
        else:
            out = Identity(name="avgpool")(out)
        out = bn("bn3")(_conv(4 * self.planes, 1, 1, 0, out, "conv3")(out))
        if self.stride > 1 or x.shape[-1] != 4 * self.planes:
            x = _Downsample(4 * self.planes, self.stride, self.train, name="downsample")(x)
        return ReLU(name="relu3")(out + x)


class _Downsample(nn.Module):
    features: int
    stride: int
    train: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.stride > 1:
            x = AvgPool2d(self.stride, name="-1")(x)
        x = _conv(self.features, 1, 1, 0, x, "0")(x)
        return BatchNorm2d(use_running_average=not self.train, name="1")(x)


class _Layer(nn.Module):
    planes: int
    blocks: int
    stride: int
    train: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.blocks):
            stride = self.stride if i == 0 else 1
            x = Bottleneck(self.planes, stride, self.train, name=str(i))(x)
        return x


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling: the mean of the grid's tokens, prepended, plus the
    position embedding, is the one query over all of them (`num_heads` heads)."""

    num_heads: int
    output_dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        tokens = x.reshape(n, h * w, c)
        tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
        init = nn.initializers.normal(c**-0.5)
        tokens = tokens + self.param("positional_embedding", init, (h * w + 1, c), x.dtype)
        q = linear(c, in_features=c, name="q_proj")(tokens[:, :1])
        k = linear(c, in_features=c, name="k_proj")(tokens)
        v = linear(c, in_features=c, name="v_proj")(tokens)
        d = c // self.num_heads

        def heads(t: jax.Array) -> jax.Array:
            return t.reshape(n, t.shape[1], self.num_heads, d)

        logits = jnp.einsum("nqhd,nkhd->nhqk", heads(q) * d**-0.5, heads(k))
        out = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, axis=-1), heads(v))
        out = out.reshape(n, c)
        return linear(self.output_dim, in_features=c, name="c_proj")(out)


class CLIPResNet(nn.Module):
    """OpenAI CLIP's `ModifiedResNet`; `__call__(x, train=False)` takes NHWC input
    normalised by `input_spec` (CLIP's, at the variant's resolution) and returns the image
    embedding.

    Attributes:
      layers: Bottleneck blocks per stage.
      width: the stem's output channels (stages: 4x, 8x, 16x, 32x it out).
      embed_dim: the embedding's width (`attnpool.c_proj`).
      num_heads: attention pooling's heads (OpenAI: width * 32 // 64).
      input_spec: the input (its size fixes the pooling's position embedding).
    """

    layers: tuple[int, int, int, int] = VARIANTS["RN50"][0]
    width: int = 64
    embed_dim: int = 1024
    num_heads: int = 32
    input_spec: InputSpec = CLIP

    layer_aliases: ClassVar[Mapping[str, str]] = {"stem": "avgpool"}
    default_layers: ClassVar[tuple[str, ...]] = ("layer4",)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        half = self.width // 2
        for i, features in enumerate((half, half, self.width), start=1):
            x = _conv(features, 3, 2 if i == 1 else 1, 1, x, f"conv{i}")(x)
            x = BatchNorm2d(use_running_average=not train, name=f"bn{i}")(x)
            x = ReLU(name=f"relu{i}")(x)
        x = AvgPool2d(2, name="avgpool")(x)
        for i, blocks in enumerate(self.layers):
            x = _Layer(self.width * 2**i, blocks, 1 if i == 0 else 2, train, name=f"layer{i + 1}")(
                x
            )
        return AttentionPool2d(self.num_heads, self.embed_dim, name="attnpool")(x)

    def import_state_dict(
        self, state_dict: Mapping[str, Any], variables: Mapping[str, Any]
    ) -> dict[str, Any]:
        """`variables` filled from OpenAI's or open_clip's state dict (its `visual.` keys;
        the text tower's are left out) or the image tower's alone."""
        from jaxdissect.models import torch_import

        if any(k.startswith(VISUAL) for k in state_dict):
            state_dict = {
                k.removeprefix(VISUAL): v for k, v in state_dict.items() if k.startswith(VISUAL)
            }
        state_dict = dict(state_dict)
        path = ("params", "attnpool", "positional_embedding")
        flat = traverse_util.flatten_dict(dict(variables))
        position = state_dict.pop("attnpool.positional_embedding", None)
        rest = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p != path})
        out = torch_import.torch_to_flax(state_dict, rest)
        if position is None or np.shape(position) != tuple(flat[path].shape):
            got = "none" if position is None else f"shape {np.shape(position)}"
            raise torch_import.WeightMappingError(
                f"attnpool.positional_embedding: {got}, the model needs "
                f"{tuple(flat[path].shape)} (the input resolution: --input_size, or the "
                "variant)"
            )
        merged = traverse_util.flatten_dict(out)
        merged[path] = np.asarray(position, dtype=flat[path].dtype)
        return traverse_util.unflatten_dict(merged)


def _variant(name: str, num_classes: int | None, input_spec: InputSpec | None) -> CLIPResNet:
    layers, width, embed_dim, size = VARIANTS[name]
    spec = input_spec or dataclasses.replace(CLIP, size=size)
    return CLIPResNet(layers, width, num_classes or embed_dim, width * 32 // 64, spec)


def clip_rn50(*, num_classes: int | None = None, input_spec: InputSpec | None = None) -> CLIPResNet:
    """CLIP RN50's image tower (`num_classes`: the embedding's width, 1024; 224 px)."""
    return _variant("RN50", num_classes, input_spec)


def clip_rn101(
    *, num_classes: int | None = None, input_spec: InputSpec | None = None
) -> CLIPResNet:
    """CLIP RN101's image tower (`num_classes`: the embedding's width, 512; 224 px)."""
    return _variant("RN101", num_classes, input_spec)


def clip_rn50x4(
    *, num_classes: int | None = None, input_spec: InputSpec | None = None
) -> CLIPResNet:
    """CLIP RN50x4's image tower (`num_classes`: the embedding's width, 640; 288 px)."""
    return _variant("RN50x4", num_classes, input_spec)


def clip_rn50x16(
    *, num_classes: int | None = None, input_spec: InputSpec | None = None
) -> CLIPResNet:
    """CLIP RN50x16's image tower (`num_classes`: the embedding's width, 768; 384 px)."""
    return _variant("RN50x16", num_classes, input_spec)


def clip_rn50x64(
    *, num_classes: int | None = None, input_spec: InputSpec | None = None
) -> CLIPResNet:
    """CLIP RN50x64's image tower (`num_classes`: the embedding's width, 1024; 448 px)."""
    return _variant("RN50x64", num_classes, input_spec)

"""ConvNeXt-T/S/B/L (Liu et al., 2022) in torchvision's layout; timm's and Hugging Face's
names load too.

Paths: `features` -> `0` (stem: `0` conv 4x4 stride 4, `1` LayerNorm), then stages `1`, `3`,
`5`, `7` (blocks `N` -> `block` -> `0` depthwise 7x7 conv, `2` LayerNorm, `3` Linear, `4`
GELU, `5` Linear; `layer_scale`) and downsampling `2`, `4`, `6` (`0` LayerNorm, `1` conv 2x2
stride 2), then `avgpool`, `classifier` -> `0` LayerNorm, `2` Linear. A block's output is
x + layer_scale * block(x) (no stochastic depth at inference). Aliases: `stem` (56 pixels
square at 224) and `stage1`..`stage4` (the stages' outputs: 56, 28, 14 and 7).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import numpy as np

from jaxdissect.models import torch_import
from jaxdissect.models.layers import (
    FOUR_STAGE_ALIASES,
    GELU,
    AdaptiveAvgPool2d,
    DepthwiseConv2d,
    layer_norm,
)
from jaxdissect.preprocess import TORCHVISION, InputSpec

# torchvision's: LayerNorm epsilon 1e-6; weights trunc_normal(std=0.02), biases 0; the layer
# scale starts at 1e-6.
_EPSILON = 1e-6
_KERNEL_INIT = nn.initializers.truncated_normal(0.02)
_LAYER_SCALE_INIT = 1e-6
# Variant -> (widths, blocks per stage).
VARIANTS: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "tiny": ((96, 192, 384, 768), (3, 3, 9, 3)),
    "small": ((96, 192, 384, 768), (3, 3, 27, 3)),
    "base": ((128, 256, 512, 1024), (3, 3, 27, 3)),
    "large": ((192, 384, 768, 1536), (3, 3, 27, 3)),
}


def _layer_norm(name: str) -> nn.LayerNorm:
    return layer_norm(_EPSILON, name)


def _conv(features: int, kernel: int, name: str) -> nn.Conv:
    """A patchifying conv: kernel = stride, no padding (the stem's 4x4, downsampling's 2x2)."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(kernel, kernel),
        padding="VALID",
        kernel_init=_KERNEL_INIT,
        name=name,
    )


def _linear(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=_KERNEL_INIT, name=name)


class LayerScale(nn.Module):
    """A learned per-channel `scale` (torchvision's `layer_scale`, timm's `gamma`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.constant(_LAYER_SCALE_INIT)
        return x * self.param("scale", init, (x.shape[-1],), x.dtype)


class _Block(nn.Module):
    """torchvision's `CNBlock.block`: depthwise conv, LayerNorm, Linear, GELU, Linear."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        # XLA:CPU's grouped convolutions are slow: the shifted multiply-adds there.
        x = DepthwiseConv2d(7, kernel_init=_KERNEL_INIT, use_bias=True, name="0")(x)
        x = _layer_norm("2")(x)
        x = GELU(name="4")(_linear(4 * c, "3")(x))
        return _linear(c, "5")(x)


class CNBlock(nn.Module):
    """x + layer_scale * block(x)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x + LayerScale(name="layer_scale")(_Block(name="block")(x))


class _Stage(nn.Module):
    blocks: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.blocks):
            x = CNBlock(name=str(i))(x)
        return x


class _Stem(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _layer_norm("1")(_conv(self.width, 4, "0")(x))


class _Downsample(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv(self.width, 2, "1")(_layer_norm("0")(x))


class _Features(nn.Module):
    widths: tuple[int, ...]
    depths: tuple[int, ...]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _Stem(self.widths[0], name="0")(x)
        for i, (width, blocks) in enumerate(zip(self.widths, self.depths, strict=True)):
            if i:
                x = _Downsample(width, name=str(2 * i))(x)
            x = _Stage(blocks, name=str(2 * i + 1))(x)
        return x


class _Classifier(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _layer_norm("0")(x.reshape(x.shape[0], -1))
        if not self.num_classes:  # no head: the normalised pooled features (timm's as well)
            return x
        return _linear(self.num_classes, "2")(x)


class ConvNeXt(nn.Module):
    """torchvision's ConvNeXt; `__call__(x, train=False)` takes NHWC input normalised by
    `input_spec` (no dropout or batch statistics: the same in training and evaluation).

    Attributes:
      widths: channels of the four stages.
      depths: blocks of the four stages.
      num_classes: logits of `classifier.2`; 0 builds none (the output is the pooled
        features after `classifier.0`'s LayerNorm, as timm's `num_classes=0`).
      input_spec: the input normalisation the weights expect.
    """

    widths: tuple[int, ...] = VARIANTS["tiny"][0]
    depths: tuple[int, ...] = VARIANTS["tiny"][1]
    num_classes: int = 1000
    input_spec: InputSpec = TORCHVISION

    layer_aliases: ClassVar[Mapping[str, str]] = FOUR_STAGE_ALIASES
    default_layers: ClassVar[tuple[str, ...]] = ("stage4",)

    def __post_init__(self):
        if len(self.widths) != 4 or len(self.depths) != 4:
            raise ValueError(f"widths={self.widths!r}, depths={self.depths!r}: four stages each")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = _Features(tuple(self.widths), tuple(self.depths), name="features")(x)
        x = AdaptiveAvgPool2d(1, name="avgpool")(x)
        return _Classifier(self.num_classes, name="classifier")(x)

    def import_state_dict(
        self, state_dict: Mapping[str, Any], variables: Mapping[str, Any]
    ) -> dict[str, Any]:
        """`variables` filled from a torchvision `convnext_*` state dict, a timm one (`stem`,
        `stages`, `conv_dw`, `gamma`, `head`; `timm_to_torchvision`) or a Hugging Face one
        (`ConvNextForImageClassification`; `hf_to_torchvision`)."""
        if any(k.startswith(("stem.", "stages.")) for k in state_dict):
            state_dict = timm_to_torchvision(state_dict)
        elif any(k.startswith(("convnext.", "embeddings.", "encoder.")) for k in state_dict):
            state_dict = hf_to_torchvision(state_dict)
        renamed = {}
        for key, value in state_dict.items():
            if key.endswith(".layer_scale"):  # [C, 1, 1] -> LayerScale's [C]
                key, value = f"{key}.weight", np.asarray(value).reshape(-1)
            renamed[key] = value
        return torch_import.torch_to_flax(renamed, variables)


# timm's ConvNeXt names -> torchvision's (stages from 0; its downsampling inside the next
# stage; a block's parts by name; the head's norm and fc).
_TIMM_BLOCK = {"conv_dw": "block.0", "norm": "block.2", "mlp.fc1": "block.3", "mlp.fc2": "block.5"}


def timm_to_torchvision(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A timm `convnext_*` state dict in torchvision's names (keys with no rule are kept, so
    that loading lists them)."""
    out = torch_import.RenamedKeys()
    for key, value in state_dict.items():
        stem, _, leaf = key.rpartition(".")
        gamma = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)", stem)
        block = re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", stem)
        down = re.fullmatch(r"stages\.(\d+)\.downsample\.([01])", stem)
        if gamma and leaf == "gamma":
            out[f"features.{2 * int(gamma[1]) + 1}.{gamma[2]}.layer_scale"] = value
        elif block and block[3] in _TIMM_BLOCK:
            stage = 2 * int(block[1]) + 1
            out[f"features.{stage}.{block[2]}.{_TIMM_BLOCK[block[3]]}.{leaf}"] = value
        elif down:
            out[f"features.{2 * int(down[1])}.{down[2]}.{leaf}"] = value
        elif stem in ("stem.0", "stem.1"):
            out[f"features.0.{stem[-1]}.{leaf}"] = value
        elif stem in ("head.norm", "head.fc"):
            out[f"classifier.{0 if stem == 'head.norm' else 2}.{leaf}"] = value
        else:
            out[key] = value
    return out


# Hugging Face's ConvNeXt block parts -> torchvision's.
_HF_BLOCK = {
    "dwconv": "block.0",
    "layernorm": "block.2",
    "pwconv1": "block.3",
    "pwconv2": "block.5",
}
_HF_NAMES = {
    "embeddings.patch_embeddings": "features.0.0",
    "embeddings.layernorm": "features.0.1",
    "layernorm": "classifier.0",
    "classifier": "classifier.2",
}


def hf_to_torchvision(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face `ConvNextModel` / `ConvNextForImageClassification` state dict
    (`convnext.`) in torchvision's names: `encoder.stages.{i}.layers.{j}` (`dwconv`,
    `layernorm`, `pwconv1`, `pwconv2`, `layer_scale_parameter`), each stage's
    `downsampling_layer` (stage 0's is none), `layernorm` and `classifier` as torchvision's
    classifier. Keys with no rule are kept, so that loading lists them."""
    out = torch_import.RenamedKeys()
    for key, value in state_dict.items():
        name = key.removeprefix("convnext.")
        stem, _, leaf = name.rpartition(".")
        block = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)(?:\.(.+))?", stem)
        down = re.fullmatch(r"encoder\.stages\.(\d+)\.downsampling_layer\.([01])", stem)
        if block and leaf == "layer_scale_parameter" and block[3] is None:
            out[f"features.{2 * int(block[1]) + 1}.{block[2]}.layer_scale"] = value
        elif block and block[3] in _HF_BLOCK:
            stage = 2 * int(block[1]) + 1
            out[f"features.{stage}.{block[2]}.{_HF_BLOCK[block[3]]}.{leaf}"] = value
        elif down:
            out[f"features.{2 * int(down[1])}.{down[2]}.{leaf}"] = value
        elif stem in _HF_NAMES:
            out[f"{_HF_NAMES[stem]}.{leaf}"] = value
        else:
            out[key] = value
    return out


def _variant(name: str, num_classes: int, input_spec: InputSpec) -> ConvNeXt:
    widths, depths = VARIANTS[name]
    return ConvNeXt(widths, depths, num_classes, input_spec)


def convnext_tiny(*, num_classes: int = 1000, input_spec: InputSpec = TORCHVISION) -> ConvNeXt:
    """torchvision ConvNeXt-Tiny (28,589,128 parameters at 1000 classes)."""
    return _variant("tiny", num_classes, input_spec)


def convnext_small(*, num_classes: int = 1000, input_spec: InputSpec = TORCHVISION) -> ConvNeXt:
    """torchvision ConvNeXt-Small (50,223,688 parameters at 1000 classes)."""
    return _variant("small", num_classes, input_spec)


def convnext_base(*, num_classes: int = 1000, input_spec: InputSpec = TORCHVISION) -> ConvNeXt:
    """torchvision ConvNeXt-Base (88,591,464 parameters at 1000 classes)."""
    return _variant("base", num_classes, input_spec)


def convnext_large(*, num_classes: int = 1000, input_spec: InputSpec = TORCHVISION) -> ConvNeXt:
    """torchvision ConvNeXt-Large (197,767,336 parameters at 1000 classes)."""
    return _variant("large", num_classes, input_spec)

"""DenseNet-161 in torchvision's layout.

Paths: `features` -> `conv0`, `norm0`, `relu0`, `pool0`, `denseblockN` ->
`denselayerM` -> `norm1`, `relu1`, `conv1`, `norm2`, `relu2`, `conv2`;
`transitionN` -> `norm`, `relu`, `conv`, `pool`; `norm5`; then `classifier`.
torchvision applies its final ReLU functionally (in place, so a hook on
`features` sees it applied or not depending on timing); here it is a module
named `relu` after `features`, and `features` is always the pre-ReLU `norm5`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdissect.models.layers import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm2d,
    MaxPool2d,
    ReLU,
    bias_free_conv2d,
    kaiming_normal_fan_in,
    linear,
    scale_channels,
)
from jaxdissect.preprocess import TORCHVISION, InputSpec

_conv = functools.partial(bias_free_conv2d, kernel_init=kaiming_normal_fan_in)


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (bn_size * growth) then BN-ReLU-3x3 conv (growth)."""

    growth_rate: int
    bn_size: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        y = BatchNorm2d(use_running_average=not train, name="norm1")(x)
        y = ReLU(name="relu1")(y)
        y = _conv(self.bn_size * self.growth_rate, 1, 1, 0, y, "conv1")(y)
        y = BatchNorm2d(use_running_average=not train, name="norm2")(y)
        y = ReLU(name="relu2")(y)
        return _conv(self.growth_rate, 3, 1, 1, y, "conv2")(y)


class DenseBlock(nn.Module):
    """`denselayer1`..: each sees the concatenation of all earlier outputs."""

    num_layers: int
    growth_rate: int
    bn_size: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # Same channel order as torch.cat(features, 1), so conv1 weights map.
        for i in range(self.num_layers):
            new = DenseLayer(self.growth_rate, self.bn_size, name=f"denselayer{i + 1}")(x, train)
            x = jnp.concatenate([x, new], axis=-1)
        return x


class Transition(nn.Module):
    """BN-ReLU-1x1 conv halving the channels, then 2x2 average pooling."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = BatchNorm2d(use_running_average=not train, name="norm")(x)
        x = ReLU(name="relu")(x)
        x = _conv(self.features, 1, 1, 0, x, "conv")(x)
        return AvgPool2d(2, 2, name="pool")(x)


class DenseFeatures(nn.Module):
    """torchvision's `features` Sequential of DenseNet."""

    growth_rate: int
    block_config: tuple[int, ...]
    num_init_features: int
    bn_size: int

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.num_init_features, 7, 2, 3, x, "conv0")(x)
        x = BatchNorm2d(use_running_average=not train, name="norm0")(x)
        x = ReLU(name="relu0")(x)
        x = MaxPool2d(3, 2, 1, name="pool0")(x)
        for i, num_layers in enumerate(self.block_config):
            x = DenseBlock(num_layers, self.growth_rate, self.bn_size, name=f"denseblock{i + 1}")(
                x, train
            )
            if i != len(self.block_config) - 1:
                x = Transition(x.shape[-1] // 2, name=f"transition{i + 1}")(x, train)
        return BatchNorm2d(use_running_average=not train, name="norm5")(x)


class DenseNet(nn.Module):
    """torchvision DenseNet (memory-efficient checkpointing is a torch detail; not needed).

    Attributes:
      num_classes: output logits.
      width: multiplies the growth rate and the stem's channels.
      growth_rate, block_config, num_init_features, bn_size: as torchvision
        (DenseNet-161 by default).
      input_spec: the input normalisation the weights expect.
    """

    num_classes: int = 1000
    width: float = 1.0
    growth_rate: int = 48
    block_config: tuple[int, ...] = (6, 12, 36, 24)
    num_init_features: int = 96
    bn_size: int = 4
    input_spec: InputSpec = TORCHVISION

    @staticmethod
    def torch_rename(key: str) -> str | None:
        """Weight import hook: torchvision's published files use the old key names."""
        return legacy_key_rename(key)

    default_layers: ClassVar[tuple[str, ...]] = ("features",)

    @property
    def layer_aliases(self) -> Mapping[str, str]:
        """Block and transition outputs, `features` (pre-ReLU) and `relu` (after it)."""
        aliases = {}
        for i in range(1, len(self.block_config) + 1):
            aliases[f"denseblock{i}"] = f"features/denseblock{i}"
            if i < len(self.block_config):
                aliases[f"transition{i}"] = f"features/transition{i}"
        aliases.update({"norm5": "features/norm5", "features": "features", "relu": "relu"})
        return aliases

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits [B, num_classes] of a normalised NHWC batch."""
        x = DenseFeatures(
            growth_rate=scale_channels(self.growth_rate, self.width),
            block_config=self.block_config,
            num_init_features=scale_channels(self.num_init_features, self.width),
            bn_size=self.bn_size,
            name="features",
        )(x, train)
        x = ReLU(name="relu")(x)
        x = AdaptiveAvgPool2d(1, name="avgpool")(x).reshape(x.shape[0], -1)
        # torchvision zeroes the classifier bias; its weight keeps torch's default.
        return linear(
            self.num_classes,
            in_features=x.shape[-1],
            bias_init=nn.initializers.zeros,
            name="classifier",
        )(x)


# The checkpoints torchvision publishes predate its module names: `denselayer1.norm.1`
# for `denselayer1.norm1` (torchvision renames them on load with this same pattern).
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def legacy_key_rename(key: str) -> str:
    """`rename` hook for `torch_to_flax` reading torchvision's published DenseNet files."""
    match = _LEGACY_KEY.match(key)
    return match.group(1) + match.group(2) if match else key


def densenet161(
    *, num_classes: int = 1000, width: float = 1.0, input_spec: InputSpec = TORCHVISION
) -> DenseNet:
    """torchvision DenseNet-161 (28,681,000 parameters at 1000 classes)."""
    return DenseNet(num_classes=num_classes, width=width, input_spec=input_spec)

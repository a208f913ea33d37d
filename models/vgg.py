"""VGG-16 (optionally with BatchNorm) in torchvision's layout (`features.N`, `classifier.N`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import flax.linen as nn
import jax

from jaxdissect.models.layers import (
    AdaptiveAvgPool2d,
    LayerEntry,
    TorchSequential,
    conv_relu_stack,
    flatten_nchw,
    kaiming_normal_fan_out,
    scale_channels,
)
from jaxdissect.preprocess import TORCHVISION, InputSpec

# Channels per conv of each of the five stages of VGG-16 (torchvision cfg "D").
_VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def _convs(stages: tuple[tuple[int, ...], ...], width: float) -> list[tuple]:
    convs: list[tuple] = []
    for stage, channels in enumerate(stages, start=1):
        for i, n in enumerate(channels, start=1):
            convs.append(("conv", f"conv{stage}_{i}", scale_channels(n, width), 3, 1, 1))
        convs.append(("maxpool", 2, 2))
    return convs


class VGG(nn.Module):
    """torchvision VGG (`vgg16`, or `vgg16_bn` with `batch_norm`).

    Attributes:
      num_classes: output logits.
      width: multiplies every conv channel count and the 4096 hidden units.
      batch_norm: BatchNorm after each conv, as torchvision's `vgg16_bn`.
      dropout: keep the classifier's two Dropout layers; without them the
        other indices stay the same so weights still map.
      stages: conv channels per stage (VGG-16 by default).
      input_spec: the input normalisation the weights expect.
    """

    num_classes: int = 1000
    width: float = 1.0
    batch_norm: bool = False
    dropout: bool = True
    stages: tuple[tuple[int, ...], ...] = _VGG16_STAGES
    input_spec: InputSpec = TORCHVISION

    default_layers: ClassVar[tuple[str, ...]] = ("conv5_3",)

    @property
    def layer_aliases(self) -> Mapping[str, str]:
        """conv1_1..conv5_3 -> the path of the ReLU after each conv."""
        _, aliases = conv_relu_stack(_convs(self.stages, self.width), self.batch_norm)
        return {alias: f"features/{index}" for alias, index in aliases.items()}

    def _classifier(self) -> tuple[LayerEntry, ...]:
        hidden = scale_channels(4096, self.width)
        entries = [
            ("0", "linear", hidden),
            ("1", "relu"),
            ("2", "dropout", 0.5),
            ("3", "linear", hidden),
            ("4", "relu"),
            ("5", "dropout", 0.5),
            ("6", "linear", self.num_classes),
        ]
        return tuple(e for e in entries if self.dropout or e[1] != "dropout")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits [B, num_classes] of a normalised NHWC batch."""
        features, _ = conv_relu_stack(_convs(self.stages, self.width), self.batch_norm)
        zeros = nn.initializers.zeros
        x = TorchSequential(
            features, conv_kernel_init=kaiming_normal_fan_out, conv_bias_init=zeros, name="features"
        )(x, train)
        x = AdaptiveAvgPool2d((7, 7), name="avgpool")(x)
        classifier = TorchSequential(
            self._classifier(),
            linear_kernel_init=nn.initializers.normal(0.01),
            linear_bias_init=zeros,
            name="classifier",
        )
        return classifier(flatten_nchw(x), train)


def vgg16(
    *,
    num_classes: int = 1000,
    width: float = 1.0,
    batch_norm: bool = False,
    dropout: bool = True,
    input_spec: InputSpec = TORCHVISION,
) -> VGG:
    """torchvision VGG-16 (138,357,544 parameters; 138,365,992 with batch_norm)."""
    return VGG(
        num_classes=num_classes,
        width=width,
        batch_norm=batch_norm,
        dropout=dropout,
        input_spec=input_spec,
    )

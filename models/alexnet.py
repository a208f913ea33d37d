"""AlexNet in torchvision's layout (`features.N`, `avgpool`, `classifier.N`).

torchvision's AlexNet is the one-tower variant (64-192-384-256-256 channels)
fed 224x224; the original Caffe model took 227x227 and had 96-256-384-384-256
channels in two groups, which this layout does not describe.
"""

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
    scale_channels,
)
from jaxdissect.preprocess import TORCHVISION, InputSpec


def _convs(width: float) -> list[tuple]:
    c = lambda n: scale_channels(n, width)  # noqa: E731
    return [
        ("conv", "conv1", c(64), 11, 4, 2),
        ("maxpool", 3, 2),
        ("conv", "conv2", c(192), 5, 1, 2),
        ("maxpool", 3, 2),
        ("conv", "conv3", c(384), 3, 1, 1),
        ("conv", "conv4", c(256), 3, 1, 1),
        ("conv", "conv5", c(256), 3, 1, 1),
        ("maxpool", 3, 2),
    ]


class AlexNet(nn.Module):
    """torchvision AlexNet.

    Attributes:
      num_classes: output logits.
      width: multiplies every conv channel count and the 4096 hidden units.
      batch_norm: insert BatchNorm after each conv, before its ReLU (as
        torchvision's `vgg*_bn` do; torchvision has no AlexNet-BN). Shifts the
        `features` indices like theirs.
      dropout: keep the classifier's two Dropout layers; without them the
        other indices stay the same so weights still map.
      input_spec: the input normalisation the weights expect.
    """

    num_classes: int = 1000
    width: float = 1.0
    batch_norm: bool = False
    dropout: bool = True
    input_spec: InputSpec = TORCHVISION

    default_layers: ClassVar[tuple[str, ...]] = ("conv5",)

    @property
    def layer_aliases(self) -> Mapping[str, str]:
        """conv1..conv5 -> the path of the ReLU after each conv."""
        _, aliases = conv_relu_stack(_convs(self.width), self.batch_norm)
        return {alias: f"features/{index}" for alias, index in aliases.items()}

    def _classifier(self) -> tuple[LayerEntry, ...]:
        hidden = scale_channels(4096, self.width)
        entries = [
            ("0", "dropout", 0.5),
            ("1", "linear", hidden),
            ("2", "relu"),
            ("3", "dropout", 0.5),
            ("4", "linear", hidden),
            ("5", "relu"),
            ("6", "linear", self.num_classes),
        ]
        return tuple(e for e in entries if self.dropout or e[1] != "dropout")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits [B, num_classes] of a normalised NHWC batch."""
        features, _ = conv_relu_stack(_convs(self.width), self.batch_norm)
        x = TorchSequential(features, name="features")(x, train)
        x = AdaptiveAvgPool2d((6, 6), name="avgpool")(x)
        return TorchSequential(self._classifier(), name="classifier")(flatten_nchw(x), train)


def alexnet(
    *,
    num_classes: int = 1000,
    width: float = 1.0,
    batch_norm: bool = False,
    dropout: bool = True,
    input_spec: InputSpec = TORCHVISION,
) -> AlexNet:
    """torchvision AlexNet (61,100,840 parameters at 1000 classes)."""
    return AlexNet(
        num_classes=num_classes,
        width=width,
        batch_norm=batch_norm,
        dropout=dropout,
        input_spec=input_spec,
    )

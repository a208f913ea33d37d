"""A small five-conv CNN for the offline experiments (training, rotation, dynamics).

Shaped like a narrow AlexNet in torchvision's layout (`features.N`,
`classifier.N`), cheap enough to train on two CPU cores: at 112 x 112 input
the five conv layers see 56, 28, 14, 14 and 7 pixels square, low to high (at
96 x 96, as the experiments train it: 48, 24, 12, 12 and 6). A
global average pool (not AlexNet's 6 x 6 flatten) feeds the classifier, so
any input size works. Aliases `conv1`..`conv5` name the ReLU after each conv.
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
    kaiming_normal_fan_out,
    scale_channels,
)
from jaxdissect.preprocess import TORCHVISION, InputSpec

IMAGE_SIZE = 112


def _convs(width: float) -> list[tuple]:
    c = lambda n: scale_channels(n, width)  # noqa: E731
    return [
        ("conv", "conv1", c(32), 5, 2, 2),
        ("maxpool", 2, 2),
        ("conv", "conv2", c(64), 3, 1, 1),
        ("maxpool", 2, 2),
        ("conv", "conv3", c(128), 3, 1, 1),
        ("conv", "conv4", c(128), 3, 1, 1),
        ("maxpool", 2, 2),
        ("conv", "conv5", c(256), 3, 1, 1),
    ]


def _zeros(key, shape, dtype=jax.numpy.float32):
    return jax.numpy.zeros(shape, dtype)


class SmallCNN(nn.Module):
    """Five 3x3/5x5 convs with ReLU (optional BatchNorm), global average pool, linear head.

    Attributes:
      num_classes: output logits.
      width: multiplies every conv channel count (32-64-128-128-256 at 1.0).
      batch_norm: BatchNorm between each conv and its ReLU (shifts `features`
        indices as torchvision's `vgg*_bn` do; the aliases follow).
      dropout: a Dropout(0.5) before the classifier (`classifier.0`).
      input_spec: input normalisation (torchvision's, at `IMAGE_SIZE`).
    """

    num_classes: int = 17
    width: float = 1.0
    batch_norm: bool = False
    dropout: bool = True
    input_spec: InputSpec = InputSpec(
        IMAGE_SIZE, TORCHVISION.mean, TORCHVISION.std, scale=TORCHVISION.scale
    )

    default_layers: ClassVar[tuple[str, ...]] = ("conv1", "conv2", "conv3", "conv4", "conv5")

    @property
    def layer_aliases(self) -> Mapping[str, str]:
        """conv1..conv5 -> the path of the ReLU after each conv."""
        _, aliases = conv_relu_stack(_convs(self.width), self.batch_norm)
        return {alias: f"features/{index}" for alias, index in aliases.items()}

    def _classifier(self) -> tuple[LayerEntry, ...]:
        entries = [("0", "dropout", 0.5), ("1", "linear", self.num_classes)]
        return tuple(e for e in entries if self.dropout or e[1] != "dropout")

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits [B, num_classes] of a normalised NHWC batch."""
        features, _ = conv_relu_stack(_convs(self.width), self.batch_norm)
        # torchvision's VGG init: trains from scratch without BatchNorm too.
        x = TorchSequential(
            features,
            conv_kernel_init=kaiming_normal_fan_out,
            conv_bias_init=_zeros,
            name="features",
        )(x, train)
        x = AdaptiveAvgPool2d(1, name="avgpool")(x).reshape(x.shape[0], -1)
        return TorchSequential(self._classifier(), name="classifier")(x, train)


def small_cnn(
    *,
    num_classes: int = 17,
    width: float = 1.0,
    batch_norm: bool = False,
    dropout: bool = True,
    image_size: int = IMAGE_SIZE,
) -> SmallCNN:
    """The small CNN (541,905 parameters at width 1 and 17 classes).

    `image_size` only sets `input_spec.size` (what probe images are resized to);
    the network itself takes any size.
    """
    spec = InputSpec(image_size, TORCHVISION.mean, TORCHVISION.std, scale=TORCHVISION.scale)
    return SmallCNN(
        num_classes=num_classes,
        width=width,
        batch_norm=batch_norm,
        dropout=dropout,
        input_spec=spec,
    )

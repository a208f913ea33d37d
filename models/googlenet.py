"""GoogLeNet (Inception v1) in torchvision's layout, so torchvision state dicts map directly.

Module paths follow torchvision: `conv1.conv`, `conv1.bn`, `maxpool1`, `conv2`, `conv3`,
`inception3a.branch1.conv`, `inception3a.branch2.0.conv`, ..., `inception5b`, `fc`.
As in torchvision, each branch3 uses a 3x3 convolution where the paper has 5x5.
The auxiliary classifiers are left out (they play no part at inference);
`GoogLeNet.torch_rename` drops their `aux1.`/`aux2.` keys when weights are imported.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdissect.models.layers import BatchNorm2d, MaxPool2d, conv2d, linear, scale_channels
from jaxdissect.preprocess import TORCHVISION, InputSpec

# torchvision initialises conv and linear weights with trunc_normal_(std=0.01, a=-2, b=2):
# cut at +-2 absolute, i.e. effectively an untruncated normal.
_weight_init = nn.initializers.normal(0.01)

# (ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) of each Inception block.
_INCEPTION: dict[str, tuple[int, int, int, int, int, int]] = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3) + ReLU; with `batch_norm=False`, conv with bias + ReLU."""

    features: int
    kernel_size: int
    in_features: int
    stride: int = 1
    padding: int = 0
    batch_norm: bool = True
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = conv2d(
            self.features,
            self.kernel_size,
            in_features=self.in_features,
            stride=self.stride,
            padding=self.padding,
            bias=not self.batch_norm,
            kernel_init=_weight_init,
            name="conv",
        )(x)
        if self.batch_norm:
            x = BatchNorm2d(use_running_average=not self.train, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


class _Branch(nn.Module):
    """A torch `nn.Sequential` of (optional 3x3 max pool and) BasicConv2d layers named 0, 1."""

    convs: tuple[tuple[int, int], ...]  # (features, kernel_size), padding keeps the size
    in_features: int
    pool_first: bool = False
    batch_norm: bool = True
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        index, channels = 0, self.in_features
        if self.pool_first:
            x = MaxPool2d(3, stride=1, padding=1, ceil_mode=True, name="0")(x)
            index = 1
        for features, kernel in self.convs:
            x = BasicConv2d(
                features,
                kernel,
                in_features=channels,
                padding=kernel // 2,
                batch_norm=self.batch_norm,
                train=self.train,
                name=str(index),
            )(x)
            index, channels = index + 1, features
        return x


class Inception(nn.Module):
    """Four parallel branches concatenated along channels (torchvision `Inception`)."""

    channels: tuple[int, int, int, int, int, int]
    in_features: int
    batch_norm: bool = True
    train: bool = False

    @property
    def out_features(self) -> int:
        c = self.channels
        return c[0] + c[2] + c[4] + c[5]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj = self.channels
        common = dict(in_features=self.in_features, batch_norm=self.batch_norm, train=self.train)
        b1 = BasicConv2d(ch1x1, 1, **common, name="branch1")(x)
        b2 = _Branch(((ch3x3red, 1), (ch3x3, 3)), **common, name="branch2")(x)
        b3 = _Branch(((ch5x5red, 1), (ch5x5, 3)), **common, name="branch3")(x)
        b4 = _Branch(((pool_proj, 1),), pool_first=True, **common, name="branch4")(x)
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


def _aliases() -> dict[str, str]:
    out = {
        # The layer names of the Caffe BVLC and Places365 GoogLeNets (NetDissect's), for
        # torchvision's network: the layers correspond, the networks differ (3x3 branch3, no
        # LRN), so results under these names compare with theirs, not reproduce them.
        "conv1/7x7_s2": "conv1",
        "pool1/3x3_s2": "maxpool1",
        "conv2/3x3_reduce": "conv2",
        "conv2/3x3": "conv3",
        "pool2/3x3_s2": "maxpool2",
        "pool3/3x3_s2": "maxpool3",
        "pool4/3x3_s2": "maxpool4",
    }
    for name in _INCEPTION:
        caffe = f"inception_{name[len('inception') :]}"
        out[caffe] = name
        out[f"{caffe}/output"] = name
    return out


class GoogLeNet(nn.Module):
    """GoogLeNet; `__call__(x, train=False)` takes NHWC input normalised by `input_spec`, returns logits.

    Attributes:
      num_classes: size of `fc`.
      dropout: dropout rate before `fc` (torchvision: 0.2); 0 disables it.
      batch_norm: BasicConv2d with BatchNorm (torchvision); False gives conv-with-bias +
        ReLU, as the paper's convolutions. That is no port of the Caffe BVLC or Places365
        GoogLeNets: they also have 5x5 branch3 convolutions and LRN after `pool1` and
        `conv2/3x3`, which this model lacks (their branch3 weights are refused by shape).
      width: multiplies every channel count (1.0: the real network).
      transform_input: torchvision's switch that maps ImageNet-normalised input to the
        [-1, 1] range its ImageNet weights (ported from TF) expect. Off by default, as
        in the torchvision constructor without pretrained weights.
      input_spec: the input normalisation the weights expect (torchvision's ImageNet one).
    """

    num_classes: int = 1000
    dropout: float = 0.2
    batch_norm: bool = True
    width: float = 1.0
    transform_input: bool = False

    input_spec: InputSpec = TORCHVISION
    layer_aliases: ClassVar[Mapping[str, str]] = types.MappingProxyType(_aliases())
    default_layers: ClassVar[tuple[str, ...]] = (
        "conv3",
        "inception3b",
        "inception4c",
        "inception4e",
        "inception5b",
    )

    @staticmethod
    def torch_rename(key: str) -> str | None:
        """Drop the auxiliary classifiers' keys, which this model does not have."""
        return None if key.startswith(("aux1.", "aux2.")) else key

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.transform_input:
            mean = jnp.asarray(TORCHVISION.mean, x.dtype)
            std = jnp.asarray(TORCHVISION.std, x.dtype)
            x = x * (std / 0.5) + (mean - 0.5) / 0.5

        def w(channels: int) -> int:
            return scale_channels(channels, self.width)

        basic = dict(batch_norm=self.batch_norm, train=train)
        x = BasicConv2d(w(64), 7, in_features=3, stride=2, padding=3, **basic, name="conv1")(x)
        x = MaxPool2d(3, stride=2, ceil_mode=True, name="maxpool1")(x)
        x = BasicConv2d(w(64), 1, in_features=w(64), **basic, name="conv2")(x)
        x = BasicConv2d(w(192), 3, in_features=w(64), padding=1, **basic, name="conv3")(x)
        x = MaxPool2d(3, stride=2, ceil_mode=True, name="maxpool2")(x)
        channels = w(192)
        for name, spec in _INCEPTION.items():
            block = Inception(tuple(w(c) for c in spec), in_features=channels, **basic, name=name)
            x = block(x)
            channels = block.out_features
            if name == "inception3b":
                x = MaxPool2d(3, stride=2, ceil_mode=True, name="maxpool3")(x)
            elif name == "inception4e":
                x = MaxPool2d(2, stride=2, ceil_mode=True, name="maxpool4")(x)
        x = jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1) + flatten
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
        return linear(self.num_classes, in_features=channels, kernel_init=_weight_init, name="fc")(
            x
        )


def googlenet(
    *,
    num_classes: int = 1000,
    dropout: bool = True,
    batch_norm: bool = True,
    width: float = 1.0,
    transform_input: bool = False,
    input_spec: InputSpec = TORCHVISION,
) -> GoogLeNet:
    """torchvision's GoogLeNet without auxiliary heads (6,624,904 parameters at 1000 classes).

    For torchvision's own ImageNet weights pass `transform_input=True`, as
    `torchvision.models.googlenet(weights=...)` does.
    """
    return GoogLeNet(
        num_classes=num_classes,
        dropout=0.2 if dropout else 0.0,
        batch_norm=batch_norm,
        width=width,
        transform_input=transform_input,
        input_spec=input_spec,
    )

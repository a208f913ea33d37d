"""ResNet-18/34/50/101/152 in torchvision's layout (v1.5: Bottleneck strides in conv2).

Options describe the original Caffe models (MSRA's deep-residual-networks release) converted
to these names: `stride_in_1x1` (v1: a downsampling Bottleneck strides in its first 1x1
conv, `res*a_branch2a`) and `caffe_maxpool` (`pool1`: 3x3, stride 2, no padding, output
size rounded up, as Caffe's pooling rounds). The shapes of their weights are torchvision's,
so nothing but these options tells the variants apart.

Paths: `conv1`, `bn1`, `relu`, `maxpool`, `layer1`..`layer4` -> `N` (blocks) ->
`conv1`, `bn1`, ..., `downsample` -> `0` (conv), `1` (BN), then `avgpool`, `fc`.
As in torch, a block's single `relu` module is called after each of its
convolutions; probe the block itself (`layer4/1`) for its output. Hugging Face's
`ResNetModel` / `ResNetForImageClassification` names (`microsoft/resnet-50`) are renamed to
these as they load (`ResNet.torch_rename`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import ClassVar

import flax.linen as nn
import jax

from jaxdissect.models.layers import (
    AdaptiveAvgPool2d,
    BatchNorm2d,
    Identity,
    MaxPool2d,
    ReLU,
    bias_free_conv2d,
    kaiming_normal_fan_out,
    linear,
    scale_channels,
)
from jaxdissect.preprocess import TORCHVISION, InputSpec

_conv = functools.partial(bias_free_conv2d, kernel_init=kaiming_normal_fan_out)


def _norm(batch_norm: bool, train: bool, name: str) -> nn.Module:
    if batch_norm:
        return BatchNorm2d(use_running_average=not train, name=name)
    return Identity(name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34)."""

    planes: int
    stride: int = 1
    downsample: bool = False
    batch_norm: bool = True

    expansion: ClassVar[int] = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        relu = ReLU(name="relu")
        out = _conv(self.planes, 3, self.stride, 1, x, "conv1")(x)
        out = relu(_norm(self.batch_norm, train, "bn1")(out))
        out = _conv(self.planes, 3, 1, 1, out, "conv2")(out)
        out = _norm(self.batch_norm, train, "bn2")(out)
        return relu(out + _shortcut(self, x, self.planes, train))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand, and a shortcut (ResNet-50/101/152).

    `stride_in_1x1`: the stride is the first 1x1 conv's instead (ResNet v1, Caffe).
    """

    planes: int
    stride: int = 1
    downsample: bool = False
    batch_norm: bool = True
    stride_in_1x1: bool = False

    expansion: ClassVar[int] = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        relu = ReLU(name="relu")
        stride_1x1, stride_3x3 = (self.stride, 1) if self.stride_in_1x1 else (1, self.stride)
        out = _conv(self.planes, 1, stride_1x1, 0, x, "conv1")(x)
        out = relu(_norm(self.batch_norm, train, "bn1")(out))
        out = _conv(self.planes, 3, stride_3x3, 1, out, "conv2")(out)
        out = relu(_norm(self.batch_norm, train, "bn2")(out))
        out = _conv(self.planes * 4, 1, 1, 0, out, "conv3")(out)
        out = _norm(self.batch_norm, train, "bn3")(out)
        return relu(out + _shortcut(self, x, self.planes * 4, train))


def _shortcut(block: BasicBlock | Bottleneck, x: jax.Array, features: int, train: bool):
    if not block.downsample:
        return x
    return Downsample(features, block.stride, block.batch_norm, name="downsample")(x, train)


class Downsample(nn.Module):
    """torch's `downsample` Sequential: `0` 1x1 strided conv, `1` BatchNorm."""

    features: int
    stride: int
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = _conv(self.features, 1, self.stride, 0, x, "0")(x)
        return _norm(self.batch_norm, train, "1")(x)


class ResLayer(nn.Module):
    """A stage (`layerN`): blocks named `0`, `1`, ..., the first one strided."""

    block: type[BasicBlock] | type[Bottleneck]
    planes: int
    blocks: int
    stride: int = 1
    batch_norm: bool = True
    stride_in_1x1: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        v1 = {"stride_in_1x1": True} if self.stride_in_1x1 else {}
        for i in range(self.blocks):
            stride = self.stride if i == 0 else 1
            downsample = i == 0 and (
                stride != 1 or x.shape[-1] != self.planes * self.block.expansion
            )
            x = self.block(self.planes, stride, downsample, self.batch_norm, **v1, name=str(i))(
                x, train
            )
        return x


class ResNet(nn.Module):
    """torchvision ResNet.

    Attributes:
      block: `BasicBlock` or `Bottleneck`.
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
      num_classes: output logits; 0 builds no `fc` (the pooled features are the output:
        self-supervised backbones, DINO's, Barlow Twins', saved without one).
      width: multiplies every channel count (stem and all stages).
      batch_norm: False replaces every BatchNorm by an `Identity` of the same
        name (no variables; convolutions stay bias-free as in torchvision).
      stride_in_1x1: a downsampling Bottleneck strides in its first 1x1 conv, not in
        its 3x3 (ResNet v1 as MSRA's Caffe models; Bottleneck only).
      caffe_maxpool: `maxpool` is Caffe's `pool1` (3x3, stride 2, no padding, ceil mode)
        instead of torchvision's (3x3, stride 2, padding 1).
      input_spec: the input normalisation the weights expect.
    """

    block: type[BasicBlock] | type[Bottleneck]
    stage_sizes: tuple[int, int, int, int]
    num_classes: int = 1000
    width: float = 1.0
    batch_norm: bool = True
    stride_in_1x1: bool = False
    caffe_maxpool: bool = False
    input_spec: InputSpec = TORCHVISION

    def __post_init__(self):
        if self.stride_in_1x1 and self.block is not Bottleneck:
            raise ValueError(
                "stride_in_1x1=True: only ResNet-50/101/152 (Bottleneck blocks) have a 1x1 "
                "conv to stride in"
            )
        super().__post_init__()

    default_layers: ClassVar[tuple[str, ...]] = ("layer4",)

    @property
    def layer_aliases(self) -> Mapping[str, str]:
        """The stages (already module paths). No `conv1` alias: it would shadow the path."""
        return {f"layer{i}": f"layer{i}" for i in range(1, 5)}

    @staticmethod
    def torch_rename(key: str) -> str:
        """torchvision's name of a Hugging Face `ResNetModel` / `ResNetForImageClassification`
        key (`resnet.embedder.embedder.convolution`, `resnet.encoder.stages.{i}.layers.{j}`
        with `shortcut` and `layer.{k}`, each a `convolution` and a `normalization`,
        `classifier.1`); other keys as they are."""
        name = key.removeprefix("resnet.")
        if m := re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(\w+)", name):
            return f"{'conv1' if m[1] == 'convolution' else 'bn1'}.{m[2]}"
        conv = r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(?:shortcut|layer\.(\d))"
        if m := re.fullmatch(rf"{conv}\.(convolution|normalization)\.(\w+)", name):
            block, is_conv = f"layer{int(m[1]) + 1}.{m[2]}", m[4] == "convolution"
            if m[3] is None:  # the shortcut: torchvision's downsample
                return f"{block}.downsample.{0 if is_conv else 1}.{m[5]}"
            return f"{block}.{'conv' if is_conv else 'bn'}{int(m[3]) + 1}.{m[5]}"
        if m := re.fullmatch(r"classifier\.1\.(\w+)", key):
            return f"fc.{m[1]}"
        return key

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits [B, num_classes] of a normalised NHWC batch (the pooled features where
        `num_classes` is 0)."""
        x = _conv(scale_channels(64, self.width), 7, 2, 3, x, "conv1")(x)
        x = _norm(self.batch_norm, train, "bn1")(x)
        x = ReLU(name="relu")(x)
        padding, ceil_mode = (0, True) if self.caffe_maxpool else (1, False)
        x = MaxPool2d(3, 2, padding, ceil_mode, name="maxpool")(x)
        for i, blocks in enumerate(self.stage_sizes):
            x = ResLayer(
                self.block,
                scale_channels(64 * 2**i, self.width),
                blocks,
                stride=1 if i == 0 else 2,
                batch_norm=self.batch_norm,
                stride_in_1x1=self.stride_in_1x1,
                name=f"layer{i + 1}",
            )(x, train)
        x = AdaptiveAvgPool2d(1, name="avgpool")(x).reshape(x.shape[0], -1)
        if not self.num_classes:
            return x
        return linear(self.num_classes, in_features=x.shape[-1], name="fc")(x)


def resnet18(
    *,
    num_classes: int = 1000,
    width: float = 1.0,
    batch_norm: bool = True,
    caffe_maxpool: bool = False,
    input_spec: InputSpec = TORCHVISION,
) -> ResNet:
    """torchvision ResNet-18 (11,689,512 parameters at 1000 classes)."""
    return ResNet(
        BasicBlock,
        (2, 2, 2, 2),
        num_classes,
        width,
        batch_norm,
        caffe_maxpool=caffe_maxpool,
        input_spec=input_spec,
    )


def resnet34(
    *,
    num_classes: int = 1000,
    width: float = 1.0,
    batch_norm: bool = True,
    caffe_maxpool: bool = False,
    input_spec: InputSpec = TORCHVISION,
) -> ResNet:
    """torchvision ResNet-34 (21,797,672 parameters at 1000 classes)."""
    return ResNet(
        BasicBlock,
        (3, 4, 6, 3),
        num_classes,
        width,
        batch_norm,
        caffe_maxpool=caffe_maxpool,
        input_spec=input_spec,
    )


def resnet50(
    *,
    num_classes: int = 1000,
    width: float = 1.0,
    batch_norm: bool = True,
    stride_in_1x1: bool = False,
    caffe_maxpool: bool = False,
    input_spec: InputSpec = TORCHVISION,
) -> ResNet:
    """torchvision ResNet-50 (25,557,032 parameters at 1000 classes)."""
    return ResNet(
        Bottleneck,
        (3, 4, 6, 3),
        num_classes,
        width,
        batch_norm,
        stride_in_1x1,
        caffe_maxpool,
        input_spec,
    )


def resnet101(
    *,
    num_classes: int = 1000,
    width: float = 1.0,
    batch_norm: bool = True,
    stride_in_1x1: bool = False,
    caffe_maxpool: bool = False,
    input_spec: InputSpec = TORCHVISION,
) -> ResNet:
    """torchvision ResNet-101 (44,549,160 parameters at 1000 classes)."""
    return ResNet(
        Bottleneck,
        (3, 4, 23, 3),
        num_classes,
        width,
        batch_norm,
        stride_in_1x1,
        caffe_maxpool,
        input_spec,
    )


def resnet152(
    *,
    num_classes: int = 1000,
    width: float = 1.0,
    batch_norm: bool = True,
    stride_in_1x1: bool = False,
    caffe_maxpool: bool = False,
    input_spec: InputSpec = TORCHVISION,
) -> ResNet:
    """torchvision ResNet-152 (60,192,808 parameters at 1000 classes)."""
    return ResNet(
        Bottleneck,
        (3, 8, 36, 3),
        num_classes,
        width,
        batch_norm,
        stride_in_1x1,
        caffe_maxpool,
        input_spec,
    )

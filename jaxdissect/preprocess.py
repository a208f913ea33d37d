"""How a model wants its input: the model's business, not the loader's."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Input specification of a model.

    The loader hands out RGB pixel values in [0, 255]. The model sees
    `((pixels[..., order] * scale) - mean) / std`, resized (bilinear, squash,
    no crop) to `size` x `size` if the probe images differ.

    Attributes:
      size: square input resolution.
      mean, std: per channel, in the model's channel order, after `scale`.
      scale: multiplies the 0..255 pixels first (1/255 for torchvision models).
      bgr: feed channels in BGR order (Caffe-style models).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    scale: float = 1.0
    bgr: bool = False

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """Normalise a [B, H, W, 3] batch of 0..255 RGB pixels for the model."""
        x = pixels.astype(jnp.float32)
        if x.shape[1] != self.size or x.shape[2] != self.size:
            x = jax.image.resize(x, (x.shape[0], self.size, self.size, 3), "bilinear")
        if self.bgr:
            x = x[..., ::-1]
        mean = jnp.asarray(self.mean, jnp.float32)
        std = jnp.asarray(self.std, jnp.float32)
        return (x * self.scale - mean) / std


TORCHVISION = InputSpec(224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), scale=1 / 255)
# NetDissect-Lite's normalisation of its Places365 models.
PLACES_LITE = InputSpec(224, (124.69, 118.69, 109.54), (57.12, 57.12, 57.12))


def declared_input_spec(module: Any) -> InputSpec | None:
    """The `InputSpec` a model declares as its `input_spec` attribute, or None.

    A dataclass field and a plain class attribute both count: Linen wraps a callable class
    attribute (an `InputSpec` is callable) as a method, and the spec is what it wraps.
    """
    spec = getattr(module, "input_spec", None)
    if spec is None or isinstance(spec, InputSpec):
        return spec
    unwrapped = inspect.unwrap(getattr(spec, "__func__", spec))
    if isinstance(unwrapped, InputSpec):
        return unwrapped
    raise ValueError(
        f"the model's input_spec attribute is {type(spec).__name__}, not an InputSpec "
        "(jaxdissect.preprocess.InputSpec)"
    )


def patch_pair(patch_size: int | Sequence[int]) -> tuple[int, int]:
    """(ph, pw) of a patch size given as one int or a pair (a ViT's patch embedding)."""
    if isinstance(patch_size, int):
        return (patch_size, patch_size)
    ph, pw = patch_size
    return (int(ph), int(pw))

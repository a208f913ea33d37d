"""How a model wants its input, and how its token outputs are laid out: the model's
business, not the loader's."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The largest input side a model is fed at (a network's dry run at a larger one is no
# dissection: a damaged size in a meta.json, a mistyped flag).
MAX_SIZE = 8192


def is_input_size(size: Any) -> bool:
    """Whether `size` is a whole number of pixels in [1, MAX_SIZE]."""
    whole = isinstance(size, int | np.integer) and not isinstance(size, bool)
    return whole and 1 <= size <= MAX_SIZE


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

    def __post_init__(self):
        size = self.size
        if not is_input_size(size):
            raise ValueError(
                f"InputSpec(size={size!r}): a whole number of pixels in [1, {MAX_SIZE}], e.g. 224"
            )
        for name, values in (("mean", self.mean), ("std", self.std)):
            try:
                numbers = np.asarray(values, float)
            except (TypeError, ValueError):
                numbers = np.zeros(0)
            if numbers.shape != (3,) or not np.isfinite(numbers).all():
                raise ValueError(
                    f"InputSpec({name}={values!r}): three finite numbers, one per channel in "
                    "the model's order, e.g. (0.485, 0.456, 0.406)"
                )
        if not np.all(np.asarray(self.std, float)):
            raise ValueError(f"InputSpec(std={self.std!r}): each channel's std must be non-zero")

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
# NetDissect-Lite's normalisation of its Places365 models: its BGR mean [109.5388, 118.6897,
# 124.6901] subtracted, the channels flipped back to RGB, divided by 255 * 0.224.
PLACES_LITE = InputSpec(224, (124.6901, 118.6897, 109.5388), (255 * 0.224,) * 3)
# CLIP's (OpenAI's constants, which open_clip's and timm's CLIP image towers take).
CLIP = InputSpec(
    224,
    (0.48145466, 0.4578275, 0.40821073),
    (0.26862954, 0.26130258, 0.27577711),
    scale=1 / 255,
)
# `--input_norm`'s fixed normalisations by name (its `model` is the model's own).
NAMED_SPECS: Mapping[str, InputSpec] = types.MappingProxyType(
    {"torchvision": TORCHVISION, "places_lite": PLACES_LITE, "clip": CLIP}
)


def as_input_spec(value: Any) -> InputSpec | None:
    """`value` if it is an `InputSpec`, the spec a Linen-wrapped method holds (a model's
    `input_spec` class attribute read from an instance), else None."""
    if isinstance(value, InputSpec):
        return value
    unwrapped = inspect.unwrap(getattr(value, "__func__", value))
    return unwrapped if isinstance(unwrapped, InputSpec) else None


def declared_input_spec(module: Any) -> InputSpec | None:
    """The `InputSpec` a model declares as its `input_spec` attribute, or None.

    A dataclass field and a plain class attribute both count: Linen wraps a callable class
    attribute (an `InputSpec` is callable) as a method, and the spec is what it wraps.
    """
    spec = getattr(module, "input_spec", None)
    if spec is None or (unwrapped := as_input_spec(spec)) is not None:
        return spec if spec is None else unwrapped
    raise ValueError(
        f"the model's input_spec attribute is {type(spec).__name__}, not an InputSpec "
        "(jaxdissect.preprocess.InputSpec)"
    )


def patch_pair(patch_size: int | Sequence[int]) -> tuple[int, int]:
    """(ph, pw) of a patch size given as one whole number >= 1 or a pair of them (a ViT's
    patch embedding; numpy integers too); any other is refused naming patch_size."""
    pair = isinstance(patch_size, tuple | list | np.ndarray) and len(patch_size) == 2
    sides = tuple(patch_size) if pair else (patch_size,)
    if not all(
        isinstance(p, int | np.integer) and not isinstance(p, bool) and p >= 1 for p in sides
    ):
        raise ValueError(
            f"patch_size={patch_size!r}: an int (square patches, e.g. 16) or a pair of ints "
            "(ph, pw), e.g. (8, 16)"
        )
    return (int(sides[0]), int(sides[-1]))


def patch_grid(input_shape: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) patches of an input of `input_shape` (height, width, ...) at `patch_size`.

    Sides that are not multiples of the patch size are refused, as timm does: a VALID
    patch embedding drops the remainder, and its maps would be stretched over pixels that
    no patch saw.
    """
    height, width = int(input_shape[0]), int(input_shape[1])
    ph, pw = patch_pair(patch_size)
    if height % ph == 0 and width % pw == 0:
        return (height // ph, width // pw)
    patch = str(ph) if ph == pw else f"{ph}x{pw}"
    covered = f"{height // ph * ph}x{width // pw * pw} px of the {height}x{width} input"

    def multiples(side: int, step: int) -> str:
        low = side // step * step
        if low == side:
            return str(side)
        return f"{low} or {low + step}" if low else str(step)

    if height == width:
        what, fix = f"input_size={height}", multiples(height, math.lcm(ph, pw))
    else:
        what = f"input_shape={tuple(int(s) for s in input_shape)}"
        fix = f"{multiples(height, ph)} high and {multiples(width, pw)} wide"
    raise ValueError(
        f"{what}: not a multiple of the model's patch size {patch} (its patches cover "
        f"{covered}, and the maps would be stretched over all of it); use {fix}"
    )


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where the patch tokens of a [B, tokens, C] output are.

    Attributes:
      grid: (h, w), the patch grid; patch tokens are row-major, as a flattened
        [h, w] convolution output.
      prefix: tokens before the patches (class token, register tokens).
      suffix: tokens after the patches (registers appended at the end).
    """

    grid: tuple[int, int]
    prefix: int = 0
    suffix: int = 0

    def __post_init__(self):
        h, w = self.grid
        if h < 1 or w < 1 or self.prefix < 0 or self.suffix < 0:
            raise ValueError(f"token_layout={self}: grid sides >= 1, prefix and suffix >= 0")
        object.__setattr__(self, "grid", (int(h), int(w)))

    @property
    def tokens(self) -> int:
        """How many tokens the layout covers."""
        return self.prefix + self.grid[0] * self.grid[1] + self.suffix

    def __str__(self) -> str:
        h, w = self.grid
        text = f"{h}x{w}"
        if self.prefix:
            text = f"{self.prefix}+{text}"
        return f"{text}+{self.suffix}" if self.suffix else text

    @classmethod
    def parse(cls, text: str) -> TokenLayout:
        """`[prefix+]HxW[+suffix]`: `14x14`, `1+14x14` (class token), `5+16x16`, `1+16x16+4`."""
        m = re.fullmatch(r"\s*(?:(\d+)\s*\+\s*)?(\d+)\s*x\s*(\d+)(?:\s*\+\s*(\d+))?\s*", text)
        if not m:
            raise ValueError(
                f"token_layout={text!r}: expected [prefix+]HxW[+suffix], e.g. 1+14x14 for a "
                "class token and 14x14 patch tokens"
            )
        prefix, h, w, suffix = m.groups()
        return cls((int(h), int(w)), int(prefix or 0), int(suffix or 0))

    def to_nhwc(self, x: jax.Array) -> jax.Array:
        """[B, tokens, C] -> [B, h, w, C], the patch tokens only."""
        h, w = self.grid
        patches = x[:, self.prefix : self.prefix + h * w]
        return patches.reshape(x.shape[0], h, w, x.shape[-1])

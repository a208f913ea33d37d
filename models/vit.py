"""Vision Transformer (Dosovitskiy et al. 2021) with big_vision's parameter names.

The module tree and parameter names are those of `big_vision/models/vit.py`
(`embedding`, `pos_embedding`, `cls`, `Transformer/encoderblock_{i}/LayerNorm_0`,
`MultiHeadDotProductAttention_0/{query,key,value,out}`, `LayerNorm_1`,
`MlpBlock_0/Dense_0|1`, `Transformer/encoder_norm`, `pre_logits`, `head`), so a
big_vision `.npz` checkpoint loads directly (`models/npz_import.py`) and a timm
`vit_*` state dict through `vit_import.timm_vit_to_big_vision`. As there:
LayerNorm epsilon 1e-6 (`layer_norm_epsilon`: Hugging Face's ViTs use 1e-12),
tanh-approximated GELU (`gelu_approximate=False` for timm's and Hugging Face's exact
GELU), position embeddings added before the class token is prepended, inputs in [-1, 1].

Layers to dissect (paths; aliases in brackets), each [B, tokens, C] read as the
patch grid (`ViT.token_layout`: the class token, if any, is dropped):
  `embedding` [stem]                              patch embedding, [h, w, width]
  `Transformer/encoderblock_{i}` [block{i}]       residual stream after block i
  `Transformer/encoderblock_{i}/MlpBlock_0/gelu` [mlp{i}]  block i's MLP hidden
                                                  units after GELU (`Dense_0`: before)
  `Transformer/encoderblock_{i}/MultiHeadDotProductAttention_0`  attention output
  `Transformer/encoder_norm` [encoder_norm]       the final LayerNorm's output
"""

from __future__ import annotations

import functools
import inspect
import math
import typing
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect.models.layers import layer_norm
from jaxdissect.preprocess import InputSpec, TokenLayout, patch_grid, patch_pair

# The LayerNorm epsilon of Hugging Face transformers' ViTs (big_vision's and timm's: 1e-6).
HF_LAYER_NORM_EPSILON = 1e-12
# CLIP's image towers (OpenAI's, open_clip's, timm's) use torch's default LayerNorm epsilon.
CLIP_LAYER_NORM_EPSILON = 1e-5
# big_vision's variants (Table 2 of arXiv:2106.04560): width, depth, mlp_dim, num_heads.
VARIANTS: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "B": (768, 12, 3072, 12),
}
POOL_TYPES = ("gap", "tok", "map", "tok+gap")
POSEMB_TYPES = ("learn", "sincos2d", "none")


def big_vision_spec(size: int) -> InputSpec:
    """big_vision's input: RGB pixels scaled to [-1, 1] (`value_range(-1, 1)`)."""
    return InputSpec(size, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), scale=1 / 127.5)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> jax.Array:
    """big_vision's fixed 2-D sin-cos position embedding, [1, h*w, width]."""
    if width % 4:
        raise ValueError(f"width={width}: must be a multiple of 4 for posemb='sincos2d'")
    y, x = np.mgrid[:h, :w]
    omega = np.arange(width // 4) / (width // 4 - 1)
    omega = 1.0 / (temperature**omega)
    y = np.einsum("m,d->md", y.flatten(), omega)
    x = np.einsum("m,d->md", x.flatten(), omega)
    pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
    return jnp.asarray(pe, jnp.float32)[None]


def quick_gelu(x: jax.Array) -> jax.Array:
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


class Gelu(nn.Module):
    """GELU as a module, so that the MLP's hidden units have a path to capture (`quick`:
    OpenAI CLIP's `quick_gelu` in its place)."""

    approximate: bool = True
    quick: bool = False

    def __call__(self, x: jax.Array) -> jax.Array:
        return quick_gelu(x) if self.quick else nn.gelu(x, approximate=self.approximate)


_DENSE_INIT = dict(
    kernel_init=nn.initializers.xavier_uniform(), bias_init=nn.initializers.normal(1e-6)
)


class SwiGLU(nn.Module):
    """silu(a) * b of the halves [a, b] of the last axis (DINOv2's fused SwiGLU, timm's
    `SwiGLUPacked`), as a module so that the MLP's hidden units have a path to capture."""

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = jnp.split(x, 2, axis=-1)
        return nn.silu(a) * b


class MlpBlock(nn.Module):
    """Dense -> GELU -> Dense (big_vision's `MlpBlock`); with `swiglu`, `Dense_0` gives twice
    `mlp_dim` and `swiglu` gates them to `mlp_dim`."""

    mlp_dim: int
    gelu_approximate: bool = True
    quick_gelu: bool = False
    swiglu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        if self.swiglu:
            x = nn.Dense(2 * self.mlp_dim, name="Dense_0", **_DENSE_INIT)(x)
            x = SwiGLU(name="swiglu")(x)
        else:
            x = nn.Dense(self.mlp_dim, name="Dense_0", **_DENSE_INIT)(x)
            x = Gelu(self.gelu_approximate, self.quick_gelu, name="gelu")(x)
        return nn.Dense(d, name="Dense_1", **_DENSE_INIT)(x)


def beit_relative_position_index(h: int, w: int) -> np.ndarray:
    """[(h*w + 1)**2] index into BEiT's relative position bias table of each (query, key)
    pair of [class token, h x w patches] (timm's `gen_relative_position_index`): patch pairs
    by their offset, then the class token's three entries (to patches, from patches, to
    itself) at the table's end."""
    coords = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij")).reshape(2, -1)
    relative = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    distances = (2 * h - 1) * (2 * w - 1) + 3
    index = np.zeros((h * w + 1,) * 2, np.int64)
    index[1:, 1:] = (relative[..., 0] + h - 1) * (2 * w - 1) + relative[..., 1] + w - 1
    index[0, :] = distances - 3
    index[:, 0] = distances - 2
    index[0, 0] = distances - 1
    return index.reshape(-1)


def relative_position_bias(table: jax.Array, grid: tuple[int, int]) -> jax.Array:
    """[heads, N, N] attention bias of BEiT's `table` [(2h-1)(2w-1) + 3, heads] over the N =
    h*w + 1 tokens of a class token and a `grid` (h, w) of patches."""
    n = grid[0] * grid[1] + 1
    return table[beit_relative_position_index(*grid)].reshape(n, n, -1).transpose(2, 0, 1)


def relative_bias_table_shape(grid: tuple[int, int], num_heads: int) -> tuple[int, int]:
    """The shape of BEiT's relative position bias table for a `grid` (h, w) of patches."""
    return ((2 * grid[0] - 1) * (2 * grid[1] - 1) + 3, num_heads)


class Encoder1DBlock(nn.Module):
    """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)); with `layer_scale`,
    each branch is multiplied by a learned per-channel `ls1` / `ls2` (timm's LayerScale);
    with `rel_pos_grid` (h, w), the attention adds BEiT's learned bias per relative position
    and head (`relative_position_bias_table`) over a class token and that grid."""

    mlp_dim: int
    num_heads: int
    gelu_approximate: bool = True
    layer_norm_epsilon: float = 1e-6
    quick_gelu: bool = False
    layer_scale: bool = False
    rel_pos_grid: tuple[int, int] | None = None
    swiglu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        y = layer_norm(self.layer_norm_epsilon, "LayerNorm_0")(x)
        attention_fn = nn.dot_product_attention
        if self.rel_pos_grid is not None:
            shape = relative_bias_table_shape(self.rel_pos_grid, self.num_heads)
            table = self.param("relative_position_bias_table", nn.initializers.zeros, shape)
            bias = relative_position_bias(table, self.rel_pos_grid).astype(y.dtype)
            attention_fn = functools.partial(nn.dot_product_attention, bias=bias)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            deterministic=True,
            attention_fn=attention_fn,
            name="MultiHeadDotProductAttention_0",
        )(y, y)
        if self.layer_scale:
            y = y * self.param("ls1", nn.initializers.ones, (d,), y.dtype)
        x = x + y
        y = layer_norm(self.layer_norm_epsilon, "LayerNorm_1")(x)
        mlp = MlpBlock(
            self.mlp_dim, self.gelu_approximate, self.quick_gelu, self.swiglu, name="MlpBlock_0"
        )
        y = mlp(y)
        if self.layer_scale:
            y = y * self.param("ls2", nn.initializers.ones, (d,), y.dtype)
        return x + y


class Encoder(nn.Module):
    """`depth` blocks (`encoderblock_{i}`) and the final `encoder_norm` (where
    `final_norm`)."""

    depth: int
    mlp_dim: int
    num_heads: int
    gelu_approximate: bool = True
    layer_norm_epsilon: float = 1e-6
    quick_gelu: bool = False
    layer_scale: bool = False
    final_norm: bool = True
    rel_pos_grid: tuple[int, int] | None = None
    swiglu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = Encoder1DBlock(
                self.mlp_dim,
                self.num_heads,
                self.gelu_approximate,
                self.layer_norm_epsilon,
                self.quick_gelu,
                self.layer_scale,
                self.rel_pos_grid,
                self.swiglu,
                name=f"encoderblock_{i}",
            )(x)
        if not self.final_norm:
            return x
        return layer_norm(self.layer_norm_epsilon, "encoder_norm")(x)


class MAPHead(nn.Module):
    """Multihead attention pooling (big_vision's `MAPHead`, SigLIP's image towers): a learned
    `probe` query attends over the tokens, then a residual MLP on its LayerNorm."""

    mlp_dim: int
    num_heads: int
    gelu_approximate: bool = True
    layer_norm_epsilon: float = 1e-6
    quick_gelu: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, _, d = x.shape
        probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, d), x.dtype)
        x = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            kernel_init=nn.initializers.xavier_uniform(),
            deterministic=True,
            name="MultiHeadDotProductAttention_0",
        )(jnp.tile(probe, (n, 1, 1)), x)
        y = layer_norm(self.layer_norm_epsilon, "LayerNorm_0")(x)
        mlp = MlpBlock(self.mlp_dim, self.gelu_approximate, self.quick_gelu, name="MlpBlock_0")
        return (x + mlp(y))[:, 0]


class ViT(nn.Module):
    """big_vision's ViT (`pool_type` `gap`, `tok` or `map`, learned or sin-cos position embeddings).

    Attributes:
      num_classes: logits of the `head` (0: no head, the pooled features are returned).
      patch_size: (ph, pw) of the patch embedding, or one int for square patches.
      width, depth, mlp_dim, num_heads: the transformer's size (see `VARIANTS`).
      posemb: `learn` (a `pos_embedding` parameter), `sincos2d` (fixed) or `none` (BEiT's,
        with `rel_pos_bias`).
      pool_type: `gap` (mean of the patch tokens), `tok` (a class token, `cls`), `map`
        (attention pooling, `MAPHead_0`, with `num_heads` heads and `mlp_dim`) or `tok+gap`
        (the class token beside the patch tokens' mean, twice the width: DINOv2's linear
        classifiers).
      class_token: a class token (`cls`) before the other tokens; None: where `pool_type`
        reads it (`tok`, `tok+gap`); true with `gap` or `map`, it is there but not what is
        pooled (timm's `global_pool="avg"` ViTs with a class token: MAE's fine-tuned ones).
      rep_size: width of a tanh `pre_logits` layer before the head (0: none).
      head_zeroinit: initialise the head's kernel to zeros (big_vision's default).
      gelu_approximate: tanh-approximated GELU (big_vision) or exact (timm, torch).
      layer_norm_epsilon: every LayerNorm's epsilon (big_vision and timm 1e-6, Hugging
        Face's ViTs 1e-12).
      image_size: the square input resolution (fixes the position embeddings).
      patch_bias: the patch embedding has a bias (CLIP's image towers have none).
      pre_norm: a LayerNorm (`norm_pre`) over the tokens before the first block (CLIP's
        `ln_pre`, timm's `pre_norm=True`).
      quick_gelu: OpenAI CLIP's x * sigmoid(1.702 x) in place of GELU (its own weights;
        open_clip's LAION ones use GELU).
      layer_scale: each block's branches scaled per channel (`ls1`, `ls2`: timm's
        LayerScale, in DeiT III, CaiT and DINOv2), initialised to 1.
      num_registers: register tokens (`reg`, DINOv2's) after the class token, before the
        patches, without position embedding; pooling leaves them out but for `map`.
      fc_norm: the final LayerNorm after pooling (`fc_norm`, timm's) in place of the one
        over the tokens (`Transformer/encoder_norm`), as in timm's `global_pool="avg"` ViTs
        and MAE's fine-tuned ones.
      distilled: DeiT's distillation token (`dist`, with a position embedding) after the
        class token, and its own head (`head_dist`); the output is the mean of the two
        heads' logits (of the two tokens without heads), as DeiT evaluates. `tok` pooling.
      rel_pos_bias: each block's attention adds BEiT's learned bias per relative position
        and head (`relative_position_bias_table`, the class token's three entries last),
        over a class token and the input's patch grid (BEiT's use `posemb="none"`).
      swiglu: the blocks' MLPs gated (DINOv2's giant): `Dense_0` gives 2 x `mlp_dim`, silu
        of the first half times the second (`MlpBlock_0/swiglu`, the `mlp{i}` units), then
        `Dense_1`.
    """

    num_classes: int = 1000
    patch_size: int | tuple[int, int] = (16, 16)
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    posemb: str = "learn"
    pool_type: str = "gap"
    rep_size: int = 0
    head_zeroinit: bool = True
    gelu_approximate: bool = True
    layer_norm_epsilon: float = 1e-6
    image_size: int = 224
    patch_bias: bool = True
    pre_norm: bool = False
    quick_gelu: bool = False
    layer_scale: bool = False
    num_registers: int = 0
    class_token: bool | None = None
    fc_norm: bool = False
    distilled: bool = False
    rel_pos_bias: bool = False
    swiglu: bool = False

    def __post_init__(self):
        patch_pair(self.patch_size)  # refuses another form, naming patch_size
        if self.pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type={self.pool_type!r}: one of {', '.join(POOL_TYPES)}")
        if self.posemb not in POSEMB_TYPES:
            raise ValueError(f"posemb={self.posemb!r}: one of {', '.join(POSEMB_TYPES)}")
        if self.class_token is False and self.pool_type in ("tok", "tok+gap"):
            raise ValueError(
                f"class_token=False: pool_type={self.pool_type!r} pools the class token"
            )
        if isinstance(self.num_registers, bool) or self.num_registers < 0:
            raise ValueError(f"num_registers={self.num_registers!r}: must be a whole number >= 0")
        if self.distilled and (self.pool_type != "tok" or self.rep_size or self.fc_norm):
            raise ValueError(
                "distilled=True: DeiT's two heads read the class and distillation tokens; "
                "pool_type=tok, without rep_size or fc_norm"
            )
        if self.rel_pos_bias and (not self.has_class_token or self.prefix_tokens != 1):
            raise ValueError(
                "rel_pos_bias=True: BEiT's bias covers one class token and the patches; a "
                "class token (pool_type=tok or class_token=true), no registers or "
                "distillation token"
            )
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width}: must be divisible by num_heads={self.num_heads}")
        super().__post_init__()

    @property
    def input_spec(self) -> InputSpec:
        """big_vision's normalisation at `image_size`."""
        return big_vision_spec(self.image_size)

    @property
    def has_class_token(self) -> bool:
        """Whether a class token (`cls`) comes first (`class_token`, else `pool_type`)."""
        if self.class_token is None:
            return self.pool_type in ("tok", "tok+gap")
        return bool(self.class_token)

    @property
    def prefix_tokens(self) -> int:
        """The tokens before the patches: class token, distillation token, registers."""
        return int(self.has_class_token) + int(self.distilled) + self.num_registers

    @property
    def image_grid(self) -> tuple[int, int]:
        """The patch grid of `image_size`, the one its learned position parameters are of."""
        ph, pw = patch_pair(self.patch_size)
        return (self.image_size // ph, self.image_size // pw)

    @nn.nowrap
    def token_layout(self, input_shape: tuple[int, ...]) -> TokenLayout:
        """Its tokens at `input_shape`: the class token (`has_class_token`), the
        distillation token (`distilled`), the registers, then the patches."""
        return token_layout(self.patch_size, input_shape, self.prefix_tokens)

    @property
    def default_layers(self) -> tuple[str, ...]:
        """Every block's output, low to high."""
        return tuple(f"block{i}" for i in range(self.depth))

    @property
    def layer_aliases(self) -> Mapping[str, str]:
        """`stem`, `block{i}`, `mlp{i}`, `encoder_norm` (but with `fc_norm`) -> module
        paths."""
        aliases = {"stem": "embedding"}
        if not self.fc_norm:
            aliases["encoder_norm"] = "Transformer/encoder_norm"
        for i in range(self.depth):
            block = f"Transformer/encoderblock_{i}"
            aliases[f"block{i}"] = block
            aliases[f"mlp{i}"] = f"{block}/MlpBlock_0/{'swiglu' if self.swiglu else 'gelu'}"
        return aliases

    def import_state_dict(
        self, state_dict: Mapping[str, Any], variables: Mapping[str, Any]
    ) -> dict[str, Any]:
        """`variables` filled from a ViT state dict in timm's, torchvision's, Hugging Face's
        (ViT, DINOv2, CLIP, SigLIP), open_clip's or DINOv2's names
        (`vit_import.vit_state_dict_as_timm`); a warning where the options differ from what
        that source's ViTs use, and a position embedding of another grid resampled
        (`_fit_position_grid`)."""
        from jaxdissect.models import npz_import, vit_import

        dinov2 = vit_import.DINOV2_MARK in state_dict
        source, state_dict = vit_import.vit_state_dict_as_timm(state_dict)
        self._warn_of_options(source, state_dict)
        pos = variables["params"].get("pos_embedding")
        patches = None if pos is None else int(pos.shape[1])
        flat = vit_import.timm_vit_to_big_vision(state_dict, self.num_heads, patches)
        if patches is not None:
            rule = "DINOv2" if dinov2 else source if "DINOv2" in source else "timm"
            flat = _fit_position_grid(flat, patches, rule)
        return npz_import.fit_big_vision(flat, variables)

    @nn.nowrap
    def trained_input_norm(self, state_dict: Mapping[str, Any]) -> str | None:
        """The `--input_norm` the naming of `state_dict` says its weights were trained with
        (`vit_import.trained_input_norm`; None: it does not say)."""
        from jaxdissect.models import vit_import

        return vit_import.trained_input_norm(state_dict)

    @nn.nowrap
    def _warn_of_options(self, source: str, state_dict: Mapping[str, Any]) -> None:
        """Warn where this ViT's GELU or LayerNorm epsilon is not what `source`'s ViTs use
        (the state dict, in timm's names, does not say)."""
        from absl import logging

        clip = "CLIP" in source or source == "open_clip"
        if clip and not self.quick_gelu:
            logging.warning(
                "%s weights into a ViT with GELU: right for LAION's, but OpenAI's own CLIP "
                "weights need --model_option quick_gelu=true",
                source,
            )
        siglip = "SigLIP" in source  # its ViTs use the tanh-approximated GELU
        if self.gelu_approximate and not self.quick_gelu and not siglip:
            logging.warning(
                "%s weights into a ViT with the tanh-approximated GELU: %s's ViTs use the "
                "exact one%s; pass --model_option gelu_approximate=false for them",
                source,
                source,
                " unless made with gelu_tanh" if source == "timm" else "",
            )
        if siglip and not self.gelu_approximate:
            logging.warning(
                "%s weights into a ViT with the exact GELU: SigLIP's ViTs use the "
                "tanh-approximated one; leave --model_option gelu_approximate out for them",
                source,
            )
        if "norm_pre.weight" in state_dict:  # CLIP's towers, timm's too, are told by it
            family, epsilon = "CLIP", CLIP_LAYER_NORM_EPSILON
        elif source == "Hugging Face":
            family, epsilon = source, HF_LAYER_NORM_EPSILON
        else:
            return
        if self.layer_norm_epsilon != epsilon:
            logging.warning(
                "%s weights into a ViT with LayerNorm epsilon %g: its ViTs use %g; "
                "pass --model_option layer_norm_epsilon=%g for them",
                family,
                self.layer_norm_epsilon,
                epsilon,
                epsilon,
            )

    @nn.compact
    def __call__(self, image: jax.Array, train: bool = False) -> jax.Array:
        del train  # no dropout or batch statistics: the same in training and evaluation
        patch = patch_pair(self.patch_size)
        x = nn.Conv(
            self.width,
            patch,
            strides=patch,
            padding="VALID",
            use_bias=self.patch_bias,
            name="embedding",
        )(image)
        n, h, w, c = x.shape
        x = jnp.reshape(x, (n, h * w, c))
        if self.posemb == "learn":
            own = self.image_grid
            if (h, w) != own and h * w == own[0] * own[1]:  # another count: its shape refuses it
                refuse_other_grid((h, w), own, self.image_size, "position embedding")
            init = nn.initializers.normal(stddev=1 / np.sqrt(c))
            x = x + self.param("pos_embedding", init, (1, h * w, c), x.dtype)
        elif self.posemb == "sincos2d":
            x = x + posemb_sincos_2d(h, w, c).astype(x.dtype)
        if self.num_registers:
            init = nn.initializers.normal(1e-6)
            reg = self.param("reg", init, (1, self.num_registers, c), x.dtype)
            x = jnp.concatenate([jnp.tile(reg, (n, 1, 1)), x], axis=1)
        if self.distilled:
            dist = self.param("dist", nn.initializers.zeros, (1, 1, c), x.dtype)
            x = jnp.concatenate([jnp.tile(dist, (n, 1, 1)), x], axis=1)
        if self.has_class_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, c), x.dtype)
            x = jnp.concatenate([jnp.tile(cls, (n, 1, 1)), x], axis=1)
        eps = self.layer_norm_epsilon
        if self.pre_norm:
            x = layer_norm(eps, "norm_pre")(x)
        x = Encoder(
            self.depth,
            self.mlp_dim,
            self.num_heads,
            self.gelu_approximate,
            eps,
            self.quick_gelu,
            self.layer_scale,
            final_norm=not self.fc_norm,
            rel_pos_grid=(h, w) if self.rel_pos_bias else None,
            swiglu=self.swiglu,
            name="Transformer",
        )(x)
        if self.pool_type == "map":
            x = MAPHead(
                self.mlp_dim,
                self.num_heads,
                self.gelu_approximate,
                eps,
                self.quick_gelu,
                name="MAPHead_0",
            )(x)
        elif self.distilled:
            tokens = (x[:, 0], x[:, 1])
            if self.num_classes:
                kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
                names = ("head", "head_dist")
                heads = (nn.Dense(self.num_classes, name=name, **kw) for name in names)
                tokens = tuple(head(t) for head, t in zip(heads, tokens, strict=True))
            return (tokens[0] + tokens[1]) / 2
        else:
            x = pool(x, self.pool_type, self.prefix_tokens)
        if self.fc_norm:
            x = layer_norm(eps, "fc_norm")(x)
        if self.rep_size:
            x = nn.tanh(nn.Dense(self.rep_size, name="pre_logits")(x))
        if self.num_classes:
            kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
            x = nn.Dense(self.num_classes, name="head", **kw)(x)
        return x


def _fit_position_grid(flat: dict[str, Any], patches: int, rule: str) -> dict[str, Any]:
    """`flat` with its `pos_embedding` of another square grid resampled to the model's
    `patches` (a square count) as `rule` does at each forward or at load: `DINOv2` (its own
    checkpoints), `Hugging Face DINOv2` (transformers' Dinov2 models) or `timm` (the others;
    `position_embedding`); logged, naming the checkpoint's own grid."""
    from absl import logging

    from jaxdissect.models import position_embedding

    pos = flat.get("pos_embedding")
    if pos is None or pos.ndim != 3 or pos.shape[1] == patches:
        return flat
    side, own = math.isqrt(patches), math.isqrt(pos.shape[1])
    if side * side != patches or own * own != pos.shape[1]:
        return flat  # not square grids: the fit names the shapes
    registers = "reg" in flat
    if rule == "DINOv2":
        resampled = position_embedding.resample_dinov2(pos, side, registers=registers)
    elif rule == "Hugging Face DINOv2" and not registers:
        resampled = position_embedding.resample_transformers_dinov2(pos, side)
    else:  # timm's, and transformers' Dinov2WithRegisters (the same antialiased resize)
        resampled = position_embedding.resample_timm(pos, side)
    logging.info(
        "position embedding resampled from the checkpoint's %dx%d patches to the model's "
        "%dx%d, as %s does (bicubic); --model_option image_size runs it at its own grid",
        own,
        own,
        side,
        side,
        "transformers" if rule.startswith("Hugging Face") else rule,
    )
    return {**flat, "pos_embedding": resampled}


def refuse_other_grid(
    grid: tuple[int, int], own: tuple[int, int], image_size: int, what: str
) -> None:
    """Refuse a patch `grid` other than `own`, the grid of `image_size` that the ViT's
    learned `what` is of: read on another grid, its rows would land on other patches."""
    raise ValueError(
        f"a {grid[0]}x{grid[1]} patch grid: the learned {what} is of the {own[0]}x{own[1]} "
        f"grid of image_size={image_size}, and its rows would land on other patches; give "
        f"inputs of {image_size}x{image_size} px"
    )


def pool(x: jax.Array, pool_type: str, prefix: int) -> jax.Array:
    """[B, tokens, C] pooled as `pool_type` (`tok`, `gap` or `tok+gap`) reads it, the
    `prefix` tokens (class, distillation, register tokens) before the patches'."""
    if pool_type == "tok":
        return x[:, 0]
    patches = x[:, prefix:].mean(axis=1)
    return jnp.concatenate([x[:, 0], patches], axis=-1) if pool_type == "tok+gap" else patches


def token_layout(
    patch_size: int | tuple[int, int], input_shape: tuple[int, ...], prefix: int = 0
) -> TokenLayout:
    """The tokens of a ViT's blocks: `prefix` tokens (class, distillation, register tokens),
    then the row-major patch grid of an input of `input_shape` (height, width, ...), whose
    sides must be multiples of the patch size (`preprocess.patch_grid`)."""
    return TokenLayout(patch_grid(input_shape, patch_size), prefix=prefix)


def _variant(variant: str, **options: Any) -> ViT:
    width, depth, mlp_dim, num_heads = VARIANTS[variant]
    base = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads, patch_size=(16, 16))
    return ViT(**{**base, **options})


def _takes_vit_options(factory: Callable[..., ViT]) -> Callable[..., ViT]:
    """`factory` with ViT's attributes as its keyword-only signature and their types as its
    annotations, so that an option it does not take, or of another type, is named before
    anything is built (`models.load.check_request`)."""
    params = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for p in inspect.signature(ViT).parameters.values()
        if p.name not in ("parent", "name")
    ]
    factory.__signature__ = inspect.Signature(params, return_annotation=ViT)
    hints = typing.get_type_hints(ViT)
    factory.__annotations__ = {**{p.name: hints[p.name] for p in params}, "return": ViT}
    return factory


@_takes_vit_options
def vit_ti16(**options: Any) -> ViT:
    """ViT-Ti/16 (width 192, 12 blocks, 3 heads); options as `ViT`'s attributes."""
    return _variant("Ti", **options)


@_takes_vit_options
def vit_s16(**options: Any) -> ViT:
    """ViT-S/16 (width 384, 12 blocks, 6 heads)."""
    return _variant("S", **options)


@_takes_vit_options
def vit_b16(**options: Any) -> ViT:
    """ViT-B/16 (width 768, 12 blocks, 12 heads)."""
    return _variant("B", **options)


def vit_scenes(*, num_classes: int = 17, image_size: int = 96) -> ViT:
    """A small ViT for the offline experiments (`experiments/train.py`, the synthetic scenes).

    6 blocks of width 64 (2 heads, MLP 256), 12x12 patches (an 8x8 grid at 96 px), mean
    pooling, learned position embeddings: 332,945 parameters at 17 classes (the small CNN:
    541,905).
    """
    return ViT(
        num_classes=num_classes,
        patch_size=(12, 12),
        width=64,
        depth=6,
        mlp_dim=256,
        num_heads=2,
        pool_type="gap",
        image_size=image_size,
    )

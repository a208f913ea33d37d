"""The ViT of `models/vit.py` in Flax NNX, with the same module and parameter paths.

Every NNX attribute is named as the Linen module it twins (`embedding`,
`Transformer.encoderblock_3.MlpBlock_0.gelu`, ...), so `nnx.state(model)` has
the Linen params' paths: `from_linen` copies a Linen ViT's (or a big_vision
`.npz`'s) parameters in, and the same layer names dissect either twin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from jaxdissect.models import vit
from jaxdissect.preprocess import patch_pair


def _linen_attention(query, key, value, *, is_causal: bool = False, **kwargs) -> jax.Array:
    """Linen's attention as NNX calls it: the same numbers as the Linen twin, bit for bit.

    (NNX's own goes through `jax.nn.dot_product_attention`, a different XLA program.)
    """
    if is_causal:
        raise ValueError("is_causal=True: the ViT's attention is bidirectional")
    return linen.dot_product_attention(query, key, value, **kwargs)


def _layer_norm(features: int, epsilon: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """`layers.layer_norm`'s twin: the variance the mean of squared deviations."""
    return nnx.LayerNorm(features, epsilon=epsilon, use_fast_variance=False, rngs=rngs)


class Gelu(nnx.Module):
    """GELU as a module, so that the MLP's hidden units have a path to capture (`quick`:
    OpenAI CLIP's `vit.quick_gelu` in its place)."""

    def __init__(self, approximate: bool = True, quick: bool = False):
        self.approximate, self.quick = approximate, quick

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.quick:
            return vit.quick_gelu(x)
        return jax.nn.gelu(x, approximate=self.approximate)


class SwiGLU(nnx.Module):
    """silu(a) * b of the halves [a, b] of the last axis (`vit.SwiGLU`)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        a, b = jnp.split(x, 2, axis=-1)
        return linen.silu(a) * b


class MlpBlock(nnx.Module):
    """Dense -> GELU -> Dense; with `swiglu`, Dense (twice `mlp_dim`) -> SwiGLU -> Dense."""

    def __init__(self, width: int, config: vit.ViT, *, rngs: nnx.Rngs, swiglu: bool = False):
        hidden = 2 * config.mlp_dim if swiglu else config.mlp_dim
        self.Dense_0 = nnx.Linear(width, hidden, rngs=rngs)
        if swiglu:
            self.swiglu = SwiGLU()
        else:
            self.gelu = Gelu(config.gelu_approximate, config.quick_gelu)
        self.Dense_1 = nnx.Linear(config.mlp_dim, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = self.swiglu if hasattr(self, "swiglu") else self.gelu
        return self.Dense_1(act(self.Dense_0(x)))


class Encoder1DBlock(nnx.Module):
    """Pre-LN transformer block: x + MHSA(LN(x)), then x + MLP(LN(x)); with
    `layer_scale`, each branch scaled per channel by `ls1` / `ls2`; with `rel_pos_bias`,
    BEiT's bias per relative position and head over the grid of `image_size`."""

    def __init__(self, config: vit.ViT, *, rngs: nnx.Rngs):
        width, eps = config.width, config.layer_norm_epsilon
        self.LayerNorm_0 = _layer_norm(width, eps, rngs)
        self.MultiHeadDotProductAttention_0 = nnx.MultiHeadAttention(
            config.num_heads,
            width,
            decode=False,
            deterministic=True,
            attention_fn=_linen_attention,
            rngs=rngs,
        )
        self.LayerNorm_1 = _layer_norm(width, eps, rngs)
        self.MlpBlock_0 = MlpBlock(width, config, rngs=rngs, swiglu=config.swiglu)
        self.layer_scale = config.layer_scale
        if config.layer_scale:
            self.ls1 = nnx.Param(jnp.ones((width,)))
            self.ls2 = nnx.Param(jnp.ones((width,)))
        self.rel_pos_grid = None
        if config.rel_pos_bias:
            patch = patch_pair(config.patch_size)
            self.rel_pos_grid = (config.image_size // patch[0], config.image_size // patch[1])
            shape = vit.relative_bias_table_shape(self.rel_pos_grid, config.num_heads)
            self.relative_position_bias_table = nnx.Param(jnp.zeros(shape))

    def __call__(self, x: jax.Array) -> jax.Array:
        y, attention = self.LayerNorm_0(x), self.MultiHeadDotProductAttention_0
        if self.rel_pos_grid is None:
            y = attention(y)
        else:  # the attention's own steps, with the bias
            h, w = self.rel_pos_grid
            if x.shape[1] != h * w + 1:
                raise ValueError(
                    f"{x.shape[1] - 1} patches: the relative position bias is learned for a "
                    f"{h}x{w} grid (image_size)"
                )
            table = self.relative_position_bias_table[...]
            bias = vit.relative_position_bias(table, self.rel_pos_grid).astype(y.dtype)
            q, k, v = attention.query(y), attention.key(y), attention.value(y)
            y = attention.out(_linen_attention(q, k, v, bias=bias, deterministic=True))
        x = x + (y * self.ls1[...] if self.layer_scale else y)
        y = self.MlpBlock_0(self.LayerNorm_1(x))
        return x + (y * self.ls2[...] if self.layer_scale else y)


class MAPHead(nnx.Module):
    """Multihead attention pooling: a learned `probe` query, then a residual MLP."""

    def __init__(self, config: vit.ViT, *, rngs: nnx.Rngs):
        c = config.width
        self.probe = nnx.Param(jnp.zeros((1, 1, c)))
        self.MultiHeadDotProductAttention_0 = nnx.MultiHeadAttention(
            config.num_heads,
            c,
            decode=False,
            deterministic=True,
            attention_fn=_linen_attention,
            rngs=rngs,
        )
        self.LayerNorm_0 = _layer_norm(c, config.layer_norm_epsilon, rngs)
        self.MlpBlock_0 = MlpBlock(c, config, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        probe = jnp.tile(self.probe[...], (x.shape[0], 1, 1))
        x = self.MultiHeadDotProductAttention_0(probe, x)
        x = x + self.MlpBlock_0(self.LayerNorm_0(x))
        return x[:, 0]


class Encoder(nnx.Module):
    """`depth` blocks (`encoderblock_{i}`) and the final `encoder_norm` (but with
    `fc_norm`)."""

    def __init__(self, config: vit.ViT, *, rngs: nnx.Rngs):
        self.depth, self.final_norm = config.depth, not config.fc_norm
        for i in range(config.depth):
            setattr(self, f"encoderblock_{i}", Encoder1DBlock(config, rngs=rngs))
        if self.final_norm:
            eps = config.layer_norm_epsilon
            self.encoder_norm = _layer_norm(config.width, eps, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            x = getattr(self, f"encoderblock_{i}")(x)
        return self.encoder_norm(x) if self.final_norm else x


class ViT(nnx.Module):
    """The NNX twin of `vit.ViT`, built from a Linen ViT's settings (`config`)."""

    def __init__(self, config: vit.ViT, *, rngs: nnx.Rngs):
        self.config = config
        c = config.width
        patch = patch_pair(config.patch_size)
        self.patch_size = patch
        self.embedding = nnx.Conv(
            3, c, patch, strides=patch, padding="VALID", use_bias=config.patch_bias, rngs=rngs
        )
        h, w = config.image_size // patch[0], config.image_size // patch[1]
        if config.posemb == "learn":
            init = jax.random.normal(rngs.params(), (1, h * w, c)) / np.sqrt(c)
            self.pos_embedding = nnx.Param(init)
        if config.has_class_token:
            self.cls = nnx.Param(jnp.zeros((1, 1, c)))
        if config.distilled:
            self.dist = nnx.Param(jnp.zeros((1, 1, c)))
        if config.num_registers:
            self.reg = nnx.Param(jnp.zeros((1, config.num_registers, c)))
        if config.pre_norm:
            self.norm_pre = _layer_norm(c, config.layer_norm_epsilon, rngs)
        self.Transformer = Encoder(config, rngs=rngs)
        if config.pool_type == "map":
            self.MAPHead_0 = MAPHead(config, rngs=rngs)
        pooled = 2 * c if config.pool_type == "tok+gap" else c
        if config.fc_norm:
            eps = config.layer_norm_epsilon
            self.fc_norm = _layer_norm(pooled, eps, rngs)
        if config.rep_size:
            self.pre_logits = nnx.Linear(pooled, config.rep_size, rngs=rngs)
        if config.num_classes:
            self.head = nnx.Linear(config.rep_size or pooled, config.num_classes, rngs=rngs)
        if config.num_classes and config.distilled:
            self.head_dist = nnx.Linear(c, config.num_classes, rngs=rngs)

    def token_layout(self, input_shape: tuple[int, ...]) -> Any:
        """Its tokens at `input_shape`, as the Linen ViT's (`vit.token_layout`)."""
        config = self.config
        return vit.token_layout(self.patch_size, input_shape, config.prefix_tokens)

    @property
    def input_spec(self):
        """As the Linen twin's."""
        return self.config.input_spec

    @property
    def layer_aliases(self) -> Mapping[str, str]:
        """As the Linen twin's."""
        return self.config.layer_aliases

    @property
    def default_layers(self) -> tuple[str, ...]:
        """As the Linen twin's."""
        return self.config.default_layers

    def __call__(self, image: jax.Array) -> jax.Array:
        x = self.embedding(image)
        n, h, w, c = x.shape
        config = self.config
        if (config.posemb == "learn" or config.rel_pos_bias) and (h, w) != config.image_grid:
            what = "position embedding" if config.posemb == "learn" else "relative position bias"
            vit.refuse_other_grid((h, w), config.image_grid, config.image_size, what)
        x = x.reshape(n, h * w, c)
        if self.config.posemb == "learn":
            x = x + self.pos_embedding[...]
        elif self.config.posemb == "sincos2d":
            x = x + vit.posemb_sincos_2d(h, w, c).astype(x.dtype)
        if self.config.num_registers:
            x = jnp.concatenate([jnp.tile(self.reg[...], (n, 1, 1)), x], axis=1)
        if self.config.distilled:
            x = jnp.concatenate([jnp.tile(self.dist[...], (n, 1, 1)), x], axis=1)
        if self.config.has_class_token:
            x = jnp.concatenate([jnp.tile(self.cls[...], (n, 1, 1)), x], axis=1)
        if self.config.pre_norm:
            x = self.norm_pre(x)
        x = self.Transformer(x)
        if self.config.pool_type == "map":
            x = self.MAPHead_0(x)
        elif self.config.distilled:
            if self.config.num_classes:
                return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
            return (x[:, 0] + x[:, 1]) / 2
        else:
            x = vit.pool(x, self.config.pool_type, self.config.prefix_tokens)
        if self.config.fc_norm:
            x = self.fc_norm(x)
        if self.config.rep_size:
            x = jnp.tanh(self.pre_logits(x))
        if self.config.num_classes:
            x = self.head(x)
        return x


def from_linen(config: vit.ViT, params: Mapping[str, Any]) -> ViT:
    """An NNX ViT holding `params` (a Linen ViT's `variables['params']`), path for path.

    The module is built abstractly (`nnx.eval_shape`): no initialiser runs.
    """
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0))))
    flat_params = traverse_util.flatten_dict(dict(params))
    ours = {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}
    missing = sorted("/".join(p) for p in ours if p not in flat_params)
    unexpected = sorted("/".join(p) for p in flat_params if p not in ours)
    if missing or unexpected:
        raise ValueError(
            f"params do not fit the NNX ViT: missing {missing}, unexpected {unexpected}"
        )
    for path, var in ours.items():
        value = jnp.asarray(flat_params[path])
        if value.shape != var.get_value().shape:
            raise ValueError(
                f"params/{'/'.join(path)}: shape {value.shape}, the model needs "
                f"{var.get_value().shape}"
            )
        var.set_value(value)
    return nnx.merge(graphdef, state)

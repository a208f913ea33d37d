"""A plain PyTorch ViT with timm's `VisionTransformer` module names and forward pass.

The parity reference of `models/vit.py` (timm itself is not installed here). State-dict
keys are timm's (`patch_embed.proj.weight`, `cls_token`, `pos_embed`,
`blocks.3.attn.qkv.weight`, `blocks.3.mlp.fc1.bias`, `norm.weight`, `head.weight`);
`class_token=False` is timm's `class_token=False, global_pool='avg', fc_norm=False`
(the final norm, then the mean of the tokens: big_vision's `gap`); `pool="avg"` with a class
token pools the mean of the other tokens past the class token and registers (timm's
`global_pool='avg'`), `pool="token+avg"` the class token beside that mean (DINOv2's linear
classifiers); `fc_norm` moves the final norm after the pooling (timm's `fc_norm`: MAE's
fine-tuned ViTs). `distilled` is DeiT's `VisionTransformerDistilled`: a `dist_token` after
the class token, with its position row, and `head_dist`; in evaluation the mean of the two
heads. CLIP's image tower is
timm's `pre_norm=True` (`norm_pre`, no patch-embedding bias) with `act="quick_gelu"` for
OpenAI's weights; `layer_scale` is timm's LayerScale (`ls1.gamma`, `ls2.gamma`).
`dinov2` is DINOv2's backbone (its `mask_token`, `registers` as `register_tokens` after the
class token, and its position embedding interpolated to each input's grid as it runs:
"offset", its first backbones' scale factor (side + 0.1) / M, "antialias", its
backbones with registers, or "size", Hugging Face transformers' `Dinov2Model` today).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.head_dim**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SwiGLUPacked(nn.Module):
    """timm's `SwiGLUPacked` activation (DINOv2's `SwiGLUFFNFused`): silu(x1) * x2 of the
    halves of the packed `fc1` output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return F.silu(x1) * x2


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, approximate: str, swiglu: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden if swiglu else hidden)
        if swiglu:
            self.act = SwiGLUPacked()
        elif approximate == "quick_gelu":
            self.act = QuickGELU()
        else:
            self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class AttentionPoolLatent(nn.Module):
    """timm's attention pooling (SigLIP's): a learned `latent` query attends over the
    tokens (`q`, fused `kv`, `proj`), then a residual MLP on its LayerNorm."""

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, approximate: str, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        d = c // self.num_heads
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, 1, self.num_heads, d).transpose(1, 2)
        kv = self.kv(x).reshape(b, n, 2, self.num_heads, d).permute(2, 0, 3, 1, 4)
        attn = ((q * d**-0.5) @ kv[0].transpose(-2, -1)).softmax(dim=-1)
        x = self.proj((attn @ kv[1]).transpose(1, 2).reshape(b, 1, c))
        return (x + self.mlp(self.norm(x)))[:, 0]


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        approximate: str,
        eps: float,
        layer_scale: bool = False,
        swiglu: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim) if layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, mlp_dim, approximate, swiglu)
        self.ls2 = LayerScale(dim) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_dim: int = 768,
        num_classes: int = 1000,
        class_token: bool = True,
        approximate: str = "none",  # or "tanh", or "quick_gelu" (OpenAI CLIP's)
        eps: float = 1e-6,  # timm's; Hugging Face's ViTs: 1e-12
        pre_norm: bool = False,
        layer_scale: bool = False,
        dinov2: str | None = None,  # "offset", "antialias" or "size"
        registers: int = 0,
        map_head: bool = False,  # timm's attn_pool (SigLIP): pooling by attention
        pool: str | None = None,  # "token", "avg" or "token+avg"; default by class_token
        fc_norm: bool = False,
        distilled: bool = False,
        swiglu: bool = False,  # DINOv2 giant's packed SwiGLU MLP
    ):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(
            3, embed_dim, patch_size, stride=patch_size, bias=not pre_norm
        )
        n = (img_size // patch_size) ** 2
        self.class_token = class_token
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if distilled:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        prefix = int(class_token) + int(distilled)
        self.pos_embed = nn.Parameter(torch.zeros(1, n + prefix, embed_dim))
        self.patch_size, self.dinov2 = patch_size, dinov2
        if dinov2:
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        if registers:
            self.register_tokens = nn.Parameter(torch.zeros(1, registers, embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim, eps=eps) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_dim, approximate, eps, layer_scale, swiglu)
                for _ in range(depth)
            ]
        )
        self.pool = pool or ("token" if class_token else "avg")
        self.prefix = prefix + registers
        pooled = 2 * embed_dim if self.pool == "token+avg" else embed_dim
        self.norm = nn.Identity() if fc_norm else nn.LayerNorm(embed_dim, eps=eps)
        self.fc_norm = nn.LayerNorm(pooled, eps=eps) if fc_norm else nn.Identity()
        if map_head:
            self.attn_pool = AttentionPoolLatent(embed_dim, num_heads, mlp_dim, approximate, eps)
        self.head = nn.Linear(pooled, num_classes)
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes)

    def _pos_embed(self, side: int) -> torch.Tensor:
        """DINOv2's `interpolate_pos_encoding` for a side x side grid (square inputs)."""
        pos = self.pos_embed
        m = math.isqrt(pos.shape[1] - 1)
        if not self.dinov2 or side == m:
            return pos
        grid = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.dinov2 == "offset":
            scale = (side + 0.1) / m
            kw = dict(scale_factor=(scale, scale), antialias=False)
        else:
            kw = dict(size=(side, side), antialias=self.dinov2 == "antialias")
        grid = F.interpolate(grid, mode="bicubic", **kw).permute(0, 2, 3, 1)
        return torch.cat([pos[:, :1], grid.reshape(1, side * side, -1)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = x.shape[-1] // self.patch_size
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        if hasattr(self, "dist_token"):
            x = torch.cat([self.dist_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.class_token:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self._pos_embed(side)
        if hasattr(self, "register_tokens"):
            registers = self.register_tokens.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
        x = self.norm(self.blocks(self.norm_pre(x)))
        if hasattr(self, "head_dist"):
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        if hasattr(self, "attn_pool"):
            x = self.attn_pool(x)
        elif self.pool == "token":
            x = x[:, 0]
        elif self.pool == "avg":
            x = x[:, self.prefix :].mean(dim=1)
        else:
            x = torch.cat([x[:, 0], x[:, self.prefix :].mean(dim=1)], dim=1)
        return self.head(self.fc_norm(x))


def randomize_(model: VisionTransformer, seed: int = 0) -> VisionTransformer:
    """Random weights of O(1) activations, non-trivial norms, tokens and embeddings."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            elif ("norm" in name and name.endswith("weight")) or name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()

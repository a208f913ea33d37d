"""timm's BEiT (`beit_base_patch16_224`'s layout) in plain PyTorch, its names and forward pass.

The parity reference of `models/vit.py`'s BEiT options (timm is not installed here): no
absolute position embedding; each block's attention a fused `qkv` without bias beside
`q_bias` and `v_bias` (the key's bias 0), and a learned `relative_position_bias_table` over
[class token, patches] indexed by the `relative_position_index` buffer (timm's
`gen_relative_position_index`, line by line); LayerScale `gamma_1`, `gamma_2`; the patch
tokens' mean after the class token, `fc_norm`, `head`. LayerNorm epsilon 1e-6, exact GELU.
"""

from __future__ import annotations

import torch
from torch import nn


def gen_relative_position_index(window: tuple[int, int]) -> torch.Tensor:
    distances = (2 * window[0] - 1) * (2 * window[1] - 1) + 3
    area = window[0] * window[1]
    coords = torch.stack(
        torch.meshgrid([torch.arange(window[0]), torch.arange(window[1])], indexing="ij")
    )
    flat = torch.flatten(coords, 1)
    relative = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    relative[:, :, 0] += window[0] - 1
    relative[:, :, 1] += window[1] - 1
    relative[:, :, 0] *= 2 * window[1] - 1
    index = torch.zeros(size=(area + 1,) * 2, dtype=relative.dtype)
    index[1:, 1:] = relative.sum(-1)
    index[0, 0:] = distances - 3
    index[0:, 0] = distances - 2
    index[0, 0] = distances - 1
    return index


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: tuple[int, int]):
        super().__init__()
        self.num_heads, self.window = num_heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
        self.v_bias = nn.Parameter(torch.zeros(dim))
        distances = (2 * window[0] - 1) * (2 * window[1] - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.zeros(distances, num_heads))
        self.register_buffer("relative_position_index", gen_relative_position_index(window))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        qkv = nn.functional.linear(x, self.qkv.weight, bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * (c // self.num_heads) ** -0.5) @ k.transpose(-2, -1)
        area = self.window[0] * self.window[1] + 1
        table = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + table.view(area, area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_dim: int, window: tuple[int, int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, window)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, mlp_dim)
        self.gamma_1 = nn.Parameter(0.1 * torch.ones(dim))
        self.gamma_2 = nn.Parameter(0.1 * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class Beit(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_dim: int = 3072,
        num_classes: int = 1000,
    ):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        window = (img_size // patch_size, img_size // patch_size)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_dim, window) for _ in range(depth)]
        )
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.head(self.fc_norm(x[:, 1:].mean(dim=1)))


def randomize_(model: Beit, seed: int = 0) -> Beit:
    """Random weights of O(1) activations, bias tables large enough to matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.ndim >= 2 and name != "cls_token":
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight") or "gamma" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()

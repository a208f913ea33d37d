"""torchvision's ConvNeXt in plain PyTorch, with its module names and forward pass.

The parity reference of `models/convnext.py` (torchvision itself is not installed here):
`features.0` stem (conv 4x4 stride 4, LayerNorm2d), stages of `CNBlock`s (`block`: depthwise
7x7 conv, Permute, LayerNorm, Linear, GELU, Linear, Permute; `layer_scale` [C, 1, 1]) and
downsampling (LayerNorm2d, conv 2x2 stride 2), `avgpool`, `classifier` (LayerNorm2d,
Flatten, Linear).
"""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims: list[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


class CNBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * self.block(x)


class ConvNeXt(nn.Module):
    def __init__(self, widths=(96, 192, 384, 768), depths=(3, 3, 9, 3), num_classes=1000):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(3, widths[0], kernel_size=4, stride=4), LayerNorm2d(widths[0], eps=1e-6)
            )
        ]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            if i:
                layers.append(
                    nn.Sequential(
                        LayerNorm2d(widths[i - 1], eps=1e-6),
                        nn.Conv2d(widths[i - 1], width, kernel_size=2, stride=2),
                    )
                )
            layers.append(nn.Sequential(*[CNBlock(width) for _ in range(depth)]))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(widths[-1], eps=1e-6), nn.Flatten(1), nn.Linear(widths[-1], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def randomize_(model: ConvNeXt, seed: int = 0) -> ConvNeXt:
    """Random weights of O(1) activations: layer scales and norms far from their init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and not name.endswith("layer_scale"):
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * fan_in**-0.5)
            elif name.endswith("layer_scale") or name.endswith("weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()

"""Plain PyTorch re-implementations of torchvision's AlexNet, VGG, ResNet and DenseNet.

Parity references for the Flax models (torchvision itself is not installable
here). Module names and state-dict keys follow torchvision's (`features.0.weight`,
`layer1.0.downsample.0.weight`, `features.denseblock1.denselayer1.norm1.running_mean`);
the `width`/`batch_norm`/`dropout` options mirror the Flax ones, so that
reduced configurations have a reference too.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def _c(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _features(cfg: list, batch_norm: bool) -> nn.Sequential:
    """cfg: (out, kernel, stride, padding) convs and ("M", kernel, stride) max pools."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in cfg:
        if item[0] == "M":
            layers.append(nn.MaxPool2d(kernel_size=item[1], stride=item[2]))
            continue
        out, k, s, p = item
        layers.append(nn.Conv2d(in_ch, out, kernel_size=k, stride=s, padding=p))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU(inplace=True))
        in_ch = out
    return nn.Sequential(*layers)


def _classifier(entries: list) -> nn.Sequential:
    """entries: nn.Module or None (a dropout left out: keeps the other indices)."""
    return nn.Sequential(OrderedDict((str(i), m) for i, m in enumerate(entries) if m is not None))


class AlexNet(nn.Module):
    """torchvision.models.AlexNet (+ BN after convs, + width, + no-dropout options)."""

    def __init__(
        self,
        num_classes: int = 1000,
        width: float = 1.0,
        batch_norm: bool = False,
        dropout: bool = True,
    ) -> None:
        super().__init__()
        c = lambda n: _c(n, width)  # noqa: E731
        cfg = [
            (c(64), 11, 4, 2),
            ("M", 3, 2),
            (c(192), 5, 1, 2),
            ("M", 3, 2),
            (c(384), 3, 1, 1),
            (c(256), 3, 1, 1),
            (c(256), 3, 1, 1),
            ("M", 3, 2),
        ]
        self.features = _features(cfg, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        hidden = c(4096)
        drop = (lambda: nn.Dropout(0.5)) if dropout else (lambda: None)
        self.classifier = _classifier(
            [
                drop(),
                nn.Linear(c(256) * 6 * 6, hidden),
                nn.ReLU(inplace=True),
                drop(),
                nn.Linear(hidden, hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, num_classes),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class VGG16(nn.Module):
    """torchvision.models.vgg16 / vgg16_bn (+ width, + no-dropout options)."""

    def __init__(
        self,
        num_classes: int = 1000,
        width: float = 1.0,
        batch_norm: bool = False,
        dropout: bool = True,
    ) -> None:
        super().__init__()
        cfg: list = []
        for n, reps in ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3)):
            cfg += [(_c(n, width), 3, 1, 1)] * reps + [("M", 2, 2)]
        self.features = _features(cfg, batch_norm)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        hidden = _c(4096, width)
        drop = (lambda: nn.Dropout(0.5)) if dropout else (lambda: None)
        self.classifier = _classifier(
            [
                nn.Linear(_c(512, width) * 7 * 7, hidden),
                nn.ReLU(True),
                drop(),
                nn.Linear(hidden, hidden),
                nn.ReLU(True),
                drop(),
                nn.Linear(hidden, num_classes),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample, batch_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = _norm(planes, batch_norm)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = _norm(planes, batch_norm)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample, batch_norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = _norm(planes, batch_norm)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = _norm(planes, batch_norm)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = _norm(planes * 4, batch_norm)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet (v1.5) (+ width, + BN-as-Identity options)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        width: float = 1.0,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.inplanes = _c(64, width)
        self.batch_norm = batch_norm
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, 3, bias=False)
        self.bn1 = _norm(self.inplanes, batch_norm)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, _c(64, width), layers[0], 1)
        self.layer2 = self._make_layer(block, _c(128, width), layers[1], 2)
        self.layer3 = self._make_layer(block, _c(256, width), layers[2], 2)
        self.layer4 = self._make_layer(block, _c(512, width), layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(_c(512, width) * block.expansion, num_classes)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                _norm(planes * block.expansion, self.batch_norm),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.batch_norm)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, 1, None, self.batch_norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# torchvision's ResNets: (block, blocks per stage).
RESNET_LAYOUT = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
    "resnet152": (Bottleneck, (3, 8, 36, 3)),
}


class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, 1, bias=False)

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(inputs, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    """torchvision.models.DenseNet (drop_rate 0, as densenet161)."""

    def __init__(
        self,
        growth_rate: int = 48,
        block_config: tuple[int, ...] = (6, 12, 36, 24),
        num_init_features: int = 96,
        bn_size: int = 4,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    ("conv0", nn.Conv2d(3, num_init_features, 7, 2, 3, bias=False)),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_features, num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Not in place (unlike torchvision) so that a hook on `features` sees norm5's output.
        out = F.relu(self.features(x))
        out = torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)
        return self.classifier(out)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights with non-trivial BatchNorm statistics and affine parameters.

    Conv/Linear weights are rescaled so that activations stay O(1) through deep stacks.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model.eval()

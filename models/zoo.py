"""Architecture registry: `--arch` names to Flax model constructors.

Every constructor takes keyword options (`num_classes`, and where the
architecture has them `width`, `batch_norm`, `dropout`) and returns a Linen
module whose submodule paths mirror the torch layout (see `torch_import`; the
ViTs mirror big_vision's parameter names instead, see `models/vit.py`), with
`input_spec` (a `jaxdissect.preprocess.InputSpec`) and `layer_aliases`
(user-facing names such as AlexNet's `conv5` -> the module path they mean).
Imports are lazy so that naming one architecture loads only its module.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import flax.linen as nn

ARCHS: dict[str, str] = {
    "alexnet": "jaxdissect.models.alexnet:alexnet",
    "vgg16": "jaxdissect.models.vgg:vgg16",
    "resnet18": "jaxdissect.models.resnet:resnet18",
    "resnet34": "jaxdissect.models.resnet:resnet34",
    "resnet50": "jaxdissect.models.resnet:resnet50",
    "resnet101": "jaxdissect.models.resnet:resnet101",
    "resnet152": "jaxdissect.models.resnet:resnet152",
    "googlenet": "jaxdissect.models.googlenet:googlenet",
    "densenet161": "jaxdissect.models.densenet:densenet161",
    "efficientnet_lite0": "jaxdissect.models.efficientnet_lite:efficientnet_lite0",
    "convnext_tiny": "jaxdissect.models.convnext:convnext_tiny",
    "convnext_small": "jaxdissect.models.convnext:convnext_small",
    "convnext_base": "jaxdissect.models.convnext:convnext_base",
    "convnext_large": "jaxdissect.models.convnext:convnext_large",
    "swin_t": "jaxdissect.models.swin:swin_t",
    "swin_s": "jaxdissect.models.swin:swin_s",
    "swin_b": "jaxdissect.models.swin:swin_b",
    "clip_rn50": "jaxdissect.models.clip_resnet:clip_rn50",
    "clip_rn101": "jaxdissect.models.clip_resnet:clip_rn101",
    "clip_rn50x4": "jaxdissect.models.clip_resnet:clip_rn50x4",
    "clip_rn50x16": "jaxdissect.models.clip_resnet:clip_rn50x16",
    "clip_rn50x64": "jaxdissect.models.clip_resnet:clip_rn50x64",
    "vit_ti16": "jaxdissect.models.vit:vit_ti16",
    "vit_s16": "jaxdissect.models.vit:vit_s16",
    "vit_b16": "jaxdissect.models.vit:vit_b16",
}


# Architectures whose `num_classes=0` builds no head: the output is the pooled features, as
# in self-supervised checkpoints (DINO's, MAE's, Barlow Twins') that have none.
HEADLESS_ARCHS: frozenset[str] = frozenset(
    {
        *("vit_ti16", "vit_s16", "vit_b16", "swin_t", "swin_s", "swin_b"),
        *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
        *(f"convnext_{v}" for v in ("tiny", "small", "base", "large")),
    }
)


# The variables of the heads `num_classes=0` leaves out of `HEADLESS_ARCHS` (ResNets' `fc`,
# ViTs' and Swins' `head`, ConvNeXts' Linear after the kept LayerNorm).
HEAD_VARIABLES = ("params/fc/", "params/head/", "params/classifier/2/")


def least_classes(arch: str) -> int:
    """The smallest `num_classes` `arch` takes: 0 (no head) for `HEADLESS_ARCHS`, else 1."""
    return 0 if arch in HEADLESS_ARCHS else 1


def factory(arch: str) -> Callable[..., nn.Module]:
    """The constructor of `arch`: a name of `ARCHS`, or `package.module:attr` (`attr` may be
    dotted, `module:Class.make`), imported on demand."""
    spec = ARCHS.get(arch, arch)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"unknown architecture {arch!r}: one of {', '.join(sorted(ARCHS))}, "
            "or package.module:factory"
        )
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"architecture {arch!r}: cannot import {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"architecture {arch!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def build(arch: str, **options) -> nn.Module:
    """Construct architecture `arch` (see `factory`) with `options` (e.g. num_classes=365)."""
    return factory(arch)(**options)

"""CLIP's ResNet image towers: parity with OpenAI's `ModifiedResNet` in torch, its files."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdissect import capture
from jaxdissect.models import clip_resnet, zoo
from jaxdissect.models import load as model_load
from jaxdissect.models.checkpoint_io import load_state_dict
from jaxdissect.models.convert import variables_template
from jaxdissect.preprocess import CLIP
from tests import torch_clip_resnet as ref
from tests.model_testing import assert_close, torch_outputs, torchscript_save

STAGES = ("layer1", "layer2", "layer4")


class _CLIP(torch.nn.Module):
    """A whole CLIP as OpenAI's and open_clip's files hold it: `visual.` and a text tower."""

    def __init__(self, visual: torch.nn.Module):
        super().__init__()
        self.visual = visual
        self.token_embedding = torch.nn.Embedding(9, 4)
        self.logit_scale = torch.nn.Parameter(torch.ones([]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "positional_embedding" not in name:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (name.endswith("weight")))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("form", ["open_clip", "torchscript"])
def test_parity_with_openais_modified_resnet(tmp_path, form):
    """A small ModifiedResNet (one block a stage, width 8, 4 heads, 64 px) with random
    weights and batch statistics, in a whole CLIP saved as open_clip does or traced and
    saved as OpenAI's `.pt` (TorchScript): the stages and the embedding within 1e-4."""
    visual = ref.ModifiedResNet((1, 1, 1, 1), output_dim=32, heads=4, input_resolution=64, width=8)
    whole = _randomize(_CLIP(visual))
    path = tmp_path / "clip.pt"
    if form == "open_clip":
        torch.save(whole.state_dict(), path)
    else:
        torchscript_save(whole, torch.zeros(1, 3, 64, 64), path)
    model = clip_resnet.CLIPResNet(
        (1, 1, 1, 1), 8, 32, 4, input_spec=dataclasses.replace(CLIP, size=64)
    )
    state = load_state_dict(path)
    variables = model.import_state_dict(state, variables_template(model, 64))
    x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
    want, want_stages = torch_outputs(visual, x, {s: s for s in STAGES})
    tap = capture.make_tap(model, variables, list(STAGES), input_shape=(64, 64, 3))
    with jax.default_matmul_precision("highest"):
        got = jax.jit(model.apply)(variables, jnp.asarray(x))
        stages = jax.jit(tap.fn)(tap.variables, jnp.asarray(x))
    for name in STAGES:
        assert_close(stages[name], want_stages[name], name)
    assert_close(got, want, "embedding")


def test_full_size_rn50_through_the_loader_and_the_sizes(tmp_path):
    """RN50 at full size (224 px, 7x7 attention pooling) through the scripts' loader from
    an open_clip-style file; each variant's parameters as OpenAI's module's."""
    for arch, (layers, width, embed, size) in (
        ("clip_rn50", clip_resnet.VARIANTS["RN50"]),
        ("clip_rn101", clip_resnet.VARIANTS["RN101"]),
        ("clip_rn50x4", clip_resnet.VARIANTS["RN50x4"]),
        ("clip_rn50x16", clip_resnet.VARIANTS["RN50x16"]),
        ("clip_rn50x64", clip_resnet.VARIANTS["RN50x64"]),
    ):
        model = zoo.build(arch)
        assert model.input_spec.size == size
        shapes = jax.eval_shape(
            lambda m=model, s=size: m.init(jax.random.key(0), jnp.zeros((1, s, s, 3)))
        )
        count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))
        with torch.device("meta"):  # shapes only: no memory, no initialisation
            torch_model = ref.ModifiedResNet(layers, embed, width * 32 // 64, size, width)
        assert count == sum(p.numel() for p in torch_model.parameters()), arch
    visual = ref.ModifiedResNet((3, 4, 6, 3), 1024, 32, 224, 64)
    whole = _randomize(_CLIP(visual))
    torch.save(whole.state_dict(), tmp_path / "RN50.pth")
    loaded = model_load.load("clip_rn50", weights=str(tmp_path / "RN50.pth"))
    x = np.random.default_rng(1).standard_normal((1, 224, 224, 3)).astype(np.float32)
    want, _ = torch_outputs(visual, x, {})
    with jax.default_matmul_precision("highest"):
        got = jax.jit(loaded.module.apply)(loaded.variables, jnp.asarray(x))
    assert_close(got, want, "embedding")

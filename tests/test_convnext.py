"""ConvNeXt: parity with a torch reference in torchvision's layout, timm's names, sizes."""

from __future__ import annotations

import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdissect import capture
from jaxdissect.models import convert, zoo
from jaxdissect.models import load as model_load
from jaxdissect.models.convert import variables_template
from tests import torch_convnext as ref
from tests.model_testing import assert_parity

SMALL = dict(widths=(8, 16, 24, 32), depths=(1, 2, 2, 1))
PATHS = {"stem": "features.0", "stage1": "features.1", "stage3": "features.5"}  # alias: path


def _timm_names(state: dict) -> dict:
    """torchvision's ConvNeXt state dict in timm's names (`stem`, `stages.{i}.blocks.{j}`
    with `conv_dw`, `norm`, `mlp.fc1`, `mlp.fc2`, `gamma` [C]; `stages.{i}.downsample`;
    `head.norm`, `head.fc`)."""
    out = {}
    for key, value in state.items():
        value = value.numpy()
        if m := re.fullmatch(r"features\.(\d+)\.(\d+)\.layer_scale", key):
            out[f"stages.{(int(m[1]) - 1) // 2}.blocks.{m[2]}.gamma"] = value.reshape(-1)
        elif m := re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.(\d)\.(\w+)", key):
            part = {"0": "conv_dw", "2": "norm", "3": "mlp.fc1", "5": "mlp.fc2"}[m[3]]
            out[f"stages.{(int(m[1]) - 1) // 2}.blocks.{m[2]}.{part}.{m[4]}"] = value
        elif m := re.fullmatch(r"features\.0\.([01])\.(\w+)", key):
            out[f"stem.{m[1]}.{m[2]}"] = value
        elif m := re.fullmatch(r"features\.([246])\.([01])\.(\w+)", key):
            out[f"stages.{int(m[1]) // 2}.downsample.{m[2]}.{m[3]}"] = value
        else:
            head = {"0": "head.norm", "2": "head.fc"}[key.split(".")[1]]
            out[f"{head}.{key.split('.')[2]}"] = value
    return out


@pytest.mark.parametrize("names", ["torchvision", "timm"])
def test_parity_with_torchvisions_layout_and_timms_names(tmp_path, names):
    """A small ConvNeXt (odd input size: the stem and downsampling floor as torch's do) with
    random weights and layer scales, its state dict in torchvision's or timm's names, through
    the scripts' loader: logits and stage outputs within 1e-4 of torch's."""
    torch_model = ref.randomize_(ref.ConvNeXt(**SMALL, num_classes=7))
    state = torch_model.state_dict()
    if names == "timm":
        state = _timm_names(state)
        assert "stages.1.downsample.1.weight" in state and "stem.1.bias" in state
    model = zoo.build("convnext_tiny", num_classes=7).clone(**SMALL)
    variables = model.import_state_dict(
        {k: np.asarray(v) for k, v in state.items()}, variables_template(model, 70)
    )
    x = np.random.default_rng(0).standard_normal((2, 70, 70, 3)).astype(np.float32)
    assert_parity(model, variables, torch_model, x, PATHS)


def test_without_a_head_the_output_is_the_normalised_pooled_features():
    """`num_classes=0` (a backbone saved without its Linear) keeps `classifier.0`'s LayerNorm
    and leaves out `classifier.2`: the torch model's output with that Linear an Identity;
    Hugging Face's `ConvNextModel` in its names."""
    torch_model = ref.randomize_(ref.ConvNeXt(**SMALL, num_classes=7))
    torch_model.classifier[2] = torch.nn.Identity()
    model = zoo.build("convnext_tiny", num_classes=0).clone(**SMALL)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    variables = model.import_state_dict(state, variables_template(model, 40))
    assert "2" not in variables["params"]["classifier"]
    # Hugging Face's `ConvNextModel` (no classifier, no `convnext.` prefix) loads the same.
    hf = {k.removeprefix("convnext."): v for k, v in _hf_names(torch_model.state_dict()).items()}
    got = model.import_state_dict(hf, variables_template(model, 40))
    jax.tree.map(np.testing.assert_array_equal, got, variables)
    x = np.random.default_rng(1).standard_normal((2, 40, 40, 3)).astype(np.float32)
    assert_parity(model, variables, torch_model, x, {})


def _hf_names(state: dict) -> dict:
    """torchvision's ConvNeXt state dict in Hugging Face's `ConvNextForImageClassification`
    names (`convnext.embeddings`, `encoder.stages.{i}.layers.{j}` with `dwconv`, `layernorm`,
    `pwconv1`, `pwconv2`, `layer_scale_parameter` [C]; `downsampling_layer`; `layernorm`,
    `classifier`)."""
    out = {}
    for key, value in state.items():
        value = value.numpy()
        if m := re.fullmatch(r"features\.(\d+)\.(\d+)\.layer_scale", key):
            layer = f"convnext.encoder.stages.{(int(m[1]) - 1) // 2}.layers.{m[2]}"
            out[f"{layer}.layer_scale_parameter"] = value.reshape(-1)
        elif m := re.fullmatch(r"features\.(\d+)\.(\d+)\.block\.(\d)\.(\w+)", key):
            part = {"0": "dwconv", "2": "layernorm", "3": "pwconv1", "5": "pwconv2"}[m[3]]
            layer = f"convnext.encoder.stages.{(int(m[1]) - 1) // 2}.layers.{m[2]}"
            out[f"{layer}.{part}.{m[4]}"] = value
        elif m := re.fullmatch(r"features\.0\.([01])\.(\w+)", key):
            part = "patch_embeddings" if m[1] == "0" else "layernorm"
            out[f"convnext.embeddings.{part}.{m[2]}"] = value
        elif m := re.fullmatch(r"features\.([246])\.([01])\.(\w+)", key):
            stage = int(m[1]) // 2
            out[f"convnext.encoder.stages.{stage}.downsampling_layer.{m[2]}.{m[3]}"] = value
        else:
            _, index, leaf = key.split(".")
            out["convnext.layernorm." + leaf if index == "0" else "classifier." + leaf] = value
    return out


def test_hugging_face_names_load_the_same_weights():
    """Hugging Face's `ConvNextForImageClassification` names give torchvision's weights in
    place (so the parity above holds for them)."""
    torch_model = ref.randomize_(ref.ConvNeXt(**SMALL, num_classes=7))
    model = zoo.build("convnext_tiny", num_classes=7).clone(**SMALL)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    want = model.import_state_dict(state, variables_template(model, 70))
    hf = _hf_names(torch_model.state_dict())
    assert "convnext.encoder.stages.1.downsampling_layer.1.weight" in hf
    got = model.import_state_dict(hf, variables_template(model, 70))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_full_size_tiny_through_the_loader_and_its_sizes(tmp_path):
    """ConvNeXt-T at full size: torchvision's parameter counts (T/S/B/L) in the zoo's models
    and the reference; a .pth through the scripts' loader and models/convert.py gives torch's
    weights in place (the computation: the parity test above); the aliases name its
    stages."""
    counts = {"tiny": 28_589_128, "small": 50_223_688, "base": 88_591_464, "large": 197_767_336}
    # Shapes only, traced as on an accelerator: a depthwise convolution is one op there and
    # 49 shifted multiply-adds on CPU (layers.DepthwiseConv2d), its parameters the same.
    for variant, count in counts.items():
        model = zoo.build(f"convnext_{variant}")
        with mock.patch.object(jax, "default_backend", return_value="gpu"):
            shapes = jax.eval_shape(
                lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
            )
        assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == count, variant
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        assert sum(p.numel() for p in ref.ConvNeXt().parameters()) == counts["tiny"]
    torch_model = ref.randomize_(ref.ConvNeXt(num_classes=5))
    torch.save(torch_model.state_dict(), tmp_path / "convnext_tiny.pth")
    loaded = model_load.load(
        "convnext_tiny", weights=str(tmp_path / "convnext_tiny.pth"), options={"num_classes": 5}
    )
    # models/convert.py maps it the same way (the module's own import_state_dict).
    convert.convert(
        "convnext_tiny", tmp_path / "convnext_tiny.pth", tmp_path / "ckpt", num_classes=5
    )
    converted = model_load.load("convnext_tiny", weights=str(tmp_path / "ckpt"))
    jax.tree.map(np.testing.assert_array_equal, converted.variables, loaded.variables)
    params, state = loaded.variables["params"], torch_model.state_dict()
    block = params["features"]["5"]["8"]
    np.testing.assert_array_equal(
        block["block"]["0"]["kernel"],
        state["features.5.8.block.0.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        block["layer_scale"]["scale"], state["features.5.8.layer_scale"].numpy().reshape(-1)
    )
    tap = capture.make_tap(
        loaded.module,
        loaded.variables,
        ["stem", *loaded.module.default_layers, "stage2"],
        input_shape=(224, 224, 3),
    )
    assert tap.shapes == {
        "features/0": (56, 56, 96),
        "features/7": (7, 7, 768),
        "features/3": (28, 28, 192),
    }

"""A ViT's position embedding of another grid, resampled once at load as its owners
interpolate it: DINOv2's rules (its own checkpoints), transformers' (Hugging Face's DINOv2),
timm's (the others); parity with torch's `interpolate` and with torch DINOv2 backbones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdissect import capture
from jaxdissect.models import load as model_load
from jaxdissect.models import position_embedding
from tests import torch_vit
from tests.model_testing import assert_close
from tests.vit_testing import (
    SMALL,
    assert_nnx_twin_equal,
    check_parity,
    hf_dinov2_names,
    torch_run,
)

pytestmark = pytest.mark.xdist_group("vit")


def _dinov2_options(size: int, registers: int) -> dict:
    """A 2-block DINOv2 backbone's options at `size` px (14 px patches, no head)."""
    return {
        "depth": 2,
        "image_size": size,
        "patch_size": 14,
        "num_classes": 0,
        "pool_type": "tok",
        "gelu_approximate": False,
        "layer_scale": True,
        "num_registers": registers,
    }


@pytest.mark.parametrize(
    ("interpolation", "registers", "size"),
    [("offset", 0, 42), ("offset", 0, 98), ("antialias", 4, 42), ("antialias", 4, 70)],
)
def test_dinov2_backbone_parity_at_another_grid(tmp_path, interpolation, registers, size):
    """DINOv2's own checkpoint layout (`mask_token`, `register_tokens`, LayerScale, 14 px
    patches, no head) trained on a 5x5 grid and run on another: its position embedding
    resampled once at load as DINOv2 interpolates it at every forward (the scale factor
    (side + 0.1) / 5 for its first backbones, antialiased to the size for those with
    registers), in the NNX twin too; the registers' count named where missing."""
    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(
            img_size=70,
            patch_size=14,
            depth=2,
            layer_scale=True,
            dinov2=interpolation,
            registers=registers,
        )
    )
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    torch.save(state, tmp_path / "dinov2.pth")
    options = _dinov2_options(size, registers)
    loaded = model_load.load("vit_ti16", weights=str(tmp_path / "dinov2.pth"), options=options)
    layers = {"block0": "blocks.0", "block1": "blocks.1", "encoder_norm": "norm"}
    reference.head = torch.nn.Identity()
    check_parity(loaded.module, loaded.variables, reference, size, layers, 1 + registers, patch=14)
    assert_nnx_twin_equal(loaded, size)
    assert loaded.module.token_layout((size, size, 3)).prefix == 1 + registers
    if registers:
        with pytest.raises(ValueError, match=r"register tokens: --model_option num_registers=4\."):
            model_load.load(
                "vit_ti16",
                weights=str(tmp_path / "dinov2.pth"),
                options={**options, "num_registers": 0},
            )


@pytest.mark.parametrize(("registers", "size"), [(0, 42), (0, 98), (4, 42)])
def test_hugging_face_dinov2_parity_at_another_grid(tmp_path, caplog, registers, size):
    """Hugging Face's `Dinov2Model` (`Dinov2WithRegistersModel` with registers) in its own
    names (`embeddings.`, separate query, key and value, `layer_scale1.lambda1`), trained on
    a 5x5 grid and run on another: its position embedding resampled as transformers
    interpolates it today (bicubic to the size without antialiasing; with registers
    antialiased, as DINOv2 does), in the NNX twin too. A `Dinov2ForImageClassification`
    (under `dinov2.`, its classifier over the class token beside the patch tokens' mean)
    gives its logits with `pool_type=tok+gap`, which a shape mismatch names."""
    import safetensors.numpy

    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(
            img_size=70,
            patch_size=14,
            depth=2,
            num_classes=5,
            layer_scale=True,
            dinov2="antialias" if registers else "size",
            registers=registers,
            pool="token+avg",
        )
    )
    state = reference.state_dict()
    backbone = {k: v for k, v in state.items() if not k.startswith("head.")}
    safetensors.numpy.save_file(hf_dinov2_names(backbone), str(tmp_path / "model.safetensors"))
    classifier = {
        **hf_dinov2_names(backbone, "dinov2."),
        "classifier.weight": state["head.weight"].numpy(),
        "classifier.bias": state["head.bias"].numpy(),
    }
    safetensors.numpy.save_file(classifier, str(tmp_path / "classifier.safetensors"))
    options = _dinov2_options(size, registers)
    with caplog.at_level("INFO"):
        loaded = model_load.load(
            "vit_ti16", weights=str(tmp_path / "model.safetensors"), options=options
        )
    assert "resampled from the checkpoint's 5x5 patches" in caplog.text
    assert "as transformers does" in caplog.text
    layers = {"block0": "blocks.0", "block1": "blocks.1", "encoder_norm": "norm"}
    x = np.random.default_rng(0).standard_normal((2, size, size, 3), np.float32)
    _, want = torch_run(reference, x, layers, size // 14, 1 + registers)
    tap = capture.make_tap(loaded.module, loaded.variables, list(layers), input_shape=x.shape[1:])
    with jax.default_matmul_precision("highest"):
        got = jax.jit(tap.fn)(tap.variables, jnp.asarray(x))
    for name, path in zip(tap.names, tap.layers, strict=True):
        assert_close(got[path], want[name], name)
    assert_nnx_twin_equal(loaded, size)
    classify = {**options, "num_classes": 5, "pool_type": "tok+gap"}
    head = model_load.load(
        "vit_ti16", weights=str(tmp_path / "classifier.safetensors"), options=classify
    )
    check_parity(head.module, head.variables, reference, size, layers, 1 + registers, patch=14)
    assert_nnx_twin_equal(head, size)
    with pytest.raises(ValueError, match=r"head/kernel: .*--model_option pool_type=tok\+gap\."):
        model_load.load(
            "vit_ti16",
            weights=str(tmp_path / "classifier.safetensors"),
            options={**classify, "pool_type": "tok"},
        )


@pytest.mark.parametrize(("m", "side"), [(5, 3), (5, 7), (37, 16), (37, 14), (16, 37)])
def test_position_resampling_is_torchs_interpolate(m, side):
    """The three resampling rules, in float64, are torch's `interpolate` to rounding: DINOv2's
    offset scale factor, transformers' resize without antialiasing, timm's (and DINOv2 with
    registers') antialiased resize."""
    import torch.nn.functional as F

    pos = np.random.default_rng(m * side).standard_normal((1, m * m, 6))
    grid = torch.from_numpy(pos).reshape(1, m, m, 6).permute(0, 3, 1, 2)
    scale = (side + 0.1) / m
    rules = {
        "offset": (
            position_embedding.resample_dinov2(pos, side, registers=False),
            dict(scale_factor=(scale, scale)),
        ),
        "size": (position_embedding.resample_transformers_dinov2(pos, side), dict()),
        "antialias": (position_embedding.resample_timm(pos, side), dict(antialias=True)),
    }
    for rule, (got, kw) in rules.items():
        size = None if "scale_factor" in kw else (side, side)
        want = F.interpolate(grid, size=size, mode="bicubic", align_corners=False, **kw)
        want = want.permute(0, 2, 3, 1).reshape(1, side * side, 6).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=rule)


def test_a_timm_checkpoint_of_another_grid_is_resampled_as_timm_does(tmp_path, caplog):
    """A timm ViT trained at 64 px (4x4 patches) loaded at 48 px: its position embedding
    resampled as timm's `resample_abs_pos_embed` does (torch's antialiased bicubic to the
    size), logged naming both grids; the class token's row stays the class token's."""
    import torch.nn.functional as F

    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(img_size=64, depth=2, num_classes=5)
    )
    torch.save(reference.state_dict(), tmp_path / "vit64.pth")
    options = {**SMALL, "image_size": 48, "pool_type": "tok", "gelu_approximate": False}
    with caplog.at_level("INFO"):
        loaded = model_load.load("vit_ti16", weights=str(tmp_path / "vit64.pth"), options=options)
    assert "resampled from the checkpoint's 4x4 patches to the model's 3x3" in caplog.text
    pos = reference.pos_embed.detach().double()
    grid = pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True)
    params = loaded.variables["params"]
    np.testing.assert_allclose(
        params["pos_embedding"], want.permute(0, 2, 3, 1).reshape(1, 9, -1), rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(
        params["cls"], (reference.cls_token + reference.pos_embed[:, :1]).detach(), rtol=1e-6
    )

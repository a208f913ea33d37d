"""Swin Transformer: parity with a torch reference in torchvision's layout, sizes, loading."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdissect import capture
from jaxdissect.models import load as model_load
from jaxdissect.models import swin, zoo
from jaxdissect.models.convert import variables_template
from tests import torch_swin as ref
from tests.model_testing import assert_parity

SMALL = dict(width=12, depths=(2, 2, 2, 2), heads=(3, 3, 6, 6))
PATHS = {"stem": "features.0", "stage1": "features.1", "stage2": "features.3"}


def _timm_names(state: dict, merge_after: bool) -> dict:
    """torchvision's Swin state dict in timm's names: `patch_embed`, `layers.{i}.blocks.{j}`
    (`mlp.fc1`, `mlp.fc2`, an `attn_mask` buffer in shifted blocks), the patch merging as
    `layers.{i}.downsample` at the start of stage i (timm 0.9 on) or, `merge_after`, at the
    end of stage i - 1 (before), `head.fc` (`head` before)."""
    out = {}
    for key, value in state.items():
        value = value.numpy()
        if m := re.fullmatch(r"features\.([1357])\.(\d+)\.(.+)", key):
            rest = m[3].replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            out[f"layers.{int(m[1]) // 2}.blocks.{m[2]}.{rest}"] = value
            if m[3] == "attn.qkv.bias" and int(m[2]) % 2:
                out[f"layers.{int(m[1]) // 2}.blocks.{m[2]}.attn_mask"] = np.zeros((4, 49, 49))
        elif m := re.fullmatch(r"features\.([246])\.(.+)", key):
            stage = int(m[1]) // 2 - int(merge_after)
            out[f"layers.{stage}.downsample.{m[2]}"] = value
        elif m := re.fullmatch(r"features\.0\.([02])\.(\w+)", key):
            out[f"patch_embed.{'proj' if m[1] == '0' else 'norm'}.{m[2]}"] = value
        elif key.startswith("head."):
            out[key if merge_after else f"head.fc.{key.removeprefix('head.')}"] = value
        else:
            out[key] = value
    return out


def _hf_names(state: dict) -> dict:
    """torchvision's Swin state dict in Hugging Face's `SwinForImageClassification` names
    (`swin.`; separate query, key and value; the patch merging at the end of each stage)."""
    parts = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense"} | {
        "norm2": "layernorm_after",
        "mlp.0": "intermediate.dense",
        "mlp.3": "output.dense",
    }
    out = {}
    for key, value in state.items():
        value = value.numpy()
        if m := re.fullmatch(r"features\.([1357])\.(\d+)\.(.+)\.(\w+)", key):
            block = f"swin.encoder.layers.{int(m[1]) // 2}.blocks.{m[2]}"
            if m[3] == "attn.qkv":
                for name, part in zip(("query", "key", "value"), np.split(value, 3), strict=True):
                    out[f"{block}.attention.self.{name}.{m[4]}"] = part
            elif m[3] == "attn":  # the bias table and the index buffer
                out[f"{block}.attention.self.{m[4]}"] = value
            else:
                out[f"{block}.{parts[m[3]]}.{m[4]}"] = value
        elif m := re.fullmatch(r"features\.([246])\.(.+)", key):
            out[f"swin.encoder.layers.{int(m[1]) // 2 - 1}.downsample.{m[2]}"] = value
        elif m := re.fullmatch(r"features\.0\.([02])\.(\w+)", key):
            stem = "patch_embeddings.projection" if m[1] == "0" else "norm"
            out[f"swin.embeddings.{stem}.{m[2]}"] = value
        elif key.startswith("norm."):
            out[f"swin.layernorm.{key.removeprefix('norm.')}"] = value
        else:
            out[f"classifier.{key.removeprefix('head.')}"] = value
    return out


def test_parity_through_padding_and_shifts():
    """A small Swin with random weights and bias tables at 70 px, in torchvision's names:
    the stem's 17x17 map padded to whole windows and shifted, 9x9 after an odd-sided merge,
    then maps no larger than a window (no shift): logits and stage outputs within 1e-4 of
    torch's; in timm's names (either placement of its patch merging) and Hugging Face's, the
    same weights in place."""
    torch_model = ref.randomize_(
        ref.SwinTransformer(SMALL["width"], SMALL["depths"], SMALL["heads"], num_classes=7)
    )
    model = zoo.build("swin_t", num_classes=7).clone(**SMALL)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    variables = model.import_state_dict(state, variables_template(model, 70))
    x = np.random.default_rng(0).standard_normal((2, 70, 70, 3)).astype(np.float32)
    tap = assert_parity(model, variables, torch_model, x, PATHS, nhwc=True)
    assert tap.shapes == {"features/0": (17, 17, 12), "features/1": (17, 17, 12)} | {
        "features/3": (9, 9, 24)
    }
    timm = _timm_names(torch_model.state_dict(), merge_after=False)
    timm_before = _timm_names(torch_model.state_dict(), merge_after=True)
    hf = _hf_names(torch_model.state_dict())
    assert "layers.0.downsample.norm.weight" in timm_before and not any(
        k.startswith("layers.0.downsample") for k in timm
    )
    assert "swin.encoder.layers.0.blocks.1.attention.self.key.weight" in hf
    for named in (timm, timm_before, hf):
        got = model.import_state_dict(named, variables_template(model, 70))
        jax.tree.map(np.testing.assert_array_equal, got, variables)


def test_without_a_head_the_output_is_the_pooled_features():
    """`num_classes=0` (a backbone saved without `head`, SimMIM's encoder's) leaves `head`
    out: the torch model's output with its head an Identity; Hugging Face's `SwinModel` in
    its names."""
    torch_model = ref.randomize_(
        ref.SwinTransformer(SMALL["width"], SMALL["depths"], SMALL["heads"], num_classes=7)
    )
    torch_model.head = torch.nn.Identity()
    model = zoo.build("swin_t", num_classes=0).clone(**SMALL)
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    variables = model.import_state_dict(state, variables_template(model, 56))
    assert "head" not in variables["params"]
    # Hugging Face's `SwinModel` (no classifier, no `swin.` prefix) loads the same.
    hf = {k.removeprefix("swin."): v for k, v in _hf_names(torch_model.state_dict()).items()}
    got = model.import_state_dict(hf, variables_template(model, 56))
    jax.tree.map(np.testing.assert_array_equal, got, variables)
    x = np.random.default_rng(1).standard_normal((1, 56, 56, 3)).astype(np.float32)
    assert_parity(model, variables, torch_model, x, {})


def test_index_and_mask_are_torchvisions():
    """The relative-position index is the torch module's buffer; the shifted windows' mask
    is 0 within a region and -100 across, over the 3x3 regions of a padded map."""
    torch_index = ref.ShiftedWindowAttention(8, 7, 3, 2).relative_position_index.numpy()
    np.testing.assert_array_equal(swin.relative_position_index(7), torch_index)
    mask = swin.shift_mask(14, 14, 7, (3, 3))
    assert mask.shape == (4, 49, 49) and set(np.unique(mask)) == {0.0, -100.0}
    assert not mask[0].any()  # the first window holds one region
    regions = np.zeros((14, 14), int)
    regions[7:11] += 3
    regions[11:] += 6
    regions[:, 7:11] += 1
    regions[:, 11:] += 2
    last = regions[7:, 7:].reshape(-1)
    np.testing.assert_array_equal(mask[3] == 0, last[:, None] == last[None, :])


def test_full_size_tiny_through_the_loader_and_its_sizes(tmp_path):
    """Swin-T/S/B at full size: torchvision's parameter counts (the bias tables' count per
    head too) in the zoo's models; Swin-T's .pth (with its index buffers) through the
    scripts' loader gives torch's weights in place (models/convert.py maps through the same
    importer: test_convnext); the aliases name its stages' maps at 224."""
    counts = {"swin_t": 28_288_354, "swin_s": 49_606_258, "swin_b": 87_768_224}
    for arch, count in counts.items():
        model = zoo.build(arch)
        shapes = jax.eval_shape(
            lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        )
        assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes)) == count, arch
    torch_model = ref.randomize_(ref.SwinTransformer(num_classes=5))
    torch.save(torch_model.state_dict(), tmp_path / "swin_t.pth")
    loaded = model_load.load(
        "swin_t", weights=str(tmp_path / "swin_t.pth"), options={"num_classes": 5}
    )
    params, state = loaded.variables["params"], torch_model.state_dict()
    np.testing.assert_array_equal(
        params["features"]["7"]["1"]["attn"]["relative_position_bias_table"],
        state["features.7.1.attn.relative_position_bias_table"],
    )
    np.testing.assert_array_equal(
        params["features"]["6"]["reduction"]["kernel"], state["features.6.reduction.weight"].T
    )
    tap = capture.make_tap(
        loaded.module, loaded.variables, ["stem", "stage2", "stage4"], input_shape=(224, 224, 3)
    )
    assert tap.shapes == {
        "features/0": (56, 56, 96),
        "features/3": (28, 28, 192),
        "features/7": (7, 7, 768),
    }


def test_four_stages_each():
    with pytest.raises(ValueError, match=r"depths=\(2, 2\), heads=\(3, 6\): four stages each"):
        swin.SwinTransformer(depths=(2, 2), heads=(3, 6))

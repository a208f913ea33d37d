"""ViT checkpoints in their owners' names (timm, torchvision, Hugging Face, open_clip,
DINOv2, DeiT, BEiT, CLIP, SigLIP): parity with torch models of their forward passes, the
options they need named, position embeddings resampled as their owners do."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdissect import cli
from jaxdissect.models import load as model_load
from jaxdissect.models import torch_import, vit, vit_import
from tests import torch_beit, torch_vit
from tests.model_testing import assert_close, torchscript_save
from tests.vit_testing import (
    SMALL,
    assert_class_token_features,
    assert_nnx_twin_equal,
    check_parity,
    hf_dinov2_names,
)

pytestmark = pytest.mark.xdist_group("vit")


def _timm_parts(state: dict):
    """(key, value as numpy, its `blocks.{i}.{part}.{weight|bias}` match or None) of each
    entry of a timm ViT's state dict."""
    for key, value in state.items():
        yield key, value.numpy(), re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key)


def _torchvision_names(state: dict, old_mlp: bool = False) -> dict:
    """A timm ViT's state dict in torchvision's `VisionTransformer` names (its MLP as a
    Sequential, `mlp.0`/`mlp.3`, or before torchvision 0.13 `mlp.linear_1`/`linear_2`)."""
    out = {}
    fc = ("linear_1", "linear_2") if old_mlp else ("0", "3")
    for key, value, block in _timm_parts(state):
        if block:
            part = {
                "norm1": "ln_1",
                "attn.qkv": "self_attention.in_proj_",
                "attn.proj": "self_attention.out_proj.",
                "norm2": "ln_2",
                "mlp.fc1": f"mlp.{fc[0]}.",
                "mlp.fc2": f"mlp.{fc[1]}.",
            }[block[2]]
            part = part if part.endswith(("_", ".")) else f"{part}."
            out[f"encoder.layers.encoder_layer_{block[1]}.{part}{block[3]}"] = value
            continue
        plain = {
            "cls_token": "class_token",
            "pos_embed": "encoder.pos_embedding",
            "patch_embed.proj.weight": "conv_proj.weight",
            "patch_embed.proj.bias": "conv_proj.bias",
            "norm.weight": "encoder.ln.weight",
            "norm.bias": "encoder.ln.bias",
            "head.weight": "heads.head.weight",
            "head.bias": "heads.head.bias",
        }
        out[plain[key]] = value
    return out


@pytest.mark.parametrize("old_mlp", [False, True])
def test_torchvision_vit_parity(tmp_path, caplog, old_mlp):
    """torchvision's `vit_b_16` layout (`class_token`, `encoder.pos_embedding`, fused
    `in_proj`, a Sequential MLP, `heads.head`), as safetensors: the torch model's numbers."""
    import safetensors.numpy

    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(img_size=32, depth=2, num_classes=5)
    )
    path = tmp_path / "vit_b_16.safetensors"
    safetensors.numpy.save_file(_torchvision_names(reference.state_dict(), old_mlp), str(path))
    options = {**SMALL, "pool_type": "tok"}
    with caplog.at_level("WARNING"):
        loaded = model_load.load("vit_ti16", weights=str(path), options=options)
    assert loaded.trained_input_norm == "torchvision"
    # A conversion keeps what the naming said in its meta.json, which a load checks.
    from jaxdissect.models import convert

    ckpt, rest = tmp_path / "ckpt", {k: v for k, v in options.items() if k != "num_classes"}
    convert.convert("vit_ti16", path, ckpt, num_classes=5, options=rest)
    assert model_load.load("vit_ti16", weights=str(ckpt)).trained_input_norm == "torchvision"
    meta = json.loads((ckpt / convert.META_FILE).read_text())
    for damaged in ("x", ["clip"]):
        (ckpt / convert.META_FILE).write_text(json.dumps({**meta, "trained_input_norm": damaged}))
        with pytest.raises(ValueError, match=r"trained_input_norm=.* is none of torchvision, pl"):
            model_load.load("vit_ti16", weights=str(ckpt))
    assert "torchvision's ViTs use the exact one; pass --model_option gelu_approximate" in (
        caplog.text
    )
    loaded = model_load.load(
        "vit_ti16", weights=str(path), options={**options, "gelu_approximate": False}
    )
    layers = {"stem": "patch_embed.proj", "block0": "blocks.0", "mlp1": "blocks.1.mlp.act"}
    check_parity(loaded.module, loaded.variables, reference, 32, layers, prefix=1)


def _hf_names(state: dict, model: str = "vit") -> dict:
    """A timm ViT's state dict in Hugging Face's `ViTForImageClassification` names (its fused
    qkv split into query, key and value), as `transformers` saves that model; `model="deit"`:
    `DeiTForImageClassificationWithTeacher`'s (the distillation token and both heads)."""
    out = {}
    for key, value, block in _timm_parts(state):
        if block and block[2] == "attn.qkv":
            layer = f"{model}.encoder.layer.{block[1]}.attention.attention"
            for name, part in zip(("query", "key", "value"), np.split(value, 3), strict=True):
                out[f"{layer}.{name}.{block[3]}"] = part
            continue
        if block:
            part = {
                "norm1": "layernorm_before",
                "attn.proj": "attention.output.dense",
                "norm2": "layernorm_after",
                "mlp.fc1": "intermediate.dense",
                "mlp.fc2": "output.dense",
            }[block[2]]
            out[f"{model}.encoder.layer.{block[1]}.{part}.{block[3]}"] = value
            continue
        plain = {
            "cls_token": "embeddings.cls_token",
            "dist_token": "embeddings.distillation_token",
            "pos_embed": "embeddings.position_embeddings",
            "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
            "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
            "norm.weight": "layernorm.weight",
            "norm.bias": "layernorm.bias",
        }
        if key in plain:
            out[f"{model}.{plain[key]}"] = value
        elif model == "deit":
            out[
                key.replace("head_dist.", "distillation_classifier.").replace(
                    "head.", "cls_classifier."
                )
            ] = value
        else:
            out[key.replace("head.", "classifier.")] = value
    return out


def _hf_beit_names(state: dict) -> dict:
    """timm's BEiT state dict in Hugging Face's `BeitForImageClassification` names (`beit.`;
    the fused qkv split, the key without bias; `lambda_1`, `lambda_2`; the relative position
    bias under `attention.attention.relative_position_bias`; `pooler.layernorm`)."""
    parts = {
        "norm1": "layernorm_before",
        "attn.proj": "attention.output.dense",
        "norm2": "layernorm_after",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
        "attn": "attention.attention.relative_position_bias",
    }
    out = {}
    for key, value in state.items():
        value, (stem, _, leaf) = value.numpy(), key.rpartition(".")
        block = re.fullmatch(r"blocks\.(\d+)\.?(.*)", stem)
        layer = block and f"beit.encoder.layer.{block[1]}"
        if block and block[2] == "attn.qkv":
            for name, part in zip(("query", "key", "value"), np.split(value, 3), strict=True):
                out[f"{layer}.attention.attention.{name}.weight"] = part
        elif block and leaf in ("q_bias", "v_bias"):
            name = "query" if leaf == "q_bias" else "value"
            out[f"{layer}.attention.attention.{name}.bias"] = value
        elif block and leaf in ("gamma_1", "gamma_2"):
            out[f"{layer}.lambda_{leaf[-1]}"] = value
        elif block:
            out[f"{layer}.{parts[block[2]]}.{leaf}"] = value
        elif stem == "fc_norm":
            out[f"beit.pooler.layernorm.{leaf}"] = value
        elif stem == "head":
            out[f"classifier.{leaf}"] = value
        else:
            names = {"cls_token": "cls_token", "patch_embed.proj": "patch_embeddings.projection"}
            out[f"beit.embeddings.{names[key] if key in names else f'{names[stem]}.{leaf}'}"] = (
                value
            )
    return out


def test_hugging_face_vit_parity_and_its_layer_norm_epsilon(tmp_path, caplog):
    """A `transformers` ViTForImageClassification's weights (separate query, key and value,
    LayerNorm epsilon 1e-12), as safetensors: the torch model's numbers with
    `layer_norm_epsilon=1e-12`, in the NNX twin too; a `ViTModel`'s pooler; a
    `ViTMAEForPreTraining`'s encoder, its decoder left out. The embeddings are made tiny, so that
    the first LayerNorm's input has a variance near epsilon: 1e-6 there would be far off."""
    import safetensors.numpy

    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(img_size=32, depth=2, num_classes=5, eps=1e-12)
    )
    with torch.no_grad():
        for p in (reference.patch_embed.proj.weight, reference.patch_embed.proj.bias):
            p.mul_(1e-4)
        reference.cls_token.mul_(1e-4), reference.pos_embed.mul_(1e-4)
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file(_hf_names(reference.state_dict()), str(path))
    hf = {"pool_type": "tok", "gelu_approximate": False, "layer_norm_epsilon": 1e-12}
    loaded = model_load.load("vit_ti16", weights=str(path), options={**SMALL, **hf})
    layers = {"stem": "patch_embed.proj", "block0": "blocks.0", "block1": "blocks.1"}
    check_parity(loaded.module, loaded.variables, reference, 32, layers, prefix=1)
    assert_nnx_twin_equal(loaded, 32)
    # A `ViTModel` (no `vit.` prefix, no classifier): its pooler is big_vision's tanh
    # `pre_logits` (--num_classes=0 --model_option rep_size=192 in the scripts).
    model = vit.vit_ti16(**{**SMALL, **hf, "num_classes": 0, "rep_size": 192})
    named = {
        k.removeprefix("vit."): v
        for k, v in _hf_names(reference.state_dict()).items()
        if not k.startswith("classifier.")
    }
    rng = np.random.default_rng(4)
    pooler = {
        "pooler.dense.weight": rng.standard_normal((192, 192)).astype(np.float32),
        "pooler.dense.bias": rng.standard_normal(192).astype(np.float32),
    }
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    params = model.import_state_dict({**named, **pooler}, template)["params"]
    np.testing.assert_array_equal(params["pre_logits"]["kernel"], pooler["pooler.dense.weight"].T)
    np.testing.assert_array_equal(params["pre_logits"]["bias"], pooler["pooler.dense.bias"])
    jax.tree.map(
        np.testing.assert_array_equal,
        params["Transformer"],
        loaded.variables["params"]["Transformer"],
    )
    # A `ViTMAEForPreTraining` (`facebook/vit-mae-base`): the same encoder beside its decoder,
    # which is left out (logged); a head-less ViT of the class token.
    mae = {k: v for k, v in _hf_names(reference.state_dict()).items() if "classifier" not in k}
    mae |= {
        "decoder.decoder_embed.weight": np.ones((8, 192), np.float32),
        "decoder.mask_token": np.zeros((1, 1, 8), np.float32),
        "decoder.decoder_layers.0.output.dense.bias": np.zeros(8, np.float32),
    }
    safetensors.numpy.save_file(mae, str(tmp_path / "vit_mae.safetensors"))
    with caplog.at_level("INFO"):
        encoder = model_load.load(
            "vit_ti16",
            weights=str(tmp_path / "vit_mae.safetensors"),
            options={**SMALL, **hf, "num_classes": 0},
        )
    assert "3 keys of a ViTMAEForPreTraining's decoder (its pixel reconstruction) left out" in (
        caplog.text
    )
    jax.tree.map(
        np.testing.assert_array_equal,
        encoder.variables["params"]["Transformer"],
        loaded.variables["params"]["Transformer"],
    )
    caplog.clear()
    # timm's epsilon: loaded with a warning, and other numbers.
    with caplog.at_level("WARNING"):
        timm_eps = model_load.load(
            "vit_ti16", weights=str(path), options={**SMALL, **hf, "layer_norm_epsilon": 1e-6}
        )
    assert "its ViTs use 1e-12; pass --model_option layer_norm_epsilon=1e-12" in caplog.text
    with pytest.raises(AssertionError):
        check_parity(timm_eps.module, timm_eps.variables, reference, 32, layers, prefix=1)


def _open_clip_names(state: dict) -> dict:
    """A timm-layout CLIP image tower's state dict in open_clip's names (`visual.`, fused
    `in_proj`, the head as the bias-free projection `proj` [width, embed]), beside text-tower
    keys, as open_clip saves a whole CLIP model."""
    out = {"token_embedding.weight": np.ones((9, 4), np.float32), "logit_scale": np.ones(())}
    out["transformer.resblocks.0.ln_1.weight"] = np.ones(4, np.float32)  # the text tower's
    for key, value, block in _timm_parts(state):
        if block:
            part = {
                "norm1": "ln_1",
                "attn.qkv": "attn.in_proj",
                "attn.proj": "attn.out_proj",
                "norm2": "ln_2",
                "mlp.fc1": "mlp.c_fc",
                "mlp.fc2": "mlp.c_proj",
            }[block[2]]
            sep = "_" if part == "attn.in_proj" else "."
            out[f"visual.transformer.resblocks.{block[1]}.{part}{sep}{block[3]}"] = value
        elif key == "head.weight":
            out["visual.proj"] = np.ascontiguousarray(value.T)
        elif key == "cls_token":  # [1, 1, width] -> [width]
            out["visual.class_embedding"] = value[0, 0]
        elif key == "pos_embed":  # [1, tokens, width] -> [tokens, width]
            out["visual.positional_embedding"] = value[0]
        elif key == "patch_embed.proj.weight":
            out["visual.conv1.weight"] = value
        elif key != "head.bias":  # zero: CLIP's projection has none
            stem, leaf = key.split(".")
            out[f"visual.{ {'norm_pre': 'ln_pre', 'norm': 'ln_post'}[stem] }.{leaf}"] = value
    return out


def _hf_vision_names(state: dict) -> dict:
    """A timm ViT's tower in Hugging Face's CLIP and SigLIP `vision_model.` names (separate
    q, k and v projections); its classifier and attention pooling are the caller's."""
    out = {}
    for key, value, block in _timm_parts(state):
        layer = f"vision_model.encoder.layers.{block[1]}" if block else ""
        if block and block[2] == "attn.qkv":
            for name, part in zip("qkv", np.split(value, 3), strict=True):
                out[f"{layer}.self_attn.{name}_proj.{block[3]}"] = part
        elif block:
            part = {
                "norm1": "layer_norm1",
                "attn.proj": "self_attn.out_proj",
                "norm2": "layer_norm2",
                "mlp.fc1": "mlp.fc1",
                "mlp.fc2": "mlp.fc2",
            }[block[2]]
            out[f"{layer}.{part}.{block[3]}"] = value
        elif key == "cls_token":
            out["vision_model.embeddings.class_embedding"] = value[0, 0]
        elif key == "pos_embed":
            out["vision_model.embeddings.position_embedding.weight"] = value[0]
        elif key.startswith(("patch_embed.proj.", "norm_pre.", "norm.")):
            stem, leaf = key.rsplit(".", 1)
            name = {
                "patch_embed.proj": "embeddings.patch_embedding",
                "norm_pre": "pre_layrnorm",  # transformers' spelling
                "norm": "post_layernorm",
            }[stem]
            out[f"vision_model.{name}.{leaf}"] = value
    return out


def _hf_clip_names(state: dict) -> dict:
    """A timm-layout CLIP image tower's state dict in Hugging Face's `CLIPModel` names
    (`vision_model.`, the head as the bias-free `visual_projection`, the `position_ids`
    buffer), beside text-tower keys."""
    out = {"text_model.embeddings.token_embedding.weight": np.ones((9, 4), np.float32)}
    out["logit_scale"] = np.ones((), np.float32)
    out["vision_model.embeddings.position_ids"] = np.arange(5)[None]
    out["visual_projection.weight"] = state["head.weight"].numpy()  # its bias is zero
    return {**out, **_hf_vision_names(state)}


def _hf_siglip_names(state: dict) -> dict:
    """A timm ViT with attention pooling (`attn_pool`, no class token) in Hugging Face's
    `SiglipModel` names (`vision_model.`, the pooling `head` with its `probe` and fused
    `in_proj`), beside text-tower keys; the classifier left out."""
    out = {"text_model.embeddings.token_embedding.weight": np.ones((9, 4), np.float32)}
    out["logit_scale"] = out["logit_bias"] = np.ones(1, np.float32)
    pool = {k.removeprefix("attn_pool."): v.numpy() for k, v in state.items() if "attn_pool" in k}
    out["vision_model.head.probe"] = pool.pop("latent")
    for leaf in ("weight", "bias"):
        fused = np.concatenate([pool.pop(f"q.{leaf}"), pool.pop(f"kv.{leaf}")])
        out[f"vision_model.head.attention.in_proj_{leaf}"] = fused
    names = {"proj": "attention.out_proj", "norm": "layernorm"}
    for key, value in pool.items():
        stem, leaf = key.rsplit(".", 1)
        out[f"vision_model.head.{names.get(stem, stem)}.{leaf}"] = value
    return {**out, **_hf_vision_names(state)}


def test_siglip_attention_pooling_from_timms_and_hugging_faces_names(tmp_path, caplog):
    """SigLIP's image tower (no class token, tanh GELU, attention pooling: timm's
    `attn_pool`, Hugging Face's `head` with its `probe`, no classifier) in timm's names (.pth)
    and Hugging Face's (.safetensors, beside a text tower): the pooled features and the
    blocks within 1e-4 of the torch model's, the NNX twin bitwise; the exact GELU warned of."""
    import safetensors.numpy

    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(
            img_size=32, depth=2, class_token=False, map_head=True, approximate="tanh"
        )
    )
    reference.head = torch.nn.Identity()
    state = reference.state_dict()
    torch.save(state, tmp_path / "timm.pth")
    safetensors.numpy.save_file(_hf_siglip_names(state), str(tmp_path / "siglip.safetensors"))
    options = {**SMALL, "num_classes": 0, "pool_type": "map"}
    layers = {"stem": "patch_embed.proj", "block0": "blocks.0", "block1": "blocks.1"}
    loaded = model_load.load("vit_ti16", weights=str(tmp_path / "timm.pth"), options=options)
    check_parity(loaded.module, loaded.variables, reference, 32, layers, prefix=0)
    assert_nnx_twin_equal(loaded, 32)
    hf = model_load.load("vit_ti16", weights=str(tmp_path / "siglip.safetensors"), options=options)
    jax.tree.map(np.testing.assert_array_equal, hf.variables, loaded.variables)
    with caplog.at_level("WARNING"):
        model_load.load(
            "vit_ti16",
            weights=str(tmp_path / "siglip.safetensors"),
            options={**options, "gelu_approximate": False},
        )
    assert "SigLIP's ViTs use the tanh-approximated one" in caplog.text


class _Holder(torch.nn.Module):
    """Tensors under submodules, for a TorchScript archive of given names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _torchscript_archive(state: dict, path) -> None:
    """`torch.jit.save` of a traced module whose `state_dict()` is `state` (as OpenAI's CLIP
    `.pt` files hold open_clip's names)."""
    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for name in parents:
            if not hasattr(node, name):
                node.add_module(name, _Holder())
            node = getattr(node, name)
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        node.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
    torchscript_save(root, torch.zeros(1), path)


CLIP_OPTIONS = {
    "pool_type": "tok",
    "pre_norm": True,
    "patch_bias": False,
    "quick_gelu": True,
    "gelu_approximate": False,
    "layer_norm_epsilon": 1e-5,
}


def test_clip_image_tower_parity_from_timm_and_open_clip_names(tmp_path, caplog):
    """OpenAI CLIP's image tower (a LayerNorm before the blocks, no patch-embedding bias,
    quick GELU, torch's LayerNorm epsilon 1e-5, the projection as a bias-free head) in timm's
    names (.pth), open_clip's and Hugging Face's (.safetensors, beside a text tower) and OpenAI's
    own TorchScript archive: the torch model's
    numbers, in the NNX twin too; the plain ViT's options are refused naming the ones to
    give, and big_vision's epsilon is warned of."""
    import safetensors.numpy

    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(
            img_size=32, depth=2, num_classes=5, pre_norm=True, approximate="quick_gelu", eps=1e-5
        )
    )
    with torch.no_grad():
        reference.head.bias.zero_()
    assert "patch_embed.proj.bias" not in reference.state_dict()
    torch.save(reference.state_dict(), tmp_path / "timm.pth")
    safetensors.numpy.save_file(
        _open_clip_names(reference.state_dict()), str(tmp_path / "open_clip.safetensors")
    )
    safetensors.numpy.save_file(
        _hf_clip_names(reference.state_dict()), str(tmp_path / "hf_clip.safetensors")
    )
    # OpenAI's own .pt: a TorchScript archive of the whole CLIP in open_clip's names.
    _torchscript_archive(_open_clip_names(reference.state_dict()), tmp_path / "ViT-B-16.pt")
    layers = {"stem": "patch_embed.proj", "block0": "blocks.0", "mlp1": "blocks.1.mlp.act"}
    loaded = model_load.load(
        "vit_ti16", weights=str(tmp_path / "timm.pth"), options={**SMALL, **CLIP_OPTIONS}
    )
    check_parity(loaded.module, loaded.variables, reference, 32, layers, prefix=1)
    assert_nnx_twin_equal(loaded, 32)
    for name in ("open_clip.safetensors", "hf_clip.safetensors", "ViT-B-16.pt"):  # the same
        other = model_load.load(
            "vit_ti16", weights=str(tmp_path / name), options={**SMALL, **CLIP_OPTIONS}
        )
        jax.tree.map(np.testing.assert_array_equal, other.variables, loaded.variables)
        assert other.trained_input_norm == "clip"  # the naming says so; timm's does not
    assert loaded.trained_input_norm is None
    with caplog.at_level("WARNING"):  # the model's own [-1, 1] for CLIP's weights: warned
        cli.model_info(other, "model", 32)
        assert "trained on --input_norm=clip inputs" in caplog.text
        caplog.clear()
        cli.model_info(other, "clip", 32)
        cli.model_info(loaded, "model", 32)
        assert "--input_norm" not in caplog.text
    # --input_norm=clip: OpenAI's normalisation of 0..255 pixels.
    spec = cli.model_info(loaded, "clip", 32).input_spec
    pixels = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    np.testing.assert_allclose(spec(pixels), (pixels / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    # Exact GELU (LAION's open_clip weights) gives other numbers.
    with caplog.at_level("WARNING"):
        gelu = model_load.load(
            "vit_ti16",
            weights=str(tmp_path / "open_clip.safetensors"),
            options={**SMALL, **CLIP_OPTIONS, "quick_gelu": False, "layer_norm_epsilon": 1e-6},
        )
    assert "OpenAI's own CLIP weights need --model_option quick_gelu=true" in caplog.text
    assert "its ViTs use 1e-05; pass --model_option layer_norm_epsilon=1e-05" in caplog.text
    with pytest.raises(AssertionError):
        check_parity(gelu.module, gelu.variables, reference, 32, layers, prefix=1)
    with pytest.raises(
        ValueError,
        match=r"no bias in its patch embedding: --model_option patch_bias=false\. The "
        r"checkpoint has a LayerNorm before the first block \(norm_pre\): --model_option "
        r"pre_norm=true\.",
    ):
        model_load.load(
            "vit_ti16", weights=str(tmp_path / "timm.pth"), options={**SMALL, "pool_type": "tok"}
        )


def test_the_namings_that_say_which_normalisation_their_weights_were_trained_on():
    hf_vit = "embeddings.patch_embeddings.projection.weight"
    for keys, norm in [
        ([vit_import.OPEN_CLIP_MARK], "clip"),
        ([vit_import.HF_CLIP_MARK, vit_import.HF_VISION_MARK], "clip"),
        ([vit_import.TORCHVISION_VIT_MARK], "torchvision"),
        (["mask_token", "blocks.0.ls1.gamma"], "torchvision"),  # DINOv2's own
        ([hf_vit, "encoder.layer.0.layer_scale1.lambda1"], "torchvision"),  # HF DINOv2
        (["mask_token", "blocks.0.gamma_1"], None),  # BEiT's pre-training: [-1, 1]
        ([vit_import.HF_VISION_MARK], None),  # Hugging Face's SigLIP: [-1, 1]
        ([hf_vit], None),  # Hugging Face's ViTs: Google's [-1, 1], DeiT's ImageNet
        (["cls_token", "blocks.0.ls1.gamma"], None),  # timm's: each model its own
    ]:
        assert vit_import.trained_input_norm(dict.fromkeys(keys)) == norm, keys


def test_a_checkpoint_without_a_head_loads_with_num_classes_0(tmp_path):
    """DINO's and MAE's ViTs have no head: the ViTs take `num_classes=0` (the CNNs but the
    ResNets refuse it), and the output is the pooled class token after the final norm."""
    reference = torch_vit.randomize_(torch_vit.VisionTransformer(img_size=32, depth=2))
    state = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    torch.save(state, tmp_path / "dino.pth")
    model_load.check_request("vit_ti16", str(tmp_path / "dino.pth"), 0)
    with pytest.raises(ValueError, match=r"^--num_classes=-1: must be a whole number >= 0$"):
        model_load.check_request("vit_ti16", None, -1)
    with pytest.raises(ValueError, match=r"^--num_classes=0: must be a whole number >= 1$"):
        model_load.check_request("alexnet", None, 0)
    options = {**SMALL, "num_classes": 0, "pool_type": "tok", "gelu_approximate": False}
    loaded = model_load.load("vit_ti16", weights=str(tmp_path / "dino.pth"), options=options)
    assert "head" not in loaded.variables["params"]
    assert_class_token_features(loaded, reference, seed=0)


def test_average_pooling_past_the_class_token_with_fc_norm(tmp_path):
    """timm's `global_pool='avg'` ViT with a class token and `fc_norm` (MAE's fine-tuned
    classifiers, in MAE's own file under `model`): no norm over the tokens, the mean of the
    patch tokens past the class token, then a LayerNorm: `--model_option class_token=true
    fc_norm=true` with `pool_type=gap` gives the torch model's numbers, in the NNX twin too;
    without them, the mismatch names both options."""
    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(img_size=32, depth=2, num_classes=5, pool="avg", fc_norm=True)
    )
    assert "norm.weight" not in reference.state_dict()
    torch.save({"model": reference.state_dict()}, tmp_path / "mae_finetuned.pth")
    options = {**SMALL, "pool_type": "gap", "gelu_approximate": False}
    loaded = model_load.load(
        "vit_ti16",
        weights=str(tmp_path / "mae_finetuned.pth"),
        options={**options, "class_token": True, "fc_norm": True},
    )
    assert loaded.module.token_layout((32, 32, 3)).prefix == 1
    assert "encoder_norm" not in loaded.module.layer_aliases
    layers = {"stem": "patch_embed.proj", "block0": "blocks.0", "block1": "blocks.1"}
    check_parity(loaded.module, loaded.variables, reference, 32, layers, prefix=1)
    assert_nnx_twin_equal(loaded, 32)
    with pytest.raises(
        ValueError,
        match=r"class_token=true beside another pool_type\. .* LayerNorm after pooling "
        r"\(fc_norm\): --model_option fc_norm=true\.",
    ):
        model_load.load("vit_ti16", weights=str(tmp_path / "mae_finetuned.pth"), options=options)
    with pytest.raises(ValueError, match=r"class_token=False: pool_type='tok' pools the class"):
        vit.vit_ti16(pool_type="tok", class_token=False)


def test_swiglu_mlp_of_dinov2_giant_in_its_namings(tmp_path):
    """DINOv2 giant's gated MLP (`swiglu=true`): its own names (`mlp.w12` both halves,
    `mlp.w3`) give the torch model's numbers and the gated hidden units as `mlp{i}`, in the
    NNX twin too; timm's packed `fc1`, Hugging Face's `weights_in` / `weights_out` and its
    halves apart (`gate_proj`, `up_proj`, `down_proj`) load the same weights."""
    import safetensors.numpy

    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(
            img_size=32, depth=2, num_classes=5, layer_scale=True, swiglu=True, mlp_dim=512
        )
    )
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    own = {
        re.sub(r"mlp\.fc1", "mlp.w12", re.sub(r"mlp\.fc2", "mlp.w3", k)): v
        for k, v in state.items()
    }
    safetensors.numpy.save_file(own, str(tmp_path / "dinov2_own.safetensors"))
    safetensors.numpy.save_file(state, str(tmp_path / "timm.safetensors"))
    options = {**SMALL, "pool_type": "tok", "gelu_approximate": False, "layer_scale": True}
    options |= {"swiglu": True, "mlp_dim": 512}
    loaded = model_load.load(
        "vit_ti16", weights=str(tmp_path / "dinov2_own.safetensors"), options=options
    )
    layers = {"block0": "blocks.0", "mlp1": "blocks.1.mlp.act", "encoder_norm": "norm"}
    check_parity(loaded.module, loaded.variables, reference, 32, layers, prefix=1)
    assert_nnx_twin_equal(loaded, 32)
    backbone = {k: v for k, v in reference.state_dict().items() if not k.startswith("head.")}
    hf = hf_dinov2_names(backbone)  # then its MLPs' names, and its classifier
    hf |= {f"classifier.{k[5:]}": v for k, v in state.items() if k.startswith("head.")}
    apart, packed = {}, {}
    for key, value in hf.items():
        if m := re.fullmatch(r"(encoder\.layer\.\d+\.mlp)\.(fc1|fc2)\.(\w+)", key):
            if m[2] == "fc1":
                gate, up = np.split(value, 2)
                apart[f"{m[1]}.gate_proj.{m[3]}"], apart[f"{m[1]}.up_proj.{m[3]}"] = gate, up
                packed[f"{m[1]}.weights_in.{m[3]}"] = value
            else:
                apart[f"{m[1]}.down_proj.{m[3]}"] = packed[f"{m[1]}.weights_out.{m[3]}"] = value
        else:
            apart[key] = packed[key] = value
    safetensors.numpy.save_file(apart, str(tmp_path / "hf_apart.safetensors"))
    safetensors.numpy.save_file(packed, str(tmp_path / "hf.safetensors"))
    for name in ("timm.safetensors", "hf_apart.safetensors", "hf.safetensors"):
        other = model_load.load("vit_ti16", weights=str(tmp_path / name), options=options)
        jax.tree.map(np.testing.assert_array_equal, other.variables, loaded.variables)


def test_deit_distilled_parity_and_its_option_named(tmp_path):
    """DeiT's distilled ViT (timm's `VisionTransformerDistilled`: a distillation token after
    the class token, with its own position row and head): `distilled=true` gives the torch
    model's logits, the mean of both heads', and its blocks' patch maps past both tokens, in
    the NNX twin too; head-less, the mean of the two tokens; without the option, named."""
    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(img_size=32, depth=2, num_classes=5, distilled=True)
    )
    torch.save(reference.state_dict(), tmp_path / "deit.pth")
    torch.save(
        {k: torch.from_numpy(v) for k, v in _hf_names(reference.state_dict(), "deit").items()},
        tmp_path / "hf_deit.bin",
    )
    options = {**SMALL, "pool_type": "tok", "gelu_approximate": False, "distilled": True}
    layers = {"stem": "patch_embed.proj", "block0": "blocks.0", "encoder_norm": "norm"}
    loaded = model_load.load("vit_ti16", weights=str(tmp_path / "deit.pth"), options=options)
    assert loaded.module.token_layout((32, 32, 3)).prefix == 2
    check_parity(loaded.module, loaded.variables, reference, 32, layers, prefix=2)
    assert_nnx_twin_equal(loaded, 32)
    hf = model_load.load("vit_ti16", weights=str(tmp_path / "hf_deit.bin"), options=options)
    jax.tree.map(np.testing.assert_array_equal, hf.variables, loaded.variables)
    backbone = {k: v for k, v in reference.state_dict().items() if not k.startswith("head")}
    torch.save(backbone, tmp_path / "deit_backbone.pth")
    headless = model_load.load(
        "vit_ti16",
        weights=str(tmp_path / "deit_backbone.pth"),
        options={**options, "num_classes": 0},
    )
    x = np.random.default_rng(2).standard_normal((2, 32, 32, 3), np.float32)
    reference.head = reference.head_dist = torch.nn.Identity()
    with torch.no_grad():
        want = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    with jax.default_matmul_precision("highest"):
        got = jax.jit(headless.module.apply)(headless.variables, jnp.asarray(x))
    assert_close(got, want, "features")
    assert_nnx_twin_equal(headless, 32)
    with pytest.raises(ValueError, match=r"distillation token \(DeiT's\): --model_option "):
        model_load.load(
            "vit_ti16", weights=str(tmp_path / "deit.pth"), options={**options, "distilled": False}
        )
    with pytest.raises(ValueError, match=r"distilled=True: .* pool_type=tok, without"):
        vit.vit_ti16(distilled=True, pool_type="gap")


def test_beit_parity_and_its_options_named(tmp_path):
    """timm's BEiT: no absolute position embedding; per block a relative position bias table
    over [class token, patches], query and value biases without the key's, `gamma_1` and
    `gamma_2`; the patch tokens' mean, `fc_norm`. Its options give the torch model's numbers
    on a 4x4 grid, in the NNX twin too; the index is timm's buffer (square grid or not);
    without `rel_pos_bias` the mismatch names it, and another grid is refused by shape."""
    reference = torch_beit.randomize_(
        torch_beit.Beit(64, embed_dim=192, depth=2, num_heads=3, mlp_dim=768, num_classes=5)
    )
    torch.save(reference.state_dict(), tmp_path / "beit.pth")
    hf = {k: torch.from_numpy(v) for k, v in _hf_beit_names(reference.state_dict()).items()}
    assert "beit.encoder.layer.1.attention.attention.key.bias" not in hf
    torch.save(hf, tmp_path / "hf_beit.bin")
    options = {
        **SMALL,
        "image_size": 64,
        "pool_type": "gap",
        "class_token": True,
        "fc_norm": True,
        "posemb": "none",
        "rel_pos_bias": True,
        "layer_scale": True,
        "gelu_approximate": False,
    }
    layers = {"stem": "patch_embed.proj", "block0": "blocks.0", "block1": "blocks.1"}
    loaded = model_load.load("vit_ti16", weights=str(tmp_path / "beit.pth"), options=options)
    check_parity(loaded.module, loaded.variables, reference, 64, layers, prefix=1)
    assert_nnx_twin_equal(loaded, 64)
    hf = model_load.load("vit_ti16", weights=str(tmp_path / "hf_beit.bin"), options=options)
    jax.tree.map(np.testing.assert_array_equal, hf.variables, loaded.variables)
    for grid in ((4, 4), (2, 3), (5, 2)):
        np.testing.assert_array_equal(
            vit.beit_relative_position_index(*grid),
            torch_beit.gen_relative_position_index(grid).view(-1).numpy(),
        )
    with pytest.raises(
        ValueError, match=r"relative position bias in its blocks \(BEiT's\): --model_option "
    ):
        model_load.load(
            "vit_ti16",
            weights=str(tmp_path / "beit.pth"),
            options={**options, "rel_pos_bias": False},
        )
    with pytest.raises(ValueError, match=r"bias_table: checkpoint \(52, 3\) vs model \(28, 3\)"):
        model_load.load(
            "vit_ti16", weights=str(tmp_path / "beit.pth"), options={**options, "image_size": 48}
        )
    with pytest.raises(ValueError, match=r"rel_pos_bias=True: BEiT's bias covers one class"):
        vit.vit_ti16(rel_pos_bias=True, pool_type="gap")


def test_beit_pre_training_checkpoints_share_one_table(tmp_path, caplog):
    """BEiT's pre-training checkpoints (`beit_base_patch16_224_pt22k.pth`, under `model`):
    one relative position table under `rel_pos_bias.` that every block reads, the mask token,
    the visual-token head `lm_head`, the final `norm`. They load as a checkpoint holding that
    table in each block (the token and head left out, logged), in Hugging Face's names too
    (`encoder.relative_position_bias`); two keys naming one weight are refused."""
    reference = torch_beit.randomize_(
        torch_beit.Beit(64, embed_dim=192, depth=2, num_heads=3, mlp_dim=768, num_classes=5)
    )
    table = reference.blocks[0].attn.relative_position_bias_table.detach()
    norm = {"norm.weight": torch.rand(192) + 0.5, "norm.bias": torch.randn(192)}
    plain = {k: v for k, v in reference.state_dict().items() if not k.startswith(("head", "fc_"))}
    per_block = plain | norm | {"blocks.1.attn.relative_position_bias_table": table}
    shared = {k: v for k, v in plain.items() if ".attn.relative_position_" not in k} | norm
    shared["rel_pos_bias.relative_position_bias_table"] = table
    shared["rel_pos_bias.relative_position_index"] = plain["blocks.0.attn.relative_position_index"]
    extra = {"mask_token": torch.zeros(1, 1, 192), "lm_head.weight": torch.ones(50, 192)}
    extra["lm_head.bias"] = torch.zeros(50)
    torch.save(per_block, tmp_path / "per_block.pth")
    torch.save({"model": shared | extra}, tmp_path / "beit_pt22k.pth")
    hf = {k: v for k, v in _hf_beit_names(reference.state_dict()).items()
          if not k.startswith(("classifier.", "beit.pooler.")) and "relative_position" not in k}  # fmt: skip
    hf |= {f"beit.layernorm.{k[5:]}": v.numpy() for k, v in norm.items()}
    hf["beit.encoder.relative_position_bias.relative_position_bias_table"] = table.numpy()
    hf |= {"beit.embeddings.mask_token": np.zeros((1, 1, 192), np.float32)}
    hf |= {k: v.numpy() for k, v in extra.items() if k.startswith("lm_head")}
    torch.save({k: torch.from_numpy(v) for k, v in hf.items()}, tmp_path / "hf_beit_pt22k.bin")
    options = {**SMALL, "num_classes": 0, "image_size": 64, "pool_type": "tok", "posemb": "none"}
    options |= {"rel_pos_bias": True, "layer_scale": True, "gelu_approximate": False}
    want = model_load.load("vit_ti16", weights=str(tmp_path / "per_block.pth"), options=options)
    for name in ("beit_pt22k.pth", "hf_beit_pt22k.bin"):
        caplog.clear()
        with caplog.at_level("INFO"):
            got = model_load.load("vit_ti16", weights=str(tmp_path / name), options=options)
        assert "2 keys of BEiT's masked-image-modeling head (lm_head) left out" in caplog.text
        jax.tree.map(np.testing.assert_array_equal, got.variables, want.variables)
    # Two keys of one weight (the backbone's norm beside a wrapper's) are refused by name.
    hf |= {f"layernorm.{k[5:]}": v.numpy() for k, v in norm.items()}
    torch.save({k: torch.from_numpy(v) for k, v in hf.items()}, tmp_path / "two_norms.bin")
    with pytest.raises(ValueError, match=r"two checkpoint keys are both 'norm.weight' once "
                       r"renamed; save the state dict of one model only"):  # fmt: skip
        model_load.load("vit_ti16", weights=str(tmp_path / "two_norms.bin"), options=options)


def test_layer_scale_parity_and_its_option_named(tmp_path):
    """timm's LayerScale (DeiT III, CaiT): `ls1.gamma`, `ls2.gamma` per block, as the torch
    model computes them, in the NNX twin too; without the option, named."""
    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(img_size=32, depth=2, num_classes=5, layer_scale=True)
    )
    torch.save(reference.state_dict(), tmp_path / "deit3.pth")
    options = {**SMALL, "pool_type": "tok", "gelu_approximate": False, "layer_scale": True}
    loaded = model_load.load("vit_ti16", weights=str(tmp_path / "deit3.pth"), options=options)
    layers = {"block0": "blocks.0", "block1": "blocks.1", "mlp1": "blocks.1.mlp.act"}
    check_parity(loaded.module, loaded.variables, reference, 32, layers, prefix=1)
    assert_nnx_twin_equal(loaded, 32)
    with pytest.raises(
        ValueError, match=r"has a LayerScale in its blocks: --model_option layer_scale=true"
    ):
        model_load.load(
            "vit_ti16",
            weights=str(tmp_path / "deit3.pth"),
            options={**options, "layer_scale": False},
        )


def test_timm_keys_without_a_rule_are_named():
    model = vit.vit_ti16(**SMALL)
    reference = torch_vit.VisionTransformer(img_size=32, depth=2, num_classes=5)
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    state["reg_token"] = np.zeros((1, 4, 192), np.float32)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    with pytest.raises(
        torch_import.WeightMappingError,
        match=r"\['cls', 'reg'\]; Check .* The checkpoint has register tokens: --model_option "
        r"num_registers=4\. The checkpoint has a class token: --model_option pool_type=tok, "
        r"or class_token=true beside another pool_type\.",
    ):
        model.import_state_dict(state, template)
    # A ViT without qkv biases (timm's qkv_bias=False): named, not a KeyError.
    del state["reg_token"], state["blocks.1.attn.qkv.bias"]
    with pytest.raises(torch_import.WeightMappingError, match="no 'blocks.1.attn.qkv.bias'"):
        model.import_state_dict(state, template)


def test_timm_weights_that_do_not_split_into_heads_are_one_error():
    """A width the heads do not divide (ViT-L's qkv into 3 heads), or a `blocks.` key that is
    not numbered: WeightMappingError naming the key, not numpy's or int()'s ValueError."""
    d = 8
    qkv = {
        "blocks.0.attn.qkv.weight": np.zeros((3 * d, d), np.float32),
        "blocks.0.attn.qkv.bias": np.zeros(3 * d, np.float32),
    }
    with pytest.raises(
        torch_import.WeightMappingError, match=r"blocks.0.attn.qkv weight \(24, 8\) .* 3 heads"
    ):
        vit_import.timm_vit_to_big_vision(qkv, num_heads=3)
    assert len(vit_import.timm_vit_to_big_vision(qkv, num_heads=2)) == 6
    qkv["blocks.0.attn.qkv.weight"] = np.zeros((3 * d, d + 1), np.float32)
    with pytest.raises(torch_import.WeightMappingError, match=r"weight \(24, 9\)"):
        vit_import.timm_vit_to_big_vision(qkv, num_heads=2)
    proj = {"blocks.0.attn.proj.weight": np.zeros((d, d), np.float32)}
    with pytest.raises(torch_import.WeightMappingError, match=r"attn.proj weight \(8, 8\)"):
        vit_import.timm_vit_to_big_vision(proj, num_heads=3)
    odd = {"blocks.x.norm1.weight": np.zeros(3, np.float32)}
    assert vit_import.timm_vit_to_big_vision(odd, num_heads=3).keys() == odd.keys()

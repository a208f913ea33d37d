"""Helpers of the ViT tests: a torch model's outputs as maps, parity, the NNX twin."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from jaxdissect import capture
from jaxdissect.models import vit_nnx
from tests.model_testing import assert_close


def torch_run(model, x: np.ndarray, hooks: dict[str, str], grid: int, prefix: int):
    """Logits and hooked outputs, token outputs read as [B, grid, grid, C] (prefix dropped)."""
    modules = dict(model.named_modules())
    got: dict[str, np.ndarray] = {}
    handles = []
    for key, name in hooks.items():

        def hook(_m, _inp, out, key=key):
            out = out.detach().numpy().copy()
            if out.ndim == 4:
                got[key] = out.transpose(0, 2, 3, 1)
            else:
                got[key] = out[:, prefix:].reshape(out.shape[0], grid, grid, out.shape[-1])

        handles.append(modules[name].register_forward_hook(hook))
    with torch.no_grad():
        logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    for h in handles:
        h.remove()
    return logits, got


def assert_nnx_twin_equal(loaded, size: int) -> None:
    """The NNX twin of a loaded Linen ViT gives its numbers bit for bit (both jitted)."""
    twin = vit_nnx.from_linen(loaded.module, loaded.variables["params"])
    x = np.random.default_rng(3).standard_normal((2, size, size, 3), np.float32)
    np.testing.assert_array_equal(
        np.asarray(nnx.jit(lambda m, x: m(x))(twin, x)),
        np.asarray(jax.jit(loaded.module.apply)(loaded.variables, x)),
    )


def check_parity(
    module, variables, reference, size: int, layers: dict[str, str], prefix: int, patch: int = 16
):
    x = np.random.default_rng(0).standard_normal((2, size, size, 3), np.float32)
    grid = size // patch
    want_logits, want = torch_run(reference, x, layers, grid, prefix)
    tap = capture.make_tap(module, variables, list(layers), input_shape=(size, size, 3))
    with jax.default_matmul_precision("highest"):
        logits = jax.jit(lambda v, x: module.apply(v, x))(variables, jnp.asarray(x))
        got = jax.jit(tap.fn)(tap.variables, jnp.asarray(x))
    for name, path in zip(tap.names, tap.layers, strict=True):
        assert_close(got[path], want[name], name)
    assert_close(logits, want_logits, "logits")


def assert_class_token_features(loaded, reference, size: int = 32, seed: int = 0) -> None:
    """A head-less loaded ViT's output is the torch ViT's class token after its final norm."""
    x = np.random.default_rng(seed).standard_normal((2, size, size, 3), np.float32)
    with torch.no_grad():
        t = reference.patch_embed.proj(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
        t = torch.cat([reference.cls_token.expand(2, -1, -1), t.flatten(2).transpose(1, 2)], 1)
        want = reference.norm(reference.blocks(t + reference.pos_embed))[:, 0].numpy()
    with jax.default_matmul_precision("highest"):
        got = jax.jit(loaded.module.apply)(loaded.variables, jnp.asarray(x))
    assert_close(got, want, "features")


SMALL = dict(depth=2, image_size=32, num_classes=5)


def hf_dinov2_names(state: dict, prefix: str = "") -> dict:
    """A DINOv2 backbone's state dict (timm's layout) in Hugging Face's `Dinov2Model` names
    (`Dinov2WithRegistersModel`'s with registers), each key after `prefix` (`dinov2.` in a
    `Dinov2ForImageClassification`)."""
    names = {
        "cls_token": "embeddings.cls_token",
        "pos_embed": "embeddings.position_embeddings",
        "mask_token": "embeddings.mask_token",
        "register_tokens": "embeddings.register_tokens",
        "patch_embed.proj": "embeddings.patch_embeddings.projection",
        "norm": "layernorm",
    }
    parts = {
        "norm1": "norm1",
        "attn.proj": "attention.output.dense",
        "ls1": "layer_scale1",
        "norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "ls2": "layer_scale2",
    }
    out = {}
    for key, value in state.items():
        value, (stem, _, leaf) = value.numpy(), key.rpartition(".")
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", stem)
        if key in names:
            out[names[key]] = value
        elif block and block[2] == "attn.qkv":
            layer = f"encoder.layer.{block[1]}.attention.attention"
            for name, part in zip(("query", "key", "value"), np.split(value, 3), strict=True):
                out[f"{layer}.{name}.{leaf}"] = part
        elif block:
            leaf = "lambda1" if leaf == "gamma" else leaf
            out[f"encoder.layer.{block[1]}.{parts[block[2]]}.{leaf}"] = value
        else:
            out[f"{names[stem]}.{leaf}"] = value
    return {prefix + k: v for k, v in out.items()}

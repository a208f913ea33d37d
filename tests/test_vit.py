"""ViT: parity with a torch (timm-layout) ViT, big_vision .npz loading, the NNX twin (its
checkpoints in other namings: test_vit_import.py)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util

from jaxdissect import capture, preprocess
from jaxdissect.models import (
    convert,
    npz_file,
    npz_import,
    vit,
    vit_nnx,
    weight_file,
    zoo,
)
from jaxdissect.models import load as model_load
from tests import torch_vit
from tests.model_testing import assert_close, random_variables
from tests.vit_testing import SMALL, check_parity

pytestmark = pytest.mark.xdist_group("vit")


TIMM_LAYERS = {
    "stem": "patch_embed.proj",
    "block0": "blocks.0",
    "block5": "blocks.5",
    "block11": "blocks.11",
    "mlp11": "blocks.11.mlp.act",
    "encoder_norm": "norm",
}


def test_timm_state_dict_parity_at_full_ti16_width(tmp_path):
    """Ti/16 at 224, class token, exact GELU: a .pth read by the restricted importer."""
    reference = torch_vit.randomize_(torch_vit.VisionTransformer(num_classes=10))
    torch.save(reference.state_dict(), tmp_path / "vit.pth")
    loaded = model_load.load(
        "vit_ti16",
        weights=str(tmp_path / "vit.pth"),
        options={"num_classes": 10, "pool_type": "tok", "gelu_approximate": False},
    )
    check_parity(loaded.module, loaded.variables, reference, 224, TIMM_LAYERS, prefix=1)


def test_models_convert_maps_a_timm_vit_as_the_loader_does(tmp_path):
    """models/convert.py goes through the ViT's own importer (timm's names, the class
    token's position row): its orbax output loads as the .pth does."""
    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(img_size=32, depth=2, num_classes=5)
    )
    torch.save(reference.state_dict(), tmp_path / "vit.pth")
    options = {"depth": 2, "image_size": 32, "pool_type": "tok", "gelu_approximate": False}
    convert.convert(
        "vit_ti16", tmp_path / "vit.pth", tmp_path / "ckpt", num_classes=5, options=options
    )
    direct = model_load.load(
        "vit_ti16", weights=str(tmp_path / "vit.pth"), options={**options, "num_classes": 5}
    )
    converted = model_load.load("vit_ti16", weights=str(tmp_path / "ckpt"))
    jax.tree.map(np.testing.assert_array_equal, converted.variables, direct.variables)


def test_gap_and_tanh_gelu_parity():
    """No class token (mean pooling), big_vision's tanh GELU, a 2-block Ti at 64 px."""
    reference = torch_vit.randomize_(
        torch_vit.VisionTransformer(
            img_size=64, depth=2, num_classes=7, class_token=False, approximate="tanh"
        ),
        seed=1,
    )
    model = vit.vit_ti16(num_classes=7, depth=2, image_size=64)
    template = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    variables = model.import_state_dict(state, template)
    layers = {"block0": "blocks.0", "block1": "blocks.1", "mlp0": "blocks.0.mlp.act"}
    check_parity(model, variables, reference, 64, layers, prefix=0)


def _random_variables(model, size: int, seed: int = 0) -> dict:
    """Random parameters everywhere (the head is zero-initialised otherwise)."""
    return random_variables(model, jnp.zeros((1, size, size, 3)), seed)


def _save_npz(path: pathlib.Path, params: dict, prefix: str = "") -> None:
    flat = traverse_util.flatten_dict(params, sep="/")
    np.savez(path, **{prefix + k: np.asarray(v) for k, v in flat.items()})


def test_big_vision_npz_loads_directly(tmp_path):
    model = vit.vit_ti16(pool_type="tok", **SMALL)
    variables = _random_variables(model, 32)
    _save_npz(tmp_path / "bv.npz", variables["params"])
    loaded = model_load.load(
        "vit_ti16", weights=str(tmp_path / "bv.npz"), options={"pool_type": "tok", **SMALL}
    )
    for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.input_spec.size == 32 and loaded.input_spec.scale == 1 / 127.5


def test_old_big_vision_names_and_bfloat16(tmp_path):
    """Pre-Linen numbering, posemb under Transformer/, [cls, patches] posemb, params/ prefix."""
    model = vit.vit_ti16(pool_type="tok", **SMALL)
    params = _random_variables(model, 32)["params"]
    flat = traverse_util.flatten_dict(params, sep="/")
    old = {}
    for k, v in flat.items():
        k = k.replace("LayerNorm_1", "LayerNorm_2").replace("MlpBlock_0", "MlpBlock_3")
        old["params/" + k] = np.asarray(v)
    cls_pos = np.full((1, 1, 192), 0.25, np.float32)
    old["params/Transformer/posembed_input/pos_embedding"] = np.concatenate(
        [cls_pos, old.pop("params/pos_embedding")], axis=1
    )
    old["params/cls"] = old["params/cls"] - cls_pos
    # bfloat16 as big_vision stores it: 2-byte voids of the bits.
    kernel = "params/Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel"
    bits = (old[kernel].view(np.uint32) >> 16).astype(np.uint16)
    old[kernel] = bits.view("V2")
    np.savez(tmp_path / "old.npz", **old)
    got = npz_import.load_npz_variables(tmp_path / "old.npz", {"params": params})["params"]
    want = dict(flat)
    want["Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel"] = weight_file.widen_bfloat16(bits)
    for k, v in traverse_util.flatten_dict(got, sep="/").items():
        np.testing.assert_allclose(v, want[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_npz_that_does_not_fit_lists_keys_and_the_option(tmp_path):
    model = vit.vit_ti16(pool_type="tok", **SMALL)
    _save_npz(tmp_path / "tok.npz", _random_variables(model, 32)["params"])
    with pytest.raises(ValueError) as e:
        model_load.load("vit_ti16", weights=str(tmp_path / "tok.npz"), options=SMALL)
    msg = str(e.value)
    assert "checkpoint keys with no model variable (1): ['cls']" in msg
    assert "pool_type=tok" in msg
    with pytest.raises(ValueError, match=r"head/kernel: checkpoint \(192, 5\) vs model \(192, 9\)"):
        model_load.load(
            "vit_ti16",
            weights=str(tmp_path / "tok.npz"),
            options={**SMALL, "pool_type": "tok", "num_classes": 9},
        )
    deeper = {**SMALL, "depth": 3, "pool_type": "tok"}
    with pytest.raises(
        ValueError, match=r"no checkpoint key \(16\): \['Transformer/encoderblock_2"
    ):
        model_load.load("vit_ti16", weights=str(tmp_path / "tok.npz"), options=deeper)


def test_missing_npz_says_where_to_put_it():
    with pytest.raises(FileNotFoundError, match="no such file; put the big_vision .npz"):
        model_load.check_request("vit_ti16", "ckpt/none.npz")


def test_npz_with_pickled_objects_is_refused_unread(tmp_path):
    np.savez(tmp_path / "evil.npz", cls=np.array([{"a": 1}], dtype=object))
    with pytest.raises(weight_file.CheckpointError, match="holds pickled objects"):
        npz_file.load_npz(tmp_path / "evil.npz")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "evil.npz").read_bytes()[:40])
    with pytest.raises(ValueError, match="^--weights: .*cut.npz: not a readable .npz"):
        model_load.load("vit_ti16", weights=str(tmp_path / "cut.npz"), options=SMALL)


def test_zoo_configs():
    for arch, (width, heads, params_m) in {
        "vit_ti16": (192, 3, 5.7),
        "vit_s16": (384, 6, 22.1),
        "vit_b16": (768, 12, 86.6),
    }.items():
        model = zoo.build(arch, pool_type="tok")
        shapes = jax.eval_shape(
            lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
        )
        count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
        assert (model.width, model.num_heads) == (width, heads)
        assert round(count / 1e6, 1) == params_m, (arch, count)
        assert model.default_layers[-1] == "block11"
    with pytest.raises(ValueError, match="pool_type='avg': one of gap, tok, map"):
        vit.vit_ti16(pool_type="avg")


@pytest.mark.parametrize("patch", ["8,16", (8, 16, 1), (8, 0), True])
def test_patch_size_is_an_int_or_a_pair_of_ints(patch):
    """A patch size of another form is refused naming it, and from --model_option (which
    reads '8,16' as text) before anything is built; it was 'too many values to unpack'."""
    refused = r"^patch_size=.*: an int \(square patches, e.g. 16\) or a pair"
    with pytest.raises(ValueError, match=refused):
        vit.vit_ti16(patch_size=patch)
    with pytest.raises(ValueError, match=refused):  # a user model's, read by capture
        preprocess.patch_pair(patch)
    assert vit.vit_ti16(patch_size=[8, 16]).patch_size == [8, 16]
    assert preprocess.patch_pair(np.int64(16)) == preprocess.patch_pair(16) == (16, 16)
    assert preprocess.patch_pair(np.array([8, 16])) == (8, 16)
    with pytest.raises(
        ValueError,
        match=r"^--model_option patch_size='8,16': --model=vit_ti16 takes patch_size as a whole "
        r"number or a tuple, which --model_option cannot give \(pass it from a factory",
    ):
        model_load.check_request("vit_ti16", None, None, {"patch_size": "8,16"})
    model_load.check_request("vit_ti16", None, None, {"patch_size": 8, "pool_type": "tok"})


def _numpy_map_head(tokens: np.ndarray, p: dict, heads: int) -> np.ndarray:
    """big_vision's MAPHead, one image and one head at a time: the probe attends over the
    tokens, LayerNorm (eps 1e-6), tanh-GELU MLP, residual; then the linear head."""
    m = p["MAPHead_0"]
    att = m["MultiHeadDotProductAttention_0"]
    probe = np.asarray(m["probe"], np.float64)[0, 0]
    pooled = []
    for x in np.asarray(tokens, np.float64):
        out = np.asarray(att["out"]["bias"], np.float64).copy()
        for h in range(heads):
            proj = {
                n: x @ np.asarray(att[n]["kernel"])[:, h] + np.asarray(att[n]["bias"])[h]
                for n in ("key", "value")
            }
            q = (
                probe @ np.asarray(att["query"]["kernel"])[:, h]
                + np.asarray(att["query"]["bias"])[h]
            )
            logits = proj["key"] @ q / np.sqrt(q.shape[0])
            weights = np.exp(logits - logits.max())
            weights /= weights.sum()
            out += (weights @ proj["value"]) @ np.asarray(att["out"]["kernel"])[h]
        ln = m["LayerNorm_0"]
        y = (out - out.mean()) / np.sqrt(out.var() + 1e-6) * ln["scale"] + ln["bias"]
        mlp = m["MlpBlock_0"]
        y = y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"]
        y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y**3)))
        pooled.append(out + y @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"])
    return np.stack(pooled) @ p["head"]["kernel"] + p["head"]["bias"]


def test_map_head_npz_loads_and_pools_as_big_vision(tmp_path):
    """An attention-pooling (SigLIP-style) .npz under big_vision's names loads into
    pool_type=map and its logits are the numpy MAPHead's of the encoder's tokens."""
    model = vit.vit_ti16(pool_type="map", **SMALL)
    variables = _random_variables(model, 32, seed=1)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    assert {k for k in flat if k.startswith("MAPHead_0/")} == {
        "MAPHead_0/probe",
        *(
            f"MAPHead_0/MultiHeadDotProductAttention_0/{n}/{w}"
            for n in ("query", "key", "value", "out")
            for w in ("kernel", "bias")
        ),
        "MAPHead_0/LayerNorm_0/scale",
        "MAPHead_0/LayerNorm_0/bias",
        *(f"MAPHead_0/MlpBlock_0/Dense_{i}/{w}" for i in (0, 1) for w in ("kernel", "bias")),
    }
    _save_npz(tmp_path / "map.npz", variables["params"], prefix="params/")
    loaded = model_load.load(
        "vit_ti16", weights=str(tmp_path / "map.npz"), options={"pool_type": "map", **SMALL}
    )
    for a, b in zip(jax.tree.leaves(loaded.variables), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(a, b)
    x = np.random.default_rng(5).standard_normal((3, 32, 32, 3), np.float32)
    apply = jax.jit(  # one program: eager, each op compiled apart took seconds
        lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=["intermediates"])
    )
    logits, state = apply(variables, x)
    tokens = state["intermediates"]["Transformer"]["__call__"][0]
    want = _numpy_map_head(tokens, variables["params"], model.num_heads)
    assert_close(logits, want, "logits")
    twin = vit_nnx.from_linen(model, variables["params"])
    assert_close(nnx.jit(lambda m, x: m(x))(twin, x), logits, "nnx logits")
    with pytest.raises(ValueError, match="pool_type=map"):
        model_load.load("vit_ti16", weights=str(tmp_path / "map.npz"), options=SMALL)
    _save_npz(tmp_path / "gap.npz", _random_variables(vit.vit_ti16(**SMALL), 32)["params"])
    with pytest.raises(ValueError, match="no attention-pooling head: pool_type=gap or tok"):
        model_load.load(
            "vit_ti16", weights=str(tmp_path / "gap.npz"), options={"pool_type": "map", **SMALL}
        )


def test_siglip_two_tower_npz_loads_its_image_tower(tmp_path):
    """big_vision's SigLIP checkpoints as released (`webli_en_b16_224_63724782.npz`) hold
    both towers: the image tower under `params/img/`, the text tower under `params/txt/`, and
    the temperature and bias `params/t`, `params/b`; the image tower's keys load, the rest are
    left out."""
    options = {**SMALL, "pool_type": "map", "num_classes": 0}
    model = vit.vit_ti16(**options)
    variables = _random_variables(model, 32, seed=2)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    arrays = {f"params/img/{k}": np.asarray(v) for k, v in flat.items()}
    arrays["params/txt/Encoder_0/encoder_norm/scale"] = np.ones(8, np.float32)
    arrays["params/t"], arrays["params/b"] = np.ones(1, np.float32), -np.ones(1, np.float32)
    np.savez(tmp_path / "siglip.npz", **arrays)
    loaded = model_load.load("vit_ti16", weights=str(tmp_path / "siglip.npz"), options=options)
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, variables)


def test_scanned_encoder_npz_loads_block_by_block(tmp_path):
    """A `scan=True` big_vision encoder (SigLIP So400m's released checkpoints:
    `params/img/Transformer/encoderblock/...`, each array stacked over the blocks on its first
    axis) loads as its `encoderblock_{i}`, as big_vision's `scan_to_pyloop` splits it."""
    options = {**SMALL, "pool_type": "map", "num_classes": 0}
    model = vit.vit_ti16(**options)
    variables = _random_variables(model, 32, seed=3)
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    arrays, stacked = {}, {}
    for key, value in flat.items():
        block, _, rest = key.removeprefix("Transformer/encoderblock_").partition("/")
        if key.startswith("Transformer/encoderblock_"):
            stacked.setdefault(rest, {})[int(block)] = np.asarray(value)
        else:
            arrays[f"params/img/{key}"] = np.asarray(value)
    for rest, blocks in stacked.items():
        arrays[f"params/img/Transformer/encoderblock/{rest}"] = np.stack([blocks[0], blocks[1]])
    np.savez(tmp_path / "scan.npz", **arrays)
    loaded = model_load.load("vit_ti16", weights=str(tmp_path / "scan.npz"), options=options)
    jax.tree.map(np.testing.assert_array_equal, loaded.variables, variables)


def test_nnx_twin_has_the_same_numbers():
    model = vit.vit_ti16(pool_type="tok", **SMALL)
    variables = _random_variables(model, 32)
    twin = vit_nnx.from_linen(model, variables["params"])
    x = np.random.default_rng(3).standard_normal((2, 32, 32, 3), np.float32)
    # Jitted both: eager dispatch may split a dot product differently (1 ulp).
    got = nnx.jit(lambda m, x: m(x))(twin, x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(model.apply)(variables, x)))
    layers = ["stem", "block0", "mlp1", "Transformer/encoderblock_1/MultiHeadDotProductAttention_0"]
    linen_tap = capture.make_tap(model, variables, layers, input_shape=(32, 32, 3))
    nnx_tap = capture.make_tap(twin, None, layers, input_shape=(32, 32, 3))
    assert linen_tap.layers == nnx_tap.layers and linen_tap.shapes == nnx_tap.shapes
    a = jax.jit(linen_tap.fn)(linen_tap.variables, x)
    b = jax.jit(nnx_tap.fn)(nnx_tap.variables, x)
    for path in linen_tap.layers:
        np.testing.assert_array_equal(np.asarray(a[path]), np.asarray(b[path]), err_msg=path)
    with pytest.raises(ValueError, match="missing .*cls"):
        vit_nnx.from_linen(model, _random_variables(vit.vit_ti16(**SMALL), 32)["params"])


def test_split_head_outputs_are_refused():
    """A query projection's [tokens, heads, head_dim] would pass for an [h, w, C] map."""
    model = vit.vit_ti16(pool_type="tok", **SMALL)
    variables = _random_variables(model, 32)
    query = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query"
    with pytest.raises(capture.LayerNotFoundError, match=r"\[5, 3, 64\]: \[tokens, heads"):
        capture.make_tap(model, variables, [query], input_shape=(32, 32, 3))
    tap = capture.make_tap(model, variables, ["stem"], input_shape=(32, 32, 3))
    assert tap.shapes["embedding"] == (2, 2, 192)  # a real map of the same model passes


def test_old_position_layout_is_told_by_the_models_patch_count():
    """[class token, patches] rows are split off only where the checkpoint has one row more
    than the model's patches: a 5x10 grid (50 = 7 * 7 + 1 rows) is no old layout."""
    pos = np.arange(50 * 2, dtype=np.float32).reshape(1, 50, 2)
    flat = {"pos_embedding": pos, "cls": np.zeros((1, 1, 2), np.float32)}
    kept = npz_import.big_vision_params(flat, patches=50)
    np.testing.assert_array_equal(kept["pos_embedding"], pos)
    np.testing.assert_array_equal(kept["cls"], 0)
    split = npz_import.big_vision_params(flat, patches=49)
    np.testing.assert_array_equal(split["pos_embedding"], pos[:, 1:])
    np.testing.assert_array_equal(split["cls"], pos[:, :1])


def test_a_class_token_that_does_not_fit_the_old_position_row_is_one_line(tmp_path):
    """A [class token, patches] position embedding beside a class token of another width:
    a mapping error naming both and the file, not numpy's broadcast error alone."""
    model = vit.vit_ti16(pool_type="tok", **SMALL)
    flat = traverse_util.flatten_dict(_random_variables(model, 32)["params"], sep="/")
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    arrays["pos_embedding"] = np.zeros((1, 5, 192), np.float32)  # 4 patches + the class row
    arrays["cls"] = np.zeros((1, 1, 5), np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(
        ValueError,
        match=r"^--weights=\S*bad.npz does not fit --model=vit_ti16: cls \(1, 1, 5\) does not "
        r"fit the class token's row \(1, 1, 192\) of pos_embedding \(1, 5, 192\)",
    ):
        model_load.load(
            "vit_ti16", weights=str(tmp_path / "bad.npz"), options={"pool_type": "tok", **SMALL}
        )


def test_a_grid_of_as_many_patches_in_another_shape_is_refused():
    """A learned position embedding (and BEiT's bias tables, in the NNX twin) is of the
    square grid of `image_size`: a 32x128 input's 2x8 grid, as many patches as the 4x4 of
    64 px, ran silently with each row on another patch; it is refused, naming the grids."""
    model = vit.vit_ti16(pool_type="tok", depth=1, image_size=64, num_classes=5)
    variables = _random_variables(model, 64)
    x = np.zeros((1, 32, 128, 3), np.float32)
    refused = r"a 2x8 patch grid: .* the 4x4 grid of image_size=64"
    with pytest.raises(ValueError, match=refused):
        model.apply(variables, x)
    with pytest.raises(ValueError, match=refused):
        capture.make_tap(model, variables, ["block0"], input_shape=(32, 128, 3))
    with pytest.raises(ValueError, match=refused):
        vit_nnx.from_linen(model, variables["params"])(x)
    beit = model.clone(posemb="none", rel_pos_bias=True)
    with pytest.raises(ValueError, match=refused):
        vit_nnx.from_linen(beit, _random_variables(beit, 64)["params"])(x)
    model.apply(variables, np.zeros((1, 64, 64, 3), np.float32))  # its own grid runs

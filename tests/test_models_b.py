"""GoogLeNet and EfficientNet-Lite0: parity with torch references, sizes, the shipped weights."""

from __future__ import annotations

import functools
import importlib.resources

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxdissect.models import zoo
from jaxdissect.models.checkpoint_io import load_state_dict
from jaxdissect.models.convert import variables_template
from jaxdissect.models.efficientnet_lite import (
    PRETRAINED_FILE,
    PRETRAINED_PACKAGE,
    efficientnet_lite0,
    pretrained_lite0,
)
from jaxdissect.models.googlenet import GoogLeNet, googlenet
from jaxdissect.models.torch_import import WeightMappingError, torch_to_flax
from tests import torch_models_b as ref

EGYPTIAN_CAT, ESPRESSO = 285, 967
PHOTOS = ("chelsea", "coffee")


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _rel_err(got, want) -> float:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _apply_with(model, variables, x_nchw: torch.Tensor, paths: list[str]):
    """Logits and the `__call__` outputs of modules at dotted `paths` (jitted: op-by-op
    dispatch of these networks is many times slower on CPU)."""
    wanted = set(paths)
    apply = functools.partial(
        model.apply,
        capture_intermediates=lambda mdl, method: (
            method == "__call__" and ".".join(mdl.path) in wanted
        ),
        mutable=["intermediates"],
    )
    logits, state = jax.jit(apply)(variables, jnp.asarray(x_nchw.numpy().transpose(0, 2, 3, 1)))
    flat = jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]
    found = {".".join(k.key for k in keypath[:-2]): leaf for keypath, leaf in flat}
    return logits, found


def _torch_outputs(model: torch.nn.Module, x: torch.Tensor, paths: list[str]):
    outputs = {}
    modules = dict(model.named_modules())
    handles = [
        modules[p].register_forward_hook(
            lambda _m, _i, out, p=p: outputs.__setitem__(p, out.numpy().transpose(0, 2, 3, 1))
        )
        for p in paths
    ]
    with torch.no_grad():
        logits = model(x).numpy()
    for handle in handles:
        handle.remove()
    return logits, outputs


def _check_parity(torch_model, flax_model, x, paths, rename=None):
    ref.randomize_batch_norm(torch_model)
    torch_model.eval()
    state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    variables = torch_to_flax(state, variables_template(flax_model), rename=rename)
    want_logits, want = _torch_outputs(torch_model, x, paths)
    logits, got = _apply_with(flax_model, variables, x, paths)
    assert sorted(got) == sorted(paths)
    for path in paths:
        assert _rel_err(got[path], want[path]) < 1e-4, path
    assert _rel_err(logits, want_logits) < 1e-4


def test_googlenet_parity_random_weights():
    torch.manual_seed(0)
    # aux_logits=True: its keys are in torchvision files and must be skipped on import.
    torch_model = ref.GoogLeNet(num_classes=10, aux_logits=True)
    # 83 x 77 exercises ceil_mode pooling on odd sizes.
    x = torch.randn(2, 3, 83, 77)
    paths = ["conv1", "maxpool1", "inception3a", "inception4e", "inception5b"]
    _check_parity(torch_model, googlenet(num_classes=10), x, paths, rename=GoogLeNet.torch_rename)


def test_efficientnet_lite0_parity_random_weights():
    torch.manual_seed(0)
    torch_model = ref.EfficientNetLite0(num_classes=10)
    # Odd sizes make TF-"same" padding asymmetric at every stride-2 layer.
    x = torch.randn(2, 3, 71, 66)
    paths = ["_bn0", "_blocks.0", "_blocks.3", "_blocks.10", "_blocks.15", "_bn1"]
    _check_parity(torch_model, efficientnet_lite0(num_classes=10), x, paths)


@pytest.fixture(scope="module")
def real_configs() -> dict:
    """{arch: (the zoo's model, its variables' and its modules' outputs' shapes)}, from one
    abstract trace of `init` each (nothing computed)."""
    out = {}
    for arch in ("googlenet", "efficientnet_lite0"):
        model = zoo.build(arch)
        size = model.input_spec.size
        x = jnp.zeros((1, size, size, 3))
        shapes = jax.eval_shape(
            lambda model=model, x=x: model.init(jax.random.key(0), x, capture_intermediates=True)
        )
        out[arch] = model, shapes
    return out


def test_parameter_counts_of_real_configs(real_configs):
    assert real_configs["googlenet"][0] == googlenet()
    assert _count(real_configs["googlenet"][1]["params"]) == 6_624_904
    assert sum(p.numel() for p in ref.GoogLeNet().parameters()) == 6_624_904

    assert real_configs["efficientnet_lite0"][0] == efficientnet_lite0()
    assert _count(real_configs["efficientnet_lite0"][1]["params"]) == 4_652_008
    assert sum(p.numel() for p in ref.EfficientNetLite0().parameters()) == 4_652_008


def test_aliases_and_default_layers_name_real_modules(real_configs):
    for arch, (model, shapes) in real_configs.items():
        flat = jax.tree_util.tree_flatten_with_path(shapes["intermediates"])[0]
        paths = {".".join(k.key for k in keypath[:-2]) for keypath, _ in flat}
        for alias, path in model.layer_aliases.items():
            assert path in paths, (arch, alias, path)
        for name in model.default_layers:
            assert model.layer_aliases.get(name, name) in paths, (arch, name)
    assert GoogLeNet.layer_aliases["inception_4e"] == "inception4e"
    lite = efficientnet_lite0()
    assert lite.layer_aliases["stage8"] == "_blocks.15"
    assert lite.layer_aliases["head"] == "_head_act"


@pytest.mark.slow
def test_efficientnet_preclip_aliases_are_the_unclipped_outputs():
    from jaxdissect import capture

    model = efficientnet_lite0(num_classes=5)
    rng = np.random.default_rng(0)

    def draw(path, x):  # random weights, BatchNorm scaled up so that the clip bites
        name = str(path[-1])
        if "var" in name:
            return np.ones_like(x)
        return (
            np.full_like(x, 40.0)
            if "scale" in name
            else rng.normal(0, 0.1, x.shape).astype(x.dtype)
        )

    # Drawn on the host: compiling the model's init would cost more than the test.
    variables = jax.tree_util.tree_map_with_path(draw, variables_template(model, 64))
    layers = ["stem", "stem_preclip", "head", "head_preclip"]
    tap = capture.make_tap(model, variables, layers, input_shape=(64, 64, 3))
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    out = jax.jit(tap.fn)(tap.variables, x)
    for name in ("stem", "head"):
        pre, post = (
            np.asarray(out[tap.layers[layers.index(f"{name}_preclip")]]),
            np.asarray(out[tap.layers[layers.index(name)]]),
        )
        assert (pre > 6).any() and (pre < 0).any()
        np.testing.assert_array_equal(post, np.clip(pre, 0, 6))
    # The default run takes no clipped output.
    assert not {"stem", "stage1", "head"} & set(model.default_layers)


def test_googlenet_options():
    plain = variables_template(googlenet(batch_norm=False, num_classes=5))
    assert "batch_stats" not in plain
    assert plain["params"]["conv1"]["conv"]["bias"].shape == (64,)
    half = variables_template(googlenet(width=0.5))["params"]
    assert half["inception5b"]["branch1"]["conv"]["kernel"].shape == (1, 1, 416, 192)
    assert half["fc"]["kernel"].shape == (512, 1000)
    # Without dropout, training mode needs no dropout rng (traced only: no compute).
    model = googlenet(dropout=False, num_classes=3)
    variables = variables_template(model)
    out, _ = jax.eval_shape(
        lambda v: model.apply(v, jnp.ones((2, 64, 64, 3)), train=True, mutable=["batch_stats"]),
        variables,
    )
    assert out.shape == (2, 3)


def test_googlenet_refuses_caffe_5x5_branch3_weights():
    """The Caffe GoogLeNets' branch3 is 5x5 (torchvision's, and so this model's, 3x3): their
    weights in torchvision's names are refused by shape, naming branch3, never run as 3x3."""
    state = {k: v.numpy() for k, v in ref.GoogLeNet(num_classes=5).state_dict().items()}
    for key, value in list(state.items()):
        if ".branch3.1.conv.weight" in key:
            state[key] = np.zeros((*value.shape[:2], 5, 5), np.float32)
    with pytest.raises(WeightMappingError, match=r"inception3a/branch3/1/conv/kernel: .*5, 5"):
        torch_to_flax(state, variables_template(googlenet(num_classes=5)))


def test_efficientnet_width_option_rounds_channels():
    params = variables_template(efficientnet_lite0(width=1.1))["params"]
    assert params["_conv_stem"]["kernel"].shape[-1] == 32  # Lite keeps the stem
    assert params["_blocks"]["15"]["_project_conv"]["kernel"].shape[-1] == 352
    assert params["_conv_head"]["kernel"].shape == (1, 1, 352, 1280)


def _photo(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


def test_pretrained_lite0_classifies_skimage_photos():
    model, variables = pretrained_lite0()
    # The model's own InputSpec: bilinear squash (no crop) of the whole photo to 224 x 224,
    # then (x / 255 - 0.498) / 0.502.
    x = jnp.concatenate([model.input_spec(jnp.asarray(_photo(n))[None]) for n in PHOTOS])
    logits = jax.jit(model.apply)(variables, x)
    probs = jax.nn.softmax(logits)
    assert int(probs[0].argmax()) == EGYPTIAN_CAT
    assert int(probs[1].argmax()) == ESPRESSO
    assert probs[0, EGYPTIAN_CAT] > 0.5 and probs[1, ESPRESSO] > 0.5

    # The torch reference takes the shipped state dict strictly (so its layout is
    # lukemelas') and agrees on the logits.
    path = importlib.resources.files(PRETRAINED_PACKAGE).joinpath(PRETRAINED_FILE)
    torch_model = ref.EfficientNetLite0()
    state = {k: torch.from_numpy(v) for k, v in load_state_dict(path).items()}
    torch_model.load_state_dict(state, strict=True)
    torch_model.eval()
    with torch.no_grad():
        want = torch_model(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()))
    assert _rel_err(logits, want.numpy()) < 1e-4

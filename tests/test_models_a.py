"""AlexNet, VGG-16, ResNet and DenseNet-161: torch parity, parameter counts, aliases."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxdissect import capture, cli
from jaxdissect.models import load as model_load
from jaxdissect.models import vit_nnx, zoo
from jaxdissect.models.alexnet import AlexNet
from jaxdissect.models.densenet import DenseNet, legacy_key_rename
from jaxdissect.models.layers import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    MaxPool2d,
    layer_norm,
    scale_channels,
)
from jaxdissect.models.resnet import BasicBlock, ResNet
from jaxdissect.models.torch_import import WeightMappingError, torch_to_flax
from jaxdissect.models.vgg import VGG
from jaxdissect.preprocess import PLACES_LITE, InputSpec
from tests import torch_models as tm
from tests.model_testing import random_variables

# torchvision's parameter counts (1000 classes).
TORCHVISION_PARAMS = {
    ("alexnet", False): 61_100_840,
    ("vgg16", False): 138_357_544,
    ("vgg16", True): 138_365_992,
    ("resnet18", True): 11_689_512,
    ("resnet34", True): 21_797_672,
    ("resnet50", True): 25_557_032,
    ("resnet101", True): 44_549_160,
    ("resnet152", True): 60_192_808,
    ("densenet161", True): 28_681_000,
}


def torch_reference(arch: str, **options) -> torch.nn.Module:
    """The torch counterpart of `zoo.build(arch, **options)`."""
    if arch == "alexnet":
        return tm.AlexNet(**options)
    if arch == "vgg16":
        return tm.VGG16(**options)
    if arch in tm.RESNET_LAYOUT:
        return tm.ResNet(*tm.RESNET_LAYOUT[arch], **options)
    if arch == "densenet161":
        width = options.pop("width", 1.0)
        return tm.DenseNet(
            growth_rate=scale_channels(48, width),
            num_init_features=scale_channels(96, width),
            **options,
        )
    raise ValueError(arch)


def build_pair(arch: str, **options) -> tuple[nn.Module, torch.nn.Module]:
    """The zoo's Flax model and its torch reference, same options."""
    return zoo.build(arch, **options), torch_reference(arch, **options)


def abstract_init(model: nn.Module, size: int) -> tuple[dict, set[str]]:
    """Shapes of the model's variables, and every module path its forward pass calls.

    Traced abstractly: no initialiser runs, nothing is computed.
    """
    paths: set[str] = set()

    def interceptor(next_fun: Callable, args, kw, context):
        paths.add("/".join(context.module.path))
        return next_fun(*args, **kw)

    with nn.intercept_methods(interceptor):
        shapes = jax.eval_shape(
            lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
        )
    return shapes, paths


def forward_with_intermediates(
    model: nn.Module, variables: dict, x: jax.Array, paths: Iterable[str], **kwargs
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits and the outputs of the modules at `paths` ('a/b/c'), in one apply."""
    wanted, captured = set(paths), {}

    def interceptor(next_fun: Callable, args, kw, context):
        out = next_fun(*args, **kw)
        path = "/".join(context.module.path)
        if context.method_name == "__call__" and path in wanted:
            captured[path] = out
        return out

    def forward(variables: dict, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        captured.clear()
        with nn.intercept_methods(interceptor):
            logits = model.apply(variables, x, **kwargs)
        return logits, dict(captured)

    # One compilation is cheaper than op-by-op dispatch of a deep net's distinct shapes.
    return jax.jit(forward)(variables, x)


def torch_forward_with_intermediates(
    model: torch.nn.Module, x: np.ndarray, names: Iterable[str]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits and hooked module outputs (NHWC), copied before any in-place op runs."""
    captured: dict[str, np.ndarray] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in names:

        def hook(_m, _inp, out, name=name):
            out = out.detach().clone().numpy()
            captured[name] = out.transpose(0, 2, 3, 1) if out.ndim == 4 else out

        handles.append(modules[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    finally:
        for h in handles:
            h.remove()
    return logits, captured


def state_dict_copy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The state dict as numpy copies (`.numpy()` views would follow later torch updates)."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def assert_close(actual, expected, what: str) -> None:
    """Relative 1e-4 agreement, measured against the tensor's scale."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


def zeros_like_abstract(shapes: dict) -> dict:
    """A template for `torch_to_flax` (np.zeros is lazily allocated: free for big models)."""
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)


def check_parity(
    model: nn.Module,
    reference: torch.nn.Module,
    size: int,
    paths: Iterable[str],
    batch: int = 2,
    seed: int = 0,
) -> tuple[dict, jax.Array, jax.Array]:
    """Torch reference with random weights vs. the Flax model with those weights imported.

    Compares the logits and the outputs at module `paths` (torch name = path with dots);
    returns the imported variables, the input and the model's logits.
    """
    arch = type(model).__name__
    reference = tm.randomize_(reference, seed=seed)
    shapes, _ = abstract_init(model, size)
    variables = torch_to_flax(state_dict_copy(reference), zeros_like_abstract(shapes))

    x = np.random.default_rng(seed).standard_normal((batch, size, size, 3), np.float32)
    paths = list(paths)
    expected_logits, expected = torch_forward_with_intermediates(
        reference, x, [p.replace("/", ".") for p in paths]
    )
    with jax.default_matmul_precision("highest"):
        logits, got = forward_with_intermediates(model, variables, jnp.asarray(x), paths)
    for path in paths:
        assert path in got, f"{arch}: no module called at {path}"
        assert_close(got[path], expected[path.replace("/", ".")], f"{arch} {path}")
    assert_close(logits, expected_logits, f"{arch} logits")
    return variables, x, logits


# -- the real configurations (abstract: nothing allocated) ------------------------------


@pytest.mark.parametrize(("arch", "batch_norm"), sorted(TORCHVISION_PARAMS))
def test_real_configs(arch: str, batch_norm: bool) -> None:
    """Parameter counts, torch key mapping and alias targets of the full-size models."""
    options = {"batch_norm": True} if arch == "vgg16" and batch_norm else {}
    model = zoo.build(arch, **options)
    shapes, paths = abstract_init(model, 64)
    missing = {a: p for a, p in model.layer_aliases.items() if p not in paths}
    assert not missing, f"alias targets that are no module path: {missing}"
    n_flax = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
    assert n_flax == TORCHVISION_PARAMS[arch, batch_norm]
    # The parity oracle itself has the torchvision size (built on `meta`: no memory).
    with torch.device("meta"):
        reference = torch_reference(arch, **options)
    assert sum(p.numel() for p in reference.parameters()) == n_flax
    # Every torch key maps onto a Flax variable of the same shape and vice versa.
    zeros = {k: np.zeros(v.shape, np.float32) for k, v in reference.state_dict().items()}
    torch_to_flax(zeros, zeros_like_abstract(shapes))


# -- torch parity ---------------------------------------------------------------------------


def test_a_width_that_is_not_positive_is_refused() -> None:
    assert scale_channels(64, 0.01) == 1 and scale_channels(64, 0.5) == 32
    for width in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"^width=.*: must be > 0"):
            scale_channels(64, width)


def test_alexnet_full_width_parity() -> None:
    paths = [f"features/{i}" for i in (0, 1, 2, 4, 7, 9, 11, 12)] + ["avgpool", "classifier/5"]
    check_parity(*build_pair("alexnet"), 224, paths)


def test_alexnet_bn_no_dropout_odd_size_parity() -> None:
    # 150 px leaves 3x3 before avgpool: torch's adaptive 3 -> 6 bins, overlapping.
    model, reference = build_pair(
        "alexnet", width=0.25, batch_norm=True, dropout=False, num_classes=365
    )
    paths = [*model.layer_aliases.values(), "features/1", "avgpool", "classifier/2"]
    check_parity(model, reference, 150, paths)


def test_alexnet_takes_broden1_227_images_as_they_are_with_input_size(tmp_path) -> None:
    """NetDissect-Lite feeds broden1_227's 227 px images to AlexNet unresized: through the
    scripts' path (weights file, `cli.model_info`, a tap) `input_size=227` agrees with torch on
    the 227 px image; the model's own 224 squashes it, which conv5 does not survive."""
    reference = tm.randomize_(tm.AlexNet(num_classes=365))
    torch.save(reference.state_dict(), tmp_path / "alexnet.pth")
    loaded = model_load.load(
        "alexnet", weights=str(tmp_path / "alexnet.pth"), options={"num_classes": 365}
    )
    pixels = np.random.default_rng(0).integers(0, 256, (2, 227, 227, 3)).astype(np.float32)
    paths = {"conv1": "features.1", "conv5": "features.11"}

    def taps(input_size: int | None) -> tuple[InputSpec, dict[str, np.ndarray]]:
        info = cli.model_info(loaded, "places_lite", input_size)
        spec = info.input_spec
        tap = capture.make_tap(
            info.module, info.variables, list(paths), input_shape=(spec.size, spec.size, 3)
        )
        with jax.default_matmul_precision("highest"):
            out = jax.jit(lambda v, x: tap.fn(v, spec(x)))(tap.variables, jnp.asarray(pixels))
        return spec, {n: np.asarray(out[p]) for n, p in zip(tap.names, tap.layers, strict=True)}

    spec, got = taps(227)
    assert spec == dataclasses.replace(PLACES_LITE, size=227)
    x = (pixels * spec.scale - np.float32(spec.mean)) / np.float32(spec.std)
    _, expected = torch_forward_with_intermediates(reference, x, paths.values())
    for name, torch_name in paths.items():
        assert_close(got[name], expected[torch_name], f"alexnet {name} at 227")
    spec, squashed = taps(None)
    assert spec.size == 224 and squashed["conv1"].shape[1] == 55
    conv5, want = squashed["conv5"], expected["features.11"]
    assert conv5.shape == want.shape and np.abs(conv5 - want).max() > 0.1 * np.abs(want).max()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"^input_size={bad!r}: must be a whole number"):
            cli.model_info(loaded, "model", bad)


def test_places_lite_normalisation_is_netdissect_lites() -> None:
    """NetDissect-Lite (feature_operation.py) subtracts its BGR mean [109.5388, 118.6897,
    124.6901] from the BGR image, flips the channels back to RGB and divides by 255 * 0.224:
    `--input_norm=places_lite` computes the same numbers (to float32's rounding)."""
    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype(np.float64)
    bgr = pixels[..., ::-1] - np.array([109.5388, 118.6897, 124.6901])
    want = bgr[..., ::-1] / (255.0 * 0.224)
    got = np.asarray(dataclasses.replace(PLACES_LITE, size=5)(jnp.asarray(pixels, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("size", "options"),
    [(64, {"width": 0.125}), (100, {"width": 0.125, "batch_norm": True, "dropout": False})],
)
def test_vgg16_reduced_width_parity(size: int, options: dict) -> None:
    model, reference = build_pair("vgg16", **options)
    paths = [*model.layer_aliases.values(), "features/0", "avgpool", "classifier/4"]
    check_parity(model, reference, size, paths)


def test_resnet18_full_width_parity() -> None:
    paths = ["relu", "maxpool", "layer1/0/bn1", "layer2/0/downsample/1", "layer2/0"]
    paths += ["layer1", "layer2", "layer3", "layer4", "avgpool"]
    check_parity(*build_pair("resnet18"), 224, paths, batch=1)


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("resnet18", {"width": 0.5, "batch_norm": False, "num_classes": 365}),
        ("resnet50", {"width": 0.25}),
    ],
)
def test_resnet_reduced_parity(arch: str, options: dict) -> None:
    paths = ["layer1", "layer2/0/conv2", "layer3/1", "layer4", "layer4/0/downsample/0"]
    check_parity(*build_pair(arch, **options), 64, paths)


def _hf_resnet_names(state: dict) -> dict:
    """torchvision's ResNet state dict in Hugging Face's `ResNetForImageClassification` names
    (`resnet.embedder`, `resnet.encoder.stages.{i}.layers.{j}` with `shortcut` and `layer.{k}`,
    each a `convolution` and a `normalization`; `classifier.1`)."""
    out = {}
    for key, value in state.items():
        if m := re.fullmatch(r"(conv|bn)1\.(\w+)", key):
            part = "convolution" if m[1] == "conv" else "normalization"
            out[f"resnet.embedder.embedder.{part}.{m[2]}"] = value
        elif m := re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(\w+)", key):
            part = "convolution" if m[3] == "conv" else "normalization"
            layer = f"resnet.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}"
            out[f"{layer}.layer.{int(m[4]) - 1}.{part}.{m[5]}"] = value
        elif m := re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)", key):
            part = "convolution" if m[3] == "0" else "normalization"
            layer = f"resnet.encoder.stages.{int(m[1]) - 1}.layers.{m[2]}"
            out[f"{layer}.shortcut.{part}.{m[4]}"] = value
        else:
            out[key.replace("fc.", "classifier.1.")] = value
    return out


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_hugging_face_resnet_names_load_torchvisions_weights(tmp_path, arch: str) -> None:
    """Hugging Face's ResNet names (`microsoft/resnet-50`), basic and bottleneck blocks, give
    torchvision's weights in place through the scripts' loader (so its parity holds)."""
    reference = tm.randomize_(torch_reference(arch, width=0.25, num_classes=7))
    state = reference.state_dict()
    torch.save(state, tmp_path / "torchvision.pth")
    hf = _hf_resnet_names(state)
    assert any(".shortcut.normalization.running_var" in k for k in hf)
    torch.save(hf, tmp_path / "hf.bin")
    options = {"width": 0.25, "num_classes": 7}
    want = model_load.load(arch, weights=str(tmp_path / "torchvision.pth"), options=options)
    got = model_load.load(arch, weights=str(tmp_path / "hf.bin"), options=options)
    jax.tree.map(np.testing.assert_array_equal, got.variables, want.variables)


def caffe_resnet(reference: torch.nn.Module, stride_in_1x1: bool, caffe_maxpool: bool):
    """A torch ResNet made MSRA's Caffe variant in place: each strided Bottleneck's stride
    moved from its 3x3 conv to its first 1x1, and/or Caffe's `pool1` (3x3, stride 2, no
    padding, ceil mode) as `maxpool`. The weights' shapes stay torchvision's."""
    if stride_in_1x1:
        for block in reference.modules():
            if isinstance(block, tm.Bottleneck) and block.conv2.stride != (1, 1):
                block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
    if caffe_maxpool:
        reference.maxpool = torch.nn.MaxPool2d(3, 2, 0, ceil_mode=True)
    return reference


@pytest.mark.parametrize(
    ("arch", "stride_in_1x1", "caffe_maxpool"),
    [("resnet50", True, False), ("resnet50", True, True), ("resnet18", False, True)],
)
def test_resnet_caffe_variants_parity(arch: str, stride_in_1x1: bool, caffe_maxpool: bool):
    """MSRA's Caffe ResNets converted to torchvision's names have torchvision's shapes: the
    options compute them, checked against torch with the stride moved and Caffe's pool1.
    70 px: the stem leaves 35x35, which Caffe's pool1 takes to 17x17, torchvision's to 18x18."""
    options = {"width": 0.25} | ({"stride_in_1x1": True} if stride_in_1x1 else {})
    model = zoo.build(arch, **options, caffe_maxpool=caffe_maxpool)
    reference = caffe_resnet(torch_reference(arch, width=0.25), stride_in_1x1, caffe_maxpool)
    paths = ["maxpool", "layer1", "layer2/0/conv1", "layer2/0/conv2", "layer2", "layer4"]
    variables, x, caffe = check_parity(model, reference, 70, paths)
    # The same weights in the default model compute something else (jitted: op by op, a
    # ResNet-50's dispatch costs seconds).
    with jax.default_matmul_precision("highest"):
        default = jax.jit(zoo.build(arch, width=0.25).apply)(variables, jnp.asarray(x))
    assert np.abs(np.asarray(caffe) - np.asarray(default)).max() > 1e-2 * np.abs(caffe).max()


def test_stride_in_1x1_needs_bottlenecks() -> None:
    with pytest.raises(ValueError, match=r"^stride_in_1x1=True: only ResNet-50/101/152"):
        ResNet(BasicBlock, (1, 1, 1, 1), stride_in_1x1=True)


def test_densenet_reduced_parity() -> None:
    # DenseNet-161's code at growth 8 / stem 16 and fewer layers per block (the full
    # depth only repeats the same layer; its variables are checked by the mapping test).
    paths = [
        "features/relu0",
        "features/pool0",
        "features/denseblock1/denselayer1/conv1",
        "features/denseblock1/denselayer2/relu2",
        "features/denseblock1",
        "features/transition1",
        "features/transition3/pool",
        "features/denseblock4",
        "features",
    ]
    config = {"growth_rate": 8, "block_config": (2, 3, 4, 2), "num_init_features": 16}
    model = DenseNet(num_classes=10, **config)
    reference = tm.DenseNet(num_classes=10, **config)
    check_parity(model, reference, 64, paths)


def test_resnet_train_mode_matches_torch() -> None:
    """Batch statistics in the forward pass and the running-mean update (momentum 0.1)."""
    model = zoo.build("resnet18", width=0.25)
    reference = tm.randomize_(torch_reference("resnet18", width=0.25), seed=1)
    template = zeros_like_abstract(abstract_init(model, 64)[0])
    variables = torch_to_flax(state_dict_copy(reference), template)
    x = np.random.default_rng(1).standard_normal((4, 64, 64, 3), np.float32)

    reference.train()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    with jax.default_matmul_precision("highest"):
        train_step = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
        logits, updates = train_step(variables, jnp.asarray(x))
    assert_close(logits, expected, "train-mode logits")
    for key, stats in (("bn1", "bn1"), ("layer4.1.bn2", "layer4/1/bn2")):
        node = updates["batch_stats"]
        for part in stats.split("/"):
            node = node[part]
        assert_close(node["mean"], reference.state_dict()[f"{key}.running_mean"], key)
        # torch updates running_var with the unbiased batch variance, Flax with the biased one:
        # a factor n/(n-1) on the new part, n = B*H*W (here >= 16), hence the loose tolerance.
        np.testing.assert_allclose(
            node["var"], reference.state_dict()[f"{key}.running_var"], rtol=2e-2
        )


def test_dropout_only_in_training() -> None:
    model = zoo.build("alexnet", width=0.125)
    no_dropout = zoo.build("alexnet", width=0.125, dropout=False)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3), np.float32))

    # Random numpy weights: compiling `init`'s random number generation costs seconds here.
    variables = random_variables(model, x)

    @jax.jit
    def outputs(variables: dict, x: jax.Array) -> tuple[jax.Array, ...]:
        train = [
            model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(i)})
            for i in (1, 2)
        ]
        # Same variables fit the model without dropout: the other indices are unchanged.
        return model.apply(variables, x), *train, no_dropout.apply(variables, x, train=True)

    eval_logits, train_a, train_b, train_no_dropout = outputs(variables, x)
    assert not np.allclose(train_a, train_b)
    assert not np.allclose(train_a, eval_logits)
    np.testing.assert_allclose(train_no_dropout, eval_logits, rtol=1e-6)


# -- aliases and metadata -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "cls"),
    [("alexnet", AlexNet), ("vgg16", VGG), ("resnet18", ResNet), ("densenet161", DenseNet)],
)
def test_metadata_without_init(arch: str, cls: type) -> None:
    model = zoo.build(arch)
    assert isinstance(model, cls)
    assert model.input_spec.size == 224
    assert set(cls.default_layers) <= set(model.layer_aliases)


def test_alexnet_bn_aliases_are_module_paths() -> None:
    model = zoo.build("alexnet", width=0.125, batch_norm=True)
    _, paths = abstract_init(model, 64)
    assert set(model.layer_aliases.values()) <= paths


def test_alias_tables() -> None:
    assert zoo.build("alexnet").layer_aliases == {
        "conv1": "features/1",
        "conv2": "features/4",
        "conv3": "features/7",
        "conv4": "features/9",
        "conv5": "features/11",
    }
    assert zoo.build("alexnet", batch_norm=True).layer_aliases["conv5"] == "features/16"
    vgg = zoo.build("vgg16").layer_aliases
    assert (vgg["conv1_1"], vgg["conv5_3"]) == ("features/1", "features/29")
    assert zoo.build("vgg16", batch_norm=True).layer_aliases["conv5_3"] == "features/42"
    assert zoo.build("resnet152").layer_aliases["layer4"] == "layer4"
    assert zoo.build("densenet161").layer_aliases["denseblock4"] == "features/denseblock4"
    assert scale_channels(64, 1e-3) == 1


def test_densenet_legacy_keys_map() -> None:
    reference = tm.DenseNet(growth_rate=4, block_config=(1, 2), num_init_features=8)
    legacy = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))(\d)", r"\1.\2", k): v
        for k, v in state_dict_copy(reference).items()
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    model = DenseNet(growth_rate=4, block_config=(1, 2), num_init_features=8)
    template = zeros_like_abstract(abstract_init(model, 32)[0])
    with pytest.raises(WeightMappingError):
        torch_to_flax(legacy, template)
    torch_to_flax(legacy, template, rename=legacy_key_rename)


# -- torch-semantics building blocks (shared with the other architectures) -----------------


@pytest.mark.parametrize(
    ("flax_layer", "torch_layer"),
    [
        (MaxPool2d(3, 2, 0, ceil_mode=True), torch.nn.MaxPool2d(3, 2, 0, ceil_mode=True)),
        (MaxPool2d(3, 2, 1, ceil_mode=True), torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
        (MaxPool2d(3, 1, 1), torch.nn.MaxPool2d(3, 1, 1)),
        (AvgPool2d(3, 2, 1, ceil_mode=True), torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True)),
        (
            AvgPool2d(3, 2, 1, count_include_pad=False),
            torch.nn.AvgPool2d(3, 2, 1, count_include_pad=False),
        ),
        (AdaptiveAvgPool2d((6, 6)), torch.nn.AdaptiveAvgPool2d((6, 6))),
        (AdaptiveAvgPool2d((5, 3)), torch.nn.AdaptiveAvgPool2d((5, 3))),
    ],
)
def test_pooling_matches_torch(flax_layer: nn.Module, torch_layer: torch.nn.Module) -> None:
    # Odd sizes so that ceil_mode overhangs and adaptive bins overlap.
    x = np.random.default_rng(0).standard_normal((2, 13, 11, 3), np.float32)
    expected = torch_layer(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    got = flax_layer.apply({}, jnp.asarray(x))
    assert_close(got, expected.transpose(0, 2, 3, 1), type(flax_layer).__name__)


def test_layer_norm_is_torchs_where_a_tokens_mean_dwarfs_its_spread() -> None:
    # E[x^2] - E[x]^2 (Flax's default) is 2e-2 off torch here; the NNX twin is the same.
    x = (300 + np.random.default_rng(0).standard_normal((4, 384))).astype(np.float32)
    expected = torch.nn.functional.layer_norm(torch.from_numpy(x), (384,), eps=1e-6).numpy()
    linen = layer_norm(1e-6)
    got = np.asarray(linen.apply(linen.init(jax.random.key(0), x), x))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    twin = vit_nnx._layer_norm(384, 1e-6, nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(twin(jnp.asarray(x))), got)

"""AlexNet, VGG-16, ResNet and DenseNet-161: torch parity, parameter counts, aliases."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models import zoo
from models.alexnet import AlexNet
from models.densenet import DenseNet
from models.layers import scale_channels
from models.resnet import ResNet
from models.torch_import import torch_to_flax
from models.vgg import VGG
from tests import torch_models as tm

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

RESNET_LAYOUT = {
    "resnet18": (tm.BasicBlock, (2, 2, 2, 2)),
    "resnet34": (tm.BasicBlock, (3, 4, 6, 3)),
    "resnet50": (tm.Bottleneck, (3, 4, 6, 3)),
    "resnet101": (tm.Bottleneck, (3, 4, 23, 3)),
    "resnet152": (tm.Bottleneck, (3, 8, 36, 3)),
}


def torch_reference(arch: str, **options) -> torch.nn.Module:
    """The torch counterpart of `zoo.build(arch, **options)`."""
    if arch == "alexnet":
        return tm.AlexNet(**options)
    if arch == "vgg16":
        return tm.VGG16(**options)
    if arch in RESNET_LAYOUT:
        return tm.ResNet(*RESNET_LAYOUT[arch], **options)
    if arch == "densenet161":
        width = options.pop("width", 1.0)
        return tm.DenseNet(
            growth_rate=scale_channels(48, width),
            num_init_features=scale_channels(96, width),
            **options,
        )
    raise ValueError(arch)


def abstract_variables(model: nn.Module, size: int) -> dict:
    """Shapes of the model's variables without running its initialisers."""
    return jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    )


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

    with nn.intercept_methods(interceptor):
        logits = model.apply(variables, x, **kwargs)
    return logits, captured


def called_paths(model: nn.Module, size: int) -> set[str]:
    """Every module path the forward pass calls (traced abstractly, nothing computed)."""
    paths: set[str] = set()

    def interceptor(next_fun: Callable, args, kw, context):
        paths.add("/".join(context.module.path))
        return next_fun(*args, **kw)

    variables = abstract_variables(model, size)
    with nn.intercept_methods(interceptor):
        jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size, 3))), variables)
    return paths


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


def assert_close(actual, expected, what: str) -> None:
    """Relative 1e-4 agreement, measured against the tensor's scale."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


def check_parity(
    arch: str, size: int, paths: Iterable[str], batch: int = 2, seed: int = 0, **options
) -> None:
    """Torch reference with random weights vs. the Flax model with those weights imported."""
    model = zoo.build(arch, **options)
    reference = tm.randomize_(torch_reference(arch, **options), seed=seed)
    shapes = abstract_variables(model, size)
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    variables = torch_to_flax(reference.state_dict(), template)

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


# -- parameter counts of the real configurations -------------------------------------------


@pytest.mark.parametrize(("arch", "batch_norm"), sorted(TORCHVISION_PARAMS))
def test_param_counts_match_torchvision(arch: str, batch_norm: bool) -> None:
    options = {"batch_norm": True} if arch == "vgg16" and batch_norm else {}
    shapes = abstract_variables(zoo.build(arch, **options), 64)
    n_flax = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
    assert n_flax == TORCHVISION_PARAMS[arch, batch_norm]
    # The parity oracle itself has the torchvision size (built on `meta`: no memory).
    with torch.device("meta"):
        reference = torch_reference(arch, **options)
    assert sum(p.numel() for p in reference.parameters()) == n_flax
    # And the same variable names: every torch key maps onto a Flax variable.
    n_stats = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes.get("batch_stats", {})))
    n_torch_stats = sum(
        b.numel() for k, b in reference.named_buffers() if not k.endswith("num_batches_tracked")
    )
    assert n_stats == n_torch_stats


# -- torch parity ---------------------------------------------------------------------------


def test_alexnet_full_width_parity() -> None:
    paths = [f"features/{i}" for i in (0, 1, 2, 4, 7, 9, 11, 12)] + ["avgpool", "classifier/5"]
    check_parity("alexnet", 224, paths)


def test_alexnet_bn_no_dropout_odd_size_parity() -> None:
    # 150 px leaves 3x3 before avgpool: torch's adaptive 3 -> 6 bins, overlapping.
    model = zoo.build("alexnet", width=0.25, batch_norm=True, dropout=False, num_classes=365)
    paths = [*model.layer_aliases.values(), "features/1", "avgpool", "classifier/2"]
    check_parity("alexnet", 150, paths, width=0.25, batch_norm=True, dropout=False, num_classes=365)


@pytest.mark.parametrize(
    ("size", "options"),
    [(64, {"width": 0.125}), (100, {"width": 0.125, "batch_norm": True, "dropout": False})],
)
def test_vgg16_reduced_width_parity(size: int, options: dict) -> None:
    model = zoo.build("vgg16", **options)
    paths = [*model.layer_aliases.values(), "features/0", "avgpool", "classifier/4"]
    check_parity("vgg16", size, paths, **options)


def test_resnet18_full_width_parity() -> None:
    paths = ["relu", "maxpool", "layer1/0/bn1", "layer2/0/downsample/1", "layer2/0"]
    paths += ["layer1", "layer2", "layer3", "layer4", "avgpool"]
    check_parity("resnet18", 224, paths, batch=1)


@pytest.mark.parametrize(
    ("arch", "options"),
    [
        ("resnet18", {"width": 0.5, "batch_norm": False, "num_classes": 365}),
        ("resnet50", {"width": 0.25}),
        ("resnet152", {"width": 0.0625}),
    ],
)
def test_resnet_reduced_parity(arch: str, options: dict) -> None:
    paths = ["layer1", "layer2/0/conv2", "layer3/1", "layer4", "layer4/0/downsample/0"]
    check_parity(arch, 64, paths, **options)


def test_densenet161_reduced_width_parity() -> None:
    # Full depth (6, 12, 36, 24) at growth 8 / stem 16.
    paths = [
        "features/relu0",
        "features/pool0",
        "features/denseblock1/denselayer1/conv1",
        "features/denseblock1",
        "features/transition1",
        "features/transition3/pool",
        "features/denseblock4",
        "features",
    ]
    check_parity("densenet161", 64, paths, width=1 / 6)


def test_resnet_train_mode_matches_torch() -> None:
    """Batch statistics in the forward pass and the running-mean update (momentum 0.1)."""
    model = zoo.build("resnet18", width=0.25)
    reference = tm.randomize_(torch_reference("resnet18", width=0.25), seed=1)
    template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_variables(model, 64))
    variables = torch_to_flax(reference.state_dict(), template)
    x = np.random.default_rng(1).standard_normal((4, 64, 64, 3), np.float32)

    reference.train()
    with torch.no_grad():
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    with jax.default_matmul_precision("highest"):
        logits, updates = model.apply(
            variables, jnp.asarray(x), train=True, mutable=["batch_stats"]
        )
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
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3), np.float32))
    variables = model.init(jax.random.key(0), x)
    eval_a = model.apply(variables, x)
    np.testing.assert_array_equal(eval_a, model.apply(variables, x, train=False))
    train_a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train_a, train_b)
    no_dropout = zoo.build("alexnet", width=0.125, dropout=False)
    np.testing.assert_array_equal(
        no_dropout.apply(variables, x, train=True), eval_a
    )  # same variables: dropout removal keeps the indices


# -- aliases and metadata -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "options", "cls"),
    [
        ("alexnet", {"width": 0.125}, AlexNet),
        ("alexnet", {"width": 0.125, "batch_norm": True}, AlexNet),
        ("vgg16", {"width": 0.125}, VGG),
        ("vgg16", {"width": 0.125, "batch_norm": True}, VGG),
        ("resnet50", {"width": 0.125}, ResNet),
        ("densenet161", {"width": 0.125}, DenseNet),
    ],
)
def test_aliases_are_module_paths(arch: str, options: dict, cls: type) -> None:
    model = zoo.build(arch, **options)
    assert isinstance(model, cls)
    assert model.input_spec.size == 224
    assert set(cls.default_layers) <= set(model.layer_aliases)  # no init needed
    paths = called_paths(model, 64)
    missing = {a: p for a, p in model.layer_aliases.items() if p not in paths}
    assert not missing


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

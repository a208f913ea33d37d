"""Activation capture: Linen by path, NNX, dict-returning functions, errors."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdissect import capture
from jaxdissect.models.load import init_variables


class ReLU(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.relu(x)


class Block(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, (3, 3), name="conv")(x)
        return ReLU(name="relu")(x)


class Net(nn.Module):
    layer_aliases = {"top": "block2/relu"}

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = Block(4, name="block1")(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = Block(6, name="block2")(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(3, name="head")(x)


class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        conv = nn.Conv(3, (1, 1), name="twice")
        return conv(conv(x))


@pytest.fixture(scope="module")
def linen_setup():
    model = Net()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = init_variables(model, x, seed=1)
    return model, variables, x


def _reference_intermediates(model, variables, x):
    """Linen's own capture_intermediates: an independent mechanism."""
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    flat = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if k == "__call__":
                flat[prefix] = v[0]
            else:
                walk(v, f"{prefix}/{k}" if prefix else k)

    walk(state["intermediates"], "")
    return flat


def test_linen_paths_match_linen_capture_intermediates(linen_setup):
    model, variables, x = linen_setup
    tap = capture.make_tap(
        model, variables, ["block1/conv", "block1.relu", "top", "head"], input_shape=(8, 8, 3)
    )
    assert tap.layers == ("block1/conv", "block1/relu", "block2/relu", "head")
    out = jax.jit(tap.fn)(tap.variables, x)
    ref = _reference_intermediates(model, variables, x)
    for layer in ("block1/conv", "block1/relu", "block2/relu"):
        np.testing.assert_array_equal(np.asarray(out[layer]), np.asarray(ref[layer]))
    # A dense layer is a 1x1 map per unit.
    assert out["head"].shape == (2, 1, 1, 3)
    # Within 1 ulp: the jitted program may split the dense dot product differently from
    # the eager reference (seen on a loaded 2-core machine).
    np.testing.assert_allclose(
        np.asarray(out["head"][:, 0, 0]), np.asarray(ref["head"]), rtol=3e-7, atol=1e-7
    )
    assert tap.shapes == {
        "block1/conv": (8, 8, 4),
        "block1/relu": (8, 8, 4),
        "block2/relu": (4, 4, 6),
        "head": (1, 1, 3),
    }


def test_pre_and_post_activation_differ(linen_setup):
    model, variables, x = linen_setup
    tap = capture.make_tap(model, variables, "block1/conv,block1/relu", input_shape=(8, 8, 3))
    out = tap.fn(tap.variables, x)
    pre, post = np.asarray(out["block1/conv"]), np.asarray(out["block1/relu"])
    assert (pre < 0).any()
    np.testing.assert_array_equal(post, np.maximum(pre, 0))


def test_regex_selects_in_model_order(linen_setup):
    model, variables, _ = linen_setup
    tap = capture.make_tap(model, variables, "re:block\\d/relu", input_shape=(8, 8, 3))
    assert tap.layers == ("block1/relu", "block2/relu")


def test_the_models_own_output_is_no_layer(linen_setup):
    """`re:.*` matches every layer but not the model's output (path ""); a name that comes to
    the empty path (`.`, `..`) is refused, naming it."""
    model, variables, _ = linen_setup
    tap = capture.make_tap(model, variables, "re:.*", input_shape=(8, 8, 3))
    assert "" not in tap.layers and {"block1/conv", "head"} <= set(tap.layers)
    # A module whose own name has dots is found by it.
    assert capture.resolve_named_layers([".."], {"": (7,), "..": (4, 4, 2)}) == ((("..", "..")),)
    for name in (".", ".."):
        with pytest.raises(
            capture.LayerNotFoundError,
            match=f"layer '{re.escape(name)}' names the model's own output, not one of its layers",
        ):
            capture.make_tap(model, variables, name, input_shape=(8, 8, 3))


def test_missing_layer_lists_available(linen_setup):
    model, variables, _ = linen_setup
    with pytest.raises(capture.LayerNotFoundError) as e:
        capture.make_tap(model, variables, "layer4", input_shape=(8, 8, 3))
    msg = str(e.value)
    assert msg.startswith("layers=layer4: no such layer in the model; ")
    for path in ("block1/conv", "block2/relu", "head"):
        assert path in msg
    assert "top -> block2/relu" in msg
    with pytest.raises(capture.LayerNotFoundError, match=r"^layers=re:nothing\.\*: the pattern "):
        capture.make_tap(model, variables, "re:nothing.*", input_shape=(8, 8, 3))
    with pytest.raises(ValueError, match=r"input_shape=\(8, 8\): one example's \(height, "):
        capture.make_tap(model, variables, "top", input_shape=(8, 8))


def test_available_layers(linen_setup):
    model, variables, _ = linen_setup
    layers = capture.available_layers(model, variables, input_shape=(8, 8, 3))
    assert layers["block2/conv"] == (4, 4, 6)
    assert layers["head"] == (3,)


def test_module_called_twice_is_refused():
    model = Shared()
    variables = init_variables(model, jnp.ones((1, 4, 4, 3)), seed=0)
    with pytest.raises(capture.LayerNotFoundError, match="^layers=twice: .*called more than once"):
        capture.make_tap(model, variables, "twice", input_shape=(4, 4, 3))


class TanhConv(nn.Conv):
    """A subclass whose `__call__` wraps its parent's: Linen intercepts both."""

    def __call__(self, x):
        return jnp.tanh(super().__call__(x))


class Subclassed(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(2, (1, 1), name="after")(TanhConv(3, (1, 1), name="tanh")(x))


def test_a_subclass_calling_its_parents_call_is_one_call_its_own_output():
    """It was refused as called twice; its output is the subclass's (after the tanh)."""
    model = Subclassed()
    x = 3 * jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    variables = init_variables(model, x, seed=0)
    tap = capture.make_tap(model, variables, "tanh", input_shape=(4, 4, 3))
    conv = nn.Conv(3, (1, 1)).apply({"params": variables["params"]["tanh"]}, x)
    np.testing.assert_allclose(tap.fn(tap.variables, x)["tanh"], jnp.tanh(conv), atol=1e-6)


class Lifted(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), name="before")(x)
        x = nn.remat(nn.Conv)(4, (3, 3), name="remat")(x)
        vmapped = nn.vmap(nn.Conv, variable_axes={"params": None}, split_rngs={"params": False})
        return nn.Conv(2, (1, 1), name="after")(vmapped(4, (3, 3), name="vmap")(x))


def test_modules_inside_lifted_transforms_are_refused_in_one_line():
    """Their values live in the transform's own trace (capturing them failed inside jit
    with an UnexpectedTracerError); the modules around them are captured."""
    model = Lifted()
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    variables = init_variables(model, x, seed=0)
    for layer, transform in (("remat", "remat(remat)"), ("vmap", "vmap(vmap)")):
        with pytest.raises(capture.LayerNotFoundError, match=re.escape(f"({transform})")):
            capture.make_tap(model, variables, layer, input_shape=(8, 8, 3))
    tap = capture.make_tap(model, variables, ["before", "after"], input_shape=(8, 8, 3))
    got = jax.jit(tap.fn)(tap.variables, x)
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    want = state["intermediates"]["after"]["__call__"][0]
    np.testing.assert_allclose(got["after"], want, rtol=1e-6, atol=1e-6)


class TrainMode(nn.Module):
    @nn.compact
    def __call__(self, x, scale):
        return nn.BatchNorm(use_running_average=False, name="bn")(nn.Conv(4, (1, 1))(x) * scale)


def test_a_model_that_cannot_run_as_dissected_is_one_line_with_the_fix():
    model = TrainMode()
    x = jnp.ones((1, 4, 4, 3))
    variables = model.init(jax.random.key(0), x, 1.0)
    with pytest.raises(
        ValueError,
        match=r"^model: it fails on a batch of one 4x4x3 image "
        r"\(TypeError: .*'scale'\); .*apply_kwargs$",
    ):
        capture.make_tap(model, variables, "bn", input_shape=(4, 4, 3))
    with pytest.raises(
        ValueError,
        match=r"\(ModifyScopeVariableError: [^(]*\); .*"
        "use_running_average=True",
    ):
        capture.make_tap(model, variables, "bn", input_shape=(4, 4, 3), apply_kwargs={"scale": 1.0})


class EvalBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.BatchNorm(use_running_average=True, name="bn")(nn.Conv(4, (1, 1))(x))


def test_variables_without_the_batch_stats_name_the_missing_collection():
    """Only the params of a model with BatchNorm (an optimiser state's): the hint said the
    variables must be a dict of collections, e.g. {'params': params}, which they were."""
    model = EvalBatchNorm()
    variables = model.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))
    with pytest.raises(ValueError, match=r"no 'batch_stats' collection: pass all that model"):
        capture.make_tap(model, {"params": variables["params"]}, "bn", input_shape=(4, 4, 3))
    with pytest.raises(ValueError, match=r"must be a dict of collections, e.g. \{'params'"):
        capture.make_tap(model, variables["params"], "bn", input_shape=(4, 4, 3))


class UnsetAttention(nn.Module):
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x):
        tokens = x.reshape(x.shape[0], -1, x.shape[-1])
        attend = nn.MultiHeadDotProductAttention(1, dropout_rate=0.1, name="att")
        return attend(tokens, deterministic=self.deterministic)


def test_a_module_whose_eval_mode_is_given_nowhere_is_one_line_with_the_fix():
    """Attention dropout (or BatchNorm) whose `deterministic` (`use_running_average`) no
    one sets: Flax's ValueError alone came out, saying neither the model nor the fix."""
    model = UnsetAttention()
    variables = UnsetAttention(True).init(jax.random.key(0), jnp.ones((1, 2, 2, 3)))
    with pytest.raises(
        ValueError,
        match=r"^model: it fails on a batch of one 2x2x3 image \(ValueError: Parameter "
        r'"deterministic" .*\); deterministic is set neither .* deterministic=True \(eval',
    ):
        capture.make_tap(model, variables, "att", input_shape=(2, 2, 3), token_layout="2x2")


class Pair(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(2, (1, 1), name="a")(x), x


class PairNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Pair(name="pair")(x)[0]


def test_a_module_returning_no_array_is_named_not_missing():
    model = PairNet()
    variables = init_variables(model, jnp.ones((1, 4, 4, 3)), seed=0)
    with pytest.raises(capture.LayerNotFoundError, match="^module 'pair' returns a tuple, not an"):
        capture.make_tap(model, variables, "pair", input_shape=(4, 4, 3))
    assert capture.make_tap(model, variables, "pair.a", input_shape=(4, 4, 3)).layers == ("pair/a",)


class ChannelsFirst(nn.Module):
    """A torch-style model: its convolution's output transposed to [B, C, h, w]."""

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(8, (3, 3), strides=2, name="conv")(x)
        return ReLU(name="nchw")(y.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("size", [(32, 32), (32, 48), (40, 24)])
def test_a_channels_first_output_is_flagged_and_channels_last_is_not(size, caplog):
    model = ChannelsFirst()
    shape = (*size, 3)
    variables = init_variables(model, jnp.ones((1, *shape)), seed=0)
    with caplog.at_level("WARNING"):
        tap = capture.make_tap(model, variables, ["conv", "nchw"], input_shape=shape)
    h, w = size[0] // 2, size[1] // 2
    assert tap.shapes == {"conv": (h, w, 8), "nchw": (8, h, w)}
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [
        f"layer nchw: output [B, 8, {h}, {w}] is read as channels last ({w} units of 8x{h} "
        "maps), but it looks channels first ([B, C, h, w]); transpose it to [B, h, w, C] in "
        "the model if so"
    ]


class NnxNet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.blocks = nnx.List([nnx.Conv(4, 4, (1, 1), rngs=rngs) for _ in range(2)])

    def __call__(self, x):
        x = nnx.relu(self.conv1(x))
        for block in self.blocks:
            x = block(x)
        return x


def test_nnx_capture_matches_manual_forward():
    model = NnxNet(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
    tap = capture.make_tap(model, None, ["conv1", "blocks.1"], input_shape=(6, 6, 3))
    out = jax.jit(tap.fn)(tap.variables, x)
    h = model.conv1(x)
    np.testing.assert_allclose(np.asarray(out["conv1"]), np.asarray(h), rtol=1e-6)
    h = model.blocks[1](model.blocks[0](jax.nn.relu(h)))
    np.testing.assert_allclose(np.asarray(out["blocks/1"]), np.asarray(h), rtol=1e-6)
    with pytest.raises(capture.LayerNotFoundError, match="blocks/0"):
        capture.make_tap(model, None, "blocks/7", input_shape=(6, 6, 3))


class NnxNorm(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(4, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x):
        return self.drop(self.bn(self.conv(x)))


def test_an_nnx_module_in_training_mode_is_refused():
    """BatchNorm's batch statistics would make a unit's map depend on its batch: one line
    until `model.eval()`; then the running averages are what is captured."""
    model = NnxNorm(nnx.Rngs(0))
    model.bn.mean[...] = jnp.arange(4.0)
    with pytest.raises(
        ValueError,
        match=r"^model: the NNX module is in training mode \(bn: "
        r"BatchNorm\); call model.eval\(\) first$",
    ):
        capture.make_tap(model, None, ["bn"], input_shape=(6, 6, 3))
    model.bn.use_running_average = True  # BatchNorm alone in eval mode: Dropout remains
    with pytest.raises(ValueError, match=r"\(drop: Dropout\)"):
        capture.make_tap(model, None, ["bn"], input_shape=(6, 6, 3))
    model.eval()
    tap = capture.make_tap(model, None, ["bn"], input_shape=(6, 6, 3))
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
    np.testing.assert_allclose(
        np.asarray(tap.fn(tap.variables, x)["bn"]), np.asarray(model.bn(model.conv(x))), rtol=1e-6
    )


class NnxAttention(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, deterministic: bool | None):
        self.proj = nnx.Linear(3, 4, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            2, 4, dropout_rate=0.5, deterministic=deterministic, decode=False, rngs=rngs
        )

    def __call__(self, x):
        t = self.proj(x).reshape(x.shape[0], -1, 4)
        return self.attn(t, deterministic=True if self.attn.deterministic is None else None)


def test_an_nnx_attention_dropping_out_is_refused_as_training_mode():
    """Its dropout ran (one mask, the same every batch) with no word; one that its caller
    runs deterministic (the attribute None) is dissected."""
    model = NnxAttention(nnx.Rngs(0), deterministic=False)
    with pytest.raises(ValueError, match=r"training mode \(attn: MultiHeadAttention\)"):
        capture.make_tap(model, None, ["attn"], input_shape=(2, 2, 3))
    model.eval()
    x = jax.random.normal(jax.random.key(2), (2, 2, 2, 3))
    tap = capture.make_tap(model, None, ["attn"], input_shape=(2, 2, 3))
    np.testing.assert_allclose(
        tap.fn(tap.variables, x)["attn"], model(x).reshape(2, 2, 2, 4), rtol=1e-6
    )
    called = NnxAttention(nnx.Rngs(0), deterministic=None)
    assert capture.make_tap(called, None, ["attn"], input_shape=(2, 2, 3)).shapes


def test_dict_returning_function():
    w = jnp.arange(12.0).reshape(3, 4)

    def fn(params, images):
        feats = jnp.einsum("bhwc,cd->bhwd", images, params)
        return feats.sum(), {"stem": {"feats": feats}, "pooled": feats.mean((1, 2))}

    x = jnp.ones((2, 5, 5, 3))
    tap = capture.make_tap(fn, w, ["stem/feats", "pooled"], input_shape=(5, 5, 3))
    out = tap.fn(tap.variables, x)
    np.testing.assert_array_equal(
        np.asarray(out["stem/feats"]), np.full((2, 5, 5, 4), [12, 15, 18, 21])
    )
    assert out["pooled"].shape == (2, 1, 1, 4)
    with pytest.raises(capture.LayerNotFoundError, match="stem/feats"):
        capture.make_tap(fn, w, "stem", input_shape=(5, 5, 3))


def test_a_function_returning_a_list_of_maps_names_each():
    """A list in the returned dict (the maps of a function's stages) is `blocks/0`,
    `blocks/1`, ... (it was one layer `blocks` that returned a list, and the error told to
    name one of the function's "submodules")."""

    def fn(params, images):
        return {"blocks": [images * params, images + params], "top": (images,)}

    tap = capture.make_tap(fn, 2.0, ["blocks/1", "top/0"], input_shape=(4, 4, 3))
    out = tap.fn(tap.variables, jnp.ones((1, 4, 4, 3)))
    assert float(out["blocks/1"][0, 0, 0, 0]) == 3.0 and out["top/0"].shape == (1, 4, 4, 3)
    with pytest.raises(capture.LayerNotFoundError, match=r"no such layer.*\n  blocks/0  \["):
        capture.make_tap(fn, 2.0, "blocks", input_shape=(4, 4, 3))


def test_tap_keeps_the_names_asked_for(linen_setup):
    model, variables, _ = linen_setup
    tap = capture.make_tap(
        model,
        variables,
        ["top", "block1.conv", "re:block1/r.*", "re:block2/relu"],
        input_shape=(8, 8, 3),
    )
    assert tap.layers == ("block2/relu", "block1/conv", "block1/relu")
    # What was typed; a pattern's match by its path; a module matched twice: its first name.
    assert tap.names == ("top", "block1.conv", "block1/relu")
    assert tap.name_of("block2/relu") == "top"
    assert set(tap.fn(variables, jnp.ones((1, 8, 8, 3)))) == set(tap.layers)


def test_one_name_for_two_modules_is_refused():
    available = {"head": (3,), "_head_act": (4, 4, 8)}
    with pytest.raises(capture.LayerNotFoundError, match="'head' means two modules"):
        capture.resolve_named_layers(["head", "re:head"], available, {"head": "_head_act"})


def test_a_missing_layer_names_the_flag_and_lists_a_few_layers():
    """The first line says `layers=NAME` (scripts write it --layers= or --layer=); the
    list stops after `LISTED_LAYERS` layers with how many more (a ResNet listed ~70)."""
    from absl import flags

    from jaxdissect import cli

    available = {f"block{i}": (4, 4, 8) for i in range(30)}
    with pytest.raises(capture.LayerNotFoundError) as e:
        capture.resolve_layers("block99", available, {"top": "block29"})
    lines = str(e.value).splitlines()
    assert lines[0] == "layers=block99: no such layer in the model; its layers (path  " + (
        "[per-call output shape]):"
    )
    assert len(lines) == 1 + capture.LISTED_LAYERS + 2 and lines[-1] == "aliases: top -> block29"
    assert lines[-2].startswith("  ... 10 more (a layer re:REGEX matches their paths")
    for flag in ("layers", "layer"):
        fv = flags.FlagValues()
        flags.DEFINE_string(flag, None, "", flag_values=fv)
        assert cli.flag_message(lines[0], fv).startswith(f"--{flag}=block99: no such layer")


def test_a_module_named_twice_is_refused_naming_both():
    """`--layers=conv1,features/1` (an alias and its path) or a name repeated: one line
    naming both spellings (the second was dropped silently)."""
    available = {"features/1": (4, 4, 8), "features/2": (4, 4, 8)}
    aliases = {"conv1": "features/1"}
    for requested, message in [
        (["conv1", "features/1"], "layers=conv1 and features/1 name one module (features/1)"),
        (["features.1", "conv1"], "layers=features.1 and conv1 name one module (features/1)"),
        (["conv1", "conv1"], "layers=conv1 and conv1 name one module"),
    ]:
        with pytest.raises(capture.LayerNotFoundError, match=f"^{re.escape(message)}"):
            capture.resolve_named_layers(requested, available, aliases)
    assert capture.resolve_layers(["conv1", "re:features/.*"], available, aliases) == (
        "features/1",
        "features/2",
    )


class Shrinking(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), padding="VALID", name="conv1")(x)
        return nn.Conv(5, (5, 5), padding="VALID", name="conv2")(x)


def test_a_layer_with_empty_maps_at_the_input_size_is_refused_naming_both():
    """An input too small for a layer (e.g. --input_size=8 for AlexNet's conv5) leaves it no
    pixels: refused when the tap is made, naming the layer and the input size as flags (it
    failed after pass 1 on a quantile of no values)."""
    from absl import flags

    from jaxdissect import cli

    model = Shrinking()
    variables = init_variables(model, jnp.zeros((1, 6, 6, 3)), seed=0)
    assert capture.make_tap(model, variables, "conv1", input_shape=(6, 6, 3)).shapes == {
        "conv1": (4, 4, 4)
    }
    with pytest.raises(ValueError) as e:
        capture.make_tap(model, variables, ["conv1", "conv2"], input_shape=(6, 6, 3))
    message = str(e.value)
    assert message.startswith("layers=conv2: its maps are 0x0 (5 units) at an input of 6x6")
    fv = flags.FlagValues()
    flags.DEFINE_list("layers", [], "", flag_values=fv)
    flags.DEFINE_integer("input_size", None, "", flag_values=fv)
    fv["input_size"].field_name = "input_size"
    assert cli.flag_message(message, fv).startswith("--layers=conv2: its maps are 0x0")
    assert "or a larger input (--input_size=6 now)" in cli.flag_message(message, fv)


class Windowed(nn.Module):
    """Swin-style: `attn` runs on the 4 windows of each image's 8x8 map, [4 B, 16, C]."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (1, 1), name="embed")(x)
        b = x.shape[0]
        w = x.reshape(b, 2, 4, 2, 4, 4).transpose(0, 1, 3, 2, 4, 5).reshape(b * 4, 16, 4)
        w = nn.Dense(4, name="attn")(w)
        return w.reshape(b, 2, 2, 4, 4, 4).transpose(0, 1, 3, 2, 4, 5).reshape(b, 8, 8, 4)


class ScannedBlocks(nnx.Module):
    """Three blocks stacked by nnx.vmap and run by nnx.scan: their outputs are [3, B, ...]."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Linear(3, 4, rngs=rngs)

        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def blocks(rngs):
            return nnx.Linear(4, 4, rngs=rngs)

        self.blocks = blocks(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return block(x)

        return body(self.embed(x), self.blocks)


def test_an_output_that_does_not_lead_with_the_batch_is_refused_naming_the_layer():
    """Windows of the images were read as 4 images each (a batch of 3 gave 12 maps, and
    the dissection failed in the activation cache with a broadcast error)."""
    model = Windowed()
    variables = init_variables(model, jnp.ones((1, 8, 8, 3)), seed=0)
    with pytest.raises(capture.LayerNotFoundError, match=r"^layers=attn: its output \[4, 16, 4\]"):
        capture.make_tap(model, variables, "attn", input_shape=(8, 8, 3))
    tap = capture.make_tap(model, variables, "embed", input_shape=(8, 8, 3))
    assert tap.fn(tap.variables, jnp.ones((3, 8, 8, 3)))["embed"].shape == (3, 8, 8, 4)
    net = ScannedBlocks(nnx.Rngs(0))
    with pytest.raises(capture.LayerNotFoundError, match=r"layers=blocks: .*\[3, 1, 5, 5, 4\]"):
        capture.make_tap(net, None, "blocks", input_shape=(5, 5, 3))

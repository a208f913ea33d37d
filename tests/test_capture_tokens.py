"""Token layouts: [B, tokens, C] outputs read as [B, h, w, C] patch maps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdissect import capture, token_layouts
from jaxdissect.capture import TokenLayout
from jaxdissect.models import vit
from tests.model_testing import random_variables


class Tokens(nn.Module):
    """Patch embedding, then `prefix` learned tokens before and `suffix` after the patches."""

    patch: int = 4
    prefix: int = 1
    suffix: int = 0
    declare_patch: bool = True

    @property
    def patch_size(self):
        return (self.patch, self.patch) if self.declare_patch else None

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(6, (self.patch, self.patch), strides=self.patch, name="embed")(x)
        b, h, w, c = y.shape
        t = y.reshape(b, h * w, c)
        pre = jnp.tile(
            self.param("pre", nn.initializers.normal(1.0), (1, self.prefix, c)), (b, 1, 1)
        )
        post = jnp.tile(
            self.param("post", nn.initializers.normal(1.0), (1, self.suffix, c)), (b, 1, 1)
        )
        t = Identity(name="tokens")(jnp.concatenate([pre, t, post], axis=1))
        return nn.Dense(5, name="mix")(t)


# A tiny ViT: 8 px patches (a 4x4 grid at 32 px), 1 block of width 8.
TINY_VIT = dict(width=8, depth=1, mlp_dim=16, num_heads=2, patch_size=8, image_size=32)


class Identity(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x


def _normal(shape, seed=0) -> np.ndarray:
    """Standard normal inputs from numpy: jax.random compiles a program per shape."""
    return np.random.default_rng(seed).standard_normal(shape, np.float32)


def _setup(shape, **kw):
    model = Tokens(**kw)
    x = _normal((2, *shape))
    variables = random_variables(model, x, seed=1)
    conv = nn.Conv(6, (model.patch, model.patch), strides=model.patch)
    grid = conv.apply({"params": variables["params"]["embed"]}, x)  # the planted patch map
    return model, variables, x, np.asarray(grid)


def _reference_map(tokens: np.ndarray, prefix: int, h: int, w: int) -> np.ndarray:
    """Slow reference: token prefix + i*w + j is position (i, j)."""
    b, _, c = tokens.shape
    out = np.zeros((b, h, w, c), tokens.dtype)
    for i in range(h):
        for j in range(w):
            out[:, i, j] = tokens[:, prefix + i * w + j]
    return out


@pytest.mark.parametrize(
    "shape,prefix,suffix,declare",
    [
        ((16, 16, 3), 0, 0, True),  # no class token
        ((16, 16, 3), 1, 0, True),  # class token
        ((8, 20, 3), 1, 0, True),  # non-square input
        ((16, 16, 3), 1, 0, False),  # inferred from the token count alone
        ((8, 20, 3), 0, 0, False),  # non-square, count alone
    ],
)
def test_inferred_layout_gives_the_patch_grid(shape, prefix, suffix, declare):
    model, variables, x, grid = _setup(shape, prefix=prefix, suffix=suffix, declare_patch=declare)
    tap = capture.make_tap(model, variables, ["tokens", "mix"], input_shape=shape)
    out = jax.jit(tap.fn)(tap.variables, x)
    h, w = shape[0] // 4, shape[1] // 4
    assert tap.shapes == {"tokens": (h, w, 6), "mix": (h, w, 5)}
    # Planted: the patch tokens at (i, j) are the patch embedding's output at (i, j).
    np.testing.assert_array_equal(np.asarray(out["tokens"]), grid)
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    mix = np.asarray(state["intermediates"]["mix"]["__call__"][0])
    np.testing.assert_allclose(
        np.asarray(out["mix"]), _reference_map(mix, prefix, h, w), rtol=1e-6, atol=1e-6
    )


def test_named_layout_with_suffix_registers():
    model, variables, x, grid = _setup((16, 16, 3), prefix=1, suffix=3)
    # Inference cannot tell registers after the patches from ones before: named.
    tap = capture.make_tap(
        model, variables, ["tokens"], input_shape=(16, 16, 3), token_layout="1+4x4+3"
    )
    np.testing.assert_array_equal(np.asarray(tap.fn(tap.variables, x)["tokens"]), grid)
    by_layer = capture.make_tap(
        model,
        variables,
        ["tokens", "embed"],
        input_shape=(16, 16, 3),
        token_layout={"tokens": TokenLayout((4, 4), prefix=1, suffix=3)},
    )
    out = by_layer.fn(by_layer.variables, x)
    np.testing.assert_array_equal(np.asarray(out["tokens"]), grid)
    np.testing.assert_array_equal(np.asarray(out["embed"]), grid)  # a conv map is unchanged


def test_model_declared_layout_wins_over_inference():
    class Declared(Tokens):
        def token_layout(self, input_shape):
            return TokenLayout((input_shape[0] // 4, input_shape[1] // 4), prefix=1, suffix=2)

    model = Declared(prefix=1, suffix=2)
    x = _normal((1, 16, 16, 3))
    variables = random_variables(model, x, seed=1)
    tap = capture.make_tap(model, variables, ["tokens"], input_shape=(16, 16, 3))
    grid = nn.Conv(6, (4, 4), strides=4).apply({"params": variables["params"]["embed"]}, x)
    np.testing.assert_array_equal(np.asarray(tap.fn(variables, x)["tokens"]), np.asarray(grid))


def test_a_declared_layout_may_be_its_text_and_must_be_a_layout():
    class AsText(Tokens):
        def token_layout(self, input_shape):
            return f"1+{input_shape[0] // 4}x{input_shape[1] // 4}+2"

    class Wrong(Tokens):
        def token_layout(self, input_shape):
            return 17

    class Attribute(Tokens):
        token_layout = "1+4x4+2"

    x = _normal((1, 16, 16, 3))
    model = AsText(prefix=1, suffix=2)
    variables = random_variables(model, x, seed=1)
    tap = capture.make_tap(model, variables, ["tokens"], input_shape=(16, 16, 3))
    assert tap.token_layouts == {"tokens": TokenLayout((4, 4), prefix=1, suffix=2)}
    tap = capture.make_tap(
        Attribute(prefix=1, suffix=2), variables, ["tokens"], input_shape=(16, 16, 3)
    )
    assert tap.token_layouts == {"tokens": TokenLayout((4, 4), prefix=1, suffix=2)}
    with pytest.raises(capture.LayerNotFoundError, match=r"token_layout\(\(16, 16, 3\)\) gave 17"):
        capture.make_tap(Wrong(prefix=1, suffix=2), variables, ["tokens"], input_shape=(16, 16, 3))


def test_a_named_layout_must_agree_with_what_the_model_declares(caplog):
    """A named layout of the model's own token count that differs from its declared layout,
    or whose grid is not its patch size's, is refused; each layout read is logged and kept
    in `Tap.token_layouts`, with where it came from."""
    model = vit.ViT(**{**TINY_VIT, "pool_type": "tok"})  # a class token, 4x4 patches at 32 px
    x = jnp.zeros((1, 32, 32, 3))
    variables = random_variables(model, x, seed=0)
    assert model.token_layout((32, 32, 3)) == TokenLayout((4, 4), prefix=1)
    with caplog.at_level("INFO"):
        tap = capture.make_tap(model, variables, ["block0", "mlp0"], input_shape=(32, 32, 3))
    assert {str(v) for v in tap.token_layouts.values()} == {"1+4x4"} and len(tap.token_layouts) == 2
    assert "layer block0: its 17 tokens read as 1+4x4 (the model's token_layout)" in caplog.text
    for layout, message in [
        (
            "4x4+1",
            r"'block0': token_layout='4x4\+1' contradicts the model's own layout '1\+4x4'",
        ),
        (
            "1+2x8",
            r"'block0': token_layout='1\+2x8' contradicts the model's own layout '1\+4x4'",
        ),
    ]:
        with pytest.raises(capture.LayerNotFoundError, match=message):
            capture.make_tap(
                model, variables, ["block0"], input_shape=(32, 32, 3), token_layout=layout
            )
    # Declaring only a patch size: the grid is checked, the extra tokens' places are not.
    plain, plain_vars, _, _ = _setup((16, 16, 3), prefix=1, suffix=0)
    with caplog.at_level("INFO"):
        tap = capture.make_tap(plain, plain_vars, ["tokens"], input_shape=(16, 16, 3))
    assert "its 17 tokens read as 1+4x4 (inferred from the model's patch_size: the extra " in (
        caplog.text
    )  # a warning: a class token after the patches would need token_layout='4x4+1'
    assert any(r.levelname == "WARNING" and "extra token" in r.getMessage() for r in caplog.records)
    with pytest.raises(capture.LayerNotFoundError, match="has a 2x8 grid"):
        capture.make_tap(
            plain, plain_vars, ["tokens"], input_shape=(16, 16, 3), token_layout="1+2x8"
        )


def test_random_tokens_match_the_reference():
    rng = np.random.default_rng(0)
    for prefix, h, w in [(0, 3, 5), (1, 7, 7), (4, 2, 9)]:
        t = rng.normal(size=(3, prefix + h * w + 2, 4)).astype(np.float32)
        got = TokenLayout((h, w), prefix, 2).to_nhwc(jnp.asarray(t))
        np.testing.assert_array_equal(np.asarray(got), _reference_map(t, prefix, h, w))


def test_parse_and_text():
    assert TokenLayout.parse("14x14") == TokenLayout((14, 14))
    assert TokenLayout.parse("1+14x14") == TokenLayout((14, 14), prefix=1)
    assert TokenLayout.parse(" 1 + 16x12 + 4 ") == TokenLayout((16, 12), 1, 4)
    assert str(TokenLayout((16, 12), 1, 4)) == "1+16x12+4"
    assert TokenLayout.parse(str(TokenLayout((3, 2), 5))).tokens == 11
    with pytest.raises(ValueError, match="token_layout='14\\*14': expected"):
        TokenLayout.parse("14*14")
    with pytest.raises(ValueError, match="token_layout="):
        TokenLayout((0, 3))


def test_token_counts_that_fit_no_grid_are_refused():
    # 8x20 input, no patch size: 5..0 patch tokens make no 2:5 grid.
    with pytest.raises(capture.LayerNotFoundError, match="'t' has 5 tokens, which fit no patch"):
        token_layouts.infer_token_layout("t", 5, (8, 20, 3))
    # The fewest extra tokens win: 50 tokens of a square input are 1 + 7x7.
    assert token_layouts.infer_token_layout("t", 50, (8, 8, 3)) == TokenLayout((7, 7), prefix=1)
    with pytest.raises(capture.LayerNotFoundError, match="fewer than the 4x4 patches"):
        token_layouts.infer_token_layout("t", 10, (16, 16, 3), patch_size=4)
    model, variables, _, _ = _setup((16, 16, 3), prefix=1)
    with pytest.raises(
        capture.LayerNotFoundError, match="'tokens' has 17 tokens, token_layout='4x4' covers 16"
    ):
        capture.make_tap(model, variables, ["tokens"], input_shape=(16, 16, 3), token_layout="4x4")
    with pytest.raises(capture.LayerNotFoundError, match="not requested: other"):
        capture.make_tap(
            model, variables, ["tokens"], input_shape=(16, 16, 3), token_layout={"other": "4x4"}
        )
    with pytest.raises(capture.LayerNotFoundError, match="'embed'.*not \\[tokens, channels\\]"):
        capture.make_tap(
            model, variables, ["embed"], input_shape=(16, 16, 3), token_layout={"embed": "4x4"}
        )


def test_extra_tokens_beyond_the_limit_need_a_named_layout():
    # 9x9 patches after 18 tokens on a square input: no square grid within 16 extras.
    with pytest.raises(capture.LayerNotFoundError, match="at most 16 class/register"):
        token_layouts.infer_token_layout("t", 18 + 81, (16, 16, 3))


@pytest.mark.parametrize("suffix", [0, 3])
@pytest.mark.parametrize("declare", [True, False])
def test_more_than_a_class_token_needs_a_named_layout(suffix, declare):
    """Registers before or after the patches cannot be told apart from the outside: inference
    refuses, naming both layouts; named, either reads the planted grid."""
    model, variables, x, grid = _setup(
        (16, 16, 3), prefix=4 - suffix, suffix=suffix, declare_patch=declare
    )
    with pytest.raises(
        capture.LayerNotFoundError,
        match=r"'tokens' has 20 tokens.* 4x4 patches.* and 4 others, .*'4\+4x4' "
        r"\(all before.*'1\+4x4\+3' \(registers after",
    ):
        capture.make_tap(model, variables, ["tokens"], input_shape=(16, 16, 3))
    layout = f"{4 - suffix}+4x4" + (f"+{suffix}" if suffix else "")
    tap = capture.make_tap(
        model, variables, ["tokens"], input_shape=(16, 16, 3), token_layout=layout
    )
    np.testing.assert_array_equal(np.asarray(tap.fn(tap.variables, x)["tokens"]), grid)


def test_without_a_patch_size_grids_of_other_shapes_are_named():
    """33 tokens of a square input, no patch size: 1 + 8x4 (8x16 px patches) as well as
    5x5 patches and 8 others; the refusal names the other grids, not only the square one."""
    with pytest.raises(capture.LayerNotFoundError) as e:
        token_layouts.infer_token_layout("t", 33, (64, 64, 3))
    text = str(e.value)
    assert "declares no patch_size" in text and "'8+5x5' (all before" in text
    assert "a grid of another shape (patches that are not square), e.g. " in text
    assert "'1+8x4'" in text and "'5+4x7'" in text and "'1+2x16'" not in text  # aspect <= 4
    assert text.endswith("token_layout='[prefix+]HxW[+suffix]', or declare the model's patch_size")


def test_a_token_layout_for_no_token_layer_is_refused():
    model, variables, _, _ = _setup((16, 16, 3), prefix=1)
    with pytest.raises(
        capture.LayerNotFoundError,
        match=r"token_layout='1\+4x4': none of the layers embed has a \[tokens, channels\] output",
    ):
        capture.make_tap(model, variables, ["embed"], input_shape=(16, 16, 3), token_layout="1+4x4")


class NnxTokens(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Conv(3, 6, (4, 4), strides=4, rngs=rngs)
        self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, 6)))
        self.mix = nnx.Linear(6, 5, rngs=rngs)

    def __call__(self, x):
        y = self.embed(x)
        b, h, w, c = y.shape
        t = jnp.concatenate([jnp.tile(self.cls[...], (b, 1, 1)), y.reshape(b, h * w, c)], 1)
        return self.mix(t)


def test_nnx_token_layer():
    graph, shapes = nnx.split(nnx.eval_shape(lambda: NnxTokens(nnx.Rngs(0))))
    rng = np.random.default_rng(0)  # as `random_variables`: nothing compiled to initialise
    model = nnx.merge(
        graph, jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
    )
    x = _normal((2, 12, 16, 3), seed=2)
    tap = capture.make_tap(model, None, ["mix"], input_shape=(12, 16, 3))
    got = np.asarray(jax.jit(tap.fn)(tap.variables, x)["mix"])
    want = model.mix(model.embed(x))  # the linear layer acts on each patch alone
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)
    assert tap.shapes["mix"] == (3, 4, 5)


def test_an_input_that_is_not_whole_patches_is_refused():
    """The zoo ViT, its NNX twin and a model declaring only `patch_size` refuse an input whose
    sides are not multiples of the patch size, naming the size and the nearest multiples,
    whichever layers are read (the patch embedding too)."""
    from jaxdissect.models import vit_nnx

    model = vit.ViT(**{**TINY_VIT, "pool_type": "tok"})  # 8 px patches: 36 px covers 32
    variables = random_variables(model, jnp.zeros((1, 32, 32, 3)), seed=0)
    twin = vit_nnx.from_linen(model, variables["params"])
    message = r"input_size=36: not a multiple of the model's patch size 8 .*; use 32 or 40"
    for module, params, layer in [(model, variables, "block0"), (twin, None, "stem")]:
        with pytest.raises(ValueError, match=message):
            capture.make_tap(module, params, [layer], input_shape=(36, 36, 3))
    plain, plain_vars, _, _ = _setup((18, 20, 3), prefix=1)  # 4 px patches
    with pytest.raises(
        ValueError, match=r"input_shape=\(18, 20, 3\).*use 16 or 20 high and 20 wide"
    ):
        capture.make_tap(plain, plain_vars, ["tokens"], input_shape=(18, 20, 3))

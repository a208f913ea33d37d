"""Interventions: rules at layer paths, against numpy on a tiny network; vmap over units."""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import capture, interventions
from jaxdissect.interventions import Ablate, Fold, Rotate, intervene
from jaxdissect.models.load import init_variables
from jaxdissect.rotation import random_rotation

K, CLASSES = 6, 4


class _Tiny(nn.Module):
    """x [b, h, w, 3] -> hidden, mix (1x1 convs: [b, h, w, K]) -> ReLU -> mean -> head."""

    layer_aliases = {"units": "hidden"}

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(K, name="mix")(nn.Dense(K, name="hidden")(x))
        return nn.Dense(CLASSES, name="head")(nn.relu(h).mean((1, 2)))


@pytest.fixture(scope="module")
def tiny():
    model = _Tiny()
    x = jax.random.normal(jax.random.key(0), (5, 3, 4, 3))
    variables = init_variables(model, x, seed=1)
    return model, variables, x


def _numpy_forward(variables, x, edit=lambda y: y):
    """The tiny network in float64 numpy, `edit` applied to the hidden layer's output."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    y = edit(np.asarray(x, np.float64) @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    y = y @ p["mix"]["kernel"] + p["mix"]["bias"]
    return np.maximum(y, 0).mean((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]


def test_zero_and_mean_ablation_match_numpy(tiny):
    model, variables, x = tiny
    mask = np.array([True, False, False, True, False, True])
    mean = np.random.default_rng(0).standard_normal(K).astype(np.float32)

    def zero(y):
        return np.where(mask, 0.0, y)

    def to_mean(y):
        return np.where(mask, mean.astype(np.float64), y)

    got = intervene(model, {"hidden": Ablate(mask)}).apply(variables, x)
    np.testing.assert_allclose(got, _numpy_forward(variables, x, zero), atol=1e-5)
    got = intervene(model, {"hidden": Ablate(mask, mean)}).apply(variables, x)
    np.testing.assert_allclose(got, _numpy_forward(variables, x, to_mean), atol=1e-5)
    # The alias names the same module; no unit: no change.
    got = intervene(model, {"units": Ablate(mask)}).apply(variables, x)
    np.testing.assert_allclose(got, _numpy_forward(variables, x, zero), atol=1e-5)
    plain = model.apply(variables, x)
    unchanged = intervene(model, {"hidden": Ablate(np.zeros(K, bool))}).apply(variables, x)
    np.testing.assert_array_equal(unchanged, plain)
    assert not np.allclose(_numpy_forward(variables, x, zero), plain, atol=1e-3)


def test_rotate_changes_the_network_and_fold_leaves_it(tiny, caplog):
    model, variables, x = tiny
    r = random_rotation(K, seed=3)
    rotated = intervene(model, {"hidden": Rotate(r)}).apply(variables, x)
    np.testing.assert_allclose(rotated, _numpy_forward(variables, x, lambda y: y @ r), atol=1e-5)
    assert not np.allclose(rotated, model.apply(variables, x), atol=1e-3)
    # The consumer of `hidden` is a module (`mix`): Fold gives it the unrotated units.
    folded = intervene(model, {"hidden": Fold(r)})
    with caplog.at_level(logging.WARNING):
        np.testing.assert_allclose(folded.apply(variables, x), model.apply(variables, x), atol=1e-5)
        assert "Fold at" not in caplog.text
        # `mix` is read by nn.relu, a function: nothing undoes the rotation, and it is said.
        at_mix = intervene(model, {"mix": Fold(r)}).apply(variables, x)
        assert "Fold at 'mix': no module took the rotated output" in caplog.text
    np.testing.assert_array_equal(at_mix, intervene(model, {"mix": Rotate(r)}).apply(variables, x))
    # ... while a capture of the intervened model sees the rotated units.
    tap = capture.make_tap(folded, variables, ["hidden"], input_shape=(3, 4, 3))
    p = variables["params"]["hidden"]
    y = np.asarray(x) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    np.testing.assert_allclose(tap.fn(variables, x)["hidden"], y @ r, atol=1e-5)


def test_vmap_over_unit_masks_equals_a_loop_of_single_ablations(tiny):
    model, variables, x = tiny
    mean = jnp.asarray(np.random.default_rng(1).standard_normal(K), jnp.float32)
    traces = []

    @jax.jit
    def effects(v, images, masks, value):
        traces.append(1)

        def one(mask):
            return intervene(model, {"hidden": Ablate(mask, value)}).apply(v, images)

        return jax.vmap(one)(masks)

    masks = np.eye(K, dtype=bool)
    batched = effects(variables, x, masks, mean)
    assert batched.shape == (K, 5, CLASSES)
    for k in range(K):
        single = intervene(model, {"hidden": Ablate(masks[k], mean)}).apply(variables, x)
        np.testing.assert_allclose(batched[k], single, rtol=1e-6, atol=1e-6)
    # The masks and means are arguments: other values reuse the compiled function.
    pairs = np.zeros((3, K), bool)
    pairs[np.arange(3), [0, 2, 4]] = pairs[np.arange(3), [1, 3, 5]] = True
    effects(variables, x, pairs, mean * 2)
    assert len(traces) == 2  # a new shape ([3, K]) compiles once more; a new value does not
    effects(variables, x, ~pairs, mean)
    assert len(traces) == 2


def test_rules_are_pytrees_of_their_arrays():
    mask = np.ones(K, bool)
    assert jax.tree.leaves(Ablate(mask)) == [mask]
    assert len(jax.tree.leaves(Ablate(mask, np.zeros(K)))) == 2
    assert jax.tree.map(lambda a: a, Ablate(mask)).value == "zero"
    assert isinstance(jax.tree.map(lambda a: a, Fold(np.eye(2))), Fold)


def test_token_layouts_take_the_same_rules():
    class Tokens(nn.Module):
        @nn.compact
        def __call__(self, x):  # [b, n, d]
            return nn.Dense(2, name="out")(nn.Dense(K, name="mix")(x).mean(1))

    model = Tokens()
    x = jax.random.normal(jax.random.key(2), (3, 7, 5))
    variables = init_variables(model, x, seed=3)
    mask = interventions.unit_mask(K, [1, 4])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    y = np.asarray(x, np.float64) @ p["mix"]["kernel"] + p["mix"]["bias"]  # [b, n, K]
    y[..., [1, 4]] = 0
    want = y.mean(1) @ p["out"]["kernel"] + p["out"]["bias"]
    got = intervene(model, {"mix": Ablate(mask)}).apply(variables, x)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_an_unknown_path_is_refused_with_the_list_of_layers(tiny):
    model, variables, x = tiny
    with pytest.raises(capture.LayerNotFoundError, match="^layers=conv9: no such layer") as e:
        intervene(model, {"conv9": Ablate(np.ones(K, bool))}).apply(variables, x)
    assert "hidden  [3, 4, 6]" in str(e.value) and "head  [4]" in str(e.value)
    assert "units -> hidden" in str(e.value)
    with pytest.raises(ValueError, match="not re:"):
        intervene(model, {"re:h.*": Ablate(np.ones(K, bool))}).apply(variables, x)
    with pytest.raises(ValueError, match="'units' and 'hidden' name one module|'hidden' and"):
        intervene(model, {"units": Rotate(np.eye(K)), "hidden": Rotate(np.eye(K))}).apply(
            variables, x
        )
    with pytest.raises(TypeError, match="flax.linen Module"):
        intervene(lambda v, x: x, {})
    with pytest.raises(TypeError, match="at 'hidden': a ndarray is no rule; give Rotate, Fold"):
        intervene(model, {"hidden": np.ones(K, bool)}).apply(variables, x)


def test_a_function_of_the_output_is_a_rule(tiny):
    model, variables, x = tiny
    doubled = intervene(model, {"hidden": lambda y: 2 * y}).apply(variables, x)
    rotated = intervene(model, {"hidden": Rotate(2 * np.eye(K))}).apply(variables, x)
    np.testing.assert_allclose(doubled, rotated, rtol=1e-6)
    assert not np.allclose(doubled, model.apply(variables, x))


def test_rules_of_the_wrong_size_name_the_layer(tiny):
    model, variables, x = tiny
    with pytest.raises(ValueError, match=r"at 'hidden'.*shape \(2,\).*6 units.*unit_mask"):
        intervene(model, {"hidden": Ablate(np.array([1, 3]))}).apply(variables, x)
    # K unit numbers (all six, in some order) read as a 0/1 mask left unit 0 (its 0) alone.
    with pytest.raises(ValueError, match=r"at 'hidden'.*dtype int\d+: .*bool mask.*unit_mask"):
        intervene(model, {"hidden": Ablate(np.arange(K)[::-1])}).apply(variables, x)
    with pytest.raises(ValueError, match=r"at 'units'.*one value per unit \(6\)"):
        intervene(model, {"units": Ablate(np.ones(K, bool), np.zeros(3))}).apply(variables, x)
    with pytest.raises(ValueError, match="value='mean'"):
        intervene(model, {"hidden": Ablate(np.ones(K, bool), "mean")}).apply(variables, x)
    with pytest.raises(ValueError, match="at 'head': a 6-unit rotation .* 4 channels"):
        intervene(model, {"head": Rotate(np.eye(K))}).apply(variables, x)
    with pytest.raises(ValueError, match=r"units \[6, -1\] outside 0..5"):
        interventions.unit_mask(K, [6, -1])
    np.testing.assert_array_equal(interventions.unit_mask(4, [3, 0]), [True, False, False, True])
    assert not interventions.unit_mask(4, []).any()


@pytest.mark.parametrize("units", [np.array([False, True, False, True]), [1.7]])
def test_unit_mask_refuses_what_is_no_unit_numbers(units):
    """A bool mask (True read as unit 1) or a float (1.7 as unit 1) is no list of units."""
    with pytest.raises(ValueError, match="give unit numbers"):
        interventions.unit_mask(4, units)


def test_fold_refuses_a_matrix_that_is_not_orthogonal(tiny):
    """Fold undoes its rotation with the transpose: any other matrix would change the output."""
    model, variables, x = tiny
    with pytest.raises(
        ValueError, match=r"^Fold\(matrix\): matrix @ matrix\.T is 3 .*from I.*Rotate"
    ):
        Fold(2 * np.eye(K))
    with pytest.raises(ValueError, match=r"^Fold\(matrix\): "):
        Fold(jnp.ones((K, K)) / K)
    # Rotations in float32 (numpy's QR, JAX's), and a stack of them, pass.
    Fold(random_rotation(512, seed=0).astype(np.float32))
    Fold(jnp.linalg.qr(jax.random.normal(jax.random.key(0), (256, 256)))[0])
    Fold(np.stack([random_rotation(K, seed=s) for s in range(3)]))
    # A traced matrix is not checked (nor copied to the host); a concrete one is, once.
    doubled = jax.jit(lambda m: intervene(model, {"hidden": Fold(m)}).apply(variables, x))
    assert not np.allclose(doubled(2 * jnp.eye(K)), model.apply(variables, x), atol=1e-3)

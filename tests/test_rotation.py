"""Random rotations of a layer's units: the matrices, and their effect inside a network."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import capture, rotation
from jaxdissect.models.load import init_variables
from jaxdissect.models.small_cnn import small_cnn

SIZE = 32


@pytest.fixture(scope="module")
def cnn():
    """A tiny small CNN (conv5 has 32 units) with a batch of images."""
    model = small_cnn(num_classes=5, width=0.125, image_size=SIZE)
    variables = init_variables(model, jnp.zeros((1, SIZE, SIZE, 3)), seed=0)
    images = jax.random.normal(jax.random.key(1), (4, SIZE, SIZE, 3))
    return model, variables, images


def test_random_rotation_is_a_seeded_rotation():
    q = rotation.random_rotation(9, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(9), atol=1e-12)
    assert np.linalg.det(q) == pytest.approx(1.0)
    np.testing.assert_array_equal(q, rotation.random_rotation(9, seed=3))
    assert not np.allclose(q, rotation.random_rotation(9, seed=4))
    # Every seed gives a rotation, though half of the raw Haar O(k) draws are reflections.
    assert all(np.linalg.det(rotation.random_rotation(4, s)) > 0 for s in range(20))
    with pytest.raises(ValueError, match="^seed=-1: must be >= 0$"):
        rotation.random_rotation(4, -1)


def test_random_rotation_is_haar_distributed():
    # Haar: E[Q] = 0 and E[Q_ij^2] = 1/k for every entry.
    k, n = 4, 2000
    draws = np.stack([rotation.random_rotation(k, s) for s in range(n)])
    np.testing.assert_allclose(draws.mean(0), 0.0, atol=0.06)
    np.testing.assert_allclose((draws**2).mean(0), 1 / k, atol=0.03)


@pytest.mark.parametrize("k", [1, 2, 7, 16])
def test_fractional_power_goes_from_identity_to_q(k):
    q = rotation.random_rotation(k, seed=k)
    np.testing.assert_array_equal(rotation.fractional_power(q, 0.0), np.eye(k))
    np.testing.assert_allclose(rotation.fractional_power(q, 1.0), q, atol=1e-12)
    np.testing.assert_allclose(rotation.fractional_power(q, 1 - 1e-9), q, atol=1e-7)
    for t in (0.1, 0.5, 0.9):
        p = rotation.fractional_power(q, t)
        assert p.dtype == np.float64
        np.testing.assert_allclose(p @ p.T, np.eye(k), atol=1e-12)
        assert np.linalg.det(p) == pytest.approx(1.0)
    a, b = rotation.fractional_power(q, 0.3), rotation.fractional_power(q, 0.45)
    np.testing.assert_allclose(a @ b, rotation.fractional_power(q, 0.75), atol=1e-12)
    half = rotation.fractional_power(q, 0.5)
    np.testing.assert_allclose(half @ half, q, atol=1e-12)


def test_fractional_power_moves_gradually():
    q = rotation.random_rotation(32, seed=0)
    dist = [
        np.linalg.norm(rotation.fractional_power(q, t) - np.eye(32)) for t in np.linspace(0, 1, 6)
    ]
    assert dist[0] == 0 and all(b > a for a, b in zip(dist, dist[1:], strict=False))


def test_fractional_power_of_half_turns_and_reflections():
    half_turn = np.diag([-1.0, -1.0, 1.0])  # two -1 eigenvalues: a rotation by pi
    p = rotation.fractional_power(half_turn, 0.5)
    np.testing.assert_allclose(p @ p, half_turn, atol=1e-12)
    np.testing.assert_allclose(p @ p.T, np.eye(3), atol=1e-12)
    with pytest.raises(ValueError, match="determinant -1"):
        rotation.fractional_power(np.diag([-1.0, 1.0]), 0.5)
    with pytest.raises(ValueError, match="orthogonal"):
        rotation.fractional_power(np.ones((2, 2)), 0.5)


def test_folding_the_inverse_into_a_linear_consumer():
    rng = np.random.default_rng(0)
    y, w = rng.standard_normal((5, 6)), rng.standard_normal((6, 3))
    r = rotation.random_rotation(6, seed=1)
    # (float32: the fold runs in JAX.)
    np.testing.assert_allclose((y @ r) @ rotation.fold_into_kernel(w, r), y @ w, atol=1e-5)
    conv = rng.standard_normal((3, 3, 6, 4))  # the input channel axis is -2 for convs too
    folded = np.asarray(rotation.fold_into_kernel(conv, r))
    np.testing.assert_allclose(np.einsum("ij,hwjo->hwio", r, folded), conv, atol=1e-5)


def test_fold_keeps_the_network_and_insert_changes_it(cnn):
    model, variables, images = cnn
    path = model.layer_aliases["conv4"]
    r = rotation.random_rotation(16, seed=2)
    v = rotation.with_rotations(variables, {path: r})
    base = model.apply(variables, images)
    folded = rotation.RotatedModel(model, fold=True).apply(v, images)
    inserted = rotation.RotatedModel(model, fold=False).apply(v, images)
    # Rotate, then un-rotate for the consumer: the identity up to float rounding.
    np.testing.assert_allclose(folded, base, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(inserted - base))) > 1e-2
    # No rotation at all (t = 0) leaves both modes exact.
    v0 = rotation.with_rotations(variables, {path: np.eye(16)})
    np.testing.assert_allclose(
        rotation.RotatedModel(model, fold=False).apply(v0, images), base, atol=1e-5
    )


def test_capture_sees_rotated_units_only_when_the_rotation_is_nested_inside(cnn):
    model, variables, images = cnn
    path = model.layer_aliases["conv4"]
    r = rotation.random_rotation(16, seed=2)
    plain = capture.make_tap(model, variables, ["conv4"], input_shape=(SIZE, SIZE, 3))
    y = plain.fn(variables, images)[path]
    rotated = rotation.RotatedModel(model, fold=True)
    v = rotation.with_rotations(variables, {path: r})
    tap = capture.make_tap(rotated, v, ["conv4", "conv5"], input_shape=(SIZE, SIZE, 3))
    assert tap.layers == (path, model.layer_aliases["conv5"])
    acts = jax.jit(tap.fn)(v, images)
    np.testing.assert_allclose(acts[path], y @ r.astype(np.float32), atol=1e-5)
    # Folded: the next layer sees what it saw before.
    after = capture.make_tap(model, variables, ["conv5"], input_shape=(SIZE, SIZE, 3))
    np.testing.assert_allclose(
        acts[tap.layers[1]], after.fn(variables, images)[tap.layers[1]], atol=1e-5
    )
    # The wrong nesting: rotation outside the capture's interceptor, which records first.
    with rotation.rotate_units({path: r}, fold=True):
        outside = plain.fn(variables, images)[path]
    np.testing.assert_allclose(outside, y, atol=1e-6)


def test_fan_equals_the_rotated_models_capture(cnn):
    model, variables, images = cnn
    path = model.layer_aliases["conv5"]
    q = rotation.random_rotation(32, seed=5)
    mats = {rotation.amount_name("conv5", t): rotation.fractional_power(q, t) for t in (0, 0.5)}
    fn, fan_vars = rotation.rotated_fan(model, variables, path, mats, input_size=SIZE)
    fan = fn(fan_vars, images)
    assert list(fan) == ["conv5-t0_000", "conv5-t0_500"]
    for name, m in mats.items():
        v = rotation.with_rotations(variables, {path: m})
        tap = capture.make_tap(rotation.RotatedModel(model), v, [path], input_shape=(SIZE, SIZE, 3))
        np.testing.assert_allclose(fan[name], tap.fn(v, images)[path], atol=1e-5)


def test_weight_folding_matches_the_interceptor(cnn):
    # conv5 -> ReLU -> global average pool -> linear: Q^T folds into the classifier's kernel.
    model, variables, images = cnn
    relu5 = model.layer_aliases["conv5"]
    r = rotation.random_rotation(32, seed=6)
    params = jax.tree.map(lambda x: x, variables["params"])
    kernel = params["classifier"]["1"]["kernel"]
    params["classifier"]["1"]["kernel"] = rotation.fold_into_kernel(kernel, r)
    inserted = rotation.RotatedModel(model, fold=False).apply(
        rotation.with_rotations({"params": params}, {relu5: r}), images
    )
    np.testing.assert_allclose(inserted, model.apply(variables, images), atol=1e-5)


class _Branches(nn.Module):
    """A layer whose output feeds two modules, one nested, and optionally a `+`."""

    residual: bool = False

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="layer")(x)
        a = nn.Dense(3, name="left")(h)
        b = _Inner(name="right")(h)
        out = a + b
        return out + h[:, :3] if self.residual else out


class _Inner(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="dense")(nn.relu(x))


@pytest.mark.parametrize("residual", [False, True])
def test_fold_reaches_every_consuming_module(residual):
    model = _Branches(residual=residual)
    x = jax.random.normal(jax.random.key(0), (5, 4))
    variables = init_variables(model, x, seed=1)
    r = rotation.random_rotation(6, seed=0)
    change = rotation.max_output_change(model, variables, {"layer": r}, np.asarray(x), lambda v: v)
    if residual:
        # The `+` in the parent's code is no module: it still sees rotated units, and the
        # check says so.
        assert change > 1e-2
    else:
        assert change < 1e-5


class _Concat(nn.Module):
    @nn.compact
    def __call__(self, xs):
        return nn.Dense(3, name="dense")(jnp.concatenate(xs, -1))


class _ListConsumer(nn.Module):
    """A layer's output taken by one module directly and by another inside a list."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="layer")(x)
        return nn.Dense(3, name="direct")(h) + _Concat(name="concat")([h, x])


def test_fold_reaches_a_module_taking_the_output_in_a_list():
    """The module given [y Q, x] got rotated units, with no warning (another module took y Q
    directly): the folded network's outputs changed by about 2."""
    model = _ListConsumer()
    x = jax.random.normal(jax.random.key(0), (5, 4))
    variables = init_variables(model, x, seed=1)
    r = rotation.random_rotation(6, seed=0)
    change = rotation.max_output_change(model, variables, {"layer": r}, np.asarray(x), lambda v: v)
    assert change < 1e-5


def test_rotation_of_the_wrong_width_is_refused(cnn):
    model, variables, images = cnn
    v = rotation.with_rotations(variables, {model.layer_aliases["conv4"]: np.eye(5)})
    with pytest.raises(ValueError, match="5-unit rotation"):
        rotation.RotatedModel(model).apply(v, images)


def test_a_rotation_at_an_unknown_path_is_refused(cnn):
    # It used to rotate nothing, silently.
    model, variables, images = cnn
    v = rotation.with_rotations(variables, {"features/99": np.eye(16)})
    with pytest.raises(capture.LayerNotFoundError, match="^layers=features/99: no such layer"):
        rotation.RotatedModel(model).apply(v, images)


def test_amounts_named_alike_are_refused_up_front(tmp_path, monkeypatch):
    """0.1 and 0.1004 share the name conv5-t0_100: one line naming the amounts, before
    the probe set or the model is opened."""
    from tests.experiment_testing import parse, script

    assert rotation.check_amounts([0, 0.5, 0.5, 1]) == [0.0, 0.5, 1.0]
    with pytest.raises(ValueError, match=r"^amounts=0.1,0.1004: 0.1 and 0.1004 are one amount"):
        rotation.check_amounts([0.1, 0.1004])
    with pytest.raises(ValueError, match=r"^amounts=0,1.5: 1.5 outside \[0, 1\]$"):
        rotation.check_amounts([0, 1.5])
    monkeypatch.setenv("JAXDISSECT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    fv = parse("rotation", "--model=alexnet", "--amounts=0,0.0002", f"--output_dir={out}")
    with pytest.raises(ValueError, match=r"^--amounts=0,0.0002: 0 and 0.0002 are one amount"):
        script("rotation").run(fv)
    assert not (tmp_path / "cache").exists() and not out.exists()
    # --eval_data where no accuracy is measured (no training export): ignored before.
    fv = parse("rotation", "--model=alexnet", f"--eval_data={tmp_path}", f"--output_dir={out}")
    with pytest.raises(ValueError, match=r"^--eval_data=\S+: only a training export's accuracy"):
        script("rotation").run(fv)
    assert not (tmp_path / "cache").exists() and not out.exists()


def test_the_plot_draws_the_amounts_in_increasing_order(tmp_path, monkeypatch):
    """Points given as t = 1, 0, 0.5: every line runs through them by t."""
    from jaxdissect.report import plots

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.setdefault("fig", fig))
    points = [
        rotation.RotationPoint(t, 0, n, 8, {"color": 0}, {"color": 0}, "L", acc, acc, 0.0)
        for t, n, acc in [(1.0, 1, 0.1), (0.0, 5, 0.9), (0.5, 3, 0.5)]
    ]
    rotation.plot_rotation(tmp_path / "r.png", points)
    lines = [line for ax in drawn["fig"].axes for line in ax.get_lines()]
    assert len(lines) == 3
    for line in lines:
        assert list(line.get_xdata()) == [0.0, 0.5, 1.0]
    by_label = {line.get_label(): list(line.get_ydata()) for line in lines}
    assert by_label["interpretable units"] == [5, 3, 1]
    assert by_label["folded"] == by_label["inserted"] == [0.9, 0.5, 0.1]


def test_the_rotated_fan_reads_tokens_by_the_layout_named():
    """Registers after the patches (4x4+1): Q^0 of the fan is the layer read so."""
    from tests.test_finished import SIZE, RegisterAfter

    module = RegisterAfter()
    variables = init_variables(module, jnp.zeros((1, SIZE, SIZE, 3)))
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)), jnp.float32)
    fn, fan_variables = rotation.rotated_fan(
        module, variables, "tokens", {"t0": np.eye(6)}, input_size=SIZE, token_layout="4x4+1"
    )
    tap = capture.make_tap(
        module, variables, ["tokens"], input_shape=(SIZE, SIZE, 3), token_layout="4x4+1"
    )
    want = tap.fn(tap.variables, images)["tokens"]
    np.testing.assert_allclose(fn(fan_variables, images)["t0"], want, atol=1e-5)


_SHIFTED = """from jaxdissect.models.small_cnn import SmallCNN, small_cnn

SHIFT = {shift}


class Net(SmallCNN):
    def __call__(self, x, train=False):
        return super().__call__(x + SHIFT, train)


def net(**kw):
    m = small_cnn(**kw)
    return Net(num_classes=m.num_classes, width=m.width, input_spec=m.input_spec)
"""


def test_wrapped_models_are_keyed_by_the_code_of_the_model_they_wrap(tmp_path, monkeypatch):
    """The rotation study, significance's rotated baseline and the dynamics study dissect a
    wrapper of the user's model: the same weights under edited model code are another
    stage key (they were keyed by the weights alone, and a rerun reused stale stages); their
    weights' key stays, so a rerun in the same output folder is no other model."""
    import importlib
    import sys
    import types

    from jaxdissect import pipeline, studies
    from jaxdissect.models import load as model_load
    from tests.experiment_testing import script

    class Stop(Exception):
        pass

    def stop(info, *args, **kwargs):
        raise Stop((info.key, info.stage_key))

    monkeypatch.setattr(pipeline, "dissect", stop)
    monkeypatch.syspath_prepend(str(tmp_path))
    significance = script("significance")
    fv = types.SimpleNamespace(
        model="user_shifted:net",
        weights="",
        baseline="rotated",
        layer="conv1",
        rotation_seed=0,
        input_norm="model",
        input_size=None,
        model_option=[],
        num_classes=None,
    )

    def keys(shift):
        (tmp_path / "user_shifted.py").write_text(_SHIFTED.format(shift=shift))
        sys.modules.pop("user_shifted", None)
        importlib.invalidate_caches()
        loaded = model_load.load("user_shifted:net", options={"width": 0.125})
        info = pipeline.ModelInfo(
            loaded.module, loaded.variables, loaded.input_spec, "net", loaded.key
        )
        found = [loaded.key]
        with pytest.raises(Stop) as stopped:
            rotation.rotation_study(info, "conv1", [0, 1], None, None, tmp_path, dataset_name="d")
        found.append(stopped.value.args[0])
        info = significance._model(fv, False, types.SimpleNamespace(seed=0))[0]
        found.append((info.key, info.stage_key))
        monkeypatch.setattr(studies, "load_trained", lambda weights: loaded)
        checkpoints = [studies.Checkpoint(step=1, weights=tmp_path, val_accuracy=None)]
        with pytest.raises(Stop) as stopped:
            studies.dynamics_study(checkpoints, ["conv1"], None, None, tmp_path, dataset_name="d")
        found.append(stopped.value.args[0])
        return found

    before, after = keys(0.0), keys(3.0)
    assert before[0] == after[0]  # the same weights
    for old, new in zip(before[1:], after[1:], strict=True):
        assert old[0] == new[0] and old[1] != new[1]
    sys.modules.pop("user_shifted", None)

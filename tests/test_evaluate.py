"""The sharded classifier evaluator: per-class counts against numpy, on 1 and 8 devices."""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxdissect import evaluate, parallel, scenes
from jaxdissect.interventions import Ablate, intervene
from jaxdissect.models.load import init_variables

CLASSES, N = 5, 45  # 45 = 2 full batches of 16 and a partial one of 13


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(8, name="hidden")(x.reshape(len(x), -1) / 255.0)
        return nn.Dense(CLASSES, name="head")(h)


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
    # Class 4 has no example: its accuracy is undefined, its counts 0.
    labels = rng.integers(0, CLASSES - 1, N).astype(np.int32)
    model = _Linear()
    variables = init_variables(model, images[:1].astype(np.float32), seed=0)
    split = scenes.SceneSplit(images, labels, np.arange(N))
    return model, variables, split


def _numpy_logits(variables, images, mask=None):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h = images.reshape(len(images), -1) / 255.0 @ p["hidden"]["kernel"] + p["hidden"]["bias"]
    if mask is not None:
        h = np.where(mask, 0.0, h)
    return h @ p["head"]["kernel"] + p["head"]["bias"]


def _numpy_counts(logits, labels):
    # No near tie: float32 on device and float64 here pick the same class.
    top2 = np.sort(logits, -1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 1e-4)
    pred = logits.argmax(-1)
    correct = np.bincount(labels[pred == labels], minlength=CLASSES)
    total = np.bincount(labels, minlength=CLASSES)
    shifted = logits - logits.max(-1, keepdims=True)
    loss = -(shifted[np.arange(len(labels)), labels] - np.log(np.exp(shifted).sum(-1))).sum()
    return correct, total, loss


@pytest.mark.parametrize("devices", [1, 8])
def test_per_class_counts_match_numpy_with_a_partial_last_batch(setup, devices):
    model, variables, split = setup
    mesh = parallel.data_mesh(devices)
    ev = evaluate.Evaluator(model.apply, mesh)
    got = ev(variables, scenes.eval_batches(split, 16), logits=True)
    want_logits = _numpy_logits(variables, split.images)
    correct, total, loss = _numpy_counts(want_logits, split.labels)
    assert got.correct.dtype == got.total.dtype == np.int64
    np.testing.assert_array_equal(got.correct, correct)
    np.testing.assert_array_equal(got.total, total)
    assert got.count == N and got.accuracy == correct.sum() / N
    assert got.loss == pytest.approx(loss, rel=1e-5) and got.mean_loss == pytest.approx(loss / N)
    np.testing.assert_allclose(got.logits, want_logits, atol=1e-5)
    per_class = got.per_class_accuracy
    np.testing.assert_allclose(per_class[:4], correct[:4] / total[:4])
    assert np.isnan(per_class[4])


def test_one_and_eight_devices_give_the_same_counts(setup):
    model, variables, split = setup
    runs = [
        evaluate.Evaluator(model.apply, parallel.data_mesh(n))(
            variables, scenes.eval_batches(split, 8), logits=True
        )
        for n in (1, 8)
    ]
    np.testing.assert_array_equal(runs[0].correct, runs[1].correct)
    np.testing.assert_array_equal(runs[0].total, runs[1].total)
    np.testing.assert_allclose(runs[0].logits, runs[1].logits, atol=1e-6)


def test_an_intervened_network_compiles_once_for_every_rule(setup):
    model, variables, split = setup
    traces = []

    def apply_fn(v, images):
        traces.append(1)
        return intervene(model, {"hidden": Ablate(v["mask"])}).apply(v["model"], images)

    ev = evaluate.Evaluator(apply_fn, parallel.data_mesh(8))
    batches = scenes.eval_batches(split, 16)
    for units in ([0], [2, 5], [1, 3, 4, 7]):
        mask = np.zeros(8, bool)
        mask[units] = True
        got = ev({"model": variables, "mask": mask}, batches)
        correct, total, _ = _numpy_counts(
            _numpy_logits(variables, split.images, mask), split.labels
        )
        np.testing.assert_array_equal(got.correct, correct)
        np.testing.assert_array_equal(got.total, total)
    assert len(traces) == 1


def test_labels_outside_the_classes_are_refused(setup):
    model, variables, split = setup
    bad = scenes.SceneSplit(
        split.images, np.where(np.arange(N) == 20, 7, split.labels), split.source_indices
    )
    with pytest.raises(ValueError, match=r"batch 1 has labels \[7\] outside 0..4"):
        evaluate.Evaluator(model.apply, parallel.data_mesh(1))(
            variables, scenes.eval_batches(bad, 16)
        )


def test_a_network_without_logits_is_named(setup):
    """`num_classes=0` builds a ViT with no head: scoring it is one line, not a trace of
    one_hot over zero classes."""
    model, variables, split = setup
    headless = evaluate.Evaluator(lambda v, x: model.apply(v, x)[:, :0], parallel.data_mesh(1))
    with pytest.raises(ValueError, match=r"^the network outputs no logits \(num_classes=0 "):
        headless(variables, scenes.eval_batches(split, 16))


def test_batch_sizes_and_no_batch(setup):
    model, variables, _ = setup
    mesh8 = parallel.data_mesh(8)
    assert evaluate.batch_size_for(mesh8) == 64 and evaluate.batch_size_for(mesh8, 20) == 24
    with pytest.raises(ValueError, match="batch_size=0"):
        evaluate.batch_size_for(mesh8, 0)
    got = evaluate.Evaluator(model.apply, mesh8)(variables, [], logits=True)
    assert got.count == 0 and got.accuracy == 0.0 and got.logits.shape == (0, 0)
    with pytest.raises(ValueError, match="^batch_size=12 is not divisible by the 8 devices"):
        evaluate.Evaluator(model.apply, mesh8)(
            variables,
            [{"image": np.zeros((12, 4, 4, 3), np.uint8), "label": np.zeros(12, np.int32)}],
        )

"""Concept vectors (jaxdissect/concept_vectors.py) against the numpy reference in
tests/concept_vectors_reference.py, on planted data, on 8 devices and after a kill."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from jaxdissect import concept_vectors as cv
from jaxdissect import parallel
from tests.concept_vectors_reference import (
    reference_inputs,
    reference_loss_and_grad,
    reference_set_iou,
    reference_targets,
)
from tests.reference import random_probe


def _probe(seed: int = 0, num_images: int = 16):
    p = random_probe(seed, num_images=num_images, act_size=(4, 6), seg_size=(16, 12))
    data = cv.ProbeData(p["acts"], p["pixel_labels"], p["image_labels"])
    # Frequent pixel labels, image-level ones, and one that never occurs.
    ids, counts = np.unique(p["pixel_labels"][p["pixel_labels"] > 0], return_counts=True)
    pixel = ids[np.argsort(-counts)[:3]]
    image = np.unique(p["image_labels"][p["image_labels"] > 0])[:2]
    absent = np.setdiff1d(np.arange(1, 300), np.concatenate([ids, image]))[:1]
    concepts = np.concatenate([pixel, image, absent]).astype(np.int32)
    return data, p["thresholds"], concepts


@pytest.mark.parametrize("stride", [1, 3])
def test_inputs_and_targets_equal_the_reference(stride):
    data, thresholds, concepts = _probe()
    raw, unit = cv.unit_inputs(data.acts, thresholds, data.size, stride=stride)
    want_raw, want_unit = reference_inputs(data.acts, thresholds, data.size, stride)
    np.testing.assert_allclose(np.asarray(raw), want_raw, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(unit), want_unit)  # dyadic: ties are exact
    got = cv.concept_targets(data.pixel_labels, data.image_labels, concepts, stride=stride)
    want = reference_targets(data.pixel_labels, data.image_labels, concepts, stride)
    np.testing.assert_array_equal(np.asarray(got), want)
    assert want.any() and not want.all()


@pytest.mark.parametrize("variant", cv.VARIANTS)
def test_loss_and_gradient_equal_the_reference(variant):
    data, thresholds, concepts = _probe(1, num_images=6)
    raw, unit = reference_inputs(data.acts, thresholds, data.size, stride=2)
    inputs = unit.astype(np.float64) if variant == "binary" else raw
    targets = reference_targets(data.pixel_labels, data.image_labels, concepts, 2)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(len(concepts), inputs.shape[-1])).astype(np.float32)
    b = rng.normal(size=len(concepts)).astype(np.float32)
    alpha = rng.uniform(0.5, 1.0, len(concepts)).astype(np.float32)
    loss, gw, gb = reference_loss_and_grad(w, b, alpha, inputs, targets)
    params = {"w": w, "b": b}
    got, grads = jax.value_and_grad(cv.probe_loss)(
        params, alpha, inputs.astype(np.float32), targets
    )
    np.testing.assert_allclose(float(got), loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grads["w"]), gw, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grads["b"]), gb, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", cv.VARIANTS)
def test_one_training_step_equals_numpy_gradient_and_optax_adam(variant):
    data, thresholds, concepts = _probe(2)
    cfg = cv.ProbeConfig(
        variant=variant, epochs=1, probe_batch_size=12, heldout_fraction=0.25, learning_rate=0.05
    )
    got = cv.train_concept_vectors(data, thresholds, concepts, cfg, mesh=parallel.data_mesh(1))
    train, heldout = cv.split_images(16, 0.25, 0)
    np.testing.assert_array_equal(got.train_images, train)
    assert len(train) == 12 and len(heldout) == 4 and not set(train) & set(heldout)
    raw, unit = reference_inputs(data.acts[train], thresholds, data.size)
    inputs = unit.astype(np.float64) if variant == "binary" else raw
    targets = reference_targets(data.pixel_labels[train], data.image_labels[train], concepts)
    alpha = 1.0 - targets.mean(axis=(0, 1))  # Net2Vec's weight of the positive pixels
    np.testing.assert_allclose(got.alpha, alpha, rtol=1e-12)
    w0, b0 = np.zeros((len(concepts), inputs.shape[-1])), np.zeros(len(concepts))
    loss, gw, gb = reference_loss_and_grad(w0, b0, alpha, inputs, targets)
    np.testing.assert_allclose(got.losses, [loss], rtol=1e-5)
    params = {"w": w0.astype(np.float32), "b": b0.astype(np.float32)}
    grads = {"w": gw.astype(np.float32), "b": gb.astype(np.float32)}
    opt = optax.adam(0.05, eps=cv.ADAM_EPS)
    updates, _ = opt.update(grads, opt.init(params), params)
    want = optax.apply_updates(params, updates)
    # Adam's first step is lr * g / (|g| + eps): exact to float32 where the gradient is
    # well above rounding; a gradient at rounding level (the bias's is exactly 0 at zero
    # weights under alpha weighting; a float32 mean of terms ~0.5 is off by up to ~1e-7) moves
    # by at most lr * 1e-7 / eps = 5e-3, a tenth of the step of the others.
    for name, g in (("weights", gw), ("bias", gb)):
        step, want_step = getattr(got, name), np.asarray(want[name[0]])
        big = np.abs(g) > 1e-5
        np.testing.assert_allclose(step[big], want_step[big], rtol=1e-4)
        assert np.abs(step[~big]).max(initial=0) <= 0.05 * 1e-7 / cv.ADAM_EPS
    assert np.abs(got.weights).max() > 0.04  # the step did move the weights
    # The absent concept: alpha 1 and no positive pixel make its loss 0; it stays at 0.
    assert got.truth[-1] == 0 and got.iou[-1] == 0.0 and (got.weights[-1] == 0).all()


@pytest.mark.parametrize("variant", cv.VARIANTS)
def test_predicted_masks_are_the_probe_over_its_own_inputs(variant):
    """A vector's mask on an image: w . m(x) + b > 0 over the inputs of its variant."""
    rng = np.random.default_rng(3)
    acts = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)
    thresholds = np.quantile(acts, 0.7, axis=(0, 1, 2)).astype(np.float32)
    w, b = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=6).astype(np.float32)
    got = np.asarray(cv.predict(acts, thresholds, (7, 9), w, b, variant=variant))
    raw, binary = reference_inputs(acts, thresholds, (7, 9))
    feats = binary.astype(np.float64) if variant == "binary" else raw
    want = (feats @ w.T.astype(np.float64) + b > 0).reshape(2, 7, 9, 6)
    assert got.shape == want.shape and 0 < want.mean() < 1
    np.testing.assert_array_equal(got, want)
    other = "raw" if variant == "binary" else "binary"
    assert (np.asarray(cv.predict(acts, thresholds, (7, 9), w, b, variant=other)) != want).any()


def test_heldout_ious_equal_the_reference():
    data, thresholds, concepts = _probe(3, num_images=20)
    cfg = cv.ProbeConfig(epochs=4, probe_batch_size=4, heldout_fraction=0.3, learning_rate=0.1)
    got = cv.train_concept_vectors(data, thresholds, concepts, cfg, mesh=parallel.data_mesh(1))
    train, held = got.train_images, got.heldout_images
    _, unit_h = reference_inputs(data.acts[held], thresholds, data.size)
    _, unit_t = reference_inputs(data.acts[train], thresholds, data.size)
    tgt_h = reference_targets(data.pixel_labels[held], data.image_labels[held], concepts)
    tgt_t = reference_targets(data.pixel_labels[train], data.image_labels[train], concepts)
    z = unit_h.astype(np.float64) @ got.weights.T.astype(np.float64) + got.bias
    # No prediction sits near the 0.5 boundary, but the absent concept's: its loss is 0
    # (alpha 1, no positive pixel), its weights stay 0 and z is exactly 0 (predicts nothing).
    assert np.abs(z[..., :-1]).min() > 1e-4 and (z[..., -1] == 0).all()
    for j in range(len(concepts)):
        assert got.iou[j] == pytest.approx(reference_set_iou(z[..., j] > 0, tgt_h[..., j]))
        unit_iou = [reference_set_iou(unit_h[..., k], tgt_h[..., j]) for k in range(7)]
        train_iou = [reference_set_iou(unit_t[..., k], tgt_t[..., j]) for k in range(7)]
        np.testing.assert_allclose(got.unit_iou[:, j], unit_iou, rtol=1e-12)
        if max(train_iou) > 0:
            assert got.single_unit[j] == int(np.argmax(train_iou))
            assert got.single_iou[j] == pytest.approx(unit_iou[got.single_unit[j]])
        else:  # the absent concept: no unit overlaps it, so no single unit and IoU 0
            assert got.single_unit[j] == cv.NO_UNIT and got.single_iou[j] == 0.0
        assert got.best_heldout_iou[j] == pytest.approx(max(unit_iou))
    assert got.truth.sum() > 0 and got.intersection.sum() > 0
    assert got.single_unit[-1] == cv.NO_UNIT and (got.single_unit[:-1] >= 0).all()


def _planted(num_images: int = 40, size: int = 8, units: int = 6, seed: int = 0):
    """Maps at the segmentation size (upsampling is the identity), thresholds 1: concept 7
    is exactly unit 0's mask OR unit 1's, concept 9 exactly unit 4's."""
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(num_images, size, size, units)).astype(np.float32)
    thresholds = np.ones(units, np.float32)
    m = acts > 1.0
    planes = np.zeros((num_images, 2, size, size), np.int32)
    planes[:, 0][m[..., 0] | m[..., 1]] = 7
    planes[:, 1][m[..., 4]] = 9
    data = cv.ProbeData(acts, planes, np.zeros((num_images, 1), np.int32))
    return data, thresholds, np.array([7, 9], np.int32)


PLANTED_CFG = cv.ProbeConfig(epochs=30, probe_batch_size=8, learning_rate=0.1)


def test_a_concept_that_is_two_units_or_is_found_and_beats_both():
    data, thresholds, concepts = _planted()
    got = cv.train_concept_vectors(
        data, thresholds, concepts, PLANTED_CFG, mesh=parallel.data_mesh(1)
    )
    assert got.iou[0] > 0.99 and got.iou[1] > 0.99
    assert got.single_unit[0] in (0, 1) and got.single_unit[1] == 4
    assert got.best_heldout_iou[0] < 0.7 and got.gain[0] > 0.3
    assert got.single_iou[1] == 1.0
    top = np.argsort(-got.weights[0])[:2]
    assert set(top) == {0, 1}
    assert got.losses[-1] < got.losses[0] / 5


def test_eight_devices_equal_one():
    """The batch split over 8 fake CPU devices: the gradient is the same sum in another
    order, so weights agree to float32 rounding (atol 1e-4 at learning rate 0.1 after 15
    Adam steps) and the integer counts exactly."""
    data, thresholds, concepts = _planted(seed=1)
    cfg = cv.ProbeConfig(epochs=5, probe_batch_size=8, learning_rate=0.1)
    one = cv.train_concept_vectors(data, thresholds, concepts, cfg, mesh=parallel.data_mesh(1))
    eight = cv.train_concept_vectors(data, thresholds, concepts, cfg, mesh=parallel.data_mesh(8))
    assert len(jax.devices()) == 8
    np.testing.assert_allclose(eight.weights, one.weights, rtol=0, atol=1e-4)
    np.testing.assert_allclose(eight.bias, one.bias, rtol=0, atol=1e-4)
    np.testing.assert_allclose(eight.losses, one.losses, rtol=1e-5)
    for name in ("intersection", "predicted", "truth", "single_unit", "unit_iou"):
        np.testing.assert_array_equal(getattr(eight, name), getattr(one, name))


class _ListedSource:
    """A probe source over random_probe's arrays; image i is filled with i (for forward)."""

    def __init__(self, p: dict):
        self.p, self.labels = p, p["labels"]
        self.seg_size = p["pixel_labels"].shape[2:]
        self.max_planes = p["pixel_labels"].shape[1]
        self.max_image_labels = p["image_labels"].shape[1]

    def __len__(self) -> int:
        return len(self.p["acts"])

    def read_image(self, i: int) -> np.ndarray:
        return np.full((4, 4, 3), i, np.uint8)

    def read_labels(self, i: int):
        planes = self.p["pixel_labels"][i]
        keep = planes.reshape(len(planes), -1).any(1)  # planes of zeros are not stored
        return planes[keep], [q for q in self.p["image_labels"][i] if q > 0]


def test_collected_to_files_the_data_and_the_vectors_are_those_of_memory(tmp_path):
    p = random_probe(4, num_images=10, act_size=(4, 6), seg_size=(16, 12))
    source = _ListedSource(p)
    acts16 = p["acts"].astype(np.float16)

    def forward(images):
        return acts16[images[:, 0, 0, 0]]

    mem, _ = cv.collect(forward, source, batch_size=4)
    disk, _ = cv.collect(forward, source, batch_size=4, directory=tmp_path / "data")
    assert isinstance(disk.acts, np.memmap) and isinstance(disk.pixel_labels, np.memmap)
    assert sorted(f.name for f in (tmp_path / "data").iterdir()) == [
        "acts.npy",
        "image_labels.npy",
        "pixel_labels.npy",
    ]
    assert disk.pixel_labels.dtype == np.uint16 and disk.acts.dtype == np.float16
    nl = p["labels"].num_labels
    # Numbers no mask counts (random_probe has negative and too large ones) are stored as 0.
    pix, img = (np.where((x > 0) & (x < nl), x, 0) for x in (p["pixel_labels"], p["image_labels"]))
    assert (pix != p["pixel_labels"]).any()
    for got in (mem, disk):
        np.testing.assert_array_equal(got.acts, acts16)
        np.testing.assert_array_equal(got.pixel_labels, pix)
        want_q = np.sort(img, axis=1)[:, ::-1]
        np.testing.assert_array_equal(np.sort(got.image_labels, axis=1)[:, ::-1], want_q)
    naive = np.zeros(nl, bool)
    for ids in (p["pixel_labels"], p["image_labels"]):
        naive[np.unique(ids[(ids > 0) & (ids < nl)])] = True
    np.testing.assert_array_equal(disk.labels_present(nl, chunk=3), naive)
    assert naive.sum() > 3
    concepts = np.flatnonzero(naive)[:4].astype(np.int32)
    cfg = cv.ProbeConfig(epochs=2, probe_batch_size=4, learning_rate=0.1)
    a, b = (
        cv.train_concept_vectors(d, p["thresholds"], concepts, cfg, mesh=parallel.data_mesh(1))
        for d in (mem, disk)
    )
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.intersection, b.intersection)


def test_collected_labels_are_those_of_the_selected_categories(tmp_path):
    """A label listed in two categories (tiny_broden's `wood`: object and material) keeps
    only the pixels of the categories read, as the dissection reads them."""
    from jaxdissect.data.broden import Broden
    from tests.broden_testing import tiny_broden

    source = Broden.open(tiny_broden(tmp_path).root)

    def forward(images):
        return np.zeros((len(images), 1, 1, 1), np.float32)

    wood = source.labels.names.index("wood")
    pixels = {}
    for categories in (None, ("object", "color"), ("material",)):
        data, _ = cv.collect(forward, source, batch_size=2, categories=categories)
        pixels[categories] = int((np.asarray(data.pixel_labels) == wood).sum())
        want = sum(
            int((source.read_labels(i, categories or source.labels.categories)[0] == wood).sum())
            for i in range(len(source))
        )
        assert pixels[categories] == want
    assert pixels[("object", "color")] == 4 and pixels[("material",)] == 6
    assert pixels[None] == 10


def test_a_killed_run_resumes_to_the_same_vectors(tmp_path):
    data, thresholds, concepts = _planted(num_images=24, seed=2)
    cfg = cv.ProbeConfig(epochs=3, probe_batch_size=4, probe_checkpoint_every=2)
    mesh = parallel.data_mesh(1)
    whole = cv.train_concept_vectors(data, thresholds, concepts, cfg, mesh=mesh)

    class Killed(Exception):
        pass

    def kill_at_5(step, steps, loss):
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        cv.train_concept_vectors(
            data, thresholds, concepts, cfg, mesh=mesh, checkpoint_dir=tmp_path, progress=kill_at_5
        )
    seen = []
    resumed = cv.train_concept_vectors(
        data,
        thresholds,
        concepts,
        cfg,
        mesh=mesh,
        checkpoint_dir=tmp_path,
        progress=lambda step, steps, loss: seen.append(step),
    )
    assert seen[0] == 5 and seen[-1] == 12  # from the checkpoint at step 4
    np.testing.assert_array_equal(resumed.weights, whole.weights)
    np.testing.assert_array_equal(resumed.losses, whole.losses)
    np.testing.assert_array_equal(resumed.iou, whole.iou)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variant": "logits"}, "variant='logits'"),
        ({"heldout_fraction": 1.0}, "heldout_fraction=1.0"),
        ({"epochs": 0}, "epochs=0"),
        ({"learning_rate": 0.0}, "learning_rate=0.0"),
    ],
)
def test_bad_config_names_the_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cv.ProbeConfig(**kwargs)


def test_bad_inputs_name_what_is_wrong():
    data, thresholds, concepts = _planted(num_images=10)
    mesh = parallel.data_mesh(1)
    with pytest.raises(ValueError, match="probe_batch_size=8 exceeds the 7 training"):
        cv.train_concept_vectors(data, thresholds, concepts, PLANTED_CFG, mesh=mesh)
    with pytest.raises(ValueError, match="thresholds have shape"):
        cv.train_concept_vectors(data, thresholds[:3], concepts, mesh=mesh)
    with pytest.raises(ValueError, match="label numbers >= 1"):
        cv.train_concept_vectors(data, thresholds, np.array([0, 7]), mesh=mesh)
    with pytest.raises(ValueError, match="probe_batch_size=3 is not divisible"):
        cv.train_concept_vectors(
            data,
            thresholds,
            concepts,
            cv.ProbeConfig(probe_batch_size=3),
            mesh=parallel.data_mesh(8),
        )


def test_a_unit_marking_every_pixel_is_no_single_unit():
    """A constant unit at its threshold marks every pixel under the inclusive tie rule: its
    IoU with a concept covering most pixels beats every real unit's, but it detects nothing
    (the dissection gives it no label), so it is neither the single unit nor the held-out
    best; under the strict rule it marks none."""
    data, thresholds, _ = _planted()
    acts = data.acts.copy()
    acts[..., 5] = thresholds[5]  # constant, at its threshold
    planes = data.pixel_labels.copy()
    planes[:, 1] = np.where(acts[..., 2] > -1.5, 11, 0)  # ~93% of the pixels
    data = cv.ProbeData(acts, planes, data.image_labels)
    cfg = cv.ProbeConfig(epochs=1, probe_batch_size=8)
    for rule in ("inclusive", "strict"):
        got = cv.train_concept_vectors(
            data, thresholds, np.array([11]), cfg, tie_rule=rule, mesh=parallel.data_mesh(1)
        )
        everywhere = got.unit_iou[5, 0]
        assert everywhere == (pytest.approx(0.93, abs=0.03) if rule == "inclusive" else 0.0)
        assert everywhere > got.unit_iou[:5, 0].max() or rule == "strict"
        assert got.single_unit[0] != 5 and got.best_heldout_iou[0] == got.unit_iou[:5, 0].max()


def test_a_unit_covering_the_heldout_images_alone_is_still_a_unit():
    """Unit 0 is the concept's mask on the training images and fires on the whole held-out
    image (one image held out): it is no constant unit, so it stays the held-out best, which
    bounds the single unit's held-out IoU."""
    n, s, k = 10, 8, 4
    acts = np.random.default_rng(0).normal(size=(n, s, s, k)).astype(np.float32)
    planes = np.zeros((n, 1, s, s), np.int32)
    planes[:, 0][acts[..., 0] > 1] = 7
    [held] = cv.split_images(n, 0.1, 0)[1]
    acts[held, ..., 0] = 2.0
    planes[held, 0] = np.where(np.arange(s)[:, None] < 6, 7, 0)  # 75% of the image
    data = cv.ProbeData(acts, planes, np.zeros((n, 1), np.int32))
    cfg = cv.ProbeConfig(epochs=1, probe_batch_size=3, heldout_fraction=0.1)
    got = cv.train_concept_vectors(
        data, np.ones(k, np.float32), np.array([7]), cfg, mesh=parallel.data_mesh(1)
    )
    assert got.single_unit[0] == 0 and got.single_iou[0] == 0.75
    assert got.best_heldout_unit[0] == 0 and got.best_heldout_iou[0] == 0.75


@pytest.mark.parametrize("tie_rule", ["strict", "inclusive"])
def test_dead_units_give_no_best_heldout_unit(tie_rule):
    """Every unit dead (zero maps, thresholds 0): none overlaps the concept (strict) or each
    marks every pixel (inclusive), so there is no single unit and no held-out best either."""
    n = 10
    planes = np.zeros((n, 1, 8, 8), np.int32)
    planes[:, 0, :4] = 5
    data = cv.ProbeData(np.zeros((n, 4, 4, 3), np.float32), planes, np.zeros((n, 1), np.int32))
    got = cv.train_concept_vectors(
        data,
        np.zeros(3, np.float32),
        np.array([5]),
        cv.ProbeConfig(epochs=1, probe_batch_size=2),
        tie_rule=tie_rule,
        mesh=parallel.data_mesh(1),
    )
    assert got.single_unit[0] == cv.NO_UNIT and got.single_iou[0] == 0.0
    assert got.best_heldout_unit[0] == cv.NO_UNIT and got.best_heldout_iou[0] == 0.0

"""Unit ablation: per-class counts of every mask against a numpy loop of single evaluations."""

from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import ablation, ablation_files, parallel, rotation
from jaxdissect.models import zoo

K, CLASSES, N = 6, 4, 40


class _IntNet(nn.Module):
    """x [b, h, w, 3] -> hidden (1x1 conv, K units) -> ReLU -> spatial sum -> head.

    With small integer weights and inputs every float32 sum is exact, so the numpy
    reference computes the same logits bit for bit (and argmax ties break alike).
    """

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(K, name="hidden")(x))
        return nn.Dense(CLASSES, name="head")(h.sum((1, 2)))


def _int_variables(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "hidden": {
                "kernel": rng.integers(-3, 4, (3, K)).astype(np.float32),
                "bias": rng.integers(-2, 3, K).astype(np.float32),
            },
            "head": {
                "kernel": rng.integers(-3, 4, (K, CLASSES)).astype(np.float32),
                "bias": rng.integers(-2, 3, CLASSES).astype(np.float32),
            },
        }
    }


def _numpy_counts(variables, images, labels, mask, fill=None) -> np.ndarray:
    """Correct examples per class with the units of `mask` ablated: one plain forward."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h = np.maximum(images.astype(np.float64) @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    h = np.where(mask, 0.0 if fill is None else np.asarray(fill, np.float64), h)
    logits = h.sum((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]
    correct = logits.argmax(-1) == labels
    return np.bincount(labels[correct], minlength=CLASSES)


def _numpy_loss(variables, images, labels, mask) -> np.ndarray:
    """Summed cross-entropy of each class's examples with the units of `mask` zeroed."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h = np.maximum(images.astype(np.float64) @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    logits = np.where(mask, 0.0, h).sum((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return np.bincount(labels, weights=-logp[np.arange(len(labels)), labels], minlength=CLASSES)


def _batches(images, labels, size):
    out = []
    for s in range(0, len(labels), size):
        n = min(size, len(labels) - s)
        img = np.zeros((size, *images.shape[1:]), np.float32)
        lab = np.zeros(size, np.int32)
        img[:n], lab[:n] = images[s : s + n], labels[s : s + n]
        out.append({"image": img, "label": lab, "valid": np.arange(size) < n})
    return out


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    images = rng.integers(-2, 3, (N, 2, 3, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, N).astype(np.int32)
    return _int_variables(0), images, labels


@pytest.mark.parametrize("devices", [1, 8])
def test_counts_match_numpy_loop_of_single_evaluations(data, devices):
    variables, images, labels = data
    mesh = parallel.data_mesh(devices)
    ab = ablation.Ablator(_IntNet(), None, "hidden", mesh=mesh)
    rng = np.random.default_rng(2)
    # Random masks plus the adversarial ones: none, all, each single unit.
    masks = np.concatenate(
        [
            np.zeros((1, K), bool),
            np.ones((1, K), bool),
            np.eye(K, dtype=bool),
            rng.random((7, K)) < 0.4,
        ]
    )
    batches = _batches(images, labels, 16)  # 40 images: the last batch padded
    got = ab.counts(variables, batches, masks, num_classes=CLASSES, masks_per_call=4)
    want = np.stack([_numpy_counts(variables, images, labels, m) for m in masks])
    np.testing.assert_array_equal(got, want)
    fill = rng.integers(0, 3, K).astype(np.float32)
    got = ab.counts(variables, batches, masks, num_classes=CLASSES, fill=fill, masks_per_call=5)
    want = np.stack([_numpy_counts(variables, images, labels, m, fill) for m in masks])
    np.testing.assert_array_equal(got, want)


def test_losses_are_the_same_sums_on_any_devices_and_batch_size(data):
    """Each class's summed cross-entropy (which breaks ties of accuracy drop) is a float64
    sum in image order of the examples' losses: equal bit for bit on 1 or 8 devices and any
    batch size where each example's loss is (here: _IntNet's logits are exact integers; in
    general XLA may round a loss differently at another batch per device), and to numpy's
    within float32 rounding of each example's loss."""
    variables, images, labels = data
    rng = np.random.default_rng(3)
    masks = np.concatenate(
        [np.zeros((1, K), bool), np.eye(K, dtype=bool), rng.random((3, K)) < 0.5]
    )
    sums = []
    for devices, size in ((1, 5), (1, 16), (2, 8), (8, 16), (8, 24)):
        ab = ablation.Ablator(_IntNet(), None, "hidden", mesh=parallel.data_mesh(devices))
        batches = _batches(images, labels, size)
        sums.append(
            ab.counts_and_loss(variables, batches, masks, num_classes=CLASSES, masks_per_call=3)[1]
        )
    for other in sums[1:]:
        np.testing.assert_array_equal(other, sums[0])
    want = np.stack([_numpy_loss(variables, images, labels, m) for m in masks])
    np.testing.assert_allclose(sums[0], want, rtol=1e-6, atol=1e-5)  # float32 per example


def test_a_batch_that_does_not_split_over_the_devices_is_named(data):
    variables, images, labels = data
    ab = ablation.Ablator(_IntNet(), None, "hidden", mesh=parallel.data_mesh(8))
    with pytest.raises(ValueError, match="batch_size=5 is not divisible by the 8 devices"):
        ab.counts(variables, _batches(images, labels, 5), np.eye(K, dtype=bool), num_classes=4)


def test_no_evaluation_example_is_refused(data):
    """Batches of padding alone (an empty validation split) are refused in one line, not
    averaged into NaN curves."""
    variables, images, labels = data
    ab = ablation.Ablator(_IntNet(), None, "hidden", mesh=parallel.data_mesh(1))
    empty = [{**b, "valid": np.zeros_like(b["valid"])} for b in _batches(images, labels, 8)[:1]]
    with pytest.raises(ValueError, match="no evaluation example"):
        ablation.ablation_study(ab, variables, empty, num_units=K, num_classes=4)


def test_each_device_sums_its_own_rows(data):
    """The step has no collective: with an all-reduce in it, several batches' steps in flight
    deadlocked the CPU backend's execution threads on 2 devices (each device's part waiting
    in a different step's all-reduce)."""
    variables, images, labels = data
    mesh = parallel.data_mesh(8)
    ab = ablation.Ablator(_IntNet(), None, "hidden", mesh=mesh)
    batch = parallel.put_global_batch(ablation._eval_fields(_batches(images, labels, 16)[0]), mesh)
    acts = ab._layer_step(variables, batch["image"])(variables, batch["image"])
    masks = np.zeros((2, K), bool)
    hlo = ab._step.lower(variables, masks, None, batch, acts, CLASSES).compile().as_text()
    assert "num_partitions=8" in hlo
    assert not re.search("all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter", hlo)


def test_study_ranks_units_and_ablates_top_n_like_numpy(data, tmp_path):
    variables, images, labels = data
    ab = ablation.Ablator(_IntNet(), None, "hidden", mesh=parallel.data_mesh(1))
    batches = _batches(images, labels, 8)
    res = ablation.ablation_study(
        ab,
        variables,
        batches,
        num_units=K,
        num_classes=CLASSES,
        ns=(1, 2, 4, 100),
        work_dir=tmp_path / "work",
        chunk=3,
    )
    none = np.zeros(K, bool)
    base = _numpy_counts(variables, images, labels, none)
    total = np.bincount(labels, minlength=CLASSES)
    np.testing.assert_array_equal(res.base, base)
    np.testing.assert_array_equal(res.total, total)
    acc0 = base / total
    drops = np.zeros((K, CLASSES))
    for k in range(K):
        drops[k] = acc0 - _numpy_counts(variables, images, labels, np.eye(K, dtype=bool)[k]) / total
    np.testing.assert_allclose(res.drop, drops)
    eye = np.eye(K, dtype=bool)
    rise = np.stack([_numpy_loss(variables, images, labels, eye[k]) for k in range(K)])
    rise = (rise - _numpy_loss(variables, images, labels, none)) / total
    np.testing.assert_allclose(res.loss_rise, rise, rtol=1e-5, atol=1e-5)
    assert res.ns == (1, 2, 4)  # N above the layer's width left out
    for c in range(CLASSES):
        # Units by decreasing drop, ties by the rise of the class's loss, then by unit.
        order = sorted(range(K), key=lambda k: (-drops[k, c], -res.loss_rise[k, c], k))
        np.testing.assert_array_equal(res.order[c], order)
        for i, n in enumerate(res.ns):
            mask = np.isin(np.arange(K), order[:n])
            np.testing.assert_array_equal(
                res.top[c, i], _numpy_counts(variables, images, labels, mask)
            )
        own, rest = res.curve(c)
        assert own[0] == pytest.approx(acc0[c])
        assert rest[0] == pytest.approx(np.delete(acc0, c).mean())
    # Resumed from the stored chunks: the same counts without evaluating again.
    stored = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert stored[0] == "single-00000.npz" and len(stored) == 3 + 4
    again = ablation.ablation_study(
        _Refuse(),
        variables,
        batches,
        num_units=K,
        num_classes=CLASSES,
        ns=(1, 2, 4, 100),
        work_dir=tmp_path / "work",
        chunk=3,
    )
    np.testing.assert_array_equal(again.top, res.top)
    np.testing.assert_array_equal(again.single, res.single)


class _Refuse:
    def counts_and_loss(self, *args, **kwargs):
        raise AssertionError("a stored chunk was evaluated again")


class _Planted:
    """Counts a function of the mask (unit k costs class k % C its k + 1 examples); records
    the masks it evaluates."""

    def __init__(self):
        self.evaluated = 0

    def counts_and_loss(self, variables, batches, masks, *, num_classes, **kwargs):
        self.evaluated += len(masks)
        cost = np.zeros((K, num_classes), np.int64)
        cost[np.arange(K), np.arange(K) % num_classes] = np.arange(K) + 1
        correct = 100 - masks.astype(np.int64) @ cost
        return correct, np.zeros(correct.shape)


def test_stored_top_n_chunks_are_reused_for_their_own_masks_only(tmp_path):
    """A rerun in the same work folder with other N (as many) evaluates the top N again,
    and reuses the single-unit chunks."""
    batches = [{"image": np.zeros((300, 1, 1, 3)), "label": np.arange(300) % CLASSES}]

    def study(ablator, ns, work):
        return ablation.ablation_study(
            ablator, None, batches, num_units=K, num_classes=CLASSES, ns=ns, work_dir=work
        )

    study(_Planted(), (1, 2), tmp_path / "work")
    again = _Planted()
    second = study(again, (3, 6), tmp_path / "work")
    fresh = study(_Planted(), (3, 6), None)
    np.testing.assert_array_equal(second.top, fresh.top)
    np.testing.assert_array_equal(second.single, fresh.single)
    assert again.evaluated == CLASSES * 2  # the top masks only


class _ClassToken(nn.Module):
    """A class token before 2x2 patches; the head reads the class token only."""

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(K, (4, 4), strides=(4, 4), name="embed")(x)
        b, h, w, c = y.shape
        cls = self.param("cls", nn.initializers.normal(1.0), (1, 1, c))
        t = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), y.reshape(b, h * w, c)], 1)
        t = nn.relu(nn.Dense(K, name="tokens")(t))
        return nn.Dense(CLASSES, name="head")(t[:, 0] + t[:, 1:].mean(1))


def test_a_token_layer_with_a_class_token_is_ablated_and_averaged_in_every_token():
    from jaxdissect import interventions

    module = _ClassToken()
    rng = np.random.default_rng(3)
    images = rng.normal(size=(16, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, 16).astype(np.int32)
    variables = jax.jit(module.init)(jax.random.key(0), images[:1])
    batches = _batches(images, labels, 8)
    _, state = module.apply(variables, images, capture_intermediates=True)
    out = np.asarray(state["intermediates"]["tokens"]["__call__"][0], np.float64)  # [16, 5, K]
    fill = ablation.unit_means(module, variables, "tokens", batches, input_spec=None, input_size=8)
    np.testing.assert_allclose(fill, out.reshape(-1, K).mean(0), rtol=1e-5)
    masks = np.eye(K, dtype=bool)[:3]
    ab = ablation.Ablator(module, None, "tokens", mesh=parallel.data_mesh(1))
    got = ab.counts(variables, batches, masks, num_classes=CLASSES, fill=fill)
    preds = jax.jit(
        jax.vmap(
            lambda m: interventions.intervene(
                module, {"tokens": interventions.Ablate(m, fill)}
            ).apply(variables, images)
        )
    )(masks).argmax(-1)
    for pred, row in zip(np.asarray(preds), got, strict=True):
        np.testing.assert_array_equal(row, np.bincount(labels[pred == labels], minlength=CLASSES))


def test_top_n_masks_and_ranking_on_planted_drops():
    drop = np.array([[0.0, 0.5], [0.3, 0.5], [0.3, np.nan], [0.9, -0.1]])  # [K=4, C=2]
    order = ablation.ranking(drop)
    np.testing.assert_array_equal(order, [[3, 1, 2, 0], [0, 1, 3, 2]])
    # Equal drops: the larger rise of the loss first.
    rise = np.array([[0.0, 0.1], [0.0, 0.2], [0.0, 0.0], [0.0, 0.0]])
    np.testing.assert_array_equal(ablation.ranking(drop, rise)[1], [1, 0, 3, 2])
    # Rises within float noise (1e-7 here) are ties: by unit, whatever their sign.
    noise = np.array([[0.0, 3e-7], [0.0, 1e-7], [0.0, 0.0], [0.0, -2e-7]])
    np.testing.assert_array_equal(ablation.ranking(drop, noise)[1], [0, 1, 3, 2])
    np.testing.assert_array_equal(ablation.ranking(drop, noise + rise)[1], [1, 0, 3, 2])
    masks = ablation.top_n_masks(order, [1, 3])
    np.testing.assert_array_equal(masks[0, 0], [False, False, False, True])
    np.testing.assert_array_equal(masks[1, 1], [True, True, False, True])


def test_bad_parameters_are_named():
    with pytest.raises(ValueError, match="value='median'"):
        ablation.check_value("median")
    with pytest.raises(ValueError, match="top_n=\\[0\\]"):
        ablation.top_ns(8, [0, 2])
    with pytest.raises(ValueError, match="labels \\[7\\] outside 0..3"):
        ablation.class_totals([{"image": np.zeros((2, 1, 1, 3)), "label": np.array([7, 1])}], 4)


def test_finding_counts_defining_labels_of_top_units_against_the_layer():
    # 2 classes of 10 examples, 4 units; class 0 needs units 1 and 2, class 1 unit 3.
    res = ablation.AblationResult(
        total=np.array([10, 10]),
        base=np.array([10, 8]),
        single=np.array([[10, 8], [4, 8], [6, 8], [10, 2]]),
        ns=(1, 2),
        top=np.array([[[4, 8], [0, 7]], [[10, 2], [9, 0]]]),
        order=np.array([[1, 2, 0, 3], [3, 0, 1, 2]]),
        value="zero",
    )
    np.testing.assert_allclose(res.drop[:, 0], [0, 0.6, 0.4, 0])
    labels = [
        {"name": "sand", "interpretable": True},
        {"name": "water", "interpretable": True},
        {"name": "beach-s", "interpretable": True},
        {"name": "road", "interpretable": False},  # below the threshold: unlabelled
    ]
    f = ablation_files.finding(
        res,
        ["beach-s", "street-s"],
        labels,
        defining={"beach-s": {"sand", "water"}, "street-s": {"road"}},
        top=2,
    )
    # N = 1: each class loses 0.6, the other 0; N = 2: 1.0 and 0.8, the other 0.1 each.
    np.testing.assert_allclose(f["class_drop"], [0, 0.6, 0.9])
    np.testing.assert_allclose(f["others_drop"], [0, 0, 0.1])
    # Top 2 of beach-s: water (defining), beach-s (the class); of street-s: road
    # (unlabelled), sand.
    assert f["per_class"]["beach-s"]["share_defining"] == 0.5
    assert f["share_top_units_defining"] == 0.25
    assert f["share_layer_units_defining"] == pytest.approx((2 / 4 + 0) / 2)
    assert f["share_top_units_the_class"] == 0.25


def test_a_class_without_images_gets_no_ranking_and_strict_json(tmp_path):
    """Class 1 has no validation images: no units ranked or removed for it, no NaN in
    ablation.json (strict JSON), blank cells in the CSVs, the plot's means over class 0."""
    import csv
    import json

    res = ablation.AblationResult(
        total=np.array([10, 0]),
        base=np.array([8, 0]),
        single=np.array([[8, 0], [4, 0], [6, 0]]),
        ns=(1, 2),
        top=np.array([[[4, 0], [2, 0]], [[8, 0], [8, 0]]]),
        order=np.array([[1, 2, 0], [0, 1, 2]]),
        value="zero",
    )
    labels = [{"name": None, "category": None, "iou": 0.0, "interpretable": False}] * 3
    doc = ablation_files.write_ablation_files(tmp_path, res, ["a", "b"], labels, {"layer": "x"})
    text = (tmp_path / "ablation.json").read_text()

    def refuse(constant):
        raise ValueError(f"{constant} in ablation.json")

    assert json.loads(text, parse_constant=refuse)["classes"] == doc["classes"]
    empty = doc["classes"][1]
    assert empty["examples"] == 0 and empty["accuracy"] is None and empty["units"] == []
    assert empty["curve"]["class_accuracy"] == [None, None, None]
    assert empty["curve"]["others_accuracy"] == [0.8, None, None]  # N = 0: class a's
    assert [u["unit"] for u in doc["classes"][0]["units"]] == [1, 2, 0]
    rows = list(csv.DictReader((tmp_path / "ablation_classes.csv").open()))
    assert [(r["class"], r["n_removed"], r["removed_units"]) for r in rows] == [
        ("a", "0", ""),
        ("a", "1", "1"),
        ("a", "2", "1 2"),
        ("b", "0", ""),
    ]
    units = list(csv.DictReader((tmp_path / "ablation_units.csv").open()))
    assert [u["drop_b"] for u in units] == ["", "", ""]
    assert [u["drop_a"] for u in units] == ["0.000000", "0.400000", "0.200000"]


def test_unit_means_are_the_layer_outputs_mean_over_valid_images_and_positions(data):
    variables, images, labels = data
    got = ablation.unit_means(
        _IntNet(),
        variables,
        "hidden",
        _batches(images, labels, 16),
        input_spec=None,
        input_size=2,
    )
    p = variables["params"]["hidden"]
    want = (images.astype(np.float64) @ p["kernel"] + p["bias"]).mean((0, 1, 2))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def _numpy_logits(variables, images, mask) -> np.ndarray:
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    h = np.maximum(images.astype(np.float64) @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
    return np.where(mask, 0.0, h).sum((1, 2)) @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("devices", [1, 8])
def test_predictions_task_counts_agreement_with_the_intact_top1_like_numpy(data, devices):
    """Labels from the intact network's own top-1: per class of the 2 most frequent
    predictions and the rest ('other'), the images whose top-1 is unchanged by each mask."""
    _, images, _ = data
    variables = _int_variables(7)  # predicts 4 classes (21, 4, 14, 1 images)
    intact = _numpy_logits(variables, images, np.zeros(K, bool))
    task = ablation.prediction_task(intact, 2, logit_names=["a", "b", "c", "d"])
    # The classes by a plain loop: most frequent predictions first, ties by logit index.
    pred = [int(np.argmax(row)) for row in intact]
    freq = {c: pred.count(c) for c in set(pred)}
    top = sorted(freq, key=lambda c: (-freq[c], c))[:2]
    group = np.array([top.index(p) if p in top else 2 for p in pred])
    assert len(freq) > 2 and list(task.classes) == top
    assert task.class_names == (*("abcd"[c] for c in top), ablation.OTHER)
    np.testing.assert_array_equal(task.label, group)
    batches = ablation.prediction_batches(images, task, 16)  # 40 images: the last padded
    ab = ablation.Ablator(_IntNet(), None, "hidden", mesh=parallel.data_mesh(devices))
    rng = np.random.default_rng(3)
    masks = np.concatenate(
        [np.zeros((1, K), bool), np.eye(K, dtype=bool), rng.random((5, K)) < 0.5]
    )
    got = ab.counts(variables, batches, masks, num_classes=3, masks_per_call=4)
    for m, row in zip(masks, got, strict=True):
        same = _numpy_logits(variables, images, m).argmax(-1) == np.array(pred)
        np.testing.assert_array_equal(row, np.bincount(group[same], minlength=3))
    assert got[0].tolist() == np.bincount(group, minlength=3).tolist()  # intact: all agree


def test_prediction_task_on_planted_logits():
    logits = np.zeros((7, 5))
    # Predictions 3, 3, 1, 1, 4, 0, 3: frequencies 3 (logit 3), 2 (logit 1), then 1 each.
    for i, c in enumerate([3, 3, 1, 1, 4, 0, 3]):
        logits[i, c] = 1.0
    task = ablation.prediction_task(logits, 3)
    assert task.classes.tolist() == [3, 1, 0]  # the tie of 0 and 4 goes to the lower index
    assert task.class_names == ("logit3", "logit1", "logit0", ablation.OTHER)
    assert task.label.tolist() == [0, 0, 1, 1, 3, 2, 0]
    # K at least the predicted classes: no 'other' class.
    everything = ablation.prediction_task(logits, 10)
    assert everything.classes.tolist() == [3, 1, 0, 4] and ablation.OTHER not in (
        everything.class_names
    )
    with pytest.raises(ValueError, match="top_classes=0"):
        ablation.prediction_task(logits, 0)
    with pytest.raises(ValueError, match=r"^the network outputs no logits \(num_classes=0 "):
        ablation.prediction_task(logits[:, :0], 1)
    with pytest.raises(ValueError, match="logit_names has 2 names for the network's 5 logits"):
        ablation.prediction_task(logits, 1, logit_names=["x", "y"])


def test_class_names_file_one_a_line(tmp_path):
    path = tmp_path / "names.txt"
    path.write_text("tench, Tinca tinca\n<b>goldfish</b>  \n\n\n")  # blank lines at the end
    assert ablation.read_logit_names(path) == ("tench, Tinca tinca", "<b>goldfish</b>")
    path.write_text("a\n\nb\n")
    with pytest.raises(ValueError, match=r"names.txt: line 2 is blank; one class name a line"):
        ablation.read_logit_names(path)
    path.write_bytes(b"a\n\xff\n")
    with pytest.raises(ValueError, match=r"names.txt: not UTF-8 text \(byte 2\)"):
        ablation.read_logit_names(path)


def test_the_script_refuses_models_it_cannot_ablate_in_one_line():
    """NNX modules (rules are Linen interceptors), outputs that are no [images, classes]
    logits and networks without a head (their pooled features are no logits) are named
    before any pass, not met as a traceback inside one (or read as classes)."""
    from types import SimpleNamespace

    from flax import nnx

    from jaxdissect.preprocess import InputSpec
    from tests.experiment_testing import script

    check = script("ablation")._check_classifier
    spec = InputSpec(8, (0.0,) * 3, (1.0,) * 3)

    class Scalar(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(x).sum()

    module = Scalar()
    variables = module.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
    loaded = SimpleNamespace(module=module, variables=variables, input_spec=spec, apply_kwargs={})
    with pytest.raises(ValueError, match=r"^--model=m: its output for 2 images is shape \(\);"):
        check(loaded, "m")
    nnx_model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="^--model=m: ablation needs a flax.linen Module"):
        check(SimpleNamespace(module=nnx_model, input_spec=spec), "m")
    # Without a head, the output is [images, features]: shaped as logits, refused by name.
    headless = SimpleNamespace(module=zoo.build("resnet18", num_classes=0, width=0.125))
    with pytest.raises(ValueError, match=r"^--model=m: the network outputs no logits \(num_"):
        check(headless, "m")
    with pytest.raises(ValueError, match=r"^the network outputs no logits \(num_classes=0 "):
        rotation.classifier(headless.module, spec)


def test_the_scripts_mask_chunks_are_keyed_by_devices_backend_and_eval_batch_size():
    """ablation.json records devices and batch (a unit order near a rounding boundary can
    change with either), and a GPU's default precision is not a CPU's, so chunks stored on
    other devices, another backend or batches are not reused."""
    from jaxdissect.preprocess import TORCHVISION
    from tests.experiment_testing import mesh_of, script

    def key(mesh, batch_size):
        return script("ablation").chunk_key(
            "model", TORCHVISION, "conv5", "data", "zero", mesh=mesh, batch_size=batch_size
        )

    one, two, gpu = parallel.data_mesh(1), parallel.data_mesh(2), mesh_of("gpu", "H100")
    keys = {key(one, 8), key(two, 8), key(one, 16), key(gpu, 8)}
    assert len(keys) == 4 and key(one, 8) == key(one, 8)


class _FixedSize(nn.Module):
    """Its parameters fix the input's size (a Dense over the flattened pixels), as a ViT's
    position embeddings do."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(K, name="hidden")(x.reshape(x.shape[0], -1)))
        return nn.Dense(CLASSES, name="head")(h)


def test_images_of_another_size_than_the_input_are_resized_by_the_spec_as_evaluated():
    """The layer's output is captured on the images `input_spec` resized, not on the raw
    ones: a model whose weights fix its input size ablates 8x8 images fed at 4x4."""
    from jaxdissect import interventions
    from jaxdissect.preprocess import InputSpec

    module, spec = _FixedSize(), InputSpec(4, (0.0,) * 3, (1.0,) * 3, scale=1 / 255)
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (16, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, 16).astype(np.int32)
    variables = jax.jit(module.init)(jax.random.key(0), np.zeros((1, 4, 4, 3), np.float32))
    batches = _batches(images, labels, 8)
    masks = np.eye(K, dtype=bool)[:3]
    ab = ablation.Ablator(module, spec, "hidden", mesh=parallel.data_mesh(1))
    got = ab.counts(variables, batches, masks, num_classes=CLASSES)
    for m, row in zip(masks, got, strict=True):
        net = interventions.intervene(module, {"hidden": interventions.Ablate(m)})
        pred = np.asarray(net.apply(variables, spec(images))).argmax(-1)
        np.testing.assert_array_equal(row, np.bincount(labels[pred == labels], minlength=CLASSES))


def test_an_n0_row_that_disagrees_with_the_targets_is_warned_of():
    """Agreement at N = 0 is every image unless two compiled programs round a near-tied
    top-1 otherwise: then the script has a warning naming how many images agree."""
    base = ablation.AblationResult(
        total=np.array([5, 3]),
        base=np.array([5, 3]),
        single=np.zeros((2, 2), np.int64),
        ns=(),
        top=np.zeros((2, 0, 2), np.int64),
        order=np.zeros((2, 2), np.int64),
        value="zero",
    )
    assert ablation.intact_disagreement(base) is None
    off = dataclasses.replace(base, base=np.array([5, 2]))
    assert "on 7 of 8 images" in ablation.intact_disagreement(off)

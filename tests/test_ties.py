"""Units whose threshold sits on a tie: statistics, states, labels, files and report."""

from __future__ import annotations

import csv
import dataclasses
import json

import jax
import numpy as np
import pytest

from jaxdissect import results, tally, tie_counts, ties
from jaxdissect.models.load import init_variables
from jaxdissect.report import build, strips
from jaxdissect.tie_rule import TIE_RULES
from tests.reference import random_probe, reference_dissect, reference_ties


def _ties(maps, thresholds, quantile, valid=None, batch=4):
    """Tie statistics in padded batches under jit, merged from two halves."""
    n, _, _, k = maps.shape
    valid = np.ones(n, bool) if valid is None else valid
    update = jax.jit(tie_counts.ties_update)
    halves = []
    for part in (slice(0, n // 2), slice(n // 2, n)):
        state = tie_counts.ties_init(k)
        m, v = maps[part], valid[part]
        for start in range(0, len(m), batch):
            chunk, ok = m[start : start + batch], v[start : start + batch]
            pad = batch - len(chunk)
            chunk = np.pad(chunk, ((0, pad), (0, 0), (0, 0), (0, 0)), constant_values=99.0)
            ok = np.pad(ok, (0, pad))
            state = update(state, chunk, thresholds, ok)
        halves.append(state)
    merged = tie_counts.ties_merge(*halves)
    return ties.UnitTies.from_arrays(tie_counts.ties_to_numpy(merged), thresholds, quantile)


def test_tie_statistics_equal_reference():
    probe = random_probe(0)
    acts, thresholds = probe["acts"], probe["thresholds"]
    valid = np.ones(len(acts), bool)
    valid[5] = False  # an invalid example counts nothing
    got = _ties(acts, thresholds, 0.005, valid)
    want = reference_ties(acts, thresholds, 0.005, valid)
    np.testing.assert_array_equal(got.minimum, want["minimum"])
    np.testing.assert_array_equal(got.maximum, want["maximum"])
    np.testing.assert_array_equal(got.at_threshold, want["at_threshold"])
    assert got.values == want["values"] == 10 * acts.shape[1] * acts.shape[2]
    assert list(got.states()) == list(want["state"])
    # The probe plants each state: 0 dead, 1 a mostly-zero ReLU unit at T = 0, the last clipped.
    assert got.states()[0] == "dead" and got.states()[1] == "tied"
    assert got.states()[-1] == "saturated" and "" in list(got.states())
    np.testing.assert_allclose(got.tie_fraction, want["at_threshold"] / want["values"])


def test_states_planted():
    """Each rule of `unit_states` on hand-made statistics, including its boundaries."""
    thresholds = np.array([0.0, 6.0, 6.0, 0.0, 1.5, 3.0], np.float32)
    minimum = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], np.float32)
    maximum = np.array([0.0, 6.0, 6.0, 4.0, 6.0, 3.0], np.float32)
    # 1000 values, quantile 0.005: more than 5 at T is heavy.
    at = np.array([1000, 40, 5, 600, 6, 6])
    got = ties.unit_states(thresholds, minimum, maximum, at, 1000, 0.005)
    assert list(got) == ["dead", "saturated", "", "tied", "tied", "saturated"]


def test_thresholds_on_a_maximum_only_an_estimate_gives_are_told():
    """T at the maximum with no more than the quantile's share there: an exact threshold is
    below such a spike (the quantile interpolates into the values under it), so only a
    sketch puts T there, and its strict mask is empty; the pipeline warns of them."""
    values = np.concatenate([np.linspace(0.0, 5.0, 995), np.full(5, 6.0)]).astype(np.float32)
    exact = np.float32(np.quantile(values, 0.995))
    assert exact < 6.0 and (values > exact).sum() == 5  # exact: the spike is the mask
    base = dict(minimum=np.zeros(3, np.float32), values=1000, quantile=0.005)
    unit_ties = ties.UnitTies(
        thresholds=np.array([6.0, exact, 6.0], np.float32),  # sketched onto the spike
        maximum=np.array([6.0, 6.0, 6.0], np.float32),
        at_threshold=np.array([5, 1, 40]),  # the last: saturated, as exact mode finds it
        **base,
    )
    assert list(unit_ties.on_maximum()) == [True, False, False]
    assert unit_ties.sketch_warning("conv5").startswith("layer conv5: 1 units' sketched")
    assert (
        dataclasses.replace(unit_ties, at_threshold=np.array([6, 1, 40])).sketch_warning("conv5")
        is None
    )


def _labels():
    from jaxdissect.labelspace import LabelSpace

    names = ("-", "red-c", "blue-c", "sky", "street-s")
    primary = np.array([-1, 0, 0, 1, 2], np.int32)
    return LabelSpace(("color", "object", "scene"), names, primary, (False, False, True))


def _layer(with_ties: bool = True) -> results.LayerResult:
    """Units: 0 ordinary, 1 no active pixel, 2 fires but overlaps nothing, 3 dead (fires
    everywhere under the inclusive rule), 4 saturated with a mask (inclusive)."""
    inter = np.array(
        [[0, 30, 0, 5, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 50, 50, 50, 100], [0, 9, 0, 0, 0]]
    )
    unit_total = np.array([40, 0, 7, 100, 20])
    counts = {
        "intersection": inter,
        "label_pixels": np.array([0, 50, 50, 50, 100]),
        "unit_pixels": np.repeat(unit_total[:, None], 3, 1),
        "unit_total": unit_total,
        "images": np.int64(1),
    }
    unit_ties = ties.UnitTies(
        thresholds=np.array([0.7, 2.0, 0.1, 0.0, 6.0], np.float32),
        minimum=np.array([0.0, 0.0, 0.0, 0.0, 0.0], np.float32),
        maximum=np.array([3.0, 2.0, 0.9, 0.0, 6.0], np.float32),
        at_threshold=np.array([1, 1, 1, 1000, 200]),
        values=1000,
        quantile=0.005,
    )
    return results.layer_result("head", counts, _labels(), ties=unit_ties if with_ties else None)


def test_units_that_cannot_fire_get_no_label(tmp_path):
    layer = _layer()
    assert layer.best_label.tolist() == [1, -1, -1, -1, 1]
    assert layer.best_category.tolist() == [0, -1, -1, -1, 0]
    assert layer.best_iou[1:4].tolist() == [0.0, 0.0, 0.0]
    assert list(layer.state) == ["", "no active pixels", "no concept overlap", "dead", "saturated"]
    assert layer.cannot_fire.tolist() == [False, True, False, True, False]
    # Without tie statistics the dead unit's all-covering mask would get a label.
    assert _layer(with_ties=False).best_label[3] >= 0
    assert (_layer(with_ties=False).category_label[3] >= 0).any()
    # With them it has none in any category either (nor do the others without a label).
    assert (layer.category_label[1:4] == -1).all() and (layer.category_iou[1:4] == 0).all()
    assert (layer.category_label[[0, 4]] >= 0).any(1).all()
    summary = results.layer_summary(layer)
    assert summary.cannot_fire == 2 and summary.unlabelled == 3
    assert summary.states == {
        "dead": 1,
        "saturated": 1,
        "tied": 0,
        "no active pixels": 1,
        "no concept overlap": 1,
    }
    (path,) = results.write_tally_csvs(tmp_path, [layer])
    rows = {int(r["unit"]): r for r in csv.DictReader(path.open(newline=""))}
    for unit in (2, 3, 4):  # 1-based
        assert rows[unit]["label"] == "" and rows[unit]["category"] == ""
    cats = [f"{cat}-label" for cat in layer.labels.categories]
    assert [rows[4][c] for c in cats] == [""] * len(cats)
    assert rows[4]["color-iou"] == "0.0" and rows[4]["color-activation"] == "100"
    assert rows[1]["label"] == "red-c" and rows[1]["category"] == "color"
    results.write_results_json(tmp_path / "results.json", [layer], {})
    record = json.loads((tmp_path / "results.json").read_text())["layers"][0]
    units = record["units"]
    assert [u["state"] for u in units] == list(layer.state)
    assert [u["label"] for u in units] == [1, -1, -1, -1, 1]
    assert units[3]["name"] is None and units[3]["category"] is None
    assert all(c["name"] is None and c["iou"] == 0 for c in units[3]["categories"].values())
    assert units[4]["tie_fraction"] == 0.2 and units[0]["tie_fraction"] == 0.001
    assert record["summary"]["cannot_fire"] == 2


def test_labels_match_reference_with_states():
    """The reference's no-label rule, from activations, for both tie rules."""
    probe = random_probe(1, num_units=6)
    for rule in TIE_RULES:
        ref = reference_dissect(
            probe["acts"],
            probe["thresholds"],
            probe["pixel_labels"],
            probe["image_labels"],
            probe["labels"],
            tie_rule=rule,
        )
        unit_ties = ties.UnitTies.from_arrays(ref["ties"], probe["thresholds"], 0.005)
        layer = results.layer_result("l", ref["counts"], probe["labels"], ties=unit_ties)
        assert layer.best_label.tolist() == [u["label"] for u in ref["units"]], rule
        assert layer.best_label[0] == -1  # dead under both rules
        # The clipped unit: nothing strictly, its positions at the cap inclusively.
        assert (layer.best_label[-1] == -1) == (rule == "strict")


def test_strip_dims_with_the_tie_rule():
    images = np.full((2, 4, 4, 3), 200, np.uint8)
    maps = np.zeros((2, 4, 4), np.float32)
    maps[:, :2] = 6.0  # at the cap, equal to the threshold
    strict = strips.unit_strip(images, maps, 6.0, gap=0)
    inclusive = strips.unit_strip(images, maps, 6.0, gap=0, tie_rule="inclusive")
    assert (strict == 40).all()  # all dimmed: nothing is > T
    assert (inclusive[:2] == 200).all() and (inclusive[2:] == 40).all()
    with pytest.raises(ValueError, match="tie_rule"):
        strips.unit_strip(images, maps, 6.0, tie_rule=">=")


class _Source:
    seg_size = (8, 8)

    def read_image(self, i: int) -> np.ndarray:
        return np.full((8, 8, 3), 10 * i, np.uint8)


def test_report_cards_of_units_that_cannot_fire(tmp_path):
    layer = _layer()
    k = layer.num_units
    top = np.tile(np.arange(2)[:, None], (1, k)).astype(np.int32)
    maps = np.ones((2, 2, 2, k), np.float32)
    build.write_dissection_report(
        tmp_path,
        "m",
        "d",
        {},
        [layer],
        {"head": np.full(k, 0.5, np.float32)},
        {"head": top},
        {"head": maps},
        _Source(),
        tie_rule="strict",
        strip_height=8,
    )
    strips_written = sorted(p.name for p in (tmp_path / "strips").rglob("*.jpg"))
    # Units 1 (no active pixel) and 3 (dead) have no strip of arbitrary images.
    assert strips_written == ["unit0000.jpg", "unit0002.jpg", "unit0004.jpg"]
    cards = {c.unit: c for c in build.unit_cards(layer, {}, 3)}
    assert (cards[3].label, cards[3].category, cards[3].state) == ("", "", "dead")
    assert cards[1].label == "" and cards[1].state == "no active pixels"
    assert cards[1].runners_up == ()
    assert cards[4].label == "red-c" and cards[4].state.startswith("saturated: 20%")
    page = (tmp_path / "layer-head.html").read_text()
    assert ">dead<" in page and ">no active pixels<" in page
    assert "cannot fire" in page and "dead: 1, saturated: 1" in page
    assert '<a href="tally-head.csv">tally.csv</a>' in page
    index = (tmp_path / "index.html").read_text()
    assert "cannot fire" in index


# ----------------------------------------------------------------------------- engine


class _ClipNet:
    """A conv whose unit 0 is dead (constant 0) and whose others clip at 6 like ReLU6."""

    @staticmethod
    def make():
        import flax.linen as nn
        import jax.numpy as jnp

        class Act(nn.Module):
            @nn.compact
            def __call__(self, x):
                return jax.nn.relu6(x * 8.0).at[..., 0].set(0.0)

        class Net(nn.Module):
            @nn.compact
            def __call__(self, x):
                x = Act(name="act")(nn.Conv(4, (3, 3), strides=4, name="conv")(x))
                return x.mean((1, 2))

        net = Net()
        return net, init_variables(net, jnp.zeros((1, 32, 32, 3)), seed=0)


@pytest.fixture(scope="module")
def tiny_probe(tmp_path_factory):
    from jaxdissect.data import synthetic
    from jaxdissect.data.broden import Broden

    root = synthetic.generate_tiny(tmp_path_factory.mktemp("ties") / "broden", num_images=9)
    return Broden.open(root)


@pytest.mark.parametrize(
    ("threshold_on", "tie_rule", "devices"),
    [
        ("raw", "strict", 1),
        # Thresholds among upsampled values, as users' runs compile them (tests/conftest.py).
        pytest.param("upsampled", "inclusive", 8, marks=pytest.mark.optimized),
        ("raw", "inclusive", 8),
    ],
)
def test_engine_tie_statistics_and_rule(tiny_probe, threshold_on, tie_rule, devices):
    from jaxdissect import capture, engine, parallel, quantiles
    from jaxdissect.preprocess import InputSpec
    from tests.reference import reference_counts

    spec = InputSpec(32, (120.0,) * 3, (60.0,) * 3)
    net, variables = _ClipNet.make()
    tap = capture.make_tap(net, variables, ["act"], input_shape=(32, 32, 3))
    settings = engine.Settings(
        quantile=0.05,
        quantile_mode="exact",
        threshold_on=threshold_on,
        tie_rule=tie_rule,
        activation_dtype="float32",
        batch_size=8,
    )
    dissector = engine.Dissector(
        tap,
        tiny_probe,
        settings,
        input_spec=spec,
        model_key="clip",
        mesh=parallel.data_mesh(devices),
        progress=False,
        num_threads=0,
    )
    got = dissector.run(tap.variables)["act"]
    images = np.stack([tiny_probe.read_image(i) for i in range(len(tiny_probe))])
    acts = np.asarray(tap.fn(tap.variables, spec(images))["act"], np.float32)
    maps = acts
    if threshold_on == "upsampled":
        # The tally's upsampling (tested against the formula in test_tally), so that values
        # and thresholds agree to the bit.
        maps = np.asarray(tally.upsample(acts, tuple(tiny_probe.seg_size)))
    thresholds = quantiles.reference_threshold(maps.reshape(-1, maps.shape[-1]), 0.05)
    if threshold_on == "raw":
        np.testing.assert_array_equal(got.thresholds, thresholds)
    else:  # upsampled under another jit: values may round an ulp apart, except at 0 and 6
        np.testing.assert_allclose(got.thresholds, thresholds, rtol=1e-6)
        exact = np.isin(thresholds, [0.0, 6.0])
        thresholds = np.where(exact, thresholds, got.thresholds)
    want = reference_ties(maps, thresholds, 0.05)
    if threshold_on == "raw":
        np.testing.assert_array_equal(got.ties.minimum, want["minimum"])
        np.testing.assert_array_equal(got.ties.maximum, want["maximum"])
        np.testing.assert_array_equal(got.ties.at_threshold, want["at_threshold"])
    else:
        np.testing.assert_allclose(got.ties.minimum, want["minimum"], rtol=1e-6)
        np.testing.assert_allclose(got.ties.maximum, want["maximum"], rtol=1e-6)
        np.testing.assert_array_equal(got.ties.at_threshold[exact], want["at_threshold"][exact])
    assert got.ties.values == want["values"]
    states = list(got.ties.states())
    assert states == list(want["state"]) and states[0] == "dead" and "saturated" in states
    examples = [tiny_probe[i] for i in range(len(tiny_probe))]
    counts = reference_counts(
        acts,
        thresholds,
        np.stack([e["pixel_labels"] for e in examples]),
        np.stack([e["image_labels"] for e in examples]),
        tiny_probe.labels,
        tie_rule=tie_rule,
    )
    for key in ("intersection", "unit_pixels", "unit_total"):
        if threshold_on == "raw":  # upsampled thresholds: an ulp apart from the reference's
            np.testing.assert_array_equal(got.counts[key], counts[key], err_msg=key)
    # Dead and saturated-strict units cannot fire; the dead one gets no label either way.
    layer = results.layer_result("act", got.counts, tiny_probe.labels, ties=got.ties)
    assert layer.best_label[0] == -1 and layer.cannot_fire[0]


def test_tie_rule_setting_is_checked_and_keyed():
    from jaxdissect import engine

    with pytest.raises(ValueError, match="tie_rule='>='.*strict, inclusive"):
        engine.Settings(tie_rule=">=")
    strict, inclusive = engine.Settings(), engine.Settings(tie_rule="inclusive")
    assert strict.pass1() == inclusive.pass1() and strict.pass2() != inclusive.pass2()

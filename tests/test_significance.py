"""Permutation p-values of detectors against a numpy loop; calibration under independence
(uniform p-values, ~5% called at 0.05), planted detectors found; Benjamini-Hochberg and
Benjamini-Yekutieli against scipy and the step-up rule."""

from __future__ import annotations

import csv
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxdissect import driver, masks, parallel, results, significance

# The headless browser fixture `driver` (skips where Chromium is not installed).
from tests.test_report_browser import driver as browser  # noqa: F401

# The tests of one dissection with the test (`tested_run`) share a worker, which builds it once.
TESTED_RUN = pytest.mark.xdist_group("significance_run")


def _masks(rng, n, p, k, density):
    """Masks with a density per image and channel (heterogeneous, as real masks are)."""
    dens = rng.uniform(*density, (n, 1, k))
    return rng.random((n, p, k)) < dens


def _iou(inter, ua, ca):
    union = ua[:, None] + ca[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _reference(u, c, draws, seed):
    """The tests as stated: count draws whose permuted pairing overlaps at least as much
    (per pair), and whose best IoU over concepts is at least the unit's observed best."""
    ua, ca = u.sum((0, 1)), c.sum((0, 1))
    observed = np.zeros((u.shape[2], c.shape[2]), np.int64)
    for i in range(len(u)):
        observed += u[i].astype(np.int64).T @ c[i].astype(np.int64)
    best = _iou(observed, ua, ca).max(1)
    ge = np.zeros_like(observed)
    ge_unit = np.zeros(u.shape[2], np.int64)
    for perm in significance.permutations(len(u), draws, seed):
        inter = np.zeros_like(observed)
        for i in range(len(u)):
            inter += u[i].astype(np.int64).T @ c[perm[i]].astype(np.int64)
        ge += inter >= observed
        ge_unit += _iou(inter, ua, ca).max(1) >= best
    return (1 + ge) / (1 + draws), (1 + ge_unit) / (1 + draws), observed


# One block and one chunk of draws; blocks of 2 images (the last one short), chunks of 5 draws.
@pytest.mark.parametrize("exact_limit, chunk", [(None, None), (2 * 12 + 1, 5)])
def test_pvalues_match_numpy_loop(monkeypatch, exact_limit, chunk):
    if exact_limit is not None:
        monkeypatch.setattr(significance, "F32_EXACT", exact_limit)
    if chunk is not None:
        monkeypatch.setattr(significance, "_DRAW_CHUNK", chunk)
    rng = np.random.default_rng(0)
    u = _masks(rng, 7, 12, 5, (0.0, 0.6))
    c = _masks(rng, 7, 12, 4, (0.0, 0.5))
    u[:, :, 0] = False  # a unit that never fires: p = 1
    c[:, :, 1] = True  # a concept everywhere: every pairing overlaps the same, p = 1
    got = significance.permutation_test(u, c, draws=31, seed=3)
    want_p, want_unit, want_obs = _reference(u, c, 31, 3)
    np.testing.assert_array_equal(got.observed, want_obs)
    np.testing.assert_array_equal(got.pair_p, want_p)
    # float32 IoU in JAX, float64 here: equal best IoUs compare alike (same counts).
    np.testing.assert_array_equal(got.unit_p, want_unit)
    assert (got.pair_p[0] == 1).all() and (got.pair_p[:, 1] == 1).all() and got.unit_p[0] == 1


def test_iou_fractions_compare_exactly_where_float32_cannot():
    """`at_least` (n1 / d1 >= n2 / d2) against Python's fractions on random counts up to
    2**31 - 1, equal fractions of other terms, Farey neighbours (the closest distinct
    fractions of their size) and pairs float32 rounds to one value."""
    from fractions import Fraction

    rng = np.random.default_rng(5)
    top = 2**31 - 1
    d = rng.integers(1, top, 4000, dtype=np.int64)
    n = (rng.random(4000) * d).astype(np.int64)
    cases = [(n[:2000], d[:2000], n[2000:], d[2000:])]
    g = rng.integers(1, 40, 500, dtype=np.int64)  # equal fractions: (n // 40) / (d // 40 + 1)
    cases.append(
        (n[:500] // 40 * g, d[:500] // 40 * g + g, n[:500] // 40 * 3, d[:500] // 40 * 3 + 3)
    )
    # Farey neighbours a/b < c/d with c*b - a*d = 1, denominators near 2**24 and 2**30.
    for size in (2**24, 2**30):
        b_ = rng.integers(size // 2, size, 300, dtype=np.int64)
        a_ = rng.integers(1, size // 4, 300, dtype=np.int64) | 1
        # c/d: the next fraction after a/b with denominator below b (extended Euclid).
        c_, d_ = [], []
        for a1, b1 in zip(a_.tolist(), b_.tolist(), strict=True):
            g1 = math.gcd(a1, b1)
            a1, b1 = a1 // g1, b1 // g1
            x = pow(a1, -1, b1)  # a*x = 1 mod b: c = (a*d + 1) / b with d = b - x
            dd = b1 - x
            c_.append((a1 * dd + 1) // b1)
            d_.append(dd)
        cases.append((a_ // np.gcd(a_, b_), b_ // np.gcd(a_, b_), np.array(c_), np.array(d_)))
    n1, d1, n2, d2 = (np.concatenate(x) for x in zip(*cases, strict=True))
    assert min(x.min() for x in (n1, n2)) >= 0 and min(d1.min(), d2.min()) > 0
    assert max(x.max() for x in (n1, d1, n2, d2)) <= top
    want = [
        Fraction(int(a), int(b)) >= Fraction(int(c), int(e))
        for a, b, c, e in zip(n1, d1, n2, d2, strict=True)
    ]
    args = [jnp.asarray(x, jnp.int32) for x in (n1, d1, n2, d2)]
    forward = np.asarray(significance.at_least(*args))
    backward = np.asarray(significance.at_least(args[2], args[3], args[0], args[1]))
    want_back = [
        Fraction(int(c), int(e)) >= Fraction(int(a), int(b))
        for a, b, c, e in zip(n1, d1, n2, d2, strict=True)
    ]
    assert forward.tolist() == want and backward.tolist() == want_back
    # Some of these pairs float32 cannot tell apart (the quotients round to one value).
    f32 = (n1.astype(np.float32) / d1.astype(np.float32)) == (
        n2.astype(np.float32) / d2.astype(np.float32)
    )
    distinct = np.array(want) != np.array(want_back)
    assert (f32 & distinct).sum() > 100


@pytest.fixture(scope="module")
def independent():
    """Independent masks (80 images, 25 units, 12 concepts) and their test, 199 draws."""
    rng = np.random.default_rng(1)
    u = _masks(rng, 80, 16, 25, (0.05, 0.6))
    c = _masks(rng, 80, 16, 12, (0.05, 0.6))
    return u, c, significance.permutation_test(u, c, draws=199, seed=0)


def test_independent_masks_give_uniform_pvalues_and_few_calls(independent):
    _, _, got = independent
    p = got.pair_p
    assert scipy.stats.kstest(p.ravel(), "uniform").pvalue > 0.01
    assert (p <= 0.05).mean() <= 0.08
    assert (got.unit_p <= 0.05).mean() <= 0.12  # 25 units: at most 3
    assert significance.benjamini_hochberg(got.unit_p, 0.05).sum() <= 1


def test_planted_detectors_are_found():
    rng = np.random.default_rng(2)
    u = _masks(rng, 60, 16, 10, (0.05, 0.5))
    c = _masks(rng, 60, 16, 6, (0.05, 0.5))
    # Unit 3 fires where concept 2 is (and a little noise); unit 7 on 60% of concept 4's pixels.
    u[:, :, 3] = c[:, :, 2] | (rng.random((60, 16)) < 0.05)
    u[:, :, 7] = c[:, :, 4] & (rng.random((60, 16)) < 0.6)
    got = significance.permutation_test(u, c, draws=199, seed=0)
    assert got.pair_p[3, 2] == got.pair_p[7, 4] == 1 / 200
    found = significance.benjamini_hochberg(got.unit_p, 0.05)  # 10 units: D >= 200 needed
    assert found[3] and found[7] and found.sum() <= 3


@pytest.mark.parametrize("procedure", significance.FDR_PROCEDURES)
def test_fdr_procedures_match_scipy(procedure):
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = np.concatenate([rng.uniform(size=40), rng.uniform(0, 0.01, size=rng.integers(0, 8))])
        p = p.reshape(-1, 1) if len(p) % 2 else p.reshape(2, -1)  # any shape: one family
        want = scipy.stats.false_discovery_control(p.ravel(), method=procedure) <= 0.1
        got = significance.discoveries(p, 0.1, procedure)
        assert got.shape == p.shape
        np.testing.assert_array_equal(got.ravel(), want)


def test_the_step_up_rules_on_planted_pvalues():
    bh, by = significance.benjamini_hochberg, significance.benjamini_yekutieli
    # Step-up: 0.04 > 0.05 * 2/4 fails alone, but 0.05 <= 0.05 * 4/4 carries it.
    p = np.array([0.01, 0.04, 0.045, 0.05])
    assert bh(p, 0.05).all()
    assert not bh(np.array([0.2, 0.6]), 0.05).any()
    # BY is BH at alpha / (1 + 1/2 + 1/3 + 1/4) = alpha / 2.0833: 0.05 * r/4 / 2.0833 is
    # 0.006, 0.012, 0.018, 0.024.
    assert not by(p, 0.05).any()
    assert by(np.array([0.005, 0.04, 0.045, 0.05]), 0.05).tolist() == [1, 0, 0, 0]
    assert by(np.array([0.024, 0.024, 0.024, 0.024]), 0.05).all()
    assert not by(np.array([0.0241, 0.0241, 0.0241, 0.0241]), 0.05).any()
    assert by(np.array([0.04]), 0.05).all()  # one p-value: BY is BH
    rng = np.random.default_rng(0)
    for m in (2, 17, 300):
        q = rng.uniform(0, 0.05, m) ** 2
        h = np.sum(1 / np.arange(1, m + 1))
        np.testing.assert_array_equal(by(q, 0.05), bh(q, 0.05 / h))
    assert significance.discoveries(np.zeros((0, 3)), 0.05, "by").shape == (0, 3)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="alpha=1.5"):
        significance.benjamini_hochberg(np.array([0.1]), 1.5)
    with pytest.raises(ValueError, match="alpha=0"):
        significance.benjamini_yekutieli(np.array([0.1]), 0)
    with pytest.raises(ValueError, match="procedure='holm': must be one of bh, by"):
        significance.discoveries(np.array([0.1]), 0.05, "holm")
    with pytest.raises(ValueError, match="procedure='bonferroni'"):
        significance.fewest_callable(8, 99, 0.05, "bonferroni")
    with pytest.raises(ValueError, match=r"p-values must lie in \[0, 1\]"):
        significance.discoveries(np.array([0.1, np.nan]), 0.05, "by")
    with pytest.raises(ValueError, match="draws=0"):
        significance.permutations(5, 0, 0)
    with pytest.raises(ValueError, match="same images and pixels"):
        significance.permutation_test(np.zeros((3, 4, 2), bool), np.zeros((3, 5, 2), bool))


def test_grid_masks_are_the_full_masks_taken_every_stride_pixels():
    rng = np.random.default_rng(4)
    # Values on a coarse grid: many equal the threshold (ties) before and after upsampling.
    acts = rng.integers(0, 4, (3, 5, 7, 6)).astype(np.float32)
    thresholds = np.array([0, 1, 2, 3, 1.5, 2], np.float32)
    pixel = rng.integers(0, 6, (3, 2, 19, 23)).astype(np.int32)
    image = rng.integers(0, 6, (3, 2)).astype(np.int32)
    concepts = np.array([0, 1, 3, 5, 9], np.int32)  # 0 and 9 (no such label): empty masks
    # Jitted, as the passes run them (eager, each op compiled apart took seconds).
    unit_masks = jax.jit(masks.unit_masks, static_argnums=(2, 3))
    grid_unit_masks = jax.jit(significance.grid_unit_masks, static_argnums=(2, 3, 4))
    concept_masks = jax.jit(masks.concept_masks)
    grid_concept_masks = jax.jit(significance.grid_concept_masks, static_argnums=(3,))
    for stride in (1, 3, 4):
        for rule in ("strict", "inclusive"):
            full = unit_masks(acts, thresholds, (19, 23), rule)[:, ::stride, ::stride]
            got = grid_unit_masks(acts, thresholds, (19, 23), stride, rule)
            np.testing.assert_array_equal(got, full)
        full = concept_masks(pixel, image, concepts)[:, :, ::stride, ::stride]
        got = grid_concept_masks(pixel, image, concepts, stride)
        np.testing.assert_array_equal(got, np.moveaxis(np.asarray(full), 1, -1))


class _Probe:
    """Examples whose image is the layer's activation map, with planes of pixel labels."""

    def __init__(self, acts, pixel, image):
        self.acts, self.pixel, self.image = acts, pixel, image

    def __len__(self):
        return len(self.acts)

    def __getitem__(self, i):
        return {
            "index": np.int32(i),
            "image": self.acts[i],
            "pixel_labels": self.pixel[i],
            "image_labels": self.image[i],
        }


@pytest.mark.parametrize("devices", [1, 8])
def test_the_statistic_over_a_pass_gives_the_in_memory_pvalues(devices):
    """Masks folded batch by batch on every device, merged, then the streamed draws: the
    same bits as the masks computed at once, and the same p-values as the in-memory test."""
    rng = np.random.default_rng(5)
    n, seg, stride = 43, (12, 10), 3  # 43 images: the last batch is padded
    acts = rng.normal(size=(n, 4, 5, 11)).astype(np.float32)
    thresholds = np.quantile(acts.reshape(-1, 11), 0.8, axis=0).astype(np.float32)
    # Blobs of labels: concept 2 where unit 0 is high, to give a planted detector.
    pixel = rng.integers(0, 5, (n, 2, *seg)).astype(np.int32)
    unit_masks = np.asarray(jax.jit(masks.unit_masks, static_argnums=2)(acts, thresholds, seg))
    hot = unit_masks[..., 0]
    pixel[:, 0] = np.where(hot, 2, pixel[:, 0] % 2)
    image = rng.integers(0, 7, (n, 1)).astype(np.int32)
    concepts = np.arange(1, 7, dtype=np.int32)
    stat = significance.mask_statistic(
        "l", thresholds, concepts, num_images=n, seg_size=seg, stride=stride
    )
    got = driver.run_pass(
        "sig",
        stat,
        _Probe(acts, pixel, image),
        mesh=parallel.data_mesh(devices),
        batch_size=8,
        forward=jax.jit(lambda v, x: {"l": x}),
        num_threads=0,
    )
    u = unit_masks[:, ::stride, ::stride]
    c = np.moveaxis(np.asarray(jax.jit(masks.concept_masks)(pixel, image, concepts)), 1, -1)
    u, c = u.reshape(n, -1, 11), c[:, ::stride, ::stride].reshape(n, -1, 6)
    np.testing.assert_array_equal(got["unit_bits"], np.packbits(u, axis=-1))
    np.testing.assert_array_equal(got["concept_bits"], np.packbits(c, axis=-1))
    streamed = significance.packed_permutation_test(
        got["unit_bits"], got["concept_bits"], 11, 6, draws=39, seed=7
    )
    want_p, want_unit, want_obs = _reference(u, c, 39, 7)
    in_memory = significance.permutation_test(u, c, draws=39, seed=7)
    for test in (streamed, in_memory):
        np.testing.assert_array_equal(test.observed, want_obs)
        np.testing.assert_array_equal(test.pair_p, want_p)
        np.testing.assert_array_equal(test.unit_p, want_unit)
    assert streamed.pair_p[0, 1] == 1 / 40
    np.testing.assert_array_equal(streamed.unit_area, u.sum((0, 1)))
    assert significance.masks_bytes(n, seg, stride, 11, 6) == (
        got["unit_bits"].nbytes + got["concept_bits"].nbytes
    )


def test_packed_input_is_checked():
    for test in (significance.permutation_test, significance.packed_permutation_test):
        with pytest.raises(ValueError, match="draws=0"):
            args = (np.zeros((3, 4, 2), bool),) * 2
            if test is significance.packed_permutation_test:
                args = (np.zeros((3, 4, 1), np.uint8),) * 2 + (2, 2)
            test(*args, draws=0)
    with pytest.raises(ValueError, match="num_units=9"):
        significance.packed_permutation_test(
            np.zeros((3, 4, 1), np.uint8), np.zeros((3, 4, 1), np.uint8), 9, 2
        )
    with pytest.raises(ValueError, match="stride=0"):
        significance.mask_statistic("l", np.zeros(2), [1], num_images=2, seg_size=(4, 4), stride=0)


@pytest.fixture(scope="module")
def tested_run(tmp_path_factory):
    """A dissection with the permutation test: 24 tiny synthetic images, two layers."""
    from jaxdissect import engine, pipeline, store
    from jaxdissect.data import Broden, synthetic
    from tests.fixtures.small_model import make

    root = synthetic.generate_tiny(tmp_path_factory.mktemp("data") / "broden", num_images=24)
    source = Broden.open(root)
    module, variables = make()
    settings = engine.Settings(
        batch_size=8,
        activation_dtype="float32",
        significance_draws=19,
        significance_stride=4,
        significance_seed=3,
        significance_alpha=0.4,  # 12 units, p >= 1/20: BH calls some at 0.4
    )
    out = tmp_path_factory.mktemp("run")
    model = pipeline.ModelInfo(
        module, variables, module.input_spec, "small", store.fingerprint_tree(variables)
    )
    layer_results = pipeline.dissect(
        model,
        ["conv1", "top"],
        source,
        settings,
        out,
        dataset_name="tiny",
        mesh=parallel.data_mesh(2),
        options=pipeline.Options(progress=False, num_threads=0),
    )
    return out, source, model, settings, layer_results


@TESTED_RUN
def test_a_dissection_with_the_test_gives_the_in_memory_pvalues(tested_run):
    """The engine's p-values (masks packed in pass 2, draws streamed) are those of the
    in-memory test on masks computed directly from the network and the labels."""
    from jaxdissect import capture

    out, source, model, settings, layer_results = tested_run
    tap = capture.make_tap(model.module, model.variables, ["conv1", "top"], input_shape=(64, 64, 3))
    images = np.stack([source.read_image(i) for i in range(len(source))]).astype(np.float32)
    acts = tap.fn(tap.variables, model.input_spec(images))
    concepts = np.flatnonzero(source.labels.primary >= 0)
    planes = [source.read_labels(i) for i in range(len(source))]
    depth = max(p.shape[0] for p, _ in planes)
    width = max(1, max(len(q) for _, q in planes))
    pixel = np.zeros((len(source), depth, *source.seg_size), np.int32)
    image = np.zeros((len(source), width), np.int32)
    for i, (p, q) in enumerate(planes):
        pixel[i, : len(p)], image[i, : len(q)] = p, q
    s = settings.significance_stride
    # Jitted (eager, each op compiled apart took seconds).
    concept_masks = jax.jit(masks.concept_masks)
    unit_masks = jax.jit(masks.unit_masks, static_argnums=2)
    c = np.moveaxis(np.asarray(concept_masks(pixel, image, concepts)), 1, -1)
    c = c[:, ::s, ::s].reshape(len(source), -1, len(concepts))
    thresholds = json.loads((out / "results.json").read_text())["settings"]["thresholds"]
    for result, path in zip(layer_results, tap.layers, strict=True):
        u = np.asarray(
            unit_masks(acts[path], np.float32(thresholds[result.layer]), source.seg_size)
        )
        u = u[:, ::s, ::s].reshape(len(source), -1, u.shape[-1])
        want = significance.permutation_test(u, c, draws=19, seed=3)
        np.testing.assert_array_equal(result.significance.p, want.unit_p)
        np.testing.assert_array_equal(result.significance.pair_p, want.pair_p)
        np.testing.assert_array_equal(
            result.significance.significant, significance.benjamini_hochberg(want.unit_p, 0.4)
        )


@TESTED_RUN
def test_results_tally_and_report_carry_the_pvalues(tested_run):
    out, _, _, settings, layer_results = tested_run
    doc = json.loads((out / "results.json").read_text())
    assert doc["settings"]["significance_draws"] == 19
    for record, result in zip(doc["layers"], layer_results, strict=True):
        test = result.significance
        units = record["units"]
        np.testing.assert_array_equal([u["p_value"] for u in units], test.p)
        assert [u["significant"] for u in units] == test.significant.tolist()
        for u in units:
            if u["label"] < 0:
                assert u["label_p_value"] is None
            else:
                column = list(test.concepts).index(u["label"])
                assert u["label_p_value"] == test.pair_p[u["unit"], column]
        block = record["significance"]
        assert block["draws"] == 19 and block["alpha"] == 0.4 and block["fdr"] == "bh"
        assert block["significant_units"] == int(test.significant.sum())
        rows = list(csv.DictReader((out / f"tally-{result.layer}.csv").open()))
        assert list(rows[0])[-3:] == ["p-value", "label-p-value", "significant"]
        by_unit = {int(r["unit"]) - 1: r for r in rows}
        for k in range(result.num_units):
            assert float(by_unit[k]["p-value"]) == test.p[k]
            assert by_unit[k]["significant"] == str(int(test.significant[k]))
        page = (out / f"layer-{result.layer}.html").read_text()
        assert 'id="significant-only"' in page
        assert "significant detectors (BH at 0.4, 19 permutations)" in page
        both = int((result.interpretable & test.significant).sum())
        assert block["interpretable_and_significant"] == both
        assert page.count('data-significant-detector="1"') == both
        assert f'id="significant-units">{both}</td>' in page
        assert f"p = {test.p[0]:.3g}" in page
    assert "significant detectors" in (out / "index.html").read_text()


def test_the_report_counts_significant_detectors_as_results_json(tmp_path):
    """Planted: unit 0 interpretable and significant, unit 1 significant below the IoU
    threshold, unit 2 interpretable only: the report's significant detectors are unit 0."""
    from jaxdissect.labelspace import LabelSpace
    from jaxdissect.report import build

    labels = LabelSpace(
        ("color", "object"),
        ("-", "red", "green", "dog", "cat"),
        np.array([-1, 0, 0, 1, 1]),
        (False, False),
    )
    inter = np.zeros((4, 5), np.int64)
    inter[0, 1], inter[1, 3], inter[2, 2] = 50, 3, 60
    pixels = np.full((4, 2), 100)
    test = results.Significance(
        p=np.array([0.001, 0.001, 0.5, 1.0]),
        pair_p=np.ones((4, 4)),
        concepts=np.array([1, 2, 3, 4]),
        significant=np.array([True, True, False, False]),
        alpha=0.05,
        draws=999,
        procedure="by",  # the calls are planted: the report says whose they are
    )
    counts = dict(
        intersection=inter,
        label_pixels=np.array([0, 100, 100, 100, 100]),
        unit_pixels=pixels,
        unit_total=pixels.max(1),
    )
    r = results.layer_result("L", counts, labels, significance=test)
    assert r.interpretable.tolist() == [True, False, True, False]
    build.write_dissection_report(
        tmp_path,
        "m",
        "d",
        {},
        [r],
        {"L": np.zeros(4, np.float32)},
        {"L": np.full((2, 4), -1, np.int32)},
        {"L": np.zeros((2, 1, 1, 4), np.float32)},
        None,
        tie_rule="strict",
    )
    record = results.layer_record(r)["significance"]
    assert record["interpretable_and_significant"] == 1 and record["fdr"] == "by"
    page = (tmp_path / "layer-L.html").read_text()
    assert 'id="significant-units">1</td>' in page
    assert "significant detectors (BY at 0.05, 999 permutations)" in page
    assert page.count('data-significant-detector="1"') == 1
    assert (
        'data-unit="0" ' in page.split('data-significant-detector="1"')[0].rsplit("<article", 1)[1]
    )
    index = (tmp_path / "index.html").read_text()
    assert '<td class="num">2 (50.0%)</td>\n<td class="num">1</td>' in index


def test_without_draws_nothing_changes(tmp_path):
    """significance_draws=0: no test, no extra key, column or control."""
    from jaxdissect import engine

    plain = engine.Settings(significance_alpha=0.1, significance_stride=2)
    assert plain.pass2() == engine.Settings().pass2()
    assert "significance_draws" not in engine.Settings().pass2()
    assert "significance_draws" in engine.Settings(significance_draws=9).pass2()
    with pytest.raises(ValueError, match="significance_draws=-1"):
        engine.Settings(significance_draws=-1)
    with pytest.raises(ValueError, match="significance_stride=0"):
        engine.Settings(significance_stride=0)
    assert engine.Settings(significance_fdr="by").pass2() == engine.Settings().pass2()
    assert engine.Settings(significance_draws=9, significance_fdr="by").pass2() != (
        engine.Settings(significance_draws=9).pass2()
    )
    with pytest.raises(ValueError, match="significance_fdr='holm'"):
        engine.Settings(significance_fdr="holm")


@pytest.mark.parametrize("procedure", significance.FDR_PROCEDURES)
def test_a_layers_calls_are_its_procedures_and_say_which(procedure):
    """The results' view of a layer's test calls units by `significance_fdr` and records
    it (results.json's `fdr`)."""
    from jaxdissect import engine, pipeline

    # At 0.1 over 64 units, the 6th smallest p is called at <= 0.0094 by BH, 0.0020 by BY.
    unit_p = np.concatenate([np.full(6, 0.005), np.linspace(0.2, 1, 58)])
    arrays = {"unit_p": unit_p, "pair_p": np.ones((64, 3)), "concepts": np.arange(1, 4)}
    settings = engine.Settings(
        significance_draws=999, significance_alpha=0.1, significance_fdr=procedure
    )
    test = pipeline.layer_significance(arrays, settings)
    assert test.procedure == procedure and test.alpha == 0.1 and test.draws == 999
    want = significance.discoveries(unit_p, 0.1, procedure)
    np.testing.assert_array_equal(test.significant, want)
    assert want.tolist() == [procedure == "bh"] * 6 + [False] * 58


@TESTED_RUN
def test_the_significant_only_filter_shows_the_called_units(browser, tested_run):  # noqa: F811
    from selenium.webdriver.common.by import By

    out, *_, layer_results = tested_run
    r = max(
        layer_results,
        key=lambda r: min((r.interpretable & r.significance.significant).sum(), r.num_units - 1),
    )
    called = sorted(np.flatnonzero(r.interpretable & r.significance.significant).tolist())
    assert 0 < len(called) < r.num_units
    browser.get((out / f"layer-{r.layer}.html").as_uri())

    def shown() -> list[int]:
        return browser.execute_script(
            "return Array.from(document.querySelectorAll('.card'))"
            ".filter(c => !c.hidden).map(c => Number(c.dataset.unit))"
        )

    assert len(shown()) == r.num_units
    browser.find_element(By.ID, "significant-only").click()
    assert sorted(shown()) == called
    count = browser.find_element(By.ID, "count").text
    assert count == f"{len(called)} of {r.num_units} units shown"
    browser.find_element(By.ID, "reset").click()
    assert len(shown()) == r.num_units


def test_resolution_note_says_when_a_lone_detector_cannot_be_called():
    """One note, shared by dissect.py and significance.py: the smallest p at D draws is
    1 / (D + 1), so BH at alpha calls units of K only in groups of K / (alpha (D + 1))."""
    note = significance.resolution_note(128, 49, 0.05)
    assert "--significance_draws=49 the smallest p is 0.02" in note
    assert "groups of at least 52" in note and "--significance_draws >= 2559" in note
    assert significance.fewest_callable(128, 49, 0.05) == 52
    assert significance.resolution_note(128, 2559, 0.05) is None
    note = significance.resolution_note(256, 999, 0.05, "by")
    assert "BY calls units only in groups of at least 32" in note
    assert "--significance_draws >= 31356" in note
    # The smallest p above alpha: no group of the layer's units can be called, not one of
    # more units than it has.
    assert significance.fewest_callable(256, 9, 0.05) is None
    note = significance.resolution_note(256, 9, 0.05)
    assert "smallest p is 0.1, so BH calls no unit of these 256: a lone" in note
    assert significance.fewest_callable(256, 19, 0.05) == 256
    assert significance.fewest_callable(1, 10, 0.05) is None


@pytest.mark.parametrize("procedure", significance.FDR_PROCEDURES)
def test_fewest_callable_and_least_draws_are_the_step_up_rule_on_planted_pvalues(procedure):
    """r units at the smallest p, 1 / (D + 1), and the rest at 1: the procedure calls them
    exactly when r >= fewest_callable; least_draws is the fewest D that calls one alone."""
    for units in (1, 7, 128, 256):
        for draws in (9, 49, 199, 999):
            for alpha in (0.05, 0.1, 0.4):
                fewest = significance.fewest_callable(units, draws, alpha, procedure)
                least = units + 1 if fewest is None else fewest  # None: not even all units
                assert 1 <= least <= units + 1
                for r in {least - 1, least, least + 1} & set(range(1, units + 1)):
                    p = np.ones(units)
                    p[:r] = (1 + 0) / (1 + draws)  # as the test computes p: no draw reached
                    called = significance.discoveries(p, alpha, procedure)
                    assert called.sum() == (r if r >= least else 0), (units, draws, alpha, r)
                least = significance.least_draws(units, alpha, procedure)
                assert significance.fewest_callable(units, least, alpha, procedure) == 1
                assert significance.fewest_callable(units, least - 1, alpha, procedure) != 1
                note = significance.resolution_note(units, draws, alpha, procedure)
                assert (note is None) == (draws >= least)


def test_a_grid_under_7x7_is_warned_about(caplog):
    """The test's grid is every stride-th segmentation pixel; under 7x7 a WARNING names
    the grid and --significance_stride; 14x14 (112 at stride 8) is quiet."""
    import logging

    with caplog.at_level(logging.WARNING):
        significance.check_grid((112, 112), 8)
        assert not caplog.records
        significance.check_grid((24, 24), 8)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "grid is 3x3" in record.getMessage()
    assert "lower --significance_stride" in record.getMessage()


def test_dissect_script_prints_the_resolution_note_and_warns_of_a_small_grid(
    tmp_path, capsys, caplog
):
    """dissect.py --significance_draws prints significance.py's note per layer, and a test
    grid under 7x7 (a 32 px segmentation at stride 8: 4x4) is warned about."""
    import logging

    from jaxdissect.data import synthetic
    from tests.experiment_testing import QUICK, run_script

    broden = synthetic.generate_tiny(tmp_path / "broden", num_images=13)
    with caplog.at_level(logging.WARNING):
        run_script(
            "dissect",
            "--model=tests.fixtures.small_model:make",
            f"--data={broden}",
            "--layers=conv1",
            *QUICK,
            "--significance_draws=19",
            "--significance_stride=8",
            f"--output_dir={tmp_path / 'out'}",
        )
    out = capsys.readouterr().out
    assert "conv1: note: with --significance_draws=19 the smallest p is 0.05" in out
    assert "lower --significance_stride" in caplog.text


@pytest.mark.parametrize("draws", [0, -5])
def test_the_script_refuses_fewer_than_one_draw_in_one_message(draws):
    """significance.py's --significance_draws is >= 1, however it is below (-5 said the
    library's ">= 0", 0 said ">= 1")."""
    from tests.experiment_testing import run_script

    with pytest.raises(ValueError, match=rf"^--significance_draws={draws}: must be >= 1$"):
        run_script("significance", "--model=alexnet", "--weights=", f"--significance_draws={draws}")


def test_the_label_p_is_said_to_be_no_test_where_it_is_written(independent):
    """The pair p of a unit's best concept is not corrected for that choice: under
    independent masks far more than 5% of units have it below 0.05 (the unit p stays
    uniform), so README and significance.py say not to threshold it."""
    u, c, got = independent
    best = _iou(got.observed, u.sum((0, 1)), c.sum((0, 1))).argmax(1)  # the label: best IoU
    label_p = got.pair_p[np.arange(25), best]
    assert (label_p <= 0.05).mean() >= 0.2 and (got.unit_p <= 0.05).mean() <= 0.12
    root = pathlib.Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    script = (root / "experiments" / "significance.py").read_text()
    for text in (readme.split("`label_p_value` (", 1)[1], script.split("`label_p`", 1)[1]):
        assert "do not threshold it" in " ".join(text[:400].split())
    assert "`label-p-value` is `label_p_value`, uncorrected" in " ".join(readme.split())


def test_without_concepts_no_unit_is_significant():
    """No concept to detect: every unit's best IoU is 0 in every draw as observed, so
    p = 1 (every draw reaches it), not the smallest p for every unit, dead ones too."""
    rng = np.random.default_rng(6)
    u = rng.random((6, 9, 3)) < 0.4
    u[:, :, 0] = False  # a unit that never fires
    got = significance.permutation_test(u, np.zeros((6, 9, 0), bool), draws=19, seed=0)
    assert got.pair_p.shape == (3, 0)
    np.testing.assert_array_equal(got.unit_p, np.ones(3))
    assert not significance.benjamini_hochberg(got.unit_p, 0.2).any()


def test_a_significance_setting_without_the_test_is_refused():
    """--significance_alpha, _fdr, _stride and _seed set the permutation test: without
    --significance_draws (0: no test) they were accepted and silently ignored."""
    from jaxdissect import cli
    from tests.experiment_testing import parse

    for flag in (
        "--significance_alpha=0.01",
        "--significance_fdr=by",
        "--significance_stride=4",
        "--significance_seed=3",
    ):
        with pytest.raises(ValueError, match=f"^{flag}: only the permutation test "):
            cli.settings_from_flags(parse("dissect", flag))
        with_test = cli.settings_from_flags(parse("dissect", flag, "--significance_draws=9"))
        assert with_test.significance_draws == 9
    assert cli.settings_from_flags(parse("significance", "--significance_stride=4"))

"""The on-device tally against the slow numpy reference, exactly."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdissect import results, tally, tie_counts, ties, widecount
from jaxdissect.interpolation import interpolation_taps
from jaxdissect.tie_rule import active
from tests.reference import (
    random_probe,
    reference_counts,
    reference_dissect,
    reference_tap,
    reference_upsample,
)

BATCH = 4  # 11 images: two full batches and a partial one padded with garbage rows
# Jitted once for the file (each eager op would compile a program of its own).
_upsample = jax.jit(tally.upsample, static_argnums=(1, 2))
_may_fire = jax.jit(tally._may_fire, static_argnums=3)
_tally_add = jax.jit(tally.tally_add)
_tally_merge = jax.jit(tally.tally_merge)


def _run_tally(probe: dict, restriction: str, halves: bool = False, **kwargs):
    """Tally the probe in padded batches under jit, like the engine does. With `halves`,
    also the merge of two partial tallies (the first batch; the others), as shards and
    resumed runs merge theirs."""
    labels = probe["labels"]
    count = jax.jit(
        functools.partial(
            tally.batch_counts,
            primary=labels.primary,
            num_categories=labels.num_categories,
            restriction=restriction,
            **kwargs,
        )
    )
    add = _tally_add
    n = len(probe["acts"])
    state = tally.tally_init(
        probe["acts"].shape[-1], labels, patterns=kwargs.get("patterns", False)
    )
    parts = [state, state]
    for start in range(0, n, BATCH):
        stop = min(start + BATCH, n)
        pad = BATCH - (stop - start)

        def padded(x, value, start=start, stop=stop, pad=pad):
            widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
            return np.pad(x[start:stop], widths, constant_values=value)

        # Padding rows hold loud garbage: they must count nothing.
        batch = {
            "image": np.zeros((BATCH, 8, 8, 3), np.float32),
            "pixel_labels": padded(probe["pixel_labels"], 7),
            "image_labels": padded(probe["image_labels"], 9),
            "valid": np.arange(BATCH) < stop - start,
            "index": np.arange(start, start + BATCH, dtype=np.int32),
        }
        acts = padded(probe["acts"], 100.0)
        counts = count(acts, probe["thresholds"], batch)
        state = add(state, counts)
        if halves:
            part = 0 if start == 0 else 1  # the first batch; the others
            parts[part] = add(parts[part], counts)
    if halves:
        merged = tally.tally_to_numpy(_tally_merge(*parts))
        return tally.tally_to_numpy(state), merged
    return tally.tally_to_numpy(state)


@pytest.fixture(scope="module")
def probe() -> dict:
    return random_probe(0)


@pytest.fixture(scope="module")
def references(probe) -> dict[str, dict]:
    out = {
        restriction: reference_dissect(
            probe["acts"],
            probe["thresholds"],
            probe["pixel_labels"],
            probe["image_labels"],
            probe["labels"],
            restriction=restriction,
        )
        for restriction in tally.RESTRICTIONS
    }
    for restriction in tally.RESTRICTIONS:
        out[restriction, "inclusive"] = reference_dissect(
            probe["acts"],
            probe["thresholds"],
            probe["pixel_labels"],
            probe["image_labels"],
            probe["labels"],
            restriction=restriction,
            tie_rule="inclusive",
        )
    return out


@pytest.fixture(scope="module")
def unit_ties(probe) -> ties.UnitTies:
    """The probe's tie counts at its thresholds, for the results module's labels."""
    acts, thresholds = probe["acts"], probe["thresholds"]
    update = jax.jit(tie_counts.ties_update)
    state = update(tie_counts.ties_init(acts.shape[-1]), acts, thresholds, np.ones(len(acts)))
    return ties.UnitTies.from_arrays(tie_counts.ties_to_numpy(state), thresholds, 0.005)


def _reference_of(probe: dict, restriction: str, **kwargs) -> dict[str, np.ndarray]:
    """The reference counts of the whole probe."""
    fields = ("acts", "thresholds", "pixel_labels", "image_labels", "labels")
    return reference_counts(*(probe[f] for f in fields), restriction, **kwargs)


def _assert_counts_equal(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == np.int64, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize(
    ("restriction", "kwargs"),
    [
        ("presence", {"method": "segment"}),
        ("overlap", {"method": "segment"}),
        ("none", {"method": "segment"}),
        ("overlap", {"method": "segment", "chunk": 3}),  # chunk not dividing the batch
        ("presence", {"method": "matmul"}),
        ("overlap", {"method": "matmul", "chunk": 3}),
        ("presence", {"method": "compact"}),  # one round: every image fits the slots
        ("overlap", {"method": "compact", "chunk": 3, "slots": 2}),  # many rounds
        ("none", {"method": "compact", "slots": 5}),
        ("presence", {"method": "compact", "chunk": 4, "slots": 1}),
        # S >= T: the paper's rule, every method.
        ("presence", {"method": "segment", "tie_rule": "inclusive"}),
        ("overlap", {"method": "compact", "slots": 2, "tie_rule": "inclusive"}),
        ("none", {"method": "matmul", "chunk": 3, "tie_rule": "inclusive"}),
    ],
)
def test_tally_equals_reference(probe, references, unit_ties, restriction, kwargs):
    rule = kwargs.get("tie_rule", "strict")
    ref = references[restriction] if rule == "strict" else references[restriction, rule]
    counts = _run_tally(probe, restriction, **kwargs)
    _assert_counts_equal(counts, ref["counts"])
    # The data exercise what they should.
    assert counts["images"] == len(probe["acts"])
    # The dead unit (all 0, T = 0) marks nothing strictly and everything inclusively; the
    # unit clipped at its threshold (the last) marks nothing strictly.
    pixels = len(probe["acts"]) * probe["pixel_labels"][0, 0].size
    assert counts["unit_total"][0] == (0 if rule == "strict" else pixels)
    assert counts["unit_total"][1] > 0
    assert (counts["unit_total"][-1] == 0) == (rule == "strict")
    assert (counts["intersection"][:, 256:] > 0).any()
    # Unit labels of the results module agree with the reference's loops.
    layer = results.layer_result("conv", counts, probe["labels"], ties=unit_ties)
    np.testing.assert_array_equal(layer.iou, ref["iou"])
    for unit in ref["units"]:
        k = unit["unit"]
        assert layer.best_label[k] == unit["label"]
        cat = int(layer.best_category[k])
        assert (probe["labels"].categories[cat] if cat >= 0 else None) == unit["category"]
        assert layer.best_iou[k] == unit["iou"]
        for col, cat in enumerate(probe["labels"].categories):
            assert layer.category_label[k, col] == unit["per_category"][cat][0]
    assert layer.best_label[0] == -1  # dead (strict: no active pixel; inclusive: IoU < 1)
    summary = results.layer_summary(layer)
    assert summary.interpretable_units == ref["interpretable_units"]
    assert summary.unique_detectors == ref["unique_detectors"]
    assert {c.label: c.units for c in summary.concepts} == ref["detector_counts"]


@pytest.mark.parametrize(
    ("restriction", "kwargs"),
    [
        ("presence", {"method": "segment"}),
        ("overlap", {"method": "segment", "chunk": 3}),
        ("none", {"method": "segment"}),
        ("overlap", {"method": "compact", "slots": 2}),
        ("presence", {"method": "matmul", "tie_rule": "inclusive"}),
    ],
)
def test_pattern_counts_equal_the_reference(probe, restriction, kwargs):
    """Unit totals by restriction pattern (what a formula's restricted union needs)."""
    got, merged = _run_tally(probe, restriction, halves=True, patterns=True, **kwargs)
    rule = kwargs.get("tie_rule", "strict")
    want = _reference_of(probe, restriction, tie_rule=rule, patterns=True)
    _assert_counts_equal(got, want)
    patterns = got["pattern_pixels"]
    nc = probe["labels"].num_categories
    bit = (np.arange(2**nc)[:, None] >> np.arange(nc)[None, :]) & 1  # [2**C, C]
    np.testing.assert_array_equal(patterns @ bit, got["unit_pixels"])
    np.testing.assert_array_equal(patterns.sum(1), got["unit_total"])
    used = (patterns > 0).any(0).sum()
    assert used == 1 if restriction == "none" else used >= 3
    # Merged halves (shards, resumed runs) give the same counts.
    _assert_counts_equal(merged, want)


def test_pattern_counts_refuse_too_many_categories():
    labels = random_probe(0)["labels"]
    with pytest.raises(ValueError, match="patterns=True with"):
        tally.check_patterns(tally.MAX_PATTERN_CATEGORIES + 1, True)
    tally.check_patterns(tally.MAX_PATTERN_CATEGORIES + 1, False)
    assert tally.tally_init(3, labels).pattern_pixels is None


def test_restrictions_order(references):
    """overlap <= presence <= none for every unit's union; all equal on image-level."""
    over, pres, none = (
        references["overlap"]["counts"]["unit_pixels"],
        references["presence"]["counts"]["unit_pixels"],
        references["none"]["counts"]["unit_pixels"],
    )
    assert (over <= pres).all() and (pres <= none).all()
    assert (over < pres).any() and (pres < none).any()


@pytest.mark.parametrize("tie_rule", ["strict", "inclusive"])
def test_unit_blocks_skip_no_unit_that_fires(tie_rule):
    """The units skipped as unable to fire are exactly those with no active pixel; NaN,
    infinities, padding examples and huge values do not fool it. Image 0 wakes few units
    (counted in blocks), image 1 most (counted all at once). Units at a plateau equal to
    their threshold (a ReLU6 cap) fire nowhere under `strict` and everywhere on it under
    `inclusive`: upsampling keeps a plateau's value exactly."""
    rng = np.random.default_rng(3)
    b, k, size = 3, 64, (30, 26)
    vals = rng.uniform(0.1, 10, k).astype(np.float32)
    acts = np.broadcast_to(vals, (b, 7, 7, k)).copy()
    plateau = np.ones(k, bool)
    plateau[:18] = False  # the units below are changed
    thresholds = vals.copy()
    acts[0, :, :, :] = vals - 1  # image 0: units 5, 9, 10 and 15-17 may fire
    acts[0, :, :, 15:18] = vals[15:18]
    acts[0, :, :, 5] = vals[5]
    acts[0, 2, 3, 5], acts[0, 1, 1, 9] = np.nan, 3e38
    acts[1, :, :, 6], acts[1, 0, 0, 7] = np.nan, np.inf
    acts[:, :, :, 10] = -1e30
    thresholds[10:13] = [-np.inf, np.nan, np.inf]
    acts[2, 4, 4, 8] = -np.inf
    acts[2, :, :, 14], thresholds[14] = 1e3, 500.0  # only in the padding example
    valid = np.array([True, True, False])
    batch = {
        "pixel_labels": rng.integers(0, 6, (b, 2, *size)).astype(np.int32),
        "image_labels": rng.integers(0, 6, (b, 1)).astype(np.int32),
        "valid": valid,
    }
    primary = np.array([-1, 0, 0, 1, 1, 2], np.int32)

    def counts(unit_block):
        return jax.jit(
            lambda a, t: tally.batch_counts(
                a,
                t,
                batch,
                primary,
                3,
                tie_rule=tie_rule,
                method="segment",
                restriction="overlap",
                unit_block=unit_block,
            )
        )(acts, thresholds)

    whole, blocks = counts(k), counts(2)
    for key in whole:
        np.testing.assert_array_equal(blocks[key], whole[key], err_msg=key)
    # Units at a plateau equal to their threshold: none of their pixels passes it.
    plateau_pixels = size[0] * size[1]  # image 1 (image 0 sits below, image 2 is padding)
    want = 0 if tie_rule == "strict" else plateau_pixels
    np.testing.assert_array_equal(whole["unit_total"][plateau], want)
    up = np.asarray(_upsample(acts, size))
    fires = [
        np.asarray(_may_fire(acts[i : i + 1], valid[i : i + 1], thresholds, tie_rule))
        for i in range(b)
    ]
    for i in range(2):
        fired = active(up[i], thresholds, tie_rule).any((0, 1))
        assert not (fired & ~fires[i]).any()
    assert 4 * fires[0].sum() <= k < 4 * fires[1].sum()  # both ways of counting ran
    assert not fires[1][6] and not fires[2].any()  # all NaN; a padding example


@pytest.mark.parametrize(
    ("restriction", "tie_rule"), [("overlap", "strict"), ("presence", "inclusive")]
)
def test_unit_blocks_equal_the_reference(restriction, tie_rule):
    """A layer whose units each fire on a few images (thresholds at 0.9 of their largest
    image maximum): most images are counted in blocks of 3 units."""
    probe = dict(random_probe(4, num_units=40))
    acts, thresholds = probe["acts"], probe["thresholds"].copy()
    thresholds[4:-1] = 0.9 * acts.max((0, 1, 2))[4:-1]
    probe["thresholds"] = thresholds
    valid = np.ones(1, bool)
    sparse = sum(
        4 * int(_may_fire(acts[i : i + 1], valid, thresholds, tie_rule).sum()) <= 40
        for i in range(len(acts))
    )
    assert sparse >= 5, sparse
    got = _run_tally(probe, restriction, method="segment", unit_block=3, tie_rule=tie_rule)
    _assert_counts_equal(got, _reference_of(probe, restriction, tie_rule=tie_rule))
    assert (got["unit_total"][4:-1] > 0).sum() >= 8


def test_tally_non_dyadic_sizes():
    """Sizes that do not scale by powers of two, random float maps and thresholds."""
    probe = random_probe(3, act_size=(5, 7), seg_size=(12, 20), dyadic=False, num_units=5, planes=2)
    _assert_counts_equal(_run_tally(probe, "presence"), _reference_of(probe, "presence"))


def test_tally_merge_and_empty_image_axes(probe):
    """Merging two half tallies equals one tally; Q = 0 image-level slots works."""
    labels = probe["labels"]
    count = jax.jit(
        functools.partial(
            tally.batch_counts,
            primary=labels.primary,
            num_categories=labels.num_categories,
            restriction="presence",
        )
    )
    k = probe["acts"].shape[-1]
    states = []
    for part in (slice(0, 5), slice(5, 10)):
        batch = {
            "pixel_labels": probe["pixel_labels"][part],
            "image_labels": np.zeros((len(probe["acts"][part]), 0), np.int32),
        }
        counts = count(probe["acts"][part], probe["thresholds"], batch)
        states.append(_tally_add(tally.tally_init(k, labels), counts))
    merged = tally.tally_to_numpy(_tally_merge(*states))
    want = reference_counts(
        probe["acts"][:10],
        probe["thresholds"],
        probe["pixel_labels"][:10],
        np.zeros((10, 0), np.int32),
        labels,
        "presence",
    )
    _assert_counts_equal(merged, want)


def test_wide_counts_exact_past_int32():
    """Counts crossing 2**31 many times stay exact (x64 disabled)."""
    assert not jax.config.jax_enable_x64
    rng = np.random.default_rng(0)
    steps = rng.integers(2**29, 2**30, size=(40, 3))  # each step < 2**30
    steps[0] = 2**30 - 1
    add = jax.jit(lambda w, x: w.add(x))
    a = b = widecount.WideCount.zeros((3,))
    for i, x in enumerate(steps):
        x = jnp.asarray(x, jnp.int32)
        if i % 2:
            a = add(a, x)
        else:
            b = add(b, x)
    total = jax.jit(lambda a, b: a.merge(b))(a, b).to_numpy()
    want = [sum(int(v) for v in steps[:, j]) for j in range(3)]
    assert want[0] > 10 * 2**31  # wrapped int32 about 15 times
    assert total.dtype == np.int64 and total.tolist() == want
    assert a.merge(b).merge(a).to_numpy().tolist() == [
        w + sum(int(v) for v in steps[1::2, j]) for j, w in enumerate(want)
    ]


def test_batch_bound_and_bad_options(probe):
    tally.check_batch_bound(128, (192, 192))
    with pytest.raises(ValueError, match="overflow"):
        tally.check_batch_bound(128, (192, 192), devices=256)
    labels = probe["labels"]
    batch = {"pixel_labels": probe["pixel_labels"], "image_labels": probe["image_labels"]}
    for kwargs in (
        {"restriction": "lite"},
        {"method": "sparse"},
        {"slots": 0},
        {"tie_rule": ">="},
    ):
        with pytest.raises(ValueError):
            tally.batch_counts(
                probe["acts"], probe["thresholds"], batch, labels.primary, 5, **kwargs
            )


# ----------------------------------------------------------------------------- upsampling


def test_upsample_matches_formula_resize_and_pil():
    rng = np.random.default_rng(1)
    acts = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)
    size = (12, 20)
    got = np.asarray(_upsample(acts, size))
    assert got.shape == (2, 12, 20, 3)
    for b in range(2):
        for k in range(3):
            a = acts[b, :, :, k]
            np.testing.assert_allclose(got[b, :, :, k], reference_upsample(a, size), atol=1e-6)
            pil = Image.fromarray(a, mode="F").resize(size[::-1], Image.Resampling.BILINEAR)
            np.testing.assert_allclose(got[b, :, :, k], np.asarray(pil), atol=1e-5)
    resized = jax.image.resize(jnp.asarray(acts), (2, *size, 3), "bilinear")
    np.testing.assert_allclose(got, np.asarray(resized), atol=1e-5)


def test_taps_are_the_references_bit_for_bit():
    # An exact integer source position (31 -> 113 at i = 56, 15 -> 13 at i = 6) is its own
    # tap (f = 0), not the one below with f = 1.0.
    for n_out in (13, 112, 113, 7, 1):
        for n_in in range(1, 41):
            i0, i1, f = interpolation_taps(n_out, n_in)
            want = [reference_tap(i, n_out, n_in) for i in range(n_out)]
            assert i0.tolist() == [w[0] for w in want], (n_in, n_out)
            assert i1.tolist() == [w[1] for w in want], (n_in, n_out)
            assert f.view(np.uint32).tolist() == [int(w[2].view(np.uint32)) for w in want]
    i0, _, f = interpolation_taps(113, 31)
    assert (i0[56], f[56]) == (15, 0.0)


def test_downsample_is_not_antialiased():
    rng = np.random.default_rng(2)
    acts = rng.normal(size=(1, 9, 11, 2)).astype(np.float32)
    got = np.asarray(tally.upsample(jnp.asarray(acts), (4, 5)))
    plain = jax.image.resize(jnp.asarray(acts), (1, 4, 5, 2), "bilinear", antialias=False)
    np.testing.assert_allclose(got, np.asarray(plain), atol=1e-5)
    np.testing.assert_allclose(got[0, :, :, 1], reference_upsample(acts[0, :, :, 1], (4, 5)))
    same = np.asarray(tally.upsample(jnp.asarray(acts), (9, 11)))
    np.testing.assert_array_equal(same, acts)


def test_upsample_with_a_stride_is_every_stride_th_pixel():
    acts = np.random.default_rng(3).normal(size=(2, 5, 7, 3)).astype(np.float32)
    full = np.asarray(_upsample(acts, (19, 23)))
    for stride in (1, 2, 4, 30):
        got = np.asarray(_upsample(acts, (19, 23), stride))
        np.testing.assert_array_equal(got, full[:, ::stride, ::stride])
    with pytest.raises(ValueError, match="^stride=0: must be >= 1$"):
        tally.upsample(jnp.asarray(acts), (19, 23), 0)


@pytest.mark.parametrize(
    ("devices", "kwargs"),
    [
        (1, {}),
        (8, {"method": "compact", "slots": 3}),
        (8, {"method": "segment"}),
        (8, {"method": "segment", "patterns": True}),
        (8, {"method": "segment", "unit_block": 1}),  # both ways of counting traced
    ],
)
def test_batch_counts_inside_shard_map(probe, devices, kwargs):
    """The engine's pattern: per-shard counts under shard_map, psummed over the mesh."""
    if jax.device_count() < devices:
        pytest.skip(f"needs {devices} devices")
    labels = probe["labels"]
    mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices])
    spec, rep = jax.P("data"), jax.P()
    n = len(probe["acts"]) // devices * devices

    def per_shard(acts, thresholds, pixel_labels, image_labels, valid):
        batch = {"pixel_labels": pixel_labels, "image_labels": image_labels, "valid": valid}
        counts = tally.batch_counts(
            acts,
            thresholds,
            batch,
            labels.primary,
            labels.num_categories,
            restriction="overlap",
            **kwargs,
        )
        return jax.tree.map(lambda x: jax.lax.psum(x, "data"), counts)

    step = jax.jit(
        jax.shard_map(per_shard, mesh=mesh, in_specs=(spec, rep, spec, spec, spec), out_specs=rep)
    )
    args = [
        (probe["acts"][:n], spec),
        (probe["thresholds"], rep),
        (probe["pixel_labels"][:n], spec),
        (probe["image_labels"][:n], spec),
        (np.ones(n, bool), spec),
    ]
    counts = step(*(jax.device_put(x, jax.NamedSharding(mesh, s)) for x, s in args))
    k = probe["acts"].shape[-1]
    patterns = kwargs.get("patterns", False)
    state = tally.tally_init(k, labels, patterns=patterns)
    got = tally.tally_to_numpy(_tally_add(state, jax.device_get(counts)))
    want = reference_counts(
        probe["acts"][:n],
        probe["thresholds"],
        probe["pixel_labels"][:n],
        probe["image_labels"][:n],
        labels,
        "overlap",
        patterns=patterns,
    )
    _assert_counts_equal(got, want)

"""The whole engine against the slow numpy reference, on 1 and 8 devices, cached or not."""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxdissect import (
    capture,
    code_keys,
    driver,
    engine,
    parallel,
    quantiles,
    results,
    store,
    tally,
)
from jaxdissect.data import synthetic
from jaxdissect.data.broden import Broden
from jaxdissect.models.load import init_variables
from jaxdissect.preprocess import InputSpec
from tests import reference
from tests.broden_testing import tiny_broden

SPEC = InputSpec(32, (120.0, 120.0, 120.0), (60.0, 60.0, 60.0))


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(6, (3, 3), strides=2, name="conv1")(x))  # 16x16
        x = nn.Conv(8, (3, 3), strides=2, name="conv2")(x)  # 8x8, pre-activation (signed)
        x = nn.relu(x)
        x = nn.Conv(5, (3, 3), strides=2, name="conv3")(x)  # 4x4
        return x.mean((1, 2))


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    root = synthetic.generate_tiny(tmp_path_factory.mktemp("tiny") / "broden", num_images=13)
    return Broden.open(root)


@pytest.fixture(scope="module")
def model():
    m = SmallCNN()
    variables = init_variables(m, jnp.zeros((1, 32, 32, 3)), seed=3)
    return m, variables


_REFERENCES: dict = {}  # the module's one model and probe: by the settings they depend on


def _reference(model, variables, probe, settings, layers):
    """Activations image by image, thresholds and counts by the reference definitions; once
    a module for the settings of several tests (the module's one model and probe)."""
    key = (
        id(variables),
        id(probe),
        settings.activation_dtype,
        settings.quantile,
        settings.restriction,
        settings.top_images,
        tuple(layers),
        jax.config.read("jax_disable_most_optimizations"),  # the forward's rounding
    )
    if key not in _REFERENCES:
        _REFERENCES[key] = _reference_of(model, variables, probe, settings, layers)
    return _REFERENCES[key]


def _reference_of(model, variables, probe, settings, layers):
    m = model
    acts = {layer: [] for layer in layers}
    for i in range(len(probe)):
        x = SPEC(jnp.asarray(probe.read_image(i))[None])
        _, state = m.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        for layer in layers:
            a = np.asarray(state["intermediates"][layer]["__call__"][0][0])
            acts[layer].append(a.astype(settings.activation_dtype).astype(np.float32))
    examples = [probe[i] for i in range(len(probe))]
    pixel = np.stack([e["pixel_labels"] for e in examples])
    scalar = np.stack([e["image_labels"] for e in examples])
    out = {}
    for layer in layers:
        a = np.stack(acts[layer])
        thresholds = quantiles.reference_threshold(a.reshape(-1, a.shape[-1]), settings.quantile)
        ref = reference.reference_dissect(
            a, thresholds, pixel, scalar, probe.labels, restriction=settings.restriction
        )
        ref["top"] = reference.reference_top_images(a, settings.top_images)
        out[layer] = (thresholds, ref)
    return out


def _dissector(model, variables, probe, settings, layers, mesh, **kwargs):
    """(Dissector of `layers` of the small CNN, its tap); decoding in the calling thread
    unless `num_threads` says otherwise."""
    tap = capture.make_tap(model, variables, layers, input_shape=(32, 32, 3))
    kwargs = {"num_threads": 0, **kwargs}
    d = engine.Dissector(
        tap,
        probe,
        settings,
        input_spec=SPEC,
        model_key="small",
        mesh=mesh,
        progress=False,
        **kwargs,
    )
    return d, tap


def _run(model, variables, probe, settings, layers, mesh, **kwargs):
    dissector, tap = _dissector(model, variables, probe, settings, layers, mesh, **kwargs)
    return dissector.run(tap.variables)


@pytest.mark.parametrize(
    "restriction,dtype,devices,cache,method,workers",
    [
        # Compiled as users' runs are: the upsampling's fused multiply-adds (tests/conftest.py).
        pytest.param("presence", "float32", 1, "none", "auto", 0, marks=pytest.mark.optimized),
        ("overlap", "float16", 8, "host", "auto", 0),
        ("none", "bfloat16", 8, "device", "auto", 0),
        # The GPU default tally on 8 devices, images decoded in a worker process (the order
        # of several workers: tests/test_loader.py); the default activation dtype, so the
        # case above's forward and pass 1 programs serve.
        ("overlap", "float16", 8, "none", "compact", 1),
    ],
)
def test_engine_matches_reference(
    model, probe, restriction, dtype, devices, cache, method, workers
):
    m, variables = model
    layers = ("conv1", "conv2")
    # batch 8 over 13 images: a partial last batch with padding rows.
    settings = engine.Settings(
        quantile=0.05,
        quantile_mode="exact",
        restriction=restriction,
        activation_dtype=dtype,
        batch_size=8,
    )
    got = _run(
        m,
        variables,
        probe,
        settings,
        layers,
        parallel.data_mesh(devices),
        activation_cache=cache,
        tally_method=method,
        num_workers=workers,
    )
    want = _reference(m, variables, probe, settings, layers)
    for layer in layers:
        thresholds, ref = want[layer]
        np.testing.assert_array_equal(got[layer].thresholds, thresholds)
        np.testing.assert_array_equal(got[layer].top_indices, ref["top"][0])
        np.testing.assert_array_equal(got[layer].top_values, ref["top"][1])
        for key in ("intersection", "label_pixels", "unit_pixels", "unit_total"):
            np.testing.assert_array_equal(got[layer].counts[key], ref["counts"][key], err_msg=key)
        result = results.layer_result(layer, got[layer].counts, probe.labels)
        ref_best = [u["label"] for u in ref["units"]]
        assert result.best_label.tolist() == ref_best


def _literal_labels(probe, categories):
    """Padded label arrays of the probe from the selected categories' cells only (PIL)."""
    pixel = np.zeros((len(probe), probe.max_planes, *probe.seg_size), np.int32)
    scalar = np.zeros((len(probe), probe.max_image_labels), np.int32)
    for i, rec in enumerate(probe.records):
        pngs = [
            png for c in probe.labels.categories if c in categories for png in rec.pixel.get(c, ())
        ]
        for k, png in enumerate(pngs):
            rgb = np.asarray(Image.open(probe.root / "images" / png).convert("RGB"), np.int32)
            pixel[i, k] = rgb[..., 0] + 256 * rgb[..., 1]
        listed = [
            n
            for c in probe.labels.categories
            if c in categories
            for n in rec.image_labels.get(c, ())
        ]
        listed = list(dict.fromkeys(listed))
        scalar[i, : len(listed)] = listed
    return pixel, scalar


def test_categories_are_keyed_in_label_space_order(model, probe):
    m, variables = model
    order = probe.labels.categories[:2]

    def dissector(categories):
        settings = engine.Settings(quantile_mode="exact", batch_size=8, categories=categories)
        return _dissector(m, variables, probe, settings, ("conv2",), parallel.data_mesh(1))[0]

    named, reversed_ = dissector(order), dissector(order[::-1])
    assert reversed_.settings.categories == order
    assert reversed_.stage_key("pass2", "conv2") == named.stage_key("pass2", "conv2")
    with pytest.raises(ValueError, match=rf"^categories={order[0]},{order[0]}: "):
        dissector((order[0], order[0]))


@pytest.mark.parametrize("restriction", ["presence", "overlap"])
def test_unselected_categories_leave_no_pixels(model, tmp_path, restriction):
    """Without material, wood (an object and a material) counts only its object pixels."""
    m, variables = model
    probe = Broden.open(tiny_broden(tmp_path).root)
    cats = tuple(c for c in probe.labels.categories if c != "material")
    settings = engine.Settings(
        quantile=0.05,
        quantile_mode="exact",
        restriction=restriction,
        activation_dtype="float32",
        batch_size=8,
        categories=cats,
    )
    got = _run(m, variables, probe, settings, ("conv2",), parallel.data_mesh(2))["conv2"]
    fields = engine.Fields(probe, images=False, labels=True, categories=("part",))
    assert fields[1]["pixel_labels"].shape == (2, *probe.seg_size) and probe.max_planes > 2
    labels = engine.restrict_categories(probe.labels, cats, probe.coverage)
    wood = probe.labels.names.index("wood")
    assert probe.labels.category_of(wood) == "material" and labels.category_of(wood) == "object"
    pixel, scalar = _literal_labels(probe, cats)
    every_pixel, _ = _literal_labels(probe, probe.labels.categories)
    # The probe has wood in material planes outside the object planes' wood.
    object_wood = int((pixel == wood).any(axis=1).sum())
    assert 0 < object_wood < int((every_pixel == wood).any(axis=1).sum())
    assert got.counts["label_pixels"][wood] == object_wood
    acts = []
    for i in range(len(probe)):
        x = SPEC(jnp.asarray(probe.read_image(i))[None])
        _, state = m.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        acts.append(np.asarray(state["intermediates"]["conv2"]["__call__"][0][0]))
    ref = reference.reference_dissect(
        np.stack(acts), got.thresholds, pixel, scalar, labels, restriction=restriction
    )
    for key in ("intersection", "label_pixels", "unit_pixels", "unit_total"):
        np.testing.assert_array_equal(got.counts[key], ref["counts"][key], err_msg=key)


class _CountingLabels:
    """The probe, recording every label decode (`read_labels` call) by example index."""

    def __init__(self, probe):
        self.probe, self.decoded = probe, []

    def __len__(self):
        return len(self.probe)

    def __getattr__(self, name):
        return getattr(self.probe, name)

    def read_labels(self, i, *args):
        self.decoded.append(int(i))
        return self.probe.read_labels(i, *args)


def test_stage_keys_hold_every_processs_probe_set_fingerprint(model, probe, monkeypatch):
    """Hosts may read their own copies of the probe set (other file times): stages and
    checkpoints are keyed by one digest of all processes' fingerprints
    (`parallel.every_process_text`), the same on every process."""
    m, variables = model
    settings = engine.Settings(quantile_mode="exact", batch_size=8)
    monkeypatch.setattr(parallel, "every_process_text", lambda text: f"all of {text}")
    d = _dissector(m, variables, probe, settings, ("conv2",), parallel.data_mesh(1))[0]
    assert d.data_key == f"all of {probe.fingerprint()}"


def test_stage_keys_hold_the_backend(model, probe, monkeypatch):
    """A stage computed on another platform or device kind (TensorFloat-32 matmuls by
    default on a recent GPU) is not reused on this one."""
    m, variables = model
    settings = engine.Settings(quantile_mode="exact", batch_size=8)
    d = _dissector(m, variables, probe, settings, ("conv2",), parallel.data_mesh(1))[0]
    here = d.stage_key("pass1"), d.stage_key("pass2", "conv2")
    assert code_keys.backend_of(d.mesh) == [("cpu", "cpu")]
    monkeypatch.setattr(code_keys, "backend_of", lambda mesh: [("gpu", "NVIDIA H100 80GB HBM3")])
    gpu = d.stage_key("pass1"), d.stage_key("pass2", "conv2")
    assert gpu[0] != here[0] and gpu[1] != here[1]


@pytest.mark.parametrize("kept", ["all", "some"])
def test_pass2_reads_the_labels_pass1_checked_from_memory(model, probe, monkeypatch, kept):
    """With `check_labels`, pass 2 decodes only the labels the memo could not keep, and
    counts what the reference counts."""
    m, variables = model
    layers = ("conv1", "conv2")
    # test_engine_matches_reference[overlap-float16-8-host-auto-0]'s settings, mesh and
    # cache: its compiled programs serve.
    settings = engine.Settings(
        quantile=0.05, quantile_mode="exact", restriction="overlap", batch_size=8
    )
    source = _CountingLabels(probe)
    cache = "host"
    if kept == "some":  # room for about 5 of the 13 examples' labels
        one = sum(a.nbytes for a in probe.read_labels(0)) // 2  # uint16 planes
        free = 5 * one * engine.LABEL_MEMO_SHARE
        monkeypatch.setattr(engine.actcache, "available_host_bytes", lambda: free)
        cache = "none"  # pass 2 runs the network again; the budget is all for labels
    dissector, tap = _dissector(
        m,
        variables,
        source,
        settings,
        layers,
        parallel.data_mesh(8),
        num_threads=2,
        activation_cache=cache,
        check_labels=True,
    )
    first = dissector.run_pass1(tap.variables)
    assert sorted(set(source.decoded)) == list(range(len(probe)))
    source.decoded.clear()
    thresholds = {layer: first[layer]["thresholds"] for layer in layers}
    second = dissector.run_pass2(tap.variables, thresholds)
    memo = dissector.label_memo
    held = {i for i in range(len(probe)) if memo.get(i) is not None}
    assert set(source.decoded) == set(range(len(probe))) - held
    if kept == "all":
        assert source.decoded == [] and len(memo) == len(probe)
    else:
        assert 0 < len(memo) < len(probe) and memo.used_bytes <= memo.budget_bytes
    want = _reference(m, variables, probe, settings, layers)
    for layer in layers:
        ref_thresholds, ref = want[layer]
        np.testing.assert_array_equal(thresholds[layer], ref_thresholds)
        for key in ("intersection", "label_pixels", "unit_pixels", "unit_total"):
            np.testing.assert_array_equal(second[layer][key], ref["counts"][key], err_msg=key)


def test_label_memo_keeps_exact_labels_within_its_budget():
    memo = engine.LabelMemo(budget_bytes=3 * 2 * 4 + 8)
    planes = np.array([[[0, 65535], [258, 1]]], np.int32)  # R + 256 G numbers fit uint16
    memo.put(0, planes, np.array([7, 0], np.int32))
    kept, image_labels = memo.get(0)
    assert kept.dtype == np.uint16 and np.array_equal(kept, planes)
    assert image_labels.tolist() == [7, 0] and memo.used_bytes == 16
    memo.put(0, planes + 1, np.array([9, 0], np.int32))  # an example is kept once
    assert np.array_equal(memo.get(0)[0], planes)
    wide = np.array([[[65536]]], np.int32)  # does not fit uint16: kept as it is
    memo.put(1, wide, np.zeros((0,), np.int32))
    wide[...] = 0  # the memo keeps copies
    assert memo.get(1)[0].dtype == np.int32 and memo.get(1)[0].item() == 65536
    assert memo.used_bytes == 20
    memo.put(2, planes, np.zeros((2,), np.int32))  # over the budget: not kept
    assert memo.get(2) is None and len(memo) == 2
    memo.clear()
    assert len(memo) == 0 and memo.used_bytes == 0 and memo.get(0) is None


def test_one_and_eight_devices_identical_with_sketch(model, probe):
    m, variables = model
    settings = engine.Settings(quantile=0.05, batch_size=8)
    one = _run(m, variables, probe, settings, ("conv3",), parallel.data_mesh(1))
    eight = _run(m, variables, probe, settings, ("conv3",), parallel.data_mesh(8))
    np.testing.assert_array_equal(one["conv3"].top_indices, eight["conv3"].top_indices)
    # Counts are identical given the thresholds; with an exact-size state the sketch is exact.
    for key in one["conv3"].counts:
        np.testing.assert_array_equal(one["conv3"].counts[key], eight["conv3"].counts[key])


def test_layers_never_share_state(model, probe, tmp_path):
    """Each layer's stage output is stored under its own key (an old tools' defect)."""
    m, variables = model
    settings = engine.Settings(
        quantile=0.05, quantile_mode="exact", restriction="overlap", batch_size=8
    )

    def run(settings, layers):
        # test_engine_matches_reference[overlap-float16-8-host-auto-0]'s settings, mesh and
        # cache: its compiled programs serve.
        mesh = parallel.data_mesh(8)
        return _run(
            m, variables, probe, settings, layers, mesh, work_dir=tmp_path, activation_cache="host"
        )

    both = run(settings, ("conv1", "conv2"))
    stages = {p: json.loads((p / "key.json").read_text()) for p in (tmp_path / "stages").iterdir()}
    assert sorted(d["layer"] for d in stages.values()) == ["conv1", "conv1", "conv2", "conv2"]
    for path, desc in stages.items():
        arrays = store.load_arrays(path / "arrays.npz")
        units = {"conv1": 6, "conv2": 8}[desc["layer"]]
        first = arrays["thresholds"] if "thresholds" in arrays else arrays["unit_total"]
        assert first.shape == (units,)
    # conv2 alone reuses conv2's stored stages, never conv1's.
    alone = run(settings, ("conv2",))
    assert len(list((tmp_path / "stages").iterdir())) == 4
    np.testing.assert_array_equal(both["conv2"].thresholds, alone["conv2"].thresholds)
    for key in both["conv2"].counts:
        np.testing.assert_array_equal(both["conv2"].counts[key], alone["conv2"].counts[key])
    # A changed setting never reuses them.
    run(dataclasses.replace(settings, restriction="none"), ("conv2",))
    assert len(list((tmp_path / "stages").iterdir())) == 5


def test_nan_activations_are_reported(probe):
    def fn(params, images):
        return {"bad": jnp.where(images[..., :2] > 1.5, jnp.nan, images[..., :2]) * params}

    # Named as the user asked for it (an alias), not by its path.
    tap = capture.make_tap(
        fn, jnp.float32(1.0), "mine", input_shape=(32, 32, 3), aliases={"mine": "bad"}
    )
    settings = engine.Settings(batch_size=8, activation_dtype="float32")
    d = engine.Dissector(
        tap,
        probe,
        settings,
        input_spec=SPEC,
        model_key="nan",
        mesh=parallel.data_mesh(1),
        progress=False,
        num_threads=0,
        steps=driver.Steps(compile_threads=0),  # pass 2 (never run) is not compiled ahead
    )
    with pytest.raises(engine.NonFiniteActivationError, match="layer 'mine'"):
        d.run(tap.variables)


def test_bad_settings_name_the_parameter():
    with pytest.raises(ValueError, match="^restriction='paper': allowed values: presence"):
        engine.Settings(restriction="paper")
    with pytest.raises(ValueError, match=r"^quantile=5: must be in \(0, 1\)"):
        engine.Settings(quantile=5)
    with pytest.raises(ValueError, match="^top_images=0: must be >= 1"):
        engine.Settings(top_images=0)


def test_settings_defaults_and_choices_are_the_modules_constants():
    # One definition each: the method's defaults and allowed values live where the method does.
    fields = {f.name: f for f in dataclasses.fields(engine.Settings)}
    assert fields["quantile"].default is quantiles.DEFAULT_Q
    assert fields["iou_threshold"].default is results.DEFAULT_IOU_THRESHOLD
    assert fields["quantile_mode"].metadata["choices"] is quantiles.MODES
    assert fields["restriction"].metadata["choices"] is tally.RESTRICTIONS
    with pytest.raises(ValueError, match=f"e.g. {quantiles.DEFAULT_Q}$"):
        engine.Settings(quantile=0)


def test_bad_tally_method_names_the_flag(model, probe):
    m, variables = model
    with pytest.raises(ValueError, match="tally_method='dense'; allowed values: auto, segment"):
        _run(m, variables, probe, engine.Settings(), ("conv1",), None, tally_method="dense")


def test_a_broken_label_file_stops_pass_1(model, tmp_path):
    """A label PNG with a sound header but label numbers label.csv lacks (which the
    up-front header scan cannot see) stops pass 1, not pass 2."""
    from tests.broden_testing import encode_labels

    root = tmp_path / "broden"
    tiny_broden(root)
    png = sorted((root / "images").rglob("*_object_1.png"))[0]
    bad = np.full(Image.open(png).size[::-1], 999, np.int32)  # no label 999
    Image.fromarray(encode_labels(bad)).save(png)
    probe = Broden.open(root)
    m, variables = model
    tap = capture.make_tap(m, variables, ["conv2"], input_shape=(32, 32, 3))
    mesh = parallel.data_mesh(2)
    # test_unselected_categories_leave_no_pixels's pass 1: its compiled programs serve. No
    # compile threads: pass 2 (never run here) is not compiled ahead.
    settings = engine.Settings(
        quantile=0.05, quantile_mode="exact", activation_dtype="float32", batch_size=8
    )
    steps = driver.Steps(compile_threads=0)

    def pass1(check_labels):
        dissector = engine.Dissector(
            tap,
            probe,
            settings,
            input_spec=SPEC,
            model_key="small",
            mesh=mesh,
            progress=False,
            num_threads=0,
            check_labels=check_labels,
            steps=steps,
        )
        return dissector.run_pass1(tap.variables)

    assert set(pass1(False)) == {"conv2"}  # without the check only pass 2 would find it
    with pytest.raises(ValueError, match="999"):
        pass1(True)

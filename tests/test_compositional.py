"""experiments/compositional.py end to end at tiny size: a random small CNN's conv1 on the
tiny synthetic Broden, beam and optimal, every output."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from jaxdissect import store
from tests.experiment_testing import TINY_SIZE, run_script, tiny_broden, unaccounted_files

# The beam search's time is running its passes, not compiling them (tests/conftest.py).
pytestmark = pytest.mark.optimized

ARGS = (
    "--model=jaxdissect.models.small_cnn:small_cnn",
    "--weights=",
    "--layers=conv1",
    f"--resolution={TINY_SIZE}",
    f"--input_size={TINY_SIZE}",  # not the model's own size: every capture must follow it
    "--max_images=16",
    "--batch_size=8",
    "--quantile_mode=exact",
    "--quantile=0.02",
    "--devices=1",
    "--noprogress",
    "--page_units=3",
)


@pytest.fixture(scope="module")
def broden(tmp_path_factory):
    return tiny_broden(tmp_path_factory.mktemp("broden") / "broden1_48")


# Formulas of up to 2 concepts, a beam of 1: the beam misses the optimum of a few units, and
# the branch and bound has one level (the length-3 search: the presence run below, and
# tests/test_formula_search.py against brute force). Every pass of formulas counts one
# prefix per unit: one program, compiled once (the passes' time is compiling them).
SHORT = ("--max_length=2", "--beam=1", "--optimal_slots=1")


@pytest.mark.slow
def test_compositional_script_writes_formulas_plot_and_page(tmp_path, broden):
    doc = run_script(
        "compositional",
        f"--data={broden}",
        *ARGS,
        *SHORT,
        "--mode=optimal",
        f"--output_dir={tmp_path}",
    )
    [layer] = doc["layers"]
    units = layer["units_detail"]
    assert len(units) == 32  # conv1 of the small CNN
    rows = store.read_rows_csv(tmp_path / "compositional-conv1.csv")
    assert [int(r["unit"]) for r in rows] == list(range(32))
    fires = [u for u in units if u["formula"]]
    assert fires
    for u in fires:
        # The optimal formula is at least as good as the beam's and the single label.
        assert u["iou"] >= u["beam_iou"] - 1e-12 and u["score"] >= u["label_iou"] - 1e-12
        assert u["optimal_formula"] == u["formula"]
    by_length = layer["mean_iou_by_length"]
    assert len(by_length) == 2 and by_length[0] <= by_length[1]
    # The formulas found are the optimal ones: their mean is the beam's at best.
    assert layer["mean_iou"] > by_length[-1]
    dissected = json.loads((tmp_path / "results.json").read_text())["layers"][0]["units"]
    live = sum(u["active_pixels"] > 0 for u in dissected)
    assert layer["mean_iou"] == pytest.approx(sum(u["iou"] for u in fires) / live, rel=1e-12)
    assert layer["beam_not_optimal"] == sum(not u["beam_is_optimal"] for u in fires)
    assert layer["beam_not_optimal"] > 0  # the branch and bound finds what the beam missed
    assert layer["passes"] >= 3 and layer["forward_passes_per_step"] > 0
    assert (tmp_path / "plots" / "compositional_length.png").is_file()
    html = (tmp_path / "compositional.html").read_text()
    assert html.count('class="card"') == 3 and "formula_strips/conv1/unit" in html
    assert (tmp_path / "results.json").is_file()  # the dissection the thresholds came from
    saved = json.loads((tmp_path / "compositional.json").read_text())
    assert saved["settings"]["union_restriction"] == "none"
    assert unaccounted_files(tmp_path) == []  # a rerun's dissection removes what it wrote

    # Beam mode on the same directory reuses the dissection and finds the beam's formulas.
    beam = run_script(
        "compositional",
        f"--data={broden}",
        *ARGS,
        *SHORT[:2],  # --optimal_slots is the optimal mode's
        "--mode=beam",
        f"--output_dir={tmp_path}",
    )
    got = {u["unit"]: u["formula"] for u in beam["layers"][0]["units_detail"]}
    assert got == {u["unit"]: u["beam_formula"] for u in units}
    assert beam["layers"][0]["beam_not_optimal"] is None
    np.testing.assert_allclose(beam["layers"][0]["mean_iou_by_length"], by_length)
    assert beam["layers"][0]["mean_iou"] == pytest.approx(by_length[-1], rel=1e-12)

    # Under the dissection's own restriction (presence), a unit's best single concept
    # scores the dissection's best IoU, and the formulas change: the beam's, of up to 3
    # concepts (its second step reads the cached activations). Activations kept on disk,
    # in the layer's folder: a killed run's file there is removed, not opened, and the
    # folder is gone at the end.
    from jaxdissect import compositional
    from jaxdissect.models.small_cnn import small_cnn

    path = small_cnn(num_classes=2).layer_aliases["conv1"]
    stale = compositional.activations_dir(tmp_path / ".work", path) / "layer0-p0.npy"
    stale.parent.mkdir(parents=True)
    np.save(stale, np.zeros((1, 2, 3, 4), np.float16))
    presence = run_script(
        "compositional",
        f"--data={broden}",
        *ARGS,
        "--beam=1",
        "--formula_restriction=presence",
        "--activation_cache=disk",
        f"--output_dir={tmp_path}",
    )
    assert not list((tmp_path / ".work").glob("formula-activations-*"))
    assert presence["settings"]["union_restriction"] == "presence"
    assert len(presence["layers"][0]["mean_iou_by_length"]) == 3
    dissected = {
        u["unit"]: u
        for u in json.loads((tmp_path / "results.json").read_text())["layers"][0]["units"]
    }
    rows = presence["layers"][0]["units_detail"]
    labelled = [r for r in rows if dissected[r["unit"]]["label"] >= 0]
    assert labelled
    for r in labelled:
        assert r["label_iou"] == pytest.approx(dissected[r["unit"]]["iou"], rel=1e-12)
    assert any(r["label_iou"] != u["label_iou"] for r, u in zip(rows, units, strict=True))
    assert "union restriction presence" in (tmp_path / "compositional.html").read_text()


def test_a_layers_figures_all_count_the_units_that_fire():
    """Unit 0 cannot fire (dead) though it overlaps concepts; unit 1 fires and meets none;
    unit 2 fires. Every figure counts units 1 and 2 (review B: units_that_fire and the label
    mean counted the units with a formula, the other means those with pixels)."""
    from jaxdissect import compositional, formula_search
    from jaxdissect.formulas import FirstCounts

    first = FirstCounts(
        np.array([10, 10, 10]), np.array([[0, 5, 2], [0, 0, 0], [0, 4, 1]]), np.array([0, 5, 5])
    )
    stats = formula_search.SearchStats()
    beam = formula_search.beam_search(first, None, max_length=1, beam=2, stats=stats)
    cands = formula_search.default_candidates(first)
    fires = np.array([False, True, True])
    found = compositional.LayerFormulas(first, cands, beam, stats.best, None, [], {}, fires)
    rows = compositional.unit_rows(found, ["-", "a", "b"])
    assert [(r["fires"], r["formula"], r["iou"]) for r in rows] == [
        (False, "", 0.0),
        (True, "", 0.0),
        (True, "a", pytest.approx(4 / 11)),
    ]
    summary = compositional.layer_summary(found, rows)
    assert summary == {
        "units_that_fire": 2,
        "mean_iou_by_length": [pytest.approx(2 / 11)],
        "mean_iou": pytest.approx(2 / 11),
        "mean_label_iou": pytest.approx(2 / 11),
        "beam_not_optimal": None,
    }


def small_cnn_with_a_dead_unit():
    """(module, variables), `--model=tests.test_compositional:small_cnn_with_a_dead_unit`: a
    random small CNN whose conv1 unit 0 is 0 on every image (dead)."""
    import jax
    import jax.numpy as jnp

    from jaxdissect.models.load import init_variables
    from jaxdissect.models.small_cnn import IMAGE_SIZE, small_cnn

    # Initialised as the script initialises `--weights=` (one init program for both).
    model = small_cnn(image_size=TINY_SIZE)
    x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
    variables = init_variables(model, x, seed=0, train=False)
    conv = variables["params"]["features"]["0"]  # conv1 is its ReLU
    dead = {"kernel": conv["kernel"].at[..., 0].set(0), "bias": conv["bias"].at[0].set(0)}
    params = {**variables["params"], "features": {**variables["params"]["features"], "0": dead}}
    return model, jax.tree_util.tree_map(jnp.asarray, {**variables, "params": params})


@pytest.mark.slow
def test_a_dead_unit_gets_no_formula_and_every_mean_counts_the_same_units(tmp_path, broden):
    """Under the inclusive rule a dead unit's mask is every pixel; the dissection gives it
    no label, and it gets no formula either, nor a place in units_that_fire or any mean
    (review B: `striped`, IoU 0.29, under presence; and the means counted different units)."""
    from jaxdissect import results, ties

    args = [a for a in ARGS if not a.startswith(("--model", "--weights", "--page_units"))]
    doc = run_script(
        "compositional",
        f"--data={broden}",
        *args,
        "--model=tests.test_compositional:small_cnn_with_a_dead_unit",
        "--weights=pretrained",  # the factory's
        "--tie_rule=inclusive",
        "--restriction=presence",
        "--formula_restriction=presence",
        "--max_length=1",
        "--page_units=0",
        f"--output_dir={tmp_path}",
    )
    [layer] = doc["layers"]
    rows = layer["units_detail"]
    dissected = json.loads((tmp_path / "results.json").read_text())["layers"][0]["units"]
    assert dissected[0]["state"] == ties.DEAD and dissected[0]["label"] == -1
    assert rows[0]["fires"] is False and rows[0]["formula"] == rows[0]["label"] == ""
    assert rows[0]["iou"] == rows[0]["label_iou"] == 0
    for r, d in zip(rows, dissected, strict=True):
        assert r["label_iou"] == pytest.approx(d["iou"], rel=1e-12)  # one concept
    fires = [r for r in rows if r["fires"]]
    cannot = (ties.DEAD, results.NO_ACTIVE_PIXELS)
    assert (
        layer["units_that_fire"] == len(fires) == sum(d["state"] not in cannot for d in dissected)
    )
    mean = np.mean([r["label_iou"] for r in fires])
    assert layer["mean_label_iou"] == pytest.approx(mean, rel=1e-12)
    assert layer["mean_iou_by_length"] == [pytest.approx(mean, rel=1e-12)]
    assert layer["mean_iou"] == pytest.approx(mean, rel=1e-12)


def test_a_killed_runs_disk_cache_is_removed_by_the_next_run(tmp_path, broden, monkeypatch):
    """A SIGKILL skips `discard`: the next run of the layer removes what it left."""
    import jax.numpy as jnp

    from jaxdissect import actcache, capture, compositional, parallel
    from jaxdissect.data.broden import Broden
    from jaxdissect.models.load import init_variables
    from jaxdissect.models.small_cnn import IMAGE_SIZE, small_cnn

    source = Broden.open(broden, split="val")
    model = small_cnn(image_size=TINY_SIZE)  # the script's `--weights=` init program
    x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
    variables = init_variables(model, x, seed=0, train=False)
    tap = capture.make_tap(model, variables, ["conv1"], input_shape=(TINY_SIZE, TINY_SIZE, 3))
    work = tmp_path / ".work"

    def explain():
        return compositional.explain_layer(
            tap,
            np.full(tap.shapes[tap.layers[0]][-1], 0.5, np.float32),
            source,
            source.labels,
            compositional.SearchSettings(max_length=1),
            input_spec=model.input_spec,
            mesh=parallel.data_mesh(1),
            batch_size=32,
            activation_cache="disk",
            work_dir=work,
        )

    with monkeypatch.context() as m:
        m.setattr(actcache.ActivationCache, "discard", lambda self: None)  # killed
        explain()
    assert list(work.glob("formula-activations-*/*.npy"))
    # Another layer's, left by a killed run of other layers, goes too.
    other = compositional.activations_dir(work, "conv2")
    other.mkdir()
    (other / "layer0-p0.npy").write_bytes(b"")
    explain()
    assert not list(work.iterdir())


def test_formulas_without_a_restriction_take_more_categories_than_patterns_allow(broden):
    """Under formula_restriction=none no unit totals by restriction pattern (2**C per unit)
    are needed: a label space of 13 categories (above tally.MAX_PATTERN_CATEGORIES; 7 of
    them without labels) is explained as the dataset's own 6 are. Under a restriction it is
    refused before any pass, naming formula_restriction."""
    import dataclasses

    import jax.numpy as jnp

    from jaxdissect import capture, compositional, parallel, tally
    from jaxdissect.data.broden import Broden
    from jaxdissect.models.load import init_variables
    from jaxdissect.models.small_cnn import IMAGE_SIZE, small_cnn

    source = Broden.open(broden, split="val")
    model = small_cnn(image_size=TINY_SIZE)
    x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3))
    variables = init_variables(model, x, seed=0, train=False)
    tap = capture.make_tap(model, variables, ["conv1"], input_shape=(TINY_SIZE, TINY_SIZE, 3))
    own = source.labels
    extra = tally.MAX_PATTERN_CATEGORIES + 1 - own.num_categories
    wide = dataclasses.replace(
        own,
        categories=own.categories + tuple(f"extra{i}" for i in range(extra)),
        image_level=own.image_level + (False,) * extra,
    )
    found = [
        compositional.explain_layer(
            tap,
            np.full(tap.shapes[tap.layers[0]][-1], 0.5, np.float32),
            source,
            labels,
            compositional.SearchSettings(max_length=2, beam=1),
            input_spec=model.input_spec,
            mesh=parallel.data_mesh(1),
            batch_size=32,
        )
        for labels in (own, wide)
    ]
    assert [row[0] for row in found[1].beam] == [row[0] for row in found[0].beam]
    np.testing.assert_array_equal(found[1].candidates, found[0].candidates)
    assert any(row[0].iou > 0 for row in found[1].beam)
    presence = compositional.SearchSettings(formula_restriction="presence")
    with pytest.raises(ValueError, match="formula_restriction='presence' with the probe set's 13"):
        compositional.explain_layer(
            tap,
            np.zeros(tap.shapes[tap.layers[0]][-1], np.float32),
            source,
            wide,
            presence,
            input_spec=model.input_spec,
            mesh=parallel.data_mesh(1),
            batch_size=32,
        )


def test_bad_search_flags_are_named(tmp_path, broden):
    with pytest.raises(ValueError, match="--max_length=4"):
        run_script("compositional", f"--data={broden}", *ARGS, "--max_length=4")
    with pytest.raises(ValueError, match="operators='xor'"):
        run_script("compositional", f"--data={broden}", *ARGS, "--operators=or,xor")
    with pytest.raises(Exception, match="formula_restriction"):
        run_script("compositional", f"--data={broden}", *ARGS, "--formula_restriction=some")
    # The optimal mode's: accepted and silently ignored by the beam search.
    with pytest.raises(ValueError, match="^--optimal_slots=4: only --mode=optimal uses it "):
        run_script(
            "compositional",
            f"--data={broden}",
            *ARGS,
            "--optimal_slots=4",
            f"--output_dir={tmp_path}",
        )
    assert not any(tmp_path.iterdir())


@pytest.mark.optimized(False)  # single labels: its time is compiling, not the search's passes
def test_a_layer_pattern_explains_every_layer_it_matches(tmp_path, broden):
    """--layers=re:PATTERN is dissected as every layer it matches, and each is explained
    under its name (the formulas looked for the pattern's stats file after the dissection
    and failed on 'No such file or directory')."""
    args = [a for a in ARGS if not a.startswith(("--model", "--layers"))]
    doc = run_script(
        "compositional",
        f"--data={broden}",
        *args,
        "--max_length=1",  # beam mode, single labels: the subject is which layers, by name
        "--model=tests.fixtures.small_model:make",
        "--layers=re:conv.*",
        f"--output_dir={tmp_path}",
    )
    assert [layer["layer"] for layer in doc["layers"]] == ["conv1", "conv2"]
    assert doc["settings"]["layers"] == ["conv1", "conv2"]
    assert (tmp_path / "compositional-conv1.csv").is_file()
    assert (tmp_path / "compositional-conv2.csv").is_file()


def test_pretrained_lite0_passes_the_weights_check(tmp_path, broden):
    # --weights=pretrained (the demo flagfile's) is no path: the check goes on to the next
    # flag, here an --output_dir that is a file.
    taken = tmp_path / "file"
    taken.write_text("")
    args = [a for a in ARGS if not a.startswith(("--model", "--weights"))]
    with pytest.raises(ValueError, match="--output_dir=.*existing file"):
        run_script(
            "compositional",
            f"--data={broden}",
            *args,
            "--model=efficientnet_lite0",
            "--weights=pretrained",
            f"--output_dir={taken}",
        )


def test_a_rerun_removes_the_outputs_of_layers_it_no_longer_explains(tmp_path):
    """A rerun with other --layers left compositional-conv1.csv and formula_strips/conv1/
    beside a compositional.json of conv2 only; now what this script wrote for layers or
    units no longer in the run goes, and nothing else (the dissection's files stay)."""
    from tests.experiment_testing import script

    for name in (
        "compositional-conv1.csv",
        "compositional-conv2.csv",
        "tally-conv1.csv",
        "formula_strips/conv1/unit0000.png",
        "formula_strips/conv2/unit0000.png",
        "formula_strips/conv2/unit0001.png",
    ):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    script("compositional")._remove_stale(
        tmp_path, ["conv2"], [os.path.join("formula_strips", "conv2", "unit0001.png")]
    )
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == [
        "compositional-conv2.csv",
        os.path.join("formula_strips", "conv2", "unit0001.png"),
        "tally-conv1.csv",
    ]
    assert not (tmp_path / "formula_strips" / "conv1").exists()


def test_formula_strips_mask_the_activations_the_search_counted():
    """The page's unit masks round the activations to --activation_dtype as the search and
    the dissection do: 0.50000006 is 0.5 in float16, so at T = 0.5 (strict) no pixel fires;
    unrounded, every one would."""
    import types

    import jax.numpy as jnp

    from tests.experiment_testing import script

    value = np.float32(0.50000006)
    tap = types.SimpleNamespace(
        fn=lambda v, x: {"l": jnp.full((x.shape[0], 3, 3, 2), value, jnp.float32)},
        variables=None,
        layers=["l"],
    )
    images = np.zeros((2, 12, 12, 3), np.uint8)
    thresholds = np.array([0.0, 0.5], np.float32)
    strip_masks = script("compositional").strip_unit_masks
    for dtype, fired in (("float16", False), ("float32", True)):
        on = strip_masks(tap, lambda x: x, images, 1, thresholds, (6, 6), "strict", dtype)
        assert on.shape == (2, 6, 6) and bool(on.all()) == fired and bool(on.any()) == fired

"""`studies`: the probe set a comparison's entries were dissected on."""

import dataclasses
import json
import logging

import numpy as np
import pytest

from jaxdissect import results, store, studies


def test_entries_of_other_probe_sets_are_refused_and_other_files_logged(tmp_path, caplog):
    a = {"dataset": "broden1_224 (val, 500 images)", "dataset_fingerprint": "f1"}
    studies.check_one_probe_set({"a": a, "b": dict(a), "old": {"dataset": None}})
    with pytest.raises(
        ValueError, match=r"^c was dissected on broden1_224 \(all, 500 images\), a "
    ):
        studies.check_one_probe_set(
            {"a": a, "c": {**a, "dataset": "broden1_224 (all, 500 images)"}}
        )
    with caplog.at_level(logging.WARNING):
        studies.check_one_probe_set({"a": a, "copy": {**a, "dataset_fingerprint": "f2"}})
    assert "copy and a were dissected on broden1_224 (val, 500 images) with other files" in (
        caplog.text
    )
    document = {"format": results.RESULTS_FORMAT, "version": results.RESULTS_VERSION}
    document.update(complete=True, settings=a, layers=[])
    (tmp_path / "results.json").write_text(json.dumps(document))
    assert studies.probe_set(tmp_path) == {**a, "dataset_identity": None}


def test_the_identity_decides_where_both_record_one(caplog):
    """A folder and its TFDS build (other names, other files, one identity) are one probe
    set; a set of the same name and size with other tables (another synthetic seed) is not."""
    folder = {"dataset": "broden1_224 (val, 5 images)", "dataset_fingerprint": "f1"}
    folder["dataset_identity"] = "i1"
    build = {"dataset": "TFDS b (val, 5 images)", "dataset_fingerprint": "f2"}
    build["dataset_identity"] = "i1"
    with caplog.at_level(logging.WARNING):
        studies.check_one_probe_set({"folder": folder, "build": build})
    assert not caplog.records
    with pytest.raises(ValueError, match=r"other CSV tables, split or image count"):
        studies.check_one_probe_set(
            {"folder": folder, "other": {**folder, "dataset_identity": "i2"}}
        )
    # One side without an identity (an older results.json): the description decides.
    studies.check_one_probe_set({"folder": folder, "old": {**folder, "dataset_identity": None}})
    with pytest.raises(ValueError, match=r"^old was dissected on TFDS b"):
        studies.check_one_probe_set({"folder": folder, "old": {**build, "dataset_identity": None}})


def test_entries_that_record_a_probe_set_are_compared_whatever_precedes_them(caplog):
    """An older entry without an identity matches both of two sets of one description and
    size; the two, which record other identities, are still refused (in any order), and two
    copies with other files are still logged."""
    old = {"dataset": "synthetic (val, 5 images)", "dataset_fingerprint": None}
    one = {**old, "dataset_fingerprint": "f1", "dataset_identity": "i1"}
    two = {**old, "dataset_fingerprint": "f2", "dataset_identity": "i2"}
    with pytest.raises(ValueError, match=r"^two was dissected on synthetic .*, one on "):
        studies.check_one_probe_set({"old": old, "one": one, "two": two})
    with caplog.at_level(logging.WARNING):
        studies.check_one_probe_set(
            {"old": old, "a": one, "b": {**one, "dataset_fingerprint": "f3"}}
        )
    assert "b and a were dissected on synthetic (val, 5 images) with other files" in caplog.text


def test_a_step_asked_for_twice_is_dissected_once(tmp_path):
    for step in (0, 100):
        folder = tmp_path / "weights" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"train": {"val_accuracy": step / 200}}))
    got = studies.run_checkpoints(tmp_path, [100, 0, 100])
    assert [(c.step, c.val_accuracy) for c in got] == [(100, 0.5), (0, 0.0)]
    message = rf"^steps=50: run_dir={tmp_path} has no exported steps \[50\]; it has \[0, 100\]$"
    with pytest.raises(ValueError, match=message):
        studies.run_checkpoints(tmp_path, [50])


def test_layers_whose_result_names_collide_are_refused():
    """`b.c` (module c inside b) and `b_c` are different modules with one file-safe name."""
    import types

    import flax.linen as nn
    import jax.numpy as jnp

    from jaxdissect.models.load import init_variables

    class B(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="c")(x)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="b_c")(B(name="b")(x))

    module = Net()
    model = types.SimpleNamespace(
        module=module, variables=init_variables(module, jnp.zeros((1, 8, 8, 3))), apply_kwargs={}
    )
    _, _, names = studies.stack_models([("m", model)], ["b.c"], input_size=8)
    assert names == {"m-b_c": ("m", "b.c", "b/c")}
    with pytest.raises(ValueError, match="'b.c' and 'b_c' both make the result name 'm-b_c'"):
        studies.stack_models([("m", model)], ["b.c", "b_c"], input_size=8)


def test_a_layer_pattern_stacks_every_module_it_matches():
    """`--layers=re:...` (training_dynamics.py accepts patterns) takes every matched module
    of every member, named by its path, not refused as a module named twice."""
    import types

    import flax.linen as nn
    import jax.numpy as jnp

    from jaxdissect.models.load import init_variables

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="b")(nn.Dense(3, name="a")(x))

    module = Net()
    model = types.SimpleNamespace(
        module=module, variables=init_variables(module, jnp.zeros((1, 8, 8, 3))), apply_kwargs={}
    )
    fn, variables, names = studies.stack_models(
        [("s0", model), ("s1", model)], ["re:a|b"], input_size=8
    )
    assert names == {
        "s0-a": ("s0", "a", "a"),
        "s0-b": ("s0", "b", "b"),
        "s1-a": ("s1", "a", "a"),
        "s1-b": ("s1", "b", "b"),
    }
    out = fn(variables, jnp.zeros((1, 8, 8, 3)))
    assert {k: v.shape[-1] for k, v in out.items()} == {"s0-a": 3, "s0-b": 2, "s1-a": 3, "s1-b": 2}


def _record_with_categories(categories):
    """A layer record whose units 0, 1, 2 detect one label of categories 0, 1, 2."""
    from jaxdissect.labelspace import LabelSpace

    names = ("-", *(f"{c}1" for c in categories))
    labels = LabelSpace(
        tuple(categories), names, np.arange(-1, len(categories)), (False,) * len(categories)
    )
    k, n = len(categories), len(names)
    inter = np.zeros((k, n), np.int64)
    inter[np.arange(k), np.arange(1, n)] = 50
    counts = dict(
        intersection=inter,
        label_pixels=np.array([0] + [100] * k),
        unit_pixels=np.full((k, k), 100),
        unit_total=np.full(k, 100),
    )
    return results.layer_record(results.layer_result("L", counts, labels))


def test_no_category_name_meets_a_total_column(tmp_path):
    """Categories named `detectors` and `units` keep the totals and appear in the plots."""
    row = studies.summary_row(_record_with_categories(("color", "units", "detectors")))
    assert row["unique_detectors"] == 3 and row["interpretable_units"] == 3
    assert row["unique:detectors"] == row["interpretable:units"] == 1
    assert row["share:color"] == round(1 / 3, 4)
    assert studies._categories([row]) == ["color", "units", "detectors"]
    assert studies._categories([row], "interpretable") == ["color", "units", "detectors"]
    path = store.write_rows_csv(tmp_path / "t.csv", [row])
    (back,) = store.read_rows_csv(path)
    assert back["unique_detectors"] == "3" and back["unique:units"] == "1"


def _results_dir(path, categories=("color", "units", "detectors"), **settings):
    """A results.json of one layer (`_record_with_categories`) dissected with `settings`."""
    from jaxdissect import engine

    record = _record_with_categories(categories)
    method = {**dataclasses.asdict(engine.Settings()), **settings}
    path.mkdir()
    document = {"format": results.RESULTS_FORMAT, "version": results.RESULTS_VERSION}
    document.update(complete=True, settings={**method, "model": "m"}, layers=[record])
    (path / "results.json").write_text(json.dumps(document))
    return path


def test_entries_of_other_methods_are_refused_unless_allowed(tmp_path, caplog):
    """Rows carry the settings that change the counts; entries that differ in one are
    refused (naming both and the setting), or compared with a warning when allowed."""
    a = _results_dir(tmp_path / "a")
    (row,) = studies.results_rows("a", a)
    assert row["tie_rule"] == "strict" and row["iou_threshold"] == 0.04
    assert row["categories"] == "color;units;detectors"
    same = {
        "a": studies.results_method(a),
        "b": studies.results_method(_results_dir(tmp_path / "b")),
    }
    assert studies.check_one_method(same) == []
    # The categories as a set: flags may name them in another order; None matches any.
    assert (
        studies.check_one_method(
            {**same, "c": {**same["a"], "categories": "units;color;detectors"}}
        )
        == []
    )
    assert studies.check_one_method({**same, "d": {**same["a"], "categories": None}}) == []
    for key, value in [
        ("tie_rule", "inclusive"),
        ("iou_threshold", 0.1),
        ("quantile", 0.01),
        ("restriction", "overlap"),
        ("threshold_on", "upsampled"),
        ("activation_dtype", "float32"),
    ]:
        other = studies.results_method(_results_dir(tmp_path / key, **{key: value}))
        with pytest.raises(
            ValueError,
            match=rf"^{key} was dissected with {key}={value!r}, a with {key}=.*: their counts "
            r"are not comparable; dissect them with the same settings, or pass --flag",
        ):
            studies.check_one_method({"a": same["a"], key: other}, flag="--flag")
    fewer = studies.results_method(_results_dir(tmp_path / "fewer", categories=("color",)))
    with pytest.raises(ValueError, match=r"^fewer was dissected with categories='color', a "):
        studies.check_one_method({"a": same["a"], "fewer": fewer})
    with caplog.at_level(logging.WARNING):
        found = studies.check_one_method({"a": same["a"], "fewer": fewer}, allow=True)
    assert len(found) == 1 and found[0] in caplog.text
    # An entry whose categories are not known yet (a --dissect entry before its dissection)
    # does not hide a difference between the entries after it.
    with pytest.raises(ValueError, match=r"^fewer was dissected with categories='color', a "):
        studies.check_one_method({"d": {"categories": None}, "a": same["a"], "fewer": fewer})


def test_a_results_file_from_before_the_tie_rule_was_recorded_is_strict(tmp_path):
    """Files written before `tie_rule` was a setting were computed with the strict rule."""
    old = _results_dir(tmp_path / "old")
    document = json.loads((old / "results.json").read_text())
    del document["settings"]["tie_rule"]
    (old / "results.json").write_text(json.dumps(document))
    assert studies.results_method(old)["tie_rule"] == "strict"
    new = studies.results_method(_results_dir(tmp_path / "new"))
    assert studies.check_one_method({"new": new, "old": studies.results_method(old)}) == []
    inclusive = studies.results_method(_results_dir(tmp_path / "incl", tie_rule="inclusive"))
    with pytest.raises(ValueError, match="^incl was dissected with tie_rule='inclusive', old "):
        studies.check_one_method({"old": studies.results_method(old), "incl": inclusive})


def test_a_category_not_scored_is_blank_not_zero(tmp_path):
    """An entry scored without a category has a blank cell (null in compare.json); a
    category scored with no detector has 0."""
    rows = studies.results_rows("all", _results_dir(tmp_path / "all"))
    rows += studies.results_rows("color", _results_dir(tmp_path / "c", categories=("color",)))
    files = studies.write_comparison(tmp_path / "out", rows, {})
    table = store.read_rows_csv(files["csv"])
    assert table[0]["unique:units"] == "1" and table[1]["unique:units"] == ""
    assert table[1]["unique:color"] == "1" and table[1]["interpretable:detectors"] == ""
    doc = json.loads(files["json"].read_text())
    assert doc["rows"][1]["unique:units"] is None and doc["rows"][0]["unique:units"] == 1


def test_the_compare_script_refuses_mixed_methods_unless_allowed(tmp_path):
    from tests.experiment_testing import run_script

    a = _results_dir(tmp_path / "a")
    b = _results_dir(tmp_path / "b", tie_rule="inclusive")
    argv = (f"--results=a={a}", f"--results=b={b}", f"--output_dir={tmp_path / 'out'}")
    with pytest.raises(ValueError, match=r"^--results=b was dissected with tie_rule='incl"):
        run_script("compare", *argv)
    assert not (tmp_path / "out").exists()
    rows = run_script("compare", *argv, "--allow_mixed_settings")
    assert [r["tie_rule"] for r in rows] == ["strict", "inclusive"]
    # With --results alone nothing is dissected: a method or probe-set flag was accepted and
    # silently ignored (the table kept each results.json's threshold).
    for flag in ("--iou_threshold=0.1", "--data=synthetic", "--input_size=227", "--devices=1"):
        with pytest.raises(ValueError, match=f"^{flag}: only --dissect entries are dissected"):
            run_script("compare", *argv, "--allow_mixed_settings", flag)
    with pytest.raises(ValueError, match="^--report: only --dissect entries are dissected"):
        run_script("compare", *argv, "--allow_mixed_settings", "--report")
    doc = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert doc["settings"]["mixed_settings"][0].startswith("--results=b was dissected")
    assert store.read_rows_csv(tmp_path / "out" / "compare.csv")[1]["tie_rule"] == "inclusive"


def test_rows_say_how_their_thresholds_were_estimated_and_a_mix_is_warned(tmp_path, caplog):
    """Exact and histogram quantiles are the same numbers; a sketch's are not: rows whose
    thresholds come from both (or from sketches of other sizes) are compared with a warning,
    which compare.json's mixed_settings lists; files that do not record it match any."""
    from tests.experiment_testing import run_script

    def rows(name, **settings):
        return studies.results_rows(name, _results_dir(tmp_path / name, **settings))

    exact = rows("e", quantile_modes={"L": "exact"}) + rows("h", quantile_modes={"L": "histogram"})
    assert [r["thresholds"] for r in exact] == ["exact", "exact"]
    old = rows("old")  # written before results.json recorded the modes
    assert old[0]["thresholds"] is None
    assert studies.check_one_estimate(exact + old, "how") == []
    sketch = rows("s", quantile_modes={"L": "sketch"})
    big = rows("big", quantile_modes={"L": "sketch"}, sketch_size=2048)
    assert (sketch[0]["thresholds"], big[0]["thresholds"]) == ("sketch 672", "sketch 2048")
    with caplog.at_level(logging.WARNING):
        (line,) = studies.check_one_estimate(exact + sketch, "dissect with exact")
    assert line == (
        "thresholds estimated differently (exact: e L, h L; sketch 672: s L): counts from a "
        "sketch differ from exact ones by its error; dissect with exact to compare exact counts"
    )
    assert line in caplog.text
    assert studies.check_one_estimate(sketch + big + sketch, "how")  # sizes differ
    argv = [f"--results={n}={tmp_path / n}" for n in ("e", "s")]
    run_script("compare", *argv, f"--output_dir={tmp_path / 'out'}")
    doc = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert doc["settings"]["mixed_settings"] == [
        "thresholds estimated differently (exact: e L; sketch 672: s L): counts from a sketch "
        "differ from exact ones by its error; dissect them with --quantile_mode=exact to "
        "compare exact counts"
    ]
    table = store.read_rows_csv(tmp_path / "out" / "compare.csv")
    assert [r["thresholds"] for r in table] == ["exact", "sketch 672"]


@pytest.mark.parametrize(
    ("steps", "linthresh", "ticks"),
    [
        ([0, 20, 40, 60], 20.0, [0.0, 20.0, 40.0, 60.0]),  # one decade: the steps themselves
        ([0, 500, 1000, 1500], 500.0, [0.0, 500.0, 1000.0, 1500.0]),
        ([0, 10, 100, 1000, 5000], 10.0, [0.0, 10.0, 100.0, 1000.0]),  # the decades
        ([0], 1.0, [0.0]),
    ],
)
def test_the_step_axis_ticks_the_steps_when_no_two_decades_fall_in_range(steps, linthresh, ticks):
    assert studies.step_axis(steps) == (linthresh, ticks)

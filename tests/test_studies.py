"""`studies`: the probe set a comparison's entries were dissected on."""

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
    assert studies.probe_set(tmp_path) == a


def test_a_step_asked_for_twice_is_dissected_once(tmp_path):
    for step in (0, 100):
        folder = tmp_path / "weights" / f"step_{step:06d}"
        folder.mkdir(parents=True)
        (folder / "meta.json").write_text(json.dumps({"train": {"val_accuracy": step / 200}}))
    got = studies.run_checkpoints(tmp_path, [100, 0, 100])
    assert [(c.step, c.val_accuracy) for c in got] == [(100, 0.5), (0, 0.0)]
    with pytest.raises(ValueError, match=r"has no exported steps \[50\]; it has \[0, 100\]"):
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
    assert names == {"m-b_c": "m"}
    with pytest.raises(ValueError, match="'b.c' and 'b_c' both make the result name 'm-b_c'"):
        studies.stack_models([("m", model)], ["b.c", "b_c"], input_size=8)


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

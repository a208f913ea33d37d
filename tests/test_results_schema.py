"""results.json's structure is checked when it is read: a field its readers index that is
missing or of another JSON type is one error naming the file and the field."""

from __future__ import annotations

import json

import pytest

from jaxdissect import finished, json_check, results, store
from tests.fuzz_inputs import results_json_run


@pytest.fixture
def run(tmp_path):
    return results_json_run(tmp_path)[0]


def _edit(run, edit):
    """`edit` results.json's document, its checksum renewed (as a crafted file's would be)."""
    document = json.loads((run / "results.json").read_text())
    edit(document)
    store.write_json(run / "results.json", document, checksum=True)


def _delete(*keys):
    def edit(document):
        for key in keys[:-1]:
            document = document[key]
        del document[keys[-1]]

    return edit


def _set(value, *keys):
    def edit(document):
        for key in keys[:-1]:
            document = document[key]
        document[keys[-1]] = value

    return edit


CASES = {
    "no layers": (_delete("layers"), r"the file.layers is missing"),
    "settings a list": (_set([], "settings"), r"the file.settings is \[\], not object"),
    "layer names": (_set([1], "settings", "layers"), r"settings.layers\[0\] is 1, not text"),
    "layer twice": (
        _set(["conv1", "conv1"], "settings", "layers"),
        r"settings.layers name a layer twice",
    ),
    "layers out of order": (
        _set(["top", "conv1"], "settings", "layers"),
        r"layers are \['conv1', 'top'\], settings.layers \['top', 'conv1'\]",
    ),
    "a layer's path unknown": (
        _delete("settings", "layer_paths", "top"),
        r"settings.layer_paths lacks \['top'\]",
    ),
    "mean of 2": (
        _set([0, 0], "settings", "input_spec", "mean"),
        r"input_spec.mean does not hold 3",
    ),
    "std of 0": (_set([1, 0, 1], "settings", "input_spec", "std"), r"a std of 0"),
    "record not an object": (_set("x", "layers", 1), r"layers\[1\] is 'x', not an object"),
    "units short": (
        _set(2, "layers", 1, "num_units"),
        r"layers\[1\].units holds 4 units, num_units 2",
    ),
    "iou as text": (
        _set("high", "layers", 0, "units", 2, "iou"),
        r"layers\[0\].units\[2\].iou is 'high', not number",
    ),
    "interpretable as 1": (
        _set(1, "layers", 0, "units", 0, "interpretable"),
        r"units\[0\].interpretable is 1, not true or false",
    ),
    "count as true": (
        _set(True, "layers", 0, "summary", "unique_detectors"),
        r"summary.unique_detectors is True, not whole number",
    ),
    "count by category": (
        _set([1], "layers", 1, "summary", "unique_by_category", "object"),
        r"summary.unique_by_category\['object'\] is \[1\], not whole number",
    ),
    "no summary": (_delete("layers", 0, "summary"), r"layers\[0\].summary is missing"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_damaged_field_is_named(run, case):
    edit, message = CASES[case]
    _edit(run, edit)
    with pytest.raises(json_check.DamagedFile, match=message) as info:
        results.read_results_json(run)
    text = str(info.value)
    assert text.startswith(f"{run / 'results.json'}: ") and "\n" not in text
    assert text.endswith("the file was edited or damaged: run the dissection again to rewrite it")


def test_what_older_files_lack_is_read_and_refused_only_where_needed(run):
    """Fields a file of this format may lack (settings.layers, layer_paths, input_spec)
    are checked where present; the reader of a layer's masks needs them."""
    intact = (run / "results.json").read_text()
    for name in ("layers", "layer_paths", "input_spec"):
        (run / "results.json").write_text(intact)
        _edit(run, _delete("settings", name))
        assert results.read_results_json(run)["layers"][0]["layer"] == "conv1"
        with pytest.raises(ValueError, match=rf"settings.{name} is missing"):
            finished.read_layer(run, "conv1")
    # Unknown fields are kept, and do not reach the input spec.
    _edit(run, _set(7, "settings", "new_setting"))
    assert results.read_results_json(run)["settings"]["new_setting"] == 7


def test_an_intact_run_reads_back(run):
    layer = finished.read_layer(run, "top")
    assert layer.path == "Net/top" and layer.num_units == 4 and layer.input_spec.size == 32
    _edit(run, _set(5, "settings", "input_spec", "zz"))  # a field of another version
    assert finished.read_layer(run, "top").input_spec == layer.input_spec

"""IoU, unit labels, summaries and result files from exact counts (numpy only)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest

from jaxdissect import results, store
from jaxdissect.labelspace import LabelSpace
from tests.reference import reference_iou, reference_unit_labels

NASTY = 'say "hi", <script>alert(1)</script>\nnew line'


def _labels() -> LabelSpace:
    """Labels 1-2 color, 3-5 object, 6 unused, 7 material, 8 scene; material has 1 label."""
    names = ("-", "red-c", "blue-c", "sky", NASTY, "car", "unused", "wood", "street-s")
    primary = np.array([-1, 0, 0, 1, 1, 1, -1, 2, 3], np.int32)
    return LabelSpace(
        ("color", "object", "material", "scene"), names, primary, (False, False, False, True)
    )


def _counts(inter, label_pixels, unit_pixels, images=10) -> dict[str, np.ndarray]:
    inter = np.asarray(inter, np.int64)
    return {
        "intersection": inter,
        "label_pixels": np.asarray(label_pixels, np.int64),
        "unit_pixels": np.asarray(unit_pixels, np.int64),
        "unit_total": np.asarray(unit_pixels, np.int64).max(1),
        "images": np.int64(images),
    }


@pytest.fixture
def layer() -> results.LayerResult:
    #        -  red blue sky nasty car unused wood street
    inter = [
        [0, 10, 10, 0, 0, 0, 0, 0, 0],  # unit 0: tie red/blue (same IoU) -> red
        [0, 0, 0, 30, 30, 0, 0, 0, 0],  # unit 1: sky and NASTY tie -> sky (lower number)
        [0, 1, 0, 0, 0, 0, 0, 0, 0],  # unit 2: below threshold everywhere
        [0, 1, 0, 0, 0, 0, 50, 0, 0],  # unit 3: the unused label never scores; ties unit 2
        [0, 0, 0, 0, 0, 40, 0, 0, 40],  # unit 4: car and street-s tie -> scene (the last)
    ]
    label_pixels = [99, 100, 100, 100, 100, 100, 100, 100, 100]
    unit_pixels = [[100, 100, 100, 100]] * 5
    return results.layer_result("features.10", _counts(inter, label_pixels, unit_pixels), _labels())


def test_iou_and_labels_follow_the_rules(layer):
    labels = _labels()
    np.testing.assert_allclose(layer.iou[0, 1], 10 / 190)
    assert (layer.iou[:, 0] == 0).all() and (layer.iou[:, 6] == 0).all()
    assert layer.best_label.tolist() == [1, 3, 1, 1, 8]
    assert [labels.categories[j] for j in layer.best_category] == [
        "color",
        "object",
        "color",
        "color",
        "scene",
    ]
    assert layer.interpretable.tolist() == [True, True, False, False, True]
    # Category argmax: unit 4's best object label is reported even though scene wins;
    # colour and material overlap it nowhere, so they have no label (not the first one).
    assert layer.category_label[4].tolist() == [-1, 5, -1, 8]
    ref = reference_unit_labels(reference_iou(layer.counts, labels), labels)
    assert [u["label"] for u in ref] == layer.best_label.tolist()
    summary = results.layer_summary(layer)
    assert summary.interpretable_units == 3 and summary.unique_detectors == 3
    assert summary.interpretable_by_category == {
        "color": 1,
        "object": 1,
        "material": 0,
        "scene": 1,
    }
    assert summary.unique_by_category["object"] == 1
    assert [(c.label, c.units) for c in summary.concepts] == [(1, 1), (3, 1), (8, 1)]


def test_random_counts_match_reference():
    rng = np.random.default_rng(0)
    labels = _labels()
    k = 20
    inter = rng.integers(0, 50, (k, 9))
    label_pixels = inter.max(0) + rng.integers(0, 100, 9)
    unit_pixels = np.repeat(inter.max(1, keepdims=True), 4, 1) + rng.integers(0, 100, (k, 4))
    inter[:, 2] = inter[:, 1]  # ties between labels
    counts = _counts(inter, label_pixels, unit_pixels)
    unit_pixels[3] = 0
    label_pixels[5] = 0  # zero denominators
    counts = _counts(inter * (label_pixels > 0), label_pixels, unit_pixels)
    layer = results.layer_result("l", counts, labels, categories=("color", "object", "scene"))
    np.testing.assert_array_equal(layer.iou, reference_iou(counts, labels))
    ref = reference_unit_labels(
        layer.iou, labels, categories=("color", "object", "scene"), unit_total=unit_pixels.max(1)
    )
    assert [u["label"] for u in ref] == layer.best_label.tolist()
    assert [u["iou"] for u in ref] == layer.best_iou.tolist()
    assert 7 not in layer.best_label  # material is not scored
    assert layer.category_label.shape == (k, 3)


def _lite_choice(counts, labels: LabelSpace, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(category, label) of each unit as NetDissect-Lite's `tally` picks them
    (feature_operation.py; the original release's makeresult.py has epsilon 1e-20): float64
    IoU with `epsilon` in the denominator, each category's argmax over its labels, then the
    category `score_pciou.argsort(axis=0)[::-1][0]` ranks first. That sort of a few
    categories was an insertion sort (stable) in the numpy of both releases; numpy's SIMD
    sorts (since 1.25, on AVX-512 machines) leave equal values in no set order, so it is
    written `kind="stable"` here."""
    primary = np.asarray(labels.primary)
    both = counts["intersection"].astype(np.float64)
    units_cat = counts["unit_pixels"].astype(np.float64)[:, np.maximum(primary, 0)]
    truth = counts["label_pixels"].astype(np.float64)
    iou = both / (units_cat + truth[np.newaxis, :] - both + epsilon)
    ncat, k = len(labels.categories), both.shape[0]
    pciou = np.array([iou * (primary == ci)[np.newaxis, :] for ci in range(ncat)])
    label_pciou = pciou.argmax(axis=2)
    score_pciou = pciou[np.arange(ncat)[:, np.newaxis], np.arange(k)[np.newaxis, :], label_pciou]
    bestcat = score_pciou.argsort(axis=0, kind="stable")[::-1][0]
    return bestcat, label_pciou[bestcat, np.arange(k)]


@pytest.mark.parametrize("seed", range(3))
def test_ties_go_as_netdissect_lite_and_the_original_release_break_them(seed):
    """Counts full of ties (labels of one category and of different categories with the
    same IoU): every labelled unit gets the category and label of Lite's own selection code,
    and of the original release's; Lite's 1e-10 is inert at full Broden's scale (unions
    of 2**21 pixels and more), so the counts are scaled there for it."""
    rng = np.random.default_rng(seed)
    labels = _labels()
    k = 200
    inter = rng.integers(0, 3, (k, 9))
    label_pixels = rng.choice([4, 8], 9)
    unit_pixels = np.repeat(rng.integers(2, 5, (k, 1)), 4, 1)  # one union for every category
    counts = _counts(inter, label_pixels, unit_pixels)
    layer = results.layer_result("l", counts, labels)
    labelled = layer.best_label >= 0
    tied = [len(set(r[r > 0].round(12))) < np.count_nonzero(r) for r in layer.category_iou]
    assert labelled.sum() > 150 and sum(tied) > 50  # the rules are exercised
    scaled = {**counts, **{n: counts[n] << 21 for n in ("intersection", "label_pixels")}}
    scaled["unit_pixels"] = counts["unit_pixels"] << 21
    for lite_counts, epsilon in ((counts, 1e-20), (scaled, 1e-10)):
        category, label = _lite_choice(lite_counts, labels, epsilon)
        assert layer.best_category[labelled].tolist() == category[labelled].tolist()
        assert layer.best_label[labelled].tolist() == label[labelled].tolist()
    np.testing.assert_array_equal(
        results.layer_result("l", scaled, labels).best_label, layer.best_label
    )
    ref = reference_unit_labels(layer.iou, labels, unit_total=counts["unit_total"])
    assert [u["label"] for u in ref] == layer.best_label.tolist()


def test_no_detector_does_not_crash(tmp_path):
    labels = _labels()
    zeros = _counts(np.zeros((4, 9)), np.zeros(9), np.zeros((4, 4)))
    layer = results.layer_result("random", zeros, labels)
    summary = results.layer_summary(layer)
    assert summary.interpretable_units == 0 and summary.unique_detectors == 0
    assert summary.concepts == () and set(summary.unique_by_category.values()) == {0}
    # IoU 0 for every concept: no label (not the first label of the first category).
    assert (layer.best_iou == 0).all() and layer.best_label.tolist() == [-1] * 4
    assert summary.cannot_fire == 4 and summary.unlabelled == 4
    (path,) = results.write_tally_csvs(tmp_path, [layer])
    assert len(list(csv.DictReader(path.open(newline="")))) == 4
    results.write_results_json(tmp_path / "results.json", [layer], {})
    # No label at all in the scored categories.
    empty = LabelSpace(("color",), ("-",), np.array([-1], np.int32), (False,))
    layer = results.layer_result("x", _counts(np.zeros((2, 1)), [0], np.zeros((2, 1))), empty)
    assert layer.best_label.tolist() == [-1, -1]
    assert results.tally_csv_rows(layer)[1][0]["label"] == ""


@pytest.mark.parametrize("threshold", [-0.1, 1.0, float("nan")])
def test_an_iou_threshold_outside_0_1_is_refused(threshold):
    """A negative threshold would make a unit without a label (IoU 0) a detector of -1."""
    counts = _counts(np.zeros((2, 9)), np.zeros(9), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"^iou_threshold=.*: must be in \[0, 1\)$"):
        results.layer_result("L", counts, _labels(), iou_threshold=threshold)


def test_tally_csv_schema_quoting_and_order(layer, tmp_path):
    (path,) = results.write_tally_csvs(tmp_path, [layer])
    assert path.name == results.tally_csv_name("features.10") == "tally-features.10.csv"
    assert results.layer_file_stems(["features.10"]) == ["features.10"]
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    header = ["unit", "category", "label", "score"]
    for cat in ("color", "object", "material", "scene"):
        header += [f"{cat}-label", f"{cat}-truth", f"{cat}-activation"]
        header += [f"{cat}-intersect", f"{cat}-iou"]
    assert reader.fieldnames == header
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    # Units are 1-based; ties in score keep unit order.
    assert [int(r["unit"]) for r in rows] == [5, 2, 1, 3, 4]
    assert rows[3]["score"] == rows[4]["score"]
    unit2 = rows[1]
    assert unit2["category"] == "object" and unit2["label"] == "sky"
    assert float(unit2["score"]) == layer.best_iou[1]
    assert unit2["object-truth"] == "100" and unit2["object-intersect"] == "30"
    assert unit2["object-activation"] == "100"
    # The nasty name survives the round trip: unit 1 (0-based) has sky; make NASTY win.
    counts = dict(layer.counts)
    counts["intersection"] = counts["intersection"].copy()
    counts["intersection"][1, 4] = 31
    nasty = results.layer_result("features.10", counts, _labels())
    (path,) = results.write_tally_csvs(tmp_path, [nasty])
    rows = list(csv.DictReader(path.open(newline="", encoding="utf-8")))
    assert [r["label"] for r in rows if r["unit"] == "2"] == [NASTY]
    assert [r["object-label"] for r in rows if r["unit"] == "2"] == [NASTY]


def test_iou_of_areas_is_the_exact_quotient():
    """results.iou, the one numpy IoU (the results, the formula search, the permutation test),
    against Python's division of exact integers: 0 where the union is not positive."""
    rng = np.random.default_rng(5)
    inter = rng.integers(0, 2**40, (6, 5))
    first = inter.max(1, keepdims=True) + rng.integers(0, 2**40, (6, 1))
    second = inter + rng.integers(0, 3, (6, 5))
    inter[0, :2], first[0], second[0, :2] = 0, 0, 0  # an empty union
    second[1, 0] = 0  # a union below the intersection (inconsistent counts): 0
    inter[1, 0] = first[1, 0] + 1
    want = np.array(
        [
            [
                int(i) / u if (u := int(a) + int(b) - int(i)) > 0 else 0.0
                for i, a, b in zip(inter[r], np.broadcast_to(first[r], 5), second[r], strict=True)
            ]
            for r in range(6)
        ]
    )
    for args in ((inter, first, second), (inter.astype(np.float64), first, second)):
        got = results.iou(*args)
        assert got.dtype == np.float64 and got.shape == (6, 5)
        np.testing.assert_array_equal(got, want)
    # int32 counts whose sum passes 2**31 are summed in int64.
    big = np.array([2**30 + 5], np.int32)
    assert results.iou(big, big, big)[0] == 1.0


def test_tally_csvs_of_layers_whose_names_clash_are_distinct(layer, tmp_path):
    """`a/b` and `a_b` make one safe name: the run's stems keep their files apart."""
    names = ["a/b", "a_b", "A_B", "block/4:conv"]
    layers = [results.layer_result(n, layer.counts, layer.labels, path=n) for n in names]
    paths = results.write_tally_csvs(tmp_path, layers)
    assert [p.name for p in paths] == [
        results.tally_csv_name(s) for s in results.layer_file_stems(names)
    ]
    assert paths[0].name == "tally-a_b.csv" and paths[3].name == "tally-block_4_conv.csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_file_names_are_the_layer_names():
    # The names asked for, made file-safe; no hash unless two would share a file.
    names = ["head", "layer4.1.conv2", "blocks/10", "_head_act", "inception4e"]
    want = ["head", "layer4.1.conv2", "blocks_10", "head_act", "inception4e"]
    assert results.layer_file_stems(names) == want
    assert results.tally_csv_name("blocks_10") == "tally-blocks_10.csv"
    assert results.stats_npz_name("head") == "stats-head.npz"


def test_file_names_of_colliding_layers_are_distinct():
    names = ["a/b", "a_b", "A_B", "a:b", "a b", "x" * 300, "x" * 301]
    stems = results.layer_file_stems(names)
    assert stems[0] == "a_b"
    assert len({s.lower() for s in stems}) == len(names)  # case-insensitive file systems too
    assert all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", s) for s in stems), stems
    assert stems == results.layer_file_stems(names)  # the same files on every run
    assert results.layer_file_stems(["a_b"]) == ["a_b"]  # a hash only when needed
    with pytest.raises(ValueError, match="duplicate"):
        results.layer_file_stems(["a", "a"])


def test_unit_numbers_map_to_tally_csv(layer, tmp_path):
    named = results.layer_result("conv5", layer.counts, layer.labels, path="features/10")
    (csv_path,) = results.write_tally_csvs(tmp_path, [named])
    doc = results.read_results_json(
        results.write_results_json(tmp_path / "results.json", [named], {})
    )
    assert "0-based" in doc["unit_numbering"] and "tally_csv_unit" in doc["unit_numbering"]
    (record,) = doc["layers"]
    assert (record["layer"], record["path"]) == ("conv5", "features/10")
    rows = {int(r["unit"]): r for r in csv.DictReader(csv_path.open(newline=""))}
    for unit in record["units"]:
        assert unit["tally_csv_unit"] == unit["unit"] + 1
        row = rows[unit["tally_csv_unit"]]
        assert row["label"] == (unit["name"] or "") and float(row["score"]) == unit["iou"]
    assert [u["unit"] for u in record["units"]] == list(range(named.num_units))


def test_results_json_round_trip(layer, tmp_path):
    other = results.layer_result(
        "layer4", layer.counts, layer.labels, iou_threshold=0.2, categories=("object", "color")
    )
    settings = {
        "quantile": np.float32(0.005),
        "restriction": "presence",
        "layers": ("features.10", "layer4"),
        "batch_size": np.int64(32),
        "dataset": tmp_path,
    }
    path = results.write_results_json(tmp_path / "results.json", [layer, other], settings)
    doc = results.read_results_json(path)
    assert doc["settings"]["restriction"] == "presence"
    assert doc["settings"]["layers"] == ["features.10", "layer4"]
    assert doc["settings"]["batch_size"] == 32
    assert [rec["layer"] for rec in doc["layers"]] == ["features.10", "layer4"]
    for rec, res in zip(doc["layers"], [layer, other], strict=True):
        assert rec["iou_threshold"] == res.iou_threshold and rec["num_images"] == 10
        assert all(unit["layer"] == res.layer for unit in rec["units"])
        assert [u["label"] for u in rec["units"]] == res.best_label.tolist()
        assert [u["iou"] for u in rec["units"]] == res.best_iou.tolist()
    first, second = doc["layers"]
    assert list(second["units"][1]["categories"]) == ["color", "object"]  # LabelSpace order
    assert first["units"][1]["categories"]["object"] == {
        "label": 3,
        "name": "sky",
        "iou": layer.iou[1, 3],
        "truth": 100,
        "activation": 100,
        "intersect": 30,
    }
    assert first["summary"]["unique_detectors"] == 3
    # The whole document is what layer_record gives, each unit's record on a line of its own.
    assert doc["layers"] == json.loads(
        json.dumps([results.layer_record(r) for r in (layer, other)])
    )
    lines = path.read_text().splitlines()
    unit_lines = [
        json.loads(line.rstrip(",")) for line in lines if line.lstrip().startswith('{"layer"')
    ]
    assert unit_lines == first["units"] + second["units"]
    assert second["summary"]["interpretable_units"] == 1  # threshold 0.2: only car (0.25)
    assert first["units"][0]["interpretable"] is True

    with pytest.raises(ValueError, match="duplicate"):
        results.write_results_json(tmp_path / "r2.json", [layer, layer], {})
    with pytest.raises(TypeError):
        results.write_results_json(tmp_path / "r3.json", [layer], {"bad": object()})
    assert not (tmp_path / "r3.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    partial = {**{k: v for k, v in doc.items() if k != "checksum"}, "complete": False}
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    with pytest.raises(ValueError, match="incomplete"):
        results.read_results_json(tmp_path / "partial.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="not a jaxdissect"):
        results.read_results_json(tmp_path / "other.json")
    assert results.read_results_json(tmp_path) == results.read_results_json(path)  # the run
    (tmp_path / "sub").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no results.json: pass a finished run"):
        results.read_results_json(tmp_path / "sub")
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(doc)[:40])
    with pytest.raises(ValueError, match=rf"^{cut}: not readable JSON \("):
        results.read_results_json(cut)


def test_a_results_json_changed_since_it_was_written_is_refused(layer, tmp_path, caplog):
    """Its checksum covers every value, however the file is laid out: a value changed (an
    IoU by 1e-6) is refused naming the file; re-indented or reordered, it reads as written;
    without a checksum (an older version's, or deleted), it reads with a warning."""
    path = results.write_results_json(tmp_path / "results.json", [layer], {"model": "m"})
    doc = results.read_results_json(path)
    assert doc["checksum"] == store.json_checksum(doc)
    text = path.read_text()
    iou = json.dumps(doc["layers"][0]["units"][1]["iou"])
    assert iou in text
    path.write_text(text.replace(iou, json.dumps(float(iou) + 1e-6), 1))
    with pytest.raises(ValueError, match=rf"^{path}: its checksum is not that of its values"):
        results.read_results_json(path)
    path.write_text(json.dumps(doc, indent=4, sort_keys=True))
    assert results.read_results_json(path) == doc
    assert "unverified" not in caplog.text
    path.write_text(json.dumps({k: v for k, v in doc.items() if k != "checksum"}))
    with caplog.at_level("WARNING"):
        assert results.read_results_json(path)["layers"] == doc["layers"]
    assert f"{path}: no checksum (written by an older version, or removed)" in caplog.text


def test_categories_are_scored_in_label_space_order_whatever_order_they_are_named_in():
    # Unit 0 ties between sky (object) and street-s (scene): IoU 10 / (20 + 10 - 10) each.
    labels = _labels()
    inter = np.zeros((1, 9), np.int64)
    inter[0, [3, 8]] = 10
    counts = _counts(inter, [0, 0, 0, 10, 0, 0, 0, 0, 10], [[20, 20, 20, 20]])
    for cats in (("object", "scene"), ("scene", "object")):
        layer = results.layer_result("l", counts, labels, categories=cats)
        assert labels.names[layer.best_label[0]] == "street-s"  # the last in LabelSpace order
        header, _ = results.tally_csv_rows(layer)
        assert [h for h in header if h.endswith("-label")] == ["object-label", "scene-label"]
        assert list(results.layer_record(layer)["units"][0]["categories"]) == ["object", "scene"]
        summary = results.layer_summary(layer)
        assert summary.unique_by_category == {"object": 0, "scene": 1}
    with pytest.raises(
        ValueError, match=r"^categories=object,scene,object: object given more than once"
    ):
        results.layer_result("l", counts, labels, categories=("object", "scene", "object"))


def test_counts_are_checked(layer):
    counts = dict(layer.counts)
    counts["unit_pixels"] = counts["unit_pixels"][:, :2]
    with pytest.raises(ValueError, match="unit_pixels"):
        results.layer_result("l", counts, layer.labels)
    with pytest.raises(ValueError, match="categories"):
        results.layer_result("l", layer.counts, layer.labels, categories=("shape",))

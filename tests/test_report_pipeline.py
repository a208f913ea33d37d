"""The report the pipeline writes, from data whose label names are hostile, in Chromium."""

import csv
import json
import shutil

import jax
import pytest
from PIL import Image

from jaxdissect import engine, outdir, pipeline, results, store
from jaxdissect.data import Broden, synthetic
from jaxdissect.tie_rule import active
from tests.fixtures.small_model import make
from tests.test_report_browser import _no_alert, _open, _screenshot, driver  # noqa: F401

# One worker for the module: the dissection behind the `report` fixture runs once.
pytestmark = pytest.mark.xdist_group("report_pipeline")

XSS = "<script>alert({})</script>"


def _small_model() -> pipeline.ModelInfo:
    module, variables = make()
    return pipeline.ModelInfo(
        module,
        variables,
        module.input_spec,
        "small <b>model</b>",
        store.fingerprint_tree(variables),
    )


def _rerun(root, out, layers) -> None:
    """The `dissected` run's dissection of `layers` again into `out`, without a report."""
    pipeline.dissect(
        _small_model(),
        layers,
        Broden.open(root),
        engine.Settings(batch_size=8),
        out,
        dataset_name="tiny & hostile",
        options=pipeline.Options(progress=False, num_threads=0, report=False),
    )


@pytest.fixture(scope="module")
def dissected(tmp_path_factory):
    """(output directory, the timings `pipeline.dissect` handed back, the Broden folder)."""
    root = synthetic.generate_tiny(tmp_path_factory.mktemp("xss") / "broden", num_images=16)
    # Every colour label gets a hostile name: some card shows one as a label or runner-up.
    path = root / "label.csv"
    rows = list(csv.DictReader(path.open(newline="")))
    for i, row in enumerate(r for r in rows if r["name"].endswith("-c")):
        row["name"] = XSS.format(i)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    source = Broden.open(root)
    out = tmp_path_factory.mktemp("report")
    timings = {}
    pipeline.dissect(
        _small_model(),
        ["conv1", "top"],  # "top": the model's alias of conv2
        source,
        engine.Settings(batch_size=8),
        out,
        dataset_name="tiny & hostile",
        options=pipeline.Options(progress=False, num_threads=0),
        timings=timings,
    )
    return out, timings, root


@pytest.fixture(scope="module")
def report(dissected):
    return dissected[0]


def test_timings_are_the_passes_and_the_report(dissected):
    _, timings, _ = dissected
    assert {"pass1_s", "pass2_s", "results_s"} <= timings.keys()
    assert all(timings[k] > 0 for k in ("pass1_s", "pass2_s", "results_s"))
    # The caches as pass 2 left them: both layers' float16 maps (conv1 32x32x8, conv2
    # 16x16x12) of the 16 images in host memory, and the labels pass 1 decoded.
    assert timings["cache"] == "host"
    assert timings["cache_host_bytes"] == 16 * (32 * 32 * 8 + 16 * 16 * 12) * 2
    assert timings["label_memo_bytes"] > 0


def test_another_models_results_are_not_mixed_in(report, tmp_path):
    # A dissection of other weights into a folder holding this one's results is refused
    # before any pass runs: they would be left beside each other's files.
    for name in ("results.json", "index.html"):
        (tmp_path / name).write_bytes((report / name).read_bytes())
    module, variables = make()
    other = jax.tree.map(lambda x: x + 1, variables)
    source = Broden.open(synthetic.generate_tiny(tmp_path / "broden", num_images=2))
    for name, what in [
        ("other", r"another model \(small <b>model</b>\)"),
        # The same name (a weights file changed in place, a study's other amounts or steps):
        # the message says so.
        (
            "small <b>model</b>",
            r"small <b>model</b> with other weights or options \(changed since that run\), "
            "or for a study other rotation amounts, training steps or layers",
        ),
    ]:
        with pytest.raises(ValueError, match=rf"^output_dir=.* holds the results of {what}"):
            pipeline.dissect(
                pipeline.ModelInfo(
                    module, other, module.input_spec, name, store.fingerprint_tree(other)
                ),
                ["conv1"],
                source,
                engine.Settings(batch_size=8),
                tmp_path,
                dataset_name="tiny",
                options=pipeline.Options(progress=False, num_threads=0),
            )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".lock",  # the output_dir's lock (`outdir.locked`), as a script's
        "broden",
        "index.html",
        "results.json",
    ]


# Files the follow-on scripts write beside a dissection (`outdir.FOLLOW_ON_OUTPUTS`).
FOLLOW_ONS = [
    "ablation.json",
    "compositional-top.csv",
    "compositional.json",
    "concept_vectors.npz",
    "formula_strips",
    "formula_strips/top",
    "formula_strips/top/unit0000.png",
    "plots",
    "plots/compositional_length.png",
    "significance-top.csv",
]


def _plant_follow_ons(out):
    for name in FOLLOW_ONS:
        if "." in name:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_text("made from the dissection beside it")


def test_follow_on_outputs_stay_with_their_dissection_only(dissected, tmp_path):
    """compositional/significance/ablation outputs beside a dissection stay through a rerun
    that writes the same dissection, and go with a rerun that writes another."""
    report, _, root = dissected
    out = tmp_path / "run"
    shutil.copytree(report, out)  # .work included: the passes' stages are reused
    _plant_follow_ons(out)

    def rerun(layers):
        _rerun(root, out, layers)

    def follow_ons():
        return sorted(p.relative_to(out).as_posix() for p in outdir.follow_on_files(out))

    rerun(["conv1", "top"])  # the same dissection: its results.json and stats, byte for byte
    assert (out / "results.json").read_bytes() == (report / "results.json").read_bytes()
    assert follow_ons() == [
        "ablation.json",
        "compositional-top.csv",
        "compositional.json",
        "concept_vectors.npz",
        "formula_strips",
        "plots/compositional_length.png",
        "significance-top.csv",
    ]
    assert (out / "formula_strips" / "top" / "unit0000.png").is_file()
    rerun(["top"])  # another
    assert follow_ons() == [] and not (out / "formula_strips").exists()


def test_follow_on_outputs_are_kept_through_what_they_do_not_depend_on(report, tmp_path):
    """The dissection digest behind the follow-on outputs leaves out the batch size, the
    device count, the permutation test and the code key: significance.py and
    compositional.py share one folder without removing each other's files; a unit's label
    or a threshold counts."""
    shutil.copytree(report, tmp_path / "run")
    out = tmp_path / "run"
    layers = ["conv1", "top"]
    before = pipeline._finished_digest(out, layers)
    doc = json.loads((out / "results.json").read_text())

    def digest_of(edit):
        changed = json.loads(json.dumps(doc))
        edit(changed)
        store.write_json(out / "results.json", changed, checksum=True)
        return pipeline._finished_digest(out, layers)

    def tested(d):
        d["settings"].update(batch_size=4, devices=8, significance_draws=99)
        d["settings"]["model_code"] = "another library version's"  # its numbers: the stats
        d["layers"][0]["significance"] = {"draws": 99}
        d["layers"][0]["summary"]["interpretable_and_significant"] = 1
        d["layers"][0]["units"][0].update(p_value=0.01, label_p_value=0.01, significant=True)

    assert digest_of(tested) == before
    assert digest_of(lambda d: d["settings"].update(quantile=0.01)) != before
    assert digest_of(lambda d: d["layers"][1]["units"][3].update(iou=0.5)) != before
    store.write_json(out / "results.json", doc)
    assert pipeline._finished_digest(out, layers) == before
    stats = store.load_arrays(out / "stats-top.npz")
    store.save_arrays(out / "stats-top.npz", {**stats, "thresholds": stats["thresholds"] + 1})
    assert pipeline._finished_digest(out, layers) != before
    (out / "results.json").unlink()
    assert pipeline._finished_digest(out, layers) is None


def test_a_rerun_removes_the_previous_runs_files_results_json_first(dissected, tmp_path, caplog):
    """A rerun into a finished run's folder removes that run's files before writing its
    own, results.json first: killed while writing, it leaves no results.json (the mark of a
    complete run) beside new files; a layer it drops and a report it does not write leave
    nothing behind."""
    report, _, root = dissected
    out = tmp_path / "run"
    shutil.copytree(report, out)  # .work included: the passes' stages are reused

    def rerun():
        _rerun(root, out, ["top"])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    _plant_follow_ons(out)  # of the run replaced: go with it, after a kill too
    with pytest.MonkeyPatch.context() as patch:  # killed before the follow-ons' removal
        patch.setattr(results, "results_document", killed)
        with pytest.raises(KeyboardInterrupt), caplog.at_level("WARNING"):
            rerun()
    assert "the files of conv1, not dissected now, are removed" in caplog.text
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if ".work" not in p.parts)
    assert files == [".lock", *FOLLOW_ONS, "stats-top.npz", "tally-top.csv"]
    rerun()
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if ".work" not in p.parts)
    assert files == [".lock", "results.json", "stats-top.npz", "tally-top.csv"]
    assert json.loads((out / "results.json").read_text())["settings"]["layers"] == ["top"]
    assert (out / "tally-top.csv").read_bytes() == (report / "tally-top.csv").read_bytes()


def test_a_run_killed_while_removing_the_previous_runs_files_leaves_the_next_their_list(
    dissected, tmp_path
):
    """Killed after results.json went aside, before the previous run's other files were
    removed: the next run still removes them (its layers are read from the aside copy),
    and so it does for a results.json whose checksum fails."""
    report, _, root = dissected
    conv1 = ["layer-conv1.html", "stats-conv1.npz", "tally-conv1.csv"]

    def left(out):
        names = {p.relative_to(out).as_posix() for p in out.rglob("*") if ".work" not in p.parts}
        return sorted(n for n in names if "conv1" in n)

    out = tmp_path / "killed"
    shutil.copytree(report, out)

    removed = []
    remove = outdir.remove_path

    def killed(path):  # at the second removal: one file gone
        if removed:
            raise KeyboardInterrupt
        removed.append(path)
        remove(path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(outdir, "remove_path", killed)
        with pytest.raises(KeyboardInterrupt):
            _rerun(root, out, ["top"])
    assert not (out / "results.json").exists() and set(conv1) <= set(left(out))
    _rerun(root, out, ["top"])
    assert left(out) == [] and not (out / pipeline._REPLACED).exists()

    out = tmp_path / "damaged"
    shutil.copytree(report, out)
    doc = json.loads((out / "results.json").read_text())
    doc["layers"][0]["units"][0]["iou"] = 0.5  # its checksum now fails
    (out / "results.json").write_text(json.dumps(doc))
    _rerun(root, out, ["top"])
    assert left(out) == []


def test_files_escape_label_names(report):
    assert json.loads((report / "results.json").read_text())["complete"] is True
    for page in report.glob("*.html"):
        text = page.read_text()
        assert "<script>alert(" not in text, page.name
    assert list((report / "strips").rglob("*.jpg"))


def test_files_and_records_use_the_names_asked_for(report):
    names = sorted(p.name for p in report.iterdir() if p.is_file())
    assert names == [
        ".lock",
        "index.html",
        "layer-conv1.html",
        "layer-top.html",
        "results.json",
        "stats-conv1.npz",
        "stats-top.npz",
        "tally-conv1.csv",
        "tally-top.csv",
    ]
    assert sorted(p.name for p in (report / "strips").iterdir()) == ["conv1", "top"]
    assert (report / "strips" / "top" / "unit0000.jpg").is_file()
    doc = json.loads((report / "results.json").read_text())
    assert doc["settings"]["layers"] == ["conv1", "top"]
    assert doc["settings"]["layer_paths"] == {"conv1": "conv1", "top": "conv2"}
    assert list(doc["settings"]["thresholds"]) == ["conv1", "top"]
    # `auto` resolved per layer: narrow layers of 16-bit activations count a histogram.
    assert doc["settings"]["quantile_modes"] == {"conv1": "histogram", "top": "histogram"}
    assert [(r["layer"], r["path"]) for r in doc["layers"]] == [
        ("conv1", "conv1"),
        ("top", "conv2"),
    ]
    page = (report / "layer-top.html").read_text()
    assert "<h1>top</h1>" in page and "module path <code>conv2</code>" in page
    assert '<code class="path">conv2</code>' in (report / "index.html").read_text()


def test_unit_numbers_in_report_and_results_match_tally_csv(report):
    doc = json.loads((report / "results.json").read_text())
    top = doc["layers"][1]
    with (report / "tally-top.csv").open(newline="") as f:
        rows = {int(r["unit"]): r for r in csv.DictReader(f)}
    page = (report / "layer-top.html").read_text()
    assert "numbered by channel from 0" in page and "tally.csv numbers them from 1" in page
    for unit in top["units"]:
        k = unit["unit"]
        assert rows[unit["tally_csv_unit"]]["label"] == (unit["name"] or "")
        card = page[page.index(f'id="unit-{k}"') :]
        assert card[: card.index("</article>")].count(f"unit {k} (tally.csv {k + 1})") == 1


def test_pipeline_report_in_browser(driver, report):  # noqa: F811
    from selenium.webdriver.common.by import By

    _open(driver, report / "index.html")
    _no_alert(driver)
    links = driver.find_elements(By.CSS_SELECTOR, "#summary a")
    assert links
    layer_page = next(report.glob("layer-conv1*.html"))
    _open(driver, layer_page)  # every strip image loads
    _no_alert(driver)
    assert len(driver.find_elements(By.CSS_SELECTOR, ".card")) == 8
    text = driver.find_element(By.TAG_NAME, "body").text
    assert "<script>alert(" in text  # shown as text, never run
    _screenshot(driver, "pipeline-layer.png")


def test_strips_of_fewer_images_than_top_slots(tmp_path):
    """4 probe images, 10 top-image slots: every strip shows filled slots only, of images
    where the unit fires (its top value passes T by the tie rule)."""
    source = Broden.open(synthetic.generate_tiny(tmp_path / "broden", num_images=4))
    module, variables = make()
    info = pipeline.ModelInfo(
        module, variables, module.input_spec, "small", store.fingerprint_tree(variables)
    )
    settings = engine.Settings(batch_size=8)
    options = pipeline.Options(progress=False, num_threads=0)
    pipeline.dissect(
        info, ["conv1"], source, settings, tmp_path / "out", dataset_name="4", options=options
    )
    strips = sorted((tmp_path / "out" / "strips").rglob("*.jpg"))
    assert strips and settings.top_images > 4
    stats = store.load_arrays(tmp_path / "out" / "stats-conv1.npz")
    fires = (stats["top_indices"] >= 0) & active(
        stats["top_values"], stats["thresholds"], settings.tie_rule
    )
    assert (fires.sum(0) < 4).any()  # units firing in fewer images than the slots filled
    for path in strips:
        # At most the slots where the unit fires (fewer where a peak upsamples to nothing).
        n = int(fires[:, int(path.stem.removeprefix("unit"))].sum())
        with Image.open(path) as im:
            h = im.height
            drawn = (im.width + 3) / (h + 3)  # square tiles, gaps of 3 px
            assert drawn == int(drawn) and 1 <= drawn <= n, path.name


def test_a_model_without_an_input_spec_gets_torchvisions():
    from jaxdissect.preprocess import TORCHVISION

    module, variables = make()
    assert pipeline.ModelInfo(module, variables, None, "m", "k").input_spec == TORCHVISION
    with pytest.raises(TypeError, match=r"^input_spec=64: must be a jaxdissect.preprocess"):
        pipeline.ModelInfo(module, variables, 64, "m", "k")

    # The README's class attribute, read from an instance: Linen wraps it as a method.
    import flax.linen as nn

    from jaxdissect.preprocess import InputSpec

    class Plain(nn.Module):
        input_spec = InputSpec(32, (0.0,) * 3, (1.0,) * 3)

    assert not isinstance(Plain().input_spec, InputSpec)
    info = pipeline.ModelInfo(Plain(), {}, Plain().input_spec, "m", "k")
    assert info.input_spec == InputSpec(32, (0.0,) * 3, (1.0,) * 3)


def test_results_json_names_the_categories_in_the_label_spaces_order(tmp_path):
    source = Broden.open(synthetic.generate_tiny(tmp_path / "broden", num_images=4))
    module, variables = make()
    info = pipeline.ModelInfo(
        module, variables, module.input_spec, "small", store.fingerprint_tree(variables)
    )
    named = source.labels.categories[:2]
    settings = engine.Settings(batch_size=8, categories=named[::-1])
    options = pipeline.Options(progress=False, num_threads=0, report=False)
    out = tmp_path / "out"
    pipeline.dissect(info, ["conv1"], source, settings, out, dataset_name="4", options=options)
    doc = results.read_results_json(tmp_path / "out" / "results.json")
    assert doc["settings"]["categories"] == list(named)


def test_an_ablation_page_kept_through_a_rerun_links_what_is_there(dissected, tmp_path):
    """ablation.html links the report's strips and index.html: kept through a rerun of the
    same dissection that writes no report (a study script's default), it links none of
    them (its strips and index.html went with the report replaced)."""
    import re

    from jaxdissect.report import ablation_page

    report, _, root = dissected
    out = tmp_path / "run"
    shutil.copytree(report, out)  # .work included: the passes' stages are reused
    unit = {"unit": 0, "drop": 0.25, "name": "x", "category": "object", "iou": 0.1}
    doc = {
        "settings": {"layer": "top", "weights": "w", "units": 12, "eval_images": 9, "task": "t"},
        "value": "zero",
        "classes": [
            {
                "class": "c",
                "examples": 3,
                "curve": {"n": [0, 1], "class_accuracy": [1.0, 0.5], "others_accuracy": [1, 1]},
                "units": [{**unit, "interpretable": True}],
            }
        ],
    }
    store.write_json(out / "ablation.json", doc)
    (out / "ablation.png").write_bytes(b"")  # ablation_files writes it beside
    strips = ablation_page.strips_dir(out, ["conv1", "top"], "top")
    ablation_page.write_page(out, doc, strips_dir=strips)

    def links():
        page = (out / "ablation.html").read_text()
        return {
            link: (out / link).is_file() for link in re.findall(r'(?:src|href)="([^"]+)"', page)
        }

    assert links() == {"index.html": True, "strips/top/unit0000.jpg": True, "ablation.png": True}
    _rerun(root, out, ["conv1", "top"])  # the same dissection, no report
    assert not (out / "index.html").exists()
    assert links() == {"ablation.png": True}  # the follow-on kept, no link into the report


def test_an_ablation_page_finds_its_layers_strips_among_clashing_names(tmp_path):
    """A layer's strips are named by the stems of all the dissection's layers (`a/b` took
    `a_b`, so `a_b`'s are hashed), not by its name alone."""
    from jaxdissect.report import ablation_page

    stems = results.layer_file_stems(["a/b", "a_b"])
    assert stems[0] == "a_b" and stems[1] != "a_b"
    assert (
        ablation_page.strips_dir(tmp_path, ["a/b", "a_b"], "a_b") == tmp_path / "strips" / stems[1]
    )
    assert ablation_page.strips_dir(tmp_path, ["a/b"], "a_b") is None

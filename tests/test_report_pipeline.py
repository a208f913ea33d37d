"""The report the pipeline writes, from data whose label names are hostile, in Chromium."""

import csv
import json

import pytest

from jaxdissect import engine, pipeline, store
from jaxdissect.data import Broden, synthetic
from tests.fixtures.small_model import make
from tests.test_report_browser import _no_alert, _open, _screenshot, driver  # noqa: F401

XSS = "<script>alert({})</script>"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
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
    module, variables = make()
    out = tmp_path_factory.mktemp("report")
    pipeline.dissect(
        pipeline.ModelInfo(
            module,
            variables,
            module.input_spec,
            "small <b>model</b>",
            store.fingerprint_tree(variables),
        ),
        ["conv1", "conv2"],
        source,
        engine.Settings(batch_size=8),
        out,
        dataset_name="tiny & hostile",
        options=pipeline.Options(progress=False, num_threads=0),
    )
    return out


def test_files_escape_label_names(report):
    assert json.loads((report / "results.json").read_text())["complete"] is True
    for page in report.glob("*.html"):
        text = page.read_text()
        assert "<script>alert(" not in text, page.name
    assert list((report / "strips").rglob("*.jpg"))


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

"""The report in headless Chromium from file://: images load, controls work, labels are text."""

from __future__ import annotations

import base64
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.test_report import XSS, build_report

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "report"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--window-size=1280,1000",
)

# Switch lazy images to eager and wait until each one has loaded or failed.
_LOAD_IMAGES = """
const done = arguments[arguments.length - 1];
const imgs = Array.from(document.images);
Promise.all(imgs.map(img => {
  img.loading = "eager";
  if (img.complete && img.naturalWidth > 0) return null;
  return new Promise(ok => {
    img.addEventListener("load", ok, {once: true});
    img.addEventListener("error", ok, {once: true});
  });
})).then(() => done(imgs.map(i => [i.getAttribute("src"), i.naturalWidth])));
"""


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"headless browser not installed: {', '.join(missing)} missing")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        drv = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
        try:
            drv.set_page_load_timeout(20)
            drv.set_script_timeout(20)
            yield drv
        finally:
            drv.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    index, _ = build_report(tmp_path_factory.mktemp("browser-report"))
    return index


def _open(driver: WebDriver, page: Path) -> None:
    driver.get(page.as_uri())
    images = driver.execute_async_script(_LOAD_IMAGES)
    assert images, page.name
    broken = [src for src, width in images if width <= 0]
    assert broken == [], f"{page.name}: images not loaded: {broken}"


def _no_alert(driver: WebDriver) -> None:
    from selenium.common.exceptions import NoAlertPresentException

    with pytest.raises(NoAlertPresentException):
        driver.switch_to.alert  # noqa: B018


def _no_js_errors(driver: WebDriver) -> None:
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def _screenshot(driver: WebDriver, name: str) -> Path:
    """A full-page PNG (beyond the viewport) under artifacts/report/."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    width, height = driver.execute_script(
        "const e = document.documentElement; return [e.scrollWidth, e.scrollHeight]"
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 6000), "scale": 1},
        },
    )
    path = ARTIFACTS / name
    path.write_bytes(base64.b64decode(shot["data"]))
    print(f"screenshot: {path}")
    return path


def _visible(driver: WebDriver) -> list[dict[str, str]]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll('.card'))"
        ".filter(c => !c.hidden && c.offsetParent !== null)"
        ".map(c => ({unit: c.dataset.unit, iou: c.dataset.iou,"
        " label: c.dataset.label, category: c.dataset.category}))"
    )


def test_index(driver: WebDriver, site: Path) -> None:
    from selenium.webdriver.common.by import By

    _open(driver, site)
    _no_alert(driver)
    assert driver.find_element(By.TAG_NAME, "h1").text == f"Dissection of {XSS}"
    rows = driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")
    assert len(rows) == 3
    plots = driver.find_elements(By.CSS_SELECTOR, ".plot img")
    assert len(plots) == 4
    # Every SVG graph loaded and has a size (a malformed one shows nothing).
    loaded = "return arguments[0].complete && arguments[0].naturalWidth"
    assert all(driver.execute_script(loaded, img) > 100 for img in plots)
    settings = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#settings td")]
    assert XSS in settings
    _no_js_errors(driver)
    _screenshot(driver, "index.png")
    # The link to a layer page whose name has a '/' leads to that page.
    driver.find_element(By.LINK_TEXT, "blocks/3").click()
    assert driver.find_element(By.TAG_NAME, "h1").text == "blocks/3"


def test_layer_page_controls(driver: WebDriver, site: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    _open(driver, site.parent / "layer-layer4.html")
    _no_alert(driver)
    cards = driver.find_elements(By.CSS_SELECTOR, ".card")
    assert len(cards) == 12
    assert driver.find_elements(By.CSS_SELECTOR, ".plot img")

    # The XSS label is shown as text, as a card's label.
    names = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".card .name")]
    assert XSS in names
    assert driver.execute_script("return document.scripts.length") == 1

    by_iou = _visible(driver)
    ious = [float(c["iou"]) for c in by_iou]
    assert ious == sorted(ious, reverse=True)
    Select(driver.find_element(By.ID, "sort")).select_by_value("unit")
    by_unit = [int(c["unit"]) for c in _visible(driver)]
    assert by_unit == sorted(by_unit) and by_unit != [int(c["unit"]) for c in by_iou]
    Select(driver.find_element(By.ID, "sort")).select_by_value("label")
    labels = [c["label"].lower() for c in _visible(driver)]
    assert labels == sorted(labels, key=lambda s: s.lower()) or len(set(labels)) < len(labels)
    Select(driver.find_element(By.ID, "sort")).select_by_value("iou")
    assert _visible(driver) == by_iou

    Select(driver.find_element(By.ID, "category")).select_by_value("scene")
    shown = _visible(driver)
    assert shown and {c["category"] for c in shown} == {"scene"}
    assert len(shown) < 12
    count = driver.find_element(By.ID, "count").text
    assert count == f"{len(shown)} of 12 units shown"
    Select(driver.find_element(By.ID, "category")).select_by_value("")
    assert len(_visible(driver)) == 12

    search = driver.find_element(By.ID, "search")
    search.send_keys("SCRIPT")
    shown = _visible(driver)
    assert shown and all(c["label"] == XSS for c in shown)
    search.clear()
    search.send_keys(" ")  # clear() fires no input event
    assert len(_visible(driver)) == 12

    driver.find_element(By.ID, "min-iou").send_keys("0.2")
    shown = _visible(driver)
    assert all(float(c["iou"]) >= 0.2 for c in shown)
    assert len(shown) == sum(i >= 0.2 for i in ious)
    driver.find_element(By.ID, "reset").click()
    assert _visible(driver) == by_iou
    _no_alert(driver)
    _no_js_errors(driver)
    _screenshot(driver, "layer.png")


def test_empty_layer_page(driver: WebDriver, site: Path) -> None:
    from selenium.webdriver.common.by import By

    _open(driver, site.parent / "layer-random_conv5.html")
    assert len(driver.find_elements(By.CSS_SELECTOR, ".card")) == 5
    assert len(driver.find_elements(By.CSS_SELECTOR, ".card.below")) == 5
    _no_alert(driver)
    _no_js_errors(driver)

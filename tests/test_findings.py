"""The paper's findings, at the size a unit test affords (full-size runs: see the README).

(a) and (b) read the tiny runs of tests/test_experiments.py: a half-width
small CNN trained on 256 synthetic images at 48 px for 300 steps (about 0.6
validation accuracy on 17 scenes), dissected on all 256 images. (c) dissects the
real ImageNet EfficientNet-Lite0 on 32 synthetic images at 96 px.

Measured here (numbers move a little whenever the synthetic generator changes):
(a) unique detectors of conv5 8 at random init, 15 trained; conv3 7 -> 13
    (full size, 2,000 steps to 0.86 accuracy: conv5 5 -> 22, conv3 4 -> 17);
(b) a full rotation of conv5 leaves the folded network's accuracy exactly as it was and
    drops the inserted one's (0.55 -> 0.02); unique detectors do not fall (15 -> 16;
    full size 22 -> 18, where the paper saw ~80% fewer);
(c) Lite0 stem: colour+texture 3 of 8 unique detectors; stage6: 0 of 19, and 18 of its 19
    are objects or parts (full size, 600 images at 224: 4 of 7 vs 0 of 14, and the head
    has 20 objects and 9 parts among 59).
"""

from __future__ import annotations

import functools
import json
import pathlib

import pytest

from jaxdissect import engine, parallel, pipeline, results
from jaxdissect.data import synthetic
from jaxdissect.data.broden import Broden
from jaxdissect.models import load as model_load
from tests.test_experiments import (  # noqa: F401 (shared_workspace: an autouse fixture)
    SAVE_STEPS,
    dynamics_run,
    once,
    rotation_run,
    shared_workspace,
    workspace,
)

TRAINED = SAVE_STEPS[-1]


def _dynamics() -> dict[tuple[int, str], dict]:
    doc = json.loads((dynamics_run() / "dynamics.json").read_text())
    return {(r["step"], r["layer"]): r for r in doc["rows"]}


def test_a_training_grows_unique_detectors():
    rows = _dynamics()
    assert rows[(TRAINED, "conv5")]["val_accuracy"] > 0.4  # the network learnt something
    for layer in ("conv3", "conv5"):
        random_init, trained = rows[(0, layer)], rows[(TRAINED, layer)]
        assert trained["unique_detectors"] > random_init["unique_detectors"], layer
        assert trained["interpretable_units"] > random_init["interpretable_units"], layer


def test_b_folded_rotation_keeps_the_networks_power():
    points = json.loads((rotation_run() / "rotation.json").read_text())["points"]
    none, _, full = points
    assert (none["amount"], full["amount"]) == (0.0, 1.0)
    # Folded into the consumers, the rotation changes nothing the network computes ...
    for p in points:
        assert p["accuracy_folded"] == none["accuracy_folded"]
        assert p["max_output_change"] < 1e-4
    # ... inserted (the later layers not adapted), it does.
    assert full["accuracy_inserted"] < none["accuracy_inserted"]


def test_b_rotation_and_unique_detectors():
    """The paper's sharp drop of unique detectors (~80% for AlexNet conv5) is NOT reproduced on
    the synthetic Broden. At full size (experiments/configs/rotation_small_cnn.flags) a full
    rotation leaves conv5 18 of its 22 unique detectors and 119 of its 146 interpretable units
    (an earlier training of the same config: 18, 18 and 20 of 20 for rotation seeds 0-2); at this test's size the counts move by +-1 either way. So
    there is nothing true to assert here; the test reports the numbers."""
    points = json.loads((rotation_run() / "rotation.json").read_text())["points"]
    numbers = ", ".join(
        f"t={p['amount']:g}: {p['unique_detectors']} unique, {p['interpretable_units']} units"
        for p in points
    )
    pytest.skip(f"not reproduced on synthetic data (see docstring); measured here: {numbers}")


@once("broden96")
def broden96(out: pathlib.Path) -> None:
    synthetic.generate(out, num_images=32, size=96, workers=1)


@functools.cache
def _lite0_layers() -> dict[str, results.LayerSummary]:
    root = broden96()
    model = model_load.load("efficientnet_lite0", weights="pretrained")
    layer_results = pipeline.dissect(
        pipeline.ModelInfo(
            model.module,
            model.variables,
            model.input_spec,
            model.name,
            model.key,
            model.apply_kwargs,
        ),
        ["stem", "stage6"],
        Broden.open(root),
        engine.Settings(batch_size=16, quantile_mode="exact"),
        workspace() / "lite0",
        dataset_name="tiny synthetic Broden",
        mesh=parallel.data_mesh(1),
        options=pipeline.Options(report=False, progress=False),
    )
    return dict(zip(("stem", "stage6"), map(results.layer_summary, layer_results), strict=True))


def _share(summary: results.LayerSummary, categories: tuple[str, ...]) -> float:
    total = summary.unique_detectors
    return sum(summary.unique_by_category.get(c, 0) for c in categories) / max(1, total)


@pytest.mark.slow
def test_c_colour_and_texture_low_objects_and_parts_high_in_lite0():
    layers = _lite0_layers()
    low, high = layers["stem"], layers["stage6"]
    assert _share(low, ("color", "texture")) > _share(high, ("color", "texture"))
    objects_parts = lambda s: s.unique_by_category["object"] + s.unique_by_category["part"]  # noqa: E731
    assert objects_parts(high) > objects_parts(low)
    assert _share(high, ("object", "part")) > 0.5

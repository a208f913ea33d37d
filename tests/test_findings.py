"""The paper's finding (c) at the size a unit test affords (full-size runs: see the README).

(c) dissects the real ImageNet EfficientNet-Lite0 on 32 synthetic images at 96 px:
low layers see colour and texture, high layers objects and parts. Findings (a) and
(b) are asserted beside the tiny runs they read, in tests/test_experiments.py.
"""

from __future__ import annotations

import pytest

from jaxdissect import engine, parallel, pipeline, results
from jaxdissect.data import synthetic
from jaxdissect.data.broden import Broden
from jaxdissect.models import load as model_load


@pytest.fixture(scope="module")
def lite0_layers(tmp_path_factory) -> dict[str, results.LayerSummary]:
    tmp = tmp_path_factory.mktemp("lite0")
    root = synthetic.generate(tmp / "broden1_96", num_images=32, size=96, workers=1)
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
        tmp / "run",
        dataset_name="tiny synthetic Broden",
        mesh=parallel.data_mesh(1),
        options=pipeline.Options(report=False, progress=False),
    )
    return dict(zip(("stem", "stage6"), map(results.layer_summary, layer_results), strict=True))


def _share(summary: results.LayerSummary, categories: tuple[str, ...]) -> float:
    total = summary.unique_detectors
    return sum(summary.unique_by_category.get(c, 0) for c in categories) / max(1, total)


@pytest.mark.slow
def test_c_colour_and_texture_low_objects_and_parts_high_in_lite0(lite0_layers):
    low, high = lite0_layers["stem"], lite0_layers["stage6"]
    assert _share(low, ("color", "texture")) > _share(high, ("color", "texture"))
    objects_parts = lambda s: s.unique_by_category["object"] + s.unique_by_category["part"]  # noqa: E731
    assert objects_parts(high) > objects_parts(low)
    assert _share(high, ("object", "part")) > 0.5

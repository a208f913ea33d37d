"""A whole dissection into an output directory: engine -> results -> files -> report.

`experiments/dissect.py` parses flags, loads the model and data, and calls
`dissect`. Everything here is importable and tested; the script stays short.

Output directory:
  results.json            settings and every layer's per-unit, per-category results
  tally-<layer>.csv       NetDissect-Lite's schema, one per layer
  stats-<layer>.npz       thresholds, top images and tie statistics (minimum, maximum,
                          activations at the threshold) per unit
  index.html, <layer>.html, strips/, plots   the report
  .work/                  keyed stage outputs, checkpoints, activation cache (resumable)
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import logging

from jaxdissect import capture, engine, results, store
from jaxdissect.preprocess import InputSpec
from jaxdissect.report import build as report_build


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The model as the pipeline needs it."""

    module: Any
    variables: Any
    input_spec: InputSpec
    name: str
    key: str
    apply_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Options:
    """How to run (changes speed and files, never the numbers)."""

    activation_cache: str = "auto"
    cache_budget_bytes: int | None = None
    checkpoint_every: int = 50
    num_threads: int | None = None  # decoding threads; None: the cores, at most 16
    num_workers: int = 0  # decoding processes instead of threads (many-core hosts)
    tally_method: str = "auto"  # how the tally counts (jaxdissect.tally); exact in every one
    progress: bool = True
    report: bool = True
    strip_height: int = 112
    runners_up: int = 3


def dissect(
    model: ModelInfo,
    layers: Sequence[str] | str,
    source: Any,
    settings: engine.Settings,
    output_dir: str | pathlib.Path,
    *,
    dataset_name: str,
    mesh: jax.sharding.Mesh | None = None,
    options: Options = Options(),
) -> list[results.LayerResult]:
    """Dissect `layers` of `model` on `source`; write results and report to `output_dir`."""
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = model.input_spec
    tap = capture.make_tap(
        model.module,
        model.variables,
        layers,
        input_shape=(spec.size, spec.size, 3),
        apply_kwargs=model.apply_kwargs,
    )
    logging.info(
        "dissecting %s, layers %s, on %s (%d images)",
        model.name,
        ", ".join(tap.layers),
        dataset_name,
        len(source),
    )
    logging.info("settings: %s", dataclasses.asdict(settings))
    logging.info("results go to %s", out.resolve())
    dissector = engine.Dissector(
        tap,
        source,
        settings,
        input_spec=spec,
        model_key=model.key,
        mesh=mesh,
        work_dir=out / ".work",
        activation_cache=options.activation_cache,
        cache_budget_bytes=options.cache_budget_bytes,
        checkpoint_every=options.checkpoint_every,
        num_threads=options.num_threads,
        num_workers=options.num_workers,
        progress=options.progress,
        tally_method=options.tally_method,
    )
    t0 = time.time()
    stats = dissector.run(tap.variables)
    layer_results = [
        results.layer_result(
            layer,
            stats[layer].counts,
            dissector.labels,
            iou_threshold=settings.iou_threshold,
            categories=settings.categories,
            ties=stats[layer].ties,
        )
        for layer in tap.layers
    ]
    if jax.process_index() != 0:
        return layer_results
    for r in layer_results:
        results.write_tally_csv(out / results.tally_csv_name(r.layer), r)
        s = stats[r.layer]
        tie_arrays = (
            {}
            if s.ties is None
            else {
                "minimum": s.ties.minimum,
                "maximum": s.ties.maximum,
                "at_threshold": s.ties.at_threshold,
            }
        )
        store.save_arrays(
            out / f"stats-{results.safe_layer_name(r.layer)}.npz",
            {
                "thresholds": s.thresholds,
                "top_values": s.top_values,
                "top_indices": s.top_indices,
                **tie_arrays,
            },
        )
    run_settings = {
        **dataclasses.asdict(settings),
        "model": model.name,
        "model_key": model.key,
        "dataset": dataset_name,
        "dataset_fingerprint": dissector.data_key,
        "num_images": len(source),
        "layers": list(tap.layers),
        "input_spec": dataclasses.asdict(spec),
        "devices": int(dissector.mesh.devices.size),
        "thresholds": {layer: stats[layer].thresholds.tolist() for layer in tap.layers},
    }
    if options.report:
        top = {k: v.top_indices for k, v in stats.items()}
        maps = dissector.unit_maps(tap.variables, top)
        report_build.write_dissection_report(
            out,
            model.name,
            dataset_name,
            run_settings,
            layer_results,
            {k: v.thresholds for k, v in stats.items()},
            top,
            maps,
            source,
            tie_rule=settings.tie_rule,
            strip_height=options.strip_height,
            runners_up=options.runners_up,
        )
    # Last: results.json marks the run complete.
    results.write_results_json(out / "results.json", layer_results, run_settings)
    logging.info("done in %.1f s: %s", time.time() - t0, out / "index.html")
    return layer_results

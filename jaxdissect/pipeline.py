"""A whole dissection into an output directory: engine -> results -> files -> report.

`experiments/dissect.py` parses flags, loads the model and data, and calls
`dissect`. Everything here is importable and tested; the script stays short.

Output directory (<layer>: the layer's name as asked for, `results.layer_file_stems`):
  results.json            settings and every layer's per-unit, per-category results
  tally-<layer>.csv       NetDissect-Lite's schema, one per layer
  stats-<layer>.npz       thresholds and top images per unit
  index.html, layer-<layer>.html, strips/<layer>/, plots/   the report
  .work/                  keyed stage outputs, checkpoints, activation cache (resumable)
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from PIL import Image

from jaxdissect import actcache, capture, config, engine, results, store, tally
from jaxdissect.preprocess import InputSpec
from jaxdissect.report import html as report_html
from jaxdissect.report import strips as report_strips


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
    """How to run (changes speed and files, never the numbers).

    Attributes:
      activation_cache: where pass-1 activations are kept so that pass 2 does not
        run the network again (`auto`: the device or host if they fit, else disk).
      cache_budget_bytes: memory the activation cache may use (None: measured).
      checkpoint_every: checkpoint the streaming state every N batches.
      num_threads: image decoding threads (None: the usable cores, at most 16).
      num_workers: image decoding processes instead of threads (0: threads); threads
        share the GIL, so many-core GPU hosts want processes, e.g. the cores minus 2.
      tally_method: how the exact IoU counts are computed (`auto`: `segment` on CPU,
        `compact` on GPU/TPU); the same numbers from each.
      progress: show progress bars.
      report: write the HTML report (unit strips, plots).
      strip_height: pixel height of a unit's top-image strip in the report.
      runners_up: runner-up concepts shown per unit in the report.
    """

    activation_cache: str = config.setting("auto", choices=actcache.KINDS)
    cache_budget_bytes: int | None = None
    checkpoint_every: int = 50
    num_threads: int | None = config.setting(None, flag="loader_threads")
    num_workers: int = config.setting(0, flag="loader_workers")
    tally_method: str = config.setting("auto", choices=tally.METHODS)
    progress: bool = True
    report: bool = True
    strip_height: int = 112
    runners_up: int = 3

    def __post_init__(self):
        config.check_choices(self)
        for name in ("checkpoint_every", "strip_height"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.runners_up < 0:
            raise ValueError(f"runners_up={self.runners_up}: must be >= 0")
        if self.num_threads is not None and self.num_threads < 0:
            raise ValueError(f"num_threads={self.num_threads}: must be >= 0 (or None)")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers}: must be >= 0")


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
    count = f"{len(source)} images"
    logging.info(
        "dissecting %s, layers %s, on %s",
        model.name,
        ", ".join(
            n if n == p else f"{n} ({p})" for n, p in zip(tap.names, tap.layers, strict=True)
        ),
        dataset_name if count in dataset_name else f"{dataset_name} ({count})",
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
            name,
            stats[path].counts,
            dissector.labels,
            iou_threshold=settings.iou_threshold,
            categories=settings.categories,
            path=path,
        )
        for name, path in zip(tap.names, tap.layers, strict=True)
    ]
    if jax.process_index() != 0:
        return layer_results
    stems = results.layer_file_stems(tap.names)
    for r, stem in zip(layer_results, stems, strict=True):
        results.write_tally_csv(out / results.tally_csv_name(stem), r)
        s = stats[r.path]
        store.save_arrays(
            out / results.stats_npz_name(stem),
            {"thresholds": s.thresholds, "top_values": s.top_values, "top_indices": s.top_indices},
        )
    run_settings = {
        **dataclasses.asdict(settings),
        "model": model.name,
        "model_key": model.key,
        "dataset": dataset_name,
        "dataset_fingerprint": dissector.data_key,
        "num_images": len(source),
        "layers": list(tap.names),
        "layer_paths": dict(zip(tap.names, tap.layers, strict=True)),
        "input_spec": dataclasses.asdict(spec),
        "devices": int(dissector.mesh.devices.size),
        "thresholds": {r.layer: stats[r.path].thresholds.tolist() for r in layer_results},
    }
    if options.report:
        maps = {layer: s.top_maps for layer, s in stats.items()}  # kept by pass 1
        write_report(
            out, model.name, dataset_name, run_settings, layer_results, stats, maps, source, options
        )
    # Last: results.json marks the run complete.
    results.write_results_json(out / "results.json", layer_results, run_settings)
    logging.info("done in %.1f s: %s", time.time() - t0, out / "index.html")
    return layer_results


def _unit_cards(result: results.LayerResult, strip_paths: Mapping[int, str], runners_up: int):
    labels = result.labels
    cards = []
    for k in range(result.num_units):
        order = np.argsort(-result.category_iou[k], kind="stable")
        best = int(result.best_label[k])
        others = [
            (
                labels.names[int(result.category_label[k, c])],
                labels.categories[result.categories[c]],
                float(result.category_iou[k, c]),
            )
            for c in order
            if int(result.category_label[k, c]) not in (-1, best)
        ][:runners_up]
        cards.append(
            report_html.UnitCard(
                unit=k,
                label=labels.names[best] if best >= 0 else "-",
                category=labels.categories[int(result.best_category[k])],
                iou=float(result.best_iou[k]),
                runners_up=tuple(others),
                strip=strip_paths.get(k),
            )
        )
    return tuple(cards)


def write_report(
    out: pathlib.Path,
    model_name: str,
    dataset_name: str,
    run_settings: Mapping[str, Any],
    layer_results: Sequence[results.LayerResult],
    stats: Mapping[str, engine.LayerStats],
    maps: Mapping[str, np.ndarray],
    source: Any,
    options: Options,
) -> pathlib.Path:
    """Strips of every unit, then the HTML pages."""

    @functools.lru_cache(maxsize=4096)
    def thumb(index: int) -> np.ndarray:
        image = Image.fromarray(np.asarray(source.read_image(index), np.uint8))
        h = options.strip_height
        w = max(1, round(image.width * h / image.height))
        return np.asarray(image.resize((w, h), Image.BILINEAR))

    pages = []
    stems = results.layer_file_stems([r.layer for r in layer_results])
    for r, stem in zip(layer_results, stems, strict=True):
        s = stats[r.path]
        strip_dir = out / "strips" / stem
        strip_paths = {}
        for k in range(r.num_units):
            idx = s.top_indices[:, k]
            filled = idx >= 0
            if not filled.any():
                continue
            images = np.stack([thumb(int(i)) if i >= 0 else thumb(int(idx[0])) for i in idx])
            unit_maps = report_strips.upsample_maps(
                np.moveaxis(maps[r.path][:, :, :, k], 0, 0), images.shape[1:3]
            )
            strip = report_strips.unit_strip(
                images, unit_maps, float(s.thresholds[k]), valid=filled
            )
            path = strip_dir / f"unit{k:04d}.jpg"
            _save_jpeg(path, strip)
            strip_paths[k] = str(path.relative_to(out))
        summary = results.layer_summary(r)
        pages.append(
            report_html.LayerPage(
                layer=r.layer,
                num_units=r.num_units,
                iou_threshold=r.iou_threshold,
                interpretable_units=summary.interpretable_units,
                unique_detectors=dict(summary.unique_by_category),
                detectors_per_concept=[(c.name, c.category, c.units) for c in summary.concepts],
                units=_unit_cards(r, strip_paths, options.runners_up),
                downloads=((results.tally_csv_name(stem), "tally.csv"),),
                path=r.path,
            )
        )
    run = report_html.RunInfo(
        title=f"Network Dissection of {model_name}",
        model=model_name,
        dataset=dataset_name,
        settings={k: v for k, v in run_settings.items() if k != "thresholds"},
    )
    return report_html.write_report(out, run, pages)


def _save_jpeg(path: pathlib.Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=88)
    report_strips.write_bytes_atomic(path, buf.getvalue())

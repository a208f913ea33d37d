"""A whole dissection into an output directory: engine -> results -> files -> report.

`experiments/dissect.py` parses flags, loads the model and data, and calls
`dissect`. Everything here is importable and tested; the script stays short.

Output directory (<layer>: the layer's name as asked for, `results.layer_file_stems`):
  results.json            settings and every layer's per-unit, per-category results
  tally-<layer>.csv       NetDissect-Lite's schema, one per layer
  stats-<layer>.npz       thresholds, top images and tie statistics (minimum, maximum,
                          activations at the threshold) per unit
  index.html, layer-<layer>.html, strips/<layer>/, plots/   the report
  .work/                  keyed stage outputs, checkpoints, activation cache (resumable)
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import logging

from jaxdissect import (
    actcache,
    capture,
    code_keys,
    config,
    driver,
    engine,
    finished,
    outdir,
    parallel,
    results,
    store,
    tally,
)
from jaxdissect.data import loader, probe
from jaxdissect.preprocess import TORCHVISION, InputSpec, as_input_spec
from jaxdissect.report import ablation_page
from jaxdissect.report import build as report_build
from jaxdissect.report import html as report_html
from jaxdissect.token_layouts import LayoutArg


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """The model as the pipeline needs it.

    `input_spec`: how the probe images are fed to it (None: torchvision's ImageNet input,
    as for a model that declares none). `token_layout`: how [B, tokens, C] layers are read
    as maps (`capture.make_tap`'s argument; None: the model's own, else inferred).
    `wraps`: for a function wrapping other models (a rotation, a stack of checkpoints),
    what keys their definitions and code (e.g. the wrapped model's `stage_key`), which
    `stage_key` then covers; `key` stays the weights' (the output folder's check).
    """

    module: Any
    variables: Any
    input_spec: InputSpec | None
    name: str
    key: str
    apply_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    token_layout: LayoutArg = None
    wraps: str | None = None

    def __post_init__(self):
        if self.input_spec is None:
            object.__setattr__(self, "input_spec", TORCHVISION)
        elif (spec := as_input_spec(self.input_spec)) is not None:  # `model.input_spec`
            object.__setattr__(self, "input_spec", spec)
        else:
            raise TypeError(
                f"input_spec={self.input_spec!r}: must be a jaxdissect.preprocess.InputSpec "
                "(or None for torchvision's)"
            )

    @property
    def layout_key(self) -> Any:
        """`token_layout` as JSON-able, hashable text (None when not named)."""
        layout = self.token_layout
        text = lambda v: str(capture.TokenLayout.parse(v) if isinstance(v, str) else v)  # noqa: E731
        if layout is None:
            return None
        if isinstance(layout, Mapping):
            return tuple(sorted((k, text(v)) for k, v in layout.items()))
        return text(layout)

    @property
    def stage_key(self) -> str:
        """What keys the stored stages: the weights' key and the weights themselves (a
        fingerprint of `variables`, or of an NNX module's state: a `key` kept while they
        change reuses nothing), the module's definition and `apply_kwargs`
        (`code_keys.definition_key`), this library's code, a named token layout (it changes
        the maps), JAX's default matmul precision where one is set (`matmul_precision`), and
        `wraps` where given."""
        precision = matmul_precision()
        weights = store.weights_fingerprint(self.module, self.variables)
        return store.key_of(
            model=self.key,
            **({} if weights is None else {"weights": weights}),
            definition=code_keys.definition_key(self.module, self.apply_kwargs),
            code=code_keys.code_fingerprint(),
            token_layout=self.layout_key,
            **({} if precision is None else {"matmul_precision": precision}),
            **({} if self.wraps is None else {"wraps": self.wraps}),
        )


def matmul_precision() -> str | None:
    """JAX's default precision of float32 matmuls and convolutions where one is set
    (`JAX_DEFAULT_MATMUL_PRECISION`, `jax.default_matmul_precision`), else None: the
    backend's default (float32 on CPU, TensorFloat-32 on recent NVIDIA GPUs, bfloat16
    passes on TPU)."""
    precision = jax.config.jax_default_matmul_precision
    return None if precision is None else str(precision)


@dataclasses.dataclass(frozen=True)
class Options:
    """How to run (changes speed and files, never the numbers).

    Attributes:
      activation_cache: where pass-1 activations are kept so that pass 2 does not
        run the network again (`auto`: the device or host if they fit, else disk).
      cache_budget_bytes: memory the activation cache may use (None: measured).
      checkpoint_every: checkpoint the streaming state every N batches.
      num_threads: image decoding threads (None: the usable cores, at most 4).
      num_workers: image decoding processes instead of threads (0: threads); threads
        share the GIL, so many-core GPU hosts want processes, e.g. the cores minus 2.
      tally_method: how the exact IoU counts are computed (`auto`: `segment` on CPU,
        `compact` on GPU/TPU); the same numbers from each.
      progress: show progress bars.
      report: write the HTML report (unit strips, plots).
      strip_height: pixel height of a unit's top-image strip in the report.
      runners_up: how many other categories' best labels (one a category, by IoU) each
        unit's card shows in the report.
      check_labels: decode and check every example's labels during pass 1 as well, so
        that a broken label file stops the run before pass 2 (costs label decoding in
        pass 1's loader); decoding in threads, pass 2 then reads them from memory
        (`engine.LabelMemo`, up to a quarter of the free host memory).
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
    check_labels: bool = True

    def __post_init__(self):
        config.check_fields(self)
        for name in ("checkpoint_every", "strip_height"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.runners_up < 0:
            raise ValueError(f"runners_up={self.runners_up}: must be >= 0")
        if self.cache_budget_bytes is not None and self.cache_budget_bytes < 0:
            raise ValueError(
                f"cache_budget_bytes={self.cache_budget_bytes}: must be >= 0 (or None: measured)"
            )
        if self.num_threads is not None and self.num_threads < 0:
            raise ValueError(f"num_threads={self.num_threads}: must be >= 0 (or None)")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers}: must be >= 0")


def _forward_key(model: ModelInfo, tap: capture.Tap) -> Any:
    """What makes two taps one function of (variables, images): a Linen module compares
    by its fields; anything else (None) is keyed by the tap's own function."""
    import flax.linen as nn

    if not isinstance(model.module, nn.Module):
        return None
    try:
        kwargs = tuple(sorted(model.apply_kwargs.items()))
        key = (model.module, tap.layers, kwargs, model.layout_key)
        hash(key)
    except TypeError:
        return None
    return key


def _log_resize(image_size: Sequence[int] | None, input_size: int) -> None:
    """Say that the probe images (`image_size`, (h, w); None: not known) are resized to the
    model's `input_size`, where they differ."""
    if image_size is None or tuple(image_size) == (input_size, input_size):
        return
    h, w = image_size
    keep = f"; input_size={h} (the scripts' --input_size) feeds them as they are" if h == w else ""
    logging.info(
        "the probe images are %dx%d and the model's input %dx%d: each is resized (bilinear, "
        "squashed) to it%s",
        h,
        w,
        input_size,
        input_size,
        keep,
    )


def layer_significance(
    arrays: Mapping[str, Any] | None, settings: engine.Settings
) -> results.Significance | None:
    """The results' view of a layer's permutation test (`engine.LayerStats.significance`):
    its p-values and the calls of `settings.significance_fdr` at `settings.significance_alpha`."""
    if arrays is None:
        return None
    from jaxdissect import significance

    return results.Significance(
        p=arrays["unit_p"],
        pair_p=arrays["pair_p"],
        concepts=arrays["concepts"],
        significant=significance.discoveries(
            arrays["unit_p"], settings.significance_alpha, settings.significance_fdr
        ),
        alpha=settings.significance_alpha,
        draws=settings.significance_draws,
        procedure=settings.significance_fdr,
    )


def check_output_dir(output_dir: str | pathlib.Path, model: ModelInfo) -> None:
    """Refuse an `output_dir` holding another model's finished dissection, as `dissect`
    does: a run writing other files there would leave them beside results of that model."""
    _previous_layers(pathlib.Path(output_dir).expanduser(), model)


def _previous_layers(out: pathlib.Path, model: ModelInfo) -> list[str]:
    """The layers of the finished run in `out` ([] if none), refusing another model's: its
    other files (the report, a compositional or significance run's) would be left beside
    the new results."""
    try:
        before = results.read_results_json(out / "results.json")["settings"]
    except (OSError, ValueError, KeyError):  # none, or damaged: replaced, its files too
        return _listed_layers(out / "results.json") or _listed_layers(out / _REPLACED)
    if before.get("model_key", model.key) != model.key:
        name = before.get("model", "?")
        what = (
            f"{name} with other weights or options (changed since that run), or for a study "
            "other rotation amounts, training steps or layers"
            if name == model.name
            else f"another model ({name})"
        )
        raise ValueError(
            f"output_dir={out} holds the results of {what}: use a new folder for this "
            "model's, or empty this one"
        )
    return _layer_names(before.get("layers"))


# What follow-on outputs are not computed from: a rerun that differs from the dissection
# beside them only in these settings and results.json unit fields (or the layer's test
# and summary) keeps them.
_NOT_FOLLOWED_SETTINGS = (
    "batch_size",
    "devices",
    "significance_draws",
    "significance_alpha",
    "significance_fdr",
    "significance_stride",
    "significance_seed",
    "dataset_identity",  # follows from dataset_fingerprint
    # Other code that changes the dissection's numbers changes its stats, which the digest
    # holds; code that does not (another library version) leaves the follow-ons valid.
    "model_code",
)
_NOT_FOLLOWED_UNIT_FIELDS = ("p_value", "label_p_value", "significant")


def _dissection_digest(
    document: Mapping[str, Any], out: pathlib.Path, layers: Sequence[str]
) -> str:
    """A digest of what follow-on outputs beside a dissection are computed from: its
    results.json `document` less `_NOT_FOLLOWED_SETTINGS`, the units' test fields and the
    layers' test and summary, and its layers' stats arrays in `out` (thresholds, top
    images)."""
    settings = {k: v for k, v in document["settings"].items() if k not in _NOT_FOLLOWED_SETTINGS}
    layer_docs = [
        {
            **{k: v for k, v in layer.items() if k not in ("significance", "summary", "units")},
            "units": [
                {k: v for k, v in u.items() if k not in _NOT_FOLLOWED_UNIT_FIELDS}
                for u in layer.get("units", [])
            ],
        }
        for layer in document.get("layers", [])
    ]
    digest = hashlib.sha256(store.key_of(settings=settings, layers=layer_docs).encode())
    for stem in results.layer_file_stems(layers):
        stats = out / results.stats_npz_name(stem)
        digest.update(stats.read_bytes() if stats.is_file() else b"-")
    return digest.hexdigest()


def _finished_digest(out: pathlib.Path, layers: Sequence[str]) -> str | None:
    """`_dissection_digest` of the finished dissection of `layers` in `out` (None: no
    readable results.json)."""
    try:
        document = results.read_results_json(out / "results.json")
    except (OSError, ValueError):
        return None
    return _dissection_digest(document, out, layers)


# results.json of a run being replaced: moved aside first (the mark of a complete run
# gone), removed last, so that a run killed between still learns which files to remove.
_REPLACED = ".results.json.replaced"


def _listed_layers(path: pathlib.Path) -> list[str]:
    """The layers a results.json at `path` names, read without its checksum (a damaged or
    replaced run's: only to find its files); [] where there is none."""
    try:
        layers = json.loads(path.read_text(encoding="utf-8"))["settings"]["layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return _layer_names(layers)


def _layer_names(layers: Any) -> list[str]:
    """The distinct layer names of a results.json's `settings.layers` (anything else: none)."""
    if not isinstance(layers, list):
        return []
    return list(dict.fromkeys(n for n in layers if isinstance(n, str)))


def _remove_previous_run(out: pathlib.Path, layers: Sequence[str]) -> None:
    """Remove the files a finished run of `layers` wrote in `out`, results.json (the mark of
    a complete run) first: a run killed while writing its own never leaves them beside
    its new files, and a layer it does not dissect leaves nothing behind. results.json
    goes aside (`_REPLACED`) until the rest are gone: a run killed meanwhile leaves the
    list for the next."""
    if (out / "results.json").exists():
        os.replace(out / "results.json", out / _REPLACED)
    stems = results.layer_file_stems(layers)
    names = [
        *report_html.report_files(stems),
        *(
            name(stem)
            for stem in stems
            for name in (results.tally_csv_name, results.stats_npz_name)
        ),
    ]
    for name in names:
        outdir.remove_path(out / name)
    for folder in (report_html.PLOTS_DIR, report_html.STRIPS_DIR):
        with contextlib.suppress(OSError):  # left where something else is in it
            (out / folder).rmdir()
    outdir.remove_path(out / _REPLACED)


def _holding_output_dir(fn):
    """`fn` run holding its `output_dir`'s lock (`outdir.locked`), on process 0 (which
    writes the results): a run of another process there is refused, on every process of a
    multi-host job (`parallel.process_0_holds`), not interleaved."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def held(*args, **kwargs):
        path = signature.bind(*args, **kwargs).arguments["output_dir"]
        with parallel.process_0_holds(outdir.locked(path)):
            return fn(*args, **kwargs)

    return held


@_holding_output_dir
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
    steps: driver.Steps | None = None,
    timings: dict[str, Any] | None = None,
) -> list[results.LayerResult]:
    """Dissect `layers` of `model` on `source`; write results and report to `output_dir`,
    holding its lock (`outdir.OutputDirBusy` while another process holds it).

    steps: compiled steps shared with other dissections of this process (`driver.Steps`).
    timings: if given, receives the engine's `Dissector.timings` (the passes' seconds) and
      `results_s`, the seconds spent on results and report after them.
    """
    out = pathlib.Path(output_dir).expanduser()  # as `outdir` reads it
    previous = _previous_layers(out, model)
    out.mkdir(parents=True, exist_ok=True)
    spec = model.input_spec
    tap = capture.make_tap(
        model.module,
        model.variables,
        layers,
        input_shape=(spec.size, spec.size, 3),
        apply_kwargs=model.apply_kwargs,
        token_layout=model.token_layout,
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
    _log_resize(getattr(source, "image_size", None), spec.size)
    logging.info("results go to %s", out.resolve())
    advice = loader.decoding_advice(
        jax.default_backend(), len(source), options.num_threads, options.num_workers
    )
    if advice:
        logging.info(advice)
    dissector = engine.Dissector(
        tap,
        source,
        settings,
        input_spec=spec,
        model_key=model.stage_key,
        mesh=mesh,
        work_dir=out / ".work",
        activation_cache=options.activation_cache,
        cache_budget_bytes=options.cache_budget_bytes,
        checkpoint_every=options.checkpoint_every,
        num_threads=options.num_threads,
        num_workers=options.num_workers,
        progress=options.progress,
        tally_method=options.tally_method,
        check_labels=options.check_labels,
        steps=steps,
        forward_key=_forward_key(model, tap),
    )
    settings = dissector.settings  # categories in the label space's order, as results say
    modes = {tap.name_of(p): m for p, m in dissector.quantile_modes().items()}
    logging.info("thresholds: %s", ", ".join(f"{n} {m}" for n, m in modes.items()))
    if settings.sketch_size is not None and "sketch" not in modes.values():
        logging.warning("sketch_size=%d: no layer's thresholds use a sketch", settings.sketch_size)
    t0 = time.time()
    stats = dissector.run(tap.variables)
    t_passes = time.time()
    layer_results = [
        results.layer_result(
            name,
            stats[path].counts,
            dissector.labels,
            iou_threshold=settings.iou_threshold,
            categories=settings.categories,
            path=path,
            ties=stats[path].ties,
            significance=layer_significance(stats[path].significance, settings),
        )
        for name, path in zip(tap.names, tap.layers, strict=True)
    ]
    # Process 0 writes the results; every process of a multi-host job returns once it has
    # (however long: a barrier, not a collective), or raises once it has failed to.
    barrier = parallel.barrier_key("results written")
    if jax.process_index() != 0:
        with parallel.stopping_together(barrier):
            pass
        return layer_results
    with parallel.stopping_together(barrier):
        for r in layer_results:
            sketched = modes[r.layer] == "sketch" and r.ties is not None
            if sketched and (warning := r.ties.sketch_warning(r.layer)) is not None:
                logging.warning("%s", warning)
        made_from = _finished_digest(out, previous) if previous else None
        if previous:
            if dropped := [name for name in previous if name not in tap.names]:
                logging.warning(
                    "%s: replacing the finished dissection of %s; the files of %s, not "
                    "dissected now, are removed",
                    out,
                    ", ".join(previous),
                    ", ".join(dropped),
                )
            _remove_previous_run(out, previous)
        results.write_tally_csvs(out, layer_results)
        stems = results.layer_file_stems(tap.names)
        for r, stem in zip(layer_results, stems, strict=True):
            s = stats[r.path]
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
                out / results.stats_npz_name(stem),
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
            "model_fields": code_keys.definition_key(
                model.module, model.apply_kwargs, source=False
            ),
            "model_code": finished.model_code_key(model.module, model.apply_kwargs),
            **probe.probe_record(source, dataset_name),
            "num_images": len(source),
            "layers": list(tap.names),
            "layer_paths": dict(zip(tap.names, tap.layers, strict=True)),
            "input_spec": dataclasses.asdict(spec),
            "devices": int(dissector.mesh.devices.size),
            "thresholds": {r.layer: stats[r.path].thresholds.tolist() for r in layer_results},
            "quantile_modes": modes,
        }
        if (precision := matmul_precision()) is not None:
            run_settings["matmul_precision"] = precision
        if model.token_layout is not None:
            run_settings["token_layout"] = model.layout_key
        if tap.token_layouts:  # as read, named or not
            run_settings["token_layouts"] = {
                tap.name_of(p): str(v) for p, v in tap.token_layouts.items()
            }
        if options.report:
            report_build.write_dissection_report(
                out,
                model.name,
                dataset_name,
                run_settings,
                layer_results,
                {k: v.thresholds for k, v in stats.items()},
                {k: v.top_indices for k, v in stats.items()},
                {k: v.top_maps for k, v in stats.items()},  # kept by pass 1
                source,
                tie_rule=settings.tie_rule,
                strip_height=options.strip_height,
                runners_up=options.runners_up,
            )
        # Follow-on outputs of another dissection than this (or of one no longer there, after a
        # run killed while replacing it) would sit beside these results as if made from them:
        # removed before results.json marks the run complete.
        document = results.results_document(layer_results, run_settings)
        replaced = made_from is None or made_from != _dissection_digest(document, out, tap.names)
        if replaced and (removed := outdir.remove_follow_ons(out)):
            logging.info(
                "removed the outputs of follow-on scripts made from the dissection replaced: %s",
                ", ".join(removed),
            )
        if not replaced:  # kept: ablation.html links this run's report (or none), not the last's
            ablation_page.relink(out, tap.names)
        # Last: results.json marks the run complete.
        results.write_results_json(out / "results.json", layer_results, run_settings)
        if timings is not None:
            timings.update(dissector.timings, results_s=time.time() - t_passes)
        done = out / (report_html.INDEX if options.report else "results.json")
        logging.info("done in %.1f s: %s", time.time() - t0, done)
        return layer_results

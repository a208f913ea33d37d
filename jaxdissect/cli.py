"""What the experiment scripts share: their `main`, the dissection flags, cache and logs.

The scripts in experiments/ (dissect, train, rotation, training_dynamics,
compare) are thin: flags in, a library call, a few printed lines out. This
module holds the pieces they would otherwise repeat.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags, logging

from jaxdissect import store

# Errors of bad flags or bad data: they name the flag or file, so a one-line message says enough.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError)


def script_main(run: Callable[[], Any]) -> Callable[[Sequence[str]], None]:
    """The `main` for `absl.app.run` of a script whose work is `run()`.

    Refuses positional arguments, and turns `USER_ERRORS` into `error: <message>`
    and exit status 1 rather than a traceback.
    """

    def main(argv: Sequence[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        try:
            run()
        except USER_ERRORS as e:
            logging.error("%s: %s", type(e).__name__, e)
            raise SystemExit(f"error: {e}") from None

    return main


def report_elapsed(started: float, json_path: str | os.PathLike[str] | None = None) -> float:
    """Print the wall time since `started` (a `time.perf_counter()`) and return it.

    With `json_path`, also record it as `elapsed_s` in that JSON document (an output
    file of the run, never part of a cache key).
    """
    elapsed = time.perf_counter() - started
    if json_path is not None:
        path = pathlib.Path(json_path)
        store.write_json(path, {**json.loads(path.read_text()), "elapsed_s": elapsed})
    print(f"elapsed: {elapsed:.1f} s")
    return elapsed


def model_info(loaded: Any, input_spec: Any = None) -> Any:
    """The `pipeline.ModelInfo` of a `models.load.LoadedModel` (its own input spec by default)."""
    from jaxdissect import pipeline

    return pipeline.ModelInfo(
        loaded.module,
        loaded.variables,
        input_spec or loaded.input_spec,
        loaded.name,
        loaded.key,
        loaded.apply_kwargs,
    )


def cache_root() -> pathlib.Path:
    """Where generated data sets are cached ($JAXDISSECT_CACHE, default ~/.cache/jaxdissect)."""
    return pathlib.Path(os.environ.get("JAXDISSECT_CACHE", "~/.cache/jaxdissect")).expanduser()


def quiet_library_logs() -> None:
    """Keep orbax's per-checkpoint INFO lines out of the user's log (warnings stay)."""
    import logging as pylogging

    def keep(record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname

    handler = logging.get_absl_handler()
    if not any(getattr(f, "_jaxdissect_quiet", False) for f in handler.filters):
        keep._jaxdissect_quiet = True  # type: ignore[attr-defined]
        handler.addFilter(keep)


def define_dissection_flags(
    fv: flags.FlagValues, *, split: str = "val", resolution: int = 96
) -> None:
    """Probe-set, method and run flags on `fv` (a subset of experiments/dissect.py's)."""
    flags.DEFINE_string(
        "data",
        "synthetic",
        "Probe set: 'synthetic', a Broden folder or its TFDS build.",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "synthetic_images",
        4000,
        "Images of the synthetic Broden (the training set's: no second copy is generated).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "resolution", resolution, "Image size of the synthetic Broden.", flag_values=fv
    )
    flags.DEFINE_enum(
        "split",
        split,
        ["all", "train", "val"],
        "Probe images (val: none the network was trained on).",
        flag_values=fv,
    )
    flags.DEFINE_integer("max_images", None, "Use only the first N probe images.", flag_values=fv)
    flags.DEFINE_float(
        "quantile", 0.005, "Top fraction of each unit's activations.", flag_values=fv
    )
    flags.DEFINE_enum(
        "quantile_mode", "sketch", ["sketch", "exact"], "Threshold statistic.", flag_values=fv
    )
    flags.DEFINE_float(
        "iou_threshold", 0.04, "A unit detects a concept when IoU > this.", flag_values=fv
    )
    flags.DEFINE_enum(
        "restriction",
        "presence",
        ["presence", "overlap", "none"],
        "Union restriction.",
        flag_values=fv,
    )
    flags.DEFINE_list("categories", [], "Categories to score (empty: all).", flag_values=fv)
    flags.DEFINE_integer(
        "batch_size", 32, "Dissection batch (a multiple of the devices).", flag_values=fv
    )
    flags.DEFINE_integer("devices", None, "Devices to use (default: all).", flag_values=fv)
    flags.DEFINE_bool("report", False, "Also write the HTML report (unit strips).", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Show progress bars.", flag_values=fv)


def probe_from_flags(fv: flags.FlagValues) -> tuple[Any, str]:
    """(source, description) of the probe set the flags name."""
    from jaxdissect.data import open_probe

    return open_probe(
        fv.data,
        split=fv.split,
        max_images=fv.max_images,
        resolution=fv.resolution,
        synthetic_images=fv.synthetic_images,
        cache_dir=cache_root(),
        data_hash=fv["data_hash"].value if "data_hash" in fv else "stat",
    )


def settings_from_flags(fv: flags.FlagValues) -> Any:
    """The `engine.Settings` of the method flags: each field whose flag (same name) the
    script defines; the others keep their defaults."""
    from jaxdissect import engine

    values = {f.name: fv[f.name].value for f in dataclasses.fields(engine.Settings) if f.name in fv}
    if "categories" in values:
        values["categories"] = tuple(values["categories"]) or None
    return engine.Settings(**values)


def options_from_flags(fv: flags.FlagValues) -> Any:
    """The `pipeline.Options` of the run flags."""
    from jaxdissect import pipeline

    return pipeline.Options(report=fv.report, progress=fv.progress)

"""A finished dissection read back for the scripts built on it: one layer's thresholds, unit
labels and the settings its masks need, and the model's activations at that layer.

A dissection is finished when its output directory holds `results.json` (written last,
`jaxdissect.pipeline`); the layer's thresholds are those of its `stats-<layer>.npz`. Units
get masks as the tally made them: activations rounded to the run's `activation_dtype`,
upsampled, and compared with the thresholds by the run's `tie_rule`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxdissect import code_keys, results, results_schema, store
from jaxdissect.preprocess import InputSpec


@dataclasses.dataclass(frozen=True)
class FinishedLayer:
    """One layer of a finished dissection.

    Attributes:
      directory: the dissection's output directory.
      layer: the layer's name as the dissection was asked for it; path: its module path.
      thresholds: float32 [K].
      tie_rule, activation_dtype: the dissection's settings of these names.
      input_spec: the normalisation the dissection fed the model.
      model, model_key: the dissected model's description and weights key.
      units: per unit, its results.json record (label `name`, `category`, `iou`,
        `interpretable`, ...).
      categories: the scored categories.
      iou_threshold: the detector threshold.
      token_layout: how the dissection read the layer's [B, tokens, C] output
        (`preprocess.TokenLayout` text, e.g. `4x4+1`); None for a layer of maps.
    """

    directory: pathlib.Path
    layer: str
    path: str
    thresholds: np.ndarray
    tie_rule: str
    activation_dtype: str
    input_spec: InputSpec
    model: str
    model_key: str
    units: list[dict[str, Any]]
    categories: list[str]
    iou_threshold: float
    token_layout: str | None = None

    @property
    def num_units(self) -> int:
        return len(self.thresholds)

    def label_of(self, unit: int) -> str | None:
        """The unit's label (None when it has none)."""
        return self.units[unit]["name"]


def read_layer(
    directory: str | os.PathLike[str],
    layer: str,
    *,
    model_key: str | None = None,
    model_fields: str | None = None,
    model_code: str | None = None,
    flag: str = "--dissection",
) -> FinishedLayer:
    """Layer `layer` of the finished dissection in `directory`, or one line saying what to run.

    With `model_key`, the dissection must be of the model with those weights; with
    `model_fields` (`code_keys.definition_key(..., source=False)`), of those settings of its
    fields and `apply` arguments, where the dissection recorded them; with `model_code`
    (`model_code_key`), made by the same model source and library code (a dissection
    that recorded none is taken with a warning).
    """
    out = pathlib.Path(directory).expanduser()
    doc_path = out / "results.json"
    if not doc_path.is_file():
        raise FileNotFoundError(
            f"{flag}={directory}: no finished dissection there (no results.json); run "
            f"experiments/dissect.py with --output_dir={directory} (and --layers={layer}) first"
        )
    try:
        doc = results.read_results_json(doc_path)
        settings = doc["settings"]
        names = list(results_schema.require(settings, "layers", doc_path))
        layer_paths = results_schema.require(settings, "layer_paths", doc_path)
        input_spec = results_schema.require(settings, "input_spec", doc_path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{flag}={directory}: {e}") from None
    if layer not in names:
        raise ValueError(
            f"--layer={layer}: the dissection in {directory} has layers "
            f"{', '.join(names)}; dissect {layer} there first"
        )
    if model_key is not None and settings.get("model_key") != model_key:
        raise ValueError(
            f"{flag}={directory} dissected {settings.get('model')}, not the model given here "
            "(--model, --weights, --model_option, --num_classes): dissect this model first, "
            "or pass its dissection"
        )
    if model_fields is not None and settings.get("model_fields", model_fields) != model_fields:
        raise ValueError(
            f"{flag}={directory} dissected {settings.get('model')} with the same weights but "
            "other settings of its fields (--model_option): dissect this model first"
        )
    if model_code is not None:
        _check_model_code(directory, settings, model_code, flag)
    stem = results.layer_file_stems(names)[names.index(layer)]
    [record] = [r for r in doc["layers"] if r["layer"] == layer]
    stats_path = out / results.stats_npz_name(stem)
    try:
        stats = store.load_arrays(stats_path)
        thresholds = np.asarray(stats["thresholds"], np.float32)
        # A dissection refuses NaN/inf activations, so its thresholds are finite.
        if thresholds.shape != (record["num_units"],) or not np.isfinite(thresholds).all():
            raise ValueError(
                f"{stats_path}: thresholds of shape {thresholds.shape}, "
                f"{int((~np.isfinite(thresholds)).sum())} not finite; "
                f"results.json has {record['num_units']} units"
            )
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(
            f"{flag}={directory}: the dissection's arrays are missing or damaged ({e}); run "
            f"experiments/dissect.py with --output_dir={directory} again"
        ) from None
    return FinishedLayer(
        directory=out,
        layer=layer,
        path=layer_paths[layer],
        thresholds=thresholds,
        tie_rule=settings.get("tie_rule", results.UNRECORDED_SETTINGS["tie_rule"]),
        activation_dtype=settings.get("activation_dtype", "float32"),
        input_spec=InputSpec(
            **{
                **{k: v for k, v in input_spec.items() if k in results_schema.INPUT_SPEC},
                "mean": tuple(input_spec["mean"]),
                "std": tuple(input_spec["std"]),
            }
        ),
        model=settings.get("model", ""),
        model_key=settings.get("model_key", ""),
        units=record["units"],
        categories=list(record["categories"]),
        iou_threshold=float(record["iou_threshold"]),
        token_layout=token_layouts(settings).get(layer),
    )


def model_code_key(module: Any, apply_kwargs: Mapping[str, Any] | None = None) -> str:
    """The model's code as a dissection's stages are keyed by it and its results.json
    settings record it (`model_code`): the model's definition with its source
    (`code_keys.definition_key`) and this library's code (`code_keys.code_fingerprint`)."""
    return store.key_of(
        definition=code_keys.definition_key(module, apply_kwargs), code=code_keys.code_fingerprint()
    )


def _check_model_code(
    directory: str | os.PathLike[str], settings: Mapping[str, Any], model_code: str, flag: str
) -> None:
    """Refuse a dissection whose recorded `model_code` is not `model_code`; warn of one
    that recorded none."""
    from absl import logging

    recorded = settings.get("model_code")
    if recorded is None:
        logging.warning(
            "%s=%s records no model code key (an older dissection): its thresholds are "
            "taken as this model's; dissect again if its code or this library changed since",
            flag,
            directory,
        )
    elif recorded != model_code:
        raise ValueError(
            f"{flag}={directory} was dissected by other model code (the source of "
            f"{settings.get('model')} or of jaxdissect changed since): dissect again with "
            f"experiments/dissect.py --output_dir={directory}"
        )


def token_layouts(settings: Mapping[str, Any]) -> dict[str, str]:
    """Layer name -> the token layout a dissection read it with (`TokenLayout` text), from
    its results.json `settings`: the layers with [B, tokens, C] outputs. A follow-on
    capture of such a layer passes its layout (`capture.make_tap`'s token_layout), so it
    reads the tokens the dissection read."""
    return {str(k): str(v) for k, v in settings.get("token_layouts", {}).items()}


def recorded_settings(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The `settings` of the finished dissection in `directory` (its results.json)."""
    doc = results.read_results_json(pathlib.Path(directory).expanduser() / "results.json")
    return doc["settings"]


def recorded_token_layouts(directory: str | os.PathLike[str]) -> dict[str, str]:
    """`token_layouts` of the finished dissection in `directory` (its results.json)."""
    return token_layouts(recorded_settings(directory))


def check_probe_set(directory: str | os.PathLike[str], dataset: str, source: Any) -> None:
    """Refuse a probe set other than the one the finished dissection in `directory` ran on
    (`probe.probe_relation` of its results.json settings and `source`, which `dataset`
    describes): the dissection's thresholds and labels belong to its probe set, and mixing
    them with another is another method. A copy is logged, not refused."""
    from absl import logging

    from jaxdissect.data import probe

    recorded = recorded_settings(directory)
    ran_on = recorded.get("dataset")
    if ran_on is None:
        return
    relation = probe.probe_relation(probe.probe_record(source, dataset), recorded)
    if relation == "other":
        raise ValueError(
            f"--data: the probe set is {dataset}, but the dissection in {directory} ran on "
            f"{ran_on} (other CSV tables, split or image count; a TFDS build made before its "
            "tables were recorded counts as another until rebuilt): pass its --data, --split and "
            "--max_images (--synthetic_images, --resolution for the synthetic set), or "
            "dissect this probe set"
        )
    if relation == "copy":
        logging.warning(
            "the probe set %s has other files than the one the dissection in %s ran on "
            "(another copy, or the same files stored again): check that they hold the same "
            "images and labels",
            dataset,
            directory,
        )


def check_model(model: str | None, weights: str | None, num_classes: int | None = None) -> bool:
    """Whether `weights` is a training export; otherwise checks `model` and `weights` as
    experiments/dissect.py takes them (one line naming the flag)."""
    from jaxdissect import training
    from jaxdissect.models import convert
    from jaxdissect.models import load as model_load

    if training.is_export(weights):
        return True
    if weights and weights != "pretrained" and not os.path.exists(weights):
        raise FileNotFoundError(model_load.missing_weights_advice(model or "", weights))
    if not model:
        if weights and os.path.isfile(os.path.join(weights, convert.META_FILE)):
            arch = convert.read_meta(weights).get("arch", "<arch>")
            raise ValueError(
                f"--weights={weights} is a converted checkpoint (models/convert.py), not a "
                f"training export: give --model={arch}"
            )
        raise ValueError(
            f"--weights={weights} is not a training export (no meta.json): give --model "
            "with the architecture of these weights"
        )
    model_load.check_request(model, weights or None, num_classes)
    return False


def load_model(
    model: str | None,
    weights: str | None,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """A `models.load.LoadedModel`: a training export or `model` with `weights` and
    constructor `options` as experiments/dissect.py takes them (`seed`: of a random init,
    `weights` ''); errors name the flags."""
    from jaxdissect import training
    from jaxdissect.models import load as model_load

    if check_model(model, weights):
        if options:
            raise ValueError(
                f"--model_option, --num_classes: --weights={weights} is a training export, "
                "which carries its own options; leave them out"
            )
        return training.load_trained(weights)
    return model_load.load(model, weights=weights or None, options=options, seed=seed)


def load_dissected_model(
    model: str | None,
    weights: str | None,
    directory: Any,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """`load_model` of the model the finished dissection in `directory` ran: a random init
    (`weights` '') at the seed it recorded (its --seed), so that it is the same model."""
    seed = int(recorded_settings(directory).get("seed", 0))
    return load_model(model, weights, seed=seed, options=options)


def load_dissected_layer(
    model: str | None,
    weights: str | None,
    directory: Any,
    layer: str,
    options: Mapping[str, Any] | None = None,
) -> tuple[Any, FinishedLayer]:
    """(`load_dissected_model`, `read_layer` of `layer`) of the finished dissection in
    `directory`, refused unless that dissection ran this model: its weights, fields and
    code (`model_code_key`)."""
    from jaxdissect import code_keys

    loaded = load_dissected_model(model, weights, directory, options)
    finished = read_layer(
        directory,
        layer,
        model_key=loaded.key,
        model_fields=code_keys.definition_key(loaded.module, loaded.apply_kwargs, source=False),
        model_code=model_code_key(loaded.module, loaded.apply_kwargs),
    )
    return loaded, finished


def layer_forward(loaded: Any, finished: FinishedLayer) -> Any:
    """A jitted fn(images [B, H, W, 3], RGB pixel values 0..255, uint8 or float) -> float32
    [B, h, w, K]: the layer's activations as the dissection saw them (its input spec, its
    token layout, rounded to its dtype). Images of another layout (NCHW, grey) are refused."""
    import jax
    import jax.numpy as jnp

    from jaxdissect import capture

    size = finished.input_spec.size
    tap = capture.make_tap(
        loaded.module,
        loaded.variables,
        [finished.path],
        input_shape=(size, size, 3),
        apply_kwargs=loaded.apply_kwargs,
        token_layout=finished.token_layout,
    )
    path, spec, dtype = tap.layers[0], finished.input_spec, jnp.dtype(finished.activation_dtype)

    @jax.jit
    def jitted(images: jax.Array) -> jax.Array:
        acts = tap.fn(tap.variables, spec(images))[path]
        return acts.astype(dtype).astype(jnp.float32)

    def forward(images: Any) -> jax.Array:
        shape = tuple(jnp.shape(images))
        if len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"images {shape}: must be [B, H, W, 3] RGB, pixel values 0..255")
        return jitted(images)

    return forward

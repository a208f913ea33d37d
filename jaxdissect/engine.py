"""A dissection: two passes over a probe set, composed from statistics and the driver.

Pass 1 (`pass1_statistic`) folds each layer's activations into a per-unit quantile
state (histogram, exact or sketch: `quantiles`) and each unit's top images with their maps; its activations
can be kept (`actcache`) so that pass 2 does not run the network again, and the labels
its check decoded (`LabelMemo`) so that pass 2 does not decode them again. Pass 2
(`pass2_statistic`) thresholds the (upsampled) maps and adds exact integer IoU counts.
`driver.run_pass` runs each pass (sharded, checkpointed, resumable) and every stage's
output is stored under a key of everything it depends on (`store`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxdissect import (
    actcache,
    code_keys,
    config,
    driver,
    parallel,
    quantiles,
    significance,
    statistics,
    store,
    tally,
    ties,
)
from jaxdissect.capture import Tap
from jaxdissect.data import loader
from jaxdissect.data.broden import primary_categories
from jaxdissect.labelspace import LabelSpace, check_names
from jaxdissect.preprocess import InputSpec
from jaxdissect.quantiles import DEFAULT_Q
from jaxdissect.quantiles import MODES as QUANTILE_MODES
from jaxdissect.quantiles.histogram import DTYPES as HISTOGRAM_DTYPES
from jaxdissect.results import DEFAULT_IOU_THRESHOLD, check_iou_threshold
from jaxdissect.statistics import NonFiniteActivationError
from jaxdissect.tally import RESTRICTIONS
from jaxdissect.tie_rule import TIE_RULES

THRESHOLD_ON = ("raw", "upsampled")
SIGNIFICANCE_FIELDS = (
    "significance_draws",
    "significance_alpha",
    "significance_fdr",
    "significance_stride",
    "significance_seed",
)
# The permutation test's arrays in a layer's pass-2 outputs (`LayerStats.significance`).
_TEST_PREFIX = "significance_"
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")
# The label memo takes at most this fraction (1 / n) of the host memory free at pass 1.
LABEL_MEMO_SHARE = 4
# What each stage stores (part of its key: a stage stored by older code is not reused).
_OUTPUTS = {"pass1": ("thresholds", "top_values", "top_indices", "top_maps"), "pass2": "counts"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that changes the numbers of a dissection.

    Attributes:
      quantile: top fraction of activations above each unit's threshold.
      quantile_mode: `auto` (a layer's `histogram` where its activations are 16-bit raw maps
        and it has at most 256 units, else `exact` where its state takes <= 64 MB, else
        `sketch`), `sketch` (fixed memory), `exact` (per-unit top-k) or `histogram` (counts
        of a 16-bit activation_dtype's values, exact; 256 KB a unit).
      sketch_size: sketch state size per unit (None: 672, `quantiles.sketch.DEFAULT_SIZE`).
      threshold_on: quantiles over the `raw` h x w maps (paper) or the
        `upsampled` maps (PNAS release).
      restriction: union restriction `presence` (paper), `overlap` (Lite), `none`.
      tie_rule: unit mask S > T (`strict`, Lite; default) or S >= T (`inclusive`, the
        paper's formula); they differ for units with activations at T (`jaxdissect.ties`).
      iou_threshold: a unit detects its best concept if IoU > this.
      activation_dtype: activations are rounded to this type before any
        statistic, so the 16-bit activation cache changes nothing.
      categories: categories to score (None: all).
      top_images: images kept per unit for the report.
      seed: seed of the sketch's randomness, and the scripts' random init (`--weights=`).
      batch_size: global batch; part of the key since sketches see batches.
      significance_draws: permutations of the images for each unit's p-value
        (`jaxdissect.significance`; 0: no test). BH calls units only when
        1 / (1 + draws) <= alpha / units: 999 draws call at least 6 of 256 units at 5%.
      significance_alpha: false discovery rate over a layer's units.
      significance_fdr: the procedure holding the false discovery rate at significance_alpha:
        `bh` (Benjamini-Hochberg; nominal, as the units' p-values are dependent) or `by`
        (Benjamini-Yekutieli; under any dependence, with fewer calls).
      significance_stride: the test's masks are taken every N pixels of the segmentation
        (memory: images x pixels x (units + concepts) / 8 bytes per device).
      significance_seed: seed of the permutations.
    """

    quantile: float = DEFAULT_Q
    quantile_mode: str = config.setting("auto", choices=QUANTILE_MODES)
    sketch_size: int | None = None
    threshold_on: str = config.setting("raw", choices=THRESHOLD_ON)
    restriction: str = config.setting("presence", choices=RESTRICTIONS)
    tie_rule: str = config.setting("strict", choices=TIE_RULES)
    iou_threshold: float = DEFAULT_IOU_THRESHOLD
    activation_dtype: str = config.setting("float16", choices=ACTIVATION_DTYPES)
    categories: tuple[str, ...] | None = None
    top_images: int = 10
    seed: int = 0
    batch_size: int = 32
    significance_draws: int = 0
    significance_alpha: float = 0.05
    significance_fdr: str = config.setting("bh", choices=significance.FDR_PROCEDURES)
    significance_stride: int = 8
    significance_seed: int = 0

    def __post_init__(self):
        config.check_fields(self)
        if self.quantile_mode == "histogram":
            unmet = []
            if self.activation_dtype not in HISTOGRAM_DTYPES:
                unmet.append("activation_dtype=" + " or ".join(map(repr, HISTOGRAM_DTYPES)))
            if self.threshold_on != "raw":
                unmet.append("threshold_on='raw'")
            if unmet:
                raise ValueError(
                    f"quantile_mode='histogram' counts 16-bit raw maps: needs "
                    f"{' and '.join(unmet)} (got activation_dtype={self.activation_dtype!r}, "
                    f"threshold_on={self.threshold_on!r})"
                )
        if self.significance_draws < 0:
            raise ValueError(f"significance_draws={self.significance_draws}: must be >= 0")
        if not 0 < self.significance_alpha < 1:
            raise ValueError(f"significance_alpha={self.significance_alpha}: must be in (0, 1)")
        if self.significance_stride < 1:
            raise ValueError(f"significance_stride={self.significance_stride}: must be >= 1")
        if not 0 < self.quantile < 1:
            raise ValueError(f"quantile={self.quantile}: must be in (0, 1), e.g. {DEFAULT_Q}")
        check_iou_threshold(self.iou_threshold)
        for name in ("batch_size", "top_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.sketch_size is not None:
            quantiles.check_size(self.sketch_size, "sketch_size")
            if self.quantile_mode in ("exact", "histogram"):
                raise ValueError(
                    f"sketch_size={self.sketch_size}: sizes the sketch, which "
                    f"quantile_mode={self.quantile_mode!r} does not use (sketch or auto)"
                )
        if self.categories is not None:  # repeated names: refused before data is opened
            object.__setattr__(self, "categories", check_names(self.categories))

    def pass1(self) -> dict[str, Any]:
        keys = (
            "quantile",
            "quantile_mode",
            "sketch_size",
            "threshold_on",
            "activation_dtype",
            "top_images",
            "seed",
            "batch_size",
        )
        return {k: getattr(self, k) for k in keys}

    def pass2(self) -> dict[str, Any]:
        # The test's settings only where it runs: keys of runs without it stay as they were.
        test = {k: getattr(self, k) for k in SIGNIFICANCE_FIELDS if self.significance_draws}
        return {
            **self.pass1(),
            "restriction": self.restriction,
            "tie_rule": self.tie_rule,
            "categories": self.categories,
            **test,
        }


@dataclasses.dataclass
class LayerStats:
    """What the engine measured for one layer (numpy, host)."""

    layer: str
    thresholds: np.ndarray  # float32 [K]
    top_values: np.ndarray  # float32 [T, K]
    top_indices: np.ndarray  # int32 [T, K], -1 empty
    top_maps: np.ndarray  # float32 [T, h, w, K]: the unit's raw map on each top image
    counts: dict[str, np.ndarray]  # int64 tally counts (see jaxdissect.tally)
    shape: tuple[int, int, int]  # (h, w, K)
    ties: ties.UnitTies | None = None  # tie statistics of the thresholds' domain
    # The permutation test (settings.significance_draws > 0): "unit_p" [K], "pair_p"
    # [K, C] and "iou" [K, C] on the test's grid, "concepts" [C] label numbers; else None.
    significance: dict[str, np.ndarray] | None = None


def in_label_order(settings: Settings, labels: LabelSpace) -> Settings:
    """`settings` with its categories in `labels`' order (`LabelSpace.select`, which refuses
    repeated and unknown names); unchanged without categories."""
    if settings.categories is None:
        return settings
    return dataclasses.replace(settings, categories=labels.select(settings.categories))


def restrict_categories(
    labels: LabelSpace, categories: tuple[str, ...] | None, coverage: np.ndarray | None = None
) -> LabelSpace:
    """Score only `categories`.

    With the dataset's per-category coverage, primary categories are chosen
    again among the kept ones (as NetDissect-Lite does: without `material`,
    `wood` becomes an object); otherwise labels of dropped categories stop
    being concepts.
    """
    if categories is None:
        return labels
    selected = labels.select(categories)
    keep = np.asarray([c in selected for c in labels.categories])
    if coverage is not None:
        primary = primary_categories(coverage, use=keep)
    else:
        primary = np.where(
            (labels.primary >= 0) & keep[np.maximum(labels.primary, 0)], labels.primary, -1
        )
    return dataclasses.replace(labels, primary=primary.astype(np.int32))


class LabelMemo:
    """Examples' decoded labels, kept up to `budget_bytes` (pixel labels as uint16 where
    they fit, as Broden's R + 256 G numbers do), by example index.

    Pass 1's label check decodes every example's labels; kept here, pass 2 reads them
    from memory instead of decoding them again. Filled from the loader's threads; a
    dissection's run long (`Dissector.run` clears it).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.used_bytes = 0
        self._kept: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, i: int, planes: np.ndarray, image_labels: np.ndarray) -> None:
        """Keep copies of example i's labels (`read_labels`'s arrays) if the budget allows."""
        narrow = planes.size and planes.min() >= 0 and planes.max() <= np.iinfo(np.uint16).max
        planes = planes.astype(np.uint16 if narrow else planes.dtype)
        image_labels = np.array(image_labels)
        nbytes = planes.nbytes + image_labels.nbytes
        with self._lock:
            if i in self._kept or self.used_bytes + nbytes > self.budget_bytes:
                return
            self._kept[i] = (planes, image_labels)
            self.used_bytes += nbytes

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        return self._kept.get(i)

    def clear(self) -> None:
        with self._lock:
            self._kept.clear()
            self.used_bytes = 0


class Fields:
    """A view of a source that reads only what a pass needs (decoding is the cost).

    With `categories`, only those categories' labels are read (`read_labels`'s argument).
    With `check_labels` (and `labels` False), each example's labels are decoded and
    checked but not returned: a broken label file stops pass 1, not pass 2. `memo`: where
    decoded labels are kept (`check_labels`) and looked up first (`labels`).
    """

    def __init__(
        self,
        source,
        images: bool,
        labels: bool,
        categories: tuple[str, ...] | None = None,
        check_labels: bool = False,
        memo: LabelMemo | None = None,
    ):
        self.source, self.images, self.labels = source, images, labels
        self.categories, self.check_labels, self.memo = categories, check_labels, memo
        self.planes, self.image_labels = source.max_planes, source.max_image_labels
        if categories is not None and hasattr(source, "label_shape"):
            # Padding only for the categories read (a Broden source knows its records).
            self.planes, self.image_labels = source.label_shape(categories)
        self.seg_size = tuple(source.seg_size)

    def __len__(self):
        return len(self.source)

    def label_fields(self) -> dict[str, np.ndarray]:
        """Zero arrays shaped as an example's label fields (where read), without reading."""
        if not self.labels:
            return {}
        return {
            "pixel_labels": np.zeros((self.planes, *self.seg_size), np.int32),
            "image_labels": np.zeros((self.image_labels,), np.int32),
        }

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        out = {"index": np.asarray(i, np.int32)}
        if self.images:
            out["image"] = np.asarray(self.source.read_image(i), np.uint8)
        if self.labels or self.check_labels:
            kept = self.memo.get(i) if self.labels and self.memo is not None else None
            if kept is not None:
                planes, image_labels = kept
            elif self.categories is None:
                planes, image_labels = self.source.read_labels(i)
            else:
                planes, image_labels = self.source.read_labels(i, self.categories)
            if self.check_labels and self.memo is not None:
                self.memo.put(i, planes, image_labels)
        if self.labels:
            pixel = np.zeros((self.planes, *self.seg_size), np.int32)
            pixel[: len(planes)] = planes
            scalar = np.zeros((self.image_labels,), np.int32)
            scalar[: len(image_labels)] = image_labels
            out["pixel_labels"], out["image_labels"] = pixel, scalar
        return out


class Dissector:
    """A dissection of the layers of one `Tap` over one probe set: two `driver` passes.

    Pass 1 folds each layer's activations into its quantile statistic and its top
    images (with their maps, for the report) and fills the activation cache; pass 2
    thresholds and tallies, from the cache where it holds every batch. One
    `driver.Forward` serves both passes (compiled once). Dissectors given the same
    `steps` (`driver.Steps`) share compiled steps: the forward where the tap's `fn` (or
    the caller's `forward_key`: equal only for taps computing the same function of
    (variables, images)), input spec, activation dtype and mesh are the same, and each
    pass's step where its statistic's key is (same layers, shapes and step settings).
    """

    def __init__(
        self,
        tap: Tap,
        source: Any,
        settings: Settings,
        *,
        input_spec: InputSpec,
        model_key: str,
        mesh: jax.sharding.Mesh | None = None,
        work_dir: str | pathlib.Path | None = None,
        activation_cache: str = "auto",
        cache_budget_bytes: int | None = None,
        checkpoint_every: int = 50,
        num_threads: int | None = None,
        num_workers: int = 0,
        progress: bool = True,
        tally_method: str = "auto",
        check_labels: bool = False,
        steps: driver.Steps | None = None,
        forward_key: Hashable | None = None,
    ):
        if tally_method not in tally.METHODS:
            raise ValueError(
                f"tally_method={tally_method!r}; allowed values: {', '.join(tally.METHODS)}"
            )
        self.tally_method, self.num_workers = tally_method, num_workers
        self.check_labels = check_labels
        settings = in_label_order(settings, source.labels)  # keys and reads in its order
        self.tap, self.source, self.settings = tap, source, settings
        self.input_spec, self.model_key = input_spec, model_key
        self.mesh = mesh or parallel.data_mesh()
        parallel.check_batch_size(settings.batch_size, self.mesh)
        if settings.batch_size % jax.process_count():
            raise ValueError(
                f"batch_size={settings.batch_size} must be divisible by the {jax.process_count()} hosts"
            )
        self.work_dir = pathlib.Path(work_dir) if work_dir is not None else None
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_every, self.num_threads, self.progress = (
            checkpoint_every,
            num_threads,
            progress,
        )
        if len(source) == 0:
            raise ValueError("the probe set is empty: check split=, max_images=")
        self.labels = restrict_categories(
            source.labels, settings.categories, getattr(source, "coverage", None)
        )
        self.seg_size = tuple(source.seg_size)
        self.num_batches = loader.num_batches(len(source), settings.batch_size)
        self.local_batch = settings.batch_size // jax.process_count()
        self.dtype = jnp.dtype(settings.activation_dtype)
        # Every process's: hosts of a multi-host job may read their own copies (other file
        # times), and a change to any copy recomputes.
        self.data_key = parallel.every_process_text(source.fingerprint())
        self._cache_request, self._cache_budget = activation_cache, cache_budget_bytes
        self.cache: actcache.ActivationCache | None = None
        self.label_memo: LabelMemo | None = None
        self.steps = driver.Steps() if steps is None else steps
        self.forward = self.steps.get(
            (
                "forward",
                tap.fn if forward_key is None else forward_key,
                input_spec,
                self.dtype,
                self.mesh,
            ),
            lambda: driver.Forward(tap.fn, input_spec, self.dtype, self.mesh),
        )

    # ------------------------------------------------------------ keys

    def stage_key(self, stage: str, layer: str | None = None) -> str:
        """Key of a layer's stored stage output, or (layer None) of a whole pass's checkpoints.

        It holds the mesh's device count (sketch thresholds depend on the per-device seeds)
        and its platform and device kind (`code_keys.backend_of`: the default float32 matmul
        precision follows them).
        """
        params = self.settings.pass1() if stage == "pass1" else self.settings.pass2()
        which = {"layer": layer} if layer is not None else {"layers": self.tap.layers}
        return store.key_of(
            stage=stage,
            model=self.model_key,
            data=self.data_key,
            input_spec=dataclasses.asdict(self.input_spec),
            settings=params,
            devices=int(self.mesh.devices.size),
            backend=code_keys.backend_of(self.mesh),
            outputs=_OUTPUTS[stage],
            **which,
        )

    def _checkpoint_dir(self, stage: str) -> pathlib.Path | None:
        """Where a pass's state is checkpointed while it runs (None without a work_dir)."""
        if self.work_dir is None:
            return None
        return self.work_dir / "checkpoints" / f"{stage}-{self.stage_key(stage)}"

    def _run(
        self,
        name: str,
        statistic: statistics.Statistic,
        fields: Fields,
        variables,
        *,
        checkpoint_dir: pathlib.Path | None = None,
        **kw,
    ):
        """`driver.run_pass` of this dissection; checkpoints under `checkpoint_dir`, by
        default the pass's own (`_checkpoint_dir`)."""
        return driver.run_pass(
            name,
            statistic,
            fields,
            mesh=self.mesh,
            batch_size=self.settings.batch_size,
            forward=self.forward,
            variables=variables,
            checkpoint_dir=checkpoint_dir or self._checkpoint_dir(name),
            checkpoint_every=self.checkpoint_every,
            progress=self.progress,
            description=f"[{', '.join(self.tap.names)}]",
            num_threads=self.num_threads,
            num_workers=self.num_workers,
            steps=self.steps,
            **kw,
        )

    # ------------------------------------------------------------ pass 1

    def _threshold_values(self, layer: str) -> tuple[int, int, bool]:
        """(units, values per unit per image, upsampled) of `layer`'s thresholds."""
        h, w, k = self.tap.shapes[layer]
        upsampled = self.settings.threshold_on == "upsampled"
        return k, self.seg_size[0] * self.seg_size[1] if upsampled else h * w, upsampled

    def quantile_modes(self) -> dict[str, str]:
        """Per layer, the quantile mode its thresholds use (`auto` resolved)."""
        s, modes = self.settings, {}
        for layer in self.tap.layers:
            k, per_image, upsampled = self._threshold_values(layer)
            modes[layer] = quantiles.resolve_mode(
                s.quantile_mode,
                k,
                s.activation_dtype,
                per_image * len(self.source),
                upsampled=upsampled,
                q=s.quantile,
            )
        return modes

    def pass1_statistic(self) -> statistics.Statistic:
        """Per layer: "q" (thresholds) and "top" (top images and their maps)."""
        s, modes = self.settings, self.quantile_modes()
        per_layer = {}
        for layer in self.tap.layers:
            h, w, _ = self.tap.shapes[layer]
            k, per_image, upsampled = self._threshold_values(layer)
            per_layer[layer] = statistics.group(
                {
                    "q": statistics.quantile_statistic(
                        layer,
                        k,
                        name=self.tap.name_of(layer),
                        total_count=per_image * len(self.source),
                        q=s.quantile,
                        mode=modes[layer],  # as logged and recorded
                        seed=s.seed,
                        sketch_size=s.sketch_size,
                        upsample_to=self.seg_size if upsampled else None,
                        activation_dtype=s.activation_dtype,
                    ),
                    "top": statistics.top_images_statistic(layer, k, s.top_images, (h, w)),
                }
            )
        return statistics.group(per_layer)

    def run_pass1(self, variables) -> dict[str, dict[str, np.ndarray]]:
        """Thresholds, top images and their maps per layer (also fills the activation
        cache, and with `check_labels` decoding in threads, the label memo)."""
        free = actcache.available_host_bytes()
        self._setup_cache()
        if self.check_labels and not self.num_workers:
            free -= self.cache.host_bytes
            self.label_memo = LabelMemo(max(0, free) // LABEL_MEMO_SHARE)
        statistic = self.pass1_statistic()
        fields = Fields(
            self.source,
            images=True,
            labels=False,
            categories=self.settings.categories,
            check_labels=self.check_labels,
            memo=self.label_memo,
        )
        out = self._run(
            "pass1",
            statistic,
            fields,
            variables,
            cache=self.cache,
            cache_mode="write",
            compile_next=self._compile_pass2_ahead,
        )
        return {layer: {**parts["q"], **parts["top"]} for layer, parts in out.items()}

    def _compile_pass2_ahead(self, acts: Any) -> None:
        """Start compiling pass 2's steps (unless its outputs are stored), to run in the
        background while pass 1 runs: its thresholds ride in its state, so placeholders
        give the same programs (`driver.compile_ahead`). `acts`: pass 1's activations."""
        if self._stored("pass2"):
            return
        placeholders = {
            layer: np.zeros((self.tap.shapes[layer][-1],), np.float32) for layer in self.tap.layers
        }
        labels = Fields(self.source, images=False, labels=True, categories=self.settings.categories)
        driver.compile_ahead(
            self.pass2_statistic(placeholders),
            driver.batch_like(labels.label_fields(), self.settings.batch_size, self.mesh),
            mesh=self.mesh,
            steps=self.steps,
            acts=acts,
        )

    def _stored(self, stage: str) -> bool:
        """Whether every layer's outputs of `stage` are stored (`_stage` will load them)."""
        if self.work_dir is None:
            return False
        root = self.work_dir / "stages"
        return all(
            store.Stage(root, stage, self.stage_key(stage, layer)).done for layer in self.tap.layers
        )

    def _remove_killed_runs_work(self) -> None:
        """The disk caches of pass 1's activations and the pass checkpoints killed runs left
        in `work_dir`, whatever their settings (keys) and this run's cache kind: this
        finished dissection replaces theirs, so they would never be resumed."""
        for folder in sorted((self.work_dir / "activations").glob("*")):
            actcache.remove_files(folder)
        for stage in ("pass1", "pass2"):
            for folder in sorted((self.work_dir / "checkpoints").glob(f"{stage}-*")):
                shutil.rmtree(folder, ignore_errors=True)

    def _cache_dir(self) -> pathlib.Path:
        """Where a disk cache of pass 1's activations lives (per pass-1 key)."""
        return self.work_dir / "activations" / self.stage_key("pass1")

    def _setup_cache(self):
        per_example = sum(int(np.prod(s)) for s in self.tap.shapes.values()) * self.dtype.itemsize
        needed = per_example * self.num_batches * self.local_batch
        kind = actcache.choose_kind(self._cache_request, needed, self.work_dir, self._cache_budget)
        directory = self._cache_dir() if kind == "disk" else None
        logging.info("activation cache: %s (%.1f MB)", kind, needed / 2**20)
        args = (self.tap.shapes, self.num_batches, self.local_batch, self.dtype)
        try:
            self.cache = actcache.ActivationCache(kind, *args, directory)
        except actcache.NoRoom as e:
            logging.warning(
                "activation cache: %s cannot hold %.1f MB (%s); running without one (pass 2 "
                "runs the network again)",
                directory,
                needed / 2**20,
                e.strerror,
            )
            actcache.remove_files(directory)
            self.cache = actcache.ActivationCache("none", *args)

    # ------------------------------------------------------------ pass 2

    def test_concepts(self) -> np.ndarray:
        """int32 [C]: the labels the permutation test pairs units with (the scored ones)."""
        return np.flatnonzero(self.labels.primary >= 0).astype(np.int32)

    def pass2_statistic(self, thresholds: Mapping[str, np.ndarray]) -> statistics.Statistic:
        """Per layer, the exact IoU counts at `thresholds` ("tally") and the units' tie
        statistics in the thresholds' domain ("ties"); with `significance_draws`, every
        image's masks on the permutation test's grid ("significance")."""
        s = self.settings
        test = {}
        for layer in self.tap.layers if s.significance_draws else ():
            test[layer] = {
                "significance": significance.mask_statistic(
                    layer,
                    thresholds[layer],
                    self.test_concepts(),
                    num_images=len(self.source),
                    seg_size=self.seg_size,
                    stride=s.significance_stride,
                    tie_rule=s.tie_rule,
                )
            }
        return statistics.group(
            {
                layer: statistics.group(
                    {
                        **test.get(layer, {}),
                        "tally": statistics.tally_statistic(
                            layer,
                            thresholds[layer],
                            self.labels,
                            restriction=s.restriction,
                            method=self.tally_method,
                            tie_rule=s.tie_rule,
                        ),
                        "ties": statistics.ties_statistic(
                            layer,
                            thresholds[layer],
                            upsample_to=self.seg_size if s.threshold_on == "upsampled" else None,
                        ),
                    }
                )
                for layer in self.tap.layers
            }
        )

    def run_pass2(self, variables, thresholds: Mapping[str, np.ndarray]) -> dict[str, dict]:
        cache = self.cache
        # Every process reads its cache, or every one runs the network (a collective).
        use_cache = parallel.all_processes(
            cache is not None and cache.enabled and cache.lo == 0 and cache.hi == self.num_batches
        )
        # Keyed by the thresholds too: a resumed pass counts at this run's thresholds (those
        # its state holds), never at those of a pass 1 computed otherwise.
        checkpoint_dir = self._checkpoint_dir("pass2")
        if checkpoint_dir is not None:
            checkpoint_dir = checkpoint_dir / store.fingerprint_tree(thresholds)
        out = self._run(
            "pass2",
            self.pass2_statistic(thresholds),
            Fields(
                self.source,
                images=not use_cache,
                labels=True,
                categories=self.settings.categories,
                memo=self.label_memo,
            ),
            variables,
            checkpoint_dir=checkpoint_dir,
            cache=cache,
            cache_mode="read" if cache is not None else None,
        )
        return {
            layer: {
                **parts["tally"],
                **{f"ties_{k}": v for k, v in parts["ties"].items()},
                **self._test(parts.get("significance"), thresholds[layer].shape[0]),
            }
            for layer, parts in out.items()
        }

    def _test(self, bits: Mapping[str, np.ndarray] | None, num_units: int) -> dict[str, Any]:
        """The permutation test's arrays from the masks pass 2 packed (none without them)."""
        if bits is None:
            return {}
        s, concepts = self.settings, self.test_concepts()
        t0 = time.time()
        test = significance.packed_permutation_test(
            bits["unit_bits"],
            bits["concept_bits"],
            num_units,
            len(concepts),
            draws=s.significance_draws,
            seed=s.significance_seed,
        )
        logging.info("permutation test, %d draws: %.1f s", s.significance_draws, time.time() - t0)
        arrays = {"unit_p": test.unit_p, "pair_p": test.pair_p, "iou": test.iou()}
        return {_TEST_PREFIX + k: v for k, v in {**arrays, "concepts": concepts}.items()}

    # ------------------------------------------------------------ both, with stage caching

    def run(self, variables) -> dict[str, LayerStats]:
        """Both passes, reusing any complete stage output stored under the same key."""
        t0 = time.time()
        p1 = self._stage("pass1", lambda: self.run_pass1(variables))
        t1 = time.time()
        thresholds = {layer: p1[layer]["thresholds"] for layer in self.tap.layers}
        p2 = self._stage("pass2", lambda: self.run_pass2(variables, thresholds))
        t2 = time.time()
        cache_kind = "none" if self.cache is None else self.cache.kind
        self.timings = {
            "pass1_s": t1 - t0,
            "pass2_s": t2 - t1,
            "cache": cache_kind,
            "cache_host_bytes": 0 if self.cache is None else self.cache.host_bytes,
            "label_memo_bytes": 0 if self.label_memo is None else self.label_memo.used_bytes,
        }
        if self.cache is not None:
            self.cache.discard()
        if self.work_dir is not None:
            self._remove_killed_runs_work()
        if self.label_memo is not None:
            self.label_memo.clear()
        logging.info("pass 1 %.1f s, pass 2 %.1f s", t1 - t0, t2 - t1)
        return {
            layer: LayerStats(
                layer=layer,
                thresholds=thresholds[layer],
                top_values=p1[layer]["top_values"],
                top_indices=p1[layer]["top_indices"],
                top_maps=p1[layer]["top_maps"],
                counts={
                    k: v for k, v in p2[layer].items() if not k.startswith(("ties_", _TEST_PREFIX))
                },
                shape=self.tap.shapes[layer],
                ties=ties.UnitTies.from_arrays(
                    {k[5:]: v for k, v in p2[layer].items() if k.startswith("ties_")},
                    thresholds[layer],
                    self.settings.quantile,
                ),
                significance={
                    k[len(_TEST_PREFIX) :]: v
                    for k, v in p2[layer].items()
                    if k.startswith(_TEST_PREFIX)
                }
                or None,
            )
            for layer in self.tap.layers
        }

    def _stage(self, stage: str, compute: Callable[[], dict[str, dict[str, np.ndarray]]]):
        """Per-layer arrays of a stage, loaded if stored under its key, else computed and stored."""
        params = self.settings.pass2() if stage == "pass2" else self.settings.pass1()
        out = driver.stage_outputs(
            None if self.work_dir is None else self.work_dir / "stages",
            stage,
            {layer: self.stage_key(stage, layer) for layer in self.tap.layers},
            {
                layer: {
                    "layer": layer,
                    "model": self.model_key,
                    "data": self.data_key,
                    "settings": params,
                }
                for layer in self.tap.layers
            },
            compute,
        )
        if self._stored(stage):  # its checkpoints would never be resumed from again
            shutil.rmtree(self._checkpoint_dir(stage), ignore_errors=True)
        return out


__all__ = [
    "Dissector",
    "LayerStats",
    "NonFiniteActivationError",
    "Settings",
    "restrict_categories",
]

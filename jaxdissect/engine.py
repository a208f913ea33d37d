"""The two passes of a dissection over a probe set, on one device or many.

Pass 1 runs the network once over every image and folds each layer's
activations into a per-unit quantile state (sketch or exact) and each unit's
top images; its activations can be kept (`actcache`) so that pass 2 does not
run the network again. Pass 2 thresholds the (upsampled) maps and adds exact
integer IoU counts. Both passes are `jax.shard_map` steps over the `data` mesh
axis with per-device states merged at the end, checkpointed every N batches so
that a killed run resumes, and every stage's output is stored under a key of
everything it depends on (`store`).
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from jaxdissect import actcache, parallel, quantiles, store, tally, ties, topimages
from jaxdissect.capture import Tap
from jaxdissect.checkpoint import StreamCheckpoint
from jaxdissect.data import loader
from jaxdissect.data.broden import primary_categories
from jaxdissect.labelspace import LabelSpace
from jaxdissect.preprocess import InputSpec
from jaxdissect.tie_rule import TIE_RULES

RESTRICTIONS = ("presence", "overlap", "none")
QUANTILE_MODES = ("sketch", "exact")
THRESHOLD_ON = ("raw", "upsampled")
ACTIVATION_DTYPES = ("float32", "float16", "bfloat16")


class NonFiniteActivationError(ValueError):
    """A layer produced NaN or infinite activations."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that changes the numbers of a dissection.

    Attributes:
      quantile: top fraction of activations above each unit's threshold (0.005).
      quantile_mode: `sketch` (fixed memory) or `exact` (per-unit top-k).
      sketch_size: sketch state size per unit (None: the module's default).
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
      seed: seed of the sketch's randomness.
      batch_size: global batch; part of the key since sketches see batches.
    """

    quantile: float = 0.005
    quantile_mode: str = "sketch"
    sketch_size: int | None = None
    threshold_on: str = "raw"
    restriction: str = "presence"
    tie_rule: str = "strict"
    iou_threshold: float = 0.04
    activation_dtype: str = "float16"
    categories: tuple[str, ...] | None = None
    top_images: int = 10
    seed: int = 0
    batch_size: int = 32

    def __post_init__(self):
        def check(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"--{name}={value!r}; allowed values: {', '.join(allowed)}")

        check("quantile_mode", self.quantile_mode, QUANTILE_MODES)
        check("threshold_on", self.threshold_on, THRESHOLD_ON)
        check("restriction", self.restriction, RESTRICTIONS)
        check("tie_rule", self.tie_rule, TIE_RULES)
        check("activation_dtype", self.activation_dtype, ACTIVATION_DTYPES)
        if not 0 < self.quantile < 1:
            raise ValueError(f"--quantile={self.quantile}: must be in (0, 1), e.g. 0.005")
        if not 0 <= self.iou_threshold < 1:
            raise ValueError(f"--iou_threshold={self.iou_threshold}: must be in [0, 1)")
        if self.batch_size < 1 or self.top_images < 1:
            raise ValueError("--batch_size and --top_images must be >= 1")
        if self.categories is not None:
            object.__setattr__(self, "categories", tuple(self.categories))

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
        return {
            **self.pass1(),
            "restriction": self.restriction,
            "tie_rule": self.tie_rule,
            "categories": self.categories,
        }


@dataclasses.dataclass
class LayerStats:
    """What the engine measured for one layer (numpy, host)."""

    layer: str
    thresholds: np.ndarray  # float32 [K]
    top_values: np.ndarray  # float32 [T, K]
    top_indices: np.ndarray  # int32 [T, K], -1 empty
    counts: dict[str, np.ndarray]  # int64 tally counts (see jaxdissect.tally)
    shape: tuple[int, int, int]  # (h, w, K)
    ties: ties.UnitTies | None = None  # tie statistics of the thresholds' domain


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
    unknown = [c for c in categories if c not in labels.categories]
    if unknown:
        raise ValueError(
            f"--categories names {unknown}, not in the dataset; known: {', '.join(labels.categories)}"
        )
    keep = np.asarray([c in categories for c in labels.categories])
    if coverage is not None:
        primary = primary_categories(coverage, use=keep)
    else:
        primary = np.where(
            (labels.primary >= 0) & keep[np.maximum(labels.primary, 0)], labels.primary, -1
        )
    return dataclasses.replace(labels, primary=primary.astype(np.int32))


class _Fields:
    """A view of a source that reads only what a pass needs (decoding is the cost)."""

    def __init__(self, source, images: bool, labels: bool):
        self.source, self.images, self.labels = source, images, labels
        self.planes = source.max_planes
        self.image_labels = source.max_image_labels
        self.seg_size = tuple(source.seg_size)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        out = {"index": np.asarray(i, np.int32)}
        if self.images:
            out["image"] = np.asarray(self.source.read_image(i), np.uint8)
        if self.labels:
            planes, image_labels = self.source.read_labels(i)
            pixel = np.zeros((self.planes, *self.seg_size), np.int32)
            pixel[: len(planes)] = planes
            scalar = np.zeros((self.image_labels,), np.int32)
            scalar[: len(image_labels)] = image_labels
            out["pixel_labels"], out["image_labels"] = pixel, scalar
        return out


def partial_shard_map(f, **kwargs):
    """`jax.shard_map` for per-device steps without collectives.

    Each device updates its own statistics; nothing crosses devices inside a
    step, so the varying-manual-axes type check (which would make every loop
    carry in the statistics' code carry `pcast` annotations) is off.
    """
    return jax.shard_map(f, check_vma=False, **kwargs)


def _squeeze(tree):
    return jax.tree.map(lambda x: x[0], tree)


def _expand(tree):
    return jax.tree.map(lambda x: x[None], tree)


class Dissector:
    """Runs both passes for the layers of one `Tap` over one probe set."""

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
    ):
        if tally_method not in tally.METHODS:
            raise ValueError(
                f"--tally_method={tally_method!r}; allowed values: {', '.join(tally.METHODS)}"
            )
        self.tally_method, self.num_workers = tally_method, num_workers
        self.tap, self.source, self.settings = tap, source, settings
        self.input_spec, self.model_key = input_spec, model_key
        self.mesh = mesh or parallel.data_mesh()
        parallel.check_batch_size(settings.batch_size, self.mesh)
        if settings.batch_size % jax.process_count():
            raise ValueError("--batch_size must be divisible by the number of hosts")
        self.work_dir = pathlib.Path(work_dir) if work_dir is not None else None
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_every, self.num_threads, self.progress = (
            checkpoint_every,
            num_threads,
            progress,
        )
        if len(source) == 0:
            raise ValueError("the probe set is empty: check --split and --max_images")
        self.labels = restrict_categories(
            source.labels, settings.categories, getattr(source, "coverage", None)
        )
        self.seg_size = tuple(source.seg_size)
        self.num_batches = loader.num_batches(len(source), settings.batch_size)
        self.local_batch = settings.batch_size // jax.process_count()
        self.dtype = jnp.dtype(settings.activation_dtype)
        self.data_key = source.fingerprint()
        self._cache_request, self._cache_budget = activation_cache, cache_budget_bytes
        self.cache: actcache.ActivationCache | None = None

    # ------------------------------------------------------------ keys

    def stage_key(self, stage: str, layer: str | None = None) -> str:
        """Key of a layer's stored stage output, or (layer None) of a whole pass's checkpoints."""
        params = self.settings.pass1() if stage == "pass1" else self.settings.pass2()
        which = {"layer": layer} if layer is not None else {"layers": self.tap.layers}
        return store.key_of(
            stage=stage,
            model=self.model_key,
            data=self.data_key,
            input_spec=dataclasses.asdict(self.input_spec),
            settings=params,
            **which,
        )

    # ------------------------------------------------------------ shared step pieces

    def _activations(self, variables, images):
        acts = self.tap.fn(variables, self.input_spec(images))
        # Rounded once, here: every statistic (and the cache) sees the same values.
        return {k: v.astype(self.dtype).astype(jnp.float32) for k, v in acts.items()}

    def _pass_loop(
        self,
        name: str,
        stage_key: str,
        state,
        step: Callable,
        fields: _Fields,
        on_batch: Callable[[int, Any], None] | None = None,
    ):
        """Drive `state = step(state, b, batch)` over all batches, checkpointed and resumable."""
        ckpt = None
        start = 0
        if self.work_dir is not None:
            ckpt = StreamCheckpoint(
                self.work_dir / "checkpoints" / f"{name}-{stage_key}", self.checkpoint_every
            )
            state, start = ckpt.restore(state)
            if start:
                logging.info("%s: resuming after batch %d of %d", name, start, self.num_batches)
        bar = _progress(
            name,
            self.tap.layers,
            self.num_batches,
            start,
            self.settings.batch_size,
            len(self.source),
            self.progress,
        )
        batches = loader.batches(
            fields,
            self.settings.batch_size,
            start_batch=start,
            num_threads=self.num_threads,
            num_workers=self.num_workers,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        if on_batch is not None:
            on_batch(start, None)
        in_flight = parallel.InFlight()
        for b, batch in enumerate(batches, start=start):
            state = step(state, b, batch)
            in_flight.add(state)
            bar.update(b + 1)
            if ckpt is not None and (b + 1) % self.checkpoint_every == 0:
                self._before_checkpoint()
                ckpt.maybe_save(b + 1, state)
        bar.close()
        if ckpt is not None:
            self._before_checkpoint()
            ckpt.maybe_save(self.num_batches, state, force=True)
            ckpt.close()
        return state

    def _before_checkpoint(self):
        # Cached rows must be on disk before a checkpoint says they were computed.
        if self.cache is not None:
            self.cache.flush()

    # ------------------------------------------------------------ pass 1

    def _quantile_init(self, k: int, shape: tuple[int, int, int]):
        s = self.settings
        per_image = (
            self.seg_size[0] * self.seg_size[1]
            if s.threshold_on == "upsampled"
            else shape[0] * shape[1]
        )
        total = per_image * len(self.source)
        if s.quantile_mode == "exact":
            return quantiles.exact_init(k, total, s.quantile)
        kwargs = {} if s.sketch_size is None else {"size": s.sketch_size}
        return quantiles.sketch_init(
            k, q=s.quantile, seed=s.seed, max_count=max(total, 1), **kwargs
        )

    def _quantile_update(self, state, rows, valid):
        if self.settings.quantile_mode == "exact":
            return quantiles.exact_update(state, rows, valid)
        return quantiles.sketch_update(state, rows, valid)

    def _quantile_merge(self, a, b):
        if self.settings.quantile_mode == "exact":
            return quantiles.exact_merge(a, b)
        return quantiles.sketch_merge(a, b)

    def _quantile_threshold(self, state):
        if self.settings.quantile_mode == "exact":
            return quantiles.exact_threshold(state, self.settings.quantile)
        return quantiles.sketch_threshold(state, self.settings.quantile)

    def _pass1_init(self):
        # Each device gets its own sketch seed: the merged result stays deterministic.
        state = {}
        for layer in self.tap.layers:
            shape = self.tap.shapes[layer]
            state[layer] = {
                "q": self._quantile_init(shape[2], shape),
                "top": topimages.init(shape[2], self.settings.top_images),
            }
        return parallel.per_device(state, self.mesh)

    def _pass1_local(self, state, variables, batch):
        state = _squeeze(state)
        acts = self._activations(variables, batch["image"])
        valid = batch["valid"]
        new = {}
        for layer, a in acts.items():
            b, h, w, k = a.shape
            q_in = (
                tally.upsample(a, self.seg_size) if self.settings.threshold_on == "upsampled" else a
            )
            rows = q_in.reshape(-1, k)
            row_valid = jnp.repeat(valid, rows.shape[0] // b)
            new[layer] = {
                "q": self._quantile_update(state[layer]["q"], rows, row_valid),
                "top": topimages.update(state[layer]["top"], a, batch["index"], valid),
            }
        cached = {k: v.astype(self.dtype) for k, v in acts.items()}
        return _expand(new), cached

    def run_pass1(self, variables) -> dict[str, dict[str, np.ndarray]]:
        """Thresholds and top images per layer (also fills the activation cache)."""
        spec_state = P(parallel.AXIS)
        step = jax.jit(
            partial_shard_map(
                self._pass1_local,
                mesh=self.mesh,
                in_specs=(spec_state, P(), P(parallel.AXIS)),
                out_specs=(spec_state, P(parallel.AXIS)),
            ),
            donate_argnums=(0,),
        )
        variables = parallel.replicate(variables, self.mesh)
        self._setup_cache()
        key = self.stage_key("pass1")
        cache = self.cache

        def run(state, b, batch):
            state, acts = step(state, variables, parallel.put_batch(batch, self.mesh))
            if cache.enabled:
                cache.put(b, acts)
            return state

        def on_start(b, _):
            cache.resume_at(b)

        fields = _Fields(self.source, images=True, labels=False)
        state = self._pass_loop("pass1", key, self._pass1_init(), run, fields, on_start)
        state = parallel.gather_to_host(state)
        out = {}
        for layer in self.tap.layers:
            per_dev = parallel.unstack(state[layer])
            q = per_dev[0]["q"]
            top = per_dev[0]["top"]
            for d in per_dev[1:]:
                q = self._quantile_merge(q, d["q"])
                top = topimages.merge(top, d["top"])
            nonfinite = np.asarray(q.nonfinite)
            if nonfinite.any():
                units = np.flatnonzero(nonfinite)
                raise NonFiniteActivationError(
                    f"layer {layer!r}: {int(nonfinite.sum())} NaN/inf activations in units "
                    f"{units[:20].tolist()}{' ...' if len(units) > 20 else ''}. Check the model's "
                    "weights and input normalisation"
                    + (
                        f"; with --activation_dtype={self.settings.activation_dtype} values beyond "
                        "its range overflow: try --activation_dtype=float32"
                        if self.settings.activation_dtype == "float16"
                        else ""
                    )
                )
            out[layer] = {
                "thresholds": np.asarray(self._quantile_threshold(q), np.float32),
                "top_values": np.asarray(top.values),
                "top_indices": np.asarray(top.indices),
            }
        return out

    def _setup_cache(self):
        per_example = sum(int(np.prod(s)) for s in self.tap.shapes.values()) * self.dtype.itemsize
        needed = per_example * self.num_batches * self.local_batch
        kind = actcache.choose_kind(self._cache_request, needed, self.work_dir, self._cache_budget)
        directory = None
        if kind == "disk":
            directory = self.work_dir / "activations" / self.stage_key("pass1")
        logging.info("activation cache: %s (%.1f MB)", kind, needed / 2**20)
        self.cache = actcache.ActivationCache(
            kind, self.tap.shapes, self.num_batches, self.local_batch, self.dtype, directory
        )

    # ------------------------------------------------------------ pass 2

    def _pass2_init(self):
        state = {
            layer: {
                "tally": tally.tally_init(self.tap.shapes[layer][2], self.labels),
                "ties": ties.ties_init(self.tap.shapes[layer][2]),
            }
            for layer in self.tap.layers
        }
        return parallel.per_device(state, self.mesh)

    def _count(self, state, acts, thresholds, batch):
        new = {}
        for layer, a in acts.items():
            # Tie statistics in the thresholds' domain, where the mask compares with T.
            maps = a if self.settings.threshold_on == "raw" else tally.upsample(a, self.seg_size)
            valid = batch.get("valid", jnp.ones((a.shape[0],), bool))
            tie_state = ties.ties_update(state[layer]["ties"], maps, thresholds[layer], valid)
            counts = tally.batch_counts(
                a.astype(jnp.float32),
                thresholds[layer],
                batch,
                jnp.asarray(self.labels.primary),
                self.labels.num_categories,
                restriction=self.settings.restriction,
                method=self.tally_method,
                tie_rule=self.settings.tie_rule,
            )
            new[layer] = {
                "tally": tally.tally_add(state[layer]["tally"], counts),
                "ties": tie_state,
            }
        return new

    def _pass2_local_forward(self, state, variables, thresholds, batch):
        acts = self._activations(variables, batch["image"])
        return _expand(self._count(_squeeze(state), acts, thresholds, batch))

    def _pass2_local_cached(self, state, thresholds, acts, batch):
        return _expand(self._count(_squeeze(state), acts, thresholds, batch))

    def run_pass2(self, variables, thresholds: Mapping[str, np.ndarray]) -> dict[str, dict]:
        data = P(parallel.AXIS)
        forward = jax.jit(
            partial_shard_map(
                self._pass2_local_forward,
                mesh=self.mesh,
                in_specs=(data, P(), P(), data),
                out_specs=data,
            ),
            donate_argnums=(0,),
        )
        cached = jax.jit(
            partial_shard_map(
                self._pass2_local_cached,
                mesh=self.mesh,
                in_specs=(data, P(), data, data),
                out_specs=data,
            ),
            donate_argnums=(0,),
        )
        variables = parallel.replicate(variables, self.mesh)
        thr = parallel.replicate({k: jnp.asarray(v) for k, v in thresholds.items()}, self.mesh)
        cache = self.cache
        use_cache = (
            cache is not None and cache.enabled and cache.lo == 0 and cache.hi == self.num_batches
        )
        fields = _Fields(self.source, images=not use_cache, labels=True)

        def run(state, b, batch):
            batch = dict(batch)
            if cache is not None and cache.has(b):
                acts = cache.get(b)
                if cache.kind != "device":
                    acts = parallel.put_batch(acts, self.mesh)
                batch.pop("image", None)
                return cached(state, thr, acts, parallel.put_batch(batch, self.mesh))
            if "image" not in batch:  # only when the cache has a gap (never with use_cache)
                raise RuntimeError(f"batch {b} is neither cached nor read with images")
            return forward(state, variables, thr, parallel.put_batch(batch, self.mesh))

        state = self._pass_loop("pass2", self.stage_key("pass2"), self._pass2_init(), run, fields)
        state = parallel.gather_to_host(state)
        out = {}
        for layer in self.tap.layers:
            per_dev = parallel.unstack(state[layer])
            merged, tie_state = per_dev[0]["tally"], per_dev[0]["ties"]
            for d in per_dev[1:]:
                merged = tally.tally_merge(merged, d["tally"])
                tie_state = ties.ties_merge(tie_state, d["ties"])
            out[layer] = {
                **tally.tally_to_numpy(merged),
                **{f"ties_{k}": v for k, v in ties.ties_to_numpy(tie_state).items()},
            }
        return out

    # ------------------------------------------------------------ maps for the report

    def unit_maps(self, variables, top_indices: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per layer, each unit's maps on its top images: float32 [T, h, w, K].

        Runs the network again, on the images that are some unit's top image only
        (rounded to `activation_dtype` like the passes, so masks match the tally).
        Slots without an image (index -1) stay zero.
        """
        wanted = np.unique(np.concatenate([np.ravel(v) for v in top_indices.values()]))
        wanted = wanted[wanted >= 0]
        out = {
            layer: np.zeros((idx.shape[0], *self.tap.shapes[layer][:2], idx.shape[1]), np.float32)
            for layer, idx in top_indices.items()
        }
        if not len(wanted):
            return out
        fn = jax.jit(self._activations)
        variables = jax.device_put(variables, jax.local_devices()[0])
        bs = self.settings.batch_size
        for start in range(0, len(wanted), bs):
            chunk = wanted[start : start + bs]
            images = np.stack([np.asarray(self.source.read_image(int(i)), np.uint8) for i in chunk])
            pad = bs - len(chunk)  # fixed shapes: one compilation
            if pad:
                images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)])
            acts = jax.device_get(fn(variables, images))
            pos = {int(i): j for j, i in enumerate(chunk)}
            for layer, idx in top_indices.items():
                a = acts[layer]
                slots, units = np.nonzero(np.isin(idx, chunk))
                for t, k in zip(slots, units, strict=True):
                    out[layer][t, :, :, k] = a[pos[int(idx[t, k])], :, :, k]
        return out

    # ------------------------------------------------------------ both, with stage caching

    def run(self, variables) -> dict[str, LayerStats]:
        """Both passes, reusing any complete stage output stored under the same key."""
        t0 = time.time()
        p1 = self._stage("pass1", lambda: self.run_pass1(variables))
        t1 = time.time()
        thresholds = {layer: p1[layer]["thresholds"] for layer in self.tap.layers}
        p2 = self._stage("pass2", lambda: self.run_pass2(variables, thresholds))
        t2 = time.time()
        if self.cache is not None:
            self.cache.clear()
        logging.info("pass 1 %.1f s, pass 2 %.1f s", t1 - t0, t2 - t1)
        cache_kind = "none" if self.cache is None else self.cache.kind
        self.timings = {"pass1_s": t1 - t0, "pass2_s": t2 - t1, "cache": cache_kind}
        return {
            layer: LayerStats(
                layer=layer,
                thresholds=thresholds[layer],
                top_values=p1[layer]["top_values"],
                top_indices=p1[layer]["top_indices"],
                counts={k: v for k, v in p2[layer].items() if not k.startswith("ties_")},
                shape=self.tap.shapes[layer],
                ties=ties.UnitTies.from_arrays(
                    {k[5:]: v for k, v in p2[layer].items() if k.startswith("ties_")},
                    thresholds[layer],
                    self.settings.quantile,
                ),
            )
            for layer in self.tap.layers
        }

    def _stage(self, stage: str, compute: Callable[[], dict[str, dict[str, np.ndarray]]]):
        """Per-layer arrays of a stage, loaded if stored under its key, else computed and stored."""
        if self.work_dir is None:
            return compute()
        stages = {
            layer: store.Stage(self.work_dir / "stages", f"{stage}", self.stage_key(stage, layer))
            for layer in self.tap.layers
        }
        if all(s.done for s in stages.values()):
            logging.info(
                "%s: reusing stored results (%s)",
                stage,
                ", ".join(str(s.dir) for s in stages.values()),
            )
            return {layer: store.load_arrays(s.path("arrays.npz")) for layer, s in stages.items()}
        result = compute()
        if jax.process_index() == 0:
            for layer, s in stages.items():
                store.save_arrays(s.path("arrays.npz"), result[layer])
                s.mark_done(
                    {
                        "layer": layer,
                        "model": self.model_key,
                        "data": self.data_key,
                        "settings": self.settings.pass2()
                        if stage == "pass2"
                        else self.settings.pass1(),
                    }
                )
        return result


def _progress(name, layers, total, start, batch_size, num_images, enabled):
    return _Bar(f"{name} [{', '.join(layers)}]", total, start, batch_size, num_images, enabled)


class _Bar:
    """A tqdm bar in images with images/s and ETA (quiet when disabled or not process 0)."""

    def __init__(self, desc, total_batches, start, batch_size, num_images, enabled):
        self.batch_size, self.num_images = batch_size, num_images
        self.bar = None
        if enabled and jax.process_index() == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=num_images,
                initial=min(start * batch_size, num_images),
                desc=desc,
                unit="img",
                dynamic_ncols=True,
                smoothing=0.1,
            )

    def update(self, batches_done):
        if self.bar is not None:
            self.bar.n = min(batches_done * self.batch_size, self.num_images)
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()

"""Net2Vec concept vectors (Fong & Vedaldi, CVPR 2018): a concept as a weighted sum of units.

For a layer with K units and every concept c of a chosen set, a linear probe over the
units' masks predicts the concept's mask pixel by pixel:

    p_c(x) = sigmoid(sum_k w_ck m_k(x) + b_c)

- `binary` (Net2Vec's binarised variant, the default): m_k(x) is unit k's mask as the
  dissection's tally counts it, the activation map upsampled to the segmentation size
  (`tally.upsample`) and compared with the dissection's threshold by its tie rule
  (`jaxdissect.masks.unit_masks`). A single unit with a large weight reproduces that
  unit's mask exactly, so the probe can always do at least as well as the best unit.
  (Net2Vec sums the binarised maps at the layer's resolution and upsamples the sum; here
  the sum is over the tally's upsampled masks, which the comparison with single units
  needs.)
- `raw`: m_k(x) is the upsampled activation itself (Net2Vec's other variant).

Loss (Net2Vec's): per concept, the per-pixel binary cross-entropy weighted by
alpha_c = 1 - (concept pixels / all pixels) of the training split, alpha_c on the
positive pixels and 1 - alpha_c on the negative ones, averaged over the batch's pixels;
with `balance=False`, the unweighted cross-entropy. Concepts are trained together by
`jax.vmap` of the one-concept loss over the stacked weights (one compiled step for all
concepts); their losses are summed, so each concept's gradient is its own, and Adam (an
elementwise optimiser) steps each concept as if it were trained alone. Steps are jitted
over a `data` mesh (`jaxdissect.parallel`): the batch is split over the devices and the
gradient is the sum over all of them. Training resumes from an orbax checkpoint of
(weights, optimiser state, step) (`jaxdissect.checkpoint.StreamCheckpoint`).

Score: the set IoU over the held-out images, sum_x |P_c(x) & L_c(x)| / sum_x |P_c(x) |
L_c(x)| with P_c = p_c > 0.5 (no restriction of the union, on both sides), against the
single units' IoU recomputed on the same held-out images: `single_unit` is the unit with
the best IoU on the training split (chosen as the vector is fitted, on the training images)
and `best_heldout_unit` the best on the held-out images themselves (an upper bound for any
single unit). Counts are exact integers (0/1 products summed in float32 blocks below 2**24).
Every grid can be taken every `stride` pixels (cost scales with the pixels).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxdissect import config, masks, parallel
from jaxdissect.checkpoint import StreamCheckpoint
from jaxdissect.tally import F32_EXACT, upsample
from jaxdissect.tie_rule import active, check_tie_rule

VARIANTS = ("binary", "raw")
# `single_unit` (`best_heldout_unit`) of a concept no unit overlaps on the training
# (held-out) images.
NO_UNIT = -1
# Adam's epsilon: at least 100 times a gradient at float32 rounding level (~1e-9; the bias's
# gradient at zero weights is exactly 0 under alpha weighting), so rounding noise moves no weight.
ADAM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """How concept vectors are trained and scored.

    Attributes:
      variant: the probe's inputs: `binary` unit masks (Net2Vec's binarised variant) or
        the `raw` upsampled activations.
      balance: weight the cross-entropy by alpha (positive pixels) and 1 - alpha
        (negative), alpha = 1 - the concept's share of the training pixels (Net2Vec).
      learning_rate: Adam's step size.
      epochs: passes over the training images.
      probe_batch_size: images per training step (divisible by the devices).
      heldout_fraction: share of the probe images held out for scoring.
      mask_stride: keep every N-th pixel of the segmentation grid in both directions.
      probe_seed: seed of the train/held-out split and of the order of training images.
      probe_checkpoint_every: save (weights, optimiser state, step) every N steps.
    """

    variant: str = config.setting("binary", choices=VARIANTS)
    balance: bool = True
    learning_rate: float = 0.01
    epochs: int = 10
    probe_batch_size: int = 32
    heldout_fraction: float = 0.3
    mask_stride: int = 1
    probe_seed: int = 0
    probe_checkpoint_every: int = 100

    def __post_init__(self):
        config.check_fields(self)
        for name in ("epochs", "probe_batch_size", "mask_stride", "probe_checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction}: must be in (0, 1)")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate}: must be > 0")


@dataclasses.dataclass(frozen=True)
class ProbeData:
    """A layer's activations and the labels of the same probe images, on the host (in
    memory, or memory-mapped files: `collect`'s `directory`).

    Attributes:
      acts: float [N, h, w, K], rounded as the dissection rounded them (activation_dtype).
      pixel_labels: int [N, planes, sh, sw] label planes (0: none).
      image_labels: int [N, Q] image-level labels (0: none).
    """

    acts: np.ndarray
    pixel_labels: np.ndarray
    image_labels: np.ndarray

    def __post_init__(self):
        n = len(self.acts)
        if self.acts.ndim != 4 or self.pixel_labels.ndim != 4 or self.image_labels.ndim != 2:
            raise ValueError(
                f"acts {self.acts.shape}, pixel_labels {self.pixel_labels.shape}, image_labels "
                f"{self.image_labels.shape}: expected [N, h, w, K], [N, planes, sh, sw], [N, Q]"
            )
        if len(self.pixel_labels) != n or len(self.image_labels) != n:
            raise ValueError("acts, pixel_labels and image_labels must hold the same images")

    @property
    def size(self) -> tuple[int, int]:
        """The segmentation size (sh, sw)."""
        return tuple(self.pixel_labels.shape[2:])  # type: ignore[return-value]

    def labels_present(self, num_labels: int, chunk: int = 256) -> np.ndarray:
        """bool [num_labels]: the labels 1..num_labels-1 that some image holds, read
        `chunk` images at a time."""
        present = np.zeros(num_labels, bool)
        for start in range(0, len(self.acts), chunk):
            for ids in (self.pixel_labels, self.image_labels):
                part = np.asarray(ids[start : start + chunk])
                present[np.unique(part[(part > 0) & (part < num_labels)])] = True
        return present


@dataclasses.dataclass(frozen=True)
class ConceptVectors:
    """Trained concept vectors of one layer and their held-out scores (module docstring).

    Attributes:
      concepts: int [C] label numbers.
      weights: float32 [C, K]; bias: float32 [C].
      alpha: float64 [C], the positive-class weight (1 - training share; 0.5 unbalanced).
      train_images, heldout_images: int [N_train], [N_heldout] probe image indices.
      iou: float64 [C], the vector's held-out set IoU.
      intersection, predicted, truth: int64 [C], its held-out counts (truth: concept pixels).
      single_unit: int [C], the unit with the best training-split IoU (the first of equals;
        `NO_UNIT` where every unit's is 0); single_iou: float64 [C], its held-out IoU (0
        without a unit).
      best_heldout_unit, best_heldout_iou: the unit with the best held-out IoU (`NO_UNIT`
        where every unit's is 0), and that IoU.
      unit_iou: float64 [K, C], every unit's held-out IoU.
      losses: float32 [steps], the summed loss of every training step.
      train_s: seconds spent in training steps (this process; 0 when all were restored).
    """

    concepts: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    alpha: np.ndarray
    train_images: np.ndarray
    heldout_images: np.ndarray
    iou: np.ndarray
    intersection: np.ndarray
    predicted: np.ndarray
    truth: np.ndarray
    train_truth: np.ndarray
    single_unit: np.ndarray
    single_iou: np.ndarray
    best_heldout_unit: np.ndarray
    best_heldout_iou: np.ndarray
    unit_iou: np.ndarray
    losses: np.ndarray
    train_s: float

    @property
    def gain(self) -> np.ndarray:
        """float64 [C]: the vector's held-out IoU minus its single unit's."""
        return self.iou - self.single_iou


def split_images(num_images: int, heldout_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """(train, held-out) sorted image indices: a seeded random split, at least one of each."""
    if num_images < 2:
        raise ValueError(f"{num_images} probe images: concept vectors need at least 2")
    heldout = min(num_images - 1, max(1, round(num_images * heldout_fraction)))
    order = np.random.default_rng(np.random.SeedSequence([seed, num_images])).permutation(
        num_images
    )
    return np.sort(order[heldout:]), np.sort(order[:heldout])


def check_batch_fits(cfg: ProbeConfig, num_images: int) -> None:
    """Raise, naming probe_batch_size, unless a batch fits in the training split of
    `num_images` probe images (known before any forward pass)."""
    train, _ = split_images(num_images, cfg.heldout_fraction, cfg.probe_seed)
    if len(train) < cfg.probe_batch_size:
        raise ValueError(
            f"probe_batch_size={cfg.probe_batch_size} exceeds the {len(train)} training "
            "images: use a smaller batch"
        )


# --------------------------------------------------------------------------- jittable pieces


def unit_inputs(
    acts: jax.Array,
    thresholds: jax.Array,
    size: tuple[int, int],
    *,
    stride: int = 1,
    tie_rule: str = "strict",
) -> tuple[jax.Array, jax.Array]:
    """(upsampled activations float32 [B, P, K], unit masks bool [B, P, K]) on the
    segmentation grid taken every `stride` pixels (P pixels per image)."""
    s = upsample(acts, size, stride)
    m = active(s, jnp.asarray(thresholds, jnp.float32), tie_rule)
    b, k = s.shape[0], s.shape[-1]
    return s.reshape(b, -1, k), m.reshape(b, -1, k)


def predict(
    acts: jax.Array,
    thresholds: jax.Array,
    size: tuple[int, int],
    weights: jax.Array,
    bias: jax.Array,
    *,
    variant: str,
    tie_rule: str = "strict",
) -> jax.Array:
    """bool [B, h, w, C]: each concept vector's mask on the grid `size` (probe > 0.5, i.e.
    w . m(x) + b > 0) from the inputs it was trained on (`variant`: unit masks or upsampled
    activations). acts [B, h', w', K]; weights [C, K]; bias [C]."""
    raw, unit = unit_inputs(acts, thresholds, size, tie_rule=tie_rule)
    feats = unit.astype(jnp.float32) if variant == "binary" else raw
    z = jnp.einsum("bpk,ck->bpc", feats, weights, precision=lax.Precision.HIGHEST) + bias
    return (z > 0).reshape(z.shape[0], *size, -1)


def concept_targets(
    pixel_labels: jax.Array, image_labels: jax.Array, concepts: jax.Array, *, stride: int = 1
) -> jax.Array:
    """bool [B, P, C]: each concept's mask (`masks.concept_masks`) on the strided grid."""
    m = masks.concept_masks(pixel_labels, image_labels, concepts)[:, :, ::stride, ::stride]
    return jnp.moveaxis(m.reshape(m.shape[0], m.shape[1], -1), 1, 2)


def concept_loss(
    w: jax.Array, b: jax.Array, alpha: jax.Array, inputs: jax.Array, target: jax.Array
) -> jax.Array:
    """One concept's alpha-weighted binary cross-entropy, mean over pixels.

    w [K], b [], alpha []; inputs float [B, P, K]; target [B, P] (0/1).
    """
    # Full float32 products on every backend (TPU and recent GPUs default to fewer bits).
    z = jnp.matmul(inputs, w, precision=lax.Precision.HIGHEST) + b
    y = target.astype(jnp.float32)
    # -log sigmoid(z) = softplus(-z); -log(1 - sigmoid(z)) = softplus(z).
    per_pixel = alpha * y * jax.nn.softplus(-z) + (1.0 - alpha) * (1.0 - y) * jax.nn.softplus(z)
    return jnp.mean(per_pixel)


def probe_loss(params: dict[str, jax.Array], alpha: jax.Array, inputs, targets) -> jax.Array:
    """The summed loss of all concepts: `concept_loss` vmapped over params w [C, K], b [C],
    alpha [C] and targets [B, P, C]."""
    per_concept = jax.vmap(concept_loss, in_axes=(0, 0, 0, None, 2))(
        params["w"], params["b"], alpha, inputs, targets
    )
    return jnp.sum(per_concept)


def optimizer(cfg: ProbeConfig) -> optax.GradientTransformation:
    """Adam at the config's learning rate, epsilon ADAM_EPS (elementwise: concepts do not
    interact)."""
    return optax.adam(cfg.learning_rate, eps=ADAM_EPS)


def init_params(num_units: int, num_concepts: int) -> dict[str, jax.Array]:
    """Zero weights and biases (every prediction 0.5, deterministic)."""
    return {
        "w": jnp.zeros((num_concepts, num_units), jnp.float32),
        "b": jnp.zeros((num_concepts,), jnp.float32),
    }


@dataclasses.dataclass(frozen=True)
class _Steps:
    train: Callable[..., Any]
    count: Callable[..., Any]


def _make_steps(
    cfg: ProbeConfig,
    mesh: jax.sharding.Mesh,
    size: tuple[int, int],
    thresholds: np.ndarray,
    concepts: np.ndarray,
    tie_rule: str,
) -> _Steps:
    """The jitted train step and count step, batches split over the mesh's `data` axis."""
    thr = jnp.asarray(thresholds, jnp.float32)
    conc = jnp.asarray(concepts, jnp.int32)
    opt = optimizer(cfg)
    rep = parallel.replicated(mesh)
    data = parallel.sharded(mesh)

    def inputs_of(batch):
        raw, unit = unit_inputs(batch["acts"], thr, size, stride=cfg.mask_stride, tie_rule=tie_rule)
        feats = unit.astype(jnp.float32) if cfg.variant == "binary" else raw
        target = concept_targets(
            batch["pixel_labels"], batch["image_labels"], conc, stride=cfg.mask_stride
        )
        return feats, unit, target

    def train(state, alpha, batch):
        feats, _, target = inputs_of(batch)
        loss, grads = jax.value_and_grad(probe_loss)(state["params"], alpha, feats, target)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        losses = state["losses"].at[state["step"]].set(loss)
        return {
            "params": params,
            "opt_state": opt_state,
            "losses": losses,
            "step": state["step"] + 1,
        }

    def count(params, batch):
        feats, unit, target = inputs_of(batch)
        valid = batch["valid"][:, None, None]
        unit = (unit & valid).astype(jnp.bfloat16)
        target = (target & valid).astype(jnp.bfloat16)
        z = jnp.einsum("bpk,ck->bpc", feats, params["w"], precision=lax.Precision.HIGHEST)
        pred = ((z + params["b"]) > 0) & valid
        pred = pred.astype(jnp.bfloat16)

        def total(x, axes):
            return jnp.sum(x, axes, dtype=jnp.float32).astype(jnp.int32)

        f32 = jnp.float32
        return {
            "unit_inter": jnp.einsum(
                "bpk,bpc->kc", unit, target, preferred_element_type=f32
            ).astype(jnp.int32),
            "unit_area": total(unit, (0, 1)),
            "truth": total(target, (0, 1)),
            "inter": total(pred * target, (0, 1)),
            "predicted": total(pred, (0, 1)),
        }

    return _Steps(
        train=jax.jit(train, in_shardings=(rep, rep, data), out_shardings=rep, donate_argnums=0),
        count=jax.jit(count, in_shardings=(rep, data), out_shardings=rep),
    )


def _batch(data: ProbeData, idx: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """Rows `idx` of the data, padded to `batch_size` rows with `valid` False."""
    pad = batch_size - len(idx)
    rows = np.concatenate([idx, np.zeros(pad, idx.dtype)]) if pad else idx
    return {
        "acts": np.asarray(data.acts[rows], np.float32),
        "pixel_labels": np.asarray(data.pixel_labels[rows], np.int32),
        "image_labels": np.asarray(data.image_labels[rows], np.int32),
        "valid": np.arange(batch_size) < len(idx),
    }


def _counts(steps, params, data, images, batch_size, mesh) -> dict[str, np.ndarray]:
    """int64 totals of the count step over `images`."""
    totals: dict[str, np.ndarray] = {}
    for start in range(0, len(images), batch_size):
        batch = _batch(data, images[start : start + batch_size], batch_size)
        out = jax.device_get(steps.count(params, parallel.put_global_batch(batch, mesh)))
        for key, value in out.items():
            totals[key] = totals.get(key, 0) + np.asarray(value, np.int64)
    return totals


def _unit_iou(counts: dict[str, np.ndarray]) -> np.ndarray:
    """[K, C] set IoU of each unit's mask with each concept."""
    return set_iou(counts["unit_inter"], counts["unit_area"][:, None], counts["truth"])


def _detector_iou(iou: np.ndarray, everywhere: np.ndarray) -> np.ndarray:
    """`iou` [K, C], 0 for the units `everywhere` [K] marks, whose mask covers every pixel (a
    constant unit under the inclusive tie rule): it predicts "everywhere", no detector, as
    the dissection gives it no label; so it is never the best single unit."""
    return np.where(everywhere[:, None], 0.0, iou)


def _best_unit(iou: np.ndarray) -> np.ndarray:
    """int [C]: per concept the unit of the best `iou` [K, C] (the first of equals), or
    `NO_UNIT` where no unit overlaps it (every IoU 0)."""
    return np.where(iou.max(axis=0) > 0, np.argmax(iou, axis=0), NO_UNIT)


def set_iou(inter: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 inter / (a + b - inter), 0 where the union is empty."""
    union = np.asarray(a, np.int64) + np.asarray(b, np.int64) - inter
    return np.divide(inter, union, out=np.zeros(np.shape(inter)), where=union > 0)


def train_concept_vectors(
    data: ProbeData,
    thresholds: np.ndarray,
    concepts: np.ndarray,
    cfg: ProbeConfig = ProbeConfig(),
    *,
    tie_rule: str = "strict",
    mesh: jax.sharding.Mesh | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> ConceptVectors:
    """Train one vector per concept on the training split and score them on the held-out one.

    thresholds [K]: the dissection's (on the same activations); concepts [C]: label numbers.
    `checkpoint_dir`, if given, must be keyed by everything the result depends on (the
    caller's job): a run resumes from the latest checkpoint there. `progress(step, steps,
    loss)` is called after each step.
    """
    check_tie_rule(tie_rule)
    mesh = mesh if mesh is not None else parallel.data_mesh()
    parallel.check_batch_size(cfg.probe_batch_size, mesh, "probe_batch_size")
    k = data.acts.shape[-1]
    thresholds = np.asarray(thresholds, np.float32)
    if thresholds.shape != (k,):
        raise ValueError(f"thresholds have shape {thresholds.shape}, the layer {k} units")
    concepts = np.asarray(concepts, np.int32)
    if concepts.ndim != 1 or len(concepts) == 0 or (concepts <= 0).any():
        raise ValueError("concepts must be a non-empty list of label numbers >= 1")
    sh, sw = data.size
    pixels = len(range(0, sh, cfg.mask_stride)) * len(range(0, sw, cfg.mask_stride))
    if cfg.probe_batch_size * pixels >= F32_EXACT:
        raise ValueError(
            f"probe_batch_size={cfg.probe_batch_size}: {pixels} pixels an image make counts "
            f"inexact; use at most {(F32_EXACT - 1) // pixels} images a batch"
        )
    train_idx, heldout_idx = split_images(len(data.acts), cfg.heldout_fraction, cfg.probe_seed)
    check_batch_fits(cfg, len(data.acts))
    per_epoch = len(train_idx) // cfg.probe_batch_size
    total_steps = per_epoch * cfg.epochs
    steps = _make_steps(cfg, mesh, data.size, thresholds, concepts, tie_rule)
    rep = parallel.replicated(mesh)
    params = jax.device_put(init_params(k, len(concepts)), rep)

    # Training-split counts: the concepts' shares (alpha) and each one's best single unit.
    train_counts = _counts(steps, params, data, train_idx, cfg.probe_batch_size, mesh)
    share = train_counts["truth"] / float(len(train_idx) * pixels)
    alpha = 1.0 - share if cfg.balance else np.full(len(concepts), 0.5)
    train_everywhere = train_counts["unit_area"] == len(train_idx) * pixels
    train_unit_iou = _detector_iou(_unit_iou(train_counts), train_everywhere)
    single_unit = _best_unit(train_unit_iou)

    state = jax.device_put(
        {
            "params": params,
            "opt_state": optimizer(cfg).init(params),
            "losses": jnp.zeros((total_steps,), jnp.float32),
            "step": jnp.zeros((), jnp.int32),
        },
        rep,
    )
    ckpt = StreamCheckpoint(checkpoint_dir, cfg.probe_checkpoint_every) if checkpoint_dir else None
    done = 0
    if ckpt is not None:
        state, done = ckpt.restore(state)
    alpha_dev = jax.device_put(jnp.asarray(alpha, jnp.float32), rep)
    train_s = 0.0
    try:
        for step in range(done, total_steps):
            epoch, offset = divmod(step, per_epoch)
            order = np.random.default_rng(
                np.random.SeedSequence([cfg.probe_seed, epoch])
            ).permutation(train_idx)
            rows = order[offset * cfg.probe_batch_size : (offset + 1) * cfg.probe_batch_size]
            batch = parallel.put_global_batch(_batch(data, rows, cfg.probe_batch_size), mesh)
            t0 = time.perf_counter()
            state = steps.train(state, alpha_dev, batch)
            if progress is not None or ckpt is not None:
                jax.block_until_ready(state)
            train_s += time.perf_counter() - t0
            if ckpt is not None:
                ckpt.maybe_save(step + 1, state, force=step + 1 == total_steps)
            if progress is not None:
                progress(step + 1, total_steps, float(state["losses"][step]))
        jax.block_until_ready(state)
    finally:
        if ckpt is not None:
            ckpt.close()

    params = state["params"]
    held = _counts(steps, params, data, heldout_idx, cfg.probe_batch_size, mesh)
    unit_iou = _unit_iou(held)
    cols = np.arange(len(concepts))
    # Left out of the held-out best: the units covering every pixel of both splits (a unit
    # covering a small held-out set alone is a unit, maybe the single unit, which it bounds).
    everywhere = train_everywhere & (held["unit_area"] == len(heldout_idx) * pixels)
    held_detector_iou = _detector_iou(unit_iou, everywhere)
    best_held = _best_unit(held_detector_iou)
    host = jax.device_get(state)
    return ConceptVectors(
        concepts=concepts,
        weights=np.asarray(host["params"]["w"]),
        bias=np.asarray(host["params"]["b"]),
        alpha=np.asarray(alpha, np.float64),
        train_images=train_idx,
        heldout_images=heldout_idx,
        iou=set_iou(held["inter"], held["predicted"], held["truth"]),
        intersection=held["inter"],
        predicted=held["predicted"],
        truth=held["truth"],
        train_truth=train_counts["truth"],
        single_unit=single_unit,
        single_iou=np.where(single_unit == NO_UNIT, 0.0, unit_iou[single_unit, cols]),
        best_heldout_unit=best_held,
        best_heldout_iou=np.where(best_held == NO_UNIT, 0.0, held_detector_iou[best_held, cols]),
        unit_iou=unit_iou,
        losses=np.asarray(host["losses"]),
        train_s=train_s,
    )


def collect(
    forward: Callable[[np.ndarray], Any],
    source: Any,
    batch_size: int = 32,
    directory: str | os.PathLike[str] | None = None,
    categories: Sequence[str] | None = None,
) -> tuple[ProbeData, float]:
    """(ProbeData of every image of `source`, seconds spent in `forward` after compiling it):
    `forward` maps a batch of images to the layer's activations (`finished.layer_forward`).

    directory: where the arrays are written as .npy files and memory-mapped, so that a
      full Broden's (tens of GB) needs no memory; None: in memory. Label numbers outside
      [1, num_labels), which no mask counts, are stored as 0 (none), so that labels fit
      uint16 where the label space allows.
    categories: the categories whose labels are read (None: all), as the dissection reads
      them: a label listed in two categories keeps only the pixels of those selected.
    """
    n, (sh, sw) = len(source), source.seg_size
    num_labels = source.labels.num_labels
    label_dtype = np.int32 if num_labels > 1 << 16 else np.uint16

    def known(ids) -> np.ndarray:
        ids = np.asarray(ids)
        return np.where((ids > 0) & (ids < num_labels), ids, 0)

    def alloc(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
        if directory is None:
            return np.zeros(shape, dtype)
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, f"{name}.npy")
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    planes = alloc("pixel_labels", (n, source.max_planes, sh, sw), label_dtype)
    image_labels = alloc("image_labels", (n, source.max_image_labels), label_dtype)
    acts, forward_s = None, 0.0
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        images = np.stack([np.asarray(source.read_image(i)) for i in idx])
        if start == 0:
            jax.block_until_ready(forward(images))  # compiled outside the timing
        t0 = time.perf_counter()
        out = np.asarray(forward(images))
        forward_s += time.perf_counter() - t0
        if acts is None:
            acts = alloc("acts", (n, *out.shape[1:]), out.dtype)
        acts[start : start + len(idx)] = out
        for i in idx:
            p, q = (
                source.read_labels(i) if categories is None else source.read_labels(i, categories)
            )
            planes[i, : p.shape[0]] = known(p)
            image_labels[i, : len(q)] = known(q)
    if acts is None:
        raise ValueError("source: no images to collect")
    return ProbeData(acts, planes, image_labels), forward_s

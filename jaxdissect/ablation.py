"""Unit ablation against class accuracy (Bau et al., PNAS 2020, "the role of individual units").

A classifier's layer has K units. Zeroing one unit (or setting it to its mean
activation) changes each class's accuracy; the drop ranks the units by their
importance to the class. Removing a class's top-N units together then shows
whether the class depends on a few units while the other classes barely move.

`Ablator` compiles one step: for a batch of M unit masks [M, K] and a batch of
images it returns the per-class correct counts [M, C] (exact integers) of the
network with each mask's units ablated (`interventions.ablate`), vmapped over
the masks. The layer's output on each batch is captured once; in the step it
replaces the computed output, so XLA drops the layers before it as dead code
and only the layers after the ablated one run, M times. The captured outputs of
all evaluation images stay on the devices for the whole call (1,000 images of a
7x7x512 layer: 100 MB in float32). The images are sharded over the `data` mesh like
`evaluate.Evaluator`; the counts are summed over devices by XLA.

At a token layer ([B, tokens, K]) a unit is set in every token, class and register
tokens too (a head that reads the class token would not see an ablation of the patches
alone), and its mean (`unit_means`) is over those same tokens, so that the mean fill
keeps the layer's average output; the dissection labels the unit by its patch tokens.

`ablation_study` evaluates every single-unit ablation and the top-N curves and
writes them (`ablation_files.write_ablation_files`); its chunks of masks are stored under
`.work/` so that a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from jaxdissect import driver, interventions, parallel, store
from jaxdissect.evaluate import NO_LOGITS, class_accuracy

# Ablated values: zero, or each unit's mean activation over the evaluation images.
ZERO, MEAN = interventions.ZERO, "mean"
VALUES = (ZERO, MEAN)
# Unit masks per compiled call (the layers after the ablated one run this many times a batch).
DEFAULT_MASKS_PER_CALL = 32
# N of the top-N curves: powers of two up to the layer's width.
DEFAULT_TOP_N = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


def check_value(value: str) -> str:
    if value not in VALUES:
        raise ValueError(f"value={value!r}: use one of {', '.join(VALUES)}")
    return value


# The examples' losses [M, B]: masks whole, examples split over the devices.
EXAMPLES = jax.sharding.PartitionSpec(None, parallel.AXIS)


class Ablator:
    """Per-class correct counts of `module` with unit masks applied at module `path`.

    Args:
      module: a Linen classifier `module.apply(variables, images) -> logits [B, C]`.
      input_spec: normalises 0..255 images (`preprocess.InputSpec`), or None.
      path: the module path (or alias) of the layer whose units are ablated.
      apply_kwargs: extra keyword arguments of `module.apply` (e.g. `train=False`).
      mesh: the `data` mesh (default: every device).
    """

    def __init__(
        self,
        module: nn.Module,
        input_spec: Any,
        path: str,
        *,
        apply_kwargs: Mapping[str, Any] | None = None,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.module, self.input_spec, self.path = module, input_spec, path
        self.apply_kwargs = dict(apply_kwargs or {})
        self.mesh = mesh or parallel.data_mesh()
        repl, data = parallel.replicated(self.mesh), parallel.sharded(self.mesh)
        self._step = jax.jit(
            self._device_sums,
            static_argnums=(5,),
            in_shardings=(repl, repl, repl, data, data),
            out_shardings=(data, jax.sharding.NamedSharding(self.mesh, EXAMPLES)),
        )
        self._tap: Any = None

    def _input(self, images: jax.Array) -> jax.Array:
        return self.input_spec(images) if self.input_spec is not None else images

    def _layer_step(self, variables: Any, images: Any) -> Callable[[Any, jax.Array], jax.Array]:
        """The jitted capture of the layer's output (built once, on the first images)."""
        if self._tap is None:
            from jaxdissect import capture

            # The network's input is the images after `input_spec` (resized to its size).
            shape = jax.eval_shape(self._input, jax.ShapeDtypeStruct(images.shape, images.dtype))
            tap = capture.make_tap(
                self.module,
                variables,
                [self.path],
                input_shape=tuple(shape.shape[1:]),
                apply_kwargs=self.apply_kwargs,
            )
            layer = tap.layers[0]
            data = parallel.sharded(self.mesh)
            self._tap = jax.jit(
                lambda v, x: tap.outputs(v, self._input(x))[layer],
                in_shardings=(parallel.replicated(self.mesh), data),
                out_shardings=data,
            )
        return self._tap

    def _device_sums(
        self,
        variables: Any,
        masks: jax.Array,
        fill: jax.Array | None,
        batch: Mapping[str, jax.Array],
        acts: jax.Array,
        num_classes: int,
    ) -> tuple[jax.Array, jax.Array]:
        """Per mask ([M, K]): correct examples of each class over each device's rows,
        stacked [devices, M, C] and summed on the host, and every example's cross-entropy
        [M, B] (0 for padding rows), which the host sums by class in float64 in image order
        (the same sums on any number of devices and batch size where the examples' losses
        are: XLA may round them differently at another batch per device).

        No collective: on the CPU backend a device's part of a program that waits in an
        all-reduce holds one of the few execution threads, so several batches' steps in
        flight could each hold one while the parts they wait for find none (a deadlock).
        """

        def local(variables, masks, fill, batch, acts):
            labels, targets, valid = batch["label"], batch["target"], batch["valid"]
            onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.int32)

            def one(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
                rule = _Cached(acts, interventions.Ablate(mask, ZERO if fill is None else fill))
                net = interventions.intervene(self.module, {self.path: rule})
                logits = net.apply(variables, self._input(batch["image"]), **self.apply_kwargs)
                correct = (jnp.argmax(logits, -1) == targets) & valid
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
                loss = jnp.where(valid, loss, 0.0).astype(jnp.float32)
                return jnp.sum(onehot * correct[:, None].astype(jnp.int32), 0), loss

            correct, loss = jax.vmap(one)(masks)
            return correct[None], loss

        whole, rows = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(parallel.AXIS)
        return driver.partial_shard_map(
            local,
            mesh=self.mesh,
            in_specs=(whole, whole, whole, rows, rows),
            out_specs=(rows, EXAMPLES),
        )(variables, masks, fill, batch, acts)

    def counts(
        self,
        variables: Any,
        batches: Sequence[Mapping[str, np.ndarray]],
        masks: np.ndarray,
        *,
        num_classes: int,
        fill: np.ndarray | None = None,
        masks_per_call: int = DEFAULT_MASKS_PER_CALL,
    ) -> np.ndarray:
        """int64 [M, C]: correct examples of each class with each mask's units ablated.

        `masks`: bool [M, K]; `fill`: None (zero) or float [K], the replacement values.
        A batch's `label` is its examples' class (0..C-1), which the counts are summed by;
        an example is correct when the top-1 logit is its `target` (default: its label).
        """
        return self.counts_and_loss(
            variables,
            batches,
            masks,
            num_classes=num_classes,
            fill=fill,
            masks_per_call=masks_per_call,
        )[0]

    def counts_and_loss(
        self,
        variables: Any,
        batches: Sequence[Mapping[str, np.ndarray]],
        masks: np.ndarray,
        *,
        num_classes: int,
        fill: np.ndarray | None = None,
        masks_per_call: int = DEFAULT_MASKS_PER_CALL,
    ) -> tuple[np.ndarray, np.ndarray]:
        """`counts`, and float64 [M, C]: the summed cross-entropy of each class's examples.
        Each batch's size must split over the mesh's devices (`evaluate.batch_size_for`)."""
        masks = np.asarray(masks, bool)
        if masks.ndim != 2:
            raise ValueError(f"masks has shape {masks.shape}; it must be [M, K] bool")
        if masks_per_call < 1:
            raise ValueError(f"masks_per_call={masks_per_call} must be >= 1")
        variables = parallel.replicate(variables, self.mesh)
        fill_dev = None if fill is None else jnp.asarray(fill, jnp.float32)
        out = np.zeros((len(masks), num_classes), np.int64)
        losses = np.zeros((len(masks), num_classes), np.float64)
        fields = [_eval_fields(b) for b in batches]
        for f in fields:
            parallel.check_batch_size(len(f["label"]), self.mesh)
        put = [parallel.put_global_batch(f, self.mesh) for f in fields]
        # The layer's output once per batch: in the step it replaces the computed one, so XLA
        # drops the layers before it as dead code and only those after run once per mask.
        acts = [self._layer_step(variables, b["image"])(variables, b["image"]) for b in put]
        for start in range(0, len(masks), masks_per_call):
            chunk = masks[start : start + masks_per_call]
            # The last chunk is padded to the compiled size with empty masks.
            padded = np.zeros((min(masks_per_call, len(masks)), masks.shape[1]), bool)
            padded[: len(chunk)] = chunk
            sums = []
            for batch, act in zip(put, acts, strict=True):
                sums.append(self._step(variables, padded, fill_dev, batch, act, num_classes))
            done = slice(start, start + len(chunk))
            for f, (correct, loss) in zip(fields, parallel.gather_to_host(sums), strict=True):
                out[done] += np.asarray(correct, np.int64).sum(0)[: len(chunk)]
                # [M, B] -> [M, C]: each class's examples' losses in float64, in image order.
                rows = np.flatnonzero(f["valid"])
                per_example = np.asarray(loss, np.float64)[: len(chunk), rows]
                for m, row in enumerate(per_example):
                    losses[start + m] += np.bincount(
                        f["label"][rows], weights=row, minlength=num_classes
                    )
        return out, losses


@flax.struct.dataclass
class _Cached:
    """The layer's output replaced by `acts` (the module's output on these images, captured
    before), then `ablation` applied: what precedes the layer becomes dead code."""

    acts: Any
    ablation: interventions.Ablate

    def __call__(self, y: jax.Array) -> jax.Array:
        return self.ablation(jnp.reshape(self.acts, y.shape).astype(y.dtype))


def _eval_fields(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = len(batch["label"])
    return {
        "image": batch["image"],
        "label": np.asarray(batch["label"], np.int32),
        "target": np.asarray(batch.get("target", batch["label"]), np.int32),
        "valid": np.asarray(batch.get("valid", np.ones(n, bool)), bool),
    }


# --------------------------------------------------------------------------- predictions task

# The class of the images whose intact prediction is none of the K most frequent ones.
OTHER = "other"


@dataclasses.dataclass(frozen=True)
class PredictionTask:
    """The intact network's own decisions as the task, for a network without a labelled one.

    An image's target is the intact network's top-1 logit; "accuracy" under ablation is
    agreement with the intact network (the top-1 stays the same), not accuracy.

    Attributes:
      classes: int64 [K]: the logit indices of the K most frequent intact predictions, by
        decreasing frequency (ties by index).
      prediction: int64 [N]: the intact top-1 of each image (the targets).
      label: int32 [N]: each image's class: i for `classes[i]`, K for the rest (`OTHER`).
      class_names: the classes' names (`logit_names` of `classes`, and `OTHER` if any rest).
    """

    classes: np.ndarray
    prediction: np.ndarray
    label: np.ndarray
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def intact_disagreement(result: AblationResult) -> str | None:
    """Under the predictions task, where the N = 0 row disagrees with the targets (the
    intact top-1, from another compiled program: a near-tied top-1 can round otherwise),
    what to warn of; None where it agrees on every image."""
    kept, total = int(result.base.sum()), int(result.total.sum())
    if kept == total:
        return None
    return (
        f"N = 0 agrees with the intact network's top-1 on {kept} of {total} images: the "
        "task's targets and the ablation come from two compiled programs, which rounded "
        "near-tied top-1 logits differently; the drops are measured from the N = 0 row"
    )


def read_logit_names(path: str | pathlib.Path) -> tuple[str, ...]:
    """Class names from a text file, one a line in logit order (blank lines at its end
    ignored; a blank line between names is refused, naming it)."""
    try:
        lines = pathlib.Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); one class name a line") from e
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines):
        if not line.strip():
            raise ValueError(f"{path}: line {i + 1} is blank; one class name a line")
    return tuple(line.strip() for line in lines)


def prediction_task(
    logits: np.ndarray, top_classes: int, *, logit_names: Sequence[str] | None = None
) -> PredictionTask:
    """The `PredictionTask` of the intact network's `logits` [N, L] on the evaluation images,
    its classes the `top_classes` most frequent predictions (those that occur), named by
    `logit_names` (default `logit<i>`)."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or not len(logits):
        raise ValueError(f"logits has shape {logits.shape}; it must be [images >= 1, logits]")
    if not logits.shape[1]:
        raise ValueError(NO_LOGITS)
    if top_classes < 1:
        raise ValueError(f"top_classes={top_classes}: must be >= 1")
    prediction = np.argmax(logits, -1).astype(np.int64)
    freq = np.bincount(prediction, minlength=logits.shape[1])
    order = np.lexsort((np.arange(len(freq)), -freq))
    classes = order[: min(top_classes, int((freq > 0).sum()))].astype(np.int64)
    rank = np.full(len(freq), len(classes), np.int32)
    rank[classes] = np.arange(len(classes), dtype=np.int32)
    label = rank[prediction]
    names = [f"logit{i}" for i in range(logits.shape[1])] if logit_names is None else logit_names
    if len(names) != logits.shape[1]:
        raise ValueError(
            f"logit_names has {len(names)} names for the network's {logits.shape[1]} logits"
        )
    class_names = [names[int(c)] for c in classes]
    if (label == len(classes)).any():
        class_names.append(OTHER)
    return PredictionTask(classes, prediction, label, tuple(class_names))


def prediction_batches(
    images: np.ndarray, task: PredictionTask, batch_size: int
) -> list[dict[str, np.ndarray]]:
    """Fixed-shape float32 batches of `images` (those `task` was made from, in order) with
    their class (`label`) and intact top-1 (`target`); the last padded (`valid` False)."""
    from jaxdissect import scenes

    n = len(task.label)
    if len(images) != n:
        raise ValueError(f"{len(images)} images for the task's {n} predictions")
    split = scenes.SceneSplit(images, task.label, np.arange(n, dtype=np.int64))
    out = scenes.eval_batches(split, batch_size, dtype="float32")
    for start, batch in zip(range(0, n, batch_size), out, strict=True):
        target = np.zeros(batch_size, np.int32)
        target[: min(batch_size, n - start)] = task.prediction[start : start + batch_size]
        batch["target"] = target
    return out


def class_totals(batches: Iterable[Mapping[str, np.ndarray]], num_classes: int) -> np.ndarray:
    """int64 [C]: valid examples of each class in `batches`."""
    total = np.zeros(num_classes, np.int64)
    for b in batches:
        f = _eval_fields(b)
        labels = f["label"][f["valid"]]
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise ValueError(
                f"labels {sorted(set(bad.tolist()))} outside 0..{num_classes - 1} "
                f"(the classifier's {num_classes} classes)"
            )
        total += np.bincount(labels, minlength=num_classes)
    return total


def unit_means(
    module: nn.Module,
    variables: Any,
    path: str,
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    input_spec: Any,
    input_size: int,
    apply_kwargs: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """float64 [K]: each unit's mean activation over the valid images and all positions
    (of a token layer: every token, class and register tokens too, as `Ablate` sets)."""
    from jaxdissect import capture

    tap = capture.make_tap(
        module,
        variables,
        [path],
        input_shape=(input_size, input_size, 3),
        apply_kwargs=apply_kwargs,
    )
    layer = tap.layers[0]

    @jax.jit
    def sums(v: Any, images: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = input_spec(images) if input_spec is not None else images
        y = tap.outputs(v, x)[layer].astype(jnp.float32)
        y = y.reshape(y.shape[0], -1, y.shape[-1])
        w = valid.astype(jnp.float32)[:, None, None]
        return jnp.sum(y * w, (0, 1)), jnp.sum(w) * y.shape[1]

    total, count = None, 0.0
    for b in batches:
        f = _eval_fields(b)
        s, c = sums(tap.variables, f["image"], f["valid"])
        s = np.asarray(s, np.float64)
        total = s if total is None else total + s
        count += float(c)
    if total is None or count == 0:
        raise ValueError("unit means need at least one valid image")
    return total / count


# --------------------------------------------------------------------------- importance


# Decimal places of a class's mean cross-entropy rise that break ties of accuracy drop:
# an example's float32 loss may differ in its last bits with the batch it ran in.
RISE_DECIMALS = 5


def ranking(drop: np.ndarray, loss_rise: np.ndarray | None = None) -> np.ndarray:
    """int64 [C, K]: per class, units by decreasing accuracy drop (`drop` [K, C]); ties by
    decreasing rise of the class's mean loss (`loss_rise` [K, C], if given) rounded to
    `RISE_DECIMALS` places, then by unit. The rises are float64 sums in image order of the
    examples' float32 losses (`counts_and_loss`); the rounding makes rises within float32
    noise of each other (units whose removal changes nothing: a rise of +-1e-7) equal, so
    that their order is the units'. An example's loss may differ in its last bits at
    another batch per device (XLA), so a rise near a rounding boundary can fall the other
    side there."""
    drop = np.nan_to_num(np.asarray(drop, np.float64), nan=-np.inf)
    rise = np.zeros_like(drop) if loss_rise is None else np.asarray(loss_rise, np.float64)
    rise = np.nan_to_num(np.round(rise, RISE_DECIMALS) + 0.0, nan=-np.inf)  # -0.0 -> 0.0
    k = drop.shape[0]
    units = np.broadcast_to(np.arange(k)[:, None], drop.shape)
    # lexsort sorts by the last key first, along the last axis: transpose to [C, K].
    return np.lexsort((units.T, -rise.T, -drop.T), axis=-1)


def top_n_masks(order: np.ndarray, ns: Sequence[int]) -> np.ndarray:
    """bool [C, len(ns), K]: per class, its first N units of `order` ([C, K]) for each N."""
    c, k = order.shape
    masks = np.zeros((c, len(ns), k), bool)
    for i, n in enumerate(ns):
        rows = np.repeat(np.arange(c), min(n, k))
        masks[rows, i, order[:, :n].reshape(-1)] = True
    return masks


def top_ns(num_units: int, wanted: Sequence[int] = DEFAULT_TOP_N) -> list[int]:
    """The N of the curves: `wanted` up to `num_units` (each at least 1)."""
    bad = [n for n in wanted if n < 1]
    if bad:
        raise ValueError(f"top_n={bad}: each N must be >= 1")
    return sorted({int(n) for n in wanted if n <= num_units}) or [num_units]


def others_mean(acc: np.ndarray, cls: int) -> float:
    """Mean accuracy of the classes other than `cls` (those with examples)."""
    rest = np.delete(np.asarray(acc, np.float64), cls)
    rest = rest[~np.isnan(rest)]
    return float(rest.mean()) if rest.size else float("nan")


# --------------------------------------------------------------------------- the study


@dataclasses.dataclass(frozen=True)
class AblationResult:
    """Counts of one ablation study of a layer.

    Attributes:
      total: int64 [C], examples of each class.
      base: int64 [C], correct examples of the intact network.
      single: int64 [K, C], correct examples with unit k alone ablated.
      ns: the N of the top-N curves.
      top: int64 [C, len(ns), C], correct examples of every class with class c's top N ablated.
      order: int64 [C, K], units of each class by decreasing accuracy drop (`ranking`).
      value: 'zero' or 'mean'.
      base_loss, single_loss: float64 [C] and [K, C], summed cross-entropy per class.
    """

    total: np.ndarray
    base: np.ndarray
    single: np.ndarray
    ns: tuple[int, ...]
    top: np.ndarray
    order: np.ndarray
    value: str
    base_loss: np.ndarray | None = None
    single_loss: np.ndarray | None = None

    @property
    def loss_rise(self) -> np.ndarray | None:
        """float64 [K, C]: mean cross-entropy of each class with unit k ablated minus intact."""
        if self.base_loss is None or self.single_loss is None:
            return None
        n = np.maximum(self.total, 1)
        return self.single_loss / n - (self.base_loss / n)[None, :]

    @property
    def drop(self) -> np.ndarray:
        """float64 [K, C]: accuracy of the intact network minus with unit k ablated."""
        return class_accuracy(self.base, self.total)[None, :] - class_accuracy(
            self.single, self.total
        )

    def curve(self, cls: int) -> tuple[np.ndarray, np.ndarray]:
        """(class accuracy, others' mean accuracy) at N = 0 and each N of `ns`."""
        base = class_accuracy(self.base, self.total)
        own = [base[cls]] + [
            class_accuracy(self.top[cls, i], self.total)[cls] for i in range(len(self.ns))
        ]
        rest = [others_mean(base, cls)] + [
            others_mean(class_accuracy(self.top[cls, i], self.total), cls)
            for i in range(len(self.ns))
        ]
        return np.asarray(own), np.asarray(rest)


def _chunked(
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    masks: np.ndarray,
    work: pathlib.Path | None,
    name: str,
    chunk: int,
) -> tuple[np.ndarray, np.ndarray]:
    """run(masks) in chunks of `chunk` masks, each stored in `work` with the hash of its
    masks and reused only for the same masks (other top N, chunk size or ranking: run)."""
    correct, loss = [], []
    for i, start in enumerate(range(0, len(masks), chunk)):
        part = masks[start : start + chunk]
        path = None if work is None else work / f"{name}-{i:05d}.npz"
        digest = None if path is None else store.fingerprint_tree(part)
        if path is not None and path.is_file():
            try:
                stored = store.load_arrays(path)
            except ValueError:  # unreadable: evaluated again
                stored = {}
            if "masks" in stored and str(stored["masks"]) == digest:
                correct.append(stored["correct"])
                loss.append(stored["loss"])
                continue
        c, l_ = run(part)
        if path is not None:
            store.save_arrays(path, {"correct": c, "loss": l_, "masks": np.asarray(digest)})
        correct.append(c)
        loss.append(l_)
    return np.concatenate(correct), np.concatenate(loss)


def ablation_study(
    ablator: Ablator,
    variables: Any,
    batches: Sequence[Mapping[str, np.ndarray]],
    *,
    num_units: int,
    num_classes: int,
    value: str = ZERO,
    fill: np.ndarray | None = None,
    ns: Sequence[int] = DEFAULT_TOP_N,
    work_dir: str | pathlib.Path | None = None,
    masks_per_call: int = DEFAULT_MASKS_PER_CALL,
    chunk: int = 256,
) -> AblationResult:
    """Every single-unit ablation, then each class's top-N units ablated together.

    With `work_dir`, each chunk of `chunk` masks is stored there as it finishes, with
    the hash of its masks, and reused for the same masks only (the caller keys the folder
    by model, layer, data and value; the masks carry the rest: N, chunk size, ranking).
    """
    check_value(value)
    if (value == MEAN) != (fill is not None):
        raise ValueError("value='mean' needs fill (the unit means); value='zero' takes none")
    ns = tuple(top_ns(num_units, ns))
    work = None if work_dir is None else pathlib.Path(work_dir)
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    total = class_totals(batches, num_classes)
    if not total.sum():
        raise ValueError("batches hold no evaluation example: no accuracy to ablate")

    def run(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ablator.counts_and_loss(
            variables,
            batches,
            masks,
            num_classes=num_classes,
            fill=fill,
            masks_per_call=masks_per_call,
        )

    # Row 0: no unit ablated (the intact network, through the same compiled step).
    singles = np.concatenate([np.zeros((1, num_units), bool), np.eye(num_units, dtype=bool)])
    got, loss = _chunked(run, singles, work, "single", chunk)
    empty = np.zeros((0,), np.int64)
    result = AblationResult(
        total, got[0], got[1:], ns, empty, empty, value, base_loss=loss[0], single_loss=loss[1:]
    )
    order = ranking(result.drop, result.loss_rise)
    masks = top_n_masks(order, ns).reshape(-1, num_units)
    logging.info("ablating the top %s units of each of %d classes", list(ns), num_classes)
    top = _chunked(run, masks, work, "top", chunk)[0].reshape(num_classes, len(ns), num_classes)
    return dataclasses.replace(result, top=top, order=order)

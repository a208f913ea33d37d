"""One sharded classifier evaluator: overall and per-class accuracy, and the summed loss.

`Evaluator(apply_fn, mesh)` compiles one `jax.jit` step over the `data` mesh
(`jaxdissect.parallel`): the batch is sharded over devices, the variables
replicated. Per class it counts the examples and the correct ones (exact
integers, summed over devices by XLA), and it sums the cross-entropy. Batches
are dicts of `image`, `label` and `valid` (False for the padding of a partial
last batch), e.g. `scenes.eval_batches` of a scene task or of a TFDS
classification build; `apply_fn(variables, images) -> logits` may run an
intervened network (`jaxdissect.interventions`), whose rules travel in
`variables` so that one compilation serves them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdissect import parallel

# Images per batch when a caller has no batch size of its own (rounded up to the devices).
DEFAULT_BATCH_SIZE = 64
# A network built without a head (`num_classes=0`) has no logits to score: its output is
# the pooled features (a ResNet's, a ViT's), which an argmax would read as classes.
NO_LOGITS = (
    "the network outputs no logits (num_classes=0 builds no head: its output is the pooled "
    "features): accuracy and predictions need a classifier; give --num_classes of its head"
)


def check_has_logits(module: Any) -> None:
    """Raise ValueError(`NO_LOGITS`) for a module built without a head (`num_classes=0`)."""
    if getattr(module, "num_classes", None) == 0:
        raise ValueError(NO_LOGITS)


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Counts of one evaluation.

    Attributes:
      correct: int64 [C], correctly classified examples of each class.
      total: int64 [C], examples of each class.
      loss: summed cross-entropy of the examples.
      logits: float32 [N, C] of the examples in order, when asked for.
    """

    correct: np.ndarray
    total: np.ndarray
    loss: float
    logits: np.ndarray | None = None

    @property
    def count(self) -> int:
        return int(self.total.sum())

    @property
    def accuracy(self) -> float:
        """Correct / examples (0.0 without examples)."""
        return int(self.correct.sum()) / max(1, self.count)

    @property
    def mean_loss(self) -> float:
        return self.loss / max(1, self.count)

    @property
    def per_class_accuracy(self) -> np.ndarray:
        """float64 [C]: correct / examples of each class, NaN for a class without examples."""
        return class_accuracy(self.correct, self.total)


def class_accuracy(correct: np.ndarray, total: np.ndarray) -> np.ndarray:
    """correct / total per class (NaN for a class without examples); broadcasts over rows."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1), np.nan)


def batch_size_for(mesh: jax.sharding.Mesh, wanted: int | None = None) -> int:
    """`wanted` (default `DEFAULT_BATCH_SIZE`) rounded up to a multiple of the mesh's devices."""
    n = int(mesh.devices.size)
    wanted = DEFAULT_BATCH_SIZE if wanted is None else wanted
    if wanted < 1:
        raise ValueError(f"batch_size={wanted} must be >= 1")
    return -(-wanted // n) * n


class Evaluator:
    """Evaluates a classifier `apply_fn(variables, images) -> logits [B, C]` over batches.

    Args:
      apply_fn: pure; the input normalisation belongs inside it.
      mesh: the `data` mesh (default: every device).
    """

    def __init__(
        self,
        apply_fn: Callable[[Any, jax.Array], jax.Array],
        mesh: jax.sharding.Mesh | None = None,
    ):
        self.apply_fn = apply_fn
        self.mesh = mesh or parallel.data_mesh()
        repl, data = parallel.replicated(self.mesh), parallel.sharded(self.mesh)
        self.step = jax.jit(
            self._step, in_shardings=(repl, data), out_shardings=({"logits": data}, repl)
        )

    def _step(
        self, variables: Any, batch: Mapping[str, jax.Array]
    ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        logits = self.apply_fn(variables, batch["image"])
        if not logits.shape[-1]:
            raise ValueError(NO_LOGITS)
        labels, valid = batch["label"], batch["valid"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = (jnp.argmax(logits, -1) == labels) & valid
        onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.int32)
        counts = {
            "loss": jnp.sum(jnp.where(valid, loss, 0.0)),
            "correct": jnp.sum(onehot * correct[:, None].astype(jnp.int32), 0),
            "total": jnp.sum(onehot * valid[:, None].astype(jnp.int32), 0),
            "count": jnp.sum(valid.astype(jnp.int32)),
        }
        return {"logits": logits}, counts

    def __call__(
        self,
        variables: Any,
        batches: Iterable[Mapping[str, np.ndarray]],
        *,
        logits: bool = False,
    ) -> Evaluation:
        """Counts over `batches` (each of a size divisible by the devices); logits if asked."""
        variables = parallel.replicate(variables, self.mesh)
        correct = total = None
        loss, count = 0.0, 0
        kept: list[np.ndarray] = []
        for i, batch in enumerate(batches):
            n = len(batch["label"])
            parallel.check_batch_size(n, self.mesh)
            valid = np.asarray(batch.get("valid", np.ones(n, bool)), bool)
            put = {"image": batch["image"], "label": batch["label"], "valid": valid}
            outs, sums = self.step(variables, parallel.put_global_batch(put, self.mesh))
            sums = jax.device_get(sums)
            if correct is None:
                correct = np.zeros_like(sums["correct"], np.int64)
                total = np.zeros_like(sums["total"], np.int64)
            correct += sums["correct"]
            total += sums["total"]
            loss += sums["loss"].item()
            count += int(sums["count"])
            if int(total.sum()) != count:
                labels = np.asarray(batch["label"])[valid]
                bad = sorted(set(labels[(labels < 0) | (labels >= len(total))].tolist()))
                raise ValueError(
                    f"batch {i} has labels {bad} outside 0..{len(total) - 1} (the classifier's "
                    f"{len(total)} classes)"
                )
            if logits:
                kept.append(np.asarray(parallel.gather_to_host(outs["logits"]))[valid])
        if correct is None or total is None:  # no batch: no example, no class
            correct = total = np.zeros(0, np.int64)
        return Evaluation(
            correct=correct,
            total=total,
            loss=loss,
            logits=(np.concatenate(kept) if kept else np.zeros((0, len(total)), np.float32))
            if logits
            else None,
        )

"""A training run's state checkpoints (orbax): when they are saved and kept, and in each
one's metadata the metrics rows logged up to its step (a resumed run goes on from them, not
from metrics.csv as it finds it) and the train metrics of the steps taken since the last
row (so that its next row averages them too). Each is verified against the digest written
beside it (`checkpoint.save`): a damaged one is deleted and the run resumes from the
one before."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jaxdissect import checkpoint

# A train step's metrics, and the checkpoint metadata holding those of the steps a
# checkpoint's state has taken since the last row (so a resumed run's next row averages them).
STEP_METRICS = ("loss", "accuracy")
PENDING_METADATA = "unlogged_train_metrics"
# The checkpoint metadata holding the metrics rows logged up to its step.
ROWS_METADATA = "logged_rows"


def checkpoint_manager(directory: pathlib.Path, config: Any) -> Any:
    """The orbax manager of a run's checkpoints: saved every `config.checkpoint_every`
    steps and at `config.save_steps`, the latest `config.keep_checkpoints` and the save
    steps kept."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import checkpoint_managers as policies

    save = [policies.FixedIntervalPolicy(config.checkpoint_every)]
    keep: list[Any] = [policies.LatestN(config.keep_checkpoints)]
    if config.save_steps:
        save.append(policies.SpecificStepsPolicy(config.save_steps))
        keep.append(policies.CustomSteps(config.save_steps))
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy(save),
        preservation_policy=policies.AnyPreservationPolicy(keep),
        # Synchronous: once `save` returns, a kill cannot lose that step.
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    return checkpoint.open_manager(directory.absolute(), options, "start the run again")


def save_state(
    manager: Any,
    state: Any,
    rows: Sequence[Mapping[str, float]],
    pending: Sequence[Mapping[str, Any]] = (),
    force: bool = False,
) -> bool:
    """Save `state` with `rows`, the metrics rows logged up to its step, `pending`, the
    train metrics of its steps not yet in a row, and its digest."""
    step = int(jax.device_get(state.step))
    if step in manager.all_steps():
        return False
    got = jax.device_get(list(pending))
    metadata = {
        ROWS_METADATA: [{key: float(value) for key, value in row.items()} for row in rows],
        PENDING_METADATA: {key: [float(m[key]) for m in got] for key in STEP_METRICS},
    }
    return checkpoint.save(
        manager, step, state, extra=metadata, force=force, custom_metadata=metadata
    )


def _metadata(manager: Any, step: int) -> dict[str, Any]:
    """What `save_state` kept in `step`'s metadata (and its digest covers)."""
    custom = manager.metadata(step).custom_metadata or {}
    return {key: custom[key] for key in (ROWS_METADATA, PENDING_METADATA) if key in custom}


def restore_rows(manager: Any, step: int) -> list[dict[str, float]]:
    """The metrics rows `save_state` kept with `step`'s checkpoint."""
    return [dict(row) for row in _metadata(manager, step).get(ROWS_METADATA, [])]


def restore_pending(manager: Any, step: int) -> list[dict[str, np.ndarray]]:
    """The train metrics `save_state` kept with `step`'s checkpoint."""
    unlogged = _metadata(manager, step).get(PENDING_METADATA, {})
    values = [unlogged.get(key, []) for key in STEP_METRICS]
    return [
        {key: np.float32(v) for key, v in zip(STEP_METRICS, row, strict=True)}
        for row in zip(*values, strict=True)
    ]


def restore_state(manager: Any, template: Any) -> Any:
    """The latest intact checkpoint's state (shaped and sharded as `template`), or None;
    damaged ones after it are deleted with a warning."""
    for step in sorted(manager.all_steps(), reverse=True):
        state = checkpoint.verified_restore(
            manager,
            step,
            template,
            extra=lambda step=step: _metadata(manager, step),
            what=f"the checkpoint of step {step}",
            then="resuming from the one before it",
        )
        if state is not None:
            return state
    return None

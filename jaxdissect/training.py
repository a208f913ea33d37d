"""Train a classifier on a Broden's scene labels: the offline training task of the experiments.

The task (classes, splits, batches) is `jaxdissect.scenes`'s. Training is data parallel over a 1-D
`data` mesh (`jaxdissect.parallel`): the global batch is sharded over
devices, the state replicated, and one `jax.jit` step runs SPMD, so BatchNorm
statistics are those of the global batch on any device count.

Output directory of `train`:
  settings.json          the `TrainConfig`, data and model description
  metrics.csv            a row every `log_every` steps and at every evaluation: step, epoch
                         (step x batch / train images), learning_rate (the rate of the
                         row's step), train_loss and train_accuracy (means over the steps
                         since the previous row), val_loss and val_accuracy (where evaluated)
  summary.json           final validation accuracy, the kept steps and their accuracies
  training.png           loss and accuracy curves
  checkpoints/<step>/    orbax `CheckpointManager`: full state (step, params, BatchNorm
                         statistics, optimiser state; in its metadata, the train loss and
                         accuracy of the steps since the last row) every `checkpoint_every`
                         steps (the latest `keep_checkpoints` kept) and at every `save_steps`
                         (all kept)
  weights/step_<N>/      each kept step's variables in `models/convert.py`'s layout, loadable
                         by `models.load.load(meta["arch"], weights=dir, ...)` and
                         `load_trained(dir)`; meta.json holds the step and val accuracy

Running `train` again on the same directory resumes from the latest checkpoint:
the data order is a pure function of (seed, step) (grain's random-access
shuffle), so a resumed run sees the same batches and dropout keys, and ends
with the same parameters as an uninterrupted one. The last step's checkpoint is saved
after summary.json, so a run killed before its summary resumes from an earlier step.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct

from jaxdissect import code_keys, config, evaluate, parallel, store, training_checkpoints
from jaxdissect.models.convert import META_FILE, read_meta, save_variables
from jaxdissect.models.load import INIT_COMPILER_OPTIONS
from jaxdissect.preprocess import InputSpec
from jaxdissect.scenes import SceneSplit, SceneTask, eval_batches, train_batches

# Architectures `train` knows: the zoo's, and the small CNN (not in the zoo: a
# `package.module:attr` name, which is also what `models.load.load` accepts).
SMALL_CNN = "jaxdissect.models.small_cnn:small_cnn"
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")
SETTINGS_FILE = "settings.json"
METRICS_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "training.png"
CHECKPOINT_DIR = "checkpoints"
WEIGHTS_DIR = "weights"


def model_name(arch: str) -> str:
    """The name `models.load.load` takes for `arch` (`small_cnn` -> its module path)."""
    return SMALL_CNN if arch == "small_cnn" else arch


def _factory(arch: str) -> Callable[..., nn.Module]:
    from jaxdissect.models import zoo

    name = model_name(arch)
    if name not in zoo.ARCHS and ":" not in name:
        raise ValueError(
            f"arch={arch!r}: unknown architecture; small_cnn, {', '.join(sorted(zoo.ARCHS))}, "
            "or package.module:factory"
        )
    try:
        return zoo.factory(name)
    except ValueError as e:
        raise ValueError(f"arch={arch}: {e}") from None


def build_model(arch: str, **options: Any) -> nn.Module:
    """`small_cnn`, a `models.zoo` architecture, or a `package.module:attr` factory."""
    return _factory(arch)(**options)


def model_options(arch: str, **wanted: Any) -> dict[str, Any]:
    """The options of `wanted` (None = the architecture's default) that `arch` accepts.

    Raises if an option is set but the architecture has no such switch, rather
    than silently training something else.
    """
    accepted = inspect.signature(_factory(arch)).parameters
    options = {}
    for key, value in wanted.items():
        if value is None:
            continue
        if key not in accepted:
            raise ValueError(f"arch={arch} has no option {key!r} (it takes {', '.join(accepted)})")
        options[key] = value
    return options


# --------------------------------------------------------------------------- config and state


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that changes the numbers of a training run.

    Attributes:
      arch: `small_cnn` or a `models.zoo` architecture.
      width, batch_norm, dropout: model options (None: the architecture's default).
      optimizer: `sgd` (with momentum; weight decay added to the gradient, as
        torch's SGD) or `adam` (AdamW: decoupled weight decay).
      learning_rate: peak learning rate.
      momentum: SGD's momentum.
      nesterov: SGD with Nesterov momentum.
      weight_decay: on every parameter of rank >= 2 (conv and linear kernels; a ViT's
        position embedding and attention biases too), not on biases or norm scales.
      schedule: `constant`, `cosine` (to 0 at `steps`) or `step` (times
        `decay_factor` at each of `decay_steps`; default at 50% and 75%).
      warmup_steps: linear warm-up from 0 before the schedule.
      decay_steps: `step` schedule: steps where the rate is multiplied by `decay_factor`
        (empty: at 50% and 75% of `steps`), each after `warmup_steps` and given once.
      decay_factor: `step` schedule: the factor at each of `decay_steps`.
      steps: training steps.
      batch_size: global batch (a multiple of the device count).
      seed: initialisation, data order, flips and dropout.
      flip: random horizontal flips.
      save_steps: steps whose state is kept for good (and exported to weights/).
      checkpoint_every: periodic checkpoints for resuming.
      keep_checkpoints: periodic checkpoints kept.
      eval_every: evaluate on val every N steps too (0: at save steps and the end).
    """

    arch: str = "small_cnn"
    width: float | None = None
    batch_norm: bool | None = None
    dropout: bool | None = None
    optimizer: str = config.setting("sgd", choices=OPTIMIZERS)
    learning_rate: float = 0.02
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = config.setting("cosine", choices=SCHEDULES)
    warmup_steps: int = 0
    decay_steps: tuple[int, ...] = ()
    decay_factor: float = 0.1
    steps: int = 2000
    batch_size: int = 32
    seed: int = 0
    flip: bool = True
    save_steps: tuple[int, ...] = (0,)
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    eval_every: int = 0

    def __post_init__(self):
        config.check_fields(self)
        for name in ("steps", "batch_size", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.width is not None and not self.width > 0:
            raise ValueError(f"width={self.width}: must be > 0")
        if not 0 < self.learning_rate < math.inf:  # NaN fails too
            raise ValueError(f"learning_rate={self.learning_rate}: must be > 0 and finite")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum={self.momentum}: must be in [0, 1)")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"weight_decay={self.weight_decay}: must be >= 0 and finite")
        if not 0 < self.decay_factor <= 1:
            raise ValueError(f"decay_factor={self.decay_factor}: must be in (0, 1]")
        if self.seed > 2**32 - 2:  # grain's data order and flips take 32-bit seeds (seed, seed+1)
            raise ValueError(f"seed={self.seed}: must be < {2**32 - 1} (the data order's seeds)")
        if self.eval_every < 0:
            raise ValueError(f"eval_every={self.eval_every}: must be >= 0 (0: at save steps)")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"warmup_steps={self.warmup_steps}: must be in [0, steps={self.steps})"
            )
        object.__setattr__(self, "save_steps", tuple(sorted({int(s) for s in self.save_steps})))
        object.__setattr__(self, "decay_steps", tuple(sorted(int(s) for s in self.decay_steps)))
        for name, ignored, taker in (
            ("nesterov", self.nesterov and not self.momentum, "optimizer=sgd, momentum > 0"),
            ("nesterov", self.nesterov and self.optimizer != "sgd", "optimizer=sgd"),
            ("decay_steps", self.decay_steps and self.schedule != "step", "schedule=step"),
        ):
            if ignored:
                value = ",".join(map(str, self.decay_steps)) if name == "decay_steps" else "True"
                raise ValueError(f"{name}={value}: only {taker} takes it (else it is ignored)")
        bounds = self.decay_bounds()
        if self.schedule == "step" and (
            len(set(bounds)) < len(bounds)
            or not self.warmup_steps < bounds[0] <= bounds[-1] < self.steps
        ):
            given = ",".join(map(str, self.decay_steps)) or (
                f"() (at 50% and 75% of steps={self.steps}: {','.join(map(str, bounds))})"
            )
            raise ValueError(
                f"decay_steps={given}: each must be after warmup_steps={self.warmup_steps}, "
                f"before steps={self.steps} (later ones never apply), and given once"
            )
        bad = [s for s in self.save_steps if not 0 <= s <= self.steps]
        if bad:
            raise ValueError(
                f"save_steps={','.join(map(str, bad))}: outside [0, steps={self.steps}]"
            )

    def decay_bounds(self) -> tuple[int, ...]:
        """The steps of the `step` schedule's decays: `decay_steps`, or 50% and 75%."""
        return self.decay_steps or (self.steps // 2, self.steps * 3 // 4)

    def options(self, num_classes: int) -> dict[str, Any]:
        """Constructor options of the model."""
        return {
            "num_classes": num_classes,
            **model_options(
                self.arch, width=self.width, batch_norm=self.batch_norm, dropout=self.dropout
            ),
        }

    def numbers(self) -> dict[str, Any]:
        """The fields that change results (logging and checkpoint cadence do not)."""
        out = dataclasses.asdict(self)
        for key in ("checkpoint_every", "keep_checkpoints", "eval_every", "save_steps"):
            out.pop(key)
        return out


class TrainState(struct.PyTreeNode):
    """What a checkpoint holds: the step, parameters, BatchNorm statistics, optimiser state."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    def variables(self) -> dict[str, Any]:
        """Flax variables of the model."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """The schedule `config` describes (warm-up, then constant, cosine or step)."""
    lr, warm = config.learning_rate, config.warmup_steps
    rest = config.steps - warm
    if config.schedule == "constant":
        main = optax.constant_schedule(lr)
    elif config.schedule == "cosine":
        main = optax.cosine_decay_schedule(lr, rest)
    else:
        main = optax.piecewise_constant_schedule(
            lr, {b - warm: config.decay_factor for b in config.decay_bounds()}
        )
    if not warm:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def _kernels(params: Any) -> Any:
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config)
    if config.optimizer == "adam":
        return optax.adamw(schedule, weight_decay=config.weight_decay, mask=_kernels)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=_kernels),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
    )


def training_input_spec(model: nn.Module, resolution: int) -> InputSpec:
    """The model's normalisation at the data's resolution (no resize while training)."""
    from jaxdissect.preprocess import TORCHVISION, declared_input_spec

    spec = declared_input_spec(model) or TORCHVISION
    return dataclasses.replace(spec, size=resolution)


class Trainer:
    """Jitted, sharded init / train step / eval step of one model and config."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig,
        resolution: int,
        mesh: jax.sharding.Mesh,
    ):
        parallel.check_batch_size(config.batch_size, mesh)
        self.model, self.config, self.mesh = model, config, mesh
        self.resolution = resolution
        self.spec = training_input_spec(model, resolution)
        self.tx = make_optimizer(config)
        self.schedule = learning_rate_schedule(config)
        self._takes_train = "train" in inspect.signature(type(model).__call__).parameters
        repl, data = parallel.replicated(mesh), parallel.sharded(mesh)
        self.init = jax.jit(self._init, out_shardings=repl, compiler_options=INIT_COMPILER_OPTIONS)
        self.train_step = jax.jit(
            self._train_step,
            in_shardings=(repl, data),
            out_shardings=(repl, repl),
            donate_argnums=0,
        )
        self.evaluator = evaluate.Evaluator(self._classify, mesh)

    def _kwargs(self, train: bool) -> dict[str, Any]:
        return {"train": train} if self._takes_train else {}

    def _init(self, key: jax.Array) -> TrainState:
        x = jnp.zeros((1, self.resolution, self.resolution, 3), jnp.float32)
        variables = self.model.init(key, x, **self._kwargs(False))
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=self.tx.init(params),
        )

    def initial_state(self) -> TrainState:
        return self.init(jax.random.key(self.config.seed))

    @staticmethod
    @functools.lru_cache(maxsize=4)
    def shared(
        model: nn.Module, config: TrainConfig, resolution: int, mesh: jax.sharding.Mesh
    ) -> Trainer:
        """A `Trainer` reused by later calls with equal arguments: its compiled steps too
        (a resumed run in the same process, as in tests, compiles nothing again)."""
        return Trainer(model, config, resolution, mesh)

    def _train_logits(self, state: TrainState, params: Any, images: jax.Array, rng: jax.Array):
        x = self.spec(images)
        variables = {"params": params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        mutable = ["batch_stats"] if state.batch_stats else False
        out = self.model.apply(
            variables, x, **self._kwargs(True), rngs={"dropout": rng}, mutable=mutable
        )
        if mutable:
            logits, updates = out
            return logits, updates["batch_stats"]
        return out, state.batch_stats

    def _train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
        # Dropout keys are a function of (seed, step): a resumed run draws the same ones.
        rng = jax.random.fold_in(jax.random.key(self.config.seed + 2), state.step)
        labels = batch["label"]

        def loss_fn(params):
            logits, stats = self._train_logits(state, params, batch["image"], rng)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, (logits, stats)

        (loss, (logits, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        new = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=stats,
            opt_state=opt_state,
        )
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return new, {"loss": loss, "accuracy": accuracy}

    def _classify(self, variables: Any, images: jax.Array) -> jax.Array:
        return self.model.apply(variables, self.spec(images), **self._kwargs(False))

    def put(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        """This process's rows of a global batch, sharded over the mesh."""
        return parallel.put_global_batch(batch, self.mesh)

    def evaluate(self, state: TrainState, split: SceneSplit, batch_size: int) -> dict[str, float]:
        """Mean loss and accuracy of `state` on `split`."""
        got = self.evaluator(state.variables(), eval_batches(split, batch_size))
        return {"loss": got.mean_loss, "accuracy": got.accuracy}


# --------------------------------------------------------------------------- files


_METRIC_COLUMNS = (
    "step",
    "epoch",
    "learning_rate",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "images_per_s",
    "elapsed_s",
)


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """Rows of a metrics.csv (empty cells -> NaN); a cell that is no number is one
    ValueError naming the file, line and column."""
    if not os.path.exists(path):
        return []
    rows = []
    for line, row in enumerate(store.read_rows_csv(path), start=2):  # line 1: the header
        parsed = {}
        for column, cell in row.items():
            try:
                parsed[column] = float(cell) if cell not in ("", None) else float("nan")
            except (TypeError, ValueError):
                raise ValueError(
                    f"{path}, line {line}: column {column} holds {cell!r}, not a number; the "
                    "file was edited or damaged"
                ) from None
        rows.append(parsed)
    return rows


def _write_metrics(path: pathlib.Path, rows: Sequence[Mapping[str, float]]) -> None:
    store.write_rows_csv(path, rows, columns=_METRIC_COLUMNS)


def export_weights(
    directory: str | os.PathLike[str],
    state: TrainState,
    config: TrainConfig,
    task: SceneTask,
    extra: Mapping[str, Any],
) -> pathlib.Path:
    """Write `state`'s variables in `models/convert.py`'s layout (replacing any old copy)."""
    options = config.options(task.num_classes)
    num_classes = options.pop("num_classes")
    if "image_size" in inspect.signature(_factory(config.arch)).parameters:
        options["image_size"] = task.resolution  # the small CNN's and the small ViT's
    meta = {
        "arch": model_name(config.arch),
        "num_classes": num_classes,
        "options": options,
        "input_size": task.resolution,
        "classes": list(task.class_names),
        # What its accuracy is measured on: `cli.training_task` refuses another split.
        "val_split": task.val.key(),
        "train": {**dict(extra), "config": dataclasses.asdict(config)},
    }
    variables = jax.tree.map(np.asarray, jax.device_get(state.variables()))
    save_variables(directory, variables, meta, force=True)
    return pathlib.Path(directory)


def weights_dir(output_dir: str | os.PathLike[str], step: int) -> pathlib.Path:
    return pathlib.Path(output_dir) / WEIGHTS_DIR / f"step_{step:06d}"


def list_weights(run_dir: str | os.PathLike[str]) -> list[tuple[int, pathlib.Path]]:
    """(step, dir) of every finished export of a training run, by step."""
    root = pathlib.Path(run_dir) / WEIGHTS_DIR
    found = []
    for d in root.glob("step_*"):
        if (d / META_FILE).is_file() and d.name[5:].isdigit():
            found.append((int(d.name[5:]), d))
    return sorted(found)


def is_export(weights: str | os.PathLike[str] | None) -> bool:
    """Whether `weights` is a folder `export` wrote: its meta.json records the training and
    its classes, which a `models/convert.py` conversion's does not."""
    if not weights or not os.path.isfile(os.path.join(weights, META_FILE)):
        return False
    meta = read_meta(weights)
    return "train" in meta and "classes" in meta


def load_trained(weights: str | os.PathLike[str]):
    """A `models.load.LoadedModel` of an exported training step (arch and options from meta)."""
    from jaxdissect.models import load as model_load

    arch, options = export_model(weights)
    return model_load.load(arch, weights=os.fspath(weights), options=options)


def export_model(weights: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """(architecture, constructor options) of an exported training step, from its meta."""
    meta = read_meta(weights)
    if not {"arch", "num_classes"} <= meta.keys():  # (a KeyError's traceback before)
        raise ValueError(f"{weights}: its {META_FILE} lacks arch or num_classes (edited?)")
    return meta["arch"], {**meta.get("options", {}), "num_classes": meta["num_classes"]}


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What `train` did: final step and validation numbers, the kept exports."""

    output_dir: pathlib.Path
    step: int
    val_accuracy: float
    val_loss: float
    exports: dict[int, pathlib.Path]
    resumed_from: int
    elapsed_s: float


def _prepare_output(out: pathlib.Path, settings: Mapping[str, Any]) -> None:
    """Create `out` and write `settings` there, refusing a run in it of other settings,
    device count or code (a run that recorded no code is resumed with a warning)."""
    path = out / SETTINGS_FILE
    if not path.exists() and any((out / CHECKPOINT_DIR).glob("*")):  # resumed as any run's
        raise FileExistsError(
            f"{out} holds checkpoints but no {SETTINGS_FILE} saying what they were trained "
            f"with; choose another --output_dir, or empty {out} to start the run again"
        )
    if path.exists():
        old = store.read_json_object(
            path, f"choose another --output_dir, or empty {out} to start the run again"
        )
        new = json.loads(json.dumps(settings))
        if old.get("numbers") != new["numbers"] or old.get("data") != new["data"]:
            raise FileExistsError(
                f"{out} holds a training run with other settings; resume it with the same "
                "flags, or choose another --output_dir"
            )
        if old.get("devices") != new["devices"]:  # gradient sums round per device count
            raise FileExistsError(
                f"{out} holds a training run on {old.get('devices')} devices, not "
                f"{new['devices']}; resume it with --devices={old.get('devices')}, or choose "
                "another --output_dir"
            )
        if "code" not in old:
            logging.warning(
                "%s holds a training run that recorded no code (an older one): resuming it "
                "with this library's code and the model's",
                out,
            )
        elif old["code"] != new["code"]:
            raise FileExistsError(
                f"{out} holds a training run made by other library code (or another source "
                "of the model); choose another --output_dir"
            )
    out.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        store.write_json(path, settings)


def train(
    config: TrainConfig,
    task: SceneTask,
    output_dir: str | os.PathLike[str],
    *,
    mesh: jax.sharding.Mesh | None = None,
    eval_batch_size: int | None = None,
    log_every: int = 50,
    progress: bool = True,
    num_threads: int = 2,
    stop_after: int | None = None,
    on_log: Callable[[Mapping[str, float]], None] | None = None,
) -> TrainResult:
    """Train (or resume training) `config` on `task`, writing to `output_dir`.

    Args:
      stop_after: return after this step as if killed (for tests and time-boxed runs);
        the next call resumes.
      on_log: called with each metrics row.
    """
    t0 = time.time()
    out = pathlib.Path(output_dir)
    mesh = mesh or parallel.data_mesh()
    name = "eval_batch_size" if eval_batch_size else "batch_size"
    eval_batch_size = eval_batch_size or config.batch_size
    parallel.check_batch_size(eval_batch_size, mesh, name)
    options = config.options(task.num_classes)
    model = build_model(config.arch, **options)
    settings = {
        "numbers": config.numbers(),
        "config": dataclasses.asdict(config),
        "model": {"arch": model_name(config.arch), **options},
        "data": {
            "description": task.description,
            "fingerprint": task.fingerprint,
            "resolution": task.resolution,
            "classes": list(task.class_names),
            "train_images": len(task.train),
            "val_images": len(task.val),
        },
        "devices": int(mesh.devices.size),
        # A step's weights depend on the training code and the model's.
        "code": {"library": code_keys.code_fingerprint(), "model": code_keys.definition_key(model)},
    }
    _prepare_output(out, settings)
    trainer = Trainer.shared(model, config, task.resolution, mesh)
    state = trainer.initial_state()
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
    manager = training_checkpoints.checkpoint_manager(out / CHECKPOINT_DIR, config)
    restored = training_checkpoints.restore_state(manager, state)
    start = 0
    # The rows logged up to the checkpoint, as it kept them (metrics.csv is an output: its
    # rows after the checkpoint were lost with the killed run, and are redone).
    history: list[dict[str, float]] = []
    if restored is not None:
        state = restored
        start = int(jax.device_get(state.step))
        history = training_checkpoints.restore_rows(manager, start)
        logging.info("resuming %s from step %d", out, start)
    logging.info(
        "training %s (%d parameters, %d classes) on %s: %d train / %d val images at %d px, "
        "%d devices",
        settings["model"],
        num_params,
        task.num_classes,
        task.description,
        len(task.train),
        len(task.val),
        task.resolution,
        mesh.devices.size,
    )
    exports = dict(list_weights(out))
    # The resumed run starts after step `start`: a save step up to it is exported only if
    # the run that got there did (a fresh run exports its step 0 itself).
    passed = [s for s in config.save_steps if restored is not None and s <= start]
    if lost := [s for s in passed if s not in exports]:
        raise ValueError(
            f"save_steps={','.join(map(str, lost))}: at or before step {start}, where {out} "
            "resumes, and not exported by the run that got there; drop them, or train again "
            "in another output_dir"
        )

    def validate(state: TrainState, step: int, final: bool = False) -> dict[str, float]:
        """Evaluate and export where the config says (at save steps, every `eval_every`
        steps, at the end); the row's validation fields, empty where not evaluated. The
        state is saved by the caller once the step's row is written (`training_checkpoints.save_state`)."""
        row: dict[str, float] = {}
        evaluate = (
            final
            or step in config.save_steps
            or (config.eval_every and step % config.eval_every == 0)
        )
        if evaluate:
            val = trainer.evaluate(state, task.val, eval_batch_size)
            row = {"val_loss": val["loss"], "val_accuracy": val["accuracy"]}
            logging.info(
                "step %d: val loss %.4f, val accuracy %.4f", step, val["loss"], val["accuracy"]
            )
        if step in config.save_steps or final:
            extra = {"step": step, "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"]}
            if jax.process_index() == 0:
                exports[step] = export_weights(weights_dir(out, step), state, config, task, extra)
        return row

    # Step 0's row, unless the killed run saved it with step 0's checkpoint.
    if start == 0 and not history:
        row = validate(state, 0)
        history.append({"step": 0, "epoch": 0.0, **row, "elapsed_s": 0.0})
        training_checkpoints.save_state(manager, state, history)
    batches = train_batches(task.train, config.batch_size, seed=config.seed, flip=config.flip)
    stop = config.steps if stop_after is None else min(config.steps, stop_after)
    stream = batches[start:stop].to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4)
    )
    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=start, disable=not progress, unit="step", desc="train")
    # The train metrics of the steps since the last row, restored with a checkpoint.
    pending: list[Mapping[str, Any]] = (
        training_checkpoints.restore_pending(manager, start) if restored is not None else []
    )
    tick, tick_step = time.time(), start
    step = start
    for step, batch in enumerate(stream, start=start + 1):
        state, metrics = trainer.train_step(state, trainer.put(batch))
        pending.append(metrics)
        bar.update(1)
        # Not at `stop_after`: that stands for a kill, which saves nothing.
        saved = (
            step in config.save_steps or step % config.checkpoint_every == 0 or step == config.steps
        )
        extra = validate(state, step, final=step == config.steps)
        # A row at `stop_after` alone is shown in metrics.csv but kept neither in the rows
        # nor in the checkpoint's: the resumed run's rows are the uninterrupted run's.
        due = step % log_every == 0 or bool(extra)
        if due or step == stop:
            got = jax.device_get(pending)
            now = time.time()
            row = {
                "step": step,
                # Passes over the train split (batches run on across epochs).
                "epoch": step * config.batch_size / len(task.train),
                "learning_rate": float(trainer.schedule(step - 1)),
                "train_loss": float(np.mean([m["loss"] for m in got])),
                "train_accuracy": float(np.mean([m["accuracy"] for m in got])),
                "images_per_s": (step - tick_step) * config.batch_size / max(now - tick, 1e-9),
                "elapsed_s": now - t0,
                **extra,
            }
            if due:
                pending, tick, tick_step = [], now, step
                history.append(row)
            if jax.process_index() == 0:
                _write_metrics(out / METRICS_FILE, history if due else [*history, row])
            logging.info(
                "step %d/%d: loss %.4f, accuracy %.3f, lr %.4g, %.0f images/s",
                step,
                config.steps,
                row["train_loss"],
                row["train_accuracy"],
                row["learning_rate"],
                row["images_per_s"],
            )
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", acc=f"{row['train_accuracy']:.2f}")
            if on_log is not None:
                on_log(row)
        # Saved after the step's row is written: a run killed in between redoes the step
        # and its row. The final state is saved once summary.json is written.
        if saved and step != config.steps:
            training_checkpoints.save_state(manager, state, history, pending)
    bar.close()
    if start == stop == config.steps:
        logging.info("%s: already trained for %d steps", out, config.steps)
        if jax.process_index() == 0 and history:  # metrics.csv as the checkpoint keeps it
            _write_metrics(out / METRICS_FILE, history)
    final = [r for r in history if not np.isnan(r.get("val_accuracy", float("nan")))]
    last = final[-1] if final else {"val_accuracy": float("nan"), "val_loss": float("nan")}
    result = TrainResult(
        output_dir=out,
        step=step,
        val_accuracy=float(last["val_accuracy"]),
        val_loss=float(last["val_loss"]),
        exports=dict(sorted(exports.items())),
        resumed_from=start,
        elapsed_s=time.time() - t0,
    )
    if jax.process_index() == 0 and step == config.steps and start < config.steps:
        _write_metrics(out / METRICS_FILE, history)
        from jaxdissect.report import plots  # matplotlib and jinja2 only where a run ends

        plots.plot_training_curves(
            out / PLOT_FILE, history, title=f"{model_name(config.arch)} on {task.description}"
        )
        store.write_json(
            out / SUMMARY_FILE,
            {
                "step": step,
                "val_accuracy": result.val_accuracy,
                "val_loss": result.val_loss,
                "num_parameters": num_params,
                "kept_steps": [
                    {
                        "step": s,
                        "val_accuracy": read_meta(p)["train"].get("val_accuracy"),
                        "weights": str(p),
                    }
                    for s, p in result.exports.items()
                ],
                "train_images": len(task.train),
                "val_images": len(task.val),
                "classes": list(task.class_names),
                "elapsed_s_this_session": result.elapsed_s,
                "resumed_from": start,
            },
        )
    if step == config.steps:
        # Last: a run killed before it resumes from an earlier step and writes the summary.
        training_checkpoints.save_state(manager, state, history, force=True)
    manager.wait_until_finished()
    manager.close()
    return result

"""Training on the synthetic scenes: data, optimiser, sharding, checkpoints, resuming."""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl import flags
from jax.sharding import PartitionSpec as P

from jaxdissect import cli, code_keys, parallel, scenes, store, training, training_checkpoints
from jaxdissect.data.broden import Broden
from jaxdissect.models import load as model_load
from tests.experiment_testing import TINY_SIZE, tiny_broden

# One worker for the module: its module fixtures (the quick training run) are built once.
pytestmark = pytest.mark.xdist_group("training")


def _config(**kw) -> training.TrainConfig:
    """A quick configuration for the resume and sharding tests."""
    base = dict(
        width=0.125, steps=20, batch_size=16, save_steps=(0, 20), checkpoint_every=5, dropout=True
    )
    return training.TrainConfig(**{**base, **kw})


RUN_KW = dict(progress=False, log_every=4)
# The quick run: evaluated every 6 steps, which are no checkpoint (every 5) nor log steps.
QUICK = _config(eval_every=6)


@pytest.fixture(scope="module")
def broden_root(tmp_path_factory):
    return tiny_broden(tmp_path_factory.mktemp("broden") / "broden1_48")


@pytest.fixture(scope="module")
def task(broden_root) -> scenes.SceneTask:
    train, val = (Broden.open(broden_root, split=s) for s in ("train", "val"))
    return scenes.scene_task(train, val)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, task) -> tuple[training.TrainResult, pathlib.Path]:
    """`QUICK` trained straight through on one device: (its result, its folder)."""
    out = tmp_path_factory.mktemp("train") / "run"
    return training.train(QUICK, task, out, mesh=parallel.data_mesh(1), **RUN_KW), out


def test_scene_task_classes_are_the_train_splits_scenes(broden_root, task):
    train = Broden.open(broden_root, split="train")
    scene = set(train.labels.labels_in("scene").tolist())
    expected = sorted(
        {n for r in train.records for n in r.image_labels.get("scene", ()) if n in scene}
    )
    assert list(task.class_labels) == expected and task.num_classes >= 5
    assert all(name.endswith("-s") for name in task.class_names)
    # Texture and surface images have no scene: left out.
    with_scene = [i for i, r in enumerate(train.records) if r.image_labels.get("scene")]
    assert list(task.train.source_indices) == with_scene
    assert task.train.images.shape == (len(with_scene), TINY_SIZE, TINY_SIZE, 3)
    assert task.train.images.dtype == np.uint8
    np.testing.assert_array_equal(task.train.images[0], train.read_image(with_scene[0]))
    assert set(task.val.labels.tolist()) <= set(range(task.num_classes))


def test_a_validation_split_without_a_training_class_is_refused(tmp_path):
    """8 synthetic images: the val split's scenes are absent from the train split, so every
    val image is left out; an accuracy over no image (train.py printed 0.0000) is refused."""
    from jaxdissect.data import synthetic

    root = synthetic.generate(tmp_path / "broden", num_images=8, size=32, workers=1)
    train, val = (Broden.open(root, split=s) for s in ("train", "val"))
    with pytest.raises(ValueError, match=r"the validation split holds no image of the \d+ train"):
        scenes.scene_task(train, val, description="synthetic")


def test_the_tfds_build_gives_the_same_task_as_the_folder(tmp_path):
    from jaxdissect.data import synthetic, tfds_broden

    root = synthetic.generate(tmp_path / "broden", num_images=24, size=32, workers=1)
    build = tfds_broden.build(root, tmp_path / "tfds")
    kw = dict(resolution=32, synthetic_images=0, cache_dir=tmp_path)
    folder = scenes.open_scene_task(str(root), **kw)
    tfds = scenes.open_scene_task(str(build), **kw)
    assert tfds.class_labels == folder.class_labels
    for a, b in ((tfds.train, folder.train), (tfds.val, folder.val)):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.labels, b.labels)


def test_train_batches_are_a_pure_function_of_seed_and_step(task):
    split = task.train
    a = scenes.train_batches(split, 4, seed=1)
    b = scenes.train_batches(split, 4, seed=1)
    for step in (0, 7, 1000):
        np.testing.assert_array_equal(a[step]["image"], b[step]["image"])
    # Without flips, batch size 1: each epoch is a permutation, and epochs differ.
    plain = scenes.train_batches(split, 1, seed=1, flip=False)
    n = len(split)
    first = [int(plain[i]["label"][0]) for i in range(n)]
    second = [int(plain[n + i]["label"][0]) for i in range(n)]
    assert sorted(first) == sorted(split.labels.tolist()) == sorted(second)
    assert first != second


def test_eval_batches_pad_and_mask(task):
    split = task.val
    batches = scenes.eval_batches(split, 16)
    assert sum(int(b["valid"].sum()) for b in batches) == len(split)
    assert all(b["image"].shape == (16, TINY_SIZE, TINY_SIZE, 3) for b in batches)


def test_learning_rate_schedules():
    cfg = dict(learning_rate=0.1, steps=100)
    constant = training.learning_rate_schedule(training.TrainConfig(schedule="constant", **cfg))
    assert float(constant(0)) == float(constant(99)) == pytest.approx(0.1)
    cosine = training.learning_rate_schedule(training.TrainConfig(schedule="cosine", **cfg))
    assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(100)) == pytest.approx(0.0)
    assert float(cosine(50)) == pytest.approx(0.05)
    step = training.learning_rate_schedule(
        training.TrainConfig(schedule="step", decay_steps=(30, 60), decay_factor=0.5, **cfg)
    )
    assert [float(step(s)) for s in (29, 30, 59, 60)] == pytest.approx([0.1, 0.05, 0.05, 0.025])
    default_steps = training.learning_rate_schedule(training.TrainConfig(schedule="step", **cfg))
    assert [float(default_steps(s)) for s in (49, 50, 75)] == pytest.approx([0.1, 0.01, 0.001])
    warm = training.learning_rate_schedule(
        training.TrainConfig(schedule="cosine", warmup_steps=10, **cfg)
    )
    assert float(warm(0)) == 0.0 and float(warm(10)) == pytest.approx(0.1)
    assert float(warm(100)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_weight_decay_reaches_kernels_only(optimizer):
    cfg = training.TrainConfig(
        optimizer=optimizer, schedule="constant", learning_rate=0.1, weight_decay=0.5
    )
    tx = training.make_optimizer(cfg)
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    assert float(new["dense"]["kernel"][0, 0]) < 1.0
    np.testing.assert_array_equal(new["dense"]["bias"], params["dense"]["bias"])


def test_config_and_options_are_checked():
    with pytest.raises(ValueError, match="optimizer"):
        training.TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="save_steps"):
        training.TrainConfig(steps=10, save_steps=(20,))
    for width in (0.0, -1.0):
        with pytest.raises(ValueError, match=rf"^width={width}: must be > 0"):
            training.TrainConfig(width=width)
    for field, value, rule in [
        ("learning_rate", float("nan"), "must be > 0 and finite"),
        ("learning_rate", -1.0, "must be > 0 and finite"),
        ("momentum", 1.5, r"must be in \[0, 1\)"),
        ("weight_decay", -1.0, "must be >= 0 and finite"),
        ("decay_factor", 0.0, r"must be in \(0, 1\]"),
        ("eval_every", -1, "must be >= 0"),
        # grain refused it after step 0 was trained and exported, naming no flag.
        ("seed", 2**32 - 1, f"must be < {2**32 - 1}"),
    ]:
        with pytest.raises(ValueError, match=rf"^{field}={value}: {rule}"):
            training.TrainConfig(**{field: value})
    split = scenes.SceneSplit(np.zeros((2, 1, 1, 3), np.uint8), np.zeros(2, np.int32), np.arange(2))
    largest = training.TrainConfig(seed=2**32 - 2).seed
    assert len(scenes.train_batches(split, 1, seed=largest)[0]["label"]) == 1
    # Options the optimiser or schedule would ignore (trained as without them before).
    for kw, message in [
        (dict(nesterov=True, momentum=0.0), "^nesterov=True: only optimizer=sgd, momentum > 0"),
        (dict(nesterov=True, optimizer="adam"), "^nesterov=True: only optimizer=sgd takes it"),
        (dict(decay_steps=(500,)), r"^decay_steps=500: only schedule=step takes it"),
    ]:
        with pytest.raises(ValueError, match=message):
            training.TrainConfig(**kw)
    assert training.TrainConfig(nesterov=True).nesterov
    # Decays inside the warm-up or given twice would merge into one.
    step = dict(schedule="step", steps=200, warmup_steps=100)
    for decay in [(50, 150), (100, 150), (150, 150), (150, 200), (150, 250)]:
        with pytest.raises(
            ValueError, match="^decay_steps=.*: each must be after warmup_steps=100"
        ):
            training.TrainConfig(decay_steps=decay, **step)
    with pytest.raises(
        ValueError, match=r"^decay_steps=\(\) \(at 50% and 75% of steps=200: 100,150"
    ):
        training.TrainConfig(**step)
    assert training.TrainConfig(decay_steps=(101, 150), **step).decay_bounds() == (101, 150)
    assert training.TrainConfig(schedule="cosine", steps=200, warmup_steps=100).warmup_steps == 100
    with pytest.raises(ValueError, match="no option 'dropout'"):
        training.model_options("resnet18", dropout=True)
    assert training.model_options("resnet18", width=0.5, batch_norm=None) == {"width": 0.5}
    assert training.model_options("small_cnn", batch_norm=True) == {"batch_norm": True}
    assert training.model_name("small_cnn") == "jaxdissect.models.small_cnn:small_cnn"
    with pytest.raises(ValueError, match="^arch='lenet': unknown architecture; small_cnn, "):
        training.model_options("lenet")
    fv = flags.FlagValues()
    cli.define_dataclass_flags(training.TrainConfig, fv)
    assert cli.flag_message("arch='lenet': unknown", fv) == "--arch='lenet': unknown"


def test_one_model_factory():
    from jaxdissect.models import small_cnn, zoo

    # `models.zoo` is the definition: its names, or a package.module:attr factory.
    assert training._factory("small_cnn") is zoo.factory(training.SMALL_CNN) is small_cnn.small_cnn
    assert zoo.build(training.SMALL_CNN, num_classes=3, width=0.125).num_classes == 3
    with pytest.raises(ValueError, match="^arch=models.nowhere:f: architecture"):
        training.build_model("models.nowhere:f")


@pytest.fixture(scope="module")
def bn_trainer() -> training.Trainer:
    """A BatchNorm network's trainer on all 8 devices (its programs compiled once)."""
    model = training.build_model("small_cnn", width=0.125, batch_norm=True)
    return training.Trainer(
        model, _config(batch_norm=True, dropout=False), 32, parallel.data_mesh()
    )


def test_batches_are_sharded_and_state_replicated(bn_trainer):
    mesh = parallel.data_mesh()
    assert mesh.devices.size == 8
    trainer = bn_trainer
    batch = trainer.put({"image": np.zeros((16, 32, 32, 3), np.uint8), "label": np.zeros(16)})
    assert batch["image"].sharding.spec == P("data")
    assert len(batch["image"].addressable_shards) == 8
    state = trainer.initial_state()
    kernel = state.params["features"]["0"]["kernel"]
    assert kernel.sharding.is_fully_replicated
    with pytest.raises(ValueError, match="multiple of 8"):
        training.Trainer(trainer.model, _config(batch_size=12), 32, mesh)


def test_exported_weights_load_for_dissection(quick_run):
    _, out = quick_run
    weights = training.weights_dir(out, 20)
    meta = training.read_meta(weights)
    assert meta["arch"] == "jaxdissect.models.small_cnn:small_cnn"
    assert meta["train"]["step"] == 20 and meta["options"]["image_size"] == TINY_SIZE
    loaded = training.load_trained(weights)
    assert loaded.input_spec.size == TINY_SIZE and loaded.default_layers[-1] == "conv5"
    # What experiments/dissect.py does with --model, --model_option and --weights.
    options = model_load.parse_options(
        [f"num_classes={meta['num_classes']}", "width=0.125", "dropout=true"]
        + [f"image_size={TINY_SIZE}"]
    )
    again = model_load.load(meta["arch"], weights=str(weights), options=options)
    assert again.key == loaded.key
    # The export is the checkpoint manager's state at that step.
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager((out / training.CHECKPOINT_DIR).absolute()) as manager:
        assert {0, 20} <= set(manager.all_steps())
        state = manager.restore(20)
    np.testing.assert_array_equal(
        state["params"]["classifier"]["1"]["kernel"],
        loaded.variables["params"]["classifier"]["1"]["kernel"],
    )


def test_validation_runs_every_eval_every_steps_and_at_the_save_steps(quick_run):
    """eval_every=6, checkpoints every 5: val at 6, 12, 18 (rows of their own at 6 and 18)
    besides the save steps 0 and 20."""
    rows = training.read_metrics(quick_run[1] / training.METRICS_FILE)
    assert [r["step"] for r in rows] == [0, 4, 6, 8, 12, 16, 18, 20]
    evaluated = [r["step"] for r in rows if not np.isnan(r["val_accuracy"])]
    assert evaluated == [0, 6, 12, 18, 20]


def test_the_epoch_column_counts_the_images_seen(quick_run, task):
    """Batches run on across epochs: epoch = step x batch / train images."""
    assert len(task.train) % QUICK.batch_size  # floor(images / batch) steps an epoch is wrong
    for r in training.read_metrics(quick_run[1] / training.METRICS_FILE):
        assert r["epoch"] == pytest.approx(r["step"] * QUICK.batch_size / len(task.train), rel=1e-5)


def test_exports_are_told_from_conversions(tmp_path):
    """A `models/convert.py` folder also holds a meta.json: it is no training export, and the
    scripts that take either ask for its --model instead of reading it as one."""
    from jaxdissect import finished
    from jaxdissect.models.convert import save_variables

    variables = {"params": {"w": np.zeros(2, np.float32)}}
    meta = {"arch": "alexnet", "num_classes": 4}
    save_variables(tmp_path / "converted", variables, meta)
    save_variables(tmp_path / "export", variables, {**meta, "classes": ["a"], "train": {}})
    assert training.is_export(tmp_path / "export")
    assert not training.is_export(tmp_path / "converted")
    assert not any(map(training.is_export, (tmp_path, tmp_path / "none", "", None)))
    # An export's meta.json without its arch (edited): one line, not a KeyError's traceback.
    save_variables(tmp_path / "edited", variables, {"classes": ["a"], "train": {}})
    with pytest.raises(ValueError, match=r"edited: its meta\.json lacks arch or num_classes"):
        training.load_trained(tmp_path / "edited")
    assert finished.check_model(None, str(tmp_path / "export"))
    assert not finished.check_model("alexnet", str(tmp_path / "converted"))
    with pytest.raises(ValueError, match="is a converted checkpoint .*: give --model=alexnet$"):
        finished.check_model(None, str(tmp_path / "converted"))
    # An export carries its own options: the follow-on scripts' --model_option is refused.
    with pytest.raises(ValueError, match=r"^--model_option, --num_classes: --weights=.* export"):
        finished.load_model(None, str(tmp_path / "export"), options={"width": 0.5})


@pytest.mark.parametrize("damage", ["metrics.csv", "arrays", "metrics", "no digest"])
def test_resume_after_a_kill_ends_where_an_uninterrupted_run_ends(
    tmp_path, task, quick_run, damage, caplog
):
    """Killed after step 13, resumed from the step-10 checkpoint: the same weights and
    metrics.csv as straight through (the data order, flips and dropout keys are functions of
    the step; row 12's train mean spans steps 9-12, across the checkpoint). Step 10's
    checkpoint damaged on disk (its arrays' bytes, its unlogged train metrics, no digest):
    deleted with a warning, the run resumes from step 5 and ends the same. metrics.csv
    changed on disk (a number, a cell that is none; with the checkpoints intact): the rows
    come from the checkpoint, which is all a resumed run reads."""
    straight, straight_out = quick_run
    kw = dict(mesh=parallel.data_mesh(1), **RUN_KW)
    out = tmp_path / "run"
    first = training.train(QUICK, task, out, stop_after=13, **kw)
    assert first.step == 13 and [s for s, _ in training.list_weights(out)] == [0]
    assert training.read_metrics(out / training.METRICS_FILE)[-1]["step"] == 13
    checkpoints = out / training.CHECKPOINT_DIR
    # One digest per kept step (0, 5, 10), none of steps saved and dropped since.
    assert {p.name for p in checkpoints.glob("digest-*")} == {f"digest-p0-{s}" for s in (0, 5, 10)}
    if damage == "arrays":  # every byte of the largest array file inverted
        files = [p for p in (checkpoints / "10").rglob("*") if p.is_file()]
        data = max(files, key=lambda p: p.stat().st_size)
        data.write_bytes(bytes(b ^ 0xFF for b in data.read_bytes()))
    elif damage == "metrics":  # the mean of row 12 would span other numbers
        meta = checkpoints / "10" / "_CHECKPOINT_METADATA"
        doc = json.loads(meta.read_text())
        doc["custom_metadata"][training_checkpoints.PENDING_METADATA]["loss"] = [9.0, 9.0]
        meta.write_text(json.dumps(doc))
    elif damage == "no digest":
        (checkpoints / "digest-p0-10").unlink()
    elif damage == "metrics.csv":
        text = (out / training.METRICS_FILE).read_text().splitlines()
        text[2] = text[2].replace(",", ",9", 2)  # step 4's row: other numbers
        text[3] = text[3].replace(",", ",x", 1)  # step 6's: a cell that is not a number
        (out / training.METRICS_FILE).write_text("\n".join(text) + "\n")
    with caplog.at_level("WARNING"):
        second = training.train(QUICK, task, out, **kw)
    in_checkpoint = damage != "metrics.csv"
    assert second.resumed_from == (5 if in_checkpoint else 10) and second.step == 20
    warned = "the checkpoint of step 10 is damaged" in caplog.text
    assert warned == in_checkpoint, caplog.text

    # The rows of the lost steps are redone, once, with the uninterrupted run's numbers.
    def numbers(run: pathlib.Path) -> list[dict[str, float]]:
        rows = training.read_metrics(run / training.METRICS_FILE)
        return [
            {k: v for k, v in r.items() if k not in ("images_per_s", "elapsed_s")} for r in rows
        ]

    rows = numbers(out)
    assert [r["step"] for r in rows] == [0, 4, 6, 8, 12, 16, 18, 20]
    np.testing.assert_equal(rows, numbers(straight_out))
    a = training.load_trained(straight.exports[20]).variables
    b = training.load_trained(second.exports[20]).variables
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert second.val_accuracy == straight.val_accuracy


def test_a_run_stopped_at_a_checkpoint_step_resumes_with_the_uninterrupted_rows(
    tmp_path, task, quick_run
):
    """Stopped (`stop_after`) at step 10, a checkpoint but no log step: metrics.csv shows a
    row of step 10, but step 10's checkpoint keeps neither it nor its emptied train metrics,
    so the resumed run's rows are the uninterrupted run's (it kept a row of step 10, and
    row 12 averaged steps 11-12 instead of 9-12)."""
    kw = dict(mesh=parallel.data_mesh(1), **RUN_KW)
    out = tmp_path / "run"
    training.train(QUICK, task, out, stop_after=10, **kw)
    assert training.read_metrics(out / training.METRICS_FILE)[-1]["step"] == 10
    assert training.train(QUICK, task, out, **kw).resumed_from == 10

    def numbers(run: pathlib.Path) -> list[dict[str, float]]:
        rows = training.read_metrics(run / training.METRICS_FILE)
        return [
            {k: v for k, v in r.items() if k not in ("images_per_s", "elapsed_s")} for r in rows
        ]

    assert [r["step"] for r in numbers(out)] == [0, 4, 6, 8, 12, 16, 18, 20]
    np.testing.assert_equal(numbers(out), numbers(quick_run[1]))


def test_a_checkpoint_orbax_cannot_open_is_one_error_naming_the_folder(tmp_path, task):
    """A step's metadata orbax cannot parse (an unknown key): orbax reads every step's when
    it opens the folder, so the run stops in one ValueError naming it, not a traceback."""
    kw = dict(mesh=parallel.data_mesh(1), **RUN_KW)
    out = tmp_path / "run"
    training.train(_config(), task, out, stop_after=1, **kw)
    checkpoints = out / training.CHECKPOINT_DIR
    meta = checkpoints / "0" / "_CHECKPOINT_METADATA"
    meta.write_text(meta.read_text().replace("init_timestamp_nsecs", "inittimestamp_nsecs"))
    with pytest.raises(
        ValueError, match=f"^{re.escape(str(checkpoints.absolute()))}: a checkpoint "
    ):
        training.train(_config(), task, out, **kw)


def test_resume_before_the_first_checkpoint_and_before_the_summary(tmp_path, task, monkeypatch):
    """Killed before the first periodic checkpoint: step 0's row once. Killed after the last
    step but before summary.json: the rerun writes it. A rerun of the finished run rewrites
    a metrics.csv changed since from the checkpoint."""
    kw = dict(mesh=parallel.data_mesh(1), **RUN_KW)
    config = _config()
    out = tmp_path / "run"
    training.train(config, task, out, stop_after=3, **kw)
    write_json = training.store.write_json

    def killed_at_the_summary(path, obj):
        if pathlib.Path(path).name == training.SUMMARY_FILE:
            raise KeyboardInterrupt
        write_json(path, obj)

    monkeypatch.setattr(training.store, "write_json", killed_at_the_summary)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, task, out, **kw)
    monkeypatch.undo()
    steps = [r["step"] for r in training.read_metrics(out / training.METRICS_FILE)]
    assert steps == [0, 4, 8, 12, 16, 20]
    again = training.train(config, task, out, **kw)
    assert again.resumed_from == 15 and (out / training.SUMMARY_FILE).is_file()
    steps = [r["step"] for r in training.read_metrics(out / training.METRICS_FILE)]
    assert steps == [0, 4, 8, 12, 16, 20]
    # A finished run's metrics.csv changed on disk: the rerun writes it as its last
    # checkpoint keeps it.
    written = (out / training.METRICS_FILE).read_text()
    (out / training.METRICS_FILE).write_text(written.replace("\n4,", "\n4,9", 1))
    assert training.train(config, task, out, **kw).resumed_from == 20
    assert (out / training.METRICS_FILE).read_text() == written


def test_a_kill_between_a_checkpoint_and_its_row_loses_no_row(tmp_path, task, monkeypatch):
    """Killed while step 10's row is written (step 10 is a checkpoint): the state of step 10
    is saved only after its row, so the rerun resumes from step 5 and writes the row (saved
    first, the row of step 10 was lost for good)."""
    kw = dict(mesh=parallel.data_mesh(1), progress=False, log_every=5)
    out = tmp_path / "run"
    write_metrics = training._write_metrics

    def killed_at_step_10(path, rows):
        if rows[-1]["step"] == 10:
            raise KeyboardInterrupt
        write_metrics(path, rows)

    monkeypatch.setattr(training, "_write_metrics", killed_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        training.train(_config(), task, out, **kw)
    monkeypatch.undo()
    again = training.train(_config(), task, out, **kw)
    assert again.resumed_from == 5
    steps = [r["step"] for r in training.read_metrics(out / training.METRICS_FILE)]
    assert steps == [0, 5, 10, 15, 20]


def test_data_parallel_steps_match_one_device(bn_trainer):
    """8 devices (batch sharded, state replicated, BatchNorm over the global batch) = 1 device."""
    one = training.Trainer(bn_trainer.model, bn_trainer.config, 32, parallel.data_mesh(1))
    images = np.random.default_rng(0).integers(0, 255, (16, 32, 32, 3), np.uint8)
    batch = {"image": images, "label": np.arange(16) % 3}
    states = []
    for trainer in (one, bn_trainer):
        state = trainer.initial_state()
        for _ in range(2):
            state, _ = trainer.train_step(state, trainer.put(batch))
        states.append(jax.device_get(state))
    assert int(states[1].step) == 2
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *states)


def test_resume_refuses_other_settings(tmp_path, task, quick_run):
    out = tmp_path / "run"
    shutil.copytree(quick_run[1], out)
    with pytest.raises(FileExistsError, match="other settings"):
        training.train(_config(learning_rate=0.1), task, out, progress=False)


def test_resume_refuses_checkpoints_without_their_settings(tmp_path, task, quick_run):
    """settings.json gone: the checkpoints were taken as those of any settings given (one
    of another learning rate resumed from them, or deleted them as damaged)."""
    out = tmp_path / "run"
    shutil.copytree(quick_run[1], out)
    (out / training.SETTINGS_FILE).unlink()
    with pytest.raises(FileExistsError, match=r"holds checkpoints but no settings\.json"):
        training.train(_config(learning_rate=0.1), task, out, progress=False)
    assert not (out / training.SETTINGS_FILE).exists()


def test_resume_refuses_another_device_count(tmp_path, task, quick_run):
    """Gradient sums round differently per device count: a resume keeps the run's."""
    out = tmp_path / "run"
    shutil.copytree(quick_run[1], out)
    settings = (out / training.SETTINGS_FILE).read_text(encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"on 1 devices, not 2; resume it with --devices=1"):
        training.train(_config(), task, out, mesh=parallel.data_mesh(2), **RUN_KW)
    assert (out / training.SETTINGS_FILE).read_text(encoding="utf-8") == settings


def test_resume_refuses_save_steps_the_run_passed_without_exporting(tmp_path, task, quick_run):
    """A save step added on resume before the resume point was never exported (the run
    ended with no weights/step_10 and no word); refused, naming it."""
    out = tmp_path / "run"
    shutil.copytree(quick_run[1], out)
    with pytest.raises(
        ValueError, match=r"^save_steps=5,10: at or before step 20, where .* resumes"
    ):
        training.train(
            _config(save_steps=(0, 5, 10, 20)), task, out, mesh=parallel.data_mesh(1), **RUN_KW
        )
    assert sorted(s for s, _ in training.list_weights(out)) == [0, 20]


def test_resume_refuses_a_save_step_at_the_resume_point_it_never_exported(tmp_path, task):
    """Killed after step 10's checkpoint (no save step then), resumed with 10 among the save
    steps: the run goes on from step 11, so step 10 is never exported (it ended with no
    weights/step_10 and no word, as for a step before the resume point); refused, naming it.
    A fresh run's save step 0 is exported by the run itself: not refused."""
    kw = dict(mesh=parallel.data_mesh(1), **RUN_KW)
    out = tmp_path / "run"
    training.train(_config(), task, out, stop_after=10, **kw)
    assert [s for s, _ in training.list_weights(out)] == [0]
    with pytest.raises(ValueError, match=r"^save_steps=10: at or before step 10, where .* res"):
        training.train(_config(save_steps=(0, 10, 20)), task, out, **kw)
    assert [s for s, _ in training.list_weights(out)] == [0]


def test_resume_refuses_a_run_of_other_code(tmp_path, task, quick_run, caplog):
    """A run made by other library or model code is neither resumed nor returned as this
    code's; one that recorded no code (an older run) is taken with a warning."""
    out = tmp_path / "run"
    shutil.copytree(quick_run[1], out)
    path = out / training.SETTINGS_FILE
    settings = json.loads(path.read_text(encoding="utf-8"))
    assert settings["code"]["library"] == code_keys.code_fingerprint()
    store.write_json(path, {**settings, "code": {**settings["code"], "library": "older"}})
    with pytest.raises(FileExistsError, match=r"made by other library code .*--output_dir$"):
        training.train(QUICK, task, out, mesh=parallel.data_mesh(1), **RUN_KW)
    store.write_json(path, {k: v for k, v in settings.items() if k != "code"})
    with caplog.at_level("WARNING"):
        training._prepare_output(out, settings)
    assert any("recorded no code" in r.getMessage() for r in caplog.records)
    assert json.loads(path.read_text(encoding="utf-8")) == settings
    # A damaged settings file: one line naming it (json's bare JSONDecodeError before).
    path.write_text('{"numbers": ')
    with pytest.raises(ValueError, match=rf"^{path}: not readable JSON .*empty {out} to start"):
        training._prepare_output(out, settings)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_small_cnn_layout(batch_norm):
    from jaxdissect import capture
    from jaxdissect.models.small_cnn import small_cnn

    model = small_cnn(num_classes=17, batch_norm=batch_norm, image_size=96)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 96, 96, 3)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))
    assert count == (541_905 if not batch_norm else 541_905 + 2 * (32 + 64 + 128 + 128 + 256))
    layers = capture.available_layers(model, shapes, input_shape=(96, 96, 3))
    sizes = [layers[model.layer_aliases[f"conv{i}"]] for i in range(1, 6)]
    assert sizes == [(48, 48, 32), (24, 24, 64), (12, 12, 128), (12, 12, 128), (6, 6, 256)]
    assert model.input_spec.size == 96


def test_train_script_refuses_a_bad_arch_before_making_data(tmp_path, monkeypatch):
    from tests.experiment_testing import parse, script

    monkeypatch.setenv("JAXDISSECT_CACHE", str(tmp_path / "cache"))
    for arch, message in [
        ("bogus", "^arch='bogus': unknown architecture"),
        ("resnet18 --dropout", "^arch=resnet18 has no option 'dropout'"),
    ]:
        name, *more = arch.split()
        fv = parse("train", f"--arch={name}", *more, f"--output_dir={tmp_path / 'out'}")
        with pytest.raises(ValueError, match=message):
            script("train").run(fv)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_read_metrics_names_the_file_line_and_column_of_a_cell_that_is_no_number(tmp_path):
    path = tmp_path / training.METRICS_FILE
    path.write_text("step,train_loss,val_accuracy\n0,2.5,\n4,x1.25,0.5\n")
    with pytest.raises(ValueError, match=r"metrics\.csv, line 3: column train_loss holds 'x1\.25'"):
        training.read_metrics(path)
    path.write_text("step,train_loss,val_accuracy\n0,2.5,\n4,1.25,0.5\n")
    rows = training.read_metrics(path)
    assert rows[1] == {"step": 4.0, "train_loss": 1.25, "val_accuracy": 0.5}
    assert np.isnan(rows[0]["val_accuracy"])


def test_an_export_of_a_zoo_network_loads_at_the_size_it_was_trained_at(tmp_path):
    """A ResNet-18 trained at 32 px is exported with meta input_size 32: loaded back (as
    rotation.py, training_dynamics.py and compare.py load exports) its input spec is 32 px,
    not the zoo's 224, so its images are not resized to a size it never saw."""
    import types

    config = training.TrainConfig(arch="resnet18", steps=1, batch_size=8)
    model = training.build_model("resnet18", **config.options(3))
    trainer = training.Trainer(model, config, 32, parallel.data_mesh(1))
    val = scenes.SceneSplit(np.zeros((0, 32, 32, 3), np.uint8), np.zeros(0, np.int32), np.zeros(0))
    task = types.SimpleNamespace(num_classes=3, resolution=32, class_names=("a", "b", "c"), val=val)
    training.export_weights(tmp_path, trainer.initial_state(), config, task, {"step": 0})
    assert model.input_spec.size == 224  # the zoo's own
    loaded = training.load_trained(tmp_path)
    assert loaded.input_spec.size == 32 and training.read_meta(tmp_path)["input_size"] == 32
    again = model_load.load("resnet18", weights=str(tmp_path), options={"num_classes": 3})
    assert again.input_spec == loaded.input_spec and again.key == loaded.key

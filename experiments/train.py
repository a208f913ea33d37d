r"""Train a network on the scenes of a (synthetic) Broden, keeping checkpoints to dissect.

  python experiments/train.py --flagfile=experiments/configs/train_small_cnn.flags

The classes are the scene labels of the train split; the val split gives the
validation accuracy. `--data` may also be any TFDS image-classification build
(features `image` and `label`, array_record), e.g. one of your own: its train
split is learnt, its validation (or val, or test) split measured. Writes settings.json, metrics.csv, summary.json, training.png,
checkpoints/ (orbax, for resuming: run the same command again after a kill)
and weights/step_<N>/ for every --save_steps step, which the dissection loads:

  python experiments/dissect.py --model=jaxdissect.models.small_cnn:small_cnn \
      --model_option=num_classes=17 --model_option=image_size=96 \
      --weights=runs/train_small_cnn/weights/step_002000 \
      --data=synthetic --synthetic_images=4000 --resolution=96 --split=val \
      --output_dir=runs/dissect_small_cnn

(--model_option repeats the options in weights/step_N/meta.json.)
"""

from __future__ import annotations

import os
import pathlib
import time

from absl import app, flags

from jaxdissect import cli

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """The script's flags (a function, so that tests can define them on their own FlagValues)."""
    # The model.
    flags.DEFINE_string(
        "arch",
        "small_cnn",
        "small_cnn, or a models/zoo architecture (resnet18, alexnet ...).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "width", None, "Channel multiplier (default: the architecture's).", flag_values=fv
    )
    flags.DEFINE_bool(
        "batch_norm", None, "BatchNorm on/off (default: the architecture's).", flag_values=fv
    )
    flags.DEFINE_bool(
        "dropout", None, "Dropout on/off (default: the architecture's).", flag_values=fv
    )
    # The data.
    flags.DEFINE_string(
        "data",
        "synthetic",
        "'synthetic' (generated once, cached; its scenes are the classes), a Broden folder or "
        "its TFDS build, or any TFDS image-classification build (features image + label, "
        "array_record; splits train and validation/val/test).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "synthetic_images", 4000, "Images of the synthetic Broden.", flag_values=fv
    )
    flags.DEFINE_integer(
        "resolution",
        96,
        "Image size of the synthetic Broden; for a TFDS classification build, the size its "
        "images are resized and centre-cropped to.",
        flag_values=fv,
    )
    flags.DEFINE_integer("max_train", None, "Use at most N training images.", flag_values=fv)
    flags.DEFINE_bool("flip", True, "Random horizontal flips.", flag_values=fv)
    # The optimisation.
    flags.DEFINE_enum(
        "optimizer", "sgd", ["sgd", "adam"], "SGD with momentum, or AdamW.", flag_values=fv
    )
    flags.DEFINE_float("learning_rate", 0.02, "Peak learning rate.", flag_values=fv)
    flags.DEFINE_float("momentum", 0.9, "SGD momentum.", flag_values=fv)
    flags.DEFINE_bool("nesterov", False, "Nesterov momentum.", flag_values=fv)
    flags.DEFINE_float("weight_decay", 5e-4, "Weight decay of conv/linear kernels.", flag_values=fv)
    flags.DEFINE_enum(
        "schedule",
        "cosine",
        ["constant", "cosine", "step"],
        "Learning-rate schedule.",
        flag_values=fv,
    )
    flags.DEFINE_integer("warmup_steps", 0, "Linear warm-up steps.", flag_values=fv)
    flags.DEFINE_list(
        "decay_steps",
        [],
        "--schedule=step: steps where the rate is multiplied by --decay_factor "
        "(default: 50% and 75% of --steps).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "decay_factor", 0.1, "--schedule=step: factor at each decay step.", flag_values=fv
    )
    flags.DEFINE_integer("steps", 2000, "Training steps.", flag_values=fv)
    flags.DEFINE_integer(
        "batch_size", 32, "Global batch (a multiple of the device count).", flag_values=fv
    )
    flags.DEFINE_integer(
        "seed", 0, "Seed of initialisation, data order, flips and dropout.", flag_values=fv
    )
    # Checkpoints and output.
    flags.DEFINE_list(
        "save_steps",
        ["0"],
        "Steps kept for good and exported to weights/step_N (dissectable).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "checkpoint_every", 250, "Periodic checkpoint for resuming.", flag_values=fv
    )
    flags.DEFINE_integer("keep_checkpoints", 2, "Periodic checkpoints kept.", flag_values=fv)
    flags.DEFINE_integer(
        "eval_every", 0, "Also evaluate every N steps (0: at save steps).", flag_values=fv
    )
    flags.DEFINE_integer("log_every", 50, "Log loss and accuracy every N steps.", flag_values=fv)
    flags.DEFINE_integer("devices", None, "Devices to use (default: all).", flag_values=fv)
    flags.DEFINE_string(
        "output_dir", None, "Where the run goes (default: runs/train_<arch>).", flag_values=fv
    )
    flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)


def run(fv: flags.FlagValues = FLAGS):
    """Train as the flags say; returns the `training.TrainResult`."""
    started = time.perf_counter()
    import jax

    from jaxdissect import parallel, scenes, training

    cli.quiet_library_logs()
    config = training.TrainConfig(
        arch=fv.arch,
        width=fv.width,
        batch_norm=fv.batch_norm,
        dropout=fv.dropout,
        optimizer=fv.optimizer,
        learning_rate=fv.learning_rate,
        momentum=fv.momentum,
        nesterov=fv.nesterov,
        weight_decay=fv.weight_decay,
        schedule=fv.schedule,
        warmup_steps=fv.warmup_steps,
        decay_steps=tuple(int(s) for s in fv.decay_steps),
        decay_factor=fv.decay_factor,
        steps=fv.steps,
        batch_size=fv.batch_size,
        seed=fv.seed,
        flip=fv.flip,
        save_steps=tuple(int(s) for s in fv.save_steps),
        checkpoint_every=fv.checkpoint_every,
        keep_checkpoints=fv.keep_checkpoints,
        eval_every=fv.eval_every,
    )
    task = scenes.open_scene_task(
        fv.data,
        resolution=fv.resolution,
        synthetic_images=fv.synthetic_images,
        cache_dir=cli.cache_root(),
        max_train=fv.max_train,
    )
    output_dir = fv.output_dir or os.path.join("runs", f"train_{fv.arch}")
    result = training.train(
        config,
        task,
        output_dir,
        mesh=parallel.data_mesh(fv.devices),
        log_every=fv.log_every,
        progress=fv.progress,
    )
    print(
        f"step {result.step}: validation accuracy {result.val_accuracy:.4f} "
        f"({len(task.val)} images, {task.num_classes} classes); "
        f"weights: {pathlib.Path(output_dir, training.WEIGHTS_DIR).resolve()}"
    )
    # train() wrote summary.json (on process 0) if this session finished the training.
    finished_now = result.resumed_from < result.step == config.steps
    summary = result.output_dir / training.SUMMARY_FILE
    cli.report_elapsed(started, summary if finished_now and jax.process_index() == 0 else None)
    return result


main = cli.script_main(run)


if __name__ == "__main__":
    define_flags()
    app.run(main)

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
    """The script's flags (a function, so that tests can define them on their own FlagValues).

    The model and optimisation flags are `training.TrainConfig`'s fields.
    """
    from jaxdissect import training

    cli.define_dataclass_flags(training.TrainConfig, fv)
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
    for name in ("synthetic_images", "resolution"):  # `check_synthetic`'s errors name them
        fv[name].field_name = name
    flags.DEFINE_integer("max_train", None, "Use at most N training images.", flag_values=fv)
    # Output.
    flags.DEFINE_integer(
        "log_every",
        50,
        "A metrics.csv row every N steps: train loss and accuracy averaged over them, the "
        "learning rate of the last.",
        flag_values=fv,
    )
    cli.define_devices_flag(fv)
    flags.DEFINE_string(
        "output_dir", None, "Where the run goes (default: runs/train_<arch>).", flag_values=fv
    )
    flags.DEFINE_bool("progress", True, "Show a progress bar.", flag_values=fv)


def run(fv: flags.FlagValues = FLAGS):
    """Train as the flags say; returns the `training.TrainResult`."""
    started = time.perf_counter()
    from jaxdissect import training

    # Every flag is checked before anything slow starts.
    config = cli.from_flags(training.TrainConfig, fv)
    config.options(num_classes=1)  # --arch and the options it takes, before the data is made
    for name, taker, ignored in (  # (ignored before; their defaults cannot tell in TrainConfig)
        ("momentum", "--optimizer=sgd", config.optimizer != "sgd"),
        ("decay_factor", "--schedule=step", config.schedule != "step"),
    ):
        if ignored:
            cli.refuse_given(
                fv, [name], f"only {taker} takes it (else it is ignored); leave it out"
            )
    for name in ("synthetic_images", "resolution", "max_train", "log_every"):
        if fv[name].value is not None and fv[name].value < 1:
            raise ValueError(f"--{name}={fv[name].value}: must be >= 1")
    if fv.data == "synthetic":
        from jaxdissect.data.probe import check_synthetic

        check_synthetic(fv.synthetic_images, fv.resolution)
    elif not pathlib.Path(fv.data).expanduser().exists():
        raise FileNotFoundError(f"--data={fv.data}: no such folder; {cli.BRODEN_ADVICE}")
    output_dir = fv.output_dir or os.path.join("runs", f"train_{fv.arch}")
    cli.check_devices(fv, batch_size=config.batch_size)
    with cli.claim_output_dir(output_dir):
        return train(fv, config, output_dir, started)


def train(fv: flags.FlagValues, config, output_dir: str, started: float):
    import jax

    from jaxdissect import parallel, scenes, training

    task = scenes.open_scene_task(
        fv.data,
        resolution=fv.resolution,
        synthetic_images=fv.synthetic_images,
        cache_dir=cli.cache_root(),
        max_train=fv.max_train,
    )
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


main = cli.script_main(run, split_cpu=False)  # trains: results per --devices as given


if __name__ == "__main__":
    define_flags()
    app.run(main)

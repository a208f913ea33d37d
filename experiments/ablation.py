r"""Ablate a classifier's units one at a time and a class's most important ones together.

  python experiments/ablation.py --flagfile=experiments/configs/ablation_small_cnn.flags

For a network trained by experiments/train.py and one of its layers: the
per-class validation accuracy when each unit alone is zeroed (or set to its
mean, --value=mean), which ranks the units by their importance to each class;
then, per class, its top N units ablated together for N = 1, 2, 4, ... (the
class's accuracy and the other classes' mean). The same layer is dissected on
the probe set, so every unit's label stands next to the classes it matters for.
With --task=predictions (a network without a labelled task, e.g. the embedded default:
--model=efficientnet_lite0 --weights=pretrained) the images are the probe set's and each
image's class is the intact network's top-1 (the --top_classes most frequent, the rest as
one class 'other'): "accuracy" is then agreement with the intact network, the share of a
class's images whose top-1 stays the same.
Writes ablation.json, ablation_units.csv, ablation_classes.csv, ablation.png,
ablation.html and the dissection (results.json, tally-<layer>.csv) to
--output_dir. Run it again after a kill: finished chunks of masks are kept.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import app, flags, logging

from jaxdissect import cli

FLAGS = flags.FLAGS
TASKS = ("training", "predictions")


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string(
        "weights",
        None,
        "A training export (runs/train_*/weights/step_N); with --task=predictions any weights "
        "experiments/dissect.py takes for --model ('pretrained', an orbax dir, '').",
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "task",
        "training",
        list(TASKS),
        "training: the export's classification task (accuracy); predictions: the probe "
        "images labelled by the intact network's top-1 ('accuracy' is then agreement with "
        "the intact network), for a network without a labelled task.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "model", None, "Architecture of --task=predictions (as dissect.py's).", flag_values=fv
    )
    cli.define_model_option_flags(fv)  # of --task=predictions' --model
    flags.DEFINE_integer(
        "top_classes",
        10,
        "--task=predictions: the classes are the K most frequent intact predictions; "
        "the other images form one class, 'other'.",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "class_names",
        None,
        "--task=predictions: a text file of the network's class names, one a line in logit "
        "order (e.g. ImageNet's 1,000); default: logit<i>.",
        flag_values=fv,
    )
    flags.DEFINE_string("layer", "conv5", "The layer whose units are ablated.", flag_values=fv)
    flags.DEFINE_enum(
        "value",
        "zero",
        ["zero", "mean"],
        "Ablated units are set to zero or to their mean activation over the validation images.",
        flag_values=fv,
    )
    flags.DEFINE_list(
        "top_n",
        ["1", "2", "4", "8", "16", "32", "64", "128", "256", "512"],
        "N of the top-N curves (those above the layer's width are left out).",
        flag_values=fv,
    )
    flags.DEFINE_integer(
        "masks_per_call",
        32,
        "Unit masks evaluated in one compiled call (memory vs calls).",
        flag_values=fv,
    )
    flags.DEFINE_integer("eval_batch_size", 64, "Validation images per batch.", flag_values=fv)
    flags.DEFINE_string(
        "eval_data",
        None,
        "The classification task, as experiments/train.py's --data (default: --data).",
        flag_values=fv,
    )
    flags.DEFINE_bool(
        "dissect",
        True,
        "Dissect the layer on the probe set for the units' labels.",
        flag_values=fv,
    )
    flags.DEFINE_string("output_dir", None, "Default: runs/ablation_<layer>.", flag_values=fv)
    cli.define_input_flags(fv)
    cli.define_dissection_flags(fv, split="val", synthetic_images=4000, resolution=96)


def run(fv: flags.FlagValues = FLAGS):
    """Run the study as the flags say; returns the ablation.json document."""
    started = time.perf_counter()
    from jaxdissect import training

    if fv.task == "predictions":
        from jaxdissect.models import load as model_load

        if not fv.model:
            raise ValueError("--task=predictions needs --model (e.g. efficientnet_lite0)")
        model_load.check_request(
            fv.model, fv.weights or None, fv.num_classes, cli.model_options(fv)
        )
        if fv.top_classes < 1:
            raise ValueError(f"--top_classes={fv.top_classes}: must be >= 1")
        if fv.eval_data:  # (ignored before: the task is the probe set's predictions)
            raise ValueError(
                f"--eval_data={fv.eval_data}: --task=predictions labels the probe images "
                "(--data) by the intact network; leave it out, or give --task=training"
            )
        if fv.class_names and not os.path.isfile(fv.class_names):
            what = "a folder" if os.path.isdir(fv.class_names) else "no such file"
            raise FileNotFoundError(
                f"--class_names={fv.class_names}: {what}; give a text file of the logits' "
                "names, one a line"
            )
    elif fv.class_names or fv["top_classes"].present:  # (ignored before)
        given = (
            f"--class_names={fv.class_names}"
            if fv.class_names
            else f"--top_classes={fv.top_classes}"
        )
        raise ValueError(
            f"{given}: only --task=predictions uses it (--task=training's classes are the "
            "export's task's); leave it out, or give --task=predictions"
        )
    elif fv.model or fv.model_option or fv.num_classes is not None:
        given = "--model" if fv.model else cli.given_option_flags(fv)
        raise ValueError(
            f"{given}{'=' + fv.model if fv.model else ''}: --task=training ablates the "
            "training export --weights (its architecture and options from its meta.json); "
            f"drop {given}, or give --task=predictions to ablate --model"
        )
    elif not training.is_export(fv.weights):
        raise ValueError(
            f"--weights={fv.weights}: not a training export; ablation needs a "
            "classifier and its task (experiments/train.py writes runs/train_*/weights/step_N), "
            "or --task=predictions with --model"
        )
    settings, options = cli.settings_from_flags(fv), cli.options_from_flags(fv)
    probe = cli.probe_from_flags(fv)
    cli.check_input_size(fv.input_size)
    ns = cli.parse_numbers(fv.top_n, "--top_n", int)
    if any(n < 1 for n in ns):
        raise ValueError(f"--top_n={','.join(fv.top_n)}: each N must be >= 1")
    if fv.masks_per_call < 1:
        raise ValueError(f"--masks_per_call={fv.masks_per_call}: must be >= 1")
    if fv.eval_batch_size < 1:
        raise ValueError(f"--eval_batch_size={fv.eval_batch_size}: must be >= 1")
    output_dir = fv.output_dir or os.path.join("runs", f"ablation_{fv.layer}")
    cli.check_devices(fv, batch_size=settings.batch_size if fv.dissect else None)
    with cli.claim_output_dir(output_dir):
        doc = _ablate(fv, settings, options, probe, ns, output_dir)
    for c in doc["classes"]:
        print(_summary_line(c))
    cli.report_elapsed(started, os.path.join(output_dir, "ablation.json"))
    return doc


def _summary_line(c: dict) -> str:
    """One class's line: its accuracy and the others' with its top units removed."""
    curve = c["curve"]
    if curve["class_accuracy"][0] is None:
        return f"{c['class']}: no images of this class in the evaluation data"
    acc = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731  (no other class's images)
    tops = ", ".join(f"{u['unit']} ({u['name'] or '-'})" for u in c["units"][:3])
    i = min(3, len(curve["n"]) - 1)  # the fourth N of the curve, or its last
    return (
        f"{c['class']}: accuracy {acc(curve['class_accuracy'][0])} -> "
        f"{acc(curve['class_accuracy'][i])} with the top {curve['n'][i]} removed (others "
        f"{acc(curve['others_accuracy'][0])} -> {acc(curve['others_accuracy'][i])}); "
        f"top units {tops}"
    )


def _ablate(fv, settings, options, probe, ns, output_dir):
    import pathlib

    import numpy as np

    from jaxdissect import (
        ablation,
        ablation_files,
        evaluate,
        parallel,
        pipeline,
        results,
        rotation,
        scenes,
        store,
        training,
    )
    from jaxdissect.data.synthetic import scene_rule
    from jaxdissect.report import ablation_page

    out = pathlib.Path(output_dir)
    # The probe set first (where it is used): a missing or bad one fails before the model
    # is loaded.
    source = dataset_name = None
    if fv.task == "predictions" or fv.dissect:
        source, dataset_name = probe.open()
    mesh = parallel.data_mesh(fv.devices)
    batch_size = evaluate.batch_size_for(mesh, fv.eval_batch_size)
    if fv.task == "predictions":
        from jaxdissect.models import load as model_load

        loaded = model_load.load(
            fv.model, weights=fv.weights or None, options=cli.model_options(fv), seed=settings.seed
        )
    else:
        loaded = training.load_trained(fv.weights)
    _check_classifier(loaded, fv.model or fv.weights)
    # The probe images fed as --input_norm and --input_size say (default: the model's own).
    info = cli.model_info(loaded, fv.input_norm, fv.input_size)
    if not fv.dissect:  # nothing replaces another model's dissection there: refused
        pipeline.check_output_dir(out, info)
    spec = info.input_spec
    # The intact network: the task's predictions and the cost of one forward pass.
    network = rotation.classifier(loaded.module, spec, apply_kwargs=loaded.apply_kwargs, mesh=mesh)
    if fv.task == "predictions":
        images = np.stack([np.asarray(source.read_image(i)) for i in range(len(source))])
        unlabelled = scenes.eval_batches(
            scenes.SceneSplit(images, np.zeros(len(images), np.int32), np.arange(len(images))),
            batch_size,
            dtype="float32",
        )
        logits = network(loaded.variables, unlabelled, logits=True).logits
        names = ablation.read_logit_names(fv.class_names) if fv.class_names else None
        if names is not None and len(names) != logits.shape[1]:
            raise ValueError(
                f"--class_names={fv.class_names} has {len(names)} names for the network's "
                f"{logits.shape[1]} logits; give one name a line, in logit order"
            )
        ptask = ablation.prediction_task(logits, fv.top_classes, logit_names=names)
        batches = ablation.prediction_batches(images, ptask, batch_size)
        class_names, num_classes = ptask.class_names, ptask.num_classes
        # The targets are the network's own decisions: they key the masks' chunks too.
        targets = {"classes": ptask.classes, "prediction": ptask.prediction, "label": ptask.label}
        fingerprint = store.key_of(
            probe=source.fingerprint(),
            top_classes=fv.top_classes,
            targets=store.fingerprint_tree(targets),
        )
        description = (
            f"predictions: agreement of the top-1 with the intact network's on {dataset_name}"
        )
        eval_images = len(images)
    else:
        task = cli.training_task(fv)
        batches = scenes.eval_batches(task.val, batch_size, dtype="float32")
        class_names, num_classes = task.class_names, task.num_classes
        fingerprint, description, eval_images = task.fingerprint, task.description, len(task.val)
    size = spec.size
    path, k = rotation.resolve_layer(loaded.module, loaded.variables, fv.layer, size)
    record = None
    if fv.dissect:
        pipeline.dissect(
            info,
            [fv.layer],
            source,
            settings,
            out,
            dataset_name=dataset_name,
            mesh=mesh,
            options=options,
        )
        record = results.read_results_json(out / "results.json")["layers"][0]
    fill = None
    if fv.value == ablation.MEAN:
        fill = ablation.unit_means(
            loaded.module,
            loaded.variables,
            path,
            batches,
            input_spec=spec,
            input_size=size,
            apply_kwargs=loaded.apply_kwargs,
        )
    key = chunk_key(
        info.stage_key,
        spec,
        path,
        fingerprint,
        fv.value,
        mesh=mesh,
        batch_size=batch_size,
    )
    t0 = time.perf_counter()
    ablator = ablation.Ablator(
        loaded.module, spec, path, apply_kwargs=loaded.apply_kwargs, mesh=mesh
    )
    result = ablation.ablation_study(
        ablator,
        loaded.variables,
        batches,
        num_units=k,
        num_classes=num_classes,
        value=fv.value,
        fill=fill,
        ns=ns,
        work_dir=out / ".work" / f"ablation-{key}",
        masks_per_call=fv.masks_per_call,
    )
    elapsed = time.perf_counter() - t0
    if fv.task == "predictions" and (note := ablation.intact_disagreement(result)):
        logging.warning("%s", note)
    # The cost in forward passes: one evaluation of the intact network (compiled before).
    network(loaded.variables, batches[:1])
    t1 = time.perf_counter()
    network(loaded.variables, batches)
    forward_s = time.perf_counter() - t1
    labels = ablation_files.unit_labels(record, k)
    # The synthetic scenes are defined by the objects they show (data/synthetic/scene_rule.py).
    defining = scene_rule.defining_objects()
    if not set(class_names) <= set(defining):
        defining = None
    num_masks = 1 + k + num_classes * len(result.ns)
    settings_doc = {
        "weights": fv.weights,
        "layer": fv.layer,
        "path": path,
        "units": k,
        "value": fv.value,
        "eval_images": eval_images,
        "eval_batch_size": batch_size,
        "devices": int(mesh.devices.size),
        "task": description,
    }
    if fv.task == "predictions":
        settings_doc.update(
            model=fv.model,
            top_classes=fv.top_classes,
            class_logits=[int(c) for c in ptask.classes],
        )
    doc = ablation_files.write_ablation_files(
        out,
        result,
        class_names,
        labels,
        settings_doc,
        extra={
            "ablation_s": elapsed,
            "forward_s": forward_s,
            "forward_pass_equivalents": elapsed / forward_s if forward_s > 0 else None,
            "masks_evaluated": num_masks,
            "finding": ablation_files.finding(result, class_names, labels, defining=defining),
        },
        measure="agreement with the intact network" if fv.task == "predictions" else "accuracy",
    )
    try:  # the dissection beside the page, this run's or (--nodissect) an earlier one
        dissected = results.read_results_json(out / "results.json")["settings"]["layers"]
    except (OSError, ValueError, KeyError):
        dissected = []
    ablation_page.write_page(
        out, doc, strips_dir=ablation_page.strips_dir(out, dissected, fv.layer)
    )
    return doc


main = cli.script_main(run)


def chunk_key(
    model: str, spec: Any, path: str, data: str, value: str, *, mesh: Any, batch_size: int
) -> str:
    """Key of the stored mask chunks (`.work/ablation-<key>`): the model by its stage key
    (weights, definition, library code: a model whose code changed is evaluated again),
    the input spec, layer, evaluation data and fill value, and the mesh's device count and
    backend and the eval batch size (sums split over other devices or batches, or computed
    at another precision, round differently)."""
    import dataclasses

    from jaxdissect import code_keys, store

    return store.key_of(
        model=model,
        input_spec=dataclasses.asdict(spec),
        layer=path,
        data=data,
        value=value,
        study="ablation",
        devices=int(mesh.devices.size),
        backend=code_keys.backend_of(mesh),
        batch_size=batch_size,
    )


def _check_classifier(loaded, name: str) -> None:
    """One line for a model ablation cannot run: not Linen (rules are Linen interceptors),
    or an output that is no [batch, classes] logits."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    if not isinstance(loaded.module, nn.Module):
        raise ValueError(
            f"--model={name}: ablation needs a flax.linen Module (its rules act through Linen's "
            f"method interceptors), got {type(loaded.module).__name__}"
        )
    from jaxdissect import evaluate

    try:
        evaluate.check_has_logits(loaded.module)
    except ValueError as e:
        raise ValueError(f"--model={name}: {e}") from None
    size = loaded.input_spec.size
    out = jax.eval_shape(
        lambda v, x: loaded.module.apply(v, x, **loaded.apply_kwargs),
        loaded.variables,
        jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32),
    )
    if not hasattr(out, "shape") or len(out.shape) != 2:
        what = f"shape {tuple(out.shape)}" if hasattr(out, "shape") else type(out).__name__
        raise ValueError(
            f"--model={name}: its output for 2 images is {what}; ablation needs "
            "[images, classes] logits"
        )


if __name__ == "__main__":
    define_flags()
    app.run(main)

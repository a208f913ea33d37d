r"""Net2Vec concept vectors: a weighted sum of a layer's unit masks per concept, against the
best single unit, on held-out probe images.

  python experiments/concept_vectors.py --flagfile=experiments/configs/concept_vectors_demo.flags

Builds on a finished dissection (--dissection, the output_dir of experiments/dissect.py):
its thresholds, tie rule and activation dtype make the unit masks, its labels name the units.
The probe set (--data ...) is split into training and held-out images (--heldout_fraction);
one probe per concept, sigmoid(sum_k w_k m_k + b), is trained on the training images for all
concepts at once (jaxdissect/concept_vectors.py) and scored by set IoU on the held-out ones,
beside the single unit with the best training IoU, scored on the same held-out images.
Writes concept_vectors.{json,csv,npz,png,html} to --output_dir; a killed run resumes.
"""

from __future__ import annotations

import os
import time
from typing import Any

from absl import flags

from jaxdissect import cli

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    from jaxdissect import concept_vectors

    cli.define_finished_dissection_flags(fv)
    flags.DEFINE_list(
        "categories",
        [],
        "Categories whose concepts get vectors (default: those the dissection scored).",
        flag_values=fv,
    )
    fv["categories"].field_name = "categories"  # `LabelSpace.select`'s errors name it
    flags.DEFINE_integer("top_units", 5, "Top-weighted units listed per concept.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 32, "Images per forward batch.", flag_values=fv)
    cli.define_devices_flag(fv)
    flags.DEFINE_bool("progress", True, "Log the training loss every epoch.", flag_values=fv)
    flags.DEFINE_string(
        "output_dir", None, "Default: runs/concept_vectors_<layer>.", flag_values=fv
    )
    cli.define_dataclass_flags(cli.Probe, fv, defaults={"synthetic_images": 600})
    cli.define_dataclass_flags(concept_vectors.ProbeConfig, fv)


def run(fv: flags.FlagValues = FLAGS):
    """Train and score the vectors as the flags say; returns the concept_vectors.json document."""
    started = time.perf_counter()
    from jaxdissect import concept_vectors, finished

    cfg = cli.from_flags(concept_vectors.ProbeConfig, fv)
    probe = cli.probe_from_flags(fv)
    if fv.top_units < 1:
        raise ValueError(f"--top_units={fv.top_units}: must be >= 1")
    if fv.batch_size < 1:
        raise ValueError(f"--batch_size={fv.batch_size}: must be >= 1")
    # Fail before loading anything when there is no finished dissection of the layer.
    finished.read_layer(fv.dissection, fv.layer)
    output_dir = fv.output_dir or os.path.join("runs", f"concept_vectors_{fv.layer}")
    cli.check_devices(fv, probe_batch_size=cfg.probe_batch_size)
    with cli.claim_output_dir(output_dir):
        doc = _vectors(fv, cfg, probe, output_dir)
    s = doc["summary"]
    print(
        f"{fv.layer}: the vector beats the best single unit for {s['beats']} of {s['scored']} "
        f"concepts ({100 * (s['beats_share'] or 0):.0f}%), mean gain {s['mean_gain']:.3f}; "
        f"training {doc['cost']['train_s']:.1f} s = "
        f"{doc['cost']['forward_pass_equivalents']:.2f} forward passes over the probe set"
    )
    cli.report_elapsed(started, os.path.join(output_dir, "concept_vectors.json"))
    return doc


def _vectors(fv, cfg, probe, output_dir):
    import pathlib
    import shutil

    import numpy as np
    from absl import logging

    from jaxdissect import concept_vectors, engine, finished, parallel, store
    from jaxdissect.report import concept_page, plots

    out = pathlib.Path(output_dir)
    source, dataset_name = probe.open()  # a missing or bad probe set fails before the model loads
    finished.check_probe_set(fv.dissection, dataset_name, source)
    concept_vectors.check_batch_fits(cfg, len(source))
    if fv.categories:  # repeated or unknown names: one line before the model loads
        try:
            source.labels.select(fv.categories)
        except ValueError as e:
            raise ValueError(cli.flag_message(str(e), fv)) from None
    loaded, layer = finished.load_dissected_layer(
        fv.model, fv.weights, fv.dissection, fv.layer, cli.model_options(fv)
    )
    categories = list(fv.categories) or layer.categories
    unknown = [c for c in categories if c not in source.labels.categories]
    if unknown:
        raise ValueError(
            f"--categories: {unknown} not in the probe set's {source.labels.categories}"
        )
    categories = source.labels.select(categories)  # in the label space's order
    # Each label's category among those chosen, as the dissection chose it (without
    # `material`, `wood` is an object).
    labels = engine.restrict_categories(
        source.labels, categories, getattr(source, "coverage", None)
    )
    # The probe data as memory-mapped files (a full Broden's exceed memory), rewritten by
    # every run and removed after it.
    # float16 activations stay float16 (exact: the forward rounds them to it).
    data_dir = out / ".work" / "concept_vectors_data"
    try:
        forward = finished.layer_forward(loaded, layer)
        kept = np.float16 if layer.activation_dtype == "float16" else np.float32
        data, forward_s = concept_vectors.collect(
            lambda images: np.asarray(forward(images)).astype(kept),
            source,
            fv.batch_size,
            directory=data_dir,
            categories=categories,  # the concepts' masks of these categories' planes alone
        )
        logging.info(
            "%s: activations and labels of %d images collected (forward %.1f s)",
            fv.layer,
            len(source),
            forward_s,
        )
        wanted = labels.primary >= 0
        present = data.labels_present(labels.num_labels)
        concepts = np.flatnonzero(wanted & present).astype(np.int32)
        if len(concepts) == 0:
            raise ValueError(
                f"--categories={','.join(categories)}: no concept of them in the probe set"
            )
        mesh = parallel.data_mesh(fv.devices)
        key = checkpoint_key(
            cli.model_info(loaded).stage_key,
            layer,
            data=source.fingerprint(),
            mesh=mesh,
            batch_size=fv.batch_size,
            concepts=concepts.tolist(),
            categories=categories,
            config=cfg,
        )

        def progress(step: int, steps: int, loss: float) -> None:
            if fv.progress and (step % max(1, steps // cfg.epochs) == 0 or step == steps):
                logging.info("step %d of %d: loss %.4f", step, steps, loss)

        vectors = concept_vectors.train_concept_vectors(
            data,
            layer.thresholds,
            concepts,
            cfg,
            tie_rule=layer.tie_rule,
            mesh=mesh,
            checkpoint_dir=out / ".work" / f"concept_vectors-{key}",
            progress=progress,
        )
        del data  # its memory maps, before their files go
    finally:  # also when interrupted: a full Broden's take tens of GB
        shutil.rmtree(data_dir, ignore_errors=True)
    devices = int(mesh.devices.size)
    doc = _document(fv, cfg, layer, vectors, labels, dataset_name, len(source), forward_s, devices)
    _warn_unweighted(doc["concepts"])
    stem = "concept_vectors"
    store.write_json(out / f"{stem}.json", doc, checksum=True)
    rows = [
        {
            **{k: v for k, v in c.items() if k != "top_units"},
            "top_units": "; ".join(
                f"{u['unit']} {u['weight']:.3f}" + (f": {u['label']}" if u["label"] else "")
                for u in c["top_units"]
            ),
        }
        for c in doc["concepts"]
    ]
    store.write_rows_csv(out / f"{stem}.csv", rows)
    store.save_arrays(
        out / f"{stem}.npz",
        {
            "concepts": vectors.concepts,
            "weights": vectors.weights,
            "bias": vectors.bias,
            "thresholds": layer.thresholds,
            "train_images": vectors.train_images,
            "heldout_images": vectors.heldout_images,
        },
    )
    scored = [c for c in doc["concepts"] if c["scored"]]
    plots.plot_iou_scatter(
        out / f"{stem}.png",
        [c["single_iou"] for c in scored],
        [c["iou"] for c in scored],
        [c["category"] for c in scored],
        title=f"{fv.layer}: concept vector vs best single unit (held-out IoU)",
    )
    concept_page.write_page(out, doc)
    return doc


def checkpoint_key(
    model: str,
    layer: Any,
    *,
    data: str,
    mesh: Any,
    batch_size: int,
    concepts: list[int],
    categories: list[str],
    config: Any,
) -> str:
    """Key of the training checkpoints (`.work/concept_vectors-<key>`): everything they
    depend on. The model by its stage key (weights, definition, library code); the
    finished `layer`'s masks (path, token layout, thresholds, tie rule, dtype, input
    spec); the probe data, concepts and categories; the `ProbeConfig`; the mesh's device
    count and backend (the training's sums split over other devices, or at another
    precision, round differently) and the collection forward's batch size (XLA rounds a
    layer's activations per batch shape)."""
    import dataclasses

    from jaxdissect import code_keys, store

    return store.key_of(
        model=model,
        token_layout=layer.token_layout,
        devices=int(mesh.devices.size),
        backend=code_keys.backend_of(mesh),
        batch_size=batch_size,
        data=data,
        layer=layer.path,
        thresholds=layer.thresholds.tolist(),
        tie_rule=layer.tie_rule,
        activation_dtype=layer.activation_dtype,
        input_spec=dataclasses.asdict(layer.input_spec),
        concepts=concepts,
        categories=categories,
        config=dataclasses.asdict(config),
    )


def _warn_unweighted(records) -> None:
    """Warn of the concepts covering every training pixel (alpha = 0, in concept_vectors.json's
    records): their loss has no weight, so the probe stays at its zero init, predicts nothing,
    scores IoU 0 and counts as a tie in the summary."""
    from absl import logging

    names = [r["name"] for r in records if r["alpha"] == 0]
    if names:
        logging.warning(
            "concepts covering every training pixel (alpha = 0: no loss to train on) predict "
            "nothing, score IoU 0 and count as ties: %s",
            ", ".join(names),
        )


def _document(fv, cfg, layer, vectors, labels, dataset_name, num_images, forward_s, devices):
    import dataclasses

    import numpy as np

    from jaxdissect import concept_vectors

    def unit_label(k: int) -> str | None:
        return layer.label_of(int(k))

    records = []
    for j, c in enumerate(vectors.concepts):
        w = vectors.weights[j]
        top = [int(k) for k in np.argsort(-w, kind="stable")[: fv.top_units] if w[k] > 0]
        no_unit = vectors.single_unit[j] == concept_vectors.NO_UNIT
        records.append(
            {
                "label": int(c),
                "name": labels.names[c],
                "category": labels.category_of(int(c)),
                "iou": float(vectors.iou[j]),
                "single_unit": None if no_unit else int(vectors.single_unit[j]),
                "single_unit_label": None if no_unit else unit_label(vectors.single_unit[j]),
                "single_iou": float(vectors.single_iou[j]),
                "gain": float(vectors.gain[j]),
                "best_heldout_unit": None
                if vectors.best_heldout_unit[j] == concept_vectors.NO_UNIT
                else int(vectors.best_heldout_unit[j]),
                "best_heldout_iou": float(vectors.best_heldout_iou[j]),
                "train_pixels": int(vectors.train_truth[j]),
                "heldout_pixels": int(vectors.truth[j]),
                "predicted_pixels": int(vectors.predicted[j]),
                "alpha": float(vectors.alpha[j]),
                "bias": float(vectors.bias[j]),
                # Scored: the concept has pixels in both splits.
                "scored": bool(vectors.train_truth[j] > 0 and vectors.truth[j] > 0),
                "top_units": [
                    {
                        "unit": k,
                        "weight": float(w[k]),
                        "label": unit_label(k),
                        "category": layer.units[k]["category"],
                        "iou": float(layer.units[k]["iou"]),
                    }
                    for k in top
                ],
            }
        )
    scored = [r for r in records if r["scored"]]
    gains = np.array([r["gain"] for r in scored])
    beats = int((gains > 0).sum())
    train_steps = len(vectors.losses)
    return {
        "settings": {
            "dissection": fv.dissection,
            "layer": layer.layer,
            "path": layer.path,
            "model": layer.model,
            "weights": fv.weights,
            "units": layer.num_units,
            "tie_rule": layer.tie_rule,
            "activation_dtype": layer.activation_dtype,
            "dataset": dataset_name,
            "images": num_images,
            "train_images": len(vectors.train_images),
            "heldout_images": len(vectors.heldout_images),
            "categories": sorted({r["category"] for r in records}),
            **dataclasses.asdict(cfg),
            "devices": devices,
        },
        "summary": {
            "concepts": len(records),
            "scored": len(scored),
            "beats": beats,
            "beats_share": beats / len(scored) if scored else None,
            "ties": int((gains == 0).sum()),
            "mean_gain": float(gains.mean()) if scored else 0.0,
            "median_gain": float(np.median(gains)) if scored else 0.0,
            "mean_vector_iou": float(np.mean([r["iou"] for r in scored])) if scored else 0.0,
            "mean_single_iou": float(np.mean([r["single_iou"] for r in scored])) if scored else 0.0,
            "beats_best_heldout_unit": int(sum(r["iou"] > r["best_heldout_iou"] for r in scored)),
            "final_loss": float(vectors.losses[-1]) if train_steps else None,
        },
        "cost": {
            "train_s": vectors.train_s,
            "train_steps": train_steps,
            "forward_s": forward_s,
            # Training time over one forward pass of the layer over the whole probe set.
            "forward_pass_equivalents": vectors.train_s / forward_s if forward_s else None,
        },
        "concepts": records,
    }


main = cli.script_main(run, split_cpu=False)  # trains: results per --devices as given


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)

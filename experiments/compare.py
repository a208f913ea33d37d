r"""Compare dissections of several models and layers: one table, the paper's bar figures.

  python experiments/compare.py --flagfile=experiments/configs/compare_lite0_layers.flags

Entries are existing dissections (--results=NAME=DIR, DIR holding a
results.json from experiments/dissect.py, rotation.py or training_dynamics.py)
and/or models to dissect here (--dissect='NAME|MODEL|WEIGHTS|LAYERS': MODEL and
WEIGHTS as experiments/dissect.py takes them, or MODEL empty and WEIGHTS a
training export of experiments/train.py; LAYERS comma-separated). Writes
compare.csv (one row per model and layer: units, interpretable units, unique
detectors, and per category the unique detectors, interpretable units and
share of the unique detectors), compare.json, compare_unique.png (grouped
bars), compare_unique_stacked.png and compare_interpretable.png.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    from jaxdissect import training

    flags.DEFINE_multi_string("results", [], "NAME=DIR of an existing dissection.", flag_values=fv)
    flags.DEFINE_multi_string(
        "dissect",
        [],
        "NAME|MODEL|WEIGHTS|LAYERS of a model to dissect (into <output_dir>/NAME).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "output_dir", "runs/compare", "Where the table and figures go.", flag_values=fv
    )
    training.define_dissection_flags(fv, split="all", resolution=224)


def parse_entry(text: str) -> tuple[str, str, str, list[str]]:
    """'NAME|MODEL|WEIGHTS|LAYERS' -> (name, model, weights, layers)."""
    parts = text.split("|")
    if len(parts) != 4 or not parts[0] or not parts[3]:
        raise ValueError(f"--dissect={text!r}: expected NAME|MODEL|WEIGHTS|LAYERS")
    name, model, weights, layers = parts
    return name, model, weights, [s.strip() for s in layers.split(",") if s.strip()]


def run(fv: flags.FlagValues = FLAGS) -> list[dict]:
    """Dissect and collect as the flags say; returns the table's rows."""
    from jaxdissect import parallel, pipeline, training
    from models import load as model_load

    training.quiet_library_logs()
    if not fv.results and not fv.dissect:
        raise ValueError("nothing to compare: give --results and/or --dissect")
    rows: list[dict] = []
    entries: list[dict] = []
    source = None
    for text in fv.dissect:
        name, model, weights, layers = parse_entry(text)
        if model:
            loaded = model_load.load(model, weights=weights or None)
        else:
            loaded = training.load_trained(weights)
        if source is None:
            source, dataset_name = training.probe_from_flags(fv)
        out = os.path.join(fv.output_dir, name)
        pipeline.dissect(
            pipeline.ModelInfo(
                loaded.module,
                loaded.variables,
                loaded.input_spec,
                loaded.name,
                loaded.key,
                loaded.apply_kwargs,
            ),
            layers,
            source,
            training.settings_from_flags(fv),
            out,
            dataset_name=dataset_name,
            mesh=parallel.data_mesh(fv.devices),
            options=training.options_from_flags(fv),
        )
        # results.json names layers by module path; the table keeps the names asked for.
        for layer, row in zip(layers, training.results_rows(name, out), strict=True):
            rows.append({**row, "layer": layer, "path": row["layer"]})
        entries.append({"name": name, "model": model, "weights": weights, "layers": layers})
    for text in fv.results:
        name, sep, directory = text.partition("=")
        if not sep or not name:
            raise ValueError(f"--results={text!r}: expected NAME=DIR")
        rows.extend(training.results_rows(name, directory))
        entries.append({"name": name, "results": directory})
    files = training.write_comparison(fv.output_dir, rows, {"entries": entries})
    for r in rows:
        by_cat = ", ".join(
            f"{k[len('unique_') :]} {v}"
            for k, v in r.items()
            if k.startswith("unique_") and k != "unique_detectors"
        )
        print(
            f"{r['name']} {r['layer']}: {r['unique_detectors']} unique detectors ({by_cat}), "
            f"{r['interpretable_units']}/{r['num_units']} interpretable"
        )
    print(f"table: {os.path.abspath(files['csv'])}")
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        run(FLAGS)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        logging.error("%s: %s", type(e).__name__, e)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    define_flags()
    app.run(main)

r"""Compare dissections of several models and layers: one table, the paper's bar figures.

  python experiments/compare.py --flagfile=experiments/configs/compare_lite0_layers.flags

Entries are existing dissections (--results=NAME=DIR, DIR holding a
results.json from experiments/dissect.py, rotation.py or training_dynamics.py)
and/or models to dissect here (--dissect='NAME|MODEL|WEIGHTS|LAYERS': MODEL and
WEIGHTS as experiments/dissect.py takes them, or MODEL empty and WEIGHTS a
training export of experiments/train.py; LAYERS comma-separated; NAME a folder name),
all of one probe set (the same dataset, split and number of images) and one method
(iou_threshold, categories, quantile, threshold_on, restriction, tie_rule and
activation_dtype equal; --allow_mixed_settings compares others with a warning each,
and compare.json's settings.mixed_settings lists them; each row carries these settings, and how
its thresholds were estimated: rows of exact and sketched thresholds are compared with a
warning, listed there too). Writes
compare.csv (one row per model and layer: num_units, interpretable_units,
unique_detectors, and per category C the unique detectors `unique:C`,
interpretable units `interpretable:C` and share of the unique detectors
`share:C`), compare.json, compare_unique.png (grouped
bars), compare_unique_stacked.png and compare_interpretable.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from collections.abc import Iterator
from typing import Any

from absl import app, flags

from jaxdissect import cli

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_multi_string("results", [], "NAME=DIR of an existing dissection.", flag_values=fv)
    flags.DEFINE_multi_string(
        "dissect",
        [],
        "NAME|MODEL|WEIGHTS|LAYERS[|OPTIONS] of a model to dissect (into <output_dir>/NAME); "
        "OPTIONS: MODEL's constructor options key=value,... as dissect.py's --model_option "
        "(e.g. num_classes=365 for a Places checkpoint).",
        flag_values=fv,
    )
    flags.DEFINE_string(
        "output_dir", "runs/compare", "Where the table and figures go.", flag_values=fv
    )
    flags.DEFINE_bool(
        "allow_mixed_settings",
        False,
        "Compare entries dissected with other iou_threshold, categories, quantile, "
        "threshold_on, restriction, tie_rule or activation_dtype (a warning each; refused "
        "without this flag).",
        flag_values=fv,
    )
    cli.define_input_flags(fv)  # of every --dissect entry
    cli.define_dissection_flags(fv, synthetic_images=4000)


def parse_entry(text: str) -> tuple[str, str, str, list[str], dict[str, Any]]:
    """'NAME|MODEL|WEIGHTS|LAYERS[|OPTIONS]' -> (name, model, weights, layers, options);
    NAME is a folder name, OPTIONS MODEL's constructor options 'key=value,...'."""
    from jaxdissect.models import load as model_load

    parts = text.split("|")
    if len(parts) not in (4, 5) or not parts[0] or not parts[3]:
        raise ValueError(f"--dissect={text!r}: expected NAME|MODEL|WEIGHTS|LAYERS[|OPTIONS]")
    name, model, weights, layers = parts[:4]
    pairs = [p.strip() for p in (parts[4] if len(parts) == 5 else "").split(",") if p.strip()]
    try:
        options = model_load.parse_options(pairs)
    except ValueError as e:
        raise ValueError(f"--dissect={text!r}: {_entry_flags(str(e))}") from None
    if options and not model:
        raise ValueError(
            f"--dissect={text!r}: OPTIONS are MODEL's; a training export (no MODEL) carries "
            "its own: leave them out"
        )
    weights = os.path.expanduser(weights)  # inside the flag: no shell expanded `~`
    if not re.fullmatch(r"[\w.-]+", name) or name in (".", ".."):
        raise ValueError(
            f"--dissect={text!r}: NAME {name!r} names the folder <output_dir>/NAME: use "
            "letters, digits, '_', '-' and '.' only"
        )
    return name, model, weights, [s.strip() for s in layers.split(",") if s.strip()], options


def _entry_flags(message: str) -> str:
    """A model loader's `message` with the flags of dissect.py written as the parts of a
    --dissect entry (MODEL, WEIGHTS, OPTIONS); a command it advises ('python ...') is kept."""
    message, run, command = message.partition("python ")
    for flag, part in (
        ("--num_classes (or --model_option)", "OPTIONS num_classes=N"),
        ("--num_classes=", "OPTIONS num_classes="),
        ("--num_classes", "OPTIONS num_classes"),
        ("--model_option", "OPTIONS"),
        ("--model", "MODEL"),
        ("--weights", "WEIGHTS"),
    ):
        message = message.replace(flag, part)
    return message + run + command


def _refuse_dissection_flags(fv: flags.FlagValues) -> None:
    """With --results entries alone nothing is dissected here: a probe-set, method, input or
    run flag would be ignored (each row keeps its results.json's), so it is refused."""
    import dataclasses

    from jaxdissect import config, engine, pipeline

    names = [
        f.metadata.get(config.FLAG, f.name)
        for cls in (cli.Probe, engine.Settings, pipeline.Options)
        for f in dataclasses.fields(cls)
        if f.name != "progress"
    ]
    cli.refuse_given(
        fv,
        (*names, "input_norm", "input_size", "devices"),
        "only --dissect entries are dissected here; the --results entries keep the settings "
        "they were dissected with: leave it out",
    )


@contextlib.contextmanager
def _named_as_entry(name: str) -> Iterator[None]:
    """A model loader's ValueError or FileNotFoundError, raised naming the --dissect entry
    `name` and its parts."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        kind = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
        raise kind(f"--dissect={name}|...: {_entry_flags(str(e))}") from None


def run(fv: flags.FlagValues = FLAGS) -> list[dict]:
    """Dissect and collect as the flags say; returns the table's rows."""
    started = time.perf_counter()
    from jaxdissect import parallel, pipeline, results, studies, training
    from jaxdissect.data import probe as probe_sets
    from jaxdissect.models import load as model_load

    if not fv.results and not fv.dissect:
        raise ValueError("nothing to compare: give --results and/or --dissect")
    if not fv.dissect:
        _refuse_dissection_flags(fv)
    # Every flag is checked before anything slow starts.
    settings, options = cli.settings_from_flags(fv), cli.options_from_flags(fv)
    probe = cli.probe_from_flags(fv)
    cli.check_input_size(fv.input_size)
    dissections = [parse_entry(text) for text in fv.dissect]
    for name, model, weights, layers, model_options in dissections:
        cli.check_layers(layers, f"--dissect={name}|...|LAYERS")
        if model:
            with _named_as_entry(name):
                model_load.check_request(
                    model, weights or None, model_options.get("num_classes"), model_options
                )
        elif not training.is_export(weights):
            raise FileNotFoundError(
                f"--dissect={name}||{weights}|...: {weights} is no training export; train "
                f"first: {model_load.TRAIN_COMMAND}, or give MODEL"
            )
    given = []
    for text in fv.results:
        name, sep, directory = text.partition("=")
        directory = os.path.expanduser(directory)  # inside the flag: no shell expanded `~`
        if not sep or not name:
            raise ValueError(f"--results={text!r}: expected NAME=DIR")
        if not (
            os.path.isfile(directory) or os.path.isfile(os.path.join(directory, "results.json"))
        ):
            raise FileNotFoundError(
                f"--results={text}: {directory} holds no results.json (a finished dissection)"
            )
        given.append((name, directory))
    names = [name for name, *_ in dissections] + [name for name, _ in given]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"--dissect/--results: the names {twice} are given twice: one each")
    probes = {f"--results={name}": studies.probe_set(directory) for name, directory in given}
    studies.check_one_probe_set(probes)
    # The method of every entry: --dissect's are the flags'.
    flagged = studies.method_of(dataclasses.asdict(settings))
    methods = {f"--dissect={name}": flagged for name, *_ in dissections}
    methods.update({f"--results={name}": studies.results_method(d) for name, d in given})
    mixed = "--allow_mixed_settings"
    if not fv.allow_mixed_settings:
        studies.check_one_method(methods, flag=mixed)
    rows: list[dict] = []
    entries: list[dict] = []
    if dissections:
        cli.check_devices(fv, batch_size=settings.batch_size)
    with cli.claim_output_dir(fv.output_dir):
        if dissections:
            source, dataset_name = probe.open()
            here = probe_sets.probe_record(source, dataset_name)
            studies.check_one_probe_set({"the probe set of --data": here, **probes})
        for name, model, weights, layers, model_options in dissections:
            if model:
                with _named_as_entry(name):
                    loaded = model_load.load(
                        model, weights=weights or None, options=model_options, seed=settings.seed
                    )
            else:
                loaded = training.load_trained(weights)
            out = os.path.join(fv.output_dir, name)
            pipeline.dissect(
                cli.model_info(loaded, fv.input_norm, fv.input_size),
                layers,
                source,
                settings,
                out,
                dataset_name=dataset_name,
                mesh=parallel.data_mesh(fv.devices),
                options=options,
            )
            # results.json names layers as asked for, with the module path beside.
            rows.extend(studies.results_rows(name, out))
            entries.append(
                {
                    "name": name,
                    "model": model,
                    "weights": weights,
                    "layers": layers,
                    **({"options": model_options} if model_options else {}),
                    **here,
                }
            )
        for name, directory in given:
            rows.extend(studies.results_rows(name, directory))
            entries.append({"name": name, "results": directory, **probes[f"--results={name}"]})
        # Now with the categories the --dissect entries were scored on.
        for name, *_ in dissections:
            methods[f"--dissect={name}"] = studies.results_method(os.path.join(fv.output_dir, name))
        differences = studies.check_one_method(methods, allow=fv.allow_mixed_settings, flag=mixed)
        differences += studies.check_one_estimate(rows, "dissect them with --quantile_mode=exact")
        document = {"entries": entries, "mixed_settings": differences}
        files = studies.write_comparison(fv.output_dir, rows, document)
    for r in rows:
        found = ((results.column_category(k, "unique"), v) for k, v in r.items())
        by_cat = ", ".join(f"{c} {v}" for c, v in found if c is not None)
        print(
            f"{r['name']} {r['layer']}: {r['unique_detectors']} unique detectors ({by_cat}), "
            f"{r['interpretable_units']}/{r['num_units']} interpretable"
        )
    print(f"table: {os.path.abspath(files['csv'])}")
    cli.report_elapsed(started, files["json"])
    return rows


main = cli.script_main(run)


if __name__ == "__main__":
    define_flags()
    app.run(main)

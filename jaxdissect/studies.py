"""Studies of several dissections: the training dynamics, and comparisons of models and layers.

Several networks of one input format are dissected in one pass: a "stack" is a
plain function model (see `jaxdissect.capture`) that runs every member and
returns each member's layers under `member-layer` names, so the probe set is
read, and the dissection compiled, once for all of them (`dynamics_study`
stacks the checkpoints of a training run).

Each layer record of a results.json becomes a flat `summary_row`; a study's
rows go to a CSV and a JSON file, and to line or bar figures.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxdissect import code_keys, store
from jaxdissect.training import WEIGHTS_DIR, list_weights, load_trained, read_meta


def stacked_name(member: str, layer: str) -> str:
    """The result name of `layer` of stack member `member` (file-name safe, no '.' or '/')."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{member}-{layer}")


def stack_models(
    members: Sequence[tuple[str, Any]],
    layers: Sequence[str],
    *,
    input_size: int,
) -> tuple[
    Callable[[Any, jax.Array], dict[str, jax.Array]], dict[str, Any], dict[str, tuple[str, str]]
]:
    """(fn, variables, {result name: (member, layer, module path)}) for the dissection of
    every member's `layers`, in member then layer order.

    Args:
      members: (name, model) pairs, each model with `module`, `variables` and
        `apply_kwargs` (a `models.load.LoadedModel`); all take the same input.
      layers: layer names (paths, aliases or `re:` patterns) to take from every member; a
        pattern gives every module it matches, named by its path (`capture.Tap.names`).
      input_size: the common input size, for the capture's dry run.
    """
    from jaxdissect import capture

    taps, names = {}, {}
    first: tuple[str, tuple[str, ...]] | None = None
    for member, model in members:
        tap = capture.make_tap(
            model.module,
            model.variables,
            list(layers),
            input_shape=(input_size, input_size, 3),
            apply_kwargs=model.apply_kwargs,
        )
        if first is None:
            first = (member, tap.names)
        elif tap.names != first[1]:
            raise ValueError(
                f"layers={list(layers)} are {list(tap.names)} in {member}, {list(first[1])} "
                f"in {first[0]}: stack members of one architecture"
            )
        taps[member] = tap
        for layer, path in zip(tap.names, tap.layers, strict=True):
            name = stacked_name(member, layer)
            if name in names:
                other, theirs, _ = names[name]
                where = f"member {member!r}" if other == member else f"{other!r} and {member!r}"
                raise ValueError(
                    f"layers={list(layers)} of {where}: {theirs!r} and {layer!r} both make the "
                    f"result name {name!r} (characters other than letters, digits, _ and - "
                    "become _); rename a member or a layer"
                )
            names[name] = (member, layer, path)

    def fn(variables: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
        out = {}
        for member, tap in taps.items():
            acts = tap.fn(variables[member], images)
            for layer, path in zip(tap.names, tap.layers, strict=True):
                out[stacked_name(member, layer)] = acts[path]
        return out

    return fn, {member: tap.variables for member, tap in taps.items()}, names


def summary_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A flat row of one layer record of results.json: counts, by category, shares.

    The totals are `interpretable_units` and `unique_detectors`; the counts of a
    category are `unique:<category>`, `interpretable:<category>` and `share:<category>`
    (the share of the unique detectors), `results.category_column`.
    """
    from jaxdissect import results

    s = record["summary"]
    unique = int(s["unique_detectors"])
    row: dict[str, Any] = {
        "layer": record["layer"],
        "path": record.get("path", record["layer"]),
        "num_units": int(record["num_units"]),
        "interpretable_units": int(s["interpretable_units"]),
        "unique_detectors": unique,
    }
    for cat, n in s["unique_by_category"].items():
        row[results.category_column("unique", cat)] = int(n)
    for cat, n in s["interpretable_by_category"].items():
        row[results.category_column("interpretable", cat)] = int(n)
    for cat, n in s["unique_by_category"].items():
        row[results.category_column("share", cat)] = round(int(n) / unique, 4) if unique else 0.0
    return row


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One exported training step: where, when, how good."""

    step: int
    weights: pathlib.Path
    val_accuracy: float | None


def run_checkpoints(
    run_dir: str | os.PathLike[str], steps: Sequence[int] | None = None
) -> list[Checkpoint]:
    """The exported steps of a training run (all, or those in `steps`, each once)."""
    found = list_weights(run_dir)
    if not found:
        raise FileNotFoundError(
            f"run_dir={run_dir} has no {WEIGHTS_DIR}/step_N/meta.json: train with "
            "experiments/train.py and --save_steps first"
        )
    if steps is not None:
        have = dict(found)
        steps = list(dict.fromkeys(steps))
        missing = [s for s in steps if s not in have]
        if missing:
            raise ValueError(
                f"steps={','.join(map(str, steps))}: run_dir={run_dir} has no exported steps "
                f"{missing}; it has {sorted(have)}"
            )
        found = [(s, have[s]) for s in steps]
    out = []
    for step, path in found:
        acc = read_meta(path).get("train", {}).get("val_accuracy")
        out.append(Checkpoint(step, path, None if acc is None else float(acc)))
    return out


def dynamics_study(
    checkpoints: Sequence[Checkpoint],
    layers: Sequence[str],
    source: Any,
    settings: Any,
    output_dir: str | os.PathLike[str],
    *,
    dataset_name: str,
    mesh: jax.sharding.Mesh | None = None,
    options: Any = None,
) -> list[dict[str, Any]]:
    """Dissect `layers` of every checkpoint in one pass; write dynamics.csv/json and plots.

    Returns one row per (checkpoint, layer): step, val_accuracy, and `summary_row`'s counts.
    """
    from jaxdissect import pipeline, results

    if not checkpoints:
        raise ValueError("no checkpoint to dissect")
    out = pathlib.Path(output_dir)
    models = [(f"step{c.step:06d}", load_trained(c.weights)) for c in checkpoints]
    spec = models[0][1].input_spec
    fn, variables, stacked = stack_models(models, layers, input_size=spec.size)
    names = list(stacked)
    # The layers as the captures name them (a `re:` pattern: every path it matches), and
    # their module paths (the results' own paths are the stacked names).
    paths = {layer: path for _, layer, path in stacked.values()}
    layers = list(paths)
    info = pipeline.ModelInfo(
        module=fn,
        variables=variables,
        input_spec=spec,
        name=f"{models[0][1].name.split(' (')[0]}, {len(models)} training checkpoints",
        key=store.key_of(members=[m.key for _, m in models], layers=list(layers), study="dynamics"),
        # The stage key covers each member's definition (`code_keys.definition_key`): the same
        # checkpoints under edited model code are another stack.
        wraps=store.key_of(
            members=[code_keys.definition_key(m.module, m.apply_kwargs) for _, m in models]
        ),
    )
    layer_results = pipeline.dissect(
        info,
        names,
        source,
        settings,
        out,
        dataset_name=dataset_name,
        mesh=mesh,
        options=options or pipeline.Options(),
    )
    by_name = {r.layer: r for r in layer_results}
    rows = []
    for c, (member, _) in zip(checkpoints, models, strict=True):
        for layer in layers:
            record = results.layer_record(by_name[stacked_name(member, layer)])
            row = summary_row(record)
            row["layer"], row["path"] = layer, paths[layer]
            rows.append({"step": c.step, "val_accuracy": c.val_accuracy, **row})
    store.write_rows_csv(out / "dynamics.csv", rows)
    store.write_json(
        out / "dynamics.json",
        {
            "checkpoints": [
                {"step": c.step, "weights": str(c.weights), "val_accuracy": c.val_accuracy}
                for c in checkpoints
            ],
            "layers": list(layers),
            "dataset": dataset_name,
            "settings": dataclasses.asdict(settings),
            "rows": rows,
        },
    )
    plot_dynamics(out / "dynamics.png", rows, x="step")
    if all(c.val_accuracy is not None for c in checkpoints):
        plot_dynamics(out / "dynamics_accuracy.png", rows, x="val_accuracy")
    return rows


def _categories(rows: Sequence[Mapping[str, Any]], kind: str = "unique") -> list[str]:
    """The categories of the `kind` columns of `rows`, in first-seen order."""
    from jaxdissect import results

    found = (results.column_category(k, kind) for row in rows for k in row)
    return list(dict.fromkeys(c for c in found if c is not None))


def step_axis(steps: Sequence[float]) -> tuple[float, list[float]]:
    """(linthresh, ticks) of a symlog axis of training steps (step 0: the random
    initialisation): linear up to the first step after 0; ticks at 0, then the powers of ten
    past the linear part (the default also ticks inside it, where 0 and 10 collide), or the
    steps themselves where fewer than two such powers fall in their range."""
    positive = sorted({float(v) for v in steps if v > 0})
    linthresh = max(1.0, positive[0] if positive else 1.0)
    top = math.floor(math.log10(positive[-1])) if positive and positive[-1] >= 1 else -1
    decades = [10.0**k for k in range(math.ceil(math.log10(linthresh)), top + 1)]
    return linthresh, [0.0, *(decades if len(decades) >= 2 else positive)]


def plot_dynamics(
    path: str | os.PathLike[str], rows: Sequence[Mapping[str, Any]], *, x: str = "step"
) -> pathlib.Path:
    """Per layer: unique detectors by category (lines) and in total against `x`.

    `x` is `step` (symlog axis: step 0 is the random initialisation) or `val_accuracy`.
    """
    from matplotlib.figure import Figure

    from jaxdissect import results
    from jaxdissect.report import plots

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    cats = _categories(rows)
    colors = plots.category_colors(cats)
    fig = Figure(figsize=(4.2 * len(layers) + 1.5, 3.6), layout="constrained")
    axes = fig.subplots(1, len(layers), squeeze=False)[0]
    for ax, layer in zip(axes, layers, strict=True):
        mine = sorted((r for r in rows if r["layer"] == layer), key=lambda r: r["step"])
        xs = [float(r[x]) for r in mine]
        ax.plot(xs, [r["unique_detectors"] for r in mine], "k.-", label="all", linewidth=2)
        for c in cats:
            column = results.category_column("unique", c)
            ax.plot(xs, [r.get(column, 0) for r in mine], ".-", color=colors[c], label=c)
        if x == "step":
            linthresh, ticks = step_axis(xs)
            ax.set_xscale("symlog", linthresh=linthresh)
            ax.set_xticks(ticks)
            ax.set_xlabel("training iteration")
        else:
            ax.set_xlabel("validation accuracy")
            for r, v in zip(mine, xs, strict=True):
                ax.annotate(str(r["step"]), (v, r["unique_detectors"]), fontsize=7, color="#666666")
        ax.set_title(str(layer), loc="left", fontsize=11)
        ax.set_ylabel("unique detectors")
        ax.set_ylim(bottom=0)
        ax.grid(color="#dddddd", linewidth=0.6)
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1].legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return plots._save(fig, path)


def plot_grouped(
    path: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    *,
    value: str = "unique",
    stacked: bool = False,
    title: str = "",
) -> pathlib.Path:
    """Bars of `<value>:<category>` per (name, layer) row: grouped by category, or stacked.

    Rows need `name` and `layer`; layers of one name sit together, in row order.
    """
    from matplotlib.figure import Figure

    from jaxdissect import results
    from jaxdissect.report import plots

    cats = _categories(rows, value)
    colors = plots.category_colors(cats)
    n = len(rows)
    fig = Figure(figsize=(min(max(6.0, 0.9 * n + 3.0), 30.0), 4.2), layout="constrained")
    ax = fig.add_subplot()
    xs = np.arange(n, dtype=float)
    # A gap between models.
    names = [str(r.get("name", "")) for r in rows]
    for i in range(1, n):
        xs[i:] += 0.5 if names[i] != names[i - 1] else 0.0
    width = 0.8 if stacked else 0.8 / max(1, len(cats))
    bottom = np.zeros(n)
    for j, c in enumerate(cats):
        column = results.category_column(value, c)
        vals = np.asarray([float(r.get(column, 0) or 0) for r in rows])
        if stacked:
            ax.bar(xs, vals, width, bottom=bottom, color=colors[c], label=c)
            bottom += vals
        else:
            ax.bar(xs - 0.4 + width * (j + 0.5), vals, width, color=colors[c], label=c)
    labels = [f"{r.get('name', '')}\n{r['layer']}" for r in rows]
    rotate = n > 8 or max((len(str(r["layer"])) for r in rows), default=0) > 10
    if stacked:
        for x, total in zip(xs, bottom, strict=True):
            ax.text(x, total, f"{total:g}", ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, max(1.0, float(bottom.max(initial=0)) * 1.12))
    ax.set_xticks(xs)
    ax.set_xticklabels(
        labels, fontsize=8, rotation=35 if rotate else 0, ha="right" if rotate else "center"
    )
    for t in ax.get_xticklabels():
        t.set_parse_math(False)
    what = "unique detectors" if value == "unique" else "interpretable units"
    ax.set_ylabel(what)
    ax.set_title(title or f"{what} by category", loc="left", fontsize=11)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    if cats:
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return plots._save(fig, path)


def results_rows(
    name: str, results_dir: str | os.PathLike[str], layers: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """`summary_row`s of a dissection's results.json (all layers, or `layers`), named `name`."""
    from jaxdissect import results

    document = results.read_results_json(results_dir)
    records = document["layers"]
    if layers:
        by_layer = {r["layer"]: r for r in records}
        missing = [layer for layer in layers if layer not in by_layer]
        if missing:
            raise ValueError(f"{results_dir} has no layers {missing}; it has {sorted(by_layer)}")
        records = [by_layer[layer] for layer in layers]
    settings = document.get("settings", {})
    model = settings.get("model", "")
    return [
        {
            "name": name,
            "model": model,
            **summary_row(r),
            **method_of(settings, r),
            "thresholds": threshold_estimate(settings, r["layer"]),
        }
        for r in records
    ]


def threshold_estimate(settings: Mapping[str, Any], layer: str) -> str | None:
    """How a layer's thresholds were computed, from its results.json `settings`: "exact"
    (the `exact` or `histogram` quantile mode) or "sketch N" (a sketch of N values a unit);
    None where the file does not record it."""
    mode = (settings.get("quantile_modes") or {}).get(layer)
    if mode is None:
        return None
    if mode != "sketch":
        return "exact"
    from jaxdissect import quantiles

    return f"sketch {settings.get('sketch_size') or quantiles.DEFAULT_SIZE}"


def check_one_estimate(rows: Sequence[Mapping[str, Any]], how: str) -> list[str]:
    """Warn where `results_rows`' thresholds were estimated differently (exact against a
    sketch, or sketches of other sizes): a sketch's counts differ from exact ones by its
    error, on top of what the comparison measures. `how` says how to make them equal.
    Returns the warning's line (none where they agree)."""
    named: dict[str, list[str]] = {}
    for row in rows:
        if row.get("thresholds"):
            named.setdefault(row["thresholds"], []).append(f"{row['name']} {row['layer']}")
    if len(named) < 2:
        return []
    shown = "; ".join(
        f"{estimate}: {', '.join(names[:3])}{f' and {len(names) - 3} more' if names[3:] else ''}"
        for estimate, names in named.items()
    )
    line = (
        f"thresholds estimated differently ({shown}): counts from a sketch differ from exact "
        f"ones by its error; {how} to compare exact counts"
    )
    logging.warning("%s", line)
    return [line]


# The settings of a dissection that change its counts; a comparison holds them equal.
METHOD_SETTINGS = (
    "iou_threshold",
    "categories",
    "quantile",
    "threshold_on",
    "restriction",
    "tie_rule",
    "activation_dtype",
)


def method_of(settings: Mapping[str, Any], record: Mapping[str, Any] | None = None) -> dict:
    """The `METHOD_SETTINGS` of a dissection (its results.json `settings`; a setting older
    files did not record is the one they were computed with, `results.UNRECORDED_SETTINGS`,
    else None). `categories` are the scored ones, ';'-joined in label-space order:
    `record`'s (a layer record), else the settings' (None: every category of the probe set)."""
    from jaxdissect import results

    settings = {**results.UNRECORDED_SETTINGS, **settings}
    method = {key: settings.get(key) for key in METHOD_SETTINGS}
    categories = record["categories"] if record is not None else settings.get("categories")
    method["categories"] = None if categories is None else ";".join(categories)
    return method


def results_method(results_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """`method_of` a dissection's results.json (the categories of its first layer)."""
    from jaxdissect import results

    document = results.read_results_json(results_dir)
    layers = document["layers"]
    return method_of(document.get("settings", {}), layers[0] if layers else None)


def check_one_method(
    methods: Mapping[str, Mapping[str, Any]], *, allow: bool = False, flag: str = ""
) -> list[str]:
    """Refuse entries (name -> `method_of`) dissected with other `METHOD_SETTINGS`: per
    setting, one line naming the first entry that records it, the first that differs, and
    the setting (and `flag`, the way to compare them anyway). With `allow`, each difference
    is logged as a warning instead. Categories are compared as sets. None (not recorded, or
    categories not yet known: all of the probe set) matches any, so entries that do record
    a setting are compared with each other whatever precedes them.
    Returns the lines of the differences found."""
    found = []
    for key in METHOD_SETTINGS:
        known = [(name, m[key]) for name, m in methods.items() if m.get(key) is not None]
        for name, got in known[1:]:
            first, want = known[0]
            same = (
                set(got.split(";")) == set(want.split(";")) if key == "categories" else got == want
            )
            if not same:
                found.append(
                    f"{name} was dissected with {key}={got!r}, {first} with {key}={want!r}: "
                    "their counts are not comparable"
                )
                break
    for line in found:
        if not allow:
            how = f", or pass {flag} to compare them anyway" if flag else ""
            raise ValueError(f"{line}; dissect them with the same settings{how}")
        logging.warning("%s (compared anyway: %s)", line, flag or "allow=True")
    return found


def probe_set(results_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The probe set a dissection's results.json says it ran on, as `probe.probe_record`
    gives it (None where not recorded)."""
    from jaxdissect import results

    document = results.read_results_json(results_dir)
    settings = document.get("settings", {})
    keys = ("dataset", "dataset_fingerprint", "dataset_identity")
    return {k: settings.get(k) for k in keys}


def check_one_probe_set(probes: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse entries (name -> `probe_set`) dissected on other probe sets than any entry
    before them (`probe.probe_relation`): their counts are not comparable. Every pair is
    compared, since an entry that records less (no identity) matches sets that differ from
    each other. An entry that is a copy of an earlier one is logged (once, naming the first)."""
    from jaxdissect.data import probe

    named = [(name, p) for name, p in probes.items() if p.get("dataset") is not None]
    for i, (name, got) in enumerate(named):
        copies = []
        for first, want in named[:i]:
            relation = probe.probe_relation(got, want)
            if relation == "other":
                raise ValueError(
                    f"{name} was dissected on {got['dataset']}, {first} on {want['dataset']} "
                    "(other CSV tables, split or image count; a TFDS build made before its "
                    "tables were recorded counts as another until rebuilt): compare "
                    "dissections of one probe set"
                )
            if relation == "copy":
                copies.append(first)
        if copies:
            logging.warning(
                "%s and %s were dissected on %s with other files (another copy, or the same "
                "files stored again): check that they hold the same images and labels",
                name,
                copies[0],
                got["dataset"],
            )


def write_comparison(
    output_dir: str | os.PathLike[str],
    rows: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
) -> dict[str, pathlib.Path]:
    """compare.csv / compare.json and the figures: unique detectors by category per layer and
    model. A category a row was not scored on is a blank cell (null in compare.json)."""
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # A category an entry was not scored on: None, a blank cell (0 is a count).
    columns = list(dict.fromkeys(k for row in rows for k in row))
    rows = [{k: row.get(k) for k in columns} for row in rows]
    files = {
        "csv": store.write_rows_csv(out / "compare.csv", rows),
        "grouped": plot_grouped(out / "compare_unique.png", rows, value="unique"),
        "stacked": plot_grouped(
            out / "compare_unique_stacked.png",
            rows,
            value="unique",
            stacked=True,
            title="unique detectors per layer (stacked by category)",
        ),
        "interpretable": plot_grouped(
            out / "compare_interpretable.png",
            rows,
            value="interpretable",
            stacked=True,
            title="interpretable units per layer (stacked by category)",
        ),
    }
    store.write_json(out / "compare.json", {"settings": dict(settings), "rows": list(rows)})
    files["json"] = out / "compare.json"
    return files

"""Compositional explanations of a layer's units: the passes over the probe set and the search.

Given a dissection's thresholds, pass 1 counts the length-1 tally under the formulas' union
restriction (`statistics.tally_statistic`, under a restriction with the unit totals by pattern;
`SearchSettings.formula_restriction`, default `none` as the paper's release) and keeps the
layer's activations (`actcache`); every later pass reads them and counts the extensions of S formulas per unit
(`formula_counts.formula_statistic`), one pass per beam step and, in `optimal` mode, one per
block of prefixes that the bounds cannot rule out (`formula_search`). Every pass goes through
`driver.run_pass`: sharded over the devices, counts merged exactly.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from jaxdissect import (
    actcache,
    config,
    driver,
    engine,
    formula_counts,
    formula_search,
    statistics,
    store,
    tally,
)
from jaxdissect.data import loader
from jaxdissect.formulas import (
    MAX_LENGTH,
    OP_FLAGS,
    RESTRICTIONS,
    ExtensionCounts,
    FirstCounts,
    FormulaTable,
    parse_ops,
)
from jaxdissect.labelspace import LabelSpace

MODES = ("beam", "optimal")


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """How formulas are searched.

    Attributes:
      max_length: longest formula (concepts), 1..3.
      beam: formulas kept per unit at each beam step.
      operators: of `or`, `and`, `and_not`.
      length_penalty: score = IoU * length_penalty ** (length - 1), in (0, 1] (1: none).
      mode: `beam` (Mu & Andreas's search) or `optimal` (beam, then branch and bound
        that proves the best formula up to max_length).
      optimal_slots: prefixes per unit per pass of the optimal mode.
      formula_restriction: union restriction of a formula's IoU: `none` (Mu & Andreas's
        release: every image), `presence` or `overlap` (the dissection's, over the
        categories of the formula's concepts; jaxdissect/formulas.py).
    """

    max_length: int = MAX_LENGTH
    beam: int = formula_search.DEFAULT_BEAM
    operators: tuple[str, ...] = OP_FLAGS
    length_penalty: float = 1.0
    mode: str = config.setting("beam", choices=MODES)
    optimal_slots: int = 32
    formula_restriction: str = config.setting("none", choices=RESTRICTIONS)

    def __post_init__(self):
        config.check_fields(self)
        formula_search.check_options(
            self.max_length, self.beam, self.ops, self.length_penalty, penalty_name="length_penalty"
        )
        if self.optimal_slots < 1:
            raise ValueError(f"optimal_slots={self.optimal_slots}: must be >= 1")

    @property
    def restricted(self) -> bool:
        """Whether a formula's union is restricted (unit totals by restriction pattern)."""
        return self.formula_restriction != "none"

    def check_labels(self, labels: LabelSpace) -> None:
        """Raise, naming `formula_restriction`, where its unions cannot be counted for the
        label space's categories (2**C unit totals a unit under a restriction)."""
        c = labels.num_categories
        if self.restricted and c > tally.MAX_PATTERN_CATEGORIES:
            raise ValueError(
                f"formula_restriction={self.formula_restriction!r} with the probe set's {c} "
                f"categories: its unions take 2**{c} unit totals a unit, at most "
                f"{tally.MAX_PATTERN_CATEGORIES} categories; use formula_restriction='none'"
            )

    @property
    def ops(self) -> tuple[int, ...]:
        return parse_ops(self.operators)


@dataclasses.dataclass
class LayerFormulas:
    """A layer's search: per unit the final beam (best first), the beam's best after each
    step (index l - 1: formulas of length <= l), the optimal formula (optimal mode), the
    cost (passes with their seconds, prefixes evaluated), and `fires`: bool [K], the units
    that fire, the only ones with a formula and in the means (`explain_layer`)."""

    first: FirstCounts
    candidates: np.ndarray
    beam: list[list[formula_search.Scored]]
    by_length: list[list[formula_search.Scored]]
    optimal: list[formula_search.Scored] | None
    passes: list[dict[str, Any]]
    prefixes: dict[int, int]
    fires: np.ndarray

    def best(self) -> list[formula_search.Scored]:
        return self.optimal if self.optimal is not None else [row[0] for row in self.beam]


ACTIVATIONS_PREFIX = "formula-activations-"


def activations_dir(work_dir: pathlib.Path, layer: str) -> pathlib.Path:
    """Where `explain_layer` keeps the activations of module path `layer` on disk."""
    return work_dir / f"{ACTIVATIONS_PREFIX}{store.key_of(layer=layer)}"


def explain_layer(
    tap: Any,
    thresholds: np.ndarray,
    source: Any,
    labels: LabelSpace,
    settings: SearchSettings,
    *,
    input_spec: Any,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    activation_dtype: str = "float16",
    tie_rule: str = "strict",
    categories: tuple[str, ...] | None = None,
    activation_cache: str = "auto",
    work_dir: pathlib.Path | None = None,
    num_threads: int | None = None,
    progress: bool = False,
    steps: driver.Steps | None = None,
    cannot_fire: np.ndarray | None = None,
) -> LayerFormulas:
    """Formulas for the units of `tap`'s one layer at `thresholds` (module doc).

    labels: the label space scored (categories restricted as the dissection's); candidate
    concepts are its labels with a category and with pixels in the probe set.
    work_dir: a disk cache's folder (`activations_dir`), used by one run at a time.
    cannot_fire: bool [K], the dissection's units that cannot fire
      (`results.LayerResult.cannot_fire`: no active pixel, or dead, constant over the probe
      set, whose mask under the inclusive rule is every pixel); they get no formula, as
      they get no label. None: the units without active pixels.
    """
    if len(tap.layers) != 1:
        raise ValueError(f"explain_layer takes a tap of one layer, got {tap.layers}")
    settings.check_labels(labels)
    layer = tap.layers[0]
    steps = driver.Steps() if steps is None else steps
    dtype = np.dtype(jax.numpy.dtype(activation_dtype))
    forward = driver.Forward(tap.fn, input_spec, dtype, mesh)
    num_batches = loader.num_batches(len(source), batch_size)
    local_batch = batch_size // jax.process_count()
    shape = tap.shapes[layer]
    needed = int(np.prod(shape)) * dtype.itemsize * num_batches * local_batch
    kind = actcache.choose_kind(activation_cache, needed, work_dir)
    # The layer's own folder (each process its own files in it); the files a killed run left
    # in any layer's folder are removed first, whatever this run's kind and layers. One run
    # at a time writes to `work_dir`: the scripts hold the output directory's lock
    # (`outdir.locked`).
    directory = None if work_dir is None else activations_dir(work_dir, layer)
    for stale in [] if work_dir is None else work_dir.glob(f"{ACTIVATIONS_PREFIX}*"):
        actcache.remove_files(stale)
    cache = actcache.ActivationCache(
        kind, {layer: shape}, num_batches, local_batch, dtype, directory
    )
    try:
        passes: list[dict[str, Any]] = []

        def run(name: str, statistic: statistics.Statistic, images: bool, mode: str | None):
            t0 = time.perf_counter()
            out = driver.run_pass(
                name,
                statistic,
                engine.Fields(source, images, labels=True, categories=categories),
                mesh=mesh,
                batch_size=batch_size,
                forward=forward,
                variables=tap.variables,
                cache=cache,
                cache_mode=mode,
                progress=progress,
                num_threads=num_threads,
                steps=steps,
            )
            passes.append({"pass": name, "seconds": time.perf_counter() - t0})
            logging.info("%s: %s in %.1f s", tap.names[0], name, passes[-1]["seconds"])
            return out

        # Unit totals by restriction pattern (2**C per unit) only where a restriction needs
        # them: without one every image counts, whatever the number of categories.
        restricted = settings.restricted
        tally = run(
            "formulas-length1",
            statistics.tally_statistic(
                layer,
                thresholds,
                labels,
                restriction=settings.formula_restriction,
                tie_rule=tie_rule,
                patterns=restricted,
            ),
            True,
            "write",
        )
        primary = np.asarray(labels.primary)
        first = FirstCounts(
            tally["unit_total"],
            tally["intersection"],
            tally["label_pixels"],
            primary if restricted else None,
            tally["pattern_pixels"] if restricted else None,
        )
        candidates = formula_search.default_candidates(first) & (primary >= 0)
        cached = cache.enabled and cache.lo == 0 and cache.hi == num_batches

        def evaluate(table: FormulaTable) -> ExtensionCounts:
            stat = formula_counts.formula_statistic(
                layer, thresholds, table, labels.num_labels, tie_rule=tie_rule
            )
            out = run(f"formulas-step{len(passes)}", stat, not cached, "read" if cached else None)
            return ExtensionCounts(**out)

        stats = formula_search.SearchStats()
        beam = formula_search.beam_search(
            first,
            evaluate,
            max_length=settings.max_length,
            beam=settings.beam,
            ops=settings.ops,
            penalty=settings.length_penalty,
            candidates=candidates,
            stats=stats,
        )
        optimal = None
        if settings.mode == "optimal":
            optimal = formula_search.optimal_search(
                first,
                evaluate,
                max_length=settings.max_length,
                ops=settings.ops,
                penalty=settings.length_penalty,
                candidates=candidates,
                slots=settings.optimal_slots,
                start=[row[0] for row in beam],
                stats=stats,
            )
        fires = np.asarray(first.unit_total) > 0
        if cannot_fire is not None:
            fires &= ~np.asarray(cannot_fire, bool)
        return LayerFormulas(
            first, candidates, beam, stats.best, optimal, passes, stats.prefixes, fires
        )
    finally:
        cache.discard()


def mean_by_length(found: LayerFormulas) -> list[float]:
    """Mean IoU over the units that fire (`LayerFormulas.fires`) of the beam's best formula
    of length <= l, l = 1...; its first value is the mean IoU of their labels."""
    live = np.flatnonzero(found.fires)
    if not len(live):
        return [0.0] * len(found.by_length)
    return [float(np.mean([row[u].iou for u in live])) for row in found.by_length]


def mean_iou(found: LayerFormulas) -> float:
    """Mean IoU over the units that fire of the formulas found (`LayerFormulas.best`): the
    optimal ones in optimal mode; in beam mode, `mean_by_length`'s last value."""
    live = np.flatnonzero(found.fires)
    best = found.best()
    return float(np.mean([best[u].iou for u in live])) if len(live) else 0.0


def unit_rows(
    found: LayerFormulas, names: tuple[str, ...] | list[str]
) -> list[dict[str, Mapping[str, Any] | Any]]:
    """Per unit: whether it fires, the formula and IoU, the length-1 label and IoU, beam and
    optimal answers. A unit that does not fire has none of them (IoUs 0); one that fires
    with IoU 0 for every formula has IoU 0 and no formula or label."""
    ious1 = formula_search.first_ious(found.first)
    cs = np.flatnonzero(found.candidates)
    rows = []
    for u, best in enumerate(found.best()):
        fires = bool(found.fires[u])
        named = fires and best.iou > 0
        label = int(cs[np.lexsort((cs, -ious1[u, cs]))[0]]) if len(cs) and named else -1
        beam = found.beam[u][0]
        row = {
            "unit": u,
            "fires": fires,
            "formula": best.formula.text(names) if named else "",
            "iou": best.iou if fires else 0.0,
            "score": best.score if fires else 0.0,
            "length": len(best.formula) if named else 0,
            "label": names[label] if label >= 0 else "",
            "label_iou": float(ious1[u, label]) if label >= 0 else 0.0,
            "beam_formula": beam.formula.text(names) if named else "",
            "beam_iou": beam.iou if fires else 0.0,
        }
        if found.optimal is not None:
            row["optimal_formula"] = row["formula"]
            row["optimal_iou"] = row["iou"]
            row["beam_is_optimal"] = not fires or beam.score >= best.score
        rows.append(row)
    return rows


def layer_summary(
    found: LayerFormulas, rows: Sequence[Mapping[str, Any]]
) -> dict[str, int | float | list[float] | None]:
    """The layer's figures, every one over the units that fire (`LayerFormulas.fires`):
    their count, the mean IoU by formula length (beam), of the formulas found, of their
    labels (length 1), and in optimal mode for how many the beam missed the optimum (None
    in beam mode). rows: `unit_rows(found, ...)`."""
    fires = [r for r in rows if r["fires"]]
    return {
        "units_that_fire": len(fires),
        "mean_iou_by_length": mean_by_length(found),
        "mean_iou": mean_iou(found),
        "mean_label_iou": float(np.mean([r["label_iou"] for r in fires])) if fires else 0.0,
        "beam_not_optimal": (
            None if found.optimal is None else int(sum(not r["beam_is_optimal"] for r in fires))
        ),
    }


__all__ = [
    "MODES",
    "LayerFormulas",
    "SearchSettings",
    "explain_layer",
    "layer_summary",
    "mean_by_length",
    "mean_iou",
    "unit_rows",
]

"""From exact tally counts to IoU, unit labels, layer summaries and result files.

Rules (the reference in `tests/reference.py` implements them with plain loops):

- IoU[k, c] = intersection[k, c] / (unit_pixels[k, primary[c]] + label_pixels[c]
  - intersection[k, c]); 0 where the denominator is 0; label 0 and labels whose primary
  category is -1 score 0 and are never chosen.
- For every unit and scored category: the category's best label is the argmax of IoU over
  the labels whose primary category it is (ties: the lowest label number; a category
  without labels has label -1 and IoU 0).
- The unit's label is that of its best category: the highest best IoU (ties: the last
  scored category in LabelSpace order, as NetDissect-Lite and the original release choose
  it: `score.argsort(axis=0)[::-1][0]`, which the numpy of their time sorted stably; since
  numpy's SIMD sorts, equal scores come out of it in no set order). These are both
  releases' rules, with one exception: a unit has NO label (best label and category -1,
  best IoU 0) when it cannot fire (no active pixel over the probe set, or dead: constant,
  see `jaxdissect.ties`) or when its IoU is 0 for every concept (nor a best label in any
  category: `category_label` -1, IoU 0); Lite would give it label 0 (`-`). Lite adds
  1e-10 to the IoU's denominator (the original release 1e-20, which changes no quotient):
  where unions are below 2**21 pixels, that can break an exact tie toward the larger union.
- Each unit has a state (`STATES`, first match wins): its tie state ("dead", "saturated",
  "tied", from `jaxdissect.ties` when the engine measured them), then "no active pixels",
  then "no concept overlap" (IoU 0 everywhere), else "".
- A unit is interpretable when its best IoU > iou_threshold (strictly; default 0.04). The
  unique detectors of a layer are the distinct labels that are some interpretable unit's
  label; the per-concept counts (for the bar graph) count those units per label.

Files: `write_tally_csvs` writes NetDissect-Lite's `tally.csv` schema, and
`write_results_json` every setting with the per-unit, per-category results. Every file
and record carries its layer name, the name the user asked for (`--layers=head`), with the
module path beside it in results.json: the CSV's columns are fixed by Lite's schema, so its
file name carries the layer (`layer_file_stems`, `tally_csv_name`). Files are written to a
temporary file in the same folder and moved into place with os.replace, so a reader never
sees a partial file. results.json's `checksum` (`store.json_checksum`) is checked when it
is read: a value changed since it was written is refused.

Unit numbers: a unit is its channel index, from 0, everywhere a person reads (results.json,
the report, strip files) except tally.csv's `unit` column, which keeps Lite's 1-based numbers
(`TALLY_UNIT_OFFSET`); results.json gives both for every unit.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from jaxdissect import results_schema, store
from jaxdissect.labelspace import LabelSpace
from jaxdissect.ties import DEAD, TIE_STATES, UnitTies

DEFAULT_IOU_THRESHOLD = 0.04
RESULTS_FORMAT = "jaxdissect.results"
RESULTS_VERSION = 1
# tally.csv's `unit` column = the unit's 0-based channel index + this (NetDissect-Lite's schema).
TALLY_UNIT_OFFSET = 1
UNIT_NUMBERING = (
    "unit: the 0-based channel index, as in the report; tally.csv's unit column is "
    f"unit + {TALLY_UNIT_OFFSET} (NetDissect-Lite's 1-based numbers), given as tally_csv_unit"
)
# Longest file-name part taken from a layer name (file systems allow 255 bytes).
_MAX_STEM = 100
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
COUNT_KEYS = ("intersection", "label_pixels", "unit_pixels", "unit_total")
NO_ACTIVE_PIXELS = "no active pixels"
NO_OVERLAP = "no concept overlap"
STATES = (*TIE_STATES, NO_ACTIVE_PIXELS, NO_OVERLAP)
# tally.csv's extra columns where the permutation test ran (`tally_csv_rows`).
SIGNIFICANCE_COLUMNS = ("p-value", "label-p-value", "significant")


def check_iou_threshold(iou_threshold: float) -> float:
    """`iou_threshold` as a float when in [0, 1) (a unit detects its best concept if its
    IoU is above it); else one line naming iou_threshold."""
    if not 0 <= iou_threshold < 1:
        raise ValueError(f"iou_threshold={iou_threshold}: must be in [0, 1)")
    return float(iou_threshold)


def iou(inter: ArrayLike, first: ArrayLike, second: ArrayLike) -> np.ndarray:
    """IoU = inter / (first + second - inter), float64, 0 where that union is not positive.

    The areas of two masks and of their intersection, as arrays that broadcast together.
    Integer counts are summed exactly in int64 (float counts in float64), and the quotient
    is the float64 division of the two.
    """
    dtype = np.result_type(inter, first, second, np.int64)
    inter = np.asarray(inter, dtype)
    union = np.asarray(first, dtype) + np.asarray(second, dtype) - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def iou_matrix(counts: Mapping[str, np.ndarray], labels: LabelSpace) -> np.ndarray:
    """IoU [K, L] float64 of every unit and label (see module docstring)."""
    inter = np.asarray(counts["intersection"], np.int64)
    label_pixels = np.asarray(counts["label_pixels"], np.int64)
    unit_pixels = np.asarray(counts["unit_pixels"], np.int64)
    scored = labels.primary >= 0
    scored[0] = False
    # Unscored labels read column 0 of unit_pixels; their IoU is zeroed below.
    out = iou(inter, unit_pixels[:, np.maximum(labels.primary, 0)], label_pixels[None, :])
    out[:, ~scored] = 0.0
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Significance:
    """A layer's permutation test (`jaxdissect.significance`) as the results show it.

    Attributes:
      p: float64 [K], each unit's p-value: of its best IoU over all concepts on the test's
        grid with the union unrestricted (not the dissection's IoU), against the best of
        every draw (the choice of the label is paid for).
      pair_p: float64 [K, C], the p-value of each (unit, concept) pair.
      concepts: int64 [C], the label numbers of pair_p's columns.
      significant: bool [K], `procedure`'s discoveries at `alpha` over the layer's p.
      alpha: the false discovery rate.
      draws: permutations drawn (p resolves to 1 / (1 + draws)).
      procedure: `bh` (Benjamini-Hochberg) or `by` (Benjamini-Yekutieli).
    """

    p: np.ndarray
    pair_p: np.ndarray
    concepts: np.ndarray
    significant: np.ndarray
    alpha: float
    draws: int
    procedure: str = "bh"

    def label_p(self, labels: np.ndarray) -> np.ndarray:
        """float64 [K]: the p-value of each unit's pair with `labels[k]` (NaN: -1 or untested),
        under the test's IoU; not corrected for a label chosen as the best of another."""
        labels = np.asarray(labels, np.int64)
        column = {int(c): i for i, c in enumerate(self.concepts)}
        out = np.full(labels.shape, np.nan)
        for k, label in enumerate(labels):
            if int(label) in column:
                out[k] = self.pair_p[k, column[int(label)]]
        return out


@dataclasses.dataclass(frozen=True, eq=False)
class LayerResult:
    """Dissection results of one layer.

    Attributes:
      layer: the layer's name as the user asked for it; carried into every file and record.
      labels: the label space the counts refer to.
      counts: exact int64 counts (`jaxdissect.tally.tally_to_numpy`).
      iou: float64 [K, L].
      categories: indices (into labels.categories) of the scored categories, ascending.
      category_label: int64 [K, len(categories)], best label per scored category (-1: none).
      category_iou: float64 [K, len(categories)], its IoU.
      best_category: int64 [K], index into labels.categories of each unit's best category
        (-1: no label).
      best_label: int64 [K], each unit's label (-1: no label, see module docstring).
      best_iou: float64 [K] (0 without a label).
      iou_threshold: a unit is interpretable when best_iou > iou_threshold.
      state: object [K], each unit's state (one of STATES or "").
      ties: the engine's tie statistics (None when not measured).
      path: the layer's module path in the model (default: `layer`).
      significance: the layer's permutation test (None: not run).
    """

    layer: str
    labels: LabelSpace
    counts: Mapping[str, np.ndarray]
    iou: np.ndarray
    categories: tuple[int, ...]
    category_label: np.ndarray
    category_iou: np.ndarray
    best_category: np.ndarray
    best_label: np.ndarray
    best_iou: np.ndarray
    iou_threshold: float
    state: np.ndarray
    ties: UnitTies | None = None
    path: str = ""
    significance: Significance | None = None

    def __post_init__(self):
        if not self.path:
            object.__setattr__(self, "path", self.layer)
        k = self.iou.shape[0]
        test = self.significance
        if test is not None and (test.p.shape != (k,) or test.significant.shape != (k,)):
            raise ValueError(f"significance has {test.p.shape} units, the counts {k}")

    @property
    def num_units(self) -> int:
        return int(self.iou.shape[0])

    @property
    def cannot_fire(self) -> np.ndarray:
        """bool [K]: no active pixel over the probe set, or dead."""
        return (np.asarray(self.counts["unit_total"]) == 0) | (self.state == DEAD)

    @property
    def interpretable(self) -> np.ndarray:
        """bool [K]: best IoU strictly above the threshold."""
        return self.best_iou > self.iou_threshold


def layer_result(
    layer: str,
    counts: Mapping[str, np.ndarray],
    labels: LabelSpace,
    *,
    iou_threshold: float = DEFAULT_IOU_THRESHOLD,
    categories: Sequence[str] | None = None,
    path: str | None = None,
    ties: UnitTies | None = None,
    significance: Significance | None = None,
) -> LayerResult:
    """Score one layer's counts: IoU, best label per category and overall, unit states.

    `categories` restricts the scored categories (Lite leaves out "material"); default all.
    Scored in LabelSpace order whatever order they are named in (ties between categories,
    columns); a repeated or unknown name is refused (`LabelSpace.select`).
    `path` is the layer's module path when `layer` is another name for it (an alias).
    `ties`: the engine's tie statistics of the layer (dead units then get no label).
    `significance`: the layer's permutation test, carried into the files.
    """
    if not layer:
        raise ValueError("a layer result needs a layer name")
    iou_threshold = check_iou_threshold(iou_threshold)
    counts = {key: np.asarray(value, np.int64) for key, value in counts.items()}
    _check_counts(counts, labels)
    names = labels.select(categories)
    if not names:
        raise ValueError("categories=[]: no category to score")
    cat_idx = tuple(labels.categories.index(name) for name in names)
    iou = iou_matrix(counts, labels)
    k = iou.shape[0]
    cat_label = np.full((k, len(cat_idx)), -1, np.int64)
    cat_iou = np.zeros((k, len(cat_idx)), np.float64)
    for col, j in enumerate(cat_idx):
        members = np.flatnonzero(labels.primary == j)  # ascending: argmax ties -> lowest
        if len(members):
            best = np.argmax(iou[:, members], axis=1)
            cat_label[:, col] = members[best]
            cat_iou[:, col] = iou[np.arange(k), members[best]]
    # A category none of whose concepts overlaps the unit has no best label: its argmax
    # over all-zero IoUs would be an arbitrary first label.
    cat_label = np.where(cat_iou > 0, cat_label, -1)
    # Ties -> the last scored category (argmax over the columns reversed).
    best_col = len(cat_idx) - 1 - np.argmax(cat_iou[:, ::-1], axis=1)
    rows = np.arange(k)
    best_label = cat_label[rows, best_col]
    best_iou = cat_iou[rows, best_col]
    best_category = np.asarray(cat_idx, np.int64)[best_col]
    if ties is not None and ties.at_threshold.shape != (k,):
        raise ValueError(f"ties has {ties.at_threshold.shape} units, the counts {k}")
    state = np.full(k, "", object)
    state[best_iou == 0] = NO_OVERLAP
    state[counts["unit_total"] == 0] = NO_ACTIVE_PIXELS
    if ties is not None:
        tie_state = ties.states()
        state = np.where(tie_state != "", tie_state, state)
    unlabelled = (best_iou == 0) | (counts["unit_total"] == 0) | (state == DEAD)
    # A dead unit's mask under the inclusive rule covers everything and overlaps concepts:
    # it gets no label in any category either.
    cat_label = np.where(unlabelled[:, None], -1, cat_label)
    cat_iou = np.where(unlabelled[:, None], 0.0, cat_iou)
    best_label = np.where(unlabelled, -1, best_label)
    best_category = np.where(unlabelled, -1, best_category)
    best_iou = np.where(unlabelled, 0.0, best_iou)
    return LayerResult(
        layer=layer,
        labels=labels,
        counts=counts,
        iou=iou,
        categories=cat_idx,
        category_label=cat_label,
        category_iou=cat_iou,
        best_category=best_category,
        best_label=best_label,
        best_iou=best_iou,
        iou_threshold=iou_threshold,
        path=path or layer,
        state=state,
        ties=ties,
        significance=significance,
    )


def _check_counts(counts: Mapping[str, np.ndarray], labels: LabelSpace) -> None:
    missing = [key for key in COUNT_KEYS if key not in counts]
    if missing:
        raise ValueError(f"counts lack {missing}")
    k, nl = counts["intersection"].shape
    expected = {
        "label_pixels": (nl,),
        "unit_pixels": (k, labels.num_categories),
        "unit_total": (k,),
    }
    if nl != labels.num_labels:
        raise ValueError(f"counts have {nl} labels, the label space {labels.num_labels}")
    for key, shape in expected.items():
        if counts[key].shape != shape:
            raise ValueError(f"counts[{key!r}] has shape {counts[key].shape}, expected {shape}")


@dataclasses.dataclass(frozen=True)
class ConceptCount:
    """Interpretable units whose label is one concept (a bar of the bar graph)."""

    category: str
    label: int
    name: str
    units: int


@dataclasses.dataclass(frozen=True)
class LayerSummary:
    """Interpretable units and unique detectors of one layer at its IoU threshold."""

    layer: str
    iou_threshold: float
    num_units: int
    interpretable_units: int
    unique_detectors: int
    # Keyed by every scored category (0 when none passes), in LabelSpace order.
    interpretable_by_category: dict[str, int]
    unique_by_category: dict[str, int]
    # Most units first, then category order, then label number; empty when none passes.
    concepts: tuple[ConceptCount, ...]
    # Units with no active pixel over the probe set, or dead: they cannot be labelled.
    cannot_fire: int = 0
    # Units without a label (cannot fire, or IoU 0 for every concept).
    unlabelled: int = 0
    # Units per state (every one of STATES, zeros included).
    states: dict[str, int] = dataclasses.field(default_factory=dict)


def layer_summary(result: LayerResult) -> LayerSummary:
    """Summary of a layer; well defined (zeros, no concepts) when no unit passes."""
    labels = result.labels
    passing = np.flatnonzero(result.interpretable)
    per_label: dict[int, int] = {}
    for unit in passing:
        label = int(result.best_label[unit])
        per_label[label] = per_label.get(label, 0) + 1
    cat_names = [labels.categories[j] for j in result.categories]
    by_cat = dict.fromkeys(cat_names, 0)
    unique_by_cat = dict.fromkeys(cat_names, 0)
    for unit in passing:
        by_cat[labels.categories[int(result.best_category[unit])]] += 1
    for label in per_label:
        unique_by_cat[labels.category_of(label)] += 1
    order = {j: i for i, j in enumerate(result.categories)}
    concepts = sorted(
        per_label.items(), key=lambda kv: (-kv[1], order[int(labels.primary[kv[0]])], kv[0])
    )
    return LayerSummary(
        layer=result.layer,
        iou_threshold=result.iou_threshold,
        num_units=result.num_units,
        interpretable_units=len(passing),
        unique_detectors=len(per_label),
        interpretable_by_category=by_cat,
        unique_by_category=unique_by_cat,
        concepts=tuple(
            ConceptCount(labels.category_of(label), label, labels.names[label], units)
            for label, units in concepts
        ),
        cannot_fire=int(result.cannot_fire.sum()),
        unlabelled=int((result.best_label < 0).sum()),
        states={name: int((result.state == name).sum()) for name in STATES},
    )


CATEGORY_COUNTS = ("unique", "interpretable", "share")


def category_column(kind: str, category: str) -> str:
    """The column of a study's table holding count `kind` (one of CATEGORY_COUNTS) of
    `category`: `kind:category`. No other column name holds a ':', so no category name
    meets one (a category named `detectors` gives `unique:detectors`, beside the total
    `unique_detectors`)."""
    if kind not in CATEGORY_COUNTS:
        raise ValueError(f"kind={kind!r}: one of {CATEGORY_COUNTS}")
    return f"{kind}:{category}"


def column_category(column: str, kind: str) -> str | None:
    """The category of a `category_column(kind, ...)` name; None for any other column."""
    prefix = f"{kind}:"
    return column[len(prefix) :] if column.startswith(prefix) else None


# --------------------------------------------------------------------------- files


def layer_file_stems(layers: Sequence[str]) -> list[str]:
    """The file-name part of each layer of a run: `tally-<stem>.csv`, `layer-<stem>.html`.

    The layer name itself where it is safe (`head`, `layer4.1.conv2`); each run of
    characters other than letters, digits, `.`, `_` and `-` becomes `_` (`blocks/10` ->
    `blocks_10`), and `.`, `_`, `-` at either end are dropped. A stem that would clash
    with an earlier one, case-insensitively (macOS and Windows file systems), or is cut
    to its first 100 characters gets `-` and a short hash of the full name, so distinct
    layers always get distinct files.
    """
    if len(set(layers)) != len(layers):
        raise ValueError(f"duplicate layer names in {list(layers)}")
    seen: set[str] = set()
    stems = []
    for layer in layers:
        base = _stem_base(layer)
        stem, salt = base, 0
        while len(stem) > _MAX_STEM or stem.lower() in seen:
            digest = hashlib.sha1(f"{layer}\0{salt}".encode()).hexdigest()[:8]
            stem = _hashed_stem(base, digest)
            salt += 1
        seen.add(stem.lower())
        stems.append(stem)
    return stems


def _stem_base(layer: str) -> str:
    """The layer name made safe for a file name, before `layer_file_stems` makes it unique."""
    return _UNSAFE_FILE_CHARS.sub("_", layer).strip("._-") or "layer"


def _hashed_stem(base: str, digest: str) -> str:
    """A layer's stem made unique: its safe name cut to leave room for `-` and the digest."""
    return f"{base[: _MAX_STEM - 9]}-{digest}"


def tally_csv_name(stem: str) -> str:
    """File name of a layer's tally.csv: `tally-<stem>.csv`, stem from `layer_file_stems`."""
    return f"tally-{stem}.csv"


def stats_npz_name(stem: str) -> str:
    """File name of a layer's thresholds and top images: `stats-<stem>.npz`."""
    return f"stats-{stem}.npz"


def tally_csv_rows(result: LayerResult) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows of NetDissect-Lite's tally.csv for one layer.

    Columns: unit (1-based: the channel index + TALLY_UNIT_OFFSET), category, label,
    score, then per scored category <cat>-label, <cat>-truth (the label's pixels),
    <cat>-activation (the unit's active pixels in the union restricted for the category),
    <cat>-intersect, <cat>-iou; a unit without a label (module docstring) has an empty
    label and category. Where the permutation test ran, extras at the end (Lite's readers
    index columns by name): `p-value` (the unit's), `label-p-value` (of its label, empty
    without one) and `significant` (1 or 0, the FDR procedure over the layer). Rows
    are sorted as Lite sorts them, by score descending; Lite's tie order comes from an
    unstable argsort, here ties keep unit order. Counts are written as integers (Lite
    writes float64 counts such as 12544.0) and scores with Python's repr.
    """
    labels = result.labels
    counts = result.counts
    cat_names = [labels.categories[j] for j in result.categories]
    header = ["unit", "category", "label", "score"]
    for cat in cat_names:
        header += [
            f"{cat}-{field}" for field in ("label", "truth", "activation", "intersect", "iou")
        ]
    test = result.significance
    if test is not None:
        header += list(SIGNIFICANCE_COLUMNS)
        label_p = test.label_p(result.best_label)
    rows = []
    for unit in sorted(range(result.num_units), key=lambda u: -result.best_iou[u]):
        best = int(result.best_label[unit])
        row: dict[str, Any] = {
            "unit": unit + TALLY_UNIT_OFFSET,
            "category": labels.categories[int(result.best_category[unit])] if best >= 0 else "",
            "label": labels.names[best] if best >= 0 else "",
            "score": float(result.best_iou[unit]),
        }
        for col, (cat, j) in enumerate(zip(cat_names, result.categories, strict=True)):
            label = int(result.category_label[unit, col])
            have = label >= 0
            row[f"{cat}-label"] = labels.names[label] if have else ""
            row[f"{cat}-truth"] = int(counts["label_pixels"][label]) if have else 0
            row[f"{cat}-activation"] = int(counts["unit_pixels"][unit, j])
            row[f"{cat}-intersect"] = int(counts["intersection"][unit, label]) if have else 0
            row[f"{cat}-iou"] = float(result.category_iou[unit, col])
        if test is not None:
            row["p-value"] = float(test.p[unit])
            row["label-p-value"] = "" if np.isnan(label_p[unit]) else float(label_p[unit])
            row["significant"] = int(test.significant[unit])
        rows.append(row)
    return header, rows


def write_tally_csvs(folder: str | os.PathLike, layer_results: Sequence[LayerResult]) -> list[Path]:
    """Write every layer's tally.csv (Lite's schema) atomically into `folder`; returns the
    paths, in order.

    The files are `tally_csv_name` of the stems `layer_file_stems` gives the run's layers
    together, so no two layers share a file however their names clash (`a/b` and `a_b`):
    the schema has no layer column, and one file for two layers would mix them up.
    """
    folder = Path(folder)
    paths = []
    for result, stem in zip(
        layer_results, layer_file_stems([r.layer for r in layer_results]), strict=True
    ):
        path = folder / tally_csv_name(stem)
        header, rows = tally_csv_rows(result)
        with store.atomic_open(path, newline="") as f:
            writer = csv.DictWriter(f, header, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        paths.append(path)
    return paths


def _jsonable(value: Any) -> Any:
    """Settings as plain JSON values (numpy scalars and arrays, tuples, paths)."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"setting of type {type(value).__name__} is not JSON-serialisable")


def layer_record(result: LayerResult) -> dict[str, Any]:
    """JSON-ready record of one layer; every unit record repeats the layer name.

    `layer` is the name the user asked for, `path` the module path; `unit` is the 0-based
    channel index and `tally_csv_unit` the same unit's number in tally.csv.
    """
    labels, counts = result.labels, result.counts
    summary = layer_summary(result)
    cat_names = [labels.categories[j] for j in result.categories]
    tie_fraction = result.ties.tie_fraction if result.ties is not None else None
    test = result.significance
    label_p = None if test is None else test.label_p(result.best_label)
    units = []
    for unit in range(result.num_units):
        best = int(result.best_label[unit])
        per_category = {}
        for col, (cat, j) in enumerate(zip(cat_names, result.categories, strict=True)):
            label = int(result.category_label[unit, col])
            have = label >= 0
            per_category[cat] = {
                "label": label,
                "name": labels.names[label] if have else None,
                "iou": float(result.category_iou[unit, col]),
                "truth": int(counts["label_pixels"][label]) if have else 0,
                "activation": int(counts["unit_pixels"][unit, j]),
                "intersect": int(counts["intersection"][unit, label]) if have else 0,
            }
        units.append(
            {
                "layer": result.layer,
                "unit": unit,
                "tally_csv_unit": unit + TALLY_UNIT_OFFSET,
                "category": labels.categories[int(result.best_category[unit])]
                if best >= 0
                else None,
                "label": best,
                "name": labels.names[best] if best >= 0 else None,
                "iou": float(result.best_iou[unit]),
                "interpretable": bool(result.interpretable[unit]),
                "state": str(result.state[unit]),
                "active_pixels": int(counts["unit_total"][unit]),
                "tie_fraction": float(tie_fraction[unit]) if tie_fraction is not None else None,
                **_unit_test(result, unit, label_p),
                "categories": per_category,
            }
        )
    record = {
        "layer": result.layer,
        "path": result.path,
        "num_units": result.num_units,
        "num_images": int(counts.get("images", np.int64(-1))),
        "iou_threshold": result.iou_threshold,
        "categories": cat_names,
        "summary": {
            "interpretable_units": summary.interpretable_units,
            "unique_detectors": summary.unique_detectors,
            "interpretable_by_category": summary.interpretable_by_category,
            "unique_by_category": summary.unique_by_category,
            "concepts": [dataclasses.asdict(c) for c in summary.concepts],
            "cannot_fire": summary.cannot_fire,
            "unlabelled": summary.unlabelled,
            "states": summary.states,
        },
        "units": units,
    }
    if test is not None:
        interp, sig = result.interpretable, test.significant
        record["significance"] = {
            "draws": test.draws,
            "alpha": test.alpha,
            "fdr": test.procedure,
            "significant_units": int(sig.sum()),
            "interpretable_and_significant": int((interp & sig).sum()),
            "interpretable_not_significant": int((interp & ~sig).sum()),
            "significant_not_interpretable": int((~interp & sig).sum()),
        }
    return record


def _unit_test(result: LayerResult, unit: int, label_p: np.ndarray | None) -> dict[str, Any]:
    """A unit's p-values and FDR call in results.json (nothing where the test did not run)."""
    test = result.significance
    if test is None:
        return {}
    p = float(label_p[unit])
    return {
        "p_value": float(test.p[unit]),
        "label_p_value": None if np.isnan(p) else p,
        "significant": bool(test.significant[unit]),
    }


def results_document(results: Sequence[LayerResult], settings: Mapping[str, Any]) -> dict:
    """The settings and layers `write_results_json` writes, as JSON reads them back."""
    layers = [layer_record(result) for result in results]
    return json.loads(json.dumps({"settings": _jsonable(settings), "layers": layers}))


def write_results_json(
    path: str | os.PathLike, results: Sequence[LayerResult], settings: Mapping[str, Any]
) -> Path:
    """Write settings and every layer's per-unit results atomically; returns the path.

    Units are 0-based channel indices here (tally.csv keeps Lite's 1-based numbers); the
    document's `unit_numbering` says so.
    """
    layers = [result.layer for result in results]
    if len(set(layers)) != len(layers):
        raise ValueError(f"duplicate layer names: {layers}")
    records = [layer_record(result) for result in results]
    # Each unit's record on one line: indenting them all would run json's pure-Python
    # encoder (json's C encoder writes unindented text only).
    token = f"\0{secrets.token_hex(8)}:"  # random: no string of the document equals it
    units = [unit for record in records for unit in record["units"]]
    slots = iter(range(len(units)))
    document = {
        "format": RESULTS_FORMAT,
        "version": RESULTS_VERSION,
        "complete": True,
        "unit_numbering": UNIT_NUMBERING,
        "settings": _jsonable(settings),
    }
    document[store.CHECKSUM] = store.json_checksum({**document, "layers": records})
    document["layers"] = [
        {**r, "units": [f"{token}{next(slots)}" for _ in r["units"]]} for r in records
    ]
    lines = [json.dumps(unit, allow_nan=False, ensure_ascii=False) for unit in units]
    text = json.dumps(document, indent=1, allow_nan=False, ensure_ascii=False)
    quoted = re.escape(json.dumps(token, ensure_ascii=False)[:-1])
    text = re.sub(quoted + r'(\d+)"', lambda m: lines[int(m.group(1))], text)
    return store.write_text(path, text + "\n")


# What a results.json written before a setting was recorded was computed with.
UNRECORDED_SETTINGS = MappingProxyType({"tie_rule": "strict"})


def read_results_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results file (`path`, or the results.json in the run folder `path`), refusing
    anything that is not a complete one of ours, with the fields its readers index
    (`results_schema.check_document`)."""
    if Path(path).is_dir():
        folder, path = path, Path(path) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} holds no results.json: pass a finished run's folder or its results.json"
            )
    document = store.read_json_object(path, results_schema.FIX, checked=True)
    if document.get("format") != RESULTS_FORMAT:
        raise ValueError(f"{path} is not a jaxdissect results file")
    if document.get("version") != RESULTS_VERSION or document.get("complete") is not True:
        raise ValueError(f"{path}: unsupported version or incomplete results")
    results_schema.check_document(document, path)
    return document

"""Two tally.csv files in NetDissect-Lite's schema compared unit by unit: a dissection against
NetDissect-Lite's own, or two dissections of one layer.

A tally.csv has a row per unit: `unit` (from 1), `category`, `label` (empty for a unit
without one), `score` (its best IoU), then per category `<cat>-label`, `-truth`,
`-activation`, `-intersect`, `-iou` (`results.tally_csv_rows`). Rows may come in any order
(Lite sorts them by score, ties in no fixed order); only the first four columns are read.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Mapping

from jaxdissect import store

# The columns read; any others are passed over.
COLUMNS = ("unit", "category", "label", "score")


@dataclasses.dataclass(frozen=True)
class UnitLabel:
    """A unit's best label in a tally.csv ("" where it has none) and its IoU."""

    category: str
    label: str
    score: float


@dataclasses.dataclass(frozen=True)
class TallyDiff:
    """Units of two tallies of one layer, `a` and `b`, by their labels.

    Attributes:
      units: the units both tallies hold (the same set).
      same_label: units whose labels are equal (two empty labels too).
      detectors: units whose score passes `iou_threshold`, in a and in b.
      either_detectors: units that are a detector in a or in b.
      same_label_detectors: of those, the units with equal labels.
      largest_score_difference: max over units of |score a - score b|, and its unit.
      differing: (unit, a's UnitLabel, b's UnitLabel) of the units whose labels differ,
        the higher of the two scores first.
    """

    units: int
    same_label: int
    detectors: tuple[int, int]
    either_detectors: int
    same_label_detectors: int
    largest_score_difference: tuple[float, int]
    differing: tuple[tuple[int, UnitLabel, UnitLabel], ...]


def read_tally_csv(path: str | os.PathLike[str]) -> dict[int, UnitLabel]:
    """unit (from 1) -> its label, from a tally.csv. A unit of score 0 overlaps no concept:
    it has no label, whatever the file names (Lite writes its argmax over zeros, `-`).

    Raises:
      ValueError: in one line naming the file, and the line and column where one is wrong
        (a column missing, a unit that is no whole number >= 1 or repeated, a score that is
        no number).
      FileNotFoundError: no such file.
    """
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            try:
                return _read_units(path, reader)
            except csv.Error as e:
                raise ValueError(f"{path}: after line {reader.line_num}: not CSV ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _read_units(path: str | os.PathLike[str], reader: csv.DictReader) -> dict[int, UnitLabel]:
    """The rows of `reader` (of `path`) by unit; see `read_tally_csv`."""
    units: dict[int, UnitLabel] = {}
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise ValueError(
            f"{path}: line 1: no column {', '.join(missing)}; a tally.csv starts "
            f"{','.join(COLUMNS)}"
        )
    for row in reader:
        where = f"{path}: line {reader.line_num}"
        if any(row[c] is None for c in COLUMNS):
            raise ValueError(f"{where}: fewer cells than columns")
        try:
            unit = int(row["unit"])
        except ValueError:
            unit = 0
        if unit < 1:
            raise ValueError(f"{where}: unit {row['unit']!r} is no whole number >= 1")
        if unit in units:
            raise ValueError(f"{where}: unit {unit} again")
        try:
            score = float(row["score"])
        except ValueError:
            raise ValueError(f"{where}: score {row['score']!r} is no number") from None
        if math.isnan(score):
            raise ValueError(f"{where}: score {row['score']!r} is no number")
        if score == 0:
            units[unit] = UnitLabel("", "", 0.0)
        else:
            units[unit] = UnitLabel(row["category"], row["label"], score)
    if not units:
        raise ValueError(f"{path}: no units")
    return units


def diff_tallies(
    a: Mapping[int, UnitLabel],
    b: Mapping[int, UnitLabel],
    *,
    iou_threshold: float = 0.04,
    names: tuple[str, str] = ("a", "b"),
) -> TallyDiff:
    """The units of `a` and `b` (`read_tally_csv`) by their labels; a detector's score is
    above `iou_threshold`.

    Raises:
      ValueError: the two hold other units (named as `names`).
    """
    if a.keys() != b.keys():
        only = sorted(a.keys() - b.keys())[:5], sorted(b.keys() - a.keys())[:5]
        raise ValueError(
            f"{names[0]} holds {len(a)} units and {names[1]} {len(b)}: units only in "
            f"{names[0]} {only[0]}, only in {names[1]} {only[1]} (from 1); compare tallies "
            "of one layer"
        )
    units = sorted(a)
    same = [u for u in units if a[u].label == b[u].label]
    hit_a = {u for u in units if a[u].score > iou_threshold}
    hit_b = {u for u in units if b[u].score > iou_threshold}
    either = hit_a | hit_b
    gap, gap_unit = max((abs(a[u].score - b[u].score), u) for u in units)
    differing = sorted(
        (u for u in units if a[u].label != b[u].label),
        key=lambda u: (-max(a[u].score, b[u].score), u),
    )
    return TallyDiff(
        units=len(units),
        same_label=len(same),
        detectors=(len(hit_a), len(hit_b)),
        either_detectors=len(either),
        same_label_detectors=sum(1 for u in same if u in either),
        largest_score_difference=(gap, gap_unit),
        differing=tuple((u, a[u], b[u]) for u in differing),
    )


def summary(diff: TallyDiff, names: tuple[str, str] = ("a", "b")) -> str:
    """The diff in a few lines."""
    gap, gap_unit = diff.largest_score_difference
    share = lambda n, d: f"{n} ({100 * n / d:.1f}%)" if d else "0"  # noqa: E731
    return (
        f"{diff.units} units, {share(diff.same_label, diff.units)} with the same label\n"
        f"detectors: {diff.detectors[0]} in {names[0]}, {diff.detectors[1]} in {names[1]}; of "
        f"the {diff.either_detectors} a detector in either, "
        f"{share(diff.same_label_detectors, diff.either_detectors)} with the same label\n"
        + (f"largest IoU difference {gap:.6g} (unit {gap_unit})" if gap else "every IoU equal")
    )


def write_differing_csv(
    path: str | os.PathLike[str], diff: TallyDiff, names: tuple[str, str] = ("a", "b")
) -> None:
    """One row per unit whose labels differ: unit, then each tally's category, label and
    score."""
    fields = ("category", "label", "score")
    header = ["unit", *(f"{n}-{f}" for n in names for f in fields)]
    with store.atomic_open(path, newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for unit, x, y in diff.differing:
            writer.writerow([unit, x.category, x.label, x.score, y.category, y.label, y.score])

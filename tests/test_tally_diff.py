"""Two tally.csv files compared unit by unit: ours as written, NetDissect-Lite's as it writes
them, hostile files, and the script."""

from __future__ import annotations

import csv
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxdissect import results, tally_diff
from jaxdissect.tally_diff import UnitLabel
from tests.experiment_testing import run_script
from tests.test_results import _counts, _labels


def _layer(seed: int) -> results.LayerResult:
    """A layer of 20 units with random counts (ties, a unit that cannot fire, a weak one)."""
    rng = np.random.default_rng(seed)
    inter = rng.integers(0, 50, (20, 9))
    inter[:, 2] = inter[:, 1]
    label_pixels = inter.max(0) + rng.integers(1, 100, 9)
    unit_pixels = np.repeat(inter.max(1, keepdims=True), 4, 1) + rng.integers(0, 100, (20, 4))
    inter[3], unit_pixels[3] = 0, 0
    inter[5] = 1  # IoU about 1/150: below 0.04
    return results.layer_result("l", _counts(inter, label_pixels, unit_pixels), _labels())


def _lite_csv(path, units: dict[int, UnitLabel]) -> None:
    """A tally.csv as NetDissect-Lite writes one: float counts, rows by score, a label for
    every unit (a unit of IoU 0 gets its argmax over zeros: label 0, `-`)."""
    header = ["unit", "category", "label", "score", "color-label", "color-truth"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for unit, x in sorted(units.items(), key=lambda kv: -kv[1].score):
            writer.writerow([unit, x.category or "color", x.label or "-", x.score, "", "3.0"])


def test_a_written_tally_reads_back_as_its_layer_result(tmp_path):
    layer = _layer(0)
    (path,) = results.write_tally_csvs(tmp_path, [layer])
    got = tally_diff.read_tally_csv(path)
    names, cats = layer.labels.names, layer.labels.categories
    assert sorted(got) == list(range(1, 21))
    for k in range(20):
        best = int(layer.best_label[k])
        want = UnitLabel(
            cats[int(layer.best_category[k])] if best >= 0 else "",
            names[best] if best >= 0 else "",
            float(layer.best_iou[k]),
        )
        assert got[k + results.TALLY_UNIT_OFFSET] == want
    assert got[4] == UnitLabel("", "", 0.0)  # unit 3 cannot fire: no label
    diff = tally_diff.diff_tallies(got, got)
    assert (diff.units, diff.same_label, diff.differing) == (20, 20, ())
    assert diff.largest_score_difference[0] == 0.0


def test_planted_differences_are_counted_as_by_hand(tmp_path):
    """Against a NetDissect-Lite file: one unit relabelled above the threshold, one below,
    one whose score moved across it, and Lite's label for the unit that cannot fire (label
    0, `-`: no label, as ours)."""
    ours = tally_diff.read_tally_csv(results.write_tally_csvs(tmp_path, [_layer(1)])[0])
    lite = dict(ours)
    assert ours[4] == UnitLabel("", "", 0.0)
    lite[4] = UnitLabel("color", "-", 0.0)
    detectors = [u for u in sorted(ours) if ours[u].score > 0.04]
    weak = [u for u in sorted(ours) if 0 < ours[u].score <= 0.04]
    assert len(detectors) >= 2 and weak
    up, moved, low = detectors[0], detectors[1], weak[0]
    lite[up] = UnitLabel("scene", "street-s", ours[up].score)
    lite[moved] = UnitLabel(ours[moved].category, ours[moved].label, 0.01)
    lite[low] = UnitLabel("object", "car", ours[low].score + 0.002)
    _lite_csv(tmp_path / "lite.csv", lite)
    read = tally_diff.read_tally_csv(tmp_path / "lite.csv")
    assert read[4] == UnitLabel("", "", 0.0)  # a score of 0 is no label, whatever its name
    diff = tally_diff.diff_tallies(ours, read)
    assert diff.units == 20 and diff.same_label == 20 - 2
    n = len(detectors)
    assert diff.detectors == (n, n - 1) and diff.either_detectors == n
    assert diff.same_label_detectors == n - 1  # `up` differs; `moved` keeps its label
    assert diff.largest_score_difference == (pytest.approx(ours[moved].score - 0.01), moved)
    assert sorted(u for u, _, _ in diff.differing) == sorted([up, low])
    assert diff.differing[0][0] == max((up, low), key=lambda u: ours[u].score)
    assert "18 (90.0%) with the same label" in tally_diff.summary(diff)


@pytest.mark.parametrize(
    "text,message",
    [
        ("unit,label,score\n1,a,0.1\n", r"line 1: no column category"),
        ("unit,category,label,score\n1,object,a,0.1\nx,object,b,0.2\n", r"line 3: unit 'x'"),
        ("unit,category,label,score\n0,object,a,0.1\n", r"line 2: unit '0' is no whole number"),
        ("unit,category,label,score\n1,object,a,0.1\n1,object,b,0.2\n", r"line 3: unit 1 again"),
        ("unit,category,label,score\n1,object,a,high\n", r"line 2: score 'high' is no number"),
        ("unit,category,label,score\n1,object,a,nan\n", r"line 2: score 'nan' is no number"),
        ("unit,category,label,score\n1,object\n", r"line 2: fewer cells than columns"),
        ("unit,category,label,score\n", r"no units"),
        ("unit,category,label,score\n1," + "o" * 200_000 + ",a,0.1\n", r"after line 1: not CSV"),
    ],
)
def test_a_bad_tally_is_named_in_one_line(tmp_path, text, message):
    path = tmp_path / "tally.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"^{tmp_path}/tally\.csv: {message}"):
        tally_diff.read_tally_csv(path)
    path.write_bytes(b"unit,category,label,score\n1,\xff,a,0.1\n")
    with pytest.raises(ValueError, match=rf"^{tmp_path}/tally\.csv: not UTF-8 text"):
        tally_diff.read_tally_csv(path)


def test_tallies_of_other_layers_are_refused():
    a = {u: UnitLabel("", "", 0.0) for u in (1, 2, 3)}
    b = {u: UnitLabel("", "", 0.0) for u in (1, 2, 4)}
    with pytest.raises(ValueError, match=r"^x holds 3 units and y 3: units only in x \[3\]"):
        tally_diff.diff_tallies(a, b, names=("x", "y"))


def test_the_script_prints_the_diff_and_writes_the_differing_units(tmp_path, capsys):
    ours = results.write_tally_csvs(tmp_path, [_layer(2)])[0]
    lite = dict(tally_diff.read_tally_csv(ours))
    lite[1] = UnitLabel("scene", "street-s", 0.5)
    _lite_csv(tmp_path / "lite.csv", lite)
    out = tmp_path / "differ.csv"
    diff = run_script(
        "diff_tally", f"--a={ours}", f"--b={tmp_path / 'lite.csv'}", f"--output={out}"
    )
    printed = capsys.readouterr().out
    assert f"a: {ours}" in printed and tally_diff.summary(diff) in printed
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["unit"] for r in rows] == [str(u) for u, _, _ in diff.differing]
    assert rows[0]["b-label"] == "street-s" and float(rows[0]["b-score"]) == 0.5
    with pytest.raises(FileNotFoundError, match=r"^--b=.*nothing\.csv: no such file$"):
        run_script("diff_tally", f"--a={ours}", f"--b={tmp_path / 'nothing.csv'}")


def test_the_script_reads_a_tilde_in_its_paths_as_the_home_folder(tmp_path, monkeypatch):
    """`--a=~/x.csv` (the shell leaves `~` after `=`) was 'no such file' for a file that
    exists, and `--output=~/d.csv` wrote into a folder named `~` in the working folder."""
    from absl import flags

    from jaxdissect import cli
    from tests.experiment_testing import script

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    results.write_tally_csvs(home, [_layer(5)])
    fv = flags.FlagValues()
    diff_tally = script("diff_tally")
    diff_tally.define_flags(fv)
    fv(["prog", "--a=~/tally-l.csv", "--b=~/tally-l.csv", "--output=~/differ.csv"])
    cli.script_main(lambda: diff_tally.run(fv), fv, runs_jax=False)(["prog"])
    assert (home / "differ.csv").is_file() and not (tmp_path / "~").exists()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--iou_threshold=-0.5", r"^--iou_threshold=-0.5: must be in \[0, 1\)$"),
        ("--iou_threshold=1", r"^--iou_threshold=1.0: must be in \[0, 1\)$"),
        ("--output={folder}", r"^--output=.*: a folder, not a file; name the CSV file to write$"),
    ],
)
def test_the_script_refuses_a_bad_threshold_or_output_before_comparing(tmp_path, flag, message):
    """A threshold outside [0, 1) (every unit, or none, a detector) and an --output that is a
    folder are one line naming the flag, before the files are read."""
    ours = results.write_tally_csvs(tmp_path, [_layer(4)])[0]
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match=message):
        run_script("diff_tally", f"--a={ours}", f"--b={ours}", flag.format(folder=folder))


def test_the_script_compares_without_importing_jax(tmp_path):
    """Comparing two CSV files needs no JAX and no loader (grain): a fresh process of the
    script imports neither, so it answers at once."""
    ours = results.write_tally_csvs(tmp_path, [_layer(3)])[0]
    script = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "diff_tally.py"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['diff_tally', '--a={ours}', '--b={ours}']\n"
        "try:\n"
        f"    runpy.run_path({str(script)!r}, run_name='__main__')\n"
        "finally:\n"
        "    print('imported:', sorted({'jax', 'grain'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "every IoU equal" in done.stdout
    assert done.stdout.rstrip().endswith("imported: []"), done.stdout

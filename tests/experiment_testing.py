"""Running the experiment scripts inside tests, and the tiny synthetic Broden they train on.

Each script is loaded from its file and run through `run(flag_values)` (what
its `main` calls) on flags parsed by a fresh `FlagValues`, so that the
scripts' flags do not collide.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import types

import numpy as np
from absl import flags

from jaxdissect import outdir, results
from jaxdissect.data import synthetic
from jaxdissect.report import html as report_html

ROOT = pathlib.Path(__file__).resolve().parents[1]
# 256 synthetic images at 48 px: enough for a half-width small CNN to learn the scenes.
TINY_IMAGES, TINY_SIZE = 256, 48
# A quick dissection for a script's test: exact thresholds, one device, no report.
QUICK = ("--quantile_mode=exact", "--batch_size=8", "--devices=1", "--noreport", "--noprogress")


def tiny_broden(out: pathlib.Path) -> pathlib.Path:
    """Writes the tiny synthetic Broden the experiment tests train and dissect on."""
    return synthetic.generate(out, num_images=TINY_IMAGES, size=TINY_SIZE, workers=1)


def script(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"_experiment_{name}", ROOT / "experiments" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(name: str, *argv: str) -> flags.FlagValues:
    fv = flags.FlagValues()
    script(name).define_flags(fv)
    fv(["prog", *argv])
    return fv


def run_script(name: str, *argv: str):
    return script(name).run(parse(name, *argv))


def unaccounted_files(out: pathlib.Path) -> list[str]:
    """Files in `out` that neither its dissection (results.json, tallies, stats, report) nor
    `outdir.FOLLOW_ON_OUTPUTS` name: a follow-on's output a rerun would leave behind."""
    stems = results.layer_file_stems(
        json.loads((out / "results.json").read_text())["settings"]["layers"]
    )
    known = {
        out / name
        for name in (
            "results.json",
            outdir.LOCK_FILE,
            *report_html.report_files(stems),
            *(results.tally_csv_name(s) for s in stems),
            *(results.stats_npz_name(s) for s in stems),
        )
    }
    known |= set(outdir.follow_on_files(out))
    return sorted(
        p.relative_to(out).as_posix()
        for p in out.rglob("*")
        if p.is_file()
        and ".work" not in p.relative_to(out).parts
        and not known.intersection((p, *p.parents))
    )


def mesh_of(platform: str, device_kind: str) -> types.SimpleNamespace:
    """A stand-in mesh of one device of another backend, for stage keys."""
    device = types.SimpleNamespace(platform=platform, device_kind=device_kind)
    return types.SimpleNamespace(devices=np.array([device], dtype=object))

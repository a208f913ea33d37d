"""Stored stages notice changed data: edit one image after a run and both passes run again.

(Which edits change the key, in both `data_hash` modes, is pinned in test_broden.py.)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import logging
import time

import numpy as np
import pytest
from absl import flags
from PIL import Image

from jaxdissect import cli, driver, engine, parallel, pipeline, store, ties
from jaxdissect.data import Broden, open_probe, synthetic
from tests.broden_testing import tiny_broden
from tests.fixtures.small_model import make

REUSED = "reusing stored results"
# The stage tests' dissections: sketch thresholds (which depend on the mesh), on 1 device
# unless a test says otherwise, all through one module `steps`: each program compiles once.
SKETCH = engine.Settings(batch_size=8, quantile_mode="sketch", quantile=0.05)


@pytest.fixture(scope="module")
def steps() -> driver.Steps:
    return driver.Steps()


def _dissect(root, out, caplog, steps, mesh=None, settings=SKETCH):
    """Tallies of one dissection, and the stages it reused (from the engine's log)."""
    module, variables = make()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        layers = pipeline.dissect(
            pipeline.ModelInfo(
                module, variables, module.input_spec, "small", store.fingerprint_tree(variables)
            ),
            ["conv1"],
            Broden.open(root),
            settings,
            out,
            dataset_name="tiny",
            mesh=mesh or parallel.data_mesh(1),
            options=pipeline.Options(progress=False, num_threads=0, report=False),
            steps=steps,
        )
    reused = sorted(
        r.getMessage().split(":")[0] for r in caplog.records if REUSED in r.getMessage()
    )
    (layer,) = layers
    return reused, {k: np.asarray(v) for k, v in layer.counts.items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_editing_one_image_recomputes_both_passes(tmp_path, caplog, steps):
    root = synthetic.generate_tiny(tmp_path / "broden", num_images=16)
    out = tmp_path / "run"
    reused, first = _dissect(root, out, caplog, steps)
    assert reused == []
    # Both passes stored: their checkpoint folders (orbax makes them at the start) are gone.
    assert list((out / ".work" / "checkpoints").iterdir()) == []
    reused, again = _dissect(root, out, caplog, steps)
    assert reused == ["pass1", "pass2"] and _same(again, first)  # nothing changed: reused

    image = root / "images" / Broden.open(root).records[0].image
    size = Image.open(image).size
    Image.new("RGB", size, (128, 128, 128)).save(image)  # the flat grey
    reused, edited = _dissect(root, out, caplog, steps)
    assert reused == []
    assert not _same(edited, first)
    # And from a fresh output directory, the same numbers: nothing stale was mixed in.
    _, fresh = _dissect(root, tmp_path / "fresh", caplog, steps)
    assert _same(edited, fresh)


def test_stages_are_reused_only_on_the_mesh_that_computed_them(
    tmp_path, caplog, steps, monkeypatch
):
    """Sketch thresholds depend on the per-device seeds: a run on 2 devices does not take
    the stored stages of a run on 1 device (nor its checkpoints), a rerun on 1 does. A
    sketched layer's units whose thresholds sit on their maximum are warned of (planted)."""
    root = synthetic.generate_tiny(tmp_path / "broden", num_images=16)
    out = tmp_path / "run"
    one, two = parallel.data_mesh(1), parallel.data_mesh(2)
    monkeypatch.setattr(ties.UnitTies, "sketch_warning", lambda self, layer: f"planted {layer}")
    assert _dissect(root, out, caplog, steps, one)[0] == []
    assert [r.getMessage() for r in caplog.records if "planted" in r.getMessage()] == [
        "planted conv1"
    ]
    assert _dissect(root, out, caplog, steps, two)[0] == []
    assert _dissect(root, out, caplog, steps, one)[0] == ["pass1", "pass2"]


def test_data_hash_reaches_the_source_from_the_flags(tmp_path):
    root = tiny_broden(tmp_path / "b").root
    fv = flags.FlagValues()
    cli.define_dissection_flags(fv)
    for mode in ("stat", "content"):
        fv(["prog", f"--data={root}", "--split=all", f"--data_hash={mode}"])
        source, _ = cli.probe_from_flags(fv).open()
        assert source.fingerprint() == Broden.open(root, data_hash=mode).fingerprint()
    with pytest.raises(ValueError, match="data_hash='crc'"):
        open_probe(str(root), data_hash="crc")


def test_runs_sharing_a_cache_generate_the_synthetic_probe_once(tmp_path, monkeypatch):
    """Two runs opening the same synthetic Broden at once: one generates it, the other
    waits and reads the same files (before, both generated, and the second replaced the
    folder the first was reading)."""
    real, calls = synthetic.generate, []

    def slow_generate(root, **kwargs):
        calls.append(root)
        time.sleep(0.5)  # the other run asks meanwhile
        return real(root, **kwargs)

    monkeypatch.setattr(synthetic, "generate", slow_generate)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        opened = [
            pool.submit(
                open_probe, "synthetic", synthetic_images=3, resolution=32, cache_dir=tmp_path
            )
            for _ in range(2)
        ]
        sources = [f.result()[0] for f in opened]
    assert len(calls) == 1
    assert sources[0].fingerprint() == sources[1].fingerprint()
    assert len(sources[0]) == 3


def test_synthetic_probe_defaults_to_the_cache_root(tmp_path, monkeypatch):
    # One cache root for the library and the scripts: $JAXDISSECT_CACHE moves both.
    monkeypatch.setenv("JAXDISSECT_CACHE", str(tmp_path))
    generated = []

    def generate(root, **kwargs):
        generated.append(root)
        raise RuntimeError("stop before generating")

    monkeypatch.setattr(synthetic, "generate", generate)
    with pytest.raises(RuntimeError, match="stop before generating"):
        open_probe("synthetic", synthetic_images=3, resolution=32)
    assert generated and generated[0].parent == tmp_path
    assert cli.cache_root() == tmp_path
    fields = {f.name: f.default for f in dataclasses.fields(cli.Probe)}
    assert (fields["synthetic_images"], fields["resolution"]) == (600, 224)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"resolution": 7}, r"^resolution=7: a synthetic Broden's side must be >= 16$"),
        ({"synthetic_images": 0}, r"^synthetic_images=0: must be >= 1$"),
    ],
)
def test_the_library_names_a_synthetic_size_it_cannot_generate(tmp_path, kwargs, message):
    """As the CLI's flags do: the parameter's name, before anything is written (the
    generator's `size=7` came after a lock file and a 'Generating ...' line)."""
    with pytest.raises(ValueError, match=message):
        open_probe("synthetic", **{"synthetic_images": 3, "resolution": 32, **kwargs},
                   cache_dir=tmp_path / "cache")  # fmt: skip
    assert not (tmp_path / "cache").exists()


def test_a_full_disk_while_generating_names_the_synthetic_folder(tmp_path, monkeypatch):
    """PIL's and numpy's writes raise ENOSPC naming no file: the error names the set's
    folder, so that the script's one line says which disk is full."""

    def full(root, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(synthetic, "generate", full)
    with pytest.raises(OSError) as e:
        open_probe("synthetic", synthetic_images=3, resolution=32, cache_dir=tmp_path)
    assert e.value.errno == errno.ENOSPC
    assert e.value.filename == str(tmp_path / "synthetic_broden-32-n3-seed0")


def test_a_sketch_size_no_layer_uses_is_said(tmp_path, caplog, steps):
    """`auto` chose the histogram for the small model's conv1: --sketch_size sizes nothing."""
    root = synthetic.generate_tiny(tmp_path / "broden", num_images=16)
    settings = engine.Settings(batch_size=8, sketch_size=64)
    _dissect(root, tmp_path / "run", caplog, steps, settings=settings)
    assert "thresholds: conv1 histogram" in caplog.text
    assert "sketch_size=64: no layer's thresholds use a sketch" in caplog.text


def test_the_cached_synthetic_probe_is_checked_on_reuse(tmp_path, monkeypatch, caplog):
    """An edited, incomplete or other generator's cached set is generated again, with a line
    saying why; a copy of the same bytes (new times) is reused; a killed generation's
    folder is removed."""
    real, calls = synthetic.generate, []

    def generate(root, **kwargs):
        calls.append(root)
        return real(root, **kwargs)

    monkeypatch.setattr(synthetic, "generate", generate)
    kwargs = dict(synthetic_images=3, resolution=32, cache_dir=tmp_path)
    source, _ = open_probe("synthetic", **kwargs)
    root, key, images = source.root, source.fingerprint(), sorted(source.root.rglob("*.jpg"))
    original = images[0].read_bytes()
    (tmp_path / f".{root.name}.partial-0badc0de").mkdir()
    for path in images:  # the same bytes, new ctimes
        path.write_bytes(path.read_bytes())
    assert open_probe("synthetic", **kwargs)[0].fingerprint() != key  # its stat key moved
    assert len(calls) == 1 and not list(tmp_path.glob(".*.partial-*"))
    edits = {
        "its files differ": lambda: images[0].write_bytes(images[1].read_bytes()),
        "not found": lambda: images[0].unlink(),
        "version=0, this generator writes version=1": lambda: (root / "synthetic.json").write_text(
            (root / "synthetic.json").read_text().replace('"version": 1', '"version": 0')
        ),
        "no index.csv (a set not finished)": lambda: (root / "index.csv").unlink(),
    }
    for why, edit in edits.items():
        edit()
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            source, _ = open_probe("synthetic", **kwargs)
        assert f"{why}" in caplog.text and "generating it again" in caplog.text, why
        assert images[0].read_bytes() == original, why
    assert len(calls) == 1 + len(edits)
    content = dict(kwargs, data_hash="content")
    assert (
        open_probe("synthetic", **content)[0].fingerprint()
        == Broden.open(root, data_hash="content").fingerprint()
    )
    assert len(calls) == 1 + len(edits)

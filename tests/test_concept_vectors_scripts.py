"""experiments/concept_vectors.py and experiments/segment.py end to end at tiny size, on a
finished dissection of a small random-init model (tests/fixtures/small_model.py)."""

from __future__ import annotations

import json
import pathlib
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jaxdissect import concept_vectors, finished, parallel, store
from jaxdissect.report import concept_page
from tests.experiment_testing import TINY_SIZE, mesh_of, run_script, script, tiny_broden

pytestmark = pytest.mark.xdist_group("concept_vectors_scripts")
MODEL = ("--model=tests.fixtures.small_model:make", "--weights=")
# The vectors' training: one epoch on masks at stride 4 (the tests check what the outputs
# say of each other, not how good the vectors are).
PROBE_IMAGES = 64
VECTORS = ("--epochs=1", "--probe_batch_size=16", "--mask_stride=4", "--learning_rate=0.05")


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> tuple[str, ...]:
    broden = tiny_broden(tmp_path_factory.mktemp("broden") / "broden1_48")
    # Its first 64 images: the dissection's and the vectors' probe set.
    return (f"--data={broden}", f"--resolution={TINY_SIZE}", f"--max_images={PROBE_IMAGES}")


@pytest.fixture(scope="module")
def dissection(tmp_path_factory, data_args) -> pathlib.Path:
    out = tmp_path_factory.mktemp("dissect") / "run"
    run_script(
        "dissect",
        *MODEL,
        *data_args,
        "--layers=conv1,top",
        "--batch_size=16",
        "--quantile_mode=exact",
        "--devices=1",
        "--noprogress",
        "--noreport",
        f"--output_dir={out}",
    )
    return out


@pytest.fixture(scope="module")
def vectors(tmp_path_factory, data_args, dissection) -> tuple[pathlib.Path, dict]:
    out = tmp_path_factory.mktemp("vectors") / "run"
    doc = run_script(
        "concept_vectors",
        f"--dissection={dissection}",
        "--layer=top",
        *MODEL,
        *data_args,
        *VECTORS,
        "--devices=1",
        "--noprogress",
        f"--output_dir={out}",
    )
    return out, doc


def test_concept_vectors_script_writes_every_output(vectors, dissection):
    out, doc = vectors
    for name in ("json", "csv", "npz", "png", "html"):
        assert (out / f"concept_vectors.{name}").is_file(), name
    assert (out / ".work").is_dir()
    assert not (out / ".work" / "concept_vectors_data").exists()  # the probe data's files
    units = json.loads((dissection / "results.json").read_text())["layers"][1]["units"]
    assert doc["settings"]["units"] == 12 == len(units)
    arrays = store.load_arrays(out / "concept_vectors.npz")
    assert arrays["weights"].shape == (doc["summary"]["concepts"], 12)
    # The split, so that the scores can be checked side by side (only its size was written).
    settings = doc["settings"]
    train, held = concept_vectors.split_images(
        settings["images"], settings["heldout_fraction"], settings["probe_seed"]
    )
    np.testing.assert_array_equal(arrays["heldout_images"], held)
    np.testing.assert_array_equal(arrays["train_images"], train)
    assert len(held) == settings["heldout_images"] and len(train) == settings["train_images"]
    for c in doc["concepts"]:  # as the README says
        assert c["scored"] == (c["train_pixels"] > 0 and c["heldout_pixels"] > 0)
    scored = [c for c in doc["concepts"] if c["scored"]]
    s = doc["summary"]
    assert s["scored"] == len(scored) > 0
    assert s["beats"] == sum(c["iou"] > c["single_iou"] for c in scored)
    assert s["mean_gain"] == pytest.approx(np.mean([c["gain"] for c in scored]))
    for c in doc["concepts"]:
        assert c["gain"] == pytest.approx(c["iou"] - c["single_iou"])
        assert c["best_heldout_iou"] >= c["single_iou"]
        if c["single_unit"] is None:  # no unit overlaps the concept on the training images
            assert c["single_unit_label"] is None and c["single_iou"] == 0.0
        else:
            assert c["single_unit_label"] == units[c["single_unit"]]["name"]
        for u in c["top_units"]:
            assert u["weight"] > 0 and u["label"] == units[u["unit"]]["name"]
    rows = store.read_rows_csv(out / "concept_vectors.csv")
    assert [r["name"] for r in rows] == [c["name"] for c in doc["concepts"]]
    assert doc["cost"]["forward_s"] > 0 and doc["cost"]["train_steps"] > 0
    html = (out / "concept_vectors.html").read_text()
    # Sorted by gain, highest first.
    best = max(scored, key=lambda c: c["gain"])["name"]
    assert html.index(f">{best}<") <= min(html.index(f">{c['name']}<") for c in scored)


def test_a_rerun_resumes_from_the_finished_training(vectors, data_args, dissection):
    out, doc = vectors
    again = run_script(
        "concept_vectors",
        f"--dissection={dissection}",
        "--layer=top",
        *MODEL,
        *data_args,
        *VECTORS,
        "--devices=1",
        "--noprogress",
        f"--output_dir={out}",
    )
    assert again["cost"]["train_s"] == 0.0  # every step restored from the checkpoint
    assert [c["iou"] for c in again["concepts"]] == [c["iou"] for c in doc["concepts"]]


def test_checkpoints_are_keyed_by_the_devices_backend_and_forward_batch_size(dissection):
    """XLA rounds a layer's activations per batch shape, and the training's sums per
    device count: checkpoints made with another --batch_size or --devices are not reused."""
    layer = finished.read_layer(dissection, "top")

    def key(mesh, batch_size):
        return script("concept_vectors").checkpoint_key(
            "model",
            layer,
            data="data",
            mesh=mesh,
            batch_size=batch_size,
            concepts=[1, 2],
            categories=["object"],
            config=concept_vectors.ProbeConfig(),
        )

    one, two, gpu = parallel.data_mesh(1), parallel.data_mesh(2), mesh_of("gpu", "H100")
    keys = {key(one, 32), key(two, 32), key(one, 8), key(gpu, 32)}
    assert len(keys) == 4 and key(one, 8) == key(one, 8)


def test_no_finished_dissection_is_one_line(tmp_path, data_args, dissection, caplog, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"--dissection=.*no finished dissection"):
        run_script("concept_vectors", f"--dissection={tmp_path}", *MODEL, *data_args)
    with pytest.raises(
        ValueError, match=r"--layer=conv9: the dissection in .* has layers conv1, top"
    ):
        run_script("concept_vectors", f"--dissection={dissection}", "--layer=conv9", *MODEL)
    with pytest.raises(ValueError, match=r"--dissection=.* dissected .*, not the model given"):
        finished.read_layer(dissection, "top", model_key="weights of another model")
    recorded = json.loads((dissection / "results.json").read_text())["settings"]
    same = finished.read_layer(
        dissection, "top", model_key=recorded["model_key"], model_fields=recorded["model_fields"]
    )
    assert same.model_key == recorded["model_key"]
    with pytest.raises(ValueError, match=r"with the same weights but other settings of its"):
        finished.read_layer(
            dissection, "top", model_key=recorded["model_key"], model_fields="other fields"
        )
    loaded = finished.load_model("tests.fixtures.small_model:make", "")
    code = finished.model_code_key(loaded.module, loaded.apply_kwargs)
    assert recorded["model_code"] == code  # what concept_vectors.py and segment.py compare
    with pytest.raises(ValueError, match=r"--dissection=.* was dissected by other model code"):
        finished.read_layer(dissection, "top", model_code="another module's source")
    damaged = tmp_path / "damaged"
    shutil.copytree(dissection, damaged)
    doc = json.loads((dissection / "results.json").read_text())
    del doc["settings"]["model_code"], doc["checksum"]  # an older dissection's
    store.write_json(damaged / "results.json", doc)
    with caplog.at_level("WARNING"):
        assert finished.read_layer(damaged, "top", model_code=code).model_key
    assert any("records no model code key" in r.getMessage() for r in caplog.records)
    stats = damaged / "stats-top.npz"
    stats.write_bytes(stats.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"--dissection=.*arrays are missing or damaged .*again"):
        finished.read_layer(damaged, "top")
    arrays = store.load_arrays(dissection / "stats-top.npz")
    for bad in (np.nan, np.inf):  # thresholds no dissection writes
        thresholds = arrays["thresholds"].copy()
        thresholds[1] = bad
        store.save_arrays(stats, {**arrays, "thresholds": thresholds})
        with pytest.raises(ValueError, match=r"damaged \(.*stats-top.npz: .* 1 not finite"):
            finished.read_layer(damaged, "top")
    store.save_arrays(stats, {**arrays, "thresholds": arrays["thresholds"][:-1]})
    with pytest.raises(ValueError, match=r"damaged \(.*thresholds of shape"):
        finished.read_layer(damaged, "top")
    stats.unlink()
    with pytest.raises(ValueError, match=r"--dissection=.*arrays are missing or damaged"):
        finished.read_layer(damaged, "top")
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    with pytest.raises(FileNotFoundError, match="no finished dissection"):
        run_script("segment", f"--image={image}", f"--dissection={tmp_path}", "--layer=top", *MODEL)
    with pytest.raises(ValueError, match="--layer=conv9"):
        run_script("segment", f"--image={image}", f"--dissection={dissection}", "--layer=conv9")
    with pytest.raises(FileNotFoundError, match="--image=.*: a folder, not an image file"):
        run_script("segment", f"--image={tmp_path}", f"--dissection={dissection}", "--layer=top")
    with pytest.raises(FileNotFoundError, match="--image=/dev/zero: not a regular file"):
        run_script("segment", "--image=/dev/zero", f"--dissection={dissection}", "--layer=top")
    # A PNG header claiming 10^10 pixels: PIL's DecompressionBombError escaped before.
    chunks = (b"IHDR" + struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0), b"IDAT")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + b"".join(
            struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c)) for c in chunks
        )
    )
    with pytest.raises(ValueError, match=r"--image=.*bomb.png: not an image PIL can read \(Image"):
        run_script(
            "segment", f"--image={bomb}", f"--dissection={dissection}", "--layer=top", *MODEL
        )

    # One this user may not read is not called "not an image" (root reads any: simulated).
    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(Image, "open", denied)
    with pytest.raises(ValueError, match=r"x.png: cannot be opened \(Permission denied\); check"):
        run_script("segment", f"--image={image}", f"--dissection={dissection}", "--layer=top")


def test_a_layer_forward_refuses_images_of_another_layout(dissection):
    layer = finished.read_layer(dissection, "conv1")
    forward = finished.layer_forward(
        finished.load_model("tests.fixtures.small_model:make", ""), layer
    )
    images = np.zeros((2, 64, 64, 3), np.uint8)
    assert forward(images).shape[0] == 2
    for wrong in (images.transpose(0, 3, 1, 2), images[..., 0]):
        with pytest.raises(ValueError, match=r"^images \(.*\): must be \[B, H, W, 3\] RGB"):
            forward(wrong)


def test_segment_script_paints_the_labelled_units(tmp_path, data_args, dissection, vectors):
    # An image that is no Broden image: another size, mode L.
    rng = np.random.default_rng(0)
    image = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8), mode="L").save(image)
    out = tmp_path / "seg"
    doc = run_script(
        "segment",
        f"--image={image}",
        f"--dissection={dissection}",
        "--layer=top",
        *MODEL,
        f"--concept_vectors={vectors[0]}",
        f"--output_dir={out}",
    )
    assert (out / "segment-noise.png").is_file() and (out / "segment-noise.json").is_file()
    assert doc["size"] == [50, 70]
    units = json.loads((dissection / "results.json").read_text())["layers"][1]["units"]
    assert doc["labelled_units"] == sum(u["interpretable"] and u["name"] is not None for u in units)
    regions = [r for r in doc["regions"] if r["source"] == "unit"]
    assert sum(r["painted"] for r in regions) <= 50 * 70
    for r in regions:
        assert r["units"] and all(units[k]["name"] == r["name"] for k in r["units"])
        assert 0 < r["painted"] <= r["pixels"] or r["painted"] == 0
    with Image.open(out / "segment-noise.png") as im:
        assert im.mode in ("RGB", "RGBA") and im.width > 70
    # Vectors trained under another tie rule (the same thresholds) are refused.
    other = tmp_path / "other_vectors"

    def segment_with_other():
        run_script(
            "segment",
            f"--image={image}",
            f"--dissection={dissection}",
            "--layer=top",
            *MODEL,
            f"--concept_vectors={other}",
            f"--output_dir={tmp_path / 'seg2'}",
        )

    shutil.copytree(vectors[0], other)
    trained = json.loads((other / "concept_vectors.json").read_text())
    trained["settings"]["tie_rule"] = "inclusive"
    store.write_json(other / "concept_vectors.json", trained, checksum=True)
    with pytest.raises(ValueError, match=r"--concept_vectors=.* tie_rule 'inclusive', "):
        segment_with_other()
    # Vectors' files edited or damaged: one line naming the file (and the field of a file
    # without its checksum: a KeyError, TypeError or IndexError in the script before).
    text = (vectors[0] / "concept_vectors.json").read_text()
    edited, changed = json.loads(text), json.loads(text)
    edited["concepts"][1]["iou"] = "high"
    changed["concepts"][0]["name"] = changed["concepts"][1]["name"]  # painted as another
    fewer = dict(store.load_arrays(vectors[0] / "concept_vectors.npz"))
    fewer["weights"] = fewer["weights"][:1]
    for damage, message in [
        (lambda: (other / "concept_vectors.json").write_text(text[:50]), r"not readable JSON"),
        (
            lambda: store.write_json(other / "concept_vectors.json", changed),
            r"concept_vectors.json: its checksum is not that of its values",
        ),
        (
            lambda: store.write_json(other / "concept_vectors.json", edited, checksum=True),
            r"concepts\[1\].iou is 'high', not number",
        ),
        (
            lambda: store.save_arrays(other / "concept_vectors.npz", fewer),
            r"concept_vectors.npz: weights \(1, .* do not hold the \d+ concepts",
        ),
    ]:
        shutil.rmtree(other)
        shutil.copytree(vectors[0], other)
        damage()
        with pytest.raises(ValueError, match=message) as info:
            segment_with_other()
        assert str(info.value).startswith(str(other)) and "\n" not in str(info.value)


def test_concept_page_escapes_names(tmp_path):
    concept = {
        "name": "<script>x</script>",
        "category": "object",
        "iou": 0.5,
        "single_iou": 0.25,
        "gain": 0.25,
        "single_unit": 3,
        "single_unit_label": "<b>",
        "scored": True,
        "top_units": [{"unit": 3, "weight": 1.0, "label": "a&b"}],
    }
    doc = {
        "settings": {
            "layer": "l",
            "model": "m",
            "units": 4,
            "variant": "binary",
            "train_images": 7,
            "heldout_images": 3,
        },
        "summary": {
            "beats": 1,
            "scored": 1,
            "beats_share": 1.0,
            "mean_gain": 0.25,
            "median_gain": 0.25,
        },
        "concepts": [concept],
    }
    doc["concepts"].append(concept | {"name": "q", "single_unit": None, "single_unit_label": None})
    html = concept_page.write_page(tmp_path, doc).read_text()
    assert "<script>x" not in html and "&lt;script&gt;x&lt;/script&gt;" in html
    assert "None" not in html and '<td class="l">none</td>' in html
    assert "a&amp;b" in html and "&lt;b&gt;" in html


def test_the_checkpoints_are_keyed_by_the_device_count(
    tmp_path, monkeypatch, data_args, dissection
):
    """A run resumed on another number of devices does not mix in the other's checkpoints
    (their key left the device count out, which the engine's stage keys hold)."""
    from jaxdissect import concept_vectors

    class Stop(Exception):
        pass

    def stop(*args, checkpoint_dir, **kwargs):
        raise Stop(checkpoint_dir.name)

    monkeypatch.setattr(concept_vectors, "train_concept_vectors", stop)
    keys = []
    for devices in (1, 2):
        with pytest.raises(Stop) as stopped:
            run_script(
                "concept_vectors",
                f"--dissection={dissection}",
                "--layer=top",
                *MODEL,
                *data_args,
                "--probe_batch_size=16",
                f"--devices={devices}",
                "--noprogress",
                f"--output_dir={tmp_path / str(devices)}",
            )
        keys.append(stopped.value.args[0])
    assert keys[0] != keys[1]


def test_the_record_holds_the_device_count_of_the_default_devices(
    tmp_path, monkeypatch, data_args, dissection
):
    """Without --devices every device trains (biases round per device count): the record
    says how many (the training stubbed: untrained vectors, scored 0)."""
    import jax

    from jaxdissect import concept_vectors

    meshes = []

    def untrained(data, thresholds, concepts, cfg, *, mesh, **kwargs):
        meshes.append(mesh)
        c, k = len(concepts), len(thresholds)
        zeros, counts = np.zeros(c), np.zeros(c, np.int64)
        return concept_vectors.ConceptVectors(
            concepts=concepts,
            weights=np.zeros((c, k), np.float32),
            bias=np.zeros(c, np.float32),
            alpha=zeros + 0.5,
            train_images=np.arange(1),
            heldout_images=np.arange(1, 2),
            iou=zeros,
            intersection=counts,
            predicted=counts,
            truth=counts,
            train_truth=counts,
            single_unit=np.full(c, concept_vectors.NO_UNIT),
            single_iou=zeros,
            best_heldout_unit=counts,
            best_heldout_iou=zeros,
            unit_iou=np.zeros((k, c)),
            losses=np.zeros(1, np.float32),
            train_s=0.0,
        )

    monkeypatch.setattr(concept_vectors, "train_concept_vectors", untrained)
    doc = run_script(
        "concept_vectors",
        f"--dissection={dissection}",
        "--layer=top",
        *MODEL,
        *data_args,
        "--epochs=1",
        "--probe_batch_size=16",
        "--mask_stride=4",
        "--noprogress",
        f"--output_dir={tmp_path}",
    )
    assert doc["settings"]["devices"] == jax.device_count() > 1
    assert meshes[0].devices.size == jax.device_count()


def test_concepts_and_masks_are_those_of_the_chosen_categories(
    tmp_path, monkeypatch, data_args, dissection
):
    """--categories=part,color: the concepts are the labels whose category among those is
    one of them (as a dissection of those categories scores them: an object that is also a
    part, such as door, becomes a part), their masks from those categories' planes alone."""
    from jaxdissect import concept_vectors, engine
    from jaxdissect.data import open_probe

    class Stop(Exception):
        pass

    def stop(data, thresholds, concepts, *args, **kwargs):
        raise Stop(np.array(data.pixel_labels), np.asarray(concepts))

    monkeypatch.setattr(concept_vectors, "train_concept_vectors", stop)
    with pytest.raises(Stop) as stopped:
        run_script(
            "concept_vectors",
            f"--dissection={dissection}",
            "--layer=top",
            *MODEL,
            *data_args,
            "--categories=part,color",
            "--devices=1",
            "--noprogress",
            f"--output_dir={tmp_path}",
        )
    planes, concepts = stopped.value.args
    source, _ = open_probe(
        data_args[0].split("=", 1)[1], resolution=TINY_SIZE, max_images=PROBE_IMAGES
    )
    chosen = ("color", "part")
    labels = engine.restrict_categories(source.labels, chosen, source.coverage)
    read = [source.read_labels(i, chosen) for i in range(len(source))]
    present = set()
    for i, (p, q) in enumerate(read):
        np.testing.assert_array_equal(planes[i, : len(p)], p)
        assert not planes[i, len(p) :].any()
        present |= set(np.unique(p)) | set(q)
    want = [c for c in range(labels.num_labels) if labels.primary[c] >= 0 and c in present]
    np.testing.assert_array_equal(concepts, want)
    # Labels that are objects first in the whole label space, parts here.
    moved = [c for c in want if source.labels.category_of(c) not in chosen]
    assert moved and all(labels.category_of(c) == "part" for c in moved)


@pytest.mark.parametrize(
    ("categories", "message"),
    [
        ("object,object", r"^--categories=object,object: object given more than once"),
        ("objekt", r"^--categories=objekt: objekt not in the dataset; its categories are"),
    ],
)
def test_bad_categories_name_the_flag_before_the_model_loads(
    tmp_path, monkeypatch, data_args, dissection, categories, message
):
    """A repeated or unknown --categories is one line naming the flag (not the library's
    `categories=` parameter), before the model is loaded."""

    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(finished, "load_model", load_model)
    with pytest.raises(ValueError, match=message):
        run_script(
            "concept_vectors",
            f"--dissection={dissection}",
            "--layer=top",
            *MODEL,
            *data_args,
            f"--categories={categories}",
            "--devices=1",
            f"--output_dir={tmp_path / 'out'}",
        )


def test_a_random_init_is_loaded_at_the_seed_the_dissection_recorded(
    tmp_path, monkeypatch, data_args, dissection
):
    """segment.py and concept_vectors.py take no --seed: a `--weights=` dissection run with
    --seed=3 is followed at seed 3 (it was seed 0, another model, refused as such); the
    model's options are theirs (--model_option, --num_classes) as dissect.py's."""
    copy = tmp_path / "seed3"
    shutil.copytree(dissection, copy)
    doc = json.loads((copy / "results.json").read_text())
    doc["settings"]["seed"] = 3
    store.write_json(copy / "results.json", doc, checksum=True)

    class Stop(Exception):
        pass

    def load_model(model, weights, seed=0, options=None):
        raise Stop(seed, options)

    monkeypatch.setattr(finished, "load_model", load_model)
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(image)
    common = (
        f"--dissection={copy}",
        "--layer=top",
        *MODEL,
        "--model_option=width=0.5",
        "--num_classes=7",
        f"--output_dir={tmp_path / 'o'}",
    )
    data = (*data_args, "--noprogress")  # the dissection's probe set
    for name, extra in (("segment", (f"--image={image}",)), ("concept_vectors", data)):
        with pytest.raises(Stop) as stopped:
            run_script(name, *common, *extra)
        assert stopped.value.args == (3, {"width": 0.5, "num_classes": 7})


def test_a_probe_set_other_than_the_dissections_is_refused(tmp_path, data_args, dissection):
    """The dissection's thresholds and labels belong to its probe set: concept vectors on
    another (here its first 32 images) are refused in one line naming the flags."""
    with pytest.raises(ValueError, match=r"^--data: the probe set is .*32 images.*--max_images"):
        run_script(
            "concept_vectors",
            f"--dissection={dissection}",
            "--layer=top",
            *MODEL,
            *data_args,
            "--max_images=32",
            "--devices=1",
            f"--output_dir={tmp_path / 'out'}",
        )
    assert not (tmp_path / "out" / "concept_vectors.json").exists()


def test_a_batch_larger_than_the_training_images_is_refused_before_the_forward(
    tmp_path, data_args, dissection, monkeypatch
):
    def forward_ran(*args, **kwargs):
        raise AssertionError("the probe data were collected")

    monkeypatch.setattr(concept_vectors, "collect", forward_ran)
    with pytest.raises(ValueError, match=r"probe_batch_size=4096 exceeds the \d+ training"):
        run_script(
            "concept_vectors",
            f"--dissection={dissection}",
            "--layer=top",
            *MODEL,
            *data_args,
            "--probe_batch_size=4096",
            "--devices=1",
            f"--output_dir={tmp_path / 'out'}",
        )


def test_a_concept_covering_every_training_pixel_is_warned_about(caplog):
    """alpha = 0 leaves the concept's loss no weight: its vector predicts nothing and scores
    IoU 0, a tie; the script names it in a warning (it was silent)."""
    records = [{"name": "black-c", "alpha": 0.0}, {"name": "sky", "alpha": 0.9}]
    with caplog.at_level("WARNING"):
        script("concept_vectors")._warn_unweighted(records)
    [warning] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert "covering every training pixel (alpha = 0" in warning
    assert warning.endswith(": black-c")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"weights": np.zeros((1, 3)), "bias": np.zeros(1)}, r"thresholds \(\)"),
        (
            {"weights": np.zeros((1, 3)), "bias": np.zeros(1), "thresholds": np.zeros(4)},
            r"weights \(1, 3\) .* thresholds \(4,\)",
        ),
    ],
)
def test_vectors_without_the_units_thresholds_are_refused_in_one_line(tmp_path, arrays, message):
    """segment.py compares the vectors' thresholds with the dissection's and weighs its units'
    masks with their weights: an .npz without thresholds (a KeyError in the script) or with
    weights over another number of units is refused, naming the file."""
    doc = {
        "settings": {"layer": "top"},
        "concepts": [{"name": "sky", "category": "object", "iou": 0.5, "scored": True}],
    }
    store.write_json(tmp_path / "concept_vectors.json", doc, checksum=True)
    store.save_arrays(tmp_path / "concept_vectors.npz", arrays)
    with pytest.raises(ValueError, match=message) as info:
        script("segment")._read_vectors(str(tmp_path), "top")
    assert str(info.value).startswith(str(tmp_path)) and "\n" not in str(info.value)

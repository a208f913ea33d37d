"""Synthetic Broden: on-disk format, statistics, determinism, content, atomic output.

The checks parse the folder with plain csv/numpy/PIL (independent of the
reader), and round-trip through `jaxdissect.data.broden`.
"""

from __future__ import annotations

import csv
import hashlib
import pathlib
import re
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from jaxdissect.data import broden
from jaxdissect.data import synthetic as syn
from jaxdissect.data.synthetic import writer
from jaxdissect.data.synthetic.example import nearest_index

REPO = pathlib.Path(__file__).resolve().parents[1]
NAME_OF = {n: k for k, n in syn.LABEL_NUMBERS.items()}


def _rows(path: pathlib.Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _png_labels(path: pathlib.Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB", path
        rgb = np.asarray(im)
    assert not rgb[..., 2].any(), f"{path}: blue channel must be 0"
    return rgb[..., 0].astype(np.int64) + 256 * rgb[..., 1].astype(np.int64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    return syn.generate_tiny(tmp_path_factory.mktemp("syn") / "broden1_64", seed=0)


@pytest.fixture(scope="module")
def parsed(tiny):
    """index rows with every PNG decoded: [(row, {category: [planes]})]."""
    _, rows = _rows(tiny / "index.csv")
    out = []
    for row in rows:
        planes = {}
        for cat in syn.CATEGORIES:
            if cat in syn.IMAGE_LEVEL or not row[cat]:
                continue
            planes[cat] = [_png_labels(tiny / "images" / p) for p in row[cat].split(";")]
        out.append((row, planes))
    return out


def test_tables(tiny):
    header, cats = _rows(tiny / "category.csv")
    assert header == ["name", "first", "last", "count", "frequency"]
    assert sorted(c["name"] for c in cats) == sorted(syn.CATEGORIES)
    header, labels = _rows(tiny / "label.csv")
    assert header == ["number", "name", "category", "frequency", "coverage", "syns"]
    numbers = [int(r["number"]) for r in labels]
    assert len(set(numbers)) == len(numbers) and min(numbers) >= 1
    by_number = {int(r["number"]): r for r in labels}
    assert {r["name"] for r in labels} >= {"red-c", "street-s", "car", "wheel", "wood", "dotted"}
    for r in labels:
        parts = r["category"].split(";")
        assert all(re.fullmatch(r"[a-z]+\(\d+\)", p) for p in parts), r
        assert int(r["frequency"]) == sum(int(p.split("(")[1][:-1]) for p in parts)
        float(r["coverage"])
    for c in cats:
        header, rows = _rows(tiny / f"c_{c['name']}.csv")
        assert header == ["code", "number", "name", "frequency", "coverage"]
        assert [int(r["code"]) for r in rows] == list(range(1, len(rows) + 1))
        assert int(c["count"]) == len(rows)
        nums = [int(r["number"]) for r in rows]
        assert (int(c["first"]), int(c["last"])) == (min(nums), max(nums))
        assert int(c["frequency"]) == sum(int(r["frequency"]) for r in rows)
        for r in rows:
            label = by_number[int(r["number"])]
            assert label["name"] == r["name"]
            assert f"{c['name']}({r['frequency']})" in label["category"].split(";")
    assert [n for n in syn.COLORS] == [NAME_OF[i] for i in range(1, 12)]
    assert all(n.endswith("-s") for n in syn.SCENES)


def test_index_and_pngs(tiny, parsed):
    header, rows = _rows(tiny / "index.csv")
    _, cats = _rows(tiny / "category.csv")
    assert header == ["image", "split", "ih", "iw", "sh", "sw", *[c["name"] for c in cats]]
    assert len(rows) == syn.TINY["num_images"]
    splits = Counter(r["split"] for r in rows)
    assert (
        splits["train"] == round(0.7 * len(rows)) and splits["val"] == len(rows) - splits["train"]
    )
    label_cats = {int(r["number"]): r["category"] for r in _rows(tiny / "label.csv")[1]}
    s = syn.TINY["size"]
    seen_cats, max_label, multi_plane, empty = set(), 0, False, Counter()
    for row, planes in parsed:
        assert (int(row["ih"]), int(row["iw"]), int(row["sh"]), int(row["sw"])) == (
            s,
            s,
            s // 2,
            s // 2,
        )
        with Image.open(tiny / "images" / row["image"]) as im:
            assert im.format == "JPEG" and im.size == (s, s) and im.mode == "RGB"
        assert row["color"], "every image has a colour plane"
        for cat in syn.CATEGORIES:
            if not row[cat]:
                empty[cat] += 1
                continue
            seen_cats.add(cat)
            if cat in syn.IMAGE_LEVEL:
                for tok in row[cat].split(";"):
                    assert tok.isdigit(), (cat, row[cat])
                    assert f"{cat}(" in label_cats[int(tok)]
                continue
            multi_plane |= len(planes[cat]) > 1
            for plane in planes[cat]:
                assert plane.shape == (s // 2, s // 2)
                max_label = max(max_label, int(plane.max()))
                for n in np.unique(plane):
                    if n:
                        assert f"{cat}(" in label_cats[int(n)], (cat, n)
            if cat == "color":
                assert (planes[cat][0] > 0).all(), "every pixel has a colour"
    assert seen_cats == set(syn.CATEGORIES)
    assert max_label >= 256, "the green channel must be exercised"
    assert multi_plane
    assert empty["material"] and empty["object"] and empty["texture"] and empty["scene"]


def test_statistics_match_pngs(tiny, parsed):
    freq, cov = Counter(), Counter()
    for row, planes in parsed:
        for cat, ps in planes.items():
            stack = np.stack(ps)
            for n in np.unique(stack):
                if n:
                    freq[(cat, int(n))] += 1
                    cov[(cat, int(n))] += (stack == n).any(0).mean()
        for cat in syn.IMAGE_LEVEL:
            for tok in filter(None, row[cat].split(";")):
                freq[(cat, int(tok))] += 1
                cov[(cat, int(tok))] += 1.0
    for cat in syn.CATEGORIES:
        for r in _rows(tiny / f"c_{cat}.csv")[1]:
            key = (cat, int(r["number"]))
            assert int(r["frequency"]) == freq[key], key
            assert float(r["coverage"]) == pytest.approx(cov[key], abs=1e-5), key


def test_label_in_two_categories(tiny):
    labels = _rows(tiny / "label.csv")[1]
    doubles = [r for r in labels if len(r["category"].split(";")) == 2]
    assert {r["name"] for r in doubles} == {"water", "door", "lamp"}
    cover = {}
    for cat in syn.CATEGORIES:
        for r in _rows(tiny / f"c_{cat}.csv")[1]:
            cover.setdefault(r["name"], {})[cat] = float(r["coverage"])
    assert set(cover["door"]) == {"object", "part"}
    assert set(cover["water"]) == {"object", "material"}
    assert len(set(cover["door"].values())) == 2


def test_label_numbers_encode():
    assert syn.LABEL_NUMBERS["wheel"] == 256 and syn.LABEL_NUMBERS["window"] == 255
    plane = np.array([[0, 1, 255, 256], [257, 511, 4660, 65535]])
    rgb = syn.encode_labels(plane)
    assert (rgb[..., 0].astype(int) + 256 * rgb[..., 1].astype(int) == plane).all()
    assert not rgb[..., 2].any()
    with pytest.raises(ValueError):
        syn.encode_labels(np.array([1 << 16]))


@pytest.mark.parametrize("n_in,n_out", [(224, 112), (227, 113), (64, 32), (384, 192)])
def test_nearest_index_matches_pil(n_in, n_out):
    ramp = np.tile(np.arange(n_in, dtype=np.int32), (2, 1))
    pil = np.asarray(Image.fromarray(ramp, "I").resize((n_out, 2), Image.Resampling.NEAREST))
    assert (nearest_index(n_out, n_in) == pil[0]).all()


def _tree_bytes(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_deterministic_across_workers(tmp_path):
    kw = dict(num_images=10, size=48, seed=3)
    a = _tree_bytes(syn.generate(tmp_path / "a", workers=1, **kw))
    b = _tree_bytes(syn.generate(tmp_path / "b", workers=2, **kw))
    assert a == b
    c = _tree_bytes(syn.generate(tmp_path / "c", workers=1, **{**kw, "seed": 4}))
    assert c.keys() != a.keys() or c != a
    one = syn.render(7, seed=3, size=48)
    again = syn.render(7, seed=3, size=48)
    assert (one.image == again.image).all()


# sha256 of the tiny set's content (seed 0): its CSV tables, its decoded label
# PNGs and its rendered images before JPEG encoding (codec versions cannot move it).
TINY_DIGEST = "57bba6c7a2b41e3d464002cfd97d02a00509cf62ac33f8c296087805c863166b"


def _content_digest(root: pathlib.Path, parsed) -> str:
    h = hashlib.sha256()
    for p in sorted(root.glob("*.csv")) + [root / "synthetic.json"]:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    for i, (row, planes) in enumerate(parsed):
        h.update(syn.render(i, seed=0, size=syn.TINY["size"]).image.tobytes())
        for cat in sorted(planes):
            for plane in planes[cat]:
                h.update(f"{row['image']}:{cat}".encode() + plane.astype("<i8").tobytes())
    return h.hexdigest()


def test_output_pinned(tiny, parsed):
    """Refactors must not change the data: a changed generator needs a new GENERATOR_VERSION."""
    got = _content_digest(tiny, parsed)
    assert got == TINY_DIGEST, (
        f"the synthetic Broden's content changed (sha256 {got}); if intended, raise "
        "synthetic.GENERATOR_VERSION and update TINY_DIGEST"
    )


def test_colour_labels_match_decoded_pixels(tiny, parsed):
    agree, sums, counts = [], np.zeros((12, 3)), np.zeros(12)
    for row, planes in parsed:
        with Image.open(tiny / "images" / row["image"]) as im:
            rgb = np.asarray(im.convert("RGB"))
        colour = planes["color"][0]
        small = np.asarray(Image.fromarray(rgb).resize(colour.shape[::-1], Image.Resampling.BOX))
        agree.append((syn.color_names(small) + 1 == colour).mean())
        np.add.at(sums, colour.ravel(), small.reshape(-1, 3))
        np.add.at(counts, colour.ravel(), 1)
    assert np.mean(agree) > 0.85 and min(agree) > 0.5, agree
    mean = {NAME_OF[k]: sums[k] / counts[k] for k in range(1, 12) if counts[k] > 20}
    # Independent sanity: what the names mean in RGB.
    assert (mean["white-c"] > 180).all() and (mean["black-c"] < 80).all()
    r, g, b = mean["green-c"]
    assert g > r and g > b
    r, g, b = mean["blue-c"]
    assert b > r and b > g
    if "red-c" in mean:
        r, g, b = mean["red-c"]
        assert r > g + 50 and r > b + 50


def test_scene_determined_by_objects(parsed):
    n_scenes = 0
    for row, planes in parsed:
        if not row["scene"]:
            assert "object" not in planes
            continue
        n_scenes += 1
        areas = syn.object_areas(planes["object"][0])
        assert NAME_OF[int(row["scene"])] == syn.scene_for(areas)
        if "bed" in areas:
            assert NAME_OF[int(row["scene"])] == "bedroom-s"
    assert n_scenes > 10
    assert syn.scene_for({"sky": 0.4, "road": 0.3, "sidewalk": 0.2, "car": 0.1}) == "street-s"
    assert syn.scene_for({"sky": 0.4, "road": 0.5, "car": 0.1}) == "highway-s"
    assert syn.scene_for({"sky": 0.3, "grass": 0.3, "tree": 0.4}) == "forest-s"
    assert syn.scene_for({"sky": 0.3, "grass": 0.6, "tree": 0.1}) == "park-s"
    assert syn.scene_for({"wall": 0.5, "floor": 0.3, "sofa": 0.2}) == "living_room-s"
    assert syn.scene_for({"sky": 0.5, "water": 0.3, "sand": 0.2}) == "beach-s"


def test_defining_objects_are_the_minimal_object_sets_of_each_scene():
    from jaxdissect.data.synthetic import scene_rule

    got = scene_rule.defining_objects()
    assert got["bedroom-s"] == {"floor", "bed"} and got["corridor-s"] == {"floor"}
    assert got["harbor-s"] == {"water", "boat", "building", "house"}
    assert got["forest-s"] == got["park-s"] == {"tree"}  # told apart by area, not objects
    assert got["field-s"] == set()  # the scene of no object
    assert len(got) == 17  # every scene the rule can give


def test_long_tailed_frequencies():
    objects, scenes, textures = Counter(), Counter(), Counter()
    n = 160
    for i in range(n):
        ex = syn.render(i, seed=11, size=32)
        if "object" in ex.planes:
            objects.update(NAME_OF[int(k)] for k in np.unique(ex.planes["object"][0]) if k)
        scenes.update(NAME_OF[k] for k in ex.image_labels.get("scene", ()))
        textures.update(NAME_OF[k] for k in ex.image_labels.get("texture", ()))
    top = objects.most_common()
    assert top[0][0] == "sky" and top[0][1] > 0.4 * n
    assert sum(c < 0.05 * n for _, c in top) >= 8, top  # many rare objects
    s = scenes.most_common()
    assert s[0][0] == "street-s" and s[0][1] >= 4 * s[-1][1], s
    assert len(s) >= 12
    assert textures.most_common()[0][1] >= 3 * textures.most_common()[-1][1]


def test_atomic_output(tmp_path, monkeypatch):
    out = tmp_path / "set"

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    with monkeypatch.context() as m:
        m.setattr(writer, "_write_tables", boom)
        with pytest.raises(RuntimeError):
            syn.generate(out, num_images=3, size=32, workers=1)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    syn.generate(out, num_images=3, size=32, workers=1)
    with pytest.raises(FileExistsError):
        syn.generate(out, num_images=3, size=32, workers=1)
    syn.generate(out, num_images=4, size=32, workers=1, overwrite=True)
    assert len(_rows(out / "index.csv")[1]) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["set"]
    # A folder made by someone else while this one generated stays theirs.
    other = tmp_path / "other"

    def made_meanwhile(done, total):
        other.mkdir(exist_ok=True)
        (other / "theirs").write_text("x")

    with pytest.raises(FileExistsError, match="was created while this generated it"):
        syn.generate(other, num_images=2, size=32, workers=1, progress=made_meanwhile)
    assert [p.name for p in other.iterdir()] == ["theirs"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "set"]


def test_overwrite_replaces_only_a_synthetic_set(tmp_path):
    """A mistyped out_dir with --overwrite must not delete someone's folder."""
    theirs = tmp_path / "theirs"
    (theirs / "sub").mkdir(parents=True)
    (theirs / "sub" / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="is not a synthetic Broden"):
        syn.generate(theirs, num_images=2, size=32, workers=1, overwrite=True)
    assert (theirs / "sub" / "results.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs"]  # no partial left
    empty = tmp_path / "empty"
    empty.mkdir()
    syn.generate(empty, num_images=2, size=32, workers=1, overwrite=True)
    syn.generate(empty, num_images=3, size=32, workers=1, overwrite=True)  # its own set
    assert len(_rows(empty / "index.csv")[1]) == 3


def _make_synthetic_broden(*argv: str) -> subprocess.CompletedProcess:
    """experiments/make_synthetic_broden.py run with `argv`, its output captured."""
    script = REPO / "experiments" / "make_synthetic_broden.py"
    return subprocess.run(
        [sys.executable, str(script), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


def test_cli_errors_are_one_line_naming_the_flag(tmp_path):
    proc = _make_synthetic_broden(f"--out_dir={tmp_path / 'set'}", "--num_images=0")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: --num_images=0: must be >= 1"
    assert "Traceback" not in proc.stderr and not (tmp_path / "set").exists()
    # A negative --workers ran as one worker; 0 means all cores, so it is not the library's
    # `workers=` (None there).
    proc = _make_synthetic_broden(f"--out_dir={tmp_path / 'set'}", "--workers=-3")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: --workers=-3: must be >= 1, or 0 for all cores"
    ]
    # --tiny overrode a --num_images or --size given beside it, silently.
    proc = _make_synthetic_broden(f"--out_dir={tmp_path / 'set'}", "--tiny", "--size=64")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --size=64: --tiny sets the number of images and the size; leave one of them out"
    )
    assert not (tmp_path / "set").exists()
    with pytest.raises(ValueError, match=r"^workers=0: must be >= 1, or None for all cores$"):
        syn.generate(tmp_path / "set", num_images=2, size=32, workers=0)
    assert not (tmp_path / "set").exists()


def test_reader_round_trip(tiny, parsed):
    ds = broden.Broden.open(tiny)
    assert len(ds) == syn.TINY["num_images"]
    assert set(ds.labels.categories) == set(syn.CATEGORIES)
    for name, number in syn.LABEL_NUMBERS.items():
        assert ds.labels.names[number] == name
    assert ds.labels.category_of(syn.LABEL_NUMBERS["red-c"]) == "color"
    assert ds.labels.category_of(syn.LABEL_NUMBERS["wheel"]) == "part"
    assert ds.labels.category_of(syn.LABEL_NUMBERS["street-s"]) == "scene"
    assert ds.labels.image_level[ds.labels.categories.index("texture")]
    assert len(broden.Broden.open(tiny, split="train")) == round(0.7 * len(ds))
    order = ds.labels.categories
    for i, (row, planes) in enumerate(parsed):
        got, image_labels = ds.read_labels(i)
        want = [p for cat in order for p in planes.get(cat, [])]
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert (g == w).all()
        levels = [
            int(t)
            for cat in order
            if cat in syn.IMAGE_LEVEL
            for t in filter(None, row[cat].split(";"))
        ]
        assert list(image_labels) == levels
        with Image.open(tiny / "images" / row["image"]) as im:
            assert (ds.read_image(i) == np.asarray(im.convert("RGB"))).all()
    ex = ds[0]
    assert ex["pixel_labels"].shape == (ds.max_planes, *ds.seg_size)


def test_cli_tiny(tmp_path):
    out = tmp_path / "cli"
    proc = _make_synthetic_broden(f"--out_dir={out}", "--tiny")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(_rows(out / "index.csv")[1]) == syn.TINY["num_images"]


def test_generation_forks_only_before_jax_starts(monkeypatch):
    """A worker forked from a process whose JAX backend runs inherits its threads' locks (a
    deadlock risk, Python's warning): once JAX has started (a script checked --devices
    first), the generator's workers are spawned."""
    import jax

    from jaxdissect.data.synthetic import writer

    jax.devices()
    assert writer._jax_started()
    assert writer._pool_context().get_start_method() == "spawn"
    monkeypatch.setattr(writer, "_jax_started", lambda: False)
    assert writer._pool_context().get_start_method() == "fork"

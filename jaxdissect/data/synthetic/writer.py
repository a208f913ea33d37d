"""Writing a synthetic Broden in the release's on-disk format (images, label PNGs, CSV tables)."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np
from PIL import Image

from jaxdissect.data.synthetic.example import MIN_SIZE, Example, render, seg_size
from jaxdissect.data.synthetic.vocabulary import (
    CATEGORIES,
    CATEGORY_LABELS,
    LABEL_CATEGORIES,
    LABEL_NUMBERS,
    SYNONYMS,
)

TRAIN_FRACTION = 0.7
JPEG_QUALITY = 90
# Sizes for a dataset small enough to build inside other tests.
TINY = MappingProxyType({"num_images": 32, "size": 64})
GENERATOR = "jaxdissect.data.synthetic"  # synthetic.json's "generator"
GENERATOR_VERSION = 1


def encode_labels(plane: np.ndarray) -> np.ndarray:
    """int label plane -> uint8 RGB with label = R + 256 * G (blue 0)."""
    plane = np.asarray(plane, np.int64)
    if plane.min() < 0 or plane.max() >= 1 << 16:
        raise ValueError("label numbers must be in [0, 65535] to fit R + 256 * G")
    rgb = np.zeros((*plane.shape, 3), np.uint8)
    rgb[..., 0] = plane & 0xFF
    rgb[..., 1] = plane >> 8
    return rgb


def _write_example(
    root: pathlib.Path, index: int, ex: Example
) -> tuple[dict[str, str], list[tuple[str, int, float]]]:
    """Writes one example's files; returns its index.csv cells and its label statistics."""
    images = root / "images"
    stem = f"{ex.source}/{index:06d}"
    (images / ex.source).mkdir(parents=True, exist_ok=True)
    Image.fromarray(ex.image).save(images / f"{stem}.jpg", quality=JPEG_QUALITY)
    cells: dict[str, str] = {"image": f"{stem}.jpg"}
    stats: list[tuple[str, int, float]] = []
    for cat, planes in ex.planes.items():
        paths = []
        for k, plane in enumerate(planes):
            # Parts are numbered by level, like the release's ADE20K `_part_1.png`.
            multi = cat == "part" or len(planes) > 1
            name = f"{stem}_{cat}_{k + 1}.png" if multi else f"{stem}_{cat}.png"
            Image.fromarray(encode_labels(plane), "RGB").save(images / name)
            paths.append(name)
        cells[cat] = ";".join(paths)
        # Coverage of a label in a category counts a pixel once, whichever planes hold it.
        flat = [p.ravel() for p in planes]
        counts = np.zeros(max(int(p.max()) for p in flat) + 1, np.int64)
        for k, row in enumerate(flat):
            keep = np.ones(row.shape, bool)
            for prev in flat[:k]:
                keep &= prev != row
            counts += np.bincount(row[keep], minlength=len(counts))
        counts[0] = 0
        stats.extend((cat, int(n), float(counts[n]) / flat[0].size) for n in np.flatnonzero(counts))
    for cat, labels in ex.image_labels.items():
        cells[cat] = ";".join(str(n) for n in labels)
        stats.extend((cat, n, 1.0) for n in labels)
    return cells, stats


def _work(
    task: tuple[str, int, int, int],
) -> tuple[int, dict[str, str], list[tuple[str, int, float]]]:
    root, index, seed, size = task
    cells, stats = _write_example(pathlib.Path(root), index, render(index, seed=seed, size=size))
    return index, cells, stats


def _splits(num_images: int, seed: int) -> list[str]:
    order = np.random.default_rng(np.random.SeedSequence([seed, 1])).permutation(num_images)
    n_train = round(TRAIN_FRACTION * num_images)
    split = ["val"] * num_images
    for i in order[:n_train]:
        split[int(i)] = "train"
    return split


def _fmt(x: float) -> str:
    return f"{x:f}"


def _write_tables(
    root: pathlib.Path,
    rows: list[dict[str, str]],
    freq: Mapping[tuple[str, int], int],
    cov: Mapping[tuple[str, int], float],
) -> tuple[str, ...]:
    """Writes label.csv, category.csv, c_<cat>.csv and index.csv (last); returns category order."""
    name_of = {n: k for k, n in LABEL_NUMBERS.items()}
    first = {c: min(LABEL_NUMBERS[n] for n in CATEGORY_LABELS[c]) for c in CATEGORIES}
    # The release orders categories by their first label number (joinseg.py).
    cats = tuple(sorted(CATEGORIES, key=lambda c: (first[c], CATEGORIES.index(c))))
    with open(root / "label.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        for number in sorted(name_of):
            name = name_of[number]
            incats = sorted(
                LABEL_CATEGORIES[name], key=lambda c: (-freq.get((c, number), 0), cats.index(c))
            )
            w.writerow(
                [
                    number,
                    name,
                    ";".join(f"{c}({freq.get((c, number), 0)})" for c in incats),
                    sum(freq.get((c, number), 0) for c in incats),
                    _fmt(sum(cov.get((c, number), 0.0) for c in incats)),
                    ";".join(SYNONYMS.get(name, ())),
                ]
            )
    with open(root / "category.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "first", "last", "count", "frequency"])
        for c in cats:
            numbers = [LABEL_NUMBERS[n] for n in CATEGORY_LABELS[c]]
            w.writerow(
                [
                    c,
                    min(numbers),
                    max(numbers),
                    len(numbers),
                    sum(freq.get((c, n), 0) for n in numbers),
                ]
            )
    for c in cats:
        numbers = sorted(
            (LABEL_NUMBERS[n] for n in CATEGORY_LABELS[c]),
            key=lambda n: (-freq.get((c, n), 0), -cov.get((c, n), 0.0), n),
        )
        with open(root / f"c_{c}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["code", "number", "name", "frequency", "coverage"])
            for code, n in enumerate(numbers, start=1):
                w.writerow([code, n, name_of[n], freq.get((c, n), 0), _fmt(cov.get((c, n), 0.0))])
    with open(root / "index.csv", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        header = ["image", "split", "ih", "iw", "sh", "sw", *cats]
        w.writerow(header)
        for row in rows:
            w.writerow([row.get(h, "") for h in header])
    return cats


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork while JAX's backends have not started: workers inherit the imported modules
    (importing jaxdissect.data pulls in jax, ~2 s a process under spawn) and never touch
    jax. Once a backend runs (a script checked its devices first), its threads make a fork
    unsafe (a deadlock risk, and Python's warning): spawn."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context(
        "fork" if "fork" in methods and not _jax_started() else "spawn"
    )


def _jax_started() -> bool:
    """Whether JAX has started a backend in this process (True where it cannot tell)."""
    import sys

    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return True


def _check_replaceable(out: pathlib.Path) -> None:
    """`overwrite` replaces nothing but an empty folder or a synthetic set of this
    generator: a mistyped `out_dir` must not delete someone's files."""
    if not out.exists():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    try:
        info = json.loads((out / "synthetic.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict) or info.get("generator") != GENERATOR:
        raise FileExistsError(
            f"{out} is not a synthetic Broden (no synthetic.json of this generator): "
            "overwrite replaces only those; give another out_dir or remove it"
        )


def generate(
    out_dir: str | os.PathLike,
    *,
    num_images: int,
    size: int = 224,
    seed: int = 0,
    workers: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> pathlib.Path:
    """Writes a synthetic Broden of `num_images` images at `size` into `out_dir`.

    The folder is built under a temporary name beside `out_dir` and renamed at
    the end, so an interrupted run never leaves a folder that looks complete.

    Args:
      out_dir: the dataset folder to create (like `broden1_224`).
      num_images: number of images (70% train, 30% val).
      size: image side; segmentations are `size // 2`.
      seed: everything is a function of (seed, image index).
      workers: processes; None = all cores (1 for small sets). The output bytes
        do not depend on it.
      overwrite: replace an existing `out_dir` (else FileExistsError).
      progress: called with (done, total) as images complete.

    Returns:
      The dataset folder.
    """
    out = pathlib.Path(out_dir).expanduser().absolute()
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: must be >= 1")
    if size < MIN_SIZE:
        raise ValueError(f"size={size}: must be >= {MIN_SIZE}")
    if seed < 0:
        raise ValueError(f"seed={seed}: must be >= 0")
    if workers is not None and workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1, or None for all cores")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True to replace it")
    _check_replaceable(out)
    if workers is None:
        workers = 1 if num_images < 64 else min(os.cpu_count() or 1, 8)
    workers = max(1, min(workers, num_images))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tasks = [(str(tmp), i, seed, size) for i in range(num_images)]
        results: list[tuple[int, dict[str, str], list[tuple[str, int, float]]]] = []
        if workers == 1:
            for t in tasks:
                results.append(_work(t))
                if progress:
                    progress(len(results), num_images)
        else:
            chunk = max(1, min(16, num_images // (workers * 4)))
            with _pool_context().Pool(workers) as pool:
                for res in pool.imap_unordered(_work, tasks, chunksize=chunk):
                    results.append(res)
                    if progress:
                        progress(len(results), num_images)
        results.sort(key=lambda t: t[0])
        split = _splits(num_images, seed)
        s2 = seg_size(size)
        rows = []
        freq: dict[tuple[str, int], int] = {}
        cov: dict[tuple[str, int], float] = {}
        for index, cells, stats in results:
            rows.append(
                {**cells, "split": split[index], "ih": size, "iw": size, "sh": s2, "sw": s2}
            )
            for cat, label, fraction in stats:
                freq[(cat, label)] = freq.get((cat, label), 0) + 1
                cov[(cat, label)] = cov.get((cat, label), 0.0) + fraction
        info = {
            "generator": GENERATOR,
            "version": GENERATOR_VERSION,
            "num_images": num_images,
            "size": size,
            "seed": seed,
        }
        (tmp / "synthetic.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        _write_tables(tmp, rows, freq, cov)
        if out.exists() and not overwrite:  # made meanwhile by someone else: theirs stays
            raise FileExistsError(f"{out} was created while this generated it: use that one")
        if out.exists():
            _check_replaceable(out)
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def generate_tiny(out_dir: str | os.PathLike, *, seed: int = 0, **kwargs) -> pathlib.Path:
    """A small synthetic Broden for tests (`TINY`: 32 images at 64 x 64)."""
    return generate(out_dir, **{**TINY, **kwargs}, seed=seed)

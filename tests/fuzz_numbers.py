"""The numeric campaigns of `tests/fuzz_reference.py` (its docstring says what each
checks): random and adversarial cases of the tally, results, quantiles, sketch, formulas,
formula search and the whole engine against the slow numpy references."""

from __future__ import annotations

import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import engine, parallel, quantiles, results
from jaxdissect.labelspace import LabelSpace
from tests import reference

ULP = "ulp at a threshold"


# ------------------------------------------------------------------------------- tally


def tally_probe(rng: np.random.Generator) -> dict:
    """A random probe in the form of `reference.random_probe`, of any shape."""
    n = int(rng.integers(1, 10))
    h, w = (int(v) for v in rng.integers(1, 9, 2))
    sh, sw = (int(v) for v in rng.integers(1, 25, 2))
    k = int(rng.choice([1, 2, 5, 17, 40, 70]))
    planes, slots = int(rng.integers(0, 4)), int(rng.integers(0, 3))
    num_labels, num_categories = int(rng.choice([2, 7, 60, 300])), int(rng.integers(1, 6))
    image_level = tuple(bool(b) for b in rng.random(num_categories) < 0.4)
    primary = rng.integers(0, num_categories, num_labels).astype(np.int32)
    primary[0] = -1
    primary[rng.random(num_labels) < 0.1] = -1  # labels of no category
    labels = LabelSpace(
        tuple(f"cat{i}" for i in range(num_categories)),
        ("-", *(f"label{i}" for i in range(1, num_labels))),
        primary,
        image_level,
    )
    kind = rng.integers(0, 3)
    if kind == 0:  # ReLU maps on a grid of quarters: plateaus and exact ties
        acts = np.round(np.maximum(rng.normal(size=(n, h, w, k)), 0) * 4) / 4
    elif kind == 1:
        acts = rng.normal(size=(n, h, w, k))
    else:  # a few signed integers: interpolations that land on the thresholds
        acts = rng.integers(-2, 3, (n, h, w, k)).astype(float)
    acts = acts.astype(np.float32)
    if k > 1 and rng.random() < 0.5:
        acts[..., 0] = 0.0  # a dead unit
    if rng.random() < 0.5:  # thresholds at values the maps take
        thresholds = acts.reshape(-1, k)[rng.integers(0, n * h * w, k), np.arange(k)]
    else:
        thresholds = np.quantile(acts.reshape(-1, k), rng.uniform(0.5, 0.999), axis=0)
    pix = rng.integers(0, num_labels, (n, planes, sh, sw)).astype(np.int32)
    if planes and rng.random() < 0.5:  # one label an image and plane
        pix = np.broadcast_to(pix[:, :, :1, :1], pix.shape).copy()
    pix[rng.random(pix.shape) < 0.3] = 0
    pix[rng.random(pix.shape) < 0.02] = num_labels + 3
    pix[rng.random(pix.shape) < 0.02] = -1
    if planes > 1:
        same = rng.random((n, sh, sw)) < 0.3
        pix[:, 1][same] = pix[:, 0][same]
    img = rng.integers(0, num_labels, (n, slots)).astype(np.int32)
    img[rng.random(img.shape) < 0.3] = 0
    if slots and planes and rng.random() < 0.5:
        pix[0, 0, 0, 0] = img[0, 0]
    return {
        "labels": labels,
        "acts": acts,
        "thresholds": np.asarray(thresholds, np.float32),
        "pixel_labels": pix,
        "image_labels": img,
    }


def tally_case(seed: int) -> tuple[str, list[str]]:
    """(description, mismatches) of one random tally case."""
    from tests.test_tally import _run_tally

    rng = np.random.default_rng(seed)
    probe = tally_probe(rng)
    method = str(rng.choice(["segment", "compact", "matmul"]))
    restriction = str(rng.choice(["presence", "overlap", "none"]))
    kwargs = {"method": method, "tie_rule": str(rng.choice(["strict", "inclusive"]))}
    if rng.random() < 0.5:
        kwargs["chunk"] = int(rng.integers(1, 5))
    if method == "compact":
        kwargs["slots"] = int(rng.integers(1, 8))
    if method == "segment" and rng.random() < 0.6:
        kwargs["unit_block"] = int(rng.integers(1, 8))
    if rng.random() < 0.3 and probe["labels"].num_categories <= 5:
        kwargs["patterns"] = True

    def reference_at(thresholds: np.ndarray) -> dict[str, np.ndarray]:
        fields = ("acts", "pixel_labels", "image_labels", "labels")
        acts, pix, img, labels = (probe[f] for f in fields)
        return reference.reference_counts(
            acts,
            thresholds,
            pix,
            img,
            labels,
            restriction,
            tie_rule=kwargs["tie_rule"],
            patterns=kwargs.get("patterns", False),
        )

    want = reference_at(probe["thresholds"])
    got = _run_tally(probe, restriction, **kwargs)
    bad = [key for key in want if not np.array_equal(got[key], want[key])]
    if bad:
        # Every count but the patterns' grows with the masks: between the reference's at
        # thresholds a few ulps above (smaller masks) and below, the difference is rounding
        # at a threshold; the patterns then only have to add up to the unit's counts.
        ulps = 16 * np.finfo(np.float32).eps * np.maximum(np.abs(probe["thresholds"]), 1)
        above, below = (
            reference_at(probe["thresholds"] + ulps),
            reference_at(probe["thresholds"] - ulps),
        )
        monotone = [k for k in bad if k != "pattern_pixels"]
        within = all(((above[k] <= got[k]) & (got[k] <= below[k])).all() for k in monotone)
        if "pattern_pixels" in bad:
            c = probe["labels"].num_categories
            bits = (np.arange(2**c)[:, None] >> np.arange(c)[None, :]) & 1
            within &= np.array_equal(got["pattern_pixels"].sum(1), got["unit_total"])
            within &= np.array_equal(got["pattern_pixels"] @ bits, got["unit_pixels"])
        if within:
            bad = [ULP]
    shapes = f"acts {probe['acts'].shape} pixel_labels {probe['pixel_labels'].shape}"
    return f"{restriction} {kwargs} {shapes}", bad


# ----------------------------------------------------------------------------- results


def results_case(seed: int) -> tuple[str, list[str]]:
    """(description, mismatches) of one random layer of counts scored by
    `results.layer_result` against `reference.reference_iou` and `reference_unit_labels`:
    equal IoUs within and across categories (copied columns), zero unions, silent units,
    labels of no category, a random subset of scored categories and IoU threshold."""
    rng = np.random.default_rng(seed)
    k, num_labels, num_categories = (int(v) for v in rng.integers(1, 12, 3))
    num_labels += 1
    primary = rng.integers(-1, num_categories, num_labels).astype(np.int32)
    primary[0] = -1
    labels = LabelSpace(
        tuple(f"cat{j}" for j in range(num_categories)),
        ("-", *(f"label{i}" for i in range(1, num_labels))),
        primary,
        tuple(bool(b) for b in rng.random(num_categories) < 0.3),
    )
    label_pixels = rng.integers(0, 50, num_labels) * (rng.random(num_labels) < 0.8)
    unit_total = rng.integers(0, 80, k) * (rng.random(k) < 0.85)
    unit_pixels = (rng.random((k, num_categories)) * (unit_total[:, None] + 1)).astype(np.int64)
    cap = np.minimum(label_pixels[None, :], unit_pixels[:, np.maximum(primary, 0)])
    intersection = (rng.random((k, num_labels)) * (cap + 1)).astype(np.int64)
    intersection[:, primary < 0] = 0
    for _ in range(int(rng.integers(0, 4))):  # a label's counts copied to another: equal IoUs
        a, b = rng.integers(1, num_labels, 2)
        if primary[a] >= 0 and primary[b] >= 0:
            label_pixels[b] = label_pixels[a]
            unit_pixels[:, primary[b]] = unit_pixels[:, primary[a]]
            intersection[:, b] = intersection[:, a]
    # Counts as a tally's: no intersection above its label's or its unit's category's pixels.
    cap = np.minimum(label_pixels[None, :], unit_pixels[:, np.maximum(primary, 0)])
    intersection = np.minimum(intersection, cap)
    counts = {
        "intersection": intersection,
        "label_pixels": label_pixels.astype(np.int64),
        "unit_pixels": unit_pixels,
        "unit_total": unit_total.astype(np.int64),
    }
    categories = None
    if rng.random() < 0.4:
        categories = tuple(c for c in labels.categories if rng.random() < 0.6) or (
            labels.categories[0],
        )
    threshold = float(rng.choice([0.0, 0.04, 0.2]))
    desc = f"{k} units, {num_labels} labels, {num_categories} categories, scored {categories}"
    got = results.layer_result(
        "layer", counts, labels, iou_threshold=threshold, categories=categories
    )
    iou = reference.reference_iou(counts, labels)
    want = reference.reference_unit_labels(iou, labels, threshold, categories, unit_total)
    bad = [] if np.array_equal(got.iou, iou) else ["iou"]
    scored = labels.categories if categories is None else categories
    scored = [c for c in labels.categories if c in scored]
    for u, ref in enumerate(want):
        cat = int(got.best_category[u])
        name = labels.categories[cat] if cat >= 0 else None
        if (int(got.best_label[u]), name, float(got.best_iou[u])) != (
            ref["label"],
            ref["category"],
            ref["iou"],
        ):
            bad.append(f"unit {u} best")
        if bool(got.interpretable[u]) != ref["interpretable"]:
            bad.append(f"unit {u} interpretable")
        for col, c in enumerate(scored):
            if int(got.category_label[u, col]) != ref["per_category"][c][0]:
                bad.append(f"unit {u} {c}")
    return desc, bad


# --------------------------------------------------------------------------- quantiles


def quantile_case(seed: int) -> tuple[str, list[str]]:
    """(description, mismatches) of one random quantile case (exact and histogram modes)."""
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 3000)), int(rng.choice([1, 3, 8, 33]))
    q = float(rng.choice([1e-4, 0.005, 0.01, 0.05, 0.3, 0.5, 0.999]))
    dtype = str(rng.choice(["float16", "bfloat16"]))
    kind = rng.integers(0, 4)
    if kind == 0:
        x = rng.normal(size=(n, k))
    elif kind == 1:  # few values: ties everywhere
        x = rng.integers(-2, 3, (n, k)).astype(float)
    elif kind == 2:  # mostly zeros
        x = np.maximum(rng.normal(size=(n, k)), 0) * (rng.random((n, k)) < 0.05)
    else:  # wide exponents: subnormals and overflow to inf in 16 bits
        x = rng.normal(size=(n, k)) * 10.0 ** rng.integers(-8, 5, (n, k))
    x = x.astype(np.float32)
    x[rng.random(x.shape) < 0.01] = -0.0
    if rng.random() < 0.3:
        x[rng.random(x.shape) < 0.01] = -np.inf
    x = x.astype(jnp.dtype(dtype)).astype(np.float32)
    want = quantiles.reference_threshold(x, q)
    modes = {
        "exact": (
            lambda: quantiles.exact_init(k, n, q),
            quantiles.exact_update,
            quantiles.exact_merge,
            quantiles.exact_threshold,
        ),
        "histogram": (
            lambda: quantiles.histogram_init(k, dtype, n, q),
            quantiles.histogram_update,
            quantiles.histogram_merge,
            quantiles.histogram_threshold,
        ),
    }
    bad = []
    for mode, (init, update, merge, threshold) in modes.items():
        cuts = rng.choice(np.arange(1, n), size=min(n - 1, int(rng.integers(0, 4))), replace=False)
        states = []
        for part in np.split(np.arange(n), np.sort(cuts)):
            state, batch = init(), int(rng.integers(1, 700))
            for i in range(0, len(part), batch):
                rows, pad = part[i : i + batch], int(rng.integers(0, 5))
                xb = np.concatenate([x[rows], np.full((pad, k), 7.0, np.float32)])
                valid = np.arange(len(xb)) < len(rows)
                state = jax.jit(update)(state, xb, valid)
            states.append(state)
        state = states[0]
        for other in states[1:]:
            state = jax.jit(merge)(state, other)
        got = np.asarray(threshold(state, q), np.float32)
        if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            bad.append(mode)
    return f"n={n} k={k} q={q} {dtype} kind={kind}", bad


def sketch_case(seed: int, rows: int = 256, units: int = 8) -> tuple[str, list[str]]:
    """(description, mismatches) of one random sketch (`max_count` given, as the engine
    does): bitwise the reference while q * n < size / 2 (nothing compacted yet), else
    certified and within 5% of the reference's count above the threshold; streams in
    1-3 shards (seeds as the engine's devices) merged, over orders that fool prefilters."""
    from jaxdissect.statistics import shard_seed

    rng = np.random.default_rng(seed)
    q = float(rng.choice([0.005, 0.05]))
    n = rows * int(rng.integers(1, 81))
    g = rng.normal(size=(n, units))
    columns = {
        "normal": g[:, 0],
        "relu": np.maximum(g[:, 1], 0),
        "ties": np.round(g[:, 2]),
        "lognormal": np.exp(1.5 * g[:, 3]),
        "ascending": np.sort(g[:, 4]),
        "descending": np.sort(g[:, 5])[::-1],
        "early block": np.where(np.arange(n) < n // 40, 10 + g[:, 6] ** 2, g[:, 6]),
        "saturated": np.clip(3 * g[:, 7], 0, 6),
    }
    x = np.stack(list(columns.values()), 1).astype(np.float32)
    shards = np.array_split(np.arange(n // rows), int(rng.integers(1, 4)))
    update, merge = jax.jit(quantiles.sketch_update), jax.jit(quantiles.sketch_merge)
    states = []
    for i, batches in enumerate(shards):
        state = quantiles.sketch_init(units, q=q, seed=shard_seed(seed, i), max_count=n)
        for b in batches:
            state = update(state, x[b * rows : (b + 1) * rows], np.ones(rows, bool))
        states.append(state)
    state = states[0]
    for other in states[1:]:
        state = merge(state, other)
    desc = f"q={q} n={n} {len(shards)} shards"
    want = quantiles.reference_threshold(x, q)
    if not quantiles.sketch_certified(state).all():
        return desc, ["not certified"]
    got = np.asarray(quantiles.sketch_threshold(state), np.float32)
    if q * n < quantiles.DEFAULT_SIZE / 2:
        exact = got.view(np.uint32) == want.view(np.uint32)
        return desc, [
            f"{name} not exact" for name, ok in zip(columns, exact, strict=True) if not ok
        ]
    above, want_above = (x > got).sum(0), (x > want).sum(0)
    err = np.abs(above - want_above) / np.maximum(want_above, 1)
    return desc, [
        f"{name} off by {e:.1%}" for name, e in zip(columns, err, strict=True) if e > 0.05
    ]


# ---------------------------------------------------------------------------- formulas


def formula_case(seed: int) -> tuple[str, list[str]]:
    """(description, mismatches) of one random batch of formula counts
    (`formula_counts.batch_formula_counts`: random formulas of length 1-3 per unit, out-of-
    range concepts included) against `formula_reference.reference_counts`."""
    from tests import test_formula_counts as cases

    rng = np.random.default_rng(seed)
    probe = tally_probe(rng)
    slots, tie_rule = int(rng.integers(1, 11)), str(rng.choice(["strict", "inclusive"]))
    chunk = int(rng.integers(1, 5)) if rng.random() < 0.5 else None
    got, want = cases.counts_of_random_formulas(probe, rng, slots, chunk, tie_rule)
    shapes = f"acts {probe['acts'].shape} pixel_labels {probe['pixel_labels'].shape}"
    desc = f"{slots} slots, chunk {chunk}, {tie_rule}, {shapes}"
    return desc, [key for key in want if not np.array_equal(got[key], want[key])]


# ------------------------------------------------------------------------------ search


def search_case(seed: int) -> tuple[str, list[str]]:
    """(description, mismatches) of one random formula search: the beam against the plain
    numpy beam, the optimal mode against brute force, under a random union restriction."""
    from jaxdissect import formula_search
    from tests import formula_reference
    from tests import test_formula_search as cases

    rng = np.random.default_rng(seed)
    restriction = str(rng.choice(["plain", "presence", "overlap", "none"]))
    if restriction == "plain":
        num_labels, k = int(rng.integers(4, 10)), int(rng.integers(1, 7))
        units, concepts = cases._random_case(seed, num_labels=num_labels, k=k)
    else:  # the 7 labels of `cases.CATEGORY`
        units, concepts = cases._restricted_case(seed)
    num_labels, k = concepts.shape[-1], units.shape[-1]
    if rng.random() < 0.4:  # two concepts of one mask: ties everywhere
        a, b = rng.choice(np.arange(1, num_labels), 2, replace=False)
        concepts[..., b] = concepts[..., a]
    if rng.random() < 0.3:  # a unit that is exactly a concept (IoU 1)
        units[..., 0] = concepts[..., rng.integers(1, num_labels)]
    if rng.random() < 0.2 and k > 1:  # a unit that fires everywhere
        units[..., 1] = True
    if restriction == "plain":
        first, passes, category = cases._first(units, concepts), None, None
    else:
        first, passes = cases._restricted_first(units, concepts, restriction)
        category = cases.CATEGORY
    ops = tuple(o for o in (0, 1, 2) if rng.random() < 0.7) or (int(rng.integers(0, 3)),)
    penalty = float(rng.choice([1.0, 0.9, 0.7]))
    length, width, slots = int(rng.integers(1, 4)), int(rng.integers(1, 7)), int(rng.integers(1, 5))
    desc = (
        f"{restriction}, {concepts.shape[-1]} labels, {units.shape[-1]} units, ops {ops}, "
        f"penalty {penalty}, length {length}, beam {width}, slots {slots}"
    )
    # Concepts with pixels (an empty one adds nothing) and, restricted, a category.
    candidates = [
        c
        for c in range(1, concepts.shape[-1])
        if concepts[..., c].any() and (category is None or category[c] >= 0)
    ]
    evaluate = cases._numpy_evaluate(units, concepts)
    beam = formula_search.beam_search(
        first, evaluate, max_length=length, beam=width, ops=ops, penalty=penalty
    )
    want_beam = formula_reference.beam(
        units, concepts, candidates, length, width, ops, penalty, passes, category
    )
    bad = [
        f"unit {u} beam"
        for u in range(units.shape[-1])
        if [(b.score, b.formula) for b in beam[u]] != want_beam[u]
    ]
    brute = formula_reference.brute_force(
        units, concepts, candidates, length, ops, penalty, passes, category
    )
    start = [row[0] for row in beam] if rng.random() < 0.7 else None
    best = formula_search.optimal_search(
        first, evaluate, max_length=length, ops=ops, penalty=penalty, slots=slots, start=start
    )
    for u in range(units.shape[-1]):
        score, formula = brute[u]
        if abs(best[u].score - score) > 1e-12 * abs(score) or best[u].formula != formula:
            bad.append(f"unit {u} optimal: {best[u].formula} {best[u].score} != {formula} {score}")
    return desc, bad


# ------------------------------------------------------------------------------ engine


def engine_case(
    seed: int,
    threshold_on: str = "raw",
    work: pathlib.Path | None = None,
) -> tuple[str, list[str]]:
    """(description, mismatches) of one random dissection of the small test CNN."""
    from jaxdissect.data import synthetic
    from jaxdissect.data.broden import Broden
    from jaxdissect.models.load import init_variables
    from tests import test_engine

    rng = np.random.default_rng(seed)
    work = pathlib.Path(tempfile.mkdtemp() if work is None else work)
    n = int(rng.choice([5, 9, 13, 20]))
    root = work / f"broden{n}"
    probe = Broden.open(root if root.exists() else synthetic.generate_tiny(root, num_images=n))
    model = test_engine.SmallCNN()
    variables = init_variables(model, jnp.zeros((1, 32, 32, 3)), seed=int(rng.integers(0, 100)))
    devices = int(rng.choice([1, 2, 4, 8]))
    batch = devices * int(rng.choice([1, 2, 4]))
    # float32 maps upsampled inside pass 1's program may round a value differently from the
    # reference by an ulp or a few even unoptimised (one of its fusions contracts): the
    # upsampled campaign keeps to 16-bit maps, where it agrees bitwise.
    dtypes = ["float16", "bfloat16"] + (["float32"] if threshold_on == "raw" else [])
    dtype = str(rng.choice(dtypes))
    modes = ["exact", "auto"] + (
        ["histogram"] if dtype != "float32" and threshold_on == "raw" else []
    )
    categories = None
    if rng.random() < 0.3:
        every = probe.labels.categories
        categories = tuple(c for c in every if rng.random() < 0.6) or every[:1]
    settings = engine.Settings(
        quantile=float(rng.choice([0.005, 0.05, 0.2])),
        quantile_mode=str(rng.choice(modes)),
        threshold_on=threshold_on,
        restriction=str(rng.choice(["presence", "overlap", "none"])),
        tie_rule=str(rng.choice(["strict", "inclusive"])),
        activation_dtype=dtype,
        batch_size=batch,
        categories=categories,
    )
    layers = tuple(x for x in ("conv1", "conv2", "conv3") if rng.random() < 0.6) or ("conv2",)
    cache = str(rng.choice(["none", "host", "device"]))
    method = str(rng.choice(["auto", "segment", "compact", "matmul"]))
    desc = (
        f"{n} images, {devices} devices, batch {batch}, layers {layers}, cache {cache}, "
        f"method {method}, {settings}"
    )
    got = test_engine._run(
        model,
        variables,
        probe,
        settings,
        layers,
        parallel.data_mesh(devices),
        activation_cache=cache,
        tally_method=method,
    )
    per_device = batch // devices

    @jax.jit
    def forward(x):
        _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        return state["intermediates"]

    images = np.stack([np.asarray(probe.read_image(i)) for i in range(len(probe))])
    acts = {layer: [] for layer in layers}
    for i in range(0, len(probe), per_device):
        x = images[i : i + per_device]
        x = np.concatenate([x, np.zeros((per_device - len(x), *x.shape[1:]), x.dtype)])
        out = forward(test_engine.SPEC(jnp.asarray(x)))
        for layer in layers:
            a = np.asarray(out[layer]["__call__"][0]).astype(dtype).astype(np.float32)
            acts[layer].extend(a[: len(probe) - i])
    if categories is None:
        examples = [probe[i] for i in range(len(probe))]
        pixel = np.stack([e["pixel_labels"] for e in examples])
        scalar = np.stack([e["image_labels"] for e in examples])
        labels = probe.labels
    else:
        pixel, scalar = test_engine._literal_labels(probe, categories)
        labels = engine.restrict_categories(probe.labels, categories, probe.coverage)
    bad = []
    for layer in layers:
        a = np.stack(acts[layer])
        values = a
        if threshold_on == "upsampled":
            values = np.zeros((len(a), *probe.seg_size, a.shape[-1]), np.float32)
            for x, u in np.ndindex(len(a), a.shape[-1]):
                values[x, :, :, u] = reference.reference_upsample(a[x, :, :, u], probe.seg_size)
        thresholds = quantiles.reference_threshold(
            values.reshape(-1, values.shape[-1]), settings.quantile
        )
        if not np.array_equal(got[layer].thresholds.view(np.uint32), thresholds.view(np.uint32)):
            bad.append(f"{layer} thresholds")
            continue
        ref = reference.reference_dissect(
            a,
            thresholds,
            pixel,
            scalar,
            labels,
            restriction=settings.restriction,
            tie_rule=settings.tie_rule,
            quantile=settings.quantile,
        )
        bad += [
            f"{layer} {key}"
            for key in results.COUNT_KEYS
            if not np.array_equal(got[layer].counts[key], ref["counts"][key])
        ]
        result = results.layer_result(layer, got[layer].counts, labels)
        if result.best_label.tolist() != [u["label"] for u in ref["units"]]:
            bad.append(f"{layer} labels")
    return desc, bad

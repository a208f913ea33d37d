"""Random rotations of a layer's units: is interpretability axis-aligned? (paper, section 3.2)

A layer's K units are mixed by a random orthogonal Q (Haar on SO(K)), or by a
partial rotation Q^t (t in [0, 1], a real fractional matrix power from the
real Schur form of Q, so Q^0 = I, Q^1 = Q and every Q^t is a rotation). The
rotated units y Q span the same space as the units y, so the
representation keeps all its information; the paper finds that dissection
nevertheless labels far fewer of the rotated units.

The rotation acts inside the network as a rule of `jaxdissect.interventions`:
`Rotate` (the layer's output y becomes y Q^t, which the rest of the network
sees: "inserted", accuracy changes) or `Fold` (the modules that consume the
rotated output get y back, as if the inverse were folded into the next
computation: the network's output is unchanged up to float rounding, while
anything that watches the layer sees rotated units; for a linear consumer this
is exactly folding Q^T into its kernel, `fold_into_kernel`). `RotatedModel`
carries the matrices in its variables and installs the rules inside `apply`,
i.e. inside a capture's interceptor, so it can be dissected like any Linen
model; accuracies come from `jaxdissect.evaluate`.

`rotation_study` dissects a layer at several rotation amounts and writes
rotation.csv / rotation.json / rotation.png.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import pathlib
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from absl import logging

from jaxdissect import config, evaluate, interventions, scenes, store

# The variables collection that carries the rotation matrices into `RotatedModel.apply`
# (as data, so a jitted dissection step does not bake them in as constants).
COLLECTION = "unit_rotation"


# --------------------------------------------------------------------------- the matrices


def random_rotation(k: int, seed: int) -> np.ndarray:
    """A Haar-random rotation of R^k (orthogonal, determinant +1), float64 [k, k].

    QR of a Gaussian matrix with the signs of R's diagonal moved into Q is
    Haar on O(k) (Mezzadri 2007); negating one column when the determinant is
    -1 maps it onto SO(k), Haar there too. A rotation (not a reflection) is
    needed for the path Q^t from I to Q to stay real.
    """
    if k < 1:
        raise ValueError(f"a rotation needs k >= 1 units, got {k}")
    config.check_seed(seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, k]))
    q, r = np.linalg.qr(rng.standard_normal((k, k)))
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def fractional_power(q: np.ndarray, t: float) -> np.ndarray:
    """Q^t for a rotation Q: real, orthogonal, Q^0 = I, Q^1 = Q, Q^s Q^t = Q^(s+t).

    Q = Z T Z^T with Z orthogonal and T (real Schur form of a normal matrix)
    block diagonal: 2x2 blocks rotating by angles theta in (-pi, pi], and 1x1
    blocks +1 (or -1, in pairs for a rotation). Q^t rotates each block by
    t * theta; a pair of -1 blocks is a half turn in its plane, taken to t * pi.
    """
    q = np.asarray(q, np.float64)
    k = q.shape[0]
    if q.shape != (k, k) or not np.allclose(q @ q.T, np.eye(k), atol=1e-8):
        raise ValueError("fractional_power needs an orthogonal matrix")
    if t == 0:
        return np.eye(k)
    if t == 1:
        return q.copy()
    tt, z = scipy.linalg.schur(q, output="real")
    power = np.zeros_like(tt)
    halves: list[int] = []
    i = 0
    while i < k:
        if i + 1 < k and abs(tt[i + 1, i]) > 1e-12:
            # Standardised 2x2 block [[a, b], [c, a]], b c < 0, |b| = |c| for a normal matrix.
            theta = math.atan2(tt[i + 1, i], tt[i, i])
            c, s = math.cos(t * theta), math.sin(t * theta)
            power[i : i + 2, i : i + 2] = [[c, -s], [s, c]]
            i += 2
            continue
        if tt[i, i] > 0:
            power[i, i] = 1.0
        else:
            halves.append(i)
        i += 1
    if len(halves) % 2:
        raise ValueError("Q has determinant -1 (a reflection): Q^t is not real; use a rotation")
    for a, b in zip(halves[::2], halves[1::2], strict=True):
        c, s = math.cos(t * math.pi), math.sin(t * math.pi)
        power[a, a], power[a, b], power[b, a], power[b, b] = c, -s, s, c
    return z @ power @ z.T


def fold_into_kernel(kernel: np.ndarray | jax.Array, rotation: np.ndarray | jax.Array):
    """The kernel that undoes `rotation` of its input channels: W' = R^T W.

    For a Dense ([in, out]) or Conv ([kh, kw, in, out]) consumer of rotated
    features y R: (y R) W' = y W. Channel-wise linear steps between the two
    (average pooling, padding with zeros) commute with the rotation.
    """
    return jnp.einsum("ij,...io->...jo", rotation, kernel)


# --------------------------------------------------------------------------- in the network


@contextlib.contextmanager
def rotate_units(rotations: Mapping[str, Any], *, fold: bool = False) -> Iterator[None]:
    """Within the context, module path p's `__call__` output y becomes y @ rotations[p].

    The rules `interventions.Rotate` (or, with `fold`, `interventions.Fold`: each
    module called with the rotated array as an argument receives y again) at
    each path. Enter it inside any interceptor that should see the rotated
    units (the capture of `jaxdissect.capture`), e.g. through `RotatedModel`.
    """
    with interventions.active(rotation_rules(rotations, fold)):
        yield


def rotation_rules(rotations: Mapping[str, Any], fold: bool) -> dict[str, interventions.Rule]:
    """{path: `interventions.Fold(m)` if `fold` else `interventions.Rotate(m)`} of
    `rotations` {path: matrix m}."""
    rule = interventions.Fold if fold else interventions.Rotate
    return {path: rule(m) for path, m in rotations.items()}


class RotatedModel(interventions.Wrapped):
    """`base` with layers' units rotated, for `capture`/`pipeline` like any Linen model.

    The matrices travel in the variables (`with_rotations`), keyed by module
    path, so one compilation serves every rotation. Its paths, aliases, default
    layers and input spec are `base`'s (`interventions.Wrapped`): `apply` runs
    `interventions.intervene(base, rules).apply`, nested inside any interceptor
    its caller installed (the capture's).

    Attributes:
      base: the Linen model.
      fold: undo the rotation for the layer's consumers (the network's output
        is unchanged); False lets the rest of the network see rotated units.
    """

    fold: bool = True

    def apply(self, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        variables = dict(variables)
        rotations = variables.pop(COLLECTION, {})
        rules = rotation_rules(rotations, self.fold)
        return interventions.intervene(self.base, rules).apply(variables, *args, **kwargs)


def with_rotations(variables: Mapping[str, Any], rotations: Mapping[str, Any]) -> dict[str, Any]:
    """`variables` plus the rotation matrices (float32) for `RotatedModel`."""
    return {
        **dict(variables),
        COLLECTION: {k: jnp.asarray(v, jnp.float32) for k, v in rotations.items()},
    }


def _layer_shapes(module: nn.Module, variables: Any, input_size: int) -> dict[str, tuple[int, ...]]:
    """Every module path's output shape on a square image of `input_size`."""
    from jaxdissect import capture
    from jaxdissect.models.load import apply_kwargs

    return capture.available_layers(
        module,
        variables,
        input_shape=(input_size, input_size, 3),
        apply_kwargs=apply_kwargs(module),
    )


def resolve_layer(
    module: nn.Module, variables: Any, layer: str, input_size: int
) -> tuple[str, int]:
    """The module path of `layer` (an alias, a dotted or slashed path, or a `re:` pattern
    matching one layer) and its number of units (channels of its output), from one dry run
    of the model; a pattern matching several layers is refused, naming them."""
    from jaxdissect import capture

    available = _layer_shapes(module, variables, input_size)
    paths = capture.resolve_layers([layer], available, getattr(module, "layer_aliases", None))
    if len(paths) > 1:
        raise ValueError(
            f"layers={layer}: matches {len(paths)} layers ({', '.join(paths)}); name one"
        )
    return paths[0], int(available[paths[0]][-1])


def classifier(
    module: nn.Module,
    input_spec: Any,
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> evaluate.Evaluator:
    """The sharded evaluator of `module` on 0..255 images normalised by `input_spec`.

    Raises:
      ValueError: `module` has no head (`evaluate.NO_LOGITS`).
    """
    evaluate.check_has_logits(module)
    kwargs = dict(apply_kwargs or {})
    return evaluate.Evaluator(lambda v, x: module.apply(v, input_spec(x), **kwargs), mesh)


def predictor(
    module: nn.Module,
    input_spec: Any,
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = evaluate.DEFAULT_BATCH_SIZE,
    mesh: jax.sharding.Mesh | None = None,
) -> Callable[[Any, np.ndarray], np.ndarray]:
    """`predict(variables, images) -> logits` (float32), compiled once for every call.

    The rotation matrices are part of `variables` (`with_rotations`), so one
    compilation serves every rotation amount.
    """
    run = classifier(module, input_spec, apply_kwargs=apply_kwargs, mesh=mesh)
    size = evaluate.batch_size_for(run.mesh, batch_size)

    def predict(variables: Any, images: np.ndarray) -> np.ndarray:
        return run(variables, _batches(images, None, size), logits=True).logits

    return predict


def _batches(images: np.ndarray, labels: np.ndarray | None, size: int) -> list[dict[str, Any]]:
    # float32 on the host: XLA rounds the normalisation of uint8 input differently (1 ulp of
    # the logits), and the study's numbers stay those of the float32 input it always had.
    n = len(images)
    labels = np.zeros(n, np.int32) if labels is None else np.asarray(labels)
    split = scenes.SceneSplit(np.asarray(images), labels, np.arange(n, dtype=np.int64))
    return scenes.eval_batches(split, size, dtype=np.float32)


def predict(
    module: nn.Module,
    variables: Any,
    images: np.ndarray,
    input_spec: Any,
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    batch_size: int = evaluate.DEFAULT_BATCH_SIZE,
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Logits of uint8/float [N, H, W, 3] images (normalised by `input_spec`), float32."""
    run = predictor(module, input_spec, apply_kwargs=apply_kwargs, batch_size=batch_size, mesh=mesh)
    return run(variables, images)


def max_output_change(
    module: nn.Module,
    variables: Any,
    rotations: Mapping[str, Any],
    images: np.ndarray,
    input_spec: Any,
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> float:
    """Largest |output change| when `rotations` are applied and folded (0 up to rounding)."""
    kw = dict(apply_kwargs=apply_kwargs, mesh=mesh)
    base = predict(module, variables, images, input_spec, **kw)
    rotated = predict(
        RotatedModel(module, fold=True),
        with_rotations(variables, rotations),
        images,
        input_spec,
        **kw,
    )
    return float(np.max(np.abs(base - rotated))) if base.size else 0.0


# --------------------------------------------------------------------------- the study


@dataclasses.dataclass(frozen=True)
class RotationPoint:
    """Dissection (and accuracy) of one layer at rotation amount t.

    `accuracy_folded`: the network with the inverse folded into the layer's
    consumers (its outputs change by at most `max_output_change`, float
    rounding); `accuracy_inserted`: the rest of the network sees rotated units.
    """

    amount: float
    unique_detectors: int
    interpretable_units: int
    num_units: int
    unique_by_category: dict[str, int]
    interpretable_by_category: dict[str, int]
    layer_name: str
    accuracy_folded: float | None = None
    accuracy_inserted: float | None = None
    max_output_change: float | None = None


def amount_name(layer: str, amount: float) -> str:
    """The name of layer `layer` rotated by Q^amount in a rotation study's results."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", layer)
    return f"{safe}-t{amount:.3f}".replace(".", "_")


def check_amounts(amounts: Sequence[float], name: str = "amounts") -> list[float]:
    """The distinct amounts, each in [0, 1] and named apart by `amount_name`; else one
    line naming parameter `name` (a script passes its flag)."""
    given = ",".join(f"{t:g}" for t in amounts)
    if not amounts:
        raise ValueError(f"{name}=: no rotation amount given")
    bad = [t for t in amounts if not 0 <= t <= 1]
    if bad:
        raise ValueError(f"{name}={given}: {','.join(f'{t:g}' for t in bad)} outside [0, 1]")
    distinct = [float(t) for t in dict.fromkeys(amounts)]
    seen: dict[str, float] = {}
    for t in distinct:
        other = seen.setdefault(amount_name("", t), t)
        if other != t:
            raise ValueError(
                f"{name}={given}: {other:g} and {t:g} are one amount to 3 decimals (the "
                "results name each amount so); give amounts that differ there"
            )
    return distinct


def rotated_fan(
    module: nn.Module,
    variables: Any,
    path: str,
    matrices: Mapping[str, np.ndarray],
    *,
    input_size: int,
    apply_kwargs: Mapping[str, Any] | None = None,
    token_layout: Any = None,
) -> tuple[Any, dict[str, Any]]:
    """A model (function) whose outputs are the layer's units under every rotation at once.

    `fn(v, images) -> {name: y @ matrices[name]}` where y is module `path`'s
    output (maps; a [B, tokens, C] output read by `token_layout`, `capture.make_tap`'s):
    one forward pass serves every rotation amount. The rotated layer's
    units are the same in both modes (`fold` only changes what the layers after
    it see), and equal what `RotatedModel` hands the capture (tested).
    """
    from jaxdissect import capture

    tap = capture.make_tap(
        module,
        variables,
        [path],
        input_shape=(input_size, input_size, 3),
        apply_kwargs=apply_kwargs,
        token_layout=token_layout,
    )

    def fn(v: Mapping[str, Any], images: jax.Array) -> dict[str, jax.Array]:
        y = tap.fn(v["model"], images)[path]
        return {name: interventions.rotate(y, m) for name, m in v["rotations"].items()}

    fan_variables = {
        "model": tap.variables,
        "rotations": {k: jnp.asarray(m, jnp.float32) for k, m in matrices.items()},
    }
    return fn, fan_variables


def rotation_study(
    model: Any,
    layer: str,
    amounts: Sequence[float],
    source: Any,
    settings: Any,
    output_dir: str | os.PathLike[str],
    *,
    dataset_name: str,
    seed: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    options: Any = None,
    eval_images: np.ndarray | None = None,
    eval_labels: np.ndarray | None = None,
) -> list[RotationPoint]:
    """Dissect `layer` of `model` (a `pipeline.ModelInfo`) with its units rotated by Q^t.

    All amounts are dissected in one pass (`rotated_fan`), written to
    `output_dir` as one dissection whose "layers" are `amount_name(layer, t)`;
    then rotation.csv, rotation.json and rotation.png. With `eval_images` and
    `eval_labels`, each amount's network (`RotatedModel`) is also evaluated, with
    the rotation folded and inserted: accuracies, and the largest change of the
    folded network's outputs.
    """
    from jaxdissect import pipeline, results

    amounts = check_amounts(amounts)
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = model.input_spec.size
    path, k = resolve_layer(model.module, model.variables, layer, size)
    q = random_rotation(k, seed)
    matrices = {amount_name(layer, t): fractional_power(q, t) for t in amounts}
    t0 = time.time()
    fn, fan_variables = rotated_fan(
        model.module,
        model.variables,
        path,
        matrices,
        input_size=size,
        apply_kwargs=model.apply_kwargs,
        token_layout=model.token_layout,
    )
    info = pipeline.ModelInfo(
        module=fn,
        variables=fan_variables,
        input_spec=model.input_spec,
        name=f"{model.name}, {layer} rotated by Q^t (seed {seed})",
        # The weights' key covers the rotations; the stage key the base model's (weights,
        # definition, library code, token layout) too: edited model code is not reused.
        key=store.key_of(base=model.key, layer=path, amounts=amounts, seed=seed, study="rotation"),
        wraps=model.stage_key,
    )
    layer_results = pipeline.dissect(
        info,
        list(matrices),
        source,
        settings,
        out,
        dataset_name=dataset_name,
        mesh=mesh,
        options=options or pipeline.Options(),
    )
    logging.info("dissected %d rotation amounts in %.1f s", len(amounts), time.time() - t0)
    measure = eval_images is not None and eval_labels is not None
    if measure:
        kw = dict(apply_kwargs=model.apply_kwargs, mesh=mesh)
        base = classifier(model.module, model.input_spec, **kw)
        batches = _batches(eval_images, eval_labels, evaluate.batch_size_for(base.mesh))
        base_logits = base(model.variables, batches, logits=True).logits
        networks = {
            fold: classifier(RotatedModel(model.module, fold=fold), model.input_spec, **kw)
            for fold in (True, False)
        }
    points = []
    for t, r in zip(amounts, layer_results, strict=True):
        summary = results.layer_summary(r)
        measured: dict[str, float | None] = dict.fromkeys(
            ("accuracy_folded", "accuracy_inserted", "max_output_change"), None
        )
        if measure:
            variables = with_rotations(model.variables, {path: matrices[amount_name(layer, t)]})
            for fold in (True, False):
                got = networks[fold](variables, batches, logits=fold)
                measured["accuracy_folded" if fold else "accuracy_inserted"] = got.accuracy
                if fold:
                    change = np.max(np.abs(got.logits - base_logits)) if got.count else 0.0
                    measured["max_output_change"] = float(change)
        points.append(
            RotationPoint(
                amount=t,
                unique_detectors=summary.unique_detectors,
                interpretable_units=summary.interpretable_units,
                num_units=summary.num_units,
                unique_by_category=dict(summary.unique_by_category),
                interpretable_by_category=dict(summary.interpretable_by_category),
                layer_name=r.layer,
                **measured,
            )
        )
        logging.info(
            "t=%g: %d unique detectors, %d/%d interpretable units; accuracy %s folded, %s inserted",
            t,
            summary.unique_detectors,
            summary.interpretable_units,
            summary.num_units,
            measured["accuracy_folded"],
            measured["accuracy_inserted"],
        )
    write_rotation_files(
        out,
        points,
        {
            "model": model.name,
            "layer": layer,
            "path": path,
            "units": k,
            "seed": seed,
            "dataset": dataset_name,
            "settings": dataclasses.asdict(settings),
            "eval_images": None if eval_images is None else len(eval_images),
        },
    )
    return points


def write_rotation_files(
    out: pathlib.Path, points: Sequence[RotationPoint], settings: Mapping[str, Any]
) -> None:
    """rotation.csv, rotation.json and rotation.png (a category's counts in the columns
    `results.category_column` names)."""
    import csv

    from jaxdissect import results

    categories = list(dict.fromkeys(c for p in points for c in p.unique_by_category))
    header = [
        "amount",
        "unique_detectors",
        "interpretable_units",
        "num_units",
        "accuracy_folded",
        "accuracy_inserted",
        "max_output_change",
        *[results.category_column("unique", c) for c in categories],
        *[results.category_column("interpretable", c) for c in categories],
    ]
    with store.atomic_open(out / "rotation.csv", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for p in points:
            w.writerow(
                [
                    f"{p.amount:g}",
                    p.unique_detectors,
                    p.interpretable_units,
                    p.num_units,
                    "" if p.accuracy_folded is None else f"{p.accuracy_folded:.6f}",
                    "" if p.accuracy_inserted is None else f"{p.accuracy_inserted:.6f}",
                    "" if p.max_output_change is None else f"{p.max_output_change:.3g}",
                    *[p.unique_by_category.get(c, 0) for c in categories],
                    *[p.interpretable_by_category.get(c, 0) for c in categories],
                ]
            )
    store.write_json(
        out / "rotation.json",
        {"settings": dict(settings), "points": [dataclasses.asdict(p) for p in points]},
    )
    plot_rotation(out / "rotation.png", points, title=f"{settings.get('layer', '')} rotated")


def plot_rotation(
    path: str | os.PathLike[str], points: Sequence[RotationPoint], *, title: str = ""
) -> pathlib.Path:
    """Unique detectors (stacked by category) and interpretable units against t; accuracy.

    The points are drawn in increasing t, whatever their order.
    """
    from matplotlib.figure import Figure

    from jaxdissect.report import plots

    points = sorted(points, key=lambda p: p.amount)
    ts = [p.amount for p in points]
    categories = list(dict.fromkeys(c for p in points for c in p.unique_by_category))
    colors = plots.category_colors(categories)
    has_acc = any(p.accuracy_folded is not None for p in points)
    fig = Figure(figsize=(10 if has_acc else 6.5, 3.8), layout="constrained")
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
    ax = axes[0]
    width = 0.6 * (min(np.diff(sorted(ts))) if len(ts) > 1 else 0.2)
    bottom = np.zeros(len(ts))
    for c in categories:
        vals = np.asarray([p.unique_by_category.get(c, 0) for p in points], float)
        ax.bar(ts, vals, width=width, bottom=bottom, color=colors[c], label=c)
        bottom += vals
    ax.set_xlabel("rotation amount t (Q^t)")
    ax.set_ylabel("unique detectors")
    ax.set_title(title or "unique detectors under rotation", loc="left", fontsize=11)
    twin = ax.twinx()
    twin.plot(ts, [p.interpretable_units for p in points], "k.-", label="interpretable units")
    twin.set_ylabel("interpretable units")
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    # Above the bars, in a headroom of its own: nothing to cover.
    ax.legend(handles + h2, labels + l2, fontsize=8, frameon=False, loc="upper left", ncol=3)
    ax.set_ylim(0, max(1.0, float(bottom.max()) * 1.5))
    twin.set_ylim(0, max([p.num_units for p in points] + [1]) * 1.5)
    if has_acc:
        ax2 = axes[1]
        ax2.plot(ts, [p.accuracy_folded for p in points], "o-", color="#4e79a7", label="folded")
        ax2.plot(
            ts, [p.accuracy_inserted for p in points], "s--", color="#e15759", label="inserted"
        )
        ax2.set_xlabel("rotation amount t")
        ax2.set_ylabel("validation accuracy")
        ax2.set_ylim(0, 1)
        ax2.set_title("accuracy of the rotated network", loc="left", fontsize=11)
        ax2.grid(color="#dddddd", linewidth=0.6)
        ax2.legend(fontsize=8, frameon=False)
    return plots._save(fig, path)

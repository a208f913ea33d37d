"""Exact on-device counts of formulas and of all their one-concept extensions.

For every unit u, each of its S formulas F (a `formulas.FormulaTable`: a beam, or a block of
prefixes of the optimal search) and every concept c, one pass over the probe set sums

    and_label[u, s, c] = |M_u and F and L_c|,    formula_label[u, s, c] = |F and L_c|,
    and_total[u, s]    = |M_u and F|,            formula_total[u, s]    = |F|,

from which `formulas.extension_counts` gives the IoU of F OR c, F AND c, F AND NOT c for
every c by inclusion-exclusion with the length-1 tally. Masks as `jaxdissect.masks`: M_u is
the tally's unit mask (upsampled map against the threshold by the tie rule), L_c the OR of
the planes' pixel labels, the whole image for an image-level label; labels are cleaned as the
tally does (`tally.clean_labels`).

Method (the tally's `segment` method with formula columns): per image, a label-major
[labels, pixels] membership of the image's labels (set by one scatter per plane) gives each
formula term by a gather of its concept's row; the formula's mask F and M and F, transposed
to [pixels, 2*K*S], are the columns, and one scatter-add per pixel plane sums them by the
pixel's label, in uint16 on
CPU (a per-image sum is at most the image's pixels); image-level labels take the columns'
per-image sums. Per image, with s pixels, P planes, T <= 3 terms and L labels: s*K*S*T
1-byte gathers and boolean ops, s*P*2*K*S additions (the scatters, 2 or 4 bytes each),
s*P byte writes for the membership and a [L, 2*K*S] partial sum (2 bytes each on CPU) added
into the batch's counts. ResNet-18 layer4 on Broden at 112x112 (s = 12,544, K = 512,
S = 5, P ~ 4): 96 M gathers, 0.26 G scatter adds, a 12 MB partial sum per image. Measured
figures: benchmarks/README.md (`bench_formulas.py`).

Exactness: per-batch counts are int32 below 2**30 (`tally.check_batch_bound`); the running
counts are `tally.WideCount` pairs joined as int64 on the host, summed over devices by the
statistic's merge like the tally.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdissect import formulas, statistics, tally
from jaxdissect.tie_rule import active, check_tie_rule

# Largest buffer of one chunk of images off CPU (the formula columns).
_CHUNK_BYTES = 1 << 30
_PIB = lax.GatherScatterMode.PROMISE_IN_BOUNDS


def formula_masks(member: jax.Array, concepts: jax.Array, ops: jax.Array) -> jax.Array:
    """bool [K, S, ...]: each formula's mask from the label membership [L, ...] (label-major:
    a formula term gathers whole rows, far faster than a gather along the last axis).

    concepts int32 [K, S, 3], ops int32 [K, S, 2] (`formulas.FormulaTable`).
    """
    extra = (None,) * (member.ndim - 1)
    out = member[concepts[..., 0]]
    for t in range(1, concepts.shape[-1]):
        term = member[concepts[..., t]]
        op = ops[..., t - 1][(..., *extra)]
        out = jnp.where(
            op == 0,
            out | term,
            jnp.where(op == 1, out & term, jnp.where(op == 2, out & ~term, out)),
        )
    return out


def _image_columns(m, p, q, concepts, ops, num_labels):
    """bool [s, 2*K*S] of one image: M_u and F_us, then F_us (m [s, K], p [P, s], q [Q])."""
    s, k = m.shape
    member = jnp.zeros((num_labels, s), bool)
    pixel = jnp.arange(s, dtype=jnp.int32)
    for plane in range(p.shape[0]):
        member = member.at[p[plane], pixel].set(True, mode=_PIB)
    member = member.at[q].set(True, mode=_PIB).at[0].set(False)
    f = formula_masks(member, concepts, ops)  # [K, S, s]
    mf = m.T[:, None, :] & f
    # Materialised label-major, then transposed: fused with the gathers, the transpose made
    # XLA's CPU loop 6 times slower.
    return lax.optimization_barrier(jnp.concatenate([mf, f]).reshape(-1, s)).T


def _chunk(chunk: int | None, batch: int, pixels: int, columns: int) -> int:
    if chunk is None:
        chunk = 1 if jax.default_backend() == "cpu" else max(1, _CHUNK_BYTES // (pixels * columns))
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: must be >= 1")
    return min(chunk, batch)


def batch_formula_counts(
    acts: jax.Array,
    thresholds: jax.Array,
    concepts: jax.Array,
    ops: jax.Array,
    batch: Mapping[str, jax.Array],
    num_labels: int,
    *,
    tie_rule: str = "strict",
    chunk: int | None = None,
) -> dict[str, jax.Array]:
    """Exact int32 counts of one batch (module doc): pure, jit with the keywords static.

    acts float32 [B, h, w, K]; thresholds [K]; concepts int32 [K, S, 3]; ops int32 [K, S, 2];
    batch: "pixel_labels" int32 [B, P, sh, sw], "image_labels" int32 [B, Q], "valid" [B].
    Returns and_label, formula_label int32 [K, S, L]; and_total, formula_total [K, S].
    """
    check_tie_rule(tie_rule)
    acts = jnp.asarray(acts, jnp.float32)
    thresholds = jnp.asarray(thresholds, jnp.float32)
    concepts = jnp.asarray(concepts, jnp.int32)
    ops = jnp.asarray(ops, jnp.int32)
    pix = jnp.asarray(batch["pixel_labels"], jnp.int32)
    img = jnp.asarray(batch["image_labels"], jnp.int32)
    b, _, _, k = acts.shape
    _, planes, sh, sw = pix.shape
    s, nl = sh * sw, num_labels
    if concepts.shape[0] != k or concepts.shape[2] != formulas.MAX_LENGTH:
        raise ValueError(f"concepts: shape {concepts.shape}, expected ({k}, S, 3)")
    if ops.shape != (*concepts.shape[:2], formulas.MAX_LENGTH - 1):
        raise ValueError(f"ops: shape {ops.shape}, expected {(*concepts.shape[:2], 2)}")
    slots = concepts.shape[1]
    cols = 2 * k * slots
    tally.check_batch_bound(b, (sh, sw))
    valid = jnp.asarray(batch.get("valid", jnp.ones((b,), bool)), bool)
    pix, img = tally.clean_labels(pix, img, valid, nl)
    # Out-of-range concepts in the table give empty masks (like label 0).
    concepts = jnp.where((concepts > 0) & (concepts < nl), concepts, 0)
    c = _chunk(chunk, b, s, cols)
    pad = -b % c
    n = (b + pad) // c

    def split(x):
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape(n, c, *x.shape[1:])

    dtype = jnp.uint16 if (s <= 0xFFFF and jax.default_backend() == "cpu") else jnp.int32
    image = jnp.arange(c, dtype=jnp.int32)

    def step(counts, xs):
        a, p, q, v = xs
        m = active(tally.upsample(a, (sh, sw)), thresholds, tie_rule) & v[:, None, None, None]
        m = m.reshape(c, s, k)
        columns = jax.vmap(_image_columns, in_axes=(0, 0, 0, None, None, None))(
            m, p.reshape(c, planes, s), q, concepts, ops, nl
        )  # [c, s, 2KS]
        per_image = columns.sum(1, dtype=jnp.int32)  # [c, 2KS]
        rows = lax.optimization_barrier(columns.reshape(c * s, cols))
        ids = p + (image * nl)[:, None, None, None]
        part = jnp.zeros((c * nl, cols), dtype)
        for plane in range(planes):
            part = part.at[ids[:, plane].reshape(-1)].add(rows.astype(dtype), mode=_PIB)
        part = part.reshape(c, nl, cols).astype(jnp.int32).at[:, 0].set(0).sum(0)
        # Image-level labels: the whole image is the concept's mask.
        whole_counts = (
            jax.ops.segment_sum(
                jnp.broadcast_to(per_image[:, None, :], (*q.shape, cols)).reshape(-1, cols),
                q.reshape(-1),
                num_segments=nl,
                mode=_PIB,
            )
            .at[0]
            .set(0)
        )
        label_counts, totals = counts
        return (label_counts + part + whole_counts, totals + per_image.sum(0)), None

    init = (jnp.zeros((nl, cols), jnp.int32), jnp.zeros((cols,), jnp.int32))
    (label_counts, totals), _ = lax.scan(
        step, init, (split(acts), split(pix), split(img), split(valid))
    )
    label_counts = label_counts.T.reshape(2, k, slots, nl)
    totals = totals.reshape(2, k, slots)
    return {
        "and_label": label_counts[0],
        "formula_label": label_counts[1],
        "and_total": totals[0],
        "formula_total": totals[1],
    }


_KEYS = ("and_label", "formula_label", "and_total", "formula_total")


def formula_statistic(
    layer: str,
    thresholds: np.ndarray,
    table: formulas.FormulaTable,
    num_labels: int,
    *,
    tie_rule: str = "strict",
    chunk: int | None = None,
) -> statistics.Statistic:
    """The counts of the module doc for `layer`'s units and the formulas of `table`.

    Thresholds and the table ride in the state: one compiled step serves every beam step and
    block of prefixes of the same shape. finalize gives `formulas.ExtensionCounts` fields
    as int64 arrays.
    """
    thresholds = np.asarray(thresholds, np.float32)
    k, slots = table.concepts.shape[:2]
    if thresholds.shape != (k,):
        raise ValueError(f"thresholds: shape {thresholds.shape}, expected ({k},) for the table")

    def init(shard: int):
        return {
            "thresholds": jnp.asarray(thresholds),
            "concepts": jnp.asarray(table.concepts, jnp.int32),
            "ops": jnp.asarray(table.ops, jnp.int32),
            "counts": {
                "and_label": tally.WideCount.zeros((k, slots, num_labels)),
                "formula_label": tally.WideCount.zeros((k, slots, num_labels)),
                "and_total": tally.WideCount.zeros((k, slots)),
                "formula_total": tally.WideCount.zeros((k, slots)),
            },
        }

    def update(state, batch):
        counts = batch_formula_counts(
            batch["acts"][layer],
            state["thresholds"],
            state["concepts"],
            state["ops"],
            batch,
            num_labels,
            tie_rule=tie_rule,
            chunk=chunk,
        )
        new = {key: state["counts"][key].add(counts[key]) for key in _KEYS}
        return {**state, "counts": new}

    def merge(a, b):
        new = {key: a["counts"][key].merge(b["counts"][key]) for key in _KEYS}
        return {**a, "counts": new}

    def finalize(state):
        return {key: state["counts"][key].to_numpy() for key in _KEYS}

    key = ("formula", layer, k, slots, num_labels, tie_rule, chunk)
    return statistics.Statistic(init, update, merge, finalize, key)


__all__ = ["batch_formula_counts", "formula_masks", "formula_statistic"]

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

Method (the tally's `segment` method, one block of K columns per formula slot): a loop over
blocks of 4 slots (one compiled body for all; up to 8 slots, e.g. a beam, are one block),
each a pass over the batch's images; per image and slot s, each unit's formula mask F_us is
computed pixel-major, [pixels, K], by a few compares of the pixel's label ids (int16 when the
labels allow) with the formula's concepts (a term no unit of the slot uses is skipped at run
time); the rows M and F, then F, are summed by the pixel's label with one scatter-add per
plane into a [L, K] uint16 partial sum on CPU (exact: a per-image sum is at most the image's
pixels; [L, K] stays in cache, where a [L, 2*K*S] one did not), plane 0's sums giving the
per-image totals for the totals and the image-level labels. Per image, with s pixels, P
planes, Q image-level slots, T <= 3 terms: s*K*S*T*(P+1) 2-byte compares, s*K*S*2*P
additions (the scatters), 2*S [L, K] partial sums and one unit mask per block (s*K
interpolations and compares). ResNet-18 layer4 on Broden at 112x112 (s = 12,544, K = 512,
S = 5, P ~ 5, T = 2): 0.4 G compares, 0.32 G scatter adds, 10 partial sums of 1.4 MB per
image. Measured figures: benchmarks/README.md (`bench_formulas.py`).

Exactness: per-batch counts are int32 below 2**30 (`tally.check_batch_bound`); the running
counts are `widecount.WideCount` pairs joined as int64 on the host, summed over devices by the
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
from jaxdissect.widecount import WideCount

# Formula slots unrolled in one loop body (they share the unit masks).
_BLOCK_SLOTS = 4


def _term(p: jax.Array, q: jax.Array, concept: jax.Array) -> jax.Array:
    """bool [c, s, K]: pixels holding each unit's `concept` [K] (p [c, P, s], q [c, Q]).

    A few compares of the pixel's label ids with the concept; an image-level label covers the
    whole image; concept 0 is empty.
    """
    hit = (q[:, :, None] == concept).any(1)[:, None, :]  # [c, 1, K]
    hit = jnp.broadcast_to(hit, (p.shape[0], p.shape[-1], concept.shape[0]))  # also P = 0
    for plane in range(p.shape[1]):
        hit = hit | (p[:, plane, :, None] == concept)
    return hit & (concept > 0)


def _combine(out: jax.Array, term: jax.Array, op: jax.Array) -> jax.Array:
    """out op term, per unit (op int32 [K]: `formulas.OPS` codes; NO_OP keeps out)."""
    return jnp.where(
        op == 0, out | term, jnp.where(op == 1, out & term, jnp.where(op == 2, out & ~term, out))
    )


def formula_pixels(p: jax.Array, q: jax.Array, concepts: jax.Array, ops: jax.Array) -> jax.Array:
    """bool [c, s, K]: one formula per unit (concepts int32 [K, 3], ops int32 [K, 2]) on the
    pixels of a chunk of images (p int [c, P, s], q int [c, Q]), pixel-major.

    A term no unit uses (its operator NO_OP for every unit) is skipped at run time.
    """
    out = _term(p, q, concepts[:, 0])
    for t in range(1, concepts.shape[-1]):
        op = ops[:, t - 1]
        out = lax.cond(
            (op != formulas.NO_OP).any(),
            lambda out, t=t, op=op: _combine(out, _term(p, q, concepts[:, t]), op),
            lambda out: out,
            out,
        )
    return out


def _segment_sums(rows, ids, img, dtype, num_labels):
    """The tally's segment method (`tally.segment_sums`) on one [c*s, K] block of bool rows.

    Returns int32 [L, K]: the rows summed by the pixel's label (every plane) and, for an
    image-level label, by image; and int32 [K], the rows' sum. ids int32 [c, P, s] are
    (image, label) segments, img int32 [c, Q]; row 0 (nothing) is garbage, zeroed later.
    """
    c, q = img.shape
    k = rows.shape[-1]
    part, per_image = tally.segment_sums(rows, ids, dtype, num_labels, hold_plane0=True)
    part = part.astype(jnp.int32).sum(0)
    # Image-level labels: the whole image is the concept's mask.
    whole = jnp.broadcast_to(per_image[:, None, :], (c, q, k)).reshape(c * q, k)
    part = part.at[img.reshape(-1)].add(whole, mode=tally.IN_BOUNDS)
    return part, per_image.sum(0)


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
    tally.check_batch_bound(b, (sh, sw))
    valid = jnp.asarray(batch.get("valid", jnp.ones((b,), bool)), bool)
    pix, img = tally.clean_labels(pix, img, valid, nl)
    # Out-of-range concepts in the table give empty masks (like label 0).
    concepts = jnp.where((concepts > 0) & (concepts < nl), concepts, 0)
    # Slot-major, so that one slot's formulas of every unit are one [K] block.
    concepts = concepts.transpose(1, 0, 2)
    ops = ops.transpose(1, 0, 2)
    c = tally.images_per_chunk(chunk, b, s * k * 4)  # [pixels, K] rows
    pad = -b % c
    n = (b + pad) // c

    def split(x):
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape(n, c, *x.shape[1:])

    dtype = jnp.uint16 if (s <= 0xFFFF and jax.default_backend() == "cpu") else jnp.int32
    image = jnp.arange(c, dtype=jnp.int32)
    narrow = jnp.int16 if nl <= 0x7FFF else None
    concepts_n = concepts.astype(narrow) if narrow else concepts

    # Slots in blocks of `_BLOCK_SLOTS`, one compiled body for all blocks (unrolling every
    # slot made the compile grow with them; one slot a body recomputed the unit masks per
    # slot); a beam's few slots in one block. Padding slots hold empty formulas (concept 0)
    # and are dropped.
    per_block = slots if slots <= 2 * _BLOCK_SLOTS else _BLOCK_SLOTS
    extra = -slots % per_block
    concepts_n = jnp.pad(concepts_n, ((0, extra), (0, 0), (0, 0)))
    ops = jnp.pad(ops, ((0, extra), (0, 0), (0, 0)), constant_values=formulas.NO_OP)

    def step(first, counts, xs):
        """Adds the counts of slots first .. first + per_block - 1 on a chunk of images."""
        a, p, q, v = xs
        m = active(tally.upsample(a, (sh, sw)), thresholds, tie_rule) & v[:, None, None, None]
        m = lax.optimization_barrier(m.reshape(c * s, k))
        p = p.reshape(c, planes, s)
        ids = p + (image * nl)[:, None, None]
        # Narrow ids for the compares of `formula_pixels`: twice the lanes per instruction.
        p16, q16 = (p.astype(narrow), q.astype(narrow)) if narrow else (p, q)
        label_counts, totals = counts
        for u in range(per_block):
            j = first + u
            f = formula_pixels(p16, q16, concepts_n[j], ops[j]).reshape(c * s, k)
            for kind, rows in enumerate((m & f, f)):
                part, total = _segment_sums(rows, ids, q, dtype, nl)
                label_counts = label_counts.at[u, kind].add(part)
                totals = totals.at[u, kind].add(total)
        return (label_counts, totals), None

    chunks = (split(acts), split(pix), split(img), split(valid))  # split once, not per block

    def block_counts(first):
        init = (
            jnp.zeros((per_block, 2, nl, k), jnp.int32),
            jnp.zeros((per_block, 2, k), jnp.int32),
        )
        return lax.scan(lambda counts, x: step(first, counts, x), init, chunks)[0]

    firsts = jnp.arange(0, slots + extra, per_block)
    label_counts, totals = lax.map(block_counts, firsts)  # [blocks, per_block, 2, ...]
    label_counts = label_counts.reshape(-1, 2, nl, k)[:slots].at[:, :, 0].set(0)
    label_counts = label_counts.transpose(1, 3, 0, 2)  # [2, K, S, L]
    totals = totals.reshape(-1, 2, k)[:slots].transpose(1, 2, 0)  # [2, K, S]
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
            "thresholds": jax.device_put(thresholds),
            "concepts": jax.device_put(np.asarray(table.concepts, np.int32)),
            "ops": jax.device_put(np.asarray(table.ops, np.int32)),
            "counts": {
                "and_label": WideCount.zeros((k, slots, num_labels)),
                "formula_label": WideCount.zeros((k, slots, num_labels)),
                "and_total": WideCount.zeros((k, slots)),
                "formula_total": WideCount.zeros((k, slots)),
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


__all__ = ["batch_formula_counts", "formula_pixels", "formula_statistic"]

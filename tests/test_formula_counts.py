"""On-device formula counts against the numpy reference: random, adversarial, 8 devices."""

import jax
import numpy as np
import pytest

from jaxdissect import driver, formula_counts, formulas, parallel
from jaxdissect.formulas import Formula, FormulaTable
from tests import formula_reference as ref
from tests.reference import random_probe


def _random_table(rng, k: int, slots: int, num_labels: int) -> list[list[Formula]]:
    table = []
    for _ in range(k):
        row = []
        for _ in range(rng.integers(0, slots + 1)):  # some units with empty slots
            length = int(rng.integers(1, 4))
            cs = tuple(int(c) for c in rng.integers(0, num_labels + 3, length))  # 0, out of range
            row.append(Formula(cs, tuple(int(o) for o in rng.integers(0, 3, length - 1))))
        table.append(row)
    return table


def _probe(seed=0, num_labels=40):
    # Few labels, so that random formulas combine concepts that really meet.
    return random_probe(seed, num_labels=num_labels, num_images=9)


# One jitted function for the tests here (num_labels, chunk and tie rule static): tests of
# the same shapes and chunk share its programs.
_counts = jax.jit(
    formula_counts.batch_formula_counts, static_argnums=5, static_argnames=("chunk", "tie_rule")
)


def _expected(p, table, tie_rule="strict"):
    nl = p["labels"].num_labels
    units, concepts = ref.reference_masks(
        p["acts"], p["thresholds"], p["pixel_labels"], p["image_labels"], nl, tie_rule
    )
    # Out-of-range table entries are empty masks: the reference has no column for them.
    concepts = np.concatenate([concepts, np.zeros((*concepts.shape[:2], 3), bool)], -1)
    want = ref.reference_counts(units, concepts, table)
    want["and_label"] = want["and_label"][..., :nl]
    want["formula_label"] = want["formula_label"][..., :nl]
    return want


# 10 slots: blocks of 4 in one compiled loop body, the last padded with empty formulas; in
# chunks of 4 images (the last one padded: 9 images), not the default one on CPU.
@pytest.mark.parametrize("seed, slots, chunk", [(0, 4, None), (1, 4, None), (0, 10, 4)])
def test_batch_counts_equal_the_reference(seed, slots, chunk):
    got, want = counts_of_random_formulas(_probe(seed), np.random.default_rng(seed), slots, chunk)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def counts_of_random_formulas(p, rng, slots, chunk=None, tie_rule="strict"):
    """(batch_formula_counts, the reference's counts) of random formulas (`_random_table`)
    on the probe `p`, numpy arrays keyed as `formula_counts`."""
    nl = p["labels"].num_labels
    table = _random_table(rng, p["acts"].shape[-1], slots, nl)
    t = FormulaTable.of(table, slots)
    padded = [row + [Formula((0,))] * (slots - len(row)) for row in table]
    batch = {"pixel_labels": p["pixel_labels"], "image_labels": p["image_labels"]}
    got = _counts(
        p["acts"], p["thresholds"], t.concepts, t.ops, batch, nl, chunk=chunk, tie_rule=tie_rule
    )
    return {key: np.asarray(v) for key, v in got.items()}, _expected(p, padded, tie_rule)


def test_slots_of_short_formulas_skip_their_unused_terms_exactly():
    # Slot 0 holds only length-1 formulas (terms 2 and 3 unused by every unit), slot 1 only
    # length 2 (term 3 unused), slot 2 mixes lengths: the skipped terms change no count.
    p = _probe(5)
    nl = p["labels"].num_labels
    rng = np.random.default_rng(5)
    k = p["acts"].shape[-1]
    table = [
        [
            Formula((int(rng.integers(1, nl)),)),
            Formula(tuple(int(c) for c in rng.integers(1, nl, 2)), (int(rng.integers(0, 3)),)),
            Formula((int(rng.integers(1, nl)), 2, 3)[: 1 + u % 3], (2, 0)[: u % 3]),
        ]
        for u in range(k)
    ]
    # 4 slots, the last empty: the program of test_batch_counts_equal_the_reference's 4 slots.
    t = FormulaTable.of(table, 4)
    assert (t.ops[:, 0] == formulas.NO_OP).all() and (t.ops[:, 1, 1] == formulas.NO_OP).all()
    batch = {"pixel_labels": p["pixel_labels"], "image_labels": p["image_labels"]}
    got = _counts(p["acts"], p["thresholds"], t.concepts, t.ops, batch, nl)
    want = _expected(p, [row + [Formula((0,))] for row in table])
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[key]), value, err_msg=key)


class _Examples:
    """Examples whose "image" is the activation map, with their labels."""

    def __init__(self, p):
        self.p = p

    def __len__(self):
        return len(self.p["acts"])

    def __getitem__(self, i):
        return {
            "index": np.int32(i),
            "image": self.p["acts"][i],
            "pixel_labels": self.p["pixel_labels"][i],
            "image_labels": self.p["image_labels"][i],
        }


def test_statistic_over_8_devices_equals_1_and_the_reference():
    p = _probe(3)
    nl = p["labels"].num_labels
    table = _random_table(np.random.default_rng(3), 7, 3, nl)
    padded = [row + [Formula((0,))] * (3 - len(row)) for row in table]
    stat = formula_counts.formula_statistic("l", p["thresholds"], FormulaTable.of(table, 3), nl)
    results = [
        driver.run_pass(
            "formulas",
            stat,
            _Examples(p),
            mesh=parallel.data_mesh(devices),
            batch_size=8,
            forward=jax.jit(lambda v, x: {"l": x}),
            num_threads=0,
        )
        for devices in (1, 8)
    ]
    want = _expected(p, padded)
    for key, value in want.items():
        np.testing.assert_array_equal(results[0][key], value, err_msg=key)
        np.testing.assert_array_equal(results[1][key], value, err_msg=key)


def test_extension_counts_by_inclusion_exclusion_equal_direct_masks():
    p = _probe(4)
    nl = p["labels"].num_labels
    units, concepts = ref.reference_masks(
        p["acts"], p["thresholds"], p["pixel_labels"], p["image_labels"], nl
    )
    table = [[Formula((3,)), Formula((5, 7), (0,))] for _ in range(units.shape[-1])]
    counts = ref.reference_counts(units, concepts, table)
    first = formulas.FirstCounts(
        units.sum((0, 1)),
        np.einsum("nsk,nsl->kl", units.astype(np.int64), concepts.astype(np.int64)),
        concepts.sum((0, 1)),
    )
    inter, size = formulas.extension_counts(first, formulas.ExtensionCounts(**counts))
    for u in range(units.shape[-1]):
        for s, f in enumerate(table[u]):
            for op in range(3):
                for c in range(1, nl):
                    g = ref.formula_mask(f.extend(op, c), concepts)
                    assert inter[u, s, op, c] == (units[..., u] & g).sum()
                    assert size[u, s, op, c] == g.sum()


def test_formula_text_is_canonical():
    names = ["-", "water", "river", "blue"]
    f = Formula((1, 2, 3), (0, 2))
    assert f.text(names) == "(water OR river) AND NOT blue"
    assert Formula((1, 2), (1,)).text(names) == "water AND river"
    assert Formula((3,)).text(names) == "blue"
    with pytest.raises(ValueError, match="operators='xor'"):
        formulas.parse_ops(["or", "xor"])


def test_counts_without_pixel_planes_are_the_image_level_labels_only():
    """A probe set of image-level labels only (P = 0 planes): the tally's segment sums give
    no pixel-label sums, and the rows' totals come from the masks themselves."""
    p = dict(_probe(2))
    p["pixel_labels"] = p["pixel_labels"][:, :0]
    got, want = counts_of_random_formulas(p, np.random.default_rng(2), 4)
    assert want["and_total"].any() and want["and_label"].any()
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)

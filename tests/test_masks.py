"""Unit and concept masks against the slow reference, with ties and odd label numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import masks, tally
from jaxdissect.tie_rule import TIE_RULES
from tests import reference

# The tally as the engine runs it: one jitted program (eagerly, its scan over the batch,
# where the upsampling is, is compiled all the same, and every other operation apart).
_batch_counts = jax.jit(tally.batch_counts, static_argnums=4, static_argnames="tie_rule")


@jax.jit
def _both_rules_unit_total(acts, thresholds, batch):
    """Each tie rule's tally `unit_total` of one category's batch, in one program (one
    compile where two jitted calls compiled two)."""
    return {
        rule: tally.batch_counts(acts, thresholds, batch, jnp.array([-1, 0]), 1, tie_rule=rule)[
            "unit_total"
        ]
        for rule in TIE_RULES
    }


def _reference_concept(pixel: np.ndarray, image: np.ndarray, c: int, num_labels: int):
    if not 1 <= c < num_labels:
        return np.zeros(pixel.shape[1:], bool)
    if c in image.tolist():
        return np.ones(pixel.shape[1:], bool)
    return (pixel == c).any(axis=0)


@pytest.mark.parametrize("tie_rule", ["strict", "inclusive"])
def test_unit_masks_match_reference_with_real_ties(tie_rule):
    probe = reference.random_probe(1)  # dyadic: thresholds equal to attainable values
    acts, thresholds = probe["acts"], probe["thresholds"]
    size = probe["pixel_labels"].shape[2:]
    fn = jax.jit(masks.unit_masks, static_argnums=(2, 3))
    got = np.asarray(fn(acts, thresholds, size, tie_rule))
    ties = 0
    for x in range(acts.shape[0]):
        for k in range(acts.shape[-1]):
            up = reference.reference_upsample(acts[x, :, :, k], size)
            want = up > thresholds[k] if tie_rule == "strict" else up >= thresholds[k]
            np.testing.assert_array_equal(got[x, :, :, k], want)
            ties += int((up == thresholds[k]).sum())
            one = masks.unit_mask(jnp.asarray(acts[x, :, :, k]), thresholds[k], size, tie_rule)
            np.testing.assert_array_equal(np.asarray(one), got[x, :, :, k])
    assert ties > 0  # the rule was exercised
    # A dead unit at threshold 0 marks nothing (strict) or everything (inclusive).
    assert got[..., 0].all() if tie_rule == "inclusive" else not got[..., 0].any()
    with pytest.raises(ValueError, match=r"thresholds \(2,\): acts is \[B, h, w, K\]"):
        masks.unit_masks(acts, thresholds[:2], size, tie_rule)


@pytest.mark.optimized  # the upsampling's fused multiply-adds (tests/conftest.py)
@pytest.mark.parametrize(
    ("map_size", "size"), [((13, 13), (113, 113)), ((7, 7), (112, 112)), ((3, 5), (17, 11))]
)
def test_a_plateau_at_its_threshold_is_empty_strict_and_full_inclusive(map_size, size):
    """A ReLU6 cap (T = 6) and other constant values: upsampling keeps the plateau's value
    exactly, eager or jitted, so the strict mask is empty and the inclusive one is whole,
    and the tally counts the same (the weighted-sum formula rounds above the cap in places)."""
    values = np.float32([6.0, 0.1, 0.82, 7.56, 1 / 3])
    acts = np.broadcast_to(values, (2, *map_size, len(values))).copy()
    for fn in (masks.unit_masks, jax.jit(masks.unit_masks, static_argnums=(2, 3))):
        assert not np.asarray(fn(acts, values, size, "strict")).any()
        assert np.asarray(fn(acts, values, size, "inclusive")).all()
    batch = {
        "pixel_labels": np.ones((2, 1, *size), np.int32),
        "image_labels": np.zeros((2, 1), np.int32),
        "valid": np.ones(2, bool),
    }
    unit_total = _both_rules_unit_total(acts, values, batch)
    for tie_rule, want in (("strict", 0), ("inclusive", 2 * size[0] * size[1])):
        np.testing.assert_array_equal(unit_total[tie_rule], want, err_msg=tie_rule)


def test_concept_masks_match_reference():
    probe = reference.random_probe(2)
    pixel, image = probe["pixel_labels"], probe["image_labels"]
    num_labels = probe["labels"].num_labels
    # Every label used, 0, a negative number and numbers beyond the label space.
    concepts = np.unique(np.concatenate([pixel.ravel(), image.ravel(), [0, num_labels + 5]]))
    got = np.asarray(
        jax.jit(masks.concept_masks, static_argnums=3)(pixel, image, concepts, num_labels)
    )
    for x in range(pixel.shape[0]):
        for j, c in enumerate(concepts):
            want = _reference_concept(pixel[x], image[x], int(c), num_labels)
            np.testing.assert_array_equal(got[x, j], want, err_msg=f"image {x}, concept {c}")
    one = masks.concept_mask(pixel[4], image[4], int(image[4, 0]))
    assert np.asarray(one).all()  # an image-level label covers the whole image
    # Planes of a narrow type: a number it cannot hold is in none (257 is not label 1).
    narrow = np.where(pixel < 256, pixel, 0).astype(np.uint8)
    image = np.where(image == 513, 0, image)
    image[0, 0] = 513  # an image-level label past the planes' type: its image whole
    assert (narrow == 1).any() and not (image == 257).any()
    got = np.asarray(masks.concept_masks(narrow, image, np.array([1, 257, 513])))
    assert got[:, 0].any() and not got[:, 1].any()
    assert got[0, 2].all() and not got[1:, 2].any()


@pytest.mark.optimized  # the tally's upsampling as users' runs compile it (tests/conftest.py)
def test_masks_give_the_tallys_intersections():
    probe = reference.random_probe(3)
    acts, thresholds = probe["acts"], probe["thresholds"]
    pixel, image = probe["pixel_labels"], probe["image_labels"]
    labels = probe["labels"]
    size = pixel.shape[2:]
    counts = _batch_counts(
        acts,
        thresholds,
        {"pixel_labels": pixel, "image_labels": image},
        labels.primary,
        labels.num_categories,
    )
    concepts = np.arange(labels.num_labels)
    unit = np.asarray(jax.jit(masks.unit_masks, static_argnums=2)(acts, thresholds, size))
    concept = np.asarray(
        jax.jit(masks.concept_masks, static_argnums=3)(pixel, image, concepts, labels.num_labels)
    )
    inter = np.einsum("bhwk,bchw->kc", unit.astype(np.int64), concept.astype(np.int64))
    np.testing.assert_array_equal(inter, np.asarray(counts["intersection"]))


def test_shape_mistakes_name_the_argument():
    with pytest.raises(ValueError, match=r"^acts \(7, 7, 3\): must be \[B, h, w, K\] maps$"):
        masks.upsample(jnp.zeros((7, 7, 3)), (14, 14))
    with pytest.raises(ValueError, match=r"^size=14: must be the \(height, width\)"):
        masks.upsample(jnp.zeros((1, 7, 7, 3)), 14)
    with pytest.raises(ValueError, match=r"^act_map \(8, 8, 16\) and threshold \(\): one unit's"):
        masks.unit_mask(jnp.zeros((8, 8, 16)), 0.5, (16, 16))
    assert masks.unit_mask(jnp.zeros((8, 8)), 0.5, (16, 16)).shape == (16, 16)

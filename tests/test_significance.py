"""Permutation p-values of detectors against a numpy loop; calibration under independence
(uniform p-values, ~5% called at 0.05), planted detectors found; Benjamini-Hochberg."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from jaxdissect import significance


def _masks(rng, n, p, k, density):
    """Masks with a density per image and channel (heterogeneous, as real masks are)."""
    dens = rng.uniform(*density, (n, 1, k))
    return rng.random((n, p, k)) < dens


def _iou(inter, ua, ca):
    union = ua[:, None] + ca[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def _reference(u, c, draws, seed):
    """The tests as stated: count draws whose permuted pairing overlaps at least as much
    (per pair), and whose best IoU over concepts is at least the unit's observed best."""
    ua, ca = u.sum((0, 1)), c.sum((0, 1))
    observed = np.zeros((u.shape[2], c.shape[2]), np.int64)
    for i in range(len(u)):
        observed += u[i].astype(np.int64).T @ c[i].astype(np.int64)
    best = _iou(observed, ua, ca).max(1)
    ge = np.zeros_like(observed)
    ge_unit = np.zeros(u.shape[2], np.int64)
    for perm in significance.permutations(len(u), draws, seed):
        inter = np.zeros_like(observed)
        for i in range(len(u)):
            inter += u[i].astype(np.int64).T @ c[perm[i]].astype(np.int64)
        ge += inter >= observed
        ge_unit += _iou(inter, ua, ca).max(1) >= best
    return (1 + ge) / (1 + draws), (1 + ge_unit) / (1 + draws), observed


@pytest.mark.parametrize("exact_limit", [None, 2 * 12 + 1])  # one block; blocks of 2 images
def test_pvalues_match_numpy_loop(monkeypatch, exact_limit):
    if exact_limit is not None:
        monkeypatch.setattr(significance, "_EXACT_F32", exact_limit)
    rng = np.random.default_rng(0)
    u = _masks(rng, 7, 12, 5, (0.0, 0.6))
    c = _masks(rng, 7, 12, 4, (0.0, 0.5))
    u[:, :, 0] = False  # a unit that never fires: p = 1
    c[:, :, 1] = True  # a concept everywhere: every pairing overlaps the same, p = 1
    got = significance.permutation_test(u, c, draws=31, seed=3)
    want_p, want_unit, want_obs = _reference(u, c, 31, 3)
    np.testing.assert_array_equal(got.observed, want_obs)
    np.testing.assert_array_equal(got.pair_p, want_p)
    # float32 IoU in JAX, float64 here: equal best IoUs compare alike (same counts).
    np.testing.assert_array_equal(got.unit_p, want_unit)
    assert (got.pair_p[0] == 1).all() and (got.pair_p[:, 1] == 1).all() and got.unit_p[0] == 1


def test_independent_masks_give_uniform_pvalues_and_few_calls():
    rng = np.random.default_rng(1)
    u = _masks(rng, 80, 16, 25, (0.05, 0.6))
    c = _masks(rng, 80, 16, 12, (0.05, 0.6))
    got = significance.permutation_test(u, c, draws=199, seed=0)
    p = got.pair_p
    assert scipy.stats.kstest(p.ravel(), "uniform").pvalue > 0.01
    assert (p <= 0.05).mean() <= 0.08
    assert (got.unit_p <= 0.05).mean() <= 0.12  # 25 units: at most 3
    assert significance.benjamini_hochberg(got.unit_p, 0.05).sum() <= 1


def test_planted_detectors_are_found():
    rng = np.random.default_rng(2)
    u = _masks(rng, 60, 16, 10, (0.05, 0.5))
    c = _masks(rng, 60, 16, 6, (0.05, 0.5))
    # Unit 3 fires where concept 2 is (and a little noise); unit 7 on 60% of concept 4's pixels.
    u[:, :, 3] = c[:, :, 2] | (rng.random((60, 16)) < 0.05)
    u[:, :, 7] = c[:, :, 4] & (rng.random((60, 16)) < 0.6)
    got = significance.permutation_test(u, c, draws=199, seed=0)
    assert got.pair_p[3, 2] == got.pair_p[7, 4] == 1 / 200
    found = significance.benjamini_hochberg(got.unit_p, 0.05)  # 10 units: D >= 200 needed
    assert found[3] and found[7] and found.sum() <= 3


def test_benjamini_hochberg_matches_scipy_and_the_step_up_rule():
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = np.concatenate([rng.uniform(size=40), rng.uniform(0, 0.01, size=rng.integers(0, 8))])
        want = scipy.stats.false_discovery_control(p, method="bh") <= 0.1
        np.testing.assert_array_equal(significance.benjamini_hochberg(p, 0.1), want)
    # Step-up: 0.04 > 0.05 * 2/4 fails alone, but 0.05 <= 0.05 * 4/4 carries it.
    p = np.array([0.01, 0.04, 0.045, 0.05])
    assert significance.benjamini_hochberg(p, 0.05).all()
    assert not significance.benjamini_hochberg(np.array([0.2, 0.6]), 0.05).any()


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="alpha=1.5"):
        significance.benjamini_hochberg(np.array([0.1]), 1.5)
    with pytest.raises(ValueError, match="draws=0"):
        significance.permutations(5, 0, 0)
    with pytest.raises(ValueError, match="same images and pixels"):
        significance.permutation_test(np.zeros((3, 4, 2), bool), np.zeros((3, 5, 2), bool))

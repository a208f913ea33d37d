"""Top images per unit: against a sort, merge-order independence, padding."""

import pathlib

import jax.numpy as jnp
import numpy as np

from jaxdissect import topimages


def _reference(peaks: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """peaks [N, K]: per unit, the k largest (value desc, index asc)."""
    n, units = peaks.shape
    values = np.full((k, units), -np.inf, np.float32)
    indices = np.full((k, units), -1, np.int32)
    for u in range(units):
        order = sorted(range(n), key=lambda i: (-peaks[i, u], i))[:k]
        values[: len(order), u] = peaks[order, u]
        indices[: len(order), u] = order
    return values, indices


def test_update_and_merge_match_reference():
    rng = np.random.default_rng(0)
    n, units, k = 37, 5, 4
    acts = rng.integers(0, 6, size=(n, 3, 3, units)).astype(np.float32)  # many ties
    ref_v, ref_i = _reference(acts.max(axis=(1, 2)), k)

    def fold(rows):
        state = topimages.init(units, k)
        for start in range(0, len(rows), 8):
            idx = rows[start : start + 8]
            pad = 8 - len(idx)
            batch = np.concatenate([acts[idx], np.full((pad, 3, 3, units), 99, np.float32)])
            index = np.concatenate([idx, -np.ones(pad, int)]).astype(np.int32)
            valid = np.arange(8) < len(idx)
            state = topimages.update(
                state, jnp.asarray(batch), jnp.asarray(index), jnp.asarray(valid)
            )
        return state

    whole = fold(np.arange(n))
    np.testing.assert_array_equal(np.asarray(whole.values), ref_v)
    np.testing.assert_array_equal(np.asarray(whole.indices), ref_i)
    # Split over "devices" in another order, merged both ways: same result.
    parts = [fold(np.arange(n)[r::3]) for r in range(3)]
    for merged in (
        topimages.merge(topimages.merge(parts[0], parts[1]), parts[2]),
        topimages.merge(parts[2], topimages.merge(parts[1], parts[0])),
    ):
        np.testing.assert_array_equal(np.asarray(merged.indices), ref_i)
        np.testing.assert_array_equal(np.asarray(merged.values), ref_v)


def test_fewer_images_than_slots():
    state = topimages.init(2, 5)
    acts = jnp.asarray(np.arange(12, dtype=np.float32).reshape(3, 2, 1, 2))
    state = topimages.update(state, acts, jnp.arange(3, dtype=jnp.int32), jnp.ones(3, bool))
    np.testing.assert_array_equal(np.asarray(state.indices)[:, 0], [2, 1, 0, -1, -1])


def test_the_readme_gives_the_stats_files_top_image_layout():
    """stats-<layer>.npz's top images are [top_images, units], empty slots -1 / -inf, indexed
    by position in the selected probe set: the README says so where it lists the file."""
    state = topimages.update(
        topimages.init(3, 4),
        jnp.ones((2, 1, 1, 3), jnp.float32),
        jnp.array([0, 1], jnp.int32),
        jnp.ones(2, bool),
    )
    assert state.indices.shape == state.values.shape == (4, 3)  # [T, K]: rank-major
    np.testing.assert_array_equal(np.asarray(state.indices)[:, 0], [0, 1, -1, -1])
    assert np.isneginf(np.asarray(state.values)[2:]).all()
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    entry = readme.split("- `stats-<layer>.npz`:", 1)[1].split("\n- ", 1)[0]
    for fact in ("`top_indices`", "[T, K]", "index -1", "-inf", "`--split`", "`--max_images`"):
        assert fact in entry, fact

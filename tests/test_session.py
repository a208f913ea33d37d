"""The test session's compile modes (tests/conftest.py): unoptimised by default, every
optimisation for tests marked `optimized`, each test compiling in its own mode."""

import os

import jax
import numpy as np
import pytest

UNOPTIMIZED = os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "1") != "0"


_multiply_add_jitted = jax.jit(lambda a, b, c: a * b + c)  # one function for every test


def _multiply_add() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """a * b + c jitted, then as numpy computes it (two roundings) and fused (one)."""
    a, b, c = np.random.default_rng(0).standard_normal((3, 100_000), dtype=np.float32)
    fused = (a.astype(np.float64) * b + c).astype(np.float32)
    return np.asarray(_multiply_add_jitted(a, b, c)), a * b + c, fused


def test_an_unmarked_test_compiles_unoptimised_and_rounds_as_numpy():
    assert jax.config.read("jax_disable_most_optimizations") == UNOPTIMIZED
    assert os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == str(int(UNOPTIMIZED))
    if UNOPTIMIZED:  # no fused multiply-add: each product rounded before the sum
        jitted, numpy, _ = _multiply_add()
        np.testing.assert_array_equal(jitted, numpy)


@pytest.mark.optimized
def test_an_optimized_test_compiles_as_users_runs_do():
    assert not jax.config.read("jax_disable_most_optimizations")
    assert os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "0"
    # The same function and inputs as the unmarked tests': XLA:CPU's optimised code fuses
    # the multiply-add (x86-64 with FMA, aarch64), so a reused unoptimised program shows.
    jitted, numpy, fused = _multiply_add()
    assert np.array_equal(jitted, fused) and not np.array_equal(jitted, numpy)


def test_back_to_unoptimised_after_an_optimized_test():
    test_an_unmarked_test_compiles_unoptimised_and_rounds_as_numpy()

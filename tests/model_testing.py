"""Random variables of a Flax Linen model, without compiling its `init`."""

import jax
import numpy as np


def random_variables(model, x, seed: int = 0, scale: float = 0.1) -> dict:
    """Normal(0, scale) numpy arrays of the shapes `model.init` gives for input `x` (traced
    abstractly: no initialiser compiles or runs; every parameter random, the zero-initialised
    ones too)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * scale).astype(np.float32), shapes)

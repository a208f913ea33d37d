"""Helpers of the model tests: random Flax variables, TorchScript files."""

import jax
import numpy as np


def random_variables(model, x, seed: int = 0, scale: float = 0.1) -> dict:
    """Normal(0, scale) numpy arrays of the shapes `model.init` gives for input `x` (traced
    abstractly: no initialiser compiles or runs; every parameter random, the zero-initialised
    ones too)."""
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (rng.standard_normal(s.shape) * scale).astype(np.float32), shapes)


def torchscript_save(module, example, path, *, script: bool = False) -> None:
    """`torch.jit.save` of `module` traced on `example` (or scripted), as OpenAI's CLIP `.pt`
    files were made; torch's deprecation and tracer warnings silenced (these tests write such
    files, they do not use TorchScript)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        made = torch.jit.script(module) if script else torch.jit.trace(module, example)
        torch.jit.save(made, str(path))

"""Helpers of the model tests: random Flax variables, TorchScript files, parity with torch."""

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


def assert_close(actual, expected, what: str) -> None:
    """Agreement within 1e-4, relative and against the tensor's scale (its largest
    magnitude)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=what)


def torch_outputs(
    model, x, paths, *, nhwc: bool = False
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A torch model's output for the NHWC batch `x` and its modules' outputs at `paths`
    ({name: module path}), NCHW maps read back as NHWC (`nhwc`: maps NHWC already, as
    Swin's)."""
    import torch

    modules, got = dict(model.named_modules()), {}
    order = (0, 1, 2, 3) if nhwc else (0, 2, 3, 1)
    handles = [
        modules[path].register_forward_hook(
            lambda _m, _i, out, name=name: got.__setitem__(
                name, out.detach().numpy().transpose(order).copy()
            )
        )
        for name, path in paths.items()
    ]
    with torch.no_grad():
        out = model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    for handle in handles:
        handle.remove()
    return out, got


def assert_parity(model, variables, torch_model, x, paths, *, nhwc: bool = False):
    """`model`'s output and its layers at `paths` ({alias: torch module path}) agree with
    `torch_model`'s on the NHWC batch `x`, in float32 throughout (`assert_close`); returns
    the tap (its `shapes`; None where `paths` is empty: the output alone). `nhwc`: the torch
    model's maps are NHWC already."""
    import jax.numpy as jnp

    from jaxdissect import capture

    want_logits, want = torch_outputs(torch_model, x, paths, nhwc=nhwc)
    with jax.default_matmul_precision("highest"):
        logits = jax.jit(model.apply)(variables, jnp.asarray(x))
    assert_close(logits, want_logits, "logits")
    if not paths:
        return None
    tap = capture.make_tap(model, variables, list(paths), input_shape=x.shape[1:])
    with jax.default_matmul_precision("highest"):
        got = jax.jit(tap.fn)(tap.variables, jnp.asarray(x))
    for name, path in zip(tap.names, tap.layers, strict=True):
        assert_close(got[path], want[name], name)
    return tap

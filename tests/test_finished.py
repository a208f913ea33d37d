"""`finished`: a finished dissection read back reads its layers as the dissection did."""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdissect import capture, engine, finished, pipeline, store
from jaxdissect.data import Broden, synthetic
from jaxdissect.models.load import init_variables
from jaxdissect.preprocess import InputSpec

SIZE = 48


class RegisterAfter(nn.Module):
    """4x4 patch tokens, then one register token: 17 tokens, which inference takes for a
    class token before the patches (`1+4x4`)."""

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(6, (12, 12), strides=(12, 12), name="embed")(x)
        b, h, w, c = y.shape
        register = self.param("register", nn.initializers.normal(3.0), (1, 1, c))
        t = jnp.concatenate([y.reshape(b, h * w, c), jnp.tile(register, (b, 1, 1))], 1)
        t = nn.relu(nn.Dense(6, name="tokens")(t))
        return nn.Dense(3, name="head")(t.mean(1))


@pytest.fixture(scope="module")
def register_after_run(tmp_path_factory):
    """(model, its dissection with --token_layout=4x4+1, a batch of probe images)."""
    root = tmp_path_factory.mktemp("finished")
    source = Broden.open(synthetic.generate_tiny(root / "broden", num_images=8))
    module = RegisterAfter()
    variables = init_variables(module, jnp.zeros((1, SIZE, SIZE, 3)))
    spec = InputSpec(SIZE, (127.0,) * 3, (64.0,) * 3)
    info = pipeline.ModelInfo(
        module,
        variables,
        spec,
        "register after",
        store.fingerprint_tree(variables),
        token_layout="4x4+1",
    )
    out = root / "run"
    pipeline.dissect(
        info,
        ["tokens"],
        source,
        engine.Settings(batch_size=8),
        out,
        dataset_name="tiny",
        options=pipeline.Options(progress=False, num_threads=0, report=False),
    )
    model = types.SimpleNamespace(module=module, variables=variables, apply_kwargs={})
    images = np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE, 3), np.uint8)
    return model, out, spec, images


def test_a_layer_forward_reads_tokens_with_the_dissections_layout(register_after_run):
    """Registers after the patches (named 4x4+1): the follow-on maps are the dissection's,
    not the patches shifted by one token as the inferred 1+4x4 would read them."""
    model, out, spec, images = register_after_run
    layer = finished.read_layer(out, "tokens")
    assert layer.token_layout == "4x4+1"
    assert finished.recorded_token_layouts(out) == {"tokens": "4x4+1"}
    got = np.asarray(finished.layer_forward(model, layer)(images))

    def maps(layout):
        tap = capture.make_tap(
            model.module,
            model.variables,
            ["tokens"],
            input_shape=(SIZE, SIZE, 3),
            token_layout=layout,
        )
        out = jax.jit(tap.fn)(tap.variables, spec(jnp.asarray(images)))["tokens"]
        return np.asarray(out.astype(layer.activation_dtype), np.float32)  # as the tally

    np.testing.assert_array_equal(got, maps("4x4+1"))
    assert np.abs(got - maps("1+4x4")).max() > 1e-3  # the layouts do read other tokens

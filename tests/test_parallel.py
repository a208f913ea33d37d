"""The in-flight bound of the engine's batch loops."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxdissect import parallel


def test_in_flight_keeps_donated_state_usable_and_bounds_the_queue():
    step = jax.jit(lambda s, x: {"sum": s["sum"] + x.sum(), "n": s["n"] + 1}, donate_argnums=0)
    state = {"sum": jnp.zeros((), jnp.float32), "n": jnp.zeros((), jnp.int32)}
    in_flight = parallel.InFlight(depth=2)
    xs = np.random.default_rng(0).standard_normal((20, 64, 64)).astype(np.float32)
    for x in xs:
        state = step(state, x)  # donates the previous state: the bound must not touch it
        in_flight.add(state)
        assert len(in_flight._tokens) <= 2
    assert int(state["n"]) == 20
    np.testing.assert_allclose(float(state["sum"]), xs.sum(dtype=np.float64), rtol=1e-4)


def test_in_flight_ignores_outputs_without_arrays():
    in_flight = parallel.InFlight(depth=1)
    in_flight.add({"a": 1, "b": None})
    assert not in_flight._tokens

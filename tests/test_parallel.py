"""The in-flight bound of the engine's batch loops; the CPU split into devices."""

import os
import subprocess
import sys

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


def test_cpu_device_count_is_a_power_of_two_up_to_the_cores_and_8():
    got = {cores: parallel.cpu_device_count(cores) for cores in (1, 2, 3, 4, 6, 8, 12, 64)}
    assert got == {1: 1, 2: 2, 3: 2, 4: 4, 6: 4, 8: 8, 12: 8, 64: 8}


_SPLIT = """
import jax
from jaxdissect import parallel
first = parallel.split_cpu(cores=3)
print(first, jax.device_count(), parallel.split_cpu(cores=3))
"""


def _split_in_new_process(**env) -> list[str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "-1", **env}
    done = subprocess.run(
        [sys.executable, "-c", _SPLIT], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_split_cpu_sets_the_count_once_and_never_over_the_users():
    """A new process gets cpu_device_count(cores) devices; a second call, or a count the
    user set (XLA_FLAGS, JAX_NUM_CPU_DEVICES), is left alone."""
    assert _split_in_new_process(XLA_FLAGS="") == ["2", "2", "None"]
    forced = "--xla_force_host_platform_device_count=5"
    assert _split_in_new_process(XLA_FLAGS=forced) == ["None", "5", "None"]
    assert _split_in_new_process(XLA_FLAGS="", JAX_NUM_CPU_DEVICES="3") == ["None", "3", "None"]

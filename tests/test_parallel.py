"""The in-flight bound of the engine's batch loops; the CPU split into devices."""

import hashlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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


def _gather_of(*others: dict):
    """A fake all-gather: this process (0) and processes holding `others`' values."""
    return lambda rows: np.stack([rows] + [parallel.job_digests(o) for o in others])


def _names_then(*others: dict):
    """A fake all-gather answering the names' check first, then the values'."""
    calls = []

    def gather(rows):
        calls.append(rows)
        if len(calls) == 1:
            return np.stack([rows] + [parallel.job_digests({"names": list(o)}) for o in others])
        return _gather_of(*others)(rows)

    return gather


def test_processes_of_one_job_must_hold_equal_values():
    job = {"--tie_rule": "strict", "--max_images": None, "the probe set": "abc"}
    parallel.check_same_job(job, allgather=_names_then(dict(job), dict(job)))
    other = {**job, "--tie_rule": "inclusive"}
    third = {**job, "the probe set": "xyz", "--tie_rule": "inclusive"}
    with pytest.raises(ValueError) as e:
        parallel.check_same_job(job, allgather=_names_then(other, third))
    assert str(e.value) == (
        "the processes of this multi-host job differ in --tie_rule (process 1, 2 against "
        "process 0); the probe set (process 2 against process 0): give every process the "
        "same job"
    )
    with pytest.raises(ValueError, match="other versions of the script"):
        parallel.check_same_job(job, allgather=_names_then({"--tie_rule": "strict"}))
    assert parallel.job_disagreements(["a"], np.zeros((3, 1, 32), np.uint8)) == {}


def test_every_process_text_changes_with_any_processs_text(monkeypatch):
    assert parallel.every_process_text("mine") == "mine"  # one process: itself
    monkeypatch.setattr(jax, "process_count", lambda: 2)

    def keys(other: str) -> str:
        def gather(row):
            return np.stack([row, np.frombuffer(hashlib.sha256(other.encode()).digest(), np.uint8)])

        monkeypatch.setattr(parallel, "_allgather", gather)
        return parallel.every_process_text("mine")

    assert keys("copy") == keys("copy") != keys("copy, one image edited")
    assert keys("copy") not in ("mine", "copy")


def test_a_mesh_of_some_devices_is_refused_under_several_processes(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert parallel.data_mesh().devices.size == jax.device_count()
    assert parallel.data_mesh(jax.device_count()).devices.size == jax.device_count()
    with pytest.raises(ValueError, match=r"num_devices=2 with 2 processes: .* leave it out"):
        parallel.data_mesh(2)

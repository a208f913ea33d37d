"""Test session setup: 8 fake CPU devices, so multi-device code runs everywhere."""

import os

# Before JAX initialises its backend: tests of sharded code use meshes of 1 and 8 devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# pytest is the application here: it parses absl flags (as `absl.app.run` does for the
# scripts), which grain needs when it starts worker processes.
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

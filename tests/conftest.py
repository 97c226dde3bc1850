"""Test set-up: 8 fake CPU devices for every test process (set before jax is imported)."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(__file__))

from absl import flags  # noqa: E402

# absl-using libraries must not choke on pytest's own arguments (maxtext's conftest does the same).
if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1], known_only=True)

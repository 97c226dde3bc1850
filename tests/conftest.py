"""Test set-up: 8 fake CPU devices for every test process (set before jax is imported)."""

import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The test models are tiny, so XLA's compile time dominates the suite: compile without LLVM's
# expensive passes (jax_disable_most_optimizations; it roughly halves the compile-bound tests on
# this 2-core machine). Subprocesses (train CLI, multi-host, ablate) inherit it through the
# environment. JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs the suite fully optimised.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One persistent XLA cache per test run, in a fresh temporary directory: the test processes (the
# xdist workers and the CLIs the tests start, which inherit the environment) compile many identical
# programs (the same tiny train steps, samplers and evaluators), and the cache compiles each once.
# Fresh per run, so no run reads another's entries; a JAX_COMPILATION_CACHE_DIR set by the caller
# is used as it is. This conftest is loaded by the xdist controller before its workers start.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _xla_cache = tempfile.mkdtemp(prefix="tdjax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
sys.path.insert(0, os.path.dirname(__file__))

from absl import flags  # noqa: E402

# absl-using libraries must not choke on pytest's own arguments (maxtext's conftest does the same).
if not flags.FLAGS.is_parsed():
  flags.FLAGS(sys.argv[:1], known_only=True)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
  """A DetailFlow VQ tokenizer workdir (size=tiny, 2 steps), trained once per test process for
  the tests that only load one (reconstruct, the GPT converter, the next-detail tasks' checks).
  Trained without prefix degradation or self-correction (half the compile time; the checkpoint's
  shapes are the same). Tests must not write into it."""
  from tdjax import configlib, trainer
  workdir = str(tmp_path_factory.mktemp("tiny_tokenizer"))
  config = configlib.load_config("detailflow_tokenizer",
                                 "size=tiny,steps=2,batch=8,degrade_p=0,correction=False")
  trainer.train_and_evaluate(config, workdir)
  return workdir

"""`tdjax.host_memory`: an entry point (`tdjax.cli.run`) on a CPU run re-executes itself with glibc's
huge-page tunable, so a jitted program's large temporaries fault in 2 MiB at a time (issue 48)."""

import os
import subprocess
import sys

import pytest

from tdjax import host_memory

ROOT = os.path.dirname(os.path.dirname(__file__))

# An entry point as every `python -m tdjax.X` runs: `cli.run(main)`.  Its program's temporaries
# (two 85 MB arrays, and the matmul's work buffers) exceed what a glibc thread arena holds
# (64 MiB), so each call maps them afresh.
ENTRY = """
import os, resource, sys
import jax, jax.numpy as jnp
from tdjax import cli

def main(argv):
  f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T) @ x))
  x = jnp.ones((4608, 4608))
  f(x).block_until_ready()
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  f(x).block_until_ready()
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  print("pid", os.getpid(), "tunables", os.environ.get("GLIBC_TUNABLES", "-"), "faults", faults,
        "argv", " ".join(sys.argv[1:]))

print("started", os.getpid())
cli.run(main)
"""


def _environment(setting=None):
  """This process's environment on a CPU run, without the two settings, plus TDJAX_HOST_MALLOC."""
  env = {k: v for k, v in os.environ.items() if k not in ("TDJAX_HOST_MALLOC", "GLIBC_TUNABLES")}
  env.update(JAX_PLATFORMS="cpu", **({"TDJAX_HOST_MALLOC": setting} if setting else {}))
  return env


def _entry(setting=None):
  return subprocess.run([sys.executable, "-c", ENTRY, "--flagfile="], env=_environment(setting),
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


def _report(r):
  assert r.returncode == 0, r.stderr[-3000:]
  line = r.stdout.split("pid", 1)[1].split()
  starts = [w.split()[1] for w in r.stdout.splitlines() if w.startswith("started")]
  return {"pid": line[0], "tunables": line[2], "faults": int(line[4]), "argv": line[6:],
          "starts": len(starts), "one_pid": set(starts) == {line[0]}}


needs_huge_pages = pytest.mark.skipif(
    host_memory.transparent_huge_pages_mode() != "madvise"
    or (host_memory.glibc_version() or (0, 0)) < (2, 35),
    reason="the re-execution applies with glibc >= 2.35 and transparent huge pages in madvise mode")


@needs_huge_pages
def test_entry_point_faults_its_temporaries_in_huge_pages():
  default = _report(_entry())                       # a CPU run: re-executed with the tunable
  assert default["tunables"] == host_memory.TUNABLE
  assert default["starts"] == 2 and default["one_pid"] and default["argv"] == ["--flagfile="]
  system = _report(_entry("system"))
  assert system["tunables"] == "-" and system["starts"] == 1
  # 6.0 M faults on this project's 2-core machine without it, 0.16 M with (2026-12-07)
  assert default["faults"] * 10 < system["faults"], (default, system)


def _imports(*args, setting=None):
  """The modules `python -X importtime ARGS` imports (as each import ends), in order, over every
  process it execs."""
  r = subprocess.run([sys.executable, "-X", "importtime", *args], env=_environment(setting),
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stderr[-2000:]  # --helpshort: 1
  names = [line.rsplit("|", 1)[1] for line in r.stderr.splitlines() if line.startswith("import time:")]
  return [n.strip() for n in names], r.stdout


@needs_huge_pages
def test_python_dash_m_reexecutes_before_the_entry_points_imports():
  imports, _ = _imports("-m", "tdjax.sample", "--helpshort")
  # the first process gets as far as the package's __init__ and execs the second, before JAX
  hook = "tdjax.host_memory"
  assert imports.count(hook) == 2 and imports.count("tdjax") == 1 and imports.count("jax") == 1
  first = imports.index(hook)
  assert first < imports.index(hook, first + 1) < imports.index("jax"), imports
  imports, _ = _imports("-m", "tdjax.sample", "--helpshort", setting="system")
  assert imports.count(hook) == 1 and imports.count("jax") == 1, imports
  _, out = _imports("-m", "tdjax.host_memory")
  assert f"GLIBC_TUNABLES='{host_memory.TUNABLE}'" in out, out


def test_bad_setting_is_one_line():
  r = _entry("always")
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert "error: TDJAX_HOST_MALLOC='always': expected 'huge_pages'" in last, last


def test_when_it_applies(monkeypatch):
  monkeypatch.setattr(host_memory, "transparent_huge_pages_mode", lambda: "madvise")
  monkeypatch.setattr(host_memory, "glibc_version", lambda: (2, 36))
  env = host_memory.huge_pages_environment({"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "a.b=1"})
  assert env["GLIBC_TUNABLES"] == "a.b=1:" + host_memory.TUNABLE
  for environ in ({"JAX_PLATFORMS": "cpu", "TDJAX_HOST_MALLOC": "system"},
                  {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"},
                  {"JAX_PLATFORMS": "cuda"}, {"JAX_PLATFORMS": "tpu"}):
    assert host_memory.huge_pages_environment(environ) is None, environ
  assert host_memory.huge_pages_environment({"JAX_PLATFORMS": "cuda",
                                             "TDJAX_HOST_MALLOC": "huge_pages"}) is not None
  for mode, version in (("always", (2, 36)), ("never", (2, 36)), ("madvise", (2, 31))):
    monkeypatch.setattr(host_memory, "transparent_huge_pages_mode", lambda: mode)
    monkeypatch.setattr(host_memory, "glibc_version", lambda: version)
    assert host_memory.huge_pages_environment({"JAX_PLATFORMS": "cpu"}) is None, (mode, version)

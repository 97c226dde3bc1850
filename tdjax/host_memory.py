"""Host memory on CPU runs: back large host buffers with 2 MiB pages (glibc's `hugetlb` tunable).

XLA's CPU client allocates each call's temporary buffer (461 MB for the TransDiff bench decoder's
forward + backward) with `posix_memalign` from a worker thread.  glibc serves a request that big
from a fresh `mmap` (a worker thread's arena cannot hold it) and unmaps it when the call ends, so
every call faults the whole buffer in again, one 4 KiB page at a time: 116,000 minor faults and
~0.2 s of kernel time per call of that decoder, 15-20 % of its wall time on this project's 2-core
machine (docs/measurements.md, issue 48).  With `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` glibc asks
for transparent huge pages on those mappings (`madvise`): ~900 faults per call instead.

The tunable is read when the process starts, so `use_huge_pages` re-executes the process (same
PID, same arguments) with it set, before JAX starts: for `python -m tdjax.X` the package's
`__init__` calls it, other programs get it from `tdjax.cli.run`.  It does so only where it helps:
a CPU-only run (`JAX_PLATFORMS=cpu`, or no GPU / TPU plugin installed), glibc >= 2.35, the
kernel's transparent huge pages in `madvise` mode (in `always` mode the kernel already uses them;
in `never` nothing would), and the tunable not set yet.  `TDJAX_HOST_MALLOC=system` turns it
off.  From the package's `__init__` (before the entry point's own imports) a re-execution costs
~0.1 s, not the 1.5-2 s of importing JAX twice.  `python -m tdjax.host_memory` prints what
applies on this machine.

(Tried and not taken: glibc's `mallopt` from inside the process (one arena, no mmap, no trim) keeps
the freed buffer for the next call, no faults at all, with the same step time, but one malloc
arena for all threads made XLA's compiles 25-40 % slower.)  This module imports no JAX.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")


def runs_on_cpu_only(environ=None) -> bool:
  """JAX_PLATFORMS names only 'cpu', or no GPU / TPU plugin is installed."""
  platforms = (os.environ if environ is None else environ).get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms == "cpu"
  return not any(importlib.util.find_spec(p) for p in _ACCELERATOR_PLUGINS)


def glibc_version() -> tuple[int, int] | None:
  name = ctypes.util.find_library("c")
  try:
    fn = ctypes.CDLL(name).gnu_get_libc_version
  except (OSError, AttributeError, TypeError):
    return None                                   # not glibc (musl, macOS)
  fn.restype = ctypes.c_char_p
  major, minor = fn().decode().split(".")[:2]
  return int(major), int(minor)


def transparent_huge_pages_mode() -> str:
  """'always', 'madvise' or 'never' (the bracketed word in THP_MODE); '' where unknown."""
  try:
    with open(THP_MODE) as f:
      text = f.read()
  except OSError:
    return ""
  return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else ""


def huge_pages_environment(environ=None) -> dict | None:
  """The environment to re-execute with, or None where nothing would change (see the module
  docstring for the conditions).  Raises ValueError for a bad TDJAX_HOST_MALLOC."""
  environ = os.environ if environ is None else environ
  choice = environ.get("TDJAX_HOST_MALLOC", "").strip().lower()
  if choice not in ("", "huge_pages", "system"):
    raise ValueError(f"TDJAX_HOST_MALLOC={choice!r}: expected 'huge_pages' (the default on CPU "
                     f"runs) or 'system'")
  tunables = environ.get("GLIBC_TUNABLES", "")
  if choice == "system" or "glibc.malloc.hugetlb=" in tunables:
    return None
  if transparent_huge_pages_mode() != "madvise" or (glibc_version() or (0, 0)) < (2, 35):
    return None                   # the cheap checks first: this runs at every entry point's start
  if choice == "" and not runs_on_cpu_only(environ):
    return None
  return {**environ, "GLIBC_TUNABLES": ":".join(t for t in (tunables, TUNABLE) if t)}


def use_huge_pages() -> None:
  """Re-executes this process with the tunable set, where `huge_pages_environment` says so;
  returns otherwise (always, after the re-execution)."""
  env = huge_pages_environment()
  if env is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)


if __name__ == "__main__":         # what an entry point gets here (tdjax/__init__.py skips this one)
  use_huge_pages()
  print(f"pid {os.getpid()}: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
        f"glibc {'.'.join(map(str, glibc_version() or ())) or 'absent'}, transparent huge pages "
        f"{transparent_huge_pages_mode() or 'unknown'}, CPU-only run {runs_on_cpu_only()}, "
        f"TDJAX_HOST_MALLOC={os.environ.get('TDJAX_HOST_MALLOC', '')!r}")

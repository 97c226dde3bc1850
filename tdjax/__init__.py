"""tdjax: autoregressive transformers marry diffusion, in JAX/Flax, for TPU pods and GPU clusters."""

__version__ = "0.1.0"

import sys as _sys

# `python -m tdjax.X` on a CPU run: re-execute now, before the entry point's imports, with glibc's
# huge-page tunable (`tdjax.host_memory`; while `-m` locates its module, sys.argv[0] is "-m").
_argv = getattr(_sys, "orig_argv", [])
_module = _argv[_argv.index("-m") + 1] if "-m" in _argv[:-1] else ""
if _sys.argv[:1] == ["-m"] and _module.startswith("tdjax.") and _module != "tdjax.host_memory":
  from tdjax import host_memory as _host_memory
  try:
    _host_memory.use_huge_pages()
  except ValueError:                # a bad TDJAX_HOST_MALLOC: `tdjax.cli.run` reports it
    pass

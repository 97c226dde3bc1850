"""What the `python -m tdjax.X` entry points share: bad input ends in one line, not a traceback.

  $ python -m tdjax.sample --workdir /tmp/empty --out s.png
  python -m tdjax.sample: error: no checkpoint in /tmp/empty/checkpoints

`run(main)` is absl's `app.run(main)` with three differences:
  * an error that reports bad input (a ValueError, a missing or existing file, a CheckpointError)
    prints `python -m MODULE: error: MESSAGE` on stderr and exits 2; `--verbosity=1` logs its
    traceback first (absl DEBUG), for the case where it is a bug rather than bad input;
  * an error with an `exit_code` (a training stopped by a non-finite loss: 3) prints the same
    one line and exits with that status;
  * an override of a key the locked config lacks (`--config.input.not_a_key=3`) names the
    override and the key, where ml_collections raises a bare AttributeError;
  * a flag error is one line too: an error of `get_config` (an unknown config arg) keeps its last
    line, not the traceback that ml_collections puts inside the message.
Orbax's INFO chatter (dozens of lines per checkpoint read) is dropped from the log.
On CPU runs it first re-executes the program with glibc's huge-page tunable set
(`tdjax.host_memory`: without it every train step faults its temporaries in again, 4 KiB at a time).
A process of a multi-process job that fails leaves at once (`os._exit`, after its message):
exiting normally would wait in JAX's shutdown barrier for processes that are still running, so
the launcher (srun --kill-on-bad-exit, a pod's ssh) would not learn of the failure for minutes.
This module imports no JAX: `tdjax.aot` must set the fake device count before JAX starts.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

EXIT_BAD_INPUT = 2
_BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
              IsADirectoryError)


def _program() -> str:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  if spec is None:
    return os.path.basename(sys.argv[0])
  # `python -m tdjax.convert` runs the package's `tdjax.convert.__main__`: name the package
  return f"python -m {spec.name.removesuffix('.__main__')}"


def _fail(message: str) -> None:
  print(f"{_program()}: error: {message}", file=sys.stderr, flush=True)
  _exit(EXIT_BAD_INPUT)


def _in_distributed_job() -> bool:
  jax = sys.modules.get("jax")
  return bool(jax is not None and jax.distributed.is_initialized())


def _exit(status: int) -> None:
  if _in_distributed_job():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
  sys.exit(status)


def is_bad_input(err: BaseException) -> bool:
  """Errors that tdjax raises for bad input (`tdjax.checkpoint.CheckpointError` where loaded)."""
  ckpt = sys.modules.get("tdjax.checkpoint")
  kinds = _BAD_INPUT + ((ckpt.CheckpointError,) if ckpt else ())
  return isinstance(err, kinds)


def unknown_override_message(argv: list[str], err: BaseException) -> str:
  """`--config.a.b=v: the config has no key 'b'`, from ml_collections' AttributeError/KeyError."""
  key = str(err.args[0] if err.args else err).strip("\"'")
  overrides = [a for a in argv[1:] if a.startswith("--config.")]
  named = [a for a in overrides if key in a.split("=", 1)[0][len("--config."):].split(".")]
  where = named[0] if named else " ".join(overrides) or "--config"
  return (f"{where}: the config has no key {key!r} (the config is locked: an override can only "
          f"change a key that get_config makes)")


def _lines(err: BaseException) -> list[str]:
  return [line.strip() for line in str(err).splitlines() if line.strip()]


def flag_error_message(err: BaseException) -> str:
  """One line of an absl flag error.  ml_collections puts the traceback of an error raised by
  get_config (an unknown config arg, a missing file) inside the message: keep the flag and the
  error's own last line."""
  lines = _lines(err)
  if len(lines) <= 1:
    return lines[0] if lines else type(err).__name__
  return f"{lines[0].split(': ')[0]}: {lines[-1]}"


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    argv = flags.FLAGS(argv)
    if "config" in flags.FLAGS:
      flags.FLAGS.config.keys()   # ml_collections defers a config file's load error to its use
    return argv
  except OSError as err:    # that deferred error: a missing or unreadable config file
    _fail(f"flag --config: {(_lines(err) or [type(err).__name__])[-1]}")
  except flags.Error as err:
    _fail(f"{flag_error_message(err)} (--helpshort lists the flags)")
  except (AttributeError, KeyError) as err:   # ml_collections: an override of a missing key
    if not any(a.startswith("--config.") for a in argv[1:]):
      raise
    _fail(unknown_override_message(argv, err))
  raise AssertionError("not reached")


def define_multihost_flag(what_each_process_does: str) -> None:
  """`--multihost`, the switch of an entry point that can run on several processes."""
  flags.DEFINE_bool("multihost", False, "Join a multi-process job before any other JAX call "
                    f"(launch/slurm.sh, launch/tpu_pod.sh add it): {what_each_process_does}.")


def run(main) -> None:
  """absl `app.run(main)`, reporting bad input in one line (see the module docstring)."""

  def guarded(argv):
    from tdjax import metrics
    metrics.quiet_library_logs()
    try:
      return main(argv)
    except Exception as err:                   # noqa: BLE001 - re-raised unless bad input
      if getattr(err, "exit_code", None):      # a run stopped for a reason of its own (NaN: 3)
        print(f"{_program()}: error: {str(err).splitlines()[0]}", file=sys.stderr, flush=True)
        _exit(int(err.exit_code))
      if not is_bad_input(err):
        if _in_distributed_job():              # the traceback, then out without the barrier
          import traceback
          traceback.print_exc()
          _exit(1)
        raise
      logging.debug("the error below, with its traceback", exc_info=True)
      lines = str(err).splitlines() or [type(err).__name__]
      _fail(lines[0] + (" (the rest with --verbosity=1)" if len(lines) > 1 else ""))

  from tdjax import host_memory             # before JAX starts its threads
  if main.__module__ == "__main__" and "ipykernel" not in sys.modules:   # a program, not a notebook
    try:
      host_memory.use_huge_pages()
    except ValueError as err:                 # a bad TDJAX_HOST_MALLOC
      _fail(str(err))
  app.run(guarded, flags_parser=_parse_flags)

"""Checkpoints: the only module that touches Orbax.

One `CheckpointManager` per run under `<workdir>/checkpoints`, with three items per step:
  state   the train state (params, optimizer state, EMA, model state, step) as plain arrays
  config  the resolved config as JSON (sampling rebuilds the model from it, no flags needed)
  data    the input iterator state (JSON, identical on every process) so resume continues the
          same data order

Saves are asynchronous (the loop keeps training while the arrays are written) and atomic (Orbax
writes into a temporary directory and renames it when complete), so a job killed mid-save leaves
the previous checkpoint as the latest.  Restores always go against explicit target shardings, so a
checkpoint written on 8 devices restores onto 4 or 1.  A latest checkpoint that cannot be read
falls back to the previous one with a warning, and the resumed run replaces the unreadable step
when it reaches it again (training is deterministic, so the new one is what the old one held); a
workdir whose checkpoints are all unreadable is an error, never a silent restart from scratch.
With several processes, whether a step is readable is one decision for all of them (a read error
on one host sends every host to the previous step), so the hosts never resume at different steps.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from tdjax import configlib, parallel

CKPT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  pass


def is_remote(path: str) -> bool:
  """A URL such as gs://bucket/run (Orbax and tensorstore write it natively; tdjax's own files
  go through etils.epath, which needs gcsfs for gs://: `pip install -e .[gcs]`)."""
  return "://" in str(path)


def resolve_workdir(workdir: str) -> str:
  """An absolute local path, or a URL as given (os.path.abspath would turn gs://b/run into the
  local folder ./gs:/b/run)."""
  return str(workdir).rstrip("/") if is_remote(workdir) else os.path.abspath(workdir)


def checkpoint_dir(workdir: str) -> str:
  return f"{resolve_workdir(workdir)}/{CKPT_DIR}"


class Checkpointer:
  """Async, keep-N Orbax checkpoints of (state, config, data) with fallback on restore."""

  def __init__(self, workdir: str, *, keep: int = 3, use_async: bool = True,
               read_only: bool = False):
    self.workdir, self.directory = resolve_workdir(workdir), checkpoint_dir(workdir)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(keep) if keep else None,
        enable_async_checkpointing=use_async,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "config", "data"),
                                         options=options)
    self._unreadable: set[int] = set()   # steps restore() skipped: save() may replace them

  # -- queries ---------------------------------------------------------------------------------
  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  # -- save ------------------------------------------------------------------------------------
  def save(self, step: int, state: Any, config: dict, data_state: dict) -> bool:
    """Starts an async save of `step`; returns False if that step is already saved (and was
    readable: a step that restore() found unreadable is deleted and written anew)."""
    if step in self.manager.all_steps():
      if step not in self._unreadable:
        return False
      logging.warning("checkpoint: replacing the unreadable step %d in %s", step, self.directory)
      self.manager.delete(step)
      self._unreadable.discard(step)
    saved = self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config),
            data=ocp.args.JsonSave(data_state)),
        force=True)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:   # closed on errors too: no Orbax thread outlives its use
    self.close()

  # -- restore ---------------------------------------------------------------------------------
  def restore(self, abstract_state: Any, step: int | None = None):
    """Restores (step, state, data_state) onto the shardings in `abstract_state`.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`.  Without
    `step`, tries the newest checkpoint first and falls back to older ones if it is unreadable.
    Returns None only when the directory holds no checkpoint at all.
    """
    candidates = [step] if step is not None else list(reversed(self.steps()))
    if not candidates:
      return None
    errors = []
    wanted = _shapes_by_path(abstract_state)
    for s in candidates:
      restored, problem = None, self._missing_files(s) or self._shape_misfit(s, wanted)
      if problem is None:      # a misfit is known before reading: spare Orbax's failing reads
        try:
          restored = self._read(s, abstract_state)
        except Exception as e:  # noqa: BLE001 - any failure to read means: try the previous one
          problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      # one decision for every process: a step is used only where every host could read it
      if not parallel.all_processes(problem is None):
        problem = problem or "unreadable on another process"
        errors.append((s, problem))
        self._unreadable.add(s)
        logging.warning("checkpoint: step %d in %s is not usable (%s); trying the previous one",
                        s, self.directory, problem[:300])
        continue
      if errors:
        logging.warning("checkpoint: restored step %d after skipping unreadable step(s) %s",
                        s, [e[0] for e in errors])
      return s, restored[0], restored[1]
    detail = "; ".join(f"step {s}: {m[:200]}" for s, m in errors)
    raise CheckpointError(
        f"no readable checkpoint in {self.directory} (tried steps {candidates}): {detail}. "
        "Refusing to start from scratch over existing checkpoints; move them away to do so.")

  def _read(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """(state, data_state) of `step`, read by the item handlers directly: the manager's restore
    ends in a barrier, which a host whose read failed would never reach (the others would wait
    there while it waits in the agreement on the outcome)."""
    root = self.manager.directory / str(step)
    handler = ocp.StandardCheckpointHandler()
    try:
      state = handler.restore(root / "state", args=ocp.args.StandardRestore(abstract_state))
    finally:
      handler.close()
    return state, dict(_read_json(root / "data") or {})

  def _missing_files(self, step: int) -> str | None:
    """'missing FILE' when a file that a restore needs is gone (known before reading: a read
    would fail inside Orbax's async machinery and print pages of 'Event loop is closed').  Not
    needed, so not checked: `state/_sharding` (tdjax restores onto explicit shardings) and the
    per-process `state/ocdbt.process_N/manifest.ocdbt` (merged into the top-level manifest when
    the save finalised); deleting them was checked to change nothing."""
    root = self.manager.directory / str(step)
    needed = ["state/_METADATA", "config/metadata", "data/metadata"]
    if (root / "state" / "ocdbt.process_0").exists():
      needed.append("state/manifest.ocdbt")
    for rel in needed:
      if not (root / rel).exists():
        return f"missing {root / rel}"
    return None

  def _shape_misfit(self, step: int, wanted: dict) -> str | None:
    """'K arrays of other shapes, e.g. PATH: stored S, this state T' when arrays at the same
    path differ in shape from the stored ones (`wanted`: `_shapes_by_path` of the target state;
    a changed model); None when they agree or the stored metadata cannot tell (a differing tree
    is left to Orbax's restore to report)."""
    try:
      meta = ocp.StandardCheckpointHandler().metadata(self.manager.directory / str(step) / "state")
      stored = _shapes_by_path(getattr(meta, "tree", meta))
    except Exception:  # noqa: BLE001 - no readable metadata: the restore itself will say
      return None
    bad = sorted(k for k in wanted.keys() & stored.keys() if wanted[k] != stored[k])
    if not bad:
      return None
    k = bad[0]
    return (f"{len(bad)} arrays of other shapes, e.g. {k}: stored {stored[k]}, this state "
            f"{wanted[k]}")

  def restore_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    return configlib.upgrade_config(dict(_read_json(self.manager.directory / str(step) / "config")))


def read_params(workdir: str, step: int | None = None,
                use_ema: bool = True) -> tuple[dict, Any, int]:
  """(config dict, parameters as host numpy arrays, step) of a run's checkpoint `step` (default:
  the latest): its EMA weights when it has them and `use_ema`, else the trained ones.  Reads only
  those arrays, onto no mesh: what inference and the tasks that build on another run (the AR
  model's tokenizer, MRAR's 1-step start) need.  One-line errors for a workdir without
  checkpoints and a step that is not there."""
  with Checkpointer(workdir, read_only=True) as ck:
    steps = ck.steps()
    if not steps:
      raise CheckpointError(f"no checkpoint in {ck.directory}")
    step = steps[-1] if step is None else int(step)
    if step not in steps:
      raise CheckpointError(f"no checkpoint of step {step} in {ck.directory} (steps: {steps})")
    config = ck.restore_config(step)
    root = ck.manager.directory / str(step) / "state"
    meta = ocp.StandardCheckpointHandler().metadata(root)
    tree = getattr(meta, "tree", meta)
    key = "ema" if use_ema and "ema" in tree else "params"
    wanted = {key: tree[key]}
    handler = ocp.PyTreeCheckpointHandler()
    try:
      out = handler.restore(root, args=ocp.args.PyTreeRestore(
          item=jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), wanted),
          restore_args=jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), wanted),
          partial_restore=True))
    finally:
      handler.close()
  return config, out[key], step


class WorkdirLock:
  """`WORKDIR/tdjax.lock`: one training at a time in a workdir (two would collide in Orbax's
  temporary folders, interleave metrics.jsonl and could leave checkpoints of two models side by
  side).  The lock file holds the owner's host, pid and a heartbeat the loop refreshes at log
  points; a lock whose owner is a dead process on this host, or whose heartbeat is older than
  `stale_secs` (a job killed on another host), is taken over with a warning line.  Created with
  O_EXCL, which local filesystems and NFS honour; on a gs:// workdir there is no lock (GCS has no
  exclusive create through etils): one training per bucket path is the user's to keep."""

  NAME = "tdjax.lock"

  def __init__(self, workdir: str, stale_secs: float = 900):
    self.path = None if is_remote(workdir) else os.path.join(resolve_workdir(workdir), self.NAME)
    self.stale_secs = float(stale_secs)
    self.owned = False

  def _record(self, started: float) -> bytes:
    return json.dumps(dict(host=socket.gethostname(), pid=os.getpid(), started=started,
                           heartbeat=time.time())).encode()

  def acquire(self) -> None:
    if self.path is None:
      return
    self.started = time.time()
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      self._take_over_or_refuse()
    else:
      with os.fdopen(fd, "wb") as f:
        f.write(self._record(self.started))
    self.owned = True

  def _take_over_or_refuse(self) -> None:
    try:
      with open(self.path) as f:
        other = json.load(f)
      host, pid, beat = other["host"], int(other["pid"]), float(other["heartbeat"])
    except (OSError, ValueError, KeyError, TypeError):
      host, pid, beat = "?", -1, 0.0           # unreadable: a half-written lock, stale
    age = time.time() - beat
    if host == socket.gethostname() and pid > 0 and _alive(pid) and pid != os.getpid():
      stale = None
    elif host == socket.gethostname() and pid != os.getpid():
      stale = f"its process {pid} on this host is gone"
    elif age > self.stale_secs:
      stale = f"not refreshed for {age:.0f} s (config.lock_stale_secs={self.stale_secs:g})"
    else:
      stale = None
    if stale is None:
      raise FileExistsError(
          f"{os.path.dirname(self.path)} is in use by the training of pid {pid} on host {host} "
          f"(heartbeat {age:.0f} s ago): two trainings in one workdir would corrupt it; use "
          f"another --workdir, or delete {self.path} if that run is gone")
    logging.warning("workdir lock %s: taking it over, %s", self.path, stale)
    self._write()

  def _write(self) -> None:
    tmp = f"{self.path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      f.write(self._record(self.started))
    os.replace(tmp, self.path)

  def refresh(self) -> None:
    if self.owned:
      self._write()

  def release(self) -> None:
    if self.owned:
      self.owned = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read_json(path) -> Any:
  handler = ocp.JsonCheckpointHandler()
  try:
    return handler.restore(path, args=ocp.args.JsonRestore())
  finally:
    handler.close()


def _shapes_by_path(tree) -> dict:
  """'a.b.0.c' -> shape of each array leaf (dict keys, sequence indices and attribute names
  alike, so a namedtuple and its stored dict give the same path)."""
  def name(entry):
    for attr in ("key", "idx", "name"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  return {".".join(name(e) for e in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


def abstract_like(tree, shardings):
  """ShapeDtypeStructs carrying the target shardings (restore onto any mesh)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def write_config_json(workdir: str, config_dict: dict) -> str:
  """The resolved config as `<workdir>/config.json` (human-readable copy; the checkpoint has one
  too), written under a temporary name and renamed; local or a URL."""
  from etils import epath
  root = epath.Path(resolve_workdir(workdir))
  root.mkdir(parents=True, exist_ok=True)
  path, tmp = root / "config.json", root / "config.json.tmp"
  tmp.write_text(json.dumps(config_dict, indent=2, sort_keys=True))
  tmp.replace(path)
  return str(path)

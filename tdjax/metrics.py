"""Metrics: a JSONL log of every logged step, TensorBoard scalars and images, progress lines.

Only process 0 writes files; every process logs to absl.  The JSONL file (`metrics.jsonl` in the
workdir, one object per line with `step` and the metric values) is the source the ablation runner
and the tests read.

A workdir that is a URL (gs://bucket/run) cannot be appended to, so the writer keeps its files in a
local mirror (`mirror_dir`, default under the temporary folder), starts it from the workdir's
`metrics.jsonl` when resuming, and copies the mirror's files to the workdir on every `flush()`
(the trainer flushes after each checkpoint save) and at `close()`.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from typing import Mapping

import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image


class MetricWriter:
  """Writes scalars to JSONL + TensorBoard, images to TensorBoard and PNG files."""

  def __init__(self, workdir: str, *, tensorboard: bool = True, mirror_dir: str | None = None):
    """mirror_dir: the local folder behind a URL workdir (given: mirror even a local workdir)."""
    self.remote = workdir if ("://" in str(workdir) or mirror_dir) else None
    self.workdir = (mirror_dir or default_mirror_dir(workdir)) if self.remote else workdir
    self.active = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._sent = {}
    if self.active:
      workdir = self.workdir
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if self.remote:
        _download_if_exists(f"{self.remote}/metrics.jsonl", path)
      _cut_unfinished_record(path)
      # Unbuffered bytes: each record reaches the file in one write call, never in pieces.
      self._jsonl = open(path, "ab", buffering=0)
      if tensorboard:
        try:
          from tensorboardX import SummaryWriter
          self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except ImportError:  # tensorboardX is an install requirement; keep going without TB
          logging.warning("tensorboardX missing: TensorBoard summaries are off")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    if not self.active:
      return
    record = (json.dumps({"step": int(step), **scalars}) + "\n").encode()
    while record:
      record = record[self._jsonl.write(record):]
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> dict:
    """images: name -> [N, H, W, C] in [-1, 1].  Writes a PNG grid per name; returns the paths."""
    paths = {}
    if not self.active:
      return paths
    outdir = os.path.join(self.workdir, "pictures")
    os.makedirs(outdir, exist_ok=True)
    for name, batch in images.items():
      grid = image_grid(np.asarray(batch))
      path = os.path.join(outdir, f"{name}_{int(step):07d}.png")
      save_png(grid, path)
      paths[name] = path
      if self._tb is not None:
        self._tb.add_image(name, grid, step, dataformats="HWC")
    return paths

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    if self.active and self.remote:
      _upload_tree(self.workdir, self.remote, self._sent)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self.active and self.remote:
      _upload_tree(self.workdir, self.remote, self._sent)


def default_mirror_dir(url: str) -> str:
  """<temporary folder>/tdjax_mirror/<the URL with its scheme and separators as '_'>."""
  return os.path.join(tempfile.gettempdir(), "tdjax_mirror", re.sub(r"[^A-Za-z0-9.-]+", "_", url))


def _download_if_exists(url: str, path: str) -> None:
  src = epath.Path(url)
  if src.exists():
    with open(path, "wb") as f:
      f.write(src.read_bytes())


def _upload_tree(local: str, url: str, sent: dict) -> None:
  """Copies each file under `local` that changed since it was last sent (`sent`: path -> (size,
  mtime)) to the same relative path under `url`, written under a temporary name and renamed, so
  a reader never sees half a file."""
  for root, _, files in os.walk(local):
    rel = os.path.relpath(root, local)
    dest = epath.Path(url) if rel == "." else epath.Path(url) / rel
    for name in files:
      src = os.path.join(root, name)
      st = os.stat(src)
      if sent.get(src) == (st.st_size, st.st_mtime_ns):
        continue
      sent[src] = (st.st_size, st.st_mtime_ns)
      dest.mkdir(parents=True, exist_ok=True)
      with open(src, "rb") as f:
        data = f.read()
      tmp = dest / (name + ".tmp")
      tmp.write_bytes(data)
      tmp.replace(dest / name)


def to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 with the ADM convention clip(127.5 x + 128)
  (docs/reference/detailflow.md 5.2, pitfall 14)."""
  return np.clip(np.asarray(x, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)


def image_grid(batch: np.ndarray, ncol: int | None = None, pad: int = 1) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] (or [R, N, H, W, C] for rows) -> one uint8 [H', W', C] picture."""
  batch = np.asarray(batch)
  if batch.ndim == 5:
    nrow, ncol = batch.shape[:2]
    batch = batch.reshape((-1,) + batch.shape[2:])
  n, h, w, c = batch.shape
  ncol = ncol or min(n, int(math.ceil(math.sqrt(n))))
  nrow = int(math.ceil(n / ncol))
  out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
  u8 = to_uint8(batch)
  for i in range(n):
    r, col = divmod(i, ncol)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = u8[i]
  return out


def save_png(image: np.ndarray, path: str) -> None:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image).save(path)


class Progress:
  """Steps/s, examples/s, ETA, and the step time split into data wait and device time, between
  two reports (time spent in `pause()`, evaluations and saves, is left out).

  Data wait is the time the loop spent getting the next batch (`data()`); the rest of a step's
  wall time is the device's (and the dispatch's): with the loop one step ahead of the device, a
  step's data wait overlaps the previous step's device work, so a pipeline that keeps up shows
  data wait near 0."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int = 0):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self._step = start_step
    self._time = time.perf_counter()
    self._paused = 0.0
    self._data = 0.0

  def pause(self):
    return _Pause(self, "_paused")

  def data(self):
    return _Pause(self, "_data")

  def report(self, step: int) -> dict:
    now = time.perf_counter()
    dt = max(now - self._time - self._paused, 1e-9)
    steps = max(step - self._step, 1)
    sps = (step - self._step) / dt
    data = self._data / steps
    self._step, self._time, self._paused, self._data = step, now, 0.0, 0.0
    eta = (self.total_steps - step) / sps if sps > 0 else float("inf")
    return {"steps_per_sec": sps, "examples_per_sec": sps * self.batch_size, "eta_sec": eta,
            "step_sec": dt / steps, "data_wait_sec": data, "device_sec": max(dt / steps - data, 0.0)}


class _Pause:
  def __init__(self, progress: Progress, field: str):
    self.progress, self.field = progress, field

  def __enter__(self):
    self.t0 = time.perf_counter()

  def __exit__(self, *exc):
    setattr(self.progress, self.field,
            getattr(self.progress, self.field) + time.perf_counter() - self.t0)


# Peak dense bf16 FLOP/s per chip by device kind (vendor figures), for the MFU in the log; a
# kind missing here gets no MFU unless config.peak_flops names one (e.g. a CPU's measured matmul
# rate from `python -m tdjax.bench`).
PEAK_FLOPS = (
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("TPU7x", 2307e12),
    ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("GH200", 989e12), ("A100", 312e12),
    ("B200", 2250e12), ("L4", 121e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Peak FLOP/s of one device of `device_kind` (the first entry of PEAK_FLOPS it contains)."""
  for name, peak in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return None


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}"


def parameter_table(params, max_rows: int = 40) -> str:
  """A table of parameter names, shapes and counts, with the total, for the start-of-run log."""
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    rows.append((name, tuple(leaf.shape), int(np.prod(leaf.shape))))
  total = sum(r[2] for r in rows)
  width = max([len(r[0]) for r in rows] + [4])
  lines = [f"{'name':<{width}}  {'shape':<22} {'count':>12}"]
  shown = rows if len(rows) <= max_rows else rows[:max_rows]
  for name, shape, count in shown:
    lines.append(f"{name:<{width}}  {str(shape):<22} {count:>12,}")
  if len(rows) > max_rows:
    lines.append(f"... {len(rows) - max_rows} more")
  lines.append(f"{'total':<{width}}  {'':<22} {total:>12,}")
  return "\n".join(lines)


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSONL file.  A last line without its newline is a record still being
  written (the run is live) or cut short by a kill, and is left out; any other line that is not
  JSON is an error naming the file and the line."""
  with open(path) as f:
    lines = f.read().split("\n")
  records = []
  for number, line in enumerate(lines[:-1], 1):   # lines[-1]: "" or the unfinished record
    if line.strip():
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {number} is not JSON ({e.msg}): {line[:80]!r}") from None
  return records


def _cut_unfinished_record(path: str) -> None:
  """Drops a last line without its newline (a run killed while writing it) before a resumed run
  appends, so that the next record does not run on into it.  Its step is trained and logged again
  after the resume."""
  if not os.path.exists(path):
    return
  with open(path, "rb+") as f:
    size = f.seek(0, os.SEEK_END)
    if size == 0:
      return
    f.seek(max(0, size - (1 << 20)))
    tail = f.read()
    if tail.endswith(b"\n"):
      return
    cut = size - len(tail) + tail.rfind(b"\n") + 1   # rfind -1: no newline in the last MiB
    logging.warning("%s: dropping an unfinished last record of %d bytes (a killed run)", path,
                    size - cut)
    f.truncate(cut)


class _QuietLibraries:
  """Drops INFO records logged by Orbax internals (dozens per save) from the absl handler."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())

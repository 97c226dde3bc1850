"""Deterministic, index-addressed, resumable input pipeline (grain threads for parallel decoding).

Order.  With (e, s) = divmod(b, N // B), global batch b is positions [s*B, (s+1)*B) of epoch e,
and position q of epoch e is record perm_e[q], perm_e = permutation(N) seeded by (seed, e) (the
identity when input.shuffle is False), identical on every host; the remainder N mod B is dropped.
Process p reads the contiguous slice [p*B/P, (p+1)*B/P) of every global batch, so the processes
together read exactly what one process with the same global batch size reads.  The iterator state
is `{'batches_consumed': b}`.

Randomness.  Augmentation and group partners of the example at (epoch, position) use
`record_rng(seed, epoch, position, slot)`: independent of host count, threads and read order.

Bad data.  A record that fails to decode, or whose short side is < min_size, is replaced by the
next valid record (index+1, +2, ... wrapping; for group partners the next of the same class) and
counted.  Once at least min(100, N) records were read, a bad fraction above max_bad_fraction
raises a ValueError naming an example file.

Workers.  grain maps batch numbers to batches, in order, a few batches ahead: on
`input.num_workers` threads of this process (PIL and numpy release the GIL only in parts, so
decoding large JPEGs does not scale with threads), or, with `input.worker_processes` = k > 0, in k
worker processes (grain's `mp_prefetch`: worker j builds batches j, j + k, ...; the output order,
hence every batch, is the same for any k).  Bad-data counts travel with each batch and are summed
here, so `stats()` and the max_bad_fraction rule cover every worker.  `train=False` disables
augmentation (ADM center crop).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import grain
import ml_collections
import numpy as np

from tdjax.data import preprocess, sources

_STREAM_END = 2**62  # the stream is effectively infinite; grain maps positions lazily


def default_input_config() -> ml_collections.ConfigDict:
  """The `input` fields the pipeline reads, with their defaults."""
  return ml_collections.ConfigDict(dict(
      source="fashion_mnist",  # 'fashion_mnist' | 'folder' | 'tfds' | 'latents' (a latent cache)
      data_dir="",             # '' = the source's default (fashion_mnist: /usr/share/datasets/...)
      tfds_name="",            # e.g. 'imagenet2012' when source='tfds'
      split="train",           # training split
      eval_split="test",       # evaluation / sampling split
      image_size=32,           # output side (28 on Fashion-MNIST = no resize)
      channels=1,              # 1 or 3; images of other modes are converted
      augment="none",          # 'none' | 'flip' | 'crop_flip' (training only)
      batch_size=64,           # GLOBAL batch size; each process gets batch_size // process_count
      min_size=8,              # images with a shorter side are skipped
      max_bad_fraction=0.01,   # fail when more of the records read are bad (after >= 100 reads)
      num_workers=2,           # decoding threads (per worker process, when there are some)
      worker_processes=0,      # > 0: decode in that many grain worker processes per host
      group_size=1,            # k > 1: each example is k images of the same class
      num_classes=10,
      shuffle=True,            # False: epochs in record order
  ))


def with_defaults(cfg) -> ml_collections.ConfigDict:
  """`cfg` over `default_input_config()`, so partial input configs work."""
  out = default_input_config()
  out.update(dict(cfg))
  return out


_COUNT_FIELDS = ("reads", "skipped_corrupt", "skipped_small", "converted_mode")


class _Counters:
  """Bad-data counters with the fail-fast rule.  Each batch counts into its own `_Counters` (on a
  thread or in a worker process), and the pipeline merges the batch's counts into its totals
  (`merge`), where the rule is checked."""

  def __init__(self, num_records: int, max_bad_fraction: float):
    self.reads = self.skipped_corrupt = self.skipped_small = self.converted_mode = 0
    self.example_bad = None
    self.min_reads = min(100, num_records)
    self.limit = max_bad_fraction

  def add(self, *, bad: str | None = None, converted: bool = False, where: str = "", why=""):
    self.reads += 1
    self.converted_mode += bool(converted)
    if bad:
      setattr(self, bad, getattr(self, bad) + 1)
      if self.example_bad is None:
        self.example_bad = f"{where} ({why})"

  def as_array(self) -> np.ndarray:
    return np.array([getattr(self, k) for k in _COUNT_FIELDS], np.int64)

  def merge(self, counts: np.ndarray, example_bad: str | None) -> None:
    """Adds one batch's counts, then raises if too much of what was read was bad."""
    for k, v in zip(_COUNT_FIELDS, np.asarray(counts).tolist()):
      setattr(self, k, getattr(self, k) + int(v))
    if self.example_bad is None and example_bad:
      self.example_bad = example_bad
    n_bad = self.skipped_corrupt + self.skipped_small
    frac = n_bad / max(self.reads, 1)
    if n_bad and self.reads >= self.min_reads and frac > self.limit:
      raise ValueError(
          f"too much bad input data: {n_bad} of {self.reads} records read were skipped "
          f"({self.skipped_corrupt} corrupt, {self.skipped_small} too small), fraction "
          f"{frac:.4f} > input.max_bad_fraction={self.limit}; e.g. {self.example_bad}")

  def as_dict(self) -> dict:
    return {k: getattr(self, k) for k in _COUNT_FIELDS}


class BatchOrder:
  """Which records form global batch b, and which slice of it this process reads.

  Global batch b holds positions [s*B, (s+1)*B) of epoch e, (e, s) = divmod(b, steps_per_epoch),
  and position q of epoch e is record perm_e[q] (a permutation seeded by (seed, e), identical on
  every host; identity when not shuffling).  Process p reads the slice [p*B/P, (p+1)*B/P).
  """

  def __init__(self, num_records: int, batch_size: int, *, seed: int, shuffle: bool,
               process_index: int = 0, process_count: int = 1):
    if batch_size % process_count:
      raise ValueError(f"input.batch_size={batch_size} (global) is not divisible by the "
                       f"number of processes {process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} is not in [0, {process_count})")
    self.num_records, self.batch_size = num_records, batch_size
    self.seed, self.shuffle = int(seed), shuffle
    self.local_batch = batch_size // process_count
    self.offset = process_index * self.local_batch
    self.steps_per_epoch = num_records // batch_size
    if self.steps_per_epoch == 0:
      raise ValueError(f"input.batch_size={batch_size} exceeds the {num_records} records of "
                       f"the split")
    self.examples_per_epoch = self.steps_per_epoch * batch_size
    self._perms, self._lock = {}, threading.Lock()

  def __getstate__(self):          # picklable for grain's worker processes (no lock)
    return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_perms")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._perms, self._lock = {}, threading.Lock()

  def perm(self, epoch: int) -> np.ndarray:
    """Record order of `epoch`; the last two epochs are cached (thread-safe)."""
    with self._lock:
      if epoch not in self._perms:
        self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
        self._perms[epoch] = (np.random.default_rng([self.seed % 2**63, epoch]).permutation(
            self.num_records) if self.shuffle else np.arange(self.num_records))
      return self._perms[epoch]

  def global_indices(self, batch: int) -> np.ndarray:
    epoch, step = divmod(batch, self.steps_per_epoch)
    return self.perm(epoch)[step * self.batch_size:(step + 1) * self.batch_size]


class Pipeline:
  """Infinite iterator of this process's batches: image f32 [B_local, (k,) H, W, C], label i32."""

  key = "image"

  def __init__(self, cfg: ml_collections.ConfigDict, source, *, seed: int, process_index: int = 0,
               process_count: int = 1, train: bool = True):
    cfg = with_defaults(cfg)
    self.cfg, self.source, self.seed, self.train = cfg, source, int(seed), train
    self.num_records = len(source)
    self.order = BatchOrder(self.num_records, int(cfg.batch_size), seed=self.seed,
                            shuffle=bool(cfg.shuffle), process_index=process_index,
                            process_count=process_count)
    self.batch_size, self.local_batch = self.order.batch_size, self.order.local_batch
    self.offset, self.steps_per_epoch = self.order.offset, self.order.steps_per_epoch
    self.examples_per_epoch = self.order.examples_per_epoch
    self.size, self.channels = int(cfg.image_size), int(cfg.channels)
    self.min_size = int(cfg.min_size)
    self.augment = cfg.augment if train else "none"
    if self.augment not in preprocess.AUGMENTS:
      raise ValueError(f"input.augment={self.augment!r}: expected one of {preprocess.AUGMENTS}")
    self.group_size = int(cfg.group_size)
    self.counters = _Counters(self.num_records, float(cfg.max_bad_fraction))
    self._class_index = None
    known = vars(source).get("labels")  # cheap labels only (not a tfds scan)
    if known is not None and len(known) and int(np.max(known)) >= int(cfg.num_classes):
      raise ValueError(f"labels go up to {int(np.max(known))} but input.num_classes="
                       f"{cfg.num_classes}")
    if self.group_size > 1:
      labels = np.asarray(source.labels)
      self._class_index = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    self.set_state({})

  def global_indices(self, batch: int) -> np.ndarray:
    """Record indices of global batch `batch` (all processes together)."""
    return self.order.global_indices(batch)

  # ---- records ----
  def _load(self, index: int, counts: _Counters) -> tuple[np.ndarray, int] | None:
    """(uint8 HxWxC, label) of record `index`, or None (counted) when it is bad."""
    where = f"record {index}"
    try:
      r = self.source[index]
      where = r.get("path", where)
      image, converted = preprocess.to_uint8(r["image"], self.channels)
    except Exception as e:  # noqa: BLE001  any decoding failure is a corrupt record
      counts.add(bad="skipped_corrupt", where=where, why=f"{type(e).__name__}: {e}")
      return None
    if min(image.shape[:2]) < self.min_size:
      counts.add(bad="skipped_small", where=where, why=f"{image.shape[1]}x{image.shape[0]}")
      return None
    counts.add(converted=converted)
    return image, int(r["label"])

  def _load_valid(self, start: int, counts: _Counters, candidates: np.ndarray | None = None):
    """(image, label, index) of the first valid record among candidates[start], [start+1], ...

    (wrapping); candidates=None means all records.
    """
    n = self.num_records if candidates is None else len(candidates)
    for k in range(n):
      index = (start + k) % n
      index = index if candidates is None else int(candidates[index])
      out = self._load(index, counts)
      if out is not None:
        return out[0], out[1], index
    raise ValueError(f"no valid record among {n} candidates (skipped counts: "
                     f"{counts.as_dict()}; e.g. {counts.example_bad})")

  def _example(self, batch: int, i: int, counts: _Counters) -> tuple[np.ndarray, np.int32]:
    """Example i of this process's part of global batch `batch` -> (image [(k,) H, W, C], label)."""
    epoch, step = divmod(batch, self.steps_per_epoch)
    position = step * self.batch_size + self.offset + i  # position within the epoch (global)
    image, label, index = self._load_valid(int(self.order.perm(epoch)[position]), counts)
    images = [image]
    if self.group_size > 1:
      members = self._class_index[label]
      rng = preprocess.record_rng(self.seed, epoch, position, slot=self.group_size)
      others = members[members != index] if len(members) > 1 else members
      picks = rng.choice(len(others), self.group_size - 1,
                         replace=len(others) < self.group_size - 1)
      images += [self._load_valid(int(j), counts, others)[0] for j in picks]
    out = []
    for slot, im in enumerate(images):
      rng = preprocess.record_rng(self.seed, epoch, position, slot) if self.train else None
      out.append(self._prepare(im, rng))
    return (np.stack(out) if self.group_size > 1 else out[0]), np.int32(label)

  def _prepare(self, image: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    """A record's training view (rng: its augmentation draws; None: evaluation)."""
    return preprocess.process_uint8(image, self.size, self.augment, rng)

  def eval_records(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, H, W, C] in [-1, 1], labels int32 [n]) of records `indices` in evaluation
    form (ADM centre crop), a bad record replaced by the next valid one and counted."""
    counts = _Counters(self.num_records, float(self.cfg.max_bad_fraction))
    out = []
    for i in indices:
      image, label, _ = self._load_valid(int(i), counts)
      out.append((self._prepare(image, None), np.int32(label)))
    counted = _collate(out)
    counted.update(_counts=counts.as_array(), _example_bad=counts.example_bad or "")
    batch = self._take(counted)
    return batch[self.key], batch["label"]

  def _counted_batch(self, b: int) -> dict:
    """Batch `b` with its bad-data counts ('_counts', '_example_bad'): what a worker sends."""
    counts = _Counters(self.num_records, float(self.cfg.max_bad_fraction))
    out = _collate([self._example(b, i, counts) for i in range(self.local_batch)], self.key)
    out["_counts"] = counts.as_array()
    out["_example_bad"] = counts.example_bad or ""
    return out

  def _take(self, counted: dict) -> dict[str, np.ndarray]:
    """A worker's batch without its counts, which go into this pipeline's totals (arrays from a
    worker process are copied out of grain's shared memory, which is then released at once)."""
    self.counters.merge(counted["_counts"], counted["_example_bad"])
    out = {k: np.array(v) for k, v in counted.items() if k not in ("_counts", "_example_bad")}
    if self.key == "image":
      out["image"] = preprocess.to_float(out["image"])     # workers send uint8
    return out

  def batch(self, b: int) -> dict[str, np.ndarray]:
    """This process's part of global batch `b`, read synchronously (what `__next__` yields)."""
    return self._take(self._counted_batch(b))

  # ---- iterator ----
  def _build(self, start_batch: int):
    """grain iterator over batches start_batch, start_batch+1, ...; one batch per thread or worker
    process (per-batch work amortises grain's per-element overhead)."""
    threads = max(1, int(self.cfg.num_workers))
    processes = int(self.cfg.get("worker_processes", 0))
    ds = grain.MapDataset.range(start_batch, _STREAM_END).map(self._counted_batch)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                              prefetch_buffer_size=max(2, threads)))
    if processes > 0:
      from absl import flags        # grain's worker set-up reads its absl flags' defaults
      if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes,
                                                       per_worker_buffer_size=2))
    return iter(ds)

  def __getstate__(self):   # what grain's worker processes get: no iterator, no totals
    return {k: v for k, v in self.__dict__.items() if k not in ("_it", "counters")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._it = None
    self.counters = _Counters(self.num_records, float(self.cfg.max_bad_fraction))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:  # workers start on the first batch, not at construction / set_state
      self._it = self._build(self.batches_consumed)
    out = self._take(next(self._it))
    self.batches_consumed += 1
    return out

  def get_state(self) -> dict[str, Any]:
    """JSON state, the same on every process: the number of global batches consumed."""
    return {"batches_consumed": self.batches_consumed}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues after `state['batches_consumed']` batches (0 when absent)."""
    self.batches_consumed = int((state or {}).get("batches_consumed", 0))
    self.close()

  def close(self) -> None:
    """Stops the worker threads / processes (a new iterator starts on the next batch)."""
    it, self._it = getattr(self, "_it", None), None
    if it is not None and hasattr(it, "close"):
      it.close()

  def stats(self) -> dict[str, int]:
    """Bad-data counters of this process: reads, skipped_corrupt, skipped_small, converted_mode."""
    return self.counters.as_dict()


def _collate(examples, key: str = "image"):
  images, labels = zip(*examples)
  return {key: np.stack(images), "label": np.array(labels, np.int32)}


def make_image_pipeline(input_config: ml_collections.ConfigDict, *, seed: int,
                        process_index: int = 0, process_count: int = 1, split: str = "train",
                        train: bool = True) -> Pipeline:
  """This process's iterator over `split` of an image source (`tdjax.data.make_pipeline` picks
  this, the codes or the latent-cache pipeline by `input.source`)."""
  input_config = with_defaults(input_config)
  p = Pipeline(input_config, sources.make_source(input_config, split), seed=seed,
               process_index=process_index, process_count=process_count, train=train)
  log_pipeline(p, input_config.source, split)
  return p


def log_pipeline(p: Pipeline, source: str, split: str) -> None:
  logging.info("input %s/%s: %d records, %d per epoch, global batch %d, %d per process", source,
               split, p.num_records, p.examples_per_epoch, p.batch_size, p.local_batch)

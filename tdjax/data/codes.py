"""Pre-extracted tokenizer codes for AR training: extraction once, then a resumable code stream.

Extraction (`extract_codes`) runs a trained tokenizer in eval mode over a stream of image batches
through an *encode function* with the protocol

    encode_fn(images float [B, H, W, C] in [-1, 1], call) -> (clean, ar_input, ar_label), int [B, N] each

(DetailFlow's eval-mode encode: the clean codes and the frozen self-correction pair; see
`docs/reference/detailflow.md` 2.4); `call` = batch x views + view numbers the calls in extraction
order, and keys the self-correction draw, so any split of the batches (over processes:
`extract_from_workdir(multihost=True)`) writes the same file.  Optionally over several views of
each image (`views`, e.g. the image and its flip, the reference's ten-crop), and writes one `.npz`
(read into memory) or, for a path not ending in '.npz', a directory of `.npy` files plus meta.json
(memory-mapped when read, for ImageNet-size codes):

    clean, ar_input, ar_label   uint16 (int32 when vocab > 65536), [num, N] or [num, views, N]
    label                       int32 [num]
    num_tokens, vocab_size, group_size, num_classes, num_views      scalars (metadata)

`CodesPipeline` reads such a file with the iterator protocol of `tdjax.data.pipeline`
(`__next__` -> dict of numpy arrays for this process, `get_state`/`set_state` JSON identical on all
processes, `stats`).  Order: global batch b is positions [b*B, (b+1)*B) of epoch e, position q of
epoch e is record perm_e[q] (perm seeded by (seed, e), identity when not training); the remainder
is dropped; process p reads the slice [p*B/P, (p+1)*B/P).  With several views, a training example
picks one view uniformly with a generator seeded by (seed, epoch, position); evaluation uses view 0.

`input.path` names the file; a '{split}' in it is replaced by the split name, otherwise every split
reads the same file.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_collections
import numpy as np
from absl import flags
from etils import epath
from tqdm import tqdm

from tdjax import cli, parallel
from tdjax.data import pipeline, preprocess
from tdjax.tasks.detailflow_tokenizer import load_tokenizer

CODE_KEYS = ("clean", "ar_input", "ar_label")
META_KEYS = ("num_tokens", "vocab_size", "group_size", "num_classes", "num_views")
# optional: the tokenizer's causal_num c (files written before it was recorded: c = g)
OPTIONAL_META_KEYS = ("causal_num",)

EncodeFn = Callable[[np.ndarray, int], tuple]


def _check_codes(name: str, codes: np.ndarray, batch: int, vocab_size: int) -> np.ndarray:
  codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[0] != batch:
    raise ValueError(f"encode_fn returned {name} of shape {codes.shape}; expected [{batch}, N]")
  if not np.issubdtype(codes.dtype, np.integer):
    raise ValueError(f"encode_fn returned {name} of dtype {codes.dtype}; expected integer codes")
  if codes.size and (codes.min() < 0 or codes.max() >= vocab_size):
    raise ValueError(f"encode_fn returned {name} codes in [{codes.min()}, {codes.max()}], outside "
                     f"the vocabulary 0..{vocab_size - 1}")
  return codes


def extract_codes(encode_fn: EncodeFn, batches: Iterable[Mapping[str, np.ndarray]], path: str, *,
                  vocab_size: int, group_size: int, num_classes: int,
                  views: Callable[[np.ndarray], list] | None = None,
                  max_batches: int | None = None, overwrite: bool = False,
                  causal_num: int | None = None) -> dict:
  """Encodes every batch ({'image', 'label'}) and writes the codes file; returns its metadata.

  The file is written to `path + '.tmp'` and renamed, so a crash never leaves a partial file that
  a later run would take for finished codes (the reference silently reuses stale codes).  An
  existing `path` is an error before any encoding unless overwrite=True."""
  refuse_existing(path, overwrite)
  stream = tqdm(itertools.islice(batches, max_batches), desc="codes", unit="batch",
                total=max_batches)
  encoded = (encode_batch(encode_fn, batch, i, vocab_size=vocab_size, num_classes=num_classes,
                          views=views)
             for i, batch in enumerate(stream))
  return write_codes(path, encoded, vocab_size=vocab_size, group_size=group_size,
                     num_classes=num_classes, causal_num=causal_num)


def refuse_existing(path: str, overwrite: bool) -> None:
  if epath.Path(path).exists() and not overwrite:
    raise FileExistsError(f"codes file {path} exists: pass --overwrite (overwrite=True) to "
                          f"replace it; nothing was written")


def encode_batch(encode_fn: EncodeFn, batch: Mapping[str, np.ndarray], index: int, *,
                 vocab_size: int, num_classes: int,
                 views: Callable[[np.ndarray], list] | None = None) -> dict:
  """Batch number `index` encoded: {'clean', 'ar_input', 'ar_label': [B, V, N], 'label': [B]},
  checked (labels in range, integer codes in the vocabulary, one token count)."""
  images = np.asarray(batch["image"])
  b = images.shape[0]
  lab = np.asarray(batch["label"]).astype(np.int64).reshape(-1)
  if lab.shape[0] != b or lab.min() < 0 or lab.max() >= num_classes:
    raise ValueError(f"batch {index}: labels {lab[:8].tolist()}... must be {b} class ids in "
                     f"0..{num_classes - 1}")
  view_images = list(views(images)) if views is not None else [images]
  per_view = {k: [] for k in CODE_KEYS}
  for v, im in enumerate(view_images):
    triplet = encode_fn(im, index * len(view_images) + v)
    if len(triplet) != 3:
      raise ValueError(f"encode_fn must return (clean, ar_input, ar_label); got {len(triplet)} "
                       f"arrays")
    for k, c in zip(CODE_KEYS, triplet):
      per_view[k].append(_check_codes(k, c, b, vocab_size))
  n = per_view["clean"][0].shape[1]
  if any(c.shape[1] != n for v in per_view.values() for c in v):
    raise ValueError(f"batch {index}: the views give different token counts")
  out = {k: np.stack(per_view[k], axis=1) for k in CODE_KEYS}     # [B, V, N]
  out["label"] = lab
  return out


def write_codes(path: str, encoded: Iterable[dict], *, vocab_size: int, group_size: int,
                num_classes: int, causal_num: int | None = None) -> dict:
  """Writes the codes file of the encoded batches (`encode_batch`'s dicts, in order); returns
  its metadata."""
  out = {k: [] for k in CODE_KEYS + ("label",)}
  num_tokens = num_views = None
  for i, enc in enumerate(encoded):
    n, v = enc["clean"].shape[2], enc["clean"].shape[1]
    if num_tokens is None:
      num_tokens, num_views = n, v
      if n % group_size:
        raise ValueError(f"the tokenizer gives N={n} tokens, not divisible by the group size "
                         f"g={group_size}")
    if (n, v) != (num_tokens, num_views):
      raise ValueError(f"batch {i}: token count changed from N={num_tokens}")
    for k in out:
      out[k].append(enc[k])
  if num_tokens is None:
    raise ValueError("extract_codes: the batch stream was empty")
  dtype = np.uint16 if vocab_size <= 65536 else np.int32
  arrays = {k: np.concatenate(out[k]).astype(dtype) for k in CODE_KEYS}
  if num_views == 1:
    arrays = {k: v[:, 0] for k, v in arrays.items()}
  meta = dict(num_tokens=num_tokens, vocab_size=vocab_size, group_size=group_size,
              num_classes=num_classes, num_views=num_views)
  if causal_num is not None:
    meta["causal_num"] = int(causal_num)
  arrays["label"] = np.concatenate(out["label"]).astype(np.int32)
  if path.endswith(".npz"):
    _write_npz(path, {**arrays, **{k: np.int64(v) for k, v in meta.items()}})
  else:
    _write_dir(path, arrays, meta)
  logging.info("codes: wrote %d sequences x %d views of N=%d to %s", len(arrays["label"]),
               num_views, num_tokens, path)
  return dict(meta, num_examples=len(arrays["label"]))


def _write_npz(path: str, arrays: dict) -> None:
  """Atomic write (temporary name, then rename), local or any etils.epath location (gs://...)."""
  p = epath.Path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  tmp = epath.Path(str(p) + ".tmp")
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  tmp.write_bytes(buf.getvalue())
  tmp.replace(p)                  # atomic, and replaces an existing file (overwrite=True)


def _write_dir(path: str, arrays: dict, meta: dict) -> None:
  """A directory of .npy files (memory-mapped when read) + meta.json; written under a temporary
  name and renamed."""
  p = epath.Path(path)
  tmp = epath.Path(str(p) + ".tmp")
  if tmp.exists():
    tmp.rmtree()
  tmp.mkdir(parents=True)
  for k, a in arrays.items():
    buf = io.BytesIO()
    np.save(buf, a)
    (tmp / f"{k}.npy").write_bytes(buf.getvalue())
  (tmp / "meta.json").write_text(json.dumps(meta))
  if p.exists():
    p.rmtree()
  tmp.rename(p)


def _read(path: str) -> tuple[dict, dict]:
  """Raw arrays and metadata of an .npz file or a codes directory (local .npy: memory-mapped)."""
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"codes file {path} not found: extract it first with "
                            f"tdjax.data.codes.extract_codes (input.path)")
  if p.is_dir():
    names = sorted(q.name for q in p.iterdir())
    missing = [f"{k}.npy" for k in CODE_KEYS + ("label",) if f"{k}.npy" not in names]
    if missing or "meta.json" not in names:
      raise ValueError(f"codes directory {path} lacks {missing or ['meta.json']}; found {names}")
    meta = json.loads((p / "meta.json").read_text())
    local = "://" not in path
    arrays = {k: (np.load(str(p / f"{k}.npy"), mmap_mode="r") if local else
                  np.load(io.BytesIO((p / f"{k}.npy").read_bytes())))
              for k in CODE_KEYS + ("label",)}
    return arrays, {k: int(meta[k]) for k in META_KEYS + OPTIONAL_META_KEYS if k in meta}
  with p.open("rb") as fh, np.load(io.BytesIO(fh.read())) as f:
    missing = [k for k in CODE_KEYS + ("label",) + META_KEYS if k not in f.files]
    if missing:
      raise ValueError(f"codes file {path} lacks {missing}; found {sorted(f.files)}")
    return ({k: f[k] for k in CODE_KEYS + ("label",)},
            {k: int(f[k]) for k in META_KEYS + OPTIONAL_META_KEYS if k in f.files})


def load_codes(path: str) -> tuple[dict, dict]:
  """(arrays {clean, ar_input, ar_label [num, V, N], label [num]}, metadata) of a codes file
  (.npz, read into memory) or directory (.npy files, memory-mapped: for ImageNet-size codes)."""
  arrays, meta = _read(path)
  arrays["label"] = np.asarray(arrays["label"])
  for k in CODE_KEYS:
    a = arrays[k]
    if a.ndim == 2:
      a = a[:, None]
    if a.ndim != 3 or a.shape[0] != len(arrays["label"]) or a.shape[2] != meta["num_tokens"]:
      raise ValueError(f"codes file {path}: {k} has shape {arrays[k].shape}, expected "
                       f"[{len(arrays['label'])}, ({meta['num_views']},) {meta['num_tokens']}]")
    arrays[k] = a
  return arrays, meta


def resolve_path(path: str, split: str) -> str:
  return path.replace("{split}", split) if "{split}" in path else path


class CodesPipeline:
  """Infinite iterator of this process's batches:
  {'clean', 'ar_input', 'ar_label': int32 [B_local, N], 'label': int32 [B_local]}."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, seed: int, process_index: int = 0,
               process_count: int = 1, split: str = "train", train: bool = True):
    self.cfg, self.seed, self.train, self.split = cfg, int(seed), train, split
    if not cfg.get("path", ""):
      raise ValueError("input.source='codes' needs input.path (an .npz from extract_codes)")
    self.path = resolve_path(cfg.path, split)
    self.arrays, self.meta = load_codes(self.path)
    self._check_against_config()
    self.num_records = len(self.arrays["label"])
    self.order = pipeline.BatchOrder(self.num_records, int(cfg.batch_size), seed=self.seed,
                            shuffle=bool(cfg.get("shuffle", True)) and train,
                            process_index=process_index, process_count=process_count)
    self.batch_size, self.local_batch = self.order.batch_size, self.order.local_batch
    self.offset, self.steps_per_epoch = self.order.offset, self.order.steps_per_epoch
    self.set_state({})
    logging.info("input codes/%s: %d sequences x %d views (N=%d, vocab %d) from %s, global batch "
                 "%d, %d per process", split, self.num_records, self.meta["num_views"],
                 self.meta["num_tokens"], self.meta["vocab_size"], self.path, self.batch_size,
                 self.local_batch)

  def _check_against_config(self) -> None:
    c, m = self.cfg, self.meta
    want_n, want_v = c.get("num_tokens", m["num_tokens"]), c.get("vocab_size", m["vocab_size"])
    if int(want_n) != m["num_tokens"] or int(want_v) != m["vocab_size"]:
      raise ValueError(f"tokenizer/AR mismatch: codes file {self.path} has N={m['num_tokens']} "
                       f"tokens and vocab {m['vocab_size']}, the AR config N={want_n} and vocab "
                       f"{want_v}")
    ncls = int(c.get("num_classes", m["num_classes"]))
    lab = self.arrays["label"]
    if lab.size and (lab.min() < 0 or lab.max() >= ncls):
      raise ValueError(f"codes file {self.path} has class ids in [{lab.min()}, {lab.max()}], "
                       f"outside input.num_classes={ncls}")

  def global_indices(self, batch: int) -> np.ndarray:
    return self.order.global_indices(batch)

  def batch_at(self, batch: int) -> dict[str, np.ndarray]:
    """This process's part of global batch `batch` (random access, no state change)."""
    epoch, step = divmod(batch, self.steps_per_epoch)
    idx = self.global_indices(batch)[self.offset:self.offset + self.local_batch]
    views = self.meta["num_views"]
    if self.train and views > 1:
      pos = step * self.batch_size + self.offset + np.arange(self.local_batch)
      view = np.array([np.random.default_rng([self.seed, epoch, int(q), 1]).integers(views)
                       for q in pos])
    else:
      view = np.zeros(len(idx), np.int64)
    out = {k: self.arrays[k][idx, view].astype(np.int32) for k in CODE_KEYS}
    out["label"] = self.arrays["label"][idx].astype(np.int32)
    return out

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    out = self.batch_at(self.batches_consumed)
    self.batches_consumed += 1
    return out

  def get_state(self) -> dict[str, Any]:
    """JSON state, the same on every process: the number of global batches consumed."""
    return {"batches_consumed": self.batches_consumed}

  def set_state(self, state: dict[str, Any]) -> None:
    self.batches_consumed = int((state or {}).get("batches_consumed", 0))

  def close(self) -> None:
    """Nothing to stop (no workers): the iterator protocol of `tdjax.data.pipeline`."""

  def stats(self) -> dict[str, int]:
    return dict(sequences=self.num_records, views=self.meta["num_views"],
                num_tokens=self.meta["num_tokens"], vocab_size=self.meta["vocab_size"],
                batches_consumed=self.batches_consumed)


def make_codes_pipeline(input_config: ml_collections.ConfigDict, *, seed: int,
                        process_index: int = 0, process_count: int = 1, split: str = "train",
                        train: bool = True) -> "CodesPipeline":
  """This process's iterator over a codes file (input.source='codes', input.path)."""
  return CodesPipeline(input_config, seed=seed, process_index=process_index,
                       process_count=process_count, split=split, train=train)


def synthetic_codes(path: str, *, num: int = 512, num_tokens: int = 32, group_size: int = 4,
                    vocab_size: int = 64, num_classes: int = 4, seed: int = 0,
                    correction_rate: float = 0.25) -> dict:
  """A learnable synthetic codes file (tests, smoke runs): each class has a template sequence,
  each code is kept with prob 0.8 (else uniform), ar_input perturbs one group of the clean codes
  and ar_label equals clean.  Written through `extract_codes` with a fake encoder."""
  rng = np.random.default_rng(seed)
  templates = rng.integers(0, vocab_size, (num_classes, num_tokens))
  labels = rng.integers(0, num_classes, num)

  def encode(images, call):
    b = images.shape[0]
    lab = images[:, 0, 0, 0].astype(np.int64)
    noise = rng.integers(0, vocab_size, (b, num_tokens))
    clean = np.where(rng.random((b, num_tokens)) < 0.8, templates[lab], noise)
    ar_input = clean.copy()
    for r in range(b):
      if rng.random() < correction_rate:
        grp = rng.integers(num_tokens // group_size)
        sl = slice(grp * group_size, (grp + 1) * group_size)
        ar_input[r, sl] = rng.integers(0, vocab_size, group_size)
    return clean, ar_input, clean

  def batches():
    for s in range(0, num, 64):
      lab = labels[s:s + 64]
      yield {"image": np.broadcast_to(lab[:, None, None, None], (len(lab), 1, 1, 1)).astype(
          np.float32), "label": lab}

  return extract_codes(encode, batches(), path, vocab_size=vocab_size, group_size=group_size,
                       num_classes=num_classes)


# ------------------------------------------------------------------------------------------------
# From a trained DetailFlow tokenizer
# ------------------------------------------------------------------------------------------------

def tokenizer_encode_fn(model, params, *, seed: int = 0, variables: dict | None = None,
                        shared: int = 1) -> EncodeFn:
  """The encode protocol from a `tdjax.tokenizers.detailflow.DetailFlowTokenizer` and its params
  (the 'gen' subtree is taken when given the tokenizer task's params): eval-mode
  `encode_for_ar`, the self-correction draw of call `call` keyed by fold_in(seed, call // shared)
  (frozen once written to the file).  shared = the number of views of a batch: each image then
  has one draw for all its views, as the reference's ten-crop extraction does."""
  gen = params["gen"] if isinstance(params, Mapping) and "gen" in params else params
  extra = dict(variables or {})
  fn = jax.jit(lambda p, x, k: model.apply({"params": p, **extra}, x, k, method="encode_for_ar"))

  def encode(images, call):
    key = jax.random.fold_in(jax.random.key(seed), call // shared)
    out = fn(gen, np.asarray(images, np.float32), key)
    return tuple(np.asarray(a) for a in out)
  return encode


def flip_views(images: np.ndarray) -> list:
  """The image and its horizontal flip (a light stand-in for the reference's ten-crop)."""
  return [images, images[:, :, ::-1]]


VIEWS = ("none", "flip", "tencrop")
TENCROP_MARGIN = 1.1     # reference --crop-range: centre crop to int(1.1 S), then TenCrop(S)


def extract_from_workdir(tokenizer_workdir: str, out_path: str, *, split: str = "train",
                         batch_size: int = 64, max_batches: int | None = None,
                         views: str = "none", seed: int = 0, use_ema: bool = False,
                         overwrite: bool = False) -> dict | None:
  """Restores the latest tokenizer checkpoint of `tokenizer_workdir` and writes the codes of one
  epoch of `split` of its own input pipeline (no augmentation, record order, remainder dropped)
  to `out_path`.

  On several processes (jax.distributed), process p encodes batches p, p + P, ... into
  `out_path + '.parts/'` (storage every host shares; an existing part is kept, so a stopped run
  goes on where it stopped), and after a barrier process 0 writes the file from the parts: the
  same file as one process writes.  Returns the metadata (None on the other processes)."""
  pi, pc = jax.process_index(), jax.process_count()
  refuse_existing(out_path, overwrite)
  if views not in VIEWS:
    raise ValueError(f"--views={views!r}: expected one of {VIEWS}")
  task, params, cfg = load_tokenizer(tokenizer_workdir, use_ema=use_ema)
  model = task.model
  inp = ml_collections.ConfigDict(cfg.input.to_dict())
  inp.update(dict(batch_size=batch_size, augment="none", shuffle=False))
  size = int(inp.image_size)
  if views == "tencrop":      # the reference's ten-crop: one self-correction draw per image
    inp.image_size = int(size * TENCROP_MARGIN)
  data = pipeline.make_image_pipeline(inp, seed=seed, process_index=0, process_count=1, split=split,
                                train=False)
  steps = getattr(data, "steps_per_epoch", None)
  limits = [x for x in (steps, max_batches) if x is not None]
  view_fn = {"none": None, "flip": flip_views,
             "tencrop": lambda im: preprocess.ten_crop(im, size)}[views]
  encode = tokenizer_encode_fn(model, params, seed=seed, shared=10 if views == "tencrop" else 1)
  kw = dict(vocab_size=int(model.codebook_size), num_classes=int(cfg.input.num_classes),
            causal_num=int(model.c))
  if pc == 1:
    return extract_codes(encode, data, out_path, group_size=int(model.group), views=view_fn,
                         max_batches=min(limits) if limits else None, overwrite=overwrite, **kw)
  if not limits:
    raise ValueError(f"input {inp.source}: an endless stream; give --max_batches to split it "
                     f"over {pc} processes")
  parts = epath.Path(out_path + ".parts")
  parts.mkdir(parents=True, exist_ok=True)
  part = lambda b: parts / f"{b:08d}.npz"
  for b in tqdm(range(pi, min(limits), pc), desc=f"codes (process {pi} of {pc})", unit="batch"):
    if part(b).exists():
      continue
    enc = encode_batch(encode, data.batch(b), b, views=view_fn, vocab_size=kw["vocab_size"],
                       num_classes=kw["num_classes"])
    _write_npz(str(part(b)), enc)
    logging.info("codes: process %d encoded batch %d of %d", pi, b + 1, min(limits))
  parallel.barrier("tdjax.data.codes: every part written")
  if pi != 0:
    return None
  missing = [str(part(b)) for b in range(min(limits)) if not part(b).exists()]
  if missing:
    raise RuntimeError(f"{len(missing)} codes parts are missing after every process finished, "
                       f"e.g. {missing[0]}: is {parts} on storage all hosts share?")
  meta = write_codes(out_path, (_read_part(part(b)) for b in range(min(limits))),
                     group_size=int(model.group), **kw)
  parts.rmtree()
  return meta


def _read_part(path) -> dict:
  with path.open("rb") as fh, np.load(io.BytesIO(fh.read())) as f:
    return {k: f[k] for k in f.files}


def _define_flags():
  flags.DEFINE_string("tokenizer_workdir", None, "Workdir of a trained DetailFlow tokenizer.")
  flags.DEFINE_string("out", None, "Output .npz, or a directory (memory-mapped .npy files); the "
                      "AR config's codes=...")
  flags.DEFINE_string("split", "train", "Split of the tokenizer's input pipeline.")
  flags.DEFINE_integer("batch_size", 64, "Images per encode call.")
  flags.DEFINE_integer("max_batches", None, "Stop after this many batches (default: one epoch).")
  flags.DEFINE_enum("views", "none", list(VIEWS), "Views per image: 'flip' (image + mirror, each "
                    "with its own self-correction draw), 'tencrop' (the reference's: centre crop to "
                    "1.1 S, TenCrop(S), one draw per image).")
  flags.DEFINE_integer("seed", 0, "Seed of the self-correction draws.")
  flags.DEFINE_bool("use_ema", False, "Use the tokenizer's EMA weights (reference: non-EMA).")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out (else an error before encoding).")
  cli.define_multihost_flag("the batches are split over the processes (--out on storage every "
                            "host shares)")
  flags.mark_flags_as_required(["tokenizer_workdir", "out"])


def main(argv):
  """python -m tdjax.data.codes --tokenizer_workdir DIR --out F.npz [--views flip]"""
  del argv
  f = flags.FLAGS
  parallel.initialize_distributed(f.multihost)    # before any other JAX call
  meta = extract_from_workdir(f.tokenizer_workdir, f.out, split=f.split, batch_size=f.batch_size,
                              max_batches=f.max_batches, views=f.views, seed=f.seed,
                              use_ema=f.use_ema, overwrite=f.overwrite)
  if meta is not None:          # process 0 writes the file
    print(json.dumps(meta))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

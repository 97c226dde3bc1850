r"""TransDiff's cached latents (the reference's `main_cache.py`): the KL VAE's posterior moments of
every image of a split, centre-cropped (ADM) and its horizontal flip, encoded once, so that
training reads latents instead of decoding JPEGs and running the VAE encoder in every step.

  python -m tdjax.data.latents --vae kl16.npz --out DIR      # ImageNet train (tfds), 256 px
  python -m tdjax.train --config configs/transdiff.py:size=L,latents=DIR,vae_weights=kl16.npz ...

The training step draws the posterior sample from the stored moments with its own key
(`z = (mean + exp(logvar / 2) eps) x scale`), as encoding in the step does, and picks the flipped
view with probability 1/2 (`input.augment='flip'`; 'none': always the centre crop).

Layout of DIR, for split S:
  S-00000.npy          float32 [n, 2, h, w, 2c]: records [0, n) (view 0 the centre crop, view 1
                       its mirror; mean then logvar on the last axis, logvar clamped as the VAE does)
  S-00000.labels.npy   int32 [n]
  S-00001.npy ...      the next `shard_size` records, in record order
  S.json               what the cache holds (records, shards, grid, channels, VAE, image size,
                       source); written last: a split is complete when it exists.
Process p of P (`--multihost`) encodes shards p, p + P, ..., each batch split over its local
devices; a shard already in DIR is kept, so a stopped run goes on where it stopped; every file is
written under a temporary name and renamed.  Bad images are replaced by the next valid record, as
in training (`tdjax.data.pipeline`), and counted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import ml_collections
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from tdjax import cli, parallel
from tdjax.data import pipeline
from tdjax.tokenizers import kl_vae

MOMENTS = "moments"


def _shard(out: str, split: str, k: int) -> str:
  return os.path.join(out, f"{split}-{k:05d}")


def meta_path(out: str, split: str) -> str:
  return os.path.join(out, f"{split}.json")


def read_meta(directory: str, split: str) -> dict:
  """The cache's description of `split`, or a one-line error saying how to make it."""
  path = meta_path(directory, split)
  if not directory or not os.path.exists(path):
    raise FileNotFoundError(
        f"input.data_dir={directory!r} holds no latent cache of split {split!r} ({path} missing): "
        f"make it with python -m tdjax.data.latents --vae VAE.npz --out DIR --split {split}, "
        f"then give the config arg latents=DIR")
  with open(path) as f:
    return json.load(f)


class CachedLatents:
  """A record source over a latent cache split: `src[i] -> {'moments': [2, h, w, 2c], 'label'}`,
  shards memory-mapped."""

  def __init__(self, directory: str, split: str):
    self.meta = read_meta(directory, split)
    self.directory, self.split = directory, split
    sizes = []
    for k in range(self.meta["num_shards"]):
      sizes.append(len(np.load(_shard(directory, split, k) + ".labels.npy", mmap_mode="r")))
    self._starts = np.cumsum([0] + sizes)
    self._moments = self._labels = None

  def _open(self):
    if self._moments is None:
      self._moments = [np.load(_shard(self.directory, self.split, k) + ".npy", mmap_mode="r")
                       for k in range(self.meta["num_shards"])]

  def __getstate__(self):          # worker processes map the files themselves
    return {k: v for k, v in self.__dict__.items() if k not in ("_moments",)} | {"_moments": None}

  def __len__(self):
    return int(self._starts[-1])

  def __getitem__(self, i):
    self._open()
    k = int(np.searchsorted(self._starts, i, side="right") - 1)
    return {MOMENTS: np.asarray(self._moments[k][i - self._starts[k]]),
            "label": int(self.labels[i])}

  @property
  def labels(self) -> np.ndarray:
    if self._labels is None:
      self._labels = np.concatenate([
          np.load(_shard(self.directory, self.split, k) + ".labels.npy")
          for k in range(self.meta["num_shards"])]).astype(np.int64)
    return self._labels


class LatentPipeline(pipeline.Pipeline):
  """The same order, grouping, sharding and workers over a latent cache: batches
  {'moments': float32 [B_local, (k,) h, w, 2c], 'label'}; a training example takes the flipped
  view with probability 1/2 (input.augment='flip', the reference's cached path), the centre crop
  otherwise and in evaluation."""

  key = MOMENTS

  def _load(self, index: int, counts):
    r = self.source[index]
    counts.add()
    return r[MOMENTS], int(r["label"])

  def _prepare(self, moments: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
    flip = rng is not None and self.augment != "none" and rng.random() < 0.5
    return np.asarray(moments[1 if flip else 0], np.float32)


def make_latent_pipeline(input_config: ml_collections.ConfigDict, *, seed: int,
                         process_index: int = 0, process_count: int = 1, split: str = "train",
                         train: bool = True) -> LatentPipeline:
  """This process's iterator over a latent cache split (input.source='latents', data_dir)."""
  input_config = pipeline.with_defaults(input_config)
  if input_config.augment not in ("none", "flip"):
    raise ValueError(f"input.augment={input_config.augment!r}: a latent cache has the centre "
                     f"crop and its flip only ('none' or 'flip')")
  p = LatentPipeline(input_config, CachedLatents(input_config.data_dir, split), seed=seed,
                     process_index=process_index, process_count=process_count, train=train)
  pipeline.log_pipeline(p, "latents", split)
  return p


def _save_npy(path: str, array: np.ndarray) -> None:
  tmp = path + ".tmp.npy"
  np.save(tmp, array)
  os.replace(tmp, path)


def encode_split(vae_weights: str, out: str, input_cfg: ml_collections.ConfigDict, *,
                 vae: str = "kl16", split: str = "train", batch_size: int = 64,
                 shard_size: int = 4096, max_records: int | None = None) -> dict | None:
  """Writes the latent cache of `split` of `input_cfg`'s source to `out` (see the module
  docstring).  Returns the metadata on process 0, None on the others."""
  cfg = dataclasses.replace({"kl16": kl_vae.KL16, "demo": kl_vae.DEMO}[vae])
  model = kl_vae.AutoencoderKL(cfg)
  params = kl_vae.load_params(vae_weights)
  inp = pipeline.with_defaults(input_cfg)
  inp.update(dict(batch_size=1, shuffle=False, augment="none", worker_processes=0))
  if inp.image_size % cfg.stride or inp.channels != cfg.in_channels:
    raise ValueError(f"the {vae} VAE encodes {cfg.in_channels}-channel images of sides divisible "
                     f"by {cfg.stride}; input gives {inp.channels} channels at {inp.image_size} px")
  data = pipeline.make_image_pipeline(inp, seed=0, split=split, train=False)
  n = len(data.source) if max_records is None else min(len(data.source), max_records)
  shards = -(-n // shard_size)
  devices = jax.local_devices()
  mesh = Mesh(np.array(devices), ("data",))
  by_example = NamedSharding(mesh, PartitionSpec("data"))

  @jax.jit
  def moments(p, x):
    views = jax.numpy.stack([x, x[:, :, ::-1]], axis=1)            # [B, 2, H, W, C]
    flat = views.reshape((-1,) + x.shape[1:])
    mean, logvar = model.apply({"params": p}, flat, method=kl_vae.AutoencoderKL.encode)
    m = jax.numpy.concatenate([mean, logvar], axis=-1)
    return m.reshape(x.shape[:1] + (2,) + m.shape[1:])

  os.makedirs(out, exist_ok=True)
  pi, pc = jax.process_index(), jax.process_count()
  mine = [k for k in range(pi, shards, pc)
          if not os.path.exists(_shard(out, split, k) + ".labels.npy")]
  step = batch_size - batch_size % len(devices) or len(devices)
  for k in tqdm(mine, desc=f"latents {split} (process {pi} of {pc})", unit="shard",
                disable=not mine):
    lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
    parts, labels = [], []
    for s in range(lo, hi, step):
      images, lab = data.eval_records(range(s, min(hi, s + step)))
      pad = step - len(images)
      x = jax.device_put(np.pad(images, ((0, pad),) + ((0, 0),) * 3), by_example)
      parts.append(np.asarray(moments(params, x))[:len(images)])
      labels.append(lab)
    _save_npy(_shard(out, split, k) + ".npy", np.concatenate(parts).astype(np.float32))
    _save_npy(_shard(out, split, k) + ".labels.npy", np.concatenate(labels).astype(np.int32))
  parallel.barrier("tdjax.data.latents: every shard written")
  if pi != 0:
    return None
  missing = [k for k in range(shards) if not os.path.exists(_shard(out, split, k) + ".labels.npy")]
  if missing:
    raise RuntimeError(f"{len(missing)} latent shards are missing after every process finished, "
                       f"e.g. {_shard(out, split, missing[0])}.npy: is {out} shared by all hosts?")
  grid = inp.image_size // cfg.stride
  meta = dict(split=split, num_records=n, num_shards=shards, shard_size=shard_size, grid=grid,
              channels=cfg.embed_dim, vae=vae, vae_weights=os.path.abspath(vae_weights),
              image_size=int(inp.image_size), source=inp.source,
              tfds_name=inp.get("tfds_name", "") if inp.source == "tfds" else "",
              data_dir=inp.get("data_dir", ""), bad_records=data.stats())
  tmp = meta_path(out, split) + ".tmp"
  with open(tmp, "w") as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, meta_path(out, split))
  logging.info("latents: %d records of %s in %d shards of %s (%s)", n, split, shards, out,
               data.stats())
  return meta


def _define_flags():
  flags.DEFINE_string("vae", None, "KL VAE weights .npz (python -m tdjax.convert --kind mar_vae).")
  flags.DEFINE_enum("vae_config", "kl16", ["kl16", "demo"], "The VAE's architecture.")
  flags.DEFINE_string("out", None, "Cache folder (on storage every host shares with --multihost).")
  flags.DEFINE_string("split", "train", "Split to encode.")
  flags.DEFINE_string("source", "tfds", "fashion_mnist | folder | tfds (tdjax.data.sources).")
  flags.DEFINE_string("tfds_name", "imagenet2012", "tfds dataset (source=tfds).")
  flags.DEFINE_string("data_dir", "", "The source's data_dir ('' = its default).")
  flags.DEFINE_integer("image_size", 256, "Centre-crop side (ADM).")
  flags.DEFINE_integer("channels", 3, "Image channels the VAE takes.")
  flags.DEFINE_integer("batch_size", 64, "Images per encoder call (split over local devices).")
  flags.DEFINE_integer("shard_size", 4096, "Records per shard file (the unit of resumption).")
  flags.DEFINE_integer("max_records", None, "Only the first records (smoke runs).")
  cli.define_multihost_flag("the shards are split over the processes (--out on storage every "
                            "host shares)")
  flags.mark_flags_as_required(["vae", "out"])


def main(argv):
  """python -m tdjax.data.latents --vae kl16.npz --out DIR [--split train] [--multihost]"""
  del argv
  f = flags.FLAGS
  parallel.initialize_distributed(f.multihost)    # before any other JAX call
  inp = ml_collections.ConfigDict(dict(source=f.source, tfds_name=f.tfds_name,
                                       data_dir=f.data_dir, image_size=f.image_size,
                                       channels=f.channels))
  meta = encode_split(f.vae, f.out, inp, vae=f.vae_config, split=f.split,
                      batch_size=f.batch_size, shard_size=f.shard_size, max_records=f.max_records)
  if meta is not None:
    print(json.dumps(meta))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

r"""Samples from a generator checkpoint: a PNG grid (rows = classes) or an .npz (ADM format).

  python -m tdjax.sample --workdir runs/demo/ar --out runs/demo/pictures/samples.png \
      [--classes all|0,3,7] [--num 100] [--cfg 1.5] [--temperature 1.0] [--seed 0] \
      [--judge runs/demo/classifier]

The model is rebuilt from the config stored in the checkpoint; the AR model's tokenizer is the one
named by its config (`tokenizer_workdir`).  `--judge` scores the samples with a classifier
checkpoint: the fraction assigned to the requested class, and the Fréchet distance of its features
to as many real test images (`OUT_stem_judge.json`).

An .npz output (`arr_0` uint8 NHWC, `labels`: the ADM format `tdjax.evaluate` reads) is built from
per-batch parts kept in OUT_stem.parts/ until the end, so a stopped 50k-sample run resumes where it
stopped (same keys, same images) when started again with the same flags.  Every chunk is split
over the local devices, and `--multihost` (on every host, as the launch/ scripts start jobs) splits
the chunks over the processes, which write their parts to the shared parts folder; process 0
gathers them.  The samples are the same for any device or process count.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time

import jax
import numpy as np
from absl import flags, logging
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from tdjax import checkpoint as ckpt_lib
from tdjax import cli, evaluation, metrics, parallel, runs
from tdjax.data import pipeline
from tdjax.tasks import GeneratorTask

FLAGS = flags.FLAGS


def _define_flags():
  """CLI flags (defined only when run as a program, so the module imports anywhere)."""
  flags.DEFINE_string("workdir", None, "Generator training directory (its checkpoints).")
  flags.DEFINE_string("checkpoint", None, "Instead of --workdir: one checkpoint, WORKDIR/checkpoints/STEP.")
  flags.DEFINE_string("out", None, "Output .png (labelled grid, rows = classes) or .npz (arr_0, labels).")
  flags.DEFINE_string("classes", "all", "'all' or a comma-separated list of class ids.")
  flags.DEFINE_integer("num", 8, "Samples per class.")
  flags.DEFINE_float("cfg", None, "Classifier-free guidance scale (default: the config's).")
  flags.DEFINE_float("temperature", None, "Sampling temperature (default: the config's).")
  flags.DEFINE_string("cfg_schedule", None, "next-detail AR: constant | linear | gradual (the "
                      "reference's gradual_cfg; default: the config's).")
  flags.DEFINE_integer("top_k", None, "Top-k (0 = off; default: the config's).")
  flags.DEFINE_float("top_p", None, "Top-p (1 = off; default: the config's).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_integer("steps", None, "Diffusion sampling steps (TransDiff; default: the config's).")
  flags.DEFINE_float("scale_0", None, "Euler-Maruyama drift scale (TransDiff).")
  flags.DEFINE_float("scale_1", None, "Euler-Maruyama noise scale (TransDiff).")
  flags.DEFINE_bool("clip_denoised", None, "DDPM heads: clip x0 predictions to [-1, 1] (default: "
                    "on for pixel latents, off for VAE latents).")
  flags.DEFINE_float("pag_scale", None, "Perturbed-attention guidance scale (attention diffusion "
                     "heads: TransDiff, next-detail diffusion; 0 = off, the default).")
  flags.DEFINE_integer("batch_size", 100, "Samples per sampler call.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out (else an error before sampling).")
  flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
  flags.DEFINE_bool("ema", True, "Use the EMA weights when the checkpoint has them.")
  flags.DEFINE_string("judge", None, "Classifier workdir: report class accuracy and Fréchet distance.")
  cli.define_multihost_flag("the chunks are split over the processes (the parts folder "
                            "beside --out must be on storage every host shares)")


def parse_classes(text: str, num_classes: int) -> list[int]:
  if text == "all":
    return list(range(num_classes))
  try:
    classes = [int(c) for c in text.split(",") if c.strip()]
  except ValueError:
    raise ValueError(f"--classes={text!r}: expected 'all' or comma-separated integers") from None
  bad = [c for c in classes if not 0 <= c < num_classes]
  if bad or not classes:
    raise ValueError(f"--classes: {bad or text!r} out of range; the model has {num_classes} classes "
                     f"(0..{num_classes - 1})")
  return classes


def split_checkpoint_path(path: str) -> tuple[str, int]:
  """WORKDIR/checkpoints/STEP -> (WORKDIR, STEP), with a clear error for anything else."""
  path = ckpt_lib.resolve_workdir(path)        # posixpath splits a gs:// URL as well as a local path
  parent, step = os.path.split(path)
  workdir, ckpts = os.path.split(parent)
  if ckpts != ckpt_lib.CKPT_DIR or not step.isdigit():
    raise ValueError(f"--checkpoint={path}: expected WORKDIR/{ckpt_lib.CKPT_DIR}/STEP (a step folder of a "
                     f"tdjax run)")
  if not epath.Path(path).is_dir():
    raise FileNotFoundError(f"--checkpoint={path}: no such checkpoint")
  return workdir, int(step)


def sampling_devices(batch_size: int, devices=None) -> list:
  """The local devices a batch is split over: the most of them that divide `batch_size` (the batch
  shape, hence every sample, never depends on the device count)."""
  devices = list(devices or jax.local_devices())
  n = max(k for k in range(1, len(devices) + 1) if batch_size % k == 0)
  if n < len(devices):
    logging.warning("--batch_size=%d: sampling on %d of %d local devices (use a multiple of %d to "
                    "use them all)", batch_size, n, len(devices), len(devices))
  return devices[:n]


def generate(workdir: str, classes="all", num: int = 8, *, seed: int = 0, batch_size: int = 100,
             use_ema: bool = True, parts_dir: str | None = None, step: int | None = None,
             devices=None, process_index: int | None = None, process_count: int | None = None,
             stats: dict | None = None, **overrides):
  """(images [C*num, H, W, ch] in [-1, 1], labels, config) from the checkpoint in `workdir`.

  Chunk i (of `batch_size` labels) uses key fold_in(seed, i), so a run is the same however it is
  split.  Each chunk is split over the local devices (batch axis; params replicated).  With several
  processes (multi-host; or `process_index` / `process_count` given), process p samples chunks
  j = p, p + P, ... and writes them to the shared `parts_dir`; after a barrier process 0 gathers
  every part and returns the whole set, the others return None.  `parts_dir`: each finished chunk
  is kept there (uint8-exact float arrays, .npy) and an existing one is reused, so a stopped run
  continues where it stopped.  `stats` (a dict) gets `chunk_seconds`, the wall seconds of each
  chunk this process sampled (not those read back from `parts_dir`; the first one compiles), and
  for TransDiff `sampling_step_flops` (analytic, per image, with the sampling settings used)."""

  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if pc > 1 and not parts_dir:
    raise ValueError("sampling on several processes writes parts to shared storage: give an .npz "
                     "--out that every host can reach")

  config, task, params = runs.load_run(workdir, step=step, use_ema=use_ema)
  if not isinstance(task, GeneratorTask):
    raise ValueError(f"{workdir} holds a {task.kind!r} checkpoint; sampling supports: "
                     f"next_detail, transdiff, next_detail_diffusion")
  overrides = {k: v for k, v in overrides.items() if v is not None}
  unknown = sorted(set(overrides) - set(task.sample_options))
  if unknown:
    raise ValueError(f"{', '.join('--' + k for k in unknown)} does not apply to a {task.kind!r} "
                     f"model (its options: {', '.join(sorted(task.sample_options))})")
  mesh = Mesh(np.array(sampling_devices(batch_size, devices)), ("data",))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  by_example = NamedSharding(mesh, PartitionSpec("data"))
  labels = np.repeat(parse_classes(str(classes), int(config.model.num_classes)), num)
  labels = labels.astype(np.int32)
  sample = task.image_sampler(**overrides)
  timings = [] if stats is None else stats.setdefault("chunk_seconds", [])
  if stats is not None and hasattr(task, "sampling_step_flops"):
    kw = dict(task.config.sample, **overrides)
    stats["sampling_step_flops"] = task.sampling_step_flops(kw.get("cfg", 1.0),
                                                            kw.get("pag_scale", 0.0))
  key = jax.random.key(seed)
  if parts_dir:
    os.makedirs(parts_dir, exist_ok=True)
    settings = dict(workdir=ckpt_lib.resolve_workdir(workdir), step=step, classes=str(classes),
                    num=num, seed=seed, batch_size=batch_size, use_ema=use_ema, **overrides)
    path = os.path.join(parts_dir, "settings.json")
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      if old != json.loads(json.dumps(settings)):
        raise ValueError(f"{parts_dir} holds parts of a run with other settings ({old}); use the "
                         f"same flags to resume it, or delete the folder")
    else:      # every process may write it: each through its own temporary name
      tmp = f"{path}.{pi}.tmp"
      with open(tmp, "w") as f:
        json.dump(settings, f)
      os.replace(tmp, path)
  starts = list(range(0, len(labels), batch_size))
  part_of = lambda i: os.path.join(parts_dir, f"{i:08d}_{len(labels[i:i + batch_size])}.npy")
  images = {}
  for i in tqdm(starts[pi::pc], desc=f"sampling (process {pi} of {pc})", unit="batch",
                disable=len(labels) <= batch_size):
    chunk = labels[i:i + batch_size]
    part = part_of(i) if parts_dir else None
    if part and os.path.exists(part):
      images[i] = np.load(part)
      continue
    pad = batch_size - len(chunk)  # fixed shapes: one compilation for every chunk
    padded = jax.device_put(np.pad(chunk, (0, pad)), by_example)
    t0 = time.perf_counter()
    images[i] = np.asarray(sample(params, padded, jax.random.fold_in(key, i)))[:len(chunk)]
    timings.append(time.perf_counter() - t0)
    if part:
      np.save(part + ".tmp.npy", images[i])
      os.replace(part + ".tmp.npy", part)      # a killed run never leaves a half-written part
    logging.info("sampled %d/%d", i + len(chunk), len(labels))
  if pc > 1:
    parallel.barrier("tdjax.sample: all parts written")
    if pi != 0:
      return None, labels, config
    missing = [part_of(i) for i in starts if i not in images and not os.path.exists(part_of(i))]
    if missing:
      raise RuntimeError(f"{len(missing)} sample parts are missing after every process finished, "
                         f"e.g. {missing[0]}: is {parts_dir} shared by all hosts?")
    images.update({i: np.load(part_of(i)) for i in starts if i not in images})
  return np.concatenate([images[i] for i in starts]), labels, config


def seconds_per_image(timings: list, batch_size: int) -> float | None:
  """Sampling latency per image at `batch_size`: the median wall time of the chunks after the
  first (which compiles) over the chunk size (a padded last chunk costs a full one); None with
  fewer than two chunks sampled (no figure without the compilation in it)."""
  return statistics.median(timings[1:]) / batch_size if len(timings) > 1 else None


def main(argv):
  del argv
  parallel.initialize_distributed(FLAGS.multihost)   # before any other JAX call
  stem, ext = os.path.splitext(FLAGS.out)
  if ext not in (".png", ".npz"):
    raise ValueError(f"--out={FLAGS.out!r}: expected a .png or .npz file")
  for name in ("num", "batch_size"):
    if getattr(FLAGS, name) < 1:
      raise ValueError(f"--{name}={getattr(FLAGS, name)}: expected at least 1")
  if os.path.exists(FLAGS.out) and not FLAGS.overwrite:
    raise FileExistsError(f"--out={FLAGS.out} exists: pass --overwrite to replace it; nothing was "
                          f"sampled")
  if ckpt_lib.is_remote(FLAGS.out):   # os calls would write ./gs:/...; the .npz parts must be shared too
    raise ValueError(f"--out={FLAGS.out!r}: write samples to a local path or one every host "
                     f"mounts (NFS, gcsfuse), not a URL; copy them to the bucket afterwards")
  workdir, step = FLAGS.workdir, FLAGS.step
  if FLAGS.checkpoint:
    if workdir:
      raise ValueError("give --workdir or --checkpoint, not both")
    workdir, step = split_checkpoint_path(FLAGS.checkpoint)
  elif not workdir:
    raise ValueError("--workdir (or --checkpoint) is required")
  # the judge's checkpoint is read by every process (a collective restore); process 0 uses it
  judge = evaluation.ClassifierJudge(FLAGS.judge) if FLAGS.judge else None
  # parts: a resumable .npz, and the processes' shares of a multi-process run (.png too)
  parts = stem + ".parts" if ext == ".npz" or jax.process_count() > 1 else None
  stats = {}
  images, labels, config = generate(
      workdir, FLAGS.classes, FLAGS.num, seed=FLAGS.seed, batch_size=FLAGS.batch_size,
      use_ema=FLAGS.ema, step=step, parts_dir=parts,
      cfg=FLAGS.cfg, cfg_schedule=FLAGS.cfg_schedule, temperature=FLAGS.temperature,
      top_k=FLAGS.top_k, top_p=FLAGS.top_p,
      steps=FLAGS.steps, scale_0=FLAGS.scale_0, scale_1=FLAGS.scale_1,
      clip_denoised=FLAGS.clip_denoised, pag_scale=FLAGS.pag_scale, stats=stats)
  latency = seconds_per_image(stats["chunk_seconds"], FLAGS.batch_size)
  if images is None:                 # another process writes the output
    return
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  if ext == ".npz":
    tmp = stem + ".tmp.npz"
    np.savez(tmp, arr_0=metrics.to_uint8(images), labels=labels)
    os.replace(tmp, FLAGS.out)
  else:
    rows = images.reshape((-1, FLAGS.num) + images.shape[1:])
    metrics.save_png(metrics.image_grid(rows[:, :min(FLAGS.num, 16)]), FLAGS.out)
  if parts:
    shutil.rmtree(parts, ignore_errors=True)
  logging.info("wrote %d samples to %s (%s s per image at batch %d, compilation excluded)",
               len(images), FLAGS.out, latency, FLAGS.batch_size)
  if judge is not None:
    icfg = pipeline.with_defaults(judge.config.input)
    icfg.batch_size = min(len(images), 1000)
    n = len(images)

    def real(split):
      it = pipeline.make_image_pipeline(icfg, seed=1, split=split, train=False)
      return np.concatenate([next(it)["image"] for _ in range(-(-n // icfg.batch_size))])[:n]

    test = real(icfg.eval_split)
    result = {"samples": n, "class_accuracy": judge.class_accuracy(images, labels),
              "frechet_distance": judge.frechet(test, images),
              # the same distance between two real sets (train vs test images): the floor
              "frechet_real_train_vs_test": judge.frechet(test, real(icfg.split)),
              "sampling_seconds_per_image": latency, "batch_size": FLAGS.batch_size,
              "sampling_step_flops": stats.get("sampling_step_flops")}
    with open(stem + "_judge.json", "w") as f:
      json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["out"])
  cli.run(main)

r"""Tokenizer reconstructions: the coarse-to-fine strip, the PSNR-vs-tokens curve, PSNR/SSIM/usage.

  python -m tdjax.reconstruct --workdir runs/demo/tokenizer --out runs/demo/pictures/strip.png \
      [--judge runs/demo/classifier | --inception inception.npz]

Writes
  OUT                    rows = test images; columns = the original, then the image decoded from
                         its first 1, 2, 4, ..., N tokens (each at its decoder resolution R(n)
                         rounded up to the patch, shown nearest-upsampled to the full size)
  OUT_stem_psnr.png      PSNR against the number of tokens
  OUT_stem.json          the curve and, at full N: PSNR, SSIM (data range 1 on [0, 1] images),
                         codebook usage over the evaluated images, and with a feature net
                         (--judge CLASSIFIER_DIR or --inception WEIGHTS.npz, as tdjax.evaluate) the
                         tokenizer's rFID: the Frechet distance between the features of the
                         full-N reconstructions and of the originals (both as uint8 images, as
                         the reference's reconstruct_vq.py saves them; statistics in float64)
PSNR of a prefix is measured at full resolution after PyTorch-exact bicubic upsampling of the
decode, against the original (`psnr`), and at the decoder resolution against the degraded target
the prefix was trained for (`psnr_vs_target`).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from tqdm import tqdm

from tdjax import checkpoint as ckpt_lib
from tdjax import cli, evaluation, metrics, runs
from tdjax.data import pipeline
from tdjax.tokenizers.resolution import (apply_separable, bicubic_matrix, decoder_resolution,
                                         degrade_matrix, resolution_for_prefix)

FLAGS = flags.FLAGS


def _define_flags():
  """CLI flags (defined only when run as a program: tdjax.curves imports this module)."""
  flags.DEFINE_string("workdir", None, "Tokenizer training directory (its checkpoints).")
  flags.DEFINE_string("out", None, "Output PNG for the strip; the curve and JSON go beside it.")
  flags.DEFINE_integer("num", 8, "Images in the strip.")
  flags.DEFINE_integer("eval_images", 1000, "Test images for the PSNR curve and full-N metrics.")
  flags.DEFINE_integer("batch_size", 250, "Evaluation batch size.")
  flags.DEFINE_string("split", "", "Split (default: the config's eval split).")
  flags.DEFINE_integer("seed", 0, "Seed of the test-image order.")
  flags.DEFINE_string("judge", None, "Classifier workdir: class accuracy of the reconstructions and "
                      "the rFID (reconstructions vs originals) on its features.")
  flags.DEFINE_string("inception", None, "InceptionV3 weights .npz (tdjax.convert --kind inception): "
                      "the rFID on its pool_3 features instead of a classifier's.")


def feature_net(judge: str | None, inception: str | None):
  """(judge object with .extract, description) of --judge / --inception (at most one), or
  (None, None)."""
  if judge and inception:
    raise ValueError("give one feature net: --judge CLASSIFIER_DIR or --inception WEIGHTS.npz")
  if inception:
    return evaluation.InceptionJudge(inception), f"InceptionV3 {inception}"
  if judge:
    return evaluation.ClassifierJudge(judge), f"classifier {ckpt_lib.resolve_workdir(judge)}"
  return None, None


def fid_of(net, images_a, images_b, batch_size: int = 500) -> float:
  """FID between two sets of images in [-1, 1] on `net`'s pooled features (uint8-quantised first,
  as sample files are)."""
  sa = evaluation.batch_statistics(net.extract, metrics.to_uint8(images_a), batch_size)
  sb = evaluation.batch_statistics(net.extract, metrics.to_uint8(images_b), batch_size)
  return evaluation.frechet_distance(sa["mu"], sa["sigma"], sb["mu"], sb["sigma"])


def prefix_lengths(N: int) -> list[int]:
  ns, n = [], 1
  while n < N:
    ns.append(n)
    n *= 2
  return ns + [N]


def reconstruct_report(workdir: str, out: str, *, num: int = 8, eval_images: int = 1000,
                       batch_size: int = 250, split: str = "", seed: int = 0,
                       judge: str | None = None, inception: str | None = None) -> dict:

  if not out.endswith(".png") or ckpt_lib.is_remote(out):
    raise ValueError(f"--out={out!r}: expected a local .png path (the curve and JSON go beside "
                     f"it), not a URL")
  net, features = feature_net(judge, inception)
  config, task, params = runs.load_run(workdir, use_ema=False)
  if task.kind != "detailflow_tokenizer":
    raise ValueError(f"{workdir} holds a {task.kind!r} checkpoint, expected a tokenizer")
  gen = params["gen"]
  model, N, R = task.model, task.N, task.image_size
  ns = prefix_lengths(N)
  res = {n: decoder_resolution(resolution_for_prefix(n, N, R, task.recipe.alpha), model.patch) for n in ns}
  tgt = {n: resolution_for_prefix(n, N, R, task.recipe.alpha) for n in ns}

  # the weights are jit arguments, not closed-over constants: smaller programs, and XLA:CPU was
  # seen to miscompile dots against uniform constant matrices (zero-initialised layers)
  @jax.jit
  def codes_of(gen, x):
    q = model.apply({"params": gen}, model.apply({"params": gen}, x, method="encode"),
                    method="quantize")
    return q["z_q"], q.get("indices", jnp.zeros(x.shape[:1] + (N,), jnp.int32))

  decoders = {n: jax.jit(lambda gen, z, n=n: model.apply({"params": gen}, z[:, :n], res[n],
                                                    method="decode")) for n in ns}
  up = {n: bicubic_matrix(res[n], R) for n in ns}
  down = {n: degrade_matrix(R, tgt[n], res[n]) for n in ns}

  icfg = pipeline.with_defaults(config.input)
  icfg.batch_size = batch_size
  data = pipeline.make_image_pipeline(icfg, seed=seed, split=split or icfg.eval_split, train=False)
  sums = {n: [0.0, 0.0] for n in ns}
  full_psnr, full_ssim, used, count = [], [], np.zeros(int(model.codebook_size)), 0
  strip = None
  originals, recons, labels = [], [], []
  bar = tqdm(total=eval_images, desc="reconstruct", unit="image", disable=eval_images <= batch_size)
  while count < eval_images:
    b = next(data)
    x = b["image"][:eval_images - count]
    zq, idx = codes_of(gen, x)
    x01 = (np.asarray(x) + 1) / 2
    cols = [np.asarray(x)]
    for n in ns:
      rec = np.asarray(decoders[n](gen, zq))
      full = np.asarray(apply_separable(jnp.asarray(rec), up[n]))
      target = np.asarray(apply_separable(jnp.asarray(x), down[n]))
      rec01 = np.clip((full + 1) / 2, 0, 1)
      sums[n][0] += evaluation.psnr(rec01, x01).sum()
      sums[n][1] += evaluation.psnr(np.clip((rec + 1) / 2, 0, 1),
                                    np.clip((target + 1) / 2, 0, 1)).sum()
      if n == N:
        if net is not None:
          originals.append(np.asarray(x))
          recons.append(np.clip(full, -1, 1))
          labels.append(np.asarray(b["label"][:len(x)]))
        full_psnr.append(evaluation.psnr(rec01, x01))
        full_ssim.append(evaluation.ssim(rec01, x01))
      if strip is None:
        cols.append(np.repeat(np.repeat(rec[:num], R // res[n], 1), R // res[n], 2)
                    if R % res[n] == 0 else full[:num])
    if strip is None:
      strip = np.stack([c[:num] for c in cols], axis=1)  # [num, 1 + len(ns), R, R, C]
    if model.is_vq:
      np.add.at(used, np.asarray(idx).reshape(-1), 1)
    count += len(x)
    bar.update(len(x))
  bar.close()

  curve = {"tokens": ns, "decoder_resolution": [res[n] for n in ns],
           "target_resolution": [tgt[n] for n in ns],
           "psnr": [sums[n][0] / count for n in ns],
           "psnr_vs_target": [sums[n][1] / count for n in ns]}
  report = {"workdir": ckpt_lib.resolve_workdir(workdir), "num_images": count, "num_tokens": N,
            "image_size": R, "curve": curve,
            "full": {"psnr": float(np.concatenate(full_psnr).mean()),
                     "ssim": float(np.concatenate(full_ssim).mean())}}
  if model.is_vq:
    report["full"]["codebook_usage"] = float((used > 0).mean())
    report["full"]["codebook_size"] = int(len(used))

  if net is not None:  # how much of the feature statistics (and class identity) survives
    xs, rs, ls = (np.concatenate(a) for a in (originals, recons, labels))
    report["full"]["rfid"] = fid_of(net, xs, rs, batch_size)
    report["rfid_features"] = features
    if judge:
      report["judge"] = {"workdir": ckpt_lib.resolve_workdir(judge),
                         "class_accuracy_reconstructions": net.class_accuracy(rs, ls),
                         "class_accuracy_originals": net.class_accuracy(xs, ls),
                         "frechet_reconstructions_vs_originals": net.frechet(xs, rs)}

  stem = os.path.splitext(out)[0]
  metrics.save_png(metrics.image_grid(strip), out)
  _plot_curve(curve, stem + "_psnr.png")
  with open(stem + ".json", "w") as f:
    json.dump(report, f, indent=2)
  logging.info("wrote %s, %s_psnr.png, %s.json", out, stem, stem)
  return report


def _plot_curve(curve: dict, path: str) -> None:
  import matplotlib                 # heavy, and only the report's plot needs it
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
  ax.plot(curve["tokens"], curve["psnr"], "o-", label="vs original (upsampled decode)")
  ax.plot(curve["tokens"], curve["psnr_vs_target"], "s--", label="vs degraded target at R(n)")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("tokens decoded (n)")
  ax.set_ylabel("PSNR (dB)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  del argv
  report = reconstruct_report(FLAGS.workdir, FLAGS.out, num=FLAGS.num,
                              eval_images=FLAGS.eval_images, batch_size=FLAGS.batch_size,
                              split=FLAGS.split, seed=FLAGS.seed, judge=FLAGS.judge,
                              inception=FLAGS.inception)
  print(json.dumps({"full": report["full"], "judge": report.get("judge"), "psnr_curve": dict(zip(report["curve"]["tokens"],
                                                                    report["curve"]["psnr"]))}))


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["workdir", "out"])
  cli.run(main)

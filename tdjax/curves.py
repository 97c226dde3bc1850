r"""DetailFlow's Fig. 4 curves: FID against the number of tokens decoded (4b) and the tokenizer's
reconstruction under noisy tokens (4a), each as JSON and a PNG plot.

  python -m tdjax.curves tokens --ar runs/demo/ar [--tokenizer runs/demo/tokenizer] \
      (--judge runs/demo/classifier | --inception inception.npz) --out runs/demo/curves \
      [--num 500] [--tokens 1,2,4,8,16,32] [--cfg 1.5]
  python -m tdjax.curves noise --tokenizer runs/demo/tokenizer,runs/demo/tokenizer_nosc \
      (--judge ... | --inception ...) --out runs/demo/curves [--fractions 0,0.1,0.2,0.3,0.5]

`tokens` (Fig. 4b): the AR model samples `--num` code sequences (classes 0, 1, ... in turn; its
config's sampling settings unless --cfg is given); the first t codes of each are decoded by the
tokenizer (default: the AR config's `tokenizer_workdir`) at the decoder resolution of the prefix,
R(t) rounded up to the patch, as the tokenizer was trained for, then upsampled to the full size
with PyTorch-exact bicubic (as `tdjax.reconstruct`).  gFID(t): the Frechet distance of these images
to `--num` real test images on the feature net's pooled features.  The same prefixes of the real
images' own codes give rFID(t) and PSNR(t) beside it.  Writes OUT/fid_vs_tokens.{json,png}.

`noise` (Fig. 4a): the real test images are encoded, a fraction f of each image's N codes (random
positions, drawn per image) is replaced by codes drawn uniformly from the codebook, and the full
sequence is decoded; rFID(f) and PSNR(f) against the originals, for each tokenizer given (e.g. one
trained with self-correction and one with `correction=False`: one curve each, the same positions
and random codes for tokenizers of one N and codebook size).  Writes OUT/noisy_tokens.{json,png}.

Images enter the feature net as uint8 (sample files' quantisation); statistics in float64.  With
few images (the tiny runs) the distances are dominated by the estimate's bias: compare curves
measured on the same number of images only.
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
from tdjax import cli, evaluation, metrics, reconstruct, runs
from tdjax.data import pipeline
from tdjax.generators.next_detail import check_tokenizer_pair
from tdjax.tasks.detailflow_tokenizer import load_tokenizer
from tdjax.tokenizers.resolution import (apply_separable, bicubic_matrix, decoder_resolution,
                                         resolution_for_prefix)

FLAGS = flags.FLAGS

DEFAULT_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def _define_flags():
  flags.DEFINE_string("tokenizer", None, "tokens: the tokenizer workdir (default: the AR config's "
                      "tokenizer_workdir); noise: one or more comma-separated tokenizer workdirs.")
  flags.DEFINE_string("ar", None, "tokens: the next-detail AR workdir.")
  flags.DEFINE_string("judge", None, "Classifier workdir whose features the FIDs use.")
  flags.DEFINE_string("inception", None, "InceptionV3 weights .npz (tdjax.convert --kind "
                      "inception) instead of a classifier.")
  flags.DEFINE_string("out", None, "Output folder (JSON and PNG).")
  flags.DEFINE_integer("num", 500, "Generated and real images per point.")
  flags.DEFINE_list("tokens", None, "tokens: prefix lengths t (default 1, 2, 4, ..., N).")
  flags.DEFINE_list("fractions", None, "noise: fractions of codes replaced (default "
                    + ",".join(f"{f:g}" for f in DEFAULT_FRACTIONS) + ").")
  flags.DEFINE_list("names", None, "noise: curve names, one per tokenizer (default: the folder "
                    "names, marked 'self-correction' when trained with it).")
  flags.DEFINE_float("cfg", None, "tokens: CFG scale of the AR sampling (default: the config's).")
  flags.DEFINE_integer("batch_size", 100, "Images per sampler / decoder call.")
  flags.DEFINE_integer("seed", 0, "Seed of the samples, the real images' order and the noise.")
  flags.DEFINE_string("split", "", "Real images' split (default: the tokenizer config's eval split).")


class _Tokenizer:
  """A DetailFlow VQ tokenizer run: its codes of real images and prefix decodes at full size."""

  def __init__(self, workdir: str):
    self.task, params, self.config = load_tokenizer(workdir)
    if not self.task.model.is_vq:
      raise ValueError(f"{workdir}: a continuous tokenizer has no codes to sample or replace; "
                       f"these curves need a VQ tokenizer")
    self.workdir = ckpt_lib.resolve_workdir(workdir)
    self.gen = params["gen"]
    self.model, self.N, self.R = self.task.model, self.task.N, self.task.image_size
    self.V = int(self.model.codebook_size)
    self.self_correction = bool(self.task.self_correction)
    model = self.model
    self._codes = jax.jit(lambda g, x: model.apply(
        {"params": g}, model.apply({"params": g}, x, method="encode"), method="quantize")["indices"])
    self._decode = jax.jit(
        lambda g, idx, res: jnp.clip(model.apply(
            {"params": g}, model.apply({"params": g}, idx, method="lookup"), res,
            method="decode"), -1, 1), static_argnums=2)

  def resolution(self, t: int) -> int:
    return decoder_resolution(resolution_for_prefix(t, self.N, self.R, self.task.recipe.alpha),
                              self.model.patch)

  def codes(self, images, batch_size: int) -> np.ndarray:
    return np.concatenate([np.asarray(self._codes(self.gen, jnp.asarray(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])

  def decode(self, codes, t: int, batch_size: int) -> np.ndarray:
    """Images [B, R, R, C] in [-1, 1] from the first t of each row of codes [B, N]: decoded at
    R(t) (rounded up to the patch), bicubic-upsampled to R."""
    res = self.resolution(t)
    up = bicubic_matrix(res, self.R) if res != self.R else None
    out = []
    for i in range(0, len(codes), batch_size):
      y = self._decode(self.gen, jnp.asarray(codes[i:i + batch_size, :t], jnp.int32), res)
      if up is not None:
        y = jnp.clip(apply_separable(y, up), -1, 1)
      out.append(np.asarray(y))
    return np.concatenate(out)


def real_images(config, num: int, *, seed: int = 0, split: str = "") -> np.ndarray:
  """`num` real images (float, [-1, 1]) of the tokenizer's dataset, eval split by default."""
  icfg = pipeline.with_defaults(config.input)
  icfg.batch_size = min(num, 250)
  it = pipeline.make_image_pipeline(icfg, seed=seed, split=split or icfg.eval_split, train=False)
  return np.concatenate([np.asarray(next(it)["image"])
                         for _ in range(-(-num // icfg.batch_size))])[:num].astype(np.float32)


class _Fid:
  """FID against fixed real images on a feature net: the real statistics are computed once."""

  def __init__(self, net, reals, batch_size: int):
    self.net, self.batch_size = net, batch_size
    self.real = self._stats(reals)

  def _stats(self, images):
    return evaluation.batch_statistics(self.net.extract, metrics.to_uint8(images), self.batch_size)

  def __call__(self, images) -> float:
    s = self._stats(images)
    return evaluation.frechet_distance(self.real["mu"], self.real["sigma"], s["mu"], s["sigma"])


def _psnr(images, reals) -> float:
  return float(evaluation.psnr((np.asarray(images) + 1) / 2, (np.asarray(reals) + 1) / 2).mean())


def _needs_net(judge, inception):
  net, features = reconstruct.feature_net(judge, inception)
  if net is None:
    raise ValueError("give a feature net: --judge CLASSIFIER_DIR or --inception WEIGHTS.npz")
  return net, features


def token_curve(ar: str, out: str, *, tokenizer: str | None = None, judge: str | None = None,
                inception: str | None = None, num: int = 500, tokens=None, cfg: float | None = None,
                batch_size: int = 100, seed: int = 0, split: str = "") -> dict:
  """DetailFlow Fig. 4b: gFID of AR samples decoded from their first t tokens (and the real
  images' rFID / PSNR at the same t), for each t; writes OUT/fid_vs_tokens.{json,png}."""
  net, features = _needs_net(judge, inception)
  ar_config, task, params = runs.load_run(ar)
  if task.kind != "next_detail":
    raise ValueError(f"{ar} holds a {task.kind!r} checkpoint, expected a next_detail AR model")
  tokenizer = tokenizer or ar_config.get("tokenizer_workdir", "")
  if not tokenizer:
    raise ValueError(f"{ar}: its config names no tokenizer_workdir; give --tokenizer")
  tok = _Tokenizer(tokenizer)
  check_tokenizer_pair(tok.N, tok.V, task.model.num_tokens, task.model.vocab_size)
  ts = sorted({int(t) for t in tokens}) if tokens else reconstruct.prefix_lengths(tok.N)
  bad = [t for t in ts if not 1 <= t <= tok.N]
  if bad:
    raise ValueError(f"--tokens: {bad} out of range 1..{tok.N} (the tokenizer's N)")

  sample = task.sample_fn()
  overrides = {} if cfg is None else {"cfg": float(cfg)}
  labels = (np.arange(num) % int(task.model.num_classes)).astype(np.int32)
  key = jax.random.key(seed)
  codes = []
  for i in tqdm(range(0, num, batch_size), desc="sampling codes", unit="batch",
                disable=num <= batch_size):
    chunk = labels[i:i + batch_size]
    pad = batch_size - len(chunk)      # one compiled shape for every chunk
    c = sample(params, np.pad(chunk, (0, pad)), jax.random.fold_in(key, i), **overrides)
    codes.append(np.asarray(c)[:len(chunk)])
  codes = np.concatenate(codes)

  reals = real_images(tok.config, num, seed=seed, split=split)
  real_codes = tok.codes(reals, batch_size)
  fid = _Fid(net, reals, batch_size)
  rows = []
  for t in tqdm(ts, desc="FID per token count", unit="t"):
    rec = tok.decode(real_codes, t, batch_size)
    rows.append(dict(tokens=t, decoder_resolution=tok.resolution(t),
                     gfid=fid(tok.decode(codes, t, batch_size)), rfid=fid(rec),
                     psnr=_psnr(rec, reals)))
    logging.info("t=%d: %s", t, rows[-1])
  sample_cfg = dict(ar_config.get("sample", {}), **overrides)
  report = dict(figure="DetailFlow Fig. 4b", ar=ckpt_lib.resolve_workdir(ar),
                tokenizer=tok.workdir, features=features, num_samples=num, num_real=len(reals),
                num_tokens=tok.N, image_size=tok.R, sample=sample_cfg, seed=seed, points=rows)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "fid_vs_tokens")
  with open(path + ".json", "w") as f:
    json.dump(report, f, indent=2)
  fid_label = f"FID ({features.split()[0]} features)"
  _plot([([("gFID (AR samples)", ts, [r["gfid"] for r in rows]),
           ("rFID (real images' codes)", ts, [r["rfid"] for r in rows])], fid_label),
         ([("PSNR (real images' codes)", ts, [r["psnr"] for r in rows])], "PSNR (dB)")],
        "tokens decoded (t)", f"FID vs tokens, N={tok.N}, {num} images", path + ".png",
        log2x=True)
  logging.info("wrote %s.json and .png", path)
  return report


def noisy_codes(codes, fraction: float, vocab: int, seed: int):
  """codes [B, N] with round(fraction N) positions per row (random, per row) replaced by codes
  drawn uniformly from the vocabulary; the same draws for the same (seed, B, N, vocab)."""
  codes = np.array(codes)
  b, n = codes.shape
  k = int(round(fraction * n))
  rng = np.random.default_rng(seed)
  order = np.argsort(rng.random((b, n)), axis=1)     # a random permutation per row
  replacement = rng.integers(0, vocab, (b, n))
  rows = np.arange(b)[:, None]
  pos = order[:, :k]
  codes[rows, pos] = replacement[rows, pos]
  return codes


def noise_curve(tokenizers, out: str, *, judge: str | None = None, inception: str | None = None,
                num: int = 500, fractions=DEFAULT_FRACTIONS, names=None, batch_size: int = 100,
                seed: int = 0, split: str = "") -> dict:
  """DetailFlow Fig. 4a: rFID / PSNR of full-sequence decodes with a fraction of the codes
  replaced by random ones, per tokenizer; writes OUT/noisy_tokens.{json,png}."""
  net, features = _needs_net(judge, inception)
  tokenizers = [tokenizers] if isinstance(tokenizers, str) else list(tokenizers)
  if names and len(names) != len(tokenizers):
    raise ValueError(f"--names: {len(names)} names for {len(tokenizers)} tokenizers")
  fractions = sorted({float(f) for f in fractions})
  if any(not 0 <= f <= 1 for f in fractions):
    raise ValueError(f"--fractions {fractions}: expected values in [0, 1]")
  toks = [_Tokenizer(w) for w in tokenizers]
  reals = real_images(toks[0].config, num, seed=seed, split=split)
  for t in toks[1:]:
    if (t.R, t.model.channels) != (toks[0].R, toks[0].model.channels):
      raise ValueError(f"{t.workdir} codes {t.R}px images, {toks[0].workdir} {toks[0].R}px: "
                       f"compare tokenizers of one image size")
  fid = _Fid(net, reals, batch_size)
  curves = []
  for i, tok in enumerate(toks):
    name = names[i] if names else (os.path.basename(tok.workdir.rstrip("/"))
                                   + (" (self-correction)" if tok.self_correction else
                                      " (no self-correction)"))
    clean = tok.codes(reals, batch_size)
    points = []
    for f in tqdm(fractions, desc=f"noisy tokens: {name}", unit="fraction"):
      rec = tok.decode(noisy_codes(clean, f, tok.V, seed), tok.N, batch_size)
      points.append(dict(fraction=f, tokens_replaced=int(round(f * tok.N)), rfid=fid(rec),
                         psnr=_psnr(rec, reals)))
      logging.info("%s f=%g: %s", name, f, points[-1])
    curves.append(dict(name=name, tokenizer=tok.workdir, self_correction=tok.self_correction,
                       num_tokens=tok.N, codebook_size=tok.V, points=points))
  report = dict(figure="DetailFlow Fig. 4a", features=features, num_real=len(reals), seed=seed,
                curves=curves)
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "noisy_tokens")
  with open(path + ".json", "w") as f:
    json.dump(report, f, indent=2)
  xs = lambda c: [p["fraction"] for p in c["points"]]
  _plot([([(c["name"], xs(c), [p["rfid"] for p in c["points"]]) for c in curves],
          f"rFID ({features.split()[0]} features)"),
         ([(c["name"], xs(c), [p["psnr"] for p in c["points"]]) for c in curves], "PSNR (dB)")],
        "fraction of codes replaced by random codes",
        f"noisy-token reconstruction, {len(reals)} images", path + ".png")
  logging.info("wrote %s.json and .png", path)
  return report


def _plot(panels, xlabel: str, title: str, path: str, log2x: bool = False) -> None:
  """One panel per (series [(label, xs, ys)], ylabel), side by side."""
  import matplotlib                 # a declared dependency; imported only for the plot
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), dpi=120,
                           squeeze=False)
  for ax, (series, ylabel) in zip(axes[0], panels):
    for (label, xs, ys), style in zip(series, ("o-", "s--", "^-.", "d:")):
      ax.plot(xs, ys, style, label=label)
    if log2x:
      ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  if len(argv) != 2 or argv[1] not in ("tokens", "noise"):
    raise ValueError(f"expected one command, 'tokens' (Fig. 4b) or 'noise' (Fig. 4a), got "
                     f"{argv[1:]}")
  if not FLAGS.out:
    raise ValueError("--out (a folder) is required")
  common = dict(judge=FLAGS.judge, inception=FLAGS.inception, num=FLAGS.num,
                batch_size=FLAGS.batch_size, seed=FLAGS.seed, split=FLAGS.split)
  if argv[1] == "tokens":
    if not FLAGS.ar:
      raise ValueError("tokens: --ar (the next-detail AR workdir) is required")
    report = token_curve(FLAGS.ar, FLAGS.out, tokenizer=FLAGS.tokenizer, tokens=FLAGS.tokens,
                         cfg=FLAGS.cfg, **common)
    print(json.dumps({r["tokens"]: {k: r[k] for k in ("gfid", "rfid", "psnr")}
                      for r in report["points"]}))
  else:
    if not FLAGS.tokenizer:
      raise ValueError("noise: --tokenizer (one or more comma-separated workdirs) is required")
    report = noise_curve(FLAGS.tokenizer.split(","), FLAGS.out, names=FLAGS.names,
                         fractions=FLAGS.fractions or DEFAULT_FRACTIONS, **common)
    print(json.dumps({c["name"]: {p["fraction"]: [p["rfid"], p["psnr"]] for p in c["points"]}
                      for c in report["curves"]}))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

"""Offline evaluation with a classifier trained on the real data (no Inception weights offline).

For a class-conditional generator on Fashion-MNIST: the fraction of samples the classifier assigns
to the requested class, and the Fréchet distance between the classifier's penultimate features of
real and generated images (FID's formula on another feature net; statistics in float64).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from tqdm import tqdm

from tdjax import runs
from tdjax.nn import inception


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), in float64.

  The symmetric form has the same trace as (S1 S2)^1/2 and needs only symmetric eigensolvers.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"feature statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {s1.shape} vs {s2.shape}")
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = root1 @ s2 @ root1
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  f = np.asarray(features, np.float64)
  return f.mean(0), np.cov(f, rowvar=False)


class ClassifierJudge:
  """A trained `classifier` task checkpoint used as the judge of generated images."""

  def __init__(self, workdir: str):
    config, task, params = runs.load_run(workdir)
    if task.kind != "classifier":
      raise ValueError(f"{workdir} holds a {task.kind!r} checkpoint, expected a classifier")
    self.config, self.task, self.params = config, task, params
    self._fn = jax.jit(lambda p, x: task.features(p, x))
    self._all = jax.jit(lambda p, x: task.all_features(p, x))
    self.image_size = int(config.input.image_size)

  def _checked(self, images):
    images = np.asarray(images, np.float32)
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}, the classifier expects "
                       f"{self.image_size}x{self.image_size}")
    return images

  def logits_and_features(self, images, batch_size: int = 500):
    images = self._checked(images)
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
      lo, fe = self._fn(self.params, images[i:i + batch_size])
      logits.append(np.asarray(lo))
      feats.append(np.asarray(fe))
    return np.concatenate(logits), np.concatenate(feats)

  def extract(self, images):
    """(logits, pooled features, spatial features) of one batch in [-1, 1] (evaluate_batches)."""
    return self._all(self.params, self._checked(images))

  def class_accuracy(self, images, labels) -> float:
    logits, _ = self.logits_and_features(images)
    return float((logits.argmax(-1) == np.asarray(labels)).mean())

  def frechet(self, images_a, images_b) -> float:
    _, fa = self.logits_and_features(images_a)
    _, fb = self.logits_and_features(images_b)
    return frechet_distance(*feature_statistics(fa), *feature_statistics(fb))


# ------------------------------------------------------------------------------------------------
# The ADM evaluation suite's metrics on any feature net (guided-diffusion evaluations/evaluator.py)
# ------------------------------------------------------------------------------------------------

class InceptionJudge:
  """The FID InceptionV3 (`tdjax.nn.inception`) with converted pytorch-fid weights as the feature
  net of `evaluate_batches`: logits (1008), pool_3 (2048), ADM's sFID spatial features (2023)."""

  def __init__(self, weights: str):
    self.variables = inception.load_variables(weights)
    self._fn = jax.jit(lambda v, x: inception.InceptionV3().apply(v, x))

  def extract(self, images):
    """Images in [-1, 1], [B, H, W, 1 or 3], any size (resized to 299x299 inside)."""
    return self._fn(self.variables, np.asarray(images, np.float32))


def inception_score(logits, split_size: int = 5000) -> float:
  """exp(E_x KL(p(y|x) || p(y))), p(y) the mean over each split of `split_size` samples, averaged
  over the splits (ADM: splits of 5,000; the last, shorter split included only when it is full)."""
  logits = np.asarray(logits, np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  p = np.exp(logp)
  scores = []
  for i in range(0, len(p), split_size):
    part, lpart = p[i:i + split_size], logp[i:i + split_size]
    if scores and len(part) < split_size:
      break
    marginal = np.log(part.mean(0, keepdims=True))
    scores.append(float(np.exp(np.mean(np.sum(part * (lpart - marginal), axis=1)))))
  return float(np.mean(scores))


def _sq_distances(a, b) -> np.ndarray:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d = (a * a).sum(1)[:, None] - 2.0 * a @ b.T + (b * b).sum(1)[None]
  return np.maximum(d, 0.0)


def manifold_radii(features, k: int = 3, row_batch: int = 10000) -> np.ndarray:
  """Squared distance of each point to its k-th nearest neighbour in the same set (the point
  itself is the 0-th), ADM's ManifoldEstimator with nhood_size k = 3."""
  f = np.asarray(features, np.float64)
  if len(f) <= k:
    raise ValueError(f"precision/recall need more than k={k} samples per set, got {len(f)}")
  out = np.empty(len(f))
  for i in range(0, len(f), row_batch):
    d = _sq_distances(f[i:i + row_batch], f)
    out[i:i + row_batch] = np.partition(d, k, axis=1)[:, k]
  return out


def _coverage(points, manifold, radii, row_batch: int = 10000) -> float:
  """Fraction of `points` inside at least one ball (manifold_j, radius_j)."""
  inside = []
  for i in range(0, len(points), row_batch):
    d = _sq_distances(points[i:i + row_batch], manifold)
    inside.append((d <= radii[None]).any(1))
  return float(np.concatenate(inside).mean())


def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) as ADM computes them: precision =
  share of samples inside the real manifold (k-NN balls), recall = share of real points inside
  the samples' manifold."""
  real, fake = np.asarray(real_features, np.float64), np.asarray(fake_features, np.float64)
  precision = _coverage(fake, real, manifold_radii(real, k))
  recall = _coverage(real, fake, manifold_radii(fake, k))
  return precision, recall


def load_image_batch(path: str, key: str = "arr_0") -> tuple[np.ndarray, np.ndarray | None]:
  """An ADM-format .npz -> (uint8 images [N, H, W, C], labels [N] or None); clear errors."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  with np.load(path) as f:
    if key not in f.files:
      raise ValueError(f"{path}: no '{key}' array (found {', '.join(f.files) or 'nothing'}); "
                       f"expected the ADM format (arr_0 uint8 NHWC)" +
                       (" or reference statistics (mu, sigma)" if key == "arr_0" else ""))
    images = f[key]
    labels = f["labels"] if "labels" in f.files else (f["arr_1"] if "arr_1" in f.files else None)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ValueError(f"{path}: '{key}' is {images.dtype} {images.shape}, expected uint8 [N, H, W, C]")
  return images, labels


def load_reference_statistics(path: str) -> dict | None:
  """The feature statistics stored in a reference .npz, {'mu', 'sigma'} and, when both are there,
  {'mu_s', 'sigma_s'} (sFID's), float64; None when it stores none.  ADM's reference batches
  (VIRTUAL_imagenet256_labeled.npz: arr_0 and all four) and the FID statistics files of MAR /
  TransDiff / torch-fidelity (mu and sigma only) have them."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  with np.load(path) as f:
    if "mu" not in f.files or "sigma" not in f.files:
      return None
    stats = {k: np.asarray(f[k], np.float64) for k in ("mu", "sigma", "mu_s", "sigma_s")
             if k in f.files}
  for m, c in (("mu", "sigma"), ("mu_s", "sigma_s")):
    if m in stats and c not in stats or c in stats and m not in stats:
      raise ValueError(f"{path}: '{m}' and '{c}' come in pairs, found only one of them")
    if m in stats and (stats[m].ndim != 1 or stats[c].shape != 2 * stats[m].shape):
      raise ValueError(f"{path}: '{m}' is {stats[m].shape} and '{c}' {stats[c].shape}; expected "
                       f"[D] and [D, D]")
  return stats


def batch_statistics(extract, images, batch_size: int = 500) -> dict:
  """{'mu', 'sigma', 'mu_s', 'sigma_s'} (float64) of uint8 images on extract's pooled and
  spatial features: what a reference statistics file holds (`np.savez(path, **stats)`)."""
  _, pool, spatial = _features(extract, images, batch_size)
  (mu, sigma), (mu_s, sigma_s) = feature_statistics(pool), feature_statistics(spatial)
  return dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)


def _features(extract, images, batch_size, desc: str = "features"):
  """(logits, pooled, spatial) of uint8 images, extract() on [-1, 1] batches of `batch_size`."""
  starts = range(0, len(images), batch_size)
  out = [extract(images[i:i + batch_size].astype(np.float32) / 127.5 - 1.0)
         for i in tqdm(starts, desc=desc, unit="batch", disable=len(starts) <= 1)]
  return [np.concatenate([np.asarray(o[j]) for o in out]) for j in range(3)]


def _stored_frechet(stats: dict, mu: str, sigma: str, features, what: str) -> float:
  got = features.shape[1]
  if stats[mu].shape[0] != got:
    raise ValueError(f"the reference statistics '{mu}' have {stats[mu].shape[0]} features, the "
                     f"feature net's {what} features {got}: statistics of another feature net?")
  return frechet_distance(stats[mu], stats[sigma], *feature_statistics(features))


def evaluate_batches(extract, samples, reference, sample_labels=None, *, batch_size: int = 500,
                     k: int = 3) -> dict:
  """FID, sFID, IS, precision, recall (and class accuracy when labels are given) of uint8 sample
  images against uint8 reference images; extract(float images in [-1, 1]) -> (logits, pooled,
  spatial) per batch.  Statistics in float64.

  `reference` may instead be stored statistics (a dict, `load_reference_statistics`): FID from
  'mu' / 'sigma', sFID from 'mu_s' / 'sigma_s' when present, IS from the samples alone; precision
  and recall need the reference images' features, so they are None then, and
  result['not_computed'] says why for each metric left out."""
  if isinstance(reference, dict):
    s_logits, s_pool, s_spatial = _features(extract, samples, batch_size, "sample features")
    no_images = "the reference holds feature statistics only (no images)"
    result = {
        "num_samples": int(len(samples)), "num_reference": None,
        "reference_statistics": sorted(reference),
        "fid": _stored_frechet(reference, "mu", "sigma", s_pool, "pooled"),
        "sfid": None, "inception_score": inception_score(s_logits),
        "precision": None, "recall": None,
        "not_computed": {"precision": f"{no_images}: precision needs the reference features",
                         "recall": f"{no_images}: recall needs the reference features"}}
    if "mu_s" in reference:
      result["sfid"] = _stored_frechet(reference, "mu_s", "sigma_s", s_spatial, "spatial")
    else:
      result["not_computed"]["sfid"] = "the reference statistics have no mu_s / sigma_s"
  else:
    if samples.shape[1:] != reference.shape[1:]:
      raise ValueError(f"samples are {samples.shape[1:]} images, the reference batch "
                       f"{reference.shape[1:]}: evaluate images of one size")
    s_logits, s_pool, s_spatial = _features(extract, samples, batch_size, "sample features")
    _, r_pool, r_spatial = _features(extract, reference, batch_size, "reference features")
    precision, recall = precision_recall(r_pool, s_pool, k)
    result = {
        "num_samples": int(len(samples)), "num_reference": int(len(reference)),
        "fid": frechet_distance(*feature_statistics(r_pool), *feature_statistics(s_pool)),
        "sfid": frechet_distance(*feature_statistics(r_spatial), *feature_statistics(s_spatial)),
        "inception_score": inception_score(s_logits),
        "precision": precision, "recall": recall}
  if sample_labels is not None:
    result["class_accuracy"] = float((s_logits.argmax(-1) == np.asarray(sample_labels)).mean())
  return result


def psnr(a, b, data_range: float = 1.0) -> np.ndarray:
  """Per-image PSNR of images in [0, data_range] (NHWC) -> [N]."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
  return 10.0 * np.log10(data_range ** 2 / np.maximum(mse, 1e-20))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-x ** 2 / (2 * sigma ** 2))
  return g / g.sum()


def ssim(a, b, data_range: float = 1.0) -> np.ndarray:
  """Per-image SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, valid
  region, mean over channels), NHWC images in [0, data_range] -> [N].

  Note: DetailFlow's evaluation calls scikit-image with data_range=2 on [0, 1] images, which
  inflates SSIM; this is the usual convention (data_range = the images' actual range).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  w = _gaussian_window()

  def filt(x):  # separable valid filtering over H and W
    x = np.apply_along_axis(lambda r: np.convolve(r, w, mode="valid"), 1, x)
    return np.apply_along_axis(lambda r: np.convolve(r, w, mode="valid"), 2, x)

  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_a, mu_b = filt(a), filt(b)
  saa = filt(a * a) - mu_a ** 2
  sbb = filt(b * b) - mu_b ** 2
  sab = filt(a * b) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
  return s.reshape(len(a), -1).mean(1)

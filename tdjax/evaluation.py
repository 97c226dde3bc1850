"""Offline evaluation with a classifier trained on the real data (no Inception weights offline).

For a class-conditional generator on Fashion-MNIST: the fraction of samples the classifier assigns
to the requested class, and the Fréchet distance between the classifier's penultimate features of
real and generated images (FID's formula on another feature net; statistics in float64).
"""

from __future__ import annotations

import numpy as np


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
    import jax
    from tdjax import trainer
    config, task, state = trainer.load_for_inference(workdir)
    if task.kind != "classifier":
      raise ValueError(f"{workdir} holds a {task.kind!r} checkpoint, expected a classifier")
    self.config, self.task = config, task
    self.params = jax.device_get(state.get("ema", state["params"]))
    self._fn = jax.jit(lambda p, x: task.features(p, x))
    self.image_size = int(config.input.image_size)

  def logits_and_features(self, images, batch_size: int = 500):
    images = np.asarray(images, np.float32)
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"images are {images.shape[1]}x{images.shape[2]}, the classifier expects "
                       f"{self.image_size}x{self.image_size}")
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
      lo, fe = self._fn(self.params, images[i:i + batch_size])
      logits.append(np.asarray(lo))
      feats.append(np.asarray(fe))
    return np.concatenate(logits), np.concatenate(feats)

  def class_accuracy(self, images, labels) -> float:
    logits, _ = self.logits_and_features(images)
    return float((logits.argmax(-1) == np.asarray(labels)).mean())

  def frechet(self, images_a, images_b) -> float:
    _, fa = self.logits_and_features(images_a)
    _, fb = self.logits_and_features(images_b)
    return frechet_distance(*feature_statistics(fa), *feature_statistics(fb))


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

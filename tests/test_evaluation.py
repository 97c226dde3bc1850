"""Fréchet distance against closed forms, and the classifier judge on a trained checkpoint."""

import numpy as np

from tdjax.evaluation import feature_statistics, frechet_distance


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 5))
  s = a @ a.T + np.eye(5)
  mu = rng.normal(size=5)
  assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
  # equal covariances: only the mean term remains
  assert np.isclose(frechet_distance(mu, s, mu + 2.0, s), 4.0 * 5)
  # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
  d1, d2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
  assert np.isclose(frechet_distance(np.zeros(3), d1, np.zeros(3), d2), 1.0 + 1.0 + 0.0)
  # sample statistics of two Gaussians approach the analytic value
  x = rng.normal(size=(20000, 3))
  y = rng.normal(size=(20000, 3)) * 2.0 + 1.0
  got = frechet_distance(*feature_statistics(x), *feature_statistics(y))
  assert abs(got - (3 * 1.0 + 3 * (2.0 - 1.0) ** 2)) < 0.15


def test_psnr_and_ssim_known_values():
  from tdjax.evaluation import psnr, ssim
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(2, 32, 32, 1))
  assert np.allclose(ssim(a, a), 1.0) and np.all(np.isinf(psnr(a, a)) | (psnr(a, a) > 190))
  b = np.clip(a + 0.1, 0, 1)
  assert np.allclose(psnr(a, a + 0.1), 20.0)  # mse 0.01 -> 20 dB
  # a constant shift keeps structure: SSIM stays high; noise destroys it
  assert ssim(a, b).min() > 0.9
  noisy = np.clip(a + rng.normal(0, 0.3, a.shape), 0, 1)
  assert ssim(a, noisy).max() < 0.7
  # independent direct computation on one 11x11 window (the valid region of an 11x11 image)
  x, y = rng.uniform(size=(1, 11, 11, 1)), rng.uniform(size=(1, 11, 11, 1))
  w = np.outer(*(2 * [np.exp(-(np.arange(11) - 5) ** 2 / 4.5)]))
  w /= w.sum()
  mx, my = (w * x[0, ..., 0]).sum(), (w * y[0, ..., 0]).sum()
  vx = (w * (x[0, ..., 0] - mx) ** 2).sum()
  vy = (w * (y[0, ..., 0] - my) ** 2).sum()
  cxy = (w * (x[0, ..., 0] - mx) * (y[0, ..., 0] - my)).sum()
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  want = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
  assert np.isclose(ssim(x, y)[0], want)

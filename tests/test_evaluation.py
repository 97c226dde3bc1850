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

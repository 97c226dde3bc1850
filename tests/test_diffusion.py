"""Rectified flow (TransDiff): logit-normal t, loss, Euler-Maruyama and Euler samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdjax.diffusion import flow

MU, S = 1.5, 0.5     # Gaussian target x0 ~ N(MU, S^2) per dimension


def optimal_velocity(x, t):
  """v*(x, t) = E[eps - x0 | x_t = x] for x0 ~ N(MU, S^2), eps ~ N(0, 1), x_t = (1-t) x0 + t eps."""
  t = t.reshape(t.shape + (1,) * (x.ndim - 1))
  m, var = (1 - t) * MU, (1 - t) ** 2 * S ** 2 + t ** 2
  return -MU + (t - (1 - t) * S ** 2) / var * (x - m)


def test_logit_normal_t():
  t = np.asarray(flow.sample_t(jax.random.key(0), 200_000))
  np.testing.assert_allclose(t * 1000, np.round(t * 1000), atol=1e-3)     # on the 1/1000 grid
  assert t.min() >= 0 and t.max() < 1
  # quantiles of floor(1000 sigmoid(N(0,1)))/1000
  for q, z in ((0.1, -1.2815516), (0.5, 0.0), (0.9, 1.2815516)):
    assert abs(np.quantile(t, q) - np.floor(1000 / (1 + np.exp(-z))) / 1000) < 0.004


def test_loss_is_minimised_by_the_optimal_velocity():
  x0 = MU + S * jax.random.normal(jax.random.key(1), (20_000, 4))
  vf = lambda x, t, c: optimal_velocity(x, t)
  best, _ = flow.flow_matching_loss(vf, x0, {}, jax.random.key(2))
  worse, _ = flow.flow_matching_loss(lambda x, t, c: optimal_velocity(x, t) + 0.1, x0, {},
                                     jax.random.key(2))
  assert float(worse) > float(best) + 0.009
  # irreducible error: E_t[Var(eps - x0 | x_t)] = E_t[(1 + S^2) - (t - (1-t) S^2)^2 / V_t]
  t = np.asarray(flow.sample_t(jax.random.key(3), 400_000))
  irreducible = np.mean(1 + S ** 2 - (t - (1 - t) * S ** 2) ** 2 / ((1 - t) ** 2 * S ** 2 + t ** 2))
  assert abs(float(best) - irreducible) < 0.02


@pytest.mark.parametrize("sampler", ["euler", "euler_maruyama"])
def test_samplers_reach_the_gaussian_target(sampler):
  noise = jax.random.normal(jax.random.key(4), (20_000, 2))
  vf = lambda x, t: optimal_velocity(x, t)
  if sampler == "euler":
    x = jax.jit(lambda n: flow.euler_sample(vf, n, steps=200))(noise)
  else:
    x = jax.jit(lambda n: flow.euler_maruyama_sample(vf, n, jax.random.key(5), steps=250,
                                                     t_last=0.01))(noise)
  assert abs(float(x.mean()) - MU) < 0.03
  assert abs(float(x.std()) - S) < 0.03


def test_euler_maruyama_steps_by_hand():
  """steps=2, t_last=0.5: grid (1, 0.5, 0); constant velocity c."""
  c, x0 = 0.3, jnp.array([[1.0, -2.0]])
  key = jax.random.key(7)
  out = flow.euler_maruyama_sample(lambda x, t: jnp.full_like(x, c), x0, key, steps=2, t_last=0.5,
                                   scale_0=0.9, scale_1=0.8)
  z = jax.random.normal(jax.random.fold_in(key, 0), x0.shape)
  d0 = (2 - 1.0) * c + x0                                  # drift at t = 1
  x1 = x0 + 0.9 * d0 * (-0.5) + 0.8 * np.sqrt(2 * 1.0) * np.sqrt(0.5) * z
  d1 = (2 - 0.5) * c + x1                                  # last step: deterministic, no scale_0
  np.testing.assert_allclose(out, x1 + d1 * (-0.5), rtol=1e-6)
  # drift identity d = v - w s / 2 = (2 - t) v + x
  v, x, t = jnp.array([0.7, -1.1]), jnp.array([2.0, 0.5]), 0.3
  np.testing.assert_allclose(flow.sde_drift(v, x, t), (2 - t) * v + x, rtol=1e-6)


def test_guidance_and_errors():
  noise = jax.random.normal(jax.random.key(8), (4, 3))
  vc = lambda x, t: optimal_velocity(x, t)
  vu = lambda x, t: -0.5 * x
  one = flow.euler_maruyama_sample(lambda x, t: (vc(x, t), vu(x, t)), noise, jax.random.key(9),
                                   steps=5, cfg=1.0 + 1e-9)
  plain = flow.euler_maruyama_sample(vc, noise, jax.random.key(9), steps=5)
  np.testing.assert_allclose(one, plain, rtol=1e-5, atol=1e-5)   # cfg -> 1: the conditional one
  g = 2.5   # guidance on the drift == guidance on v (the drift is affine in v)
  a = flow.euler_maruyama_sample(lambda x, t: (vc(x, t), vu(x, t)), noise, jax.random.key(9),
                                 steps=5, cfg=g)
  b = flow.euler_maruyama_sample(lambda x, t: vu(x, t) + g * (vc(x, t) - vu(x, t)), noise,
                                 jax.random.key(9), steps=5)
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="cfg=0.5 must be >= 1"):
    flow.euler_sample(vc, noise, steps=3, cfg=0.5)
  with pytest.raises(ValueError, match="steps=0"):
    flow.euler_maruyama_sample(vc, noise, jax.random.key(0), steps=0)
  assert flow.num_function_evals(100, 1.3) == 200


def test_batch_mul_pairs_examples_with_their_condition():
  x0 = jnp.arange(3.0)[:, None] * jnp.ones((3, 2))
  seen = {}

  def vf(x, t, cond):
    seen["cond"], seen["b"] = cond["c"], x.shape[0]
    return jnp.zeros_like(x)

  flow.flow_matching_loss(vf, x0, {"c": jnp.arange(3)}, jax.random.key(0), batch_mul=4)
  assert seen["b"] == 12
  # the condition as given, once per example: the heads pair x_t's row i with cond row i % 3
  np.testing.assert_array_equal(seen["cond"], np.arange(3))
  # ... which is the pairing of x0's copies: the same loss as batch_mul=1 on tiled x0 and cond
  from tdjax.nn.attention import tile_rows
  c = jnp.array([0.5, -1.0, 2.0])
  shared = flow.flow_matching_loss(lambda x, t, c: x * tile_rows(c, x.shape[0])[:, None], x0, c,
                                   jax.random.key(3), batch_mul=4)[0]
  tiled = flow.flow_matching_loss(lambda x, t, c: x * c[:, None], jnp.tile(x0, (4, 1)),
                                  jnp.tile(c, 4), jax.random.key(3))[0]
  np.testing.assert_allclose(shared, tiled, rtol=1e-6)
  with pytest.raises(ValueError, match="batch_mul=0"):
    flow.flow_matching_loss(vf, x0, {}, jax.random.key(0), batch_mul=0)

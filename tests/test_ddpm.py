"""MAR's DDPM: cosine schedule, respacing, posterior, hybrid loss, ancestral sampler."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdjax.diffusion import ddpm

MU, S = 1.5, 0.5     # Gaussian target x0 ~ N(MU, S^2)


def test_cosine_alpha_bar_closed_form():
  s = ddpm.Schedule.make(1000)
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  ab = s.alphas_cumprod
  for t in (0, 10, 500, 900):
    np.testing.assert_allclose(ab[t], f((t + 1) / 1000) / f(0), rtol=1e-9)
  assert s.betas.max() == pytest.approx(0.999)      # the last beta hits the cap


def test_respacing_keeps_alpha_bar_at_the_kept_steps():
  keep = ddpm.space_timesteps(1000, 100)
  assert len(keep) == 100 and keep[0] == 0 and keep[-1] == 999
  assert keep[1] == round(999 / 99) and keep[6] == 61          # round(60.55), not its floor
  for steps in (25, 50, 100, 250):     # iDDPM: round a running sum of (T - 1) / (S - 1) strides
    cur, want = 0.0, []
    for _ in range(steps):
      want.append(round(cur))
      cur += 999 / (steps - 1)
    np.testing.assert_array_equal(ddpm.space_timesteps(1000, steps), want)
  full, sp = ddpm.Schedule.make(1000), ddpm.Schedule.make(1000, 100)
  np.testing.assert_allclose(sp.alphas_cumprod, full.alphas_cumprod[keep], rtol=1e-9)
  np.testing.assert_array_equal(sp.timesteps, keep)
  with pytest.raises(ValueError, match="sampling steps=0"):
    ddpm.space_timesteps(1000, 0)


def test_posterior_is_the_gaussian_conditional():
  """q(x_{t-1} | x_t, x0) from the joint Gaussian of (x_{t-1}, x_t) given x0."""
  s = ddpm.Schedule.make(1000, 50)
  t = 17
  abp, beta = s.alphas_cumprod_prev[t], s.betas[t]
  x0, xt = 0.7, -0.4
  m1, v1 = math.sqrt(abp) * x0, 1 - abp                      # x_{t-1} | x0
  m2, v2 = math.sqrt(1 - beta) * m1, (1 - beta) * v1 + beta  # x_t | x0
  cov = math.sqrt(1 - beta) * v1
  mean = m1 + cov / v2 * (xt - m2)
  var = v1 - cov ** 2 / v2
  m, lv = ddpm.q_posterior(s, jnp.array([[x0]]), jnp.array([[xt]]), jnp.array([t]))
  np.testing.assert_allclose(float(m[0, 0]), mean, rtol=1e-5)
  np.testing.assert_allclose(float(jnp.exp(lv[0, 0])), var, rtol=1e-4)


def _optimal_eps(s, x, t):
  ab = jnp.asarray(s.alphas_cumprod, jnp.float32)[t][:, None]
  return jnp.sqrt(1 - ab) / (ab * S ** 2 + 1 - ab) * (x - jnp.sqrt(ab) * MU)


def test_sampler_reaches_the_gaussian_target_and_temperature_shrinks_it():
  full = ddpm.Schedule.make(1000)
  s = ddpm.Schedule.make(1000, 100)
  # the network sees original indices: the optimal eps is computed on the full chain
  model = lambda x, t: _optimal_eps(full, x, t)
  noise = jax.random.normal(jax.random.key(0), (20_000, 2))
  run = jax.jit(lambda n, tau: ddpm.p_sample_loop(s, model, n, jax.random.key(1), learn_sigma=False,
                                                  temperature=tau), static_argnums=1)
  x = run(noise, 1.0)
  assert abs(float(x.mean()) - MU) < 0.03 and abs(float(x.std()) - S) < 0.03
  assert float(run(noise, 0.5).std()) < S - 0.05
  with pytest.raises(ValueError, match="temperature=0"):
    ddpm.p_sample_loop(s, model, noise, jax.random.key(1), temperature=0)


def test_clip_denoised_clips_the_x0_prediction_before_the_posterior():
  s = ddpm.Schedule.make(1000, 50)
  x = 3.0 * jax.random.normal(jax.random.key(0), (64, 4))
  out = jax.random.normal(jax.random.key(1), (64, 8))
  t = jnp.array([49] * 32 + [10] * 32)
  mean, logvar, _ = ddpm.p_mean_logvar(s, out, x, t, clip_x0=True)
  a = jnp.asarray(s.alphas_cumprod, jnp.float32)[t][:, None]
  x0 = (x - jnp.sqrt(1 - a) * out[:, :4]) / jnp.sqrt(a)
  assert float(jnp.abs(x0).max()) > 10            # the unclipped prediction leaves [-1, 1]
  want, _ = ddpm.q_posterior(s, jnp.clip(x0, -1, 1), x, t)
  np.testing.assert_allclose(mean, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(logvar, ddpm.p_mean_logvar(s, out, x, t)[1])
  # the last step (t = 0) returns the x0 prediction itself: clipped, a valid image whatever the
  # network says (here an eps that is half of x_t); unclipped, far outside
  noise = jax.random.normal(jax.random.key(2), (2000, 2))
  run = lambda clip: np.asarray(ddpm.p_sample_loop(s, lambda x, t: 0.5 * x, noise,
                                                   jax.random.key(3), learn_sigma=False,
                                                   clip_denoised=clip))
  assert np.abs(run(True)).max() <= 1.0
  assert np.abs(run(False)).max() > 2.0


def test_cfg_guides_eps_and_keeps_the_conditional_variance():
  s = ddpm.Schedule.make(1000, 5)
  calls = []

  def model(x, t):
    calls.append(1)
    oc = jnp.concatenate([jnp.ones_like(x), jnp.full_like(x, -1.0)], -1)   # variance -> beta~
    ou = jnp.concatenate([jnp.zeros_like(x), jnp.full_like(x, 1.0)], -1)
    return oc, ou

  x = ddpm.p_sample_loop(s, model, jnp.zeros((1, 3)), jax.random.key(0), cfg=2.0,
                         temperature=1.0)
  ref = ddpm.p_sample_loop(s, lambda x, t: jnp.concatenate([jnp.full_like(x, 2.0),
                                                            jnp.full_like(x, -1.0)], -1),
                           jnp.zeros((1, 3)), jax.random.key(0), temperature=1.0)
  np.testing.assert_allclose(x, ref, atol=1e-5)


def test_hybrid_loss_optimal_eps_and_frozen_mean():
  s = ddpm.Schedule.make(1000)
  x0 = MU + S * jax.random.normal(jax.random.key(2), (4000, 4))

  def model(shift):
    def f(x_t, t, c):
      e = _optimal_eps(s, x_t.reshape(-1, 1), jnp.repeat(t, x_t.shape[-1])).reshape(x_t.shape)
      return jnp.concatenate([e + shift, jnp.full_like(e, c["v"])], -1)
    return f

  best, mb = ddpm.training_loss(s, model(0.0), x0, {"v": jnp.zeros((4000,))[:, None]},
                                jax.random.key(3))
  worse, mw = ddpm.training_loss(s, model(0.2), x0, {"v": jnp.zeros((4000,))[:, None]},
                                 jax.random.key(3))
  assert float(mw["mse"]) > float(mb["mse"]) + 0.03
  assert np.isfinite(float(best)) and float(mb["vb"]) > 0

  # L_vb trains the variance only: its gradient w.r.t. the eps output is zero
  def vb_of(eps_shift, v):
    f = lambda x_t, t, c: jnp.concatenate([jnp.zeros_like(x_t) + eps_shift,
                                           jnp.full_like(x_t, v)], -1)
    _, m = ddpm.training_loss(s, f, x0[:64], {}, jax.random.key(4))
    return m["vb"]
  g_eps, g_v = jax.grad(vb_of, argnums=(0, 1))(0.1, 0.2)
  assert float(g_eps) == 0.0 and abs(float(g_v)) > 0


def test_per_token_steps_make_each_token_a_mar_row():
  """per_token_t: a [B, L, C] batch is MAR's B * L independent rows, each with its own step (MAR's
  DiffLoss draws t per token): the loss equals that of the rows laid out as [B * L, 1, C] with the
  same draws, and the steps differ inside an example (one step per example would not)."""
  s = ddpm.Schedule.make(1000)
  rng = np.random.default_rng(0)
  b, l, c = 3, 5, 2
  x0 = jnp.asarray(rng.normal(size=(b, l, c)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(c + 1, 2 * c)), jnp.float32)
  seen = []

  def per_token_fn(x, t, cond):        # each token on its own, its step as an input
    seen.append(t)
    tt = jnp.broadcast_to((t if t.ndim == 2 else t[:, None]) / 1000.0, x.shape[:2])[..., None]
    return jnp.concatenate([x, tt], -1) @ w

  key = jax.random.key(3)
  loss, m = ddpm.training_loss(s, per_token_fn, x0, None, key, per_token_t=True)
  flat, mf = ddpm.training_loss(s, per_token_fn, x0.reshape(b * l, 1, c), None, key)
  assert seen[0].shape == (b, l) and len(np.unique(np.asarray(seen[0])[0])) > 1
  np.testing.assert_array_equal(np.asarray(seen[0]).reshape(-1), np.asarray(seen[1]))
  for k in ("mse", "vb"):
    np.testing.assert_allclose(float(m[k]), float(mf[k]), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(flat), rtol=1e-5)

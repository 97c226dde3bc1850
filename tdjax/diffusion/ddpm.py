"""MAR's DDPM for the per-token MLP head (docs/reference/transdiff.md 6; iDDPM / DiT
`gaussian_diffusion`).

Schedule: T = 1000 steps, cosine alpha-bar (Nichol & Dhariwal), betas capped at 0.999:

    alpha_bar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2,   beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999)

Forward:  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
Posterior q(x_{t-1} | x_t, x0) = N(c0_t x0 + ct_t x_t, beta~_t),  beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t).
The network predicts eps and, with `learn_sigma`, v in [-1, 1] for the learned-range variance

    log sigma_t^2 = (v + 1)/2 log beta_t + (1 - (v + 1)/2) log beta~_t        (beta~_0 := beta~_1)

Loss ("hybrid", as MAR trains it): mean (eps_hat - eps)^2 + L_vb, where L_vb (in bits per dim) is
KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0 and the discretised-Gaussian decoder NLL at t = 0,
computed with the predicted mean frozen (only the variance learns from L_vb).

Sampling: respaced to S steps (`space_timesteps`: S evenly spaced, rounded, indices of 0..T-1; the
respaced betas are 1 - abar_{tau_i} / abar_{tau_{i-1}}), ancestral steps
x_{t-1} = mean + [t > 0] exp(log sigma^2 / 2) z * temperature, CFG on eps only (each half keeps its
own variance).  The network always sees the original 0..T-1 index.  `clip_denoised` clips the
predicted x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) to [-1, 1] before the posterior mean
(iDDPM / ADM for pixels); MAR samples its unbounded KL-16 latents without it.  Data in [-1, 1]
(tdjax's pixel-patch latents) need it: the cosine schedule's last step has abar ~ 2.4e-9, so the
first respaced step multiplies the eps error by 1 / sqrt(alpha) (316 at 100 steps, 632 at 50).  In
a 500-step demo-size MLP head the first x0 prediction has std ~1,500 (eps error ~0.08); unclipped,
the chain never comes back (x std 48 after one step, ~1,400 at the end: saturated pixel noise);
clipped, x keeps std ~1 and ends at the data's ~0.7.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tdjax.diffusion.flow import repeat_batch


def cosine_betas(num_steps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
  abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), max_beta)
                   for i in range(num_steps)], np.float64)


def space_timesteps(num_steps: int, sample_steps: int) -> np.ndarray:
  """The kept original indices (iDDPM `space_timesteps(T, str(S))` with one section)."""
  if not 0 < sample_steps <= num_steps:
    raise ValueError(f"sampling steps={sample_steps}: expected 1..{num_steps}")
  if sample_steps == 1:
    return np.array([0])
  stride = (num_steps - 1) / (sample_steps - 1)
  return np.array(sorted({round(i * stride) for i in range(sample_steps)}))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Float64 tables of one (possibly respaced) chain; `timesteps[i]` = network index of step i."""
  betas: np.ndarray
  timesteps: np.ndarray

  @classmethod
  def make(cls, num_steps: int = 1000, sample_steps: int | None = None):
    betas = cosine_betas(num_steps)
    if sample_steps is None or sample_steps == num_steps:
      return cls(betas, np.arange(num_steps))
    keep = space_timesteps(num_steps, sample_steps)
    abar = np.cumprod(1 - betas)[keep]
    new = 1 - abar / np.concatenate([[1.0], abar[:-1]])
    return cls(new, keep)

  @property
  def num_steps(self) -> int:
    return len(self.betas)

  @property
  def alphas_cumprod(self):
    return np.cumprod(1 - self.betas)

  @property
  def alphas_cumprod_prev(self):
    return np.concatenate([[1.0], self.alphas_cumprod[:-1]])

  @property
  def posterior_variance(self):
    a, ap = self.alphas_cumprod, self.alphas_cumprod_prev
    return self.betas * (1 - ap) / (1 - a)

  @property
  def posterior_log_variance_clipped(self):
    v = self.posterior_variance
    return np.log(np.concatenate([v[1:2], v[1:]])) if len(v) > 1 else np.log(self.betas)

  @property
  def posterior_coefs(self):
    a, ap = self.alphas_cumprod, self.alphas_cumprod_prev
    return self.betas * np.sqrt(ap) / (1 - a), (1 - ap) * np.sqrt(1 - self.betas) / (1 - a)


def _at(table, t, x):
  v = jnp.asarray(np.asarray(table, np.float32))[t]
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def q_sample(s: Schedule, x0, t, eps):
  a = s.alphas_cumprod
  return _at(np.sqrt(a), t, x0) * x0 + _at(np.sqrt(1 - a), t, x0) * eps


def q_posterior(s: Schedule, x0, x_t, t):
  c0, ct = s.posterior_coefs
  return (_at(c0, t, x_t) * x0 + _at(ct, t, x_t) * x_t,
          _at(s.posterior_log_variance_clipped, t, x_t))


def p_mean_logvar(s: Schedule, out, x_t, t, learn_sigma: bool = True, clip_x0: bool = False):
  """Network output [.., 2C] (eps, v) or [.., C] (eps; fixed small variance beta~) -> (mean,
  log variance, eps); `clip_x0` clips the predicted x0 to [-1, 1] (module docstring)."""
  c = x_t.shape[-1]
  eps = out[..., :c]
  if learn_sigma:
    frac = (out[..., c:2 * c] + 1) / 2
    logvar = frac * _at(np.log(s.betas), t, x_t) + (1 - frac) * _at(
        s.posterior_log_variance_clipped, t, x_t)
  else:
    logvar = jnp.broadcast_to(_at(s.posterior_log_variance_clipped, t, x_t), x_t.shape)
  a = s.alphas_cumprod
  x0 = _at(np.sqrt(1 / a), t, x_t) * x_t - _at(np.sqrt(1 / a - 1), t, x_t) * eps
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
  mean, _ = q_posterior(s, x0, x_t, t)
  return mean, logvar, eps


def normal_kl(m1, lv1, m2, lv2):
  return 0.5 * (-1.0 + lv2 - lv1 + jnp.exp(lv1 - lv2) + (m1 - m2) ** 2 * jnp.exp(-lv2))


def _std_normal_cdf(x):
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, mean, log_scale):
  """log P(bin of x) for 256 bins over [-1, 1] (iDDPM's decoder term; the tanh CDF approximation)."""
  centered = x - mean
  inv = jnp.exp(-log_scale)
  cdf_plus = _std_normal_cdf(inv * (centered + 1 / 255.0))
  cdf_min = _std_normal_cdf(inv * (centered - 1 / 255.0))
  log_cdf_plus = jnp.log(jnp.clip(cdf_plus, 1e-12))
  log_1m_cdf_min = jnp.log(jnp.clip(1 - cdf_min, 1e-12))
  log_delta = jnp.log(jnp.clip(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_1m_cdf_min, log_delta))


def training_loss(s: Schedule, model_fn: Callable, x0, cond, rng, *, batch_mul: int = 1,
                  learn_sigma: bool = True, per_token_t: bool = False):
  """Hybrid loss of module docstring; model_fn(x_t, t_index [B], cond) -> [B, .., 2C or C].
  `batch_mul` repeats (x0, cond) with independent (t, eps), as MAR's `diffusion_batch_mul`.
  per_token_t: x0 [B, L, C] draws a step per token (t [B, L]), as MAR's DiffLoss does (its rows are
  tokens: `t = randint(T, (bsz * seq_len * mul,))`); otherwise one per example."""
  x0, cond = repeat_batch(x0, cond, batch_mul)
  k_t, k_e = jax.random.split(rng)
  t = jax.random.randint(k_t, x0.shape[:2] if per_token_t else (x0.shape[0],), 0, s.num_steps)
  eps = jax.random.normal(k_e, x0.shape, jnp.float32)
  out = model_fn(q_sample(s, x0, t, eps), t, cond).astype(jnp.float32)
  c = x0.shape[-1]
  mse = jnp.mean((out[..., :c] - eps) ** 2)
  metrics = {"mse": mse}
  loss = mse
  if learn_sigma:
    frozen = jnp.concatenate([jax.lax.stop_gradient(out[..., :c]), out[..., c:]], -1)
    x_t = q_sample(s, x0, t, eps)
    mean, logvar, _ = p_mean_logvar(s, frozen, x_t, t)
    true_mean, true_logvar = q_posterior(s, x0, x_t, t)
    kl = normal_kl(true_mean, true_logvar, mean, logvar) / math.log(2.0)
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar) / math.log(2.0)
    axes = tuple(range(t.ndim, x0.ndim))
    vb = jnp.where(t == 0, jnp.mean(nll, axes), jnp.mean(kl, axes))
    metrics["vb"] = jnp.mean(vb)
    loss = mse + jnp.mean(vb)
  metrics["diffusion_loss"] = loss
  return loss, metrics


def p_sample_loop(s: Schedule, model_fn: Callable, noise, rng, *, cfg: float = 1.0,
                  temperature: float = 1.0, learn_sigma: bool = True,
                  clip_denoised: bool = False):
  """Ancestral sampling over the (respaced) schedule `s`.  cfg > 1: model_fn returns (out_cond,
  out_uncond) for one batch and eps is guided, eps = eps_u + cfg (eps_c - eps_u).
  `clip_denoised`: x0 predictions clipped to [-1, 1] (for data in that range)."""
  if cfg < 1:
    raise ValueError(f"cfg={cfg} must be >= 1 (1 = no guidance)")
  if temperature <= 0:
    raise ValueError(f"temperature={temperature}: expected > 0")
  b, c = noise.shape[0], noise.shape[-1]
  net_t = jnp.asarray(s.timesteps, jnp.int32)

  def body(j, x):
    i = s.num_steps - 1 - j
    t = jnp.full((b,), i, jnp.int32)
    if cfg == 1:
      out = model_fn(x, net_t[t])
    else:
      oc, ou = model_fn(x, net_t[t])
      eps = ou[..., :c] + cfg * (oc[..., :c] - ou[..., :c])
      out = jnp.concatenate([eps, oc[..., c:]], -1)
    mean, logvar, _ = p_mean_logvar(s, out.astype(jnp.float32), x, t, learn_sigma, clip_denoised)
    z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    return mean + (i > 0) * jnp.exp(0.5 * logvar) * z * temperature

  return jax.lax.fori_loop(0, s.num_steps, body, noise)

"""Rectified flow as TransDiff trains and samples it (docs/reference/transdiff.md 1.5, 1.6).

Path and target (linear interpolation, noise at t = 1):

    x_t = (1 - t) x0 + t eps,        v*(x_t, t) = E[eps - x0 | x_t],        L = mean (v - (eps - x0))^2

with t = floor(1000 sigmoid(n)) / 1000, n ~ N(0, 1) (logit-normal, discretised as the reference).

Sampler (SiT/REPA-style Euler-Maruyama, reference 1.6): grid t_0 = 1 > ... > t_{S-1} = t_last (S
points, linspace) then 0.  With alpha = 1 - t, sigma = t, the score from the velocity is
s = (-(1 - t) v - x) / t and the diffusion coefficient w = 2t, so the reverse-SDE drift is

    d = v - w s / 2 = (2 - t) v + x.

For the first S - 1 intervals (dt = t_{i+1} - t_i < 0):
    x <- x + scale_0 d dt + scale_1 sqrt(2 t) sqrt(|dt|) N(0, I)
and the last interval (t_last -> 0) is the deterministic x <- x + d dt (no scale_0).  Classifier-free
guidance acts on the drift: d = d_u + cfg (d_c - d_u) (the same as guiding v).

`velocity_fn(x, t)` below takes x [B, ...] and t [B] in [0, 1]; a guided sampler takes a velocity
function that returns (v_cond, v_uncond) for one batch (evaluate both halves in one call).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def sample_t(rng, batch: int, *, mean: float = 0.0, std: float = 1.0, discrete: int = 1000):
  """Logit-normal t in [0, 1); discrete > 0 rounds down to the 1/discrete grid (reference)."""
  t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))
  return jnp.floor(t * discrete) / discrete if discrete else t


def _bcast(t, x):
  return jnp.reshape(t, t.shape + (1,) * (x.ndim - t.ndim))


def interpolate(x0, eps, t):
  """x_t = (1 - t) x0 + t eps, t [B] broadcast over the trailing axes."""
  t = _bcast(t, x0)
  return (1 - t) * x0 + t * eps


def velocity_target(x0, eps):
  return eps - x0


def repeat_batch(x0, cond, batch_mul: int):
  """`diffusion_batch_mul`: every example (x0 and each leaf of `cond`, leading axis) repeated
  batch_mul times, row i of the output = example i mod B, for independent noise draws."""
  if batch_mul < 1:
    raise ValueError(f"batch_mul={batch_mul}: expected >= 1")
  tile = lambda a: jnp.tile(a, (batch_mul,) + (1,) * (a.ndim - 1))
  return tile(x0), jax.tree.map(tile, cond)


def flow_matching_loss(velocity_fn: Callable, x0, cond, rng, *, batch_mul: int = 1,
                       t_mean: float = 0.0, t_std: float = 1.0):
  """Mean-squared velocity error.  `batch_mul` repeats every example (row i of x_t = example
  i mod B) with independent (t, eps) draws, as the reference's `diffusion_batch_mul`.
  velocity_fn(x_t, t, cond) -> v gets `cond` as given, B rows for B * batch_mul rows of x_t: the
  heads (`tdjax.generators.heads`) pair x_t's row i with cond row i mod B and compute what depends
  on the condition alone (its embedding, the cross-attention keys and values) once per example,
  where the reference computes it for every copy.  Returns (loss, metrics)."""
  x0, _ = repeat_batch(x0, None, batch_mul)
  k_t, k_e = jax.random.split(rng)
  t = sample_t(k_t, x0.shape[0], mean=t_mean, std=t_std)
  eps = jax.random.normal(k_e, x0.shape, x0.dtype)
  v = velocity_fn(interpolate(x0, eps, t), t, cond)
  err = jnp.mean((v.astype(jnp.float32) - velocity_target(x0, eps).astype(jnp.float32)) ** 2)
  return err, {"flow_loss": err, "t_mean": jnp.mean(t)}


def sde_drift(v, x, t):
  """Reverse-SDE drift from the velocity: v - w s / 2 with s = (-(1 - t) v - x) / t, w = 2 t."""
  t = _bcast(jnp.asarray(t, x.dtype), x)
  score = (-(1 - t) * v - x) / t
  return v - 0.5 * (2 * t) * score


def _check(steps, cfg):
  if int(steps) <= 0:
    raise ValueError(f"sampling steps={steps}: expected > 0")
  if cfg < 1:
    raise ValueError(f"cfg={cfg} must be >= 1 (1 = no guidance)")


def time_grid(steps: int, t_last: float = 0.04):
  """linspace(1, t_last, steps) followed by 0: steps + 1 points, steps intervals."""
  return jnp.concatenate([jnp.linspace(1.0, t_last, steps), jnp.zeros((1,))])


def euler_maruyama_sample(velocity_fn: Callable, noise, rng, *, steps: int = 100,
                          t_last: float = 0.04, cfg: float = 1.0, scale_0: float = 1.0,
                          scale_1: float = 1.0):
  """Reference sampler (module docstring).  cfg > 1: velocity_fn returns (v_cond, v_uncond)."""
  _check(steps, cfg)
  grid = time_grid(steps, t_last)
  b = noise.shape[0]

  def drift(x, t):
    tb = jnp.full((b,), t, x.dtype)
    if cfg == 1:
      return sde_drift(velocity_fn(x, tb), x, t)
    vc, vu = velocity_fn(x, tb)
    du, dc = sde_drift(vu, x, t), sde_drift(vc, x, t)
    return du + cfg * (dc - du)

  def body(i, x):
    t, t_next = grid[i], grid[i + 1]
    dt = t_next - t
    z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
    return x + scale_0 * drift(x, t) * dt + scale_1 * jnp.sqrt(2 * t) * jnp.sqrt(jnp.abs(dt)) * z

  x = jax.lax.fori_loop(0, steps - 1, body, noise)
  t, t_next = grid[steps - 1], grid[steps]
  return x + drift(x, t) * (t_next - t)


def euler_sample(velocity_fn: Callable, noise, *, steps: int = 50, cfg: float = 1.0):
  """Plain Euler ODE from t = 1 to 0 with uniform steps: x <- x + v dt (guided v when cfg > 1)."""
  _check(steps, cfg)
  b = noise.shape[0]
  dt = -1.0 / steps

  def body(i, x):
    t = jnp.full((b,), 1.0 + i * dt, x.dtype)
    if cfg == 1:
      v = velocity_fn(x, t)
    else:
      vc, vu = velocity_fn(x, t)
      v = vu + cfg * (vc - vu)
    return x + v * dt

  return jax.lax.fori_loop(0, steps, body, noise)


def num_function_evals(steps: int, cfg: float = 1.0) -> int:
  """Network evaluations per sample (a guided step evaluates the doubled batch once: count 2)."""
  return steps * (2 if cfg != 1 else 1)


def pag_guided(out_cond, out_perturbed, pag_scale: float, cfg: float = 1.0, channels=None):
  """Perturbed-attention guidance (Ahn et al. 2024) folded into the conditional output so that
  the samplers' classifier-free guidance u + cfg (c - u) gives
      v = v_u + cfg (v_c - v_u) + pag_scale (v_c - v_pag)
  (without CFG: v_c + pag_scale (v_c - v_pag)).  The returned c' = v_c + (pag_scale / cfg)
  (v_c - v_pag).  channels=C: only the first C channels (a DDPM head's eps, not its variance)."""
  w = float(pag_scale) / float(cfg)
  c = out_cond.shape[-1] if channels is None else channels
  guided = out_cond[..., :c] + w * (out_cond[..., :c] - out_perturbed[..., :c])
  return jnp.concatenate([guided, out_cond[..., c:]], axis=-1) if c < out_cond.shape[-1] else guided

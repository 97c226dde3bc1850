"""Bottlenecks of the 1D tokenizer: l2-normalised VQ (DetailFlow) and a continuous one.

Both return a dict with
  z_q      [B, N, d]  values fed to the decoder (straight-through for VQ)
  z        [B, N, d]  (VQ) the l2-normalised encoder latents that were quantised
  loss     []         bottleneck loss (VQ: codebook + commitment; continuous: KL * weight)
  and for VQ: indices [B, N] (top-1), noisy_indices [B, N] (uniform among the top_k nearest,
  = indices when top_k <= 1, and outside `noise_window` when one is given), vq_loss, commit_loss.

VQ usage statistics live in the mutable collection 'vq_stats' (`counts` [K], decayed each call
with `usage_decay`), updated only when that collection is mutable.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_lp = nn.with_logical_partitioning
Dtype = Any


def l2_normalize(x, axis=-1, eps=1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def _masked_mean(sq, mask):
  """sq [B, N, d]; mask [B, N] or None -> mean over masked positions and dims."""
  if mask is None:
    return jnp.mean(sq)
  m = mask.astype(jnp.float32)[..., None]
  return jnp.sum(sq * m) / jnp.maximum(jnp.sum(m) * sq.shape[-1], 1.0)


class VectorQuantizer(nn.Module):
  codebook_size: int = 8192
  code_dim: int = 8
  l2_norm: bool = True
  codebook_weight: float = 1.0
  commitment: float = 0.25
  usage_decay: float = 0.99

  def setup(self):
    k = self.codebook_size
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -1.0 / k,
                                                                   1.0 / k)
    self.codebook = self.param("codebook", _lp(init, ("codebook", "code_dim")),
                               (self.codebook_size, self.code_dim), jnp.float32)
    self.counts = None
    if self.has_variable("vq_stats", "counts") or self.is_mutable_collection("vq_stats"):
      self.counts = self.variable("vq_stats", "counts", jnp.zeros, (self.codebook_size,),
                                  jnp.float32)

  def embedding(self):
    cb = self.codebook.astype(jnp.float32)
    return l2_normalize(cb) if self.l2_norm else cb

  def lookup(self, indices):
    """Code vectors of indices [...] (normalised rows, as the reference's get_codebook_entry)."""
    return jnp.take(self.embedding(), indices, axis=0)

  def similarity(self, z):
    """-(squared distance) up to a per-token constant: [.., K]; on unit vectors = 2 cos - 1."""
    z = l2_normalize(z) if self.l2_norm else z.astype(jnp.float32)
    e = self.embedding()
    s = jnp.einsum("...d,kd->...k", z, e, precision="highest")
    if not self.l2_norm:
      s = 2 * s - jnp.sum(e * e, -1)
    return z, s

  def __call__(self, z, *, top_k: int = 0, rng=None, loss_mask=None, noise_window=None):
    """noise_window = (start, length): the self-correction perturbs only tokens
    start .. start + length - 1 (start scalar or [B]; z [B, N, d]), so only those get noisy
    indices: the top-k search then runs on B * length rows instead of B * N (8-16x less at the
    papers' N / g), with the same values there as without the window."""
    z, sim = self.similarity(z)
    idx = jnp.argmax(sim, axis=-1).astype(jnp.int32)
    noisy = idx
    if top_k and top_k > 1:
      if rng is None:
        rng = self.make_rng("noise")
      k = min(top_k, self.codebook_size)
      # full-shape draw even with a window: the same draws, hence the same codes, as without
      pick = jax.random.randint(rng, idx.shape, 0, k)
      noisy = top_k_perturb(sim, idx, pick, k, noise_window)
    zq = self.lookup(idx)
    vq = _masked_mean((zq - jax.lax.stop_gradient(z)) ** 2, loss_mask)
    commit = _masked_mean((jax.lax.stop_gradient(zq) - z) ** 2, loss_mask)
    zq_st = z + jax.lax.stop_gradient(zq - z)
    if (self.counts is not None and self.is_mutable_collection("vq_stats")
        and not self.is_initializing()):
      w = jnp.ones(idx.shape, jnp.float32) if loss_mask is None else loss_mask.astype(jnp.float32)
      hist = jnp.zeros((self.codebook_size,), jnp.float32).at[idx.reshape(-1)].add(w.reshape(-1))
      self.counts.value = self.counts.value * self.usage_decay + hist
    return dict(z_q=zq_st, z=z, indices=idx, noisy_indices=noisy, vq_loss=vq, commit_loss=commit,
                loss=self.codebook_weight * vq + self.commitment * commit)


def top_k_perturb(sim, idx, pick, k: int, window=None):
  """noisy = the pick-th nearest code of each token (pick 0 = the nearest;
  docs/reference/detailflow.md 1.6: a uniform draw among the top-k).  sim [.., N, K], idx / pick
  [.., N] int.

  window = (start, length): only tokens start .. start + length - 1 of each sequence (sim
  [B, N, K], start scalar or [B]) are perturbed, the rest keep idx; positions past N - 1 are
  clipped (their duplicate writes carry the same value)."""
  if window is None:
    _, nearest = jax.lax.top_k(sim, k)
    return jnp.take_along_axis(nearest, pick[..., None], axis=-1)[..., 0].astype(jnp.int32)
  start, length = window
  b, n = idx.shape
  start = jnp.broadcast_to(jnp.asarray(start, jnp.int32).reshape(-1, 1), (b, 1))
  pos = jnp.minimum(start + jnp.arange(length, dtype=jnp.int32)[None], n - 1)      # [B, L]
  _, nearest = jax.lax.top_k(jnp.take_along_axis(sim, pos[..., None], axis=1), k)  # [B, L, k]
  pick_w = jnp.take_along_axis(pick, pos, axis=1)
  noisy_w = jnp.take_along_axis(nearest, pick_w[..., None], axis=-1)[..., 0].astype(jnp.int32)
  return idx.at[jnp.arange(b)[:, None], pos].set(noisy_w)


class ContinuousBottleneck(nn.Module):
  """Continuous latents of width code_dim for diffusion heads.

  kl_weight > 0: the input carries [mean, logvar] (width 2 * code_dim), z = mean + std * eps in
  training, loss = kl_weight * KL(N(mean, var) || N(0, 1)) (mean over tokens, sum over dims).
  noise_std > 0: Gaussian noise added to z in training (a robustness regulariser).
  """
  code_dim: int = 16
  kl_weight: float = 0.0
  noise_std: float = 0.0

  @property
  def in_dim(self) -> int:
    return 2 * self.code_dim if self.kl_weight > 0 else self.code_dim

  @nn.compact
  def __call__(self, z, *, train: bool = False, rng=None, loss_mask=None):
    z = z.astype(jnp.float32)
    loss = jnp.zeros((), jnp.float32)
    if self.kl_weight > 0:
      mean, logvar = jnp.split(z, 2, axis=-1)
      logvar = jnp.clip(logvar, -30.0, 20.0)
      kl = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=-1)
      loss = self.kl_weight * (jnp.mean(kl) if loss_mask is None else
                               jnp.sum(kl * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0))
      z = mean
      if train:
        rng = self.make_rng("noise") if rng is None else rng
        rng, sub = jax.random.split(rng)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(sub, mean.shape)
    if train and self.noise_std > 0:
      rng = self.make_rng("noise") if rng is None else rng
      z = z + self.noise_std * jax.random.normal(jax.random.fold_in(rng, 1), z.shape)
    return dict(z_q=z, loss=loss)

"""DetailFlow's resolution mapping R(n), prefix sampling, and PyTorch-exact resizers.

  R(n) = R - b (N - n)^alpha,  b = (R - 1) / (N - 1)^alpha     floor, clamped to [1, R]
  decoder grid: smallest multiple of the patch >= R(n) (at least one patch)

Degraded target for a prefix of t tokens: the image area-downsampled to R(t) (PyTorch
`F.interpolate(mode='area')` = adaptive average pooling) then bicubic-upsampled to the decoder
resolution (PyTorch bicubic, A = -0.75, align_corners=False, no antialias, no clamp).

Both resizers are separable linear maps, built here as numpy matrices [out, in] (cached per size)
and applied with einsum, so they jit with static sizes; composing them gives one matrix per axis.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


# ---------------------------------------------------------------------------------------------
# R(n)
# ---------------------------------------------------------------------------------------------

def resolution_for_prefix(n: int, N: int, R: int, alpha: float = 1.5) -> int:
  """Target resolution of the first n of N tokens (reference `token_res_map_func`)."""
  check_alpha(alpha)
  if N <= 1:
    return R
  b = (R - 1) / (N - 1) ** alpha
  s = int(R - b * (N - n) ** alpha)
  return max(1, min(R, s))


def check_alpha(alpha: float) -> None:
  """R(n) = R - (R - 1) / (N - 1)^a (N - n)^a grows with n only for a > 0 (the paper's 1.5): a = 0
  would give every prefix, even the full one, the smallest resolution."""
  if not alpha > 0:
    raise ValueError(f"config.model.alpha={alpha}: R(n) needs alpha > 0 (the paper: 1.5)")


def decoder_resolution(tgt: int, patch: int) -> int:
  """Smallest multiple of `patch` >= tgt, at least `patch`."""
  return max(patch, int(math.ceil(tgt / patch)) * patch)


def possible_prefix_lengths(N: int, g: int, degrade_p: float, causal_num: int | None = None):
  """Every t `sample_prefix_length` can return, sorted."""
  c = g if causal_num is None else causal_num
  ts = {N}
  if degrade_p > 0:
    for t in range(1, N - g + 1):
      ts.add(t if t <= c else int(math.ceil(t / g)) * g)
  return sorted(ts)


def sample_prefix_length(rng, N: int, g: int, p: float, causal_num: int | None = None):
  """Reference `ResolutionDegradation`: with probability p, t ~ U[1, N - g], rounded up to a
  multiple of g when t > causal_num (= g); otherwise t = N.  Works on host keys and inside jit."""
  c = g if causal_num is None else causal_num
  if N <= g or p <= 0:
    return jnp.asarray(N, jnp.int32)
  k1, k2 = jax.random.split(rng)
  t = jax.random.randint(k2, (), 1, N - g + 1)
  t = jnp.where(t > c, ((t + g - 1) // g) * g, t)
  return jnp.where(jax.random.uniform(k1, ()) < p, t, N).astype(jnp.int32)


def sample_noise_index(rng, t, g: int, causal_num: int | None = None):
  """Reference `get_noise_token_idx(t, p=1)`: (noise_idx, noise_end).

  t <= c: noise_idx ~ U[0, t); else noise_idx ~ U[0, t - g), floored to a multiple of g when >= c.
  One token is perturbed inside the causal first group, a whole group afterwards."""
  c = g if causal_num is None else causal_num
  t = jnp.asarray(t, jnp.int32)
  hi = jnp.where(t <= c, t, t - g)
  idx = jnp.floor(jax.random.uniform(rng, ()) * hi).astype(jnp.int32)
  idx = jnp.minimum(idx, jnp.maximum(hi - 1, 0))
  idx = jnp.where(idx >= c, (idx // g) * g, idx)
  num = jnp.where(idx < c, 1, g)
  return idx, idx + num


# ---------------------------------------------------------------------------------------------
# Resize matrices (numpy, cached)
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of PyTorch adaptive_avg_pool1d: out i averages in[floor(i*in/out) :
  ceil((i+1)*in/out)]."""
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    a = (i * in_size) // out_size
    b = -((-(i + 1) * in_size) // out_size)
    m[i, a:b] = 1.0 / (b - a)
  m.setflags(write=False)
  return m


def _cubic_weights(t: float, A: float = -0.75):
  def c1(x):  # |x| <= 1
    return ((A + 2) * x - (A + 3)) * x * x + 1
  def c2(x):  # 1 < |x| < 2
    return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
  return (c2(t + 1.0), c1(t), c1(1.0 - t), c2(2.0 - t))


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int, A: float = -0.75) -> np.ndarray:
  """[out, in] weights of PyTorch bicubic (align_corners=False, no antialias): source
  x = (i + 0.5) * in/out - 0.5 (not clamped), taps floor(x)-1 .. floor(x)+2 clamped to the border."""
  m = np.zeros((out_size, in_size), np.float64)
  if in_size == out_size:
    np.fill_diagonal(m, 1.0)
  else:
    scale = in_size / out_size
    for i in range(out_size):
      x = (i + 0.5) * scale - 0.5
      x0 = math.floor(x)
      w = _cubic_weights(x - x0, A)
      for k in range(4):
        m[i, min(max(x0 - 1 + k, 0), in_size - 1)] += w[k]
  m.setflags(write=False)
  return m


@functools.lru_cache(maxsize=None)
def degrade_matrix(in_size: int, tgt: int, dec: int) -> np.ndarray:
  """[dec, in]: area down to tgt, then bicubic up to dec."""
  return bicubic_matrix(tgt, dec) @ area_matrix(in_size, tgt)


def apply_separable(x, mh, mw=None):
  """x [B, H, W, C] -> [B, h, w, C] with row matrix mh [h, H] and column matrix mw [w, W]."""
  mw = mh if mw is None else mw
  mh = jnp.asarray(mh, jnp.float32)
  mw = jnp.asarray(mw, jnp.float32)
  y = jnp.einsum("hH,bHWc->bhWc", mh, x.astype(jnp.float32), precision="highest")
  return jnp.einsum("wW,bhWc->bhwc", mw, y, precision="highest").astype(x.dtype)


def area_resize(x, size: tuple[int, int]):
  """PyTorch F.interpolate(x, size, mode='area') for NHWC x (any ratio)."""
  return apply_separable(x, area_matrix(x.shape[1], size[0]), area_matrix(x.shape[2], size[1]))


def bicubic_resize(x, size: tuple[int, int]):
  """PyTorch F.interpolate(x, size, mode='bicubic', align_corners=False) for NHWC x."""
  return apply_separable(x, bicubic_matrix(x.shape[1], size[0]),
                         bicubic_matrix(x.shape[2], size[1]))


def degraded_target(image, t: int, N: int, patch: int, alpha: float = 1.5, R: int | None = None):
  """Target of a static prefix t for image [B, H, W, C]: area to R(t), bicubic to the decoder
  resolution.  R defaults to the image size.  Returns [B, dec, dec, C]."""
  H, W = image.shape[1:3]
  R = H if R is None else R
  tgt = resolution_for_prefix(t, N, R, alpha)
  dec = decoder_resolution(tgt, patch)
  if t >= N and dec == H == W:
    return image
  return apply_separable(image, degrade_matrix(H, tgt, dec), degrade_matrix(W, tgt, dec))


class PrefixPlan:
  """Static plan of every (t -> decoder resolution) the training step can meet, for jit.

  `branches` lists the distinct decoder resolutions; `branch_of_t` [N+1] int32 maps t to its branch;
  for branch k, `matrices[k]` [T_k, dec_k, H] stacks the degrade matrices of its t values, indexed by
  `row_of_t` [N+1].  The training step picks the branch with `jax.lax.switch` and the row with a
  dynamic index, so one compilation covers every prefix length.
  """

  def __init__(self, N: int, g: int, image_size: int, patch: int, alpha: float = 1.5,
               degrade_p: float = 0.2, causal_num: int | None = None, R: int | None = None):
    R = image_size if R is None else R
    self.ts = possible_prefix_lengths(N, g, degrade_p, causal_num)
    dec_of = {t: decoder_resolution(resolution_for_prefix(t, N, R, alpha), patch) for t in self.ts}
    self.branches = sorted(set(dec_of.values()))
    branch_of_t = np.zeros(N + 1, np.int32)
    row_of_t = np.zeros(N + 1, np.int32)
    mats = [[] for _ in self.branches]
    for t in self.ts:
      k = self.branches.index(dec_of[t])
      branch_of_t[t] = k
      row_of_t[t] = len(mats[k])
      tgt = resolution_for_prefix(t, N, R, alpha)
      mats[k].append(degrade_matrix(image_size, tgt, dec_of[t]).astype(np.float32))
    self.branch_of_t = branch_of_t
    self.row_of_t = row_of_t
    self.matrices = [np.stack(m) for m in mats]
    self.dec_of = dec_of

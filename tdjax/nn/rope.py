"""Rotary position embeddings as pure functions: 1D (Llama) and DetailFlow's 2D (row, col).

Frequencies are returned as (cos, sin) of shape [L, head_dim // 2] (fp32); `apply_rope` rotates the
head dimension of q or k ([B, L, H, D]) by them.  Pairs are adjacent-interleaved (x[2i], x[2i+1]),
as in LlamaGen's complex view, unless `interleaved=False` (GPT-NeoX halves: x[i], x[i + D/2]).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def rope_1d(positions, head_dim: int, base: float = 10000.0):
  """positions [..., L] (int or float) -> (cos, sin) [..., L, head_dim // 2], fp32."""
  if head_dim % 2:
    raise ValueError(f"rope_1d: head_dim={head_dim} must be even")
  inv = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64)[: head_dim // 2] / head_dim))
  ang = jnp.asarray(positions, jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)
  return jnp.cos(ang), jnp.sin(ang)


def rope_2d(rows, cols, head_dim: int, base: float = 10000.0, valid=None):
  """DetailFlow / LlamaGen 2D RoPE for explicit (row, col) positions.

  rows, cols [..., L].  Of the head_dim/2 pairs, the first half rotates with row * base^(-2k/(D/2)),
  k = 0..D/4-1, the second half with col * the same frequencies.  Where `valid` is False (the class
  token) cos = sin = 0, which zeroes q and k there (LlamaGen quirk, kept for checkpoint parity).
  """
  if head_dim % 4:
    raise ValueError(f"rope_2d: head_dim={head_dim} must be a multiple of 4")
  half = head_dim // 2  # rotary dims per axis
  inv = 1.0 / (base ** (np.arange(0, half, 2, dtype=np.float64)[: half // 2] / half))
  inv = jnp.asarray(inv, jnp.float32)
  ang = jnp.concatenate([jnp.asarray(rows, jnp.float32)[..., None] * inv,
                         jnp.asarray(cols, jnp.float32)[..., None] * inv], axis=-1)
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  if valid is not None:
    v = jnp.asarray(valid)[..., None]
    cos, sin = jnp.where(v, cos, 0.0), jnp.where(v, sin, 0.0)
  return cos, sin


def rope_2d_grid(num_rows: int, num_cols: int, head_dim: int, base: float = 10000.0,
                 cls_token_num: int = 1):
  """Sequence-position 2D RoPE of the DetailFlow AR model: `cls_token_num` class positions with zero
  rotation, then grid positions p -> (row, col) = divmod(p, num_cols).  Returns [cls + R*C, D/2]."""
  p = np.arange(num_rows * num_cols)
  rows = np.concatenate([np.zeros(cls_token_num), p // num_cols])
  cols = np.concatenate([np.zeros(cls_token_num), p % num_cols])
  valid = np.concatenate([np.zeros(cls_token_num, bool), np.ones(p.size, bool)])
  return rope_2d(rows, cols, head_dim, base, valid)


def apply_rope(x, cos, sin, interleaved: bool = True):
  """Rotates x [B, L, H, D] by (cos, sin) [L, D/2] or [B, L, D/2]; computed in fp32, returns x.dtype."""
  dtype = x.dtype
  xf = x.astype(jnp.float32)
  cos = jnp.asarray(cos, jnp.float32)
  sin = jnp.asarray(sin, jnp.float32)
  if cos.ndim == 2:
    cos, sin = cos[None], sin[None]
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, L, 1, D/2]
  if interleaved:
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    out = jnp.stack([o1, o2], axis=-1).reshape(xf.shape)
  else:
    d = xf.shape[-1] // 2
    x1, x2 = xf[..., :d], xf[..., d:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(dtype)

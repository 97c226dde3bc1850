"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

Pure, jittable functions on NHWC images in [-1, 1]; every op is differentiable w.r.t. the images,
so the same augmentation goes on real images (D step) and generated ones (D and G steps).

  policy 'color'        brightness  x + (u - 0.5)                      u ~ U[0, 1) per sample
                        saturation  (x - mean_c) * 2u + mean_c
                        contrast    (x - mean_chw) * (u + 0.5) + mean_chw
  policy 'translation'  shift by up to round(ratio * size) pixels in each direction (ratio 0.125),
                        zero padding (0 = mid grey for [-1, 1] images)
  policy 'cutout'       zero one square of round(ratio * size) pixels per sample at a random centre

A policy entry may carry its ratio, as in the reference config: 'color,translation,cutout_0.2'.

`prob`: as the reference's DiffAugment (DetailFlow `utils/diff_aug.py`), each policy entry is applied
with probability `prob` to the whole batch, one coin per entry per call: 'color' runs its three ops
together or not at all (prob=1 always, prob=0 never = identity).  The random magnitudes (shift,
cutout centre, colour factors) are drawn per sample.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_POLICY = "color,translation,cutout"


def _uniform(rng, b):
  return jax.random.uniform(rng, (b, 1, 1, 1), jnp.float32)


def brightness(x, rng):
  return x + (_uniform(rng, x.shape[0]) - 0.5)


def saturation(x, rng):
  m = jnp.mean(x, axis=-1, keepdims=True)
  return (x - m) * (_uniform(rng, x.shape[0]) * 2.0) + m


def contrast(x, rng):
  m = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - m) * (_uniform(rng, x.shape[0]) + 0.5) + m


def _shift_one(img, dy, dx):
  """out[i, j] = img[i + dy, j + dx] inside the image, 0 outside."""
  h, w = img.shape[:2]
  iy = jnp.arange(h) + dy
  ix = jnp.arange(w) + dx
  vy = (iy >= 0) & (iy < h)
  vx = (ix >= 0) & (ix < w)
  out = img[jnp.clip(iy, 0, h - 1)][:, jnp.clip(ix, 0, w - 1)]
  return out * (vy[:, None] & vx[None, :])[..., None].astype(img.dtype)


def translate(x, dy, dx):
  """Shifts every sample by integer offsets dy[b], dx[b] with zero padding."""
  return jax.vmap(_shift_one)(x, dy, dx)


def translation(x, rng, ratio: float = 0.125):
  b, h, w = x.shape[:3]
  sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  ky, kx = jax.random.split(rng)
  dy = jax.random.randint(ky, (b,), -sh, sh + 1)
  dx = jax.random.randint(kx, (b,), -sw, sw + 1)
  return translate(x, dy, dx)


def cutout_mask(shape, cy, cx, size_h: int, size_w: int, dtype=jnp.float32):
  """[B, H, W, 1] mask: 0 inside the box of size (size_h, size_w) centred at (cy, cx), else 1."""
  _, h, w = shape[:3]
  y0 = (cy - size_h // 2)[:, None]
  x0 = (cx - size_w // 2)[:, None]
  ys = jnp.arange(h)[None, :]
  xs = jnp.arange(w)[None, :]
  in_y = (ys >= y0) & (ys < y0 + size_h)
  in_x = (xs >= x0) & (xs < x0 + size_w)
  box = in_y[:, :, None] & in_x[:, None, :]
  return (~box)[..., None].astype(dtype)


def cutout(x, rng, ratio: float = 0.5):
  b, h, w = x.shape[:3]
  sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (b,), 0, h + (1 - sh % 2))
  cx = jax.random.randint(kx, (b,), 0, w + (1 - sw % 2))
  return x * cutout_mask(x.shape, cy, cx, sh, sw, x.dtype)


_OPS = {"brightness": brightness, "saturation": saturation, "contrast": contrast,
        "translation": translation, "cutout": cutout}


def _parse_policy(policy: str, cutout_ratio: float, translation_ratio: float):
  """Policy string -> one list of elementary (op, ratio) per entry."""
  entries = []
  for entry in [p.strip() for p in policy.split(",") if p.strip()]:
    name, _, arg = entry.partition("_")
    if name == "color":
      if arg:
        raise ValueError(f"diff_augment: 'color' takes no ratio, got {entry!r}")
      entries.append([("brightness", None), ("saturation", None), ("contrast", None)])
    elif name == "translation":
      entries.append([("translation", float(arg) if arg else translation_ratio)])
    elif name == "cutout":
      entries.append([("cutout", float(arg) if arg else cutout_ratio)])
    else:
      raise ValueError(f"diff_augment: unknown policy entry {entry!r}; "
                       f"expected color, translation[_r], cutout[_r]")
  return entries


def diff_augment(x: jax.Array, rng: jax.Array, policy: str = DEFAULT_POLICY, prob: float = 0.5,
                 cutout: float = 0.2, translation: float = 0.125) -> jax.Array:
  """Augments NHWC images; shape- and dtype-preserving, deterministic for a given `rng`.

  `policy`, `prob`, `cutout` and `translation` are static (Python values under jit).
  """
  if x.ndim != 4:
    raise ValueError(f"diff_augment: expected NHWC images, got shape {x.shape}")
  if not 0.0 <= prob <= 1.0:
    raise ValueError(f"diff_augment: prob must be in [0, 1], got {prob}")
  entries = _parse_policy(policy, cutout, translation)
  if prob == 0.0 or not entries:
    return x
  for entry_key, ops in zip(jax.random.split(rng, len(entries)), entries):
    coin_key, *op_keys = jax.random.split(entry_key, 1 + len(ops))
    y = x
    for (name, ratio), k in zip(ops, op_keys):
      y = _OPS[name](y, k) if ratio is None else _OPS[name](y, k, ratio)
    x = y if prob >= 1.0 else jnp.where(jax.random.bernoulli(coin_key, prob), y, x)
  return x

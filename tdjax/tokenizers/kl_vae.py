"""MAR's KL-16 VAE (LDM `AutoencoderKL`, docs/reference/transdiff.md 1.1), NHWC, images in [-1, 1].

    moments = quant_conv(Encoder(x))           [B, H/f, W/f, 2 C]   f = 2^(len(ch_mult) - 1)
    q(z | x) = N(mean, exp(logvar)),  logvar clamped to [-30, 20]
    latent   = z * scale  (z a posterior *sample*; 0.2325 for KL-16)      decode(latent / scale)
    x_hat    = Decoder(post_quant_conv(z))

Encoder: conv_in 3x3; per level i: `num_res_blocks` ResnetBlocks (GroupNorm(32, eps 1e-6), swish,
3x3 convs, 1x1 `nin_shortcut` when the width changes) with an AttnBlock after each block when the
level's nominal resolution (`resolution` / 2^i, whatever the input size) is in `attn_resolutions`;
between levels the downsample pads (0, 1) on the bottom and right and applies a 3x3 stride-2 VALID
conv (the asymmetric padding of the reference);
middle ResnetBlock / AttnBlock / ResnetBlock; GroupNorm, swish, conv_out 3x3 to 2 C (double z).
Decoder: conv_in 3x3, the same middle, levels from coarse to fine with `num_res_blocks + 1`
ResnetBlocks (no level attention for KL-16) and nearest x2 upsampling + 3x3 conv; GroupNorm, swish,
conv_out 3x3.  AttnBlock: single-head attention over all H W positions with 1x1 q/k/v/proj convs.

Parameter names follow the reference state dict (`encoder.down.{i}.block.{j}.conv1` ->
`encoder/down_{i}_block_{j}/conv1`), so a converter only transposes the kernels.  KL-16: ch 128,
ch_mult (1, 1, 2, 2, 4), 2 res blocks, encoder attention at resolution 16, C = 16: 256 px -> 16x16x16.
Training the VAE is out of scope; `DEMO` is a small configuration for tests and pipelines.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  embed_dim: int = 16
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  in_channels: int = 3
  scale: float = 0.2325

  @property
  def stride(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)


KL16 = VAEConfig()
DEMO = VAEConfig(embed_dim=4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                 resolution=32, in_channels=1, scale=1.0)


def _norm(name):
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, name=name)


def _conv(features, k, name, stride=1, padding="SAME"):
  return nn.Conv(features, (k, k), (stride, stride), padding=padding, name=name)


class ResnetBlock(nn.Module):
  out_channels: int

  @nn.compact
  def __call__(self, x):
    h = _conv(self.out_channels, 3, "conv1")(nn.swish(_norm("norm1")(x)))
    h = _conv(self.out_channels, 3, "conv2")(nn.swish(_norm("norm2")(h)))
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = _norm("norm")(x)
    q, k, v = (_conv(c, 1, n)(h).reshape(b, hh * ww, c) for n in ("q", "k", "v"))
    w = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * c ** -0.5, axis=-1)
    h = jnp.einsum("bij,bjc->bic", w, v).reshape(b, hh, ww, c)
    return x + _conv(c, 1, "proj_out")(h)


def _downsample(x, name):
  x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
  return _conv(x.shape[-1], 3, name, stride=2, padding="VALID")(x)


def _upsample(x, name):
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return _conv(x.shape[-1], 3, name)(x)


class _Mid(nn.Module):
  @nn.compact
  def __call__(self, h):
    c = h.shape[-1]
    h = ResnetBlock(c, name="block_1")(h)
    h = AttnBlock(name="attn_1")(h)
    return ResnetBlock(c, name="block_2")(h)


class Encoder(nn.Module):
  cfg: VAEConfig

  @nn.compact
  def __call__(self, x):
    c = self.cfg
    h = _conv(c.ch, 3, "conv_in")(x)
    # The reference places attention by the *nominal* resolution (`resolution`, 256 for KL-16),
    # not the input's: MAR / TransDiff encode 512 px images with the same attention blocks (at the
    # last level), which counting from the input's own size would skip.
    res = c.resolution
    for i, mult in enumerate(c.ch_mult):
      for j in range(c.num_res_blocks):
        h = ResnetBlock(c.ch * mult, name=f"down_{i}_block_{j}")(h)
        if res in c.attn_resolutions:
          h = AttnBlock(name=f"down_{i}_attn_{j}")(h)
      if i != len(c.ch_mult) - 1:
        h = _downsample(h, f"down_{i}_downsample")
        res //= 2
    h = _Mid(name="mid")(h)
    return _conv(2 * c.embed_dim, 3, "conv_out")(nn.swish(_norm("norm_out")(h)))


class Decoder(nn.Module):
  cfg: VAEConfig

  @nn.compact
  def __call__(self, z):
    c = self.cfg
    h = _conv(c.ch * c.ch_mult[-1], 3, "conv_in")(z)
    h = _Mid(name="mid")(h)
    for i in reversed(range(len(c.ch_mult))):
      for j in range(c.num_res_blocks + 1):
        h = ResnetBlock(c.ch * c.ch_mult[i], name=f"up_{i}_block_{j}")(h)
      if i != 0:
        h = _upsample(h, f"up_{i}_upsample")
    return _conv(c.in_channels, 3, "conv_out")(nn.swish(_norm("norm_out")(h)))


class AutoencoderKL(nn.Module):
  cfg: VAEConfig = KL16
  dtype: Any = jnp.float32

  def setup(self):
    d = self.cfg.embed_dim
    self.encoder = Encoder(self.cfg)
    self.decoder = Decoder(self.cfg)
    self.quant_conv = nn.Conv(2 * d, (1, 1), name="quant_conv")
    self.post_quant_conv = nn.Conv(d, (1, 1), name="post_quant_conv")

  def encode(self, x):
    """Images [B, H, W, C_in] -> (mean, logvar) [B, H/f, W/f, C], logvar clamped to [-30, 20]."""
    c = self.cfg
    if x.shape[1] % c.stride or x.shape[2] % c.stride or x.shape[-1] != c.in_channels:
      raise ValueError(f"VAE input {x.shape[1:]}: expected H, W divisible by {c.stride} and "
                       f"{c.in_channels} channels")
    mean, logvar = jnp.split(self.quant_conv(self.encoder(x)), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    if z.shape[-1] != self.cfg.embed_dim:
      raise ValueError(f"VAE latent has {z.shape[-1]} channels, expected {self.cfg.embed_dim}")
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, x, rng=None):
    """Reconstruction through a posterior sample (the mean when rng is None) and the KL."""
    mean, logvar = self.encode(x)
    z = mean if rng is None else posterior_sample(mean, logvar, rng)
    return self.decode(z), kl_to_standard_normal(mean, logvar)


def posterior_sample(mean, logvar, rng):
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


def kl_to_standard_normal(mean, logvar):
  """KL(N(mean, e^logvar) || N(0, I)) summed over (H, W, C): 0.5 sum(mean^2 + var - 1 - logvar)."""
  return 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


def images_to_latents(vae: AutoencoderKL, params, images, rng=None):
  """Posterior sample (mean when rng is None) x scale: the latents TransDiff/MAR train on."""
  mean, logvar = vae.apply({"params": params}, images, method=AutoencoderKL.encode)
  z = mean if rng is None else posterior_sample(mean, logvar, rng)
  return z * vae.cfg.scale


def latents_to_images(vae: AutoencoderKL, params, latents):
  return vae.apply({"params": params}, latents / vae.cfg.scale, method=AutoencoderKL.decode)


def save_params(params, path: str) -> None:
  """Params as an .npz of '/'-joined names (written to a temporary file, then renamed)."""
  flat = {"/".join(getattr(k, "key", str(k)) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flat)
  os.replace(tmp, path)


def load_params(path: str) -> dict:
  """Inverse of `save_params` (e.g. the output of `python -m tdjax.convert --kind mar_vae`)."""
  params: dict = {}
  with np.load(path) as f:
    for name in f.files:
      node = params
      *parents, leaf = name.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = jnp.asarray(f[name])
  return params

"""Diffusion heads: TransDiff's attention-based decoder and MAR's per-token MLP
(docs/reference/transdiff.md 1.3 and 6), behind one call:

    head(x_t [B, L, C], t [B] on the 0..1000 scale, cond [B, M, Dc], cond_mask [B, M] | None)
        -> [B, L, C_out]

AttentionHead (TransDiff `DiffusionDecoder`, PixArt-style):
    h = input_proj(x_t) + P                    temb = MLP(sinusoid_256(t)),  a = Linear_6D(SiLU temb)
    per block, (s1, c1, g1, s2, c2, g2) = table + a:
        h += g1 * SelfAttn(LN(h) (1 + c1) + s1)         (all L tokens, no mask)
        h += CrossAttn(LN(h), K/V = cond_embed(cond))   (no modulation, no gate; M may vary)
        h += g2 * MLP(LN(h) (1 + c2) + s2)
    out = Linear_zero(LN_noaffine(h) (1 + c) + s),  (s, c) = table_2 + temb
Variants (attention survey levels 3-4): `self_attention=False` drops the self-attention branch
(tokens denoised independently given the condition); `conditioning='adaln'` replaces the
cross-attention by adding cond_embed(cond) (M = L, per token) to the timestep embedding that drives
the modulation; `conditioning='incontext'` prepends the M embedded condition tokens to the L latent
tokens in the self-attention (DiT's in-context conditioning: one joint sequence, no cross-attention,
the condition tokens are modulated like the rest and dropped before the final layer; a condition
mask masks their keys).

MLPHead (MAR `SimpleMLPAdaLN`): per token, y = temb + cond_embed(cond) (M = L);
    h = input_proj(x_t);  per block: h += g * MLP(LN(h) (1 + c) + s), (s, c, g) = Linear_3w(SiLU y)
    out = Linear(LN_noaffine(h) (1 + c) + s), (s, c) = Linear_2w(SiLU y); adaLN and output zero-init.
The same modules, names aside, as MAR's SimpleMLPAdaLN (models/diffloss.py): the [cos, sin]
sinusoid of 256 frequencies, (shift, scale, gate) and (shift, scale) in that order, LayerNorm with
an affine transform in the blocks and without one before the output; `python -m tdjax.convert
--kind mar_head` maps its weights 1:1.  MAR_HEAD_SIZES: the (width, depth) that MAR ships per
model (its README's diffloss_w x diffloss_d); configs/transdiff.py names them head_size=mar_b|...
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdjax import configlib
from tdjax.nn.layers import LayerNorm, TransformerStack, vit_block_kwargs

_lp = nn.with_logical_partitioning

# MAR's released MLP heads (LTH14/mar README: --diffloss_w / --diffloss_d of MAR-B / L / H)
MAR_HEAD_SIZES = {"mar_b": (1024, 6), "mar_l": (1280, 8), "mar_h": (1536, 12)}


def timestep_embedding(t, dim: int = 256, max_period: float = 10000.0):
  """DiT/GLIDE sinusoid in [cos, sin] order: f_i = exp(-ln(max_period) i / (dim/2))."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _dense(features, axes, name, init=nn.initializers.xavier_uniform(), **kw):
  return nn.Dense(features, kernel_init=_lp(init, axes), bias_init=_lp(nn.initializers.zeros,
                                                                         axes[-1:]), name=name, **kw)


class TimestepEmbedder(nn.Module):
  """sinusoid(256) -> Linear -> SiLU -> Linear."""
  width: int
  freq_dim: int = 256
  init: Any = nn.initializers.xavier_uniform()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, t):
    h = timestep_embedding(t, self.freq_dim).astype(self.dtype)
    h = _dense(self.width, (None, "embed"), "linear_1", self.init, dtype=self.dtype)(h)
    return _dense(self.width, ("embed", "mlp"), "linear_2", self.init, dtype=self.dtype)(nn.silu(h))


class AttentionHead(nn.Module):
  out_channels: int
  width: int = 1024
  depth: int = 16
  num_heads: int = 16
  mlp_ratio: float = 4.0
  max_len: int = 256
  dropout: float = 0.0                 # reference: 0.1
  self_attention: bool = True
  conditioning: str = "cross"          # 'cross' (reference) | 'adaln' | 'incontext'
  scan: bool = False
  remat: str = "none"
  # 'einsum' | 'fused' | 'cudnn' (tdjax.nn.Attention.impl): 'fused' is jax.nn.dot_product_attention
  # (cuDNN flash attention on GPUs, Splash-style kernels where XLA has them)
  attention_impl: str = "einsum"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_t, t, cond, cond_mask=None, *, deterministic: bool = True):
    if self.conditioning not in ("cross", "adaln", "incontext"):
      raise ValueError(f"head conditioning={self.conditioning!r}: expected 'cross', 'adaln' or "
                       f"'incontext'")
    if self.conditioning == "incontext" and not self.self_attention:
      raise ValueError("head conditioning='incontext' reads the condition through self-attention: "
                       "it needs self_attention=True")
    b, l, _ = x_t.shape
    if l > self.max_len:
      raise ValueError(f"head input has {l} tokens, its position table {self.max_len}")
    D, kw = self.width, dict(dtype=self.dtype)
    h = _dense(D, ("channels", "embed"), "input_proj", **kw)(x_t.astype(self.dtype))
    pos = self.param("pos_embed", _lp(nn.initializers.normal(0.02), ("length", "embed")),
                     (self.max_len, D))
    h = h + pos[None, :l].astype(self.dtype)
    temb = TimestepEmbedder(D, dtype=self.dtype, name="time_embed")(t)[:, None]   # [B, 1, D]
    c = _dense(D, ("channels", "embed"), "cond_embed", **kw)(cond.astype(self.dtype))
    context, context_mask, self_mask = c, None, None
    if self.conditioning == "incontext":
      h, context = jnp.concatenate([c, h], axis=1), None
      if cond_mask is not None:
        keys = jnp.concatenate([cond_mask, jnp.ones((b, l), bool)], axis=1)
        self_mask = keys[:, None, None, :]
    elif self.conditioning == "adaln":
      if cond.shape[1] != l:
        raise ValueError(f"adaLN conditioning needs one condition token per latent token: "
                         f"M={cond.shape[1]}, L={l}")
      temb, context = temb + c, None
    elif cond_mask is not None:
      context_mask = cond_mask[:, None, None, :]
    mod = _dense(6 * D, ("embed", "mlp"), "time_proj", **kw)(nn.silu(temb))
    mod = mod.reshape(b, -1, 6, D)
    if mod.shape[1] == 1:
      mod = mod[:, 0]                                           # [B, 6, D] (adaLN-single)
    block = vit_block_kwargs(self.num_heads, int(self.mlp_ratio * D), gelu_approximate=False,
                             dropout_rate=self.dropout, cross_attention=context is not None,
                             adaln=True, self_attention=self.self_attention,
                             attention_impl=self.attention_impl)
    h = TransformerStack(self.depth, block, scan=self.scan, remat=self.remat, name="blocks", **kw)(
        h, self_mask, None, context, context_mask, mod, deterministic=deterministic)
    h = h[:, -l:]
    table = self.param("final_scale_shift", _lp(lambda k, s: jax.random.normal(k, s) / D ** 0.5,
                                                (None, "embed")), (2, D))
    shift, scale = table[0] + temb, table[1] + temb
    h = nn.LayerNorm(1e-6, use_bias=False, use_scale=False, name="final_norm", **kw)(h)
    h = h * (1 + scale) + shift
    out = _dense(self.out_channels, ("embed", "channels"), "final_linear",
                 nn.initializers.zeros, **kw)(h)
    return out.astype(jnp.float32)


class MLPHead(nn.Module):
  out_channels: int
  width: int = 1024
  depth: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_t, t, cond, cond_mask=None, *, deterministic: bool = True):
    b, l, _ = x_t.shape
    if cond.shape[1] != l:
      raise ValueError(f"the MLP head conditions each token on its own vector: M={cond.shape[1]}, "
                       f"L={l}")
    w, kw = self.width, dict(dtype=self.dtype)
    zero = nn.initializers.zeros
    y = TimestepEmbedder(w, init=nn.initializers.normal(0.02), dtype=self.dtype,
                         name="time_embed")(t)
    y = y[:, None] if y.ndim == 2 else y        # t [B] (one step per example) or [B, L] (MAR)
    y = y + _dense(w, ("channels", "embed"), "cond_embed", **kw)(cond.astype(self.dtype))
    h = _dense(w, ("channels", "embed"), "input_proj", **kw)(x_t.astype(self.dtype))
    for i in range(self.depth):
      s, c, g = jnp.split(_dense(3 * w, ("embed", "mlp"), f"res_{i}_ada", zero, **kw)(nn.silu(y)),
                          3, axis=-1)
      u = LayerNorm(1e-6, name=f"res_{i}_norm", **kw)(h) * (1 + c) + s
      u = _dense(w, ("embed", "mlp"), f"res_{i}_fc1", **kw)(u)
      u = _dense(w, ("mlp", "embed"), f"res_{i}_fc2", **kw)(nn.silu(u))
      h = h + g * u
    s, c = jnp.split(_dense(2 * w, ("embed", "mlp"), "final_ada", zero, **kw)(nn.silu(y)), 2, -1)
    h = nn.LayerNorm(1e-6, use_bias=False, use_scale=False, name="final_norm", **kw)(h)
    out = _dense(self.out_channels, ("embed", "channels"), "final_linear", zero, **kw)(
        h * (1 + c) + s)
    return out.astype(jnp.float32)


def check_head(cfg) -> None:
  """One-line errors naming config.head.X for heads that cannot be built as asked (a width the
  heads do not divide would silently be cut to heads x (width // heads))."""
  kind = cfg.get("type", "attention")
  if kind not in ("attention", "mlp"):
    raise ValueError(f"head type={kind!r}: expected 'attention' or 'mlp'")
  for key in ("width", "depth"):
    if key not in cfg:
      raise ValueError(f"config.head.{key} is missing")
    if int(cfg[key]) < 1:
      raise ValueError(f"config.head.{key}={cfg[key]}: expected >= 1")
  if kind == "attention":
    if int(cfg.num_heads) < 1 or int(cfg.width) % int(cfg.num_heads):
      raise ValueError(f"config.head.num_heads={cfg.num_heads} does not divide config.head.width="
                       f"{cfg.width}")
    if cfg.get("conditioning", "cross") not in ("cross", "adaln", "incontext"):
      raise ValueError(f"config.head.conditioning={cfg.conditioning!r}: expected 'cross', "
                       f"'adaln' or 'incontext'")
    if cfg.get("attention_impl", "einsum") not in ("einsum", "fused", "cudnn"):
      raise ValueError(f"config.head.attention_impl={cfg.attention_impl!r}: expected 'einsum', "
                       f"'fused' or 'cudnn'")


def make_head(cfg, out_channels: int, dtype=jnp.float32) -> nn.Module:
  """From a config dict: type 'attention' | 'mlp' plus the module's fields."""
  check_head(cfg)
  head = AttentionHead if cfg.get("type", "attention") == "attention" else MLPHead
  return configlib.from_config(head, cfg, "config.head", out_channels=out_channels, dtype=dtype)

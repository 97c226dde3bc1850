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

Attention-survey switches (issue 49; "attention in diffusion models" survey levels in brackets).
Every field defaults to the head above, output for output and parameter for parameter; a switch
creates its parameters only when on.  t01 = t / 1000 (flow: t, noise at 1; DDPM: step / 1000).
  adaln_mode='zero' [condition injection]: DiT's adaLN-zero, per block (s1, c1, g1, s2, c2, g2) =
    Linear_6D(SiLU y), y = temb (+ cond_embed with conditioning='adaln'), zero-initialised
    (block param adaLN_modulation; no table, no shared time_proj), so each block starts as the
    identity (with a cross branch: only with cross_gate).  'single' (default): PixArt's table +
    one shared Linear_6D.
  cross_gate [level 2, where conditions enter]: h += tanh(alpha) * CrossAttn(...), alpha [D]
    zero-initialised (Flamingo-style: the condition enters through cross-attention gradually).
  qk_norm [stability]: q, k <- RMSNorm_hd(q), RMSNorm_hd(k) per head, learned scales, in the self-
    and cross-attention; logits then bounded by the scales (invariant to the q/k projection scale).
  cond_t_range=(lo, hi) [level 3, time dependence]: the condition is read only for t01 in
    [lo, hi]: cross: the cross branch times 1[t01 in range] per example; in-context / joint: the
    condition keys masked outside; adaln: cond_embed zeroed outside (plain self-attention there).
  attn_temperature='learned_t' [level 3]: self-attention logits / tau(t), tau_h(t) = exp(a_h +
    b_h t01) per block and head, (a, b) zero-initialised: tau = 1 exactly, the default head.
  self_attn_kind [light-weight attention, level 1]: 'window': local attention over the sqrt(L) x
    sqrt(L) token grid (1D when L is not a square), a w x w neighbourhood (|dr|, |dc| <= w // 2)
    by a boolean mask (`window_mask`; condition tokens of in-context / joint stay global);
    'linear': kernelised attention with phi = elu + 1, out_i = phi(q_i)^T S / phi(q_i)^T z,
    S = sum_j phi(k_j) v_j^T, z = sum_j phi(k_j) (tdjax.nn.attention.linear_attention).
  token_merge=r [light-weight, level 1]: ToMe bipartite soft matching merges r of the L tokens
    (size-weighted means) before each block's self-attention, proportional attention (logits +
    log size), the outputs copied back to the merged tokens after (tdjax.nn.token_merge).
  conditioning='joint' [level 2]: MMDiT two-stream joint attention: the M condition tokens and the
    L latent tokens each have their own norms, adaLN modulation (context_*), q/k/v/out
    projections (attn/context_*) and MLPs, and attend together over M + L keys (condition mask on
    the condition keys); the latent stream's parameters have the default block's names.
  pag=True (call flag) [level 5, output readjustment at sampling]: perturbed-attention guidance's
    branch: every self-attention map is the identity (out = out_proj(v)); the samplers combine
    v = v_u + cfg (v_c - v_u) + pag_scale (v_c - v_pag) (`tdjax.diffusion.flow.pag_guided`;
    sampling flag pag_scale, 0 = off).
  Across scales [level 4]: next-detail diffusion's head_context='all' (cross-attention to every
    earlier group's trunk states; tdjax.generators.next_detail_diffusion).

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
from tdjax.nn.attention import IMPLS, tile_rows
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
  # tdjax.nn.Attention.impl: 'auto' ('blocked' on CPUs, 'einsum' elsewhere) | 'einsum' | 'blocked'
  # | 'fused' (jax.nn.dot_product_attention: cuDNN flash attention on GPUs) | 'cudnn'
  attention_impl: str = "auto"
  # attention-survey switches (module docstring); each default is the head above, bit for bit
  adaln_mode: str = "single"           # 'single' | 'zero'
  cross_gate: bool = False
  qk_norm: bool = False
  cond_t_range: Any = None             # None | (lo, hi) on the 0..1 scale (t / 1000)
  attn_temperature: str = "none"       # 'none' | 'learned_t'
  self_attn_kind: str = "full"         # 'full' | 'window' | 'linear'
  window: int = 3                      # self_attn_kind='window': w x w neighbourhood
  token_merge: int = 0                 # ToMe: tokens merged before each self-attention
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_t, t, cond, cond_mask=None, *, deterministic: bool = True,
               pag: bool = False):
    """pag=True: the perturbed branch of perturbed-attention guidance (every self-attention map
    replaced by the identity)."""
    check_survey_fields(self)
    if self.conditioning == "incontext" and not self.self_attention:
      raise ValueError("head conditioning='incontext' reads the condition through self-attention: "
                       "it needs self_attention=True")
    if pag and not self.self_attention:
      raise ValueError("perturbed-attention guidance perturbs the head's self-attention: it needs "
                       "self_attention=True")
    b, l, _ = x_t.shape
    if l > self.max_len:
      raise ValueError(f"head input has {l} tokens, its position table {self.max_len}")
    D, kw = self.width, dict(dtype=self.dtype)
    h = _dense(D, ("channels", "embed"), "input_proj", **kw)(x_t.astype(self.dtype))
    pos = self.param("pos_embed", _lp(nn.initializers.normal(0.02), ("length", "embed")),
                     (self.max_len, D))
    h = h + pos[None, :l].astype(self.dtype)
    temb = TimestepEmbedder(D, dtype=self.dtype, name="time_embed")(t)[:, None]   # [B, 1, D]
    # cond may have fewer rows than x_t (R dividing B: row i of x_t goes with cond row i mod R, as
    # the flow loss's batch_mul copies): its embedding, and with cross-attention the blocks' keys
    # and values, are computed once per condition row
    c = _dense(D, ("channels", "embed"), "cond_embed", **kw)(cond.astype(self.dtype))
    if cond_mask is not None:
      cond_mask = tile_rows(cond_mask, b, "condition mask")
    if self.conditioning != "cross":
      c = tile_rows(c, b)
    context, context_mask, self_mask = c, None, None
    m = cond.shape[1]
    aux, cond_on = None, None
    if self.cond_t_range is not None or self.attn_temperature != "none":
      t01 = jnp.asarray(t, jnp.float32) / 1000.0
      aux = {"t": t01, "cross_keep": None}
      if self.cond_t_range is not None:
        lo, hi = self.cond_t_range
        cond_on = (t01 >= lo) & (t01 <= hi)                     # [B]
    if self.conditioning in ("incontext", "joint"):
      h, context = jnp.concatenate([c, h], axis=1), None
      keys = None if cond_mask is None else cond_mask.astype(bool)
      if cond_on is not None:
        keys = (jnp.ones((b, m), bool) if keys is None else keys) & cond_on[:, None]
      if keys is not None:
        keys = jnp.concatenate([keys, jnp.ones((b, l), bool)], axis=1)
        self_mask = keys[:, None, None, :]
    elif self.conditioning == "adaln":
      if cond.shape[1] != l:
        raise ValueError(f"adaLN conditioning needs one condition token per latent token: "
                         f"M={cond.shape[1]}, L={l}")
      if cond_on is not None:
        c = c * cond_on[:, None, None].astype(c.dtype)
      temb, context = temb + c, None
    else:
      if cond_mask is not None:
        context_mask = cond_mask[:, None, None, :]
      if cond_on is not None:
        aux["cross_keep"] = cond_on
    if self.self_attn_kind == "window":
      win = window_mask(l, self.window)
      if h.shape[1] > l:         # condition tokens (in-context / joint): see and seen by all
        win = jnp.pad(win, ((m, 0), (m, 0)), constant_values=True)
      self_mask = win[None, None] if self_mask is None else self_mask & win[None, None]
    if self.adaln_mode == "zero":    # each block's own Linear_6D(SiLU y), zero-initialised
      mod = temb
    else:
      mod = _dense(6 * D, ("embed", "mlp"), "time_proj", **kw)(nn.silu(temb))
      mod = mod.reshape(b, -1, 6, D)
      if mod.shape[1] == 1:
        mod = mod[:, 0]                                         # [B, 6, D] (adaLN-single)
    survey = {}
    for key, field, default in _BLOCK_SWITCHES:
      value = getattr(self, field)
      if value != default:
        survey[key] = value
    if self.self_attn_kind == "linear":
      survey["attn_kind"] = "linear"
    if pag:
      survey["attn_identity"] = True
    if self.conditioning == "joint":
      survey["joint_len"] = m
    block = vit_block_kwargs(self.num_heads, int(self.mlp_ratio * D), gelu_approximate=False,
                             dropout_rate=self.dropout, cross_attention=context is not None,
                             adaln=True, self_attention=self.self_attention,
                             attention_impl=self.attention_impl, **survey)
    stack_kw = {} if aux is None else {"aux": aux}
    h = TransformerStack(self.depth, block, scan=self.scan, remat=self.remat, name="blocks", **kw)(
        h, self_mask, None, context, context_mask, mod, deterministic=deterministic, **stack_kw)
    h = h[:, -l:]
    table = self.param("final_scale_shift", _lp(lambda k, s: jax.random.normal(k, s) / D ** 0.5,
                                                (None, "embed")), (2, D))
    shift, scale = table[0] + temb, table[1] + temb
    h = nn.LayerNorm(1e-6, use_bias=False, use_scale=False, name="final_norm", **kw)(h)
    h = h * (1 + scale) + shift
    out = _dense(self.out_channels, ("embed", "channels"), "final_linear",
                 nn.initializers.zeros, **kw)(h)
    return out.astype(jnp.float32)


# head field -> TransformerBlock field, passed on when not the default
_BLOCK_SWITCHES = (("adaln_mode", "adaln_mode", "single"), ("cross_gate", "cross_gate", False),
                   ("qk_norm", "qk_norm", False), ("attn_temperature", "attn_temperature", "none"),
                   ("token_merge", "token_merge", 0))
CONDITIONINGS = ("cross", "adaln", "incontext", "joint")


def window_mask(length: int, w: int):
  """Boolean [L, L]: local attention over the token grid, a w x w neighbourhood centred on each
  token (|dr|, |dc| <= w // 2; odd w).  The grid is sqrt(L) x sqrt(L) when L is a square, else
  one row of L tokens (1D window of w).  A window of 2 sqrt(L) - 1 or more is full attention."""
  side = math.isqrt(length)
  rows, cols = (side, side) if side * side == length else (1, length)
  idx = jnp.arange(length)
  r, c = idx // cols, idx % cols
  rad = int(w) // 2
  return ((jnp.abs(r[:, None] - r[None]) <= rad) & (jnp.abs(c[:, None] - c[None]) <= rad))


def check_survey_fields(cfg) -> None:
  """One-line errors for survey switch values the attention head cannot build (`cfg`: the head
  module or its config node)."""
  get = (lambda k, d: getattr(cfg, k, d)) if isinstance(cfg, nn.Module) else cfg.get
  where = "head" if isinstance(cfg, nn.Module) else "config.head"
  cond = get("conditioning", "cross")
  if cond not in CONDITIONINGS:
    raise ValueError(f"{where} conditioning={cond!r}: expected one of {', '.join(CONDITIONINGS)}")
  for key, allowed in (("adaln_mode", ("single", "zero")),
                       ("attn_temperature", ("none", "learned_t")),
                       ("self_attn_kind", ("full", "window", "linear"))):
    if get(key, allowed[0]) not in allowed:
      raise ValueError(f"{where} {key}={get(key, None)!r}: expected one of {', '.join(allowed)}")
  if get("cross_gate", False) and cond != "cross":
    raise ValueError(f"{where} cross_gate gates the cross-attention: it needs conditioning='cross'")
  if get("self_attn_kind", "full") == "window" and int(get("window", 3)) < 1:
    raise ValueError(f"{where} window={get('window', 3)}: expected >= 1")
  merge = int(get("token_merge", 0))
  if merge < 0:
    raise ValueError(f"{where} token_merge={merge}: expected >= 0")
  if merge and (get("self_attn_kind", "full") != "full" or cond in ("incontext", "joint")):
    raise ValueError(f"{where} token_merge merges the latent tokens of a full, unmasked "
                     f"self-attention: it needs self_attn_kind='full' and conditioning "
                     f"'cross' or 'adaln'")
  rng = get("cond_t_range", None)
  if rng is not None and (len(tuple(rng)) != 2 or not 0 <= rng[0] <= rng[1] <= 1):
    raise ValueError(f"{where} cond_t_range={rng!r}: expected (lo, hi), 0 <= lo <= hi <= 1")
  if cond == "joint" and not get("self_attention", True):
    raise ValueError(f"{where} conditioning='joint' needs self_attention=True")


# config args (configs/transdiff.py, configs/next_detail_diffusion.py) of the survey switches
SURVEY_ARGS = dict(adaln="", cross_gate=False, qk_norm=False, t_range="", attn_temp="", window=0,
                   linear_attn=False, merge=0)


def survey_head_fields(a) -> dict:
  """Parsed config args (SURVEY_ARGS) -> the AttentionHead fields they set; only those not at
  their default, so a config without them is unchanged.  adaln=zero, cross_gate, qk_norm,
  t_range=LO:HI, attn_temp=learned_t, window=W, linear_attn, merge=R."""
  out = {}
  if a.adaln:
    out["adaln_mode"] = a.adaln
  if a.cross_gate:
    out["cross_gate"] = True
  if a.qk_norm:
    out["qk_norm"] = True
  if a.t_range:
    lo, sep, hi = a.t_range.partition(":")
    try:
      out["cond_t_range"] = (float(lo), float(hi))
    except ValueError:
      raise ValueError(f"config arg t_range={a.t_range!r}: expected LO:HI (0..1)") from None
    if not sep:
      raise ValueError(f"config arg t_range={a.t_range!r}: expected LO:HI (0..1)")
  if a.attn_temp:
    out["attn_temperature"] = a.attn_temp
  if a.window and a.linear_attn:
    raise ValueError("config args window and linear_attn: one self-attention kind")
  if a.window:
    out.update(self_attn_kind="window", window=int(a.window))
  if a.linear_attn:
    out["self_attn_kind"] = "linear"
  if a.merge:
    out["token_merge"] = int(a.merge)
  return out


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
    # cond may have fewer rows than x_t (row i of x_t: cond row i mod R), embedded once per row
    y = y + tile_rows(_dense(w, ("channels", "embed"), "cond_embed", **kw)(cond.astype(self.dtype)),
                      b)
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
    check_survey_fields(cfg)
    if cfg.get("attention_impl", "auto") not in IMPLS:
      raise ValueError(f"config.head.attention_impl={cfg.attention_impl!r}: expected one of "
                       f"{', '.join(IMPLS)}")


def make_head(cfg, out_channels: int, dtype=jnp.float32) -> nn.Module:
  """From a config dict: type 'attention' | 'mlp' plus the module's fields."""
  check_head(cfg)
  head = AttentionHead if cfg.get("type", "attention") == "attention" else MLPHead
  return configlib.from_config(head, cfg, "config.head", out_channels=out_channels, dtype=dtype)

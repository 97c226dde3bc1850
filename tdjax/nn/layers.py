"""Norms, MLPs, position tables and the pre-norm transformer blocks (ViT and Llama flavours).

Every parameter carries logical axes (`tdjax.parallel.LOGICAL_RULES`); norm scales of width D use
('embed',) so FSDP shards them with the rest of the width.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdjax.nn.attention import Attention
from tdjax.nn.token_merge import bipartite_merge

_lp = nn.with_logical_partitioning
Dtype = Any


# ---------------------------------------------------------------------------------------------
# Norms
# ---------------------------------------------------------------------------------------------

class LayerNorm(nn.Module):
  """LayerNorm with statistics in fp32 (ViT: eps 1e-6)."""
  eps: float = 1e-6
  use_bias: bool = True
  use_scale: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(epsilon=self.eps, use_bias=self.use_bias, use_scale=self.use_scale,
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        scale_init=_lp(nn.initializers.ones, ("embed",)),
                        bias_init=_lp(nn.initializers.zeros, ("embed",)), name="ln")(x)


class RMSNorm(nn.Module):
  """Llama RMSNorm: normalise in fp32, cast back to the input dtype, then scale (eps 1e-5)."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _lp(nn.initializers.ones, ("embed",)), (x.shape[-1],),
                       self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y.astype(x.dtype) * scale.astype(x.dtype)).astype(self.dtype)


def make_norm(kind: str, eps: float | None, dtype, param_dtype, name: str):
  if kind == "layer":
    return LayerNorm(eps=1e-6 if eps is None else eps, dtype=dtype, param_dtype=param_dtype,
                     name=name)
  if kind == "rms":
    return RMSNorm(eps=1e-5 if eps is None else eps, dtype=dtype, param_dtype=param_dtype,
                   name=name)
  raise ValueError(f"norm={kind!r}: expected 'layer' or 'rms'")


# ---------------------------------------------------------------------------------------------
# MLPs
# ---------------------------------------------------------------------------------------------

ACTIVATIONS: dict[str, Callable] = {
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def _dense(features, axes, use_bias, dtype, param_dtype, kernel_init, name):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=_lp(kernel_init, axes), bias_init=_lp(nn.initializers.zeros, axes[-1:]),
                  name=name)


class Mlp(nn.Module):
  """fc1 -> activation -> fc2 ('gelu_tanh' = SigLIP/ViT, 'gelu' = exact erf)."""
  hidden: int
  out_features: int | None = None
  activation: str = "gelu_tanh"
  use_bias: bool = True
  dropout_rate: float = 0.0
  kernel_init: Callable = nn.initializers.xavier_uniform()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    d = x.shape[-1]
    h = _dense(self.hidden, ("embed", "mlp"), self.use_bias, self.dtype, self.param_dtype,
               self.kernel_init, "fc1")(x)
    h = ACTIVATIONS[self.activation](h)
    h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
    h = _dense(self.out_features or d, ("mlp", "embed"), self.use_bias, self.dtype,
               self.param_dtype, self.kernel_init, "fc2")(h)
    return nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)


class SwiGLU(nn.Module):
  """Llama FFN: w2(silu(w1 x) * w3 x), no bias."""
  hidden: int
  out_features: int | None = None
  use_bias: bool = False
  dropout_rate: float = 0.0
  kernel_init: Callable = nn.initializers.normal(0.02)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    d = x.shape[-1]
    a = _dense(self.hidden, ("embed", "mlp"), self.use_bias, self.dtype, self.param_dtype,
               self.kernel_init, "w1")(x)
    b = _dense(self.hidden, ("embed", "mlp"), self.use_bias, self.dtype, self.param_dtype,
               self.kernel_init, "w3")(x)
    h = nn.with_logical_constraint(jax.nn.silu(a) * b, ("batch", "length", "mlp"))
    h = _dense(self.out_features or d, ("mlp", "embed"), self.use_bias, self.dtype,
               self.param_dtype, self.kernel_init, "w2")(h)
    return nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)


def find_multiple(n: int, k: int) -> int:
  return n if n % k == 0 else n + k - n % k


def llama_ffn_hidden(dim: int, multiple_of: int = 256, multiplier: float | None = None) -> int:
  """LlamaGen: find_multiple(int(2 * 4 * dim / 3), 256) (GPT-L 1024 -> 2816)."""
  h = int(2 * 4 * dim / 3)
  if multiplier is not None:
    h = int(multiplier * h)
  return find_multiple(h, multiple_of)


# ---------------------------------------------------------------------------------------------
# Position tables
# ---------------------------------------------------------------------------------------------

def resize_pos_grid(table, src_hw: tuple[int, int], dst_hw: tuple[int, int]):
  """[Hs*Ws, D] table viewed as a grid -> [Hd*Wd, D]: bilinear, half-pixel centres, antialiased
  when shrinking (PyTorch `interpolate(bilinear, align_corners=False, antialias=True)`)."""
  if tuple(src_hw) == tuple(dst_hw):
    return table
  d = table.shape[-1]
  grid = table.reshape(src_hw[0], src_hw[1], d).astype(jnp.float32)
  out = jax.image.resize(grid, (dst_hw[0], dst_hw[1], d), method="linear", antialias=True)
  return out.reshape(dst_hw[0] * dst_hw[1], d).astype(table.dtype)


class PosEmbed2D(nn.Module):
  """Learned [grid_h * grid_w, D] table, resized to any (h, w) patch grid at call time."""
  grid: tuple[int, int]
  features: int
  init_std: float = 0.02
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: int, w: int):
    table = self.param("table", _lp(nn.initializers.normal(self.init_std), ("length", "embed")),
                       (self.grid[0] * self.grid[1], self.features), self.param_dtype)
    return resize_pos_grid(table, tuple(self.grid), (h, w))


class PosEmbed1D(nn.Module):
  """Learned [length, D] table (truncated normal)."""
  length: int
  features: int
  init_std: float = 0.02
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, n: int | None = None):
    table = self.param("table", _lp(nn.initializers.truncated_normal(self.init_std),
                                    ("length", "embed")), (self.length, self.features),
                       self.param_dtype)
    return table if n is None else table[:n]


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

class TransformerBlock(nn.Module):
  """Pre-norm block: x + attn(norm x) [+ x + cross_attn(norm x, context)] + x + mlp(norm x).

  ViT flavour: norm='layer' (eps 1e-6), mlp='gelu_tanh' or 'gelu', use_bias=True.
  Llama flavour: norm='rms' (eps 1e-5, fp32), mlp='swiglu', use_bias=False.
  """
  num_heads: int
  mlp_dim: int
  head_dim: int | None = None
  norm: str = "layer"
  norm_eps: float | None = None
  mlp: str = "gelu_tanh"
  use_bias: bool = True
  cross_attention: bool = False
  dropout_rate: float = 0.0        # residual dropout after attention and MLP
  attention_impl: str = "auto"   # see tdjax.nn.attention.Attention.impl
  # adaLN-single (PixArt / TransDiff): per-block table [6, D] (N(0,1)/sqrt(D)) + the caller's
  # adaln_cond [B, 6, D] (or per token [B, L, 6, D]) = (shift1, scale1, gate1, shift2, scale2,
  # gate2); modulates and gates the self-attention and MLP branches, cross-attention stays plain.
  adaln: bool = False
  self_attention: bool = True      # False: no self-attention branch (tokens mix only via context)
  # Attention-survey switches (tdjax/generators/heads.py documents them); the defaults are the
  # block above, parameter for parameter.  adaln_mode 'zero' (DiT adaLN-zero): adaln_cond is the
  # conditioning vector y [B, 1, D] (or [B, L, D]) and (shift1, .., gate2) = Linear_6D(SiLU y),
  # zero-initialised (param adaLN_modulation), no table.  cross_gate: the cross-attention output
  # times tanh(alpha), alpha [D] zero-initialised.  qk_norm / attn_kind ('softmax' | 'linear') /
  # attn_identity: tdjax.nn.Attention's qk_norm / kind / identity on the self-attention (qk_norm
  # on the cross-attention too).  attn_temperature 'learned_t': self-attention logits / tau(t),
  # tau = exp(a_h + b_h t) per head, (a, b) zero-initialised (tau = 1), t = aux['t'] in [0, 1].
  # token_merge r: ToMe bipartite merging of r tokens before the self-attention (proportional
  # attention: logits + log(size)), unmerged after.  joint_len M: MMDiT joint attention, x =
  # [condition stream (M tokens); latent stream]: each stream its own norms, modulation
  # (context_*), q/k/v/out projections and MLP, one attention over both.
  adaln_mode: str = "single"
  cross_gate: bool = False
  qk_norm: bool = False
  attn_kind: str = "softmax"
  attn_identity: bool = False
  attn_temperature: str = "none"
  token_merge: int = 0
  joint_len: int | None = None
  kernel_init: Callable = nn.initializers.xavier_uniform()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _modulation(self, d, adaln_cond, prefix=""):
    """The six adaLN vectors, each [B, 1, D] or per token [B, L, D]."""
    if self.adaln_mode == "zero":
      y = nn.Dense(6 * d, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=_lp(nn.initializers.zeros, ("embed", "mlp")),
                   bias_init=_lp(nn.initializers.zeros, ("mlp",)),
                   name=prefix + "adaLN_modulation")(nn.silu(adaln_cond))
      mod = y.reshape(y.shape[:-1] + (6, d)).astype(self.dtype)      # [B, 1|L, 6, D]
      if mod.shape[1] == 1:
        mod = mod[:, 0]
    elif self.adaln_mode == "single":
      table = self.param(prefix + "scale_shift_table",
                         _lp(lambda k, s, dt=jnp.float32: jax.random.normal(k, s, dt) / d ** 0.5,
                             (None, "embed")), (6, d), self.param_dtype)
      mod = (table + adaln_cond).astype(self.dtype)   # [B, 6, D] or per token [B, L, 6, D]
    else:
      raise ValueError(f"adaln_mode={self.adaln_mode!r}: expected 'single' or 'zero'")
    return [mod[:, i][:, None, :] if mod.ndim == 3 else mod[:, :, i] for i in range(6)]

  def _logit_scale(self, aux):
    if self.attn_temperature == "none":
      return None
    if self.attn_temperature != "learned_t":
      raise ValueError(f"attn_temperature={self.attn_temperature!r}: expected 'none' or "
                       f"'learned_t'")
    ab = self.param("attn_temperature", _lp(nn.initializers.zeros, (None, "heads")),
                    (2, self.num_heads), self.param_dtype)
    t = jnp.asarray(aux["t"], jnp.float32)[:, None]
    return jnp.exp(-(ab[0] + ab[1] * t))                 # 1 / tau(t), [B, H]

  @nn.compact
  def __call__(self, x, mask=None, rope=None, context=None, context_mask=None, adaln_cond=None,
               *, decode: bool = False, deterministic: bool = True, kv_prefix=None,
               keep_kv: int = 0, aux=None):
    """kv_prefix (k, v) [B, P, H, hd]: self-attention keys/values of P earlier positions that x
    also attends to but that are not updated here (mask [len(x), P + len(x)]); keep_kv=P returns
    (x, (k, v) of x's first P positions).  For reusing a prefix whose states do not depend on
    what follows it.  aux: per-example inputs of the survey switches, {'t': [B] in [0, 1],
    'cross_keep': [B] (0 drops the cross-attention branch of that example)}."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    if (kv_prefix is not None or keep_kv) and (self.adaln or not self.self_attention):
      raise ValueError("TransformerBlock(kv_prefix= / keep_kv=) needs plain self-attention "
                       "(no adaLN)")
    if self.joint_len is not None:
      return self._joint(x, mask, adaln_cond, aux, deterministic)
    kept = None
    mod = None
    if self.adaln:
      if adaln_cond is None:
        raise ValueError("TransformerBlock(adaln=True) needs adaln_cond [B, 6, D]")
      mod = self._modulation(x.shape[-1], adaln_cond)
    if self.self_attention:
      norm1 = make_norm(self.norm, self.norm_eps, name="norm1", **kw)
      attn = Attention(self.num_heads, self.head_dim, use_bias=self.use_bias,
                       kernel_init=self.kernel_init, impl=self.attention_impl,
                       qk_norm=self.qk_norm, kind=self.attn_kind, identity=self.attn_identity,
                       name="attn", **kw)
      h = norm1(x)
      if mod is not None:
        h = h * (1 + mod[1]) + mod[0]
      unmerge = None
      if self.token_merge:
        if mask is not None or rope is not None or decode or kv_prefix is not None or keep_kv:
          raise ValueError("token_merge needs unmasked self-attention (no mask, RoPE or cache)")
        h, sizes, unmerge = bipartite_merge(h, self.token_merge)
        mask = jnp.log(sizes)[:, None, None, :]          # proportional attention
      h = attn(h, mask=mask, rope=rope, decode=decode, kv_prefix=kv_prefix, keep_kv=keep_kv,
               logit_scale=self._logit_scale(aux))
      if keep_kv:
        h, kept = h
      if unmerge is not None:
        h = unmerge(h)
      if mod is not None:
        h = h * mod[2]
      x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    if self.cross_attention:
      h = make_norm(self.norm, self.norm_eps, name="norm_cross", **kw)(x)
      h = Attention(self.num_heads, self.head_dim, use_bias=self.use_bias,
                    kernel_init=self.kernel_init, impl=self.attention_impl, name="cross_attn",
                    qk_norm=self.qk_norm, **kw)(
                        h, context=context, mask=context_mask)
      if self.cross_gate:
        alpha = self.param("cross_gate", _lp(nn.initializers.zeros, ("embed",)), (x.shape[-1],),
                           self.param_dtype)
        h = h * jnp.tanh(alpha).astype(h.dtype)
      if aux is not None and aux.get("cross_keep") is not None:
        h = h * aux["cross_keep"].astype(h.dtype)[:, None, None]
      x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = make_norm(self.norm, self.norm_eps, name="norm2", **kw)(x)
    if mod is not None:
      h = h * (1 + mod[4]) + mod[3]
    if self.mlp == "swiglu":
      h = SwiGLU(self.mlp_dim, use_bias=self.use_bias, kernel_init=self.kernel_init,
                 dropout_rate=self.dropout_rate, name="mlp", **kw)(h, deterministic)
    else:
      h = Mlp(self.mlp_dim, activation=self.mlp, use_bias=self.use_bias,
              kernel_init=self.kernel_init, dropout_rate=self.dropout_rate, name="mlp", **kw)(
                  h, deterministic)
    if mod is not None:
      h = h * mod[5]
    x = x + h
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    return (x, kept) if keep_kv else x

  def _joint(self, x, mask, adaln_cond, aux, deterministic):
    """MMDiT block: x = [condition stream (joint_len tokens); latent stream]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    m, d = self.joint_len, x.shape[-1]
    if not (self.adaln and self.self_attention) or self.token_merge or self.cross_attention:
      raise ValueError("joint attention needs adaLN and self-attention, no token merging and "
                       "no cross-attention")
    # (name prefix, tokens, shift / scale / gate of attention and MLP): the latent stream, then the
    # condition stream with its own norms, modulation and MLP (none when there is no condition)
    streams = [("", x[:, m:], self._modulation(d, adaln_cond))]
    if m:
      streams.append(("context_", x[:, :m], self._modulation(d, adaln_cond, "context_")))
    h = jnp.concatenate([modulate(make_norm(self.norm, self.norm_eps, name=n + "norm1", **kw)(part),
                                  mod[0], mod[1]) for n, part, mod in streams[::-1]], axis=1)
    h = Attention(self.num_heads, self.head_dim, use_bias=self.use_bias,
                  kernel_init=self.kernel_init, impl=self.attention_impl, qk_norm=self.qk_norm,
                  kind=self.attn_kind, identity=self.attn_identity, name="attn", **kw)(
                      h, mask=mask, logit_scale=self._logit_scale(aux), joint_len=m)
    outs = []
    for (n, part, mod), a in zip(streams, (h[:, m:], h[:, :m])):   # [condition; latent] order
      part = part + nn.Dropout(self.dropout_rate)(a * mod[2], deterministic=deterministic)
      u = modulate(make_norm(self.norm, self.norm_eps, name=n + "norm2", **kw)(part), mod[3],
                   mod[4])
      u = Mlp(self.mlp_dim, activation=self.mlp, use_bias=self.use_bias,
              kernel_init=self.kernel_init, dropout_rate=self.dropout_rate, name=n + "mlp",
              **kw)(u, deterministic)
      outs.append(part + u * mod[5])
    return jnp.concatenate(outs[::-1], axis=1)


def modulate(x, shift, scale):
  """adaLN: x * (1 + scale) + shift, with [B, D] or [B, 1, D] shift/scale broadcast over length."""
  if shift.ndim == x.ndim - 1:
    shift, scale = shift[:, None], scale[:, None]
  return x * (1 + scale) + shift


def vit_block_kwargs(num_heads, mlp_dim, gelu_approximate: bool = True, **kw) -> dict:
  return dict(num_heads=num_heads, mlp_dim=mlp_dim, norm="layer", norm_eps=1e-6,
              mlp="gelu_tanh" if gelu_approximate else "gelu", use_bias=True, **kw)


def llama_block_kwargs(num_heads, mlp_dim, **kw) -> dict:
  return dict(num_heads=num_heads, mlp_dim=mlp_dim, norm="rms", norm_eps=1e-5, mlp="swiglu",
              use_bias=False, kernel_init=nn.initializers.normal(0.02), **kw)


REMAT_POLICIES = {
    "none": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class _ScanBody(nn.Module):
  """Adapts a block to nn.scan's (carry, *xs) -> (carry, out) signature; out = the block's
  self-attention (k, v) on the first keep_prefix positions (None when 0)."""
  block_kwargs: dict
  decode: bool = False
  deterministic: bool = True
  keep_prefix: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, rope, context, context_mask, adaln_cond, kv_prefix=None, aux=None):
    out = TransformerBlock(**self.block_kwargs, dtype=self.dtype, param_dtype=self.param_dtype,
                           name="block")(x, mask, rope, context, context_mask, adaln_cond,
                                         decode=self.decode, deterministic=self.deterministic,
                                         kv_prefix=kv_prefix, keep_kv=self.keep_prefix, aux=aux)
    return out if self.keep_prefix else (out, None)   # (x, kept (k, v)) or (x, None)


class TransformerStack(nn.Module):
  """`depth` TransformerBlocks, unrolled (params blocks_{i}) or nn.scan-ned over a 'layers' axis
  (params layers/block/... with a leading [depth] axis); optional remat with a named policy.

  With scan=True the 'cache' collection is stacked over layers too, so KV-cached decoding works
  either way.  Outputs of scan and unrolled stacks agree given the same (restacked) parameters.

  Prefix reuse (for a prefix of positions that never attends to the rest, e.g. the DetailFlow
  encoder's patches): keep_prefix=P also returns every block's self-attention keys and values on
  positions [0, P), (k, v) each stacked [depth, B, P, H, hd]; a later call with kv_prefix=<those>
  and x = the remaining positions only (mask rows [len(x), P + len(x)]) gives the same outputs on
  them without recomputing the prefix."""
  depth: int
  block_kwargs: dict
  scan: bool = False
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask=None, rope=None, context=None, context_mask=None, adaln_cond=None,
               *, decode: bool = False, deterministic: bool = True, keep_prefix: int = 0,
               kv_prefix=None, aux=None):
    """aux: per-example arrays every block reads (TransformerBlock's aux), or None."""
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat={self.remat!r}: expected one of {sorted(REMAT_POLICIES)}")
    if kv_prefix is not None and kv_prefix[0].shape[0] != self.depth:
      raise ValueError(f"kv_prefix has {kv_prefix[0].shape[0]} layers; expected "
                       f"depth={self.depth}")
    policy = REMAT_POLICIES[self.remat]
    body = _ScanBody
    if self.remat != "none":
      body = nn.remat(_ScanBody, policy=policy, prevent_cse=not self.scan)
    kw = dict(block_kwargs=dict(self.block_kwargs), decode=decode, deterministic=deterministic,
              keep_prefix=keep_prefix, dtype=self.dtype, param_dtype=self.param_dtype)
    args = (x, mask, rope, context, context_mask, adaln_cond)
    if self.scan:
      prefix_axis = nn.broadcast if kv_prefix is None else 0
      scanned = nn.scan(body, variable_axes={"params": 0, "cache": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast,) * 5 + (prefix_axis, nn.broadcast),
                        length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
      x, kept = scanned(name="layers", **kw)(*args, kv_prefix, aux)
    else:
      kept = []
      for i in range(self.depth):
        x, k = body(name=f"blocks_{i}", **kw)(
            x, *args[1:],
            None if kv_prefix is None else jax.tree.map(lambda a: a[i], kv_prefix), aux)
        kept.append(k)
      kept = jax.tree.map(lambda *a: jnp.stack(a), *kept) if keep_prefix else None
    return (x, kept) if keep_prefix else x


def unstack_layers(params: dict, depth: int) -> dict:
  """Scanned stack params {'layers': {...[depth, ...]}} -> unrolled {'blocks_i': {...}}."""
  return {f"blocks_{i}": jax.tree.map(lambda a: a[i], params["layers"]) for i in range(depth)}


def stack_layers(params: dict, depth: int) -> dict:
  """Inverse of `unstack_layers`."""
  return {"layers": jax.tree.map(lambda *a: jnp.stack(a), *[params[f"blocks_{i}"]
                                                           for i in range(depth)])}

"""Multi-head attention (self / cross) with boolean or additive masks, RoPE and a KV cache.

Masks are "may attend" booleans (True = keep) broadcastable to [B, H, Lq, Lk]; a floating mask is
treated as additive logits.  Softmax is computed in fp32 whatever the compute dtype.

KV cache (decode=True, flax lm1b / Gemma style): variables in the 'cache' collection
  cached_key, cached_value [B, max_len, H, D]   (max_len = sequence length of the init call)
  cache_index            []                      (number of positions written)
A call with L new tokens writes them at cache_index and lets each of them see every key written so
far *including all L new ones*, so a group of g queries written together see each other (the
next-detail block mask).  A caller mask [.., L, max_len] (boolean) is and-ed on top.  RoPE arrays passed in
decode mode must be those of the new positions.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdjax.nn.rope import apply_rope

_lp = nn.with_logical_partitioning
Dtype = Any


def make_attention_mask_from_bool(mask):
  """[Lq, Lk] or [B, Lq, Lk] or [B, H, Lq, Lk] -> 4D."""
  mask = jnp.asarray(mask)
  while mask.ndim < 4:
    mask = mask[None] if mask.ndim == 2 else mask[:, None]
  return mask


def group_causal_mask(length: int, group: int, causal_num: int | None = None):
  """Boolean [L, L]: row i sees j iff j <= i, or (i >= causal_num and i // g == j // g).

  causal_num = g: first group token-causal, then block-causal by groups (DetailFlow encoder queries
  and next-detail AR mask).  group=1 gives the plain causal mask."""
  c = group if causal_num is None else causal_num
  i = jnp.arange(length)[:, None]
  j = jnp.arange(length)[None, :]
  return (j <= i) | ((i >= c) & (i // group == j // group))


def block_causal_mask(length: int, block: int):
  """Boolean [L, L]: bidirectional inside blocks of `block`, causal across (MRAR images)."""
  i = jnp.arange(length)[:, None]
  j = jnp.arange(length)[None, :]
  return i // block >= j // block


def tile_rows(a, rows: int, what: str = "condition"):
  """a [R, ...] -> [rows, ...] with row i = a[i mod R] (R divides rows): the order of
  `diffusion_batch_mul`'s copies (`tdjax.diffusion.flow.repeat_batch`)."""
  r = a.shape[0]
  if r == rows:
    return a
  if rows % r:
    raise ValueError(f"a {what} of {r} rows for a batch of {rows}: expected a divisor of {rows}")
  return jnp.tile(a, (rows // r,) + (1,) * (a.ndim - 1))


def key_padding_mask(valid):
  """valid [B, Lk] bool -> [B, 1, 1, Lk]."""
  return jnp.asarray(valid)[:, None, None, :]


def dot_product_attention(q, k, v, mask=None, dtype=None):
  """q [B, Lq, H, D], k/v [B, Lk, H, D]; fp32 softmax; returns [B, Lq, H, D] in q.dtype.

  The two products run on heads-major copies [B, H, L, D]: XLA's CPU backend turns a batched
  matmul whose batch axes (b, h) are not the leading ones into a slow loop of small products;
  with them leading, one self-attention of TransDiff's bench decoder (8 x 256 tokens, width 128,
  4 heads) fell from ~30 to ~9 ms on 2 cores.  Same maths; float32 round-off differs."""
  dtype = dtype or q.dtype
  q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
  mask = None if mask is None else make_attention_mask_from_bool(mask)
  additive = mask is not None and mask.dtype != jnp.bool_
  logits = _scores(q, k, None if additive else mask)
  if additive:
    logits = logits + mask.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  out = jnp.einsum("bhqk,bhkd->bhqd", probs, v.astype(dtype).transpose(0, 2, 1, 3))
  return out.transpose(0, 2, 1, 3)


# fp32 scores of one block of `blocked_attention` (about the cores' share of the cache)
BLOCK_BYTES = 4 << 20
IMPLS = ("auto", "einsum", "blocked", "fused", "cudnn")


def resolve_impl(impl: str) -> str:
  """'auto' -> 'blocked' on the CPU backend, 'einsum' on GPUs / TPUs (where XLA's fusions or
  cuDNN ('fused') serve better than a loop of blocks); other values as given."""
  if impl == "auto":
    return "blocked" if jax.default_backend() == "cpu" else "einsum"
  return impl


def _scores(q, k, mask):
  s = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  s = s * q.shape[-1] ** -0.5
  return s if mask is None else jnp.where(mask, s, jnp.finfo(jnp.float32).min)


def _block_forward(q, k, v, mask):
  """One block, heads-major [b, H, L, D]: out = softmax(q k^T / sqrt(D)) v, with the rows' max m
  and sum l of exp(s - m) (the backward rebuilds P = exp(s - m) / l from them)."""
  s = _scores(q, k, mask)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.exp(s - m)
  l = jnp.sum(e, axis=-1, keepdims=True)
  out = jnp.einsum("bhqk,bhkd->bhqd", e.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return (out / l).astype(v.dtype), (m[..., 0], l[..., 0])


def _block_backward(q, k, v, mask, m, l, delta, dout):
  """The softmax-attention VJP of one block (FlashAttention's backward, P recomputed):
  dV = P^T dO, dP = dO V^T, dS = P o (dP - rowsum(dO o O)), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D)."""
  p = jnp.exp(_scores(q, k, mask) - m[..., None]) / l[..., None]
  dv = jnp.einsum("bhqk,bhqd->bhkd", p.astype(dout.dtype), dout,
                  preferred_element_type=jnp.float32).astype(v.dtype)
  dp = jnp.einsum("bhqd,bhkd->bhqk", dout, v, preferred_element_type=jnp.float32)
  ds = p * (dp - delta[..., None]) * q.shape[-1] ** -0.5
  if mask is not None:     # a masked score is a constant (rows with no key left: P uniform)
    ds = jnp.where(mask, ds, 0.0)
  ds = ds.astype(q.dtype)
  dq = jnp.einsum("bhqk,bhkd->bhqd", ds, k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bhqk,bhqd->bhkd", ds, q, preferred_element_type=jnp.float32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv


def _split(a, n):
  """[B, ...] -> [n, B / n, ...], block i = rows i, i + n, ...: the batch axis stays the major
  factor, so a batch sharded over devices stays sharded inside every block."""
  return jnp.moveaxis(a.reshape((a.shape[0] // n, n) + a.shape[1:]), 1, 0)


def _merge(a):
  return jnp.moveaxis(a, 0, 1).reshape((-1,) + a.shape[2:])


def _map_blocks(fn, n, mask, *arrays):
  """fn(*arrays, mask) over n batch blocks (one program, a loop); a mask without a batch axis is
  shared by every block."""
  if n == 1:
    return fn(*arrays, mask)
  shared = mask is None or mask.shape[0] == 1
  xs = tuple(_split(a, n) for a in arrays + (() if shared else (mask,)))
  out = jax.lax.map(lambda a: fn(*a[:len(arrays)], mask if shared else a[-1]), xs)
  return jax.tree.map(_merge, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked(q, k, v, mask, n):
  return _blocked_fwd(q, k, v, mask, n)[0]


def _blocked_fwd(q, k, v, mask, n):
  out, (m, l) = _map_blocks(_block_forward, n, mask, q, k, v)
  return out, (q, k, v, mask, out, m, l)


def _blocked_bwd(n, res, dout):
  q, k, v, mask, out, m, l = res
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  fn = lambda q, k, v, m, l, delta, dout, mask: _block_backward(q, k, v, mask, m, l, delta, dout)
  dq, dk, dv = _map_blocks(fn, n, mask, q, k, v, m, l, delta, dout)
  return dq, dk, dv, None      # masks are constants: no cotangent


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def num_blocks(batch: int, heads: int, lq: int, lk: int, block_bytes: int = BLOCK_BYTES) -> int:
  """The fewest batch blocks n (a divisor of `batch`) whose fp32 scores [batch / n, H, Lq, Lk]
  fit in block_bytes (n = batch when even one row does not)."""
  for n in range(1, batch + 1):
    if batch % n == 0 and (batch // n) * heads * lq * lk * 4 <= block_bytes:
      return n
  return batch


def blocked_attention(q, k, v, mask=None, dtype=None, block_bytes: int = BLOCK_BYTES):
  """`dot_product_attention`'s result (float32 round-off apart) computed over blocks of the batch
  whose scores stay in the cache, with a hand-written backward that rebuilds each block's
  probabilities instead of storing them (FlashAttention's recomputation, Dao et al. 2022; here
  the blocks are batch rows, each over the whole key length): no [B, H, Lq, Lk] array is written
  to memory in the forward or the backward.  On this project's 2-core CPU the TransDiff
  decoder's self-attention (32 x 256 tokens, 4 heads of 32) runs forward + backward in 47-52 ms
  instead of 70-86 ms (docs/measurements.md, issue 48).  Boolean masks only (an
  additive float mask goes to `dot_product_attention`, which differentiates it); masks get no
  gradient.  The loop over blocks is written for CPUs: on GPUs / TPUs use 'einsum' or 'fused'
  (`resolve_impl('auto')` does).  No forward-mode derivative (jax.jvp) through it."""
  if mask is not None:
    mask = make_attention_mask_from_bool(mask)
    if mask.dtype != jnp.bool_:
      return dot_product_attention(q, k, v, mask, dtype)
  dtype = dtype or q.dtype
  b, lq, h, _ = q.shape
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v.astype(dtype)))
  if mask is not None and mask.shape[0] not in (1, b):
    raise ValueError(f"attention mask batch {mask.shape[0]}: expected 1 or {b}")
  n = num_blocks(b, h, lq, k.shape[2], block_bytes)
  return _blocked(q, k, v, mask, n).transpose(0, 2, 1, 3)


def linear_attention(q, k, v, mask=None, dtype=None, eps: float = 1e-6):
  """Kernelised (linear) attention with the elu + 1 feature map phi (Katharopoulos et al. 2020):
  out_i = phi(q_i)^T (sum_j m_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j m_j phi(k_j) + eps), per head,
  in fp32: O(L D^2) instead of O(L^2 D); the same as the O(L^2) formula with A_ij =
  phi(q_i) . phi(k_j) m_j, out = A v / rowsum(A).  Masks: keys only (a boolean mask with one
  query row, e.g. [B, 1, 1, Lk]); q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
  dtype = dtype or q.dtype
  phi = lambda a: jax.nn.elu(a.astype(jnp.float32)) + 1.0
  fq, fk, fv = phi(q), phi(k), v.astype(jnp.float32)
  if mask is not None:
    mask = make_attention_mask_from_bool(mask)
    if mask.dtype != jnp.bool_ or mask.shape[-2] != 1:
      raise ValueError("linear attention takes boolean key masks only ([B, 1, 1, Lk]): a "
                       "per-query mask does not factorise")
    fk = fk * jnp.moveaxis(mask[:, :, 0, :], 1, 2)[..., None].astype(jnp.float32)  # [B, Lk, H|1, 1]
  kv = jnp.einsum("bkhd,bkhe->bhde", fk, fv)
  num = jnp.einsum("bqhd,bhde->bqhe", fq, kv)
  den = jnp.einsum("bqhd,bhd->bqh", fq, fk.sum(axis=1))[..., None]
  return (num / (den + eps)).astype(dtype)


def fused_attention(q, k, v, mask=None, implementation=None):
  """`jax.nn.dot_product_attention` (cuDNN flash attention on GPUs when eligible, XLA elsewhere)
  with a boolean "may attend" mask; same contract as `dot_product_attention`."""
  if mask is not None:
    mask = make_attention_mask_from_bool(mask)
    if mask.dtype != jnp.bool_:
      raise ValueError("fused attention takes boolean masks only")
    b, lq, h, _ = q.shape
    mask = jnp.broadcast_to(mask, (b, mask.shape[1], lq, k.shape[1]))
  return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                      implementation=implementation)


def _rotate(x, rope, interleaved):
  if rope is None:
    return x
  if callable(rope):
    return rope(x)
  cos, sin = rope
  return apply_rope(x, cos, sin, interleaved=interleaved)


class HeadProjection(nn.Module):
  """x [..., D] -> [..., H, hd] (split=True) or x [..., H, hd] -> [..., D] (split=False).

  The kernel is initialised as the flat [in, out] matrix (so fan-in / fan-out are those of the
  equivalent Linear) and stored reshaped, with its logical axes; DenseGeneral would apply the
  3-name constraint to the flat 2D kernel and fail under a mesh.  split=True also takes
  features (3, H, hd): a fused q/k/v projection, kernel [D, 3, H, hd]."""
  features: tuple
  split: bool
  use_bias: bool = True
  kernel_init: Callable = nn.initializers.xavier_uniform()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.split:
      d, feats = x.shape[-1], tuple(self.features)
      lead = (None,) * (len(feats) - 2)      # the q/k/v axis of a fused projection
      shape, flat = (d, *feats), (d, math.prod(feats))
      names, bshape = ("embed", *lead, "heads", "head_dim"), feats
      bnames = (*lead, "heads", "head_dim")
      out = "thk"[-len(feats):]
      eq = f"...d,d{out}->...{out}"
    else:
      (d,) = self.features
      h, hd = x.shape[-2:]
      shape, flat = (h, hd, d), (h * hd, d)
      names, bshape, bnames = ("heads", "head_dim", "embed"), (d,), ("embed",)
      eq = "...hk,hkd->...d"
    init = self.kernel_init
    kernel = self.param("kernel", _lp(lambda k, s, dt=jnp.float32: init(k, flat, dt).reshape(s),
                                      names), shape, self.param_dtype)
    y = jnp.einsum(eq, x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", _lp(nn.initializers.zeros, bnames), bshape, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Attention(nn.Module):
  """Separate q/k/v/out projections.  `context` given -> cross-attention (k, v from context).

  Kernels: q/k/v [embed, heads, head_dim], out [heads, head_dim, embed]."""
  num_heads: int
  head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  rope_interleaved: bool = True
  kernel_init: Callable = nn.initializers.xavier_uniform()
  out_kernel_init: Callable | None = None
  # 'einsum': explicit fp32-softmax einsums (any mask, KV cache); 'blocked': the same over
  # cache-sized batch blocks with a recomputing backward (`blocked_attention`, for CPUs);
  # 'fused' / 'cudnn': jax.nn.dot_product_attention (boolean masks; 'cudnn' forces the cuDNN
  # kernel, GPU + bf16); 'auto': 'blocked' on CPUs, 'einsum' elsewhere (`resolve_impl`)
  impl: str = "auto"
  # Attention-survey switches (tdjax/generators/heads.py), all off by default (no parameter, no
  # op): qk_norm: RMSNorm over head_dim on queries and keys (learned scales query_norm /
  # key_norm [hd]); kind 'linear': `linear_attention` (elu + 1 kernel) instead of softmax;
  # identity: every query attends to itself only, out = out_proj(v) (perturbed-attention
  # guidance's perturbed branch; self-attention only)
  qk_norm: bool = False
  kind: str = "softmax"
  identity: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None, mask=None, rope=None, context_rope=None, *,
               decode: bool = False, kv_prefix=None, keep_kv: int = 0, logit_scale=None,
               joint_len: int | None = None):
    """kv_prefix (k, v), each [B, P, H, hd]: keys/values of P earlier positions, put before x's
    own (self-attention; mask then [len(x), P + len(x)]).  keep_kv=P: also return (k, v) of x's
    first P positions, i.e. returns (out, (k, v)).  logit_scale [B, H]: multiplies the logits
    (1 / temperature; applied to the queries).  joint_len=M (MMDiT joint attention): x's first M
    tokens are a second stream with their own projections context_{query,key,value,out}; the
    two streams attend together (mask over all M + L keys)."""
    features = x.shape[-1]   # context may have fewer rows than x: row i uses context row i mod R
    hd = self.head_dim or features // self.num_heads
    cross = context is not None
    src = context if cross else x
    if kv_prefix is not None and (cross or decode or rope is not None):
      raise ValueError("Attention(kv_prefix=...) supports plain self-attention only "
                       "(no context, RoPE or KV-cache decoding)")
    if (self.identity or joint_len is not None) and (cross or decode or kv_prefix is not None
                                                     or keep_kv or rope is not None):
      raise ValueError("Attention(identity= / joint_len=) supports plain self-attention only")
    if self.kind not in ("softmax", "linear"):
      raise ValueError(f"attention kind={self.kind!r}: expected 'softmax' or 'linear'")

    def proj(name, inp):
      return HeadProjection((self.num_heads, hd), True, self.use_bias, self.kernel_init,
                            self.dtype, self.param_dtype, name=name)(inp)

    m = joint_len or 0
    if m:   # two streams, own projections, one attention
      q, k, v = (jnp.concatenate([proj("context_" + n, x[:, :m]), proj(n, x[:, m:])], axis=1)
                 for n in ("query", "key", "value"))
    else:
      q = proj("query", x[:, m:] if joint_len is not None else x)
      k = proj("key", src[:, m:] if joint_len is not None else src)
      v = proj("value", src[:, m:] if joint_len is not None else src)
    if self.identity:   # PAG: the attention map is the identity
      return self._out(v, features, m)
    if self.qk_norm:
      q, k = self._rms("query_norm", q), self._rms("key_norm", k)
    if logit_scale is not None:
      q = (q * logit_scale[:, None, :, None]).astype(q.dtype)
    q = _rotate(q, rope, self.rope_interleaved)
    k = _rotate(k, context_rope if cross else rope, self.rope_interleaved)
    if cross and k.shape[0] != q.shape[0]:   # a context shared by several rows of x: keys and
      k = tile_rows(k, q.shape[0], "context")  # values projected once per context row
      v = tile_rows(v, q.shape[0], "context")
    kept = (k[:, :keep_kv], v[:, :keep_kv]) if keep_kv else None
    if kv_prefix is not None:
      k = jnp.concatenate([kv_prefix[0].astype(k.dtype), k], axis=1)
      v = jnp.concatenate([kv_prefix[1].astype(v.dtype), v], axis=1)

    if decode and not cross:
      k, v, mask = self._update_cache(k, v, mask)
    elif mask is not None:
      mask = make_attention_mask_from_bool(mask)

    impl = resolve_impl(self.impl)
    if self.kind == "linear":
      out = linear_attention(q, k, v, mask, dtype=self.dtype)
    elif impl == "einsum" or (decode and not cross):
      out = dot_product_attention(q, k, v, mask, dtype=self.dtype)
    elif impl == "blocked":
      out = blocked_attention(q, k, v, mask, dtype=self.dtype)
    elif impl in ("fused", "cudnn"):
      out = fused_attention(q, k, v, mask, None if impl == "fused" else "cudnn")
    else:
      raise ValueError(f"attention impl={self.impl!r}: expected {', '.join(IMPLS)}")
    out = self._out(out, features, m)
    return (out, kept) if keep_kv else out

  def _out(self, out, features, m=0):
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "head_dim"))

    def proj(name, a):
      return HeadProjection((self.out_features or features,), False, self.use_bias,
                            self.out_kernel_init or self.kernel_init, self.dtype,
                            self.param_dtype, name=name)(a)
    if m:
      return jnp.concatenate([proj("context_out", out[:, :m]), proj("out", out[:, m:])], axis=1)
    return proj("out", out)

  def _rms(self, name, x, eps: float = 1e-6):
    """RMSNorm over head_dim (fp32 statistics), learned scale [hd] (qk-norm)."""
    scale = self.param(name, _lp(nn.initializers.ones, ("head_dim",)), (x.shape[-1],),
                       self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * scale).astype(x.dtype)

  def _update_cache(self, k, v, mask):
    initialized = self.has_variable("cache", "cached_key")
    ck = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
    ci = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
    if not initialized:  # init call: shapes only, attend like a normal forward
      return k, v, (None if mask is None else make_attention_mask_from_bool(mask))
    b, n, h, d = k.shape
    max_len = ck.value.shape[1]
    idx = ci.value
    ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), (0, idx, 0, 0))
    cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), (0, idx, 0, 0))
    ci.value = idx + n
    visible = (jnp.arange(max_len) < idx + n)[None, None, None, :]
    if mask is not None:
      visible = visible & make_attention_mask_from_bool(mask).astype(jnp.bool_)
    return ck.value, cv.value, visible

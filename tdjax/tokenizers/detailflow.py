"""DetailFlow 1D coarse-to-fine tokenizer (arXiv 2505.21473,
docs/reference/detailflow.md 1.2-1.6).

Encoder: image [-1, 1] NHWC -> (py, px, c) patches -> Linear -> + 2D pos table (resized) ;
         N learned queries + 1D pos embed; sequence [patches ; queries] with the mask
           patches -> patches only, queries -> all patches, queries -> queries token-causal for
           the first `causal_num` then block-causal by groups of g;
         ViT blocks (pre-LN), final LayerNorm, keep the queries, Linear -> code dim.
Bottleneck: l2-normalised VQ (or continuous).
Decoder: [grid mask tokens + resized 2D pos table ; Linear(code) of the first t tokens + 1D pos]
         bidirectional ViT blocks, final LayerNorm, Linear pixel head on the grid part, unpatchify.
         Any grid (multiple of the patch) at call time; the prefix length t may be a traced value
         (tokens >= t are masked out as keys, which equals truncation exactly).
Self-correction: `tokenize_train` returns the clean and the self-correction code sequences and
the mixed bottleneck loss (reference 1.6).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from tdjax import configlib
from tdjax.nn import LayerNorm, PosEmbed2D, TransformerStack, vit_block_kwargs
from tdjax.tokenizers.quantizers import ContinuousBottleneck, VectorQuantizer
from tdjax.tokenizers.resolution import sample_noise_index

_lp = nn.with_logical_partitioning
Dtype = Any


def encoder_mask(num_patches: int, num_tokens: int, group: int, causal_num: int | None = None,
                 causal: bool = True):
  """Boolean [P + N, P + N] "may attend" mask of the tokenizer encoder (reference 1.2).

  causal=False: the latent tokens attend to each other freely (the unordered-1D-token baseline of
  DetailFlow's Table 2, TiTok-style)."""
  c = group if causal_num is None else causal_num
  P, N = num_patches, num_tokens
  m = np.zeros((P + N, P + N), bool)
  m[:P, :P] = True
  m[P:, :P] = True
  a = np.arange(N)[:, None]
  b = np.arange(N)[None, :]
  m[P:, P:] = (b <= a) | ((a >= c) & (a // group == b // group)) if causal else True
  return m


def patchify(x, p: int):
  """[B, H, W, C] -> [B, (H/p)(W/p), p*p*C] in (py, px, c) order."""
  return rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=p, q=p)


def unpatchify(x, p: int, h: int, w: int, c: int):
  """[B, h*w, p*p*c] -> [B, h*p, w*p, c]."""
  return rearrange(x, "b (h w) (p q c) -> b (h p) (w q) c", h=h, w=w, p=p, q=p, c=c)


def _before(n, length: int):
  """Positions < n as a [B or 1, length] bool (n scalar or [B])."""
  n = jnp.asarray(n)
  pos = jnp.arange(length)
  return pos[None, :] < (n[:, None] if n.ndim == 1 else n)


@dataclasses.dataclass(frozen=True)
class TokenizerSize:
  enc_width: int
  enc_depth: int
  enc_heads: int
  enc_mlp: int
  dec_width: int
  dec_depth: int
  dec_heads: int
  dec_mlp: int


SIZES = {
    # encoder = 12 layers of SigLIP2-so400m; decoder = ViT-B from scratch (reference 1.2, 1.4)
    "full": TokenizerSize(1152, 12, 16, 4304, 768, 12, 12, 3072),
    "demo": TokenizerSize(96, 3, 4, 384, 96, 3, 4, 384),
    "tiny": TokenizerSize(32, 2, 2, 64, 32, 2, 2, 64),
}


class DetailFlowTokenizer(nn.Module):
  image_size: int = 256
  channels: int = 3
  patch: int = 16
  num_tokens: int = 128
  group: int = 8
  causal_num: int | None = None          # None = group
  causal_encoder: bool = True            # False: latent tokens attend freely (Table 2 baseline)
  enc_width: int = 1152
  enc_depth: int = 12
  enc_heads: int = 16
  enc_mlp: int = 4304
  dec_width: int = 768
  dec_depth: int = 12
  dec_heads: int = 12
  dec_mlp: int = 3072
  pos_grid: int | None = None            # side of the 2D pos tables (default image_size // patch)
  gelu_approximate: bool = True
  bottleneck: str = "vq"                 # 'vq' or 'continuous'
  codebook_size: int = 8192
  code_dim: int = 8
  commitment: float = 0.25
  codebook_weight: float = 1.0
  usage_decay: float = 0.99
  kl_weight: float = 0.0                 # continuous bottleneck only
  latent_noise: float = 0.0              # continuous bottleneck only
  top_k: int = 50                        # self-correction: perturb to one of the k nearest codes
  align_dim: int = 0                     # > 0: first-token alignment projector to this width
  align_hidden: int = 1024
  scan: bool = False
  remat: str = "none"
  attention_impl: str = "auto"         # 'auto' | 'einsum' | 'blocked' | 'fused' | 'cudnn' (tdjax.nn.Attention)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def c(self) -> int:
    return self.group if self.causal_num is None else self.causal_num

  @property
  def is_vq(self) -> bool:
    return self.bottleneck == "vq"

  def validate(self) -> None:
    """One-line errors naming the config key (config.model.X, config.input.image_size) for
    values the tokenizer cannot be built with; `build_tokenizer` calls it, so a config argument
    and a --config.model.X override are checked alike."""
    positive = dict(num_tokens=self.num_tokens, group=self.group, patch=self.patch,
                    code_dim=self.code_dim, enc_width=self.enc_width, enc_depth=self.enc_depth,
                    enc_heads=self.enc_heads, dec_width=self.dec_width,
                    dec_depth=self.dec_depth, dec_heads=self.dec_heads)
    if self.bottleneck == "vq":
      positive["codebook_size"] = self.codebook_size
    for k, v in positive.items():
      if int(v) <= 0:
        raise ValueError(f"config.model.{k}={v}: expected > 0")
    if self.num_tokens % self.group:
      raise ValueError(f"config.model.group={self.group} does not divide config.model.num_tokens="
                       f"{self.num_tokens} (tokens come in groups of g)")
    if self.causal_num is not None and not 0 <= self.causal_num <= self.num_tokens:
      raise ValueError(f"config.model.causal_num={self.causal_num}: expected 0..num_tokens="
                       f"{self.num_tokens} (0 = all groups parallel)")
    if self.image_size % self.patch:
      raise ValueError(f"config.input.image_size={self.image_size} is not a multiple of "
                       f"config.model.patch={self.patch}")
    for part in ("enc", "dec"):
      width, heads = getattr(self, f"{part}_width"), getattr(self, f"{part}_heads")
      if width % heads:
        raise ValueError(f"config.model.{part}_heads={heads} does not divide "
                         f"config.model.{part}_width={width}")
    if self.bottleneck not in ("vq", "continuous"):
      raise ValueError(f"config.model.bottleneck={self.bottleneck!r}: expected 'vq' or "
                       f"'continuous'")
    if self.top_k < 0:
      raise ValueError(f"config.model.top_k={self.top_k}: expected >= 0")

  def setup(self):
    N, P, C = self.num_tokens, self.patch, self.channels
    self.validate()
    grid = self.pos_grid or self.image_size // P
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = lambda f, axes, name, init=nn.initializers.xavier_uniform(): nn.Dense(
        f, kernel_init=_lp(init, axes), bias_init=_lp(nn.initializers.zeros, axes[-1:]),
        name=name, **kw)
    # encoder
    self.patch_embed = dense(self.enc_width, ("channels", "embed"), "patch_embed")
    self.enc_pos = PosEmbed2D((grid, grid), self.enc_width, param_dtype=self.param_dtype,
                              name="enc_pos")
    self.latent_tokens = self.param("latent_tokens", _lp(nn.initializers.normal(0.02),
                                                         ("length", "embed")),
                                    (N, self.enc_width), self.param_dtype)
    self.refined_tokens = self.param("refined_tokens", _lp(nn.initializers.normal(0.02),
                                                           ("length", "embed")),
                                     (N, self.enc_width), self.param_dtype)
    self.latent_pos_embed = self.param("latent_pos_embed",
                                       _lp(nn.initializers.truncated_normal(0.02),
                                           ("length", "embed")), (N, self.enc_width),
                                       self.param_dtype)
    gelu = self.gelu_approximate
    self.encoder = TransformerStack(
        self.enc_depth, vit_block_kwargs(self.enc_heads, self.enc_mlp, gelu,
                                         attention_impl=self.attention_impl), scan=self.scan,
        remat=self.remat, name="encoder", **kw)
    self.enc_norm = LayerNorm(1e-6, name="enc_norm", **kw)
    if self.is_vq:
      self.quantizer = VectorQuantizer(self.codebook_size, self.code_dim, True,
                                       self.codebook_weight, self.commitment, self.usage_decay,
                                       name="quantizer")
      in_dim = self.code_dim
    else:
      self.quantizer = ContinuousBottleneck(self.code_dim, self.kl_weight, self.latent_noise,
                                            name="quantizer")
      in_dim = 2 * self.code_dim if self.kl_weight > 0 else self.code_dim
    self.quant_proj = dense(in_dim, ("embed", "code_dim"), "quant_proj")
    self.refine_proj = dense(self.enc_width, ("code_dim", "embed"), "refine_proj")
    # decoder
    self.post_quant = dense(self.dec_width, ("code_dim", "embed"), "post_quant")
    self.mask_token = self.param("mask_token", _lp(nn.initializers.normal(0.02), ("embed",)),
                                 (self.dec_width,), self.param_dtype)
    self.dec_pos = PosEmbed2D((grid, grid), self.dec_width, param_dtype=self.param_dtype,
                              name="dec_pos")
    self.dec_latent_pos = self.param("dec_latent_pos",
                                     _lp(nn.initializers.truncated_normal(0.02),
                                         ("length", "embed")), (N, self.dec_width),
                                     self.param_dtype)
    self.decoder = TransformerStack(
        self.dec_depth, vit_block_kwargs(self.dec_heads, self.dec_mlp, gelu,
                                         attention_impl=self.attention_impl), scan=self.scan,
        remat=self.remat, name="decoder", **kw)
    self.dec_norm = LayerNorm(1e-6, name="dec_norm", **kw)
    self.to_pixel = dense(P * P * C, ("embed", "channels"), "to_pixel")
    if self.align_dim:
      from tdjax.losses.alignment import AlignmentProjector
      self.align_proj = AlignmentProjector(self.align_dim, self.align_hidden, name="align_proj")

  # -------------------------------------------------------------------------------------------
  # encoder / bottleneck / decoder
  # -------------------------------------------------------------------------------------------
  def encode(self, x, queries=None, *, keep_patch_kv: bool = False, patch_kv=None):
    """x [B, H, W, C] in [-1, 1] -> pre-bottleneck latents [B, N, in_dim] (fp32).

    queries [B or 1, N, enc_width] replaces the learned query table (second pass).
    keep_patch_kv=True also returns every encoder block's self-attention keys and values on the
    patches, (k, v) each [depth, B, P, heads, head_dim]; passing them back as patch_kv runs a
    later pass on the queries only.  That is exact because the encoder mask lets patches attend
    to patches only, so their states do not depend on the queries (the reference recomputes
    them in its second pass)."""
    b, h, w, _ = x.shape
    gh, gw = h // self.patch, w // self.patch
    P = gh * gw
    q = self.latent_tokens[None] if queries is None else queries
    q = (q + self.latent_pos_embed[None]).astype(self.dtype)
    q = jnp.broadcast_to(q, (b,) + q.shape[1:])
    mask = jnp.asarray(encoder_mask(P, self.num_tokens, self.group, self.c, self.causal_encoder))
    kv = None   # this pass's patch keys/values, returned with keep_patch_kv
    if patch_kv is not None:
      seq = self.encoder(q, mask[P:], kv_prefix=patch_kv)
    else:
      p = self.patch_embed(patchify(x.astype(self.dtype), self.patch))
      p = p + self.enc_pos(gh, gw)[None].astype(self.dtype)
      seq = self.encoder(jnp.concatenate([p, q], axis=1), mask,
                         keep_prefix=P if keep_patch_kv else 0)
      if keep_patch_kv:
        seq, kv = seq
      seq = seq[:, P:]
    z = self.quant_proj(self.enc_norm(seq)).astype(jnp.float32)
    return (z, kv) if keep_patch_kv else z

  def quantize(self, z, *, top_k: int = 0, rng=None, loss_mask=None, train: bool = False,
               noise_window=None):
    if self.is_vq:
      return self.quantizer(z, top_k=top_k, rng=rng, loss_mask=loss_mask,
                            noise_window=noise_window)
    return self.quantizer(z, train=train, rng=rng, loss_mask=loss_mask)

  def lookup(self, indices):
    """Codes [.., d] of VQ indices."""
    return self.quantizer.lookup(indices)

  def decode(self, z_q, res: int | tuple[int, int] | None = None, t=None):
    """z_q [B, T, d] (T <= N) -> image [B, res, res, C] in [-1, 1] (no clamp).

    res: output size, multiple of the patch (default image_size).  t: optional prefix length
    (python int, traced scalar or [B]); tokens at positions >= t are ignored."""
    res = self.image_size if res is None else res
    rh, rw = (res, res) if isinstance(res, int) else res
    if rh % self.patch or rw % self.patch:
      raise ValueError(f"decode: resolution {(rh, rw)} is not a multiple of patch {self.patch}")
    b, T, _ = z_q.shape
    gh, gw = rh // self.patch, rw // self.patch
    lat = self.post_quant(z_q.astype(self.dtype)) + self.dec_latent_pos[:T][None].astype(self.dtype)
    img = (self.mask_token[None, :] + self.dec_pos(gh, gw)).astype(self.dtype)
    img = jnp.broadcast_to(img[None], (b, gh * gw, self.dec_width))
    seq = jnp.concatenate([img, lat], axis=1)
    mask = None
    if t is not None:
      valid = jnp.concatenate([jnp.ones((1, gh * gw), bool), _before(t, T)], axis=1)
      mask = jnp.broadcast_to(valid, (b, gh * gw + T))[:, None, None, :]
    seq = self.decoder(seq, mask)
    out = self.to_pixel(self.dec_norm(seq[:, :gh * gw]))
    return unpatchify(out.astype(jnp.float32), self.patch, gh, gw, self.channels)

  def align(self, z0):
    return self.align_proj(z0)

  def __call__(self, x, *, res=None, t=None):
    """Plain reconstruction (no self-correction): returns (image, bottleneck outputs)."""
    q = self.quantize(self.encode(x))
    if self.align_dim:
      self.align(q["z_q"][:, 0])
    if self.is_initializing():
      self.refine_proj(jnp.zeros((1, 1, self.code_dim), jnp.float32))
    return self.decode(q["z_q"], res, t), q

  # -------------------------------------------------------------------------------------------
  # self-correction (reference 1.6)
  # -------------------------------------------------------------------------------------------
  def correct(self, x, clean_idx, noisy_idx, noise_idx, noise_end, *, train: bool = False,
              patch_kv=None):
    """Second encoder pass conditioned on the detached perturbed prefix.

    Returns (corrected z_q [B, N, d], corrected indices [B, N], bottleneck outputs of the new
    part, prefix indices).  noise_idx / noise_end: scalars or [B].  patch_kv: the first pass's
    patch keys/values (`encode(keep_patch_kv=True)`), to skip recomputing the patches."""
    N = self.num_tokens
    before_idx = _before(noise_idx, N)
    prefix_mask = _before(noise_end, N)
    prefix_idx = jnp.where(before_idx, clean_idx, noisy_idx)
    prefix = jax.lax.stop_gradient(self.lookup(prefix_idx))
    queries = jnp.where(prefix_mask[..., None], self.refine_proj(prefix.astype(self.dtype)),
                        self.refined_tokens[None].astype(self.dtype))
    z2 = self.encode(x, queries=queries, patch_kv=patch_kv)
    new_mask = jnp.broadcast_to(~prefix_mask, clean_idx.shape)
    q2 = self.quantize(z2, loss_mask=new_mask, train=train)
    zq = jnp.where(prefix_mask[..., None], prefix, q2["z_q"])
    idx = jnp.where(prefix_mask, prefix_idx, q2["indices"])
    return zq, idx, q2, prefix_idx

  def tokenize_train(self, x, t, rng, *, self_correction: bool = True):
    """Training-time tokenisation.  t: prefix length (scalar, may be traced).

    Returns a dict: z_q [B, N, d] clean codes (STE), z_q_sc [B, N, d] self-correction codes or
    None, sc_on (scalar bool, False when t == 1 or no correction), bottleneck_loss (mixed with the
    reference weights N/(2N - e) and (N - e)/(2N - e)), indices, noise_idx, noise_end, metrics."""
    k_top, k_noise = jax.random.split(rng)
    N = self.num_tokens
    do_sc = self_correction and self.is_vq
    if do_sc:   # one perturbed span (<= g tokens) per batch: top-k search on those tokens only
      z, patch_kv = self.encode(x, keep_patch_kv=True)
      noise_idx, noise_end = sample_noise_index(k_noise, t, self.group, self.c)
      window = (noise_idx, self.group)
    else:
      z, window = self.encode(x), None
    q = self.quantize(z, top_k=self.top_k if do_sc else 0, rng=k_top, train=True,
                      noise_window=window)
    out = dict(z_q=q["z_q"], z_q_sc=None, sc_on=jnp.asarray(False),
               bottleneck_loss=q["loss"], metrics={})
    if self.is_vq:
      out["indices"] = q["indices"]
      out["metrics"] = dict(vq_loss=q["vq_loss"], commit_loss=q["commit_loss"])
    if not do_sc:
      return out
    zq2, idx2, q2, _ = self.correct(x, q["indices"], q["noisy_indices"], noise_idx, noise_end,
                                    train=True, patch_kv=patch_kv)
    sc_on = jnp.asarray(t) > 1
    e = noise_end.astype(jnp.float32)
    w_clean = jnp.where(sc_on, N / (2 * N - e), 1.0)
    w_noisy = jnp.where(sc_on, (N - e) / (2 * N - e), 0.0)
    out.update(z_q_sc=zq2, indices_sc=idx2, sc_on=sc_on, noise_idx=noise_idx, noise_end=noise_end,
               bottleneck_loss=w_clean * q["loss"] + w_noisy * q2["loss"])
    out["metrics"].update(sc_vq_loss=q2["vq_loss"], noise_end=e)
    return out

  def encode_for_ar(self, x, rng, t=None, with_positions: bool = False):
    """Eval-mode index triplets for AR training data (reference 1.6 step 7).

    One noise position per image (drawn for prefix t, default N).  Returns (clean, ar_input,
    ar_label), each [B, N] int32:
      ar_input = [clean[:i], noisy[i:e], new[e:]],   ar_label = [clean[:e], new[e:]].
    with_positions=True also returns noise_idx and noise_end ([B] each)."""
    k_top, k_noise = jax.random.split(rng)
    b = x.shape[0]
    N = self.num_tokens
    keys = jax.random.split(k_noise, b)
    tt = N if t is None else t
    noise_idx, noise_end = jax.vmap(lambda k: sample_noise_index(k, tt, self.group, self.c))(keys)
    z, patch_kv = self.encode(x, keep_patch_kv=True)
    q = self.quantize(z, top_k=self.top_k, rng=k_top, noise_window=(noise_idx, self.group))
    _, idx2, _, prefix_idx = self.correct(x, q["indices"], q["noisy_indices"], noise_idx,
                                          noise_end, patch_kv=patch_kv)
    clean = q["indices"]
    ar_input = idx2
    ar_label = jnp.where(_before(noise_end, N), clean, idx2)
    if with_positions:
      return clean, ar_input, ar_label, noise_idx, noise_end
    return clean, ar_input, ar_label


def build_tokenizer(m, image_size: int, channels: int, dtype=jnp.float32) -> DetailFlowTokenizer:
  """From a config.model node (configs/detailflow_tokenizer.py): the module's fields taken by name
  (a field the node lacks keeps its default), the size table's dims unless given (0 = the size's),
  0 for pos_grid / causal_num meaning their defaults, first_group_causal=False meaning c = 0."""
  if m.get("size") and m.size not in SIZES:
    raise ValueError(f"config.model.size={m.size!r}: expected one of {sorted(SIZES)}")
  fixed = dict(dataclasses.asdict(SIZES[m.size])) if m.get("size") else {}
  fixed.update({k: m[k] for k in fixed if m.get(k)})
  # configs saved before first_group_causal existed lack it: True, their meaning then
  causal_num = (m.get("causal_num") or None) if m.get("first_group_causal", True) else 0
  fixed.update(image_size=image_size, channels=channels, dtype=dtype, causal_num=causal_num,
               pos_grid=m.get("pos_grid") or None)
  model = configlib.from_config(DetailFlowTokenizer, m, "config.model", **fixed)
  model.validate()
  return model

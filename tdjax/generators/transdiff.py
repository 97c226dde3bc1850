"""TransDiff (arXiv 2506.09482): an AR transformer that predicts condition tokens, and an
attention-based diffusion decoder that denoises the whole latent image
(docs/reference/transdiff.md 1-2).

1-step AR (reference 1.2).  Sequence = [B buffer slots = class embedding | L mask tokens], learned
position table, LayerNorm, 2 x depth bidirectional pre-norm ViT blocks (exact GELU), final
LayerNorm; the buffer is dropped and a second position table added:

    z = Stack(concat[c x B, m x L] + P_enc)[:, B:] + P_diff                      [batch, L, D]

The decoder (`tdjax.generators.heads`, reference 1.3) then models p(x0 | z) by rectified flow:
x_t = (1 - t) x0 + t eps, v = eps - x0 (`tdjax.diffusion.flow`).

MRAR (reference 2.2-2.4).  K same-class images, the first K - 1 fed back as references (latents
patchified with p = 2: L / p^2 tokens of C p^2 features, `z_proj`), M = L / p^2 learned mask tokens:

    [B buffer | M mask | ref_0 | ... | ref_{K-2}]      block-causal, block = B = M tokens

and the condition of image k is the first M (k + 1) outputs after the buffer (+ P_diff).  One
forward pass gives all K conditions (teacher forcing with real references); sampling runs K rounds,
each feeding the generated latent back, from the same initial noise.

`mrar_from_one_step` is the weight surgery of reference 2.3: the single mask token is tiled to the M
MRAR mask tokens and `z_proj` (dead in 1-step models) is re-initialised.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from tdjax.nn.attention import block_causal_mask
from tdjax.nn.layers import LayerNorm, TransformerStack, vit_block_kwargs

_lp = nn.with_logical_partitioning


@dataclasses.dataclass(frozen=True)
class TransDiffSize:
  width: int
  num_heads: int
  ar_depth: int          # = 2 x the reference's encoder_depth
  head_depth: int


SIZES = {
    # reference 1.4: B/L/H (AR blocks = 2 x depth, decoder blocks = depth)
    "B": TransDiffSize(768, 12, 24, 12),
    "L": TransDiffSize(1024, 16, 32, 16),
    "H": TransDiffSize(1280, 16, 40, 20),
    "demo": TransDiffSize(128, 4, 4, 4),
    "tiny": TransDiffSize(32, 2, 2, 2),
}


# docs/reference/transdiff.md 1.6: the published sampling settings (cfg, scale_0, scale_1 of
# Euler-Maruyama) per
# model: (size, 'one_step' | 'mrar' | '512')
PAPER_SAMPLING = {
    ("B", "one_step"): (1.30, 0.87, 0.91), ("L", "one_step"): (1.30, 0.89, 0.95),
    ("H", "one_step"): (1.23, 0.87, 0.93), ("B", "mrar"): (1.30, 0.87, 0.91),
    ("L", "mrar"): (1.30, 0.925, 0.95), ("H", "mrar"): (1.28, 0.87, 0.91),
    ("L", "512"): (1.30, 0.87, 0.87),
}


def mrar_mask(length: int, block: int):
  """[length, length] bool: query i sees key j iff j // block <= i // block (reference 2.2)."""
  if length % block:
    raise ValueError(f"MRAR sequence length {length} is not a multiple of the block {block}")
  return block_causal_mask(length, block)


def patchify_latent(z, p: int):
  """Latent [B, h, w, C] -> tokens [B, (h/p)(w/p), C p p], feature index c*p*p + pi*p + qi and raster
  order over (h/p, w/p): the reference's `nchpwq->nhwcpq` (docs/reference/transdiff.md 1.1)."""
  _, h, w, _ = z.shape
  if h % p or w % p:
    raise ValueError(f"latent {h}x{w} is not divisible by the patch size {p}")
  return rearrange(z, "b (h p) (w r) c -> b (h w) (c p r)", p=p, r=p)


def unpatchify_latent(x, p: int, h: int, w: int):
  """Inverse of `patchify_latent`: [B, (h/p)(w/p), C p p] -> [B, h, w, C]."""
  return rearrange(x, "b (h w) (c p r) -> b (h p) (w r) c", h=h // p, p=p, r=p)


class TransDiffAR(nn.Module):
  """The AR transformer ("encoder" in the reference code): labels (+ references) -> conditions.

  `num_refs` = 0 is the 1-step model (L mask slots all equal to one learned token); > 0 is MRAR with
  that many reference images (the reference code: 3, i.e. K = 4 images)."""
  num_classes: int
  latent_len: int = 256            # L: tokens of one latent image (p = 1); 1-step: condition
                                   # slots (256 for the 1024 latent tokens of TransDiff-L 512)
  latent_dim: int = 16             # C
  width: int = 1024
  depth: int = 32                  # AR blocks (reference: 2 x encoder_depth)
  num_heads: int = 16
  mlp_ratio: float = 4.0
  buffer_size: int = 64
  num_refs: int = 0
  ref_patch: int = 2
  dropout: float = 0.0             # reference: 0.1 (attention and projections)
  label_drop: float = 0.1
  scan: bool = False
  remat: str = "none"
  attention_impl: str = "auto"
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def validate(self) -> None:
    """One-line errors naming config.model.X (the task builds the AR from config.model)."""
    for key, low in (("width", 1), ("depth", 1), ("num_heads", 1), ("num_classes", 1),
                     ("buffer_size", 0), ("num_refs", 0), ("ref_patch", 1)):
      name = {"depth": "ar_depth"}.get(key, key)
      if getattr(self, key) < low:
        raise ValueError(f"config.model.{name}={getattr(self, key)}: expected >= {low}")
    if self.width % self.num_heads:
      raise ValueError(f"config.model.num_heads={self.num_heads} does not divide "
                       f"config.model.width={self.width}")
    if not 0 <= self.dropout < 1 or not 0 <= self.label_drop < 1:
      raise ValueError(f"config.model.dropout={self.dropout}, label_drop={self.label_drop}: "
                       f"expected probabilities in [0, 1)")

  @property
  def mask_len(self) -> int:
    return self.latent_len // self.ref_patch ** 2 if self.num_refs else self.latent_len

  @property
  def seq_len(self) -> int:
    return self.buffer_size + self.mask_len * (1 + self.num_refs)

  def setup(self):
    D, kw = self.width, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.num_refs and self.buffer_size != self.mask_len:
      raise ValueError(f"MRAR needs buffer_size == block == L / p^2: buffer_size={self.buffer_size}"
                       f", L={self.latent_len}, p={self.ref_patch} -> {self.mask_len}")
    emb = nn.initializers.normal(0.02)
    self.class_emb = self.param("class_emb", _lp(emb, ("vocab", "embed")), (self.num_classes, D),
                                self.param_dtype)
    self.fake_latent = self.param("fake_latent", _lp(emb, ("embed",)), (D,), self.param_dtype)
    self.mask_token = self.param("mask_token", _lp(emb, ("length", "embed")),
                                 (self.mask_len if self.num_refs else 1, D), self.param_dtype)
    self.enc_pos = self.param("enc_pos", _lp(emb, ("length", "embed")), (self.seq_len, D),
                              self.param_dtype)
    self.diff_pos = self.param("diff_pos", _lp(emb, ("length", "embed")),
                               (self.seq_len - self.buffer_size, D), self.param_dtype)
    self.z_proj = nn.Dense(D, kernel_init=_lp(nn.initializers.xavier_uniform(), ("channels", "embed")),
                           bias_init=_lp(nn.initializers.zeros, ("embed",)), name="z_proj", **kw)
    self.z_proj_ln = LayerNorm(1e-6, name="z_proj_ln", **kw)
    block = vit_block_kwargs(self.num_heads, int(self.mlp_ratio * D), gelu_approximate=False,
                             dropout_rate=self.dropout, attention_impl=self.attention_impl)
    self.blocks = TransformerStack(self.depth, block, scan=self.scan, remat=self.remat,
                                   name="blocks", **kw)
    self.norm = LayerNorm(1e-6, name="norm", **kw)

  def class_embedding(self, labels, drop=None):
    """labels [B] int; drop [B] bool (label dropout / CFG null) -> [B, D].  label -1 = null too."""
    e = jnp.take(self.class_emb, jnp.clip(labels, 0, self.num_classes - 1), axis=0)
    null = labels < 0 if drop is None else (drop | (labels < 0))
    return jnp.where(null[:, None], self.fake_latent[None], e)

  def __call__(self, labels, refs=None, *, drop=None, deterministic: bool = True,
               num_blocks: int | None = None):
    """labels [B]; refs [B, num_refs, L/p^2, C p^2] patchified reference latents (MRAR) or None.

    Returns the condition tokens [B, T, D]: T = L (1-step) or M (1 + num_refs) (MRAR; image k
    uses the first M (k + 1)).  num_blocks (MRAR sampling) keeps only the first blocks of the
    sequence: 1 + num_blocks blocks of M tokens, i.e. the mask block and num_blocks - 1 refs."""
    b = labels.shape[0]
    D = self.width
    c = self.class_embedding(labels, drop).astype(self.dtype)
    buf = jnp.broadcast_to(c[:, None], (b, self.buffer_size, D))
    mask = jnp.broadcast_to(self.mask_token[None], (b, self.mask_len, D)).astype(self.dtype)
    parts = [buf, mask]
    if self.num_refs:
      if refs is None:
        refs = jnp.zeros((b, 0, self.mask_len, self.latent_dim * self.ref_patch ** 2), self.dtype)
      if refs.shape[1] > self.num_refs or refs.shape[2:] != (self.mask_len,
                                                             self.latent_dim * self.ref_patch ** 2):
        raise ValueError(f"MRAR refs have shape {refs.shape[1:]}, expected up to "
                         f"({self.num_refs}, {self.mask_len}, {self.latent_dim * self.ref_patch ** 2})")
      parts.append(self.z_proj(refs.reshape(b, -1, refs.shape[-1]).astype(self.dtype)))
    elif refs is not None:
      raise ValueError("a 1-step TransDiff model takes no reference images (num_refs=0)")
    # the dead z_proj of 1-step models still gets its parameters (reference keys, weight surgery)
    if not self.num_refs and self.is_initializing():
      self.z_proj(jnp.zeros((1, 1, self.latent_dim), self.dtype))  # reference: Linear(C, D)
    x = jnp.concatenate(parts, axis=1)
    n = x.shape[1]
    x = self.z_proj_ln(x + self.enc_pos[None, :n].astype(self.dtype))
    attn_mask = None
    if self.num_refs:
      attn_mask = mrar_mask(n, self.mask_len)
    x = self.blocks(x, attn_mask, deterministic=deterministic)
    x = self.norm(x)[:, self.buffer_size:]
    return (x + self.diff_pos[None, :n - self.buffer_size].astype(self.dtype)).astype(jnp.float32)


def head_for_resolution(src_head: dict, head: dict, src_grid: int, grid: int) -> dict:
  """Resolution transfer of the diffusion decoder (reference stage 2b: 256 -> 512 px, 16 x 16 ->
  32 x 32 latent tokens): every parameter is copied except the learned position table
  `pos_embed`, resized from src_grid^2 to grid^2 rows (bilinear on the grid, `resize_pos_grid`).
  The reference has no such step: its strict=False load fails on the 256 vs 1,024 rows of
  `diffusion_pos_embed_learned` (docs/reference/transdiff.md 4.4, 5 pitfall 4), so the table
  needs a conversion;
  interpolating it is the usual ViT resolution transfer.  Other shapes must match exactly."""
  from tdjax.nn import resize_pos_grid
  src_pos = np.asarray(src_head["pos_embed"])
  if src_pos.shape != (src_grid * src_grid, np.shape(head["pos_embed"])[1]):
    raise ValueError(f"resolution transfer: the source head's pos_embed is {src_pos.shape}, "
                     f"expected ({src_grid * src_grid}, {np.shape(head['pos_embed'])[1]})")
  rest = lambda h: {k: v for k, v in h.items() if k != "pos_embed"}
  out = dict(copy_checked(rest(src_head), rest(head), "head"))
  out["pos_embed"] = np.asarray(resize_pos_grid(src_pos, (src_grid, src_grid), (grid, grid)))
  return out


def copy_checked(src, dst, what: str):
  """`src`, after checking that its tree and every leaf's shape are `dst`'s (named errors)."""
  a_leaves = dict(jax.tree_util.tree_leaves_with_path(src))
  for path, b in jax.tree_util.tree_leaves_with_path(dst):
    name = f"{what}{jax.tree_util.keystr(path)}"
    if path not in a_leaves:
      raise ValueError(f"parameter {name} is missing from the source checkpoint")
    if np.shape(a_leaves[path]) != np.shape(b):
      raise ValueError(f"parameter {name} has shape {np.shape(a_leaves[path])} in the source "
                       f"checkpoint, {np.shape(b)} here")
  if len(a_leaves) != len(jax.tree.leaves(dst)):
    raise ValueError(f"the source checkpoint's {what} has parameters this model lacks")
  return src


def mrar_from_one_step(one_step_params: dict, mrar_params: dict) -> dict:
  """Weight surgery (reference 2.3): a 1-step AR checkpoint -> MRAR AR params.

  Every parameter is copied except `mask_token` (the single learned token tiled to the M MRAR mask
  positions) and `z_proj` (re-initialised: it never received gradients in the 1-step model, and its
  input width changes from C to C p^2); `enc_pos`/`diff_pos` keep their leading rows.  With the
  reference's 3 references the lengths are equal (64 + 4 x 64 = 64 + 256 = 320); with fewer, the
  MRAR tables are shorter and take the first rows, the prefix the reference itself slices for a
  shorter sequence (`diffusion_pos_embed[:, :64(k+1)]`); with more, rows past the 1-step length
  keep their fresh initialisation.  Shapes must otherwise match exactly."""
  out = {}
  for k, v in mrar_params.items():
    if k == "z_proj":
      out[k] = v
    elif k == "mask_token":
      src = np.asarray(one_step_params[k])
      out[k] = np.broadcast_to(src[:1], np.shape(v)).copy()
    elif k in ("enc_pos", "diff_pos"):
      src, n = np.asarray(one_step_params[k]), np.shape(v)[0]
      if src.shape[1:] != np.shape(v)[1:]:
        raise ValueError(f"weight surgery: parameter {k!r} has width {src.shape[1:]} in the 1-step "
                         f"checkpoint, {np.shape(v)[1:]} in the MRAR model")
      # the fresh rows are read only when there are more (v may be sharded over hosts)
      out[k] = src[:n] if n <= len(src) else np.concatenate([src, np.asarray(v[len(src):])])
    else:
      src = one_step_params[k]
      if jax.tree.structure(src) != jax.tree.structure(v):
        raise ValueError(f"weight surgery: parameter {k!r} has a different structure in the "
                         f"1-step checkpoint")
      for a, bb in zip(jax.tree.leaves(src), jax.tree.leaves(v)):
        if np.shape(a) != np.shape(bb):
          raise ValueError(f"weight surgery: parameter {k!r} has shape {np.shape(a)} in the 1-step "
                           f"checkpoint, {np.shape(bb)} in the MRAR model")
      out[k] = src
  return out

"""First-token ("global token") alignment, DetailFlow Eq. 4.

    L_align = -mean_b cos( MLP(z_q[b, 0]),  mean_over_patches( Teacher(x[b]) ) )

`AlignmentProjector` is the trainable MLP Linear(d, 1024) - SiLU - Linear(1024, 1024) - SiLU -
Linear(1024, teacher_dim).  The frozen teacher is `ViTTeacher`, a generic SigLIP2-style vision tower
of configurable size (DetailFlow: so400m, width 1152, 27 blocks, 16 heads, MLP 4304, patch 16):

    x in [-1, 1] NHWC (SigLIP's own normalisation maps [0,1] to [-1,1], so no further scaling)
    -> (py, px, c)-flattened 16x16 patches -> Linear -> + learned pos table [G*G, W], resized
       (bilinear, antialiased, as HF naflex does) to the image's patch grid
    -> pre-LN blocks (`tdjax.nn.layers.TransformerBlock`, ViT flavour): x + out(attn(LN1 x)) with
       biased query/key/value/out;  x + fc2(gelu_tanh(fc1(LN2 x)))
    -> post LayerNorm                                                     -> [B, N, W]

Reference quirk: DetailFlow's `forward_features` applies `post_layernorm` again on top of the HF
output, which already ends with it, so its targets are LayerNorm applied twice (with the same
params).  `ViTTeacher(double_post_ln=True)` replicates that; default False (a single post-LN).

Teacher weights file (`load_teacher_params(path, teacher)`): an `.npz` with flat keys, float32,
Flax layout (W width, H heads, D = W / H, F MLP width, P patch, G pos grid):

  patch_embed/kernel [P*P*3, W]   patch_embed/bias [W]   pos_embed [G*G, W]
  blocks_{i}/norm1/ln/{scale,bias} [W]   blocks_{i}/norm2/ln/{scale,bias} [W]
  blocks_{i}/attn/{query,key,value}/kernel [W,H,D]   blocks_{i}/attn/{query,key,value}/bias [H,D]
  blocks_{i}/attn/out/kernel [H,D,W]                 blocks_{i}/attn/out/bias [W]
  blocks_{i}/mlp/fc1/kernel [W,F]  blocks_{i}/mlp/fc1/bias [F]  blocks_{i}/mlp/fc2/kernel [F,W]  ../bias [W]
  post_ln/{scale,bias} [W]

for i in 0 .. depth-1 (the keys of TransformerBlock).  From HF Siglip2VisionModel:
embeddings.patch_embedding.weight [W, P*P*3] -> .T; embeddings.position_embedding.weight [G*G, W]
as is; encoder.layers.i.self_attn.{q,k,v}_proj.weight [W,W] -> .T.reshape(W,H,D) (attn/query, key,
value), bias -> reshape(H,D); out_proj.weight -> .T.reshape(H,D,W) (attn/out); layer_norm1/2 ->
norm1/ln, norm2/ln; mlp.fc1/fc2 -> .T; post_layernorm -> post_ln.  The attention-pooling head
is not used.  Files in the older layout (blocks_{i}/ln1, ln2, attn/q, k, v, o) still load: see
`upgrade_teacher_keys`.  `python -m tdjax.convert --kind siglip2` writes this file from the HF
checkpoint; `--kind teacher` writes one from a `configs/classifier.py:arch=vit` run (a small
stand-in teacher).
`teacher_shape(path)` reads the tower's dimensions back from such a file.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdjax.losses.weights import expected_params, load_npz_params, npz_shapes
from tdjax.nn.layers import TransformerBlock, vit_block_kwargs

_lp = nn.with_logical_partitioning


class AlignmentProjector(nn.Module):
  """[..., d] -> [..., teacher_dim]: Linear-SiLU-Linear-SiLU-Linear (trainable, fp32)."""
  teacher_dim: int = 1152
  hidden: int = 1024

  @nn.compact
  def __call__(self, z):
    z = z.astype(jnp.float32)
    init = nn.initializers.lecun_normal()
    z = nn.Dense(self.hidden, name="fc1", kernel_init=_lp(init, ("code_dim", "mlp")),
                 bias_init=_lp(nn.initializers.zeros, ("mlp",)))(z)
    z = nn.silu(z)
    z = nn.Dense(self.hidden, name="fc2", kernel_init=_lp(init, ("embed", "mlp")),
                 bias_init=_lp(nn.initializers.zeros, ("mlp",)))(z)
    z = nn.silu(z)
    return nn.Dense(self.teacher_dim, name="fc3", kernel_init=_lp(init, ("mlp", "embed")),
                    bias_init=_lp(nn.initializers.zeros, ("embed",)))(z)


def cosine_similarity(a, b, eps: float = 1e-8):
  """torch.nn.functional.cosine_similarity over the last axis."""
  num = jnp.sum(a * b, axis=-1)
  den = jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)
  return num / den


def alignment_loss(pred, teacher_feats) -> jax.Array:
  """-mean cos(pred, mean-pooled teacher features).  pred [B, D]; teacher_feats [B, N, D] (pooled
  over N here) or [B, D] (already pooled).  The teacher side is treated as a constant."""
  t = jax.lax.stop_gradient(teacher_feats).astype(jnp.float32)
  if t.ndim == pred.ndim + 1:
    t = jnp.mean(t, axis=-2)
  if t.shape != pred.shape:
    raise ValueError(f"alignment_loss: pred {pred.shape} vs pooled teacher {t.shape}")
  return -jnp.mean(cosine_similarity(pred.astype(jnp.float32), t))


class ViTTeacher(nn.Module):
  """SigLIP2-style vision tower: NHWC [-1, 1] (H, W multiples of patch_size) -> [B, N, width].

  Defaults are so400m-patch16 (27 x 1152, 16 heads, MLP 4304, 16x16 pos grid).
  """
  width: int = 1152
  depth: int = 27
  num_heads: int = 16
  mlp_dim: int = 4304
  patch_size: int = 16
  pos_grid: int = 16
  ln_eps: float = 1e-6
  double_post_ln: bool = False
  attention_impl: str = "auto"   # tdjax.nn.attention.IMPLS ('einsum': the accelerators' program)

  def flops(self, h: int, w: int) -> float:
    """Forward FLOPs on one h x w image, N = (h / P)(w / P) tokens: patch embed 2 N P^2 3 W, then
    per block 2 N (4 W^2 + 2 W F) + 4 N^2 W (projections, MLP, attention products)."""
    n = (h // self.patch_size) * (w // self.patch_size)
    wd, f = self.width, self.mlp_dim
    return float(2 * n * self.patch_size ** 2 * 3 * wd
                 + self.depth * (2 * n * (4 * wd * wd + 2 * wd * f) + 4 * n * n * wd))

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"ViTTeacher: expected NHWC RGB images, got shape {x.shape}")
    b, h, w, c = x.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(f"ViTTeacher: image size {(h, w)} is not a multiple of patch {p}")
    gh, gw = h // p, w // p
    x = x.astype(jnp.float32).reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, gh * gw, p * p * c)
    x = nn.Dense(self.width, name="patch_embed",
                 kernel_init=_lp(nn.initializers.lecun_normal(), ("conv_in", "embed")),
                 bias_init=_lp(nn.initializers.zeros, ("embed",)))(x)
    g = self.pos_grid
    pos = self.param("pos_embed", _lp(nn.initializers.normal(0.02), (None, "embed")),
                     (g * g, self.width))
    if (gh, gw) != (g, g):
      pos = jax.image.resize(pos.reshape(g, g, self.width), (gh, gw, self.width), "bilinear",
                             antialias=True).reshape(gh * gw, self.width)
    x = x + pos[None]
    block = dict(vit_block_kwargs(self.num_heads, self.mlp_dim), norm_eps=self.ln_eps,
                 kernel_init=nn.initializers.lecun_normal(),
                 attention_impl=self.attention_impl)
    for i in range(self.depth):
      x = TransformerBlock(**block, name=f"blocks_{i}")(x)
    post = nn.LayerNorm(epsilon=self.ln_eps, name="post_ln",
                        scale_init=_lp(nn.initializers.ones, ("embed",)),
                        bias_init=_lp(nn.initializers.zeros, ("embed",)))
    x = post(x)
    if self.double_post_ln:  # DetailFlow quirk: the same post-LN applied a second time
      x = post(x)
    return x


# Keys of the teacher files written before ViTTeacher's blocks were tdjax.nn's TransformerBlock
_OLD_TEACHER_KEY = re.compile(r"^(blocks_\d+)/(ln1|ln2|attn/q|attn/k|attn/v|attn/o)/(\w+)$")
_OLD_TEACHER_RENAME = {"ln1": "norm1/ln", "ln2": "norm2/ln", "attn/q": "attn/query",
                       "attn/k": "attn/key", "attn/v": "attn/value", "attn/o": "attn/out"}


def upgrade_teacher_keys(flat: Mapping) -> Mapping:
  """{key: value} of a teacher / SigLIP2 file in the older layout (blocks_i/ln1, ln2, attn/q, k,
  v, o) -> the current keys (norm1/ln, norm2/ln, attn/query, key, value, out).  Only keys change,
  so the values may be arrays, shapes or anything else; a mapping already in the current layout
  is returned as it is (an npz stays lazily read)."""
  if not any(_OLD_TEACHER_KEY.match(k) for k in flat):
    return flat
  new = lambda m: f"{m[1]}/{_OLD_TEACHER_RENAME[m[2]]}/{m[3]}"
  return {_OLD_TEACHER_KEY.sub(new, k): flat[k] for k in flat}


def teacher_shape(path: str) -> dict:
  """The `ViTTeacher` fields (width, depth, num_heads, mlp_dim, patch_size, pos_grid) of a teacher
  npz (either layout), read from its array shapes (num_heads from the [W, H, D] query kernel)."""
  shapes = upgrade_teacher_keys(npz_shapes(path, what="alignment teacher"))
  depth = len({k.split("/")[0] for k in shapes if k.startswith("blocks_")})
  need = ("patch_embed/kernel", "pos_embed", "blocks_0/attn/query/kernel", "blocks_0/mlp/fc1/bias")
  missing = [k for k in need if k not in shapes]
  if missing:
    raise ValueError(f"alignment teacher weights file {path!r} is missing key {missing[0]!r} "
                     f"(layout: tdjax.losses.alignment)")
  width, heads, _ = shapes["blocks_0/attn/query/kernel"]
  patch, grid = math.isqrt(shapes["patch_embed/kernel"][0] // 3), math.isqrt(shapes["pos_embed"][0])
  return dict(width=int(width), depth=depth, num_heads=int(heads),
              mlp_dim=int(shapes["blocks_0/mlp/fc1/bias"][0]), patch_size=patch, pos_grid=grid)


def load_teacher_params(path: str, teacher: ViTTeacher | None = None, *, strict: bool = True) -> dict:
  """Reads a teacher npz (layout in the module docstring; older-layout files are upgraded by
  `upgrade_teacher_keys`) -> the teacher's `params` tree."""
  teacher = ViTTeacher() if teacher is None else teacher
  s = teacher.patch_size * teacher.pos_grid
  x = jnp.zeros((1, s, s, 3), jnp.float32)
  return load_npz_params(path, expected_params(teacher, x), what="alignment teacher", strict=strict,
                         rename=upgrade_teacher_keys)


def teacher_features(teacher: ViTTeacher, params, x) -> jax.Array:
  """Frozen teacher forward: [B, N, W] with no gradient to params or input."""
  return jax.lax.stop_gradient(teacher.apply({"params": params}, jax.lax.stop_gradient(x)))

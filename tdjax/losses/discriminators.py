"""GAN discriminators and losses for tokenizer training.

`PatchGAN`: the pix2pix / taming-transformers NLayerDiscriminator, trained from scratch (the
offline default: no weights file needed).

`DinoDiscriminator`: the VAR / Infinity / DetailFlow "DinoDisc": a frozen DINO ViT-S/16 backbone
and five trainable heads on its token features.

    x in [-1, 1] NHWC -> ImageNet normalisation -> resize to img_size (224)
    -> patch embed (16x16) + cls token + learned pos table (bilinearly interpolated when the grid
       differs from the table's)
    readout r = patch tokens + cls token, [B, L, C], taken before block 0 and after each block in
    key_depths = (2, 5, 8, 11)
    head(r) = SNConv1d(k=1) -> norm -> LeakyReLU(0.2)
              -> (block(k=9, circular padding) + identity) / sqrt(2)
              -> SNConv1d(C -> 1, k=1)                                             -> [B, L]
    logits = concat over the 5 heads                                               -> [B, 5 L]

Reference details kept or changed:
  * resize: as the reference, `area` to downscale / `bicubic` (A=-0.75) to upscale, reproduced
    exactly by `resize_torch` (`resize_method='torch'`, default; any `jax.image.resize` method
    name such as 'bilinear' is accepted instead).  For inputs larger than 224 on both sides the
    reference takes, with probability 0.5, a random 224 crop instead (one coin and one window for
    the whole batch); pass `crop_rng` to do the same, omit it for a deterministic resize.
  * the reference zeroes the key bias of every attention layer when loading DINO; a key bias adds
    q.b_k to every logit of a query row, which softmax ignores, so it is a no-op and not replicated.
  * MLP activation: the reference block uses GELU(tanh approximation) although DINO was trained with
    exact GELU; `gelu_approximate=True` (default) follows the reference.
  * norm: the reference uses SyncBatchNorm (eps 1e-6).  Here `norm='batch'` is `nn.BatchNorm`
    computing statistics over the batch it sees.  Under `jax.jit` over a global batch sharded on a
    mesh (how tdjax trains) that batch IS the global batch, so the statistics are global exactly
    like SyncBatchNorm (XLA inserts the cross-device reductions); only under `shard_map`/`pmap`
    would they be per device, and `bn_axis_name` then makes them cross-replica.  'group' and 'none'
    are also offered.
  * spectral norm (torch `spectral_norm`, dim=0, eps 1e-12): the power-iteration vectors u, v live
    in the mutable collection 'spectral'; every call with `train=True` does one iteration and
    writes them back (apply with `mutable=['spectral', 'batch_stats']`); `train=False` uses the
    stored vectors unchanged.  torch updates u in EVERY train-mode forward, the generator step's
    pass through D included; the tokenizer task threads the state through all of them (G step's
    D(fake), then D(real), D(fake) and the two consistency passes, as the reference's VQLoss).

Variables of `DinoDiscriminator`:
  params/backbone/...          frozen DINO ViT (read through stop_gradient; exclude it from the
                               optimiser too, see `frozen_param_labels`, or weight decay moves it)
  params/heads/head_{i}/{conv_in, res_conv, conv_out}/{kernel [k, C_in, C_out], bias}
  params/heads/head_{i}/{norm_in, res_norm}/{scale, bias}          (norm 'batch' or 'group')
  spectral/heads/head_{i}/{conv_in, res_conv, conv_out}/{u [C_out], v [k * C_in]}
  batch_stats/heads/head_{i}/{norm_in, res_norm}/{mean, var}        (norm 'batch')

DINO weights file (`load_dino_backbone(path, disc)`): an `.npz` with these flat keys (ViT-S/16:
C=384, H=6 heads, D=64, F=1536 MLP, G=14 grid), float32, Flax layout; the blocks are
`tdjax.nn.layers.TransformerBlock`s (ViT flavour), so their keys are that block's:

  patch_embed/kernel [16,16,3,C]  patch_embed/bias [C]    cls_token [1,1,C]    pos_embed [1,1+G*G,C]
  blocks_{i}/norm1/ln/{scale,bias} [C]                    blocks_{i}/norm2/ln/{scale,bias} [C]
  blocks_{i}/attn/{query,key,value}/kernel [C,H,D]  blocks_{i}/attn/{query,key,value}/bias [H,D]
  blocks_{i}/attn/out/kernel [H,D,C]                blocks_{i}/attn/out/bias [C]
  blocks_{i}/mlp/fc1/kernel [C,F]  blocks_{i}/mlp/fc1/bias [F]  blocks_{i}/mlp/fc2/kernel [F,C]  ../bias [C]

for i in 0 .. max(key_depths) (the final `norm` of DINO is unused).  From the official
`dino_deitsmall16_pretrain.pth` (`python -m tdjax.convert --kind dino`): patch_embed.proj.weight
[C,3,16,16] -> transpose(2,3,1,0); blocks.i.attn.qkv.weight [3C,C] -> rows [q | k | v], each
.T.reshape(C,H,D); qkv.bias -> [q | k | v], each reshape(H,D); attn.proj.weight [C,C] ->
.T.reshape(H,D,C) (attn/out); Linear weights -> .T; LayerNorm weight -> scale.  Files in the
older layout (norm1/{scale,bias}, fused attn/qkv [C,3,H,D], attn/proj) still load: see
`upgrade_dino_keys`.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdjax.losses.weights import expected_params, frozen, load_npz_params
from tdjax.nn.layers import TransformerBlock, vit_block_kwargs
from tdjax.tokenizers import resolution

_lp = nn.with_logical_partitioning

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------------------------
# Norm helper
# ------------------------------------------------------------------------------------------------

def _norm(kind: str, channels: int, train: bool, eps: float, name: str, axis_name=None,
          scale_init=nn.initializers.ones):
  if kind == "batch":
    # torch BN momentum 0.1 == flax momentum 0.9.
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=eps,
                        axis_name=axis_name, name=name,
                        scale_init=_lp(scale_init, ("conv_out",)),
                        bias_init=_lp(nn.initializers.zeros, ("conv_out",)))
  if kind == "group":
    return nn.GroupNorm(num_groups=math.gcd(32, channels), epsilon=eps, name=name,
                        scale_init=_lp(scale_init, ("conv_out",)),
                        bias_init=_lp(nn.initializers.zeros, ("conv_out",)))
  if kind == "none":
    return lambda x: x
  raise ValueError(f"unknown norm {kind!r}; expected 'none', 'group' or 'batch'")


# ------------------------------------------------------------------------------------------------
# PatchGAN
# ------------------------------------------------------------------------------------------------

class PatchGAN(nn.Module):
  """pix2pix / taming NLayerDiscriminator: [B, H, W, C] in [-1, 1] -> patch logits [B, h, w, 1].

  conv4x4/s2 + LReLU(0.2); (n_layers - 1) x [conv4x4/s2 + norm + LReLU] with channels
  ndf * min(2^n, 8); conv4x4/s1 + norm + LReLU; conv4x4/s1 -> 1.  All convs pad 1.  Init as taming:
  conv kernels N(0, 0.02), norm scales N(1, 0.02).  Convs followed by batch norm have no bias.
  For 256x256 inputs and n_layers=3 the output is 30x30.
  """
  ndf: int = 64
  n_layers: int = 3
  norm: str = "batch"
  norm_eps: float = 1e-5
  bn_axis_name: Any = None

  @nn.compact
  def __call__(self, x, *, train: bool = True):
    if x.ndim != 4:
      raise ValueError(f"PatchGAN: expected NHWC images, got shape {x.shape}")
    x = x.astype(jnp.float32)
    k_init = nn.initializers.normal(0.02)

    def conv(h, ch, stride, bias, name, out_axis="conv_out"):
      return nn.Conv(ch, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                     use_bias=bias, name=name,
                     kernel_init=_lp(k_init, ("kernel_h", "kernel_w", "conv_in", out_axis)),
                     bias_init=_lp(nn.initializers.zeros, (out_axis,)))(h)

    scale_init = lambda key, shape, dtype=jnp.float32: 1.0 + 0.02 * jax.random.normal(key, shape, dtype)
    bias = self.norm != "batch"
    x = nn.leaky_relu(conv(x, self.ndf, 2, True, "conv0"), 0.2)
    for n in range(1, self.n_layers + 1):
      ch = self.ndf * min(2 ** n, 8)
      stride = 2 if n < self.n_layers else 1
      x = conv(x, ch, stride, bias, f"conv{n}")
      x = _norm(self.norm, ch, train, self.norm_eps, f"norm{n}", self.bn_axis_name, scale_init)(x)
      x = nn.leaky_relu(x, 0.2)
    return conv(x, 1, 1, True, "conv_out", out_axis=None)


# ------------------------------------------------------------------------------------------------
# Spectral-normalised Conv1d
# ------------------------------------------------------------------------------------------------

def _l2n(v, eps=1e-12):
  return v / jnp.maximum(jnp.linalg.norm(v), eps)


class SpectralConv1d(nn.Module):
  """Conv1d over [B, L, C] (circular padding k//2), optionally spectral-normalised.

  The kernel [k, C_in, C_out] is viewed as the matrix W [C_out, k*C_in] (torch's weight.view(out,-1)
  up to a column permutation, which leaves the singular values unchanged).  W / sigma(W) is used,
  with sigma = u^T W v from one power iteration per training call (u, v in 'spectral').
  """
  features: int
  kernel_size: int = 1
  spectral_norm: bool = True
  out_axis: Any = "conv_out"
  eps: float = 1e-12

  @nn.compact
  def __call__(self, x, *, update_stats: bool):
    cin = x.shape[-1]
    k = self.kernel_size
    fan_in = cin * k
    kernel = self.param("kernel", _lp(nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"),
                                      ("kernel", "conv_in", self.out_axis)), (k, cin, self.features))
    bias = self.param("bias", _lp(nn.initializers.zeros, (self.out_axis,)), (self.features,))
    if self.spectral_norm:
      u = self.variable("spectral", "u",
                        lambda: _l2n(jax.random.normal(self.make_rng("params"), (self.features,))))
      v = self.variable("spectral", "v",
                        lambda: _l2n(jax.random.normal(self.make_rng("params"), (fan_in,))))
      w = kernel.reshape(fan_in, self.features).T  # [C_out, k*C_in]
      if update_stats and not self.is_initializing():
        wd = jax.lax.stop_gradient(w)
        v_new = _l2n(wd.T @ u.value, self.eps)
        u_new = _l2n(wd @ v_new, self.eps)
        u.value, v.value = u_new, v_new
      uu, vv = jax.lax.stop_gradient(u.value), jax.lax.stop_gradient(v.value)
      sigma = uu @ (w @ vv)
      kernel = kernel / sigma
    if k > 1:
      p = k // 2
      x = jnp.pad(x, ((0, 0), (p, k - 1 - p), (0, 0)), mode="wrap")
    y = jax.lax.conv_general_dilated(x, kernel, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
    return y + bias


def spectral_sigma(kernel) -> jax.Array:
  """Exact largest singular value of a SpectralConv1d kernel (for tests / monitoring)."""
  k, cin, cout = kernel.shape
  return jnp.linalg.svd(jnp.asarray(kernel).reshape(k * cin, cout), compute_uv=False)[0]


# ------------------------------------------------------------------------------------------------
# PyTorch-exact resizing (F.interpolate 'area' and 'bicubic', align_corners=False)
# ------------------------------------------------------------------------------------------------

def resize_torch(x, size: tuple[int, int]):
  """NHWC resize as the reference DINO disc does it: F.interpolate 'area' when downscaling,
  'bicubic' (A = -0.75) otherwise, chosen per axis by comparing the height (as the reference)."""
  h, w = x.shape[1:3]
  oh, ow = size
  if (h, w) == (oh, ow):
    return x
  mk = resolution.area_matrix if h > oh else resolution.bicubic_matrix
  return resolution.apply_separable(x, mk(h, oh), mk(w, ow))


def _resize(x, size, method: str):
  if method == "torch":
    return resize_torch(x, size)
  return jax.image.resize(x, (x.shape[0],) + tuple(size) + (x.shape[-1],), method)


# ------------------------------------------------------------------------------------------------
# DINO ViT backbone
# ------------------------------------------------------------------------------------------------

def interpolate_pos_grid(table, grid_hw: tuple[int, int]):
  """[1 + G*G, C] (cls first) -> [1 + gh*gw, C]; bilinear (half-pixel centres) on the grid part."""
  n, c = table.shape[-2:]
  g = int(round(math.sqrt(n - 1)))
  if g * g != n - 1:
    raise ValueError(f"pos table has {n - 1} grid entries, not a square")
  cls, grid = table[..., :1, :], table[..., 1:, :]
  if (g, g) == tuple(grid_hw):
    return table
  grid = grid.reshape(table.shape[:-2] + (g, g, c))
  grid = jax.image.resize(grid, table.shape[:-2] + tuple(grid_hw) + (c,), "bilinear", antialias=False)
  return jnp.concatenate([cls, grid.reshape(table.shape[:-2] + (-1, c))], axis=-2)


class DinoViT(nn.Module):
  """DINO ViT (pre-LN, cls token, learned pos table); returns the readouts r = patch + cls tokens.

  Input: NHWC in [-1, 1], any size (resized to img_size).  Output: list of [B, L, C], the first
  taken after the embedding, then one after each block in key_depths.  Only blocks
  0 .. max(key_depths) are built.
  """
  patch_size: int = 16
  embed_dim: int = 384
  num_heads: int = 6
  mlp_ratio: float = 4.0
  key_depths: Sequence[int] = (2, 5, 8, 11)
  img_size: int = 224
  pos_grid: int | None = None  # grid of the stored pos table; default img_size // patch_size
  ln_eps: float = 1e-6
  gelu_approximate: bool = True
  resize_method: str = "torch"

  @nn.compact
  def __call__(self, x, crop_rng=None):
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = ((x + 1.0) * 0.5 - mean) / std
    b, h, w, c = x.shape
    size = self.img_size
    if (h, w) != (size, size):
      resized = _resize(x, (size, size), self.resize_method)
      if crop_rng is not None and h > size and w > size:
        # Reference: one coin and one crop window per call (torchvision RandomCrop on the batch).
        kc, ky, kx = jax.random.split(crop_rng, 3)
        oy = jax.random.randint(ky, (), 0, h - size + 1)
        ox = jax.random.randint(kx, (), 0, w - size + 1)
        cropped = jax.lax.dynamic_slice(x, (0, oy, ox, 0), (b, size, size, c))
        x = jnp.where(jax.random.bernoulli(kc, 0.5), cropped, resized)
      else:
        x = resized
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="patch_embed",
                kernel_init=_lp(nn.initializers.lecun_normal(), ("kernel_h", "kernel_w", "conv_in", "embed")),
                bias_init=_lp(nn.initializers.zeros, ("embed",)))(x)
    gh, gw = x.shape[1:3]
    x = x.reshape(b, gh * gw, self.embed_dim)
    g = self.pos_grid or self.img_size // p
    cls = self.param("cls_token", _lp(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, 1, self.embed_dim))
    pos = self.param("pos_embed", _lp(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, 1 + g * g, self.embed_dim))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, self.embed_dim)), x], axis=1)
    x = x + interpolate_pos_grid(pos, (gh, gw))
    readout = lambda t: t[:, 1:] + t[:, :1]
    outs = [readout(x)]
    keys = sorted(set(self.key_depths))
    block = dict(vit_block_kwargs(self.num_heads, int(round(self.embed_dim * self.mlp_ratio)),
                                  self.gelu_approximate), norm_eps=self.ln_eps)
    for i in range(max(keys) + 1 if keys else 0):
      x = TransformerBlock(**block, name=f"blocks_{i}")(x)
      if i in keys:
        outs.append(readout(x))
    return outs


# ------------------------------------------------------------------------------------------------
# DINO discriminator
# ------------------------------------------------------------------------------------------------

class DinoHead(nn.Module):
  """[B, L, C] readout -> [B, L] logits."""
  kernel_size: int = 9
  norm: str = "batch"
  norm_eps: float = 1e-6
  spectral_norm: bool = True
  bn_axis_name: Any = None

  @nn.compact
  def __call__(self, r, *, train: bool):
    c = r.shape[-1]
    sn = self.spectral_norm
    h = SpectralConv1d(c, 1, sn, name="conv_in")(r, update_stats=train)
    h = _norm(self.norm, c, train, self.norm_eps, "norm_in", self.bn_axis_name)(h)
    h = nn.leaky_relu(h, 0.2)
    g = SpectralConv1d(c, self.kernel_size, sn, name="res_conv")(h, update_stats=train)
    g = _norm(self.norm, c, train, self.norm_eps, "res_norm", self.bn_axis_name)(g)
    g = nn.leaky_relu(g, 0.2)
    h = (g + h) * (1.0 / math.sqrt(2.0))
    out = SpectralConv1d(1, 1, sn, out_axis=None, name="conv_out")(h, update_stats=train)
    return out[..., 0]


class DinoHeads(nn.Module):
  n: int
  kernel_size: int = 9
  norm: str = "batch"
  norm_eps: float = 1e-6
  spectral_norm: bool = True
  bn_axis_name: Any = None

  @nn.compact
  def __call__(self, feats, *, train: bool):
    if len(feats) != self.n:
      raise ValueError(f"DinoHeads: got {len(feats)} feature maps, expected {self.n}")
    return [DinoHead(self.kernel_size, self.norm, self.norm_eps, self.spectral_norm,
                     self.bn_axis_name, name=f"head_{i}")(f, train=train)
            for i, f in enumerate(feats)]


class DinoDiscriminator(nn.Module):
  """Frozen DINO ViT-S/16 + trainable heads: NHWC [-1, 1] -> logits [B, (len(key_depths)+1) * L].

  `__call__(x, *, train=True, crop_rng=None, return_features=False)`; with `train=True` apply
  with `mutable=['spectral', 'batch_stats']` (one power iteration, BN batch statistics).
  `return_features=True` also returns the backbone readouts (list of [B, L, C]).
  A tiny random backbone for tests:
  `DinoDiscriminator(embed_dim=32, num_heads=2, key_depths=(0, 1), img_size=32)`.
  """
  patch_size: int = 16
  embed_dim: int = 384
  num_heads: int = 6
  mlp_ratio: float = 4.0
  key_depths: Sequence[int] = (2, 5, 8, 11)
  img_size: int = 224
  pos_grid: int | None = None
  ln_eps: float = 1e-6
  gelu_approximate: bool = True
  resize_method: str = "torch"
  kernel_size: int = 9
  norm: str = "batch"
  norm_eps: float = 1e-6
  spectral_norm: bool = True
  bn_axis_name: Any = None

  def flops(self) -> dict:
    """Forward FLOPs on one image: backbone matmuls, backbone attention products, heads, and the
    heads' input convs (part of `heads`; their input gradient is never needed in a D step).

    Backbone at img_size (the resize to it is not counted): patch embed 2 L p^2 c C, then per
    block over T = L + 1 tokens 2 T (4 C^2 + 2 C F) for qkv, proj and the MLP (width F), and
    4 T^2 C for the scores and their values; blocks 0 .. max(key_depths).  Heads (one per
    readout, over the L patch tokens): conv_in 2 L C^2, the k-wide residual conv 2 L k C^2,
    conv_out 2 L C."""
    c, L = self.embed_dim, (self.img_size // self.patch_size) ** 2
    t, f = L + 1, int(round(c * self.mlp_ratio))
    depth = max(self.key_depths) + 1 if self.key_depths else 0
    mm = 2 * L * self.patch_size ** 2 * 3 * c + depth * 2 * t * (4 * c * c + 2 * c * f)
    attn = depth * 4 * t * t * c
    n_heads = len(self.key_depths) + 1
    heads = n_heads * (2 * L * c * c * (1 + self.kernel_size) + 2 * L * c)
    return dict(backbone_mm=float(mm), backbone_attn=float(attn), heads=float(heads),
                heads_conv_in=float(n_heads * 2 * L * c * c))

  def backbone_module(self) -> DinoViT:
    return DinoViT(self.patch_size, self.embed_dim, self.num_heads, self.mlp_ratio,
                   tuple(self.key_depths), self.img_size, self.pos_grid, self.ln_eps,
                   self.gelu_approximate, self.resize_method, parent=None)

  @nn.compact
  def __call__(self, x, *, train: bool = True, crop_rng=None, return_features: bool = False):
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"DinoDiscriminator: expected NHWC images with 1 or 3 channels, got {x.shape}")
    bb = self.backbone_module()
    backbone = frozen(DinoViT, self.is_initializing())(
        **{f: getattr(bb, f) for f in ("patch_size", "embed_dim", "num_heads", "mlp_ratio",
                                       "key_depths", "img_size", "pos_grid", "ln_eps",
                                       "gelu_approximate", "resize_method")},
        name="backbone")
    feats = backbone(x, crop_rng)
    logits = DinoHeads(len(feats), self.kernel_size, self.norm, self.norm_eps, self.spectral_norm,
                       self.bn_axis_name, name="heads")(feats, train=train)
    logits = jnp.concatenate(logits, axis=1)
    return (logits, feats) if return_features else logits


# Keys of the backbone files written before the DINO ViT's blocks were tdjax.nn's TransformerBlock
_OLD_DINO_KEY = re.compile(r"^(blocks_\d+)/(norm1|norm2|attn/qkv|attn/proj)/(\w+)$")
_OLD_DINO_RENAME = {"norm1": "norm1/ln", "norm2": "norm2/ln", "attn/proj": "attn/out"}


def upgrade_dino_keys(flat: Mapping) -> Mapping:
  """{key: array} of a DINO backbone file in the older layout (blocks_i/norm1/{scale,bias}, the
  fused blocks_i/attn/qkv kernel [C,3,H,D] and bias [3,H,D], blocks_i/attn/proj) -> the current
  one (norms under '/ln', qkv split along its q|k|v axis into attn/query|key|value, proj ->
  attn/out); values are unchanged otherwise.  A file already in the current layout is returned
  as it is (lazily read)."""
  if not any(_OLD_DINO_KEY.match(k) for k in flat):
    return flat
  out = {}
  for k in flat:
    m = _OLD_DINO_KEY.match(k)
    if m is None:
      out[k] = flat[k]
    elif m[2] == "attn/qkv":
      qkv = np.asarray(flat[k])
      for j, name in enumerate(("query", "key", "value")):
        out[f"{m[1]}/attn/{name}/{m[3]}"] = np.take(qkv, j, axis=1 if m[3] == "kernel" else 0)
    else:
      out[f"{m[1]}/{_OLD_DINO_RENAME[m[2]]}/{m[3]}"] = flat[k]
  return out


def load_dino_backbone(path: str, disc: DinoDiscriminator | None = None, *,
                       strict: bool = True) -> dict:
  """Reads a DINO npz (layout in the module docstring; older-layout files are upgraded by
  `upgrade_dino_keys`) -> the tree for params['backbone'].

  Use strict=False to load a 12-block file into a backbone whose key_depths stop earlier.
  """
  disc = DinoDiscriminator() if disc is None else disc
  x = jnp.zeros((1, disc.img_size, disc.img_size, 3), jnp.float32)
  return load_npz_params(path, expected_params(disc.backbone_module(), x), what="DINO",
                         strict=strict, rename=upgrade_dino_keys)


def with_backbone(params: dict, backbone_params: dict) -> dict:
  """Returns a copy of the discriminator params with params['backbone'] replaced (shapes checked)."""
  old, new = nn.unbox(params["backbone"]), backbone_params
  if jax.tree_util.tree_structure(old) != jax.tree_util.tree_structure(new):
    raise ValueError("with_backbone: backbone tree does not match the discriminator's")
  shapes = jax.tree.map(lambda a, b: np.shape(a) == np.shape(b), old, new)
  if not all(jax.tree.leaves(shapes)):
    raise ValueError("with_backbone: backbone shapes do not match the discriminator's")
  out = dict(params)
  out["backbone"] = backbone_params
  return out


def frozen_param_labels(params: dict) -> dict:
  """'frozen' for every leaf under params['backbone'], 'trainable' elsewhere (for multi_transform)."""
  return {k: jax.tree.map(lambda _: "frozen" if k == "backbone" else "trainable", v)
          for k, v in params.items()}


# ------------------------------------------------------------------------------------------------
# Losses and regularisers
# ------------------------------------------------------------------------------------------------

def hinge_d_loss(real_logits, fake_logits) -> jax.Array:
  """0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))  (taming / VAR convention)."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def hinge_g_loss(fake_logits) -> jax.Array:
  """-mean D(fake)."""
  return -jnp.mean(fake_logits)


def lecam_reg(real_logits, fake_logits, ema_real, ema_fake) -> jax.Array:
  """LeCAM (Tseng et al. 2021): mean relu(D(real) - ema_fake)^2 + mean relu(ema_real - D(fake))^2."""
  ema_real = jax.lax.stop_gradient(ema_real)
  ema_fake = jax.lax.stop_gradient(ema_fake)
  return (jnp.mean(jnp.square(jax.nn.relu(real_logits - ema_fake)))
          + jnp.mean(jnp.square(jax.nn.relu(ema_real - fake_logits))))


def update_lecam_ema(ema_real, ema_fake, real_logits, fake_logits, decay: float = 0.999):
  """EMAs of the mean real / fake logits: ema <- decay * ema + (1 - decay) * mean(logits)."""
  r = jnp.mean(jax.lax.stop_gradient(real_logits)).astype(jnp.float32)
  f = jnp.mean(jax.lax.stop_gradient(fake_logits)).astype(jnp.float32)
  return decay * ema_real + (1.0 - decay) * r, decay * ema_fake + (1.0 - decay) * f


def init_lecam_ema() -> dict:
  return {"real": jnp.zeros((), jnp.float32), "fake": jnp.zeros((), jnp.float32)}


def consistency_loss(logits_weak, logits_strong) -> jax.Array:
  """Consistency regularisation: MSE between D's logits on a weakly and a strongly augmented copy
  of the same images (DetailFlow: weak = the usual DiffAugment at p=0.5, strong =
  'color,translation,cutout_0.5' at p=1, over the real and the fake batch together; weight 4.0).
  Gradients flow into both terms."""
  return jnp.mean(jnp.square(logits_weak - logits_strong))

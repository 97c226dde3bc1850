"""InceptionV3 as the FID feature network (the TF 2015-12-05 graph of the ADM evaluator and of
pytorch-fid's `pt_inception-2015-12-05` weights), NHWC.

Submodule names follow torchvision / pytorch-fid (`Conv2d_1a_3x3`, `Mixed_5b.branch5x5_1`, ...) so
`tdjax.convert --kind inception` maps weights one to one.  The FID variant differs from the
classification network in three places, kept here: the average pools of blocks A, C and E_1 ignore
padded zeros (TF's `count_include_pad=False`), the last block (E_2) max-pools its pool branch, and
the classifier has 1008 outputs.  Outputs: logits [B, 1008], pool_3 features [B, 2048], and the
spatial features of sFID (ADM's `mixed_6/conv`: the 1x1 branch of Mixed_6d, first 7 channels of
its 17x17 map, flattened -> [B, 2023]).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _linear_taps(size_in: int, size_out: int):
  """Source indices (i0, i1) and weight of i1 for each output row of PyTorch's
  `F.interpolate(mode='bilinear', align_corners=False)` along one axis, in float32 as its kernel
  computes them: src = max(scale (dst + 0.5) - 0.5, 0), scale = in / out, the multiply-add
  fused (one rounding: torch's compiled CPU kernel contracts it to an FMA; the product of two
  float32 numbers is exact in float64, so float64 then one rounding is that FMA)."""
  scale = np.float32(size_in) / np.float32(size_out)
  half = np.arange(size_out, dtype=np.float32) + np.float32(0.5)
  src = (np.float64(scale) * half.astype(np.float64) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
  i1 = np.minimum(i0 + 1, size_in - 1)
  lam = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
  return i0, i1, lam


def resize_bilinear(x, size: tuple[int, int]):
  """NHWC images resized to `size` exactly as pytorch-fid (and torch-fidelity, ADM's PyTorch
  ports) resize to 299: `F.interpolate(x, size, mode='bilinear', align_corners=False)`, half-pixel
  centres, edges clamped, **no antialiasing** when downsampling (`jax.image.resize` antialiases,
  which moves 512 px features).  Two gathers and a lerp per axis (width first, as torch), so no
  matmul precision setting of the backend enters."""
  x = jnp.asarray(x)
  for axis, out in ((2, size[1]), (1, size[0])):
    if x.shape[axis] == out:
      continue
    i0, i1, lam = _linear_taps(x.shape[axis], out)
    shape = [1] * x.ndim
    shape[axis] = out
    lam = jnp.asarray(lam, x.dtype).reshape(shape)
    x = jnp.take(x, i0, axis=axis) * (1 - lam) + jnp.take(x, i1, axis=axis) * lam
  return x


class BasicConv2d(nn.Module):
  """relu(BN(conv(x))), conv without bias, BN eps 1e-3 (running statistics)."""
  features: int
  kernel: tuple = (1, 1)
  stride: int = 1
  padding: tuple = (0, 0)

  @nn.compact
  def __call__(self, x):
    (ph, pw) = self.padding
    x = nn.Conv(self.features, self.kernel, (self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool(x):
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, name="branch1x1")(x)
    b5 = BasicConv2d(48, name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), stride=2, name="branch3x3")(x)
    bd = BasicConv2d(64, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, nn.max_pool(x, (3, 3), (2, 2))], -1)


class InceptionC(nn.Module):
  """Returns (block output, its 1x1 branch): the branch of Mixed_6d is sFID's feature map."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv2d(192, name="branch1x1")(x)
    b7 = BasicConv2d(c, name="branch7x7_1")(x)
    b7 = BasicConv2d(c, **row, name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
    bd = BasicConv2d(c, name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c, **col, name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c, **row, name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c, **col, name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, **row, name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], -1), b1


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), stride=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, nn.max_pool(x, (3, 3), (2, 2))], -1)


class InceptionE(nn.Module):
  max_pool: bool = False        # FID's Mixed_7c (E_2) max-pools its pool branch

  @nn.compact
  def __call__(self, x):
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = BasicConv2d(320, name="branch1x1")(x)
    b3 = BasicConv2d(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3_2a")(b3),
                          BasicConv2d(384, **col, name="branch3x3_2b")(b3)], -1)
    bd = BasicConv2d(448, name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3dbl_3a")(bd),
                          BasicConv2d(384, **col, name="branch3x3dbl_3b")(bd)], -1)
    pooled = (nn.max_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1))) if self.max_pool
              else _avg_pool(x))
    bp = BasicConv2d(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class InceptionV3(nn.Module):
  """FID InceptionV3.  Input: images in [-1, 1], [B, H, W, 1 or 3], any size (resized to 299x299
  by `resize_bilinear`, pytorch-fid's resize; ADM's TF graph resizes without half-pixel centres, a
  small difference).  Returns (logits [B, 1008], pool_3 [B, 2048], spatial [B, 2023])."""
  num_classes: int = 1008
  resize: bool = True

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
    if self.resize and x.shape[1:3] != (299, 299):
      x = resize_bilinear(x, (299, 299))
    x = BasicConv2d(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    x = BasicConv2d(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = nn.max_pool(x, (3, 3), (2, 2))
    for name, pool in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool, name=name)(x)
    x = InceptionB(name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x, branch1x1 = InceptionC(c7, name=name)(x)
      if name == "Mixed_6d":      # ADM's mixed_6/conv: its 1x1 branch, first 7 channels
        spatial = branch1x1[..., :7].reshape(x.shape[0], -1)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = x.mean((1, 2))
    logits = nn.Dense(self.num_classes, name="fc")(pool)
    return logits, pool, spatial


def expected_variables() -> dict:
  """Abstract {'params', 'batch_stats'} of `InceptionV3` (shapes only, nothing computed)."""
  x = jax.ShapeDtypeStruct((1, 299, 299, 3), jnp.float32)
  return jax.eval_shape(lambda x: InceptionV3().init(jax.random.key(0), x), x)


def load_variables(path: str) -> dict:
  """Variables from the .npz that `python -m tdjax.convert --kind inception` writes."""
  from tdjax.losses.weights import load_npz_params
  return load_npz_params(path, expected_variables(), what="InceptionV3")

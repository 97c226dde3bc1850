"""LPIPS perceptual distance with a VGG16 trunk (Zhang et al. 2018, "lin" version), frozen.

    x, y in [-1, 1], NHWC (1 channel is repeated to 3)
    -> scaling layer  (x - shift) / scale,  shift = [-.030, -.088, -.188], scale = [.458, .448, .450]
    -> VGG16 conv trunk; taps at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    -> unit-normalise every feature vector over channels
    -> squared difference -> 1x1 conv to 1 channel (non-negative weights, no bias)
    -> spatial mean -> sum over the 5 taps                                          -> [B]

Frozen: every parameter is read through `stop_gradient` (see `weights.frozen`), so gradients reach
only the inputs, whatever the caller differentiates.  Inputs must be at least 16x16 (four 2x2 max
pools before relu5_3).

Weights file (`LPIPS.load_params(path)` / `load_lpips_params`): an `.npz` with these flat keys, all
float32, Flax layout (conv kernels [kh, kw, in, out]):

  features/conv1_1/kernel [3,3,3,64]     features/conv1_1/bias [64]
  features/conv1_2/kernel [3,3,64,64]    features/conv1_2/bias [64]
  features/conv2_1 .. conv2_2            (128 channels)
  features/conv3_1 .. conv3_3            (256 channels)
  features/conv4_1 .. conv4_3            (512 channels)
  features/conv5_1 .. conv5_3            (512 channels)
  lin0/kernel [1,1,64,1]   lin1/kernel [1,1,128,1]   lin2/kernel [1,1,256,1]
  lin3/kernel [1,1,512,1]  lin4/kernel [1,1,512,1]

From the official files: torchvision `vgg16.features.{0,2,5,7,10,12,14,17,19,21,24,26,28}` map to
conv1_1 .. conv5_3 (weight [out,in,kh,kw] -> transpose(2,3,1,0)); LPIPS `lin{i}.model.1.weight`
[1,C,1,1] -> transpose(2,3,1,0) gives lin{i}/kernel.  The scaling constants are not in the file.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdjax.losses.weights import expected_params, frozen, load_npz_params

_lp = nn.with_logical_partitioning

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
# (stage, convs per stage); taps are the last relu of each stage.
_VGG16_STAGES = ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3))
VGG16_WIDTHS = (64, 128, 256, 512, 512)
MIN_SIZE = 16


def vgg16_flops(h: int, w: int, channels: int = 3, widths: Sequence[int] = VGG16_WIDTHS) -> float:
  """Forward FLOPs of the LPIPS trunk on one h x w image: sum over its 3x3 'same' convs of
  2 C_in C_out (3 H_s - 2)(3 W_s - 2), the multiply-adds whose input is inside the image (9 H_s W_s
  taps less the zero padding's), the stage size halving (floor) at each 2x2 max pool."""
  total, cin = 0.0, channels
  for i, ((_, n_conv), width) in enumerate(zip(_VGG16_STAGES, widths)):
    if i > 0:
      h, w = h // 2, w // 2
    for _ in range(n_conv):
      total += 2 * cin * width * (3 * h - 2) * (3 * w - 2)
      cin = width
  return total


class VGG16Features(nn.Module):
  """VGG16 conv trunk (no classifier); returns the 5 LPIPS taps, each NHWC."""
  widths: Sequence[int] = VGG16_WIDTHS

  @nn.compact
  def __call__(self, x):
    taps = []
    for i, ((stage, n_conv), width) in enumerate(zip(_VGG16_STAGES, self.widths)):
      if i > 0:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for j in range(1, n_conv + 1):
        x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), name=f"conv{stage}_{j}",
                    kernel_init=_lp(nn.initializers.variance_scaling(2.0, "fan_in", "normal"),
                                    ("kernel_h", "kernel_w", "conv_in", "conv_out")),
                    bias_init=_lp(nn.initializers.zeros, ("conv_out",)))(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


class _LinHead(nn.Module):
  """1x1 conv to one channel without bias; weights clamped at 0 (LPIPS keeps them non-negative)."""

  @nn.compact
  def __call__(self, d):
    c = d.shape[-1]
    k = self.param("kernel", _lp(nn.initializers.uniform(2.0 / c), ("kernel_h", "kernel_w", "conv_in", None)),
                   (1, 1, c, 1))
    return jnp.einsum("bhwc,c->bhw", d, jnp.maximum(k[0, 0, :, 0], 0.0))[..., None]


def _unit_normalize(f, eps=1e-10):
  # sqrt(max(., 1e-20)) instead of sqrt(.): identical values wherever the norm is > 1e-10, but no
  # NaN gradient at an all-zero relu feature vector.
  n = jnp.sqrt(jnp.maximum(jnp.sum(f * f, axis=-1, keepdims=True), 1e-20))
  return f / (n + eps)


class LPIPS(nn.Module):
  """LPIPS-VGG16 distance: `LPIPS().apply({'params': p}, x, y) -> [B]`.

  `lin_dropout`: the reference builds the linear heads as Dropout(0.5) -> 1x1 conv, and the
  DetailFlow training loop leaves the loss module in train mode, so that dropout is active during
  tokenizer training (an inherited quirk).  Default 0.0 = off; to replicate, set 0.5 and call with
  `deterministic=False` and a 'dropout' rng.
  """
  widths: Sequence[int] = VGG16_WIDTHS
  lin_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, y, *, deterministic: bool = True):
    if x.shape != y.shape:
      raise ValueError(f"LPIPS: inputs have different shapes {x.shape} and {y.shape}")
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
      raise ValueError(f"LPIPS: expected NHWC images with 1 or 3 channels, got shape {x.shape}")
    if min(x.shape[1], x.shape[2]) < MIN_SIZE:
      raise ValueError(f"LPIPS: images must be at least {MIN_SIZE}x{MIN_SIZE}, got {x.shape[1:3]}")
    x = x.astype(jnp.float32)
    y = y.astype(jnp.float32)
    if x.shape[-1] == 1:
      x = jnp.repeat(x, 3, axis=-1)
      y = jnp.repeat(y, 3, axis=-1)
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    b = x.shape[0]
    # One trunk pass per image set, not one over [x; y]: the backward pass then differentiates the
    # trunk for x only (a concatenated pass carries y's activations into it too: 4 instead of 3
    # trunk-sized convolutions per pair when training against a fixed target).
    trunk = frozen(VGG16Features, self.is_initializing())(self.widths, name="features")
    feats_x, feats_y = trunk((x - shift) / scale), trunk((y - shift) / scale)
    total = jnp.zeros((b,), jnp.float32)
    for i, (fx, fy) in enumerate(zip(feats_x, feats_y)):
      d = jnp.square(_unit_normalize(fx) - _unit_normalize(fy))
      if self.lin_dropout > 0:
        d = nn.Dropout(self.lin_dropout)(d, deterministic=deterministic)
      s = frozen(_LinHead, self.is_initializing())(name=f"lin{i}")(d)
      total = total + jnp.mean(s, axis=(1, 2, 3))
    return total

  def load_params(self, path: str, *, strict: bool = True) -> dict:
    """Reads an LPIPS weights npz (layout in the module docstring) -> the `params` tree."""
    return load_lpips_params(path, self, strict=strict)


def load_lpips_params(path: str, module: LPIPS | None = None, *, strict: bool = True) -> dict:
  module = LPIPS() if module is None else module
  x = jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3), jnp.float32)
  return load_npz_params(path, expected_params(module, x, x), what="LPIPS", strict=strict)


def lpips_loss(params, x, y, module: LPIPS | None = None) -> jax.Array:
  """Mean LPIPS over the batch; gradients flow to `x` and `y` only."""
  module = LPIPS() if module is None else module
  return jnp.mean(module.apply({"params": params}, x, y))

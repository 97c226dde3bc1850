"""An image classifier: the first trainable task, and the offline feature net for evaluation.

No Inception weights exist offline, so conditional generators on Fashion-MNIST are judged by a
classifier trained on the real images: its accuracy on samples of a requested class, and the
Fréchet distance between its penultimate features of real and generated images.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import optax

from tdjax import configlib
from tdjax.losses.alignment import ViTTeacher
from tdjax.tasks.base import Task

_lp = nn.with_logical_partitioning


class ConvNet(nn.Module):
  """conv-GN-GELU stages with stride-2 downsampling, global mean pool, linear head."""
  channels: Sequence[int] = (32, 64, 128)
  blocks: int = 2            # conv layers per stage
  features: int = 128
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, return_features: bool = False, return_spatial: bool = False):
    """logits; with return_features (logits, pooled features); with return_spatial also the first 7
    channels of the second stage's map, flattened (the analogue of ADM's sFID features, Inception's
    mixed_6/conv[:7])."""
    x = x.astype(self.dtype)
    spatial = None
    for i, ch in enumerate(self.channels):
      for j in range(self.blocks):
        x = nn.Conv(ch, (3, 3), strides=2 if (j == 0 and i > 0) else 1, dtype=self.dtype,
                    kernel_init=_lp(nn.initializers.lecun_normal(), ("kernel_h", "kernel_w", "conv_in", "conv_out")),
                    bias_init=_lp(nn.initializers.zeros, ("conv_out",)), name=f"conv{i}_{j}")(x)
        x = nn.GroupNorm(num_groups=8, dtype=self.dtype,
                         scale_init=_lp(nn.initializers.ones, ("conv_out",)),
                         bias_init=_lp(nn.initializers.zeros, ("conv_out",)), name=f"norm{i}_{j}")(x)
        x = nn.gelu(x)
      x = nn.with_logical_constraint(x, ("batch", None, None, "conv_out"))
      if i == min(1, len(self.channels) - 1):
        spatial = x[..., :7].reshape(x.shape[0], -1).astype(jnp.float32)
    x = x.mean(axis=(1, 2))
    feats = nn.Dense(self.features, dtype=self.dtype,
                     kernel_init=_lp(nn.initializers.lecun_normal(), ("conv_in", "embed")),
                     bias_init=_lp(nn.initializers.zeros, ("embed",)), name="pre_logits")(x)
    feats = nn.gelu(feats)
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      kernel_init=_lp(nn.initializers.zeros, ("embed", "classes")),
                      bias_init=_lp(nn.initializers.zeros, ("classes",)), name="head")(feats)
    logits = logits.astype(jnp.float32)
    if return_spatial:
      return logits, feats.astype(jnp.float32), spatial
    return (logits, feats.astype(jnp.float32)) if return_features else logits


class ViTClassifier(nn.Module):
  """A `ViTTeacher` tower (grey images repeated to RGB, as the tokenizer feeds its teacher), its
  tokens mean-pooled -- the pooled features DetailFlow's alignment loss (Eq. 4) targets -- and a
  linear head.  Trained on labels, the tower is a small stand-in alignment teacher where no SigLIP2
  weights exist (`python -m tdjax.convert --kind teacher` writes it in the teacher layout)."""
  width: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 512
  patch_size: int = 4
  pos_grid: int = 8
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, *, return_features: bool = False, return_spatial: bool = False):
    x = x if x.shape[-1] == 3 else jnp.repeat(x, 3, axis=-1)
    tokens = ViTTeacher(self.width, self.depth, self.num_heads, self.mlp_dim, self.patch_size,
                        self.pos_grid, name="teacher")(x)
    feats = tokens.mean(axis=1)
    logits = nn.Dense(self.num_classes, name="head",
                      kernel_init=_lp(nn.initializers.zeros, ("embed", "classes")),
                      bias_init=_lp(nn.initializers.zeros, ("classes",)))(feats)
    if return_spatial:
      return logits, feats, tokens[..., :7].reshape(x.shape[0], -1)
    return (logits, feats) if return_features else logits


def build_model(config) -> nn.Module:
  m = config.model
  arch = m.get("arch", "convnet")     # judges trained before the ViT existed have no `arch`
  if arch == "vit":
    return configlib.from_config(ViTClassifier, m, "config.model")
  if arch != "convnet":
    raise ValueError(f"config.model.arch={arch!r}: expected 'convnet' or 'vit'")
  return configlib.from_config(ConvNet, m, "config.model", channels=tuple(m.channels),
                               dtype=jnp.dtype(config.compute_dtype))


class ClassifierTask(Task):
  kind = "classifier"

  def __init__(self, config):
    super().__init__(config)
    self.model = build_model(config)

  def init(self, rng):
    c = self.config.input
    x = jnp.zeros((1, c.image_size, c.image_size, c.channels), jnp.float32)
    return self.model.init(rng, x)["params"], {}

  def loss(self, params, model_state, batch, rng, step, branch=None):
    logits = self.model.apply({"params": params}, batch["image"])
    labels = batch["label"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    acc = (logits.argmax(-1) == labels).mean()
    return ce, ({"loss": ce, "accuracy": acc}, model_state)

  def eval_metrics(self, params, model_state, batch, rng):
    logits = self.model.apply({"params": params}, batch["image"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return {"loss": ce, "accuracy": (logits.argmax(-1) == batch["label"]).mean()}

  def features(self, params, images):
    """(logits, penultimate features) for evaluation of generated images."""
    return self.model.apply({"params": params}, images, return_features=True)

  def all_features(self, params, images):
    """(logits, pooled features, spatial features) for the evaluation suite."""
    return self.model.apply({"params": params}, images, return_spatial=True)

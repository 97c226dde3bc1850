"""What the tools call on a task: the training, FLOP-model and sampling protocols.

A task owns one trainable thing (a tokenizer, an AR model, a diffusion generator, a classifier).
Nothing outside a task reaches into it except through these methods:

  training (`tdjax.trainer`)   init, loss, and the optional hooks loss_branch, param_groups,
                               load_pretrained, load_frozen, eval_metrics, images
  FLOP model (`tdjax.aot`, `tdjax.bench`, the MFU in the training log)
                               example_batch, analytic_flops
  sampling (`tdjax.sample`)    `GeneratorTask`: image_sampler, sample_options

All methods that run on device are pure functions of their arguments so the loop can `jax.jit`
them with explicit shardings.

State layout the loop keeps for every task:

  params       trainable parameters (fp32 master copy), a pytree of arrays.  Parameters are
               created with `nn.with_logical_partitioning`; the loop reads the logical specs from
               the boxed tree returned by `init` under `jax.eval_shape`, then unboxes.
  model_state  non-trainable, updated state (batch-norm statistics, codebook usage counts,
               spectral-norm vectors, LeCAM EMAs ...); `{}` when the task has none.

Several optimisers (e.g. generator and discriminator of a GAN) are expressed as one loss whose
cross terms are wrapped in `jax.lax.stop_gradient`, with `param_groups` mapping each top-level
params key to a group that gets its own optimiser settings (`optax.multi_transform`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

PyTree = Any
Metrics = Mapping[str, jax.Array]


class Task:
  """Base class; subclasses override `init` and `loss`, optionally the hooks."""

  # Name used in checkpoints and logs; checkpoints of one kind cannot be loaded by another.
  kind: str = "task"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  # --- required -------------------------------------------------------------------------------
  def init(self, rng: jax.Array) -> tuple[PyTree, PyTree]:
    """Returns (params, model_state).  Params may be `nn.LogicallyPartitioned` boxes."""
    raise NotImplementedError(f"{type(self).__name__}.init")

  def loss(self, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
           rng: jax.Array, step: jax.Array,
           branch: int | None = None) -> tuple[jax.Array, tuple[dict, PyTree]]:
    """Returns (scalar loss, (metrics, new_model_state)).  Called inside jit with a traced step;
    `branch`: the static branch index when `loss_branch` splits the step (else None)."""
    raise NotImplementedError(f"{type(self).__name__}.loss")

  # --- optional -------------------------------------------------------------------------------
  def loss_branch(self, rng: jax.Array, step: jax.Array) -> tuple[jax.Array, int] | None:
    """Optional: (traced branch index, number of branches) for this step's loss.  The loop then
    differentiates `loss(..., branch=i)` separately for each static i and `lax.switch`es between
    the complete forward+backward programs (shape-changing steps, e.g. a decoder resolution
    chosen per step).  `rng` and `step` are the ones `loss` receives.  Default: None."""
    return None

  def load_pretrained(self, params: PyTree) -> PyTree:
    """Host-side: returns `params` (initialised, unboxed) with pretrained parts read from the
    files the config names, or `params` itself (same object) when there are none.  Called once on
    a fresh start, outside jit, so large weight files never become compiled constants."""
    return params

  def load_frozen(self, model_state: PyTree) -> PyTree:
    """Host-side, like `load_pretrained`, for non-trained weights in the model state (frozen loss
    networks): `model_state` with them read from their files, or `model_state` itself."""
    return model_state

  def param_groups(self, params: PyTree) -> PyTree | None:
    """A pytree of group names (same structure as params) or None for a single group."""
    return None

  def eval_metrics(self, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
                   rng: jax.Array) -> dict:
    """Metrics on a held-out batch (jit-compiled by the loop).  Default: none."""
    return {}

  def images(self, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
             rng: jax.Array) -> dict:
    """Pictures for TensorBoard / the demo: name -> float array [N, H, W, C] in [-1, 1]."""
    return {}

  # --- FLOP model -------------------------------------------------------------------------------
  def example_batch(self, batch_size: int, seed: int = 0) -> dict:
    """Random inputs of the training shapes (`tdjax.aot`, `tdjax.bench`): by default images of
    `config.input` and labels."""
    c = self.config.input
    classes = self.config.get("model", {}).get("num_classes", c.get("num_classes", 10))
    rng = np.random.default_rng(seed)
    shape = (batch_size, c.image_size, c.image_size, c.get("channels", 1))
    return {"image": rng.uniform(-1, 1, shape).astype(np.float32),
            "label": rng.integers(0, classes, (batch_size,)).astype(np.int32)}

  def analytic_flops(self, batch: Mapping[str, Any]) -> float | None:
    """The train step's FLOPs for `batch` from the model's dimensions (the MFU, `tdjax.aot`'s
    check of XLA's count), or None when the task has no FLOP model."""
    return None


class GeneratorTask(Task):
  """A task whose checkpoints `tdjax.sample` draws images from."""

  # the keyword options `image_sampler` accepts (the sampling CLI's flags that apply)
  sample_options: tuple[str, ...] = ()

  def image_sampler(self, **overrides) -> Callable:
    """`(params, labels [B], rng) -> images [B, H, W, C] in [-1, 1]`, jit-compiled, with the
    config's sampling settings updated by `overrides` (keys from `sample_options`)."""
    raise NotImplementedError(f"{type(self).__name__}.image_sampler")

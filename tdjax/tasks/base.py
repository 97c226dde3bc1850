"""The model-agnostic task interface the training loop drives.

A task owns one trainable thing (a tokenizer, an AR model, a diffusion generator, a classifier).
The loop (`tdjax.trainer`) only ever calls the methods below; everything model-specific lives in
the task.  All methods that run on device are pure functions of their arguments so the loop can
`jax.jit` them with explicit shardings.

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
           rng: jax.Array, step: jax.Array) -> tuple[jax.Array, tuple[dict, PyTree]]:
    """Returns (scalar loss, (metrics, new_model_state)).  Called inside jit with a traced step."""
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

  def logical_batch_axes(self) -> Mapping[str, tuple]:
    """Logical axes of each batch entry; the loop shards the leading axis over the data axes."""
    return {}

  def eval_metrics(self, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
                   rng: jax.Array) -> dict:
    """Metrics on a held-out batch (jit-compiled by the loop).  Default: none."""
    return {}

  def images(self, params: PyTree, model_state: PyTree, batch: Mapping[str, jax.Array],
             rng: jax.Array) -> dict:
    """Pictures for TensorBoard / the demo: name -> float array [N, H, W, C] in [-1, 1]."""
    return {}

  def sample_fn(self) -> Callable | None:
    """Returns a sampling function for the sampling CLI, or None if the task cannot sample."""
    return None

"""Optimisers from config: schedules, clipping, weight-decay masks, per-group settings, EMA."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging


def learning_rate_schedule(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from `warmup_init * lr` to `lr`, then 'constant', 'cosine' or 'linear' decay
  to `min_lr_ratio * lr` at `total_steps` (DetailFlow: cosine to 0.1 lr; TransDiff: constant)."""
  lr = float(c.lr)
  warm = int(c.get("warmup_steps", 0))
  init = float(c.get("warmup_init", 0.0)) * lr
  end = float(c.get("min_lr_ratio", 0.0)) * lr
  decay_steps = max(total_steps - warm, 1)
  kind = c.get("schedule", "constant")
  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif kind == "linear":
    main = optax.linear_schedule(lr, end, decay_steps)
  else:
    raise ValueError(f"optimizer.schedule={kind!r}: expected constant, cosine or linear")
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(init, lr, warm), main], [warm])


def decay_mask(params, min_ndim: int, specs=None, exclude=()):
  """Weight decay only on parameters with ndim >= min_ndim (no decay on biases and norm scales),
  and none under a dict key named in `exclude` (e.g. ('head',): TransDiff and MAR decay no
  parameter of the diffusion head, reference `'diffdecoder' in name` / `'diffloss' in name`).

  With the parameters' logical specs, a stacked 'layers' axis (nn.scan) does not count, so the
  [depth, D] norm scales of a scanned stack stay undecayed.  Leaves of other optimiser groups
  (optax.MaskedNode) pass through.
  """
  exclude = set(exclude)

  def decide(path, p, s=None):
    if isinstance(p, optax.MaskedNode):
      return p
    if any(getattr(k, "key", None) in exclude for k in path):
      return False
    stacked = sum(1 for a in (s or ()) if a == "layers")
    return p.ndim - stacked >= min_ndim

  leaf = lambda x: isinstance(x, (optax.MaskedNode, jax.sharding.PartitionSpec))
  if specs is None:
    return jax.tree_util.tree_map_with_path(decide, params, is_leaf=leaf)
  return jax.tree_util.tree_map_with_path(decide, params, specs, is_leaf=leaf)


def check_optimizer(c: ml_collections.ConfigDict, total_steps: int, where: str = "optimizer") -> None:
  """One-line errors for settings no run can want (a negative learning rate ascends the loss),
  and one warning line for legal but surprising ones (a warm-up as long as the run)."""
  def bad(key, expected):
    raise ValueError(f"config.{where}.{key}={c.get(key)}: expected {expected}")
  if float(c.lr) < 0:
    bad("lr", ">= 0 (a negative learning rate ascends the loss)")
  for key in ("weight_decay", "grad_clip", "eps"):
    if float(c.get(key, 0.0)) < 0:
      bad(key, ">= 0")
  for key in ("warmup_init", "min_lr_ratio"):
    if not 0 <= float(c.get(key, 0.0)) <= 1:
      bad(key, "a fraction of lr in [0, 1]")
  for key in ("b1", "b2"):
    if key in c and not 0 <= float(c[key]) < 1:
      bad(key, "in [0, 1)")
  warm = int(c.get("warmup_steps", 0))
  if warm < 0:
    bad("warmup_steps", ">= 0")
  if warm and warm >= total_steps:
    logging.warning("config.%s.warmup_steps=%d >= total_steps=%d: the run never reaches its full "
                    "learning rate %g", where, warm, total_steps, float(c.lr))


def _single(c: ml_collections.ConfigDict, total_steps: int, specs=None,
            where: str = "optimizer") -> optax.GradientTransformation:
  check_optimizer(c, total_steps, where)
  name = c.get("name", "adamw")
  sched = learning_rate_schedule(c, total_steps)
  parts = []
  if c.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(float(c.grad_clip)))
  if name in ("adam", "adamw"):
    parts.append(optax.scale_by_adam(b1=float(c.b1), b2=float(c.b2), eps=float(c.eps)))
    wd = float(c.get("weight_decay", 0.0)) if name == "adamw" else 0.0
    if wd:
      min_ndim = int(c.get("decay_min_ndim", 2))
      exclude = tuple(c.get("decay_exclude", ()))
      parts.append(optax.add_decayed_weights(
          wd, mask=lambda p: decay_mask(p, min_ndim, specs, exclude)))
  elif name == "sgd":
    if c.get("momentum", 0.0):
      parts.append(optax.trace(decay=float(c.momentum)))
  else:
    raise ValueError(f"optimizer.name={name!r}: expected adam, adamw or sgd")
  parts.append(optax.scale_by_learning_rate(sched))
  return optax.chain(*parts)


def make_optimizer(config: ml_collections.ConfigDict, groups=None, specs=None) -> optax.GradientTransformation:
  """One optimiser, or one per parameter group (`groups`: pytree of names like params).

  `specs`: the parameters' logical PartitionSpecs (see `decay_mask`).
  A group's settings are `config.optimizer` updated with `config.optimizer_groups[name]`; each group
  clips its own gradient norm (DetailFlow clips generator and discriminator separately).  The
  group 'frozen' is never updated (optax.set_to_zero: no moments, no weight decay).
  """
  if groups is None:
    return _single(config.optimizer, config.total_steps, specs)
  names = sorted(set(jax.tree.leaves(groups)))
  transforms = {}
  for name in names:
    if name == "frozen":
      transforms[name] = optax.set_to_zero()
      continue
    c = ml_collections.ConfigDict(config.optimizer.to_dict())
    overrides = config.get("optimizer_groups", {}).get(name, {})
    c.update(dict(overrides))
    transforms[name] = _single(c, config.total_steps, specs,
                               f"optimizer_groups.{name}" if overrides else "optimizer")
  return optax.multi_transform(transforms, groups)


def ema_decay_at(step, decay: float, warmup: bool):
  """The EMA decay used at optimiser step `step` (0-based count of updates already made).

  Without warm-up it is the constant `decay`.  With warm-up it is min(decay, (1 + t) / (10 + t))
  (the num_updates rule of TF's ExponentialMovingAverage): a short run's average then forgets its
  random initialisation instead of lagging ~1 / (1 - decay) steps behind the weights (at decay 0.999
  a 1,500-step demo's EMA still carries e^-1.5 = 22 % of the early, untrained weights).
  """
  if not warmup:
    return decay
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def ema_update(ema, params, decay):
  """EMA of fp32 parameters: ema <- decay * ema + (1 - decay) * params."""
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p.astype(e.dtype) - e), ema, params)


def cast_floating(tree: Any, dtype) -> Any:
  """Casts floating leaves to `dtype` (bf16 compute from fp32 master weights); no-op for fp32."""
  if jnp.dtype(dtype) == jnp.float32:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

"""DetailFlow next-detail AR transformer on pre-extracted tokenizer codes (task kind 'next_detail').

Batch (from `tdjax.data.codes.CodesPipeline`): clean, ar_input, ar_label int32 [B, N], label [B].
Per sequence with probability `loss.correction_prob` (0.3) the model reads ar_input[:N-g] and
predicts ar_label, else it reads clean[:N-g] and predicts clean; cross-entropy over all N positions
(reference 2.3-2.4).  Label dropout (CFG) and the dropouts live in the model (train=True).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tdjax.generators import next_detail as nd
from tdjax.tasks.base import Task


class NextDetailTask(Task):
  kind = "next_detail"

  def __init__(self, config):
    super().__init__(config)
    self.model = nd.model_from_config(config.model, dtype=config.get("compute_dtype", "float32"))
    m, c = self.model, config.input
    if int(c.get("num_classes", m.num_classes)) != m.num_classes:
      raise ValueError(f"input.num_classes={c.num_classes} differs from model.num_classes="
                       f"{m.num_classes}")
    nd.check_tokenizer_pair(c.get("num_tokens", m.num_tokens), c.get("vocab_size", m.vocab_size),
                            m.num_tokens, m.vocab_size)
    loss = config.get("loss", {})
    self.correction_prob = float(loss.get("correction_prob", 0.3))
    if not 0.0 <= self.correction_prob <= 1.0:
      raise ValueError(f"loss.correction_prob={self.correction_prob} must be in [0, 1]")

  # --- params -----------------------------------------------------------------------------------
  def init(self, rng):
    return nd.init_params(self.model, rng), {}

  def param_groups(self, params):
    """With `optimizer_groups.no_decay` in the config: 'no_decay' for parameters whose own rank is
    < 2 (norm scales), counting the stacked 'layers' axis of a scanned stack out, 'decay' for the
    rest (kernels and embeddings).  Otherwise None (one group).

    `optim.decay_mask` looks at p.ndim only, so with scan=True it also decays the [depth, D] norm
    scales; the groups fix that, but each group then clips its own gradient norm."""
    if "no_decay" not in self.config.get("optimizer_groups", {}):
      return None

    def group(path, p):
      keys = [getattr(k, "key", None) for k in path]
      ndim = p.ndim - (1 if "layers" in keys else 0)
      return "decay" if ndim >= 2 else "no_decay"
    return jax.tree_util.tree_map_with_path(group, params)

  def logical_batch_axes(self):
    codes = ("batch", "length")
    return {"clean": codes, "ar_input": codes, "ar_label": codes, "label": ("batch",)}

  # --- loss -------------------------------------------------------------------------------------
  def _forward(self, params, codes, labels, train, rng=None):
    m = self.model
    ids = nd.layout_ids(nd.next_detail_inputs(codes, m.group_size), m.num_tokens, m.group_size)
    rngs = {"dropout": rng} if train else {}
    return m.apply({"params": params}, ids, labels, train=train, rngs=rngs)

  def loss(self, params, model_state, batch, rng, step):
    r_mix, r_drop = jax.random.split(rng)
    codes, targets, chosen = nd.self_correction_mix(
        r_mix, batch["clean"], batch["ar_input"], batch["ar_label"], self.correction_prob)
    logits = self._forward(params, codes, batch["label"], True, r_drop)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    acc = (logits.argmax(-1) == targets).mean()
    return ce, ({"loss": ce, "accuracy": acc, "correction_fraction": chosen.mean()}, model_state)

  def eval_metrics(self, params, model_state, batch, rng):
    """Clean sequences, no dropout: loss, accuracy, and the loss of the first group."""
    logits = self._forward(params, batch["clean"], batch["label"], False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["clean"])
    g = self.model.group_size
    return {"loss": ce.mean(), "loss_first_group": ce[:, :g].mean(),
            "accuracy": (logits.argmax(-1) == batch["clean"]).mean()}

  # --- sampling ---------------------------------------------------------------------------------
  def sample_fn(self):
    """(params, labels [B], rng, **overrides) -> codes [B, N]; defaults from config.sample."""
    defaults = dict(self.config.get("sample", {}))

    def fn(params, labels, rng, **overrides):
      kw = dict(defaults, **overrides)
      return nd.sample(self.model, nn.unbox(params), labels, rng, **kw)
    return fn

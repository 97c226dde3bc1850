"""DetailFlow next-detail AR transformer on pre-extracted tokenizer codes (task kind 'next_detail').

Batch (from `tdjax.data.codes.CodesPipeline`): clean, ar_input, ar_label int32 [B, N], label [B].
Per sequence with probability `loss.correction_prob` (0.3) the model reads ar_input[:N-g] and
predicts ar_label, else it reads clean[:N-g] and predicts clean; cross-entropy over all N positions
(docs/reference/detailflow.md 2.3-2.4).  Label dropout (CFG) and the dropouts live in the model
(train=True).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax

from tdjax.generators import next_detail as nd
from tdjax.tasks.base import GeneratorTask
from tdjax.tasks.detailflow_tokenizer import load_tokenizer


class NextDetailTask(GeneratorTask):
  kind = "next_detail"

  def __init__(self, config):
    super().__init__(config)
    self.model = nd.model_from_config(config.model, dtype=config.compute_dtype)
    m, c = self.model, config.input
    if int(c.num_classes) != m.num_classes:
      raise ValueError(f"input.num_classes={c.num_classes} differs from model.num_classes="
                       f"{m.num_classes}")
    nd.check_tokenizer_pair(c.num_tokens, c.vocab_size, m.num_tokens, m.vocab_size)
    self.correction_prob = float(config.loss.correction_prob)
    if not 0.0 <= self.correction_prob <= 1.0:
      raise ValueError(f"loss.correction_prob={self.correction_prob} must be in [0, 1]")
    self._tokenizer = None
    if config.tokenizer_workdir:
      self.tokenizer()

  # --- params -----------------------------------------------------------------------------------
  def init(self, rng):
    return nd.init_params(self.model, rng), {}

  def example_batch(self, batch_size: int, seed: int = 0) -> dict:
    """Random codes of the training shapes (benchmarks, AOT compilation)."""
    m = self.model
    rng = np.random.default_rng(seed)
    codes = lambda: rng.integers(0, m.vocab_size, (batch_size, m.num_tokens)).astype(np.int32)
    return {"clean": codes(), "ar_input": codes(), "ar_label": codes(),
            "label": rng.integers(0, m.num_classes, (batch_size,)).astype(np.int32)}

  def analytic_flops(self, batch) -> float:
    """Train-step FLOPs: 3 x forward (forward + 2 x backward), forward per token =
    2 L (4 D^2 + 3 D F) (attention projections, SwiGLU) + 2 D V (head) + 4 L N D (scores and
    values over the full N x N group-causal mask); remat adds one forward of the blocks."""
    m = self.model
    b = int(np.shape(batch["label"])[0])
    n, d, l, f, v = m.num_tokens, m.dim, m.depth, m.mlp_dim, m.vocab_size
    blocks = 2 * l * (4 * d * d + 3 * d * f) + 4 * l * n * d
    fwd = blocks + 2 * d * v
    return float(b * n * (3 * fwd + (blocks if m.remat != "none" else 0)))

  # --- loss -------------------------------------------------------------------------------------
  def _forward(self, params, codes, labels, train, rng=None):
    m = self.model
    ids = nd.layout_ids(nd.next_detail_inputs(codes, m.group_size), m.num_tokens, m.group_size,
                        m.causal_num)
    rngs = {"dropout": rng} if train else {}
    return m.apply({"params": params}, ids, labels, train=train, rngs=rngs)

  def loss(self, params, model_state, batch, rng, step, branch=None):
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

  # --- pictures ---------------------------------------------------------------------------------
  def tokenizer(self):
    """(DetailFlowTokenizer, its params as host arrays) from config.tokenizer_workdir, or None.

    Restored on first use, which must happen outside jit (the task's constructor does it when a
    tokenizer is configured, because the loop only calls `images` inside jit)."""
    workdir = self.config.tokenizer_workdir
    if not workdir:
      return None
    if self._tokenizer is None:
      task, params, _ = load_tokenizer(workdir)
      nd.check_tokenizer_pair(task.model.num_tokens, task.model.codebook_size,
                              self.model.num_tokens, self.model.vocab_size, task.model.c,
                              self.model.c)
      self._tokenizer = (task.model, params)      # host arrays
    return self._tokenizer

  def images(self, params, model_state, batch, rng):
    """Class-conditional samples (one per class, up to 8) decoded by the tokenizer of
    config.tokenizer_workdir, with config.sample settings; {} without a tokenizer."""
    tok = self.tokenizer()
    if tok is None:
      return {}
    labels = np.arange(min(8, self.model.num_classes))
    codes = self.sample_fn()(params, labels, rng)
    return {"samples": nd.decode_codes(tok[0], tok[1], codes, ar_model=self.model)}

  # --- sampling ---------------------------------------------------------------------------------
  sample_options = ("cfg", "cfg_schedule", "temperature", "top_k", "top_p")

  def image_sampler(self, **overrides):
    """(params, labels [B], rng) -> images [B, H, W, C] in [-1, 1], decoded by the tokenizer."""
    tok = self.tokenizer()
    if tok is None:
      raise ValueError("the config names no tokenizer_workdir to decode samples with")
    sample = self.sample_fn()
    decode = jax.jit(lambda t, c: nd.decode_codes(tok[0], t, c, ar_model=self.model))
    return lambda params, labels, rng: decode(tok[1], sample(params, labels, rng, **overrides))

  def sample_fn(self):
    """(params, labels [B], rng, **overrides) -> codes [B, N]; defaults from config.sample."""
    defaults = dict(self.config.sample)

    def fn(params, labels, rng, **overrides):
      kw = dict(defaults, **overrides)
      return nd.sample(self.model, nn.unbox(params), labels, rng, **kw)
    return fn

"""Next-detail diffusion training (task kind 'next_detail_diffusion';
`tdjax.generators.next_detail_diffusion`).

Batch: {'image': [B, H, W, C] in [-1, 1], 'label': [B]} from the image pipeline.  A frozen DetailFlow
tokenizer with a *continuous* bottleneck (`config.tokenizer_workdir`, trained with
`configs/detailflow_tokenizer.py:bottleneck=continuous`) turns images into N coarse-to-fine tokens
of code_dim features inside the step (its eval-mode encoder: the posterior mean when it has a KL
term), standardised per channel with statistics of the first `config.token_stats_images` training
images (recomputed identically whenever the task is built, so a checkpoint needs no extra file).
The tokenizer's weights enter the compiled step as constants: right for the demo's small tokenizer;
a full-size run should extract the tokens once instead (as the discrete AR model's codes are).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tdjax.data import pipeline
from tdjax.generators import next_detail_diffusion as ndd
from tdjax.tasks.base import GeneratorTask
from tdjax.tasks.detailflow_tokenizer import load_tokenizer


class NextDetailDiffusionTask(GeneratorTask):
  kind = "next_detail_diffusion"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    workdir = config.tokenizer_workdir
    if not workdir:
      raise ValueError("config.tokenizer_workdir: next-detail diffusion needs a trained continuous "
                       "DetailFlow tokenizer (configs/detailflow_tokenizer.py:bottleneck=continuous)")
    tok_task, tok_params, _ = load_tokenizer(workdir)
    tok = tok_task.model
    if tok.is_vq:
      raise ValueError(f"{workdir}: a VQ tokenizer; next-detail diffusion needs bottleneck="
                       f"'continuous' (the discrete model is task 'next_detail')")
    m = config.model
    if int(m.num_tokens) != tok.num_tokens or int(m.group_size) != tok.group:
      raise ValueError(f"tokenizer/AR mismatch: tokenizer {workdir} has N={tok.num_tokens}, "
                       f"g={tok.group}; config.model has N={m.num_tokens}, g={m.group_size}")
    self.tokenizer = tok
    self.tokenizer_params = tok_params["gen"]    # host arrays
    self.model = ndd.model_from_config(m, tok.code_dim, config.compute_dtype)
    self.batch_mul = int(m.batch_mul)
    self.mean, self.std = self._token_stats(int(config.token_stats_images))

  # --- tokens -----------------------------------------------------------------------------------
  def _tokenizer_vars(self, tokenizer_params=None):
    """Frozen tokenizer variables; pass the params explicitly to make them a jit argument."""
    return {"params": self.tokenizer_params if tokenizer_params is None else tokenizer_params}

  def _raw_tokens(self, images, tokenizer_params=None):
    v = self._tokenizer_vars(tokenizer_params)
    z = self.tokenizer.apply(v, images.astype(jnp.float32), method="encode")
    return self.tokenizer.apply(v, z, method="quantize")["z_q"]

  def _token_stats(self, num_images: int):
    """Per-channel mean and std [C] of the tokens of the first training images (record order)."""
    inp = ml_collections.ConfigDict(pipeline.with_defaults(self.config.input).to_dict())
    inp.update(dict(batch_size=min(256, num_images), augment="none", shuffle=False))
    data = pipeline.make_image_pipeline(inp, seed=0, split=inp.split, train=False)
    encode = jax.jit(lambda p, x: self._raw_tokens(x, p))
    z = []
    while sum(len(a) for a in z) < num_images:
      z.append(np.asarray(encode(self.tokenizer_params, next(data)["image"])))
    z = np.concatenate(z)[:num_images].reshape(-1, self.tokenizer.code_dim).astype(np.float64)
    return z.mean(0).astype(np.float32), np.maximum(z.std(0), 1e-6).astype(np.float32)

  def tokens(self, images):
    """Images [B, H, W, C] -> standardised continuous tokens [B, N, C] (no gradient)."""
    return jax.lax.stop_gradient((self._raw_tokens(images) - self.mean) / self.std)

  def tokens_to_images(self, z, tokenizer_params=None):
    v = self._tokenizer_vars(tokenizer_params)
    x = self.tokenizer.apply(v, z * self.std + self.mean, None, method="decode")
    return jnp.clip(x, -1.0, 1.0)

  # --- params -----------------------------------------------------------------------------------
  def init(self, rng):
    return ndd.init_params(self.model, rng), {}

  # --- loss -------------------------------------------------------------------------------------
  def loss(self, params, model_state, batch, rng, step, branch=None):
    loss, metrics = ndd.flow_loss(self.model, params, self.tokens(batch["image"]), batch["label"],
                                  rng, train=True, batch_mul=self.batch_mul)
    return loss, (metrics, model_state)

  def eval_metrics(self, params, model_state, batch, rng):
    _, metrics = ndd.flow_loss(self.model, params, self.tokens(batch["image"]), batch["label"],
                               rng, train=False)
    return metrics

  # --- sampling ---------------------------------------------------------------------------------
  sample_options = ("cfg", "steps", "scale_0", "scale_1", "sampler", "pag_scale")

  def image_sampler(self, **overrides):
    """(params, labels [B], rng) -> images [B, H, W, C] in [-1, 1], decoded by the tokenizer."""
    kw = dict(self.config.sample, **overrides)
    decode = jax.jit(self.tokens_to_images)  # frozen weights as arguments, not jit constants

    def fn(params, labels, rng):
      return decode(ndd.sample(self.model, params, labels, rng, **kw), self.tokenizer_params)
    return fn

  def images(self, params, model_state, batch, rng):
    labels = jnp.arange(min(8, self.model.num_classes))
    kw = dict(self.config.sample)
    kw["steps"] = min(int(kw["steps"]), 25)
    z = ndd.sample(self.model, params, labels, rng, **kw)
    return {"samples": self.tokens_to_images(z)}

"""DetailFlow's next-detail AR transformer and its group-parallel sampler.

Sequence layout (N codes z_0..z_{N-1}, group size g, M = N / g groups).  The model input has
exactly N positions:

    pos     0      1 .. g         g+1 .. 2g-1            2g .. N-1
    input   [cls]  z_0 .. z_{g-1}  spe_0 .. spe_{g-2}      z_g .. z_{N-g-1}

and the target of position p is z_p (all N codes, plain mean cross-entropy).  The attention mask
(`group_causal_mask`) is causal on the first g rows; a row i >= g sees column j iff
i // g >= j // g, so blocks are aligned on *sequence positions*: block 1 = {z_{g-1}, spe_*} predicts
z_g..z_{2g-1}, block b >= 2 = {z_{(b-1)g}..z_{bg-1}} predicts z_{bg}..z_{bg+g-1}.  RoPE is DetailFlow's
2D one over (row, col) = divmod(p - 1, g), with zero rotation (hence zero q/k) at the class token.

That is the reference's default `causal_num` c = g ("first group causal").  In general (c a
multiple of g, 0 <= c <= N - g; the reference's `causal_num`, taken from the tokenizer) the
placeholders follow the first c codes, [cls] z_0..z_{c-1} spe_0..spe_{g-2} z_c..z_{N-g-1}, rows
i < c are causal and the sampler draws c codes one by one, then groups c/g..M-1 in parallel:
c + M - c/g forward passes.  c = 0 is DetailFlow Table 2's "all groups parallel" row: block 0 =
{cls, spe_*} predicts the first group at once, M passes.

Model: Llama blocks from `tdjax.nn` (RMSNorm, SwiGLU, no biases), a class table with a null class
(index num_classes) and label dropout for CFG, a token table, g-1 learned placeholder vectors and
an untied, zero-initialised output head.

Sampling (`sample`): the first g codes one by one, then g codes per step sampled independently from
the last g positions: g + M - 1 forward passes.  With `use_cache=True` each pass feeds only the new
positions (1, then g at a time) through a fixed-size KV cache (`tdjax.nn.Attention` decode mode: a
chunk written together sees itself, which is exactly the group mask), jit-compiled with static
shapes (`jax.lax.fori_loop` over steps); `use_cache=False` recomputes the forward over the
positions written so far every step, as the reference's `generate_group_par` does (its steps
unrolled in one program: each pass has its own static length).  Both give the same tokens for the
same key.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdjax import configlib
from tdjax.nn.layers import (RMSNorm, TransformerStack, llama_block_kwargs, llama_ffn_hidden,
                             unstack_layers)
from tdjax.nn.rope import rope_2d_grid

_lp = nn.with_logical_partitioning
Dtype = Any

KIND_CLASS, KIND_CODE, KIND_PLACEHOLDER = 0, 1, 2

# LlamaGen sizes (DetailFlow releases only GPT-L).  mlp_dim = find_multiple(int(8 * dim / 3), 256).
GPT_SIZES = {
    "demo": dict(depth=4, dim=128, num_heads=4, mlp_dim=384),
    "B": dict(depth=12, dim=768, num_heads=12, mlp_dim=llama_ffn_hidden(768)),
    "L": dict(depth=24, dim=1024, num_heads=16, mlp_dim=llama_ffn_hidden(1024)),
    "XL": dict(depth=36, dim=1280, num_heads=20, mlp_dim=llama_ffn_hidden(1280)),
}


# ------------------------------------------------------------------------------------------------
# Layout, mask, inputs and targets (pure numpy / jnp)
# ------------------------------------------------------------------------------------------------

def check_layout(num_tokens: int, group: int) -> int:
  """Validates (N, g) and returns M = N / g."""
  if group < 1:
    raise ValueError(f"group size g={group} must be >= 1")
  if num_tokens % group:
    raise ValueError(f"token count N={num_tokens} is not divisible by the group size g={group}")
  if num_tokens < 2 * group:
    raise ValueError(f"token count N={num_tokens} must be at least 2 groups (2 x g = {2 * group})")
  return num_tokens // group


def group_causal_mask(num_tokens: int, group: int, causal_num: int | None = None) -> np.ndarray:
  """Boolean [N, N] "may attend": rows i < causal_num causal (j <= i); rows i >= causal_num see j iff
  i // g >= j // g (bidirectional inside a block of g sequence positions, causal across blocks)."""
  c = group if causal_num is None else causal_num
  i = np.arange(num_tokens)[:, None]
  j = np.arange(num_tokens)[None, :]
  return np.where(i < c, j <= i, (i // group) >= (j // group))


def check_causal_num(num_tokens: int, group: int, causal_num: int | None) -> int:
  """c (None -> g): the number of leading codes decoded one by one.  The reference asserts
  c % g == 0 (autoregressive/models/gpt.py) and c < N; c <= N - g keeps one parallel group."""
  check_layout(num_tokens, group)
  c = group if causal_num is None else int(causal_num)
  if c < 0 or c % group or c > num_tokens - group:
    raise ValueError(f"causal_num={causal_num}: expected a multiple of the group size g={group} "
                     f"in 0..N-g={num_tokens - group} (0 = all groups parallel)")
  return c


def sequence_layout(num_tokens: int, group: int,
                    causal_num: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(kind [N], index [N]): what sits at each input position.

  kind 0 = class token, 1 = code z_index, 2 = placeholder spe_index."""
  n, g = num_tokens, group
  c = check_causal_num(n, g, causal_num)
  kind = np.full(n, KIND_CODE, np.int32)
  index = np.zeros(n, np.int32)
  kind[0] = KIND_CLASS
  index[1:c + 1] = np.arange(c)                      # z_0 .. z_{c-1}
  kind[c + 1:c + g] = KIND_PLACEHOLDER
  index[c + 1:c + g] = np.arange(g - 1)              # spe_0 .. spe_{g-2}
  index[c + g:] = np.arange(c, n - g)                # z_c .. z_{N-g-1}
  return kind, index


def code_position(k: int, num_tokens: int, group: int, causal_num: int | None = None) -> int:
  """Input position of code z_k (-1 for the last g codes, which are targets only)."""
  c = check_causal_num(num_tokens, group, causal_num)
  if k < c:
    return k + 1
  return k + group if k < num_tokens - group else -1


def next_detail_inputs(codes, group: int):
  """Codes [..., N] -> the codes the model reads, z_0..z_{N-g-1} ([..., N - g])."""
  n = codes.shape[-1]
  check_layout(n, group)
  return codes[..., :n - group]


def next_detail_targets(codes):
  """Codes [..., N] -> targets of positions 0..N-1: position p predicts z_p."""
  return codes


def layout_ids(codes_in, num_tokens: int, group: int, causal_num: int | None = None):
  """Model-input codes [B, N-g] -> position-aligned ids [B, N] (0 at class/placeholder slots);
  continuous tokens [B, N-g, C] -> [B, N, C] alike."""
  n, g = num_tokens, group
  c = check_causal_num(n, g, causal_num)
  if codes_in.shape[1] != n - g:
    raise ValueError(f"expected {n - g} input codes (N={n} - g={g}), got {codes_in.shape[1]}")
  b = codes_in.shape[0]
  zeros = lambda k: jnp.zeros((b, k) + codes_in.shape[2:], codes_in.dtype)
  return jnp.concatenate([zeros(1), codes_in[:, :c], zeros(g - 1), codes_in[:, c:]], axis=1)


def drop_labels(rng, labels, rate: float, null_class: int):
  """Classifier-free-guidance label dropout: each label becomes `null_class` with prob `rate`."""
  if rate <= 0.0:
    return labels
  drop = jax.random.bernoulli(rng, rate, labels.shape)
  return jnp.where(drop, null_class, labels)


def self_correction_mix(rng, clean, ar_input, ar_label, prob: float):
  """Per sequence with probability `prob` the self-correction pair (input ar_input, target
  ar_label), else (clean, clean).  Returns (codes whose first N-g feed the model, targets, chosen)."""
  chosen = jax.random.bernoulli(rng, prob, clean.shape[:1])
  codes = jnp.where(chosen[:, None], ar_input, clean)
  targets = jnp.where(chosen[:, None], ar_label, clean)
  return codes, targets, chosen


def check_tokenizer_pair(tokenizer_tokens: int, tokenizer_vocab: int, ar_tokens: int,
                         ar_vocab: int, tokenizer_causal: int | None = None,
                         ar_causal: int | None = None) -> None:
  """A tokenizer and an AR model must agree on N and the codebook size (and, when both are given,
  on causal_num c: a tokenizer trained with every group parallel orders its tokens for that)."""
  if int(tokenizer_tokens) != int(ar_tokens) or int(tokenizer_vocab) != int(ar_vocab):
    raise ValueError(f"tokenizer/AR mismatch: tokenizer has N={tokenizer_tokens} tokens and vocab "
                     f"{tokenizer_vocab}, the AR model N={ar_tokens} and vocab {ar_vocab}")
  if None not in (tokenizer_causal, ar_causal) and int(tokenizer_causal) != int(ar_causal):
    raise ValueError(f"tokenizer/AR mismatch: the tokenizer has causal_num={tokenizer_causal}, the "
                     f"AR model causal_num={ar_causal} (config.model.causal_num; the codes "
                     f"file records the tokenizer's)")


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------

class NextDetailTransformer(nn.Module):
  """LlamaGen-style class-conditional decoder with DetailFlow's next-detail layout.

  __call__(ids, labels, start=0, train=False, decode=False):
    ids     [B, q] int  position-aligned code ids of positions start..start+q-1 (values at the class
                        and placeholder positions are ignored; use `layout_ids` for training codes)
    labels  [B]    int  class ids; `num_classes` is the null (unconditional) class
    decode  True: append the q positions to the KV cache (collection 'cache', init with a length-N
            call) and attend to everything cached; False: full forward over positions 0..q-1
            (start must be 0) with the group-causal mask.
  Returns logits [B, q, vocab] in fp32.

  token_dim > 0 makes it the trunk of next-detail *diffusion* (`next_detail_diffusion`): `ids` are
  continuous tokens [B, q, token_dim] (zeros at the class/placeholder slots), read through a linear
  projection instead of the token table, and the output is the final RMS-normed hidden state
  [B, q, dim] (the condition of the diffusion head) instead of logits.
  """
  vocab_size: int = 8192
  num_tokens: int = 128
  group_size: int = 8
  num_classes: int = 1000
  dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_dim: int = 2816
  rope_base: float = 10000.0
  token_dim: int = 0              # > 0: continuous tokens in, hidden states out (see above)
  causal_num: int | None = None   # c, codes decoded one by one (None = g; 0 = all groups parallel)
  class_dropout: float = 0.1      # label dropout for CFG (train only)
  token_dropout: float = 0.1      # on the whole input embedding (class and placeholders included)
  dropout: float = 0.1            # residual dropout after attention and inside the SwiGLU FFN
  scan: bool = True
  remat: str = "none"
  # tdjax.nn.Attention.impl ('auto' | 'einsum' | 'blocked' | 'fused' | 'cudnn') for the full
  # forward; KV-cache decoding always takes the einsum path (its cache mask)
  attention_impl: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def null_class(self) -> int:
    return self.num_classes

  @property
  def num_groups(self) -> int:
    return check_layout(self.num_tokens, self.group_size)

  @property
  def c(self) -> int:
    return check_causal_num(self.num_tokens, self.group_size, self.causal_num)

  def validate(self) -> None:
    check_layout(self.num_tokens, self.group_size)
    if self.causal_num is not None and self.token_dim:
      raise ValueError("causal_num is a setting of the discrete next-detail AR; next-detail "
                       "diffusion decodes its first group token by token (c = g)")
    try:
      check_causal_num(self.num_tokens, self.group_size, self.causal_num)
    except ValueError as e:
      raise ValueError(f"config.model.{e}") from None
    for key in ("vocab_size", "num_classes", "dim", "depth", "num_heads", "mlp_dim"):
      if getattr(self, key) < 1:
        raise ValueError(f"config.model.{key}={getattr(self, key)}: expected >= 1")
    if not 0 <= self.class_dropout <= 1:
      raise ValueError(f"config.model.class_dropout={self.class_dropout}: expected a probability "
                       f"in [0, 1]")
    for key in ("token_dropout", "dropout"):
      if not 0 <= getattr(self, key) < 1:
        raise ValueError(f"config.model.{key}={getattr(self, key)}: expected a probability in "
                         f"[0, 1)")
    if self.dim % self.num_heads:
      raise ValueError(f"config.model.dim={self.dim} is not divisible by config.model.num_heads="
                       f"{self.num_heads}")
    if (self.dim // self.num_heads) % 4:
      raise ValueError(f"config.model: head_dim={self.dim // self.num_heads} (dim / num_heads) "
                       f"must be a multiple of 4 (2D RoPE)")

  def rope(self):
    """(cos, sin) [N, head_dim / 2] of positions 0..N-1 (zero at the class token)."""
    m, g = self.num_tokens // self.group_size, self.group_size
    cos, sin = rope_2d_grid(m, g, self.dim // self.num_heads, self.rope_base, cls_token_num=1)
    return cos[:self.num_tokens], sin[:self.num_tokens]

  @nn.compact
  def __call__(self, ids, labels, *, start=0, train: bool = False, decode: bool = False):
    self.validate()
    n, g = self.num_tokens, self.group_size
    b, q = ids.shape[:2]
    if not decode and (not isinstance(start, int) or start != 0 or q > n):
      raise ValueError(f"a full forward covers positions 0..q-1 with q <= N={n}; got start={start}, "
                       f"q={q} (use decode=True with a cache for later chunks)")
    kind_all, index_all = (jnp.asarray(a) for a in sequence_layout(n, g, self.causal_num))
    kind = jax.lax.dynamic_slice_in_dim(kind_all, start, q)
    spe_index = jnp.clip(jax.lax.dynamic_slice_in_dim(index_all, start, q), 0, max(g - 2, 0))

    init = nn.initializers.normal(0.02)
    cls_table = self.param("cls_embedding", _lp(init, ("classes", "embed")),
                           (self.num_classes + 1, self.dim), self.param_dtype)
    if not self.token_dim:
      tok_table = self.param("tok_embeddings", _lp(init, ("vocab", "embed")),
                             (self.vocab_size, self.dim), self.param_dtype)
    spe_table = self.param("spe_tok_embeddings", _lp(init, ("length", "embed")),
                           (max(g - 1, 1), self.dim), self.param_dtype)   # unused when g = 1

    if train and self.class_dropout > 0:
      labels = drop_labels(self.make_rng("dropout"), labels, self.class_dropout, self.null_class)
    if self.token_dim:
      if ids.shape[-1] != self.token_dim:
        raise ValueError(f"continuous tokens of width {ids.shape[-1]}, the model has "
                         f"token_dim={self.token_dim}")
      x_tok = nn.Dense(self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                       kernel_init=_lp(nn.initializers.xavier_uniform(), ("channels", "embed")),
                       bias_init=_lp(nn.initializers.zeros, ("embed",)),
                       name="tok_proj")(ids.astype(self.dtype))              # [B, q, D]
    else:
      x_tok = jnp.take(tok_table, ids, axis=0)                         # [B, q, D]
    x_spe = jnp.take(spe_table, spe_index, axis=0)[None]               # [1, q, D]
    x_cls = jnp.take(cls_table, labels, axis=0)[:, None]               # [B, 1, D]
    k = kind[None, :, None]
    x = jnp.where(k == KIND_CODE, x_tok, jnp.where(k == KIND_PLACEHOLDER, x_spe, x_cls))
    x = x.astype(self.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = nn.Dropout(self.token_dropout)(x, deterministic=not train)

    cos, sin = self.rope()
    rope = (jax.lax.dynamic_slice_in_dim(cos, start, q), jax.lax.dynamic_slice_in_dim(sin, start, q))
    mask = None if decode else jnp.asarray(group_causal_mask(n, g, self.c)[:q, :q])
    x = TransformerStack(self.depth, llama_block_kwargs(self.num_heads, self.mlp_dim,
                                                        dropout_rate=self.dropout,
                                                        attention_impl=self.attention_impl),
                         scan=self.scan, remat=self.remat, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="transformer")(
                             x, mask=mask, rope=rope, decode=decode, deterministic=not train)
    x = RMSNorm(1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    if self.token_dim:
      return x.astype(jnp.float32)
    logits = nn.Dense(self.vocab_size, use_bias=False, dtype=self.dtype,
                      param_dtype=self.param_dtype,
                      kernel_init=_lp(nn.initializers.zeros, ("embed", "vocab")), name="output")(x)
    return logits.astype(jnp.float32)


def model_from_config(model_config, dtype=jnp.float32) -> NextDetailTransformer:
  """`config.model` (size, or explicit depth/dim/...) -> the module; validates N, g, widths."""
  m = dict(model_config)
  size = m.pop("size", None)
  if size and size not in GPT_SIZES:
    raise ValueError(f"model.size={size!r}: expected one of {sorted(GPT_SIZES)}")
  sized = dict(GPT_SIZES[size]) if size else {}
  model = configlib.from_config(NextDetailTransformer, dict(sized, **m), "config.model",
                                dtype=jnp.dtype(dtype))
  model.validate()
  return model


def example_ids(model: NextDetailTransformer, batch: int):
  """Zero inputs of a full sequence: int ids [B, N], or continuous tokens [B, N, token_dim]."""
  if model.token_dim:
    return jnp.zeros((batch, model.num_tokens, model.token_dim), jnp.float32)
  return jnp.zeros((batch, model.num_tokens), jnp.int32)


def init_params(model: NextDetailTransformer, rng, batch: int = 1):
  """Boxed (logically partitioned) params from a batch of zeros."""
  ids = example_ids(model, batch)
  labels = jnp.zeros((batch,), jnp.int32)
  return model.init({"params": rng}, ids, labels)["params"]


def init_cache(model: NextDetailTransformer, params, batch: int):
  """Zeroed fixed-size KV cache ([B, N, H, head_dim] per layer) for `batch` sequences."""
  ids = example_ids(model, batch)
  labels = jnp.zeros((batch,), jnp.int32)
  shapes = jax.eval_shape(
      lambda p: model.apply({"params": p}, ids, labels, decode=True, mutable=["cache"])[1]["cache"],
      params)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------

def num_forward_passes(num_tokens: int, group: int, causal_num: int | None = None) -> int:
  """c + M - c/g: c single-token steps, then one step per remaining group (c = g: g + M - 1, 23
  for N=128, g=8; c = 0: M)."""
  c = check_causal_num(num_tokens, group, causal_num)
  return c + check_layout(num_tokens, group) - c // group


def filter_logits(logits, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
  """Temperature, then top-k (0 or >= vocab: off), then nucleus top-p (1.0: off) on [..., V]."""
  logits = logits / temperature
  v = logits.shape[-1]
  neg = jnp.finfo(logits.dtype).min
  if top_k and top_k < v:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if top_p < 1.0:
    srt = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(srt, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs       # mass strictly above each sorted entry
    keep = before < top_p                              # the top entry is always kept
    cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


def draw(key, logits):
  """One categorical draw per row of logits [..., V] by inverse CDF: one uniform per token instead
  of V Gumbel variates (`jax.random.categorical`), which dominated a small model's decode step."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  cdf = jnp.cumsum(probs, axis=-1)
  u = jax.random.uniform(key, logits.shape[:-1] + (1,), jnp.float32) * cdf[..., -1:]
  return jnp.minimum(jnp.sum(cdf <= u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)


CFG_SCHEDULES = ("constant", "linear", "gradual")


def cfg_scale(cfg, schedule: str, tokens_done, num_tokens: int, group: int = 1,
              causal_num: int | None = None):
  """The guidance scale of the step that has `tokens_done` tokens before it.
    'constant': cfg at every step (DetailFlow's default);
    'linear':   1 + (cfg - 1) * tokens_done / N (MAR-style ramp);
    'gradual':  DetailFlow's `gradual_cfg` (autoregressive/models/generate.py): cfg on the first
                c codes' token steps (c = causal_num, None = g), then cfg * (M - i + 1) / (M + 1)
                on the step of group i (i = c/g..M-1, M = N / g groups); it falls below 1 on the
                last groups, as the reference's does."""
  if schedule == "constant":
    return cfg
  if schedule == "linear":
    return 1.0 + (cfg - 1.0) * tokens_done / num_tokens
  if schedule == "gradual":
    m, i = num_tokens // group, tokens_done // group
    c = group if causal_num is None else causal_num
    return jnp.where(tokens_done < c, cfg, cfg * (m - i + 1) / (m + 1))
  raise ValueError(f"cfg_schedule={schedule!r}: expected one of {CFG_SCHEDULES}")


def unrolled_for_decoding(model: NextDetailTransformer, params):
  """A scanned model and its params -> the unrolled equivalent (same function, no remat).

  Decoding runs many small steps; a scan over layers there costs a copy of the stacked KV cache
  per step (about a third of the step time of a small model on CPU)."""
  if not model.scan:
    return model.clone(remat="none"), params
  params = dict(params)
  params["transformer"] = unstack_layers(params["transformer"], model.depth)
  return model.clone(scan=False, remat="none"), params


def _decode(model: NextDetailTransformer, params, labels, rng, cfg, *, guided: bool,
            cfg_schedule: str, temperature: float, top_k: int, top_p: float, use_cache: bool,
            python_loop: bool, counter: list | None):
  model, params = unrolled_for_decoding(model, params)
  n, g, c = model.num_tokens, model.group_size, model.c
  m = model.num_groups
  b = labels.shape[0]
  labels = labels.astype(jnp.int32)
  if guided:
    labels = jnp.concatenate([labels, jnp.full((b,), model.null_class, jnp.int32)])
  rows = labels.shape[0]
  ids = jnp.zeros((rows, n + g), jnp.int32)     # padded: the last group's codes are never inputs
  codes = jnp.zeros((b, n), jnp.int32)
  cache = init_cache(model, params, rows) if use_cache else None

  def forward(ids, cache, start, q):
    if counter is not None:
      counter.append(q)
    if use_cache:
      chunk = jax.lax.dynamic_slice_in_dim(ids, start, q, axis=1)
      logits, mut = model.apply({"params": params, "cache": cache}, chunk, labels, start=start,
                                decode=True, mutable=["cache"])
      return logits, mut["cache"]
    # the passes are unrolled (static start): the prefix up to the last query, not all N positions
    logits = model.apply({"params": params}, ids[:, :start + q], labels)
    return logits[:, start:], cache

  def pick(logits, step, tokens_done):
    if guided:
      cond, uncond = logits[:b], logits[b:]
      logits = uncond + cfg_scale(cfg, cfg_schedule, tokens_done, n, g, c) * (cond - uncond)
    logits = filter_logits(logits, temperature, top_k, top_p)
    return draw(jax.random.fold_in(rng, step), logits)

  def write(ids, codes, tok, first_code, position):
    codes = jax.lax.dynamic_update_slice_in_dim(codes, tok, first_code, axis=1)
    both = jnp.concatenate([tok, tok]) if guided else tok
    ids = jax.lax.dynamic_update_slice_in_dim(ids, both, position, axis=1)
    return ids, codes

  def token_step(k, carry):         # z_k (k < c) from position k; z_k then sits at k + 1
    ids, codes, cache = carry
    logits, cache = forward(ids, cache, k, 1)
    tok = pick(logits, k, k)
    ids, codes = write(ids, codes, tok, k, k + 1)
    return ids, codes, cache

  def group_step(i, carry):         # z_{ig..ig+g-1} from positions ig..ig+g-1; inputs at +g
    ids, codes, cache = carry
    start = i * g
    logits, cache = forward(ids, cache, start, g)
    tok = pick(logits, c + i - c // g, start)       # step keys 0, 1, ... in pass order
    ids, codes = write(ids, codes, tok, start, start + g)
    return ids, codes, cache

  carry = (ids, codes, cache)
  if python_loop or not use_cache:
    for k in range(c):
      carry = token_step(k, carry)
    for i in range(c // g, m):
      carry = group_step(i, carry)
  else:
    carry = jax.lax.fori_loop(0, c, token_step, carry)
    carry = jax.lax.fori_loop(c // g, m, group_step, carry)
  return carry[1]


@functools.lru_cache(maxsize=32)
def _compiled_sampler(model, guided, cfg_schedule, temperature, top_k, top_p, use_cache):
  fn = functools.partial(_decode, model, guided=guided, cfg_schedule=cfg_schedule,
                         temperature=temperature, top_k=top_k, top_p=top_p, use_cache=use_cache,
                         python_loop=False, counter=None)
  return jax.jit(fn)


def validate_sampling(model: NextDetailTransformer, labels, *, cfg, cfg_schedule, temperature,
                      top_k, top_p) -> None:
  if not cfg > 0:
    raise ValueError(f"cfg={cfg} must be > 0 (1.0 = no guidance)")
  if cfg_schedule not in CFG_SCHEDULES:
    raise ValueError(f"cfg_schedule={cfg_schedule!r}: expected one of {CFG_SCHEDULES}")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature} must be > 0")
  if top_k < 0:
    raise ValueError(f"top_k={top_k} must be >= 0 (0 = off)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1.0 = off)")
  if not isinstance(labels, jax.core.Tracer):
    lab = np.asarray(labels)
    if lab.ndim != 1:
      raise ValueError(f"labels must be a 1D array of class ids, got shape {lab.shape}")
    bad = lab[(lab < 0) | (lab >= model.num_classes)]
    if bad.size:
      raise ValueError(f"unknown class id(s) {sorted(set(bad.tolist()))[:5]}: the model has "
                       f"num_classes={model.num_classes} (valid 0..{model.num_classes - 1})")


def sample(model: NextDetailTransformer, params, labels, rng, *, cfg: float = 1.0,
           cfg_schedule: str = "constant", temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, use_cache: bool = True, python_loop: bool = False,
           counter: list | None = None):
  """Codes [B, N] int32 for class `labels` [B] by group-parallel next-detail decoding.

  cfg: logits = uncond + s * (cond - uncond), s from `cfg_schedule` ('constant' or 'linear');
  cfg == 1 runs without the unconditional half.  The step keys are fold_in(rng, step), so the cached
  and recomputing samplers draw the same tokens.  `python_loop=True` unrolls the steps in Python
  (compiled afresh each call) and appends the query length of every forward pass to `counter`;
  `use_cache=False` always unrolls them (one compiled program per model and settings).
  """
  validate_sampling(model, labels, cfg=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
                    top_k=top_k, top_p=top_p)
  guided = float(cfg) != 1.0
  labels = jnp.asarray(labels, jnp.int32)
  cfg = jnp.float32(cfg)
  if python_loop or counter is not None:
    fn = functools.partial(_decode, model, guided=guided, cfg_schedule=cfg_schedule,
                           temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                           use_cache=use_cache, python_loop=True, counter=counter)
    return jax.jit(fn)(params, labels, rng, cfg)
  fn = _compiled_sampler(model, guided, cfg_schedule, float(temperature), int(top_k), float(top_p),
                         bool(use_cache))
  return fn(params, labels, rng, cfg)


def decode_codes(tokenizer, tokenizer_params, codes, *, ar_model: NextDetailTransformer | None = None,
                 res=None, variables: dict | None = None):
  """Sampled codes [B, N] -> images [B, res, res, C] in [-1, 1] with a DetailFlow tokenizer
  (`tdjax.tokenizers.detailflow.DetailFlowTokenizer`; its task's params or their 'gen' subtree).
  Checks that tokenizer and AR model agree on N and the vocabulary."""
  n = codes.shape[-1]
  tok_n, tok_v = int(tokenizer.num_tokens), int(tokenizer.codebook_size)
  if ar_model is not None:
    check_tokenizer_pair(tok_n, tok_v, ar_model.num_tokens, ar_model.vocab_size, tokenizer.c,
                         ar_model.c)
  if n != tok_n:
    raise ValueError(f"tokenizer/AR mismatch: {n} codes per image, the tokenizer has N={tok_n}")
  gen = tokenizer_params["gen"] if "gen" in tokenizer_params else tokenizer_params
  v = {"params": gen, **(variables or {})}
  z_q = tokenizer.apply(v, jnp.asarray(codes, jnp.int32), method="lookup")
  return jnp.clip(tokenizer.apply(v, z_q, res, method="decode"), -1.0, 1.0)


# ------------------------------------------------------------------------------------------------
# Benchmark
# ------------------------------------------------------------------------------------------------

def benchmark_cache_vs_recompute(num_tokens: int = 128, group: int = 8, dim: int = 64,
                                 depth: int = 2, num_heads: int = 4, vocab_size: int = 512,
                                 batch: int = 8, cfg: float = 1.5, repeats: int = 5,
                                 seed: int = 0, scan: bool = True, verbose: bool = True) -> dict:
  """Wall time of the KV-cached and the recomputing sampler (both jit-compiled, compile excluded,
  best of `repeats`) on this machine; returns {'cache_s', 'recompute_s', 'speedup', ...}."""
  model = NextDetailTransformer(vocab_size=vocab_size, num_tokens=num_tokens, group_size=group,
                                num_classes=10, dim=dim, depth=depth, num_heads=num_heads,
                                mlp_dim=llama_ffn_hidden(dim, 16), scan=scan)
  key = jax.random.key(seed)
  params = nn.unbox(init_params(model, key))
  # a non-zero head so the sampled tokens depend on the inputs (the trained-model situation)
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(key, p.shape, p.dtype), params)
  labels = np.arange(batch) % 10
  runs = {use_cache: (lambda c=use_cache: jax.block_until_ready(
      sample(model, params, labels, key, cfg=cfg, use_cache=c))) for use_cache in (True, False)}
  outs = {c: run() for c, run in runs.items()}          # compile
  times = {True: float("inf"), False: float("inf")}
  for _ in range(repeats):                              # interleaved: both see the same load
    for c, run in runs.items():
      t0 = time.perf_counter()
      run()
      times[c] = min(times[c], time.perf_counter() - t0)
  result = dict(num_tokens=num_tokens, group=group, dim=dim, depth=depth, batch=batch,
                forward_passes=num_forward_passes(num_tokens, group), cache_s=times[True],
                recompute_s=times[False], speedup=times[False] / times[True],
                same_tokens=bool(np.array_equal(np.asarray(outs[True]), np.asarray(outs[False]))))
  if verbose:
    print(f"next-detail sampling N={num_tokens} g={group} dim={dim} depth={depth} batch={batch} "
          f"cfg={cfg}: cache {result['cache_s'] * 1e3:.1f} ms, recompute "
          f"{result['recompute_s'] * 1e3:.1f} ms, speed-up x{result['speedup']:.1f}, "
          f"same tokens: {result['same_tokens']}")
  return result


if __name__ == "__main__":
  benchmark_cache_vs_recompute()

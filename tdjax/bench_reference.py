r"""tdjax against the reference PyTorch code on the same CPU (issue 48's table), as a command:

  TDJAX_REFERENCE_REPOS=$REFS python -m tdjax.bench_reference [--refs $REFS] [--threads 2] \
      [--reps 0] [--rounds 2] [--only transdiff_decoder,gpt_train] [--out bench_reference.json]

$REFS holds checkouts of ByteFlow-AI/DetailFlow, TransDiff/TransDiff (and LTH14/mar), as for
tests/test_reference_repos.py; their model files are imported from there at run time (nothing of
theirs is copied here).  It needs torch, and for the TransDiff rows diffusers, for the tokenizer
row transformers 4.49-4.53; without them it exits with status 2 and one line naming what is
missing.  `import tdjax` never imports torch: this module imports it inside `main`.

Each measure builds the reference module at the configuration of the issue's table and tdjax's
equivalent with the same parameter count (checked: the command stops if they differ), converting
the reference's weights with `tdjax.convert` so that both compute the same function.  Then, per
round, it times the reference and tdjax one after the other (the order swaps every round), each
`reps` times after warm-up calls (compile time excluded; reported apart), and keeps the median of
each side's round; the figure is the median over rounds.  The 1-minute load average is read before
and after every timed block.  Both sides run float32 on the same `--threads` CPU cores: the process
is pinned to that many cores (sched_setaffinity, before XLA and torch start their thread pools:
XLA's CPU client sizes its pools by the schedulable cores), `torch.set_num_threads(n)`, and with
n = 1 also XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1.

A train step on both sides is the loss, its gradient and an AdamW update (lr 1e-4, betas 0.9 /
0.95, weight decay 0.02): the reference's `loss.backward(); opt.step()` with torch.optim.AdamW,
tdjax's task loss under `jax.value_and_grad` + optax.adamw in one jitted function (no EMA, no
gradient clipping on either side).  Samplers run under torch.no_grad / one jitted function.  What
the issue's rows leave open is set in TD, GPT and TOK below (10 classes, TransDiff buffer 64, CFG
1.3 / 1.45, the tokenizer's 2 + 2 layers of 4 heads, g 4, codebook 1024 x 8) and written to the
JSON with each row.  The weights are the reference's own initialisation plus N(0, 0.02^2) (its
zero-initialised adaLN and final layers made non-zero); the decoder and GPT rows also check, after
warm-up, that both sides give the same outputs (`outputs_agree` in the JSON).

Timings are only meaningful with the cores otherwise idle: under load torch's OpenMP threads spin
while they wait for each other, and an oversubscribed 2-thread reference runs many times slower
than alone (tdjax much less so), which overstates tdjax's lead.

The reference is CUDA / autocast code; three adaptations let it run in float32 on the CPU without
touching its arithmetic beyond precision (as in tests/test_reference_transdiff.py): its
TimestepEmbedder's bfloat16 cast sees float32, `Tensor.cuda()` is the identity, and MRAR's
bfloat16 block-causal mask is cast to float32.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import copy
import random
from functools import partial
from typing import Callable
from unittest import mock

# jax is imported here but starts its CPU client (and sizes its thread pools) only at the first
# computation, after `main` has pinned the process: nothing below computes at import time
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdjax import configlib, convert, runs
from tdjax.generators import next_detail as nd
from tdjax.tasks.next_detail import NextDetailTask
from tdjax.tasks.transdiff import TransDiffTask

PROG = "python -m tdjax.bench_reference"
BATCH = 8
# name: (the row, default reps per round, the packages its reference needs)
MEASURES = {
    "transdiff_train": ("TransDiff 1-step train step (width 128, 4 AR + 2 decoder blocks, 256 x 16 "
                        "latents, mul 4)", 10, ("diffusers", "timm")),
    "transdiff_decoder": ("TransDiff decoder forward (x_t 8x256x16, z 8x256x128)", 10,
                          ("diffusers", "timm")),
    "transdiff_sample": ("TransDiff 1-step sampling, 10 Euler-Maruyama steps, CFG", 3,
                         ("diffusers", "timm")),
    "mrar_train": ("TransDiff MRAR train step (4 images, mul 2)", 10, ("diffusers", "timm")),
    "mrar_sample": ("TransDiff MRAR sampling, 4 rounds x 10 steps, CFG", 3, ("diffusers", "timm")),
    "gpt_train": ("DetailFlow GPT train step (N 128, g 8, dim 256, 4 layers, vocab 1024)", 10, ()),
    "gpt_sample_cache": ("DetailFlow GPT sampling, 23 passes, KV cache (reference has none)", 3,
                         ()),
    "gpt_sample_recompute": ("DetailFlow GPT sampling, 23 passes, tdjax's recompute path", 3, ()),
    "tokenizer_train": ("DetailFlow tokenizer train step (32 px, patch 8, N 16, width 64), with "
                        "self-correction", 10, ("transformers", "timm")),
}

# TransDiff: width 128, 4 heads, AR 2 x 2 blocks, decoder 2 blocks, 16 x 16 x 16 latents
TD = dict(width=128, heads=4, enc_depth=2, dec_depth=2, channels=16, grid=16, classes=10,
          buffer=64)
TD_SAMPLING = dict(steps=10, cfg=1.3, one_step=(0.89, 0.95), mrar=(0.925, 0.95))
# DetailFlow GPT (the reference's multiple_of 256: SwiGLU hidden 768)
GPT = dict(tokens=128, group=8, dim=256, layers=4, heads=4, vocab=1024, classes=10, cfg=1.45,
           correction_prob=0.5)
# DetailFlow tokenizer: SigLIP2 encoder / decoder 2 layers x 64 wide, 4 heads (MLP 256)
TOK = dict(image=32, patch=8, tokens=16, group=4, codebook=1024, code_dim=8, layers=2, width=64,
           heads=4)
ADAMW = dict(lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.02)


class Missing(Exception):
  """A dependency or checkout the comparison needs is absent (exit status 2)."""


# ------------------------------------------------------------------------------------------------
# Threads, timing
# ------------------------------------------------------------------------------------------------

def set_threads(n: int) -> dict:
  """Pins this process to n cores and sets the XLA flags, before jax or torch start (returns what
  was set, for the JSON)."""
  cores = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, set(cores[:n]))
  flags = os.environ.get("XLA_FLAGS", "")
  if n == 1:
    flags = (flags + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    os.environ["XLA_FLAGS"] = flags
  os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(n)
  os.environ["JAX_PLATFORMS"] = "cpu"
  return {"threads": n, "cpu_affinity": cores[:n], "XLA_FLAGS": flags,
          "OMP_NUM_THREADS": str(n), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", ""),
          "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", "")}


@dataclasses.dataclass
class Pair:
  """One measure: a call of each side (each waits for its result) and their parameter counts."""
  ref: Callable[[], object]
  tdjax: Callable[[], object]
  ref_params: int
  tdjax_params: int
  config: dict
  warmup: int = 2
  check: Callable[[], dict] | None = None     # after warm-up: how far apart the two outputs are


def _timed(fn, reps: int) -> tuple[list[float], tuple[float, float]]:
  load0 = os.getloadavg()[0]
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times, (load0, os.getloadavg()[0])


def measure(name: str, pair: Pair, reps: int, rounds: int, log=print) -> dict:
  if pair.ref_params != pair.tdjax_params:
    raise AssertionError(f"{name}: the reference has {pair.ref_params:,} parameters, tdjax "
                         f"{pair.tdjax_params:,}: not the same model")
  warm = {}
  for side, fn in (("reference", pair.ref), ("tdjax", pair.tdjax)):
    t0 = time.perf_counter()
    for _ in range(pair.warmup):        # compile (tdjax), allocator / first-call costs (both)
      fn()
    warm[side] = time.perf_counter() - t0
  agree = pair.check() if pair.check else None
  out = {"title": MEASURES[name][0], "config": pair.config, "reps": reps, "rounds": rounds,
         "params": {"reference": pair.ref_params, "tdjax": pair.tdjax_params},
         "warmup_seconds": warm, "outputs_agree": agree, "times": {"reference": [], "tdjax": []},
         "load": {"reference": [], "tdjax": []}}
  for r in range(rounds):
    order = (("reference", pair.ref), ("tdjax", pair.tdjax))
    for side, fn in order if r % 2 == 0 else order[::-1]:
      times, load = _timed(fn, reps)
      out["times"][side].append(times)
      out["load"][side].append(load)
  for side in ("reference", "tdjax"):
    out[f"{side}_seconds"] = statistics.median(statistics.median(t) for t in out["times"][side])
  out["ratio"] = out["reference_seconds"] / out["tdjax_seconds"]
  loads = [x for side in out["load"].values() for pair_ in side for x in pair_]
  out["load_range"] = [min(loads), max(loads)]
  log(f"{name}: reference {_fmt(out['reference_seconds'])}, tdjax {_fmt(out['tdjax_seconds'])}, "
      f"x{out['ratio']:.2f}, load {out['load_range'][0]:.2f}-{out['load_range'][1]:.2f} "
      f"(warm-up: reference {warm['reference']:.1f} s, tdjax {warm['tdjax']:.1f} s)")
  return out


def _fmt(sec: float) -> str:
  return f"{sec:.2f} s" if sec >= 1 else f"{sec * 1e3:.1f} ms"


def markdown_table(results: dict) -> str:
  lines = ["| measure (reference config, batch 8) | reference | tdjax | reference / tdjax | load |",
           "|---|---|---|---|---|"]
  for name, r in results.items():
    lo, hi = r["load_range"]
    lines.append(f"| {r['title']} | {_fmt(r['reference_seconds'])} | {_fmt(r['tdjax_seconds'])} | "
                 f"{r['ratio']:.2f} | {lo:.2f}-{hi:.2f} |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The reference side: imports from the checkouts, CPU / float32 adaptations
# ------------------------------------------------------------------------------------------------


def import_from_checkout(refs: str, repo: str, name: str):
  """Module `name` imported from the checkout refs/`repo` (FileNotFoundError without one).  The
  checkouts share top-level names (`models`, `util`): modules of those names imported from another
  checkout are dropped first."""
  root = os.path.abspath(os.path.join(refs, repo))
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{root}: no checkout of the reference repository {repo}")
  tops = {os.path.splitext(n)[0] for n in os.listdir(root)}
  for mod in [m for m in sys.modules if m.split(".")[0] in tops]:
    where = getattr(sys.modules[mod], "__file__", None) or ""
    if where and not os.path.abspath(where).startswith(root + os.sep):
      del sys.modules[mod]
  if root in sys.path:
    sys.path.remove(root)
  sys.path.insert(0, root)
  return importlib.import_module(name)


class Env:
  """torch, the reference checkouts and the imported tdjax / jax modules of one run."""

  def __init__(self, refs: str):
    import torch
    self.torch = torch
    self.refs = refs
    torch.Tensor.cuda = lambda self, *a, **k: self       # the reference's .cuda() calls
    self._pairs = {}

  def module(self, repo: str, name: str):
    """`name` imported from the checkout refs/`repo`; the checkouts share top-level names
    (`models`, `util`): those imported from another checkout are dropped first."""
    try:
      return import_from_checkout(self.refs, repo, name)
    except FileNotFoundError as e:
      raise Missing(str(e)) from None

  def count(self, module) -> int:
    return int(sum(p.numel() for p in module.parameters()))

  def state_dict(self, module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}

  def adamw(self, module):
    return self.torch.optim.AdamW(module.parameters(), lr=ADAMW["lr"],
                                  betas=(ADAMW["b1"], ADAMW["b2"]),
                                  weight_decay=ADAMW["weight_decay"])

  def perturb(self, module, seed: int, scale: float = 0.02):
    """Every parameter + N(0, scale^2): the reference's zero-initialised layers (adaLN, final
    layers) made non-zero, so that the outputs depend on every weight."""
    g = self.torch.Generator().manual_seed(seed)
    with self.torch.no_grad():
      for p in module.parameters():
        p.add_(scale * self.torch.randn(p.shape, generator=g))
    return module

  def cached(self, key, build):
    if key not in self._pairs:
      self._pairs[key] = build()
    return self._pairs[key]


class _TorchView:
  """A reference module's `torch` with some attributes replaced (its bfloat16 cast -> float32)."""

  def __init__(self, torch, **overrides):
    self._torch = torch
    self.__dict__.update(overrides)

  def __getattr__(self, name):
    return getattr(self._torch, name)


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _jax_train_step(loss_fn, params):
  """jit(params, opt_state, batch, rng -> params', opt_state', loss) with optax AdamW; returns
  (a call that runs one step and waits, the tdjax param count)."""
  opt = optax.adamw(ADAMW["lr"], b1=ADAMW["b1"], b2=ADAMW["b2"],
                    weight_decay=ADAMW["weight_decay"])
  params = jax.tree.map(jnp.array, params)           # a copy: the step donates it

  @partial(jax.jit, donate_argnums=(0, 1))
  def step(params, opt_state, batch, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  state = [params, opt.init(params), 0]

  def run(batch):
    p, o, i = state
    p, o, loss = step(p, o, batch, jax.random.key(i))
    jax.block_until_ready(loss)
    state[:] = [p, o, i + 1]
  return run, _count(params)


def _ref_train_step(env, module, loss_fn):
  """One reference step: loss_fn(module) in train mode, backward, AdamW; on a copy of `module`
  (the samplers' rows keep the weights tdjax got)."""
  module = copy.deepcopy(module)
  opt = env.adamw(module)

  def run():
    module.train()
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(module)
    loss.backward()
    opt.step()
  return run


# ------------------------------------------------------------------------------------------------
# TransDiff (models/transdiff.py, transdiff_mrar.py, diffdecoder.py, samplers.py)
# ------------------------------------------------------------------------------------------------

def _transdiff_pair(env: Env, mrar: bool):
  """(reference Transdiff, tdjax TransDiffTask, converted params) at TD's sizes."""
  def build():
    torch = env.torch
    dd = env.module("TransDiff", "models.diffdecoder")
    dd.torch = _TorchView(torch, bfloat16=torch.float32)
    mod = env.module("TransDiff", "models.transdiff_mrar" if mrar else "models.transdiff")
    torch.manual_seed(0)
    ref = mod.Transdiff(img_size=256, encoder_embed_dim=TD["width"], encoder_depth=TD["enc_depth"],
                        encoder_num_heads=TD["heads"], decoder_embed_dim=TD["width"],
                        decoder_depth=TD["dec_depth"], decoder_num_heads=TD["heads"],
                        vae_embed_dim=TD["channels"], class_num=TD["classes"], attn_dropout=0.0,
                        proj_dropout=0.0, diffusion_batch_mul=2 if mrar else 4,
                        patch_size=2 if mrar else 1, buffer_size=TD["buffer"],
                        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    env.perturb(ref, seed=1)
    if mrar:
      ref.attention_mask = ref.attention_mask.float()
    cfg = configlib.load_config("transdiff", "size=tiny" + (",mrar=True,refs=3" if mrar else ""))
    cfg.latent.update(dict(kind="cached", grid=TD["grid"], channels=TD["channels"]))
    cfg.model.update(dict(num_classes=TD["classes"], buffer_size=TD["buffer"],
                          batch_mul=2 if mrar else 4, ar_depth=2 * TD["enc_depth"],
                          width=TD["width"], num_heads=TD["heads"]))
    cfg.head.update(dict(depth=TD["dec_depth"], width=TD["width"], num_heads=TD["heads"]))
    task = TransDiffTask(cfg)
    expected = jax.eval_shape(lambda: nn.unbox(task.init(jax.random.key(0))[0]))
    params = jax.tree.map(jnp.asarray, convert.transdiff_params(env.state_dict(ref), expected,
                                                                TD["heads"]))
    return ref, task, params
  return env.cached(("transdiff", mrar), build)


def _td_config(mrar: bool) -> dict:
  return dict(TD, batch=BATCH, batch_mul=2 if mrar else 4, mrar=mrar,
              images_per_example=4 if mrar else 1)


def _td_latents(b, k=None, seed=0):
  shape = (b,) + ((k,) if k else ()) + (TD["grid"], TD["grid"], TD["channels"])
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def transdiff_train(env: Env, mrar: bool = False) -> Pair:
  torch = env.torch
  ref, task, params = _transdiff_pair(env, mrar)
  lat = _td_latents(BATCH, 4 if mrar else None)
  labels = np.arange(BATCH) % TD["classes"]
  # the cached-latent batch: posterior moments with logvar -1e4 (std exactly 0: x itself)
  moments = np.concatenate([lat, np.full_like(lat, -1e4)], -1)
  batch = {"moments": jnp.asarray(moments), "label": jnp.asarray(labels)}
  jax_step, n_jax = _jax_train_step(lambda p, b, rng: task.loss(p, {}, b, rng, 0)[0], params)
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, -3)))
  t_labels = torch.from_numpy(labels)
  if mrar:
    imgs = [nchw(lat[:, k]) for k in range(4)]
    ref_loss = lambda m: m(*imgs, t_labels)
  else:
    x = nchw(lat)
    ref_loss = lambda m: m(x, t_labels)
  return Pair(_ref_train_step(env, ref, ref_loss), lambda: jax_step(batch), env.count(ref), n_jax,
              _td_config(mrar))


def transdiff_decoder(env: Env) -> Pair:
  torch = env.torch
  ref, task, params = _transdiff_pair(env, False)
  net = ref.diffdecoder.net.eval()
  L = TD["grid"] ** 2
  rng = np.random.default_rng(1)
  x = rng.normal(size=(BATCH, L, TD["channels"])).astype(np.float32)
  z = rng.normal(size=(BATCH, L, TD["width"])).astype(np.float32)
  t = rng.uniform(size=BATCH).astype(np.float32)
  tx, tz, tt = torch.from_numpy(x), torch.from_numpy(z), torch.from_numpy(t * 1000)

  def ref_call():
    with torch.no_grad():
      return net(tx, tz, tt)
  fwd = jax.jit(lambda p, x, t, z: task._head({"head": p}, x, t, z))
  head, jx, jt, jz = params["head"], jnp.asarray(x), jnp.asarray(t), jnp.asarray(z)
  jax_call = lambda: fwd(head, jx, jt, jz).block_until_ready()

  def check():           # the converted weights: the same velocities (float32 round-off apart)
    want, got = ref_call().numpy(), np.asarray(jax_call())
    return {"max_abs_diff": float(np.abs(want - got).max()),
            "max_abs_reference": float(np.abs(want).max())}
  return Pair(ref_call, jax_call, env.count(net), _count(head),
              dict(TD, batch=BATCH, x_t=list(x.shape), z=list(z.shape)), check=check)


def transdiff_sample(env: Env, mrar: bool = False) -> Pair:
  torch = env.torch
  ref, task, params = _transdiff_pair(env, mrar)
  s0, s1 = TD_SAMPLING["mrar" if mrar else "one_step"]
  steps, cfg = TD_SAMPLING["steps"], TD_SAMPLING["cfg"]
  labels = np.arange(BATCH) % TD["classes"]
  t_labels = torch.from_numpy(labels)

  def ref_call():
    ref.eval()
    with torch.no_grad():
      ref.samples(t_labels, num_sampling_steps=steps, cfg=cfg, scale_0=s0, scale_1=s1)
  fn = jax.jit(lambda p, lab, rng: task.sample_latents(p, lab, rng, cfg=cfg, steps=steps,
                                                       scale_0=s0, scale_1=s1))
  j_labels = jnp.asarray(labels)
  return Pair(ref_call, lambda: fn(params, j_labels, jax.random.key(0)).block_until_ready(),
              env.count(ref), _count(params),
              dict(_td_config(mrar), steps=steps, cfg=cfg, scale_0=s0, scale_1=s1,
                   rounds=4 if mrar else 1), warmup=1)


# ------------------------------------------------------------------------------------------------
# DetailFlow GPT (autoregressive/models/gpt.py, generate.py; train/train_c2i.py's input pairs)
# ------------------------------------------------------------------------------------------------

def _gpt_pair(env: Env):
  def build():
    torch = env.torch
    gpt = env.module("DetailFlow", "autoregressive.models.gpt")
    args = gpt.ModelArgs(dim=GPT["dim"], n_layer=GPT["layers"], n_head=GPT["heads"],
                         vocab_size=GPT["vocab"], num_classes=GPT["classes"],
                         block_size=GPT["tokens"], group_size=GPT["group"], causal_num=None,
                         cls_token_num=1, token_dropout_p=0.0, resid_dropout_p=0.0,
                         ffn_dropout_p=0.0, class_dropout_prob=0.1)
    torch.manual_seed(0)
    ref = env.perturb(gpt.Transformer(args), seed=2)
    sd = env.state_dict(ref)
    dims = convert.gpt_dims(sd)
    model = nd.NextDetailTransformer(vocab_size=GPT["vocab"], num_tokens=GPT["tokens"],
                                     group_size=GPT["group"], num_classes=GPT["classes"],
                                     dim=GPT["dim"], depth=GPT["layers"], num_heads=GPT["heads"],
                                     mlp_dim=dims["mlp_dim"], class_dropout=0.1,
                                     token_dropout=0.0, dropout=0.0, scan=False)
    expected = jax.eval_shape(lambda: nn.unbox(nd.init_params(model, jax.random.key(0))))
    params = jax.tree.map(jax.numpy.asarray,
                          convert.detailflow_gpt_params(sd, GPT["layers"], GPT["heads"], expected))
    return ref, model, params, dims
  return env.cached("gpt", build)


def gpt_train(env: Env) -> Pair:
  torch = env.torch
  ref, model, params, dims = _gpt_pair(env)
  with mock.patch.dict(sys.modules, {"wandb": mock.MagicMock()}):   # imported there, unused
    train_c2i = env.module("DetailFlow", "autoregressive.train.train_c2i")
  rng = np.random.default_rng(0)
  N, G, V, C = GPT["tokens"], GPT["group"], GPT["vocab"], GPT["classes"]
  triplets = rng.integers(0, V, (BATCH, N, 3))          # (clean, ar_input, ar_label) per code
  labels = rng.integers(0, C, BATCH)
  config = configlib.load_config("next_detail", f"size=demo,tokens={N},group={G},vocab={V},"
                                                  f"classes={C}")
  config.model.update(dict(dim=GPT["dim"], depth=GPT["layers"], num_heads=GPT["heads"],
                           mlp_dim=dims["mlp_dim"], class_dropout=0.1, token_dropout=0.0,
                           dropout=0.0, scan=False, causal_num=model.c))
  config.loss.correction_prob = GPT["correction_prob"]
  task = NextDetailTask(config)
  batch = {"clean": triplets[..., 0], "ar_input": triplets[..., 1], "ar_label": triplets[..., 2],
           "label": labels}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  jax_step, n_jax = _jax_train_step(lambda p, b, r: task.loss(p, {}, b, r, 0)[0], params)
  t_triplets, t_labels = torch.from_numpy(triplets), torch.from_numpy(labels)

  def ref_loss(m):
    z_input, z_target = train_c2i.generate_z_input_target(t_triplets, G, GPT["correction_prob"])
    return m(cond_idx=t_labels, idx=z_input, targets=z_target)[1]

  def check():      # the converted weights: the same teacher-forced logits (eval mode)
    codes = triplets[..., 0]
    with torch.no_grad():
      want, _ = ref.eval()(torch.from_numpy(codes[:, :N - G]), t_labels,
                           basic_group_inference=True)
    ids = nd.layout_ids(jnp.asarray(nd.next_detail_inputs(codes, G)), N, G, model.causal_num)
    got = np.asarray(model.apply({"params": params}, ids, jnp.asarray(labels)))
    want = want.numpy()
    return {"max_abs_diff": float(np.abs(want - got).max()),
            "max_abs_reference": float(np.abs(want).max())}
  return Pair(_ref_train_step(env, ref, ref_loss), lambda: jax_step(batch), env.count(ref), n_jax,
              dict(GPT, batch=BATCH, mlp_dim=dims["mlp_dim"]), check=check)


def gpt_sample(env: Env, use_cache: bool) -> Pair:
  torch = env.torch
  ref, model, params, dims = _gpt_pair(env)
  generate = env.module("DetailFlow", "autoregressive.models.generate")
  labels = np.arange(BATCH) % GPT["classes"]
  t_labels = torch.from_numpy(labels)

  def ref_call():
    ref.eval()
    # (its progress lines on stdout go to /dev/null)
    with torch.no_grad(), open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
      generate.generate_group_par(ref, t_labels, GPT["tokens"], cfg_scale=GPT["cfg"],
                                  sample_logits=True, temperature=1.0, top_k=0, top_p=1.0)
  j_labels = jnp.asarray(labels)

  def jax_call():
    jax.block_until_ready(nd.sample(model, params, j_labels, jax.random.key(0), cfg=GPT["cfg"],
                                    use_cache=use_cache))
  return Pair(ref_call, jax_call, env.count(ref), _count(params),
              dict(GPT, batch=BATCH, use_cache=use_cache,
                   forward_passes=nd.num_forward_passes(GPT["tokens"], GPT["group"]),
                   reference_sampler="generate_group_par (no KV cache)"), warmup=1)


# ------------------------------------------------------------------------------------------------
# DetailFlow tokenizer (modelling/tokenizer.py, modules/siglip2_vit.py)
# ------------------------------------------------------------------------------------------------

def reference_detailflow_tokenizer(load: Callable, cache_dir: str, sizes: dict, enc: dict,
                                   dec: dict):
  """DetailFlow's VQModel as its tokenizer configs build it (causal SigLIP2 encoder,
  bidirectional decoder, self-correction), at `sizes` (image, patch, tokens, group, codebook,
  code_dim) with encoder / decoder dims `enc` / `dec` (layer_num, embed_dim, num_heads), its own
  initialisation under torch seed 0.  `load(repo, module)` imports from the checkouts; the
  reference reads a SigLIP2 config (no weights: pretrained=False) from $CACHE_DATA_PATH, written
  to `cache_dir` here."""
  import torch
  from transformers import Siglip2VisionConfig
  Siglip2VisionConfig(patch_size=sizes["patch"], num_patches=(sizes["image"] // sizes["patch"]) ** 2,
                      num_channels=3).save_pretrained(
                          os.path.join(cache_dir, "siglip2-so400m-patch16-naflex"))
  tok = load("DetailFlow", "modelling.tokenizer")
  vit = load("DetailFlow", "modelling.modules.siglip2_vit")
  common = dict(pretrained=False, num_latent_tokens=sizes["tokens"], patch_size=sizes["patch"],
                group_size=sizes["group"], causal_num=None)
  args = tok.ModelArgs(image_size=sizes["image"], max_image_size=sizes["image"],
                       codebook_size=sizes["codebook"], codebook_embed_dim=sizes["code_dim"],
                       num_latent_tokens=sizes["tokens"], group_size=sizes["group"],
                       enc_type="siglip2", dec_type="siglip2", causal_encoder=True,
                       causal_decoder=False, correction_training=True)
  with mock.patch.dict(os.environ, {"CACHE_DATA_PATH": str(cache_dir)}), \
      mock.patch.object(tok, "build_encoder", lambda **_: vit.SiglipEncoder(
          causal_mode=True, **common, **enc)), \
      mock.patch.object(tok, "build_decoder", lambda **_: vit.SiglipDecoder(
          causal_mode=False, max_image_size=sizes["image"], repa_layer=None, **common, **dec)):
    torch.manual_seed(0)
    return tok.VQModel(args)


def tokenizer_train(env: Env) -> Pair:
  torch = env.torch
  try:
    import transformers
  except ImportError as e:
    raise Missing(f"transformers with SigLIP2 (4.49-4.53) for the tokenizer row: {e}") from e
  version = tuple(int(v) for v in transformers.__version__.split(".")[:2])
  if not (4, 49) <= version < (4, 54):
    raise Missing(f"DetailFlow's siglip2_vit.py needs transformers 4.49-4.53, this is "
                  f"{transformers.__version__}")
  tmp = tempfile.mkdtemp(prefix="bench_reference_tok_")
  side = dict(layer_num=TOK["layers"], embed_dim=TOK["width"], num_heads=TOK["heads"])
  ref = env.perturb(reference_detailflow_tokenizer(env.module, tmp, TOK, side, side), seed=3)
  path = os.path.join(tmp, "tokenizer.pt")
  torch.save({"model": ref.state_dict()}, path)
  convert.convert_detailflow_tokenizer(path, os.path.join(tmp, "converted"), group=TOK["group"],
                                       enc_heads=TOK["heads"], dec_heads=TOK["heads"])
  _, task, state = runs.load_state(os.path.join(tmp, "converted"))
  shutil.rmtree(tmp, ignore_errors=True)
  m = task.model.clone(dtype=jnp.float32)          # the converted (paper-size) config: bfloat16
  gen = jax.tree.map(jnp.asarray, state["params"]["gen"])
  x = np.random.default_rng(0).uniform(-1, 1, (BATCH, TOK["image"], TOK["image"], 3))
  x = x.astype(np.float32)
  jx = jnp.asarray(x)
  stats = m.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, jx[:1])["vq_stats"]
  N, R = TOK["tokens"], TOK["image"]

  def loss_fn(gen, batch, rng):
    # tokenize with self-correction (clean codes + one perturbed span re-encoded), decode both
    # halves at full resolution from all N tokens: MSE + the codebook / commitment loss
    out, _ = m.apply({"params": gen, "vq_stats": stats}, batch, N, rng, method="tokenize_train",
                     mutable=["vq_stats"])
    zq = jnp.concatenate([out["z_q"], out["z_q_sc"]])
    rec = m.apply({"params": gen}, zq, R, method="decode")
    return jnp.mean((rec - jnp.concatenate([batch, batch])) ** 2) + out["bottleneck_loss"]
  jax_step, n_jax = _jax_train_step(loss_fn, gen)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  pick = random.Random(0)

  def ref_loss(m):
    # encode_image in training mode: clean + corrected codes on the batch axis, both decoded
    rec, diff, _ = m(xt, noise_idx=pick.randrange(N), img_size=R)
    return ((rec - torch.cat([xt, xt])) ** 2).mean() + diff[0] + diff[1]
  return Pair(_ref_train_step(env, ref, ref_loss), lambda: jax_step(jx), env.count(ref), n_jax,
              dict(TOK, batch=BATCH))


BUILDERS = {
    "transdiff_train": lambda env: transdiff_train(env, mrar=False),
    "transdiff_decoder": transdiff_decoder,
    "transdiff_sample": lambda env: transdiff_sample(env, mrar=False),
    "mrar_train": lambda env: transdiff_train(env, mrar=True),
    "mrar_sample": lambda env: transdiff_sample(env, mrar=True),
    "gpt_train": gpt_train,
    "gpt_sample_cache": lambda env: gpt_sample(env, use_cache=True),
    "gpt_sample_recompute": lambda env: gpt_sample(env, use_cache=False),
    "tokenizer_train": tokenizer_train,
}


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------

def _check_requirements(names, refs: str) -> None:
  """Raises Missing (one line) naming what the chosen measures need and this Python lacks."""
  def have(package):
    if package in sys.modules:               # None there: an import that is known to fail
      return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None
  need = ["torch"] + sorted({p for n in names for p in MEASURES[n][2]})
  missing = [p for p in need if not have(p)]
  if missing:
    raise Missing(f"missing Python package(s) {', '.join(missing)}: pip install "
                  f"{' '.join(missing)} (the reference code runs on them)")
  if not refs:
    raise Missing("no reference checkouts: give --refs DIR or TDJAX_REFERENCE_REPOS=DIR (a folder "
                  "with DetailFlow/ and TransDiff/ checkouts)")
  repos = {"DetailFlow" if n.startswith(("gpt", "tokenizer")) else "TransDiff" for n in names}
  absent = [r for r in sorted(repos) if not os.path.isdir(os.path.join(refs, r))]
  if absent:
    raise Missing(f"{refs}: no checkout of {', '.join(absent)}")


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog=PROG,
                              description="tdjax against the reference PyTorch code (issue "
                              "48's table): the same models, parameter counts, threads and "
                              "float32 on both sides; prints a Markdown table.")
  p.add_argument("--refs", default=os.environ.get("TDJAX_REFERENCE_REPOS", ""),
                 help="folder with DetailFlow/ and TransDiff/ checkouts "
                      "(default: $TDJAX_REFERENCE_REPOS)")
  p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                 help="cores for both sides (default: all this process may use)")
  p.add_argument("--reps", type=int, default=0,
                 help="timed repetitions per side and round (default: 10 for steps, 3 for "
                      "samplers)")
  p.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
  p.add_argument("--only", default="", help="comma-separated measures, of: " + ", ".join(MEASURES))
  p.add_argument("--out", default="", help="also write the results as JSON to this file")
  args = p.parse_args(argv)
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(MEASURES)
  unknown = [n for n in names if n not in MEASURES]
  if unknown:
    p.error(f"--only: {', '.join(unknown)} unknown; expected some of {', '.join(MEASURES)}")
  if args.reps < 0 or args.rounds < 1 or args.threads < 1:
    p.error("--reps >= 0, --rounds >= 1, --threads >= 1")
  if args.threads > len(os.sched_getaffinity(0)):
    p.error(f"--threads {args.threads}: this process may use {len(os.sched_getaffinity(0))} "
            f"cores")
  return args, [n for n in MEASURES if n in names]       # the table's order


def main(argv=None) -> int:
  args, names = parse_args(argv)
  try:
    _check_requirements(names, args.refs)
  except Missing as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2
  threads = set_threads(args.threads)
  import torch
  torch.set_num_threads(args.threads)
  with contextlib.suppress(RuntimeError):        # only before any inter-op work
    torch.set_num_interop_threads(1)
  torch.set_default_dtype(torch.float32)
  env = Env(args.refs)
  info = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), **threads,
          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
          "cpu_count": os.cpu_count(), "dtype": "float32", "batch": BATCH,
          "refs": os.path.abspath(args.refs)}
  print(f"bench_reference: {args.threads} thread(s) on both sides "
        f"(cores {threads['cpu_affinity']}, "
        f"torch {torch.__version__}, jax {jax.__version__}), float32, batch {BATCH}", flush=True)
  results = {}
  for name in names:
    t0 = time.perf_counter()
    try:
      pair = BUILDERS[name](env)
    except Missing as e:
      print(f"{PROG}: error: {e}", file=sys.stderr)
      return 2
    build = time.perf_counter() - t0
    print(f"{name}: built ({build:.1f} s), {pair.ref_params:,} parameters on both sides "
          f"(reference {pair.ref_params:,}, tdjax {pair.tdjax_params:,})", flush=True)
    reps = args.reps or MEASURES[name][1]
    results[name] = measure(name, pair, reps, args.rounds,
                            log=lambda s: print(s, flush=True))
    results[name]["build_seconds"] = build
  table = markdown_table(results)
  print()
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"info": info, "measures": results, "table": table}, f, indent=2)
      f.write("\n")
  return 0


if __name__ == "__main__":      # `python -m` re-executed it with huge pages (tdjax/__init__.py):
  sys.exit(main())               # both sides alike, one process, one allocator

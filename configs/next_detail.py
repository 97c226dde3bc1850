"""DetailFlow next-detail AR transformer (LlamaGen GPT) on pre-extracted tokenizer codes.

  # demo: codes of the demo tokenizer (configs/detailflow_tokenizer.py:size=demo), minutes on CPU
  python -m tdjax.data.codes --tokenizer_workdir /tmp/df_tok --out /tmp/df/codes.npz --views flip
  python -m tdjax.train --config configs/next_detail.py:size=demo,codes=/tmp/df/codes.npz,\
tokenizer=/tmp/df_tok --workdir /tmp/df_ar
  # paper: GPT-L, N=128, g=8, vocab 8192, ImageNet codes ('{split}' is replaced by the split)
  python -m tdjax.train --config configs/next_detail.py:size=L,codes=gs://b/codes_{split}.npz \
      --workdir gs://b/df_ar_l

Options: size=demo|B|L|XL, tokens (N), group (g), vocab, classes, cfg (sampling; paper sizes:
the reference's 1.45 / 1.5 / 1.32 for N = 128 / 256 / 512), cfg_schedule (constant | linear |
gradual: the reference's gradual_cfg), codes (path),
steps, batch, lr, ema, correction (self-correction probability), dropout (-1: size default),
scan, remat, tokenizer (the
tokenizer workdir, for decoding samples).  tokens/group/vocab/classes = 0 take the values stored in
a local codes file when it exists (else the size default), so demo codes of any shape train without
further arguments.
"""

import json
import os

import ml_collections
import numpy as np

from tdjax import configlib as common
from tdjax.generators.next_detail import GPT_SIZES

# per size: data shape, schedule and regularisation defaults
DEFAULTS = {
    "demo": dict(tokens=32, group=4, vocab=1024, classes=10, steps=1500, batch=64, lr=1e-3,
                 ema=0.999, dropout=0.0, cfg=1.5, compute_dtype="float32"),
    # reference: 300 epochs of ImageNet at global batch 256, lr 1e-4 (not batch-scaled:
    # autoregressive/train/train_c2i.py), EMA 0.9999; the steps follow batch= (get_config)
    **{s: dict(tokens=128, group=8, vocab=8192, classes=1000, steps=common.epochs(300, 256),
               batch=256, lr=1e-4, ema=0.9999, dropout=0.1, cfg=1.45, compute_dtype="bfloat16")
       for s in ("B", "L", "XL")},
}


# the reference's sampling CFG per token count (scripts/eval_c2i.sh: DetailFlow-16 / -32 / -64)
PAPER_CFG = {128: 1.45, 256: 1.5, 512: 1.32}


def _codes_meta(path: str) -> dict:
  """Scalars of a codes file (no code arrays are read); {} when it does not exist yet."""
  path = path.replace("{split}", "train")
  if not path or "://" in path or not os.path.exists(path):
    return {}
  keys = ("num_tokens", "vocab_size", "group_size", "num_classes", "causal_num")
  if os.path.isdir(path):
    with open(os.path.join(path, "meta.json")) as f:
      meta = json.load(f)
    return {k: int(meta[k]) for k in keys if k in meta}
  with np.load(path) as f:
    return {k: int(f[k]) for k in keys if k in f.files}


def get_config(arg=None):
  a = common.parse_arg(arg, size="L", tokens=0, group=0, vocab=0, classes=0, cfg=0.0,
                       cfg_schedule="constant", codes="",
                       steps=0, batch=0, lr=0.0, ema=-1.0, correction=0.3, dropout=-1.0,
                       scan=True, remat="none", seed=0, tokenizer="")
  if a.size not in GPT_SIZES:
    raise ValueError(f"config arg size={a.size!r}: expected one of {sorted(GPT_SIZES)}")
  d = DEFAULTS[a.size]
  meta = _codes_meta(a.codes)
  tokens = a.tokens or meta.get("num_tokens", d["tokens"])
  group = a.group or meta.get("group_size", d["group"])
  vocab = a.vocab or meta.get("vocab_size", d["vocab"])
  classes = a.classes or meta.get("num_classes", d["classes"])
  if tokens % group:
    raise ValueError(f"config: token count tokens={tokens} is not divisible by group={group}")
  steps = a.steps or (common.epochs(300, a.batch) if a.batch and a.size != "demo" else d["steps"])
  dropout = d["dropout"] if a.dropout < 0 else a.dropout

  c = common.base_config()
  c.task = "next_detail"
  c.seed = a.seed
  c.total_steps = steps
  c.log_every = 50 if a.size == "demo" else 100
  c.eval_every = max(steps // 4, 1) if a.size == "demo" else 5000
  c.eval_batches = 4
  c.ckpt_every = max(steps // 4, 1) if a.size == "demo" else 5000
  c.compute_dtype = d["compute_dtype"]
  c.ema_decay = d["ema"] if a.ema < 0 else a.ema
  # A demo run is ~1.5 EMA horizons long: warm the decay up so the average forgets the random init.
  c.ema_warmup = a.size == "demo"

  c.input = ml_collections.ConfigDict(dict(
      source="codes", path=a.codes, split="train",
      # one file for every split unless the path has '{split}' (then e.g. codes_test.npz)
      eval_split=("test" if a.size == "demo" else "val") if "{split}" in a.codes else "train",
      batch_size=a.batch or d["batch"], num_classes=classes, num_tokens=tokens, vocab_size=vocab,
      shuffle=True))

  c.model = ml_collections.ConfigDict(dict(
      size=a.size, **GPT_SIZES[a.size], vocab_size=vocab, num_tokens=tokens, group_size=group,
      num_classes=classes,
      # the tokenizer's causal_num from the codes file (the reference reads it from the VQ config,
      # autoregressive/train/train_c2i.py); files without it: g, the first group token by token
      causal_num=meta.get("causal_num", group), class_dropout=0.1, token_dropout=dropout,
      dropout=dropout,
      rope_base=10000.0, scan=a.scan, remat=a.remat,
      attention_impl="auto"))   # blocked on CPUs, einsum elsewhere; 'fused': cuDNN flash on GPUs

  c.loss = ml_collections.ConfigDict(dict(correction_prob=a.correction))

  # AdamW (0.9, 0.95), wd 0.05 on ndim >= 2, clip 1.0; 5% linear warm-up from 0.005 lr, then
  # cosine to 0.01 lr (docs/reference/detailflow.md 2.5).  optim.decay_mask does not count the
  # stacked 'layers' axis
  # of a scanned model, so the [depth, D] norm scales stay undecayed as in the reference.
  c.optimizer.update(dict(name="adamw", lr=a.lr or d["lr"], b1=0.9, b2=0.95, eps=1e-8,
                          weight_decay=0.05, schedule="cosine",
                          warmup_steps=max(int(0.05 * steps), 1), warmup_init=0.005,
                          min_lr_ratio=0.01, grad_clip=1.0, decay_min_ndim=2))

  c.sample = ml_collections.ConfigDict(dict(
      cfg=a.cfg or (PAPER_CFG.get(tokens, d["cfg"]) if a.size != "demo" else d["cfg"]),
      cfg_schedule=a.cfg_schedule, temperature=1.0, top_k=0, top_p=1.0,
      use_cache=True))
  # the tokenizer that made the codes: sampling decodes with it (tdjax.tasks.detailflow_tokenizer.load_tokenizer
  # + tdjax.generators.next_detail.decode_codes, which checks that N and the vocabulary agree)
  c.tokenizer_workdir = a.tokenizer
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return c

"""Next-detail diffusion: the next-detail AR transformer over continuous coarse-to-fine tokens with
an attention-based diffusion head per group (tdjax.generators.next_detail_diffusion).

  # demo: a continuous demo tokenizer first (no self-correction: it is a VQ-only branch)
  python -m tdjax.train --config configs/detailflow_tokenizer.py:size=demo,bottleneck=continuous,kl=1e-3 \
      --workdir /tmp/df_cont
  python -m tdjax.train --config configs/next_detail_diffusion.py:size=demo,tokenizer=/tmp/df_cont \
      --workdir /tmp/ndd
  python -m tdjax.sample --workdir /tmp/ndd --out /tmp/ndd.png --classes all --num 10

Options: size=demo|B|L (trunk as the discrete AR sizes; head width = trunk width), tokenizer
(workdir, required), tokens (N), group (g), head_depth, batch_mul, steps, batch, lr, cfg,
sample_steps, scale_0, scale_1, seed; the head's attention-survey switches as in
configs/transdiff.py (conditioning=cross|incontext|joint, adaln=zero, cross_gate, qk_norm,
t_range=LO:HI, attn_temp=learned_t, window=W, linear_attn, merge=R) and head_context=group|all.
"""

import ml_collections

from tdjax import configlib as common
from tdjax.data.pipeline import default_input_config
from tdjax.generators.heads import SURVEY_ARGS, survey_head_fields
from tdjax.generators.next_detail import GPT_SIZES

DEFAULTS = {
    "demo": dict(tokens=32, group=4, classes=10, steps=2000, batch=64, lr=1e-3, head_depth=2,
                 head_heads=4, mul=2, cfg=2.0, dtype="float32"),
    # ImageNet-scale trunk sizes; the head's depth follows TransDiff's decoder scale
    # (docs/reference/transdiff.md 1.4)
    **{s: dict(tokens=128, group=8, classes=1000, steps=300 * 1281167 // 256, batch=256, lr=1e-4,
               head_depth=8, head_heads=16, mul=4, cfg=1.5, dtype="bfloat16")
       for s in ("B", "L")},
}


def get_config(arg=None):
  a = common.parse_arg(arg, size="demo", tokenizer="", tokens=0, group=0, head_depth=0,
                       batch_mul=0, steps=0, batch=0, lr=0.0, cfg=0.0, sample_steps=50,
                       scale_0=1.0, scale_1=1.0, seed=0, conditioning="cross",
                       head_context="group", **SURVEY_ARGS)
  if a.size not in DEFAULTS:
    raise ValueError(f"config arg size={a.size!r}: expected one of {sorted(DEFAULTS)}")
  d, s = DEFAULTS[a.size], GPT_SIZES[a.size]
  small = a.size == "demo"
  c = common.base_config()
  c.task = "next_detail_diffusion"
  c.seed = a.seed
  c.total_steps = a.steps or d["steps"]
  c.log_every = 50 if small else 100
  c.eval_every = max(c.total_steps // 4, 1) if small else 5000
  c.eval_batches = 4
  c.ckpt_every = c.eval_every
  c.compute_dtype = d["dtype"]
  c.ema_decay = 0.999 if small else 0.9999
  c.ema_warmup = small
  c.tokenizer_workdir = a.tokenizer
  c.token_stats_images = 1024
  c.input = default_input_config()
  if not small:
    c.input.source, c.input.tfds_name, c.input.augment = "tfds", "imagenet2012", "crop_flip"
    c.input.channels, c.input.image_size = 3, 256
    c.input.worker_processes = 16    # JPEG decoding per host (~370 images/s per process here)
  else:
    c.input.augment = "flip"
  c.input.batch_size = a.batch or d["batch"]
  c.model = ml_collections.ConfigDict(dict(
      num_tokens=a.tokens or d["tokens"], group_size=a.group or d["group"],
      num_classes=d["classes"], dim=s["dim"], depth=s["depth"], num_heads=s["num_heads"],
      mlp_dim=s["mlp_dim"], head_width=s["dim"], head_depth=a.head_depth or d["head_depth"],
      head_heads=d["head_heads"], class_dropout=0.1, dropout=0.0 if small else 0.1,
      batch_mul=a.batch_mul or d["mul"], scan=not small, remat="none",
      attention_impl="auto"))   # blocked on CPUs, einsum elsewhere; 'fused': cuDNN flash on GPUs
  head = survey_head_fields(a)     # attention-survey switches of the head, only those set
  if a.conditioning != "cross":
    head["conditioning"] = a.conditioning
  if head:
    c.model.head_options = head
  if a.head_context != "group":
    c.model.head_context = a.head_context
  c.sample = ml_collections.ConfigDict(dict(cfg=a.cfg or d["cfg"], steps=a.sample_steps,
                                            scale_0=a.scale_0, scale_1=a.scale_1))
  # the discrete AR model's optimiser (docs/reference/detailflow.md 2.5): AdamW (0.9, 0.95),
  # wd 0.05, clip 1.0, cosine
  c.optimizer.update(dict(name="adamw", lr=a.lr or d["lr"], b1=0.9, b2=0.95, eps=1e-8,
                          weight_decay=0.05, schedule="cosine",
                          warmup_steps=max(int(0.05 * c.total_steps), 1), warmup_init=0.005,
                          min_lr_ratio=0.01, grad_clip=1.0, decay_min_ndim=2))
  return c

"""TransDiff (1-step AR + attention diffusion decoder) and MRAR
(docs/reference/transdiff.md).

  # demo: Fashion-MNIST 32x32, pixel-patch latents (8x8 grid of 16 features), minutes on CPU
  python -m tdjax.train --config configs/transdiff.py:size=demo --workdir /tmp/td
  # MRAR demo: 4 same-class images per example, 3 references, fine-tuned from the 1-step run
  python -m tdjax.train --config configs/transdiff.py:size=demo,mrar=True,init_from=/tmp/td \
      --workdir /tmp/td_mrar
  # MAR's baseline: per-token MLP head trained and sampled with DDPM (cosine, eps, temperature)
  python -m tdjax.train --config configs/transdiff.py:size=demo,head=mlp,diffusion=ddpm --workdir /tmp/mlp
  # paper: TransDiff-L 1-step on ImageNet 256 KL-16 latents, cached once (reference main_cache.py)
  python -m tdjax.data.latents --vae kl16.npz --out /shared/in256_latents     # or launch/*.sh
  python -m tdjax.train --config configs/transdiff.py:size=L,latents=/shared/in256_latents,vae_weights=kl16.npz \
      --workdir gs://b/td_l
  # paper: then 512 px (stage 2b): decoder only, 1,024 latent tokens from the 256 condition slots
  python -m tdjax.train --config configs/transdiff.py:size=L,res=512,init_from=gs://b/td_l \
      --workdir gs://b/td_l_512

Options: size=tiny|demo|B|L|H, mrar (refs = 3 references by default, K = refs + 1), init_from (a
1-step workdir: MRAR's weight surgery of reference 2.3, or the start of a res run), res (image side
above the size's own: reference stage 2b, 512 px from a 256 px run; the AR keeps the source's
condition slots, the decoder denoises (res / stride)^2 tokens; needs init_from), head_only (with
res; reference --only_train_diff: the AR frozen; head_only=False trains both), head=attention|mlp,
head_size=mar_b|mar_l|mar_h (head=mlp: MAR's released MLP heads, width x depth 1024 x 6, 1280 x 8,
1536 x 12; sizes B / L / H default to the MAR model of their letter, tiny / demo to 2 x width x 3),
head_depth, self_attention (head), conditioning=cross|adaln|incontext|joint (head), the
attention-survey switches of the head (tdjax/generators/heads.py): adaln=zero, cross_gate, qk_norm,
t_range=LO:HI, attn_temp=learned_t, window=W, linear_attn, merge=R; diffusion=flow|ddpm,
temperature (DDPM sampling), batch_mul, steps, batch, lr, cfg, scale_0, scale_1, sample_steps,
latent=pixels|cached|vae and vae_weights (KL VAE params from `python -m tdjax.convert --kind
mar_vae`: 'vae' encodes images in the step, 'cached' latents are decoded with it for pictures and
sampling), latents (the folder of a latent cache, `python -m tdjax.data.latents`, which cached
models read: the paper sizes' default), seed.
"""

import ml_collections

from tdjax import configlib as common
from tdjax.data.pipeline import default_input_config
from tdjax.generators.heads import MAR_HEAD_SIZES, SURVEY_ARGS, survey_head_fields
from tdjax.generators.transdiff import PAPER_SAMPLING, SIZES

DEFAULTS = {
    "tiny": dict(steps=50, batch=8, lr=1e-3, buffer=4, image=16, patch=4, classes=10, mul=2,
                 cfg=1.5, s0=1.0, s1=1.0),
    # demo: batch_mul 1 (the reference's 4 costs ~3x per step on 2 CPU cores)
    "demo": dict(steps=2000, batch=32, lr=1e-3, buffer=16, image=32, patch=4, classes=10, mul=1,
                 cfg=2.0, s0=1.0, s1=1.0),
    # reference 4.3: batch 2048, lr = blr 1e-4 x batch / 256 = 8e-4 constant after a 100-epoch
    # warm-up, 800 epochs, mul 4; the steps and lr follow batch= (get_config)
    **{s: dict(steps=common.epochs(800, 2048), batch=2048, lr=8e-4, buffer=64, image=256,
               patch=16, classes=1000, mul=4, cfg=1.3, s0=0.89, s1=0.95) for s in ("B", "L", "H")},
}


def get_config(arg=None):
  a = common.parse_arg(arg, size="demo", mrar=False, refs=3, init_from="", head="attention",
                       head_size="", head_depth=0,
                       self_attention=True, conditioning="cross", diffusion="flow",
                       temperature=1.0, batch_mul=0, steps=0, batch=0, lr=0.0, cfg=0.0,
                       scale_0=0.0, scale_1=0.0, sample_steps=100, latent="", vae_weights="",
                       latents="",
                       res=0, head_only=True, seed=0, **SURVEY_ARGS)
  if a.size not in DEFAULTS:
    raise ValueError(f"config arg size={a.size!r}: expected one of {sorted(DEFAULTS)}")
  d, s = DEFAULTS[a.size], SIZES[a.size]
  big = a.size in ("B", "L", "H")
  res = a.res if a.res and a.res != d["image"] else 0
  if a.init_from and not (a.mrar or res):
    raise ValueError("config arg init_from: a 1-step run starts MRAR (mrar=True) or a higher "
                     "resolution (res=...)")
  if res and (a.mrar or not a.init_from):
    raise ValueError(f"config arg res={a.res}: a resolution transfer fine-tunes a 1-step run "
                     f"(give init_from=its workdir; no mrar: the reference has no MRAR 512 model)")
  if res and (res < d["image"] or res % d["patch"]):
    raise ValueError(f"config arg res={a.res}: expected a multiple of {d['patch']} above the "
                     f"size's {d['image']} px")
  if big and a.batch:   # epochs stay epochs; stage 1's lr = blr 1e-4 x batch / 256 (main.py)
    d = dict(d, batch=a.batch, steps=common.epochs(800, a.batch), lr=1e-4 * a.batch / 256)
  if a.mrar and a.init_from:   # reference 2.3: MRAR fine-tune, 40 epochs at lr 5e-5, batch_mul 2
    d = dict(d, steps=common.epochs(40, d["batch"]) if big else d["steps"] // 2,
             lr=5e-5 if big else d["lr"] / 2, mul=2 if big else d["mul"])
  cond_tokens = 0
  if res:   # reference stage 2b: 150 epochs (10 warm-up) at lr 1e-4, batch 2048, EMA 0.999, mul 4
    cond_tokens = (d["image"] // d["patch"]) ** 2   # the source's slots (seq_len 256 at 512 px)
    d = dict(d, image=res, steps=common.epochs(150, d["batch"]) if big else d["steps"] // 2,
             lr=1e-4 if big else d["lr"] / 2)
  c = common.base_config()
  c.task = "transdiff"
  c.seed = a.seed
  c.total_steps = a.steps or d["steps"]
  small = a.size in ("tiny", "demo")
  c.log_every = 50 if small else 100
  c.eval_every = max(c.total_steps // 4, 1) if small else 5000
  c.ckpt_every = c.eval_every
  c.ema_decay = 0.999 if small or res else 0.9999
  c.ema_warmup = small  # short runs: the average must forget the random init (optim.ema_decay_at)
  c.compute_dtype = "float32" if small else "bfloat16"
  c.input = default_input_config()
  if not small:
    c.input.source, c.input.tfds_name, c.input.augment = "tfds", "imagenet2012", "crop_flip"
    c.input.channels = 3
    c.input.worker_processes = 16    # JPEG decoding per host (~370 images/s per process here)
  c.input.image_size = d["image"]
  c.input.batch_size = a.batch or d["batch"]
  if a.mrar and a.refs < 1:
    raise ValueError(f"config arg refs={a.refs}: MRAR needs at least 1 reference image")
  c.input.group_size = a.refs + 1 if a.mrar else 1
  if small:
    c.latent = ml_collections.ConfigDict(dict(kind="pixels", patch=d["patch"], scale=1.0,
                                              grid=d["image"] // d["patch"],   # cached only
                                              channels=d["patch"] ** 2,
                                              vae="demo", vae_weights=a.vae_weights))
  else:  # MAR KL-16: 256 px -> 16 x 16 x 16, posterior sample x 0.2325 (cached latents)
    c.latent = ml_collections.ConfigDict(dict(kind="cached", grid=d["image"] // d["patch"],
                                              channels=16, scale=0.2325,
                                              vae="kl16", vae_weights=a.vae_weights))
  if a.latent:   # 'pixels' | 'cached' | 'vae' (encode in the step with the VAE of vae_weights)
    c.latent.kind = a.latent
  if a.latents and c.latent.kind != "cached":
    raise ValueError(f"config arg latents={a.latents!r} is a latent cache: it trains "
                     f"latent=cached models (this one: latent={c.latent.kind})")
  if c.latent.kind == "cached":   # read a cache from `python -m tdjax.data.latents` (latents=DIR)
    if small:                     # the demo VAE's latents: 4 channels on the same grid
      c.latent.update(vae="demo", channels=4, scale=1.0)
    c.input.update(source="latents", data_dir=a.latents, augment="flip", worker_processes=0,
                   eval_split=c.input.split)    # evaluation on cached training latents
  c.model = ml_collections.ConfigDict(dict(
      size=a.size, num_classes=d["classes"], width=s.width, num_heads=s.num_heads,
      ar_depth=s.ar_depth, buffer_size=d["buffer"], num_refs=a.refs if a.mrar else 0, ref_patch=2,
      init_from=a.init_from, cond_tokens=cond_tokens,
      head_only=bool(res) and a.head_only,
      dropout=0.0 if small else 0.1, label_drop=0.1, batch_mul=a.batch_mul or d["mul"],
      scan=not small, remat="none"))
  head_width, head_depth = ((s.width, s.head_depth) if a.head == "attention" else
                             _mlp_head_size(a.head_size, a.size, s.width))
  if a.head_size and a.head != "mlp":
    raise ValueError(f"config arg head_size={a.head_size!r} names one of MAR's MLP heads: it needs "
                     f"head=mlp (head={a.head!r})")
  c.head = ml_collections.ConfigDict(dict(
      type=a.head, width=head_width, depth=a.head_depth or head_depth,
      num_heads=s.num_heads, mlp_ratio=4.0, dropout=0.0 if small else 0.1,
      self_attention=a.self_attention, conditioning=a.conditioning, scan=not small,
      attention_impl="auto",  # blocked on CPUs, einsum elsewhere; 'fused': cuDNN flash on GPUs
      # 512 px: 1,024-token attention; saving only the weight matmuls (scores recomputed) puts
      # TransDiff-L's step at 39 GiB per device on 256 devices (168 GiB without remat)
      remat="dots_with_no_batch_dims_saveable" if res and big else "none"))
  survey = survey_head_fields(a)      # attention-survey switches (heads.py), only those set
  if survey and a.head != "attention":
    raise ValueError(f"config args {', '.join(sorted(survey))}: attention-head switches "
                     f"(head={a.head!r})")
  c.head.update(survey)
  c.diffusion = a.diffusion          # 'flow' (TransDiff) | 'ddpm' (MAR: cosine, eps, learned var)
  if a.diffusion not in ("flow", "ddpm"):
    raise ValueError(f"config arg diffusion={a.diffusion!r}: expected 'flow' or 'ddpm'")
  c.sample = ml_collections.ConfigDict(dict(
      cfg=a.cfg or d["cfg"], steps=a.sample_steps))
  if a.diffusion == "ddpm":
    c.sample.temperature = a.temperature
  else:
    c.sample.update(scale_0=a.scale_0 or d["s0"], scale_1=a.scale_1 or d["s1"])
  variant = "mrar" if a.mrar else ("512" if res == 512 else "one_step")
  if (a.size, variant) in PAPER_SAMPLING and a.diffusion == "flow":   # transdiff.md 1.6
    cfg, s0, s1 = PAPER_SAMPLING[a.size, variant]
    c.sample.update(cfg=a.cfg or cfg, scale_0=a.scale_0 or s0, scale_1=a.scale_1 or s1)
  # reference 4.3: AdamW (0.9, 0.95), wd 0.02 outside the diffusion head, clip 3.0 (constant lr
  # after a warm-up of 100 of 800 epochs; MRAR 10 of 40; 512 px 10 of 150); demo sizes 1/20
  warm_frac = (1 / 20 if small else 10 / 150 if res else 10 / 40 if a.mrar and a.init_from
               else 100 / 800)
  c.optimizer.update(dict(name="adamw", lr=a.lr or d["lr"], b1=0.9, b2=0.95, weight_decay=0.02,
                          decay_exclude=("head",),
                          schedule="cosine" if small else "constant",
                          warmup_steps=max(round(c.total_steps * warm_frac), 1),
                          min_lr_ratio=0.1,
                          grad_clip=3.0))
  if big and (res or (a.mrar and a.init_from)):
    # the reference fine-tunes on 64 GPUs x 16 x 2 accumulation steps and sums the two
    # micro-batches' gradients (its loss is not divided by the steps), so the 3.0 clip acts on
    # twice the mean gradient: the same here (the memory per step halves as well)
    c.grad_accum, c.grad_accum_reduce = 2, "sum"
  return c


def _mlp_head_size(name: str, size: str, width: int) -> tuple[int, int]:
  """(width, depth) of the MLP head: MAR's released head `name`; none named: the MAR model of the
  size's letter for B / L / H (MAR-B / L / H's README heads), 2 x the AR width x 3 blocks below."""
  name = name or (f"mar_{size.lower()}" if size in ("B", "L", "H") else "")
  if not name:
    return 2 * width, 3
  if name not in MAR_HEAD_SIZES:
    raise ValueError(f"config arg head_size={name!r}: expected one of {sorted(MAR_HEAD_SIZES)}")
  return MAR_HEAD_SIZES[name]

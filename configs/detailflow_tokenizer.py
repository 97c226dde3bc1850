"""DetailFlow 1D coarse-to-fine tokenizer (docs/reference/detailflow.md 1.2-1.8).

  # demo: Fashion-MNIST 32x32 grey, minutes on 2 CPU cores
  python -m tdjax.train --config configs/detailflow_tokenizer.py:size=demo --workdir /tmp/df_tok
  # paper: DetailFlow-16 (N=128, g=8), ImageNet 256, SigLIP2-so400m-sized encoder, ViT-B decoder
  python -m tdjax.train --config configs/detailflow_tokenizer.py:size=full,tokens=128 \
      --workdir gs://b/df_tok --config.loss.lpips_weights=/w/lpips_vgg.npz ...

Options: size=tiny|demo|full, tokens (N), group (g), patch, alpha (R(n) power), degrade_p
(probability of a degraded prefix step; 0 = always all N tokens at full resolution, i.e. no
coarse-to-fine supervision), causal_encoder (False: unordered tokens), first_group_causal (False:
the reference's causal_num = 0, every group parallel, DetailFlow Table 2's "parallel" row; the AR
model takes it from the codes file), correction (self-correction
branch on/off), top_k, codebook, code_dim, bottleneck=vq|continuous (kl, latent_noise: its
regularisers), steps, batch, lr, warmup, lpips/adv/align (loss weights; > 0 needs the matching
weights file in config.loss), teacher (the alignment teacher .npz: sets align_teacher_weights and
align_dim to the teacher's width, read from the file), disc=patchgan|dino, paper (the reference loss weights: lpips 1, adv 0.2
with the DINO disc, align 1), scan, remat, image_size, seed.

Paper run: size=full,paper plus --config.loss.lpips_weights=... --config.loss.disc_backbone_weights=...
--config.loss.align_teacher_weights=... --config.model.encoder_init=/w/siglip2_so400m.npz
(each a .npz in the tdjax layouts; `python -m tdjax.convert --kind siglip2` converts the HF SigLIP2
safetensors file).
"""

from tdjax import configlib as common
from tdjax.data.pipeline import default_input_config
from tdjax.losses.alignment import teacher_shape

# per size: model dims, data and schedule defaults
DEFAULTS = {
    "tiny": dict(tokens=16, group=4, patch=8, codebook=256, code_dim=8, image_size=32,
                 channels=1, source="fashion_mnist", steps=200, batch=32, lr=1e-3, warmup=20,
                 compute_dtype="float32", scan=False),
    "demo": dict(tokens=32, group=4, patch=8, codebook=1024, code_dim=8, image_size=32,
                 channels=1, source="fashion_mnist", steps=1000, batch=32, lr=1e-3, warmup=50,
                 compute_dtype="float32", scan=False),
    # reference (train/train_tokenizer.py): 250 epochs of ImageNet at batch 256, lr 1e-4 x batch /
    # 256, 1 warm-up epoch from 1e-5; the steps, lr and warm-up follow batch= (get_config)
    "full": dict(tokens=128, group=8, patch=16, codebook=8192, code_dim=8, image_size=256,
                 channels=3, source="tfds", steps=common.epochs(250, 256), batch=256, lr=1e-4,
                 warmup=common.epochs(1, 256), compute_dtype="bfloat16", scan=True),
}


def get_config(arg=None):
  a = common.parse_arg(arg, size="demo", tokens=0, group=0, patch=0, alpha=1.5, degrade_p=0.2,
                       correction=True, correction_every=0, top_k=50, codebook=0, code_dim=0,
                       bottleneck="vq", kl=0.0, latent_noise=0.0, causal_encoder=True,
                       first_group_causal=True,
                       steps=0, batch=0, lr=0.0, warmup=-1, lpips=0.0, adv=0.0, align=0.0,
                       teacher="", disc="patchgan", paper=False, scan=False, remat="none", image_size=0,
                       seed=0)
  if a.size not in DEFAULTS:
    raise ValueError(f"config arg size={a.size!r}: expected one of {sorted(DEFAULTS)}")
  d = DEFAULTS[a.size]
  if a.size == "full" and a.batch:    # epochs stay epochs; lr = 1e-4 x batch / 256 (reference)
    d = dict(d, batch=a.batch, steps=common.epochs(250, a.batch), warmup=common.epochs(1, a.batch),
             lr=1e-4 * a.batch / 256)
  c = common.base_config()
  c.task = "detailflow_tokenizer"
  c.seed = a.seed
  c.total_steps = a.steps or d["steps"]
  c.log_every = 50 if a.size != "full" else 100
  c.eval_every = max(c.total_steps // 4, 1) if a.size != "full" else 5000
  c.ckpt_every = c.eval_every
  c.compute_dtype = d["compute_dtype"]

  c.input = default_input_config()
  c.input.source = d["source"]
  if d["source"] == "tfds":
    c.input.tfds_name = "imagenet2012"
    # the reference's random_crop_arr + flip (train/train_tokenizer.py): crops of 80-100 % of
    # the short side, so the tokenizer also sees scale changes
    c.input.augment = "adm_crop_flip"
    c.input.worker_processes = 16    # JPEG decoding per host (~370 images/s per process here)
  c.input.image_size = a.image_size or d["image_size"]
  c.input.channels = d["channels"]
  c.input.batch_size = a.batch or d["batch"]

  if a.paper:  # the reference's loss weights (1.7); needs the weights files in config.loss
    a.lpips, a.adv, a.align, a.disc = a.lpips or 1.0, a.adv or 0.2, a.align or 1.0, "dino"
  tokens = a.tokens or d["tokens"]
  group = a.group or d["group"]
  if tokens % group:
    raise ValueError(f"config: tokens={tokens} is not divisible by group={group}")
  c.model = dict(
      size=a.size,                 # 'tiny' | 'demo' | 'full' (tdjax.tokenizers.detailflow.SIZES)
      # explicit dims override the size table (0 = take the size's value)
      enc_width=0, enc_depth=0, enc_heads=0, enc_mlp=0,
      dec_width=0, dec_depth=0, dec_heads=0, dec_mlp=0,
      patch=a.patch or d["patch"],
      num_tokens=tokens,
      group=group,
      causal_num=0,                # 0 = group (first group token-causal); see first_group_causal
      # False: causal_num = 0 (the reference's setting: no token-causal first group, every group
      # parallel; kept apart from causal_num so configs saved before it keep their meaning)
      first_group_causal=a.first_group_causal,
      causal_encoder=a.causal_encoder,  # False: unordered tokens (Table 2 baseline)
      pos_grid=0,                  # 0 = image_size // patch
      gelu_approximate=True,
      alpha=a.alpha,               # R(n) power
      degrade_p=a.degrade_p,       # probability of a degraded-prefix step
      self_correction=a.correction,
      correction_every=a.correction_every or d.get("correction_every", 1),
      branch_grads=a.size != "full",  # per-branch backward: fast on CPU; one program on pods  # 1 = every step (reference); k = every k-th step
      top_k=a.top_k,
      bottleneck=a.bottleneck,     # 'vq' | 'continuous'
      codebook_size=a.codebook or d["codebook"],
      code_dim=a.code_dim or d["code_dim"],
      commitment=0.25,
      codebook_weight=1.0,
      usage_decay=0.99,
      kl_weight=a.kl,              # continuous only: KL(q(z|x) || N(0, I)) weight (posterior sampled)
      latent_noise=a.latent_noise, # continuous only: Gaussian noise on z in training
      # the teacher's width: SigLIP2-so400m's 1152 unless a teacher file says otherwise
      align_dim=(teacher_shape(a.teacher)["width"] if a.teacher else 1152) if a.align > 0 else 0,
      align_hidden=1024,
      scan=a.scan or d["scan"],
      remat=a.remat,
      encoder_init="",             # SigLIP2 .npz (tdjax.convert --kind siglip2); paper: so400m
      attention_impl="auto",     # blocked on CPUs, einsum elsewhere; 'fused' / 'cudnn': GPU flash
  )
  c.loss = dict(
      mse_weight=1.0,
      lpips_weight=a.lpips, lpips_start=0, lpips_warmup=10000 if a.size == "full" else 0,
      lpips_weights="",            # LPIPS-VGG .npz (tdjax.losses.lpips layout)
      lpips_kwargs={},             # LPIPS module fields (tests: tiny widths)
      adv_weight=a.adv, adv_start=40000 if a.size == "full" else 0, disc=a.disc,
      disc_kwargs={}, disc_backbone_weights="",  # disc='dino': tdjax.convert --kind dino's .npz
      disc_input_size=0 if a.size == "full" else 64,  # 0 = as decoded; else resized for D
      diffaug_policy="color,translation,cutout_0.2", diffaug_prob=0.5,
      lecam_weight=0.001, lecam_decay=0.999,
      cr_weight=4.0 if a.disc == "dino" else 0.0,  # consistency regularisation of D
      cr_policy="color,translation,cutout_0.5",
      align_weight=a.align, align_start=0,
      align_teacher_weights=a.teacher,  # SigLIP2 teacher .npz (tdjax.losses.alignment layout)
      align_from_batch=False,      # True: batch['teacher_feats'] gives the teacher features
      teacher_kwargs={},
  )
  c.optimizer.update(dict(
      name="adam", lr=a.lr or d["lr"], b1=0.9, b2=0.95, weight_decay=0.0, schedule="cosine",
      warmup_steps=d["warmup"] if a.warmup < 0 else a.warmup,
      warmup_init=1e-5 / (a.lr or d["lr"]) if a.size == "full" else 0.0,  # timm: from 1e-5
      min_lr_ratio=0.1, grad_clip=1.0))
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  return c

"""DetailFlow tokenizer training task (docs/reference/detailflow.md 1.5-1.8).

One training step:
  1. t ~ prefix length (prob `degrade_p`: U[1, N-g] rounded up to groups above g; else N), drawn
     inside jit from the step rng.
  2. Encoder pass, VQ (clean + top-k noisy indices); self-correction: perturbed detached prefix,
     second encoder pass with the refined query table (every step; off when t == 1).
  3. Decoder at dec_res(t) on [clean ; corrected] codes (2B), first t tokens, against the target
     area-down(R(t)) + bicubic-up(dec_res) of the image, duplicated.

Variable decoder resolution under one jit: the set of decoder resolutions reachable by t is static
(`PrefixPlan`); the decode + image losses are one `jax.lax.switch` branch per resolution, and the
degrade matrices of the t values of a branch are stacked constants indexed by t.  Every step
runs exactly one decoder at its own resolution (as the reference), and the step compiles once
(its compile time grows with the number of branches: 14 for N=128, R=256, patch 16).  A
discriminator with a fixed input size (DINO: 224 px) runs once after the switch, on the views the
branches return (`_disc_views`), so the branches hold the decoder, MSE and LPIPS only.

Losses (config.loss): MSE (`mse_weight`), LPIPS (`lpips_weight`, `lpips_start`, `lpips_warmup`,
weights file `lpips_weights`), adversarial (`adv_weight`, `adv_start`, `disc` 'patchgan' or 'dino',
`disc_backbone_weights` for dino, `diffaug_policy`, `diffaug_prob`, `lecam_weight`, `cr_weight`
consistency regularisation with `cr_policy` at prob 1), first-token
alignment (`align_weight`, `align_start`, `align_teacher_weights`, or per-batch
`batch['teacher_feats']`), plus the bottleneck loss (codebook 1.0 + commitment 0.25, mixed as in
reference 1.6).  Generator and discriminator losses are one scalar with stop_gradient on the cross
terms; `param_groups` maps params['gen'] / params['disc'] to the 'gen' / 'disc' optimisers.

Batches: {'image': float [B, H, W, C] in [-1, 1]} (+ optional 'teacher_feats' [B, D] or [B, L, D]).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tdjax import checkpoint as ckpt_lib
from tdjax import configlib
from tdjax import parallel
from tdjax.losses import alignment, augment, lpips
from tdjax.losses import discriminators as D
from tdjax.tasks.base import Task
from tdjax.tokenizers import siglip2
from tdjax.tokenizers.detailflow import build_tokenizer
from tdjax.tokenizers.resolution import (PrefixPlan, apply_separable, bicubic_matrix, check_alpha,
                                         decoder_resolution, resolution_for_prefix,
                                         sample_prefix_length)


def _lerp_on(step, start, warmup=0):
  """0 before `start`, then a linear ramp over `warmup` steps to 1 (float32 scalar)."""
  s = jnp.asarray(step, jnp.float32) - float(start)
  if warmup and warmup > 0:
    return jnp.clip(s / float(warmup), 0.0, 1.0) * (s >= 0)
  return (s >= 0).astype(jnp.float32)


def psnr01(x, y):
  """PSNR of images in [-1, 1] measured on [0, 1], per image -> [B]."""
  a = jnp.clip((x + 1) / 2, 0, 1)
  b = jnp.clip((y + 1) / 2, 0, 1)
  mse = jnp.mean((a - b) ** 2, axis=(1, 2, 3))
  return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


@dataclasses.dataclass(frozen=True)
class Recipe:
  """config.model's training settings of the coarse-to-fine tokenizer (the module's own fields are
  `DetailFlowTokenizer`'s): R(n)'s power, the degraded-prefix rate, self-correction."""
  alpha: float = 1.5                # R(n) power (the paper: 1.5)
  degrade_p: float = 0.2            # probability of a degraded-prefix step
  self_correction: bool = True
  # the reference runs the self-correction branch on every step (1); k > 1 runs it on every k-th
  # step only (it costs ~1.5x a plain step: a second encoder pass and a doubled decoder batch)
  correction_every: int = 1
  # True: the loop differentiates each (resolution, correction) branch separately (faster
  # steps, one compiled forward+backward per branch); False: one switch inside the loss
  branch_grads: bool = False
  encoder_init: str = ""            # SigLIP2 .npz initialising the encoder

  def __post_init__(self):
    check_alpha(self.alpha)
    if not 0 <= self.degrade_p <= 1:
      raise ValueError(f"config.model.degrade_p={self.degrade_p}: expected a probability in [0, 1]")
    if self.correction_every < 1:
      raise ValueError(f"config.model.correction_every={self.correction_every}: expected >= 1")
    if self.encoder_init and not os.path.isfile(self.encoder_init):
      raise FileNotFoundError(f"config.model.encoder_init: SigLIP2 weights file not found: "
                              f"{self.encoder_init!r}")


@dataclasses.dataclass(frozen=True)
class Losses:
  """config.loss: the tokenizer's loss weights, schedules and the frozen networks' weights files
  (each default once, here)."""
  mse_weight: float = 1.0
  lpips_weight: float = 0.0
  lpips_start: int = 0
  lpips_warmup: int = 0
  lpips_weights: str = ""           # LPIPS-VGG .npz (python -m tdjax.convert --kind lpips)
  lpips_kwargs: dict = dataclasses.field(default_factory=dict)
  adv_weight: float = 0.0
  adv_start: int = 0
  disc: str = "patchgan"            # 'patchgan' | 'dino'
  disc_kwargs: dict = dataclasses.field(default_factory=dict)
  disc_backbone_weights: str = ""   # disc='dino': DINO ViT-S/16 .npz
  disc_input_size: int = 0          # 0 = as decoded; else images resized to this for D
  diffaug_policy: str = "color,translation,cutout_0.2"
  diffaug_prob: float = 0.5
  lecam_weight: float = 0.0
  lecam_decay: float = 0.999
  cr_weight: float = 0.0            # consistency regularisation of D
  cr_policy: str = "color,translation,cutout_0.5"
  align_weight: float = 0.0
  align_start: int = 0
  align_teacher_weights: str = ""   # SigLIP2 teacher .npz
  align_from_batch: bool = False    # True: batch['teacher_feats'] gives the teacher features
  teacher_kwargs: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for key in ("mse_weight", "lpips_weight", "adv_weight", "align_weight", "lecam_weight",
                "cr_weight"):
      if getattr(self, key) < 0:
        raise ValueError(f"config.loss.{key}={getattr(self, key)}: expected >= 0")
    if self.disc not in ("patchgan", "dino"):
      raise ValueError(f"config.loss.disc={self.disc!r}: expected 'patchgan' or 'dino'")
    if self.lpips_weight > 0 and not self.lpips_weights:
      raise ValueError("config.loss.lpips_weight > 0 needs config.loss.lpips_weights "
                       "(an LPIPS-VGG .npz file: python -m tdjax.convert --kind lpips)")
    if self.adv_weight > 0 and self.disc == "dino" and not self.disc_backbone_weights:
      raise ValueError("config.loss.adv_weight > 0 with disc='dino' needs "
                       "config.loss.disc_backbone_weights (a DINO ViT-S/16 .npz file: "
                       "python -m tdjax.convert --kind dino)")
    if self.align_weight > 0 and not self.align_teacher_weights and not self.align_from_batch:
      raise ValueError("config.loss.align_weight > 0 needs config.loss.align_teacher_weights "
                       "(a SigLIP2 teacher .npz) or config.loss.align_from_batch=True")


class DetailFlowTokenizerTask(Task):
  kind = "detailflow_tokenizer"

  def __init__(self, config):
    super().__init__(config)
    c = config
    self.image_size = int(c.input.image_size)
    self.channels = int(c.input.channels)
    self.dtype = jnp.dtype(c.compute_dtype)
    self.model = build_tokenizer(c.model, self.image_size, self.channels, self.dtype)
    self.N, self.g, self.causal_num = self.model.num_tokens, self.model.group, self.model.c
    self.recipe = r = configlib.from_config(Recipe, c.model, "config.model")
    self.self_correction = r.self_correction and self.model.is_vq
    self.plan = PrefixPlan(self.N, self.g, self.image_size, self.model.patch, r.alpha,
                           r.degrade_p, self.causal_num)
    self.losses = l = configlib.from_config(Losses, c.loss, "config.loss")
    self.use_lpips = l.lpips_weight > 0
    self.use_adv = l.adv_weight > 0
    self.use_align = l.align_weight > 0
    if self.use_align and not self.model.align_dim:
      raise ValueError("config.loss.align_weight > 0 needs config.model.align_dim > 0")
    self._lpips = self._disc = self._teacher = None
    if self.use_lpips:
      self._lpips = lpips.LPIPS(**l.lpips_kwargs)
    if self.use_adv:
      disc = D.DinoDiscriminator if l.disc == "dino" else D.PatchGAN
      self._disc = disc(**l.disc_kwargs)
    if self.use_align and l.align_teacher_weights:
      # the tower's dimensions: teacher_kwargs, else read from the weights file's shapes
      self._teacher = alignment.ViTTeacher(**(l.teacher_kwargs or
                                              alignment.teacher_shape(l.align_teacher_weights)))
      if self._teacher.width != self.model.align_dim:
        raise ValueError(f"config.model.align_dim={self.model.align_dim}: the alignment teacher "
                         f"{l.align_teacher_weights!r} is {self._teacher.width} wide")

  # -------------------------------------------------------------------------------------------
  def _dummy(self, b=1):
    return jnp.zeros((b, self.image_size, self.image_size, self.channels), jnp.float32)

  def init(self, rng):
    """Random initial params and state.  The frozen networks (LPIPS, the alignment teacher, the
    DINO backbone) get random values of their shapes and logical axes here; their files are read
    on the host after init (`load_pretrained`, `load_frozen`), never compiled into it."""
    k_gen, k_disc, k_frozen = jax.random.split(rng, 3)
    variables = self.model.init({"params": k_gen}, self._dummy())
    params = {"gen": variables["params"]}
    state = {"vq_stats": variables.get("vq_stats", {})}
    frozen = {}
    if self._disc is not None:
      dvars = self._disc.init(k_disc, self._dummy(2), train=False)
      params["disc"] = dvars["params"]
      state["disc"] = {k: v for k, v in dvars.items() if k != "params"}
      state["lecam"] = D.init_lecam_ema()
    if self._lpips is not None:
      x = jnp.zeros((1, 16, 16, 3))
      frozen["lpips"] = self._lpips.init(k_frozen, x, x)["params"]
    if self._teacher is not None:
      s = self._teacher.patch_size * self._teacher.pos_grid
      frozen["teacher"] = self._teacher.init(k_frozen, jnp.zeros((1, s, s, 3)))["params"]
    if frozen:
      state["frozen"] = frozen
    return params, state

  def load_pretrained(self, params):
    """The SigLIP2 encoder initialisation (1.2) and the DINO discriminator's backbone."""
    l = self.losses
    path = self.recipe.encoder_init
    dino = self._disc is not None and l.disc == "dino"
    if not path and not dino:
      return params
    params = dict(params)
    if path:
      params["gen"] = siglip2.init_encoder_from_siglip2(parallel.to_host(params["gen"]), path)
    if dino:
      params["disc"] = D.with_backbone(params["disc"], D.load_dino_backbone(
          l.disc_backbone_weights, self._disc, strict=False))
    return params

  def load_frozen(self, model_state):
    """The LPIPS-VGG and alignment-teacher weights files into model_state['frozen']."""
    if "frozen" not in model_state:
      return model_state
    l = self.losses
    frozen = dict(model_state["frozen"])
    if "lpips" in frozen:
      frozen["lpips"] = self._lpips.load_params(l.lpips_weights)
    if "teacher" in frozen:
      frozen["teacher"] = alignment.load_teacher_params(l.align_teacher_weights, self._teacher)
    return {**model_state, "frozen": frozen}

  def analytic_flops(self, batch) -> float:
    """Train-step FLOPs of a full-resolution step (the largest decoder branch): the tokenizer's
    3 x forward, forward = encoder ViT over P + N tokens + decoder ViT over P + N tokens + patch
    embed and pixel head, with a ViT of depth L, width D, MLP F over T tokens
    = 2 T L (4 D^2 + 2 D F) + 4 L T^2 D.  Self-correction doubles the decoder batch and adds the
    second encoder pass over the N queries only (the patches' keys/values reused): per layer,
    projections and MLP on N tokens, attention N x (P + N).  Plus the frozen loss networks on
    the n decoded images (`_loss_net_flops`) and the alignment teacher's forward pass on the b
    images (when it runs in the step); the PatchGAN, resizes and augmentations are not counted."""
    m = self.model
    b = int(np.shape(batch["image"])[0])
    p_tok, n = (self.image_size // m.patch) ** 2, self.N
    t = p_tok + n
    vit = lambda d, l, f: 2 * t * l * (4 * d * d + 2 * d * f) + 4 * l * t * t * d
    pix = m.patch * m.patch * self.channels
    d, l, f = m.enc_width, m.enc_depth, m.enc_mlp
    enc = vit(d, l, f) + 2 * p_tok * pix * d
    dec = vit(m.dec_width, m.dec_depth, m.dec_mlp) + 2 * p_tok * m.dec_width * pix
    teacher = b * self._teacher.flops(self.image_size, self.image_size) if (
        self._teacher is not None and "teacher_feats" not in batch) else 0.0
    if not self.self_correction:
      return float(3 * b * (enc + dec)) + self._loss_net_flops(b) + teacher
    enc2 = 2 * n * l * (4 * d * d + 2 * d * f) + 4 * l * n * t * d
    return float(3 * b * (enc + enc2 + 2 * dec)) + self._loss_net_flops(2 * b) + teacher

  def _loss_net_flops(self, n: int) -> float:
    """LPIPS and the DINO discriminator on n decoded images of the full resolution.

    LPIPS: trunk forward on the reconstructions and on the targets + the reconstructions' input
    gradient (its weights are frozen) = 3 trunk passes.  DINO (backbone frozen, input resized to
    its img_size): the generator term's pass and its input gradient (matmuls 1x, attention
    products 2x, heads 1x; D's params are constants there), then each D pass (real, fake, and
    with consistency regularisation the two strongly augmented ones) on stopped images: backbone
    forward only, heads forward + weight gradients + input gradients below conv_in."""
    total = 0.0
    if self._lpips is not None:
      s = max(self.image_size, lpips.MIN_SIZE)
      total += 3 * n * lpips.vgg16_flops(s, s, widths=self._lpips.widths)
    if self._disc is not None and hasattr(self._disc, "flops"):
      f = self._disc.flops()
      d_calls = 4 if self.losses.cr_weight > 0 else 2
      g_term = 2 * f["backbone_mm"] + 3 * f["backbone_attn"] + 2 * f["heads"]
      d_term = f["backbone_mm"] + f["backbone_attn"] + 3 * f["heads"] - f["heads_conv_in"]
      total += n * (g_term + d_calls * d_term)
    return float(total)

  def param_groups(self, params):
    if "disc" not in params:
      return None
    return {k: jax.tree.map(lambda _: "disc" if k == "disc" else "gen", v)
            for k, v in params.items()}

  # -------------------------------------------------------------------------------------------
  def _lpips_fn(self, frozen, x, y):
    if min(x.shape[1:3]) < 16:  # LPIPS needs >= 16 px; small prefixes are compared upsampled
      s = 16
      mh = bicubic_matrix(x.shape[1], s)
      x, y = apply_separable(x, mh), apply_separable(y, mh)
    return self._lpips.apply({"params": frozen["lpips"]}, x, y)

  def _disc_size(self) -> int | None:
    """The fixed side D's inputs are resized to (DINO: its img_size), or None: as decoded."""
    if self._disc is None:
      return None
    if hasattr(self._disc, "img_size"):
      return int(self._disc.img_size)
    return self.losses.disc_input_size or None

  def _to_disc_input(self, x):
    """Resizes as D's input path does: bicubic to disc_input_size if set, then a DINO backbone's
    resize to its img_size (PyTorch 'area' down / 'bicubic' up; done here, it is a no-op inside
    the backbone, whose per-channel normalisation commutes with it: the rows sum to 1)."""
    x = x.astype(jnp.float32)
    size = self.losses.disc_input_size
    if size and x.shape[1] != size:
      x = apply_separable(x, bicubic_matrix(x.shape[1], size), bicubic_matrix(x.shape[2], size))
    if hasattr(self._disc, "img_size"):
      x = D.resize_torch(x, (self._disc.img_size, self._disc.img_size))
    return x

  def _disc_apply(self, dparams, dstate, x):
    """Discriminator logits in train mode; returns (logits [B, ...], new non-param state)."""
    mutable = list(dstate.keys())
    logits, new = self._disc.apply({"params": dparams, **dstate}, x, train=True, mutable=mutable)
    return logits.reshape(logits.shape[0], -1), dict(new)

  def _augment(self, x, rng, policy=None, prob=None):
    l = self.losses
    policy = l.diffaug_policy if policy is None else policy
    prob = float(l.diffaug_prob if prob is None else prob)
    if not policy or prob <= 0:
      return x
    return augment.diff_augment(x, rng, policy, prob)

  def _disc_views(self, rec, target, rng):
    """D's inputs, augmented at the decoded resolution and resized to D's: the generator term's
    weakly augmented fakes (with gradient), the D step's real and fake (stopped), and with
    consistency regularisation both again strongly augmented."""
    sg = jax.lax.stop_gradient
    k1, k2, k3, k4, k5 = jax.random.split(rng, 5)
    views = dict(g=self._augment(rec, k1), real=self._augment(sg(target), k2),
                 fake=self._augment(sg(rec), k3))
    if self.losses.cr_weight > 0:
      strong = (self.losses.cr_policy, 1.0)
      views.update(real_s=self._augment(sg(target), k4, *strong),
                   fake_s=self._augment(sg(rec), k5, *strong))
    return {k: self._to_disc_input(v) for k, v in views.items()}

  def _disc_terms(self, params, state, views, step):
    """Reference VQLoss: the generator step's D(fake), then the discriminator step's D(real) and
    D(fake) as separate calls (each batch normalised by its own batch statistics, one power
    iteration per call), then, with consistency regularisation, D on the strongly augmented real
    and fake images.  D's state (power-iteration vectors, BN running stats) and the LeCAM EMAs
    advance every step, before adv_start too, as the reference's forward passes do."""
    l = self.losses
    sg = jax.lax.stop_gradient
    on = _lerp_on(step, l.adv_start)
    # generator term: D's params are constants here.
    fake_logits_g, dstate = self._disc_apply(sg(params["disc"]), state["disc"], views["g"])
    out = dict(g_loss=D.hinge_g_loss(fake_logits_g) * on)
    # discriminator term: the generator's output is a constant here (the views are stopped).
    real, dstate = self._disc_apply(params["disc"], dstate, views["real"])
    fake, dstate = self._disc_apply(params["disc"], dstate, views["fake"])
    d = D.hinge_d_loss(real, fake)
    lw = float(l.lecam_weight)
    lecam = jnp.zeros(())
    ema = state["lecam"]
    if lw > 0:   # the reference updates the EMAs first, then regularises towards them
      r, f = D.update_lecam_ema(ema["real"], ema["fake"], real, fake,
                                l.lecam_decay)
      ema = {"real": r, "fake": f}
      lecam = D.lecam_reg(real, fake, r, f)
    cw = float(l.cr_weight)
    cr = jnp.zeros(())
    if cw > 0:   # MSE(D(weak) - D(strong)) over the real and the fake logits together
      real_s, dstate = self._disc_apply(params["disc"], dstate, views["real_s"])
      fake_s, dstate = self._disc_apply(params["disc"], dstate, views["fake_s"])
      cr = D.consistency_loss(jnp.concatenate([real, fake]), jnp.concatenate([real_s, fake_s]))
    # reference: disc_weight * (hinge + lecam_weight * LeCAM) + cr_weight * CR, all from disc_start
    d_loss = float(l.adv_weight) * (d + lw * lecam) + cw * cr
    out.update(d_loss=d_loss * on, lecam=lecam, cr=cr, logits_real=jnp.mean(sg(real)),
               logits_fake=jnp.mean(sg(fake)))
    return out, {"disc": dstate, "lecam": ema}

  def _image_losses(self, res, mats, params, state, codes, t, row, x, w, step, rng):
    """Decode at static `res` and compute the image-space loss terms (one switch branch).

    D's passes run here only when D sees the decoded resolution; when it sees a fixed size (the
    DINO disc: 224), the branch returns D's views (`out['views']`) and `_loss` runs D once after
    the switch: the 14 decoder branches of DetailFlow-16 then hold no copy of D's five passes
    (compile time of the paper step: minutes instead of not finishing in 25 min for 256 devices)."""
    rec = self.model.apply({"params": params["gen"]}, codes, res, t, method="decode")
    M = jnp.asarray(mats)[row]
    target = apply_separable(x.astype(jnp.float32), M)
    reps = rec.shape[0] // x.shape[0]
    target = jnp.concatenate([target] * reps, axis=0)
    wsum = jnp.maximum(jnp.sum(w), 1.0)
    mse = jnp.sum(w * jnp.mean((rec - target) ** 2, axis=(1, 2, 3))) / wsum
    out = dict(mse=mse, lpips=jnp.zeros(()))
    new_state = {k: state[k] for k in ("disc", "lecam") if k in state}
    if self._lpips is not None:
      out["lpips"] = jnp.sum(w * self._lpips_fn(state["frozen"], rec, target)) / wsum
    if self._disc is not None:
      views = self._disc_views(rec, target, rng)
      if self._disc_size() is None:
        d_out, new_state = self._disc_terms(params, state, views, step)
        out.update(d_out)
      else:
        out["views"] = views
    return out, new_state

  def _prefix_length(self, rng):
    k_t = jax.random.split(rng, 4)[0]
    return sample_prefix_length(k_t, self.N, self.g, self.recipe.degrade_p, self.causal_num)

  def _sc_switched(self) -> bool:
    return self.self_correction and self.recipe.correction_every > 1

  def loss_branch(self, rng, step):
    """With config.model.branch_grads: one branch per (decoder resolution, self-correction on)."""
    if not self.recipe.branch_grads:
      return None
    res_i = jnp.asarray(self.plan.branch_of_t)[self._prefix_length(rng)]
    if not self._sc_switched():
      return res_i, len(self.plan.branches)
    sc = (jnp.asarray(step) % self.recipe.correction_every == 0).astype(jnp.int32)
    return 2 * res_i + sc, 2 * len(self.plan.branches)

  def loss(self, params, model_state, batch, rng, step, branch: int | None = None):
    if branch is not None:  # static: decoder resolution (and self-correction) fixed for this trace
      res_i, sc = divmod(branch, 2) if self._sc_switched() else (branch, self.self_correction)
      return self._loss(params, model_state, batch, rng, step, bool(sc), res_i)
    if not self._sc_switched():
      return self._loss(params, model_state, batch, rng, step, self.self_correction)
    return jax.lax.cond(
        step % self.recipe.correction_every == 0,
        lambda *a: self._loss(*a, self_correction=True),
        lambda *a: self._loss(*a, self_correction=False),
        params, model_state, batch, rng, step)

  def _loss(self, params, model_state, batch, rng, step, self_correction, res_branch=None):
    l = self.losses
    x = batch["image"].astype(jnp.float32)
    b = x.shape[0]
    k_t, k_tok, k_img, k_align = jax.random.split(rng, 4)
    t = self._prefix_length(rng)
    tok, new_vq = self.model.apply(
        {"params": params["gen"], "vq_stats": model_state.get("vq_stats", {})}, x, t, k_tok,
        method="tokenize_train", mutable=["vq_stats"], self_correction=self_correction)
    if tok["z_q_sc"] is not None:
      codes = jnp.concatenate([tok["z_q"], tok["z_q_sc"]], axis=0)
      w = jnp.concatenate([jnp.ones((b,)), jnp.broadcast_to(tok["sc_on"].astype(jnp.float32), (b,))])
    else:
      codes, w = tok["z_q"], jnp.ones((b,))
    branch = jnp.asarray(self.plan.branch_of_t)[t]
    row = jnp.asarray(self.plan.row_of_t)[t]
    fns = [(lambda ops, res=res, mats=mats: self._image_losses(res, mats, *ops))
           for res, mats in zip(self.plan.branches, self.plan.matrices)]
    ops = (params, model_state, codes, t, row, x, w, step, k_img)
    if res_branch is not None:  # the loop chose the branch (loss_branch); same t, same rng
      img, new_state = fns[res_branch](ops)
    elif len(fns) == 1:
      img, new_state = fns[0](ops)
    else:
      img, new_state = jax.lax.switch(branch, fns, ops)

    if "views" in img:   # D sees a fixed size: its passes run once, outside the decoder branches
      d_out, d_state = self._disc_terms(params, model_state, img.pop("views"), step)
      img.update(d_out)
      new_state = dict(new_state, **d_state)
    mse_w = float(l.mse_weight)
    total = mse_w * img["mse"] + tok["bottleneck_loss"]
    metrics = dict(rec_mse=img["mse"], bottleneck_loss=tok["bottleneck_loss"],
                   prefix_t=t.astype(jnp.float32),
                   dec_res=jnp.asarray(self.plan.branches, jnp.float32)[branch],
                   sc_on=tok["sc_on"].astype(jnp.float32), **tok["metrics"])
    if self.self_correction:  # same metric keys whichever branch of `loss` ran
      metrics.setdefault("sc_vq_loss", jnp.zeros(()))
      metrics.setdefault("noise_end", jnp.zeros(()))
    if self._lpips is not None:
      lw = float(l.lpips_weight) * _lerp_on(step, l.lpips_start, l.lpips_warmup)
      total = total + lw * img["lpips"]
      metrics["lpips"] = img["lpips"]
    if self._disc is not None:
      total = total + float(l.adv_weight) * img["g_loss"] + img["d_loss"]
      metrics.update(g_loss=img["g_loss"], d_loss=img["d_loss"], lecam=img["lecam"], cr=img["cr"],
                     logits_real=img["logits_real"], logits_fake=img["logits_fake"])
    if self.use_align:
      pred = self.model.apply({"params": params["gen"]}, tok["z_q"][:, 0], method="align")
      feats = self._teacher_feats(model_state, batch, x)
      al = alignment.alignment_loss(pred, feats)
      total = total + float(l.align_weight) * _lerp_on(step, l.align_start) * al
      metrics["align_loss"] = al
    new_model_state = dict(model_state)
    new_model_state.update(new_state)
    if self.model.is_vq and "quantizer" in new_vq.get("vq_stats", {}):
      new_model_state["vq_stats"] = new_vq["vq_stats"]
      counts = new_vq["vq_stats"]["quantizer"]["counts"]
      metrics["codebook_usage"] = jnp.mean((counts > 0.5).astype(jnp.float32))
    return total, (metrics, new_model_state)

  def _teacher_feats(self, model_state, batch, x):
    if "teacher_feats" in batch:
      return batch["teacher_feats"]
    xt = x if x.shape[-1] == 3 else jnp.repeat(x, 3, axis=-1)
    return alignment.teacher_features(self._teacher, model_state["frozen"]["teacher"], xt)

  # -------------------------------------------------------------------------------------------
  def reconstruct(self, params, images, num_tokens: int | None = None, res: int | None = None):
    """Images [B, H, W, C] -> reconstructions from the first `num_tokens` codes at `res`
    (default: dec_res(num_tokens)); eval mode, no noise."""
    gen = params["gen"] if "gen" in params else params
    n = self.N if num_tokens is None else num_tokens
    if res is None:
      res = decoder_resolution(resolution_for_prefix(n, self.N, self.image_size, self.recipe.alpha),
                               self.model.patch)
    z = self.model.apply({"params": gen}, images, method="encode")
    q = self.model.apply({"params": gen}, z, method="quantize")
    return self.model.apply({"params": gen}, q["z_q"][:, :n], res, method="decode")

  def make_encode_fn(self, params, seed: int = 0, views_per_batch: int = 1):
    """`encode_fn(images, call) -> (clean, ar_input, ar_label)` numpy int32 [B, N] for
    `tdjax.data.codes.extract_codes` (eval mode, reference 1.6 step 7).

    The noise key is fold_in(seed, call // views_per_batch), so the views of one batch (calls
    batch x views + view) share each image's noise position (the reference draws one per image
    for its ten crops)."""
    gen = params["gen"] if "gen" in params else params
    f = jax.jit(lambda g, x, k: self.model.apply({"params": g}, x, k, method="encode_for_ar"))
    base = jax.random.key(seed)

    def encode_fn(images, call):
      k = jax.random.fold_in(base, call // max(views_per_batch, 1))
      out = f(gen, jnp.asarray(images, jnp.float32), k)
      return tuple(np.asarray(a, np.int32) for a in out)

    return encode_fn

  def eval_metrics(self, params, model_state, batch, rng):
    x = batch["image"].astype(jnp.float32)
    gen = params["gen"]
    z = self.model.apply({"params": gen}, x, method="encode")
    q = self.model.apply({"params": gen}, z, method="quantize")
    rec = self.model.apply({"params": gen}, q["z_q"], method="decode")
    out = dict(mse=jnp.mean((rec - x) ** 2), psnr=jnp.mean(psnr01(rec, x)))
    if "indices" in q:
      k = self.model.codebook_size
      used = jnp.zeros((k,), jnp.float32).at[q["indices"].reshape(-1)].add(1.0)
      out["batch_codebook_usage"] = jnp.mean((used > 0).astype(jnp.float32))
      counts = model_state.get("vq_stats", {}).get("quantizer", {}).get("counts")
      if counts is not None:
        out["codebook_usage"] = jnp.mean((counts > 0.5).astype(jnp.float32))
    return out

  def prefix_lengths_for_strip(self):
    ns, n = [], 1
    while n < self.N:
      ns.append(n)
      n *= 2
    return ns + [self.N]

  def images(self, params, model_state, batch, rng):
    """originals, reconstructions, and a coarse-to-fine strip per image (first 8 images): row i
    = image i decoded from 1, 2, 4, ..., N tokens, each at its decoder resolution, shown
    nearest-upsampled to the image size."""
    x = batch["image"][:8].astype(jnp.float32)
    gen = params["gen"]
    z = self.model.apply({"params": gen}, x, method="encode")
    q = self.model.apply({"params": gen}, z, method="quantize")
    S = self.image_size
    rec = self.model.apply({"params": gen}, q["z_q"], method="decode")
    tiles = []
    for n in self.prefix_lengths_for_strip():
      res = decoder_resolution(resolution_for_prefix(n, self.N, S, self.recipe.alpha), self.model.patch)
      y = self.model.apply({"params": gen}, q["z_q"][:, :n], res, method="decode")
      if res != S:
        y = jax.image.resize(y, (y.shape[0], S, S, y.shape[-1]), "nearest")
      tiles.append(y)
    strip = jnp.concatenate(tiles, axis=2)
    clip = lambda a: jnp.clip(a, -1.0, 1.0)
    return {"originals": x, "reconstructions": clip(rec), "coarse_to_fine": clip(strip)}


def load_tokenizer(workdir: str, use_ema: bool = False):
  """(task, params as host arrays, config) of the latest checkpoint of a trained DetailFlow
  tokenizer run; `task.model` is the `DetailFlowTokenizer`, `params['gen']` its weights (the
  reference extracts codes and decodes with the non-EMA weights: use_ema=False)."""
  cfg, params, _ = ckpt_lib.read_params(workdir, use_ema=use_ema)
  cfg = ml_collections.ConfigDict(cfg)
  if cfg.task != DetailFlowTokenizerTask.kind:
    raise ValueError(f"{workdir} holds a {cfg.task!r} checkpoint, not a tokenizer")
  return DetailFlowTokenizerTask(cfg), params, cfg

"""TransDiff training: 1-step AR + attention diffusion decoder, or MRAR
(docs/reference/transdiff.md 1-2).

Batch: {'image': [B, H, W, C] (1-step) or [B, K, H, W, C] (MRAR, K same-class images from the
pipeline's `group_size`), 'label': [B]} in [-1, 1].  Images become latent grids [B, h, w, c] by
`config.latent`:
  kind='pixels': the identity "autoencoder", h = H / p, w = W / p, c = C p^2 (pixel patches; the
  demo's stand-in for a VAE: no demo-size VAE is trained);
  kind='cached': the batch holds 'moments' [B, (K,) h, w, 2c], the VAE posterior's mean and
  logvar from a latent cache (`tdjax.data.latents`, the reference's main_cache.py; input.source
  'latents'); the step draws the posterior sample x scale (full-size configs, AOT);
  kind='vae': images encoded in the step by the KL VAE of `latent.vae_weights` (tdjax.tokenizers.
  kl_vae, converted by `tdjax.convert --kind mar_vae`), posterior samples x scale.
Both VAE kinds draw the sample the same way from the same key (`_posterior_latents`), so a cache
gives the losses that encoding in the step gives.
With `latent.vae_weights`, samples of 'vae' and 'cached' models are decoded by that VAE.
Latent grids become L = h w tokens of c features (`patchify_latent` with p = 1) for the decoder;
MRAR references use p = `ref_patch` (2).

Loss (1.5): rectified flow with `diffusion_batch_mul`, the whole network trained end to end through
the condition tokens z; MRAR: the mean over the K images of the flow loss of image k given the first
M (k + 1) condition tokens (teacher forcing with the real previous images), computed in one decoder
call with a condition mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tdjax import checkpoint as ckpt_lib
from tdjax import configlib
from tdjax import parallel
from tdjax.diffusion import ddpm, flow
from tdjax.generators import transdiff as td
from tdjax.generators.heads import make_head
from tdjax.tasks.base import GeneratorTask
from tdjax.tokenizers import kl_vae


def images_to_latent(images, latent_cfg):
  """[..., H, W, C] in [-1, 1] -> latent grid [..., H/p, W/p, C p^2] (kind 'pixels')."""
  if latent_cfg.kind != "pixels":
    raise ValueError(f"config.latent.kind={latent_cfg.kind!r}: expected 'pixels'")
  p = int(latent_cfg.patch)
  lead, (h, w, c) = images.shape[:-3], images.shape[-3:]
  x = images.reshape((-1, h, w, c))
  z = td.patchify_latent(x, p).reshape((-1, h // p, w // p, c * p * p))
  return z.reshape(lead + z.shape[1:]) * float(latent_cfg.scale)


def latent_to_images(z, latent_cfg, channels: int):
  p = int(latent_cfg.patch)
  b, h, w, _ = z.shape
  z = z / float(latent_cfg.scale)
  return td.unpatchify_latent(z.reshape(b, h * w, -1), p, h * p, w * p)


def _recomputed(stack_cfg, forward: float, batched_dots: float) -> float:
  """FLOPs a stack's remat policy recomputes in the backward pass: the whole forward, none
  (everything / every dot saved), or with 'dots_with_no_batch_dims_saveable' the products that
  have batch dimensions (attention scores and values)."""
  policy = stack_cfg.remat
  if policy in ("none", "everything_saveable", "dots_saveable"):
    return 0.0
  return batched_dots if policy == "dots_with_no_batch_dims_saveable" else forward


class TransDiffTask(GeneratorTask):
  kind = "transdiff"

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    m, c = config.model, config.input
    self.channels = int(c.channels)
    lc = config.latent
    if lc.kind == "pixels":
      p = int(lc.patch)
      if c.image_size % p:
        raise ValueError(f"input.image_size={c.image_size} is not divisible by latent.patch={p}")
      self.grid, self.latent_dim = c.image_size // p, self.channels * p * p
    elif lc.kind == "cached":   # batch['moments']: the VAE posterior's (mean, logvar), e.g. 16x16x32
      self.grid, self.latent_dim = int(lc.grid), int(lc.channels)
      if c.source == "latents" and c.data_dir:
        from tdjax.data.latents import read_meta
        meta = read_meta(c.data_dir, c.split)
        if (meta["grid"], meta["channels"]) != (self.grid, self.latent_dim):
          raise ValueError(f"input.data_dir={c.data_dir!r}: the cache holds {meta['grid']}x"
                           f"{meta['grid']}x{meta['channels']} latents, the config "
                           f"{self.grid}x{self.grid}x{self.latent_dim} (latent.grid, channels)")
    elif lc.kind == "vae":      # images encoded in the step by the KL VAE of latent.vae_weights
      if not lc.vae_weights:
        raise ValueError("config.latent.kind='vae' needs latent.vae_weights (an .npz from "
                         "python -m tdjax.convert --kind mar_vae)")
    else:
      raise ValueError(f"config.latent.kind={lc.kind!r}: expected 'pixels', 'cached' or 'vae'")
    self.cached = lc.kind == "cached"
    self.bounded_latents = lc.kind == "pixels"     # in [-1, 1]: DDPM sampling clips x0 predictions
    self.vae = None
    if lc.vae_weights:   # 'vae', or 'cached' latents decoded for pictures and sampling
      self._load_vae(lc)
    self.L = self.grid ** 2
    self.num_refs = int(m.num_refs)
    if self.num_refs and int(c.group_size) != self.num_refs + 1:
      raise ValueError(f"MRAR with num_refs={self.num_refs} needs input.group_size="
                       f"{self.num_refs + 1}, got {c.group_size}")
    # 1-step condition slots: L, except TransDiff-L 512 (reference 1.2, 4.4: `seq_len` is 256 at
    # 512 px too, so 256 conditions for the decoder's 1024 latent tokens): model.cond_tokens
    cond_tokens = int(m.cond_tokens) or self.L
    if self.num_refs and cond_tokens != self.L:
      raise ValueError(f"model.cond_tokens={cond_tokens}: MRAR conditions are L / p^2 tokens per "
                       f"image, L={self.L}; leave cond_tokens unset")
    self.ar = configlib.from_config(td.TransDiffAR, m, "config.model", latent_len=cond_tokens,
                                    latent_dim=self.latent_dim, depth=int(m.ar_depth))
    self.ar.validate()
    self.diffusion = config.diffusion
    if self.diffusion not in ("flow", "ddpm"):
      raise ValueError(f"config.diffusion={self.diffusion!r}: expected 'flow' or 'ddpm'")
    self.learn_sigma = self.diffusion == "ddpm" and bool(config.get("learn_sigma", True))
    if self.diffusion == "ddpm":
      self.ddpm_train = ddpm.Schedule.make(int(config.get("ddpm_steps", 1000)))
    head_cfg = ml_collections.ConfigDict(dict(config.head))
    head_cfg.max_len = self.L
    self.head = make_head(head_cfg, self.latent_dim * (2 if self.learn_sigma else 1))
    self.batch_mul = int(m.batch_mul)
    if self.batch_mul < 1:
      raise ValueError(f"config.model.batch_mul={self.batch_mul}: expected >= 1")
    self.head_only = bool(m.head_only)
    if self.head_only and not m.init_from:
      raise ValueError("model.head_only=True trains the decoder under a frozen AR: it needs "
                       "model.init_from (a 1-step run's workdir)")
    if m.init_from and not self.num_refs and cond_tokens == self.L:
      raise ValueError(f"model.init_from={m.init_from!r}: a 1-step model starts from a 1-step run "
                       f"only for a resolution transfer (model.cond_tokens < {self.L} latent "
                       f"tokens; config arg res=...) or as MRAR (mrar=True)")
    self.label_drop = self.ar.label_drop      # validated by the AR (config.model.label_drop)

  def _load_vae(self, lc):
    """The KL VAE (`tdjax.tokenizers.kl_vae`, config latent.vae = 'kl16' | 'demo') and its
    converted weights; its latent grid must be the one the generator is built for."""
    if lc.vae not in ("kl16", "demo"):
      raise ValueError(f"config.latent.vae={lc.vae!r}: expected 'kl16' or 'demo'")
    cfg = dataclasses.replace({"kl16": kl_vae.KL16, "demo": kl_vae.DEMO}[lc.vae],
                              scale=float(lc.scale))
    self.vae = kl_vae.AutoencoderKL(cfg)
    self.vae_params = kl_vae.load_params(lc.vae_weights)
    grid = int(self.config.input.image_size) // cfg.stride
    if lc.kind == "vae":
      self.grid, self.latent_dim = grid, cfg.embed_dim
    elif (self.grid, self.latent_dim) != (grid, cfg.embed_dim):
      raise ValueError(f"latent.vae_weights: the VAE gives {grid}x{grid}x{cfg.embed_dim} latents at "
                       f"{self.config.input.image_size} px, the config's cached latents are "
                       f"{self.grid}x{self.grid}x{self.latent_dim}")

  def _to_latent(self, images, rng=None):
    """Images -> latent grids: pixel patches, or VAE posterior samples x scale (rng given)."""
    if self.vae is not None:
      lead = images.shape[:-3]
      x = images.reshape((-1,) + images.shape[-3:])
      mean, logvar = self.vae.apply({"params": self.vae_params}, x,
                                    method=kl_vae.AutoencoderKL.encode)
      moments = jnp.concatenate([mean, logvar], axis=-1)
      return self._posterior_latents(moments.reshape(lead + moments.shape[1:]), rng)
    return images_to_latent(images, self.config.latent)

  def _posterior_latents(self, moments, rng=None):
    """(mean, logvar) [..., h, w, 2c] -> posterior samples x scale [..., h, w, c] (the mean when
    rng is None); drawn over the flattened leading axes, so any batch layout gives one draw."""
    lead = moments.shape[:-3]
    flat = moments.astype(jnp.float32).reshape((-1,) + moments.shape[-3:])
    mean, logvar = jnp.split(flat, 2, axis=-1)
    z = mean if rng is None else kl_vae.posterior_sample(mean, logvar, rng)
    scale = self.vae.cfg.scale if self.vae is not None else float(self.config.latent.scale)
    return jax.lax.stop_gradient((z * scale).reshape(lead + z.shape[1:]))

  def _to_images(self, z):
    if self.vae is not None:
      return kl_vae.latents_to_images(self.vae, self.vae_params, z)
    return latent_to_images(z, self.config.latent, self.channels)

  # --- params -----------------------------------------------------------------------------------
  def _refs(self, latents):
    """[B, K, h, w, c] -> MRAR reference tokens [B, K - 1, M, c p^2] (images 0..K-2)."""
    b, k = latents.shape[:2]
    p = self.ar.ref_patch
    r = td.patchify_latent(latents[:, :-1].reshape((-1,) + latents.shape[2:]), p)
    return r.reshape(b, k - 1, r.shape[1], r.shape[2])

  def init(self, rng):
    k1, k2 = jax.random.split(rng)
    labels = jnp.zeros((1,), jnp.int32)
    refs = None
    if self.num_refs:
      refs = jnp.zeros((1, self.num_refs, self.ar.mask_len,
                        self.latent_dim * self.ar.ref_patch ** 2))
    ar = self.ar.init(k1, labels, refs)["params"]
    cond_len = self.ar.mask_len * (1 + self.num_refs)
    x = jnp.zeros((1, self.L, self.latent_dim))
    head = self.head.init(k2, x, jnp.zeros((1,)), jnp.zeros((1, cond_len, self.ar.width)))["params"]
    return {"ar": ar, "head": head}, {}

  def load_pretrained(self, params):
    """A fresh start from a 1-step run (`model.init_from`, its workdir; its EMA weights, raw if it
    has none): MRAR fine-tuning (reference 2.3) puts its AR through `mrar_from_one_step` and copies
    the head; a resolution transfer (reference stage 2b, 256 -> 512 px: this model denoises more
    latent tokens than the source, from the source's condition slots) copies the AR and resizes
    the head's position table (`head_for_resolution`).  A restored run keeps its own weights."""
    src = self.config.model.init_from
    if not src:
      return params
    cfg, one, _ = ckpt_lib.read_params(src)        # host arrays: its EMA weights, if any
    cfg = ml_collections.ConfigDict(cfg)
    if cfg.task != self.kind or int(cfg.model.get("num_refs", 0)):
      raise ValueError(f"model.init_from={src!r} holds a {cfg.task!r} checkpoint with "
                       f"num_refs={cfg.model.get('num_refs')}; expected a 1-step TransDiff run")
    task = TransDiffTask(cfg)
    params = parallel.to_host(params)   # on every process (sharded over several: a gather)
    try:
      if self.num_refs:
        return {"ar": td.mrar_from_one_step(one["ar"], params["ar"]),
                "head": td.copy_checked(one["head"], params["head"], "head")}
      if task.ar.latent_len != self.ar.latent_len:
        raise ValueError(f"it has {task.ar.latent_len} condition slots, this model "
                         f"{self.ar.latent_len} (model.cond_tokens)")
      return {"ar": td.copy_checked(one["ar"], params["ar"], "ar"),
              "head": td.head_for_resolution(one["head"], params["head"], task.grid, self.grid)}
    except ValueError as e:
      raise ValueError(f"model.init_from={src!r}: {e}") from None

  def param_groups(self, params):
    """model.head_only (reference `--only_train_diff`, the 512 px stage): the AR is frozen."""
    if not self.head_only:
      return None
    return {"ar": jax.tree.map(lambda _: "frozen", params["ar"]),
            "head": jax.tree.map(lambda _: "head", params["head"])}

  def example_batch(self, batch_size: int, seed: int = 0) -> dict:
    """Random inputs of the training shapes (benchmarks, AOT compilation)."""
    rng = np.random.default_rng(seed)
    group = (self.num_refs + 1,) if self.num_refs else ()
    if self.cached:
      key, shape = "moments", (self.grid, self.grid, 2 * self.latent_dim)
    else:
      size = int(self.config.input.image_size)
      key, shape = "image", (size, size, self.channels)
    return {key: rng.normal(size=(batch_size,) + group + shape).astype(np.float32),
            "label": rng.integers(0, int(self.config.model.num_classes), (batch_size,)).astype(
                np.int32)}

  def head_forward_flops(self, cond_len: int | None = None) -> tuple[float, float, float, float]:
    """The diffusion head's forward FLOPs (`analytic_flops` describes the model): (per copy of
    x_t: the head over L tokens, of which attention scores / values; per example, shared by its
    copies: the condition embedding, the cross-attention keys / values in the blocks), with
    `cond_len` condition tokens (default: all, M (1 + K); MRAR's sampling round k has M (k + 1))."""
    ar, hc = self.ar, self.config.head
    d = ar.width
    w, n, l = hc.width, hc.depth, self.L
    m = cond_len or ar.mask_len * (1 + self.num_refs)
    fh = int(hc.mlp_ratio * w)
    head_attn = 0
    attn_head = hc.type == "attention"     # its survey switches read off the built module
    linear = attn_head and self.head.self_attn_kind == "linear"
    # per example, not per copy (the head embeds the condition, and projects the cross-attention's
    # keys and values, once for the batch_mul x K copies that share it): cond_embed, cross k/v
    shared, shared_in_blocks = 2 * m * d * w, 0
    if attn_head and self.head.conditioning in ("joint", "incontext"):
      tt, hd = l + m, w // int(hc.num_heads)
      head_attn = n * (4 * tt * w * hd + 4 * tt * w if linear
                       else 4 * tt * tt * w)
      head = n * 2 * tt * (4 * w * w + 2 * w * fh) + head_attn
    elif attn_head:
      r = min(self.head.token_merge, l // 2)
      ls, hd = l - r, w // int(hc.num_heads)
      cross = self.head.conditioning == "cross"     # 'adaln': no cross-attention
      scores = 4 * l * w * hd + 4 * l * w if linear else \
          4 * ls * ls * w + (l * l * w // 2 if r else 0)
      head_attn = n * (scores + (4 * l * m * w if cross else 0))
      cross_q_out = 2 * w * w if cross else 0      # the cross-attention's q and out projections
      head = n * (2 * ls * 4 * w * w + 2 * l * (cross_q_out + 2 * w * fh)) + head_attn
      if self.head.conditioning == "adaln":     # the modulation is per token: Linear_6D per token
        head += 2 * l * 6 * w * w * (n if self.head.adaln_mode == "zero" else 1)
      shared_in_blocks = n * 2 * m * 2 * w * w if cross else 0   # its keys and values
    else:   # MLP head, per token: 2 dense w x w + adaLN w x 3w per block, final adaLN w x 2w
      head = l * (n * (2 * 2 * w * w + 2 * 3 * w * w) + 2 * 2 * w * w)
      shared = l * 2 * d * w
    return head, head_attn, shared, shared_in_blocks

  def sampling_step_flops(self, cfg: float = 1.0, pag_scale: float = 0.0) -> float:
    """Forward FLOPs per image of one sampling step (MRAR: averaged over its K + 1 rounds, round k
    with its M (k + 1) condition tokens): a head call per guidance branch (conditional;
    + unconditional when cfg != 1; + the perturbed branch when pag_scale > 0).  The condition's
    embedding and cross-attention keys / values are not in it: they do not change across the
    steps, and the compiled sampler computes them once per image and round (XLA hoists them out
    of the step loop; a test checks it)."""
    cond_lens = ([self.ar.mask_len * k for k in range(1, self.num_refs + 2)] if self.num_refs
                 else [None])
    head = np.mean([self.head_forward_flops(m)[0] for m in cond_lens])
    branches = 1 + (float(cfg) != 1.0) + (float(pag_scale) > 0)
    return float(branches * head)

  def analytic_flops(self, batch) -> float:
    """3 x forward (the AR 1 x with head_only), + what remat recomputes (`_recomputed`).
    AR: ViT over T = buffer + slots tokens; decoder (x batch_mul, x K for MRAR) over L tokens:
    self-attention 4 D^2 + cross q/out 2 D^2 + MLP 2 D F per token, scores/values 4 L^2 D +
    4 L M D; once per example (shared by its copies): cond_embed 2 M D^2, cross k/v 2 D^2 per
    condition token and block.  adaLN conditioning: no cross-attention, the time + condition
    modulation (Linear_6D, per block with adaLN-zero) per token.
    Survey switches of the head (heads.py): token_merge r: the self-attention's projections and
    scores on L - r tokens (+ L^2 D / 2 for the matching); self_attn_kind='linear': 4 L D hd +
    4 L D for phi(K)^T V, phi(Q) S and the normaliser instead of 4 L^2 D; conditioning='joint'
    (and 'incontext'): blocks on L + M tokens (projections, MLPs, scores 4 (L + M)^2 D), no
    cross-attention;
    'window' counts as full attention (the boolean mask computes every score; a local kernel
    would need L w^2 pairs); qk_norm, gates, t range, temperature and adaLN-zero's per-block
    Linear_6D (one per example, not per token) are below the model's resolution."""
    ar = self.ar
    b = int(np.shape(batch["label"])[0])
    d, f, t = ar.width, int(ar.mlp_ratio * ar.width), ar.seq_len
    ar_attn = 4 * ar.depth * t * t * d
    ar_f = 2 * t * ar.depth * (4 * d * d + 2 * d * f) + ar_attn
    head, head_attn, shared, shared_in_blocks = self.head_forward_flops()
    hc = self.config.head
    copies = self.batch_mul * (self.num_refs + 1)
    ar_total = ar_f if self.head_only else 3 * ar_f + _recomputed(self.config.model, ar_f, ar_attn)
    per_example = 3 * (shared + shared_in_blocks) + _recomputed(hc, shared_in_blocks, 0)
    return float(b * (ar_total + per_example
                      + copies * (3 * head + _recomputed(hc, head, head_attn))))

  # --- loss -------------------------------------------------------------------------------------
  def _head(self, params, x, t, cond, cond_mask=None, rng=None, train=False, pag=False):
    """The head on (x_t, t): t in [0, 1] (flow, scaled to the 0..1000 the embedder expects) or the
    integer DDPM step index 0..T-1.  pag: the perturbed branch of perturbed-attention guidance
    (attention heads: identity self-attention maps)."""
    rngs = {"dropout": rng} if train and rng is not None else {}
    t = t if self.diffusion == "ddpm" else t * 1000.0
    kw = {"pag": True} if pag else {}
    return self.head.apply({"params": params["head"]}, x, t, cond, cond_mask,
                           deterministic=not train, rngs=rngs, **kw)

  def _diffusion_loss(self, model_fn, x0, cond, rng):
    """Rectified flow (TransDiff) or MAR's DDPM hybrid loss; model_fn(x_t, t, cond)."""
    if self.diffusion == "ddpm":
      # the MLP head denoises each token on its own: a step per token, as MAR's DiffLoss
      return ddpm.training_loss(self.ddpm_train, model_fn, x0, cond, rng, batch_mul=self.batch_mul,
                                learn_sigma=self.learn_sigma,
                                per_token_t=self.config.head.type == "mlp")
    return flow.flow_matching_loss(model_fn, x0, cond, rng, batch_mul=self.batch_mul)

  def _losses(self, params, batch, rng, train):
    k_drop, k_ar, k_flow, k_head = jax.random.split(rng, 4)
    labels = batch["label"]
    k_vae = None
    if self.cached or self.vae is not None:      # one posterior draw, from the same key
      k_flow, k_vae = jax.random.split(k_flow)
    if self.cached:
      lat = self._posterior_latents(batch["moments"], k_vae)
    else:
      lat = self._to_latent(batch["image"].astype(jnp.float32), k_vae)
    drop = (jax.random.uniform(k_drop, labels.shape) < self.label_drop) if train else None
    rngs = {"dropout": k_ar} if train else {}
    if not self.num_refs:
      z = self.ar.apply({"params": params["ar"]}, labels, drop=drop, deterministic=not train,
                        rngs=rngs)
      x0 = lat.reshape(lat.shape[0], self.L, self.latent_dim)
      fn = lambda x, t, c: self._head(params, x, t, c, None, k_head, train)
      return self._diffusion_loss(fn, x0, z, k_flow)
    # MRAR: one AR pass (block-causal), K decoder problems stacked on the batch axis
    b, k = lat.shape[:2]
    z = self.ar.apply({"params": params["ar"]}, labels, self._refs(lat), drop=drop,
                      deterministic=not train, rngs=rngs)
    m = self.ar.mask_len
    x0 = lat.transpose(1, 0, 2, 3, 4).reshape(k * b, self.L, self.latent_dim)
    cond = z          # the K images share their example's condition (the head: row i mod B)
    img = jnp.repeat(jnp.arange(k), b)
    cmask = jnp.arange(z.shape[1])[None] < (m * (img + 1))[:, None]
    fn = lambda x, t, c: self._head(params, x, t, c["z"], c["mask"], k_head, train)
    return self._diffusion_loss(fn, x0, {"z": cond, "mask": cmask}, k_flow)

  def loss(self, params, model_state, batch, rng, step, branch=None):
    if self.head_only:   # no AR backward pass (its optimiser group is frozen too)
      params = {**params, "ar": jax.lax.stop_gradient(params["ar"])}
    loss, metrics = self._losses(params, batch, rng, True)
    return loss, (metrics, model_state)

  def eval_metrics(self, params, model_state, batch, rng):
    loss, metrics = self._losses(params, batch, rng, False)
    return {"diffusion_loss" if self.diffusion == "ddpm" else "flow_loss": loss}

  # --- sampling ---------------------------------------------------------------------------------
  def sample_latents(self, params, labels, rng, *, cfg=1.0, steps=100, scale_0=1.0, scale_1=1.0,
                     sampler="euler_maruyama", temperature=1.0, clip_denoised=None,
                     pag_scale=0.0):
    """Labels [B] -> latent grids [B, h, w, c] (MRAR: K rounds from one initial noise, 2.4).
    Flow models: Euler-Maruyama (scale_0, scale_1) or Euler; DDPM models: ancestral sampling
    over `steps` respaced steps with `temperature`, x0 predictions clipped to [-1, 1] when
    `clip_denoised` (default: for pixel latents, not for VAE latents, as MAR).
    pag_scale > 0 (attention heads): perturbed-attention guidance, one more head call per step on
    the conditional batch with identity self-attention maps, v = v_u + cfg (v_c - v_u) +
    pag_scale (v_c - v_pag) (`flow.pag_guided`; DDPM: on eps)."""
    if clip_denoised is None:
      clip_denoised = self.bounded_latents
    pag_scale = float(pag_scale)
    if pag_scale and (self.config.head.type != "attention" or not self.head.self_attention):
      raise ValueError(f"pag_scale={pag_scale}: perturbed-attention guidance perturbs the "
                       f"attention head's self-attention (head type={self.config.head.type!r})")
    params = jax.tree.map(jnp.asarray, params)
    b = labels.shape[0]
    k_noise, k_s = jax.random.split(rng)
    noise = jax.random.normal(k_noise, (b, self.L, self.latent_dim))
    null = jnp.full_like(labels, -1)

    def run(refs, rnd):
      ar = lambda lab: self.ar.apply({"params": params["ar"]}, lab, refs)
      z = ar(labels)
      if cfg != 1:
        z = jnp.concatenate([z, ar(null)])

      def vf(x, t):
        if cfg == 1:
          v = self._head(params, x, t, z)
          return pag(v, x, t) if pag_scale else v
        v = self._head(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]), z)
        return (pag(v[:b], x, t) if pag_scale else v[:b]), v[b:]

      def pag(v_cond, x, t):
        v_pag = self._head(params, x, t, z[:b], pag=True)
        return flow.pag_guided(v_cond, v_pag, pag_scale, cfg,
                               self.latent_dim if self.learn_sigma else None)

      key = jax.random.fold_in(k_s, rnd)
      if self.diffusion == "ddpm":
        sched = ddpm.Schedule.make(self.ddpm_train.num_steps, int(steps))
        return ddpm.p_sample_loop(sched, vf, noise, key, cfg=cfg, temperature=temperature,
                                  learn_sigma=self.learn_sigma, clip_denoised=bool(clip_denoised))
      if sampler == "euler":
        return flow.euler_sample(vf, noise, steps=steps, cfg=cfg)
      return flow.euler_maruyama_sample(vf, noise, key, steps=steps, cfg=cfg, scale_0=scale_0,
                                        scale_1=scale_1)

    if not self.num_refs:
      x = run(None, 0)
    else:
      # Round k (0..K) conditions on the k images generated before, as the reference's sampler
      # runs it: the AR reads k reference slots and the head the M (k + 1) condition tokens they
      # give.  K + 1 compiled rounds, not one fori_loop round over all K slots with the later
      # conditions masked (tdjax before this change): the masked round did the last round's work
      # every time, 15-22 % more sampling time at the bench size for ~5 s less compile
      # (docs/measurements.md, "MRAR sampling rounds").
      refs = jnp.zeros((b, 0, self.ar.mask_len, self.latent_dim * self.ar.ref_patch ** 2))
      for rnd in range(self.num_refs + 1):
        x = run(refs, rnd)
        if rnd < self.num_refs:
          grid = x.reshape(b, self.grid, self.grid, self.latent_dim)
          new = td.patchify_latent(grid, self.ar.ref_patch)[:, None].astype(refs.dtype)
          refs = jnp.concatenate([refs, new], axis=1)
    return x.reshape(b, self.grid, self.grid, self.latent_dim)

  @property
  def sample_options(self):
    pag = ("pag_scale",) if self.config.head.type == "attention" else ()   # attention heads
    if self.diffusion == "ddpm":
      return ("cfg", "steps", "temperature", "clip_denoised") + pag
    return ("cfg", "steps", "scale_0", "scale_1", "sampler") + pag

  def image_sampler(self, **overrides):
    """(params, labels [B], rng) -> images [B, H, W, C] in [-1, 1] (jit-compiled)."""
    if self.cached and self.vae is None:
      raise ValueError("this model was trained on cached VAE latents; name the VAE that decodes "
                       "them: --config.latent.vae_weights=kl16.npz (python -m tdjax.convert "
                       "--kind mar_vae)")
    kw = dict(self.config.sample, **overrides)
    if int(kw["steps"]) <= 0:
      raise ValueError(f"sampling steps={kw['steps']}: expected > 0")

    @jax.jit
    def fn(params, labels, rng):
      lat = self.sample_latents(params, labels, rng, **kw)
      return jnp.clip(self._to_images(lat), -1, 1)
    return fn

  def images(self, params, model_state, batch, rng):
    labels = jnp.arange(min(8, int(self.config.model.num_classes)))
    kw = dict(self.config.sample)
    kw["steps"] = min(int(kw["steps"]), 25)
    lat = self.sample_latents(params, labels, rng, **kw)
    if self.cached and self.vae is None:
      return {}
    return {"samples": self._to_images(lat)}

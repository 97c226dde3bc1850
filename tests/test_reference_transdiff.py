"""tdjax's TransDiff against the model code of TransDiff/TransDiff itself (models/transdiff.py,
transdiff_mrar.py, diffdecoder.py, crossattention.py, samplers.py), imported from a checkout at test
time as in tests/test_reference_repos.py (same environment variable, same skips; nothing of theirs is
copied here).

The reference is built at a tiny width (32, 2 heads, AR depth 1 x 2 blocks, decoder depth 2, 4
latent channels) with random weights; its `state_dict()` goes through `convert.transdiff_params` and
tdjax's `TransDiffTask` must then give the same conditions z, velocities, training loss (the same
noise and t handed to both sides) and Euler-Maruyama samples (the same initial and per-step noise).
The reference hard-codes 256 latent tokens (16 x 16) and, for MRAR, blocks of 64, so those are not
tiny.

Three adaptations let the CUDA/autocast-only reference run in float32 on the CPU, none touching
its arithmetic beyond precision (docs/reference/transdiff.md 1.3, 2.2):
  - `TimestepEmbedder` casts SiLU(temb) to bfloat16 before `time_proj` (autocast-only code): the
    module's `torch` is seen through a proxy whose `bfloat16` is float32;
  - `.cuda()` (sampling tokens, the MRAR mask) is the identity;
  - the MRAR block-causal mask (bfloat16, 0 / finfo.min) is cast to float32 for fp32 SDPA.
"""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdjax import configlib, convert
from tdjax.diffusion import flow
from tdjax.tasks.transdiff import TransDiffTask

torch = pytest.importorskip("torch")
from test_reference_repos import randomize, reference_module, state_dict  # noqa: E402

C, GRID, HEADS, CLASSES = 4, 16, 2, 10     # latent channels, latent grid (the reference's 16 x 16)
L = GRID * GRID
REF = dict(img_size=256, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=HEADS,
           decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=HEADS, vae_embed_dim=C,
           class_num=CLASSES, attn_dropout=0.0, proj_dropout=0.0, diffusion_batch_mul=2)


class _Proxy:
  """A module's `torch` as the reference code sees it: attributes of `overrides` first."""

  def __init__(self, **overrides):
    self.__dict__.update(overrides)

  def __getattr__(self, name):
    return getattr(torch, name)


class _Queue:
  """A `torch.randn_like` / `randn_tensor` stand-in that hands out given arrays in order."""

  def __init__(self, arrays):
    self.arrays = [np.array(a, np.float32) for a in arrays]         # writable copies

  def __call__(self, like=None, *args, **kwargs):
    a = torch.from_numpy(self.arrays.pop(0))
    if isinstance(like, torch.Tensor):
      assert tuple(like.shape) == tuple(a.shape), (like.shape, a.shape)
    return a


@pytest.fixture(autouse=True)
def float32_cpu_reference(monkeypatch):
  """The adaptations of the module docstring (undone after each test)."""
  dd = reference_module("TransDiff", "models.diffdecoder")
  monkeypatch.setattr(dd, "torch", _Proxy(bfloat16=torch.float32))
  monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
  return monkeypatch


def _pair(mrar: bool, img_size: int = 256):
  """(reference Transdiff, tdjax TransDiffTask, converted params) with the same weights.
  img_size 512: the reference's 1024 latent tokens (32 x 32) and still 256 AR conditions."""
  refs, grid = (3 if mrar else 0), GRID * img_size // 256
  cfg = configlib.load_config("transdiff", "size=tiny" + (",mrar=True,refs=3" if mrar else ""))
  cfg.latent.update(dict(kind="cached", grid=grid, channels=C))
  cfg.model.update(dict(num_classes=CLASSES, buffer_size=64 if mrar else 4, batch_mul=2,
                        ar_depth=2 * REF["encoder_depth"]))
  if img_size == 512:
    cfg.model.cond_tokens = L
  cfg.head.update(dict(depth=REF["decoder_depth"]))
  task = TransDiffTask(cfg)
  mod = reference_module("TransDiff", "models.transdiff_mrar" if mrar else "models.transdiff")
  torch.manual_seed(0)
  with pytest.MonkeyPatch.context() as mp:        # MRAR builds its mask with .cuda()
    mp.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    ref = mod.Transdiff(**dict(REF, img_size=img_size), patch_size=2 if mrar else 1,
                        buffer_size=64 if mrar else 4,
                        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
  ref = randomize(ref, seed=3 if mrar else 2)
  if mrar:
    ref.attention_mask = ref.attention_mask.float()
  sd = state_dict(ref)
  dims = convert.transdiff_dims(sd)
  assert (dims["mrar"], dims["refs"], dims["tokens"], dims["cond_tokens"]) == (mrar, refs,
                                                                                grid ** 2, L)
  expected = jax.eval_shape(lambda: nn.unbox(task.init(jax.random.key(0))[0]))
  params = jax.tree.map(jnp.asarray, convert.transdiff_params(sd, expected, HEADS))
  return ref, task, params


@pytest.fixture(scope="module")
def one_step():
  return _pair(mrar=False)


@pytest.fixture(scope="module")
def mrar():
  return _pair(mrar=True)


def _as_moments(x):
  """Ready latents as the posterior moments that latent.kind='cached' reads: logvar -1e4 gives a
  standard deviation of exactly 0, so the step's posterior draw x scale (1.0) is `x` itself."""
  x = jnp.asarray(x)
  return jnp.concatenate([x, jnp.full_like(x, -1e4)], axis=-1)


def _latents(seed, *lead):
  """Random latent grids [*lead, 16, 16, C] (tdjax layout)."""
  return np.random.default_rng(seed).normal(size=lead + (GRID, GRID, C)).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, -3)))


def _close(got, want, tol=1e-4, **kw):
  """float32 agreement: rtol = tol, atol = tol x the largest |want| (the random weights give
  outputs of ~10, and the two frameworks' sinusoids of t = 1000 differ by ~3e-5 already)."""
  want = np.asarray(want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=tol,
                             atol=tol * max(1.0, float(np.abs(want).max(initial=0.0))), **kw)


# ------------------------------------------------------------------------------------------------
# 1-step AR (models/transdiff.py)
# ------------------------------------------------------------------------------------------------

def test_one_step_conditions_match_transdiff(one_step):
  """`forward_encoder` in eval mode (no label drop, no diversity loss): [buffer x class | L x
  mask] + pos -> LN -> blocks -> LN -> drop buffer -> + diffusion pos = tdjax's z, for real labels
  and for the null (`fake_latent`, CFG) condition."""
  ref, task, params = one_step
  labels = np.array([0, 3, 9])
  with torch.no_grad():
    tokens = torch.zeros(3, L, C)
    want, div = ref.forward_encoder(tokens, ref.class_emb(torch.from_numpy(labels)))
    null, _ = ref.forward_encoder(tokens, ref.fake_latent.repeat(3, 1))
  assert div == 0.0
  got = task.ar.apply({"params": params["ar"]}, jnp.asarray(labels))
  assert got.shape == tuple(want.shape) == (3, L, 32)
  _close(got, want.numpy(), 1e-5)
  _close(task.ar.apply({"params": params["ar"]}, jnp.full((3,), -1)), null.numpy(), 1e-5)


@pytest.mark.parametrize("t", [[0.04, 0.5, 1.0], [0.0, 0.123, 0.999]])
def test_decoder_velocity_matches_transdiff(one_step, t):
  """`DiffusionDeocder.forward(x_t, c, 1000 t)` (input proj + pos, adaLN-single timestep, self-
  attention, cross-attention to c of any length, MLP, final layer) = tdjax's head on (x_t, t, c)."""
  ref, task, params = one_step
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, L, C)).astype(np.float32)
  cond = rng.normal(size=(3, 7, 32)).astype(np.float32)
  t = np.asarray(t, np.float32)
  with torch.no_grad():
    want = ref.diffdecoder.net(torch.from_numpy(x), torch.from_numpy(cond),
                               torch.from_numpy(t) * 1000)
  got = task._head(params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(cond))
  assert float(np.abs(want.numpy()).max()) > 0.1          # the randomised final layer is not zero
  _close(got, want.numpy())


def _record_flow_draws(monkeypatch):
  """Runs of tdjax's flow loss record their (x0, eps, t) through `flow.interpolate`."""
  seen, interpolate = [], flow.interpolate

  def record(x0, eps, t):
    seen.append(tuple(np.asarray(a) for a in (x0, eps, t)))
    return interpolate(x0, eps, t)
  monkeypatch.setattr(flow, "interpolate", record)
  return seen


def _hand_draws(monkeypatch, ref, eps_rows, t_rows):
  """The reference's `DiffDecoder.forward` draws: eps one row at a time (`randn_like(target[:1])`)
  and t_int = floor(1000 sigmoid(n)) (`sample_logit_normal`), here the given ones in order; also
  records what its net receives (x_t, c, t_int)."""
  dd = reference_module("TransDiff", "models.diffdecoder")
  monkeypatch.setattr(dd.torch, "randn_like", _Queue(eps_rows), raising=False)
  ts = list(t_rows)
  # (t_int + 0.5) / 1000: the reference's `(s * 1000).long()` gives back exactly t_int
  monkeypatch.setattr(ref.diffdecoder, "sample_logit_normal",
                      lambda size: torch.from_numpy((np.round(ts.pop(0) * 1000) + 0.5) / 1000))
  calls = []
  hook = ref.diffdecoder.net.register_forward_pre_hook(
      lambda mod, args: calls.append(tuple(a.numpy().copy() for a in args)))
  return calls, hook


def test_one_step_flow_loss_matches_transdiff(one_step, float32_cpu_reference):
  """`Transdiff.forward` (eval: no label drop) with tdjax's own (eps, t) draws handed over: the
  tiled batch (`diffusion_batch_mul` 2, row i = example i mod B), x_t = (1 - t) x0 + t eps with
  noise at t = 1, the net's timestep 1000 t, the target eps - x0 and the mean -> the same loss."""
  ref, task, params = one_step
  mp = float32_cpu_reference
  lat, labels = _latents(2, 2), np.array([1, 8])
  seen = _record_flow_draws(mp)
  got, _ = task._losses(params, {"moments": _as_moments(lat), "label": jnp.asarray(labels)},
                        jax.random.key(5), False)
  (x0, eps, t), = seen
  assert x0.shape == (4, L, C)
  _close(x0, np.tile(lat.reshape(2, L, C), (2, 1, 1)), 0)
  calls, hook = _hand_draws(mp, ref, np.split(eps, 4), [t])
  try:
    with torch.no_grad():
      want = ref(_nchw(lat), torch.from_numpy(labels))
  finally:
    hook.remove()
  (x_t, _, t_int), = calls
  np.testing.assert_array_equal(t_int, np.round(t * 1000))
  _close(x_t, (1 - t[:, None, None]) * x0 + t[:, None, None] * eps, 1e-6)
  _close(got, want.item(), 5e-5)


@pytest.mark.parametrize("cfg", [1.0, 1.3, 4.0])
@pytest.mark.parametrize("steps", [1, 2, 6])
def test_euler_maruyama_matches_transdiff_sampler(float32_cpu_reference, cfg, steps):
  """`euler_maruyama_sampler` itself (grid, score from velocity, drift, diffusion 2t, scale_0 /
  scale_1, deterministic unscaled last step, CFG on the drift of the doubled batch) = tdjax's
  `flow.euler_maruyama_sample` on the same smooth velocity field, initial and per-step noise."""
  samplers = reference_module("TransDiff", "models.samplers")
  rng = np.random.default_rng(steps)
  x = rng.normal(size=(3, 5, C)).astype(np.float32)
  cond = rng.normal(size=(6, 1, C)).astype(np.float32)       # [cond; uncond] rows
  field = lambda tanh, x, c, t: tanh(x) * (1 + 2 * t) - 0.5 * x + c    # t in [0, 1]
  key = jax.random.key(steps)
  z = [jax.random.normal(jax.random.fold_in(key, i), x.shape) for i in range(steps - 1)]
  float32_cpu_reference.setattr(samplers, "torch", _Proxy(randn_like=_Queue(z)))
  model = lambda x, c, t: field(torch.tanh, x, c, t[:, None, None] / 1000)
  with torch.no_grad():
    want = samplers.euler_maruyama_sampler(
        model, torch.from_numpy(x), torch.from_numpy(cond if cfg > 1 else cond[:3]),
        num_steps=steps, cfg_scale=cfg, scale_0=0.9, scale_1=0.8)

  def velocity(x, t):
    t = t[:, None, None]
    v = lambda c: field(jnp.tanh, x, c, t)
    return (v(cond[:3]), v(cond[3:])) if cfg > 1 else v(cond[:3])
  got = flow.euler_maruyama_sample(velocity, jnp.asarray(x), key, steps=steps, cfg=cfg,
                                   scale_0=0.9, scale_1=0.8)
  _close(got, want.numpy(), 1e-5)


@pytest.mark.parametrize("cfg,scales", [(1.0, (1.0, 1.0)), (1.3, (0.89, 0.95)), (3.0, (1.0, 1.0))])
def test_one_step_sampling_matches_transdiff(one_step, float32_cpu_reference, cfg, scales):
  """`Transdiff.samples` (Euler-Maruyama: linspace(1, 0.04, S) then 0, score from velocity,
  diffusion 2t, scale_0 / scale_1, deterministic last step, CFG on the drift with the
  `fake_latent` null condition) = `TransDiffTask.sample_latents` from the same initial noise and
  per-step noise (tdjax's draws handed to the reference)."""
  ref, task, params = one_step
  mp = float32_cpu_reference
  samplers = reference_module("TransDiff", "models.samplers")
  rtd = reference_module("TransDiff", "models.transdiff")
  steps, labels, rng = 4, np.array([2, 7]), jax.random.key(11)
  # tdjax's draws (tasks/transdiff.py sample_latents, diffusion/flow.py euler_maruyama_sample)
  k_noise, k_s = jax.random.split(rng)
  noise = jax.random.normal(k_noise, (2, L, C))
  key = jax.random.fold_in(k_s, 0)
  z = [jax.random.normal(jax.random.fold_in(key, i), (2, L, C)) for i in range(steps - 1)]
  mp.setattr(rtd, "randn_tensor", _Queue([noise]))
  mp.setattr(samplers, "torch", _Proxy(randn_like=_Queue(z)))
  with torch.no_grad():
    want = ref.samples(torch.from_numpy(labels), num_sampling_steps=steps, cfg=cfg,
                       scale_0=scales[0], scale_1=scales[1])
  got = task.sample_latents(params, jnp.asarray(labels), rng, cfg=cfg, steps=steps,
                            scale_0=scales[0], scale_1=scales[1])
  assert got.shape == (2, GRID, GRID, C) and tuple(want.shape) == (2, C, GRID, GRID)
  # float32 round-off grows through the steps of this random (sensitive) network: the reference's
  # own float32 run is ~5e-4 from its float64 run here (the sampler alone agrees to 1e-5 above)
  _close(np.moveaxis(np.asarray(got), -1, 1), want.numpy(), 5e-4)


# ------------------------------------------------------------------------------------------------
# MRAR (models/transdiff_mrar.py): 4 same-class images, 3 references, blocks of 64
# ------------------------------------------------------------------------------------------------

def _mrar_tokens(ref, imgs, k):
  """The reference's AR input with k references: [64 mask slots | img_0 .. img_{k-1} as 2x2
  patches] (its `forward` / `samples` layout)."""
  x = torch.zeros(imgs.shape[0], 64 * (k + 1), 4 * C)
  for i in range(k):
    x[:, 64 * (i + 1): 64 * (i + 2)] = ref.patchify(_nchw(imgs[:, i]), hw=8, patch_size=2)
  return x


def test_mrar_conditions_match_transdiff(mrar):
  """MRAR `forward_encoder` (eval: position table and block-causal mask sliced to the input) +
  `diffusion_pos_embed_learned[:, :T]` = tdjax's z with 3, 1 and 0 real references."""
  ref, task, params = mrar
  imgs, labels = _latents(3, 2, 4), np.array([4, 6])
  refs = np.asarray(task._refs(jnp.asarray(imgs)))
  for k in (3, 1, 0):
    with torch.no_grad():
      want = ref.forward_encoder(_mrar_tokens(ref, imgs, k), ref.class_emb(torch.from_numpy(labels)))
      want = want + ref.diffusion_pos_embed_learned[:, :want.shape[1]]
    got = task.ar.apply({"params": params["ar"]}, jnp.asarray(labels), jnp.asarray(refs[:, :k]))
    assert got.shape == tuple(want.shape) == (2, 64 * (k + 1), 32)
    _close(got, want.numpy(), 1e-5, err_msg=f"{k} references")


def test_mrar_flow_loss_matches_transdiff(mrar, float32_cpu_reference):
  """MRAR `forward(img0..img3, labels)`: teacher-forced references, image k's loss given the first
  64 (k + 1) conditions, mean over k = tdjax's one stacked, condition-masked decoder call, with
  tdjax's (eps, t) draws handed to the reference's four `forward_loss` calls."""
  ref, task, params = mrar
  mp = float32_cpu_reference
  imgs, labels = _latents(4, 2, 4), np.array([0, 5])
  seen = _record_flow_draws(mp)
  got, _ = task._losses(params, {"moments": _as_moments(imgs), "label": jnp.asarray(labels)},
                        jax.random.key(6), False)
  (x0, eps, t), = seen
  # tdjax rows: (repeat r, image k, example b); the reference's call k tiles its batch: rows (r, b)
  rows = lambda k: [r * 8 + k * 2 + b for r in range(2) for b in range(2)]
  _close(x0[rows(1)], np.tile(imgs[:, 1].reshape(2, L, C), (2, 1, 1)), 0)
  calls, hook = _hand_draws(mp, ref, [eps[i:i + 1] for k in range(4) for i in rows(k)],
                            [t[rows(k)] for k in range(4)])
  try:
    with torch.no_grad():
      want = ref(*[_nchw(imgs[:, k]) for k in range(4)], torch.from_numpy(labels))
  finally:
    hook.remove()
  assert [c[1].shape[1] for c in calls] == [64, 128, 192, 256]
  _close(got, want.item(), 5e-5)


@pytest.mark.parametrize("cfg", [1.0, 1.3])
def test_mrar_sampling_matches_transdiff(mrar, float32_cpu_reference, cfg):
  """MRAR `samples`: 4 rounds from one initial noise, round k's generated latent fed back as the
  next reference, Euler-Maruyama with per-round noise = tdjax's `sample_latents` (last image)."""
  ref, task, params = mrar
  mp = float32_cpu_reference
  samplers = reference_module("TransDiff", "models.samplers")
  rtd = reference_module("TransDiff", "models.transdiff_mrar")
  steps, labels, rng = 3, np.array([1, 9]), jax.random.key(12)
  k_noise, k_s = jax.random.split(rng)
  noise = jax.random.normal(k_noise, (2, L, C))
  z = [jax.random.normal(jax.random.fold_in(jax.random.fold_in(k_s, r), i), (2, L, C))
       for r in range(4) for i in range(steps - 1)]
  mp.setattr(rtd, "randn_tensor", _Queue([noise]))
  mp.setattr(samplers, "torch", _Proxy(randn_like=_Queue(z)))
  with torch.no_grad():
    want = ref.samples(torch.from_numpy(labels), num_sampling_steps=steps, cfg=cfg,
                       scale_0=0.9, scale_1=0.95)
  got = task.sample_latents(params, jnp.asarray(labels), rng, cfg=cfg, steps=steps, scale_0=0.9,
                            scale_1=0.95)
  _close(np.moveaxis(np.asarray(got), -1, 1), want.numpy())


# ------------------------------------------------------------------------------------------------
# TransDiff-L 512 layout (models/transdiff.py, img_size=512): 256 conditions, 1024 latent tokens
# ------------------------------------------------------------------------------------------------

def test_512px_model_matches_transdiff(float32_cpu_reference):
  """img_size=512: the AR stack keeps its 256 condition slots (`seq_len`), the decoder denoises
  32 x 32 latents (its own 1024-row position table): `convert.transdiff_dims` reads both lengths,
  and tdjax with model.cond_tokens = 256 gives the reference's conditions, flow loss (tdjax's
  draws handed over) and 2-step guided samples."""
  ref, task, params = _pair(mrar=False, img_size=512)
  mp = float32_cpu_reference
  assert task.L == 4 * L and task.ar.mask_len == L
  labels = np.array([3])
  with torch.no_grad():
    want, _ = ref.forward_encoder(torch.zeros(1, L, C), ref.class_emb(torch.from_numpy(labels)))
  _close(task.ar.apply({"params": params["ar"]}, jnp.asarray(labels)), want.numpy(), 1e-5)
  lat = np.random.default_rng(7).normal(size=(1, 2 * GRID, 2 * GRID, C)).astype(np.float32)
  seen = _record_flow_draws(mp)
  got, _ = task._losses(params, {"moments": _as_moments(lat), "label": jnp.asarray(labels)},
                        jax.random.key(8), False)
  (_, eps, t), = seen
  calls, hook = _hand_draws(mp, ref, np.split(eps, 2), [t])
  try:
    with torch.no_grad():
      loss = ref(_nchw(lat), torch.from_numpy(labels))
  finally:
    hook.remove()
  assert calls[0][0].shape == (2, 4 * L, C) and calls[0][1].shape == (2, L, 32)
  _close(got, loss.item(), 5e-5)
  samplers = reference_module("TransDiff", "models.samplers")
  rtd = reference_module("TransDiff", "models.transdiff")
  steps, rng = 2, jax.random.key(13)
  k_noise, k_s = jax.random.split(rng)
  mp.setattr(rtd, "randn_tensor", _Queue([jax.random.normal(k_noise, (1, 4 * L, C))]))
  mp.setattr(samplers, "torch", _Proxy(randn_like=_Queue(
      [jax.random.normal(jax.random.fold_in(jax.random.fold_in(k_s, 0), 0), (1, 4 * L, C))])))
  with torch.no_grad():
    want = ref.samples(torch.from_numpy(labels), num_sampling_steps=steps, cfg=1.3,
                       scale_0=0.87, scale_1=0.87)
  got = task.sample_latents(params, jnp.asarray(labels), rng, cfg=1.3, steps=steps, scale_0=0.87,
                            scale_1=0.87)
  assert got.shape == (1, 2 * GRID, 2 * GRID, C)
  _close(np.moveaxis(np.asarray(got), -1, 1), want.numpy(), 5e-4)

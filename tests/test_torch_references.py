"""tdjax against the reference PyTorch code itself: pytorch-fid's InceptionV3, the `lpips` package,
HF transformers' `Siglip2VisionModel` and `LlamaDecoderLayer` (the GPT block), timm's ViT-S/16
(DINO's layout), taming-transformers' Encoder / Decoder (MAR's KL-16 VAE) and NLayerDiscriminator
(PatchGAN), torch's `F.interpolate` and `spectral_norm`, diffusers' `DDPMScheduler`, and the
metrics of pytorch-fid, torch-fidelity and scikit-image.

No official weights are needed: each reference module is built with random weights (the `lpips`
package's own v0.1 linear heads, which ship inside it, are real), its `state_dict()` goes through
`tdjax.convert` exactly as an official file would, and the two forward passes must agree.  So the
key names, the layouts and the forward pass are checked against the real modules, not against a
layout written down by hand.  The file skips unless torch imports (CI has no torch), each test unless its
reference package does:

    pip install torch torchvision lpips pytorch-fid transformers timm scikit-image diffusers \
        torch-fidelity
    pip install --no-deps taming-transformers
    python -m pytest tests/test_torch_references.py
"""

import importlib
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdjax import convert
from tdjax.losses import alignment, lpips
from tdjax.losses.weights import expected_params, save_npz_params
from tdjax.nn import inception

torch = pytest.importorskip("torch")

from test_inception import torch_state_dict  # noqa: E402  (pytorch-fid's key names, random values)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _state_dict(module):
  """Copies: a plain .numpy() shares memory with buffers that torch updates in place."""
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# the transformers releases the HF tests need: SigLIP2 (Siglip2VisionConfig / Siglip2VisionModel)
# arrived in 4.49; `LlamaRotaryEmbedding(config)` in 4.48 (4.45-4.47 take `dim` first)
SIGLIP2, LLAMA_ROPE_CONFIG = (4, 49), (4, 48)


def require_transformers(minimum: tuple, *names: str):
  """transformers, if it is at least `minimum` and has each of `names` ('Siglip2VisionModel', or
  a dotted 'models.llama.modeling_llama.LlamaRotaryEmbedding' under transformers); otherwise the
  test skips saying what is missing, instead of failing with an AttributeError on an older
  release."""
  transformers = pytest.importorskip("transformers")
  version = getattr(transformers, "__version__", "unknown")
  need = ".".join(map(str, minimum))
  if tuple(int(v) for v in re.findall(r"\d+", version)[:2]) < tuple(minimum):
    pytest.skip(f"needs transformers >= {need}, this is {version}")
  for name in names:
    where, _, attr = name.rpartition(".")
    try:
      getattr(importlib.import_module(f"transformers.{where}") if where else transformers, attr)
    except (ImportError, AttributeError) as e:
      pytest.skip(f"needs transformers >= {need} with {name}, this is {version} ({e})")
  return transformers


def test_older_transformers_skip_with_the_reason(monkeypatch):
  """An older transformers release, or one without a class a test uses, skips those tests with
  the reason (seen before as AttributeError failures under transformers 4.48.3)."""
  old = types.ModuleType("transformers")            # a release without SigLIP2 or the Llama module
  old.__version__ = "4.48.3"
  monkeypatch.setitem(sys.modules, "transformers", old)
  with pytest.raises(pytest.skip.Exception, match=r"needs transformers >= 4.49, this is 4.48.3"):
    require_transformers(SIGLIP2, "Siglip2VisionConfig")
  old.__version__ = "4.60.0"                        # new enough by number, the class missing
  with pytest.raises(pytest.skip.Exception, match=r"with Siglip2VisionModel, this is 4.60.0"):
    require_transformers(SIGLIP2, "Siglip2VisionModel")
  with pytest.raises(pytest.skip.Exception, match=r"with models.llama.modeling_llama.Llama"):
    require_transformers(LLAMA_ROPE_CONFIG, "models.llama.modeling_llama.LlamaRotaryEmbedding")


def test_lpips_vgg_matches_the_lpips_package():
  """`convert --kind lpips` on the LPIPS module's own state dict (net.sliceK.N, linI.model.1,
  scaling_layer buffers) -> tdjax's LPIPS gives the package's distances."""
  ref_lpips = pytest.importorskip("lpips")
  torch.manual_seed(0)
  ref = ref_lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()   # random VGG16
  sd = _state_dict(ref)
  assert "lin4.model.1.weight" in sd and "net.slice5.28.weight" in sd
  x = np.zeros((1, lpips.MIN_SIZE, lpips.MIN_SIZE, 3), np.float32)
  params = convert.lpips_params(sd, expected_params(lpips.LPIPS(), x, x))
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (3, 48, 64, 3)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
  b[2] = rng.uniform(-1, 1, b[2].shape)                       # one pair far apart
  with torch.no_grad():
    want = ref(_nchw(a), _nchw(b)).numpy().reshape(-1)
  got = np.asarray(lpips.LPIPS().apply({"params": params}, a, b))
  assert want[2] > 1.5 * want[0]                               # the distances tell pairs apart
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_inception_matches_pytorch_fid(monkeypatch):
  """pytorch-fid's FID InceptionV3 loads the tdjax-layout state dict strictly (every key and shape
  of the real module), and pool_3, logits and ADM's spatial features agree with tdjax's.  pool_3
  through pytorch-fid's own resize to 299 (`F.interpolate(bilinear, align_corners=False)`, no
  antialiasing): up from 64 x 48, and down from 512 x 512 (ImageNet 512), where an antialiased
  resize (`jax.image.resize`) would differ."""
  pf = pytest.importorskip("pytorch_fid.inception")
  sd = torch_state_dict(seed=1)
  monkeypatch.setattr(pf, "load_state_dict_from_url",
                      lambda *a, **k: {n: torch.from_numpy(v) for n, v in sd.items()})
  pool_net = pf.InceptionV3([3]).eval()        # resize to 299 (bilinear), [0, 1] -> [-1, 1]
  full = pf.fid_inception_v3().eval()          # the same weights, up to the 1008 logits
  spatial = {}
  full.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: spatial.update(x=o))
  variables = convert.inception_variables(sd, inception.expected_variables())
  rng = np.random.default_rng(0)
  x01 = rng.uniform(0, 1, (2, 64, 48, 3)).astype(np.float32)
  x299 = rng.uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
  x512 = rng.uniform(0, 1, (1, 512, 512, 3)).astype(np.float32)
  with torch.no_grad():
    pool_ref = pool_net(_nchw(x01))[0].numpy().reshape(2, -1)
    pool512_ref = pool_net(_nchw(x512))[0].numpy().reshape(1, -1)
    logits_ref = full(_nchw(x299)).numpy()
  spatial_ref = spatial["x"].numpy()[:, :7].transpose(0, 2, 3, 1).reshape(2, -1)
  apply = jax.jit(lambda v, x: inception.InceptionV3().apply(v, x))
  _, pool, _ = apply(variables, 2 * x01 - 1)
  logits, _, spat = apply(variables, x299)
  _, pool512, _ = apply(variables, 2 * x512 - 1)
  assert np.std(pool_ref[0] - pool_ref[1]) > 1e-2              # features depend on the image
  np.testing.assert_allclose(np.asarray(pool), pool_ref, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(np.asarray(pool512), pool512_ref, rtol=1e-3, atol=1e-4,
                             err_msg="512 px: pytorch-fid's resize to 299")
  np.testing.assert_allclose(np.asarray(logits), logits_ref, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(np.asarray(spat), spatial_ref, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("size", [(16, 16), (24, 32), (8, 12)])
def test_siglip2_teacher_matches_hf_siglip2_vision_model(tmp_path, size):
  """`convert --kind siglip2` on a random HF `Siglip2VisionModel` (NaFlex) -> the alignment
  teacher's features equal HF's last_hidden_state, at the position table's own grid (4 x 4) and at
  grids it is resized to (up: 6 x 8, down: 2 x 3; bilinear with antialiasing as HF does)."""
  transformers = require_transformers(SIGLIP2, "Siglip2VisionConfig", "Siglip2VisionModel")
  w, heads, mlp, patch, grid = 32, 4, 48, 4, 4
  cfg = transformers.Siglip2VisionConfig(hidden_size=w, intermediate_size=mlp, num_hidden_layers=2,
                                         num_attention_heads=heads, patch_size=patch,
                                         num_patches=grid * grid)
  torch.manual_seed(0)
  ref = transformers.Siglip2VisionModel(cfg).eval()
  with torch.no_grad():               # LayerNorms and biases away from their 1 / 0 initial values
    for p in ref.parameters():
      p.add_(0.2 * torch.randn_like(p))
  sd = _state_dict(ref)
  flat = convert.siglip2_params(sd, heads)
  path = str(tmp_path / "siglip2.npz")
  save_npz_params(path, flat)
  teacher = alignment.ViTTeacher(**alignment.teacher_shape(path))
  assert (teacher.width, teacher.num_heads, teacher.pos_grid) == (w, heads, grid)
  params = alignment.load_teacher_params(path, teacher)
  h, wd = size
  gh, gw = h // patch, wd // patch
  x = np.random.default_rng(0).uniform(-1, 1, (2, h, wd, 3)).astype(np.float32)
  # the HF processor's NaFlex patches: (py, px, c) flattened per patch, row-major patch order
  patches = x.reshape(2, gh, patch, gw, patch, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(2, gh * gw, -1)
  with torch.no_grad():
    want = ref(pixel_values=torch.from_numpy(patches),
               pixel_attention_mask=torch.ones(2, gh * gw, dtype=torch.int32),
               spatial_shapes=torch.tensor([[gh, gw]] * 2)).last_hidden_state.numpy()
  got = np.asarray(alignment.teacher_features(teacher, params, jnp.asarray(x)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [32, 64])
def test_kl16_vae_matches_the_ldm_encoder_decoder(size):
  """`convert --kind mar_vae` on a random KL-16 built from taming-transformers' Encoder / Decoder
  (LDM's and so MAR's `models/vae.py` are copies of them: same names, attention, resampling,
  GroupNorm) plus MAR's two 1x1 convs -> tdjax's posterior moments and decoding agree.  Inputs
  smaller than the nominal 256 px, as at 512 px, keep the encoder attention where the reference
  puts it: at the level whose *nominal* resolution is 16."""
  tm = pytest.importorskip("taming.modules.diffusionmodules.model")
  from tdjax.tokenizers import kl_vae
  c = kl_vae.KL16
  common = dict(ch=c.ch, out_ch=c.in_channels, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks,
                in_channels=c.in_channels, resolution=c.resolution, z_channels=c.embed_dim)

  class MarKL(torch.nn.Module):       # MAR's AutoencoderKL: encoder, decoder, the two 1x1 convs
    def __init__(self):
      super().__init__()
      self.encoder = tm.Encoder(attn_resolutions=c.attn_resolutions, double_z=True, **common)
      self.decoder = tm.Decoder(attn_resolutions=(), **common)
      self.quant_conv = torch.nn.Conv2d(2 * c.embed_dim, 2 * c.embed_dim, 1)
      self.post_quant_conv = torch.nn.Conv2d(c.embed_dim, c.embed_dim, 1)

  torch.manual_seed(0)
  ref = MarKL().eval()
  with torch.no_grad():               # GroupNorm affine and biases away from their 1 / 0 values
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  vae = kl_vae.AutoencoderKL(c)
  x0 = np.zeros((1, c.resolution, c.resolution, c.in_channels), np.float32)
  params = convert.mar_vae_params(_state_dict(ref),
                                  jax.eval_shape(lambda: vae.init(jax.random.key(0), x0)["params"]))
  x = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  z = np.random.default_rng(1).normal(size=(2, size // 16, size // 16, c.embed_dim))
  z = z.astype(np.float32)
  with torch.no_grad():
    moments = ref.quant_conv(ref.encoder(_nchw(x))).numpy().transpose(0, 2, 3, 1)
    decoded = ref.decoder(ref.post_quant_conv(_nchw(z))).numpy().transpose(0, 2, 3, 1)
  mean, logvar = vae.apply({"params": params}, x, method=kl_vae.AutoencoderKL.encode)
  got = np.concatenate([mean, logvar], -1)
  np.testing.assert_allclose(got, np.clip(moments, *[[-np.inf] * 16 + [-30] * 16,
                                                     [np.inf] * 16 + [20] * 16]),
                             rtol=1e-3, atol=1e-3 * np.abs(moments).max())
  out = vae.apply({"params": params}, z, method=kl_vae.AutoencoderKL.decode)
  np.testing.assert_allclose(np.asarray(out), decoded, rtol=1e-3, atol=1e-3 * np.abs(decoded).max())


def test_dino_backbone_matches_timm_vit_small(tmp_path):
  """`convert --kind dino` on a random timm ViT-S/16 (the DINO release's key names) -> the DINO
  discriminator's backbone readouts (patch + cls tokens after the embedding and after blocks
  2, 5, 8, 11) equal timm's, with exact GELU as DINO was trained.  timm keeps its key biases; the
  reference zeroes them and tdjax does not, which must not matter (softmax ignores q . b_k)."""
  timm = pytest.importorskip("timm")
  from tdjax.losses import discriminators as D
  torch.manual_seed(0)
  ref = timm.models.vision_transformer.VisionTransformer(
      img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=0).eval()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  sd = _state_dict(ref)
  assert "blocks.11.attn.qkv.weight" in sd and "norm.weight" in sd
  torch.save(ref.state_dict(), str(tmp_path / "dino.pth"))
  info = convert.convert_dino(str(tmp_path / "dino.pth"), str(tmp_path / "dino.npz"))
  assert info["blocks"] == 12
  disc = D.DinoDiscriminator(gelu_approximate=False)
  backbone = D.load_dino_backbone(str(tmp_path / "dino.npz"), disc)
  x = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
  normalised = ((x + 1) / 2 - np.float32(D.IMAGENET_MEAN)) / np.float32(D.IMAGENET_STD)
  outs = []
  with torch.no_grad():
    for blk in ref.blocks:
      blk.attn.qkv.bias[384:768] = 0.0                     # the reference's zeroed key bias
    t = ref._pos_embed(ref.patch_embed(_nchw(normalised)))
    outs.append(t)
    for i, blk in enumerate(ref.blocks):
      t = blk(t)
      if i in (2, 5, 8, 11):
        outs.append(t)
  want = [(o[:, 1:] + o[:, :1]).numpy() for o in outs]
  got = disc.backbone_module().apply({"params": backbone}, jnp.asarray(x))
  assert len(got) == len(want) == 5
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=1e-3, atol=1e-4 * np.abs(w).max())


@pytest.mark.parametrize("src,dst", [((32, 32), (7, 7)), ((256, 192), (24, 40)), ((5, 9), (16, 23)),
                                     ((16, 16), (224, 224)), ((300, 260), (224, 224))])
def test_resizers_match_torch_interpolate(src, dst):
  """DetailFlow's degraded targets (area down, bicubic up) and the DINO disc's resize are
  F.interpolate(mode='area' / 'bicubic', align_corners=False), at integer and odd ratios.  Torch
  runs in float64 here: in float32 its bicubic computes the source positions in float32, which
  moves its own downscaled outputs by up to ~1e-4 (tdjax's weights are exact, float64-built)."""
  import torch.nn.functional as F
  from tdjax.losses.discriminators import resize_torch
  from tdjax.tokenizers import resolution
  x = np.random.default_rng(0).normal(size=(2, *src, 3)).astype(np.float32)
  t = _nchw(x).double()
  for mode, ours in (("area", resolution.area_resize), ("bicubic", resolution.bicubic_resize)):
    want = F.interpolate(t, size=dst, mode=mode, **({} if mode == "area" else
                                                    {"align_corners": False}))
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x), dst)),
                               want.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  mode = "area" if src[0] > dst[0] else "bicubic"          # the reference picks by the height
  want = F.interpolate(t, size=dst, mode=mode, **({} if mode == "area" else
                                                  {"align_corners": False}))
  np.testing.assert_allclose(np.asarray(resize_torch(jnp.asarray(x), dst)),
                             want.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("src", [(512, 512), (256, 256), (64, 48), (300, 640), (7, 5)])
def test_fid_resize_matches_torch_interpolate(src):
  """InceptionV3's resize to 299 = pytorch-fid's `F.interpolate(bilinear, align_corners=False)`
  in float32 (identical values on the torch 2.13 CPU build here; 1e-6 leaves room for a build
  that does not fuse the source-position multiply-add)."""
  import torch.nn.functional as F
  x = np.random.default_rng(0).uniform(-1, 1, (2, *src, 3)).astype(np.float32)
  want = F.interpolate(_nchw(x), size=(299, 299), mode="bilinear", align_corners=False)
  got = jax.jit(lambda x: inception.resize_bilinear(x, (299, 299)))(x)
  np.testing.assert_allclose(np.asarray(got), want.numpy().transpose(0, 2, 3, 1), rtol=0,
                             atol=1e-6)


def test_fid_psnr_ssim_match_pytorch_fid_and_scikit_image():
  """Fréchet distance = pytorch-fid's `calculate_frechet_distance`; PSNR / SSIM = scikit-image's
  with the Wang et al. settings (Gaussian window, sigma 1.5, population covariances)."""
  fid_score = pytest.importorskip("pytorch_fid.fid_score")
  metrics = pytest.importorskip("skimage.metrics")
  from tdjax import evaluation
  rng = np.random.default_rng(0)
  f1 = rng.normal(size=(500, 64))
  f2 = rng.normal(size=(400, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.2
  stats = evaluation.feature_statistics(f1) + evaluation.feature_statistics(f2)
  np.testing.assert_allclose(evaluation.frechet_distance(*stats),
                             fid_score.calculate_frechet_distance(*stats), rtol=1e-9)
  a = rng.uniform(0, 1, (3, 32, 40, 3))
  b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1)
  ssim = [metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5, data_range=1.0,
                                        use_sample_covariance=False, channel_axis=-1)
          for x, y in zip(a, b)]
  np.testing.assert_allclose(evaluation.ssim(a, b), ssim, rtol=1e-9)
  psnr = [metrics.peak_signal_noise_ratio(x, y, data_range=1.0) for x, y in zip(a, b)]
  np.testing.assert_allclose(evaluation.psnr(a, b), psnr, rtol=1e-9)


def test_inception_score_matches_torch_fidelity():
  """ADM's IS (splits of 5,000, the mean of per-split exp(E KL)) = torch-fidelity's with as many
  splits, unshuffled."""
  isc = pytest.importorskip("torch_fidelity.metric_isc")
  from tdjax import evaluation
  logits = np.random.default_rng(0).normal(size=(1500, 1008)) * 3
  want = isc.isc_features_to_metric(torch.from_numpy(logits), splits=3, shuffle=False)
  np.testing.assert_allclose(evaluation.inception_score(logits, split_size=500),
                             want["inception_score_mean"], rtol=1e-9)


@pytest.mark.parametrize("steps", [50, 100])
def test_ddpm_sampler_matches_diffusers_ddpm_scheduler(monkeypatch, steps):
  """MAR's DDPM head sampler: the cosine schedule respaced to S steps (iDDPM `space_timesteps`),
  learned-range variance, x0 clipped, ancestral noise -> the same chain as diffusers'
  DDPMScheduler (squaredcos_cap_v2, learned_range, the same kept timesteps), given the same
  model and the same noise draws.  (diffusers has no iDDPM respacing: it is handed tdjax's kept
  timesteps; `tests/test_ddpm.py` checks those against iDDPM's rule.)"""
  sched_mod = pytest.importorskip("diffusers.schedulers.scheduling_ddpm")
  from tdjax.diffusion import ddpm
  s = ddpm.Schedule.make(1000, steps)
  ref = sched_mod.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                variance_type="learned_range", clip_sample=True,
                                prediction_type="epsilon")
  ref.set_timesteps(timesteps=[int(t) for t in s.timesteps[::-1]])
  c = 4
  w = np.random.default_rng(0).normal(size=(c, 2 * c)).astype(np.float32)

  def model(x, t):                     # a fixed smooth "network": eps and v in [-1, 1]
    return np.tanh(x @ w + np.asarray(t, np.float32)[:, None] / 1000.0)

  rng = jax.random.key(3)
  noise = np.asarray(jax.random.normal(jax.random.key(4), (5, c)))
  got = ddpm.p_sample_loop(s, lambda x, t: jnp.tanh(x @ w + t[:, None] / 1000.0),
                           jnp.asarray(noise), rng, clip_denoised=True)
  draws = iter([np.asarray(jax.random.normal(jax.random.fold_in(rng, i), (5, c)))
                for i in reversed(range(steps))])
  monkeypatch.setattr(sched_mod, "randn_tensor", lambda *a, **k: torch.from_numpy(next(draws)))
  x = torch.from_numpy(noise)
  for t in ref.timesteps:
    out = torch.from_numpy(model(x.numpy(), np.full((5,), int(t))))
    x = ref.step(out, int(t), x).prev_sample
  assert np.std(np.asarray(got)) > 0.1
  np.testing.assert_allclose(np.asarray(got), x.numpy(), rtol=1e-4, atol=1e-4)


def test_gpt_block_matches_hf_llama_decoder_layer():
  """DetailFlow's GPT block (LlamaGen: RMSNorm eps 1e-5, interleaved-pair RoPE, SwiGLU, no biases)
  from `convert --kind detailflow_gpt`'s mapping of a LlamaGen layer (fused wqkv, wo, w1 / w3 / w2,
  attention_norm / ffn_norm) equals HF's `LlamaDecoderLayer` under a causal mask at positions
  0..L-1 (1D RoPE, base 10000), once HF's q / k rows are taken back from its half-split rotary
  basis to the interleaved one (the inverse of HF's Llama conversion `permute`)."""
  transformers = require_transformers(LLAMA_ROPE_CONFIG, "LlamaConfig",
                                      "models.llama.modeling_llama.LlamaDecoderLayer",
                                      "models.llama.modeling_llama.LlamaRotaryEmbedding")
  from transformers.models.llama import modeling_llama as ml
  from tdjax.nn.layers import TransformerBlock, llama_block_kwargs
  from tdjax.nn.rope import rope_1d
  dim, heads, mlp, length = 64, 4, 176, 10
  hd = dim // heads
  cfg = transformers.LlamaConfig(hidden_size=dim, intermediate_size=mlp, num_attention_heads=heads,
                                 num_key_value_heads=heads, rms_norm_eps=1e-5, rope_theta=10000.0,
                                 attention_bias=False, mlp_bias=False)
  cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  layer = ml.LlamaDecoderLayer(cfg, layer_idx=0).eval()
  with torch.no_grad():
    for p in layer.parameters():
      p.normal_(0, 0.1) if p.ndim == 2 else p.add_(0.2 * torch.randn_like(p))
  hf = _state_dict(layer)
  interleaved = lambda w: w.reshape(heads, 2, hd // 2, dim).transpose(0, 2, 1, 3).reshape(dim, dim)
  v, n = 11, 3                  # the embeddings a LlamaGen state dict must carry (unused here)
  sd = {"tok_embeddings.weight": np.zeros((v, dim), np.float32), "norm.weight": np.ones(dim),
        "cls_embedding.embedding_table.weight": np.zeros((n, dim), np.float32),
        "spe_tok_embeddings.special_embeddings.weight": np.zeros((1, dim), np.float32),
        "output.weight": np.zeros((v, dim), np.float32),
        "layers.0.attention.wqkv.weight": np.concatenate(
            [interleaved(hf["self_attn.q_proj.weight"]), interleaved(hf["self_attn.k_proj.weight"]),
             hf["self_attn.v_proj.weight"]]),
        "layers.0.attention.wo.weight": hf["self_attn.o_proj.weight"],
        "layers.0.feed_forward.w1.weight": hf["mlp.gate_proj.weight"],
        "layers.0.feed_forward.w3.weight": hf["mlp.up_proj.weight"],
        "layers.0.feed_forward.w2.weight": hf["mlp.down_proj.weight"],
        "layers.0.attention_norm.weight": hf["input_layernorm.weight"],
        "layers.0.ffn_norm.weight": hf["post_attention_layernorm.weight"]}
  block = convert.detailflow_gpt_params(sd, 1, heads)["transformer"]["blocks_0"]["block"]
  x = np.random.default_rng(0).normal(size=(2, length, dim)).astype(np.float32)
  pos = torch.arange(length)[None]
  causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
  with torch.no_grad():
    cos_sin = ml.LlamaRotaryEmbedding(cfg)(torch.from_numpy(x), pos)
    want = layer(torch.from_numpy(x), attention_mask=causal, position_ids=pos,
                 position_embeddings=cos_sin)
  want = (want[0] if isinstance(want, tuple) else want).numpy()
  got = TransformerBlock(**llama_block_kwargs(heads, mlp)).apply(
      {"params": block}, jnp.asarray(x), mask=np.tril(np.ones((length, length), bool)),
      rope=rope_1d(np.arange(length), hd))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_spectral_conv1d_matches_torch_spectral_norm():
  """The DINO disc heads' SNConv1d: torch `spectral_norm(Conv1d(k=9, circular padding))` (dim 0,
  one power iteration per train-mode call, eps 1e-12) -> the same outputs and power-iteration
  vectors over three training calls, then an eval call that leaves them be.  tdjax's [k, C_in,
  C_out] kernel views W with its columns in (k, C_in) order, torch's in (C_in, k): v is permuted."""
  from tdjax.losses.discriminators import SpectralConv1d
  cin, cout, k, length = 6, 5, 9, 12
  torch.manual_seed(0)
  ref = torch.nn.utils.spectral_norm(
      torch.nn.Conv1d(cin, cout, k, padding=k // 2, padding_mode="circular"))
  w = ref.weight_orig.detach().numpy()                                  # [out, in, k]
  to_tdjax_v = lambda v: v.reshape(cin, k).T.reshape(-1)
  variables = {"params": {"kernel": w.transpose(2, 1, 0), "bias": ref.bias.detach().numpy()},
               "spectral": {"u": ref.weight_u.numpy().copy(),
                            "v": to_tdjax_v(ref.weight_v.numpy())}}
  m = SpectralConv1d(cout, k)
  x = np.random.default_rng(0).normal(size=(3, length, cin)).astype(np.float32)
  ref.train()
  for _ in range(3):
    with torch.no_grad():
      want = ref(torch.from_numpy(x.transpose(0, 2, 1).copy())).numpy().transpose(0, 2, 1)
    got, state = m.apply(variables, jnp.asarray(x), update_stats=True, mutable=["spectral"])
    variables = {**variables, **state}
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(variables["spectral"]["u"]), ref.weight_u.numpy(),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(variables["spectral"]["v"]),
                               to_tdjax_v(ref.weight_v.numpy()), rtol=1e-4, atol=1e-6)
  ref.eval()
  with torch.no_grad():
    want = ref(torch.from_numpy(x.transpose(0, 2, 1).copy())).numpy().transpose(0, 2, 1)
  got = m.apply(variables, jnp.asarray(x), update_stats=False)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_patchgan_matches_taming_nlayer_discriminator():
  """tdjax's PatchGAN = taming-transformers' NLayerDiscriminator (the VQGAN disc) in train mode
  (batch statistics, as the tokenizer always calls D): same logits for the same weights, and the
  same running means.  (Running variances differ: torch updates them with the unbiased batch
  variance, flax with the biased one; D never runs in eval mode here, so they are unused.)"""
  disc_mod = pytest.importorskip("taming.modules.discriminator.model")
  from tdjax.losses.discriminators import PatchGAN
  torch.manual_seed(0)
  ref = disc_mod.NLayerDiscriminator(input_nc=3, ndf=8, n_layers=3).train()
  with torch.no_grad():
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  sd = _state_dict(ref)
  conv = lambda i: {"kernel": sd[f"main.{i}.weight"].transpose(2, 3, 1, 0),
                    **({"bias": sd[f"main.{i}.bias"]} if f"main.{i}.bias" in sd else {})}
  bn = lambda i: {"scale": sd[f"main.{i}.weight"], "bias": sd[f"main.{i}.bias"]}
  params = {"conv0": conv(0), "conv1": conv(2), "conv2": conv(5), "conv3": conv(8),
            "conv_out": conv(11), "norm1": bn(3), "norm2": bn(6), "norm3": bn(9)}
  stats = {f"norm{n}": {"mean": sd[f"main.{i}.running_mean"], "var": sd[f"main.{i}.running_var"]}
           for n, i in ((1, 3), (2, 6), (3, 9))}
  x = np.random.default_rng(0).uniform(-1, 1, (4, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(_nchw(x)).numpy().transpose(0, 2, 3, 1)
  got, new = PatchGAN(ndf=8, n_layers=3).apply({"params": params, "batch_stats": stats},
                                                jnp.asarray(x), train=True, mutable=["batch_stats"])
  assert want.shape == (4, 6, 6, 1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  for n, i in ((1, 3), (2, 6), (3, 9)):
    np.testing.assert_allclose(np.asarray(new["batch_stats"][f"norm{n}"]["mean"]),
                               ref.state_dict()[f"main.{i}.running_mean"].numpy(), rtol=1e-4,
                               atol=1e-6)


def test_detailflow_tokenizer_visual_model_keys_are_hf_siglip2s():
  """The DetailFlow checkpoint layout the tokenizer converter reads (tests/test_convert.py's
  `tokenizer_state_dict`) names and shapes its `visual_model` tensors exactly as HF's
  `Siglip2VisionModel(...).vision_model` does, with the reference's edits: the pooling head
  replaced by Identity on both sides, and the decoder's patch embedding too."""
  transformers = require_transformers(SIGLIP2, "Siglip2VisionConfig", "Siglip2VisionModel")
  from flax import linen as nn
  from test_convert import tokenizer_state_dict
  from tdjax.tokenizers import detailflow as df
  m = df.DetailFlowTokenizer(image_size=32, channels=3, patch=8, num_tokens=8, group=4,
                             enc_width=144, enc_depth=2, enc_heads=2, enc_mlp=32, dec_width=128,
                             dec_depth=2, dec_heads=2, dec_mlp=48, codebook_size=32, code_dim=4)
  params = nn.unbox(m.init({"params": jax.random.key(0), "noise": jax.random.key(1)},
                           jnp.zeros((1, 32, 32, 3)))["params"])
  sd = tokenizer_state_dict(params, 8, 2, 2)
  for side, width, mlp in (("encoder", 144, 32), ("decoder", 128, 48)):
    cfg = transformers.Siglip2VisionConfig(hidden_size=width, intermediate_size=mlp,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           patch_size=8, num_patches=16)
    vm = transformers.Siglip2VisionModel(cfg)
    vm = getattr(vm, "vision_model", vm)        # transformers >= 5 has no vision_model wrapper
    vm.head = torch.nn.Identity()
    if side == "decoder":
      vm.embeddings.patch_embedding = torch.nn.Identity()
    want = {f"{side}.visual_model.{k}": tuple(v.shape) for k, v in vm.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items() if k.startswith(f"{side}.visual_model.")}
    assert got == want

"""MAR KL-16 VAE (LDM AutoencoderKL) in Flax: shapes, downsampling, attention, posterior."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdjax.tokenizers import kl_vae as kv


def test_kl16_latent_shapes():
  m = kv.AutoencoderKL(kv.KL16)
  shapes = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3))))["params"]
  for size, grid in ((256, 16), (512, 32)):     # stride 16: 256 px -> 16x16x16, 512 -> 32x32x16
    mean, logvar = jax.eval_shape(lambda p, x: m.apply({"params": p}, x, method=m.encode), shapes,
                                  jnp.zeros((1, size, size, 3)))
    assert mean.shape == logvar.shape == (1, grid, grid, 16)
  enc = shapes["encoder"]
  assert [k for k in enc if "attn" in k] == ["down_4_attn_0", "down_4_attn_1"]   # attention at 16
  assert not [k for k in shapes["decoder"] if "attn" in k]                      # mid-block only
  assert shapes["quant_conv"]["kernel"].shape == (1, 1, 32, 32)
  assert shapes["post_quant_conv"]["kernel"].shape == (1, 1, 16, 16)
  assert shapes["encoder"]["down_1_block_0"]["conv1"]["kernel"].shape == (3, 3, 128, 128)
  assert shapes["encoder"]["down_2_block_0"]["nin_shortcut"]["kernel"].shape == (1, 1, 128, 256)
  assert shapes["decoder"]["up_4_block_2"]["conv2"]["kernel"].shape == (3, 3, 512, 512)


def test_encoder_attention_sits_at_the_nominal_resolution_for_any_input_size():
  """As in the reference, attention follows `resolution` / 2^i, not the input: a 512 px image
  through KL-16 uses the attention blocks of level 4 like a 256 px one (here a small config: nominal
  16 px, attention at 8, inputs of 16 and 32 px)."""
  cfg = kv.VAEConfig(embed_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                     resolution=16)
  m = kv.AutoencoderKL(cfg)
  x16, x32 = jnp.zeros((1, 16, 16, 3)), jax.random.normal(jax.random.key(1), (1, 32, 32, 3))
  params = m.init(jax.random.key(0), x16)["params"]
  assert sorted(k for k in params["encoder"] if "attn" in k) == ["down_1_attn_0"]
  assert jax.tree.structure(m.init(jax.random.key(0), x32)["params"]) == jax.tree.structure(params)
  encode = lambda p: m.apply({"params": p}, x32, method=m.encode)[0]
  moved = jax.tree.map(lambda a: a, params)
  moved["encoder"]["down_1_attn_0"]["proj_out"]["kernel"] = (
      params["encoder"]["down_1_attn_0"]["proj_out"]["kernel"] + 0.5)
  assert float(jnp.abs(encode(moved) - encode(params)).max()) > 1e-3   # the block is used at 32 px


def test_downsample_pads_bottom_right_only():
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))

  class Down(kv.nn.Module):
    @kv.nn.compact
    def __call__(self, x):
      return kv._downsample(x, "d")
  p = Down().init(jax.random.key(1), x)["params"]
  out = Down().apply({"params": p}, x)
  w, b = p["d"]["kernel"], p["d"]["bias"]
  ref = jax.lax.conv_general_dilated(x, w, (2, 2), ((0, 1), (0, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  assert out.shape == (1, 4, 4, 4)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  sym = jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
  assert float(jnp.abs(out - sym).max()) > 1e-3


def test_attention_block_is_single_head_over_positions():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
  blk = kv.AttnBlock()
  p = blk.init(jax.random.key(1), x)["params"]
  h = np.asarray(kv.nn.GroupNorm(32, epsilon=1e-6).apply({"params": p["norm"]}, x)).reshape(2, 16, 32)
  proj = lambda n, a: a @ np.asarray(p[n]["kernel"][0, 0]) + np.asarray(p[n]["bias"])
  q, k, v = proj("q", h), proj("k", h), proj("v", h)
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(32)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  ref = np.asarray(x) + proj("proj_out", w @ v).reshape(2, 4, 4, 32)
  np.testing.assert_allclose(blk.apply({"params": p}, x), ref, atol=1e-4)


def test_posterior_sample_kl_and_clamp():
  m = kv.AutoencoderKL(kv.DEMO)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1), minval=-1, maxval=1)
  p = m.init(jax.random.key(1), x)["params"]
  mean, logvar = m.apply({"params": p}, x, method=m.encode)
  assert mean.shape == (2, 8, 8, 4)
  big = jnp.full((1, 2, 2, 1), 50.0)
  p2 = jax.tree.map(lambda a: a, p)
  p2["quant_conv"]["bias"] = jnp.array([0.0] * 4 + [-100.0] * 4)
  _, lv = m.apply({"params": p2}, x, method=m.encode)
  assert float(lv.max()) == -30.0                                       # logvar clamped
  mu, lvar = jnp.full((1, 1, 1, 2), 0.5), jnp.log(jnp.full((1, 1, 1, 2), 2.0))
  kl = kv.kl_to_standard_normal(mu, lvar)
  np.testing.assert_allclose(kl, [2 * 0.5 * (0.25 + 2 - 1 - np.log(2))], rtol=1e-6)
  z = kv.posterior_sample(jnp.zeros((4000, 1, 1, 1)) + 1.0, jnp.log(jnp.full((4000, 1, 1, 1), 4.0)),
                          jax.random.key(2))
  assert abs(float(z.mean()) - 1) < 0.1 and abs(float(z.std()) - 2) < 0.1
  lat = kv.images_to_latents(m, p, x)                                   # mean x scale
  np.testing.assert_allclose(lat, mean * kv.DEMO.scale, atol=1e-6)
  rec = kv.latents_to_images(m, p, lat)
  assert rec.shape == x.shape
  with pytest.raises(ValueError, match="expected H, W divisible by 4 and 1 channels"):
    m.apply({"params": p}, jnp.zeros((1, 30, 30, 1)), method=m.encode)
  del big

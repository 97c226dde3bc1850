"""Tests for tdjax.losses: LPIPS, discriminators + GAN losses, DiffAugment, alignment.

All networks use random weights (nothing pretrained exists offline) and tiny shapes.
"""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tdjax.losses import alignment, augment, discriminators as disc, lpips, weights



def _key(seed):
  # 'rbg' keys: threefry's random-number kernels take seconds each to compile on a small CPU.
  return jax.random.key(seed, impl="rbg")


KEY = _key(0)
SMALL_VGG = (8, 16, 16, 32, 32)


def _img(seed, shape=(2, 32, 32, 3)):
  # numpy, not jax.random: every new shape would compile a random kernel.
  return jnp.asarray(np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32))


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


_JIT_CACHE = {}


def _japply(module, **kw):
  """module.apply, jit-compiled (eager flax compiles every op separately: slow on a small CPU);
  cached per (module, kwargs) so that tests sharing a module share the compilation."""
  key = (id(module), repr(sorted(kw.items())))
  if key not in _JIT_CACHE:
    _JIT_CACHE[key] = (module, jax.jit(lambda variables, *args: module.apply(variables, *args, **kw)))
  return _JIT_CACHE[key][1]


def _jinit(module, **kw):
  return jax.jit(lambda rng, *args: module.init(rng, *args, **kw))


def _all_boxed(boxed_params):
  """Every param carries logical axes, and they map to valid shardings on a 4x2 data x fsdp mesh."""
  from tdjax import parallel
  leaves = jax.tree.leaves(boxed_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  parallel.shardings_for(nn.get_partition_spec(boxed_params), mesh)
  return all(isinstance(l, nn.LogicallyPartitioned) for l in leaves) and len(leaves) > 0


# ------------------------------------------------------------------------------------------------
# LPIPS
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lp():
  m = lpips.LPIPS(widths=SMALL_VGG)
  x = _img(1)
  boxed = jax.jit(m.init)(KEY, x, x)["params"]
  params = nn.unbox(boxed)
  fn = jax.jit(lambda p, a, b: m.apply({"params": p}, a, b))
  return m, boxed, params, fn


def test_lpips_identical_is_zero(lp):
  _, _, params, fn = lp
  x = _img(2)
  np.testing.assert_allclose(fn(params, x, x), 0.0, atol=1e-7)


def test_lpips_positive_symmetric_and_monotone(lp):
  _, _, params, fn = lp
  x = _img(3)
  noise = _normal(4, x.shape)
  small, big = x + 0.05 * noise, x + 0.5 * noise
  d_small, d_big = fn(params, x, small), fn(params, x, big)
  assert d_small.shape == (2,)
  assert np.all(d_small > 0)
  assert np.all(d_big > d_small)
  np.testing.assert_allclose(fn(params, big, x), d_big, rtol=1e-5)


def test_lpips_grads_to_inputs_only(lp):
  m, _, params, _ = lp
  x, y = _img(5), _img(6)
  gp, gx = jax.jit(jax.grad(lambda p, a: lpips.lpips_loss(p, a, y, m), argnums=(0, 1)))(params, x)
  assert np.all(np.isfinite(gx)) and float(jnp.abs(gx).sum()) > 0
  assert all(float(jnp.abs(g).sum()) == 0.0 for g in jax.tree.leaves(gp))


def _lowered_flops(f, *args):
  cost = jax.jit(f).lower(*args).cost_analysis()
  return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])


def test_lpips_flops_and_a_training_pass_differentiates_one_trunk_pass_only():
  """`vgg16_flops` is the trunk's count (XLA's, of the full-width VGG16 at 32 px: lowering only);
  the gradient towards the reconstructions costs 3 trunk passes, not 4: the targets' pass is
  separate from the reconstructions', so no backward runs through it."""
  m = lpips.LPIPS()
  shape = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  p = jax.eval_shape(lambda: m.init(KEY, jnp.zeros(shape.shape), jnp.zeros(shape.shape)))["params"]
  trunk = 2 * lpips.vgg16_flops(32, 32)
  fwd = _lowered_flops(lambda p, a, b: m.apply({"params": p}, a, b).sum(), p, shape, shape)
  train = _lowered_flops(jax.grad(lambda a, p, b: m.apply({"params": p}, a, b).sum()),
                         shape, p, shape)
  assert 1.0 <= fwd / (2 * trunk) < 1.02
  assert 1.0 <= train / (3 * trunk) < 1.02


def test_lpips_grey_is_repeated(lp):
  _, _, params, fn = lp
  x, y = _img(7, (2, 32, 32, 1)), _img(8, (2, 32, 32, 1))
  np.testing.assert_allclose(fn(params, x, y), fn(params, jnp.repeat(x, 3, -1), jnp.repeat(y, 3, -1)),
                             rtol=1e-5)


def test_lpips_input_checks(lp):
  m, _, params, _ = lp
  with pytest.raises(ValueError, match="at least 16x16"):
    m.apply({"params": params}, _img(0, (1, 8, 8, 3)), _img(0, (1, 8, 8, 3)))
  with pytest.raises(ValueError, match="different shapes"):
    m.apply({"params": params}, _img(0), _img(0, (2, 32, 32, 1)))


def test_lpips_logical_axes_and_full_layout(lp):
  _, boxed, _, _ = lp
  assert _all_boxed(boxed)
  spec = nn.get_partition_spec(boxed)
  assert tuple(spec["features"]["conv1_1"]["kernel"]) == ("kernel_h", "kernel_w", "conv_in", "conv_out")
  # The default (VGG16) tree matches the documented npz layout.
  x = jnp.zeros((1, 16, 16, 3))
  flat = weights.flatten_params(weights.expected_params(lpips.LPIPS(), x, x))
  assert len(flat) == 13 * 2 + 5
  assert flat["features/conv1_1/kernel"].shape == (3, 3, 3, 64)
  assert flat["features/conv5_3/kernel"].shape == (3, 3, 512, 512)
  assert flat["lin2/kernel"].shape == (1, 1, 256, 1)
  assert flat["lin4/kernel"].shape == (1, 1, 512, 1)
  # taps at relu1_2 .. relu5_3: full resolution, then after each 2x2 max pool
  taps = jax.eval_shape(lambda: lpips.VGG16Features(SMALL_VGG).init_with_output(KEY, _img(0))[0])
  assert [t.shape for t in taps] == [(2, 32, 32, 8), (2, 16, 16, 16), (2, 8, 8, 16), (2, 4, 4, 32),
                                     (2, 2, 2, 32)]


def test_lpips_load_params_roundtrip_and_errors(lp, tmp_path):
  m, _, params, fn = lp
  path = str(tmp_path / "lpips.npz")
  weights.save_npz_params(path, params)
  loaded = m.load_params(path)
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  x, y = _img(9), _img(10)
  np.testing.assert_array_equal(fn(loaded, x, y), fn(params, x, y))

  flat = {k: np.asarray(v) for k, v in weights.flatten_params(params).items()}
  with pytest.raises(FileNotFoundError, match="not found"):
    m.load_params(str(tmp_path / "nope.npz"))
  missing = dict(flat)
  del missing["features/conv3_2/bias"]
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(weights.WeightsError, match="missing key 'features/conv3_2/bias'"):
    m.load_params(str(tmp_path / "missing.npz"))
  bad = dict(flat)
  bad["lin1/kernel"] = np.zeros((1, 1, 17, 1), np.float32)
  np.savez(tmp_path / "bad.npz", **bad)
  with pytest.raises(weights.WeightsError,
                     match=r"'lin1/kernel' has shape \(1, 1, 17, 1\), expected \(1, 1, 16, 1\)"):
    m.load_params(str(tmp_path / "bad.npz"))
  extra = dict(flat, **{"lin5/kernel": np.zeros((1,), np.float32)})
  np.savez(tmp_path / "extra.npz", **extra)
  with pytest.raises(weights.WeightsError, match="unexpected keys"):
    m.load_params(str(tmp_path / "extra.npz"))
  assert jax.tree.structure(m.load_params(str(tmp_path / "extra.npz"), strict=False)) == \
      jax.tree.structure(params)
  # Files written for full VGG16 do not load into a narrower module, and vice versa.
  with pytest.raises(weights.WeightsError, match="expected"):
    lpips.load_lpips_params(path)


def test_lpips_dropout_option(lp):
  _, _, params, _ = lp
  m = lpips.LPIPS(widths=SMALL_VGG, lin_dropout=0.5)
  x, y = _img(11), _img(12)
  det = _japply(m)({"params": params}, x, y)
  np.testing.assert_allclose(det, lp[3](params, x, y), rtol=1e-6)
  sto = _japply(m, deterministic=False, rngs={"dropout": _key(1)})({"params": params}, x, y)
  assert not np.allclose(sto, det)


# ------------------------------------------------------------------------------------------------
# GAN losses
# ------------------------------------------------------------------------------------------------

def test_hinge_losses_hand_values():
  real = jnp.array([2.0, 0.5, -1.0])
  fake = jnp.array([-2.0, 0.0, 1.0])
  # relu(1 - real) = [0, .5, 2] -> 5/6 ; relu(1 + fake) = [0, 1, 2] -> 1
  np.testing.assert_allclose(disc.hinge_d_loss(real, fake), 0.5 * (5 / 6 + 1.0), rtol=1e-6)
  np.testing.assert_allclose(disc.hinge_g_loss(jnp.array([1.0, 2.0, 3.0])), -2.0)
  np.testing.assert_allclose(disc.hinge_d_loss(jnp.full((4,), 3.0), jnp.full((4,), -3.0)), 0.0)


def test_lecam_hand_values():
  real, fake = jnp.array([1.0, 3.0]), jnp.array([-1.0, 0.5])
  # relu(real - (-0.5))^2 = [2.25, 12.25] -> 7.25 ; relu(0.5 - fake)^2 = [2.25, 0] -> 1.125
  np.testing.assert_allclose(disc.lecam_reg(real, fake, 0.5, -0.5), 8.375, rtol=1e-6)
  er, ef = disc.update_lecam_ema(jnp.float32(0.5), jnp.float32(-0.5), real, fake)
  np.testing.assert_allclose(er, 0.999 * 0.5 + 0.001 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(ef, 0.999 * -0.5 + 0.001 * -0.25, rtol=1e-6)
  ema = disc.init_lecam_ema()
  assert float(ema["real"]) == 0.0 and float(ema["fake"]) == 0.0


def test_consistency_loss_hand_values():
  np.testing.assert_allclose(disc.consistency_loss(jnp.array([1.0, 2.0]), jnp.array([0.0, 4.0])), 2.5)


# ------------------------------------------------------------------------------------------------
# DiffAugment
# ------------------------------------------------------------------------------------------------

def test_diff_augment_shape_determinism_identity():
  x = _img(20, (4, 16, 16, 3))
  aug = jax.jit(functools.partial(augment.diff_augment, policy="color,translation,cutout", prob=0.5))
  a, b = aug(x, _key(1)), aug(x, _key(1))
  assert a.shape == x.shape and a.dtype == x.dtype
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, aug(x, _key(2)))
  np.testing.assert_array_equal(augment.diff_augment(x, _key(1), prob=0.0), x)
  color = jax.jit(functools.partial(augment.diff_augment, policy="color", prob=1.0))
  assert not np.allclose(color(x, _key(1)), x)
  with pytest.raises(ValueError, match="unknown policy"):
    augment.diff_augment(x, KEY, policy="rotate")


def test_translate_moves_content():
  x = np.arange(2 * 8 * 8 * 1, dtype=np.float32).reshape(2, 8, 8, 1) + 1.0
  shift = jax.jit(augment.translate)
  out = np.asarray(shift(x, np.array([2, -1]), np.array([0, 3])))
  np.testing.assert_array_equal(out[0, :6], x[0, 2:])      # content moved up by 2
  np.testing.assert_array_equal(out[0, 6:], 0.0)           # zero padding
  np.testing.assert_array_equal(out[1, 1:, :5], x[1, :7, 3:])
  np.testing.assert_array_equal(out[1, 0], 0.0)
  np.testing.assert_array_equal(out[1, :, 5:], 0.0)
  # The random op is one such shift, within ratio * size.
  img = _img(21, (1, 16, 16, 3))
  rand_shift = jax.jit(functools.partial(augment.diff_augment, policy="translation", prob=1.0))
  y = np.asarray(rand_shift(img, _key(5)))
  hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
          if np.allclose(np.asarray(shift(img, np.array([dy]), np.array([dx]))), y)]
  assert len(hits) == 1
  moved = [rand_shift(img, _key(s)) for s in range(8)]
  assert any(not np.allclose(m, img) for m in moved)


def test_cutout_zeroes_a_region():
  x = jnp.ones((4, 32, 32, 3))
  y = np.asarray(augment.diff_augment(x, _key(3), policy="cutout", prob=1.0, cutout=0.25))
  for b in range(4):
    zero = y[b, :, :, 0] == 0
    assert 0 < zero.sum() <= 64
    rows, cols = np.where(zero)
    # the zeroed set is one axis-aligned box, same in every channel, the rest untouched
    assert zero.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert np.all(y[b][~zero] == 1.0) and np.all(y[b][zero] == 0.0)
  y2 = augment.diff_augment(x, _key(3), policy="cutout_0.5", prob=1.0)
  assert int((np.asarray(y2)[..., 0] == 0).sum()) > int((y[..., 0] == 0).sum())


def test_diff_augment_one_coin_per_policy_entry_for_the_whole_batch():
  """As DetailFlow's DiffAugment: each entry ('color' = brightness, saturation and contrast
  together) is applied to the whole batch or not at all, with probability `prob`."""
  x = _img(23, (6, 16, 16, 3))
  for policy in ("color", "cutout_0.5"):
    full = jax.jit(functools.partial(augment.diff_augment, policy=policy, prob=1.0))
    half = jax.jit(functools.partial(augment.diff_augment, policy=policy, prob=0.5))
    outcomes = set()
    for s in range(16):
      y, y_all = np.asarray(half(x, _key(s))), np.asarray(full(x, _key(s)))
      if np.array_equal(y, x):
        outcomes.add("none")
      else:
        np.testing.assert_array_equal(y, y_all, err_msg=f"{policy}, key {s}")
        outcomes.add("all")
    assert outcomes == {"none", "all"}, policy

def test_diff_augment_is_differentiable():
  x = _img(22, (2, 16, 16, 3))
  g = jax.jit(jax.grad(lambda a: augment.diff_augment(a, _key(0), prob=1.0).sum()))(x)
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0


# ------------------------------------------------------------------------------------------------
# PatchGAN and spectral norm
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_patchgan_output_shape(norm):
  m = disc.PatchGAN(ndf=8, n_layers=3, norm=norm)
  x = _img(30, (2, 64, 64, 3))
  v = jax.jit(functools.partial(m.init, train=False))(KEY, x)
  assert _all_boxed(v["params"])
  out, state = jax.jit(functools.partial(m.apply, train=True, mutable=["batch_stats"]))(nn.unbox(v), x)
  assert out.shape == (2, 6, 6, 1)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
  assert bool(state.get("batch_stats")) == (norm == "batch")
  assert "bias" not in v["params"]["conv1"] if norm == "batch" else "bias" in v["params"]["conv1"]


def test_spectral_norm_power_iteration():
  m = disc.SpectralConv1d(16, kernel_size=3)
  x = _img(31, (2, 10, 8))
  v = nn.unbox(_jinit(m, update_stats=False)(KEY, x))
  kernel = v["params"]["kernel"] * 5.0  # make sigma clearly != 1
  params = {"kernel": kernel, "bias": v["params"]["bias"]}
  step = jax.jit(lambda s: m.apply({"params": params, "spectral": s}, x, update_stats=True,
                                   mutable=["spectral"])[1]["spectral"])
  s = v["spectral"]
  for _ in range(60):
    s = step(s)
  u, vv = s["u"], s["v"]
  w = kernel.reshape(-1, 16).T
  sigma_est = float(u @ (w @ vv))
  np.testing.assert_allclose(sigma_est, float(disc.spectral_sigma(kernel)), rtol=1e-3)
  np.testing.assert_allclose(float(disc.spectral_sigma(kernel / sigma_est)), 1.0, rtol=1e-3)
  # eval mode leaves the vectors alone
  _, st = m.apply({"params": params, "spectral": s}, x, update_stats=False, mutable=["spectral"])
  np.testing.assert_array_equal(st["spectral"]["u"], u)


def test_circular_conv_is_shift_equivariant():
  m = disc.SpectralConv1d(4, kernel_size=9, spectral_norm=False)
  x = _img(32, (1, 12, 4))
  v = _jinit(m, update_stats=False)(KEY, x)
  f = _japply(m, update_stats=False)
  y, y_rolled = f(v, x), f(v, jnp.roll(x, 5, axis=1))
  np.testing.assert_allclose(y_rolled, jnp.roll(y, 5, axis=1), atol=1e-5)
  # centred ("same") taps: a delta at the middle tap is the identity, at tap 0 it reads x[i - 4]
  eye = np.eye(4, dtype=np.float32)
  for tap, shift in ((4, 0), (0, 4)):
    k = np.zeros((9, 4, 4), np.float32)
    k[tap] = eye
    out = f({"params": {"kernel": k, "bias": np.zeros(4, np.float32)}}, x)
    np.testing.assert_allclose(out, jnp.roll(x, shift, axis=1), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# DINO discriminator
# ------------------------------------------------------------------------------------------------

TINY_DINO = dict(embed_dim=32, num_heads=2, key_depths=(0, 2), img_size=32, pos_grid=3)


@pytest.fixture(scope="module")
def dino():
  m = disc.DinoDiscriminator(**TINY_DINO)
  x = _img(40)
  v = _jinit(m, train=False)(KEY, x)
  return m, v, nn.unbox(v)


def test_dino_output_shape_and_state(dino):
  m, boxed, v = dino
  assert _all_boxed(boxed["params"])
  assert set(v["params"]) == {"backbone", "heads"}
  assert set(v) == {"params", "spectral", "batch_stats"}
  out, st = _japply(m, train=True, mutable=["spectral", "batch_stats"])(v, _img(41))
  assert out.shape == (2, 3 * 4)  # 3 readouts x (32/16)^2 tokens
  assert not np.allclose(st["spectral"]["heads"]["head_0"]["conv_in"]["u"],
                         v["spectral"]["heads"]["head_0"]["conv_in"]["u"])
  assert not np.allclose(st["batch_stats"]["heads"]["head_1"]["norm_in"]["mean"],
                         v["batch_stats"]["heads"]["head_1"]["norm_in"]["mean"])
  # other input sizes are resized to img_size; eval mode needs no mutable collections
  assert _japply(m, train=False)(v, _img(42, (2, 48, 48, 3))).shape == (2, 12)


def test_dino_flops_match_the_lowered_forward():
  """DinoDiscriminator.flops() (the paper's ViT-S/16 at 224 with its 5 heads) against XLA's count
  of the lowered forward pass (lowering only; elementwise ops make up the difference)."""
  d = disc.DinoDiscriminator()
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  v = jax.eval_shape(lambda: d.init(KEY, jnp.zeros(x.shape), train=False))
  f = d.flops()
  assert f["heads_conv_in"] < f["heads"]
  ratio = _lowered_flops(lambda v, a: d.apply(v, a, train=False).sum(), v, x) / (
      2 * (f["backbone_mm"] + f["backbone_attn"] + f["heads"]))
  assert 1.0 <= ratio < 1.02


def test_teacher_flops_match_the_lowered_forward():
  """ViTTeacher.flops() (SigLIP2-so400m's shape at 256 px) against XLA's count of the lowered
  forward (lowering only), with the einsum attention of accelerators: the CPU's blocked kernel
  loops over batch blocks, a loop body XLA counts once."""
  t = alignment.ViTTeacher(attention_impl="einsum")
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  p = jax.eval_shape(lambda: t.init(KEY, jnp.zeros(x.shape)))
  ratio = _lowered_flops(lambda p, a: t.apply(p, a).sum(), p, x) / (2 * t.flops(256, 256))
  assert 1.0 <= ratio < 1.02


def test_dino_backbone_frozen(dino):
  m, _, v = dino
  real, fake = _img(43), _img(44)

  def d_loss(params, fake):
    variables = {**v, "params": params}
    lr, _ = m.apply(variables, real, train=True, mutable=["spectral", "batch_stats"])
    lf, _ = m.apply(variables, fake, train=True, mutable=["spectral", "batch_stats"])
    return disc.hinge_d_loss(lr, lf)

  grads, gfake = jax.jit(jax.grad(d_loss, argnums=(0, 1)))(v["params"], fake)
  assert all(float(jnp.abs(g).sum()) == 0.0 for g in jax.tree.leaves(grads["backbone"]))
  assert float(jnp.abs(grads["heads"]["head_0"]["conv_in"]["kernel"]).sum()) > 0
  assert float(jnp.abs(gfake).sum()) > 0  # gradients still reach the images (generator side)
  opt = optax.multi_transform({"trainable": optax.adamw(1e-2), "frozen": optax.set_to_zero()},
                              disc.frozen_param_labels(v["params"]))
  step = jax.jit(lambda tx, g, p: optax.apply_updates(p, tx.update(g, tx.init(p), p)[0]), static_argnums=0)
  new = step(opt, grads, v["params"])
  jax.tree.map(np.testing.assert_array_equal, new["backbone"], v["params"]["backbone"])
  assert not np.allclose(new["heads"]["head_0"]["conv_in"]["kernel"],
                         v["params"]["heads"]["head_0"]["conv_in"]["kernel"])


def test_dino_features_taken_at_key_blocks(dino):
  m, _, v = dino
  x = _img(45)
  _, feats = _japply(m, train=False, return_features=True)(v, x)
  every = disc.DinoViT(**{**{k: TINY_DINO[k] for k in ("embed_dim", "num_heads", "img_size",
                                                       "pos_grid")}, "key_depths": (0, 1, 2)})
  all_feats = _japply(every)({"params": v["params"]["backbone"]}, x)
  assert len(feats) == 3 and len(all_feats) == 4
  np.testing.assert_allclose(feats[0], all_feats[0], atol=1e-6)  # before block 0
  np.testing.assert_allclose(feats[1], all_feats[1], atol=1e-6)  # after block 0
  np.testing.assert_allclose(feats[2], all_feats[3], atol=1e-6)  # after block 2
  assert not np.allclose(feats[2], all_feats[2], atol=1e-4)
  assert feats[0].shape == (2, 4, 32)


def test_dino_backbone_loader(dino, tmp_path):
  m, _, v = dino
  path = str(tmp_path / "dino.npz")
  weights.save_npz_params(path, v["params"]["backbone"])
  bb = disc.load_dino_backbone(path, m)
  params = disc.with_backbone(v["params"], bb)
  x = _img(46)
  f = _japply(m, train=False, return_features=True)
  jax.tree.map(np.testing.assert_array_equal, f({**v, "params": params}, x), f(v, x))
  flat = weights.flatten_params(bb)
  assert flat["blocks_2/attn/query/kernel"].shape == (32, 2, 16)
  assert flat["blocks_2/attn/out/kernel"].shape == (2, 16, 32)
  assert flat["blocks_2/norm1/ln/scale"].shape == (32,)
  assert flat["pos_embed"].shape == (1, 10, 32)
  shallow = disc.DinoDiscriminator(**{**TINY_DINO, "key_depths": (0,)})
  with pytest.raises(weights.WeightsError, match="unexpected keys"):
    disc.load_dino_backbone(path, shallow)
  assert "blocks_1" not in disc.load_dino_backbone(path, shallow, strict=False)
  with pytest.raises(FileNotFoundError):
    disc.load_dino_backbone(str(tmp_path / "x.npz"), m)
  full = weights.flatten_params(weights.expected_params(disc.DinoDiscriminator().backbone_module(),
                                                        jnp.zeros((1, 224, 224, 3))))
  assert full["patch_embed/kernel"].shape == (16, 16, 3, 384)
  assert full["pos_embed"].shape == (1, 197, 384)
  assert full["blocks_11/mlp/fc1/kernel"].shape == (384, 1536)


def _old_dino_layout(flat: dict) -> dict:
  """A DINO backbone file as tdjax wrote it before its blocks were tdjax.nn's TransformerBlock:
  blocks_i/norm1/{scale,bias}, fused attn/qkv kernel [C, 3, H, D] / bias [3, H, D], attn/proj."""
  out = {}
  for k, a in flat.items():
    blk, _, rest = k.partition("/")
    if rest.startswith(("attn/key/", "attn/value/")):
      continue
    if rest.startswith("attn/query/"):
      leaf = rest.rsplit("/", 1)[1]
      parts = [flat[f"{blk}/attn/{n}/{leaf}"] for n in ("query", "key", "value")]
      out[f"{blk}/attn/qkv/{leaf}"] = np.stack(parts, axis=1 if leaf == "kernel" else 0)
    else:
      out[k.replace("/ln/", "/").replace("attn/out/", "attn/proj/")] = a
  return out


def test_dino_backbone_loader_reads_the_older_layout(dino, tmp_path):
  """A backbone file written in the older key layout (fused qkv, attn/proj, norms without '/ln')
  loads into the same tree as the current one and gives the same readouts."""
  m, _, v = dino
  bb = v["params"]["backbone"]
  flat = {k: np.asarray(a) for k, a in weights.flatten_params(bb).items()}
  old = _old_dino_layout(flat)
  assert old["blocks_2/attn/qkv/kernel"].shape == (32, 3, 2, 16) and "blocks_0/norm1/scale" in old
  np.savez(tmp_path / "old.npz", **old)
  loaded = disc.load_dino_backbone(str(tmp_path / "old.npz"), m)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, bb))
  x = _img(46)
  f = _japply(m, train=False, return_features=True)
  jax.tree.map(np.testing.assert_array_equal,
               f({**v, "params": disc.with_backbone(v["params"], loaded)}, x), f(v, x))
  assert disc.upgrade_dino_keys(flat) is flat              # the current layout passes untouched
  del old["blocks_1/attn/qkv/bias"]
  np.savez(tmp_path / "miss.npz", **old)
  with pytest.raises(weights.WeightsError, match="missing key 'blocks_1/attn/(key|query|value)/bias'"):
    disc.load_dino_backbone(str(tmp_path / "miss.npz"), m)


# ------------------------------------------------------------------------------------------------
# Alignment
# ------------------------------------------------------------------------------------------------

TINY_TEACHER = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=8, pos_grid=2)


def test_alignment_loss_values():
  t = _normal(50, (3, 5, 16))
  pooled = t.mean(axis=1)
  np.testing.assert_allclose(alignment.alignment_loss(2.5 * pooled, t), -1.0, rtol=1e-5)
  np.testing.assert_allclose(alignment.alignment_loss(-pooled, t), 1.0, rtol=1e-5)
  np.testing.assert_allclose(alignment.alignment_loss(pooled, pooled), -1.0, rtol=1e-5)
  e = jnp.eye(16)[:3]
  np.testing.assert_allclose(alignment.alignment_loss(e, jnp.roll(e, 1, axis=1)), 0.0, atol=1e-7)
  with pytest.raises(ValueError):
    alignment.alignment_loss(pooled[:, :8], t)


def test_alignment_projector_and_teacher(tmp_path):
  proj = alignment.AlignmentProjector(teacher_dim=32, hidden=16)
  z = _normal(51, (2, 8))
  pv = _jinit(proj)(KEY, z)
  assert _all_boxed(pv["params"])
  assert pv["params"]["fc1"]["kernel"].value.shape == (8, 16)
  teacher = alignment.ViTTeacher(**TINY_TEACHER)
  x = _img(52)
  tv = _jinit(teacher)(KEY, x)
  assert _all_boxed(tv["params"])
  tparams = nn.unbox(tv["params"])
  tf = _japply(teacher)
  feats = tf({"params": tparams}, x)
  assert feats.shape == (2, 16, 32)  # 32/8 = 4x4 grid, pos table 2x2 interpolated
  # LN with scale 1 / bias 0 is idempotent, so give the post-LN non-trivial params first.
  scale, bias = 1.0 + _normal(53, (32,)), _normal(54, (32,))
  p2 = {**tparams, "post_ln": {"scale": scale, "bias": bias}}
  once = tf({"params": p2}, x)
  twice = _japply(alignment.ViTTeacher(**TINY_TEACHER, double_post_ln=True))({"params": p2}, x)
  mu, var = once.mean(-1, keepdims=True), once.var(-1, keepdims=True)
  np.testing.assert_allclose(twice, (once - mu) / np.sqrt(var + 1e-6) * scale + bias, rtol=1e-4, atol=1e-4)
  assert not np.allclose(twice, once, atol=1e-2)

  def loss(p, tp):
    return alignment.alignment_loss(proj.apply({"params": p}, z),
                                    alignment.teacher_features(teacher, tp, x))

  gp, gt = jax.jit(jax.grad(loss, argnums=(0, 1)))(nn.unbox(pv["params"]), tparams)
  assert float(jnp.abs(gp["fc1"]["kernel"]).sum()) > 0
  assert all(float(jnp.abs(g).sum()) == 0.0 for g in jax.tree.leaves(gt))

  path = str(tmp_path / "teacher.npz")
  weights.save_npz_params(path, tparams)
  loaded = alignment.load_teacher_params(path, teacher)
  np.testing.assert_array_equal(tf({"params": loaded}, x), tf({"params": tparams}, x))
  flat = {k: np.asarray(a) for k, a in weights.flatten_params(tparams).items()}
  assert flat["patch_embed/kernel"].shape == (8 * 8 * 3, 32)
  assert flat["blocks_0/attn/query/kernel"].shape == (32, 2, 16)
  assert flat["blocks_0/norm1/ln/scale"].shape == (32,)
  with pytest.raises(FileNotFoundError, match="alignment teacher weights file not found"):
    alignment.load_teacher_params(str(tmp_path / "none.npz"), teacher)
  miss = dict(flat)
  del miss["blocks_0/attn/out/bias"]
  np.savez(tmp_path / "miss.npz", **miss)
  with pytest.raises(weights.WeightsError, match="missing key 'blocks_0/attn/out/bias'"):
    alignment.load_teacher_params(str(tmp_path / "miss.npz"), teacher)
  bigger = alignment.ViTTeacher(**{**TINY_TEACHER, "mlp_dim": 96})
  with pytest.raises(weights.WeightsError,
                     match=r"'blocks_0/mlp/fc1/bias' has shape \(64,\), expected \(96,\)"):
    alignment.load_teacher_params(path, bigger)
  with pytest.raises(ValueError, match="multiple of patch"):
    teacher.apply({"params": tparams}, _img(0, (1, 30, 30, 3)))


def test_teacher_shape_reads_the_towers_dims(tmp_path):
  teacher = alignment.ViTTeacher(**{**TINY_TEACHER, "depth": 3})
  tparams = nn.unbox(_jinit(teacher)(KEY, _img(52))["params"])
  path = str(tmp_path / "teacher.npz")
  weights.save_npz_params(path, tparams)
  assert alignment.teacher_shape(path) == {**TINY_TEACHER, "depth": 3}
  flat = {k: np.asarray(a) for k, a in weights.flatten_params(tparams).items()}
  del flat["pos_embed"]
  np.savez(tmp_path / "no_pos.npz", **flat)
  with pytest.raises(ValueError, match="missing key 'pos_embed'"):
    alignment.teacher_shape(str(tmp_path / "no_pos.npz"))
  with pytest.raises(FileNotFoundError, match="alignment teacher weights file not found"):
    alignment.teacher_shape(str(tmp_path / "none.npz"))


_OLD_TEACHER_NAMES = {"norm1/ln": "ln1", "norm2/ln": "ln2", "attn/query": "attn/q",
                      "attn/key": "attn/k", "attn/value": "attn/v", "attn/out": "attn/o"}


def test_teacher_loaders_read_the_older_layout(tmp_path):
  """A teacher / SigLIP2 file in the older key layout (blocks_i/ln1, ln2, attn/q, k, v, o) gives
  the same dims (`teacher_shape`), the same params tree and the same features as the current one."""
  kw = {**TINY_TEACHER, "depth": 2}
  teacher = alignment.ViTTeacher(**kw)
  x = _img(55)
  tparams = nn.unbox(_jinit(teacher)(KEY, x)["params"])
  flat = {k: np.asarray(a) for k, a in weights.flatten_params(tparams).items()}
  old = {}
  for k, a in flat.items():
    blk, _, rest = k.partition("/")
    mod, _, leaf = rest.rpartition("/")
    old[f"{blk}/{_OLD_TEACHER_NAMES.get(mod, mod)}/{leaf}" if mod else k] = a
  assert "blocks_1/attn/o/kernel" in old and "blocks_0/ln2/scale" in old and "post_ln/scale" in old
  path = str(tmp_path / "old.npz")
  np.savez(path, **old)
  assert alignment.teacher_shape(path) == kw
  loaded = alignment.load_teacher_params(path, teacher)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, tparams))
  tf = _japply(teacher)
  np.testing.assert_array_equal(tf({"params": loaded}, x), tf({"params": tparams}, x))
  assert alignment.upgrade_teacher_keys(flat) is flat


def test_npz_shapes_reads_the_headers_not_the_arrays(tmp_path, monkeypatch):
  arrays = {"a/kernel": np.zeros((3, 4, 5), np.float32), "b": np.float32(2.0),
            "c": np.ones((7,), np.float16)}
  np.savez(tmp_path / "plain.npz", **arrays)
  np.savez_compressed(tmp_path / "zipped.npz", **arrays)
  (tmp_path / "bad.npz").write_bytes(b"not a zip")
  def no_array_data(*args, **kwargs):
    raise AssertionError("npz_shapes read array data")
  monkeypatch.setattr(np.lib.format, "read_array", no_array_data)
  for name in ("plain.npz", "zipped.npz"):
    assert weights.npz_shapes(tmp_path / name) == {"a/kernel": (3, 4, 5), "b": (), "c": (7,)}
  with pytest.raises(weights.WeightsError, match="bad.npz.* is not a readable .npz"):
    weights.npz_shapes(tmp_path / "bad.npz", what="teacher")
  with pytest.raises(FileNotFoundError, match="teacher weights file not found"):
    weights.npz_shapes(tmp_path / "none.npz", what="teacher")


def test_save_npz_without_extension(tmp_path):
  p = str(tmp_path / "weights_file")
  weights.save_npz_params(p, {"a": {"b": jnp.ones((2,))}})
  assert os.path.exists(p)
  out = weights.load_npz_params(p, {"a": {"b": jax.ShapeDtypeStruct((2,), jnp.float32)}})
  np.testing.assert_array_equal(out["a"]["b"], np.ones(2))


def test_patchgan_batchnorm_statistics_are_global_on_a_mesh():
  """The documented claim: under jit over a batch sharded on a mesh, BatchNorm statistics are those
  of the global batch (as SyncBatchNorm), and the logical axes give valid parameter shardings."""
  from tdjax import parallel
  m = disc.PatchGAN(ndf=8, n_layers=2, norm="batch")
  x = _img(60, (8, 16, 16, 3)) + jnp.arange(8.0)[:, None, None, None]  # per-sample offsets
  boxed = _jinit(m, train=False)(KEY, x)
  variables = nn.unbox(boxed)
  fn = _japply(m, train=True, mutable=["batch_stats"])
  ref_out, ref_state = fn(variables, x)
  mesh = parallel.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  with parallel.use_mesh(mesh):
    shardings = parallel.shardings_for(nn.get_partition_spec(boxed), mesh)
    assert shardings["params"]["conv1"]["kernel"].spec == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    sv = jax.device_put(variables, shardings)
    sx = jax.device_put(x, parallel.batch_sharding(mesh, 4))
    out, state = fn(sv, sx)
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               state["batch_stats"], ref_state["batch_stats"])
  # and they differ from the statistics of any single shard
  shard_state = fn(variables, x[:2])[1]
  assert not np.allclose(shard_state["batch_stats"]["norm1"]["mean"],
                         ref_state["batch_stats"]["norm1"]["mean"])


def test_resize_torch_area_and_bicubic():
  x = _img(70, (1, 10, 12, 2))
  # area = adaptive average pooling: 10 -> 4 uses windows [0,3) [2,5) [5,8) [7,10)
  y = disc.resize_torch(x, (4, 6))
  xn = np.asarray(x)
  want = np.stack([xn[:, lo:hi].mean(1) for lo, hi in [(0, 3), (2, 5), (5, 8), (7, 10)]], 1)
  want = want.reshape(1, 4, 6, 2, 2).mean(3)  # 12 -> 6 is plain 2-pixel averaging
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(disc.resize_torch(x, (10, 12)), x)
  # bicubic, A = -0.75: [1, 2, 4, 8] x2 -> first output by hand = 0.89453125 (torch's value)
  r = jnp.array([1.0, 2.0, 4.0, 8.0]).reshape(1, 4, 1, 1) * jnp.ones((1, 1, 4, 1))
  up = disc.resize_torch(r, (8, 4))
  np.testing.assert_allclose(up[0, 0, 0, 0], 0.89453125, rtol=1e-6)
  c = disc.resize_torch(jnp.full((1, 5, 7, 3), 0.3), (16, 16))
  np.testing.assert_allclose(c, 0.3, rtol=1e-5)


def test_dino_random_crop_option():
  bb = disc.DinoViT(embed_dim=16, num_heads=2, key_depths=(), img_size=32)
  x = _img(71, (1, 48, 48, 3))
  v = _jinit(bb)(KEY, x)
  f = _japply(bb)
  plain = f(v, x)[0]
  outs = [f(v, x, _key(s))[0] for s in range(8)]
  same = [bool(np.allclose(o, plain)) for o in outs]
  assert any(same) and not all(same)

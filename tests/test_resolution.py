"""R(n) table, PyTorch-exact area / bicubic resizers, prefix and noise-index sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdjax.tokenizers import resolution as rs

# docs/reference/detailflow.md 1.5: N = 128, g = 8, alpha = 1.5, R = 256, patch 16 --
# t: tgt_res -> dec_res
TABLE_128 = {1: (1, 16), 2: (4, 16), 3: (6, 16), 4: (9, 16), 5: (12, 16), 6: (15, 16),
             7: (18, 32), 8: (21, 32), 16: (44, 48), 24: (67, 80), 32: (88, 96), 40: (108, 112),
             48: (128, 128), 56: (147, 160), 64: (164, 176), 72: (181, 192), 80: (196, 208),
             88: (210, 224), 96: (223, 224), 104: (235, 240), 112: (244, 256), 120: (251, 256),
             128: (256, 256)}


def test_resolution_table_n128():
  for t, (tgt, dec) in TABLE_128.items():
    assert rs.resolution_for_prefix(t, 128, 256, 1.5) == tgt, t
    assert rs.decoder_resolution(tgt, 16) == dec, t


def test_resolution_other_n():
  for N, t, tgt, dec in [(256, 8, 11, 16), (256, 64, 89, 96), (256, 128, 165, 176),
                         (256, 192, 223, 224), (512, 64, 46, 48), (512, 256, 165, 176),
                         (512, 384, 224, 224)]:
    r = rs.resolution_for_prefix(t, N, 256)
    assert (r, rs.decoder_resolution(r, 16)) == (tgt, dec)


# ---- independent direct implementations of the PyTorch formulas -----------------------------

def area_direct(img, oh, ow):
  """adaptive_avg_pool2d, pixel by pixel."""
  H, W = img.shape
  out = np.zeros((oh, ow))
  for i in range(oh):
    h0, h1 = math.floor(i * H / oh), math.ceil((i + 1) * H / oh)
    for j in range(ow):
      w0, w1 = math.floor(j * W / ow), math.ceil((j + 1) * W / ow)
      out[i, j] = img[h0:h1, w0:w1].mean()
  return out


def cubic(x, A=-0.75):
  x = abs(x)
  if x <= 1:
    return (A + 2) * x ** 3 - (A + 3) * x ** 2 + 1
  if x < 2:
    return A * x ** 3 - 5 * A * x ** 2 + 8 * A * x - 4 * A
  return 0.0


def bicubic_direct(img, oh, ow):
  """upsample_bicubic2d, align_corners=False: 16 taps per output pixel, border-clamped reads."""
  H, W = img.shape
  out = np.zeros((oh, ow))
  for i in range(oh):
    y = (i + 0.5) * H / oh - 0.5
    y0 = math.floor(y)
    for j in range(ow):
      x = (j + 0.5) * W / ow - 0.5
      x0 = math.floor(x)
      s = 0.0
      for m in range(-1, 3):
        for n in range(-1, 3):
          v = img[min(max(y0 + m, 0), H - 1), min(max(x0 + n, 0), W - 1)]
          s += v * cubic(y - (y0 + m)) * cubic(x - (x0 + n))
      out[i, j] = s
  return out


@pytest.mark.parametrize("src,dst", [((8, 8), (4, 4)), ((28, 28), (12, 9)), ((7, 10), (3, 4)),
                                     ((5, 5), (5, 5)), ((32, 32), (21, 1))])
def test_area_matches_adaptive_avg_pool(src, dst):
  img = np.random.RandomState(0).randn(*src)
  got = rs.area_resize(jnp.asarray(img, jnp.float32)[None, :, :, None], dst)[0, :, :, 0]
  np.testing.assert_allclose(got, area_direct(img, *dst), atol=1e-5)


@pytest.mark.parametrize("src,dst", [((4, 4), (16, 16)), ((9, 9), (16, 16)), ((6, 5), (7, 13)),
                                     ((3, 3), (3, 3)), ((16, 16), (11, 6)), ((1, 1), (4, 4))])
def test_bicubic_matches_pytorch_formula(src, dst):
  img = np.random.RandomState(1).randn(*src)
  got = rs.bicubic_resize(jnp.asarray(img, jnp.float32)[None, :, :, None], dst)[0, :, :, 0]
  np.testing.assert_allclose(got, bicubic_direct(img, *dst), atol=1e-5)


def test_literal_values():
  # area: [1, 2, 3, 4] -> 2 = [1.5, 3.5];  3 -> 2 averages overlapping windows [0:2], [1:3]
  np.testing.assert_allclose(rs.area_matrix(4, 2) @ np.array([1., 2., 3., 4.]), [1.5, 3.5])
  np.testing.assert_allclose(rs.area_matrix(3, 2) @ np.array([1., 2., 4.]), [1.5, 3.0])
  # bicubic A = -0.75, [0, 1] -> 4 (hand-computed from the cubic convolution kernel):
  # overshoot below 0 and above 1, no clamping
  np.testing.assert_allclose(rs.bicubic_matrix(2, 4) @ np.array([0., 1.]),
                             [-0.10546875, 0.2265625, 0.7734375, 1.10546875], atol=1e-7)


def test_degraded_target_and_plan():
  img = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1))
  for t in (1, 4, 8, 12, 32):
    tgt = rs.resolution_for_prefix(t, 32, 32)
    dec = rs.decoder_resolution(tgt, 4)
    out = rs.degraded_target(img, t, 32, 4)
    assert out.shape == (2, dec, dec, 1)
    ref = rs.bicubic_resize(rs.area_resize(img, (tgt, tgt)), (dec, dec))
    np.testing.assert_allclose(out, ref, atol=1e-5)
  np.testing.assert_array_equal(rs.degraded_target(img, 32, 32, 4), img)
  plan = rs.PrefixPlan(32, 4, 32, 4, degrade_p=0.2)
  assert plan.ts == [1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32]
  for t in plan.ts:
    k, r = plan.branch_of_t[t], plan.row_of_t[t]
    assert plan.branches[k] == plan.dec_of[t]
    tgt = rs.resolution_for_prefix(t, 32, 32)
    np.testing.assert_allclose(plan.matrices[k][r], rs.degrade_matrix(32, tgt, plan.dec_of[t]),
                               atol=1e-6)
  assert rs.PrefixPlan(32, 4, 32, 4, degrade_p=0.0).branches == [32]


def test_sample_prefix_length():
  keys = jax.random.split(jax.random.key(0), 4000)
  ts = np.asarray(jax.vmap(lambda k: rs.sample_prefix_length(k, 128, 8, 0.2))(keys))
  allowed = set(rs.possible_prefix_lengths(128, 8, 0.2))
  assert set(ts.tolist()) <= allowed
  assert abs((ts < 128).mean() - 0.2) < 0.03
  assert set(ts[ts < 128].tolist()) >= {1, 8, 16, 120}
  assert all(t <= 8 or t % 8 == 0 for t in ts)
  # rounding is UP to the next group: t=16 gathers U-draws 9..16, t=8 only the draw 8
  keys = jax.random.split(jax.random.key(1), 20000)
  ts = np.asarray(jax.vmap(lambda k: rs.sample_prefix_length(k, 128, 8, 1.0))(keys))
  c1, c8, c16 = (ts == 1).sum(), (ts == 8).sum(), (ts == 16).sum()
  assert c16 > 4 * c8 and c8 < 2 * c1 and not (ts == 128).any()
  assert set(np.asarray(jax.vmap(lambda k: rs.sample_prefix_length(k, 128, 8, 0.0))(keys[:50])
                        ).tolist()) == {128}


def test_sample_noise_index():
  keys = jax.random.split(jax.random.key(1), 3000)
  for t in (1, 5, 8, 16, 64, 128):
    idx, end = jax.vmap(lambda k: rs.sample_noise_index(k, t, 8))(keys)
    idx, end = np.asarray(idx), np.asarray(end)
    if t <= 8:
      assert idx.min() >= 0 and idx.max() <= t - 1 and np.all(end == idx + 1)
      assert len(set(idx.tolist())) == t
    else:
      assert idx.max() < t - 8
      big = idx >= 8
      assert np.all(idx[big] % 8 == 0) and np.all(end[big] == idx[big] + 8)
      assert np.all(end[~big] == idx[~big] + 1)
      assert end.max() <= t

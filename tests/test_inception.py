"""FID InceptionV3 (tdjax.nn.inception): the pytorch-fid weight layout lands where it must, the FID
variant's pools, and the ADM evaluation CLI on it.  A golden test against pytorch-fid runs when
TDJAX_INCEPTION_PTH names `pt_inception-2015-12-05-6726825d.pth` and torch + pytorch_fid import."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdjax import convert, evaluate, evaluation
from tdjax.nn import inception


def torch_state_dict(seed=0):
  """pytorch-fid key names and (out, in, kh, kw) shapes, made from the Flax tree by the inverse
  layout rules; num_batches_tracked as torch saves it."""
  rng = np.random.default_rng(seed)
  v = inception.expected_variables()
  sd = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(v)[0]:
    col, *mod, name = [p.key for p in path]
    base = ".".join(mod)
    shape = leaf.shape
    if name == "kernel":
      shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
      key = base + ".weight"
    else:
      key = base + "." + {"scale": "weight", "mean": "running_mean", "var": "running_var"}.get(
          name, name)
    value = rng.normal(size=shape) * 0.1
    if name == "kernel":        # He-scaled, so that random features still depend on the input
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
    elif name in ("scale", "var"):
      value = 1.0 + np.abs(value)
    sd[key] = value.astype(np.float32)
    if name == "mean":
      sd[base + ".num_batches_tracked"] = np.zeros((), np.float32)
  return sd


def test_state_dict_has_pytorch_fids_layout():
  sd = torch_state_dict()
  convs = [k for k in sd if k.endswith("conv.weight")]
  assert len(convs) == 94                       # torchvision InceptionV3 without AuxLogits
  assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
  assert sd["Mixed_6e.branch7x7dbl_5.conv.weight"].shape == (192, 192, 1, 7)
  assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
  assert sd["Mixed_7c.branch_pool.conv.weight"].shape == (192, 2048, 1, 1)
  assert sd["Mixed_5d.branch_pool.conv.weight"].shape == (64, 288, 1, 1)
  assert sd["fc.weight"].shape == (1008, 2048) and sd["fc.bias"].shape == (1008,)


def _np_basic_conv(x, sd, name, padding):
  """relu(BN(conv)) in numpy from torch-layout weights (eps 1e-3)."""
  w = sd[name + ".conv.weight"]                         # (O, I, kh, kw)
  (ph, pw), (kh, kw) = padding, w.shape[2:]
  xp = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  h, wd = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  y = sum(xp[:, i:i + h, j:j + wd] @ w[:, :, i, j].T for i in range(kh) for j in range(kw))
  y = (y - sd[name + ".bn.running_mean"]) / np.sqrt(sd[name + ".bn.running_var"] + 1e-3)
  return np.maximum(y * sd[name + ".bn.weight"] + sd[name + ".bn.bias"], 0)


def test_converted_weights_match_a_numpy_forward_of_their_convs():
  sd = torch_state_dict()
  v = convert.inception_variables(sd, inception.expected_variables())
  x = np.random.default_rng(1).normal(size=(2, 5, 9, 192)).astype(np.float32)
  for name, kernel, pad in (("Mixed_6e.branch7x7dbl_5", (1, 7), (0, 3)),
                            ("Mixed_6e.branch7x7dbl_4", (7, 1), (3, 0))):
    mod, br = name.split(".")
    sub = {c: v[c][mod][br] for c in ("params", "batch_stats")}
    y = inception.BasicConv2d(192, kernel, padding=pad).apply(sub, x)
    np.testing.assert_allclose(np.asarray(y), _np_basic_conv(x, sd, name, pad), rtol=1e-4,
                               atol=1e-4)
  np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["fc.weight"].T)


def test_fid_pools_ignore_padding_and_e2_max_pools():
  x = jnp.full((1, 4, 4, 1), 3.0)
  np.testing.assert_allclose(np.asarray(inception._avg_pool(x)), 3.0)  # corners too: TF's pool
  v = jax.eval_shape(lambda: inception.InceptionE(max_pool=True).init(
      jax.random.key(0), jnp.zeros((1, 3, 3, 8))))
  ones = jax.tree.map(lambda s: jnp.ones(s.shape), v)
  xe = jnp.zeros((1, 3, 3, 8)).at[0, 0, 0, :].set(1.0)
  # all weights, BN statistics and biases 1: the pool branch (last 192 channels) at a pixel is
  # relu((8 p - 1) / sqrt(1 + 1e-3) + 1), p = the pooled value of the corner 1 there: 1 under
  # E_2's max pool, 1/4 under the average pool at a corner (4 real cells, padding ignored)
  out_max = inception.InceptionE(max_pool=True).apply(ones, xe)[..., -192:]
  out_avg = inception.InceptionE(max_pool=False).apply(ones, xe)[..., -192:]
  branch = lambda p: (8 * p - 1) / np.sqrt(1 + 1e-3) + 1
  np.testing.assert_allclose(np.asarray(out_max[0, 1, 1, 0]), branch(1.0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out_avg[0, 0, 0, 0]), branch(1 / 4), rtol=1e-5)


def _np_bilinear_align_corners_false(x, size):
  """F.interpolate(mode='bilinear', align_corners=False, antialias=False) written out per output
  pixel in float64: source s = (d + 0.5) in / out - 0.5, clamped below at 0; the two neighbours
  floor(s) and floor(s) + 1 (clamped at the last row) weighted 1 - frac and frac."""
  x = np.asarray(x, np.float64)
  (h, w), (oh, ow) = x.shape[1:3], size

  def taps(n_in, n_out):
    out = []
    for d in range(n_out):
      s = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
      i = min(int(np.floor(s)), n_in - 1)
      out.append((i, min(i + 1, n_in - 1), s - i))
    return out

  y = np.empty((x.shape[0], oh, ow, x.shape[3]))
  for r, (r0, r1, fr) in enumerate(taps(h, oh)):
    for c, (c0, c1, fc) in enumerate(taps(w, ow)):
      y[:, r, c] = ((1 - fr) * ((1 - fc) * x[:, r0, c0] + fc * x[:, r0, c1])
                    + fr * ((1 - fc) * x[:, r1, c0] + fc * x[:, r1, c1]))
  return y


@pytest.mark.parametrize("src", [(512, 512), (256, 256), (64, 48), (7, 5), (300, 640)])
def test_fid_resize_is_pytorch_fids_bilinear(src):
  """InceptionV3 resizes its input to 299 as pytorch-fid does (`F.interpolate(bilinear,
  align_corners=False)`, no antialiasing), also when downsampling 512 px images; an antialiased
  resize (jax.image.resize) moves 512 -> 299 by ~1 on random images, while 256 -> 299 (up) is
  the same either way.  (tests/test_torch_references.py checks against torch itself.)"""
  x = np.random.default_rng(0).uniform(-1, 1, (2, *src, 3)).astype(np.float32)
  want = _np_bilinear_align_corners_false(x, (299, 299))
  got = np.asarray(jax.jit(lambda x: inception.resize_bilinear(x, (299, 299)))(x))
  # float32 source positions (torch's too) are within ~1 ulp of the exact ones (3e-5 at 512 px),
  # and neighbouring values differ by up to 2: tolerance 4 ulp(largest source size)
  np.testing.assert_allclose(got, want, rtol=0, atol=4 * max(src) * 2.0 ** -23)
  antialiased = np.asarray(jax.image.resize(x, (2, 299, 299, 3), "bilinear"))
  if src[0] > 299:
    assert np.abs(antialiased - want).max() > 0.1
  elif src[0] < 299 and src[1] < 299:
    np.testing.assert_allclose(antialiased, want, rtol=0, atol=1e-4)
  seen, resize = [], inception.resize_bilinear

  def spy(x, size):
    seen.append((x.shape, size))
    return resize(x, size)
  with pytest.MonkeyPatch.context() as mp:       # the network resizes through it (shapes only)
    mp.setattr(inception, "resize_bilinear", spy)
    jax.eval_shape(lambda: inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, *src, 3))))
  assert seen == [((1, *src, 3), (299, 299))]


def test_conversion_errors_name_keys_and_shapes(tmp_path):
  sd = torch_state_dict()
  sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)       # dropped, not an error
  del sd["Mixed_6a.branch3x3.bn.running_var"]
  sd["Mixed_5b.branch1x1.conv.weight"] = np.zeros((64, 190, 1, 1), np.float32)
  sd["Mixed_9z.conv.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  path = str(tmp_path / "bad.npz")
  np.savez(path, **sd)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_inception(path, str(tmp_path / "out.npz"))
  msg = str(e.value)
  assert "missing batch_stats/Mixed_6a/branch3x3/bn/var (384,)" in msg
  assert "Mixed_5b.branch1x1.conv.weight: checkpoint gives (1, 1, 190, 64)" in msg
  assert "unexpected Mixed_9z.conv.weight" in msg and "AuxLogits" not in msg
  assert not os.path.exists(str(tmp_path / "out.npz"))


def test_converted_file_drives_the_adm_evaluation(tmp_path):
  sd = torch_state_dict()
  np.savez(str(tmp_path / "pt.npz"), **sd)
  weights = str(tmp_path / "inception.npz")
  info = convert.convert_inception(str(tmp_path / "pt.npz"), weights)
  assert info["params"] == sum(v.size for k, v in sd.items() if "num_batches" not in k)
  rng = np.random.default_rng(0)
  a = rng.integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
  b = rng.integers(0, 256, (6, 32, 32, 1), dtype=np.uint8)
  np.savez(str(tmp_path / "a.npz"), arr_0=a, labels=np.arange(6))
  np.savez(str(tmp_path / "b.npz"), arr_0=b)
  same = evaluate.evaluate(str(tmp_path / "a.npz"), str(tmp_path / "a.npz"), inception=weights,
                           batch_size=6)
  other = evaluate.evaluate(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), inception=weights,
                            batch_size=6)
  assert abs(same["fid"]) < 1e-3 and abs(same["sfid"]) < 1e-3
  assert other["fid"] > 1e-2 and "class_accuracy" not in other
  assert same["features"].startswith("InceptionV3")
  # a statistics-only reference (mu, sigma, mu_s, sigma_s of b's features, computed by tdjax):
  # the same FID and sFID as from b's images, IS from the samples, precision / recall not
  # computable (null in the JSON, the reason under not_computed)
  _, pool_b, spatial_b = evaluation.InceptionJudge(weights).extract(b.astype(np.float32) / 127.5 - 1)
  (mu, sigma), (mu_s, sigma_s) = (evaluation.feature_statistics(np.asarray(f))
                                  for f in (pool_b, spatial_b))
  np.savez(str(tmp_path / "b_stats.npz"), mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  stats = evaluate.evaluate(str(tmp_path / "a.npz"), str(tmp_path / "b_stats.npz"),
                            inception=weights, batch_size=6)
  np.testing.assert_allclose([stats["fid"], stats["sfid"]], [other["fid"], other["sfid"]],
                             rtol=1e-6)
  np.testing.assert_allclose(stats["inception_score"], other["inception_score"], rtol=1e-6)
  assert stats["precision"] is None and stats["recall"] is None
  assert set(stats["not_computed"]) == {"precision", "recall"}
  with pytest.raises(ValueError, match="exactly one feature net"):
    evaluate.evaluate(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
  with pytest.raises(ValueError, match="with --inception give a reference .npz"):
    evaluate.evaluate(str(tmp_path / "a.npz"), "split:test", inception=weights)
  logits, pool, spatial = evaluation.InceptionJudge(weights).extract(np.zeros((1, 64, 48, 3)))
  assert logits.shape == (1, 1008) and pool.shape == (1, 2048) and spatial.shape == (1, 2023)


@pytest.mark.skipif(not os.environ.get("TDJAX_INCEPTION_PTH"), reason="golden test: set "
                    "TDJAX_INCEPTION_PTH to pytorch-fid's pt_inception-2015-12-05 .pth")
def test_golden_against_pytorch_fid(tmp_path):
  torch = pytest.importorskip("torch")
  pf = pytest.importorskip("pytorch_fid.inception")
  weights = str(tmp_path / "inception.npz")
  convert.convert_inception(os.environ["TDJAX_INCEPTION_PTH"], weights)
  net = pf.InceptionV3([3])        # pool_3; loads the same file from torch's cache, offline
  net.eval()
  x = np.random.default_rng(0).uniform(0, 1, (4, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x.transpose(0, 3, 1, 2)))[0].numpy().reshape(4, -1)
  _, pool, _ = evaluation.InceptionJudge(weights).extract(2 * x - 1)
  np.testing.assert_allclose(np.asarray(pool), ref, rtol=1e-3, atol=1e-3)

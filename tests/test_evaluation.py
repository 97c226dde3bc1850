"""Fréchet distance against closed forms, and the classifier judge on a trained checkpoint."""

import os

import numpy as np
import pytest

from tdjax import evaluation
from tdjax.evaluation import feature_statistics, frechet_distance


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(5, 5))
  s = a @ a.T + np.eye(5)
  mu = rng.normal(size=5)
  assert abs(frechet_distance(mu, s, mu, s)) < 1e-8
  # equal covariances: only the mean term remains
  assert np.isclose(frechet_distance(mu, s, mu + 2.0, s), 4.0 * 5)
  # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
  d1, d2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 1.0, 9.0])
  assert np.isclose(frechet_distance(np.zeros(3), d1, np.zeros(3), d2), 1.0 + 1.0 + 0.0)
  # sample statistics of two Gaussians approach the analytic value
  x = rng.normal(size=(20000, 3))
  y = rng.normal(size=(20000, 3)) * 2.0 + 1.0
  got = frechet_distance(*feature_statistics(x), *feature_statistics(y))
  assert abs(got - (3 * 1.0 + 3 * (2.0 - 1.0) ** 2)) < 0.15


def test_psnr_and_ssim_known_values():
  from tdjax.evaluation import psnr, ssim
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(2, 32, 32, 1))
  assert np.allclose(ssim(a, a), 1.0) and np.all(np.isinf(psnr(a, a)) | (psnr(a, a) > 190))
  b = np.clip(a + 0.1, 0, 1)
  assert np.allclose(psnr(a, a + 0.1), 20.0)  # mse 0.01 -> 20 dB
  # a constant shift keeps structure: SSIM stays high; noise destroys it
  assert ssim(a, b).min() > 0.9
  noisy = np.clip(a + rng.normal(0, 0.3, a.shape), 0, 1)
  assert ssim(a, noisy).max() < 0.7
  # independent direct computation on one 11x11 window (the valid region of an 11x11 image)
  x, y = rng.uniform(size=(1, 11, 11, 1)), rng.uniform(size=(1, 11, 11, 1))
  w = np.outer(*(2 * [np.exp(-(np.arange(11) - 5) ** 2 / 4.5)]))
  w /= w.sum()
  mx, my = (w * x[0, ..., 0]).sum(), (w * y[0, ..., 0]).sum()
  vx = (w * (x[0, ..., 0] - mx) ** 2).sum()
  vy = (w * (y[0, ..., 0] - my) ** 2).sum()
  cxy = (w * (x[0, ..., 0] - mx) * (y[0, ..., 0] - my)).sum()
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  want = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
  assert np.isclose(ssim(x, y)[0], want)


# ------------------------------------------------------------------------------------------------
# ADM suite: IS, precision/recall, npz format, the CLI
# ------------------------------------------------------------------------------------------------

def test_inception_score_closed_forms():
  from tdjax.evaluation import inception_score
  assert abs(inception_score(np.zeros((100, 10))) - 1.0) < 1e-9          # uninformative: 1
  confident = np.full((100, 10), -50.0)
  confident[np.arange(100), np.arange(100) % 10] = 50.0
  assert abs(inception_score(confident) - 10.0) < 1e-6                   # sure and balanced: C
  half = confident.copy()
  half[:, :] = -50.0
  half[:, 0] = 50.0                                                       # sure, one class: 1
  assert abs(inception_score(half) - 1.0) < 1e-6
  # splits: two splits of 50, each balanced over 5 classes -> 5
  two = np.full((100, 10), -50.0)
  two[np.arange(100), np.where(np.arange(100) < 50, np.arange(100) % 5, 5 + np.arange(100) % 5)] = 50
  assert abs(inception_score(two, split_size=50) - 5.0) < 1e-6
  assert abs(inception_score(two) - 10.0) < 1e-6


def test_precision_recall_hand_case_and_radii():
  from tdjax.evaluation import manifold_radii, precision_recall
  real = np.arange(5.0)[:, None]                   # 0..4 on a line; k = 1: every radius^2 = 1
  np.testing.assert_allclose(manifold_radii(real, k=1), np.ones(5))
  np.testing.assert_allclose(manifold_radii(real, k=3), [9, 4, 4, 4, 9])
  fake = np.array([[0.5], [10.0]])                 # one sample on the manifold, one far off
  p, r = precision_recall(real, fake, k=1)
  assert p == 0.5                                  # 0.5 is within 1 of 0 (and 1); 10 is not
  assert r == 1.0                                  # the fake balls have radius^2 90.25
  p, r = precision_recall(real, real + 100.0, k=1)
  assert (p, r) == (0.0, 0.0)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(200, 4))
  assert precision_recall(x, x, k=3) == (1.0, 1.0)
  with pytest.raises(ValueError, match="more than k=3 samples"):
    manifold_radii(x[:3], k=3)


def test_image_batch_format_errors(tmp_path):
  from tdjax.evaluation import evaluate_batches, load_image_batch
  good = str(tmp_path / "good.npz")
  np.savez(good, arr_0=np.zeros((4, 8, 8, 1), np.uint8), labels=np.arange(4))
  images, labels = load_image_batch(good)
  assert images.shape == (4, 8, 8, 1) and list(labels) == [0, 1, 2, 3]
  np.savez(str(tmp_path / "noarr.npz"), images=np.zeros((4, 8, 8, 1), np.uint8))
  with pytest.raises(ValueError, match=r"noarr.npz: no 'arr_0' array \(found images\)"):
    load_image_batch(str(tmp_path / "noarr.npz"))
  np.savez(str(tmp_path / "float.npz"), arr_0=np.zeros((4, 8, 8, 1), np.float32))
  with pytest.raises(ValueError, match="float32 .* expected uint8"):
    load_image_batch(str(tmp_path / "float.npz"))
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    load_image_batch(str(tmp_path / "missing.npz"))
  with pytest.raises(ValueError, match="evaluate images of one size"):
    evaluate_batches(None, np.zeros((4, 8, 8, 1), np.uint8), np.zeros((4, 16, 16, 1), np.uint8))


def test_evaluate_batches_same_set_and_shifted_set():
  """A fixed random feature map: the same images give FID 0, P = R = 1; brightened images a
  positive FID and sFID."""
  from tdjax.evaluation import evaluate_batches
  rng = np.random.default_rng(0)
  w_pool, w_sp = rng.normal(size=(64, 6)), rng.normal(size=(64, 12))

  def extract(x):
    flat = x.reshape(len(x), -1)
    pool = np.tanh(flat @ w_pool)
    return pool[:, :3] * 5.0, pool, np.tanh(flat @ w_sp)

  imgs = rng.integers(0, 256, (300, 8, 8, 1)).astype(np.uint8)
  same = evaluate_batches(extract, imgs, imgs, np.zeros(300, int), batch_size=128)
  assert abs(same["fid"]) < 1e-6 and abs(same["sfid"]) < 1e-6
  assert same["precision"] == 1.0 and same["recall"] == 1.0
  assert 0.0 <= same["class_accuracy"] <= 1.0 and same["inception_score"] >= 1.0
  shifted = evaluate_batches(extract, np.clip(imgs.astype(int) + 60, 0, 255).astype(np.uint8),
                             imgs, batch_size=128)
  assert shifted["fid"] > 0.1 and shifted["sfid"] > 0.1 and "class_accuracy" not in shifted


def test_reference_statistics_only(tmp_path):
  """A reference .npz with feature statistics and no images (mu, sigma[, mu_s, sigma_s], as the
  FID statistics files and ADM's reference batches hold them): FID / sFID from the statistics
  equal FID / sFID from the images they were computed from, IS is the samples' own, precision /
  recall are None with the reason; without mu_s / sigma_s sFID is None too."""
  from tdjax import evaluate
  from tdjax.evaluation import batch_statistics, evaluate_batches, load_reference_statistics
  rng = np.random.default_rng(1)
  w_pool, w_sp = rng.normal(size=(64, 6)), rng.normal(size=(64, 12))

  def extract(x):
    flat = x.reshape(len(x), -1)
    pool = np.tanh(flat @ w_pool)
    return pool[:, :3] * 5.0, pool, np.tanh(flat @ w_sp)

  ref = rng.integers(0, 256, (200, 8, 8, 1)).astype(np.uint8)
  samples = np.clip(ref[:150].astype(int) + 40, 0, 255).astype(np.uint8)
  from_images = evaluate_batches(extract, samples, ref, batch_size=64)
  full, fid_only = str(tmp_path / "full.npz"), str(tmp_path / "fid_only.npz")
  stats = batch_statistics(extract, ref, batch_size=64)
  np.savez(full, **stats)
  np.savez(fid_only, mu=stats["mu"], sigma=stats["sigma"])
  loaded = evaluate.reference_batch(full)
  assert isinstance(loaded, dict) and sorted(loaded) == ["mu", "mu_s", "sigma", "sigma_s"]
  got = evaluate_batches(extract, samples, loaded, batch_size=64)
  assert from_images["fid"] > 0.1
  np.testing.assert_allclose(got["fid"], from_images["fid"], rtol=1e-9)
  np.testing.assert_allclose(got["sfid"], from_images["sfid"], rtol=1e-9)
  assert got["inception_score"] == from_images["inception_score"]
  assert got["precision"] is None and got["recall"] is None and got["num_reference"] is None
  assert set(got["not_computed"]) == {"precision", "recall"}
  assert "statistics only" in got["not_computed"]["precision"]
  only = evaluate_batches(extract, samples, evaluate.reference_batch(fid_only), batch_size=64)
  np.testing.assert_allclose(only["fid"], from_images["fid"], rtol=1e-9)
  assert only["sfid"] is None and set(only["not_computed"]) == {"precision", "recall", "sfid"}
  # a file with images and statistics (ADM's VIRTUAL_*.npz) is evaluated on its images
  both = str(tmp_path / "both.npz")
  np.savez(both, arr_0=ref, **stats)
  assert evaluate.reference_batch(both).shape == ref.shape
  # statistics of another feature net, half a pair, neither images nor statistics
  np.savez(str(tmp_path / "wide.npz"), mu=np.zeros(7), sigma=np.eye(7))
  with pytest.raises(ValueError, match=r"'mu' have 7 features, the feature net's pooled .* 6"):
    evaluate_batches(extract, samples, load_reference_statistics(str(tmp_path / "wide.npz")))
  np.savez(str(tmp_path / "half.npz"), mu=stats["mu"], sigma=stats["sigma"], mu_s=stats["mu_s"])
  with pytest.raises(ValueError, match=r"'mu_s' and 'sigma_s' come in pairs"):
    load_reference_statistics(str(tmp_path / "half.npz"))
  np.savez(str(tmp_path / "neither.npz"), mu=stats["mu"])
  with pytest.raises(ValueError, match=r"no 'arr_0' array .* or reference statistics"):
    evaluate.reference_batch(str(tmp_path / "neither.npz"))


def test_evaluate_cli_on_real_images_with_a_tiny_judge(tmp_path):
  """tdjax.evaluate end to end: real test images as 'samples' against split:test and split:train;
  the same images score FID 0 and P = R = 1, other real images a small positive FID."""
  from tdjax import configlib, evaluate, evaluation, trainer
  judge_dir = str(tmp_path / "clf")
  trainer.train_and_evaluate(configlib.load_config("classifier", "size=tiny,steps=20,batch=32"),
                             judge_dir)
  judge = evaluation.ClassifierJudge(judge_dir)
  real = evaluate.real_images(judge, "test", 200)
  path = str(tmp_path / "s.npz")
  np.savez(path, arr_0=real, labels=np.zeros(200, np.int64))
  same = evaluate.evaluate(path, "split:test", judge_dir, batch_size=64)
  assert abs(same["fid"]) < 1e-6 and same["precision"] == 1.0 and same["recall"] == 1.0
  other = evaluate.evaluate(path, "split:train", judge_dir, batch_size=64)
  assert 0.0 < other["fid"] and 0.0 < other["sfid"]
  assert set(other) >= {"fid", "sfid", "inception_score", "precision", "recall", "class_accuracy"}
  # the sampling CLI's bad input: a classifier checkpoint, an empty workdir, a bad checkpoint path
  from tdjax import sample
  with pytest.raises(ValueError, match=r"clf holds a 'classifier' checkpoint; sampling supports"):
    sample.generate(judge_dir, "0", 1)
  with pytest.raises(Exception, match=r"no checkpoint in .*empty"):
    sample.generate(str(tmp_path / "empty"), "0", 1)
  with pytest.raises(ValueError, match=r"expected WORKDIR/checkpoints/STEP"):
    sample.split_checkpoint_path(judge_dir)
  with pytest.raises(FileNotFoundError, match=r"checkpoints/99: no such checkpoint"):
    sample.split_checkpoint_path(os.path.join(judge_dir, "checkpoints", "99"))


def test_long_jobs_show_progress(tmp_path, capsys):
  """Codes extraction and the feature passes of an evaluation draw tqdm bars on stderr (as
  tdjax.sample does), named by what they count."""
  from tdjax.data import codes as codes_lib
  codes_lib.synthetic_codes(str(tmp_path / "c.npz"), num=130)
  extract = lambda x: (x.reshape(len(x), -1)[:, :4], x.reshape(len(x), -1)[:, :3],
                       x.reshape(len(x), -1)[:, :2])
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (12, 4, 4, 1), dtype=np.uint8)
  evaluation.evaluate_batches(extract, imgs, imgs[::-1].copy(), batch_size=5)
  err = capsys.readouterr().err
  for bar in ("codes: 3batch", "sample features: 100%", "reference features: 100%"):
    assert bar in err, (bar, err[-500:])
  assert "3/3 [" in err and "batch/s" in err

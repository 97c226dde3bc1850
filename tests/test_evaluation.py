"""Fréchet distance against closed forms, and the classifier judge on a trained checkpoint."""

import os

import numpy as np
import pytest

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

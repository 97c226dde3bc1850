"""tdjax.reconstruct: the coarse-to-fine strip, PSNR curve and report of a trained tokenizer."""

import json
import os

import numpy as np
import pytest

from tdjax import configlib, metrics, reconstruct, runs, trainer



_config = configlib.load_config


def test_report_matches_the_tokenizer_and_refuses_other_checkpoints(tmp_path, monkeypatch,
                                                                    tiny_tokenizer_dir):
  tok = tiny_tokenizer_dir
  strips = []
  grid = metrics.image_grid
  monkeypatch.setattr(metrics, "image_grid", lambda s: strips.append(np.asarray(s)) or grid(s))
  out = str(tmp_path / "pics" / "strip.png")
  os.makedirs(os.path.dirname(out))
  clf = str(tmp_path / "clf")
  trainer.train_and_evaluate(_config("classifier", "size=tiny,steps=1,batch=8"), clf)
  # 12 images in batches of 8: the second batch is cut to 4
  report = reconstruct.reconstruct_report(tok, out, num=4, eval_images=12, batch_size=8,
                                          judge=clf)
  _, task, state = runs.load_state(tok)
  ns = reconstruct.prefix_lengths(task.N)
  assert report["num_images"] == 12 and report["curve"]["tokens"] == ns and ns[-1] == task.N
  # the curve's last point is the full-N PSNR, averaged over the same images
  assert report["curve"]["psnr"][-1] == pytest.approx(report["full"]["psnr"], rel=1e-5)
  assert report["curve"]["decoder_resolution"][-1] == task.image_size
  assert 0 < report["full"]["codebook_usage"] <= 1
  # the strip: originals, then one column per prefix; its last column is the task's own
  # full-N reconstruction of the originals
  (strip,) = strips
  assert strip.shape == (4, 1 + len(ns), task.image_size, task.image_size, 1)
  want = np.asarray(task.reconstruct(state["params"], strip[:, 0]))
  np.testing.assert_allclose(strip[:, -1], want, atol=1e-4)
  for path in (out, str(tmp_path / "pics" / "strip_psnr.png")):
    assert os.path.getsize(path) > 0
  assert json.load(open(str(tmp_path / "pics" / "strip.json")))["num_images"] == 12
  # rFID: the reconstructions' features against the originals' (0 for the originals themselves)
  net, features = reconstruct.feature_net(clf, None)
  assert report["rfid_features"] == features and features.startswith("classifier ")
  assert abs(reconstruct.fid_of(net, strip[:, 0], strip[:, 0])) < 1e-6
  assert np.isfinite(report["full"]["rfid"]) and report["full"]["rfid"] > 1e-4
  with pytest.raises(ValueError, match="give one feature net"):
    reconstruct.reconstruct_report(tok, out, eval_images=8, judge=clf, inception="x.npz")
  with pytest.raises(ValueError, match="holds a 'classifier' checkpoint, expected a tokenizer"):
    reconstruct.reconstruct_report(clf, str(tmp_path / "x.png"), eval_images=8, batch_size=8)

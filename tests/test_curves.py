"""tdjax.curves: DetailFlow Fig. 4b (FID vs tokens decoded) and Fig. 4a (noisy-token rFID), run as
the CLI on tiny trained runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tdjax import configlib, curves, trainer
from tdjax.data import codes as codes_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs_for_curves(tmp_path_factory, tiny_tokenizer_dir):
  """(tokenizer, AR, classifier judge) workdirs: a 2-step AR on synthetic codes of the tiny
  tokenizer's shape (its samples decode through that tokenizer) and a 1-step classifier."""
  d = tmp_path_factory.mktemp("curves")
  codes = str(d / "codes.npz")
  codes_lib.synthetic_codes(codes, num=64, num_tokens=16, group_size=4, vocab_size=256,
                            num_classes=10)
  c = configlib.load_config("next_detail", f"size=demo,codes={codes},tokenizer="
                            f"{tiny_tokenizer_dir},steps=2,batch=8")
  c.model.update(dict(depth=1, dim=32, num_heads=2, mlp_dim=64))
  c.eval_every = c.ckpt_every = 2
  ar = str(d / "ar")
  trainer.train_and_evaluate(c, ar)
  judge = str(d / "clf")
  trainer.train_and_evaluate(configlib.load_config("classifier", "size=tiny,steps=1,batch=8"),
                             judge)
  return tiny_tokenizer_dir, ar, judge


def _cli(module, *args):
  out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_noisy_codes_replaces_the_fraction_asked():
  clean = np.arange(4 * 20).reshape(4, 20) % 7 + 100           # not in the random range 0..99
  for f, k in ((0.0, 0), (0.25, 5), (1.0, 20)):
    noisy = curves.noisy_codes(clean, f, 100, seed=3)
    assert ((noisy != clean).sum(1) == k).all()                 # exactly round(f N) per image
    np.testing.assert_array_equal(noisy, curves.noisy_codes(clean, f, 100, seed=3))
  assert not np.array_equal(curves.noisy_codes(clean, 0.5, 100, seed=3)[0] >= 100,
                            curves.noisy_codes(clean, 0.5, 100, seed=3)[1] >= 100)  # per-row positions


def test_fid_vs_tokens_noisy_tokens_and_rfid_clis_agree(tmp_path, runs_for_curves):
  tok, ar, judge = runs_for_curves
  out = str(tmp_path / "c")
  common = [f"--judge={judge}", f"--out={out}", "--num=24", "--batch_size=12"]
  printed = _cli("tdjax.curves", "tokens", f"--ar={ar}", "--tokens=1,4,16", *common)
  report = json.load(open(os.path.join(out, "fid_vs_tokens.json")))
  assert report["tokenizer"] == os.path.abspath(tok)          # the AR config's tokenizer
  pts = report["points"]
  assert [p["tokens"] for p in pts] == [1, 4, 16] and sorted(printed, key=int) == ["1", "4", "16"]
  assert [p["decoder_resolution"] for p in pts] == [8, 16, 32]    # R(t) rounded up to the patch
  for p in pts:
    assert all(np.isfinite(p[k]) and p[k] > 0 for k in ("gfid", "rfid", "psnr")), p
  assert len({p["gfid"] for p in pts}) == 3 and len({p["rfid"] for p in pts}) == 3
  assert os.path.getsize(os.path.join(out, "fid_vs_tokens.png")) > 0

  # Fig. 4a: the tokenizer twice (the same positions and random codes for both curves)
  _cli("tdjax.curves", "noise", f"--tokenizer={tok},{tok}", "--names=a,b",
       "--fractions=0,0.5,1", *common)
  noisy = json.load(open(os.path.join(out, "noisy_tokens.json")))
  a, b = noisy["curves"]
  assert (a["name"], b["name"]) == ("a", "b") and a["self_correction"] is False
  assert [p["fraction"] for p in a["points"]] == [0.0, 0.5, 1.0]
  assert [p["tokens_replaced"] for p in a["points"]] == [0, 8, 16]
  assert a["points"] == b["points"]
  rfid = [p["rfid"] for p in a["points"]]
  # random codes move the reconstructions away from the originals' features
  assert 0 < rfid[0] < rfid[-1], rfid
  assert os.path.getsize(os.path.join(out, "noisy_tokens.png")) > 0
  # no noise = all N clean tokens: the tokens curve's last point, on the same real images
  assert rfid[0] == pytest.approx(pts[-1]["rfid"], rel=1e-6)
  assert a["points"][0]["psnr"] == pytest.approx(pts[-1]["psnr"], rel=1e-6)

  # and tdjax.reconstruct's rFID and PSNR of the tokenizer on the same 24 test images
  rec = _cli("tdjax.reconstruct", f"--workdir={tok}", f"--out={tmp_path / 'strip.png'}",
             f"--judge={judge}", "--eval_images=24", "--batch_size=12", "--num=2")
  assert rec["full"]["rfid"] == pytest.approx(rfid[0], rel=1e-4)
  assert rec["full"]["psnr"] == pytest.approx(a["points"][0]["psnr"], rel=1e-4)
  saved = json.load(open(tmp_path / "strip.json"))
  assert saved["full"]["rfid"] == rec["full"]["rfid"] and saved["rfid_features"].startswith(
      "classifier")


def test_prefix_decode_is_the_tokenizers_own_at_its_resolution(tiny_tokenizer_dir):
  """The curves decode the first t codes at R(t) rounded up to the patch (what the tokenizer
  task's `reconstruct` does for a prefix), then upsample bicubically to the full size."""
  import jax.numpy as jnp
  from tdjax.tokenizers.resolution import apply_separable, bicubic_matrix
  tok = curves._Tokenizer(tiny_tokenizer_dir)
  x = curves.real_images(tok.config, 4)
  codes = tok.codes(x, 4)
  assert codes.shape == (4, 16) and codes.dtype.kind == "i"
  for t, res in ((4, 16), (16, 32)):
    assert tok.resolution(t) == res
    own = np.asarray(tok.task.reconstruct({"gen": tok.gen}, jnp.asarray(x), num_tokens=t))
    assert own.shape == (4, res, res, 1)
    if res != 32:
      own = np.asarray(apply_separable(jnp.asarray(np.clip(own, -1, 1)), bicubic_matrix(res, 32)))
    np.testing.assert_allclose(tok.decode(codes, t, 4), np.clip(own, -1, 1), atol=1e-4)

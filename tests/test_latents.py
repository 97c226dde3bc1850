"""TransDiff's latent cache (`python -m tdjax.data.latents`, the reference's main_cache.py): what
it writes, its resumption, its pipeline, and that training on it gives the losses of encoding in
the step with the same posterior draw."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdjax import configlib, metrics, trainer
from tdjax.data import latents as latents_lib
from tdjax.data import make_pipeline, pipeline, preprocess, sources
from tdjax.tokenizers import kl_vae

ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="module")
def vae_file(tmp_path_factory):
  """A tiny random KL VAE (the demo architecture: 32 px, 1 channel -> 8 x 8 x 4)."""
  path = str(tmp_path_factory.mktemp("vae") / "vae.npz")
  vae = kl_vae.AutoencoderKL(kl_vae.DEMO)
  kl_vae.save_params(vae.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"], path)
  return path


def _encode_cli(vae, out, split, records, *extra):
  r = subprocess.run([sys.executable, "-m", "tdjax.data.latents", f"--vae={vae}",
                      "--vae_config=demo", f"--out={out}", "--source=fashion_mnist",
                      "--image_size=32", "--channels=1", f"--split={split}",
                      f"--max_records={records}", "--shard_size=40", "--batch_size=16", *extra],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return json.loads(r.stdout.strip().splitlines()[-1])


def test_cache_holds_the_moments_of_each_centre_crop_and_its_flip_and_resumes(tmp_path, vae_file):
  out = str(tmp_path / "cache")
  meta = _encode_cli(vae_file, out, "test", 100)
  assert (meta["num_records"], meta["num_shards"], meta["grid"], meta["channels"]) == (100, 3, 8, 4)
  src = latents_lib.CachedLatents(out, "test")
  assert len(src) == 100 and src[57]["moments"].shape == (2, 8, 8, 8)
  # record i: the VAE's (mean, logvar) of its ADM centre crop (view 0) and of the mirror (view 1)
  images = sources.FashionMNIST("", "test").images
  vae = kl_vae.AutoencoderKL(kl_vae.DEMO)
  params = kl_vae.load_params(vae_file)
  for i in (0, 41, 99):
    x = preprocess.to_float(preprocess.center_crop(images[i], 32))[None]
    for view, im in enumerate((x, x[:, :, ::-1])):
      mean, logvar = vae.apply({"params": params}, im, method=kl_vae.AutoencoderKL.encode)
      np.testing.assert_allclose(src[i]["moments"][view], np.concatenate([mean, logvar], -1)[0],
                                 atol=1e-5)
    assert src[i]["label"] == int(sources.FashionMNIST("", "test").labels[i])
  # resumption: a shard that is there is kept; a missing one is written again, the same
  shard0 = os.path.join(out, "test-00000.npy")
  before, mtime = np.load(os.path.join(out, "test-00001.npy")), os.path.getmtime(shard0)
  for name in ("test-00001.npy", "test-00001.labels.npy", "test.json"):
    os.remove(os.path.join(out, name))
  with pytest.raises(FileNotFoundError, match="holds no latent cache of split 'test'"):
    latents_lib.CachedLatents(out, "test")
  _encode_cli(vae_file, out, "test", 100)
  assert os.path.getmtime(shard0) == mtime
  np.testing.assert_array_equal(np.load(os.path.join(out, "test-00001.npy")), before)


def test_latent_pipeline_picks_the_flipped_view_half_the_time(tmp_path, vae_file):
  out = str(tmp_path / "cache")
  _encode_cli(vae_file, out, "test", 64)
  cfg = pipeline.with_defaults(dict(source="latents", data_dir=out, split="test", batch_size=32,
                                    augment="flip"))
  batch = next(make_pipeline(cfg, seed=1, split="test"))
  assert batch["moments"].shape == (32, 8, 8, 8) and batch["moments"].dtype == np.float32
  src = latents_lib.CachedLatents(out, "test")
  order = make_pipeline(cfg, seed=1, split="test").global_indices(0)
  views = [next(v for v in (0, 1) if np.array_equal(src[int(i)]["moments"][v], m))
           for i, m in zip(order, batch["moments"])]
  assert 8 <= sum(views) <= 24                      # about half flipped
  ev_pipe = make_pipeline(cfg, seed=1, split="test", train=False)
  ev = next(ev_pipe)                                             # evaluation: the centre crop
  np.testing.assert_array_equal(ev["moments"][3], src[int(ev_pipe.global_indices(0)[3])]["moments"][0])
  with pytest.raises(ValueError, match="a latent cache has the centre crop and its flip only"):
    make_pipeline(pipeline.with_defaults(dict(cfg.to_dict(), augment="crop_flip")), seed=1,
                           split="test")


def test_training_on_the_cache_gives_the_losses_of_encoding_in_the_step(tmp_path, vae_file):
  """The same records in the same order (shuffle off, centre crops): the cached run's losses
  equal the run that encodes each batch with the VAE in the step, step for step."""
  out = str(tmp_path / "cache")
  _encode_cli(vae_file, out, "train", 48)
  runs = {}
  for name, arg in (("vae", f"latent=vae,vae_weights={vae_file}"),
                    ("cached", f"latent=cached,latents={out},vae_weights={vae_file}")):
    c = configlib.load_config("transdiff", f"size=demo,steps=3,batch=16,{arg}")
    c.input.update(shuffle=False, augment="none")
    c.log_every, c.eval_every, c.ckpt_every = 1, 0, 3
    trainer.train_and_evaluate(c, str(tmp_path / name))
    runs[name] = {r["step"]: r["train/loss"] for r in metrics.read_jsonl(
        str(tmp_path / name / "metrics.jsonl")) if "train/loss" in r}
  assert sorted(runs["vae"]) == [1, 2, 3]
  np.testing.assert_allclose([runs["cached"][s] for s in (1, 2, 3)],
                             [runs["vae"][s] for s in (1, 2, 3)], rtol=1e-5)
  c = configlib.load_config("transdiff", f"size=demo,latent=cached,latents={tmp_path}")
  with pytest.raises(FileNotFoundError, match="holds no latent cache of split 'train'"):
    trainer.Setup(c)

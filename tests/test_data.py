"""Input pipeline: IDX reader, decoding, tfds source, multi-host split, resume, augmentation."""

import gzip
import json
import os

import numpy as np
import pytest
from PIL import Image

from tdjax.data import make_pipeline, pipeline, preprocess, sources

FMNIST = sources.FASHION_MNIST_DIR
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST, "t10k-labels-idx1-ubyte.gz")),
    reason="apt-get install dataset-fashion-mnist")


def _cfg(**kw):
  c = pipeline.default_input_config()
  c.update(kw)
  return c


def _write_idx(path, a):
  header = bytes([0, 0, 8, a.ndim]) + np.array(a.shape, ">u4").tobytes()
  with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:  # closed: 3.12's gzip
    f.write(header + a.tobytes())                                          # buffers until close


@needs_fmnist
def test_idx_reader_on_fashion_mnist():
  train = sources.FashionMNIST(split="train")
  assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(train.labels), [6000] * 10)
  assert train.images.min() == 0 and train.images.max() == 255
  assert len(sources.FashionMNIST(split="test")) == 10000
  raw = sources.read_idx(os.path.join(FMNIST, "train-images-idx3-ubyte.gz"))
  assert raw.shape == (60000, 28, 28)


def test_idx_reader_tiny_file(tmp_path):
  a = np.arange(30, dtype=np.uint8).reshape(3, 2, 5)
  for name in ("x.idx", "x.idx.gz"):
    _write_idx(str(tmp_path / name), a)
    np.testing.assert_array_equal(sources.read_idx(str(tmp_path / name)), a)
  (tmp_path / "short.idx").write_bytes(open(tmp_path / "x.idx", "rb").read()[:-1])
  with pytest.raises(ValueError, match="header says"):
    sources.read_idx(str(tmp_path / "short.idx"))
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    sources.FashionMNIST(str(tmp_path), "train")


def test_mode_conversion_values():
  to = lambda img, c: preprocess.pil_to_uint8(img, c)
  la = Image.fromarray(np.array([[[100, 0], [100, 255]]], np.uint8), "LA")
  np.testing.assert_array_equal(to(la, 1)[0][..., 0], [[255, 100]])  # alpha over white
  i16 = Image.fromarray(np.array([[65535, 257 * 100]], np.uint16))
  np.testing.assert_array_equal(to(i16, 1)[0][..., 0], [[255, 100]])
  red = Image.new("RGB", (2, 2), (255, 0, 0))
  assert to(red, 1)[0].shape == (2, 2, 1) and to(red, 1)[0][0, 0, 0] == 76 and to(red, 1)[1]
  grey, conv = to(Image.new("L", (2, 2), 50), 3)
  assert conv and grey.shape == (2, 2, 3) and (grey == 50).all()
  assert not to(red, 3)[1]


def test_center_crop_and_random_crop():
  a = np.zeros((50, 100, 3), np.uint8)  # H=50, W=100: left quarter red, middle green, right blue
  a[:, :25, 0], a[:, 25:75, 1], a[:, 75:, 2] = 255, 255, 255
  out = preprocess.center_crop(a, 16)  # BOX 100x50 -> 50x25, BICUBIC -> 32x16, crop the middle
  assert out.shape == (16, 16, 3) and (out[:, 2:-2, 1] == 255).all() and out[..., 1].min() > 200
  assert out[:, 2:-2, [0, 2]].max() == 0 and out[..., [0, 2]].max() < 40  # bicubic edge bleed
  small = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28, 1)
  np.testing.assert_array_equal(preprocess.center_crop(small, 28), small)  # 28: no resize
  crops = {preprocess.random_crop_flip(a, 16, np.random.default_rng(s), flip=False)[..., 0].max()
           for s in range(20)}
  assert 0 in crops and 255 in crops  # square crops at random offsets, some with the red quarter


def _mode_image(mode, size=(40, 30)):
  rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8))
  if mode == "I;16":
    return Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
  return rgb.convert(mode)


@pytest.fixture
def odd_folder(tmp_path):
  """Two classes; 7 valid images in odd modes, 1 corrupt file and 1 tiny (4x4) image."""
  (tmp_path / "a").mkdir()
  (tmp_path / "b").mkdir()
  _mode_image("L").save(tmp_path / "a" / "0_L.png")
  _mode_image("LA").save(tmp_path / "a" / "1_LA.png")
  (tmp_path / "a" / "2_corrupt.png").write_bytes(np.random.default_rng(1).bytes(500))
  _mode_image("P").save(tmp_path / "a" / "3_P.png")
  _mode_image("RGBA").save(tmp_path / "b" / "4_RGBA.png")
  _mode_image("RGB", (4, 4)).save(tmp_path / "b" / "5_tiny.png")
  _mode_image("CMYK").save(tmp_path / "b" / "6_CMYK.jpg")
  _mode_image("I;16").save(tmp_path / "b" / "7_I16.png")
  _mode_image("RGB").save(tmp_path / "b" / "8_RGB.png")
  return str(tmp_path)


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_odd_modes_and_skips(odd_folder, channels):
  cfg = _cfg(source="folder", data_dir=odd_folder, channels=channels, image_size=16,
             batch_size=9, shuffle=False, max_bad_fraction=0.5)
  p = make_pipeline(cfg, seed=0, split="train")
  assert p.num_records == 9
  b = p.batch(0)
  assert b["image"].shape == (9, 16, 16, channels) and b["image"].dtype == np.float32
  # positions 2 (corrupt) and 5 (tiny) are replaced by the next records 3 (P) and 6 (CMYK)
  np.testing.assert_array_equal(b["image"][2], b["image"][3])
  np.testing.assert_array_equal(b["image"][5], b["image"][6])
  np.testing.assert_array_equal(b["label"], [0, 0, 0, 0, 1, 1, 1, 1, 1])
  # reads not in the target mode: LA, P x2, RGBA, CMYK x2, I;16 and L (3 ch) or RGB (1 ch)
  assert p.stats() == dict(reads=11, skipped_corrupt=1, skipped_small=1, converted_mode=8)


def test_folder_fail_fast(odd_folder):
  cfg = _cfg(source="folder", data_dir=odd_folder, channels=3, batch_size=3, image_size=16)
  p = make_pipeline(cfg, seed=0)
  msg = (r"[12] of \d+ records read were skipped .* fraction 0\.\d+ > "
         r"input.max_bad_fraction=0.01; e.g. .*(corrupt|tiny)")
  with pytest.raises(ValueError, match=msg):
    for _ in range(3):
      next(p)


def test_tfds_imagenet_mock():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    cfg = _cfg(source="tfds", tfds_name="imagenet2012", channels=3, image_size=16,
               batch_size=8, min_size=1, augment="crop_flip", num_classes=1000)
    p = make_pipeline(cfg, seed=0, split="train")
    assert p.num_records == 24 and p.examples_per_epoch == 24
    for b in (next(p), next(p)):
      assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
      assert -1 <= b["image"].min() < b["image"].max() <= 1 and b["image"].std() > 0.2
      assert b["label"].dtype == np.int32 and ((0 <= b["label"]) & (b["label"] < 1000)).all()
    ev = make_pipeline(cfg, seed=0, split="validation", train=False)
    assert next(ev)["image"].shape == (8, 16, 16, 3)


@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
  """20 non-square RGB images (varied sizes) in 3 classes."""
  root = tmp_path_factory.mktemp("rgb")
  rng = np.random.default_rng(0)
  for i in range(20):
    d = root / f"c{i % 3}"
    d.mkdir(exist_ok=True)
    h, w = 24 + i, 40 - i % 7
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(d / f"{i:02d}.png")
  return str(root)


def test_multihost_union_equals_single_process(rgb_folder):
  cfg = _cfg(source="folder", data_dir=rgb_folder, channels=3, image_size=8, batch_size=8,
             augment="crop_flip")
  single = make_pipeline(cfg, seed=3)
  hosts = [make_pipeline(cfg, seed=3, process_index=i, process_count=2) for i in range(2)]
  for _ in range(5):  # 2 steps per epoch: crosses two epoch boundaries
    want, parts = next(single), [next(h) for h in hosts]
    assert parts[0]["image"].shape[0] == 4
    for k in ("image", "label"):
      np.testing.assert_array_equal(np.concatenate([q[k] for q in parts]), want[k])
  states = [h.get_state() for h in (*hosts, single)]
  assert states == [{"batches_consumed": 5}] * 3
  with pytest.raises(ValueError, match="not divisible"):
    make_pipeline(cfg, seed=3, process_index=0, process_count=3)


def test_resume_is_bitwise(rgb_folder):
  cfg = _cfg(source="folder", data_dir=rgb_folder, channels=3, image_size=8, batch_size=4,
             augment="crop_flip")
  p = make_pipeline(cfg, seed=1)
  for _ in range(6):
    next(p)
  state = json.loads(json.dumps(p.get_state()))
  want = [next(p) for _ in range(3)]
  q = make_pipeline(cfg, seed=1)
  q.set_state(state)
  for w in want:
    got = next(q)
    for k in w:
      np.testing.assert_array_equal(got[k], w[k])
  np.testing.assert_array_equal(p.batch(7)["image"], want[1]["image"])


def test_augment_determinism(rgb_folder):
  cfg = _cfg(source="folder", data_dir=rgb_folder, channels=3, image_size=8, batch_size=20,
             augment="crop_flip", shuffle=False)
  a, b = (make_pipeline(cfg, seed=5) for _ in range(2))
  np.testing.assert_array_equal(a.batch(0)["image"], b.batch(0)["image"])
  e0, e1 = a.batch(0), a.batch(1)  # same records in the same order, next epoch
  np.testing.assert_array_equal(e0["label"], e1["label"])
  assert (np.abs(e0["image"] - e1["image"]).reshape(20, -1).max(1) > 0).sum() >= 15
  other = make_pipeline(cfg, seed=6).batch(0)["image"]
  assert not np.array_equal(other, e0["image"])
  ev = make_pipeline(cfg, seed=5, train=False)  # eval: center crop, no randomness
  np.testing.assert_array_equal(ev.batch(0)["image"], ev.batch(1)["image"])


@needs_fmnist
def test_same_class_groups():
  cfg = _cfg(image_size=28, batch_size=16, group_size=4)
  p = make_pipeline(cfg, seed=0, split="test")
  src = sources.FashionMNIST(split="test")
  label_of = {}
  for im, y in zip(src.images, src.labels):
    label_of.setdefault(im.tobytes(), set()).add(int(y))
  for b in (next(p), next(p)):
    assert b["image"].shape == (16, 4, 28, 28, 1) and b["label"].shape == (16,)
    u8 = np.round((b["image"] + 1) * 127.5).astype(np.uint8)
    for imgs, y in zip(u8, b["label"]):
      assert all(int(y) in label_of[im.tobytes()] for im in imgs)
      assert len({im.tobytes() for im in imgs}) > 1  # real partners, not copies of the anchor


def test_worker_processes_give_the_same_batches_and_counts(odd_folder):
  """input.worker_processes=2 (grain worker processes): the same batches in the same order as
  decoding on threads, after a resume too, and the bad-data counts of every worker summed here."""
  kw = dict(source="folder", data_dir=odd_folder, channels=3, image_size=8, batch_size=3,
            augment="crop_flip", max_bad_fraction=0.5)
  threads = make_pipeline(_cfg(**kw), seed=5)
  procs = make_pipeline(_cfg(worker_processes=2, **kw), seed=5)
  try:
    for _ in range(5):                   # crosses an epoch (3 batches per epoch)
      a, b = next(threads), next(procs)
      assert set(a) == set(b) == {"image", "label"}
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
    assert procs.stats() == threads.stats() and procs.stats()["skipped_corrupt"] > 0
    state = procs.get_state()
    resumed = make_pipeline(_cfg(worker_processes=2, **kw), seed=5)
    resumed.set_state(state)
    for _ in range(2):
      np.testing.assert_array_equal(next(resumed)["image"], next(threads)["image"])
    resumed.close()
  finally:
    procs.close()


def test_adm_random_crop_takes_80_to_100_percent_of_the_short_side():
  """ADM's random_crop_arr, the reference tokenizer's augmentation: the short side is resized to
  a length in [S, S / 0.8], so a crop covers 80-100 % of it; the same rng gives the same crop."""
  rng0 = np.random.default_rng(0)
  a = rng0.integers(0, 256, (300, 400, 3)).astype(np.uint8)    # 300 short side, crop S = 60
  lengths = []
  for seed in range(200):
    rng = np.random.default_rng(seed)
    short = int(np.random.default_rng(seed).integers(60, 76))  # ceil(60 / 0.8) = 75
    lengths.append(short)
    out = preprocess.adm_random_crop(a, 60, rng)
    assert out.shape == (60, 60, 3)
    np.testing.assert_array_equal(out, preprocess.adm_random_crop(a, 60, np.random.default_rng(seed)))
  assert min(lengths) == 60 and max(lengths) == 75           # both ends of the range are drawn
  # the pipeline's 'adm_crop_flip' (the tokenizer's full-size default) gives other images than
  # the evaluation crop
  cfg = _cfg(source="fashion_mnist", image_size=24, augment="adm_crop_flip", batch_size=4)
  batch = next(make_pipeline(cfg, seed=1))
  assert batch["image"].shape == (4, 24, 24, 1)
  assert not np.array_equal(batch["image"],
                            next(make_pipeline(_cfg(**{**cfg.to_dict(), "augment": "none"}), seed=1))["image"])


def test_ten_crop_matches_torchvision_order():
  """TenCrop(S): top-left, top-right, bottom-left, bottom-right, centre, then the five of the
  mirrored image (so view 5 is the mirror of view 1's region, not of view 0's)."""
  x = np.arange(2 * 7 * 9 * 1).reshape(2, 7, 9, 1)
  v = preprocess.ten_crop(x, 4)
  assert len(v) == 10 and all(e.shape == (2, 4, 4, 1) for e in v)
  np.testing.assert_array_equal(v[0], x[:, :4, :4])
  np.testing.assert_array_equal(v[1], x[:, :4, 5:])
  np.testing.assert_array_equal(v[2], x[:, 3:, :4])
  np.testing.assert_array_equal(v[3], x[:, 3:, 5:])
  np.testing.assert_array_equal(v[4], x[:, 2:6, 2:6])       # round((7-4)/2) = 2, round((9-4)/2) = 2
  np.testing.assert_array_equal(v[5], x[:, :4, ::-1][:, :, :4])
  np.testing.assert_array_equal(v[5], x[:, :4, 5:][:, :, ::-1])

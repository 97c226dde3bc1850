"""Random-access record sources: `len(src)` and `src[i] -> {'image', 'label', ...}`.

  fashion_mnist  the IDX files of the Debian package `dataset-fashion-mnist` (decoded uint8 arrays)
  folder         a folder of image files, class = sorted sub-folder index (raw bytes, decoded later)
  tfds           any prepared ArrayRecord tfds dataset via `tfds.data_source` (no TensorFlow)

Sources return undecoded data where decoding can fail (the folder's file bytes), so that
`preprocess.to_uint8` is the one place that converts, and the pipeline the one place that skips.
A source may expose `labels` (int array over all records) to make class grouping cheap.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import zlib

import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm")


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped): magic 0,0,dtype,ndim; big-endian uint32 dims; data."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: install it with `apt-get install "
                            f"dataset-fashion-mnist` or set input.data_dir to the IDX folder")
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (EOFError, OSError, zlib.error) as e:   # a truncated or damaged download
    raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e}); reinstall it (apt-get "
                     f"install --reinstall dataset-fashion-mnist) or set input.data_dir") from None
  if len(raw) < 4 or raw[0] or raw[1] or raw[2] != 0x08:
    raise ValueError(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()})")
  ndim = raw[3]
  shape = tuple(np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(shape)):
    raise ValueError(f"{path}: header says {shape} ({np.prod(shape)} bytes), file has {data.size}")
  return data.reshape(shape)


@functools.lru_cache(maxsize=4)
def _read_mnist_split(d: str, prefix: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, H, W, 1], labels int64 [N]), read-only and cached: evaluation pipelines
  are rebuilt at every evaluation."""
  images = read_idx(os.path.join(d, f"{prefix}-images-idx3-ubyte.gz"))[..., None]
  labels = read_idx(os.path.join(d, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64)
  labels.flags.writeable = False
  if len(images) != len(labels):
    raise ValueError(f"{d}: {len(images)} images but {len(labels)} labels")
  return images, labels


class FashionMNIST:
  """Fashion-MNIST from IDX files; split 'train' (60k) or 'test' (10k); images uint8 28x28x1."""

  _PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}

  def __init__(self, data_dir: str = "", split: str = "train"):
    if split not in self._PREFIX:
      raise ValueError(f"fashion_mnist split {split!r}: expected 'train' or 'test'")
    self.images, self.labels = _read_mnist_split(data_dir or FASHION_MNIST_DIR, self._PREFIX[split])
    self._args = (data_dir, split)

  def __reduce__(self):     # a worker process reads the files itself (not 47 MB through a pipe)
    return FashionMNIST, self._args

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": int(self.labels[i])}


class ImageFolder:
  """Image files under `root`: class = index of the sorted sub-folder, or 0 for top-level files.

  Records hold the file's bytes (read here, decoded by the pipeline) and its path.
  """

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise FileNotFoundError(f"input.data_dir={root!r} is not a folder of images")
    is_img = lambda n: n.lower().endswith(IMAGE_EXTENSIONS)
    subdirs = sorted(e.name for e in os.scandir(root) if e.is_dir())
    self.classes = subdirs
    files = [(os.path.join(root, n), 0) for n in sorted(os.listdir(root)) if is_img(n)]
    if not files:
      for c, sub in enumerate(subdirs):
        for dirpath, dirnames, names in os.walk(os.path.join(root, sub)):
          dirnames.sort()
          files += [(os.path.join(dirpath, n), c) for n in sorted(names) if is_img(n)]
    if not files:
      raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    self.paths = [p for p, _ in files]
    self.labels = np.array([c for _, c in files], np.int64)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with open(self.paths[i], "rb") as f:
      return {"image": f.read(), "label": int(self.labels[i]), "path": self.paths[i]}


class TfdsSource:
  """A prepared ArrayRecord tfds dataset (e.g. imagenet2012) read with `tfds.data_source`."""

  def __init__(self, name: str, split: str, data_dir: str = "", image_key: str = "image",
               label_key: str = "label"):
    import tensorflow_datasets as tfds  # heavy import, only when used
    try:   # never download or prepare here: an unprepared dataset is an error, said in one line
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    except Exception as e:  # noqa: BLE001 - tfds names an unprepared dataset in several ways
      _raise_if_unprepared(tfds, name, split, data_dir)
      raise ValueError(f"tfds dataset {name!r}, split {split!r}: {str(e).splitlines()[0]}") from e
    self.name, self.image_key, self.label_key = name, image_key, label_key
    self._labels = None
    self._args = (name, split, data_dir, image_key, label_key)

  def __reduce__(self):     # a worker process opens the dataset itself
    return TfdsSource, self._args

  def __len__(self):
    return len(self.source)  # never info.splits: a MagicMock under tfds.testing.mock_data

  def __getitem__(self, i):
    r = self.source[int(i)]
    return {"image": r[self.image_key], "label": int(r[self.label_key]),
            "path": f"{self.name}[{i}]"}

  @property
  def labels(self) -> np.ndarray:
    """All labels (reads every record once: slow for ImageNet; only needed by group_size > 1)."""
    if self._labels is None:
      logging.warning("reading all %d records of %s for their labels", len(self), self.name)
      self._labels = np.array([int(self.source[i][self.label_key]) for i in range(len(self))])
    return self._labels


def _raise_if_unprepared(tfds, name: str, split: str, data_dir: str) -> None:
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"input.tfds_name={name!r}: tfds has no such dataset") from None
  if not builder.is_prepared():
    where = os.path.dirname(os.path.dirname(str(builder.data_dir)))
    raise FileNotFoundError(
        f"tfds dataset {name!r} (split {split!r}) is not prepared in {where}: prepare it once with "
        f"`tfds build {name} --data_dir={where}` (imagenet2012 first needs ILSVRC2012_img_train.tar "
        f"and ILSVRC2012_img_val.tar in {where}/downloads/manual), or set input.data_dir to where "
        f"it is prepared")


def make_source(cfg, split: str):
  """Source named by `cfg.source` ('fashion_mnist', 'folder', 'tfds') for `split`."""
  name = cfg.source
  if name == "fashion_mnist":
    return FashionMNIST(cfg.get("data_dir", ""), split)
  if name == "folder":
    d = cfg.get("data_dir", "")
    sub = os.path.join(d, split)
    return ImageFolder(sub if split and os.path.isdir(sub) else d)
  if name == "tfds":
    if not cfg.get("tfds_name"):
      raise ValueError("input.source='tfds' needs input.tfds_name (e.g. 'imagenet2012')")
    return TfdsSource(cfg.tfds_name, split, cfg.get("data_dir", ""))
  raise ValueError(f"input.source={name!r}: expected 'fashion_mnist', 'folder' or 'tfds'")

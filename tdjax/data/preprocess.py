"""Host-side decoding and preprocessing (numpy + PIL).

  to_uint8          bytes / PIL image / array in any mode -> uint8 HxWxC with C in {1, 3}
  center_crop       ADM (guided-diffusion `center_crop_arr`): BOX halving while >= 2x, BICUBIC, crop
  random_crop_flip  random square crop (side = short edge), BICUBIC resize, optional flip (p=0.5)
  adm_random_crop   ADM's `random_crop_arr` (DetailFlow's tokenizer augmentation): short side to a
                    random size in [S / 1.0, S / 0.8], then a random S x S crop (scale augmentation)
  ten_crop          torchvision's TenCrop: the four corners and the centre, then the same of the
                    mirrored image (the reference's codes extraction)
  to_float          uint8 -> float32 in [-1, 1] (x / 127.5 - 1)
  record_rng        the per-record generator from (seed, epoch, position, slot)
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

AUGMENTS = ("none", "flip", "crop_flip", "adm_crop_flip")
_TARGET_MODE = {1: "L", 3: "RGB"}


def record_rng(seed: int, epoch: int, position: int, slot: int = 0) -> np.random.Generator:
  """Generator that depends only on its arguments (so on no host, thread or read order)."""
  return np.random.default_rng([int(seed) % 2**63, int(epoch), int(position), int(slot)])


def _flatten_alpha(img: Image.Image) -> Image.Image:
  """Composites an image with alpha over white and returns RGB."""
  rgba = img.convert("RGBA")
  white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  return Image.alpha_composite(white, rgba).convert("RGB")


def pil_to_uint8(img: Image.Image, channels: int) -> tuple[np.ndarray, bool]:
  """PIL image in any mode -> (uint8 HxWxC, converted) where converted = mode was not the target.

  Alpha (LA, RGBA, PA, P with transparency) is composited on white; 16/32-bit integer modes are
  scaled from [0, 65535] to [0, 255] (float F is clipped to [0, 255]); CMYK, YCbCr, 1 etc. go through PIL's own conversion;
  RGB -> grey uses PIL's ITU-R 601 luminance, grey -> RGB repeats the channel.
  """
  if channels not in _TARGET_MODE:
    raise ValueError(f"input.channels={channels}: expected 1 or 3")
  target, mode = _TARGET_MODE[channels], img.mode
  if mode == target:
    return _hwc(np.asarray(img)), False
  if mode.startswith("I") or mode == "F":  # I;16, I;16B, I (16-bit PNG); F is taken as 0..255
    a = np.asarray(img).astype(np.float64) / (1.0 if mode == "F" else 257.0)
    img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
  elif mode in ("LA", "RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
    img = _flatten_alpha(img)
  elif mode not in ("L", "RGB"):
    img = img.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, 1, ...
  img = img.convert(target) if img.mode != target else img
  return _hwc(np.asarray(img)), True


def _hwc(a: np.ndarray) -> np.ndarray:
  return a[..., None] if a.ndim == 2 else a


def to_uint8(image, channels: int) -> tuple[np.ndarray, bool]:
  """Encoded bytes, a PIL image or an HxW[xC] array -> (uint8 HxWxC, converted).

  Raises (PIL.UnidentifiedImageError, OSError, ValueError, ...) on undecodable data.
  """
  if isinstance(image, (bytes, bytearray)):
    with Image.open(io.BytesIO(image)) as img:
      img.load()
      return pil_to_uint8(img, channels)
  if isinstance(image, Image.Image):
    return pil_to_uint8(image, channels)
  a = np.asarray(image)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.dtype == np.uint8 and a.ndim == 2 and channels == 1:
    return a[..., None], False
  if a.dtype == np.uint8 and a.ndim == 3 and a.shape[-1] == 3 and channels == 3:
    return a, False
  if a.ndim == 2 and a.dtype == np.uint8:
    return np.repeat(a[..., None], 3, axis=-1), True
  if a.ndim == 2 and a.dtype == np.uint16:
    return pil_to_uint8(Image.fromarray(a), channels)
  if a.ndim == 3 and a.shape[-1] in (3, 4) and a.dtype == np.uint8:
    return pil_to_uint8(Image.fromarray(a, "RGB" if a.shape[-1] == 3 else "RGBA"), channels)
  raise ValueError(f"cannot convert an array of shape {a.shape} and dtype {a.dtype} to an image")


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
  return img if img.size == size else img.resize(size, resample=Image.BICUBIC)


def _pil(a: np.ndarray) -> Image.Image:
  return Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)


def center_crop(a: np.ndarray, size: int) -> np.ndarray:
  """ADM eval crop: halve with BOX while the short side >= 2*size, BICUBIC to size, center crop."""
  img = _pil(a)
  while min(img.size) >= 2 * size:
    img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
  scale = size / min(img.size)
  img = _resize(img, tuple(max(size, round(x * scale)) for x in img.size))
  out = _hwc(np.asarray(img))
  y, x = (out.shape[0] - size) // 2, (out.shape[1] - size) // 2
  return out[y:y + size, x:x + size]


def random_crop_flip(a: np.ndarray, size: int, rng: np.random.Generator, crop: bool = True,
                     flip: bool = True) -> np.ndarray:
  """Train augmentation: random square crop of side = short edge, BICUBIC to size, flip p=0.5.

  With crop=False the crop is the ADM center crop. The rng draws (offset, flip) in a fixed order.
  """
  h, w = a.shape[:2]
  s = min(h, w)
  oy, ox = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
  do_flip = flip and rng.random() < 0.5
  if crop:
    out = _hwc(np.asarray(_resize(_pil(a[oy:oy + s, ox:ox + s]), (size, size))))
  else:
    out = center_crop(a, size)
  return out[:, ::-1] if do_flip else out


def adm_random_crop(a: np.ndarray, size: int, rng: np.random.Generator, min_frac: float = 0.8,
                    max_frac: float = 1.0) -> np.ndarray:
  """ADM's random_crop_arr (guided-diffusion; DetailFlow's utils/data.py): the short side is
  resized (BOX halving while >= 2x, then BICUBIC) to a random length in [ceil(S / max_frac),
  ceil(S / min_frac)] (256..320 for S = 256: crops of 80-100 % of the short side), then a random
  S x S window.  The rng draws (length, row, column) in that order."""
  short = int(rng.integers(math.ceil(size / max_frac), math.ceil(size / min_frac) + 1))
  img = _pil(a)
  while min(img.size) >= 2 * short:
    img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
  scale = short / min(img.size)
  img = _resize(img, tuple(round(x * scale) for x in img.size))
  out = _hwc(np.asarray(img))
  oy = int(rng.integers(0, out.shape[0] - size + 1))
  ox = int(rng.integers(0, out.shape[1] - size + 1))
  return out[oy:oy + size, ox:ox + size]


def ten_crop(images: np.ndarray, size: int) -> list:
  """[B, H, W, C] -> the ten [B, size, size, C] views of torchvision's TenCrop: top-left,
  top-right, bottom-left, bottom-right, centre, then the same five of the mirrored images."""
  h, w = images.shape[1:3]
  cy, cx = int(round((h - size) / 2)), int(round((w - size) / 2))
  corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (cy, cx)]
  views = []
  for imgs in (images, images[:, :, ::-1]):
    views += [imgs[:, y:y + size, x:x + size] for y, x in corners]
  return views


def to_float(a: np.ndarray) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]."""
  return a.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def process(a: np.ndarray, size: int, augment: str, rng: np.random.Generator | None) -> np.ndarray:
  """uint8 HxWxC -> float32 size x size x C in [-1, 1]; rng=None (eval) means center crop."""
  return to_float(process_uint8(a, size, augment, rng))


def process_uint8(a: np.ndarray, size: int, augment: str,
                  rng: np.random.Generator | None) -> np.ndarray:
  """`process` before the conversion to float: uint8 size x size x C (a quarter of the bytes
  that the input's worker processes send)."""
  if augment not in AUGMENTS:
    raise ValueError(f"input.augment={augment!r}: expected one of {AUGMENTS}")
  if rng is None or augment == "none":
    return center_crop(a, size)
  if augment == "adm_crop_flip":      # the flip after the crop, as the reference's transforms
    out = adm_random_crop(a, size, rng)
    return out[:, ::-1] if rng.random() < 0.5 else out
  return random_crop_flip(a, size, rng, crop=augment == "crop_flip")

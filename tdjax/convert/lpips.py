"""`lpips`: torchvision's VGG16 (`features.N`) or the LPIPS model's own `net.sliceK.N`, plus the
`linI.model.1` heads, from comma-separated files -> the .npz of `tdjax.losses.lpips`.

The scaling-layer buffers must equal tdjax's constants.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from tdjax.convert.common import (ConversionError, count_params, place, read_merged,
                                  save_atomically, torch_leaf)


# lpips.pretrained_networks.vgg16 keeps torchvision's feature indices inside its five slices
_VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_NAMES = {i: f"conv{s}_{c}" for i, (s, c) in zip(_VGG_CONVS, [
    (1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3), (4, 1), (4, 2), (4, 3), (5, 1), (5, 2),
    (5, 3)])}


def lpips_params(sd: Mapping[str, np.ndarray], expected: Mapping) -> dict:
  """Params of `tdjax.losses.lpips.LPIPS` from torchvision's VGG16 (`features.N.*`, classifier
  dropped) or the LPIPS model's own `net.sliceK.N.*`, plus the LPIPS heads `linI.model.1.weight`
  (or `lins.I.model.1.weight`, the `lpips` package module's second name for them).
  The fixed scaling layer (`scaling_layer.shift/scale`) must equal tdjax's constants."""
  # imported here, not at start-up: it loads JAX
  from tdjax.losses import lpips
  flat, errors = {}, []
  for key, value in sd.items():
    m = re.match(r"^(?:features|net\.slice\d)\.(\d+)\.(weight|bias)$", key)
    if m and int(m[1]) in _VGG_NAMES:
      _, target, v = torch_leaf(["features", _VGG_NAMES[int(m[1])], m[2]], value)
      flat[tuple(target)] = (key, v)
    elif m := re.match(r"^(?:lin(\d)|lins\.(\d))\.model\.1\.weight$", key):
      # the `lpips` package's module lists its heads twice (lin0..lin4 and the ModuleList
      # lins.0..4), so a whole module's state_dict has both names for one tensor
      head, kernel = (f"lin{m[1] or m[2]}", "kernel"), value.transpose(2, 3, 1, 0)
      if head in flat and not np.array_equal(flat[head][1], kernel):
        errors.append(f"{key} differs from {flat[head][0]}, the same LPIPS head")
      flat[head] = (key, kernel)
    elif key.startswith("classifier."):
      continue
    elif key in ("scaling_layer.shift", "scaling_layer.scale"):
      want = np.asarray(lpips.SHIFT if key.endswith("shift") else lpips.SCALE, np.float32)
      if not np.allclose(value.reshape(-1), want, atol=1e-6):
        errors.append(f"{key} is {value.reshape(-1).tolist()}, tdjax's LPIPS uses {want.tolist()}")
    else:
      errors.append(f"unexpected {key} {value.shape}")
  return place(flat, expected, errors)


def convert_lpips(input_paths: str, output: str) -> dict:
  """Writes LPIPS params (the layout of `tdjax.losses.lpips`) to the `output` .npz."""
  # imported here, not at start-up: they load JAX
  from tdjax.losses import lpips
  from tdjax.losses.weights import expected_params, save_npz_params
  if os.path.exists(output):
    raise ConversionError(f"{output} exists; choose a new --output")
  x = np.zeros((1, lpips.MIN_SIZE, lpips.MIN_SIZE, 3), np.float32)
  params = lpips_params(read_merged(input_paths), expected_params(lpips.LPIPS(), x, x))
  save_atomically(save_npz_params, output, params)
  return dict(kind="lpips", output=output, params=count_params(params))

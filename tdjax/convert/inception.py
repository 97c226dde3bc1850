"""`inception`: pytorch-fid's FID InceptionV3 (`pt_inception-2015-12-05`) -> the .npz that
`tdjax.evaluate --inception` reads (`tdjax.nn.inception`).

BatchNorm running statistics -> `batch_stats`; `num_batches_tracked` and `AuxLogits.*` dropped.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from tdjax.convert.common import (ConversionError, count_params, place, read_merged,
                                  save_atomically, torch_leaf)


def inception_variables(sd: Mapping[str, np.ndarray], expected: Mapping) -> dict:
  """{'params', 'batch_stats'} of `InceptionV3` from pytorch-fid's `pt_inception-2015-12-05`
  state dict (torchvision key names; `num_batches_tracked` and any `AuxLogits.*` dropped)."""
  flat, errors = {}, []
  for key, value in sd.items():
    path = key.split(".")
    if path[-1] == "num_batches_tracked" or path[0] == "AuxLogits":
      continue
    col, target, value = torch_leaf(path, value)
    flat[(col, *target)] = (key, value)
  return place(flat, expected, errors)


def convert_inception(input_path: str, output: str) -> dict:
  """Writes InceptionV3 variables ('params/...', 'batch_stats/...' keys) to the `output` .npz."""
  # imported here, not at start-up: they load JAX
  from tdjax.losses.weights import save_npz_params
  from tdjax.nn import inception
  if os.path.exists(output):
    raise ConversionError(f"{output} exists; choose a new --output")
  variables = inception_variables(read_merged(input_path), inception.expected_variables())
  save_atomically(save_npz_params, output, variables)
  return dict(kind="inception", output=output, params=count_params(variables))

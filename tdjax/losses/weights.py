"""User-supplied weights files for frozen networks (LPIPS-VGG, DINO, the alignment teacher).

Nothing pretrained is downloaded: every frozen network takes a weights FILE that the user names.
The on-disk format is one `.npz` holding the module's Flax `params` collection flattened with
'/' joined keys, in Flax layout (conv kernels HWIO, dense kernels [in, out]), e.g.

  features/conv1_1/kernel   float32 [3, 3, 3, 64]
  features/conv1_1/bias     float32 [64]

`save_npz_params` writes such a file from a params tree; `load_npz_params` reads one and checks it
against the tree the module expects, raising one-line errors: a missing file, a missing key (named),
a shape mismatch (both shapes named), unexpected keys (when `strict`).  Each network's key layout
is documented in its own module docstring; converters from the official PyTorch files are separate.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

PyTree = Any


class WeightsError(ValueError):
  """A weights file does not match the module it is loaded into."""


def flatten_params(params: Mapping) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}; logical-partitioning boxes are unboxed."""
  params = nn.unbox(params)
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(params)).items()}


def save_npz_params(path: str, params: Mapping) -> None:
  """Writes a params tree (the `params` collection, not the whole variables dict) as a flat npz."""
  flat = {k: np.asarray(jax.device_get(v), dtype=np.float32) for k, v in flatten_params(params).items()}
  with open(path, "wb") as f:  # np.savez would append '.npz' to a path without it
    np.savez(f, **flat)


def npz_shapes(path: str, *, what: str = "weights") -> dict[str, tuple[int, ...]]:
  """{key: shape} of every array in an npz, read from the .npy headers alone (no array data is
  read, so a multi-GB weights file costs a few kB here)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} weights file not found: {path!r}")
  shapes = {}
  try:
    with zipfile.ZipFile(path) as z:
      for name in z.namelist():
        if not name.endswith(".npy"):
          continue
        with z.open(name) as f:
          major, _ = np.lib.format.read_magic(f)
          read_header = (np.lib.format.read_array_header_1_0 if major == 1 else
                         np.lib.format.read_array_header_2_0)  # 3.0 differs only in text encoding
          shape, _, _ = read_header(f)
        shapes[name[:-len(".npy")]] = tuple(int(d) for d in shape)
  except (zipfile.BadZipFile, ValueError) as e:
    raise WeightsError(f"{what} weights file {path!r} is not a readable .npz: {e}") from None
  return shapes


def load_npz_params(path: str, expected: Mapping, *, what: str = "weights",
                    strict: bool = True, rename: Callable | None = None) -> dict:
  """Reads `path` and returns a nested params dict with exactly the structure of `expected`.

  `expected` is the module's params tree (arrays or `jax.ShapeDtypeStruct`s, boxed or not), e.g.
  from `jax.eval_shape(module.init, ...)['params']`.  Values are returned as float32 numpy arrays.
  `strict=False` ignores keys in the file that the module does not use (e.g. a 12-block DINO file
  loaded into a shallower backbone); missing keys are always an error.  `rename`: {key: array}
  -> {key: array}, applied to the file's arrays before the checks (a loader's upgrade of files
  written in an older key layout).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} weights file not found: {path!r}")
  try:
    data = np.load(path, allow_pickle=False)
  except Exception as e:  # corrupt / not an npz
    raise WeightsError(f"{what} weights file {path!r} is not a readable .npz: {e}") from None
  with data:
    arrays = data if rename is None else rename(data)
    keys = set(arrays.keys())
    want = flatten_params(expected)
    out = {}
    for k, v in want.items():
      if k not in keys:
        raise WeightsError(f"{what} weights file {path!r} is missing key {k!r} "
                           f"(expected shape {tuple(v.shape)})")
      arr = np.asarray(arrays[k])
      if tuple(arr.shape) != tuple(v.shape):
        raise WeightsError(f"{what} weights file {path!r}: key {k!r} has shape {tuple(arr.shape)}, "
                           f"expected {tuple(v.shape)}")
      if not np.issubdtype(arr.dtype, np.floating):
        raise WeightsError(f"{what} weights file {path!r}: key {k!r} has dtype {arr.dtype}, "
                           f"expected a float array")
      out[tuple(k.split("/"))] = arr.astype(np.float32)
    extra = sorted(keys - set(want))
    if strict and extra:
      more = f" (+{len(extra) - 5} more)" if len(extra) > 5 else ""
      raise WeightsError(f"{what} weights file {path!r} has unexpected keys {extra[:5]}{more}; "
                         f"pass strict=False to ignore them")
  return traverse_util.unflatten_dict(out)


def expected_params(module: nn.Module, *args, **kwargs) -> dict:
  """The (abstract, unboxed) params tree `module.init(rng, *args, **kwargs)` would create."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return nn.unbox(shapes["params"])


def _stop_gradient_tree(tree):
  return jax.tree.map(jax.lax.stop_gradient, tree)


def frozen(module_cls: Callable, parent_initializing: bool):
  """Wraps a module class so that its params are read through `stop_gradient`.

  Gradients still flow through the module's activations to its inputs (the generator needs them);
  the module's own params always get exactly-zero gradients.  Use inside a compact method:
  `frozen(VGG16, self.is_initializing())(name='features')(x)`.
  """
  return nn.map_variables(module_cls, "params", trans_in_fn=_stop_gradient_tree,
                          init=parent_initializing)

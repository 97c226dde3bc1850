"""DetailFlow encoder initialisation from a SigLIP2 vision tower (docs/reference/detailflow.md 1.2).

DetailFlow's encoder is the first 12 blocks of SigLIP2-so400m-patch16 (width 1152, 16 heads, MLP
4304) with its patch embedding, 2D position table and final LayerNorm; the N latent query tokens,
their position table and the bottleneck projection are new.  `init_encoder_from_siglip2` copies
the pretrained parts into a freshly initialised tokenizer `params` tree:

    patch_embed            <- patch_embed             (same (py, px, c) patch flattening)
    enc_pos/table          <- pos_embed               ([G*G, W]; resized to the patch grid at run time)
    encoder block i        <- blocks_i, i < enc_depth (the same TransformerBlock keys: norm1/ln,
                                                        attn/{query,key,value,out}, norm2/ln, mlp)
    enc_norm               <- post_ln

The file is the SigLIP2 `.npz` of `tdjax.losses.alignment` (the alignment teacher uses the same
file; its docstring gives the key list and the mapping from the HF `Siglip2VisionModel` state dict;
files in its older key layout are read through `alignment.upgrade_teacher_keys`).
`python -m tdjax.convert --kind siglip2 --input model.safetensors --output siglip2.npz` writes that
file from an HF checkpoint (needs the optional `safetensors` package; nothing is downloaded).

Every shape is checked: a missing key, a file with fewer blocks than `enc_depth`, or a width/head/MLP
mismatch raises `WeightsError` naming the key and both shapes.  Nothing else in `params` changes.
"""

from __future__ import annotations

import os

import flax.linen as nn
import numpy as np
from flax import traverse_util

from tdjax.losses.alignment import upgrade_teacher_keys
from tdjax.losses.weights import WeightsError

# a block's keys: the file's blocks and the encoder's are both TransformerBlocks
_BLOCK_MODULES = ("norm1/ln", "norm2/ln", "attn/query", "attn/key", "attn/value", "attn/out",
                  "mlp/fc1", "mlp/fc2")


def siglip2_to_encoder_keys(depth: int) -> dict[str, str]:
  """{teacher-layout key: tokenizer params key (unrolled encoder)} for the first `depth` blocks."""
  keys = {"patch_embed/kernel": "patch_embed/kernel", "patch_embed/bias": "patch_embed/bias",
          "pos_embed": "enc_pos/table", "post_ln/scale": "enc_norm/ln/scale",
          "post_ln/bias": "enc_norm/ln/bias"}
  for i in range(depth):
    for mod in _BLOCK_MODULES:
      for leaf in ("scale", "bias") if mod.startswith("norm") else ("kernel", "bias"):
        keys[f"blocks_{i}/{mod}/{leaf}"] = f"encoder/blocks_{i}/block/{mod}/{leaf}"
  return keys


def _depth(flat_params: dict) -> tuple[int, bool]:
  """(encoder depth, scanned?) of a flat tokenizer params dict."""
  if any(k.startswith("encoder/layers/") for k in flat_params):
    k = next(k for k in flat_params if k.startswith("encoder/layers/"))
    return int(np.shape(flat_params[k])[0]), True
  return len({k.split("/")[1] for k in flat_params if k.startswith("encoder/blocks_")}), False


def init_encoder_from_siglip2(params: dict, path: str) -> dict:
  """Returns `params` (the tokenizer's params tree, boxed or not) with the SigLIP2 parts replaced."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"SigLIP2 encoder weights file not found: {path!r}")
  try:
    data = np.load(path, allow_pickle=False)
  except Exception as e:
    raise WeightsError(f"SigLIP2 weights file {path!r} is not a readable .npz: {e}") from None
  boxed = {"/".join(k): v for k, v in traverse_util.flatten_dict(dict(params)).items()}
  flat = {k: nn.unbox(v) for k, v in boxed.items()}
  depth, scanned = _depth(flat)
  new, stacked = {}, {}
  with data:
    names = upgrade_teacher_keys({k: k for k in data.files})   # current key -> the file's key
    blocks = {k.split("/")[0] for k in names if k.startswith("blocks_")}
    if len(blocks) < depth:
      raise WeightsError(f"SigLIP2 weights file {path!r} has {len(blocks)} blocks, the tokenizer "
                         f"encoder needs {depth} (enc_depth)")
    for src, dst in siglip2_to_encoder_keys(depth).items():
      if src not in names:
        raise WeightsError(f"SigLIP2 weights file {path!r} is missing key {src!r}")
      arr = np.asarray(data[names[src]], np.float32)
      layer = None
      if scanned and dst.startswith("encoder/blocks_"):
        _, blk, rest = dst.split("/", 2)
        layer, dst = int(blk.split("_")[1]), f"encoder/layers/{rest}"
      want = tuple(np.shape(flat[dst]))[1 if layer is not None else 0:]
      if tuple(arr.shape) != want:
        raise WeightsError(f"SigLIP2 weights file {path!r}: key {src!r} has shape "
                           f"{tuple(arr.shape)}, tokenizer param {dst!r} expects {want}")
      if layer is None:
        new[dst] = arr
      else:
        stacked.setdefault(dst, {})[layer] = arr
  for dst, layers in stacked.items():  # scan: [depth, ...] from the per-block arrays
    new[dst] = np.stack([layers[i] for i in range(depth)])
  out = {}
  for k, v in boxed.items():
    if k not in new:
      out[k] = v
    else:
      val = new[k].astype(flat[k].dtype)
      out[k] = v.replace_boxed(val) if isinstance(v, nn.meta.AxisMetadata) else val
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})

"""`dino`: DINO's `dino_deitsmall16_pretrain.pth` (or timm's `vit_small_patch16_224.dino`: the
same key names) -> the backbone .npz of the DINO discriminator (`tdjax.losses.discriminators`,
config `disc_backbone_weights`).

The blocks in `tdjax.nn.layers.TransformerBlock`'s layout: the fused qkv [3C, C] split into
query / key / value [C, H, D]; the final `norm` and any `head` are dropped.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from tdjax.convert.common import ConversionError, convert_vit, linear_leaf, summarize


_DINO_BLOCK = {"norm1": "norm1/ln", "norm2": "norm2/ln", "attn.proj": "attn/out",
               "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}


def dino_params(sd: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  """DINO ViT state dict -> the flat DINO backbone .npz layout (`tdjax.losses.discriminators`):
  patch conv (C, 3, p, p) -> (p, p, 3, C); qkv.weight [3C, C] (rows q | k | v, each head-major)
  -> attn/query, key, value kernels [C, H, D] and biases [H, D]; proj.weight -> attn/out [H, D, C];
  Linear -> W^T; LayerNorm weight -> scale.  The final `norm` (the discriminator reads blocks, not
  the output) and any classification `head` are dropped."""
  flat, errors = {}, []
  for key, value in sd.items():
    mod, _, leaf = key.rpartition(".")
    m = re.match(r"^blocks\.(\d+)\.(.+)$", mod)
    if key in ("cls_token", "pos_embed"):
      flat[key] = value
    elif mod == "patch_embed.proj":
      flat[f"patch_embed/{'kernel' if leaf == 'weight' else leaf}"] = (
          value.transpose(2, 3, 1, 0) if leaf == "weight" else value)
    elif mod == "norm" or key.startswith("head."):
      continue
    elif m and m[2] == "attn.qkv":
      if value.shape[0] % (3 * num_heads):
        errors.append(f"{key}: {value.shape[0]} rows are not 3 x {num_heads} heads")
        continue
      for name, part in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
        path, v = linear_leaf(f"blocks_{m[1]}/attn/{name}", leaf, part, num_heads)
        flat[path] = v
    elif m and m[2] == "attn.proj" and value.shape[-1] % num_heads:
      errors.append(f"{key}: width {value.shape[-1]} is not divisible by {num_heads} heads")
    elif m and m[2] in _DINO_BLOCK:
      heads = num_heads if m[2] == "attn.proj" else 0
      path, v = linear_leaf(f"blocks_{m[1]}/{_DINO_BLOCK[m[2]]}", leaf, value, heads)
      flat[path] = v
    else:
      errors.append(f"unexpected {key} {tuple(value.shape)}")
  if "blocks_0/attn/query/kernel" not in flat or "pos_embed" not in flat:
    errors.append("no 'blocks.0.attn.qkv' / 'pos_embed' keys: not a DINO ViT state dict")
  if errors:
    raise ConversionError("DINO state dict: " + summarize(errors))
  return flat


def convert_dino(input_path: str, output: str, *, num_heads: int = 6) -> dict:
  """Writes the DINO backbone .npz to `output`, atomically; never replaces an existing file."""
  return convert_vit("dino", dino_params, input_path, output, num_heads)

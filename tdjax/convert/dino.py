"""`dino`: DINO's `dino_deitsmall16_pretrain.pth` (or timm's `vit_small_patch16_224.dino`: the
same key names) -> the backbone .npz of the DINO discriminator (`tdjax.losses.discriminators`,
config `disc_backbone_weights`).

The fused qkv [3C, C] -> [C, 3, H, D]; the final `norm` and any `head` are dropped.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from tdjax.convert.common import ConversionError, convert_vit, linear_leaf, summarize


_DINO_BLOCK = {"norm1": "norm1", "norm2": "norm2", "attn.proj": "attn/proj", "mlp.fc1": "mlp/fc1",
               "mlp.fc2": "mlp/fc2"}


def dino_params(sd: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  """DINO ViT state dict -> the flat DINO backbone .npz layout (`tdjax.losses.discriminators`):
  patch conv (C, 3, p, p) -> (p, p, 3, C); qkv.weight [3C, C] -> [C, 3, H, D] and its bias
  -> [3, H, D] (rows ordered q | k | v, head-major); proj.weight -> [H, D, C]; Linear -> W^T;
  LayerNorm weight -> scale.  The final `norm` (the discriminator reads blocks, not the output)
  and any classification `head` are dropped."""
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
      c = value.shape[0] // 3
      value = value.reshape(3, num_heads, c // num_heads, *value.shape[1:])
      flat[f"blocks_{m[1]}/attn/qkv/{'kernel' if leaf == 'weight' else leaf}"] = (
          value.transpose(3, 0, 1, 2) if leaf == "weight" else value)
    elif m and m[2] == "attn.proj" and leaf == "weight":
      if value.shape[1] % num_heads:
        errors.append(f"{key}: width {value.shape[1]} is not divisible by {num_heads} heads")
        continue
      flat[f"blocks_{m[1]}/attn/proj/kernel"] = value.T.reshape(num_heads, -1, value.shape[0])
    elif m and m[2] in _DINO_BLOCK:
      path, v = linear_leaf(f"blocks_{m[1]}/{_DINO_BLOCK[m[2]]}", leaf, value)
      flat[path] = v
    else:
      errors.append(f"unexpected {key} {tuple(value.shape)}")
  if "blocks_0/attn/qkv/kernel" not in flat or "pos_embed" not in flat:
    errors.append("no 'blocks.0.attn.qkv' / 'pos_embed' keys: not a DINO ViT state dict")
  if errors:
    raise ConversionError("DINO state dict: " + summarize(errors))
  return flat


def convert_dino(input_path: str, output: str, *, num_heads: int = 6) -> dict:
  """Writes the DINO backbone .npz to `output`, atomically; never replaces an existing file."""
  return convert_vit("dino", dino_params, input_path, output, num_heads)

"""The SigLIP2 .npz that the alignment teacher and the tokenizer's encoder initialisation read
(`tdjax.tokenizers.siglip2`, `tdjax.losses.alignment`), from two sources.

`siglip2`: HF `Siglip2VisionModel` (docs/reference/detailflow.md 1.2); the attention-pool head
dropped.
`teacher`: not an official file: a `configs/classifier.py:arch=vit` workdir, its EMA or else trained
params -> the same layout from its `teacher` tower, a stand-in teacher where no SigLIP2 file exists.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from tdjax.convert.common import (ConversionError, convert_vit, count_params, linear_leaf,
                                  save_atomically, summarize)


_SIGLIP2_RENAME = {"embeddings.patch_embedding": "patch_embed", "post_layernorm": "post_ln"}
_SIGLIP2_BLOCK = {"layer_norm1": "norm1/ln", "layer_norm2": "norm2/ln",
                  "self_attn.q_proj": "attn/query", "self_attn.k_proj": "attn/key",
                  "self_attn.v_proj": "attn/value", "self_attn.out_proj": "attn/out",
                  "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}


def siglip2_params(sd: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  """HF `Siglip2VisionModel` state dict -> the flat SigLIP2 .npz layout, blocks as
  `tdjax.nn.layers.TransformerBlock`'s ('blocks_i/attn/query/kernel' [W, H, d],
  'blocks_i/attn/out/kernel' [H, d, W], 'blocks_i/norm1/ln/scale'; Linear W(out, in) -> kernel
  W^T, LayerNorm weight -> scale; the patch embedding is a Linear over (py, px, c) patches in the
  NaFlex model).  The attention-pool head (`head.*`) is not part of the tower and is dropped."""
  sd = {k[len("vision_model."):] if k.startswith("vision_model.") else k: v for k, v in sd.items()}
  flat, errors = {}, []
  for key, value in sd.items():
    if key.startswith("head."):
      continue
    mod, _, leaf = key.rpartition(".")
    m = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", mod)
    if key == "embeddings.position_embedding.weight":
      flat["pos_embed"] = value
    elif mod in _SIGLIP2_RENAME:
      path, flat_value = linear_leaf(_SIGLIP2_RENAME[mod], leaf, value)
      flat[path] = flat_value
    elif m and m[2] in _SIGLIP2_BLOCK:
      name = _SIGLIP2_BLOCK[m[2]]
      heads = num_heads if name.startswith("attn/") else 0
      if heads and value.shape[-1] % heads:
        errors.append(f"{key}: width {value.shape[-1]} is not divisible by {heads} heads")
        continue
      path, flat_value = linear_leaf(f"blocks_{m[1]}/{name}", leaf, value, heads)
      flat[path] = flat_value
    else:
      errors.append(f"unexpected {key} {tuple(value.shape)}")
  if "blocks_0/norm1/ln/scale" not in flat:
    errors.append("no 'encoder.layers.0.*' keys: not a SigLIP2 vision tower")
  if errors:
    raise ConversionError("SigLIP2 state dict: " + summarize(errors))
  return flat


def convert_siglip2(input_path: str, output: str, *, num_heads: int = 16) -> dict:
  """Writes the SigLIP2 .npz to `output`, atomically; never replaces an existing file."""
  return convert_vit("siglip2", siglip2_params, input_path, output, num_heads)


def convert_teacher(workdir: str, output: str) -> dict:
  """A ViT classifier run's `teacher` tower -> the alignment teacher .npz (same layout as
  `convert_siglip2`'s), atomically; never replaces an existing file."""
  if os.path.exists(output):
    raise ConversionError(f"{output} exists; choose a new --output")
  from tdjax import runs                    # the trainer and the models: only this kind needs them
  from tdjax.losses.weights import save_npz_params
  config, task, params = runs.load_run(workdir)      # its EMA weights, if any
  if task.kind != "classifier" or "teacher" not in params:
    raise ConversionError(f"{workdir} holds no ViT classifier (configs/classifier.py:arch=vit): "
                          f"task {task.kind!r}, params {sorted(params)}")
  save_atomically(save_npz_params, output, params["teacher"])
  return dict(kind="teacher", output=output, params=count_params(params["teacher"]),
              **{k: config.model[k] for k in ("width", "depth", "num_heads", "patch_size")})

"""`transdiff`: a TransDiff checkpoint (docs/reference/transdiff.md 4.4; "model_ema" first)
-> a TransDiff workdir.

The MAR-style AR encoder and the attention diffusion decoder of `tdjax.generators.transdiff`: size
B / L / H from the dims, MRAR and its reference count from the mask token and position table,
512 px from N = 1024; fused qkv rows [q | k | v], heads contiguous.  The VAE is not part of the
generator: `--vae kl16.npz` (written by `--kind mar_vae`) names the one that decodes.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from tdjax import configlib
from tdjax.convert.common import (ConversionError, count_params, linear_leaf, place,
                                  read_state_dict, write_workdir)


_TD_RENAME = {   # reference key -> tdjax params path; (1, L, D) tables lose the leading axis
    "class_emb.weight": "ar/class_emb", "fake_latent": "ar/fake_latent",
    "mask_token": "ar/mask_token", "encoder_pos_embed_learned": "ar/enc_pos",
    "diffusion_pos_embed_learned": "ar/diff_pos", "z_proj": "ar/z_proj",
    "z_proj_ln": "ar/z_proj_ln/ln", "encoder_norm": "ar/norm/ln",
    "diffdecoder.net.time_embed.time_embedder.linear_1": "head/time_embed/linear_1",
    "diffdecoder.net.time_embed.time_embedder.linear_2": "head/time_embed/linear_2",
    "diffdecoder.net.time_embed.time_proj": "head/time_proj",
    "diffdecoder.net.cond_embed": "head/cond_embed", "diffdecoder.net.input_proj": "head/input_proj",
    "diffdecoder.net.diffusion_pos_embed_learned": "head/pos_embed",
    "diffdecoder.net.final_layer.linear": "head/final_linear",
    "diffdecoder.net.final_layer.scale_shift_table": "head/final_scale_shift"}
# block submodules: reference -> tdjax (the decoder's norm2 sits before the cross-attention, norm3
# before the MLP; tdjax names them norm_cross and norm2)
_TD_BLOCK = {"norm1": "norm1/ln", "norm2": "norm2/ln", "attn.proj": "attn/out",
             "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}
_TD_HEAD_BLOCK = {"norm1": "norm1/ln", "norm2": "norm_cross/ln", "norm3": "norm2/ln",
                  "attn1.proj": "attn/out", "attn2.wq": "cross_attn/query",
                  "attn2.wk": "cross_attn/key", "attn2.wv": "cross_attn/value",
                  "attn2.proj": "cross_attn/out", "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}


def transdiff_dims(sd: Mapping[str, np.ndarray]) -> dict:
  need = ("class_emb.weight", "mask_token", "encoder_pos_embed_learned",
          "diffusion_pos_embed_learned", "diffdecoder.net.diffusion_pos_embed_learned")
  missing = [k for k in need if k not in sd]
  if missing:
    raise ConversionError(f"not a TransDiff state dict: missing {', '.join(missing)}")
  count = lambda pre: len({k.split(".")[int(pre.count("."))] for k in sd if k.startswith(pre)})
  classes, width = sd["class_emb.weight"].shape
  n = sd["diffdecoder.net.diffusion_pos_embed_learned"].shape[1]
  enc_len, mask_len = sd["encoder_pos_embed_learned"].shape[1], sd["mask_token"].shape[1]
  cond = sd["diffusion_pos_embed_learned"].shape[1]   # AR outputs: 256, also for N = 1024 (512 px)
  mrar = mask_len > 1          # MRAR: one mask token per 2x2-patchified position; buffer = mask_len
  return dict(width=width, num_classes=classes, ar_depth=count("encoder_blocks."),
              head_depth=count("diffdecoder.net.res_blocks."), tokens=n, cond_tokens=cond,
              buffer_size=mask_len if mrar else enc_len - cond, mrar=mrar,
              refs=enc_len // mask_len - 2 if mrar else 0)


def transdiff_params(sd: Mapping[str, np.ndarray], expected: Mapping, num_heads: int) -> dict:
  """Unrolled Flax params {'ar', 'head'} of `TransDiff` from the reference state dict
  (docs/reference/transdiff.md 4.4: fused qkv rows [q | k | v] heads contiguous,
  `scale_shift_table`s (1, k, D) ->
  (k, D), position tables (1, L, D) -> (L, D)).  VAE keys (`encoder.*`, `decoder.*`, ...) are not
  part of the generator: convert them with --kind mar_vae."""
  flat, errors = {}, []

  def put(key, path, value):
    flat[tuple(path.split("/"))] = (key, value)

  for key, value in sd.items():
    mod, _, leaf = key.rpartition(".")
    m = re.match(r"^encoder_blocks\.(\d+)\.(.+)$", mod)
    h = re.match(r"^diffdecoder\.net\.res_blocks\.(\d+)\.(.+)$", mod)
    hs = re.match(r"^diffdecoder\.net\.res_blocks\.(\d+)\.scale_shift_table$", key)
    if key in _TD_RENAME:                      # tables and parameters without a module
      put(key, _TD_RENAME[key], value[0] if value.ndim == 3 else
          (value.reshape(-1) if key == "fake_latent" else value))
    elif mod in _TD_RENAME:
      put(key, *linear_leaf(_TD_RENAME[mod], leaf, value))
    elif hs:
      put(key, f"head/blocks/blocks_{hs[1]}/block/scale_shift_table", value[0])
    elif (m or h) and (m or h)[2] in ("attn.qkv", "attn1.qkv"):
      base = f"ar/blocks/blocks_{m[1]}" if m else f"head/blocks/blocks_{h[1]}"
      for name, part in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
        put(f"{key}[{name}]", *linear_leaf(f"{base}/block/attn/{name}", leaf, part, num_heads))
    elif m and m[2] in _TD_BLOCK:
      sub = _TD_BLOCK[m[2]]
      put(key, *linear_leaf(f"ar/blocks/blocks_{m[1]}/block/{sub}", leaf, value,
                             num_heads if "attn" in sub else 0))
    elif h and h[2] in _TD_HEAD_BLOCK:
      sub = _TD_HEAD_BLOCK[h[2]]
      put(key, *linear_leaf(f"head/blocks/blocks_{h[1]}/block/{sub}", leaf, value,
                             num_heads if "attn" in sub else 0))
    else:
      errors.append(f"unexpected {key} {value.shape}")
  return place(flat, expected, errors)


def convert_transdiff(input_path: str, output: str, *, num_heads: int = 0, vae: str = "") -> dict:
  """Writes a `transdiff` workdir (configs/transdiff.py at the matching size B / L / H, MRAR when
  the checkpoint has reference tokens, 512 px when N = 1024) from the EMA weights (`model_ema`,
  else `model`).  `vae`: the KL-16 .npz of `--kind mar_vae`, which decodes the samples."""
  # imported here, not at start-up: it loads JAX
  from tdjax.generators.transdiff import PAPER_SAMPLING, SIZES
  sd = read_state_dict(input_path, entries=("model_ema", "ema", "model"))
  dims = transdiff_dims(sd)
  size = next((k for k, v in SIZES.items() if (v.width, v.ar_depth, v.head_depth) ==
               (dims["width"], dims["ar_depth"], dims["head_depth"])), None)
  heads = num_heads or (SIZES[size].num_heads if size else 0)
  if not heads or dims["width"] % heads:
    raise ConversionError(f"width {dims['width']}, depths {dims['ar_depth']}/{dims['head_depth']} "
                          f"match no TransDiff size: pass --num_heads")
  grid = int(round(np.sqrt(dims["tokens"])))
  config = configlib.load_config("transdiff", f"size={size if size in ('B', 'L', 'H') else 'L'},"
                        f"mrar={dims['mrar']},refs={dims['refs'] or 3},vae_weights={vae}")
  if size not in ("B", "L", "H"):             # a non-paper size: the dims of the checkpoint
    config.model.update(dict(width=dims["width"], num_heads=heads, ar_depth=dims["ar_depth"]))
    config.head.update(dict(width=dims["width"], num_heads=heads, depth=dims["head_depth"]))
  config.model.update(dict(size=size or "custom", num_classes=dims["num_classes"],
                           buffer_size=dims["buffer_size"]))
  if dims["cond_tokens"] != dims["tokens"] and not dims["mrar"]:   # TransDiff-L 512: 256 for 1024
    config.model.cond_tokens = dims["cond_tokens"]
    if (size, "512") in PAPER_SAMPLING:   # its published cfg / scale_0 / scale_1
      cfg, s0, s1 = PAPER_SAMPLING[size, "512"]
      config.sample.update(cfg=cfg, scale_0=s0, scale_1=s1)
  stride = config.input.image_size // config.latent.grid
  config.input.image_size, config.latent.grid = grid * stride, grid
  params = write_workdir(config, output, lambda expected: transdiff_params(sd, expected, heads),
                          stacks={"ar/blocks": dims["ar_depth"], "head/blocks": dims["head_depth"]})
  return dict(kind="transdiff", output=output, params=count_params(params), size=size, **dims,
              num_heads=heads, image_size=int(config.input.image_size))

"""`mar_vae`: MAR's / TransDiff's KL-16 `AutoencoderKL` (LDM layout, key "model") -> an .npz of
the `tdjax.tokenizers.kl_vae.AutoencoderKL` params (`kl_vae.load_params`).

Conv weights (O, I, kh, kw) -> (kh, kw, I, O), GroupNorm weight -> scale; LDM's `loss.*` training
keys are dropped.

`mar_head`: the diffusion head of a MAR checkpoint (`diffloss.net.*` of "model_ema", else "model":
SimpleMLPAdaLN) -> an .npz of `tdjax.generators.heads.MLPHead` params ('/'-joined keys, read back
with `load_mar_head`).  The modules correspond one to one (time_embed.mlp.0 / .2 -> time_embed/
linear_1 / linear_2, cond_embed, input_proj, res_blocks.i.{in_ln, mlp.0, mlp.2, adaLN_modulation.1}
-> res_i_{norm, fc1, fc2, ada}, final_layer.{adaLN_modulation.1, linear} -> final_{ada, linear});
Linear weights are transposed.  The rest of MAR (its masked-AR transformer) is not converted.  A
bare SimpleMLPAdaLN state dict (no `diffloss.net.` prefix) converts as well.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdjax.generators.heads import MAR_HEAD_SIZES, MLPHead
from tdjax.losses.weights import load_npz_params, npz_shapes, save_npz_params
from tdjax.tokenizers import kl_vae
from tdjax.convert.common import (ConversionError, count_params, linear_leaf, place,
                                  read_state_dict, save_atomically)


_VAE_RULES = (
    (re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(.+)$"),
     lambda m: [m[1], f"{m[2]}_{m[3]}_{m[4]}_{m[5]}"] + m[6].split(".")),
    (re.compile(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(downsample|upsample)\.conv\.(\w+)$"),
     lambda m: [m[1], f"{m[2]}_{m[3]}_{m[4]}", m[5]]),
    (re.compile(r"^(encoder|decoder)\.mid\.(block_1|attn_1|block_2)\.(.+)$"),
     lambda m: [m[1], "mid", m[2]] + m[3].split(".")),
    (re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(\w+)$"),
     lambda m: [m[1], m[2], m[3]]),
    (re.compile(r"^(quant_conv|post_quant_conv)\.(\w+)$"), lambda m: [m[1], m[2]]),
)


def mar_vae_params(sd: Mapping[str, np.ndarray], expected: Mapping) -> dict:
  """Nested Flax params of `kl_vae.AutoencoderKL` from an LDM/MAR state dict; every missing,
  unexpected (except LDM's `loss.*` training modules) or mis-shaped key is a ConversionError."""
  flat, errors = {}, []
  for key, value in sd.items():
    if key.startswith("loss."):
      continue
    for pattern, path_of in _VAE_RULES:
      m = pattern.match(key)
      if m:
        path = path_of(m)
        break
    else:
      errors.append(f"unexpected {key} {value.shape}")
      continue
    leaf = path[-1]
    if leaf == "weight" and value.ndim == 4:
      path[-1], value = "kernel", value.transpose(2, 3, 1, 0)
    elif leaf == "weight" and value.ndim == 1:
      path[-1] = "scale"                              # GroupNorm
    flat[tuple(path)] = (key, value)
  return place(flat, expected, errors)


def convert_mar_vae(input_path: str, output: str, config: str = "kl16") -> dict:
  """Writes the converted VAE params to `output` (.npz, '/'-joined keys), atomically."""
  # imported here, not at start-up: they load JAX
  if os.path.exists(output):
    raise ConversionError(f"{output} exists; choose a new --output")
  cfg = {"kl16": kl_vae.KL16, "demo": kl_vae.DEMO}[config]
  vae = kl_vae.AutoencoderKL(cfg)
  x = np.zeros((1, cfg.resolution, cfg.resolution, cfg.in_channels), np.float32)
  expected = jax.eval_shape(lambda: vae.init(jax.random.key(0), x)["params"])
  params = mar_vae_params(read_state_dict(input_path, entries=("model", "state_dict")), expected)
  kl_vae.save_params(params, output)
  return dict(kind="mar_vae", output=output, params=count_params(params))


_HEAD_PREFIX = "diffloss.net."
_HEAD_RULES = (
    (re.compile(r"^time_embed\.mlp\.([02])\.(weight|bias)$"),
     lambda m: ["time_embed", "linear_1" if m[1] == "0" else "linear_2", m[2]]),
    (re.compile(r"^(cond_embed|input_proj)\.(weight|bias)$"), lambda m: [m[1], m[2]]),
    (re.compile(r"^res_blocks\.(\d+)\.in_ln\.(weight|bias)$"),
     lambda m: [f"res_{m[1]}_norm", "ln", m[2]]),
    (re.compile(r"^res_blocks\.(\d+)\.mlp\.([02])\.(weight|bias)$"),
     lambda m: [f"res_{m[1]}_fc{1 if m[2] == '0' else 2}", m[3]]),
    (re.compile(r"^res_blocks\.(\d+)\.adaLN_modulation\.1\.(weight|bias)$"),
     lambda m: [f"res_{m[1]}_ada", m[2]]),
    (re.compile(r"^final_layer\.adaLN_modulation\.1\.(weight|bias)$"),
     lambda m: ["final_ada", m[1]]),
    (re.compile(r"^final_layer\.linear\.(weight|bias)$"), lambda m: ["final_linear", m[1]]),
)


def mar_head_state_dict(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The SimpleMLPAdaLN keys of a MAR state dict (`diffloss.net.` stripped; the masked-AR
  transformer's keys dropped), or `sd` itself when it is a bare SimpleMLPAdaLN state dict."""
  head = {k[len(_HEAD_PREFIX):]: v for k, v in sd.items() if k.startswith(_HEAD_PREFIX)}
  if head:
    return head
  if "input_proj.weight" in sd and "final_layer.linear.weight" in sd:
    return dict(sd)
  raise ConversionError(f"not a MAR checkpoint: no {_HEAD_PREFIX}* keys (MAR's diffusion head, "
                        f"SimpleMLPAdaLN) among its {len(sd)} keys")


def mar_head_dims(sd: Mapping[str, np.ndarray]) -> dict:
  """in / out / condition channels, width and depth of a MAR head (from `mar_head_state_dict`),
  and the name of the released size it has (configs/transdiff.py head_size=...), else ''."""
  need = ("input_proj.weight", "cond_embed.weight", "final_layer.linear.weight",
          "time_embed.mlp.0.weight")
  missing = [k for k in need if k not in sd]
  if missing:
    raise ConversionError("not a MAR diffusion head: missing " +
                          ", ".join(_HEAD_PREFIX + k for k in missing))
  width, in_channels = sd["input_proj.weight"].shape
  freq = sd["time_embed.mlp.0.weight"].shape[1]
  if freq != 256:
    raise ConversionError(f"{_HEAD_PREFIX}time_embed.mlp.0.weight: {freq} timestep frequencies, "
                          f"MLPHead has MAR's 256")
  depth = len({k.split(".")[1] for k in sd if k.startswith("res_blocks.")})
  size = next((n for n, wd in MAR_HEAD_SIZES.items() if wd == (width, depth)), "")
  return dict(width=int(width), depth=depth, in_channels=int(in_channels),
              out_channels=int(sd["final_layer.linear.weight"].shape[0]),
              z_channels=int(sd["cond_embed.weight"].shape[1]), head_size=size)


def mar_head_expected(dims: Mapping) -> tuple:
  """(MLPHead, its abstract params tree) for `mar_head_dims`."""
  # imported here, not at start-up: they load JAX
  head = MLPHead(dims["out_channels"], dims["width"], dims["depth"])
  expected = jax.eval_shape(lambda: nn.unbox(head.init(
      jax.random.key(0), jnp.zeros((1, 1, dims["in_channels"])), jnp.zeros((1,)),
      jnp.zeros((1, 1, dims["z_channels"])))["params"]))
  return head, expected


def mar_head_params(sd: Mapping[str, np.ndarray], expected: Mapping) -> dict:
  """Nested Flax params of `MLPHead` from a MAR (or bare SimpleMLPAdaLN) state dict; every
  missing, unexpected or mis-shaped head key is a ConversionError."""
  flat, errors = {}, []
  for key, value in mar_head_state_dict(sd).items():
    for pattern, path_of in _HEAD_RULES:
      m = pattern.match(key)
      if m:
        *mod, leaf = path_of(m)
        break
    else:
      errors.append(f"unexpected {_HEAD_PREFIX}{key} {value.shape}")
      continue
    path, value = linear_leaf("/".join(mod), leaf, value)
    flat[tuple(path.split("/"))] = (_HEAD_PREFIX + key, value)
  return place(flat, expected, errors)


def convert_mar_head(input_path: str, output: str) -> dict:
  """Writes the converted MLPHead params of a MAR checkpoint's diffusion head to `output` (.npz,
  '/'-joined keys), atomically."""
  # imported here, not at start-up: it loads JAX
  if os.path.exists(output):
    raise ConversionError(f"{output} exists; choose a new --output")
  sd = mar_head_state_dict(read_state_dict(input_path, entries=("model_ema", "ema", "model")))
  dims = mar_head_dims(sd)
  _, expected = mar_head_expected(dims)
  params = mar_head_params(sd, expected)
  save_atomically(save_npz_params, output, params)
  return dict(kind="mar_head", output=output, params=count_params(params), **dims)


def load_mar_head(path: str) -> tuple:
  """(MLPHead, params) from the .npz of `convert_mar_head` (its sizes read from the shapes)."""
  shapes = npz_shapes(path, what="MAR head")
  if "input_proj/kernel" not in shapes or "final_linear/kernel" not in shapes:
    raise ConversionError(f"{path}: not a converted MAR head (python -m tdjax.convert --kind "
                          f"mar_head): no input_proj/kernel or final_linear/kernel")
  dims = dict(in_channels=shapes["input_proj/kernel"][0], width=shapes["input_proj/kernel"][1],
              z_channels=shapes["cond_embed/kernel"][0],
              out_channels=shapes["final_linear/kernel"][1],
              depth=len({k.split("_")[1] for k in shapes if k.startswith("res_")}))
  head, expected = mar_head_expected(dims)
  return head, load_npz_params(path, expected, what="MAR head")

"""`mar_vae`: MAR's / TransDiff's KL-16 `AutoencoderKL` (LDM layout, key "model") -> an .npz of
the `tdjax.tokenizers.kl_vae.AutoencoderKL` params (`kl_vae.load_params`).

Conv weights (O, I, kh, kw) -> (kh, kw, I, O), GroupNorm weight -> scale; LDM's `loss.*` training
keys are dropped.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np

from tdjax.convert.common import ConversionError, count_params, place, read_state_dict


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
  import jax
  from tdjax.tokenizers import kl_vae
  if os.path.exists(output):
    raise ConversionError(f"{output} exists; choose a new --output")
  cfg = {"kl16": kl_vae.KL16, "demo": kl_vae.DEMO}[config]
  vae = kl_vae.AutoencoderKL(cfg)
  x = np.zeros((1, cfg.resolution, cfg.resolution, cfg.in_channels), np.float32)
  expected = jax.eval_shape(lambda: vae.init(jax.random.key(0), x)["params"])
  params = mar_vae_params(read_state_dict(input_path, entries=("model", "state_dict")), expected)
  kl_vae.save_params(params, output)
  return dict(kind="mar_vae", output=output, params=count_params(params))

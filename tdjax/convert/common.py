"""What the converters share: reading state dicts (`read_state_dict`: a `.pt`, which needs torch,
`pip install tdjax[torch]`, read with weights_only=False because the reference pickles its
argparse Namespace; a `.safetensors` file, which needs `pip install safetensors`; or an `.npz`),
checking (`place` reports every missing, unexpected or mis-shaped key by name, with both shapes,
in one ConversionError) and writing (nothing is written unless the conversion is complete, and an
existing checkpoint at the output is never replaced: `save_atomically`, `write_workdir`).
"""

from __future__ import annotations

import os
import shutil
from typing import Mapping

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from tdjax import checkpoint as ckpt_lib
from tdjax import parallel, trainer
from tdjax.losses.weights import save_npz_params
from tdjax.nn.layers import stack_layers, unstack_layers


class ConversionError(ValueError):
  pass


# ------------------------------------------------------------------------------------------------
# Reading state dicts
# ------------------------------------------------------------------------------------------------

def read_state_dict(path: str, entries=("ema", "model")) -> dict[str, np.ndarray]:
  """{name: float32 array} from a .pt (first of `entries` present, else the dict itself), a
  .safetensors or an .npz file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  if path.endswith(".npz"):
    with np.load(path) as f:
      sd = {k: f[k] for k in f.files}
  elif path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file   # optional: only .safetensors inputs need it
    except ImportError:
      raise ConversionError(f"{path}: reading .safetensors files needs the optional package "
                            f"(pip install safetensors)") from None
    sd = load_file(path)
  else:
    try:
      import torch                               # optional and heavy: only .pt inputs
    except ImportError:
      raise ConversionError(f"{path}: reading .pt files needs torch (pip install 'tdjax[torch]'), "
                            f"or save the state dict as .npz") from None
    obj = torch.load(path, map_location="cpu", weights_only=False)
    for e in entries:
      if isinstance(obj, Mapping) and e in obj and isinstance(obj[e], Mapping):
        logging.info("%s: using the %r entry", path, e)
        obj = obj[e]
        break
    sd = {k: v for k, v in obj.items() if hasattr(v, "numpy")}    # tensors: cast below
  out = {}
  for k, v in progress(sd.items(), f"reading {os.path.basename(path)}", len(sd)):
    for prefix in ("module.", "_orig_mod."):
      if k.startswith(prefix):
        k = k[len(prefix):]
    out[k] = np.asarray(v.float().numpy() if hasattr(v, "float") and hasattr(v, "numpy") else v,
                        np.float32)
  return out


def progress(items, desc: str, total: int):
  """A tqdm bar over the tensors of a state dict (as tdjax.sample's), shown from 64 tensors on:
  casting a full checkpoint's tensors to float32 numpy takes a while, a test's few do not."""
  return tqdm(items, desc=desc, total=total, unit="tensor", disable=total < 64)


def read_merged(paths: str, entries=("state_dict", "model")) -> dict:
  """One state dict from a comma-separated list of files (e.g. torchvision VGG16 + LPIPS heads)."""
  sd = {}
  for path in paths.split(","):
    for k, v in read_state_dict(path, entries).items():
      if k in sd:
        raise ConversionError(f"{path}: key {k} is in more than one input file")
      sd[k] = v
  return sd


# ------------------------------------------------------------------------------------------------
# Torch leaves -> Flax leaves, and the check that every key finds its place
# ------------------------------------------------------------------------------------------------

def linear_leaf(target: str, leaf: str, value: np.ndarray, heads: int = 0):
  """(path, value) of a torch Linear / LayerNorm leaf; `heads` > 0: an attention projection in
  tdjax's per-head layout (q/k/v kernels [D, H, hd], biases [H, hd]; out kernels [H, hd, D])."""
  if value.ndim == 1 and leaf == "weight":
    return f"{target}/scale", value
  if leaf == "weight":
    value = value.T
  if heads and not target.endswith("/out"):
    value = value.reshape(value.shape[:-1] + (heads, value.shape[-1] // heads))
  elif heads and leaf == "weight":
    value = value.reshape(heads, value.shape[0] // heads, value.shape[1])
  return f"{target}/{'kernel' if leaf == 'weight' else leaf}", value


def torch_leaf(path: list, value: np.ndarray):
  """(collection, flax path, value) of one torch conv / BatchNorm / Linear leaf."""
  *mod, leaf = path
  if leaf in ("running_mean", "running_var"):
    return "batch_stats", mod + [leaf[len("running_"):]], value
  if leaf == "weight" and value.ndim == 4:
    return "params", mod + ["kernel"], value.transpose(2, 3, 1, 0)
  target, value = linear_leaf("/".join(mod), leaf, value)
  return "params", target.split("/"), value


def summarize(errors: list[str], cap: int = 4) -> str:
  """Key errors in one line, at most `cap` of each kind (missing, unexpected, the rest: shapes,
  head counts), then how many more: a file of another kind gives thousands."""
  kinds = {"missing": [], "unexpected": [], "other": []}
  for e in errors:
    kinds[e.split(" ", 1)[0] if e.startswith(("missing ", "unexpected ")) else "other"].append(e)
  shown = [e for group in kinds.values() for e in group[:cap]]
  more = len(errors) - len(shown)
  return "; ".join(shown) + (f"; ... and {more} more" if more > 0 else "")


# key prefixes that mark each kind's state dict (`likely_kind`)
SIGNATURES = {
    "detailflow_tokenizer": ("encoder.visual_model.", "decoder.visual_model.", "quantize."),
    "detailflow_gpt": ("tok_embeddings.", "cls_embedding."),
    "transdiff": ("diffdecoder.", "class_emb."),
    "mar_vae": ("encoder.down.", "decoder.up.", "quant_conv."),
    "mar_head": ("diffloss.net.",),
    "inception": ("Mixed_", "Conv2d_1a_3x3."),
    "lpips": ("features.", "net.slice", "lin0."),
    "siglip2": ("vision_model.", "embeddings.patch_embedding."),
    "dino": ("blocks.0.attn.qkv.", "patch_embed.proj."),
}


def likely_kind(keys) -> str | None:
  """The kind whose key prefixes most of `keys` carry (None when none stands out)."""
  keys = list(keys)
  counts = {kind: sum(k.startswith(prefixes) for k in keys) for kind, prefixes in
            SIGNATURES.items()}
  best = max(counts, key=counts.get)
  return best if counts[best] else None


def place(flat: dict, expected: Mapping, errors: list) -> dict:
  """Nested params from {target path: (source key, array)}; every target leaf missing from `flat`,
  every mis-shaped one and every source key without a target joins `errors` -> ConversionError."""
  # imported here, not at start-up: it loads JAX
  want = {tuple(getattr(k, "key", k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}
  for path, leaf in want.items():
    if path not in flat:
      errors.append(f"missing {'/'.join(path)} {tuple(leaf.shape)}")
    elif tuple(flat[path][1].shape) != tuple(leaf.shape):
      errors.append(f"{flat[path][0]}: checkpoint gives {tuple(flat[path][1].shape)} (converted), "
                    f"the model expects {tuple(leaf.shape)}")
  errors += [f"unexpected {key} {v.shape}" for path, (key, v) in flat.items() if path not in want]
  if errors:
    raise ConversionError(summarize(errors))
  params: dict = {}
  for path, (_, value) in flat.items():
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.asarray(value, np.float32)
  return params


# ------------------------------------------------------------------------------------------------
# Writing: complete conversions only, never over an existing checkpoint
# ------------------------------------------------------------------------------------------------

def save_atomically(save, output: str, tree) -> None:
  tmp = output + ".partial"
  save(tmp, tree)
  os.replace(tmp, output)


def count_params(tree) -> int:
  # imported here, not at start-up: it loads JAX
  return int(sum(np.size(a) for a in jax.tree.leaves(tree)))


def convert_vit(kind: str, params_fn, input_path: str, output: str, num_heads: int) -> dict:
  """A ViT state dict -> the flat .npz that `params_fn` lays out ('/'-joined keys as they are)."""
  if os.path.exists(output):
    raise ConversionError(f"{output} exists; choose a new --output")
  # imported here, not at start-up: it loads JAX
  flat = params_fn(read_state_dict(input_path), num_heads)
  save_atomically(save_npz_params, output, flat)
  return dict(kind=kind, output=output, params=count_params(flat), num_heads=num_heads,
              blocks=len({k.split("/")[0] for k in flat if k.startswith("blocks_")}))


def write_workdir(config, output: str, convert_fn, stacks: Mapping[str, int],
                   under: str | None = None) -> dict:
  """Builds the task of `config`, converts with convert_fn(expected unrolled params tree) and
  writes step 0 (params = EMA = the converted weights) plus config.json into the new workdir
  `output`.  `stacks`: {params path 'a/b': depth} of the TransformerStacks (scanned ones are
  restacked); `under`: the key of the converted model inside the task's params (e.g. the
  tokenizer's 'gen')."""
  # imported here, not at start-up: they load JAX
  if os.path.exists(output):
    raise ConversionError(f"{output} exists; choose a new --output (a converted run is a new "
                          f"workdir)")
  setup = trainer.Setup(config, parallel.make_mesh({"data": -1}))
  target = nn.unbox(setup.abstract_state()["params"])
  target = target[under] if under else target

  def at(tree, path):                  # the subtree at a '/'-path
    for k in path.split("/"):
      tree = tree[k]
    return tree

  def replaced(tree, path, value):     # a copy of `tree` with the subtree at `path` replaced
    head, _, rest = path.partition("/")
    return dict(tree, **{head: replaced(tree[head], rest, value) if rest else value})

  scanned = [k for k in stacks if "layers" in at(target, k)]
  expected = target
  for k in scanned:
    expected = replaced(expected, k, jax.eval_shape(
        lambda t, d=stacks[k]: unstack_layers(t, d), at(target, k)))
  params = convert_fn(expected)
  for k in scanned:
    params = replaced(params, k, stack_layers(at(params, k), stacks[k]))
  params = jax.tree.map(np.asarray, params)
  state = setup.init_state()
  for name in ("params", "ema"):
    if name in state:
      tree = dict(state[name], **{under: params}) if under else params
      state[name] = jax.device_put(tree, setup.state_shardings[name])
  tmp = f"{output.rstrip('/')}.tmp-{os.getpid()}"     # nothing at --output until it is complete
  try:
    with ckpt_lib.Checkpointer(tmp, use_async=False) as ck:
      ck.save(0, state, config.to_dict(), {})
    ckpt_lib.write_config_json(tmp, config.to_dict())
    os.replace(tmp, output)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return params

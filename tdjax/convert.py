r"""Official checkpoints -> tdjax checkpoints that the sampling CLI loads.

  python -m tdjax.convert --kind detailflow_gpt --input DetailFlow-16-GPT-L/checkpoints/128.pt \
      --output runs/df16_gpt_l --tokens 128 [--tokenizer TOKENIZER_WORKDIR]

  python -m tdjax.convert --kind mar_vae --input kl16.ckpt --output kl16.npz
  python -m tdjax.convert --kind inception --input pt_inception-2015-12-05-6726825d.pth \
      --output inception.npz
  python -m tdjax.convert --kind lpips --input vgg16-397923af.pth,lpips_vgg.pth --output lpips.npz

Kinds: `detailflow_gpt` (DetailFlow's LlamaGen-style AR model, reference detailflow.md 4.3: the
checkpoint's "ema" entry, else "model"; W(out, in) -> kernel W^T, the fused wqkv split as
[q | k | v] head-major, `module.` / `_orig_mod.` prefixes stripped) -> a tdjax workdir;
`mar_vae` (MAR's / TransDiff's KL-16 `AutoencoderKL`, key "model"; conv weights (O, I, kh, kw) ->
(kh, kw, I, O), GroupNorm weight -> scale, LDM's `loss.*` training keys dropped) -> an .npz of the
`tdjax.tokenizers.kl_vae.AutoencoderKL` params (`kl_vae.load_params`); `inception` (pytorch-fid's
FID InceptionV3: BatchNorm running statistics -> `batch_stats`, `num_batches_tracked` and
`AuxLogits.*` dropped) -> the .npz `tdjax.evaluate --inception` reads; `lpips` (torchvision's VGG16
`features.N` or LPIPS's `net.sliceK.N`, plus the `linI.model.1` heads; the scaling-layer buffers
must equal tdjax's constants) -> the .npz of `tdjax.losses.lpips`.  Not written yet: the DetailFlow
tokenizer and TransDiff B/L/H/MRAR.

Input: a PyTorch `.pt` (needs torch: `pip install tdjax[torch]`; read with weights_only=False because
the reference pickles its argparse Namespace) or an `.npz` of the state dict.  Every missing,
unexpected or mis-shaped key is reported by name with both shapes, and nothing is written unless
the conversion is complete; an existing checkpoint at --output is never replaced.
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Mapping

import numpy as np
from absl import app, flags, logging

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ("detailflow_gpt", "mar_vae", "inception", "lpips")


class ConversionError(ValueError):
  pass


def _define_flags():
  flags.DEFINE_enum("kind", None, list(KINDS), "What the input file holds.")
  flags.DEFINE_string("input", None, "Official checkpoint (.pt/.pth) or its state dict as .npz; "
                      "lpips: the VGG16 and LPIPS-heads files, comma-separated.")
  flags.DEFINE_string("output", None, "New tdjax workdir to write the checkpoint into.")
  flags.DEFINE_integer("tokens", 128, "detailflow_gpt: token count N (not stored in the weights).")
  flags.DEFINE_integer("num_heads", 0, "detailflow_gpt: attention heads (0: from the GPT size table).")
  flags.DEFINE_string("tokenizer", "", "detailflow_gpt: tokenizer workdir that decodes samples.")


def read_state_dict(path: str, entries=("ema", "model")) -> dict[str, np.ndarray]:
  """{name: float32 array} from a .pt (first of `entries` present, else the dict itself) or .npz."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such file")
  if path.endswith(".npz"):
    with np.load(path) as f:
      sd = {k: f[k] for k in f.files}
  else:
    try:
      import torch
    except ImportError:
      raise ConversionError(f"{path}: reading .pt files needs torch (pip install 'tdjax[torch]'), "
                            f"or save the state dict as .npz") from None
    obj = torch.load(path, map_location="cpu", weights_only=False)
    for e in entries:
      if isinstance(obj, Mapping) and e in obj and isinstance(obj[e], Mapping):
        logging.info("%s: using the %r entry", path, e)
        obj = obj[e]
        break
    sd = {k: v.float().numpy() for k, v in obj.items() if hasattr(v, "numpy")}
  out = {}
  for k, v in sd.items():
    for prefix in ("module.", "_orig_mod."):
      if k.startswith(prefix):
        k = k[len(prefix):]
    out[k] = np.asarray(v, np.float32)
  return out


# ------------------------------------------------------------------------------------------------
# DetailFlow GPT (LlamaGen layout) -> tdjax.generators.next_detail.NextDetailTransformer
# ------------------------------------------------------------------------------------------------

def gpt_dims(sd: Mapping[str, np.ndarray]) -> dict:
  """Model dims read off the state dict (depth, dim, mlp_dim, vocab, classes, group)."""
  need = ("tok_embeddings.weight", "cls_embedding.embedding_table.weight",
          "spe_tok_embeddings.special_embeddings.weight", "layers.0.feed_forward.w1.weight")
  missing = [k for k in need if k not in sd]
  if missing:
    raise ConversionError(f"not a DetailFlow GPT state dict: missing {', '.join(missing)}")
  depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
  vocab, dim = sd["tok_embeddings.weight"].shape
  return dict(depth=depth, dim=dim, mlp_dim=sd["layers.0.feed_forward.w1.weight"].shape[0],
              vocab_size=vocab, num_classes=sd["cls_embedding.embedding_table.weight"].shape[0] - 1,
              group_size=sd["spe_tok_embeddings.special_embeddings.weight"].shape[0] + 1)


def detailflow_gpt_params(sd: Mapping[str, np.ndarray], depth: int, num_heads: int,
                          expected: Mapping | None = None) -> dict:
  """The unrolled ('blocks_i') Flax params of NextDetailTransformer from a DetailFlow GPT state
  dict.  `expected`: a params tree of the target shapes; any difference is a ConversionError."""
  sd = dict(sd)
  used, errors = set(), []

  def take(key, shape=None):
    if key not in sd:
      errors.append(f"missing {key}")
      return np.zeros(shape or (0,), np.float32)
    used.add(key)
    return sd[key]

  dim = sd["tok_embeddings.weight"].shape[1] if "tok_embeddings.weight" in sd else 0
  if num_heads < 1 or dim % num_heads:
    raise ConversionError(f"num_heads={num_heads} does not divide the width {dim}")
  hd = dim // num_heads
  p = {"cls_embedding": take("cls_embedding.embedding_table.weight"),
       "tok_embeddings": take("tok_embeddings.weight"),
       "spe_tok_embeddings": take("spe_tok_embeddings.special_embeddings.weight"),
       "norm": {"scale": take("norm.weight")},
       "output": {"kernel": take("output.weight").T},
       "transformer": {}}
  for i in range(depth):
    pre = f"layers.{i}."
    wqkv = take(pre + "attention.wqkv.weight")
    if wqkv.shape != (3 * dim, dim):
      errors.append(f"{pre}attention.wqkv.weight has shape {wqkv.shape}, expected {(3 * dim, dim)}")
      wqkv = np.zeros((3 * dim, dim), np.float32)
    q, k, v = (w.T.reshape(dim, num_heads, hd) for w in np.split(wqkv, 3, axis=0))
    wo = take(pre + "attention.wo.weight")
    p["transformer"][f"blocks_{i}"] = {"block": {
        "attn": {"query": {"kernel": q}, "key": {"kernel": k}, "value": {"kernel": v},
                 "out": {"kernel": wo.T.reshape(num_heads, hd, -1) if wo.size else wo}},
        "mlp": {"w1": {"kernel": take(pre + "feed_forward.w1.weight").T},
                "w2": {"kernel": take(pre + "feed_forward.w2.weight").T},
                "w3": {"kernel": take(pre + "feed_forward.w3.weight").T}},
        "norm1": {"scale": take(pre + "attention_norm.weight")},
        "norm2": {"scale": take(pre + "ffn_norm.weight")}}}
  ignored = ("freqs_cis", "causal_mask", "group_causal_mask")
  errors += [f"unexpected {k} {sd[k].shape}" for k in sorted(set(sd) - used)
             if k.split(".")[-1] not in ignored]
  if expected is not None and not errors:
    import jax
    got = dict(jax.tree_util.tree_flatten_with_path(p)[0])
    for path, want in jax.tree_util.tree_flatten_with_path(expected)[0]:
      have = got.get(path)
      if have is None:
        errors.append(f"missing target {jax.tree_util.keystr(path)}")
      elif tuple(have.shape) != tuple(want.shape):
        errors.append(f"{jax.tree_util.keystr(path)}: checkpoint gives {tuple(have.shape)}, the "
                      f"model expects {tuple(want.shape)}")
  if errors:
    raise ConversionError("; ".join(errors))
  return p


# ------------------------------------------------------------------------------------------------
# MAR KL-16 VAE (LDM AutoencoderKL) -> tdjax.tokenizers.kl_vae.AutoencoderKL
# ------------------------------------------------------------------------------------------------

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
  return _place(flat, expected, errors)


def _place(flat: dict, expected: Mapping, errors: list) -> dict:
  """Nested params from {target path: (source key, array)}; every target leaf missing from `flat`,
  every mis-shaped one and every source key without a target joins `errors` -> ConversionError."""
  import jax
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
    raise ConversionError("; ".join(errors))
  params: dict = {}
  for path, (_, value) in flat.items():
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.asarray(value, np.float32)
  return params


def convert_mar_vae(input_path: str, output: str, config: str = "kl16") -> dict:
  """Writes the converted VAE params to `output` (.npz, '/'-joined keys), atomically."""
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
  return dict(kind="mar_vae", output=output, params=int(sum(np.size(a) for a in
                                                              jax.tree.leaves(params))))


# ------------------------------------------------------------------------------------------------
# pytorch-fid InceptionV3 -> tdjax.nn.inception.InceptionV3;  LPIPS (VGG16 + lin heads) -> LPIPS
# ------------------------------------------------------------------------------------------------

def _torch_leaf(path: list, value: np.ndarray):
  """(collection, flax path, value) of one torch conv / BatchNorm / Linear leaf."""
  *mod, leaf = path
  if leaf == "weight" and value.ndim == 4:
    return "params", mod + ["kernel"], value.transpose(2, 3, 1, 0)
  if leaf == "weight" and value.ndim == 2:
    return "params", mod + ["kernel"], value.T
  if leaf in ("running_mean", "running_var"):
    return "batch_stats", mod + [leaf[len("running_"):]], value
  if leaf == "weight":
    return "params", mod + ["scale"], value
  return "params", mod + [leaf], value


def inception_variables(sd: Mapping[str, np.ndarray], expected: Mapping) -> dict:
  """{'params', 'batch_stats'} of `InceptionV3` from pytorch-fid's `pt_inception-2015-12-05`
  state dict (torchvision key names; `num_batches_tracked` and any `AuxLogits.*` dropped)."""
  flat, errors = {}, []
  for key, value in sd.items():
    path = key.split(".")
    if path[-1] == "num_batches_tracked" or path[0] == "AuxLogits":
      continue
    col, target, value = _torch_leaf(path, value)
    flat[(col, *target)] = (key, value)
  return _place(flat, expected, errors)


# lpips.pretrained_networks.vgg16 keeps torchvision's feature indices inside its five slices
_VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_VGG_NAMES = {i: f"conv{s}_{c}" for i, (s, c) in zip(_VGG_CONVS, [
    (1, 1), (1, 2), (2, 1), (2, 2), (3, 1), (3, 2), (3, 3), (4, 1), (4, 2), (4, 3), (5, 1), (5, 2),
    (5, 3)])}


def lpips_params(sd: Mapping[str, np.ndarray], expected: Mapping) -> dict:
  """Params of `tdjax.losses.lpips.LPIPS` from torchvision's VGG16 (`features.N.*`, classifier
  dropped) or the LPIPS model's own `net.sliceK.N.*`, plus the LPIPS heads `linI.model.1.weight`.
  The fixed scaling layer (`scaling_layer.shift/scale`) must equal tdjax's constants."""
  from tdjax.losses import lpips
  flat, errors = {}, []
  for key, value in sd.items():
    m = re.match(r"^(?:features|net\.slice\d)\.(\d+)\.(weight|bias)$", key)
    if m and int(m[1]) in _VGG_NAMES:
      _, target, v = _torch_leaf(["features", _VGG_NAMES[int(m[1])], m[2]], value)
      flat[tuple(target)] = (key, v)
    elif re.match(r"^lin\d\.model\.1\.weight$", key):
      flat[(key.split(".")[0], "kernel")] = (key, value.transpose(2, 3, 1, 0))
    elif key.startswith("classifier."):
      continue
    elif key in ("scaling_layer.shift", "scaling_layer.scale"):
      want = np.asarray(lpips.SHIFT if key.endswith("shift") else lpips.SCALE, np.float32)
      if not np.allclose(value.reshape(-1), want, atol=1e-6):
        errors.append(f"{key} is {value.reshape(-1).tolist()}, tdjax's LPIPS uses {want.tolist()}")
    else:
      errors.append(f"unexpected {key} {value.shape}")
  return _place(flat, expected, errors)


def _read_merged(paths: str, entries=("state_dict", "model")) -> dict:
  """One state dict from a comma-separated list of files (e.g. torchvision VGG16 + LPIPS heads)."""
  sd = {}
  for path in paths.split(","):
    for k, v in read_state_dict(path, entries).items():
      if k in sd:
        raise ConversionError(f"{path}: key {k} is in more than one input file")
      sd[k] = v
  return sd


def convert_inception(input_path: str, output: str) -> dict:
  """Writes InceptionV3 variables ('params/...', 'batch_stats/...' keys) to the `output` .npz."""
  from tdjax.losses.weights import save_npz_params
  from tdjax.nn import inception
  if os.path.exists(output):
    raise ConversionError(f"{output} exists; choose a new --output")
  variables = inception_variables(_read_merged(input_path), inception.expected_variables())
  _save_atomically(save_npz_params, output, variables)
  return dict(kind="inception", output=output, params=_count(variables))


def convert_lpips(input_paths: str, output: str) -> dict:
  """Writes LPIPS params (the layout of `tdjax.losses.lpips`) to the `output` .npz."""
  from tdjax.losses import lpips
  from tdjax.losses.weights import expected_params, save_npz_params
  if os.path.exists(output):
    raise ConversionError(f"{output} exists; choose a new --output")
  x = np.zeros((1, lpips.MIN_SIZE, lpips.MIN_SIZE, 3), np.float32)
  params = lpips_params(_read_merged(input_paths), expected_params(lpips.LPIPS(), x, x))
  _save_atomically(save_npz_params, output, params)
  return dict(kind="lpips", output=output, params=_count(params))


def _save_atomically(save, output: str, tree) -> None:
  tmp = output + ".partial"
  save(tmp, tree)
  os.replace(tmp, output)


def _count(tree) -> int:
  import jax
  return int(sum(np.size(a) for a in jax.tree.leaves(tree)))


def _load_config(name: str, arg: str):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def convert_detailflow_gpt(input_path: str, output: str, *, tokens: int, num_heads: int = 0,
                           tokenizer: str = "") -> dict:
  """Writes a `next_detail` checkpoint (params = EMA = the converted weights) to `output`."""
  import jax
  from tdjax import checkpoint as ckpt_lib
  from tdjax import parallel, trainer
  from tdjax.generators.next_detail import GPT_SIZES
  from tdjax.nn.layers import stack_layers, unstack_layers

  sd = read_state_dict(input_path)
  dims = gpt_dims(sd)
  size = next((s for s, v in GPT_SIZES.items()
               if (v["depth"], v["dim"], v["mlp_dim"]) == (dims["depth"], dims["dim"],
                                                             dims["mlp_dim"])), None)
  heads = num_heads or (GPT_SIZES[size]["num_heads"] if size else 0)
  if not heads:
    raise ConversionError(f"width {dims['dim']} x depth {dims['depth']} is not a GPT size table "
                          f"entry: pass --num_heads")
  arg = (f"size={size or 'demo'},tokens={tokens},group={dims['group_size']},"
         f"vocab={dims['vocab_size']},classes={dims['num_classes']}" +
         (f",tokenizer={tokenizer}" if tokenizer else ""))
  config = _load_config("detailflow_ar", arg)
  config.model.update(dict(depth=dims["depth"], dim=dims["dim"], num_heads=heads,
                           mlp_dim=dims["mlp_dim"]))
  ck = ckpt_lib.Checkpointer(output, use_async=False)
  if ck.latest_step() is not None:
    raise ConversionError(f"{output} already holds a checkpoint (step {ck.latest_step()}); "
                          f"choose a new --output")
  setup = trainer.Setup(config, parallel.make_mesh({"data": -1}))
  abstract = setup.abstract_state()
  target = abstract["params"]
  scanned = "layers" in target["transformer"]
  expected = dict(target)
  if scanned:
    expected["transformer"] = jax.eval_shape(lambda t: unstack_layers(t, dims["depth"]),
                                             target["transformer"])
  params = detailflow_gpt_params(sd, dims["depth"], heads, expected)
  if scanned:
    params["transformer"] = stack_layers(params["transformer"], dims["depth"])
  params = jax.tree.map(np.asarray, params)
  state = setup.init_state()
  state["params"] = jax.device_put(params, setup.state_shardings["params"])
  if "ema" in state:
    state["ema"] = jax.device_put(params, setup.state_shardings["ema"])
  ck.save(0, state, config.to_dict(), {})
  ck.wait()
  ck.close()
  ckpt_lib.write_config_json(output, config.to_dict())
  n = int(sum(np.size(x) for x in jax.tree.leaves(params)))
  return dict(kind="detailflow_gpt", output=output, params=n, **dims, num_heads=heads,
              num_tokens=tokens)


def main(argv):
  del argv
  if FLAGS.kind == "detailflow_gpt":
    result = convert_detailflow_gpt(FLAGS.input, FLAGS.output, tokens=FLAGS.tokens,
                                    num_heads=FLAGS.num_heads, tokenizer=FLAGS.tokenizer)
  elif FLAGS.kind == "inception":
    result = convert_inception(FLAGS.input, FLAGS.output)
  elif FLAGS.kind == "lpips":
    result = convert_lpips(FLAGS.input, FLAGS.output)
  else:
    result = convert_mar_vae(FLAGS.input, FLAGS.output)
  print(result)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["kind", "input", "output"])
  app.run(main)

r"""Official checkpoints -> tdjax checkpoints that the sampling CLI loads.

  python -m tdjax.convert --kind detailflow_gpt --input DetailFlow-16-GPT-L/checkpoints/128.pt \
      --output runs/df16_gpt_l --tokens 128 [--tokenizer TOKENIZER_WORKDIR]

  python -m tdjax.convert --kind detailflow_tokenizer --input DetailFlow-16/checkpoints/128.pt \
      --output runs/df16_tok [--group 8]
  python -m tdjax.convert --kind mar_vae --input kl16.ckpt --output kl16.npz
  python -m tdjax.convert --kind transdiff --input transdiff_l.pth --output runs/td_l --vae kl16.npz
  python -m tdjax.convert --kind inception --input pt_inception-2015-12-05-6726825d.pth \
      --output inception.npz
  python -m tdjax.convert --kind lpips --input vgg16-397923af.pth,lpips_vgg.pth --output lpips.npz
  python -m tdjax.convert --kind siglip2 --input siglip2-so400m-patch16-naflex/model.safetensors \
      --output siglip2.npz [--num_heads 16]
  python -m tdjax.convert --kind teacher --input runs/teacher --output runs/teacher.npz
  python -m tdjax.convert --kind dino --input dino_deitsmall16_pretrain.pth --output dino_s16.npz

Kinds: `detailflow_tokenizer` (reference detailflow.md 4.3: its "model" entry; the SigLIP2-style
encoder/decoder blocks as in `tdjax.tokenizers.siglip2`, (1, N, W) query tables squeezed, the
training-only SigLIP2 teacher `repa_model.*`, alignment MLP `global_token_proj.*` and
`quantize.codebook_used` dropped; dims read off the weights, heads = widths / 72 and / 64) -> a
tdjax workdir for `tdjax.reconstruct` / `tdjax.data.codes`; `detailflow_gpt` (DetailFlow's LlamaGen-style AR model, reference detailflow.md 4.3: the
checkpoint's "ema" entry, else "model"; W(out, in) -> kernel W^T, the fused wqkv split as
[q | k | v] head-major, `module.` / `_orig_mod.` prefixes stripped) -> a tdjax workdir;
`mar_vae` (MAR's / TransDiff's KL-16 `AutoencoderKL`, key "model"; conv weights (O, I, kh, kw) ->
(kh, kw, I, O), GroupNorm weight -> scale, LDM's `loss.*` training keys dropped) -> an .npz of the
`tdjax.tokenizers.kl_vae.AutoencoderKL` params (`kl_vae.load_params`); `inception` (pytorch-fid's
FID InceptionV3: BatchNorm running statistics -> `batch_stats`, `num_batches_tracked` and
`AuxLogits.*` dropped) -> the .npz `tdjax.evaluate --inception` reads; `lpips` (torchvision's VGG16
`features.N` or LPIPS's `net.sliceK.N`, plus the `linI.model.1` heads; the scaling-layer buffers
must equal tdjax's constants) -> the .npz of `tdjax.losses.lpips`; `transdiff` (reference
transdiff.md 4.4: "model_ema" first; B / L / H from the dims, MRAR and its reference count from
the mask token and position table, 512 px from N = 1024) -> a TransDiff workdir (`--vae kl16.npz`
to decode); `siglip2` (HF `Siglip2VisionModel`, reference detailflow.md 1.2; the attention-pool
head dropped) -> the SigLIP2 .npz that the alignment teacher and the tokenizer's encoder
initialisation read (`tdjax.tokenizers.siglip2`, `tdjax.losses.alignment`); `teacher` (not an
official file: a `configs/classifier.py:arch=vit` workdir, its EMA or else trained params) -> the
same layout from its `teacher` tower, a stand-in alignment teacher where no SigLIP2 file exists;
`dino` (DINO's `dino_deitsmall16_pretrain.pth`, or timm's `vit_small_patch16_224.dino`: the same
key names; the fused qkv [3C, C] -> [C, 3, H, D], the final `norm` and any `head` dropped) -> the
backbone .npz of the DINO discriminator (`tdjax.losses.discriminators`, `disc_backbone_weights`).

Input: a PyTorch `.pt` (needs torch: `pip install tdjax[torch]`; read with weights_only=False because
the reference pickles its argparse Namespace), a `.safetensors` file (needs `pip install
safetensors`) or an `.npz` of the state dict.  Every missing,
unexpected or mis-shaped key is reported by name with both shapes, and nothing is written unless
the conversion is complete; an existing checkpoint at --output is never replaced.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

import numpy as np
from absl import flags, logging

from tdjax import cli, configlib

FLAGS = flags.FLAGS
KINDS = ("detailflow_tokenizer", "detailflow_gpt", "transdiff", "mar_vae", "inception", "lpips",
         "siglip2", "teacher", "dino")


class ConversionError(ValueError):
  pass


def _define_flags():
  flags.DEFINE_enum("kind", None, list(KINDS), "What the input file holds.")
  flags.DEFINE_string("input", None, "Official checkpoint (.pt/.pth) or its state dict as .npz; "
                      "lpips: the VGG16 and LPIPS-heads files, comma-separated; teacher: "
                      "a configs/classifier.py:arch=vit workdir.")
  flags.DEFINE_string("output", None, "New tdjax workdir to write the checkpoint into.")
  flags.DEFINE_integer("tokens", 128, "detailflow_gpt: token count N (not stored in the weights).")
  flags.DEFINE_integer("num_heads", 0, "detailflow_gpt / transdiff: attention heads (0: from the "
                       "size tables); siglip2: 0 = 16 (so400m); dino: 0 = 6 (ViT-S).")
  flags.DEFINE_string("tokenizer", "", "detailflow_gpt: tokenizer workdir that decodes samples.")
  flags.DEFINE_string("vae", "", "transdiff: the KL-16 VAE .npz (--kind mar_vae) that decodes.")
  flags.DEFINE_integer("group", 8, "detailflow_tokenizer: group size g (not stored in the weights).")
  flags.DEFINE_string("tokenizer_heads", "", "detailflow_tokenizer: ENC,DEC attention heads "
                      "(default: widths / 72 and / 64, SigLIP2's head widths).")


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
      from safetensors.numpy import load_file
    except ImportError:
      raise ConversionError(f"{path}: reading .safetensors files needs the optional package "
                            f"(pip install safetensors)") from None
    sd = load_file(path)
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
# DetailFlow tokenizer (SigLIP2-style ViT encoder/decoder, VQ) -> tokenizers.detailflow
# ------------------------------------------------------------------------------------------------

_TOK_TRAINING_ONLY = ("repa_model.", "global_token_proj.", "quantize.codebook_used")
_TOK_RENAME = {   # reference key (after the '.'-stripped (1, N, W) / (1, 1, W) leading axes)
    "encoder.latent_tokens": "latent_tokens", "encoder.refined_tokens": "refined_tokens",
    "encoder.latent_pos_embed": "latent_pos_embed", "decoder.mask_token": "mask_token",
    "decoder.latent_pos_embed": "dec_latent_pos", "quantize.embedding.weight": "quantizer/codebook",
    "encoder.visual_model.embeddings.position_embedding.weight": "enc_pos/table",
    "decoder.visual_model.embeddings.position_embedding.weight": "dec_pos/table"}
# SigLIP encoder-layer submodules (both stacks) -> tdjax's `block`
_TOK_BLOCK = {"layer_norm1": "norm1/ln", "layer_norm2": "norm2/ln", "mlp.fc1": "mlp/fc1",
              "mlp.fc2": "mlp/fc2", "self_attn.q_proj": "attn/query", "self_attn.k_proj": "attn/key",
              "self_attn.v_proj": "attn/value", "self_attn.out_proj": "attn/out"}
_TOK_LINEARS = {"encoder.visual_model.embeddings.patch_embedding": "patch_embed",
                "decoder.to_pixel.model": "to_pixel", "quant_conv": "quant_proj",
                "post_quant_conv": "post_quant", "refine_conv": "refine_proj",
                "encoder.visual_model.post_layernorm": "enc_norm/ln",
                "decoder.visual_model.post_layernorm": "dec_norm/ln"}


def tokenizer_dims(sd: Mapping[str, np.ndarray]) -> dict:
  """Tokenizer dims read off a DetailFlow tokenizer state dict (reference detailflow.md 4.3)."""
  need = ("encoder.latent_tokens", "quantize.embedding.weight", "decoder.to_pixel.model.weight",
          "encoder.visual_model.embeddings.patch_embedding.weight",
          "decoder.visual_model.embeddings.position_embedding.weight")
  missing = [k for k in need if k not in sd]
  if missing:
    raise ConversionError(f"not a DetailFlow tokenizer state dict: missing {', '.join(missing)}")
  depth = lambda side: len({k.split(".")[4] for k in sd
                            if k.startswith(f"{side}.visual_model.encoder.layers.")})
  _, n, enc_w = sd["encoder.latent_tokens"].shape
  dec_w = sd["decoder.to_pixel.model.weight"].shape[1]
  grid = int(round(np.sqrt(sd["decoder.visual_model.embeddings.position_embedding.weight"]
                           .shape[0])))
  patch_in = sd["encoder.visual_model.embeddings.patch_embedding.weight"].shape[1]  # P * P * C
  square = lambda v: v > 0 and int(round(np.sqrt(v))) ** 2 == v
  channels = 3 if patch_in % 3 == 0 and square(patch_in // 3) else 1
  if not square(patch_in // channels):
    raise ConversionError(f"patch_embedding takes {patch_in} inputs: not P * P * C for C = 1 or 3")
  patch = int(round(np.sqrt(patch_in // channels)))
  codebook, code_dim = sd["quantize.embedding.weight"].shape
  return dict(num_tokens=n, enc_width=enc_w, enc_depth=depth("encoder"),
              enc_mlp=sd["encoder.visual_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
              dec_width=dec_w, dec_depth=depth("decoder"),
              dec_mlp=sd["decoder.visual_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
              patch=patch, channels=channels, image_size=grid * patch, codebook_size=codebook,
              code_dim=code_dim)


def detailflow_tokenizer_params(sd: Mapping[str, np.ndarray], expected: Mapping, enc_heads: int,
                                dec_heads: int) -> dict:
  """Unrolled Flax params of `DetailFlowTokenizer` from the reference state dict: Linear
  W(out, in) -> kernel W^T, q/k/v/out split by heads, LayerNorm weight -> scale, the leading
  singleton axes of the query / position tables dropped; training-only keys (SigLIP2 teacher
  `repa_model.*`, alignment MLP `global_token_proj.*`, `quantize.codebook_used`) ignored."""
  flat, errors = {}, []
  for key, value in sd.items():
    if key.startswith(_TOK_TRAINING_ONLY):
      continue
    mod, _, leaf = key.rpartition(".")
    m = re.match(r"^(encoder|decoder)\.visual_model\.encoder\.layers\.(\d+)\.(.+)$", mod)
    if key in _TOK_RENAME:                   # (1, N, W) tables -> (N, W); mask token (1, 1, W) -> (W,)
      target = _TOK_RENAME[key]
      value = value.reshape(-1) if key == "decoder.mask_token" else (
          value[0] if value.ndim == 3 else value)
    elif mod in _TOK_LINEARS:
      target, value = _linear_leaf(_TOK_LINEARS[mod], leaf, value)
    elif m and m[3] in _TOK_BLOCK:
      side, i, name = m[1], m[2], _TOK_BLOCK[m[3]]
      heads = (enc_heads if side == "encoder" else dec_heads) if "attn/" in name else 0
      if heads and value.shape[-1] % heads:
        errors.append(f"{key}: width {value.shape[-1]} is not divisible by {heads} heads")
        continue
      target, value = _linear_leaf(f"{side}/blocks_{i}/block/{name}", leaf, value, heads)
    else:
      errors.append(f"unexpected {key} {value.shape}")
      continue
    flat[tuple(target.split("/"))] = (key, value)
  return _place(flat, expected, errors)


# ------------------------------------------------------------------------------------------------
# TransDiff (MAR-style AR encoder + attention diffusion decoder) -> generators.transdiff
# ------------------------------------------------------------------------------------------------

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


def _linear_leaf(target: str, leaf: str, value: np.ndarray, heads: int = 0):
  """(path, value) of a torch Linear / LayerNorm leaf; `heads` > 0: an attention projection in
  tdjax's per-head layout (q/k/v kernels [D, H, hd], biases [H, hd]; out kernels [H, hd, D])."""
  if value.ndim == 1 and leaf == "weight":
    return f"{target}/scale", value
  if leaf == "weight":
    value = value.T
  if heads and not target.endswith(("/out", "/o")):   # 'o': the SigLIP2 teacher layout
    value = value.reshape(value.shape[:-1] + (heads, value.shape[-1] // heads))
  elif heads and leaf == "weight":
    value = value.reshape(heads, value.shape[0] // heads, value.shape[1])
  return f"{target}/{'kernel' if leaf == 'weight' else leaf}", value


def transdiff_params(sd: Mapping[str, np.ndarray], expected: Mapping, num_heads: int) -> dict:
  """Unrolled Flax params {'ar', 'head'} of `TransDiff` from the reference state dict (reference
  transdiff.md 4.4: fused qkv rows [q | k | v] heads contiguous, `scale_shift_table`s (1, k, D) ->
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
      put(key, *_linear_leaf(_TD_RENAME[mod], leaf, value))
    elif hs:
      put(key, f"head/blocks/blocks_{hs[1]}/block/scale_shift_table", value[0])
    elif (m or h) and (m or h)[2] in ("attn.qkv", "attn1.qkv"):
      base = f"ar/blocks/blocks_{m[1]}" if m else f"head/blocks/blocks_{h[1]}"
      for name, part in zip(("query", "key", "value"), np.split(value, 3, axis=0)):
        put(f"{key}[{name}]", *_linear_leaf(f"{base}/block/attn/{name}", leaf, part, num_heads))
    elif m and m[2] in _TD_BLOCK:
      sub = _TD_BLOCK[m[2]]
      put(key, *_linear_leaf(f"ar/blocks/blocks_{m[1]}/block/{sub}", leaf, value,
                             num_heads if "attn" in sub else 0))
    elif h and h[2] in _TD_HEAD_BLOCK:
      sub = _TD_HEAD_BLOCK[h[2]]
      put(key, *_linear_leaf(f"head/blocks/blocks_{h[1]}/block/{sub}", leaf, value,
                             num_heads if "attn" in sub else 0))
    else:
      errors.append(f"unexpected {key} {value.shape}")
  return _place(flat, expected, errors)


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
# HF SigLIP2 vision tower -> the SigLIP2 .npz of tdjax.tokenizers.siglip2 / tdjax.losses.alignment
# ------------------------------------------------------------------------------------------------

_SIGLIP2_RENAME = {"embeddings.patch_embedding": "patch_embed", "post_layernorm": "post_ln"}
_SIGLIP2_BLOCK = {"layer_norm1": "ln1", "layer_norm2": "ln2", "self_attn.q_proj": "attn/q",
                  "self_attn.k_proj": "attn/k", "self_attn.v_proj": "attn/v",
                  "self_attn.out_proj": "attn/o", "mlp.fc1": "mlp/fc1", "mlp.fc2": "mlp/fc2"}


def siglip2_params(sd: Mapping[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
  """HF `Siglip2VisionModel` state dict -> the flat SigLIP2 .npz layout ('blocks_i/attn/q/kernel'
  [W, H, d], 'blocks_i/attn/o/kernel' [H, d, W], Linear W(out, in) -> kernel W^T, LayerNorm
  weight -> scale; the patch embedding is a Linear over (py, px, c) patches in the NaFlex model).
  The attention-pool head (`head.*`) is not part of the tower and is dropped."""
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
      path, flat_value = _linear_leaf(_SIGLIP2_RENAME[mod], leaf, value)
      flat[path] = flat_value
    elif m and m[2] in _SIGLIP2_BLOCK:
      name = _SIGLIP2_BLOCK[m[2]]
      heads = num_heads if name.startswith("attn/") else 0
      if heads and value.shape[-1] % heads:
        errors.append(f"{key}: width {value.shape[-1]} is not divisible by {heads} heads")
        continue
      path, flat_value = _linear_leaf(f"blocks_{m[1]}/{name}", leaf, value, heads)
      flat[path] = flat_value
    else:
      errors.append(f"unexpected {key} {tuple(value.shape)}")
  if "blocks_0/ln1/scale" not in flat:
    errors.append("no 'encoder.layers.0.*' keys: not a SigLIP2 vision tower")
  if errors:
    raise ConversionError("SigLIP2 state dict: " + "; ".join(errors))
  return flat


def convert_siglip2(input_path: str, output: str, *, num_heads: int = 16) -> dict:
  """Writes the SigLIP2 .npz to `output`, atomically; never replaces an existing file."""
  return _convert_vit("siglip2", siglip2_params, input_path, output, num_heads)


def _convert_vit(kind: str, params_fn, input_path: str, output: str, num_heads: int) -> dict:
  """A ViT state dict -> the flat .npz that `params_fn` lays out ('/'-joined keys as they are)."""
  if os.path.exists(output):
    raise ConversionError(f"{output} exists; choose a new --output")
  from tdjax.losses.weights import save_npz_params
  flat = params_fn(read_state_dict(input_path), num_heads)
  _save_atomically(save_npz_params, output, flat)
  return dict(kind=kind, output=output, params=_count(flat), num_heads=num_heads,
              blocks=len({k.split("/")[0] for k in flat if k.startswith("blocks_")}))


def convert_teacher(workdir: str, output: str) -> dict:
  """A ViT classifier run's `teacher` tower -> the alignment teacher .npz (same layout as
  `convert_siglip2`'s), atomically; never replaces an existing file."""
  if os.path.exists(output):
    raise ConversionError(f"{output} exists; choose a new --output")
  import jax
  from tdjax import trainer
  from tdjax.losses.weights import save_npz_params
  config, task, state = trainer.load_for_inference(workdir)
  params = jax.device_get(state.get("ema", state["params"]))
  if task.kind != "classifier" or "teacher" not in params:
    raise ConversionError(f"{workdir} holds no ViT classifier (configs/classifier.py:arch=vit): "
                          f"task {task.kind!r}, params {sorted(params)}")
  _save_atomically(save_npz_params, output, params["teacher"])
  return dict(kind="teacher", output=output, params=_count(params["teacher"]),
              **{k: config.model[k] for k in ("width", "depth", "num_heads", "patch_size")})


# ------------------------------------------------------------------------------------------------
# DINO ViT-S/16 (the DINO / timm layout) -> the backbone of tdjax.losses.discriminators
# ------------------------------------------------------------------------------------------------

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
      path, v = _linear_leaf(f"blocks_{m[1]}/{_DINO_BLOCK[m[2]]}", leaf, value)
      flat[path] = v
    else:
      errors.append(f"unexpected {key} {tuple(value.shape)}")
  if "blocks_0/attn/qkv/kernel" not in flat or "pos_embed" not in flat:
    errors.append("no 'blocks.0.attn.qkv' / 'pos_embed' keys: not a DINO ViT state dict")
  if errors:
    raise ConversionError("DINO state dict: " + "; ".join(errors))
  return flat


def convert_dino(input_path: str, output: str, *, num_heads: int = 6) -> dict:
  """Writes the DINO backbone .npz to `output`, atomically; never replaces an existing file."""
  return _convert_vit("dino", dino_params, input_path, output, num_heads)


# ------------------------------------------------------------------------------------------------
# pytorch-fid InceptionV3 -> tdjax.nn.inception.InceptionV3;  LPIPS (VGG16 + lin heads) -> LPIPS
# ------------------------------------------------------------------------------------------------

def _torch_leaf(path: list, value: np.ndarray):
  """(collection, flax path, value) of one torch conv / BatchNorm / Linear leaf."""
  *mod, leaf = path
  if leaf in ("running_mean", "running_var"):
    return "batch_stats", mod + [leaf[len("running_"):]], value
  if leaf == "weight" and value.ndim == 4:
    return "params", mod + ["kernel"], value.transpose(2, 3, 1, 0)
  target, value = _linear_leaf("/".join(mod), leaf, value)
  return "params", target.split("/"), value


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
  dropped) or the LPIPS model's own `net.sliceK.N.*`, plus the LPIPS heads `linI.model.1.weight`
  (or `lins.I.model.1.weight`, the `lpips` package module's second name for them).
  The fixed scaling layer (`scaling_layer.shift/scale`) must equal tdjax's constants."""
  from tdjax.losses import lpips
  flat, errors = {}, []
  for key, value in sd.items():
    m = re.match(r"^(?:features|net\.slice\d)\.(\d+)\.(weight|bias)$", key)
    if m and int(m[1]) in _VGG_NAMES:
      _, target, v = _torch_leaf(["features", _VGG_NAMES[int(m[1])], m[2]], value)
      flat[tuple(target)] = (key, v)
    elif m := re.match(r"^(?:lin(\d)|lins\.(\d))\.model\.1\.weight$", key):
      # the `lpips` package's module lists its heads twice (lin0..lin4 and the ModuleList
      # lins.0..4), so a whole module's state_dict has both names for one tensor
      head, kernel = (f"lin{m[1] or m[2]}", "kernel"), value.transpose(2, 3, 1, 0)
      if head in flat and not np.array_equal(flat[head][1], kernel):
        errors.append(f"{key} differs from {flat[head][0]}, the same LPIPS head")
      flat[head] = (key, kernel)
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


def _write_workdir(config, output: str, convert_fn, stacks: Mapping[str, int],
                   under: str | None = None) -> dict:
  """Builds the task of `config`, converts with convert_fn(expected unrolled params tree) and
  writes step 0 (params = EMA = the converted weights) plus config.json into the new workdir
  `output`.  `stacks`: {params path 'a/b': depth} of the TransformerStacks (scanned ones are
  restacked);
  `under`: the key of the converted model inside the task's params (e.g. the tokenizer's 'gen')."""
  import flax.linen as nn
  import jax
  from tdjax import checkpoint as ckpt_lib
  from tdjax import parallel, trainer
  from tdjax.nn.layers import stack_layers, unstack_layers
  with ckpt_lib.Checkpointer(output, use_async=False) as ck:
    if ck.latest_step() is not None:
      raise ConversionError(f"{output} already holds a checkpoint (step {ck.latest_step()}); "
                            f"choose a new --output")
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
  with ckpt_lib.Checkpointer(output, use_async=False) as ck:
    ck.save(0, state, config.to_dict(), {})
  ckpt_lib.write_config_json(output, config.to_dict())
  return params


def convert_detailflow_tokenizer(input_path: str, output: str, *, group: int = 8,
                                 enc_heads: int = 0, dec_heads: int = 0) -> dict:
  """Writes a `tokenizer` workdir (configs/detailflow_tokenizer.py:size=full with the checkpoint's
  dims) that `tdjax.reconstruct` and `tdjax.data.codes` load.  Heads are not in the weights: by
  default the SigLIP2 head widths (encoder 72, decoder 64) divide the widths."""
  sd = read_state_dict(input_path, entries=("model", "ema"))
  dims = tokenizer_dims(sd)
  enc_heads = enc_heads or dims["enc_width"] // 72
  dec_heads = dec_heads or dims["dec_width"] // 64
  if not enc_heads or dims["enc_width"] % enc_heads or not dec_heads or \
      dims["dec_width"] % dec_heads:
    raise ConversionError(f"widths {dims['enc_width']} / {dims['dec_width']}: pass "
                          f"--tokenizer_heads ENC,DEC that divide them")
  config = configlib.load_config("detailflow_tokenizer", f"size=full,tokens={dims['num_tokens']},"
                        f"group={group},image_size={dims['image_size']}")
  config.input.channels = dims["channels"]
  config.model.update({k: dims[k] for k in ("enc_width", "enc_depth", "enc_mlp", "dec_width",
                                            "dec_depth", "dec_mlp", "patch", "codebook_size",
                                            "code_dim")})
  config.model.update(dict(enc_heads=enc_heads, dec_heads=dec_heads))
  params = _write_workdir(config, output, lambda expected: detailflow_tokenizer_params(
      sd, expected, enc_heads, dec_heads), stacks={"encoder": dims["enc_depth"],
                                                   "decoder": dims["dec_depth"]}, under="gen")
  return dict(kind="detailflow_tokenizer", output=output, params=_count(params), **dims,
              enc_heads=enc_heads, dec_heads=dec_heads, group=group)


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


def convert_transdiff(input_path: str, output: str, *, num_heads: int = 0, vae: str = "") -> dict:
  """Writes a `transdiff` workdir (configs/transdiff.py at the matching size B / L / H, MRAR when
  the checkpoint has reference tokens, 512 px when N = 1024) from the EMA weights (`model_ema`,
  else `model`).  `vae`: the KL-16 .npz of `--kind mar_vae`, which decodes the samples."""
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
  params = _write_workdir(config, output, lambda expected: transdiff_params(sd, expected, heads),
                          stacks={"ar/blocks": dims["ar_depth"], "head/blocks": dims["head_depth"]})
  return dict(kind="transdiff", output=output, params=_count(params), size=size, **dims,
              num_heads=heads, image_size=int(config.input.image_size))


def convert_detailflow_gpt(input_path: str, output: str, *, tokens: int, num_heads: int = 0,
                           tokenizer: str = "") -> dict:
  """Writes a `next_detail` checkpoint (params = EMA = the converted weights) to `output`."""
  import jax
  from tdjax.generators.next_detail import GPT_SIZES

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
  config = configlib.load_config("detailflow_ar", arg)
  config.model.update(dict(depth=dims["depth"], dim=dims["dim"], num_heads=heads,
                           mlp_dim=dims["mlp_dim"]))
  params = _write_workdir(config, output, lambda expected: detailflow_gpt_params(
      sd, dims["depth"], heads, expected), stacks={"transformer": dims["depth"]})
  n = int(sum(np.size(x) for x in jax.tree.leaves(params)))
  return dict(kind="detailflow_gpt", output=output, params=n, **dims, num_heads=heads,
              num_tokens=tokens)


def main(argv):
  del argv
  if FLAGS.kind == "detailflow_gpt":
    result = convert_detailflow_gpt(FLAGS.input, FLAGS.output, tokens=FLAGS.tokens,
                                    num_heads=FLAGS.num_heads, tokenizer=FLAGS.tokenizer)
  elif FLAGS.kind == "detailflow_tokenizer":
    heads = [int(h) for h in FLAGS.tokenizer_heads.split(",")] if FLAGS.tokenizer_heads else [0, 0]
    result = convert_detailflow_tokenizer(FLAGS.input, FLAGS.output, group=FLAGS.group,
                                          enc_heads=heads[0], dec_heads=heads[1])
  elif FLAGS.kind == "transdiff":
    result = convert_transdiff(FLAGS.input, FLAGS.output, num_heads=FLAGS.num_heads, vae=FLAGS.vae)
  elif FLAGS.kind == "inception":
    result = convert_inception(FLAGS.input, FLAGS.output)
  elif FLAGS.kind == "lpips":
    result = convert_lpips(FLAGS.input, FLAGS.output)
  elif FLAGS.kind == "siglip2":
    result = convert_siglip2(FLAGS.input, FLAGS.output, num_heads=FLAGS.num_heads or 16)
  elif FLAGS.kind == "teacher":
    result = convert_teacher(FLAGS.input, FLAGS.output)
  elif FLAGS.kind == "dino":
    result = convert_dino(FLAGS.input, FLAGS.output, num_heads=FLAGS.num_heads or 6)
  else:
    result = convert_mar_vae(FLAGS.input, FLAGS.output)
  print(result)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["kind", "input", "output"])
  cli.run(main)

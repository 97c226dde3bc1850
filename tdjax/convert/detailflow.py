"""DetailFlow checkpoints (docs/reference/detailflow.md 4.3) -> tdjax workdirs.

`detailflow_tokenizer`: the checkpoint's "model" entry (else "ema"): SigLIP2-style encoder /
decoder blocks as in `tdjax.tokenizers.siglip2`, (1, N, W) query tables squeezed; the training-only
SigLIP2 teacher `repa_model.*`, alignment MLP `global_token_proj.*` and `quantize.codebook_used`
dropped.  Dims are read off the weights, heads = widths / 72 and / 64 unless given.  Writes a
`tokenizer` workdir for `tdjax.reconstruct` / `tdjax.data.codes`.

`detailflow_gpt`: the LlamaGen-style AR model, the "ema" entry, else "model": W(out, in) -> kernel
W^T, the fused wqkv split as [q | k | v] head-major.  Writes a `next_detail` workdir.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from tdjax import configlib
from tdjax.convert.common import (ConversionError, count_params, linear_leaf, place,
                                  read_state_dict, summarize, write_workdir)


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
  """Tokenizer dims read off a DetailFlow tokenizer state dict (docs/reference/detailflow.md
  4.3)."""
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
      target, value = linear_leaf(_TOK_LINEARS[mod], leaf, value)
    elif m and m[3] in _TOK_BLOCK:
      side, i, name = m[1], m[2], _TOK_BLOCK[m[3]]
      heads = (enc_heads if side == "encoder" else dec_heads) if "attn/" in name else 0
      if heads and value.shape[-1] % heads:
        errors.append(f"{key}: width {value.shape[-1]} is not divisible by {heads} heads")
        continue
      target, value = linear_leaf(f"{side}/blocks_{i}/block/{name}", leaf, value, heads)
    else:
      errors.append(f"unexpected {key} {value.shape}")
      continue
    flat[tuple(target.split("/"))] = (key, value)
  return place(flat, expected, errors)


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
  params = write_workdir(config, output, lambda expected: detailflow_tokenizer_params(
      sd, expected, enc_heads, dec_heads), stacks={"encoder": dims["enc_depth"],
                                                   "decoder": dims["dec_depth"]}, under="gen")
  return dict(kind="detailflow_tokenizer", output=output, params=count_params(params), **dims,
              enc_heads=enc_heads, dec_heads=dec_heads, group=group)


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
    import jax                         # imported here, not at start-up
    got = dict(jax.tree_util.tree_flatten_with_path(p)[0])
    for path, want in jax.tree_util.tree_flatten_with_path(expected)[0]:
      have = got.get(path)
      if have is None:
        errors.append(f"missing target {jax.tree_util.keystr(path)}")
      elif tuple(have.shape) != tuple(want.shape):
        errors.append(f"{jax.tree_util.keystr(path)}: checkpoint gives {tuple(have.shape)}, the "
                      f"model expects {tuple(want.shape)}")
  if errors:
    raise ConversionError(summarize(errors))
  return p


def convert_detailflow_gpt(input_path: str, output: str, *, tokens: int, num_heads: int = 0,
                           tokenizer: str = "") -> dict:
  """Writes a `next_detail` checkpoint (params = EMA = the converted weights) to `output`."""
  # imported here, not at start-up: it loads JAX
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
  config = configlib.load_config("next_detail", arg)
  config.model.update(dict(depth=dims["depth"], dim=dims["dim"], num_heads=heads,
                           mlp_dim=dims["mlp_dim"]))
  params = write_workdir(config, output, lambda expected: detailflow_gpt_params(
      sd, dims["depth"], heads, expected), stacks={"transformer": dims["depth"]})
  return dict(kind="detailflow_gpt", output=output, params=count_params(params), **dims,
              num_heads=heads, num_tokens=tokens)

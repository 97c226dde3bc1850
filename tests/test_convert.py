"""Official-checkpoint converters: a state dict with the reference's key names and (out, in) shapes,
converted, must give the outputs of a numpy forward pass written from the model's equations."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdjax import configlib, convert, runs
from tdjax.generators import next_detail as nd
from tdjax.nn.rope import rope_2d_grid

N, G, D, H, F, V, C, L = 16, 4, 32, 2, 64, 256, 3, 2


def assert_same_leaves(want, got):
  """Every leaf of `want` is in `got` under the same path, bit for bit, and nothing else is."""
  want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
  got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
  assert set(want) == set(got)
  for path, v in want.items():
    np.testing.assert_array_equal(got[path], v, err_msg=jax.tree_util.keystr(path))


def conversion_error(tmp_path, bad_sd, convert_fn, *args, **kwargs) -> str:
  """Saves `bad_sd` as bad.npz, runs convert_fn(bad.npz, *args) and returns its error message."""
  np.savez(str(tmp_path / "bad.npz"), **{k: np.asarray(v) for k, v in bad_sd.items()})
  with pytest.raises(convert.ConversionError) as e:
    convert_fn(str(tmp_path / "bad.npz"), *args, **kwargs)
  return str(e.value)


def gpt_state_dict(seed=0):
  """DetailFlow GPT keys (docs/reference/detailflow.md 4.3) at a tiny size, PyTorch (out, in)
  layout."""
  rng = np.random.default_rng(seed)
  r = lambda *s: (0.3 * rng.normal(size=s)).astype(np.float32)
  sd = {"cls_embedding.embedding_table.weight": r(C + 1, D), "tok_embeddings.weight": r(V, D),
        "spe_tok_embeddings.special_embeddings.weight": r(G - 1, D),
        "norm.weight": 1 + r(D), "output.weight": r(V, D)}
  for i in range(L):
    p = f"layers.{i}."
    sd.update({p + "attention.wqkv.weight": r(3 * D, D), p + "attention.wo.weight": r(D, D),
               p + "feed_forward.w1.weight": r(F, D), p + "feed_forward.w3.weight": r(F, D),
               p + "feed_forward.w2.weight": r(D, F), p + "attention_norm.weight": 1 + r(D),
               p + "ffn_norm.weight": 1 + r(D)})
  return sd


def reference_forward(sd, codes, label):
  """LlamaGen/DetailFlow GPT in numpy: pre-norm RMSNorm (eps 1e-5), fused qkv, 2D RoPE on
  interleaved pairs, group-causal mask, SwiGLU w2(silu(w1 x) * w3 x), untied output."""
  rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w
  x = np.zeros((N, D), np.float32)
  x[0] = sd["cls_embedding.embedding_table.weight"][label]
  x[1:G + 1] = sd["tok_embeddings.weight"][codes[:G]]
  x[G + 1:2 * G] = sd["spe_tok_embeddings.special_embeddings.weight"]
  x[2 * G:] = sd["tok_embeddings.weight"][codes[G:N - G]]
  hd = D // H
  cos, sin = (np.asarray(a)[:N] for a in rope_2d_grid(N // G, G, hd))

  def rope(t):                        # [N, H, hd], pairs (2i, 2i + 1) as complex numbers
    z = (t[..., 0::2] + 1j * t[..., 1::2]) * (cos + 1j * sin)[:, None]
    return np.stack([z.real, z.imag], -1).reshape(t.shape)

  mask = nd.group_causal_mask(N, G)
  for i in range(L):
    p = f"layers.{i}."
    h = rms(x, sd[p + "attention_norm.weight"])
    q, k, v = np.split(h @ sd[p + "attention.wqkv.weight"].T, 3, axis=-1)
    q, k, v = (a.reshape(N, H, hd) for a in (q, k, v))
    q, k = rope(q), rope(k)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    s = np.where(mask[None], s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("hqk,khd->qhd", a, v).reshape(N, D)
    x = x + o @ sd[p + "attention.wo.weight"].T
    h = rms(x, sd[p + "ffn_norm.weight"])
    u = h @ sd[p + "feed_forward.w1.weight"].T
    x = x + ((u / (1 + np.exp(-u))) * (h @ sd[p + "feed_forward.w3.weight"].T)) @ \
        sd[p + "feed_forward.w2.weight"].T
  return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def _model(scan=False):
  return nd.NextDetailTransformer(vocab_size=V, num_tokens=N, group_size=G, num_classes=C, dim=D,
                                  depth=L, num_heads=H, mlp_dim=F, class_dropout=0.0,
                                  token_dropout=0.0, dropout=0.0, scan=scan)


def test_converted_gpt_matches_the_numpy_reference_forward():
  sd = gpt_state_dict()
  params = convert.detailflow_gpt_params(sd, L, H)
  codes = np.random.default_rng(1).integers(0, V, N)
  ids = nd.layout_ids(jnp.asarray(codes[None, :N - G]), N, G)
  got = _model().apply({"params": params}, ids, jnp.array([2]))[0]
  want = reference_forward(sd, codes, 2)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_conversion_errors_name_every_bad_key():
  sd = gpt_state_dict()
  del sd["layers.1.ffn_norm.weight"]
  sd["layers.0.attention.wo.weight"] = np.zeros((D, D + 1), np.float32)
  sd["repa_model.visual_model.x"] = np.zeros((2,), np.float32)
  expected = jax.eval_shape(lambda: __import__("flax").linen.unbox(
      nd.init_params(_model(), jax.random.key(0))))
  with pytest.raises(convert.ConversionError) as e:
    convert.detailflow_gpt_params(sd, L, H, expected)
  msg = str(e.value)
  assert "missing layers.1.ffn_norm.weight" in msg and "unexpected repa_model.visual_model.x" in msg
  sd = gpt_state_dict()
  sd["layers.0.feed_forward.w1.weight"] = np.zeros((F + 2, D), np.float32)
  with pytest.raises(convert.ConversionError, match=r"w1.*checkpoint gives \(32, 66\), the model "
                                                    r"expects \(32, 64\)"):
    convert.detailflow_gpt_params(sd, L, H, expected)


def test_convert_cli_writes_a_checkpoint_the_sampler_loads(tmp_path, tiny_tokenizer_dir):
  """A .npz state dict (with a DDP prefix) -> a next_detail workdir; the tokenizer named decodes
  its samples; a second conversion into the same folder is refused."""
  from tdjax import sample as sample_cli
  from tdjax import runs
  tok_dir = tiny_tokenizer_dir
  sd = gpt_state_dict()
  path = str(tmp_path / "gpt.npz")
  np.savez(path, **{"module." + k: v for k, v in sd.items()})
  out = str(tmp_path / "gpt")
  info = convert.convert_detailflow_gpt(path, out, tokens=N, num_heads=H, tokenizer=tok_dir)
  assert info["depth"] == L and info["vocab_size"] == V and info["group_size"] == G
  config, task, state = runs.load_state(out)
  codes = np.random.default_rng(1).integers(0, V, N)
  ids = nd.layout_ids(jnp.asarray(codes[None, :N - G]), N, G)
  got = task.model.apply({"params": state["ema"]}, ids, jnp.array([1]))[0]
  np.testing.assert_allclose(np.asarray(got), reference_forward(sd, codes, 1), rtol=2e-4, atol=2e-4)
  images, labels, _ = sample_cli.generate(out, "0,2", 2)
  assert images.shape == (4, 32, 32, 1)
  with pytest.raises(convert.ConversionError, match="exists; choose a new --output"):
    convert.convert_detailflow_gpt(path, out, tokens=N, num_heads=H)
  with pytest.raises(FileNotFoundError, match="nope.pt"):
    convert.read_state_dict(str(tmp_path / "nope.pt"))


def ldm_vae_keys(cfg):
  """LDM AutoencoderKL module names (encoder.down.{i}.block.{j}, ...), written from its layout."""
  def resnet(pre, cin, cout):
    names = [f"{pre}.norm1", f"{pre}.conv1", f"{pre}.norm2", f"{pre}.conv2"]
    return names + ([f"{pre}.nin_shortcut"] if cin != cout else [])
  attn = lambda pre: [f"{pre}.{n}" for n in ("norm", "q", "k", "v", "proj_out")]
  mid = lambda p: resnet(f"{p}.mid.block_1", 1, 1) + attn(f"{p}.mid.attn_1") + \
      resnet(f"{p}.mid.block_2", 1, 1)
  names, cin, res = ["encoder.conv_in"], cfg.ch, cfg.resolution
  for i, m in enumerate(cfg.ch_mult):
    for j in range(cfg.num_res_blocks):
      names += resnet(f"encoder.down.{i}.block.{j}", cin, cfg.ch * m)
      cin = cfg.ch * m
      if res in cfg.attn_resolutions:
        names += attn(f"encoder.down.{i}.attn.{j}")
    if i != len(cfg.ch_mult) - 1:
      names.append(f"encoder.down.{i}.downsample.conv")
      res //= 2
  names += mid("encoder") + ["encoder.norm_out", "encoder.conv_out", "quant_conv",
                             "post_quant_conv", "decoder.conv_in"] + mid("decoder")
  cin = cfg.ch * cfg.ch_mult[-1]
  for i in reversed(range(len(cfg.ch_mult))):
    for j in range(cfg.num_res_blocks + 1):
      names += resnet(f"decoder.up.{i}.block.{j}", cin, cfg.ch * cfg.ch_mult[i])
      cin = cfg.ch * cfg.ch_mult[i]
    if i:
      names.append(f"decoder.up.{i}.upsample.conv")
  return names + ["decoder.norm_out", "decoder.conv_out"]


def test_mar_vae_conversion_puts_every_ldm_weight_in_its_place(tmp_path):
  """Random Flax params -> an LDM-named torch-layout state dict (names from the LDM layout above,
  shapes transposed back) -> converter: the same params, the same reconstructions."""
  import flax
  from tdjax.tokenizers import kl_vae
  cfg = kl_vae.DEMO
  vae = kl_vae.AutoencoderKL(cfg)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 32, 1), minval=-1, maxval=1)
  params = vae.init(jax.random.key(0), x)["params"]
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  sd = {}
  for name in ldm_vae_keys(cfg):
    parts = name.split(".")
    if name.startswith(("encoder.down", "decoder.up")):
      kind = parts[3]
      mod = f"{parts[1]}_{parts[2]}_{kind}" + ("" if kind in ("downsample", "upsample")
                                               else f"_{parts[4]}")
      sub = parts[5:] if kind in ("block", "attn") else []
      base = "/".join([parts[0], mod] + sub)
    else:
      base = "/".join(parts)
    if base + "/scale" in flat:                                       # GroupNorm
      sd[name + ".weight"], sd[name + ".bias"] = flat.pop(base + "/scale"), flat.pop(base + "/bias")
    else:
      sd[name + ".weight"] = np.asarray(flat.pop(base + "/kernel")).transpose(3, 2, 0, 1)
      sd[name + ".bias"] = flat.pop(base + "/bias")
  assert not flat, sorted(flat)                  # the LDM names cover every Flax parameter
  sd["loss.discriminator.main.0.weight"] = np.zeros((4, 3, 4, 4), np.float32)   # dropped
  path = str(tmp_path / "vae.npz")
  np.savez(path, **{k: np.asarray(v) for k, v in sd.items()})
  out = str(tmp_path / "vae_flax.npz")
  info = convert.convert_mar_vae(path, out, config="demo")
  assert info["params"] == sum(np.size(a) for a in jax.tree.leaves(params))
  back = kl_vae.load_params(out)
  y0, _ = vae.apply({"params": params}, x)
  y1, _ = vae.apply({"params": back}, x)
  np.testing.assert_allclose(np.asarray(y0), np.asarray(y1), atol=1e-6)
  bad = dict(sd)
  del bad["decoder.up.1.upsample.conv.bias"]
  bad["encoder.conv_in.weight"] = np.zeros((3, 1, 3, 3), np.float32)
  bad["encoder.extra.weight"] = np.zeros((2,), np.float32)
  msg = conversion_error(tmp_path, bad, convert.convert_mar_vae, str(tmp_path / "bad_out.npz"),
                         "demo")
  assert "missing decoder/up_1_upsample/bias" in msg and "unexpected encoder.extra.weight" in msg
  assert "encoder.conv_in.weight: checkpoint gives (3, 3, 1, 3)" in msg
  assert not os.path.exists(str(tmp_path / "bad_out.npz"))
  with pytest.raises(convert.ConversionError, match="exists"):
    convert.convert_mar_vae(path, out, config="demo")


def lpips_torch_files(tmp_path, slices=False):
  """torchvision VGG16 (features.N, classifier) + LPIPS heads (linI.model.1.weight), as the two
  official files hold them; slices=True: the LPIPS model's own `net.sliceK.N` names instead."""
  rng = np.random.default_rng(0)
  widths = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128),
            12: (256, 256), 14: (256, 256), 17: (512, 256), 19: (512, 512), 21: (512, 512),
            24: (512, 512), 26: (512, 512), 28: (512, 512)}
  vgg = {}
  for i, (o, c) in widths.items():
    pre = (f"net.slice{1 + sum(i >= b for b in (4, 9, 16, 23))}.{i}" if slices
           else f"features.{i}")
    vgg[pre + ".weight"] = (rng.normal(size=(o, c, 3, 3)) * np.sqrt(2 / (9 * c))).astype(np.float32)
    vgg[pre + ".bias"] = 0.01 * rng.normal(size=(o,)).astype(np.float32)
  if not slices:
    vgg["classifier.0.weight"] = np.zeros((8, 4), np.float32)     # dropped (tiny stand-in)
  heads = {f"lin{i}.model.1.weight": np.abs(rng.normal(size=(1, c, 1, 1))).astype(np.float32)
           for i, c in enumerate((64, 128, 256, 512, 512))}
  np.savez(str(tmp_path / "vgg.npz"), **vgg)
  np.savez(str(tmp_path / "heads.npz"), **heads)
  return vgg, heads


@pytest.mark.parametrize("slices", [False, True])
def test_lpips_conversion_puts_every_weight_in_its_place(tmp_path, slices):
  from tdjax.losses import lpips
  vgg, heads = lpips_torch_files(tmp_path, slices)
  out = str(tmp_path / "lpips.npz")
  info = convert.convert_lpips(f"{tmp_path}/vgg.npz,{tmp_path}/heads.npz", out)
  p = lpips.load_lpips_params(out)
  assert info["params"] == sum(v.size for k, v in {**vgg, **heads}.items() if "classifier" not in k)
  conv3_2 = "net.slice3.12.weight" if slices else "features.12.weight"
  np.testing.assert_array_equal(p["features"]["conv3_2"]["kernel"],
                                vgg[conv3_2].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["lin4"]["kernel"][0, 0, :, 0],
                                heads["lin4.model.1.weight"][0, :, 0, 0])
  # a first conv checked as a forward pass: NHWC conv of an impulse = the torch (out, in) kernel
  x = np.zeros((1, 16, 16, 3), np.float32)
  x[0, 8, 8, 1] = 1.0
  w = p["features"]["conv1_1"]["kernel"]
  y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  first = vgg["net.slice1.0.weight" if slices else "features.0.weight"]
  np.testing.assert_allclose(np.asarray(y)[0, 7, 9, :], first[:, 1, 2, 0], rtol=1e-6)
  d = lpips.LPIPS().apply({"params": p}, jnp.zeros((1, 16, 16, 3)), jnp.ones((1, 16, 16, 3)) * .5)
  assert float(d[0]) > 0


def test_lpips_conversion_errors(tmp_path):
  vgg, heads = lpips_torch_files(tmp_path)
  del heads["lin2.model.1.weight"]
  heads["scaling_layer.shift"] = np.zeros((1, 3, 1, 1), np.float32)
  np.savez(str(tmp_path / "heads.npz"), **heads)
  with pytest.raises(convert.ConversionError) as e:
    convert.convert_lpips(f"{tmp_path}/vgg.npz,{tmp_path}/heads.npz", str(tmp_path / "o.npz"))
  assert "missing lin2/kernel (1, 1, 256, 1)" in str(e.value)
  assert "scaling_layer.shift is [0.0, 0.0, 0.0]" in str(e.value)
  assert not os.path.exists(str(tmp_path / "o.npz"))
  with pytest.raises(convert.ConversionError, match="more than one input file"):
    convert.convert_lpips(f"{tmp_path}/vgg.npz,{tmp_path}/vgg.npz", str(tmp_path / "o.npz"))


def test_lpips_conversion_of_a_whole_lpips_module_state_dict(tmp_path):
  """`lpips.LPIPS().state_dict()` in one file: net.sliceK.N, the scaling buffers, and each head
  twice, as linI and as the ModuleList's lins.I (one tensor, two names)."""
  from tdjax.losses import lpips
  vgg, heads = lpips_torch_files(tmp_path, slices=True)
  sd = {**vgg, **heads, **{f"lins.{k[3:]}": v for k, v in heads.items()},
        "scaling_layer.shift": np.float32(lpips.SHIFT).reshape(1, 3, 1, 1),
        "scaling_layer.scale": np.float32(lpips.SCALE).reshape(1, 3, 1, 1)}
  np.savez(str(tmp_path / "module.npz"), **sd)
  out = str(tmp_path / "lpips.npz")
  info = convert.convert_lpips(str(tmp_path / "module.npz"), out)
  assert info["params"] == sum(v.size for v in {**vgg, **heads}.values())
  sd["lins.3.model.1.weight"] = sd["lins.3.model.1.weight"] + 1
  np.savez(str(tmp_path / "module.npz"), **sd)
  with pytest.raises(convert.ConversionError,
                     match="lins.3.model.1.weight differs from lin3.model.1.weight"):
    convert.convert_lpips(str(tmp_path / "module.npz"), str(tmp_path / "o.npz"))


def _perturbed(params, seed=0):
  """Every leaf + distinct noise: initial values (LayerNorm 1 / 0, zero biases) would hide swaps."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [(np.asarray(a) + 0.1 * rng.normal(size=np.shape(a)))
                                   .astype(np.float32) for a in leaves])


# tdjax (Flax) leaves -> PyTorch state-dict leaves
def _lin(d):         # Dense: kernel (in, out) -> weight (out, in)
  return {"weight": d["kernel"].T, "bias": d["bias"]}


def _ln(d):          # tdjax LayerNorm wrapper -> torch LayerNorm
  return {"weight": d["ln"]["scale"], "bias": d["ln"]["bias"]}


def _head_proj(a):   # per-head q/k/v (D, H, hd) / (H, hd) -> Linear (H * hd, D)
  return {"weight": a["kernel"].reshape(a["kernel"].shape[0], -1).T, "bias": a["bias"].reshape(-1)}


def _out_proj(a):    # per-head out (H, hd, D) -> Linear (D, H * hd)
  return {"weight": a["kernel"].reshape(-1, a["kernel"].shape[-1]).T, "bias": a["bias"]}


def tokenizer_state_dict(params, n, enc_heads, dec_heads):
  """Reference DetailFlow tokenizer keys (docs/reference/detailflow.md 4.3) from tdjax params,
  PyTorch layout:
  Linear (out, in), q/k/v/o as full matrices, (1, N, W) query tables, (1, 1, W) mask token; plus
  the training-only keys a converter must ignore."""
  p = jax.tree.map(np.asarray, params)
  sd = {"encoder.latent_tokens": p["latent_tokens"][None],
        "encoder.refined_tokens": p["refined_tokens"][None],
        "encoder.latent_pos_embed": p["latent_pos_embed"][None],
        "decoder.mask_token": p["mask_token"][None, None],
        "decoder.latent_pos_embed": p["dec_latent_pos"][None],
        "quantize.embedding.weight": p["quantizer"]["codebook"],
        "quantize.codebook_used": np.zeros((64,), np.float32),
        "global_token_proj.0.weight": np.zeros((16, 8), np.float32),
        "repa_model.visual_model.post_layernorm.weight": np.zeros((4,), np.float32)}
  for src, dst in (("encoder.visual_model.embeddings.patch_embedding", "patch_embed"),
                   ("decoder.to_pixel.model", "to_pixel"), ("quant_conv", "quant_proj"),
                   ("post_quant_conv", "post_quant"), ("refine_conv", "refine_proj")):
    sd.update({f"{src}.{k}": v for k, v in _lin(p[dst]).items()})
  for side, pos, norm in (("encoder", "enc_pos", "enc_norm"), ("decoder", "dec_pos", "dec_norm")):
    vm = f"{side}.visual_model."
    sd[vm + "embeddings.position_embedding.weight"] = p[pos]["table"]
    sd[vm + "post_layernorm.weight"] = p[norm]["ln"]["scale"]
    sd[vm + "post_layernorm.bias"] = p[norm]["ln"]["bias"]
    for name, blk in p[side].items():
      b, pre = blk["block"], f"{vm}encoder.layers.{name.split('_')[1]}."
      mods = {f"layer_norm{i}": _ln(b[f"norm{i}"]) for i in "12"}
      mods.update({f"self_attn.{t[0]}_proj": _head_proj(b["attn"][t])
                   for t in ("query", "key", "value")})
      mods.update({"self_attn.out_proj": _out_proj(b["attn"]["out"]),
                   "mlp.fc1": _lin(b["mlp"]["fc1"]), "mlp.fc2": _lin(b["mlp"]["fc2"])})
      sd.update({f"{pre}{m}.{k}": v for m, leaves in mods.items() for k, v in leaves.items()})
  return sd


def test_detailflow_tokenizer_conversion_round_trip(tmp_path):
  """tdjax params -> reference-named state dict -> converter -> a workdir whose restored params are
  the same leaf for leaf (scanned stacks unrolled), and which encodes and decodes."""
  from tdjax import runs
  from tdjax.nn.layers import unstack_layers
  from tdjax.tokenizers import detailflow as df
  m = df.DetailFlowTokenizer(image_size=32, channels=3, patch=8, num_tokens=8, group=4,
                             enc_width=144, enc_depth=2, enc_heads=2, enc_mlp=32, dec_width=128,
                             dec_depth=2, dec_heads=2, dec_mlp=48, codebook_size=32, code_dim=4)
  params = m.init({"params": jax.random.key(0), "noise": jax.random.key(1)},
                  jnp.zeros((1, 32, 32, 3)))["params"]
  params = _perturbed(__import__("flax").linen.unbox(params))
  sd = tokenizer_state_dict(params, 8, 2, 2)
  path = str(tmp_path / "tok.npz")
  np.savez(path, **sd)
  out = str(tmp_path / "tok_workdir")
  info = convert.convert_detailflow_tokenizer(path, out, group=4)
  assert (info["patch"], info["channels"], info["image_size"], info["num_tokens"]) == (8, 3, 32, 8)
  assert (info["enc_heads"], info["dec_heads"]) == (2, 2)   # 144 / 72, 128 / 64
  config, task, state = runs.load_state(out)
  got = jax.tree.map(np.asarray, state["params"]["gen"])
  for k in ("encoder", "decoder"):
    if "layers" in got[k]:
      got[k] = unstack_layers(got[k], 2)
  assert_same_leaves(params, got)
  rec = task.reconstruct(state["params"], jnp.zeros((2, 32, 32, 3)))
  assert rec.shape == (2, 32, 32, 3) and bool(jnp.isfinite(rec).all())
  bad = dict(sd)
  del bad["refine_conv.bias"]
  bad["encoder.visual_model.encoder.layers.1.mlp.fc2.weight"] = np.zeros((144, 30), np.float32)
  bad["decoder.extra.weight"] = np.zeros((3,), np.float32)
  msg = conversion_error(tmp_path, bad, convert.convert_detailflow_tokenizer, str(tmp_path / "o2"),
                         group=4)
  assert "missing refine_proj/bias (144,)" in msg and "unexpected decoder.extra.weight" in msg
  assert "layers.1.mlp.fc2.weight: checkpoint gives (30, 144)" in msg
  with pytest.raises(convert.ConversionError, match="exists; choose a new --output"):
    convert.convert_detailflow_tokenizer(path, out, group=4)


def transdiff_state_dict(p, heads):
  """Reference TransDiff keys (docs/reference/transdiff.md 4.4) from tdjax params, PyTorch layout:
  fused qkv rows
  [q | k | v] (heads contiguous), (1, L, D) tables, (1, k, D) scale-shift tables."""
  p = jax.tree.map(np.asarray, p)
  qkv = lambda a: {k: np.concatenate([_head_proj(a[n])[k] for n in ("query", "key", "value")])
                   for k in ("weight", "bias")}
  ar, hd = p["ar"], p["head"]
  sd = {"class_emb.weight": ar["class_emb"], "fake_latent": ar["fake_latent"][None],
        "mask_token": ar["mask_token"][None], "encoder_pos_embed_learned": ar["enc_pos"][None],
        "diffusion_pos_embed_learned": ar["diff_pos"][None],
        "diffdecoder.net.diffusion_pos_embed_learned": hd["pos_embed"][None],
        "diffdecoder.net.final_layer.scale_shift_table": hd["final_scale_shift"][None]}
  groups = {"z_proj": _lin(ar["z_proj"]), "z_proj_ln": _ln(ar["z_proj_ln"]),
            "encoder_norm": _ln(ar["norm"]),
            **{f"diffdecoder.net.time_embed.time_embedder.{n}": _lin(hd["time_embed"][n])
               for n in ("linear_1", "linear_2")},
            "diffdecoder.net.time_embed.time_proj": _lin(hd["time_proj"]),
            "diffdecoder.net.cond_embed": _lin(hd["cond_embed"]),
            "diffdecoder.net.input_proj": _lin(hd["input_proj"]),
            "diffdecoder.net.final_layer.linear": _lin(hd["final_linear"])}
  for name, b in ar["blocks"].items():
    b, pre = b["block"], f"encoder_blocks.{name.split('_')[1]}."
    groups.update({pre + "norm1": _ln(b["norm1"]), pre + "norm2": _ln(b["norm2"]),
                   pre + "attn.proj": _out_proj(b["attn"]["out"]), pre + "attn.qkv": qkv(b["attn"]),
                   pre + "mlp.fc1": _lin(b["mlp"]["fc1"]), pre + "mlp.fc2": _lin(b["mlp"]["fc2"])})
  for name, b in hd["blocks"].items():
    b, pre = b["block"], f"diffdecoder.net.res_blocks.{name.split('_')[1]}."
    sd[pre + "scale_shift_table"] = b["scale_shift_table"][None]
    groups.update({pre + "norm1": _ln(b["norm1"]), pre + "norm2": _ln(b["norm_cross"]),
                   pre + "norm3": _ln(b["norm2"]), pre + "attn1.qkv": qkv(b["attn"]),
                   pre + "attn1.proj": _out_proj(b["attn"]["out"]),
                   pre + "mlp.fc1": _lin(b["mlp"]["fc1"]), pre + "mlp.fc2": _lin(b["mlp"]["fc2"])})
    for t, n in (("wq", "query"), ("wk", "key"), ("wv", "value")):
      groups[pre + f"attn2.{t}"] = _head_proj(b["cross_attn"][n])
    groups[pre + "attn2.proj"] = _out_proj(b["cross_attn"]["out"])
  for mod, leaves in groups.items():
    sd.update({f"{mod}.{k}": v for k, v in leaves.items()})
  return sd


@pytest.mark.parametrize("arg", ["size=tiny", "size=tiny,mrar=True,refs=2"])
def test_transdiff_conversion_round_trip(tmp_path, arg):
  """tdjax TransDiff params (tiny 1-step, MRAR) -> reference-named EMA state dict -> converter -> a
  workdir whose restored params match leaf for leaf; a wrong key / shape is named."""
  from tdjax import parallel, trainer
  from tdjax.nn.layers import unstack_layers
  cfg = configlib.load_config("transdiff", arg)
  setup = trainer.Setup(cfg, parallel.make_mesh({"data": -1}))
  params = _perturbed(setup.init_state()["params"])
  sd = transdiff_state_dict(params, 2)
  path = str(tmp_path / "td.npz")
  np.savez(path, **sd)
  out = str(tmp_path / "td_workdir")
  info = convert.convert_transdiff(path, out, num_heads=2)
  assert (info["width"], info["ar_depth"], info["head_depth"], info["tokens"]) == (32, 2, 2, 16)
  assert info["size"] == "tiny" and info["buffer_size"] == 4
  assert (info["mrar"], info["refs"]) == ((True, 2) if "mrar" in arg else (False, 0))
  _, task, state = runs.load_state(out)
  got = jax.tree.map(np.asarray, state["params"])
  for k in ("ar", "head"):
    if "layers" in got[k]["blocks"]:
      got[k]["blocks"] = unstack_layers(got[k]["blocks"], 2)
  assert_same_leaves(params, got)
  bad = dict(sd)
  bad["diffdecoder.net.res_blocks.1.attn2.wk.weight"] = np.zeros((32, 31), np.float32)
  bad["diffdecoder.net.res_blocks.0.norm4.weight"] = np.zeros((32,), np.float32)
  msg = conversion_error(tmp_path, bad, convert.convert_transdiff, str(tmp_path / "o"), num_heads=2)
  assert "unexpected diffdecoder.net.res_blocks.0.norm4.weight" in msg
  assert "res_blocks.1.attn2.wk.weight: checkpoint gives (31, 2, 16)" in msg


def test_transdiff_512_layout_conversion(tmp_path):
  """TransDiff-L 512's layout (docs/reference/transdiff.md 1.2, 4.4): the AR's 256 conditions
  (`diffusion_pos_embed_learned`) for the decoder's 1024 latent tokens.  Here a tiny 1-step model
  with 4 conditions for 16 latent tokens (model.cond_tokens) -> reference keys -> converter: both
  lengths and the buffer (from the AR's own table) read back, the same params restored."""
  from tdjax import parallel, trainer
  from tdjax.nn.layers import unstack_layers
  cfg = configlib.load_config("transdiff", "size=tiny")
  cfg.model.cond_tokens = 4
  setup = trainer.Setup(cfg, parallel.make_mesh({"data": -1}))
  params = _perturbed(setup.init_state()["params"])
  assert params["ar"]["diff_pos"].shape == (4, 32) and params["head"]["pos_embed"].shape == (16, 32)
  path, out = str(tmp_path / "td.npz"), str(tmp_path / "td_workdir")
  np.savez(path, **transdiff_state_dict(params, 2))
  info = convert.convert_transdiff(path, out, num_heads=2)
  assert (info["tokens"], info["cond_tokens"], info["buffer_size"], info["mrar"]) == (16, 4, 4,
                                                                                      False)
  _, task, state = runs.load_state(out)
  assert (task.L, task.ar.mask_len) == (16, 4)
  got = jax.tree.map(np.asarray, state["params"])
  for k in ("ar", "head"):
    if "layers" in got[k]["blocks"]:
      got[k]["blocks"] = unstack_layers(got[k]["blocks"], 2)
  assert_same_leaves(params, got)


def hf_siglip2_state_dict(w=8, h=2, f=12, depth=2, patch=4, grid=4, seed=0):
  """A tiny HF `Siglip2VisionModel` state dict (NaFlex: Linear patch embedding), random weights."""
  rng = np.random.default_rng(seed)
  n = lambda *s: rng.normal(size=s).astype(np.float32)
  sd = {"vision_model.embeddings.patch_embedding.weight": n(w, patch * patch * 3),
        "vision_model.embeddings.patch_embedding.bias": n(w),
        "vision_model.embeddings.position_embedding.weight": n(grid * grid, w),
        "vision_model.post_layernorm.weight": n(w), "vision_model.post_layernorm.bias": n(w),
        "vision_model.head.probe": n(1, 1, w), "vision_model.head.mlp.fc1.weight": n(f, w)}
  for i in range(depth):
    p = f"vision_model.encoder.layers.{i}."
    for name in ("layer_norm1", "layer_norm2"):
      sd[p + name + ".weight"], sd[p + name + ".bias"] = n(w), n(w)
    for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
      sd[p + f"self_attn.{name}.weight"], sd[p + f"self_attn.{name}.bias"] = n(w, w), n(w)
    sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"] = n(f, w), n(f)
    sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"] = n(w, f), n(w)
  return sd


def test_siglip2_conversion_matches_hf_linears_and_loads_as_the_teacher(tmp_path):
  """HF Linear weights are [out, in]: q = x W^T + b must equal the converted per-head kernel, and
  the written file must load, key for key and shape for shape, as the alignment teacher."""
  from tdjax.losses.alignment import ViTTeacher, load_teacher_params
  w, h = 8, 2
  from safetensors.numpy import save_file
  sd = hf_siglip2_state_dict(w=w, h=h)
  np.savez(str(tmp_path / "hf.npz"), **sd)
  save_file(sd, str(tmp_path / "model.safetensors"))       # the HF release's format
  out_path = str(tmp_path / "siglip2.npz")
  info = convert.convert_siglip2(str(tmp_path / "model.safetensors"), out_path, num_heads=h)
  assert info["blocks"] == 2
  with np.load(out_path) as f:
    out = {k: f[k] for k in f.files}
  assert not any(k.startswith("head") for k in out) and "blocks_1/mlp/fc2/kernel" in out
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, w))
  layer = "vision_model.encoder.layers.1.self_attn."
  q_hf = x @ sd[layer + "q_proj.weight"].T + sd[layer + "q_proj.bias"]
  q = (np.einsum("bw,whd->bhd", x, out["blocks_1/attn/query/kernel"])
       + out["blocks_1/attn/query/bias"])
  np.testing.assert_allclose(q.reshape(3, w), q_hf, rtol=1e-5, atol=1e-5)
  o_in = rng.normal(size=(3, h, w // h))
  o_hf = o_in.reshape(3, w) @ sd[layer + "out_proj.weight"].T + sd[layer + "out_proj.bias"]
  o = (np.einsum("bhd,hdw->bw", o_in, out["blocks_1/attn/out/kernel"])
       + out["blocks_1/attn/out/bias"])
  np.testing.assert_allclose(o, o_hf, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["patch_embed/kernel"],
                                sd["vision_model.embeddings.patch_embedding.weight"].T)
  np.testing.assert_array_equal(out["blocks_0/norm2/ln/scale"],
                                sd["vision_model.encoder.layers.0.layer_norm2.weight"])
  teacher = ViTTeacher(width=w, depth=2, num_heads=h, mlp_dim=12, patch_size=4, pos_grid=4)
  new = load_teacher_params(out_path, teacher, strict=True)
  # a file the previous converter wrote (blocks_i/ln1, ln2, attn/q, k, v, o) loads to the same tree
  old_names = {"norm1/ln": "ln1", "norm2/ln": "ln2", "attn/query": "attn/q", "attn/key": "attn/k",
               "attn/value": "attn/v", "attn/out": "attn/o"}
  old = {}
  for k, a in out.items():
    mod, _, leaf = k.rpartition("/")
    blk, _, sub = mod.partition("/")
    old[f"{blk}/{old_names[sub]}/{leaf}" if sub in old_names else k] = a
  assert "blocks_1/attn/o/kernel" in old and "blocks_0/ln1/bias" in old
  np.savez(str(tmp_path / "old.npz"), **old)
  jax.tree.map(np.testing.assert_array_equal,
               load_teacher_params(str(tmp_path / "old.npz"), teacher, strict=True), new)
  with pytest.raises(convert.ConversionError, match="exists"):
    convert.convert_siglip2(str(tmp_path / "hf.npz"), out_path, num_heads=h)
  bad = dict(sd)
  bad["vision_model.encoder.layers.0.self_attn.extra.weight"] = np.zeros((2,), np.float32)
  msg = conversion_error(tmp_path, bad, convert.convert_siglip2, str(tmp_path / "o.npz"),
                         num_heads=3)
  assert "unexpected encoder.layers.0.self_attn.extra.weight (2,)" in msg
  assert "q_proj.weight: width 8 is not divisible by 3 heads" in msg
  assert not os.path.exists(str(tmp_path / "o.npz"))
  msg = conversion_error(tmp_path, {"vision_model.post_layernorm.weight": np.ones(8)},
                         convert.convert_siglip2, str(tmp_path / "o.npz"))
  assert "not a SigLIP2 vision tower" in msg


def dino_state_dict(c=32, heads=2, depth=2, patch=16, grid=2, seed=0):
  """A tiny DINO ViT state dict (the DINO release's / timm's key names), random weights."""
  rng = np.random.default_rng(seed)
  n = lambda *s: rng.normal(size=s).astype(np.float32)
  sd = {"cls_token": n(1, 1, c), "pos_embed": n(1, 1 + grid * grid, c),
        "patch_embed.proj.weight": n(c, 3, patch, patch), "patch_embed.proj.bias": n(c),
        "norm.weight": n(c), "norm.bias": n(c)}
  for i in range(depth):
    p = f"blocks.{i}."
    for name, shape in (("norm1", (c,)), ("norm2", (c,)), ("attn.qkv", (3 * c, c)),
                        ("attn.proj", (c, c)), ("mlp.fc1", (4 * c, c)), ("mlp.fc2", (c, 4 * c))):
      sd[p + name + ".weight"], sd[p + name + ".bias"] = n(*shape), n(shape[0])
  return sd


def test_dino_conversion_puts_qkv_heads_in_place_and_loads_as_the_backbone(tmp_path):
  """DINO's fused qkv rows are [q | k | v], each head-major: q of head h = x W[hD:(h+1)D]^T + b
  must equal the converted query kernel [C, H, D]'s (:, h) (k, v alike); the file loads strictly
  as the DINO discriminator's backbone, as does one in the previous converter's layout (fused
  attn/qkv [C, 3, H, D], attn/proj, norms without '/ln'), to the same tree; the final norm is
  dropped."""
  from tdjax.losses import discriminators as D
  c, h = 32, 2
  sd = dino_state_dict(c=c, heads=h)
  np.savez(str(tmp_path / "dino.npz"), **sd)
  out_path = str(tmp_path / "backbone.npz")
  info = convert.convert_dino(str(tmp_path / "dino.npz"), out_path, num_heads=h)
  assert info["blocks"] == 2
  with np.load(out_path) as f:
    out = {k: f[k] for k in f.files}
  assert not any(k.startswith("norm") for k in out)
  x = np.random.default_rng(1).normal(size=(3, c))
  w, b = sd["blocks.1.attn.qkv.weight"], sd["blocks.1.attn.qkv.bias"]
  for part in range(3):                                   # q, k, v
    for head in range(h):
      rows = slice(part * c + head * (c // h), part * c + (head + 1) * (c // h))
      want = x @ w[rows].T + b[rows]
      name = ("query", "key", "value")[part]
      got = (x @ out[f"blocks_1/attn/{name}/kernel"][:, head]
             + out[f"blocks_1/attn/{name}/bias"][head])
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  o_in = np.random.default_rng(2).normal(size=(3, h, c // h))
  o_hf = o_in.reshape(3, c) @ sd["blocks.0.attn.proj.weight"].T
  o = np.einsum("bhd,hdc->bc", o_in, out["blocks_0/attn/out/kernel"])
  np.testing.assert_allclose(o, o_hf, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["patch_embed/kernel"],
                                sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
  disc = D.DinoDiscriminator(embed_dim=c, num_heads=h, key_depths=(0, 1), img_size=32)
  new = D.load_dino_backbone(out_path, disc, strict=True)
  old = {k: v for k, v in out.items() if not k.startswith("blocks_")}   # the previous converter's
  for i in range(2):
    p, b = f"blocks.{i}.", f"blocks_{i}/"
    old[b + "attn/qkv/kernel"] = sd[p + "attn.qkv.weight"].reshape(3, h, c // h, c).transpose(3, 0, 1, 2)
    old[b + "attn/qkv/bias"] = sd[p + "attn.qkv.bias"].reshape(3, h, c // h)
    old[b + "attn/proj/kernel"] = sd[p + "attn.proj.weight"].T.reshape(h, c // h, c)
    old[b + "attn/proj/bias"] = sd[p + "attn.proj.bias"]
    for name in ("norm1", "norm2"):
      old[b + name + "/scale"], old[b + name + "/bias"] = sd[p + name + ".weight"], sd[p + name + ".bias"]
    for name in ("fc1", "fc2"):
      old[b + f"mlp/{name}/kernel"] = sd[p + f"mlp.{name}.weight"].T
      old[b + f"mlp/{name}/bias"] = sd[p + f"mlp.{name}.bias"]
  np.savez(str(tmp_path / "old.npz"), **old)
  jax.tree.map(np.testing.assert_array_equal,
               D.load_dino_backbone(str(tmp_path / "old.npz"), disc, strict=True), new)
  with pytest.raises(convert.ConversionError, match="exists"):
    convert.convert_dino(str(tmp_path / "dino.npz"), out_path, num_heads=h)
  bad = dict(sd, **{"blocks.0.attn.extra.weight": np.zeros((2,), np.float32)})
  msg = conversion_error(tmp_path, bad, convert.convert_dino, str(tmp_path / "o.npz"), num_heads=5)
  assert "unexpected blocks.0.attn.extra.weight (2,)" in msg
  assert "blocks.0.attn.qkv.weight: 96 rows are not 3 x 5 heads" in msg
  assert not os.path.exists(str(tmp_path / "o.npz"))
  msg = conversion_error(tmp_path, {"norm.weight": np.ones(8)}, convert.convert_dino,
                         str(tmp_path / "o.npz"))
  assert "not a DINO ViT state dict" in msg


def test_teacher_from_a_vit_classifier_run(tmp_path):
  """--kind teacher: a configs/classifier.py:arch=vit run (trained under the mesh) -> the alignment
  teacher .npz whose tower, mean-pooled, gives exactly the classifier's features; its dims read
  back from the file; an existing output is never replaced."""
  from tdjax import runs, trainer
  from tdjax.losses import alignment
  wd = str(tmp_path / "vit")
  trainer.train_and_evaluate(configlib.load_config("classifier", "arch=vit,size=tiny,steps=3,batch=8"),
                             wd)
  out = str(tmp_path / "teacher.npz")
  info = convert.convert_teacher(wd, out)
  dims = alignment.teacher_shape(out)
  assert dims == dict(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=8, pos_grid=4)
  assert info["params"] == sum(np.load(out)[k].size for k in np.load(out).files)
  tower = alignment.ViTTeacher(**dims)
  tp = alignment.load_teacher_params(out, tower)
  _, task, state = runs.load_state(wd)
  x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 1)) * 2 - 1
  _, feats = task.features(jax.device_get(state["params"]), x)
  pooled = alignment.teacher_features(tower, tp, jnp.repeat(x, 3, -1)).mean(1)
  np.testing.assert_allclose(pooled, feats, rtol=1e-5, atol=1e-6)
  with pytest.raises(convert.ConversionError, match="exists; choose a new --output"):
    convert.convert_teacher(wd, out)
  with pytest.raises(ValueError, match="arch='vit', size='wide'"):
    configlib.load_config("classifier", "arch=vit,size=wide")


def mar_diffloss_shapes(c=4, w=16, dc=6, depth=2, prefix="diffloss.net."):
  """{key: shape} of MAR's SimpleMLPAdaLN (in c, width w, condition dc, out 2 c: MAR's learned
  variance) under `prefix` (`diffloss.net.` in its .pth checkpoints)."""
  linears = {"time_embed.mlp.0": (w, 256), "time_embed.mlp.2": (w, w), "cond_embed": (w, dc),
             "input_proj": (w, c), "final_layer.adaLN_modulation.1": (2 * w, w),
             "final_layer.linear": (2 * c, w)}
  for i in range(depth):
    linears.update({f"res_blocks.{i}.mlp.0": (w, w), f"res_blocks.{i}.mlp.2": (w, w),
                    f"res_blocks.{i}.adaLN_modulation.1": (3 * w, w),
                    f"res_blocks.{i}.in_ln": (w,)})
  return {f"{prefix}{name}.{leaf}": shape if leaf == "weight" else shape[:1]
          for name, shape in linears.items() for leaf in ("weight", "bias")}


def mar_diffloss_state_dict(c=4, w=16, dc=6, depth=2, seed=0, prefix="diffloss.net."):
  """A tiny MAR SimpleMLPAdaLN state dict, random weights (LayerNorm weights around 1)."""
  rng = np.random.default_rng(seed)
  return {k: (("in_ln.weight" in k) + 0.3 * rng.normal(size=s)).astype(np.float32)
          for k, s in mar_diffloss_shapes(c, w, dc, depth, prefix).items()}


def mar_diffloss_forward(sd, x, t, z, prefix="diffloss.net."):
  """SimpleMLPAdaLN's forward written from its equations in float64 numpy: x [N, c], t [N], z
  [N, dc] -> [N, 2c]."""
  p = {k[len(prefix):]: np.asarray(v, np.float64) for k, v in sd.items()}
  lin = lambda a, m: a @ p[m + ".weight"].T + p[m + ".bias"]
  silu = lambda a: a / (1 + np.exp(-a))

  def ln(a, m=None):
    a = (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-6)
    return a * p[m + ".weight"] + p[m + ".bias"] if m else a

  freqs = np.exp(-np.log(10000) * np.arange(128) / 128)
  args = np.asarray(t, np.float64)[:, None] * freqs
  temb = lin(silu(lin(np.concatenate([np.cos(args), np.sin(args)], -1), "time_embed.mlp.0")),
             "time_embed.mlp.2")
  y, h = temb + lin(z, "cond_embed"), lin(x, "input_proj")
  for i in range(len({k.split(".")[1] for k in p if k.startswith("res_blocks.")})):
    r = f"res_blocks.{i}."
    shift, scale, gate = np.split(lin(silu(y), r + "adaLN_modulation.1"), 3, -1)
    u = lin(silu(lin(ln(h, r + "in_ln") * (1 + scale) + shift, r + "mlp.0")), r + "mlp.2")
    h = h + gate * u
  shift, scale = np.split(lin(silu(y), "final_layer.adaLN_modulation.1"), 2, -1)
  return lin(ln(h) * (1 + scale) + shift, "final_layer.linear")


def test_mar_head_conversion_matches_simplemlpadaln_equations(tmp_path):
  """--kind mar_head: the diffloss.net.* keys of a MAR state dict (the masked-AR keys beside them
  are not the head's and stay behind) -> the MLPHead .npz, whose head gives SimpleMLPAdaLN's output
  (t, as MAR feeds it, the integer step 0..999); every bad key named; no output replaced."""
  c, w, dc, depth = 4, 16, 6, 2
  sd = mar_diffloss_state_dict(c, w, dc, depth)
  mar = dict(sd, **{"encoder_blocks.0.norm1.weight": np.ones(8, np.float32),
                    "diffusion_pos_embed_learned": np.zeros((1, 4, 8), np.float32)})
  np.savez(str(tmp_path / "mar.npz"), **mar)
  out = str(tmp_path / "head.npz")
  info = convert.convert_mar_head(str(tmp_path / "mar.npz"), out)
  assert {k: info[k] for k in ("width", "depth", "in_channels", "out_channels", "z_channels")} == \
      dict(width=w, depth=depth, in_channels=c, out_channels=2 * c, z_channels=dc)
  assert info["params"] == sum(v.size for v in sd.values()) and info["head_size"] == ""
  head, params = convert.load_mar_head(out)
  rng = np.random.default_rng(1)
  x, z = rng.normal(size=(5, c)), rng.normal(size=(5, dc))
  t = np.array([0, 1, 250, 998, 999])
  got = head.apply({"params": params}, jnp.asarray(x, jnp.float32)[:, None], jnp.asarray(t),
                   jnp.asarray(z, jnp.float32)[:, None])[:, 0]
  np.testing.assert_allclose(np.asarray(got), mar_diffloss_forward(sd, x, t, z), rtol=1e-4,
                             atol=1e-4)
  bare = {k[len("diffloss.net."):]: v for k, v in sd.items()}     # a SimpleMLPAdaLN state dict
  np.savez(str(tmp_path / "bare.npz"), **bare)
  convert.convert_mar_head(str(tmp_path / "bare.npz"), str(tmp_path / "bare_head.npz"))
  assert_same_leaves(params, convert.load_mar_head(str(tmp_path / "bare_head.npz"))[1])
  with pytest.raises(convert.ConversionError, match="exists; choose a new --output"):
    convert.convert_mar_head(str(tmp_path / "mar.npz"), out)
  bad = dict(sd)
  del bad["diffloss.net.res_blocks.1.mlp.2.bias"]
  bad["diffloss.net.res_blocks.0.in_ln.weight"] = np.ones(w + 1, np.float32)
  bad["diffloss.net.res_blocks.0.extra.weight"] = np.ones(3, np.float32)
  msg = conversion_error(tmp_path, bad, convert.convert_mar_head, str(tmp_path / "bad_out.npz"))
  assert "missing res_1_fc2/bias (16,)" in msg, msg
  assert "unexpected diffloss.net.res_blocks.0.extra.weight (3,)" in msg, msg
  assert "diffloss.net.res_blocks.0.in_ln.weight: checkpoint gives (17,)" in msg, msg
  assert not os.path.exists(str(tmp_path / "bad_out.npz"))


def test_mar_head_sizes_are_the_config_head_sizes():
  """MAR-B / L / H's released heads (1024 x 6, 1280 x 8, 1536 x 12): the converter names the size
  of a checkpoint of those dims, and configs/transdiff.py:head=mlp,head_size=NAME (the default of
  sizes B / L / H) builds a head with exactly the converted parameter tree; the demo sizes keep
  2 x width x 3; head_size without head=mlp is refused."""
  from tdjax.generators.heads import MAR_HEAD_SIZES, make_head
  assert MAR_HEAD_SIZES == {"mar_b": (1024, 6), "mar_l": (1280, 8), "mar_h": (1536, 12)}
  for (name, (w, depth)), size in zip(MAR_HEAD_SIZES.items(), ("B", "L", "H")):
    sd = {k: np.broadcast_to(np.float32(0), s)                # the shapes without the memory
          for k, s in mar_diffloss_shapes(16, w, 16, depth).items()}
    dims = convert.mar_head_dims(convert.mar.mar_head_state_dict(sd))
    assert (dims["width"], dims["depth"], dims["head_size"]) == (w, depth, name)
    _, expected = convert.mar.mar_head_expected(dims)
    for arg in (f"size={size},head=mlp", f"size=demo,head=mlp,head_size={name}"):
      cfg = configlib.load_config("transdiff", arg)
      assert (cfg.head.width, cfg.head.depth) == (w, depth), arg
      head = make_head(cfg.head, 2 * 16)
      tree = jax.eval_shape(lambda: __import__("flax").linen.unbox(head.init(
          jax.random.key(0), jnp.zeros((1, 1, 16)), jnp.zeros((1,)), jnp.zeros((1, 1, 16)))
          ["params"]))
      assert jax.tree.map(lambda a: a.shape, tree) == jax.tree.map(lambda a: a.shape, expected)
  cfg = configlib.load_config("transdiff", "size=demo,head=mlp")
  assert (cfg.head.width, cfg.head.depth) == (256, 3)
  with pytest.raises(ValueError, match="head_size='mar_b' names one of MAR's MLP heads: it needs "
                                       "head=mlp"):
    configlib.load_config("transdiff", "size=demo,head_size=mar_b")
  with pytest.raises(ValueError, match="head_size='mar_x': expected one of"):
    configlib.load_config("transdiff", "size=demo,head=mlp,head_size=mar_x")


def test_a_file_without_a_mar_head_is_one_line(tmp_path):
  """`python -m tdjax.convert --kind mar_head` on a VAE state dict: one line naming what is
  missing and the kind the file looks like; nothing written."""
  from test_bad_input import one_line, run
  np.savez(tmp_path / "vae.npz", **{"encoder.down.0.block.0.conv1.weight": np.zeros((2, 1, 3, 3)),
                                    "quant_conv.weight": np.zeros((2, 2, 1, 1))})
  r = run("tdjax.convert", "--kind=mar_head", f"--input={tmp_path / 'vae.npz'}",
          f"--output={tmp_path / 'head.npz'}")
  one_line(r, "tdjax.convert", 2, "looks like a mar_vae checkpoint, not mar_head",
           "not a MAR checkpoint: no diffloss.net.* keys")
  assert sorted(os.listdir(tmp_path)) == ["vae.npz"]


def test_reading_a_full_state_dict_shows_a_progress_bar(tmp_path, monkeypatch):
  """tdjax.sample's tqdm style: a bar over the tensors being read and cast, from 64 tensors on (a
  checkpoint), none for a handful."""
  from tdjax.convert import common
  bars = []
  real = common.tqdm
  monkeypatch.setattr(common, "tqdm", lambda it, **kw: bars.append(kw) or real(it, **kw))
  for n in (70, 3):
    np.savez(str(tmp_path / f"sd{n}.npz"), **{f"w{i}": np.ones(2, np.float32) for i in range(n)})
    assert len(convert.read_state_dict(str(tmp_path / f"sd{n}.npz"))) == n
  assert [(b["desc"], b["total"], b["unit"], b["disable"]) for b in bars] == [
      ("reading sd70.npz", 70, "tensor", False), ("reading sd3.npz", 3, "tensor", True)]

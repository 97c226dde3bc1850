"""tdjax against recorded outputs of the reference repositories' own code, in CI (no torch needed).

tests/parity/record.py ran the reference modules (MAR's SimpleMLPAdaLN, DetailFlow's GPT with
both group layouts and its VQ tokenizer, TransDiff's diffusion decoder and MRAR AR transformer) at
tiny sizes with seeded random weights on fixed inputs and saved
their state dicts (official key names), inputs and outputs in tests/fixtures/parity/*.npz.  Here
each state dict goes through tdjax's converter and the tdjax module must give the recorded outputs
at the tolerances of the live reference tests (tests/test_reference_repos.py,
tests/test_reference_transdiff.py), which need torch and the checkouts.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tdjax import configlib, convert
from tdjax.generators import next_detail as nd
from tdjax.generators.heads import make_head
from tdjax.tasks.transdiff import TransDiffTask
from tdjax.tokenizers.detailflow import build_tokenizer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "parity")


def load(name):
  """(state dict as float32, inputs, outputs, meta) of fixture `name`."""
  path = os.path.join(FIXTURES, name + ".npz")
  with np.load(path, allow_pickle=False) as f:
    part = lambda p: {k[len(p):]: f[k] for k in f.files if k.startswith(p)}
    sd = {k: v.astype(np.float32) for k, v in part("sd/").items()}
    return sd, part("in/"), part("out/"), json.loads(str(f["meta"]))


def close(got, want, tol):
  """rtol = tol, atol = tol x the largest |want| (as the reference tests' `_close`)."""
  want = np.asarray(want)
  assert np.asarray(got).shape == want.shape
  assert float(np.abs(want).max()) > 0.1               # random weights: the outputs are not ~0
  np.testing.assert_allclose(np.asarray(got), want, rtol=tol,
                             atol=tol * max(1.0, float(np.abs(want).max())))


def test_fixtures_are_small_and_complete():
  sizes = {n: os.path.getsize(os.path.join(FIXTURES, n)) for n in os.listdir(FIXTURES)
           if n.endswith(".npz")}
  assert set(sizes) == {"mar_head.npz", "detailflow_gpt.npz", "transdiff_decoder.npz",
                        "detailflow_gpt_parallel.npz", "detailflow_tokenizer.npz",
                        "transdiff_mrar.npz"}
  assert max(sizes.values()) < 200 * 1024, sizes


def test_mar_head_matches_recorded_simplemlpadaln(tmp_path):
  """MAR's checkpoint keys (diffloss.net.*) -> `convert_mar_head` (the .npz it writes) ->
  MLPHead(x, t, c) = the reference's output for the integer steps 0..999."""
  sd, i, o, meta = load("mar_head")
  np.savez(str(tmp_path / "mar.npz"), **sd)
  info = convert.convert_mar_head(str(tmp_path / "mar.npz"), str(tmp_path / "head.npz"))
  assert (info["width"], info["depth"]) == (meta["width"], meta["depth"])
  head, params = convert.load_mar_head(str(tmp_path / "head.npz"))
  got = head.apply({"params": params}, jnp.asarray(i["x"])[:, None], jnp.asarray(i["t"]),
                   jnp.asarray(i["c"])[:, None])[:, 0]
  close(got, o["out"], 1e-5)


@pytest.mark.parametrize("name", ["detailflow_gpt", "detailflow_gpt_parallel"])
def test_detailflow_gpt_matches_recorded_logits(name):
  """DetailFlow's GPT state dict -> `detailflow_gpt_params` -> NextDetailTransformer's
  teacher-forced logits on the recorded codes and labels (the null class among them), with the
  reference's default causal_num (first group token-causal) and with causal_num=0 (every group
  parallel: the layout and mask of `nd.layout_ids(..., 0)`)."""
  sd, i, o, m = load(name)
  causal_num = m.get("causal_num")
  dims = convert.gpt_dims(sd)
  assert (dims["group_size"], dims["vocab_size"], dims["num_classes"]) == (m["group"], m["vocab"],
                                                                          m["classes"])
  n, g = m["tokens"], m["group"]
  model = nd.NextDetailTransformer(vocab_size=m["vocab"], num_tokens=n, group_size=g,
                                   num_classes=m["classes"], dim=m["dim"], depth=m["n_layer"],
                                   num_heads=m["n_head"], mlp_dim=dims["mlp_dim"],
                                   class_dropout=0.0, token_dropout=0.0, dropout=0.0, scan=False,
                                   causal_num=causal_num)
  expected = jax.eval_shape(lambda: nn.unbox(nd.init_params(model, jax.random.key(0))))
  params = convert.detailflow_gpt_params(sd, m["n_layer"], m["n_head"], expected)
  ids = nd.layout_ids(jnp.asarray(nd.next_detail_inputs(i["codes"], g)), n, g, causal_num)
  got = model.apply({"params": params}, ids, jnp.asarray(i["labels"]))
  close(got, o["logits"], 1e-4)


def test_transdiff_decoder_matches_recorded_velocities():
  """TransDiff's decoder keys (diffdecoder.net.*) -> `transdiff_params` -> the attention head of
  configs/transdiff.py (tiny, at the recorded width, depth and heads) on (x_t, 1000 t, c)."""
  sd, i, o, m = load("transdiff_decoder")
  cfg = ml_collections.ConfigDict(dict(configlib.load_config("transdiff", "size=tiny").head))
  cfg.update(dict(width=m["width"], depth=m["depth"], num_heads=m["num_heads"],
                  max_len=m["tokens"]))
  head = make_head(cfg, m["channels"])
  x, t, c = (jnp.asarray(i[k]) for k in ("x", "t", "cond"))
  expected = {"head": jax.eval_shape(lambda: nn.unbox(head.init(jax.random.key(0), x, t, c))
                                     ["params"])}
  params = convert.transdiff_params(sd, expected, m["num_heads"])["head"]
  got = head.apply({"params": params}, x, t, c)
  close(got, o["velocity"], 1e-4)


def test_detailflow_tokenizer_matches_recorded_codes_and_decodings():
  """DetailFlow's tokenizer state dict -> `detailflow_tokenizer_params` -> DetailFlowTokenizer
  as `convert --kind detailflow_tokenizer` configures it (dims off the weights; unrolled, not
  written to a workdir: that takes CI seconds): the quant_conv latents of the causal encoder,
  their codes and z_q in the l2-normalised codebook, and the decodings of the recorded z_q's
  first t tokens at resolution res (also in the masked form: all N tokens, those at >= t masked
  out)."""
  sd, i, o, m = load("detailflow_tokenizer")
  dims = convert.tokenizer_dims(sd)
  assert (dims["image_size"], dims["patch"], dims["num_tokens"]) == (m["image"], m["patch"],
                                                                     m["tokens"])
  config = configlib.load_config("detailflow_tokenizer", f"size=full,tokens={m['tokens']},"
                                 f"group={m['group']},image_size={m['image']}")
  config.model.update({k: dims[k] for k in ("enc_width", "enc_depth", "enc_mlp", "dec_width",
                                            "dec_depth", "dec_mlp", "patch", "codebook_size",
                                            "code_dim")})
  config.model.update(dict(enc_heads=m["enc_heads"], dec_heads=m["dec_heads"], scan=False))
  model = build_tokenizer(config.model, dims["image_size"], dims["channels"])
  x = jnp.asarray(i["images"], jnp.float32)
  expected = jax.eval_shape(lambda: nn.unbox(model.init(
      {"params": jax.random.key(0), "noise": jax.random.key(1)}, x[:1]))["params"])
  gen = convert.detailflow_tokenizer_params(sd, expected, m["enc_heads"], m["dec_heads"])
  run = jax.jit(lambda p, *a, method: model.apply({"params": p}, *a, method=method),
                static_argnames="method")
  z = run(gen, x, method="encode")
  close(z, o["z"], 1e-4)
  q = run(gen, z, method="quantize")
  np.testing.assert_array_equal(np.asarray(q["indices"]).reshape(o["indices"].shape), o["indices"])
  close(q["z_q"], o["z_q"], 1e-5)
  zq = jnp.asarray(o["z_q"])
  for t, res in m["decodes"]:
    want = o[f"decode_{t}_{res}"]
    close(model.apply({"params": gen}, zq[:, :t], res, method="decode"), want, 1e-4)
    close(model.apply({"params": gen}, zq, res, t, method="decode"), want, 1e-4)


def test_transdiff_mrar_matches_recorded_conditions():
  """TransDiff's MRAR AR keys -> `transdiff_params` -> the AR of configs/transdiff.py (tiny,
  mrar=True, refs=3) on the recorded labels and reference images (patchified by the task's
  `_refs`): the conditions with 3 references, and with 1 and 0 (the recorded rows' block-causal
  prefixes: the reference gives the same for those inputs, record.py checks it)."""
  sd, i, o, m = load("transdiff_mrar")
  cfg = configlib.load_config("transdiff", f"size=tiny,mrar=True,refs={m['refs']}")
  cfg.latent.update(dict(kind="cached", grid=m["grid"], channels=m["channels"]))
  cfg.model.update(dict(num_classes=m["classes"], buffer_size=m["block"], batch_mul=2,
                        ar_depth=m["ar_depth"]))
  task = TransDiffTask(cfg)
  expected = {"ar": jax.eval_shape(lambda: nn.unbox(task.init(jax.random.key(0))[0]))["ar"]}
  params = convert.transdiff_params(sd, expected, m["num_heads"])["ar"]
  imgs = np.asarray(i["images"], np.float32)                     # [B, refs, h, w, C]
  imgs = np.concatenate([imgs, np.zeros_like(imgs[:, :1])], 1)   # + the image they precede
  refs = task._refs(jnp.asarray(imgs))
  want = o["conditions"]
  for k in (m["refs"], 1, 0):
    got = task.ar.apply({"params": params}, jnp.asarray(i["labels"]), refs[:, :k])
    close(got, want[:, :m["block"] * (k + 1)], 1e-5)


@pytest.mark.parametrize("name,key", [("mar_head", "diffloss.net.res_blocks.1.mlp.2.weight"),
                                      ("detailflow_gpt", "layers.1.attention.wo.weight"),
                                      ("detailflow_gpt_parallel", "layers.1.attention.wo.weight"),
                                      ("transdiff_decoder", "diffdecoder.net.cond_embed.weight"),
                                      ("detailflow_tokenizer", "encoder.visual_model.encoder."
                                                               "layers.1.self_attn.q_proj.weight"),
                                      ("transdiff_mrar", "encoder_blocks.1.attn.qkv.weight")])
def test_fixtures_hold_the_official_key_names(name, key):
  sd, _, _, _ = load(name)
  assert key in sd, sorted(sd)[:8]

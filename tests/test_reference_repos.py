"""tdjax against the model code of the reference repositories themselves (ByteFlow-AI/DetailFlow,
TransDiff/TransDiff, LTH14/mar), imported from checkouts at test time; nothing of theirs is copied
here.

The reference repositories are not packages, so these tests import their files from checkouts
named by an environment variable and skip without it (and without torch), as in CI:

    git clone https://github.com/ByteFlow-AI/DetailFlow   $REFS/DetailFlow
    git clone https://github.com/TransDiff/TransDiff      $REFS/TransDiff
    git clone https://github.com/LTH14/mar                $REFS/mar
    pip install torch timm ruamel.yaml "transformers>=4.49,<4.54" diffusers   # what they import
    TDJAX_REFERENCE_REPOS=$REFS python -m pytest tests/test_reference_repos.py

Each reference module is built at a tiny size with random weights, its `state_dict()` goes through
`tdjax.convert` as an official checkpoint would, and the outputs must agree: the layout (class /
code / placeholder positions), the 2D RoPE table, the group-causal mask and the samplers are then
the reference's own, not a reading of them.
"""

import os
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdjax import convert
from tdjax.generators import next_detail as nd

torch = pytest.importorskip("torch")
REFS = os.environ.get("TDJAX_REFERENCE_REPOS", "")
if not REFS:
  pytest.skip("TDJAX_REFERENCE_REPOS (a folder with DetailFlow/, TransDiff/ and mar/ checkouts) "
              "is not set", allow_module_level=True)


def reference_module(repo: str, module: str):
  """Imports `module` from the checkout $TDJAX_REFERENCE_REPOS/`repo` (skips if it is absent)."""
  from tdjax.bench_reference import import_from_checkout
  try:
    return import_from_checkout(REFS, repo, module)
  except FileNotFoundError as e:
    pytest.skip(str(e))


def randomize(module, seed: int, scale: float = 0.3):
  """Every parameter ~ N(0, scale^2), norm weights ~ 1 + N(0, scale^2); eval mode."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = scale * torch.randn(p.shape, generator=g)
      p.copy_(1.0 + noise if "norm" in name and p.ndim == 1 else noise)
  return module.eval()


def state_dict(module):
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------
# DetailFlow's GPT (autoregressive/models/gpt.py, generate.py)
# ------------------------------------------------------------------------------------------------

N, G, V, C = 16, 4, 64, 10          # tokens, group, vocabulary, classes
GPT = dict(dim=64, n_layer=2, n_head=4, multiple_of=32)


@pytest.fixture(scope="module", params=[None, 0], ids=["causal_num=g", "causal_num=0"])
def gpt_pair(request):
  """(reference Transformer, tdjax NextDetailTransformer, its params) with the same weights; with
  the reference's default causal_num (g) and with 0 (every group parallel, Table 2's row)."""
  gpt = reference_module("DetailFlow", "autoregressive.models.gpt")
  args = gpt.ModelArgs(**GPT, vocab_size=V, num_classes=C, block_size=N, group_size=G,
                       causal_num=request.param,
                       cls_token_num=1, token_dropout_p=0.0, resid_dropout_p=0.0,
                       ffn_dropout_p=0.0, class_dropout_prob=0.1)
  torch.manual_seed(0)
  ref = randomize(gpt.Transformer(args), seed=1)
  sd = state_dict(ref)
  dims = convert.gpt_dims(sd)
  assert (dims["group_size"], dims["num_classes"], dims["vocab_size"]) == (G, C, V)
  model = nd.NextDetailTransformer(vocab_size=V, num_tokens=N, group_size=G, num_classes=C,
                                   dim=GPT["dim"], depth=GPT["n_layer"], num_heads=GPT["n_head"],
                                   mlp_dim=dims["mlp_dim"], class_dropout=0.0, token_dropout=0.0,
                                   dropout=0.0, scan=False, causal_num=request.param)
  expected = jax.eval_shape(lambda: __import__("flax").linen.unbox(
      nd.init_params(model, jax.random.key(0))))
  params = convert.detailflow_gpt_params(sd, GPT["n_layer"], GPT["n_head"], expected)
  return ref, model, params


def test_gpt_teacher_forced_logits_match_detailflow(gpt_pair):
  """The training forward: [cls, z_0..z_{g-1}, spe_0..spe_{g-2}, z_g..z_{N-g-1}] under the
  reference's group-causal mask and 2D RoPE -> logits of all N positions."""
  ref, model, params = gpt_pair
  rng = np.random.default_rng(0)
  codes = rng.integers(0, V, (3, N))
  labels = np.array([0, 7, C])                       # C = the null class
  with torch.no_grad():
    want, _ = ref(torch.from_numpy(codes[:, :N - G]), torch.from_numpy(labels),
                  basic_group_inference=True)
  ids = nd.layout_ids(jnp.asarray(nd.next_detail_inputs(codes, G)), N, G, model.causal_num)
  got = model.apply({"params": params}, ids, jnp.asarray(labels))
  assert got.shape == tuple(want.shape) == (3, N, V)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), rtol=1e-4, atol=1e-4)


def test_gpt_prefixes_match_detailflow(gpt_pair):
  """Shorter inputs, as the reference sampler feeds them (1 + k codes, then whole groups with the
  placeholders): the same logits on every position both compute."""
  ref, model, params = gpt_pair
  codes = np.random.default_rng(1).integers(0, V, (2, N))
  labels = np.array([3, 4])
  full = model.apply({"params": params},
                     nd.layout_ids(jnp.asarray(codes[:, :N - G]), N, G, model.causal_num),
                     jnp.asarray(labels))
  # causal_num 0: no token-causal rows, so a prefix ending inside a group (k % g != 0) is cut
  # inside a bidirectional block and its last rows see fewer codes than in the full forward; and
  # the class-only prefill (k = 0) lacks the placeholders block 0 holds (generate_group_par
  # overwrites that draw with group 0's, so its sampler never uses it: checked below)
  for k in (0, 1, G - 1, G, 2 * G, 3 * G) if model.c else (G, 2 * G, 3 * G):
    with torch.no_grad():
      want, _ = ref(torch.from_numpy(codes[:, :k]) if k else None, torch.from_numpy(labels),
                    torch.arange(1), basic_group_inference=True)
    q = want.shape[1]
    np.testing.assert_allclose(np.asarray(full[:, :q]), want.numpy(), rtol=1e-4, atol=1e-4,
                               err_msg=f"{k} codes in")


@pytest.mark.parametrize("cfg,gradual", [(1.5, False), (3.0, False), (3.0, True)])
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_group_parallel_sampling_matches_detailflow(gpt_pair, cfg, gradual, use_cache):
  """`generate_group_par` (first c codes one at a time, then g per step from the last g positions,
  constant or gradual CFG on logits) with argmax picks = tdjax's sampler with top_k = 1, cached or
  not."""
  ref, model, params = gpt_pair
  generate = reference_module("DetailFlow", "autoregressive.models.generate")
  labels = np.array([0, 1, 5, 9])
  with torch.no_grad():
    want = generate.generate_group_par(ref, torch.from_numpy(labels), N, cfg_scale=cfg,
                                       gradual_cfg=gradual, sample_logits=False, temperature=1.0,
                                       top_k=0, top_p=1.0)
  got = nd.sample(model, params, jnp.asarray(labels), jax.random.key(0), cfg=cfg, top_k=1,
                  cfg_schedule="gradual" if gradual else "constant", use_cache=use_cache)
  np.testing.assert_array_equal(np.asarray(got), want.numpy())



@pytest.mark.parametrize("correction_prob", [0.0, 1.0])
def test_ar_training_loss_matches_train_c2i(gpt_pair, correction_prob):
  """The AR task's loss on a codes batch (clean, ar_input, ar_label) = train_c2i's: its
  `generate_z_input_target` (clean pair, or with probability p the self-correction pair: input
  ar_input[:N-g], target ar_label), then the GPT's mean cross-entropy over all N positions.
  Dropouts off on both sides (the reference model in eval mode computes the same loss)."""
  from unittest import mock
  from tdjax import configlib
  from tdjax.tasks.next_detail import NextDetailTask
  ref, model, params = gpt_pair
  with mock.patch.dict(sys.modules, {"wandb": mock.MagicMock()}):   # imported, unused here
    train_c2i = reference_module("DetailFlow", "autoregressive.train.train_c2i")
  rng = np.random.default_rng(2)
  triplets = rng.integers(0, V, (4, N, 3))                # [B, N, (clean, input, label)]
  labels = rng.integers(0, C, 4)
  z_input, z_target = train_c2i.generate_z_input_target(torch.from_numpy(triplets), G,
                                                        correction_prob)
  with torch.no_grad():
    _, want = ref(z_input, torch.from_numpy(labels), targets=z_target,
                  basic_group_inference=True)
  config = configlib.load_config("next_detail", f"size=demo,tokens={N},group={G},vocab={V},"
                                                  f"classes={C}")
  config.model.update(dict(dim=model.dim, depth=model.depth, num_heads=model.num_heads,
                           mlp_dim=model.mlp_dim, class_dropout=0.0, token_dropout=0.0,
                           dropout=0.0, scan=False, causal_num=model.c))
  config.loss.correction_prob = correction_prob
  task = NextDetailTask(config)
  batch = {"clean": triplets[..., 0], "ar_input": triplets[..., 1], "ar_label": triplets[..., 2],
           "label": labels}
  got, _ = task.loss(params, {}, jax.tree.map(jnp.asarray, batch), jax.random.key(0), 0)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, 1.0), (0.7, 0, 0.8), (1.3, 20, 0.5),
                                                     (1.0, 0, 0.999), (1.0, V, 1.0)])
def test_sampling_filters_match_detailflow(temperature, top_k, top_p):
  """Temperature, top-k and nucleus filtering (`sample_group`'s `top_k_top_p_filtering`, HF's
  rule: the first token past the mass `top_p` stays) -> the same sampling distribution."""
  generate = reference_module("DetailFlow", "autoregressive.models.generate")
  logits = np.random.default_rng(3).normal(0, 2, (6, V)).astype(np.float32)
  t = torch.from_numpy(logits) / max(temperature, 1e-5)
  if top_k > 0 or top_p < 1.0:
    t = generate.top_k_top_p_filtering(t, top_k=top_k, top_p=top_p)
  want = torch.softmax(t, dim=-1).numpy()
  got = jax.nn.softmax(nd.filter_logits(jnp.asarray(logits), temperature, top_k, top_p), axis=-1)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)

# ------------------------------------------------------------------------------------------------
# DetailFlow's resolution schedule (modelling/detail_token.py)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("R,N,g,patch", [(256, 128, 8, 16), (256, 64, 4, 16), (512, 256, 8, 16),
                                         (32, 32, 4, 4)])
def test_prefix_resolutions_match_resolution_degradation(R, N, g, patch):
  """R(t) and the decoder resolution of every prefix length t training can draw: the reference's
  `token2res` / `token2dec_out_res` tables (alpha = 1.5, min decoder resolution = the patch)."""
  from tdjax.tokenizers import resolution
  dt = reference_module("DetailFlow", "modelling.detail_token")
  ref = dt.ResolutionDegradation(R, N, g, None, 1.5, enc_patch_size=patch, dec_patch_size=patch,
                                 min_dec_res=patch)
  plan = resolution.PrefixPlan(N, g, R, patch, alpha=1.5, degrade_p=0.2)
  assert sorted(ref.token2res) == plan.ts[:-1] + ([N] if N not in plan.ts[:-1] else [])
  assert {t: resolution.resolution_for_prefix(t, N, R) for t in ref.token2res} == ref.token2res
  assert {t: plan.dec_of[t] for t in ref.token2res} == ref.token2dec_out_res


def test_degraded_targets_match_resize_imgs():
  """The target of prefix t: area down to R(t), bicubic up to the decoder resolution, as the
  reference's `get_input_output_img` resizes (tdjax in float32, torch in float64)."""
  from tdjax.tokenizers import resolution
  dt = reference_module("DetailFlow", "modelling.detail_token")
  R, N, g, patch = 64, 32, 4, 8
  ref = dt.ResolutionDegradation(R, N, g, None, 1.5, enc_patch_size=patch, dec_patch_size=patch,
                                 min_dec_res=patch)
  x = np.random.default_rng(0).uniform(-1, 1, (2, R, R, 3)).astype(np.float32)
  x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float64))
  for t in sorted(ref.token2res)[:-1]:
    tgt, dec = ref.token2res[t], ref.token2dec_out_res[t]
    want = dt.resize_imgs(dt.resize_imgs(x_t, (tgt, tgt)), (dec, dec)).numpy().transpose(0, 2, 3, 1)
    got = resolution.degraded_target(x, t, N, patch)
    assert got.shape == want.shape, t
    np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"t={t}")


# ------------------------------------------------------------------------------------------------
# DetailFlow's tokenizer (modelling/tokenizer.py, modules/siglip2_vit.py, quantizers/vq.py)
# ------------------------------------------------------------------------------------------------

TOK = dict(image=32, patch=8, tokens=8, group=2, codebook=64, code_dim=4)
ENC, DEC = dict(layer_num=2, embed_dim=48, num_heads=4), dict(layer_num=2, embed_dim=32, num_heads=2)


@pytest.fixture(scope="module")
def tokenizer_pair(tmp_path_factory):
  """(reference VQModel, tdjax DetailFlowTokenizer, its params) with the same random weights, the reference built
  as its tokenizer configs build it (causal encoder, bidirectional decoder, l2-normalised codebook,
  self-correction projection) at a tiny size, converted by `convert --kind detailflow_tokenizer`."""
  transformers = pytest.importorskip("transformers")
  if not (4, 49) <= tuple(int(v) for v in transformers.__version__.split(".")[:2]) < (4, 54):
    pytest.skip(f"DetailFlow's siglip2_vit.py needs transformers 4.49-4.53 (SigLIP2, and its encoder "
                f"layers return tuples there), this is {transformers.__version__}")
  from tdjax import runs
  from tdjax.bench_reference import reference_detailflow_tokenizer
  tmp = tmp_path_factory.mktemp("detailflow_tokenizer")
  ref = randomize(reference_detailflow_tokenizer(reference_module, tmp, TOK, ENC, DEC), seed=2)
  path = str(tmp / "tokenizer.pt")
  torch.save({"model": ref.state_dict()}, path)
  info = convert.convert_detailflow_tokenizer(path, str(tmp / "converted"), group=TOK["group"],
                                              enc_heads=ENC["num_heads"],
                                              dec_heads=DEC["num_heads"])
  assert (info["image_size"], info["patch"], info["num_tokens"]) == (32, 8, 8)
  _, task, state = runs.load_state(str(tmp / "converted"))
  model = task.model.clone(dtype=jnp.float32)     # the paper-size config computes in bfloat16
  return ref, model, state["params"]["gen"]


def _images(b=3, seed=0):
  x = np.random.default_rng(seed).uniform(-1, 1, (b, TOK["image"], TOK["image"], 3))
  return x.astype(np.float32), torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))


def test_tokenizer_encoder_and_codes_match_detailflow(tokenizer_pair):
  """Patches + N queries through the causal SigLIP2 encoder (group-causal queries that see the
  patches, patches that do not see the queries) -> quant_conv latents, and their nearest codes in
  the l2-normalised codebook."""
  ref, m, gen = tokenizer_pair
  x, x_t = _images()
  with torch.no_grad():
    want_z = ref.quant_conv(ref.encoder(x_t).latent_token)
    want_q, _, info = ref.encode(x_t)
  z = m.apply({"params": gen}, jnp.asarray(x), method="encode")
  np.testing.assert_allclose(np.asarray(z), want_z.numpy(), rtol=1e-4, atol=1e-4)
  q = m.apply({"params": gen}, z, method="quantize")
  np.testing.assert_array_equal(np.asarray(q["indices"]).reshape(-1), info[2].numpy())
  np.testing.assert_allclose(np.asarray(q["z_q"]), want_q.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("t,res", [(8, 32), (8, 24), (4, 16), (2, 8), (1, 8)])
def test_tokenizer_prefix_decoding_matches_detailflow(tokenizer_pair, t, res):
  """decode(z[:, :t], res): mask-token patches at the resized (antialiased bilinear) position table
  + the first t latents, bidirectional decoder, to_pixel, unpatchify; also tdjax's masked form
  (all N latents, those at >= t masked out)."""
  ref, m, gen = tokenizer_pair
  _, x_t = _images(seed=1)
  with torch.no_grad():
    quant, _, _ = ref.encode(x_t)
    want = ref.decode(quant, t, res).pixel_value.numpy().transpose(0, 2, 3, 1)
  zq = jnp.asarray(quant.numpy())
  got = m.apply({"params": gen}, zq[:, :t], res, method="decode")
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)
  masked = m.apply({"params": gen}, zq, res, t, method="decode")
  np.testing.assert_allclose(np.asarray(masked), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("noise_idx", [0, 1, 2, 4])
def test_self_correction_pass_matches_detailflow(tokenizer_pair, noise_idx):
  """`encode_image(noise_idx=i)`: clean codes, one token (inside the causal first group) or one
  group perturbed to a random top-50 neighbour, the detached prefix fed back through refine_conv
  as queries of a second encoder pass (refined_tokens after it), the rest re-quantised.  tdjax's
  `correct` with the reference's own perturbed codes gives its input and label codes."""
  ref, m, gen = tokenizer_pair
  _, x_t = _images(seed=2)
  torch.manual_seed(noise_idx)
  with torch.no_grad():
    _, _, info = ref.encode_image(x_t, noise_idx=noise_idx)
  clean, ar_input, ar_label = info[2].numpy().reshape(x_t.shape[0], TOK["tokens"], 3) \
      .transpose(2, 0, 1)
  end = noise_idx + (1 if noise_idx < TOK["group"] else TOK["group"])
  assert (ar_input[:, noise_idx:end] != clean[:, noise_idx:end]).any()   # really perturbed
  x = jnp.asarray(x_t.numpy().transpose(0, 2, 3, 1))
  _, idx, _, _ = m.apply({"params": gen}, x, jnp.asarray(clean), jnp.asarray(ar_input),
                         noise_idx, end, method="correct")
  np.testing.assert_array_equal(np.asarray(idx), ar_input)
  label = np.where(np.arange(TOK["tokens"]) < end, clean, np.asarray(idx))
  np.testing.assert_array_equal(label, ar_label)



@pytest.mark.parametrize("noise_idx", [1, 4])
def test_self_correction_training_pass_matches_detailflow(tokenizer_pair, noise_idx):
  """Training-mode `encode_image(noise_idx=i)` (the top-50 picks handed to both sides): the clean
  and the corrected codes, the corrected z_q the decoder gets as the second half of its batch,
  and the codebook + commitment loss mixed N / (2N - e) and (N - e) / (2N - e) = tdjax's
  `tokenize_train` at t = N."""
  from tdjax.tokenizers import detailflow as df
  ref, m, gen = tokenizer_pair
  _, x_t = _images(seed=3)
  b, n, g = x_t.shape[0], TOK["tokens"], TOK["group"]
  end = noise_idx + (1 if noise_idx < g else g)
  pick = np.random.default_rng(noise_idx).integers(0, 50, (b, n))
  ref.train()
  try:
    with torch.no_grad(), mock.patch.object(torch, "randint",
                                            lambda *a, **k: torch.from_numpy(pick.reshape(-1))):
      quant, emb_loss, info = ref.encode_image(x_t, noise_idx=noise_idx)
  finally:
    ref.eval()
  clean, ar_input, _ = info[2].numpy().reshape(b, n, 3).transpose(2, 0, 1)
  x = jnp.asarray(x_t.numpy().transpose(0, 2, 3, 1))
  stats = m.init({"params": jax.random.key(0), "noise": jax.random.key(1)}, x[:1])["vq_stats"]
  with mock.patch.object(df, "sample_noise_index", lambda *a, **k: (jnp.int32(noise_idx),
                                                                    jnp.int32(end))), \
      mock.patch.object(jax.random, "randint", lambda *a, **k: jnp.asarray(pick)):
    out, _ = m.apply({"params": gen, "vq_stats": stats}, x, n, jax.random.key(0),
                     method="tokenize_train", mutable=["vq_stats"])
  np.testing.assert_array_equal(np.asarray(out["indices"]), clean)
  np.testing.assert_array_equal(np.asarray(out["indices_sc"]), ar_input)
  np.testing.assert_allclose(np.asarray(out["z_q_sc"]), quant[b:].numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(out["bottleneck_loss"]), float(emb_loss[0] + emb_loss[1]),
                             rtol=1e-4)

# ------------------------------------------------------------------------------------------------
# DetailFlow's DINO discriminator (modelling/discriminators/discriminator_dino.py)
# ------------------------------------------------------------------------------------------------

def test_dino_discriminator_matches_dinodisc(tmp_path):
  """The whole `DinoDisc` as the tokenizer loss builds it (SyncBatchNorm heads, spectral norm, k = 9
  circular residual convs, readouts before block 0 and after the key blocks, area / bicubic resize
  to 224): its DINO state dict (handed to its `load_state_dict_from_url`, k bias zeroed by it)
  through `convert.dino_params`, its heads mapped by hand; two train-mode calls give the same
  logits [B, 5 L], the same power-iteration vectors and the same BN running means.  Depth 3 with
  key blocks (0, 1, 2) keeps it small; the heads do not depend on the depth."""
  from unittest import mock
  from tdjax.losses import discriminators as D
  dd = reference_module("DetailFlow", "modelling.discriminators.discriminator_dino")
  depth, keys, k = 3, (0, 1, 2), 9
  torch.manual_seed(0)
  vit = randomize(dd.FrozenDINOSmallNoDrop(depth=depth, key_depths=keys), seed=3, scale=0.05)
  dino_sd = {n: v.clone() for n, v in vit.state_dict().items() if not n.startswith("x_")}
  with mock.patch.object(torch.hub, "load_state_dict_from_url", lambda *a, **kw: dino_sd):
    ref = dd.DinoDisc(device="cpu", depth=depth, key_depths=keys, ks=k, norm_type="sbn")
  ref.train()
  with torch.no_grad():            # the heads' BN affine params away from (1, 0)
    for n, p in ref.heads.named_parameters():
      if p.ndim == 1 and "weight" in n:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif p.ndim == 1:
        p.copy_(0.2 * torch.randn_like(p))

  hsd = {n: v.detach().numpy().copy() for n, v in ref.heads.state_dict().items()}
  v_perm = lambda v, cin, kk: v.reshape(cin, kk).T.reshape(-1)        # torch (C_in, k) -> (k, C_in)

  def conv(pre, kk):
    w = hsd[pre + ".weight_orig"]
    return ({"kernel": w.transpose(2, 1, 0), "bias": hsd[pre + ".bias"]},
            {"u": hsd[pre + ".weight_u"], "v": v_perm(hsd[pre + ".weight_v"], w.shape[1], kk)})

  params, spectral, stats = {}, {}, {}
  for i in range(len(keys) + 1):
    parts = {"conv_in": conv(f"{i}.0.0", 1), "res_conv": conv(f"{i}.1.fn.0", k),
             "conv_out": conv(f"{i}.2", 1)}
    params[f"head_{i}"] = {n: p for n, (p, _) in parts.items()}
    spectral[f"head_{i}"] = {n: s for n, (_, s) in parts.items()}
    for name, pre in (("norm_in", f"{i}.0.1"), ("res_norm", f"{i}.1.fn.1")):
      params[f"head_{i}"][name] = {"scale": hsd[pre + ".weight"], "bias": hsd[pre + ".bias"]}
      stats.setdefault(f"head_{i}", {})[name] = {"mean": hsd[pre + ".running_mean"],
                                                 "var": hsd[pre + ".running_var"]}
  torch.save(dino_sd, str(tmp_path / "dino.pth"))
  convert.convert_dino(str(tmp_path / "dino.pth"), str(tmp_path / "dino.npz"))
  disc = D.DinoDiscriminator(key_depths=keys, kernel_size=k, norm="batch")
  backbone = D.load_dino_backbone(str(tmp_path / "dino.npz"), disc)
  variables = {"params": {"backbone": backbone, "heads": params},
               "spectral": {"heads": spectral}, "batch_stats": {"heads": stats}}
  rng = np.random.default_rng(0)
  for step, size in enumerate((32, 256)):       # bicubic up, then area down (no random crop: p=0)
    x = rng.uniform(-1, 1, (4, size, size, 3)).astype(np.float32)
    with torch.no_grad(), mock.patch.object(dd.random, "random", lambda: 1.0):
      want = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    got, state = disc.apply(variables, jnp.asarray(x), train=True,
                            mutable=["spectral", "batch_stats"])
    variables = {**variables, **state}
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-3, atol=2e-3, err_msg=f"call {step}")
    for i in range(len(keys) + 1):
      u = np.asarray(variables["spectral"]["heads"][f"head_{i}"]["res_conv"]["u"])
      np.testing.assert_allclose(u, ref.heads[i][1].fn[0].weight_u.numpy(), rtol=1e-4, atol=1e-5)
      mean = np.asarray(variables["batch_stats"]["heads"][f"head_{i}"]["norm_in"]["mean"])
      np.testing.assert_allclose(mean, ref.heads[i][0][1].running_mean.numpy(), rtol=1e-3,
                                 atol=1e-4)


def test_diff_augment_ops_match_detailflow():
  """DiffAugment's ops (utils/diff_aug.py) with the same random draws: colour (brightness,
  saturation, contrast factors), translation (shift ranges, direction, zero fill) and cutout
  (centre range, box, clamping at the border), handed to both sides."""
  from unittest import mock
  from tdjax.losses import augment
  dg = reference_module("DetailFlow", "utils.diff_aug")
  rng = np.random.default_rng(0)
  b, h, w = 5, 16, 12
  x = rng.uniform(-1, 1, (b, h, w, 3)).astype(np.float32)
  x_t = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  to_nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)
  u = [rng.uniform(size=(b, 1, 1, 1)).astype(np.float32) for _ in range(3)]
  with mock.patch.object(dg.torch, "rand", side_effect=[torch.from_numpy(a) for a in u]):
    want = to_nhwc(dg.rand_contrast(dg.rand_saturation(dg.rand_brightness(x_t))))
  uniforms = iter(u)
  with mock.patch.object(augment, "_uniform", lambda rng, n: jnp.asarray(next(uniforms))):
    got = augment.contrast(augment.saturation(augment.brightness(jnp.asarray(x), None), None),
                           None)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)

  def same_draws(ref_op, op, ratio, a, b):   # integer draws a, b [B] handed to both sides
    with mock.patch.object(dg.torch, "randint",
                           side_effect=[torch.from_numpy(v).view(-1, 1, 1) for v in (a, b)]):
      want = to_nhwc(ref_op(x_t, ratio))
    ints = iter([a, b])
    with mock.patch.object(augment.jax.random, "randint", lambda *_: jnp.asarray(next(ints))):
      got = op(jnp.asarray(x), jax.random.key(0), ratio)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{op.__name__} {ratio}")

  for ratio in (0.125, 0.25):
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy, dx = rng.integers(-sh, sh + 1, b), rng.integers(-sw, sw + 1, b)
    dy[0], dx[0] = -sh, sw                                  # the extremes
    same_draws(dg.rand_translation, augment.translation, ratio, dy, dx)
  for ratio in (0.2, 0.5):
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    cy, cx = rng.integers(0, h + (1 - sh % 2), b), rng.integers(0, w + (1 - sw % 2), b)
    cy[0], cx[0], cy[1], cx[1] = 0, 0, h - (sh % 2), w - (sw % 2)   # boxes over the borders
    same_draws(dg.rand_cutout, augment.cutout, ratio, cy, cx)

# ------------------------------------------------------------------------------------------------
# DetailFlow's discriminator loss (losses/vq_loss.py, optimizer_idx=1)
# ------------------------------------------------------------------------------------------------

def test_discriminator_loss_matches_vqloss():
  """The tokenizer task's G adversarial + reconstruction terms = `VQLoss(..., optimizer_idx=0)`
  (codebook and perceptual terms zero here) and its D term = `VQLoss(..., optimizer_idx=1)`, over
  two steps; the D side: D on the real and
  the fake batch as separate calls (BN statistics per call), hinge loss, LeCAM with EMAs updated
  before use, consistency regularisation over real and fake, and disc_weight * (hinge + lecam_w *
  LeCAM) + cr_w * CR.  Both sides' DiffAugment is replaced by the same deterministic maps (weak for
  the 'cutout_0.2' policy, strong for 'cutout_0.5'), the perceptual net by a stub (unused here);
  the PatchGAN (taming / DetailFlow NLayerDiscriminator, BatchNorm) gets the reference's weights."""
  from unittest import mock
  from test_tokenizer import _cfg
  from tdjax.tasks.detailflow_tokenizer import DetailFlowTokenizerTask
  from tdjax.tokenizers.resolution import apply_separable
  vq_loss = reference_module("DetailFlow", "losses.vq_loss")
  weak = lambda x: 0.8 * x + 0.1
  strong = lambda x: -0.6 * x + 0.2 * x * x

  def ref_aug(x, policy="", prob=0.5, **_):
    return strong(x) if "cutout_0.5" in policy else weak(x)

  adv, lecam_w, cr_w = 0.2, 1.0, 4.0
  class NoPerceptual(torch.nn.Module):      # stands in for the LPIPS net it would download
    def forward(self, a, b):
      return torch.zeros(a.shape[0])

  with mock.patch.object(vq_loss, "LPIPS", lambda *a, **k: NoPerceptual()), \
      mock.patch.object(vq_loss, "DiffAugment", ref_aug):
    torch.manual_seed(0)
    ref = vq_loss.VQLoss(disc_start=0, disc_type="patchgan", disc_dim=8, disc_num_layers=2,
                         disc_in_channels=1, disc_weight=adv, lecam_loss_weight=lecam_w,
                         disc_cr_loss_weight=cr_w, use_diff_aug=True).train()
    ref.lecam_ema.decay = 0.5         # (0.999 in the reference) so that two steps show the order
    with torch.no_grad():
      for n, p in ref.discriminator.named_parameters():
        p.add_(0.2 * torch.randn_like(p) if p.ndim == 1 else 0.0 * p)
    task = DetailFlowTokenizerTask(_cfg(adv_weight=adv, adv_start=0, disc="patchgan",
                              disc_kwargs=dict(ndf=8, n_layers=2), disc_input_size=0,
                              lecam_weight=lecam_w, lecam_decay=0.5, cr_weight=cr_w))
    task._augment = lambda x, rng, policy=None, prob=None: (
        strong(x) if policy and "cutout_0.5" in policy else weak(x))
    params, state = __import__("flax").linen.unbox(task.init(jax.random.key(0)))
    dsd = {n: v.detach().numpy().copy() for n, v in ref.discriminator.state_dict().items()}
    convs = sorted(int(n.split(".")[1]) for n, v in dsd.items() if n.endswith("weight") and v.ndim == 4)
    norms = sorted(int(n.split(".")[1]) for n in dsd if n.endswith("running_mean"))
    names = [f"conv{i}" for i in range(len(convs) - 1)] + ["conv_out"]
    dparams = {name: {"kernel": dsd[f"main.{i}.weight"].transpose(2, 3, 1, 0),
                      **({"bias": dsd[f"main.{i}.bias"]} if f"main.{i}.bias" in dsd else {})}
               for name, i in zip(names, convs)}
    dparams.update({f"norm{k + 1}": {"scale": dsd[f"main.{i}.weight"], "bias": dsd[f"main.{i}.bias"]}
                    for k, i in enumerate(norms)})
    assert jax.tree.structure(dparams) == jax.tree.structure(params["disc"])
    params = {**params, "disc": dparams}
    plan, b = task.plan, 4
    res, mats, t = plan.branches[0], plan.matrices[0], task.N
    rng = np.random.default_rng(0)
    for step in (1, 2):
      x = jnp.asarray(rng.uniform(-1, 1, (b, 16, 16, 1)).astype(np.float32))
      codes = jnp.asarray(rng.normal(size=(b, task.N, 4)).astype(np.float32))
      out, new_state = task._image_losses(res, mats, params, state, codes, t,
                                          plan.row_of_t[t], x, jnp.ones(b), step,
                                          jax.random.key(step))
      state = {**state, **new_state}
      rec = task.model.apply({"params": params["gen"]}, codes, res, t, method="decode")
      target = apply_separable(x, jnp.asarray(mats)[plan.row_of_t[t]])
      nchw = lambda a: torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())
      with torch.no_grad():       # the generator step, then the discriminator step
        want_g = ref(torch.zeros(5), nchw(target), nchw(rec), optimizer_idx=0, global_step=step,
                     logger=mock.Mock(), log_every=10 ** 9)
        want = ref(None, nchw(target), nchw(rec), optimizer_idx=1, global_step=step,
                   logger=mock.Mock(), log_every=10 ** 9)
      np.testing.assert_allclose(float(out["mse"] + adv * out["g_loss"]), float(want_g), rtol=1e-4,
                                 err_msg=f"G, step {step}")
      np.testing.assert_allclose(float(out["d_loss"]), float(want), rtol=1e-4, err_msg=f"{step}")
      np.testing.assert_allclose([float(state["lecam"]["real"]), float(state["lecam"]["fake"])],
                                 [ref.lecam_ema.logits_real_ema, ref.lecam_ema.logits_fake_ema],
                                 rtol=1e-4)



# ------------------------------------------------------------------------------------------------
# MAR's diffusion loss (LTH14/mar: models/diffloss.py, diffusion/)
# ------------------------------------------------------------------------------------------------

def mar_head(C=4, Dc=6, W=32, depth=2, seed=4):
  """MAR's `SimpleMLPAdaLN` (in C, out 2C, condition Dc, width W), random weights (also
  tests/parity/record.py's)."""
  diffloss = reference_module("mar", "models.diffloss")
  torch.manual_seed(0)
  return randomize(diffloss.SimpleMLPAdaLN(C, W, 2 * C, Dc, depth), seed=seed, scale=0.2)


def _mar_head_pair(C=4, Dc=6, W=32, depth=2):
  """(MAR SimpleMLPAdaLN, tdjax MLPHead, its params) with the same random weights, converted by
  `tdjax.convert.mar_head_params`."""
  ref = mar_head(C, Dc, W, depth)
  sd = {"diffloss.net." + k: v for k, v in state_dict(ref).items()}
  dims = convert.mar_head_dims(convert.mar.mar_head_state_dict(sd))
  assert (dims["in_channels"], dims["z_channels"], dims["width"], dims["depth"]) == (C, Dc, W,
                                                                                   depth)
  head, expected = convert.mar.mar_head_expected(dims)
  return ref, head, jax.tree.map(jnp.asarray, convert.mar_head_params(sd, expected))


def test_mar_checkpoint_head_converts_through_the_cli(tmp_path):
  """A MAR checkpoint as main_mar.py saves it (.pth: "model", "model_ema", "args"; the head under
  diffloss.net. beside the masked-AR keys) -> `python -m tdjax.convert --kind mar_head` -> the
  MLPHead .npz: its output is the EMA SimpleMLPAdaLN's on (x, t, c), t the integer steps MAR
  feeds, to float32 precision."""
  import argparse
  from test_bad_input import run
  C, Dc, W, depth = 4, 6, 32, 2
  ema, live = mar_head(C, Dc, W, depth, seed=5), mar_head(C, Dc, W, depth, seed=6)
  mar = lambda net: {"encoder_pos_embed_learned": torch.zeros(1, 4, 8),
                     **{"diffloss.net." + k: v for k, v in net.state_dict().items()}}
  torch.save({"model": mar(live), "model_ema": mar(ema), "epoch": 799,
              "args": argparse.Namespace(diffloss_d=depth, diffloss_w=W)}, tmp_path / "mar.pth")
  out = tmp_path / "head.npz"
  r = run("tdjax.convert", "--kind=mar_head", f"--input={tmp_path / 'mar.pth'}", f"--output={out}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"'width': {W}, 'depth': {depth}" in r.stdout, r.stdout
  head, params = convert.load_mar_head(str(out))
  rng = np.random.default_rng(2)
  x = rng.normal(size=(6, C)).astype(np.float32)
  c = rng.normal(size=(6, Dc)).astype(np.float32)
  t = np.array([0, 1, 17, 500, 998, 999])
  with torch.no_grad():
    want = ema(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)).numpy()
  got = np.asarray(head.apply({"params": params}, jnp.asarray(x)[:, None], jnp.asarray(t),
                              jnp.asarray(c)[:, None]))[:, 0]
  assert got.shape == want.shape == (6, 2 * C) and np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_mlp_head_and_ddpm_loss_match_mar_diffloss():
  """MAR's `SimpleMLPAdaLN` = tdjax's MLPHead; and MAR's training loss (cosine schedule, eps MSE
  plus the learned-range variance's VB term with the mean frozen, at t = 0 the discretised decoder
  NLL) = tdjax's `ddpm.training_loss`, sample by sample for the same t (0, 1, ..., 999), noise
  and network output.  The loss is fed an output near the true eps: a random head's t = 0 mean is
  so far off at the tiny t = 0 variance that the decoder NLL sits where float32 CDFs saturate."""
  from tdjax.diffusion import ddpm
  ref, head, p = _mar_head_pair()
  diffusion = reference_module("mar", "diffusion")
  rng = np.random.default_rng(0)
  n, C, Dc = 8, 4, 6
  x0 = rng.normal(size=(n, C)).astype(np.float32)
  z = rng.normal(size=(n, Dc)).astype(np.float32)
  t = np.array([0, 1, 5, 100, 500, 900, 998, 999])
  noise = rng.normal(size=(n, C)).astype(np.float32)
  with torch.no_grad():
    out = ref(torch.from_numpy(x0), torch.from_numpy(t), torch.from_numpy(z)).numpy()
  got = head.apply({"params": p}, jnp.asarray(x0)[:, None], jnp.asarray(t), jnp.asarray(z)[:, None])
  np.testing.assert_allclose(np.asarray(got)[:, 0], out, rtol=1e-4, atol=1e-4)

  net_out = np.concatenate([noise + 0.05 * rng.normal(size=(n, C)),
                            rng.uniform(-1, 1, (n, C))], -1).astype(np.float32)
  train = diffusion.create_diffusion(timestep_respacing="", noise_schedule="cosine")
  with torch.no_grad():
    want = train.training_losses(lambda *a, **k: torch.from_numpy(net_out), torch.from_numpy(x0),
                                 torch.from_numpy(t), {}, noise=torch.from_numpy(noise))
  for i in range(n):                       # one sample at a time: the VB terms differ by t
    with mock.patch.object(jax.random, "randint", lambda *a, **k: jnp.asarray(t[i:i + 1])), \
        mock.patch.object(jax.random, "normal", lambda *a, **k: jnp.asarray(noise[i:i + 1, None])):
      loss, metrics = ddpm.training_loss(ddpm.Schedule.make(1000),
                                         lambda *a: jnp.asarray(net_out[i:i + 1, None]),
                                         jnp.asarray(x0[i:i + 1, None]),
                                         jnp.asarray(z[i:i + 1, None]), jax.random.key(0))
    for name, value in (("mse", metrics["mse"]), ("vb", metrics["vb"]), ("loss", loss)):
      np.testing.assert_allclose(float(value), float(want[name][i]), rtol=1e-4, atol=1e-7,
                                 err_msg=f"{name}, t={t[i]}")


@pytest.mark.parametrize("steps,cfg,temperature", [(50, 1.0, 1.0), (25, 3.0, 0.9), (100, 1.5, 1.0)])
def test_ddpm_sampling_matches_mar_p_sample_loop(steps, cfg, temperature):
  """MAR's `DiffLoss.sample`: the cosine schedule respaced to `steps` (`space_timesteps`), ancestral
  steps with the learned-range variance, unclipped, temperature on the noise, CFG through
  `SimpleMLPAdaLN.forward_with_cfg` (guided eps, each half its own variance; MAR keeps the
  conditional half), with the same initial and per-step noise -> the same final latents.  The
  network is a stand-in, the exact eps of Gaussian data N(tanh(c A), 0.25) (a random head's eps is
  so far off that the unclipped chain blows up and hides the noise terms), with a smooth variance
  output; it sees the original timestep.  The samples keep the noise they gathered on the way."""
  from tdjax.diffusion import ddpm
  diffusion = reference_module("mar", "diffusion")
  diffloss = reference_module("mar", "models.diffloss")
  rng = np.random.default_rng(1)
  n, C, Dc = 6, 4, 6
  A, B = rng.normal(size=(Dc, C)).astype(np.float32), rng.normal(size=(Dc, C)).astype(np.float32)
  zc, zu = (rng.normal(size=(n, Dc)).astype(np.float32) for _ in range(2))
  noise = rng.normal(size=(n, C)).astype(np.float32)
  abar = np.cumprod(1 - ddpm.cosine_betas(1000)).astype(np.float32)

  def stand_in(x, t, c, xp):       # [eps, v] of a fixed smooth network, xp = torch or jnp
    a = xp.asarray(abar)[t][:, None] if xp is jnp else torch.from_numpy(abar)[t][:, None]
    mat = (lambda m: jnp.asarray(m)) if xp is jnp else torch.from_numpy
    m, s2 = xp.tanh(c @ mat(A)), 0.25           # the exact eps of data ~ N(m, s2)
    x0_hat = m + a ** 0.5 * s2 * (x - a ** 0.5 * m) / (a * s2 + 1 - a)
    eps = (x - a ** 0.5 * x0_hat) / (1 - a) ** 0.5
    return xp.concatenate([eps, xp.tanh(x + c @ mat(B))], -1) if xp is jnp else \
        torch.cat([eps, torch.tanh(x + c @ mat(B))], -1)

  key = jax.random.key(7)
  steps_z = [np.asarray(jax.random.normal(jax.random.fold_in(key, i), (n, 1, C)))[:, 0]
             for i in reversed(range(steps))]                 # tdjax's draw at step i
  guided = cfg != 1.0
  per_step = iter([torch.from_numpy(np.concatenate([zz, zz]) if guided else zz.copy())
                   for zz in steps_z])
  net = diffloss.SimpleMLPAdaLN(C, 8, 2 * C, Dc, 1)
  net.forward = lambda x, t, c: stand_in(x, t, c, torch)     # forward_with_cfg calls it
  gen = diffusion.create_diffusion(timestep_respacing=str(steps), noise_schedule="cosine")
  if guided:
    x_init, kwargs, fn = (torch.from_numpy(np.concatenate([noise, noise])),
                          dict(c=torch.from_numpy(np.concatenate([zc, zu])), cfg_scale=cfg),
                          net.forward_with_cfg)
  else:
    x_init, kwargs, fn = torch.from_numpy(noise), dict(c=torch.from_numpy(zc)), net.forward
  with torch.no_grad(), mock.patch.object(torch, "randn_like", lambda x: next(per_step)), \
      mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self):   # MAR's .cuda() calls
    want = gen.p_sample_loop(fn, tuple(x_init.shape), x_init, clip_denoised=False,
                             model_kwargs=kwargs, progress=False, temperature=temperature)
  want = want.numpy()[:n]                                       # MAR keeps the conditional half

  def model_fn(x, t):
    out = lambda c: stand_in(x[:, 0], t, jnp.asarray(c), jnp)[:, None]
    return out(zc) if not guided else (out(zc), out(zu))

  got = ddpm.p_sample_loop(ddpm.Schedule.make(1000, steps), model_fn, jnp.asarray(noise)[:, None],
                           key, cfg=cfg, temperature=temperature)
  assert np.abs(want).max() < 10
  np.testing.assert_allclose(np.asarray(got)[:, 0], want, rtol=1e-4, atol=1e-4)


def test_kl16_vae_matches_mar_autoencoderkl():
  """MAR's own `AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))` (models/vae.py) through
  `convert --kind mar_vae`: its posterior (mean, clamped log-variance) and its decoding at 32 px."""
  from tdjax.tokenizers import kl_vae
  vae_mod = reference_module("mar", "models.vae")
  torch.manual_seed(0)
  ref = vae_mod.AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4)).eval()
  with torch.no_grad():               # GroupNorm affine and biases away from their 1 / 0 values
    for p in ref.parameters():
      p.add_(0.05 * torch.randn_like(p))
  vae = kl_vae.AutoencoderKL(kl_vae.KL16)
  x0 = np.zeros((1, 256, 256, 3), np.float32)
  params = convert.mar_vae_params(state_dict(ref), jax.eval_shape(
      lambda: vae.init(jax.random.key(0), x0)["params"]))
  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  z = np.random.default_rng(1).normal(size=(2, 2, 2, 16)).astype(np.float32)
  nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    post = ref.encode(nchw(x))
    decoded = ref.decode(nchw(z)).numpy().transpose(0, 2, 3, 1)
  mean, logvar = vae.apply({"params": params}, x, method=kl_vae.AutoencoderKL.encode)
  for got, want in ((mean, post.mean), (logvar, post.logvar)):
    want = want.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
  out = vae.apply({"params": params}, z, method=kl_vae.AutoencoderKL.decode)
  np.testing.assert_allclose(np.asarray(out), decoded, rtol=1e-3, atol=1e-3 * np.abs(decoded).max())

"""DetailFlow tokenizer: masks, VQ, decoder resolutions, self-correction, loss terms, training."""

import gzip
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tdjax import nn as tnn
from tdjax.tokenizers.detailflow import DetailFlowTokenizer, encoder_mask
from tdjax.tokenizers.quantizers import (ContinuousBottleneck, VectorQuantizer, l2_normalize,
                                         top_k_perturb)
from tdjax.tokenizers.resolution import sample_noise_index

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from configs.detailflow_tokenizer import get_config  # noqa: E402

TINY = dict(image_size=16, channels=1, patch=4, num_tokens=12, group=4, enc_width=16, enc_depth=2,
            enc_heads=2, enc_mlp=32, dec_width=16, dec_depth=2, dec_heads=2, dec_mlp=32,
            codebook_size=32, code_dim=4, top_k=6)


@pytest.fixture(scope="module")
def tiny():
  m = DetailFlowTokenizer(**TINY)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1)) * 2 - 1
  v = nn.unbox(jax.jit(m.init)(jax.random.key(1), x))
  return m, v, x


def test_encoder_mask_layout():
  m = encoder_mask(4, 8, 2)
  assert m[:4, :4].all() and not m[:4, 4:].any()      # patches see patches only
  assert m[4:, :4].all()                              # queries see every patch
  q = m[4:, 4:]
  assert q[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]    # first group token-causal
  assert q[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
  assert q[2].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]    # then groups of 2 see each other
  assert q[7].tolist() == [1] * 8
  free = encoder_mask(4, 8, 2, causal=False)          # Table 2 baseline: unordered tokens
  assert free[4:].all() and (free[:4] == m[:4]).all()


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "nothing_saveable")])
def test_second_pass_reusing_patch_keys_values_equals_recomputing_them(scan, remat):
  """Self-correction's second encoder pass with the first pass's patch keys/values (queries only)
  gives the latents and parameter gradients of the full second pass over patches + queries."""
  m = DetailFlowTokenizer(**TINY, scan=scan, remat=remat)
  x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1)) * 2 - 1
  v = nn.unbox(jax.jit(m.init)(jax.random.key(1), x))
  queries = jax.random.normal(jax.random.key(2), (2, 12, 16))
  r1, r2 = jax.random.normal(jax.random.key(3), (2, 2, 12, 4))

  def loss(params, reuse):
    vv = {**v, "params": params}
    z1, kv = m.apply(vv, x, keep_patch_kv=True, method="encode")
    z2 = m.apply(vv, x, queries, patch_kv=kv if reuse else None, method="encode")
    return jnp.sum(r1 * z1) + jnp.sum(r2 * z2), (z1, z2, kv)

  (l0, (z1, z2, kv)), g0 = jax.jit(jax.value_and_grad(lambda p: loss(p, False),
                                                      has_aux=True))(v["params"])
  (l1, (_, z2r, _)), g1 = jax.jit(jax.value_and_grad(lambda p: loss(p, True),
                                                     has_aux=True))(v["params"])
  assert [a.shape for a in kv] == [(2, 2, 16, 2, 8)] * 2   # [depth, B, patches, heads, hd]
  np.testing.assert_allclose(z1, m.apply(v, x, method="encode"), atol=1e-5)
  np.testing.assert_allclose(z2r, z2, atol=2e-5)
  assert float(jnp.abs(z2 - z1).max()) > 1e-3      # the queries matter
  flat0, flat1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
  assert len(flat0) == len(flat1)
  for a, b in zip(flat0, flat1):
    np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)


def test_encoder_queries_are_group_causal(tiny):
  m, v, x = tiny
  enc = jax.jit(lambda q: m.apply(v, x, q, method="encode"))
  q0 = jnp.broadcast_to(v["params"]["latent_tokens"][None], (2, 12, 16))
  base = enc(q0)
  # change the inputs of group 1 (tokens 4..7): groups 0 unchanged, group 1 and later change
  noise = jax.random.normal(jax.random.key(5), (16,))
  out = enc(q0.at[:, 5].add(noise))
  np.testing.assert_allclose(out[:, :4], base[:, :4], atol=1e-6)
  d = jnp.abs(out - base).max(axis=(0, 2))
  assert float(d[4:].min()) > 1e-5     # all of group 1 (token 4 too: same group) and later
  # inside the first group: strictly token-causal
  out = enc(q0.at[:, 2].add(noise))
  np.testing.assert_allclose(out[:, :2], base[:, :2], atol=1e-6)
  assert float(jnp.abs(out - base).max(axis=(0, 2))[2:].min()) > 1e-5


def test_patches_do_not_see_queries():
  P, N, D = 4, 6, 16
  stack = tnn.TransformerStack(2, tnn.vit_block_kwargs(2, 32))
  mask = jnp.asarray(encoder_mask(P, N, 2))
  seq = jax.random.normal(jax.random.key(0), (1, P + N, D))
  v = stack.init(jax.random.key(1), seq, mask)
  f = jax.jit(lambda s: stack.apply(v, s, mask))
  a = f(seq)
  b = f(seq.at[:, P:].add(jax.random.normal(jax.random.key(3), (N, D))))
  np.testing.assert_allclose(a[:, :P], b[:, :P], atol=1e-6)
  c = f(seq.at[:, 0].add(jax.random.normal(jax.random.key(2), (D,))))  # reaches every query
  assert float(jnp.abs(c[:, P:] - a[:, P:]).max(axis=-1).min()) > 1e-4


def test_vq_straight_through_gradient():
  z = jax.random.normal(jax.random.key(0), (2, 5, 4))
  for l2 in (False, True):
    vq = VectorQuantizer(16, 4, l2_norm=l2)
    p = vq.init(jax.random.key(1), z)
    zq_of = lambda z: vq.apply(p, z)["z_q"]
    J = jax.jacobian(lambda z: zq_of(z)[0, 0])(z)[:, 0, 0]          # d zq[0,0] / d z[0,0]
    ref = (jax.jacobian(lambda v: l2_normalize(v))(z[0, 0]) if l2 else jnp.eye(4))
    np.testing.assert_allclose(J, ref, atol=1e-5)
    out = vq.apply(p, z)
    e = vq.apply(p, method="embedding")
    np.testing.assert_allclose(out["z_q"], e[out["indices"]], atol=1e-5)   # forward = codes
    assert float(out["vq_loss"]) > 0 and abs(float(out["commit_loss"] - out["vq_loss"])) < 1e-6


def test_vq_topk_noisy_indices_within_k_nearest():
  k = 5
  z = jax.random.normal(jax.random.key(0), (4, 64, 8))
  vq = VectorQuantizer(64, 8)
  p = vq.init(jax.random.key(1), z)
  out = vq.apply(p, z, top_k=k, rng=jax.random.key(2))
  _, sim = vq.apply(p, z, method=vq.similarity)
  rank = jnp.sum(sim > jnp.take_along_axis(sim, out["noisy_indices"][..., None], -1), axis=-1)
  assert int(rank.max()) < k
  assert float((out["noisy_indices"] != out["indices"]).mean()) > 0.5   # ~ (k-1)/k
  np.testing.assert_array_equal(out["indices"], jnp.argmax(sim, -1))


@pytest.mark.parametrize("start", [np.array([0, 3, 9, 10]), 5])
def test_top_k_window_equals_the_full_search_there(start):
  """The windowed top-k gives, inside the window, the codes of the search over every token, and
  the nearest code outside it (start [B] or scalar; positions past N - 1 clipped)."""
  sim = jax.random.normal(jax.random.key(0), (4, 12, 40))
  idx = jnp.argmax(sim, -1).astype(jnp.int32)
  pick = jax.random.randint(jax.random.key(1), idx.shape, 0, 7)
  full = top_k_perturb(sim, idx, pick, 7)
  win = jax.jit(lambda s, st: top_k_perturb(sim, idx, pick, 7, (st, 4)))(sim, jnp.asarray(start))
  inside = (np.arange(12)[None] >= np.reshape(start, (-1, 1))) & (
      np.arange(12)[None] < np.reshape(start, (-1, 1)) + 4)
  inside = np.broadcast_to(inside, idx.shape)
  np.testing.assert_array_equal(np.asarray(win)[inside], np.asarray(full)[inside])
  np.testing.assert_array_equal(np.asarray(win)[~inside], np.asarray(idx)[~inside])
  assert (np.asarray(full)[inside] != np.asarray(idx)[inside]).any()


def test_encode_for_ar_equals_the_search_over_every_token(tiny):
  """encode_for_ar (top-k only on each image's perturbed span) gives the triplets of the plain
  recipe: top-k noisy codes for every token, then the second pass
  (docs/reference/detailflow.md 1.6 step 7)."""
  m, v, x = tiny
  xx = jnp.concatenate([x] * 8)

  def plain(k):
    k_top, k_noise = jax.random.split(k)
    q = m.apply(v, m.apply(v, xx, method="encode"), top_k=m.top_k, rng=k_top, method="quantize")
    n_idx, n_end = jax.vmap(lambda kk: sample_noise_index(kk, 12, 4, 4))(
        jax.random.split(k_noise, 16))
    _, idx2, _, _ = m.apply(v, xx, q["indices"], q["noisy_indices"], n_idx, n_end,
                            method="correct")
    lab = jnp.where(jnp.arange(12)[None] < n_end[:, None], q["indices"], idx2)
    return q["indices"], idx2, lab

  fast = jax.jit(lambda k: m.apply(v, xx, k, method="encode_for_ar"))
  changed = 0
  for seed in range(3):
    want, got = jax.jit(plain)(jax.random.key(seed)), fast(jax.random.key(seed))
    for a, b in zip(want, got):
      np.testing.assert_array_equal(a, b)
    changed += int((got[1] != got[0]).sum())
  assert changed > 0


def test_tokenize_train_equals_the_search_over_every_token(tiny):
  """Training: the same perturbed prefix and corrected codes as top-k over every token."""
  m, v, x = tiny

  def plain(t, k):
    k_top, k_noise = jax.random.split(k)
    q = m.apply(v, m.apply(v, x, method="encode"), top_k=m.top_k, rng=k_top, method="quantize")
    n_idx, n_end = sample_noise_index(k_noise, t, 4, 4)
    _, idx2, _, _ = m.apply(v, x, q["indices"], q["noisy_indices"], n_idx, n_end, train=True,
                            method="correct", mutable=["vq_stats"])[0]
    return idx2

  f = jax.jit(lambda t, k: m.apply(v, x, t, k, method="tokenize_train",
                                   mutable=["vq_stats"])[0]["indices_sc"])
  for t in (3, 8, 12):
    for seed in range(3):
      np.testing.assert_array_equal(jax.jit(plain)(t, jax.random.key(seed)),
                                    f(t, jax.random.key(seed)))


def test_vq_usage_counts_and_continuous():
  z = jax.random.normal(jax.random.key(0), (2, 5, 4))
  vq = VectorQuantizer(16, 4, usage_decay=0.5)
  v = vq.init(jax.random.key(1), z)
  assert float(v["vq_stats"]["counts"].sum()) == 0
  out, st = vq.apply(v, z, mutable=["vq_stats"])
  assert float(st["vq_stats"]["counts"].sum()) == 10
  cb = ContinuousBottleneck(4, kl_weight=0.1, noise_std=0.1)
  z2 = jnp.concatenate([z, z], -1)
  p = cb.init(jax.random.key(0), z2)
  o = cb.apply(p, z2, train=True, rngs={"noise": jax.random.key(3)})
  assert o["z_q"].shape == (2, 5, 4) and float(o["loss"]) > 0
  np.testing.assert_allclose(cb.apply(p, z2)["z_q"], z, atol=1e-6)     # eval = mean


def test_decoder_every_resolution_and_prefix_mask(tiny):
  m, v, x = tiny
  zq = jax.random.normal(jax.random.key(3), (2, 12, 4))
  for res in range(4, 17, 4):
    assert jax.eval_shape(lambda: m.apply(v, zq, res, method="decode")).shape == (2, res, res, 1)
  assert jax.eval_shape(lambda: m.apply(v, zq, (8, 12), method="decode")).shape == (2, 8, 12, 1)
  with pytest.raises(ValueError):
    m.apply(v, zq, 6, method="decode")
  dec = jax.jit(lambda z, t: m.apply(v, z, 8, t, method="decode"))
  trunc = jax.jit(lambda z: m.apply(v, z, 8, method="decode"))
  for t in (1, 5, 12):   # masked prefix (traced t) == truncated codes
    np.testing.assert_allclose(dec(zq, t), trunc(zq[:, :t]), atol=1e-5)
  a = dec(zq, 5)
  b = dec(zq.at[:, 7].add(1.0), 5)
  np.testing.assert_allclose(a, b, atol=1e-6)           # tokens beyond t are ignored
  assert float(jnp.abs(dec(zq.at[:, 3].add(1.0), 5) - a).max()) > 1e-5


def test_self_correction_shapes_and_triplets(tiny):
  m, v, x = tiny
  f = jax.jit(lambda t, k: m.apply(v, x, t, k, method="tokenize_train", mutable=["vq_stats"])[0])
  for t in (1, 3, 8, 12):
    out = f(t, jax.random.key(t))
    assert out["z_q"].shape == out["z_q_sc"].shape == (2, 12, 4)
    e = int(out["noise_end"])
    assert e <= t and bool(out["sc_on"]) == (t > 1)
    np.testing.assert_array_equal(out["indices_sc"].shape, (2, 12))
  # triplets: labels equal clean before noise_end, inputs perturbed (within top-k) there
  xx = jnp.concatenate([x] * 4)
  clean, ar_in, ar_lab, n_idx, n_end = jax.jit(lambda k: m.apply(
      v, xx, k, with_positions=True, method="encode_for_ar"))(jax.random.key(7))
  z = jax.jit(lambda xx: m.apply(v, xx, method="encode"))(xx)
  _, sim = m.apply(v, z, method=lambda mod, z: mod.quantizer.similarity(z))
  assert clean.shape == ar_in.shape == ar_lab.shape == (8, 12)
  np.testing.assert_array_equal(clean, jnp.argmax(sim, -1))
  changed = 0
  for b in range(8):
    i, e = int(n_idx[b]), int(n_end[b])
    assert e == (i + 1 if i < 4 else i + 4) and (i < 4 or i % 4 == 0)
    np.testing.assert_array_equal(ar_lab[b, :e], clean[b, :e])
    np.testing.assert_array_equal(ar_in[b, :i], clean[b, :i])
    np.testing.assert_array_equal(ar_in[b, e:], ar_lab[b, e:])
    for p in range(i, e):   # perturbed codes are among the top-k of the clean latent
      rank = int(jnp.sum(sim[b, p] > sim[b, p, ar_in[b, p]]))
      assert rank < m.top_k
      changed += int(ar_in[b, p] != clean[b, p])
  assert changed > 0


def _cfg(arg="size=tiny,degrade_p=0", **loss):
  c = get_config(arg)
  c.input.image_size = 16
  c.input.batch_size = 4
  c.model.update(dict(patch=4, num_tokens=8, group=4, codebook_size=32, code_dim=4, top_k=4))
  c.loss.update(loss)
  return c


def test_loss_weights_need_files():
  from tdjax.tasks.detailflow_tokenizer import DetailFlowTokenizerTask
  with pytest.raises(ValueError, match="config.loss.lpips_weights"):
    DetailFlowTokenizerTask(_cfg(lpips_weight=1.0))
  with pytest.raises(ValueError, match="disc_backbone_weights"):
    DetailFlowTokenizerTask(_cfg(adv_weight=0.1, disc="dino"))
  with pytest.raises(ValueError, match="align"):
    DetailFlowTokenizerTask(_cfg(align_weight=1.0))


def test_dino_discriminator_initialises_under_the_mesh(tmp_path):
  """The paper's loss (disc='dino') under the trainer's mesh and axis rules: its ViT's per-head
  query kernel [C, H, D] is created and sharded there (DenseGeneral's flat init failed, so no such
  tokenizer could train), and the frozen backbone is the file's."""
  from tdjax import trainer
  from tdjax.losses import discriminators as D
  from tdjax.losses.weights import expected_params, save_npz_params
  dino = dict(embed_dim=16, num_heads=2, key_depths=(0, 1), img_size=32, pos_grid=2)
  bb = expected_params(D.DinoDiscriminator(**dino).backbone_module(), jnp.zeros((1, 32, 32, 3)))
  bb_values = jax.tree.map(
      lambda s: np.random.RandomState(0).randn(*s.shape).astype(np.float32) * 0.02, nn.unbox(bb))
  save_npz_params(str(tmp_path / "dino.npz"), bb_values)
  c = get_config("size=tiny,adv=0.1,disc=dino")
  c.loss.update(disc_backbone_weights=str(tmp_path / "dino.npz"), disc_kwargs=dino)
  c.mesh = dict(data=2, fsdp=2, tensor=2)
  state = trainer.Setup(c).init_state()
  q = state["params"]["disc"]["backbone"]["blocks_0"]["attn"]["query"]["kernel"]
  assert q.shape == (16, 2, 8) and len(q.sharding.device_set) == 8
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]["disc"]["backbone"]),
               bb_values)


def test_frozen_weights_files_are_read_after_init_not_compiled_into_it(tmp_path):
  """LPIPS, the alignment teacher and the DINO backbone come from files.  The trainer's init is
  compiled without them (SigLIP2-so400m alone is 1.6 GB: as constants of the init program it
  nears protobuf's 2 GB limit, and it was replicated on every device); they are read on the host
  after it and placed by their logical axes, and the state holds the files' values."""
  from tdjax import trainer
  from tdjax.losses import discriminators as D
  from tdjax.losses.alignment import ViTTeacher
  from tdjax.losses.lpips import LPIPS
  from tdjax.losses.weights import expected_params, save_npz_params
  rand = lambda tree, seed: jax.tree.map(
      lambda s: np.random.RandomState(seed).rand(*s.shape).astype(np.float32), nn.unbox(tree))
  files = {}
  dino = dict(embed_dim=16, num_heads=2, key_depths=(0, 1), img_size=32, pos_grid=2)
  lp = dict(widths=(4, 4, 4, 4, 4))
  tower = ViTTeacher(width=16, depth=1, num_heads=2, mlp_dim=32, patch_size=4, pos_grid=4)
  img = lambda s: jnp.zeros((1, s, s, 3))
  for name, module, args, seed in (
      ("dino", D.DinoDiscriminator(**dino).backbone_module(), (img(32),), 1),
      ("lpips", LPIPS(**lp), (img(16), img(16)), 2), ("teacher", tower, (img(16),), 3)):
    files[name] = rand(expected_params(module, *args), seed)
    save_npz_params(str(tmp_path / f"{name}.npz"), files[name])
  c = get_config(f"size=tiny,adv=0.1,disc=dino,lpips=0.5,align=1.0,teacher={tmp_path}/teacher.npz")
  c.loss.update(disc_backbone_weights=str(tmp_path / "dino.npz"), disc_kwargs=dino,
                lpips_weights=str(tmp_path / "lpips.npz"), lpips_kwargs=lp)
  c.mesh = dict(data=2, fsdp=4, tensor=1)
  setup = trainer.Setup(c)
  consts = jax.make_jaxpr(setup._init_state)(setup.init_key).consts
  smallest_file = min(sum(np.size(a) for a in jax.tree.leaves(f)) for f in files.values())
  assert sum(np.size(x) for x in consts) < smallest_file, (smallest_file, [np.shape(x) for x in consts])
  state = setup.init_state()
  frozen = state["model_state"]["frozen"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen["teacher"]), files["teacher"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen["lpips"]), files["lpips"])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]["disc"]["backbone"]),
               files["dino"])
  assert not frozen["teacher"]["blocks_0"]["mlp"]["fc1"]["kernel"].sharding.is_fully_replicated


def test_alignment_to_a_teacher_file(tmp_path):
  """config arg teacher=F: the frozen tower's dims and align_dim come from F's shapes, F's weights
  are the ones applied (grey images repeated to RGB), and the loss adds -cos to the teacher."""
  from tdjax.losses.alignment import ViTTeacher, alignment_loss
  from tdjax.losses.weights import save_npz_params
  from tdjax.tasks.detailflow_tokenizer import DetailFlowTokenizerTask
  tower = ViTTeacher(width=12, depth=1, num_heads=2, mlp_dim=24, patch_size=4, pos_grid=4)
  tp = nn.unbox(tower.init(jax.random.key(5), jnp.zeros((1, 16, 16, 3)))["params"])
  path = str(tmp_path / "teacher.npz")
  save_npz_params(path, tp)
  c = _cfg(f"size=tiny,degrade_p=0,align=1.0,teacher={path}")
  c.model.align_hidden = 8
  task = DetailFlowTokenizerTask(c)
  assert (task._teacher.width, task._teacher.num_heads, task._teacher.mlp_dim,
          task._teacher.patch_size, c.model.align_dim) == (12, 2, 24, 4, 12)
  params, state = nn.unbox(task.init(jax.random.key(0)))
  state = task.load_frozen(state)   # the file's weights (init gives random ones of its shapes)
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1)) * 2 - 1
  feats = task._teacher_feats(state, {"image": x}, x)
  np.testing.assert_allclose(feats, tower.apply({"params": tp}, jnp.repeat(x, 3, -1)), rtol=1e-6)
  loss, (m, _) = jax.jit(task.loss)(params, state, {"image": x}, jax.random.key(3), 0)
  np.testing.assert_allclose(float(loss), float(m["rec_mse"] + m["bottleneck_loss"] +
                                                m["align_loss"]), rtol=1e-5)
  assert -1 <= float(m["align_loss"]) <= 1
  z0 = jax.random.normal(jax.random.key(4), (4, c.model.code_dim))
  pred = task.model.apply({"params": params["gen"]}, z0, method="align")
  assert pred.shape == (4, 12) and float(alignment_loss(pred, feats)) != 0
  c.model.align_dim = 8
  with pytest.raises(ValueError, match=r"align_dim=8: the alignment teacher .* is 12 wide"):
    DetailFlowTokenizerTask(c)


@pytest.mark.parametrize("term", ["none", "lpips", "adv", "align"])
def test_each_loss_term_on_off(term, tmp_path):
  from tdjax.tasks.detailflow_tokenizer import DetailFlowTokenizerTask
  kw = {}
  if term == "lpips":
    from tdjax.losses.lpips import LPIPS
    from tdjax.losses.weights import expected_params, save_npz_params
    widths = (4, 4, 4, 4, 4)
    lp = expected_params(LPIPS(widths=widths), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)))
    lp = jax.tree.map(lambda s: np.random.RandomState(0).rand(*s.shape).astype(np.float32), lp)
    save_npz_params(str(tmp_path / "lpips.npz"), lp)
    kw = dict(lpips_weight=0.5, lpips_weights=str(tmp_path / "lpips.npz"),
              lpips_kwargs=dict(widths=widths))
  elif term == "adv":
    kw = dict(adv_weight=0.1, adv_start=5, disc="patchgan", disc_kwargs=dict(ndf=4, n_layers=2),
              disc_input_size=32, lecam_weight=0.1, cr_weight=0.5)
  elif term == "align":
    kw = dict(align_weight=1.0, align_from_batch=True)
  c = _cfg(**kw)
  if term == "align":
    c.model.align_dim = 8
    c.model.align_hidden = 8
  task = DetailFlowTokenizerTask(c)
  params, state = nn.unbox(task.init(jax.random.key(0)))
  batch = {"image": jax.random.uniform(jax.random.key(1), (4, 16, 16, 1)) * 2 - 1}
  if term == "align":
    batch["teacher_feats"] = jax.random.normal(jax.random.key(2), (4, 8))
  if term != "adv":
    loss, (m, _) = jax.jit(task.loss)(params, state, batch, jax.random.key(3), 0)
  else:
    def both(p, step):   # full loss, and the generator's gradient without the D term
      (l, (mm, _)), g = jax.value_and_grad(task.loss, has_aux=True)(
          p, state, batch, jax.random.key(3), step)
      g_only = jax.grad(lambda q: (lambda r: r[0] - r[1][0]["d_loss"])(
          task.loss(q, state, batch, jax.random.key(3), step)))(p)
      d_only = jax.grad(lambda q: task.loss(q, state, batch, jax.random.key(3), step)[1][0][
          "d_loss"])(p)
      return l, mm, g, (g_only, d_only)
    f = jax.jit(both)
    loss, m, grads, (g2, gd) = f(params, jnp.int32(10))
  base = float(m["rec_mse"] + m["bottleneck_loss"])
  keys = {"lpips": "lpips", "adv": "g_loss", "align": "align_loss"}
  for other, key in keys.items():
    assert (key in m) == (other == term)
  if term == "none":
    np.testing.assert_allclose(float(loss), base, rtol=1e-5)
    assert task.param_groups(params) is None
  elif term == "lpips":
    np.testing.assert_allclose(float(loss), base + 0.5 * float(m["lpips"]), rtol=1e-5)
    assert float(m["lpips"]) > 0
  elif term == "align":
    np.testing.assert_allclose(float(loss), base + float(m["align_loss"]), rtol=1e-5)
  elif term == "adv":
    np.testing.assert_allclose(float(loss), base + 0.1 * float(m["g_loss"]) + float(m["d_loss"]),
                               rtol=1e-5)
    assert float(m["d_loss"]) != 0 and float(m["g_loss"]) != 0
    groups = task.param_groups(params)
    assert set(jax.tree.leaves(groups)) == {"gen", "disc"}
    assert float(optax.tree.norm(grads["disc"])) > 0
    # the generator's gradient excludes the D term (stop_gradient on the cross terms)
    np.testing.assert_allclose(optax.tree.norm(g2["gen"]), optax.tree.norm(grads["gen"]),
                               rtol=1e-4)
    # and the discriminator's gradient is the D term's only
    np.testing.assert_allclose(optax.tree.norm(gd["disc"]), optax.tree.norm(grads["disc"]),
                               rtol=1e-4)
    # before adv_start (= 5) there is no adversarial term; same compiled function
    _, m0, g0, _ = f(params, jnp.int32(0))
    assert float(m0["g_loss"]) == 0 and float(m0["d_loss"]) == 0
    assert float(optax.tree.norm(g0["disc"])) == 0



def test_discriminator_sees_real_and_fake_in_separate_calls_and_its_state_always_advances():
  """Reference VQLoss: D(real) and D(fake) are separate forward passes, so with batch norm the real
  logits do not depend on the fake batch; D's running statistics and the LeCAM EMAs advance on
  every step, before adv_start too (the D loss itself is zero then).  The loss composition
  itself is checked against the reference's VQLoss in tests/test_reference_repos.py."""
  from tdjax.tasks.detailflow_tokenizer import DetailFlowTokenizerTask
  task = DetailFlowTokenizerTask(_cfg(adv_weight=0.2, adv_start=5, disc="patchgan",
                            disc_kwargs=dict(ndf=4, n_layers=2), disc_input_size=0,
                            lecam_weight=0.1, cr_weight=4.0, diffaug_prob=0.0))
  params, state = nn.unbox(task.init(jax.random.key(0)))
  plan, t = task.plan, task.N
  x = jax.random.uniform(jax.random.key(1), (4, 16, 16, 1)) * 2 - 1

  @jax.jit
  def run(codes, step):
    return task._image_losses(plan.branches[0], plan.matrices[0], params, state, codes, t,
                              plan.row_of_t[t], x, jnp.ones(4), step, jax.random.key(2))

  codes = jax.random.normal(jax.random.key(3), (4, t, 4))
  out_a, new_a = run(codes, 10)
  out_b, _ = run(2.0 * codes[::-1], 10)
  assert float(out_a["logits_fake"]) != float(out_b["logits_fake"])
  np.testing.assert_allclose(float(out_a["logits_real"]), float(out_b["logits_real"]), rtol=1e-6)
  out0, new0 = run(codes, 0)                       # before adv_start
  assert float(out0["d_loss"]) == 0 and float(out0["g_loss"]) == 0
  assert float(new0["lecam"]["real"]) != 0 and float(new0["lecam"]["fake"]) != 0
  mean0 = new0["disc"]["batch_stats"]["norm1"]["mean"]
  assert float(jnp.abs(mean0 - state["disc"]["batch_stats"]["norm1"]["mean"]).max()) > 0

def _count_ops(jaxpr, name, inside_cond=False):
  """(outside any cond, inside cond branches) counts of primitive `name` in a closed jaxpr."""
  out = inside = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == name:
      inside, out = (inside + 1, out) if inside_cond else (inside, out + 1)
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          o, i = _count_ops(sub, name, inside_cond or eqn.primitive.name == "cond")
          out, inside = out + o, inside + i
  return out, inside


def test_fixed_size_discriminator_runs_once_after_the_decoder_branches(monkeypatch):
  """When D sees a fixed size (DINO: 224; here disc_input_size), the decoder branches of the
  resolution switch return D's views and D's passes run once after the switch: the same loss,
  gradients and D state as running them inside every branch, with no D op left in a branch."""
  from tdjax.tasks.detailflow_tokenizer import DetailFlowTokenizerTask
  task = DetailFlowTokenizerTask(_cfg("size=tiny,degrade_p=0.5", adv_weight=0.2, disc="patchgan",
                            disc_kwargs=dict(ndf=4, n_layers=2), disc_input_size=16,
                            lecam_weight=0.1, cr_weight=4.0))
  n_branch = len(task.plan.branches)
  assert n_branch > 1 and task._disc_size() == 16
  params, state = nn.unbox(task.init(jax.random.key(0)))
  batch = {"image": jax.random.uniform(jax.random.key(1), (4, 16, 16, 1)) * 2 - 1}
  def trace():   # a new function each time: jax caches traces by function
    f = lambda p, rng: jax.value_and_grad(task.loss, has_aux=True)(p, state, batch, rng, 10)
    return (jax.make_jaxpr(f)(params, jax.random.key(2)),
            [jax.jit(f)(params, jax.random.key(k)) for k in range(4)])
  jaxpr, results = trace()
  with monkeypatch.context() as mp:   # D inside every branch, as for a decoded-size D
    mp.setattr(task, "_disc_size", lambda: None)
    jaxpr_in, results_in = trace()
  assert len({float(r[0][1][0]["dec_res"]) for r in results}) > 1   # several branches ran
  for ((l, (m, st)), g), ((l2, (m2, st2)), g2) in zip(results, results_in):
    np.testing.assert_allclose(float(l), float(l2), rtol=1e-5)
    for k in ("g_loss", "d_loss", "cr", "lecam"):
      np.testing.assert_allclose(float(m[k]), float(m2[k]), rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6), g, g2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 st["disc"], st2["disc"])
  d_convs, branch_convs = _count_ops(jaxpr, "conv_general_dilated")
  _, branch_convs_in = _count_ops(jaxpr_in, "conv_general_dilated")
  assert d_convs > 0    # D's convolutions (5 passes, forward and backward), outside the switch
  assert branch_convs_in - branch_convs == n_branch * d_convs


def _fashion_mnist(n=16):
  path = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"
  if not os.path.exists(path):
    pytest.skip("Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  dims = np.frombuffer(data[4:4 + 4 * ndim], ">u4")
  imgs = np.frombuffer(data[4 + 4 * ndim:], np.uint8).reshape(*dims)[:n]
  imgs = np.pad(imgs, ((0, 0), (2, 2), (2, 2)))[..., None]  # 28 -> 32
  return jnp.asarray(imgs, jnp.float32) / 127.5 - 1.0


def test_short_training_run_reduces_reconstruction_loss():
  """60 Adam steps on a fixed batch of real images, with prefix degradation (lax.switch over the
  decoder resolutions) and self-correction on."""
  from tdjax.tasks.detailflow_tokenizer import DetailFlowTokenizerTask
  c = get_config("size=tiny,degrade_p=0.2,tokens=16,group=4,patch=8")
  task = DetailFlowTokenizerTask(c)
  assert len(task.plan.branches) > 1
  params, state = nn.unbox(task.init(jax.random.key(0)))
  batch = {"image": _fashion_mnist(16)}
  tx = optax.adam(2e-3, b1=0.9, b2=0.95)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, state, i):
    (l, (m, state)), g = jax.value_and_grad(task.loss, has_aux=True)(
        params, state, batch, jax.random.fold_in(jax.random.key(1), i), i)
    u, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, u), opt, state, m

  evaluate = jax.jit(task.eval_metrics)
  before = evaluate(params, state, batch, jax.random.key(0))
  for i in range(60):
    params, opt, state, m = step(params, opt, state, i)
  after = evaluate(params, state, batch, jax.random.key(0))
  assert float(after["mse"]) < 0.6 * float(before["mse"]), (before, after)
  assert float(after["psnr"]) > float(before["psnr"]) + 2
  assert 0 < float(after["codebook_usage"]) <= 1
  imgs = jax.jit(task.images)(params, state, batch, jax.random.key(0))
  n = len(task.prefix_lengths_for_strip())
  assert imgs["coarse_to_fine"].shape == (8, 32, 32 * n, 1)
  assert imgs["reconstructions"].shape == (8, 32, 32, 1)


def test_continuous_bottleneck_task_and_encode_fn():
  from tdjax.tasks.detailflow_tokenizer import DetailFlowTokenizerTask
  c = _cfg("size=tiny,degrade_p=0,bottleneck=continuous")
  c.model.kl_weight = 0.01
  task = DetailFlowTokenizerTask(c)
  params, state = nn.unbox(task.init(jax.random.key(0)))
  batch = {"image": jax.random.uniform(jax.random.key(1), (4, 16, 16, 1)) * 2 - 1}
  loss, (m, _) = jax.jit(task.loss)(params, state, batch, jax.random.key(3), 0)
  assert "vq_loss" not in m and "codebook_usage" not in m and float(m["bottleneck_loss"]) > 0
  assert float(m["sc_on"]) == 0
  np.testing.assert_allclose(float(loss), float(m["rec_mse"] + m["bottleneck_loss"]), rtol=1e-5)
  # VQ task: the AR-data encode function gives integer triplets within the vocabulary
  vq = DetailFlowTokenizerTask(_cfg())
  p2, _ = nn.unbox(vq.init(jax.random.key(0)))
  enc = vq.make_encode_fn(p2, views_per_batch=2)
  a, b = enc(np.asarray(batch["image"]), 2), enc(np.asarray(batch["image"]), 3)
  for x, y in zip(a, b):       # two views of the same batch share the noise draw
    assert x.shape == (4, 8) and x.dtype == np.int32 and x.max() < 32
    np.testing.assert_array_equal(x, y)


def test_second_pass_conditions_on_detached_noisy_prefix(tiny):
  m, v, x = tiny
  clean = jnp.zeros((2, 12), jnp.int32) + jnp.arange(12) % 32
  noisy = (clean + 7) % 32

  def new_latents(params, noisy_idx):
    _, _, q2, _ = m.apply(params, x, clean, noisy_idx, 4, 8, method="correct")
    return q2["z"]

  f = jax.jit(new_latents)
  a, b = f(v, clean), f(v, noisy)
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)     # causal: before the perturbation
  assert float(jnp.abs(a[:, 8:] - b[:, 8:]).max()) > 1e-5       # after it: conditioned on it
  # the prefix is detached: no gradient reaches the codebook through it
  g = jax.jit(jax.grad(lambda p: jnp.sum(new_latents(p, noisy) ** 3)))(v)
  assert float(jnp.abs(g["params"]["quantizer"]["codebook"]).max()) == 0.0
  assert float(jnp.abs(g["params"]["refine_proj"]["kernel"]).max()) > 0


def test_task_targets_are_degraded_images():
  """The switch branch of t compares the decoder output at dec_res(t) with area-down(R(t)) +
  bicubic-up of the image (docs/reference/detailflow.md 1.5), for token-level and group-level
  prefixes."""
  from tdjax.tasks.detailflow_tokenizer import DetailFlowTokenizerTask
  from tdjax.tokenizers.resolution import degraded_target
  c = _cfg("size=tiny,degrade_p=0.2")
  task = DetailFlowTokenizerTask(c)
  params, state = nn.unbox(task.init(jax.random.key(0)))
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 1)) * 2 - 1
  codes = jax.random.normal(jax.random.key(2), (2, 8, 4))
  plan = task.plan
  assert len({plan.dec_of[t] for t in (2, 4)}) == 2 and plan.dec_of[2] < 16
  for t in (2, 4):
    k = plan.branch_of_t[t]
    res = plan.branches[k]
    out, _ = jax.jit(lambda p: task._image_losses(res, plan.matrices[k], p, state, codes, t,
                                                  plan.row_of_t[t], x, jnp.ones(2), 0,
                                                  jax.random.key(0)))(params)
    rec = jax.jit(lambda p: task.model.apply({"params": p["gen"]}, codes[:, :t], res,
                                             method="decode"))(params)
    ref = jnp.mean((rec - degraded_target(x, t, 8, 4)) ** 2)
    np.testing.assert_allclose(float(out["mse"]), float(ref), rtol=1e-4)


# --- SigLIP2 encoder initialisation (docs/reference/detailflow.md 1.2) ----------------------------

def _siglip_file(tmp_path, depth=3):
  from tdjax.losses.alignment import ViTTeacher
  from tdjax.losses.weights import save_npz_params
  teacher = ViTTeacher(width=16, depth=depth, num_heads=2, mlp_dim=32, patch_size=4, pos_grid=4)
  x = jax.random.uniform(jax.random.key(3), (2, 16, 16, 3)) * 2 - 1
  tp = nn.unbox(teacher.init(jax.random.key(4), x))["params"]
  # non-trivial LayerNorm params so a swapped ln1/ln2 or post-LN mapping shows
  leaves, tdef = jax.tree.flatten(tp)
  tp = tdef.unflatten([a + 0.1 * jax.random.normal(jax.random.key(i), a.shape)
                       for i, a in enumerate(leaves)])
  path = str(tmp_path / "siglip2.npz")
  save_npz_params(path, tp)
  return path, tp, x


def _patch_features(m, x):
  """The encoder's patch-token outputs after the final LayerNorm (patches never see queries)."""
  from tdjax.tokenizers.detailflow import patchify
  gh = x.shape[1] // m.patch
  p = m.patch_embed(patchify(x, m.patch)) + m.enc_pos(gh, gh)[None]
  q = jnp.broadcast_to((m.latent_tokens + m.latent_pos_embed)[None], (x.shape[0],) + m.latent_tokens.shape)
  seq = m.encoder(jnp.concatenate([p, q], 1), jnp.asarray(encoder_mask(gh * gh, m.num_tokens, m.group)))
  return m.enc_norm(seq[:, :gh * gh])


@pytest.mark.parametrize("scan", [False, True])
def test_encoder_init_from_siglip2_reproduces_its_first_blocks(tmp_path, scan):
  from tdjax.losses.alignment import ViTTeacher
  from tdjax.tokenizers.siglip2 import init_encoder_from_siglip2
  path, tp, x = _siglip_file(tmp_path)
  kw = dict(TINY, channels=3, enc_width=16, enc_depth=2, enc_heads=2, enc_mlp=32, scan=scan)
  m = DetailFlowTokenizer(**kw)
  boxed = m.init(jax.random.key(1), x)["params"]
  params = nn.unbox(init_encoder_from_siglip2(boxed, path))
  assert isinstance(init_encoder_from_siglip2(boxed, path)["patch_embed"]["kernel"],
                    nn.LogicallyPartitioned)               # logical specs survive
  got = m.apply({"params": params}, x, method=_patch_features)
  # the same file read as a 2-block SigLIP2 tower (blocks_2 ignored)
  t2 = ViTTeacher(width=16, depth=2, num_heads=2, mlp_dim=32, patch_size=4, pos_grid=4)
  want = t2.apply({"params": {k: v for k, v in tp.items() if k != "blocks_2"}}, x)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # a file in the older teacher layout (blocks_i/ln1, ln2, attn/q, k, v, o) gives the same params
  old_names = {"norm1/ln": "ln1", "norm2/ln": "ln2", "attn/query": "attn/q", "attn/key": "attn/k",
               "attn/value": "attn/v", "attn/out": "attn/o"}
  old = {}
  with np.load(path) as f:
    for k in f.files:
      mod, _, leaf = k.rpartition("/")
      blk, _, sub = mod.partition("/")
      old[f"{blk}/{old_names[sub]}/{leaf}" if sub in old_names else k] = f[k]
  assert "blocks_0/attn/q/kernel" in old
  np.savez(str(tmp_path / "old.npz"), **old)
  jax.tree.map(np.testing.assert_array_equal,
               nn.unbox(init_encoder_from_siglip2(boxed, str(tmp_path / "old.npz"))), params)
  # untouched: query tables and the decoder keep their fresh init
  fresh = nn.unbox(boxed)
  np.testing.assert_array_equal(params["latent_tokens"], fresh["latent_tokens"])
  np.testing.assert_array_equal(params["to_pixel"]["kernel"], fresh["to_pixel"]["kernel"])


def test_encoder_init_from_siglip2_errors(tmp_path):
  from tdjax.losses.weights import WeightsError
  from tdjax.tokenizers.siglip2 import init_encoder_from_siglip2
  path, _, x = _siglip_file(tmp_path, depth=1)
  kw = dict(TINY, channels=3, enc_width=16, enc_depth=2, enc_heads=2, enc_mlp=32)
  params = DetailFlowTokenizer(**kw).init(jax.random.key(1), x)["params"]
  with pytest.raises(WeightsError, match="has 1 blocks, the tokenizer encoder needs 2"):
    init_encoder_from_siglip2(params, path)
  with pytest.raises(FileNotFoundError, match="nope.npz"):
    init_encoder_from_siglip2(params, str(tmp_path / "nope.npz"))
  path, _, x = _siglip_file(tmp_path, depth=2)
  wide = DetailFlowTokenizer(**dict(kw, enc_mlp=48)).init(jax.random.key(1), x)["params"]
  with pytest.raises(WeightsError, match=r"blocks_0/mlp/fc1/kernel.*\(16, 32\).*\(16, 48\)"):
    init_encoder_from_siglip2(wide, path)


def test_training_setup_starts_from_the_siglip2_encoder(tmp_path):
  """The loop reads the file on a fresh start (host side, sharded after init) for every copy."""
  from tdjax import parallel, trainer
  path, tp, _ = _siglip_file(tmp_path, depth=2)
  c = _cfg()
  c.input.channels = 3
  c.ema_decay = 0.99
  c.model.update(dict(enc_width=16, enc_depth=2, enc_heads=2, enc_mlp=32, encoder_init=path))
  mesh = parallel.make_mesh(dict(data=2, fsdp=2, tensor=1), devices=jax.devices()[:4])
  state = trainer.Setup(c, mesh).init_state()
  for tree in (state["params"], state["ema"]):
    np.testing.assert_allclose(tree["gen"]["encoder"]["blocks_1"]["block"]["mlp"]["fc2"]["kernel"],
                               tp["blocks_1"]["mlp"]["fc2"]["kernel"])
    np.testing.assert_allclose(tree["gen"]["enc_norm"]["ln"]["scale"], tp["post_ln"]["scale"])
  c.model.encoder_init = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="config.model.encoder_init.*missing.npz"):
    trainer.Setup(c, mesh)


def test_correction_every_k_steps_switches_the_branch():
  """correction_every=2: even steps are the reference (self-correction) loss, odd steps plain."""
  from tdjax.tasks.detailflow_tokenizer import DetailFlowTokenizerTask
  tasks = {}
  for name, upd in (("every2", dict(correction_every=2)), ("always", dict(correction_every=1)),
                    ("never", dict(self_correction=False))):
    c = _cfg("size=tiny")
    c.model.update(upd)
    tasks[name] = DetailFlowTokenizerTask(c)
  params, state = nn.unbox(tasks["always"].init(jax.random.key(0)))
  batch = {"image": jax.random.uniform(jax.random.key(1), (4, 16, 16, 1)) * 2 - 1}
  loss = {k: jax.jit(t.loss) for k, t in tasks.items()}
  for step, same_as in ((0, "always"), (1, "never"), (4, "always")):
    got, (m, _) = loss["every2"](params, state, batch, jax.random.key(3), step)
    want, _ = loss[same_as](params, state, batch, jax.random.key(3), step)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert set(m) >= {"sc_vq_loss", "noise_end"}
  a, _ = loss["always"](params, state, batch, jax.random.key(3), 1)
  b, _ = loss["never"](params, state, batch, jax.random.key(3), 1)
  assert abs(float(a) - float(b)) > 1e-6          # the two branches differ
  with pytest.raises(ValueError, match="correction_every=0"):
    c = _cfg("size=tiny")
    c.model.correction_every = 0
    DetailFlowTokenizerTask(c)


def test_branch_grads_equal_the_switch_inside_the_loss():
  """config.model.branch_grads: per-branch forward+backward in the loop == one switched loss.
  correction_every=2 covers both kinds of step (even: self-correction, odd: plain)."""
  from tdjax import parallel, trainer
  mesh = parallel.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
  batch = {"image": jax.random.uniform(jax.random.key(1), (4, 16, 16, 1)) * 2 - 1}
  out = {}
  for bg in (False, True):
    c = _cfg("size=tiny,degrade_p=0.5")
    # patch 8: two decoder resolutions (8, 16 px), so 2 x 2 branch losses to compile, not 4 x 2
    c.model.update(dict(branch_grads=bg, correction_every=2, patch=8))
    setup = trainer.Setup(c, mesh)
    assert setup.task.plan.branches == [8, 16]
    assert (setup.task.loss_branch(jax.random.key(0), 0) is not None) == bg
    step = jax.jit(setup.train_step)
    state, ms = setup.init_state(), []
    for _ in range(4):   # several steps: different prefixes t / resolutions / correction on-off
      state, m = step(state, batch)
      ms.append(m)
    out[bg] = (state, ms)
  np.testing.assert_allclose([float(m["loss"]) for m in out[True][1]],
                             [float(m["loss"]) for m in out[False][1]], rtol=1e-5)
  np.testing.assert_allclose([float(m["dec_res"]) for m in out[True][1]],
                             [float(m["dec_res"]) for m in out[False][1]])
  assert len({float(m["dec_res"]) for m in out[True][1]}) > 1    # really switched resolutions
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5),
               out[True][0]["params"], out[False][0]["params"])

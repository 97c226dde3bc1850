"""TransDiff: 1-step and MRAR AR transformer, masks, latent token order, weight surgery."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdjax import configlib

from tdjax.generators import transdiff as td

SMALL = dict(num_classes=10, latent_len=16, latent_dim=4, width=32, depth=2, num_heads=2,
             buffer_size=4)


def _init(m, refs=None):
  return nn.unbox(m.init(jax.random.key(0), jnp.zeros((2,), jnp.int32), refs))


def test_block_causal_mask():
  m = np.asarray(td.mrar_mask(6, 2))
  want = np.array([[1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                   [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(m, want)
  with pytest.raises(ValueError, match="not a multiple"):
    td.mrar_mask(7, 2)


def test_patchify_matches_reference_token_order():
  """Reference: latent NCHW -> (B,C,h,p,w,p) -> einsum nchpwq->nhwcpq -> (B, h*w, C*p*p)."""
  rng = np.random.default_rng(0)
  nchw = rng.normal(size=(2, 3, 4, 6)).astype(np.float32)
  for p in (1, 2):
    b, c, H, W = nchw.shape
    ref = nchw.reshape(b, c, H // p, p, W // p, p)
    ref = np.einsum("nchpwq->nhwcpq", ref).reshape(b, (H // p) * (W // p), c * p * p)
    got = td.patchify_latent(jnp.asarray(nchw.transpose(0, 2, 3, 1)), p)
    np.testing.assert_array_equal(got, ref)
    back = td.unpatchify_latent(got, p, H, W)
    np.testing.assert_array_equal(back, nchw.transpose(0, 2, 3, 1))


def test_one_step_shapes_and_label_dependence():
  m = td.TransDiffAR(**SMALL)
  v = _init(m)
  assert v["params"]["mask_token"].shape == (1, 32)
  assert v["params"]["z_proj"]["kernel"].shape == (4, 32)        # reference: dead Linear(C, D)
  a = m.apply(v, jnp.array([1, 2]))
  b = m.apply(v, jnp.array([1, 3]))
  assert a.shape == (2, 16, 32)
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)
  assert float(jnp.abs(a[1] - b[1]).min()) > 0          # every token sees the class (no mask)
  null = m.apply(v, jnp.array([1, 2]), drop=jnp.array([True, False]))
  np.testing.assert_allclose(null[0], m.apply(v, jnp.array([-1, 2]))[0], atol=1e-6)
  with pytest.raises(ValueError, match="no reference images"):
    m.apply(v, jnp.array([1, 2]), jnp.zeros((2, 1, 4, 16)))


def test_mrar_block_causal_independence_and_prefix_conditions():
  m = td.TransDiffAR(**SMALL, num_refs=3)
  refs = jax.random.normal(jax.random.key(1), (2, 3, 4, 16))
  v = _init(m, refs)
  assert m.seq_len == 4 + 4 * 4 and v["params"]["mask_token"].shape == (4, 32)
  base = m.apply(v, jnp.array([1, 2]), refs)
  assert base.shape == (2, 16, 32)                     # conditions for image k: first 4 (k + 1)
  changed = m.apply(v, jnp.array([1, 2]), refs.at[:, 1].add(1.0))   # ref 1 = block 3 of outputs
  np.testing.assert_allclose(changed[:, :8], base[:, :8], atol=1e-5)   # images 0, 1 unaffected
  assert float(jnp.abs(changed[:, 8:] - base[:, 8:]).min()) > 0        # images 2, 3 see it
  # sampling round k runs on the prefix only and gives the same conditions
  short = m.apply(v, jnp.array([1, 2]), refs[:, :1])
  np.testing.assert_allclose(short, base[:, :8], atol=1e-5)
  with pytest.raises(ValueError, match="MRAR refs have shape"):
    m.apply(v, jnp.array([1, 2]), jnp.zeros((2, 4, 4, 16)))
  with pytest.raises(ValueError, match="buffer_size == block"):
    td.TransDiffAR(**dict(SMALL, buffer_size=8), num_refs=3).init(
        jax.random.key(0), jnp.zeros((2,), jnp.int32), refs)


def test_weight_surgery_one_step_to_mrar():
  one = _init(td.TransDiffAR(**SMALL))["params"]
  mrar = _init(td.TransDiffAR(**SMALL, num_refs=3), jnp.zeros((2, 3, 4, 16)))["params"]
  out = td.mrar_from_one_step(one, mrar)
  np.testing.assert_array_equal(out["mask_token"], np.tile(one["mask_token"], (4, 1)))
  np.testing.assert_array_equal(out["z_proj"]["kernel"], mrar["z_proj"]["kernel"])   # re-init
  assert out["z_proj"]["kernel"].shape == (16, 32)
  jax.tree.map(np.testing.assert_array_equal, out["blocks"], one["blocks"])
  np.testing.assert_array_equal(out["class_emb"], one["class_emb"])
  for k in ("enc_pos", "diff_pos"):    # 3 references: the 1-step lengths exactly (4 + 16 = 4 + 4 x 4)
    np.testing.assert_array_equal(out[k], one[k])
  other = _init(td.TransDiffAR(**dict(SMALL, width=16, num_heads=2)))["params"]
  with pytest.raises(ValueError, match="weight surgery: parameter 'blocks'|weight surgery: parameter 'class_emb'"):
    td.mrar_from_one_step(other, mrar)


@pytest.mark.parametrize("refs", [1, 2, 5])
def test_weight_surgery_for_other_reference_counts(refs):
  """Fewer references than 3: shorter position tables take the 1-step's leading rows (the prefix
  the reference slices for a shorter sequence); more: rows past the 1-step length stay fresh."""
  one = _init(td.TransDiffAR(**SMALL))["params"]
  model = td.TransDiffAR(**SMALL, num_refs=refs)
  mrar = _init(model, jnp.zeros((2, refs, 4, 16)))["params"]
  out = td.mrar_from_one_step(one, mrar)
  for k, skip in (("enc_pos", 0), ("diff_pos", model.buffer_size)):
    n = min(len(one[k]), model.seq_len - skip)
    assert out[k].shape == mrar[k].shape == (model.seq_len - skip, 32)
    np.testing.assert_array_equal(out[k][:n], one[k][:n])
    np.testing.assert_array_equal(out[k][n:], mrar[k][n:])
  # the surgered params run the MRAR model
  cond = model.apply({"params": out}, jnp.arange(2), jnp.zeros((2, refs, 4, 16)))
  assert cond.shape == (2, 4 * (1 + refs), 32) and np.all(np.isfinite(cond))


# --- the training task ------------------------------------------------------------------------

def _task(arg):
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs.transdiff import get_config
  from tdjax.tasks import get_task
  return get_task(get_config(arg))


def _batch(task, b=8, key=0):
  k = task.num_refs + 1
  shape = (b, k, 16, 16, 1) if task.num_refs else (b, 16, 16, 1)
  x = jax.random.uniform(jax.random.key(key), shape) * 2 - 1
  return {"image": x, "label": jnp.arange(b) % 10}


@pytest.mark.parametrize("mrar", [False, True])
def test_short_run_loss_falls_and_samples(mrar, monkeypatch):
  from tdjax.diffusion import flow
  task = _task(f"size=tiny,mrar={mrar}")
  params = _train_tiny(task)
  calls = []
  orig = flow.euler_maruyama_sample
  monkeypatch.setattr(flow, "euler_maruyama_sample",
                      lambda *a, **k: calls.append(1) or orig(*a, **k))
  imgs = np.asarray(task.image_sampler(steps=4)(params, np.array([0, 3]), jax.random.key(1)))
  assert imgs.shape == (2, 16, 16, 1) and np.isfinite(imgs).all()
  # MRAR: K + 1 = 4 rounds, each its own sampling loop with its own condition length
  assert len(calls) == (task.num_refs + 1 if mrar else 1)


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_mrar_sampling_rounds_equal_the_masked_full_length_rounds(cfg):
  """MRAR sampling, round k conditioned on the k images before it (the AR reads k reference slots,
  the head M (k + 1) condition tokens) = every round at full length, all K reference slots read
  (zeros before they exist) and the later rounds' conditions masked in the head (tdjax's sampler
  before 2026-12-08, one fori_loop body): same images to float rounding.  This holds by the AR's
  block-causal mask (blocks 0..k do not see the later slots) and by masked keys getting zero
  attention; breaking either (or a round reading the wrong slots) fails it."""
  from tdjax.diffusion import flow
  task = _task("size=tiny,mrar=True")
  params = nn.unbox(task.init(jax.random.key(0))[0])
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])   # the zero final layer too
  labels = jnp.array([0, 3, 7])
  rng = jax.random.key(2)
  got = jax.jit(lambda p: task.sample_latents(p, labels, rng, cfg=cfg, steps=5))(params)

  def masked(params):
    b, m, k_all = labels.shape[0], task.ar.mask_len, task.num_refs
    k_noise, k_s = jax.random.split(rng)
    noise = jax.random.normal(k_noise, (b, task.L, task.latent_dim))
    refs = jnp.zeros((b, k_all, m, task.latent_dim * task.ar.ref_patch ** 2))
    for rnd in range(k_all + 1):
      ar = lambda lab: task.ar.apply({"params": params["ar"]}, lab, refs)
      z = ar(labels) if cfg == 1 else jnp.concatenate([ar(labels), ar(jnp.full_like(labels, -1))])
      assert z.shape[1] == m * (1 + k_all)
      mask = jnp.broadcast_to(jnp.arange(z.shape[1]) < m * (rnd + 1), z.shape[:2])
      vf = ((lambda x, t: task._head(params, x, t, z, mask)) if cfg == 1 else
            (lambda x, t: tuple(jnp.split(task._head(params, jnp.concatenate([x, x]),
                                                     jnp.concatenate([t, t]), z, mask), 2))))
      x = flow.euler_maruyama_sample(vf, noise, jax.random.fold_in(k_s, rnd), steps=5, cfg=cfg)
      if rnd < k_all:
        grid = x.reshape(b, task.grid, task.grid, task.latent_dim)
        refs = refs.at[:, rnd].set(td.patchify_latent(grid, task.ar.ref_patch))
    return x.reshape(got.shape)

  want = jax.jit(masked)(params)
  assert float(jnp.abs(want).mean()) > 0.1
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=5e-5)


def test_mlp_head_with_ddpm_trains_and_samples(monkeypatch):
  """MAR's baseline: per-token MLP head, DDPM hybrid loss, respaced ancestral sampling."""
  from tdjax.diffusion import ddpm
  task = _task("size=tiny,head=mlp,diffusion=ddpm,temperature=0.9")
  assert task.head.out_channels == 2 * task.latent_dim           # eps + learned-range variance
  params = _train_tiny(task)
  seen = []
  orig = ddpm.p_sample_loop
  monkeypatch.setattr(ddpm, "p_sample_loop",
                      lambda s, *a, **k: seen.append((s.num_steps, k["temperature"],
                                                      k["clip_denoised"])) or orig(s, *a, **k))
  imgs = np.asarray(task.image_sampler(steps=7)(params, np.array([0, 3]), jax.random.key(1)))
  assert imgs.shape == (2, 16, 16, 1) and np.isfinite(imgs).all()
  # pixel-patch latents lie in [-1, 1]: x0 predictions are clipped unless the caller says not
  assert seen == [(7, 0.9, True)]
  task.image_sampler(steps=3, clip_denoised=False)(params, np.array([0]), jax.random.key(1))
  assert seen[-1] == (3, 0.9, False)
  assert set(task.sample_options) == {"cfg", "steps", "temperature", "clip_denoised"}


def _train_tiny(task, steps=60):
  import optax
  params, _ = task.init(jax.random.key(0))
  params = nn.unbox(params)
  batch = _batch(task)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, i):
    (l, _), g = jax.value_and_grad(task.loss, has_aux=True)(p, {}, batch, jax.random.key(i), i)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l

  losses = []
  for i in range(steps):
    params, opt, l = step(params, opt, i)
    losses.append(float(l))
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
  return params


def test_mrar_loss_conditions_image_k_on_its_prefix():
  """Changing the last image of a group changes only its own term: it is never a reference."""
  task = _task("size=tiny,mrar=True")
  params = nn.unbox(task.init(jax.random.key(0))[0])
  batch = _batch(task, 4)
  # params go in as jit arguments, as in the trainer: closed over, they become constants, and
  # XLA:CPU (jaxlib 0.10.2) miscompiles the zero-initialised final linear folded into a
  # broadcast scalar (a dot against broadcast(0) inside a fusion): the loss came out inf or
  # 1e20 in about half of the compilations
  loss = jax.jit(lambda p, b: task._losses(p, b, jax.random.key(5), False)[0])
  f = lambda b: loss(params, b)
  base = f(batch)
  later = dict(batch, image=batch["image"].at[:, 3].add(0.5))
  earlier = dict(batch, image=batch["image"].at[:, 0].add(0.5))
  assert np.isfinite(float(base))
  assert float(f(later)) != float(base) and float(f(earlier)) != float(base)
  # the head sees only image k's prefix of the conditions (its final linear made non-zero, else
  # its output is 0 whatever the conditions)
  fl = params["head"]["final_linear"]
  ph = dict(params, head=dict(params["head"], final_linear=dict(
      fl, kernel=jax.random.normal(jax.random.key(3), fl["kernel"].shape))))
  m = task.ar.mask_len
  x = jax.random.normal(jax.random.key(1), (2, task.L, task.latent_dim))
  t = jnp.array([0.3, 0.7])
  cond = jax.random.normal(jax.random.key(2), (2, 4 * m, task.ar.width))
  later_cond = cond.at[:, m:].add(1.0)                 # every token after image 0's prefix
  head = jax.jit(lambda p, c, mask: task._head(p, x, t, c, mask))
  prefix = jnp.arange(4 * m)[None] < jnp.array([[m], [4 * m]])
  out, out2 = head(ph, cond, prefix), head(ph, later_cond, prefix)
  np.testing.assert_allclose(out2[0], out[0], atol=1e-5)          # image 0: prefix M only
  assert float(jnp.abs(out2[1] - out[1]).max()) > 1e-3            # image 3: all 4 M
  # fewer references (the ablation's refs=): groups of refs + 1 images, the same prefix rule
  task2 = _task("size=tiny,mrar=True,refs=2")
  assert task2.num_refs == 2 and task2.config.input.group_size == 3
  p2 = nn.unbox(task2.init(jax.random.key(0))[0])
  b2 = _batch(task2, 3)
  loss2 = jax.jit(lambda p, b: task2._losses(p, b, jax.random.key(5), False)[0])
  f2 = lambda b: loss2(p2, b)
  base2 = f2(b2)
  assert np.isfinite(float(base2))
  assert float(f2(dict(b2, image=b2["image"].at[:, 2].add(0.5)))) != float(base2)
  with pytest.raises(ValueError, match="needs input.group_size=4"):
    from configs.transdiff import get_config
    from tdjax.tasks.transdiff import TransDiffTask
    c = get_config("size=tiny,mrar=True")
    c.input.group_size = 2
    TransDiffTask(c)


def test_fewer_conditions_than_latent_tokens():
  """TransDiff-L 512's layout (docs/reference/transdiff.md 1.2, 4.4: `seq_len` stays 256 while the
  decoder denoises 1024 latent tokens): model.cond_tokens = 4 AR slots for the 16 latent tokens of
  the tiny model; the loss and the sampler run the decoder on all 16, cross-attending to 4."""
  from configs.transdiff import get_config
  from tdjax.tasks.transdiff import TransDiffTask
  c = get_config("size=tiny")
  c.model.cond_tokens = 4
  task = TransDiffTask(c)
  params = nn.unbox(task.init(jax.random.key(0))[0])
  assert task.L == 16 and task.ar.mask_len == 4 and task.ar.seq_len == 4 + 4
  assert params["ar"]["diff_pos"].shape == (4, 32) and params["head"]["pos_embed"].shape == (16, 32)
  z = task.ar.apply({"params": params["ar"]}, jnp.arange(2))
  assert z.shape == (2, 4, 32)
  loss = jax.jit(lambda p, b: task._losses(p, b, jax.random.key(5), False)[0])(params, _batch(task))
  assert np.isfinite(float(loss))
  sample = jax.jit(lambda p: task.sample_latents(p, jnp.arange(2), jax.random.key(1), cfg=1.5,
                                                 steps=3))
  assert sample(params).shape == (2, 4, 4, 16)
  c = get_config("size=tiny,mrar=True")
  c.model.cond_tokens = 4
  with pytest.raises(ValueError, match="MRAR conditions are L / p"):
    TransDiffTask(c)


def test_train_then_sample_from_the_checkpoint(tmp_path):
  """The loop trains a tiny TransDiff; the sampling CLI rebuilds it from the checkpoint alone."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs.transdiff import get_config
  from tdjax import sample, trainer
  c = get_config("size=tiny,steps=6")
  c.input.image_size, c.log_every, c.eval_every, c.ckpt_every = 16, 3, 6, 6
  trainer.train_and_evaluate(c, str(tmp_path))
  images, labels, _ = sample.generate(str(tmp_path), "0,7", 2, batch_size=4, steps=3, cfg=1.5)
  assert images.shape == (4, 16, 16, 1) and labels.tolist() == [0, 0, 7, 7]
  assert np.abs(images).max() <= 1
  with pytest.raises(ValueError, match="--top_k does not apply to a 'transdiff' model"):
    sample.generate(str(tmp_path), "0", 1, top_k=5)
  with pytest.raises(ValueError, match="out of range; the model has 10 classes"):
    sample.generate(str(tmp_path), "12", 1)
  # the same samples on 1 device, split over 8 devices, and split over 2 processes (simulated in
  # turn: process 1 writes its parts, process 0 writes its own and gathers the rest)
  kw = dict(batch_size=8, steps=2, cfg=1.5)
  one, _, _ = sample.generate(str(tmp_path), "0,3,7", 8, devices=jax.devices()[:1], **kw)
  eight, _, _ = sample.generate(str(tmp_path), "0,3,7", 8, **kw)
  assert len(sample.sampling_devices(8)) == 8 and len(sample.sampling_devices(12)) == 6
  np.testing.assert_allclose(eight, one, atol=1e-5)
  parts = str(tmp_path / "parts")
  none, _, _ = sample.generate(str(tmp_path), "0,3,7", 8, parts_dir=parts, process_index=1,
                               process_count=2, **kw)
  assert none is None and len([f for f in os.listdir(parts) if f.endswith(".npy")]) == 1
  both, labels, _ = sample.generate(str(tmp_path), "0,3,7", 8, parts_dir=parts, process_index=0,
                                    process_count=2, **kw)
  np.testing.assert_allclose(both, one, atol=1e-5)
  assert labels.tolist() == [0] * 8 + [3] * 8 + [7] * 8
  with pytest.raises(ValueError, match="writes parts to shared storage"):
    sample.generate(str(tmp_path), "0", 8, process_index=0, process_count=2, **kw)


def test_mrar_fine_tune_starts_from_a_one_step_run(tmp_path):
  """model.init_from: the MRAR run's initial weights are the 1-step run's EMA weights after the
  weight surgery (mask token tiled, z_proj fresh); the head is copied."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs.transdiff import get_config
  from tdjax import parallel, runs, trainer
  c = get_config("size=tiny,steps=4")
  c.input.image_size, c.log_every, c.eval_every, c.ckpt_every = 16, 2, 4, 4
  one_dir = str(tmp_path / "one")
  trainer.train_and_evaluate(c, one_dir)
  _, _, one = runs.load_state(one_dir)
  m = get_config(f"size=tiny,mrar=True,init_from={one_dir}")
  m.input.image_size = 16
  setup = trainer.Setup(m, parallel.make_mesh({"data": -1}))
  state = jax.device_get(setup.init_state())
  ema = jax.device_get(one["ema"])
  np.testing.assert_array_equal(state["params"]["ar"]["blocks"]["blocks_0"]["block"]["attn"]["query"]["kernel"]
                                if "blocks_0" in state["params"]["ar"]["blocks"] else
                                jax.tree.leaves(state["params"]["ar"]["blocks"])[0],
                                ema["ar"]["blocks"]["blocks_0"]["block"]["attn"]["query"]["kernel"]
                                if "blocks_0" in ema["ar"]["blocks"] else
                                jax.tree.leaves(ema["ar"]["blocks"])[0])
  tok = state["params"]["ar"]["mask_token"]
  assert tok.shape[0] == 4 and np.all(tok == ema["ar"]["mask_token"][0])
  jax.tree.map(np.testing.assert_array_equal, state["params"]["head"], ema["head"])
  jax.tree.map(np.testing.assert_array_equal, state["ema"], state["params"])
  assert not np.allclose(state["params"]["ar"]["z_proj"]["kernel"].shape,
                         ema["ar"]["z_proj"]["kernel"].shape)
  with pytest.raises(ValueError, match="init_from: a 1-step run starts MRAR"):
    get_config(f"size=tiny,init_from={one_dir}")


@pytest.mark.parametrize("arg,want", [
    ("size=B", (1.30, 0.87, 0.91)), ("size=L", (1.30, 0.89, 0.95)), ("size=H", (1.23, 0.87, 0.93)),
    ("size=B,mrar=True", (1.30, 0.87, 0.91)), ("size=L,mrar=True", (1.30, 0.925, 0.95)),
    ("size=H,mrar=True", (1.28, 0.87, 0.91)), ("size=L,res=512,init_from=/w", (1.30, 0.87, 0.87)),
    ("size=H,cfg=1.5,scale_1=0.9", (1.5, 0.87, 0.9))])
def test_paper_sizes_sample_with_the_published_settings(arg, want):
  """Reference 4.4's cfg / scale_0 / scale_1 per model (before, every size had TransDiff-L's);
  the config args still override them."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs.transdiff import get_config
  s = get_config(arg).sample
  assert (s.cfg, s.scale_0, s.scale_1) == want


@pytest.mark.parametrize("arg,epochs,warm,lr", [
    ("size=L", 800, 100, 8e-4), ("size=L,mrar=True,init_from=/w", 40, 10, 5e-5),
    ("size=L,res=512,init_from=/w", 150, 10, 1e-4)])
def test_paper_schedules(arg, epochs, warm, lr):
  """Reference 4.3 / stage commands: epochs of ImageNet at batch 2048 and the warm-up epochs
  (before, a 5 % warm-up everywhere: 40 epochs instead of 100 for stage 1)."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs.transdiff import get_config
  c = get_config(arg)
  per_epoch = 1281167 / c.input.batch_size
  assert c.input.batch_size == 2048 and c.optimizer.lr == lr
  assert abs(c.total_steps / per_epoch - epochs) < 0.01
  assert abs(c.optimizer.warmup_steps / per_epoch - warm) < 0.01


@pytest.mark.parametrize("head", ["attention", "mlp"])
def test_weight_decay_spares_the_diffusion_head(head):
  """Reference 4.3 (and MAR): AdamW's decay 0.02 on the AR's matrices, none on any parameter of
  the diffusion head ('diffdecoder' / 'diffloss' in the reference's names)."""
  from tdjax import optim
  task = _task(f"size=tiny,head={head}")
  params = nn.unbox(task.init(jax.random.key(0))[0])
  task.config.optimizer.warmup_steps = 0    # lr > 0 at the first update
  tx = optim.make_optimizer(task.config)
  zero = jax.tree.map(jnp.zeros_like, params)
  upd, _ = jax.jit(tx.update)(zero, tx.init(params), params)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(upd["head"]))
  decayed = [float(jnp.abs(u).max()) > 0 for u, p in zip(jax.tree.leaves(upd["ar"]),
                                                          jax.tree.leaves(params["ar"]))
             if p.ndim >= 2 and float(jnp.abs(p).max()) > 0]   # (zero-initialised: no decay)
  assert decayed and all(decayed)


def test_resolution_transfer_trains_the_decoder_under_the_frozen_one_step_ar(tmp_path):
  """Reference stage 2b (512 px from the 256 px run, `--only_train_diff`), at 16 -> 32 px: the
  AR keeps the source's 16 condition slots and weights (its EMA), the decoder denoises 64 tokens
  and starts from the source's with its position table resized; training moves the decoder only,
  and the model samples 32 px images."""
  import os
  import sys
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
  from configs.transdiff import get_config
  from tdjax import parallel, runs, trainer
  from tdjax.nn import resize_pos_grid
  c = get_config("size=tiny,steps=4")
  c.log_every, c.eval_every, c.ckpt_every = 2, 4, 4
  one_dir = str(tmp_path / "one")
  trainer.train_and_evaluate(c, one_dir)
  _, _, one = runs.load_state(one_dir)
  ema = jax.device_get(one["ema"])
  hi = get_config(f"size=tiny,res=32,init_from={one_dir},steps=3")
  hi.log_every, hi.eval_every, hi.ckpt_every = 1, 3, 3
  assert hi.model.head_only and hi.input.image_size == 32
  setup = trainer.Setup(hi, parallel.make_mesh({"data": -1}))
  assert (setup.task.L, setup.task.ar.latent_len) == (64, 16)
  start = jax.device_get(setup.init_state())["params"]
  jax.tree.map(np.testing.assert_array_equal, start["ar"], ema["ar"])
  np.testing.assert_allclose(start["head"]["pos_embed"],
                             resize_pos_grid(ema["head"]["pos_embed"], (4, 4), (8, 8)), atol=1e-6)
  assert start["head"]["pos_embed"].shape == (64, ema["head"]["pos_embed"].shape[1])
  jax.tree.map(np.testing.assert_array_equal,
               {k: v for k, v in start["head"].items() if k != "pos_embed"},
               {k: v for k, v in ema["head"].items() if k != "pos_embed"})
  hi_dir = str(tmp_path / "hi")
  trainer.train_and_evaluate(hi, hi_dir)
  _, task, end = runs.load_state(hi_dir)
  end = jax.device_get(end)
  jax.tree.map(np.testing.assert_array_equal, end["params"]["ar"], start["ar"])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), end["params"]["head"],
                       start["head"])
  assert min(jax.tree.leaves(moved)) > 0
  z = task.sample_latents(end["ema"], jnp.arange(2), jax.random.key(0), cfg=1.5, steps=4)
  assert task._to_images(z).shape == (2, 32, 32, 1)
  # the same run trains both with head_only=False; a frozen AR needs a source
  assert not get_config(f"size=tiny,res=32,init_from={one_dir},head_only=False").model.head_only
  bad = get_config("size=tiny")
  bad.model.head_only = True
  with pytest.raises(ValueError, match="head_only=True .* needs model.init_from"):
    trainer.Setup(bad, parallel.make_mesh({"data": -1}))
  with pytest.raises(ValueError, match="init_from: a 1-step run starts MRAR"):
    get_config(f"size=tiny,init_from={one_dir}")


def test_vae_latents_train_and_decode(tmp_path):
  """latent.kind='vae': images -> KL VAE posterior samples x scale in the step; samples decoded by
  the same VAE.  A cached-latent config whose VAE gives another grid is refused by name."""
  from tdjax.tokenizers import kl_vae
  vae = kl_vae.AutoencoderKL(kl_vae.DEMO)
  path = str(tmp_path / "vae.npz")
  kl_vae.save_params(vae.init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))["params"], path)
  task = _task(f"size=demo,latent=vae,vae_weights={path},steps=2,batch=4")
  task.config.head.depth = 1
  assert (task.grid, task.latent_dim, task.L) == (8, 4, 64)
  params = nn.unbox(task.init(jax.random.key(0))[0])
  batch = {"image": jax.random.uniform(jax.random.key(1), (4, 32, 32, 1)) * 2 - 1,
           "label": jnp.arange(4)}
  loss, _ = jax.jit(lambda p: task.loss(p, {}, batch, jax.random.key(2), 0))(params)
  assert np.isfinite(float(loss))
  z = task._to_latent(batch["image"])        # the posterior mean x scale without a key
  mean, _ = vae.apply({"params": task.vae_params}, batch["image"], method="encode")
  np.testing.assert_allclose(np.asarray(z), np.asarray(mean) * kl_vae.DEMO.scale, atol=1e-5)
  images = task.image_sampler(steps=2)(params, jnp.arange(2), jax.random.key(3))
  assert images.shape == (2, 32, 32, 1)
  from tdjax.tasks.transdiff import TransDiffTask
  with pytest.raises(ValueError, match="the VAE gives 8x8x4 latents at 32 px, the config's cached "
                                       "latents are 8x8x16"):
    TransDiffTask(configlib.load_config("transdiff", f"size=demo,latent=cached,vae_weights={path}",
                                        {"latent.channels": 16}))
  with pytest.raises(ValueError, match="needs latent.vae_weights"):
    _task("size=demo,latent=vae")


def _reachable(hlo: str, root: str) -> str:
  """The text of computation `root` of an HLO module and of every computation it calls."""
  comps = {}
  for c in re.split(r"\n(?=\S)", hlo):
    words = c.split(" ", 2)
    comps[words[1] if words[0] == "ENTRY" else words[0]] = c
  seen, todo = set(), [root]
  while todo:
    name = todo.pop()
    if name in seen or name not in comps:
      continue
    seen.add(name)
    todo += re.findall(r"(?:calls|body|condition|to_apply)=(%[\w.\-]+)", comps[name])
    for group in re.findall(r"(?:calls|branch_computations)=\{([^}]*)\}", comps[name]):
      todo += [g.strip() for g in group.split(",")]
  return "\n".join(comps[n] for n in seen)


@pytest.mark.parametrize("arg", ["size=tiny", "size=tiny,mrar=True"])
def test_sampler_projects_the_condition_once_per_image_not_per_step(arg):
  """The condition (the AR's tokens) is the same at every Euler step of an image: the compiled
  sampler embeds it and projects the cross-attention's keys / values outside the step loop
  (XLA's while-loop invariant code motion; the reference recomputes them every step), while the
  queries, which read x_t, stay inside.  Looked up by op name in the compiled HLO."""
  task = _task(arg)
  params = jax.eval_shape(lambda k: nn.unbox(task.init(k)[0]), jax.random.key(0))
  steps = 7
  fn = jax.jit(lambda p, lab, k: task.sample_latents(p, lab, k, cfg=2.0, steps=steps))
  hlo = fn.lower(params, jnp.arange(4, dtype=jnp.int32), jax.random.key(1)).compile().as_text()
  loops = re.findall(r"while\(.*?body=(%[\w.\-]+).*?\"known_trip_count\":\{\"n\":\"(\d+)\"", hlo)
  bodies = [body for body, n in loops if int(n) == steps - 1]    # the Euler-Maruyama step loop
  assert bodies, "no step loop found in the compiled sampler"
  ops = set(re.findall(r'op_name="([^"]+)"', "\n".join(_reachable(hlo, b) for b in bodies)))
  assert any("cross_attn/query" in o for o in ops)
  assert not [o for o in ops if re.search(r"cross_attn/(key|value)|cond_embed", o)]
  assert re.search(r"cross_attn/key|cond_embed", hlo)       # (they exist: outside the loop)

"""Next-detail diffusion: continuous trunk, head problems, flow loss, cached group-parallel sampler,
and the task end to end on a tiny continuous tokenizer."""

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tdjax import configlib
from tdjax.generators import next_detail_diffusion as ndd



def tiny(**kw):
  args = dict(token_dim=3, num_tokens=8, group_size=2, num_classes=3, dim=32, depth=2,
              num_heads=2, mlp_dim=64, head_width=32, head_depth=1, head_heads=2,
              class_dropout=0.0)
  args.update(kw)
  return ndd.NextDetailDiffusion(**args)


@functools.lru_cache(maxsize=4)
def noisy_params(model, seed=0, scale=0.2):
  """Init plus noise everywhere (zero-initialised output layers would hide any dependence)."""
  params = nn.unbox(ndd.init_params(model, jax.random.key(seed)))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


def test_trunk_hidden_state_ignores_later_groups():
  """h at positions of block b depends on the tokens of blocks <= b only (group-causal mask), and
  the first g positions are token-causal."""
  model = tiny()
  params = noisy_params(model)
  x = jax.random.normal(jax.random.key(0), (1, 8, 3))
  labels = jnp.array([1])
  h = lambda x: model.apply({"params": params}, x, labels, method="trunk")
  base = h(x)
  changed = h(x.at[:, 6:].add(1.0))                 # block 3 = positions 6, 7
  np.testing.assert_allclose(base[:, :6], changed[:, :6], atol=1e-6)
  assert not np.allclose(base[:, 6:], changed[:, 6:])
  changed = h(x.at[:, 2].add(1.0))                  # position 2 is in the first (causal) group
  np.testing.assert_allclose(base[:, :2], changed[:, :2], atol=1e-6)
  assert not np.allclose(base[:, 2:], changed[:, 2:])


def test_head_problems_regroup_tokens_with_their_hidden_states():
  b, n, g, c, d = 2, 8, 2, 3, 5
  z = jnp.arange(b * n * c, dtype=jnp.float32).reshape(b, n, c)
  h = jnp.arange(b * n * d, dtype=jnp.float32).reshape(b, n, d) + 1000
  (z1, h1), (z2, h2) = ndd.head_problems(z, h, g)
  assert z1.shape == (b * g, 1, c) and h1.shape == (b * g, 1, d)
  assert z2.shape == (b * (n // g - 1), g, c) and h2.shape == (b * (n // g - 1), g, d)
  np.testing.assert_array_equal(z1[1, 0], z[0, 1])                  # z_1 of example 0 alone
  np.testing.assert_array_equal(z2[4], z[1, 4:6])                   # example 1, group b = 2
  np.testing.assert_array_equal(h2[4], h[1, 4:6])                   # ... with h_4, h_5


@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_cached_sampler_equals_recompute(cfg):
  model = tiny()
  params = noisy_params(model)
  labels = np.array([0, 2, 1])
  key = jax.random.key(3)
  a = ndd.sample(model, params, labels, key, cfg=cfg, steps=4, use_cache=True)
  b = ndd.sample(model, params, labels, key, cfg=cfg, steps=4, use_cache=False)
  assert a.shape == (3, 8, 3)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  # the class matters (the trunk reads it) and the seed matters
  c = ndd.sample(model, params, np.array([1, 2, 1]), key, cfg=cfg, steps=4)
  assert not np.allclose(np.asarray(a)[0], np.asarray(c)[0])
  np.testing.assert_allclose(np.asarray(a)[2], np.asarray(c)[2], rtol=1e-4, atol=1e-4)


def test_sampled_group_depends_on_the_tokens_written_back():
  """Group-parallel decoding feeds each new group back: a trunk that ignored its inputs would
  give the same later groups for a different first token; here they differ."""
  model = tiny()
  params = noisy_params(model)
  key = jax.random.key(0)
  out = np.asarray(ndd.sample(model, params, np.array([0, 0]), key, steps=3, sampler="euler"))
  assert np.all(np.isfinite(out))
  assert not np.allclose(out[0], out[1])   # same class, different noise per row


def test_flow_loss_falls_on_class_dependent_tokens():
  model = tiny(token_dim=2)
  params = nn.unbox(ndd.init_params(model, jax.random.key(0)))
  rng = np.random.default_rng(0)
  labels = jnp.asarray(rng.integers(0, 3, 32), jnp.int32)
  # tokens: a class-dependent mean plus small noise, cumulative along the sequence
  z = (labels[:, None, None] - 1.0) + 0.1 * jnp.asarray(rng.normal(size=(32, 8, 2)), jnp.float32)
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, i):
    (l, m), g = jax.value_and_grad(
        lambda p: ndd.flow_loss(model, p, z, labels, jax.random.key(i), train=True), has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, l, m

  losses = []
  for i in range(80):
    params, opt, l, m = step(params, opt, i)
    losses.append(float(l))
  assert set(m) == {"flow_loss", "flow_loss_first_group", "flow_loss_later_groups"}
  assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses[::10]


def test_bad_sampling_inputs():
  model = tiny()
  params = noisy_params(model)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="steps=0"):
    ndd.sample(model, params, np.array([0]), key, steps=0)
  with pytest.raises(ValueError, match="cfg=0.5"):
    ndd.sample(model, params, np.array([0]), key, cfg=0.5)
  with pytest.raises(ValueError, match=r"unknown class id\(s\) \[7\]"):
    ndd.sample(model, params, np.array([7]), key)
  with pytest.raises(ValueError, match="sampler='heun'"):
    ndd.sample(model, params, np.array([0]), key, sampler="heun")
  with pytest.raises(ValueError, match="token count N=9"):
    ndd.init_params(tiny(num_tokens=9), key)
  with pytest.raises(ValueError, match="continuous tokens of width 4"):
    model.apply({"params": params}, jnp.zeros((1, 8, 4)), jnp.zeros((1,), jnp.int32),
                method="trunk")


# ------------------------------------------------------------------------------------------------
# the task, end to end on a tiny continuous tokenizer
# ------------------------------------------------------------------------------------------------

_config = configlib.load_config


def test_task_trains_and_samples_from_a_continuous_tokenizer(tmp_path, tiny_tokenizer_dir):
  from tdjax import sample as sample_cli
  from tdjax import trainer
  tok_dir, gen_dir = str(tmp_path / "tok"), str(tmp_path / "ndd")
  tc = _config("detailflow_tokenizer",
               "size=tiny,bottleneck=continuous,kl=1e-3,steps=2,batch=8,degrade_p=0,"
               "correction=False")   # the encoder is all the task reads: half the compile
  trainer.train_and_evaluate(tc, tok_dir)
  c = _config("next_detail_diffusion",
              f"size=demo,tokenizer={tok_dir},tokens=16,group=4,steps=30,batch=16,lr=3e-3,"
              f"sample_steps=3")
  c.model.update(dict(depth=1, dim=32, num_heads=2, mlp_dim=64, head_width=32, head_depth=1,
                      head_heads=2))
  c.token_stats_images = 64
  c.eval_every = c.ckpt_every = 30
  c.log_every = 10
  trainer.train_and_evaluate(c, gen_dir)
  rows = [__import__("json").loads(line) for line in open(os.path.join(gen_dir, "metrics.jsonl"))]
  train = [r["train/flow_loss"] for r in rows if "train/flow_loss" in r]
  assert len(train) >= 2 and train[-1] < train[0], train
  images, labels, _ = sample_cli.generate(gen_dir, "0,2", 2, steps=3, cfg=1.5)
  assert images.shape == (4, 32, 32, 1) and list(labels) == [0, 0, 2, 2]
  assert np.all(np.abs(images) <= 1.0) and np.all(np.isfinite(images))
  # resumable sampling: finished parts are reused, missing ones redone with the same keys
  parts = str(tmp_path / "parts")
  full, _, _ = sample_cli.generate(gen_dir, "0,1,2", 2, steps=3, batch_size=2, parts_dir=parts)
  names = sorted(f for f in os.listdir(parts) if f.endswith(".npy"))
  assert len(names) == 3
  os.remove(os.path.join(parts, names[2]))
  np.save(os.path.join(parts, names[0]), np.zeros((2, 32, 32, 1), np.float32))
  again, _, _ = sample_cli.generate(gen_dir, "0,1,2", 2, steps=3, batch_size=2, parts_dir=parts)
  np.testing.assert_array_equal(again[:2], 0.0)                 # part 0 was reused, not redone
  np.testing.assert_allclose(again[2:], full[2:], atol=1e-5)     # part 2 redone identically
  with pytest.raises(Exception, match="no checkpoint of step 7 in .*steps: \\[30\\]"):
    sample_cli.generate(gen_dir, "0", 1, step=7)
  assert sample_cli.split_checkpoint_path(os.path.join(gen_dir, "checkpoints", "30")) == (
      os.path.abspath(gen_dir), 30)
  with pytest.raises(ValueError, match="expected WORKDIR/checkpoints/STEP"):
    sample_cli.split_checkpoint_path(gen_dir)
  with pytest.raises(ValueError, match="other settings"):
    sample_cli.generate(gen_dir, "0,1,2", 2, steps=4, batch_size=2, parts_dir=parts)
  # a VQ tokenizer is refused by name
  c.tokenizer_workdir = tiny_tokenizer_dir
  from tdjax.tasks.next_detail_diffusion import NextDetailDiffusionTask
  with pytest.raises(ValueError, match="a VQ tokenizer"):
    NextDetailDiffusionTask(c)

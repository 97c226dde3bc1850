"""DetailFlow next-detail AR model: layout, mask, RoPE, sampler (cache vs recompute), data, training."""

import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tdjax import configlib, optim
from tdjax.data import codes as codes_lib
from tdjax.generators import next_detail as nd




def load_config(arg):
  return configlib.load_config("next_detail", arg)


def tiny_model(**kw):
  args = dict(vocab_size=32, num_tokens=16, group_size=4, num_classes=3, dim=32, depth=2,
              num_heads=2, mlp_dim=64, class_dropout=0.0, token_dropout=0.0, dropout=0.0)
  args.update(kw)
  return nd.NextDetailTransformer(**args)


@functools.lru_cache(maxsize=8)
def random_params(model, seed=0, scale=0.3):
  """Init, then add noise everywhere (the zero-initialised head would make every logit 0)."""
  @jax.jit
  def make(key):
    params = nn.unbox(nd.init_params(model, key))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
    return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])
  return make(jax.random.key(seed))


# ------------------------------------------------------------------------------------------------
# layout, mask, targets, RoPE
# ------------------------------------------------------------------------------------------------

def reference_mask(n, g, causal_num=None):
  """Reference 2.3 written out as a loop: rows < c (= g) causal; later rows see earlier-or-same
  blocks."""
  c = g if causal_num is None else causal_num
  m = np.zeros((n, n), bool)
  for i in range(n):
    for j in range(n):
      if i < c:
        m[i, j] = j <= i
      else:
        m[i, j] = math.floor(i / g) >= math.floor(j / g)
  return m


@pytest.mark.parametrize("n,g", [(8, 4), (16, 4), (12, 3), (24, 8), (10, 2)])
def test_mask_equals_reference_loop(n, g):
  np.testing.assert_array_equal(nd.group_causal_mask(n, g), reference_mask(n, g))


def test_layout_and_targets():
  n, g = 16, 4
  kind, index = nd.sequence_layout(n, g)
  # [cls] z0 z1 z2 z3 spe0 spe1 spe2 z4 .. z11
  assert kind.tolist() == [0] + [1] * 4 + [2] * 3 + [1] * 8
  assert index.tolist() == [0, 0, 1, 2, 3, 0, 1, 2] + list(range(4, 12))
  codes = np.arange(100, 116)[None]
  ins = nd.next_detail_inputs(codes, g)
  assert ins.tolist() == [list(range(100, 112))]
  ids = np.asarray(nd.layout_ids(jnp.asarray(ins), n, g))
  assert ids[0, 1:5].tolist() == [100, 101, 102, 103] and ids[0, 8:].tolist() == list(range(104, 112))
  np.testing.assert_array_equal(nd.next_detail_targets(codes), codes)
  for k in range(n):
    p = nd.code_position(k, n, g)
    assert p == -1 if k >= n - g else ids[0, p] == 100 + k


def test_layout_with_causal_num():
  """The reference's causal_num c: the placeholders follow the first c codes (gpt.py's
  token_embeddings_first / spe / token_embeddings_last); c = 0: [cls] spe_0..spe_{g-2} z_0 ..."""
  n, g = 16, 4
  kind, index = nd.sequence_layout(n, g, 0)
  assert kind.tolist() == [0] + [2] * 3 + [1] * 12
  assert index.tolist() == [0, 0, 1, 2] + list(range(12))
  kind, index = nd.sequence_layout(n, g, 8)
  assert kind.tolist() == [0] + [1] * 8 + [2] * 3 + [1] * 4
  assert index.tolist() == [0] + list(range(8)) + [0, 1, 2] + list(range(8, 12))
  ids = np.asarray(nd.layout_ids(jnp.arange(100, 112)[None], n, g, 0))
  for c in (0, 4, 8):
    ids = np.asarray(nd.layout_ids(jnp.arange(100, 112)[None], n, g, c))
    for k in range(n):
      p = nd.code_position(k, n, g, c)
      assert p == -1 if k >= n - g else ids[0, p] == 100 + k
  for bad in (2, -4, 16):
    with pytest.raises(ValueError, match=f"causal_num={bad}: expected a multiple"):
      nd.sequence_layout(n, g, bad)
  assert [nd.num_forward_passes(128, 8, c) for c in (None, 0, 16)] == [23, 16, 30]


@pytest.mark.parametrize("causal_num", [None, 0, 8])
def test_outputs_do_not_depend_on_later_groups(causal_num):
  """Dependency matrix (logits at row i change when the input at column p changes) == the mask
  (causal_num 0: the first group is predicted from the class token alone, every group parallel)."""
  model = tiny_model(causal_num=causal_num)
  params = random_params(model)
  n, g = model.num_tokens, model.group_size
  rng = np.random.default_rng(0)
  ids = np.asarray(nd.layout_ids(jnp.asarray(rng.integers(0, 32, (1, n - g))), n, g, causal_num))
  kind, _ = nd.sequence_layout(n, g, causal_num)
  code_cols = np.flatnonzero(kind == nd.KIND_CODE)
  # row 0: the original; row 1: another class; rows 2..: one code changed each
  batch = np.repeat(ids, 2 + len(code_cols), axis=0)
  for r, p in enumerate(code_cols):
    batch[2 + r, p] = (batch[2 + r, p] + 7) % 32
  labels = np.array([1, 2] + [1] * len(code_cols))
  logits = np.asarray(jax.jit(lambda i, l: model.apply({"params": params}, i, l))(batch, labels))
  changed = np.abs(logits[1:] - logits[:1]).max(-1) > 1e-6        # [columns, N]
  dep = np.zeros((n, n), bool)
  dep[:, 0] = changed[0]                                            # the class token
  dep[:, code_cols] = changed[1:].T
  mask = reference_mask(n, g, causal_num)
  cols = kind != nd.KIND_PLACEHOLDER
  np.testing.assert_array_equal(dep[:, cols], mask[:, cols])


def test_rope_zero_for_class_token_and_2d_grid():
  model = tiny_model(dim=64, num_heads=2)          # head_dim 32: 8 row pairs + 8 column pairs
  cos, sin = (np.asarray(a) for a in model.rope())
  assert cos.shape == (16, 16)
  np.testing.assert_array_equal(cos[0], 0.0)
  np.testing.assert_array_equal(sin[0], 0.0)
  inv = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
  for p in (1, 5, 9, 15):
    row, col = divmod(p - 1, 4)
    np.testing.assert_allclose(cos[p], np.cos(np.concatenate([row * inv, col * inv])), atol=1e-6)
    np.testing.assert_allclose(sin[p], np.sin(np.concatenate([row * inv, col * inv])), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# sampler
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scan,opts", [(True, dict(cfg=1.5, top_k=12, top_p=0.95)),
                                       (False, dict(cfg=2.0, cfg_schedule="linear",
                                                    temperature=0.8)),
                                       (False, dict(cfg=1.5, cfg_schedule="gradual")),
                                       (True, dict(cfg=1.5, causal_num=0)),
                                       (False, dict(cfg=1.5, cfg_schedule="gradual",
                                                    causal_num=8))])
def test_cache_sampling_equals_recompute(scan, opts):
  opts = dict(opts)
  model = tiny_model(scan=scan, causal_num=opts.pop("causal_num", None))
  params = random_params(model)
  labels = np.array([0, 1, 2, 1])
  key = jax.random.key(3)
  a = np.asarray(nd.sample(model, params, labels, key, use_cache=True, **opts))
  b = np.asarray(nd.sample(model, params, labels, key, use_cache=False, **opts))
  assert a.shape == (4, 16) and a.min() >= 0 and a.max() < 32
  np.testing.assert_array_equal(a, b)
  assert len(np.unique(a)) > 4          # not degenerate
  c = np.asarray(nd.sample(model, params, labels, jax.random.key(4), use_cache=True, **opts))
  assert not np.array_equal(a, c)


def test_number_of_forward_passes():
  """Counted while tracing the Python-loop variant (one trace = one forward pass per step)."""
  model = tiny_model(num_tokens=128, group_size=8, dim=16, depth=1, num_heads=1, mlp_dim=32)
  params = jax.eval_shape(lambda: random_params(model))       # shapes suffice: nothing runs
  counter = []
  out = jax.eval_shape(lambda p: nd.sample(model, p, np.array([0, 1]), jax.random.key(0), cfg=1.5,
                                           counter=counter), params)
  assert out.shape == (2, 128)
  assert nd.num_forward_passes(128, 8) == 23
  assert len(counter) == 23
  assert counter == [1] * 8 + [8] * 15          # 8 single-token steps, then 15 group steps
  for c, want in ((0, [8] * 16), (16, [1] * 16 + [8] * 14)):   # every group parallel; c = 2g
    counter = []
    jax.eval_shape(lambda p: nd.sample(model.clone(causal_num=c), p, np.array([0, 1]),
                                       jax.random.key(0), cfg=1.5, counter=counter), params)
    assert counter == want and len(want) == nd.num_forward_passes(128, 8, c)


def test_python_loop_sampler_equals_fori_loop():
  model = tiny_model()
  params = random_params(model)
  counter = []
  a = nd.sample(model, params, np.array([0, 1]), jax.random.key(0), cfg=1.0, counter=counter)
  b = nd.sample(model, params, np.array([0, 1]), jax.random.key(0), cfg=1.0)
  assert len(counter) == nd.num_forward_passes(16, 4) == 7
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_filter_logits_top_k_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keep = lambda x: (np.asarray(x) > -1e30).tolist()[0]
  assert keep(nd.filter_logits(logits, top_k=2)) == [True, True, False, False]
  assert keep(nd.filter_logits(logits, top_p=0.7)) == [True, True, False, False]
  assert keep(nd.filter_logits(logits, top_p=0.85)) == [True, True, True, False]
  assert keep(nd.filter_logits(logits, top_p=0.1)) == [True, False, False, False]


# ------------------------------------------------------------------------------------------------
# training-time randomness
# ------------------------------------------------------------------------------------------------

def test_label_dropout_rate_and_use():
  labels = jnp.zeros((200_000,), jnp.int32)
  dropped = nd.drop_labels(jax.random.key(0), labels, 0.1, 1000)
  assert abs(float((dropped == 1000).mean()) - 0.1) < 0.005
  # the model applies it in training: with rate 1 every class is the null class
  model = tiny_model(class_dropout=1.0)
  params = random_params(tiny_model())
  ids = jnp.zeros((2, 16), jnp.int32)
  train = model.apply({"params": params}, ids, jnp.array([0, 1]), train=True,
                      rngs={"dropout": jax.random.key(1)})
  null = model.apply({"params": params}, ids, jnp.array([3, 3]))
  np.testing.assert_allclose(train, null, atol=1e-5)


def test_self_correction_probability():
  b, n = 100_000, 4
  clean = jnp.zeros((b, n), jnp.int32)
  ar_input = jnp.ones((b, n), jnp.int32)
  ar_label = jnp.full((b, n), 2, jnp.int32)
  codes, targets, chosen = nd.self_correction_mix(jax.random.key(0), clean, ar_input, ar_label, 0.3)
  assert abs(float(chosen.mean()) - 0.3) < 0.005
  np.testing.assert_array_equal(np.asarray(codes[:, 0]), np.asarray(chosen).astype(int))
  np.testing.assert_array_equal(np.asarray(targets[:, 0]), 2 * np.asarray(chosen).astype(int))


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors(tmp_path):
  model = tiny_model()
  params = random_params(model)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"unknown class id\(s\) \[3, 7\].*num_classes=3"):
    nd.sample(model, params, np.array([0, 3, 7]), key)
  with pytest.raises(ValueError, match=r"cfg=0.0 must be > 0"):
    nd.sample(model, params, np.array([0]), key, cfg=0.0)
  with pytest.raises(ValueError, match=r"cfg=-1.5 must be > 0"):
    nd.sample(model, params, np.array([0]), key, cfg=-1.5)
  with pytest.raises(ValueError, match=r"N=18 is not divisible by the group size g=4"):
    tiny_model(num_tokens=18).validate()
  with pytest.raises(ValueError, match=r"N=18 is not divisible by the group size g=4"):
    nd.next_detail_inputs(np.zeros((1, 18)), 4)
  with pytest.raises(ValueError, match=r"tokenizer has N=256 tokens and vocab 8192, the AR model "
                                       r"N=128 and vocab 8192"):
    nd.check_tokenizer_pair(256, 8192, 128, 8192)
  path = str(tmp_path / "codes.npz")
  codes_lib.synthetic_codes(path, num=64, num_tokens=16, group_size=4, vocab_size=32)
  cfg = ml_collections.ConfigDict(dict(path=path, batch_size=8, num_classes=4, num_tokens=16,
                                       vocab_size=64))
  with pytest.raises(ValueError, match=r"codes file .* has N=16 tokens and vocab 32, the AR config "
                                       r"N=16 and vocab 64"):
    codes_lib.CodesPipeline(cfg, seed=0)


# ------------------------------------------------------------------------------------------------
# codes: extraction and pipeline protocol
# ------------------------------------------------------------------------------------------------

def test_extract_codes_and_pipeline_protocol(tmp_path):
  path = str(tmp_path / "codes.npz")
  n, vocab = 8, 16

  def encode(images, call):                 # the (clean, ar_input, ar_label) protocol
    base = (images[:, 0, 0, 0] * 10).astype(np.int64)
    clean = (base[:, None] + np.arange(n)) % vocab
    return clean, (clean + 1) % vocab, clean

  images = np.arange(40, dtype=np.float32)[:, None, None, None] / 10.0 % 1.6
  batches = [{"image": images[i:i + 10], "label": np.arange(i, i + 10) % 3} for i in range(0, 40, 10)]
  meta = codes_lib.extract_codes(encode, batches, path, vocab_size=vocab, group_size=4,
                                 num_classes=3, views=lambda im: [im, im + 0.1])
  assert meta == dict(num_tokens=n, vocab_size=vocab, group_size=4, num_classes=3, num_views=2,
                      num_examples=40)
  arrays, _ = codes_lib.load_codes(path)
  assert arrays["clean"].shape == (40, 2, n)

  cfg = ml_collections.ConfigDict(dict(path=path, batch_size=8, num_classes=3))
  single = codes_lib.CodesPipeline(cfg, seed=1)
  procs = [codes_lib.CodesPipeline(cfg, seed=1, process_index=i, process_count=2) for i in range(2)]
  for _ in range(7):                         # crosses an epoch boundary (5 batches per epoch)
    whole = next(single)
    parts = [next(p) for p in procs]
    for k in ("clean", "ar_input", "ar_label", "label"):
      np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))
    assert whole["clean"].dtype == np.int32 and whole["clean"].shape == (8, n)
  state = single.get_state()
  assert state == procs[0].get_state() == {"batches_consumed": 7}
  expected = next(single)
  resumed = codes_lib.CodesPipeline(cfg, seed=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["clean"], expected["clean"])
  ev = codes_lib.CodesPipeline(cfg, seed=1, split="test", train=False)
  np.testing.assert_array_equal(next(ev)["clean"], arrays["clean"][:8, 0])
  assert single.stats()["sequences"] == 40
  # the directory format (memory-mapped .npy) gives the same stream
  dpath = str(tmp_path / "codes_dir")
  codes_lib.extract_codes(encode, batches, dpath, vocab_size=vocab, group_size=4, num_classes=3,
                          views=lambda im: [im, im + 0.1])
  assert isinstance(codes_lib.load_codes(dpath)[0]["clean"], np.memmap)
  a = codes_lib.CodesPipeline(ml_collections.ConfigDict(dict(cfg.to_dict(), path=dpath)), seed=1)
  b = codes_lib.CodesPipeline(cfg, seed=1)
  for _ in range(3):
    x, y = next(a), next(b)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_extract_codes_refuses_an_existing_file_before_encoding(tmp_path):
  """An existing codes file is an error before any encoding (not after an epoch of work);
  overwrite=True replaces it whole."""
  path, calls = str(tmp_path / "codes.npz"), []

  def encode(images, call, shift=0):
    calls.append(len(images))
    clean = (np.arange(4)[None] + shift + np.zeros((len(images), 1), np.int64)) % 8
    return clean, clean, clean

  batches = [{"image": np.zeros((2, 1, 1, 1), np.float32), "label": np.array([0, 1])}]
  kw = dict(vocab_size=8, group_size=2, num_classes=2)
  codes_lib.extract_codes(encode, batches, path, **kw)
  with pytest.raises(FileExistsError, match="codes.npz exists: pass --overwrite"):
    codes_lib.extract_codes(encode, batches, path, **kw)
  assert calls == [2]
  codes_lib.extract_codes(lambda im, call: encode(im, call, shift=1), batches, path, overwrite=True, **kw)
  assert codes_lib.load_codes(path)[0]["clean"][0, 0].tolist() == [1, 2, 3, 4]
  assert sorted(os.listdir(tmp_path)) == ["codes.npz"]


# ------------------------------------------------------------------------------------------------
# config and a short training run
# ------------------------------------------------------------------------------------------------

def test_full_size_config_param_count():
  c = load_config("size=L")
  assert (c.model.depth, c.model.dim, c.model.num_heads, c.model.mlp_dim) == (24, 1024, 16, 2816)
  assert c.optimizer.warmup_steps == int(0.05 * c.total_steps)
  model = nd.model_from_config(c.model)
  shapes = jax.eval_shape(lambda k: nn.unbox(nd.init_params(model, k)), jax.random.key(0))
  count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
  assert abs(count / 1e6 - 326.1) < 0.5, count  # docs/reference/detailflow.md 2.2
  with pytest.raises(ValueError, match=r"tokens=100 is not divisible by group=8"):
    load_config("size=L,tokens=100")


def test_short_training_beats_unigram_entropy(tmp_path):
  from tdjax.tasks.next_detail import NextDetailTask
  path = str(tmp_path / "codes.npz")
  codes_lib.synthetic_codes(path, num=256, num_tokens=16, group_size=4, vocab_size=32,
                            num_classes=4)
  c = load_config(f"size=demo,codes={path},steps=120,batch=32,lr=3e-3")
  c.model.update(dict(depth=2, dim=32, num_heads=2, mlp_dim=64))
  assert (c.model.num_tokens, c.model.vocab_size, c.model.num_classes) == (16, 32, 4)
  task = NextDetailTask(c)
  params = nn.unbox(task.init(jax.random.key(0))[0])
  tx = optim.make_optimizer(c, None, nn.get_partition_spec(task.init(jax.random.key(0))[0]))
  opt_state = tx.init(params)
  data = codes_lib.CodesPipeline(c.input, seed=0)

  @jax.jit
  def step(params, opt_state, batch, i):
    (loss, (metrics, _)), grads = jax.value_and_grad(task.loss, has_aux=True)(
        params, {}, batch, jax.random.fold_in(jax.random.key(1), i), i)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(jnp.add, params, updates), opt_state, metrics

  losses = []
  for i in range(c.total_steps):
    params, opt_state, metrics = step(params, opt_state, next(data), i)
    losses.append(float(metrics["loss"]))
  arrays, _ = codes_lib.load_codes(path)
  counts = np.bincount(arrays["clean"].ravel(), minlength=32) / arrays["clean"].size
  unigram = float(-(counts[counts > 0] * np.log(counts[counts > 0])).sum())
  final = float(np.mean(losses[-10:]))
  assert losses[0] > unigram - 0.1          # starts at log(32) ~ 3.47 (zero head)
  assert final < unigram - 0.3, (final, unigram)
  ev = task.eval_metrics(params, {}, next(codes_lib.CodesPipeline(c.input, seed=0, train=False)),
                         jax.random.key(0))
  assert float(ev["loss"]) < unigram
  codes = task.sample_fn()(params, np.array([0, 1]), jax.random.key(0))
  assert codes.shape == (2, 16)


def test_draw_matches_probabilities():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.2, 0.0]))[None].repeat(50_000, 0)
  tok = np.asarray(nd.draw(jax.random.key(0), logits))
  freq = np.bincount(tok, minlength=4) / tok.size
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.2, 0.0], atol=0.01)


def test_tokenizer_adapter_writes_codes(tmp_path):
  """`encode_for_ar` of a (random, tiny) DetailFlow tokenizer through the extraction protocol."""
  from tdjax.tokenizers.detailflow import build_tokenizer
  m = ml_collections.ConfigDict(dict(size="tiny", patch=8, num_tokens=16, group=4, codebook_size=64,
                                     code_dim=8, top_k=5))
  tok = build_tokenizer(m, 16, 1)
  x = np.random.default_rng(0).uniform(-1, 1, (4, 16, 16, 1)).astype(np.float32)
  v = tok.init({"params": jax.random.key(0)}, x)
  enc = codes_lib.tokenizer_encode_fn(tok, v["params"],
                                      variables={k: v[k] for k in v if k != "params"})
  path = str(tmp_path / "tok.npz")
  meta = codes_lib.extract_codes(enc, [{"image": x, "label": np.array([0, 1, 2, 0])}] * 2, path,
                                 vocab_size=64, group_size=4, num_classes=3,
                                 views=codes_lib.flip_views)
  assert meta["num_tokens"] == 16 and meta["num_views"] == 2 and meta["num_examples"] == 8
  cfg = ml_collections.ConfigDict(dict(path=path, batch_size=4, num_classes=3, num_tokens=16,
                                       vocab_size=64))
  batch = next(codes_lib.CodesPipeline(cfg, seed=0))
  assert batch["ar_input"].shape == (4, 16)
  cfg.num_tokens = 32
  with pytest.raises(ValueError, match=r"N=16 tokens and vocab 64, the AR config N=32"):
    codes_lib.CodesPipeline(cfg, seed=0)
  images = nd.decode_codes(tok, v["params"], batch["clean"], ar_model=tiny_model(vocab_size=64))
  assert images.shape == (4, 16, 16, 1)
  with pytest.raises(ValueError, match=r"tokenizer has N=16 tokens and vocab 64, the AR model N=16 "
                                       r"and vocab 32"):
    nd.decode_codes(tok, v["params"], batch["clean"], ar_model=tiny_model())


def test_train_steps_on_a_sharded_mesh_match_one_device(tmp_path):
  """The task in the real loop's Setup/compile_step: logical specs on every parameter, a
  data x fsdp x tensor mesh of 8 fake devices, the same losses as on one device."""
  from tdjax import parallel, trainer
  from tdjax.tasks import TASKS
  TASKS.setdefault("next_detail", "tdjax.tasks.next_detail:NextDetailTask")
  path = str(tmp_path / "codes.npz")
  codes_lib.synthetic_codes(path, num=64, num_tokens=16, group_size=4, vocab_size=32)
  c = load_config(f"size=demo,codes={path},steps=4,batch=8")
  c.model.update(dict(depth=2, dim=32, num_heads=2, mlp_dim=64, remat="dots_saveable"))
  c.ema_decay = 0.9
  batches = [next(iter(codes_lib.CodesPipeline(c.input, seed=0))) for _ in range(1)] * 3
  losses = {}
  for name, devices, axes in (("one", jax.devices()[:1], dict(data=1)),
                              ("mesh", jax.devices()[:8], dict(data=2, fsdp=2, tensor=2))):
    mesh = parallel.make_mesh(axes, devices)
    setup = trainer.Setup(c, mesh)
    specs = jax.tree.leaves(setup.state_specs["params"],
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert all(len(s) > 0 for s in specs), specs            # every parameter is annotated
    state = setup.init_state()
    with parallel.use_mesh(mesh, setup.rules):
      step = setup.compile_step(parallel.host_to_global(batches[0], mesh))
      out = []
      for b in batches:
        state, m = step(state, parallel.host_to_global(b, mesh))
        out.append(float(m["loss"]))
    losses[name] = out
  np.testing.assert_allclose(losses["mesh"], losses["one"], rtol=2e-4)
  assert losses["one"][-1] < losses["one"][0]


def test_gradual_cfg_follows_the_reference_formula():
  """DetailFlow's gradual_cfg: the first group's token steps at cfg, then group step i of M at
  cfg * (M - i + 1) / (M + 1) (autoregressive/models/generate.py), below 1 on the last groups."""
  n, g, cfg = 16, 4, 1.5                   # M = 4 groups
  got = [float(nd.cfg_scale(cfg, "gradual", t, n, g)) for t in (0, 1, 3, 4, 8, 12)]
  np.testing.assert_allclose(got, [1.5, 1.5, 1.5, 1.5 * 4 / 5, 1.5 * 3 / 5, 1.5 * 2 / 5])
  assert nd.cfg_scale(cfg, "constant", 8, n, g) == cfg


@pytest.mark.parametrize("tokens,cfg", [(128, 1.45), (256, 1.5), (512, 1.32)])
def test_paper_sizes_sample_with_the_reference_cfg_per_token_count(tokens, cfg):
  """scripts/eval_c2i.sh: CFG 1.45 / 1.5 / 1.32 for DetailFlow-16 / -32 / -64; an explicit cfg
  argument still wins, and the demo keeps its own."""
  from tdjax import configlib
  assert configlib.load_config("next_detail", f"size=L,tokens={tokens}").sample.cfg == cfg
  assert configlib.load_config("next_detail", f"size=L,tokens={tokens},cfg=2.0").sample.cfg == 2.0
  c = configlib.load_config("next_detail", "size=L,cfg_schedule=gradual")
  assert c.sample.cfg_schedule == "gradual"


def test_ten_crop_codes_share_one_self_correction_draw_per_image(tmp_path, tiny_tokenizer_dir):
  """views='tencrop' (the reference's extraction): ten views of each image, and one
  self-correction draw per image for all ten (the perturbation starts at the same position in
  every view: noise_idx, the first code where ar_input differs from clean; what follows is
  re-encoded from each view's own content); views='flip' keeps a draw per view."""
  out = str(tmp_path / "ten.npz")
  meta = codes_lib.extract_from_workdir(tiny_tokenizer_dir, out, batch_size=8, max_batches=1,
                                        views="tencrop")
  assert meta["num_views"] == 10
  arrays, _ = codes_lib.load_codes(out)
  first = (arrays["ar_input"] != arrays["clean"]).argmax(-1)      # [num, 10]
  assert first.any()
  np.testing.assert_array_equal(first, np.broadcast_to(first[:, :1], first.shape))
  flip = str(tmp_path / "flip.npz")
  codes_lib.extract_from_workdir(tiny_tokenizer_dir, flip, batch_size=8, max_batches=1,
                                 views="flip")
  f, _ = codes_lib.load_codes(flip)
  first = (f["ar_input"] != f["clean"]).argmax(-1)
  assert not np.array_equal(first[:, 0], first[:, 1])


def test_codes_files_carry_the_tokenizers_causal_num_to_the_ar_config(tmp_path,
                                                                       tiny_tokenizer_dir):
  """The reference's AR takes causal_num from the tokenizer's config (train_c2i.py): tdjax writes
  the tokenizer's c into the codes file and the AR config reads it (files written before: g); a
  tokenizer / AR pair that disagree on c is one line."""
  from tdjax import configlib
  out = str(tmp_path / "codes.npz")
  meta = codes_lib.extract_from_workdir(tiny_tokenizer_dir, out, batch_size=8, max_batches=1)
  g = meta["group_size"]
  assert meta["causal_num"] == g and codes_lib.load_codes(out)[1]["causal_num"] == g
  arrays, meta = codes_lib.load_codes(out)
  n, b = meta["num_tokens"], len(arrays["label"])
  enc = [dict(label=arrays["label"], **{k: np.asarray(arrays[k]).reshape(b, -1, n)
                                        for k in ("clean", "ar_input", "ar_label")})]
  kw = dict(vocab_size=meta["vocab_size"], group_size=g, num_classes=meta["num_classes"])
  for name, c, want in (("parallel", 0, 0), ("old", None, g)):
    for suffix in (".npz", ""):
      path = str(tmp_path / (name + suffix))
      codes_lib.write_codes(path, enc, causal_num=c, **kw)
      cfg = configlib.load_config("next_detail", f"size=demo,codes={path}")
      assert cfg.model.causal_num == want, (name, suffix)
  assert nd.model_from_config(cfg.model).c == g
  with pytest.raises(ValueError, match="the tokenizer has causal_num=4, the AR model causal_num=0"):
    nd.check_tokenizer_pair(16, 32, 16, 32, 4, 0)

"""Diffusion heads: TransDiff attention decoder and MAR MLP head, one interface, variants."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from tdjax.generators import heads as H

B, L, C, DC = 2, 6, 4, 8


def _inputs(m=L, key=0):
  k = jax.random.split(jax.random.key(key), 3)
  return (jax.random.normal(k[0], (B, L, C)), jnp.array([10.0, 900.0]),
          jax.random.normal(k[1], (B, m, DC)))


def _init(head, m=L):
  x, t, c = _inputs(m)
  boxed = head.init(jax.random.key(1), x, t, c)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert all(isinstance(a, nn.LogicallyPartitioned) for a in leaves)    # sharding axes everywhere
  params = nn.unbox(boxed)
  # the output layer is zero-initialised; give it values so the tests see the network
  return jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.3 if any("final" in str(q) for q in p) else a, params)


def test_timestep_embedding_cos_sin_order():
  e = H.timestep_embedding(jnp.array([3.0]), dim=4)
  f = np.exp(-np.log(10000.0) * np.arange(2) / 2)
  np.testing.assert_allclose(e[0], np.concatenate([np.cos(3 * f), np.sin(3 * f)]), rtol=1e-6)


def test_zero_initialised_outputs():
  for head in (H.AttentionHead(C, 16, 2, 2, max_len=L), H.MLPHead(C, 16, 2)):
    x, t, c = _inputs()
    v = nn.unbox(head.init(jax.random.key(1), x, t, c))
    np.testing.assert_array_equal(head.apply(v, x, t, c), 0.0)


def test_attention_head_variable_condition_length_and_mask():
  head = H.AttentionHead(C, 16, 2, 2, max_len=L)
  v = _init(head, 3)
  x, t, _ = _inputs()
  for m in (3, 5, 9):   # MRAR prefixes: one set of weights, any condition length
    assert head.apply(v, x, t, _inputs(m)[2]).shape == (B, L, C)
  c = _inputs(5)[2]
  keep = jnp.array([[True] * 3 + [False] * 2] * B)
  a = head.apply(v, x, t, c, keep)
  b = head.apply(v, x, t, c.at[:, 3:].set(7.0), keep)
  np.testing.assert_allclose(a, b, atol=1e-5)                   # masked condition tokens: no effect
  assert float(jnp.abs(head.apply(v, x, t, c.at[:, 0].add(1.0), keep) - a).max()) > 1e-4


@pytest.mark.parametrize("self_attention", [True, False])
def test_self_attention_switch_controls_token_mixing(self_attention):
  head = H.AttentionHead(C, 16, 2, 2, max_len=L, self_attention=self_attention)
  v = _init(head)
  x, t, c = _inputs()
  a = head.apply(v, x, t, c)
  b = head.apply(v, x.at[:, 4].add(1.0), t, c)
  other = float(jnp.abs(a[:, :4] - b[:, :4]).max())
  assert (other > 1e-4) == self_attention        # joint denoising iff self-attention is on
  assert ("attn" in v["params"]["blocks"]["blocks_0"]["block"]) == self_attention


def test_adaln_conditioning_and_mlp_head_need_one_condition_per_token():
  head = H.AttentionHead(C, 16, 2, 2, max_len=L, conditioning="adaln")
  v = _init(head)
  x, t, c = _inputs()
  assert "cross_attn" not in v["params"]["blocks"]["blocks_0"]["block"]
  a = head.apply(v, x, t, c)
  b = head.apply(v, x, t, c.at[:, 2].add(1.0))
  assert float(jnp.abs(a - b).max()) > 1e-4
  with pytest.raises(ValueError, match="M=3, L=6"):
    head.apply(v, x, t, _inputs(3)[2])
  mlp = H.MLPHead(C, 16, 2)
  vm = _init(mlp)
  a = mlp.apply(vm, x, t, c)
  b = mlp.apply(vm, x.at[:, 4].add(1.0), t, c.at[:, 5].add(1.0))
  np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-6)     # per token: no mixing at all
  with pytest.raises(ValueError, match="M=3, L=6"):
    mlp.apply(vm, x, t, _inputs(3)[2])
  with pytest.raises(ValueError, match="head type='conv'"):
    import ml_collections
    H.make_head(ml_collections.ConfigDict(dict(type="conv")), C)


def test_decoder_block_parameter_count_matches_reference():
  """Reference 1.4: 16 D^2 + 25 D per decoder block (TransDiff-B: D = 768)."""
  d = 768
  head = H.AttentionHead(16, d, 2, 12, max_len=256)
  shapes = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((1, 256, 16)), jnp.zeros((1,)),
                          jnp.zeros((1, 256, d)))
  block = nn.unbox(shapes)["params"]["blocks"]["blocks_0"]
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(block))
  assert n == 16 * d * d + 25 * d


def test_scan_equals_unrolled():
  from tdjax.nn.layers import stack_layers
  a = H.AttentionHead(C, 16, 3, 2, max_len=L)
  b = H.AttentionHead(C, 16, 3, 2, max_len=L, scan=True)
  va = _init(a)
  p = dict(va["params"])
  p["blocks"] = stack_layers(p["blocks"], 3)
  x, t, c = _inputs()
  np.testing.assert_allclose(b.apply({"params": p}, x, t, c), a.apply(va, x, t, c), atol=1e-5)


def test_incontext_conditioning_joins_the_self_attention():
  head = H.AttentionHead(C, 16, 2, 2, max_len=L, conditioning="incontext")
  v = _init(head, 5)
  x, t, c = _inputs(5)
  blk = v["params"]["blocks"]["blocks_0"]["block"]
  assert "cross_attn" not in blk and "attn" in blk
  a = head.apply(v, x, t, c)
  assert a.shape == (B, L, C)                                   # condition tokens dropped at the end
  assert float(jnp.abs(head.apply(v, x, t, c.at[:, 1].add(1.0)) - a).max()) > 1e-4
  keep = jnp.array([[True] * 3 + [False] * 2] * B)              # masked keys: no effect
  np.testing.assert_allclose(head.apply(v, x, t, c, keep),
                             head.apply(v, x, t, c.at[:, 3:].set(7.0), keep), atol=1e-5)
  assert float(jnp.abs(head.apply(v, x, t, c, keep) - a).max()) > 1e-4
  assert head.apply(v, x, t, _inputs(9)[2]).shape == (B, L, C)  # any condition length
  with pytest.raises(ValueError, match="needs self_attention=True"):
    H.AttentionHead(C, 16, 2, 2, max_len=L, conditioning="incontext",
                    self_attention=False).init(jax.random.key(0), x, t, c)


@pytest.mark.parametrize("conditioning", ["cross", "incontext"])
def test_fused_attention_is_reachable_from_the_heads_and_bounded(conditioning, monkeypatch):
  """config.head.attention_impl='fused' (jax.nn.dot_product_attention: cuDNN flash attention on
  GPUs) reaches the head's self- and cross-attention; with the same weights it gives the einsum
  path's velocities to float32 round-off, condition mask included."""
  ein = H.AttentionHead(C, 16, 2, 2, max_len=L, conditioning=conditioning)
  fused = H.AttentionHead(C, 16, 2, 2, max_len=L, conditioning=conditioning,
                          attention_impl="fused")
  v = _init(ein, 5)
  x, t, _ = _inputs()
  c = _inputs(5)[2]
  keep = jnp.array([[True] * 3 + [False] * 2] * B)
  from tdjax.nn import attention
  calls, real = [], attention.fused_attention
  monkeypatch.setattr(attention, "fused_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
  a, b = ein.apply(v, x, t, c, keep), fused.apply(v, x, t, c, keep)
  assert len(calls) == (2 if conditioning == "incontext" else 4)   # every attention of 2 blocks
  np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="config.head.attention_impl='flash'"):
    H.make_head(ml_collections.ConfigDict({"type": "attention", "width": 16, "depth": 1,
                                           "num_heads": 2, "attention_impl": "flash"}), C)


def test_fused_attention_is_reachable_from_the_next_detail_models():
  """The next-detail AR (full forward) and next-detail diffusion take attention_impl too: equal
  logits / velocities to round-off."""
  from tdjax.generators import next_detail as nd
  from tdjax.generators import next_detail_diffusion as ndd
  kw = dict(vocab_size=32, num_tokens=8, group_size=2, num_classes=3, dim=16, depth=2,
            num_heads=2, mlp_dim=32, scan=False)
  ein, fused = nd.NextDetailTransformer(**kw), nd.NextDetailTransformer(**kw, attention_impl="fused")
  ids, labels = jnp.arange(16).reshape(2, 8) % 32, jnp.array([0, 2])
  v = ein.init(jax.random.key(0), ids, labels)
  v = jax.tree.map(lambda a: a + 0.05, nn.unbox(v))        # the output layer is zero-initialised
  np.testing.assert_allclose(ein.apply(v, ids, labels), fused.apply(v, ids, labels), atol=2e-5)
  kw = dict(token_dim=4, num_tokens=8, group_size=2, num_classes=3, dim=16, depth=1,
            num_heads=2, mlp_dim=32, head_width=16, head_depth=1, head_heads=2)
  ein, fused = ndd.NextDetailDiffusion(**kw), ndd.NextDetailDiffusion(**kw, attention_impl="fused")
  v = ndd.init_params(ein, jax.random.key(0))
  v = jax.tree.map(lambda a: a + 0.05, nn.unbox(v))
  tok = jax.random.normal(jax.random.key(1), (2, 8, 4))
  f = lambda m: m.apply({"params": v}, tok, labels)
  np.testing.assert_allclose(f(ein), f(fused), atol=2e-5)


@pytest.mark.parametrize("head", ["cross", "adaln", "incontext", "joint", "mlp"])
def test_a_condition_shared_by_copies_equals_the_tiled_condition(head):
  """batch_mul / MRAR copies: x_t with 3 B rows and cond (and its mask) with B rows (row i of x_t
  -> cond row i mod B, computed once per row) give what the explicitly tiled condition gives,
  outputs and gradients to the condition; a row count that does not divide fails with one line."""
  mul = 3
  module = H.MLPHead(C, 16, 2) if head == "mlp" else H.AttentionHead(
      C, 16, 2, 2, max_len=L, conditioning=head)
  params = _init(module)
  x, t, c = _inputs()
  k = jax.random.split(jax.random.key(7), 2)
  xs = jax.random.normal(k[0], (mul * B, L, C))
  ts = jax.random.uniform(k[1], (mul * B,)) * 1000
  mask = None if head in ("adaln", "mlp") else jnp.ones((B, L), bool).at[1, 3:].set(False)
  tile = lambda a: None if a is None else jnp.tile(a, (mul,) + (1,) * (a.ndim - 1))

  def out(cond, cond_mask):
    return module.apply(params, xs, ts, cond, cond_mask)
  shared, tiled = out(c, mask), out(tile(c), tile(mask))
  np.testing.assert_allclose(shared, tiled, atol=2e-5)
  w = jax.random.normal(jax.random.key(9), shared.shape)
  g_shared = jax.grad(lambda c: jnp.sum(out(c, mask) * w))(c)
  g_tiled = jax.grad(lambda c: jnp.sum(out(tile(c), tile(mask)) * w))(c)
  np.testing.assert_allclose(g_shared, g_tiled, atol=2e-5, rtol=1e-5)
  with pytest.raises(ValueError, match="rows for a batch of"):
    module.apply(params, xs[:5], ts[:5], c, None)

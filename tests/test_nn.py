"""Shared layers: scan == unrolled, RoPE, KV cache == full attention with a group mask, axes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdjax import nn as tnn


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("flavour", ["vit", "llama"])
def test_scan_equals_unrolled(flavour):
  kw = (tnn.vit_block_kwargs(2, 32) if flavour == "vit" else tnn.llama_block_kwargs(2, 32))
  x = _x((2, 6, 16))
  mask = tnn.group_causal_mask(6, 2)
  rope = tnn.rope_1d(jnp.arange(6), 8)
  scanned = tnn.TransformerStack(3, kw, scan=True, remat="nothing_saveable")
  unrolled = tnn.TransformerStack(3, kw, scan=False)
  p = nn.unbox(jax.jit(scanned.init)(jax.random.key(1), x, mask, rope))["params"]
  assert jax.tree.leaves(p)[0].shape[0] == 3
  y_scan = jax.jit(scanned.apply)({"params": p}, x, mask, rope)
  y_unr = jax.jit(unrolled.apply)({"params": tnn.unstack_layers(p, 3)}, x, mask, rope)
  np.testing.assert_allclose(y_scan, y_unr, atol=1e-5)
  # and the restacked tree round-trips
  back = tnn.stack_layers(tnn.unstack_layers(p, 3), 3)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), back, p))


def test_scan_params_have_layers_axis():
  s = tnn.TransformerStack(2, tnn.vit_block_kwargs(2, 32), scan=True)
  boxed = jax.eval_shape(s.init, jax.random.key(0), _x((1, 4, 16)))["params"]
  specs = nn.get_partition_spec(boxed)
  q = specs["layers"]["block"]["attn"]["query"]["kernel"]
  assert tuple(q) == ("layers", "embed", "heads", "head_dim")
  ln = specs["layers"]["block"]["norm1"]["ln"]["scale"]
  assert tuple(ln) == ("layers", "embed")


def test_rope_2d_class_token_zero_and_axes():
  cos, sin = tnn.rope_2d_grid(3, 4, 16, cls_token_num=1)
  assert cos.shape == (13, 8)
  assert float(jnp.abs(cos[0]).max()) == 0.0 and float(jnp.abs(sin[0]).max()) == 0.0
  q = _x((1, 13, 2, 16))
  out = tnn.apply_rope(q, cos, sin)
  assert float(jnp.abs(out[:, 0]).max()) == 0.0          # class token q is zeroed
  np.testing.assert_allclose(jnp.linalg.norm(out[:, 1:], axis=-1),
                             jnp.linalg.norm(q[:, 1:], axis=-1), rtol=1e-5)  # rotations
  # position p = 1 + 4 * r + c: first half of pairs rotates by r, second half by c
  p = 1 + 4 * 2 + 3
  c1, _ = tnn.rope_1d(jnp.array([2.0]), 8)
  c2, _ = tnn.rope_1d(jnp.array([3.0]), 8)
  np.testing.assert_allclose(cos[p, :4], c1[0], rtol=1e-6)
  np.testing.assert_allclose(cos[p, 4:], c2[0], rtol=1e-6)


def test_rope_relative():
  """<rope(q, m), rope(k, n)> depends on m - n only (interleaved pairs)."""
  q, k = _x((1, 1, 1, 8), 1), _x((1, 1, 1, 8), 2)
  def dot(m, n):
    cm, sm = tnn.rope_1d(jnp.array([m]), 8)
    cn, sn = tnn.rope_1d(jnp.array([n]), 8)
    return jnp.sum(tnn.apply_rope(q, cm, sm) * tnn.apply_rope(k, cn, sn))
  np.testing.assert_allclose(dot(5, 2), dot(13, 10), rtol=1e-4)
  assert abs(float(dot(5, 2)) - float(dot(5, 3))) > 1e-4


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_equals_full_attention_with_group_mask(scan):
  L, g, D = 12, 4, 16
  kw = tnn.llama_block_kwargs(2, 32)
  x = _x((2, L, D))
  rope = tnn.rope_1d(jnp.arange(L), D // 2)
  mask = tnn.group_causal_mask(L, g)
  stack = tnn.TransformerStack(2, kw, scan=scan)
  params = nn.unbox(jax.jit(stack.init)(jax.random.key(3), x, mask, rope))["params"]
  full = jax.jit(stack.apply)({"params": params}, x, mask, rope)
  cache = jax.eval_shape(lambda: stack.init(jax.random.key(3), x, mask, rope, decode=True))["cache"]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), cache)
  step = jax.jit(lambda v, xc, r: stack.apply(v, xc, None, r, decode=True, mutable=["cache"]))
  outs = []
  chunks = [(i, 1) for i in range(g)] + [(s, g) for s in range(g, L, g)]
  for start, n in chunks:
    r = (rope[0][start:start + n], rope[1][start:start + n])
    y, mut = step({"params": params, "cache": cache}, x[:, start:start + n], r)
    cache = mut["cache"]
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5)
  # a broken mask (plain causal) gives different results inside groups
  causal = jax.jit(stack.apply)({"params": params}, x, tnn.group_causal_mask(L, 1), rope)
  assert float(jnp.abs(causal[:, g:] - full[:, g:]).max()) > 1e-4


def test_group_causal_mask_values():
  m = np.asarray(tnn.group_causal_mask(8, 2, causal_num=2))
  assert m[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
  assert m[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
  assert m[2].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]   # sees its group mate 3
  assert m[5].tolist() == [1, 1, 1, 1, 1, 1, 0, 0]


def test_cross_attention_variable_context():
  blk = tnn.TransformerBlock(**tnn.vit_block_kwargs(2, 32), cross_attention=True)
  x = _x((2, 5, 16))
  p = jax.jit(blk.init)(jax.random.key(0), x, context=_x((2, 3, 16)))
  for lc in (1, 7):
    ctx = _x((2, lc, 16), lc)
    assert jax.eval_shape(lambda: blk.apply(p, x, context=ctx)).shape == (2, 5, 16)
  apply = jax.jit(lambda p, x, ctx, m: blk.apply(p, x, context=ctx, context_mask=m))
  # the context matters; a context mask hiding one key equals dropping it
  ctx = _x((2, 4, 16), 9)
  a = apply(p, x, ctx, tnn.key_padding_mask(jnp.array([[1, 1, 1, 0]] * 2, bool)))
  b = apply(p, x, ctx[:, :3], None)
  np.testing.assert_allclose(a, b, atol=1e-5)


def test_additive_and_boolean_masks_agree():
  q, k, v = _x((1, 4, 2, 8), 1), _x((1, 5, 2, 8), 2), _x((1, 5, 2, 8), 3)
  m = jnp.array(np.random.RandomState(0).rand(4, 5) > 0.4)
  m = m.at[:, 0].set(True)
  a = tnn.dot_product_attention(q, k, v, m)
  b = tnn.dot_product_attention(q, k, v, jnp.where(m, 0.0, -1e9))
  np.testing.assert_allclose(a, b, atol=1e-6)


def test_attention_equals_the_float64_formula_with_masks():
  """softmax(q k^T / sqrt(d) + mask) v against float64 numpy, per batch and head, for the layout
  the products run in (heads-major): a bound, not bitwise (its round-off differs from the
  head-minor einsums used before, ~4e-7)."""
  b, lq, lk, h, d = 2, 5, 7, 3, 8
  q, k, v = _x((b, lq, h, d), 1), _x((b, lk, h, d), 2), _x((b, lk, h, d), 3)
  m = jnp.array(np.random.RandomState(0).rand(b, 1, lq, lk) > 0.4).at[..., 0].set(True)
  q64, k64, v64 = (np.asarray(a, np.float64) for a in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q64, k64) / np.sqrt(d)
  s = np.where(np.asarray(m), s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v64)
  np.testing.assert_allclose(tnn.dot_product_attention(q, k, v, m), want, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(jax.jit(tnn.dot_product_attention)(q, k, v, m), want, atol=2e-6,
                             rtol=1e-5)


@pytest.mark.parametrize("block_bytes", [1 << 30, 3500, 1])   # one block; blocks of 2 rows; of 1
@pytest.mark.parametrize("mask_kind", ["none", "causal", "keys", "keys_and_causal"])
def test_blocked_attention_equals_the_einsum_path_values_and_gradients(mask_kind, block_bytes):
  """blocked_attention (batch blocks, hand-written backward recomputing P) against
  dot_product_attention differentiated by JAX: outputs and the gradients of q, k, v, for a mask
  shared by the batch (causal), one per batch row (key padding, one row with no key left: uniform
  probabilities, zero gradient to q and k) and both; round-off bound, not bitwise."""
  b, l, h, d = 6, 12, 3, 8
  q, k, v, w = (_x((b, l, h, d), i) for i in range(4))
  valid = np.ones((b, l), bool)
  valid[1, 5:] = False
  valid[2] = False
  mask = {"none": None, "causal": tnn.group_causal_mask(l, 3),
          "keys": tnn.key_padding_mask(valid),
          "keys_and_causal": tnn.key_padding_mask(valid) & tnn.group_causal_mask(l, 3)}[mask_kind]
  n = tnn.attention.num_blocks(b, h, l, l, block_bytes)
  assert n == {1 << 30: 1, 3500: 3, 1: 6}[block_bytes]

  def loss_and_grads(fn):
    return jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(fn(q, k, v) * w), (0, 1, 2)))(q, k, v)
  want = loss_and_grads(lambda q, k, v: tnn.dot_product_attention(q, k, v, mask))
  got = loss_and_grads(lambda q, k, v: tnn.blocked_attention(q, k, v, mask, block_bytes=block_bytes))
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, e in zip(got[1], want[1]):
    np.testing.assert_allclose(g, e, atol=5e-6, rtol=1e-5)
  out = tnn.blocked_attention(q, k, v, mask, block_bytes=block_bytes)
  np.testing.assert_allclose(out, tnn.dot_product_attention(q, k, v, mask), atol=2e-6)
  if mask_kind.startswith("keys"):
    assert not np.any(np.asarray(got[1][0][2])) and not np.any(np.asarray(got[1][1][2]))


def test_blocked_attention_bf16_and_the_auto_choice():
  """bf16 inputs: output in the compute dtype, near the fp32 result; 'auto' resolves to the
  blocked kernel on this CPU backend (and to einsum elsewhere); an Attention module with 'auto'
  equals one with 'einsum' (round-off), with the same parameters."""
  q, k, v = (_x((4, 16, 2, 8), i) for i in range(3))
  out = tnn.blocked_attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), block_bytes=2048)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), tnn.dot_product_attention(q, k, v),
                             atol=3e-2)
  assert tnn.attention.resolve_impl("auto") == ("blocked" if jax.default_backend() == "cpu"
                                                else "einsum")
  assert tnn.attention.resolve_impl("fused") == "fused"
  x = _x((4, 16, 32), 5)
  a, e = tnn.Attention(num_heads=2, impl="auto"), tnn.Attention(num_heads=2, impl="einsum")
  params = a.init(jax.random.key(0), x)
  np.testing.assert_allclose(a.apply(params, x), e.apply(params, x), atol=2e-6)


def test_rmsnorm_fp32_and_dtype():
  n = tnn.RMSNorm(dtype=jnp.bfloat16)
  x = (_x((2, 3, 8)) * 100).astype(jnp.bfloat16)
  p = n.init(jax.random.key(0), x)
  y = n.apply(p, x)
  assert y.dtype == jnp.bfloat16
  ref = x.astype(jnp.float32) / jnp.sqrt(jnp.mean(x.astype(jnp.float32) ** 2, -1, keepdims=True)
                                         + 1e-5)
  np.testing.assert_allclose(y.astype(jnp.float32), ref, rtol=2e-2)


def test_pos_embed_resize():
  pe = tnn.PosEmbed2D((4, 4), 8)
  p = pe.init(jax.random.key(0), 4, 4)
  t = nn.unbox(p)["params"]["table"]
  np.testing.assert_array_equal(pe.apply(p, 4, 4), t)   # identity at the table's grid
  assert pe.apply(p, 2, 3).shape == (6, 8)
  # a constant table stays constant under resizing (weights are normalised)
  const = {"params": {"table": jnp.ones_like(t)}}
  np.testing.assert_allclose(pe.apply(const, 2, 3), 1.0, atol=1e-6)
  np.testing.assert_allclose(pe.apply(const, 7, 5), 1.0, atol=1e-6)


def test_fused_attention_matches_einsum():
  q, k, v = _x((2, 4, 2, 8), 1), _x((2, 6, 2, 8), 2), _x((2, 6, 2, 8), 3)
  m = jnp.array(np.random.RandomState(0).rand(4, 6) > 0.4).at[:, 0].set(True)
  np.testing.assert_allclose(tnn.fused_attention(q, k, v, m), tnn.dot_product_attention(q, k, v, m),
                             atol=1e-5)
  x = _x((2, 6, 16))
  mask = tnn.group_causal_mask(6, 2)
  a = tnn.TransformerBlock(**tnn.vit_block_kwargs(2, 32))
  b = tnn.TransformerBlock(**tnn.vit_block_kwargs(2, 32), attention_impl="fused")
  p = jax.jit(a.init)(jax.random.key(0), x, mask)
  np.testing.assert_allclose(jax.jit(b.apply)(p, x, mask), jax.jit(a.apply)(p, x, mask), atol=1e-5)


def test_adaln_single_block():
  """Zero table + (shift 0, scale 0, gate 1) conditioning == the plain block; a scale changes the
  output; the scanned stack threads the conditioning through."""
  kw = dict(tnn.vit_block_kwargs(2, 32, gelu_approximate=False), cross_attention=True)
  x, ctx = _x((2, 5, 16)), _x((2, 3, 24), 1)
  plain = tnn.TransformerBlock(**kw)
  ada = tnn.TransformerBlock(**kw, adaln=True)
  cond = jnp.zeros((2, 6, 16)).at[:, 2].set(1.0).at[:, 5].set(1.0)
  pa = nn.unbox(jax.jit(lambda: ada.init(jax.random.key(0), x, context=ctx, adaln_cond=cond))())
  assert pa["params"]["scale_shift_table"].shape == (6, 16)
  pa["params"]["scale_shift_table"] = jnp.zeros((6, 16))
  pp = {"params": {k: v for k, v in pa["params"].items() if k != "scale_shift_table"}}
  run = jax.jit(lambda p, c: ada.apply(p, x, context=ctx, adaln_cond=c))
  np.testing.assert_allclose(run(pa, cond), jax.jit(lambda p: plain.apply(p, x, context=ctx))(pp),
                             atol=1e-5)
  assert float(jnp.abs(run(pa, cond.at[:, 1].set(0.5)) - run(pa, cond)).max()) > 1e-4
  stack = tnn.TransformerStack(2, dict(kw, adaln=True), scan=True)
  v = jax.jit(lambda: stack.init(jax.random.key(0), x, context=ctx, adaln_cond=cond))()
  assert jax.jit(lambda v: stack.apply(v, x, context=ctx, adaln_cond=cond))(v).shape == x.shape

"""Next-detail diffusion: DetailFlow's next-detail AR transformer over *continuous* coarse-to-fine
1D tokens, with TransDiff's attention-based head denoising each group of g tokens jointly (the
combination none of the papers has; issue 5).

Trunk: `NextDetailTransformer` with token_dim = C: the same sequence layout, group-causal mask,
2D RoPE, null class and placeholders as the discrete model; it reads continuous tokens through a
linear projection and returns hidden states h [B, N, D].  As in the discrete model, position p
predicts token z_p, so h_p conditions z_p.

Head problems (`head_problems`), N = g M:
  * the first group is token-causal (z_k is read back before z_{k+1} is predicted), so each of
    z_0..z_{g-1} is its own 1-token problem conditioned on h_k;
  * group b >= 1, x0 = (z_{bg}, ..., z_{bg+g-1}) [g, C], is denoised jointly: self-attention inside
    the group, cross-attention to (h_{bg}, ..., h_{bg+g-1}).
Loss: rectified flow (`tdjax.diffusion.flow`) on every problem, each token weighted equally:
    L = (g L_first + (N - g) L_later) / N.

Sampling (`sample`): the first g tokens one at a time, then one group per step: g + M - 1 trunk
passes through the fixed-size KV cache, exactly the discrete model's schedule; at each step the
head's sampler (Euler-Maruyama with scale_0/scale_1, or Euler) produces the new tokens, which are
written back as the next inputs.  CFG runs the trunk on the class and the null class (two rows per
sample) and guides the head's drift.  `use_cache=False` recomputes the full trunk every step and
gives the same tokens (same noise keys).

Attention-survey switches (issue 49): `head_options`, ((field, value), ...) of
`tdjax.generators.heads.AttentionHead` (adaln_mode, cross_gate, qk_norm, cond_t_range, ...;
heads.py's docstring), and across scales `head_context`: 'group' (above: the head of group b
cross-attends to h_{bg..bg+g-1}) or 'all' (coarse to fine: to every trunk state up to its own
group, h_0..h_{bg+g-1}, through a condition mask; the first group's token k to h_0..h_k).
Sampling takes `pag_scale` (perturbed-attention guidance, `flow.pag_guided`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tdjax import configlib
from tdjax.diffusion import flow
from tdjax.generators import next_detail as nd
from tdjax.generators.heads import AttentionHead


class NextDetailDiffusion(nn.Module):
  """Trunk (continuous NextDetailTransformer) + attention head over groups of g tokens.

  trunk(tokens [B, q, C] position-aligned, labels [B], start, train, decode) -> h [B, q, D]
  denoise(x_t [B', l, C], t [B'] in [0, 1], cond [B', l, D], train) -> velocity [B', l, C]
  """
  token_dim: int = 8
  num_tokens: int = 32
  group_size: int = 4
  num_classes: int = 10
  dim: int = 128
  depth: int = 4
  num_heads: int = 4
  mlp_dim: int = 384
  head_width: int = 128
  head_depth: int = 2
  head_heads: int = 4
  class_dropout: float = 0.1
  dropout: float = 0.0
  scan: bool = False
  remat: str = "none"
  attention_impl: str = "auto"   # trunk and head (tdjax.nn.Attention.impl)
  head_options: tuple = ()         # ((AttentionHead field, value), ...): survey switches
  head_context: str = "group"      # 'group' | 'all' (module docstring)
  dtype: Any = jnp.float32

  def setup(self):
    nd.check_layout(self.num_tokens, self.group_size)
    self.ar = nd.NextDetailTransformer(
        vocab_size=1, num_tokens=self.num_tokens, group_size=self.group_size,
        num_classes=self.num_classes, dim=self.dim, depth=self.depth, num_heads=self.num_heads,
        mlp_dim=self.mlp_dim, token_dim=self.token_dim, class_dropout=self.class_dropout,
        token_dropout=self.dropout, dropout=self.dropout, scan=self.scan, remat=self.remat,
        attention_impl=self.attention_impl, dtype=self.dtype)
    if self.head_context not in ("group", "all"):
      raise ValueError(f"head_context={self.head_context!r}: expected 'group' or 'all'")
    opts = dict(self.head_options)
    if self.head_context == "all" and opts.get("conditioning", "cross") == "adaln":
      raise ValueError("head_context='all' gives the head more condition tokens than latent "
                       "tokens: it needs conditioning 'cross', 'incontext' or 'joint'")
    self.head = AttentionHead(self.token_dim, self.head_width, self.head_depth, self.head_heads,
                              max_len=self.group_size, attention_impl=self.attention_impl,
                              dtype=self.dtype, **opts)

  @property
  def null_class(self) -> int:
    return self.num_classes

  def trunk(self, tokens, labels, *, start=0, train: bool = False, decode: bool = False):
    return self.ar(tokens, labels, start=start, train=train, decode=decode)

  def denoise(self, x_t, t, cond, cond_mask=None, *, train: bool = False, pag: bool = False):
    """Velocity; t in [0, 1] is scaled to the 0..1000 the timestep embedder expects.  pag: the
    perturbed branch of perturbed-attention guidance."""
    kw = {"pag": True} if pag else {}
    return self.head(x_t, t * 1000.0, cond, cond_mask, deterministic=not train, **kw)

  def __call__(self, tokens, labels, *, train: bool = False):
    """Init helper: a full trunk pass and both head shapes (1-token and g-token problems)."""
    h = self.trunk(tokens, labels, train=train)
    g = self.group_size
    b = tokens.shape[0]
    t = jnp.zeros((b,))
    if self.head_context == "all":
      mask = jnp.ones(h.shape[:2], bool)
      self.denoise(tokens[:, :1], t, h, mask, train=train)
      return self.denoise(tokens[:, :g], t, h, mask, train=train)
    self.denoise(tokens[:, :1], t, h[:, :1], train=train)
    return self.denoise(tokens[:, :g], t, h[:, :g], train=train)


def head_options_tuple(opts) -> tuple:
  """A config node / dict of AttentionHead fields -> the hashable ((field, value), ...) of
  `NextDetailDiffusion.head_options` (lists become tuples)."""
  if not opts:
    return ()
  opts = opts.to_dict() if hasattr(opts, "to_dict") else dict(opts)
  return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in opts.items()))


def model_from_config(m, token_dim: int, dtype=jnp.float32) -> NextDetailDiffusion:
  """config.model (configs/next_detail_diffusion.py) -> the module: its fields by name, each
  default once, on the field."""
  return configlib.from_config(NextDetailDiffusion, m, "config.model", token_dim=int(token_dim),
                               dtype=jnp.dtype(dtype),
                               head_options=head_options_tuple(m.get("head_options")))


def init_params(model: NextDetailDiffusion, rng):
  tokens = jnp.zeros((1, model.num_tokens, model.token_dim))
  return model.init({"params": rng}, tokens, jnp.zeros((1,), jnp.int32))["params"]


def head_problems(tokens, hidden, group: int):
  """Clean tokens z [B, N, C] and trunk states h [B, N, D] -> the head's problems:
  (first: z [B g, 1, C], h [B g, 1, D]) and (later: z [B (M-1), g, C], h [B (M-1), g, D])."""
  b, n, c = tokens.shape
  d = hidden.shape[-1]
  first = (tokens[:, :group].reshape(b * group, 1, c), hidden[:, :group].reshape(b * group, 1, d))
  later = (tokens[:, group:].reshape(-1, group, c), hidden[:, group:].reshape(-1, group, d))
  return first, later


def all_group_conditions(hidden, group: int):
  """head_context='all': every problem's condition = all N trunk states with a mask up to its own
  group: (first: h [B g, N, D], mask [B g, N] (token k sees h_0..h_k)), (later: h [B (M-1), N, D],
  mask (group b sees h_0..h_{bg+g-1})), in `head_problems`' order."""
  b, n, d = hidden.shape
  m = n // group
  j = jnp.arange(n)
  first_mask = j[None] <= jnp.arange(group)[:, None]                         # [g, N]
  later_mask = j[None] < (jnp.arange(1, m)[:, None] + 1) * group             # [M-1, N]
  rep = lambda k, mask: (jnp.repeat(hidden, k, axis=0),
                         jnp.tile(mask, (b, 1)))
  return rep(group, first_mask), rep(m - 1, later_mask)


def flow_loss(model: NextDetailDiffusion, params, tokens, labels, rng, *, train: bool,
              batch_mul: int = 1):
  """Rectified-flow loss of a batch of clean continuous tokens [B, N, C] (module docstring)."""
  n, g = model.num_tokens, model.group_size
  k_drop, k_first, k_later, k_head = jax.random.split(rng, 4)
  rngs = {"dropout": k_drop} if train else {}
  inputs = nd.layout_ids(tokens[:, :n - g], n, g)        # z_0..z_{N-g-1} at their positions
  hidden = model.apply({"params": params}, inputs, labels, train=train, rngs=rngs,
                       method="trunk")
  head_rngs = {"dropout": k_head} if train else {}
  (z1, h1), (z2, h2) = head_problems(tokens, hidden, g)
  if model.head_context == "all":
    (c1, m1), (c2, m2) = all_group_conditions(hidden, g)
    h1, h2 = {"h": c1, "mask": m1}, {"h": c2, "mask": m2}
    vf = lambda x, t, c: model.apply({"params": params}, x, t, c["h"], c["mask"], train=train,
                                     rngs=head_rngs, method="denoise")
  else:
    vf = lambda x, t, c: model.apply({"params": params}, x, t, c, train=train, rngs=head_rngs,
                                     method="denoise")
  l1, _ = flow.flow_matching_loss(vf, z1, h1, k_first, batch_mul=batch_mul)
  l2, _ = flow.flow_matching_loss(vf, z2, h2, k_later, batch_mul=batch_mul)
  loss = (g * l1 + (n - g) * l2) / n
  return loss, {"flow_loss": loss, "flow_loss_first_group": l1, "flow_loss_later_groups": l2}


def _decode(model: NextDetailDiffusion, params, labels, rng, *, cfg: float, steps: int,
            sampler: str, scale_0: float, scale_1: float, use_cache: bool,
            pag_scale: float = 0.0):
  guided = cfg != 1.0
  every = model.head_context == "all"
  n, g, c = model.num_tokens, model.group_size, model.token_dim
  m = n // g
  b = labels.shape[0]
  labels = labels.astype(jnp.int32)
  if guided:
    labels = jnp.concatenate([labels, jnp.full((b,), model.null_class, jnp.int32)])
  rows = labels.shape[0]
  buf = jnp.zeros((rows, n + g, c), jnp.float32)    # position-aligned inputs (+ g of padding)
  out = jnp.zeros((b, n, c), jnp.float32)
  cache = None
  if use_cache:
    shapes = jax.eval_shape(lambda p: model.apply(
        {"params": p}, buf[:, :n], labels, decode=True, method="trunk", mutable=["cache"])[1],
        params)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])

  def trunk(buf, cache, start, q):
    if use_cache:
      chunk = jax.lax.dynamic_slice_in_dim(buf, start, q, axis=1)
      h, mut = model.apply({"params": params, "cache": cache}, chunk, labels, start=start,
                           decode=True, method="trunk", mutable=["cache"])
      return h, mut["cache"]
    h = model.apply({"params": params}, buf[:, :n], labels, method="trunk")
    return jax.lax.dynamic_slice_in_dim(h, start, q, axis=1), cache

  def denoise(h, key, q=None, mask=None):   # h [rows, q, D] -> new tokens [b, q, C]
    q = h.shape[1] if q is None else q       # head_context='all': h [rows, N, D] + mask
    k_noise, k_sde = jax.random.split(key)
    noise = jax.random.normal(k_noise, (b, q, c), jnp.float32)
    head = lambda x, t, h, mask, pag=False: model.apply({"params": params}, x, t, h, mask,
                                                        pag=pag, method="denoise")

    def pag(v_cond, x, t):
      v_pag = head(x, t, h[:b], None if mask is None else mask[:b], True)
      return flow.pag_guided(v_cond, v_pag, pag_scale, cfg if guided else 1.0)

    def vf(x, t):
      if not guided:
        v = head(x, t, h, mask)
        return pag(v, x, t) if pag_scale else v
      v = head(jnp.concatenate([x, x]), jnp.concatenate([t, t]), h, mask)
      return (pag(v[:b], x, t) if pag_scale else v[:b]), v[b:]

    scale = cfg if guided else 1.0
    if sampler == "euler":
      return flow.euler_sample(vf, noise, steps=steps, cfg=scale)
    return flow.euler_maruyama_sample(vf, noise, k_sde, steps=steps, cfg=scale, scale_0=scale_0,
                                      scale_1=scale_1)

  def write(buf, out, tok, first, position):
    out = jax.lax.dynamic_update_slice_in_dim(out, tok, first, axis=1)
    both = jnp.concatenate([tok, tok]) if guided else tok
    return jax.lax.dynamic_update_slice_in_dim(buf, both, position, axis=1), out

  def step(carry, start, q, key):
    buf, out, cache, states = carry
    h, cache = trunk(buf, cache, start, q)
    if every:     # all trunk states so far (coarse to fine), masked up to this step's group
      states = jax.lax.dynamic_update_slice_in_dim(states, h.astype(states.dtype), start, axis=1)
      seen = jnp.broadcast_to(jnp.arange(n) < start + q, (rows, n))
      tok = denoise(states, key, q, seen)
    else:
      tok = denoise(h, key)
    return tok, (buf, out, cache, states)

  def first_group(k, carry):          # z_k from position k; it then sits at position k + 1
    tok, (buf, out, cache, states) = step(carry, k, 1, jax.random.fold_in(rng, k))
    buf, out = write(buf, out, tok, k, k + 1)
    return buf, out, cache, states

  def later_group(i, carry):          # z_{ig..ig+g-1} from positions ig..ig+g-1; inputs at +g
    start = i * g
    tok, (buf, out, cache, states) = step(carry, start, g, jax.random.fold_in(rng, g - 1 + i))
    buf, out = write(buf, out, tok, start, start + g)
    return buf, out, cache, states

  states = None
  if every:
    states = jnp.zeros((rows, n, model.dim), jnp.float32)
  carry = jax.lax.fori_loop(0, g, first_group, (buf, out, cache, states))
  carry = jax.lax.fori_loop(1, m, later_group, carry)
  return carry[1]


@functools.lru_cache(maxsize=16)
def _compiled(model, cfg, steps, sampler, scale_0, scale_1, use_cache, pag_scale=0.0):
  return jax.jit(functools.partial(_decode, model, cfg=cfg, steps=steps, sampler=sampler,
                                   scale_0=scale_0, scale_1=scale_1, use_cache=use_cache,
                                   pag_scale=pag_scale))


def sample(model: NextDetailDiffusion, params, labels, rng, *, cfg: float = 1.0, steps: int = 50,
           sampler: str = "euler_maruyama", scale_0: float = 1.0, scale_1: float = 1.0,
           use_cache: bool = True, pag_scale: float = 0.0):
  """Continuous tokens [B, N, C] for class `labels` [B] (module docstring); pag_scale > 0:
  perturbed-attention guidance on the head (`flow.pag_guided`)."""
  if int(steps) <= 0:
    raise ValueError(f"sampling steps={steps}: expected > 0")
  if not cfg >= 1.0:
    raise ValueError(f"cfg={cfg} must be >= 1 (1 = no guidance; it scales the drift difference)")
  if sampler not in ("euler_maruyama", "euler"):
    raise ValueError(f"sampler={sampler!r}: expected 'euler_maruyama' or 'euler'")
  nd.validate_sampling(model, labels, cfg=cfg,
                       cfg_schedule="constant", temperature=1.0, top_k=0, top_p=1.0)
  fn = _compiled(model, float(cfg), int(steps), sampler, float(scale_0), float(scale_1),
                 bool(use_cache), *((float(pag_scale),) if pag_scale else ()))
  return fn(params, jnp.asarray(labels, jnp.int32), rng)


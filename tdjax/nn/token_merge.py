"""Token merging (ToMe, Bolya et al. 2023): bipartite soft matching of r token pairs, and the
inverse that copies each merged token's output back to every token it absorbed.

  merged, sizes, unmerge = bipartite_merge(x [B, L, D], r)      merged [B, L - r, D]
  y = f(merged)  (e.g. attention with proportional logits + log(sizes))
  out = unmerge(y)                                              [B, L, D']

Matching: tokens alternate into sets A (even positions) and B (odd); each A token's most
cosine-similar B token is its candidate; the r A tokens with the highest similarity are averaged
into their B token (weighted by the number of tokens each already stands for, `sizes`), the others
stay.  So sum(sizes * merged) = sum(sizes_in * x) (the size-weighted mean is kept), sizes sum to L,
and unmerge(merge(x)) = x where the merged tokens were equal.  r is capped at L // 2; r = 0 is the
identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def bipartite_merge(x, r: int, sizes=None):
  b, l, _ = x.shape
  r = max(0, min(int(r), l // 2))
  sizes = jnp.ones((b, l), jnp.float32) if sizes is None else sizes.astype(jnp.float32)
  if r == 0:
    return x, sizes, lambda y: y
  a, bb = x[:, ::2], x[:, 1::2]                      # |A| = ceil(L/2), |B| = floor(L/2)
  la = a.shape[1]
  sa, sb = sizes[:, ::2], sizes[:, 1::2]
  unit = lambda v: v.astype(jnp.float32) / (jnp.linalg.norm(v.astype(jnp.float32), axis=-1,
                                                             keepdims=True) + 1e-6)
  scores = jnp.einsum("bid,bjd->bij", unit(a), unit(bb))
  best, match = scores.max(-1), scores.argmax(-1)     # [B, |A|]
  order = jnp.argsort(-best, axis=-1)
  src, unm = order[:, :r], order[:, r:]
  dst = jnp.take_along_axis(match, src, axis=1)       # [B, r]

  def one(a, bb, sa, sb, src, unm, dst):
    wb = (bb.astype(jnp.float32) * sb[:, None]).at[dst].add(a[src].astype(jnp.float32)
                                                            * sa[src][:, None])
    nb = sb.at[dst].add(sa[src])
    merged = jnp.concatenate([a[unm].astype(jnp.float32), wb / nb[:, None]], axis=0)
    return merged.astype(x.dtype), jnp.concatenate([sa[unm], nb])

  merged, new_sizes = jax.vmap(one)(a, bb, sa, sb, src, unm, dst)

  def unmerge(y):
    def one(y, src, unm, dst):
      yu, yb = y[:la - r], y[la - r:]
      ya = jnp.zeros((la,) + y.shape[1:], y.dtype).at[unm].set(yu).at[src].set(yb[dst])
      out = jnp.zeros((l,) + y.shape[1:], y.dtype)
      return out.at[0::2].set(ya).at[1::2].set(yb)
    return jax.vmap(one)(y, src, unm, dst)

  return merged, new_sizes, unmerge

"""Blocked (flash-style) attention in plain jnp/XLA, for any platform.

Queries and keys are cut into tiles of `block_q` x `block_kv`. One
`lax.scan` walks a static list of (query tile, key tile) pairs, grouped by
query tile, and keeps FlashAttention's online softmax in float32 (running
maximum, running sum and accumulator of the current query tile). Each step
holds one [b, k, g, block_q, block_kv] score tile; its mask is
`kernels.masks.attention_mask` of the tile's positions and segment ids, so the
rules are those of the dense reference, exactly.

Static tile skipping: when `MaskSpec.index_ordered` (self-attention over a
training or prefill batch), a query at index i sees a key at index j only if
j <= i (causal) and |i - j| < W (window), whatever the packing, so the pair
list leaves out the tiles that those index rules hide entirely, and the
compiled work and memory follow the visible band (at 4096 tokens, window 512,
tiles of 512: 15 pairs instead of 64). Prefix-LM flags let prefix keys be
seen from earlier queries, so with them the causal rule skips nothing (the
window rule still does). A decoding cache or cross-attention visits every
tile.

The gradient is a `jax.custom_vjp` that, as FlashAttention, saves only the
output and the per-row logsumexp and recomputes each tile's probabilities in a
second scan over the same pairs: no step keeps more than a few tiles, and the
backward pass never stores the probabilities of all tiles. (Forward-mode
differentiation, `jax.jvp`, is not defined for it.)

A query that sees no key gets a zero output and zero gradients.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t5x_adapt.kernels.masks import MaskInputs, MaskSpec, attention_mask
from t5x_adapt.kernels.softcap import softcap

# Tile sizes when the caller gives none (module-level so that tests can use
# tiny tiles through the models).
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_KV = 512


def num_tiles(length: int, block: int) -> int:
  return -(-length // block)


def tile_pairs(spec: MaskSpec, has_prefix: bool, q_len: int, kv_len: int,
               block_q: int, block_kv: int) -> tuple[np.ndarray, np.ndarray]:
  """The (query tile, key tile) pairs to compute, grouped by query tile.

  Without `spec.index_ordered` (or when the query and key lengths differ)
  every pair. Otherwise a tile is left out when no query index i and key
  index j inside it (the real, unpadded ones) satisfy the index rules of the
  mask: j <= i when causal without prefix flags, i - j < W and j - i < A
  with a window (A = `spec.ahead`).

  Args:
    spec: The static mask.
    has_prefix: Whether prefix-LM flags are given.
    q_len: Queries (unpadded).
    kv_len: Keys (unpadded).
    block_q: Queries per tile.
    block_kv: Keys per tile.

  Returns:
    (query tile indices, key tile indices), int32 arrays of the same length.
  """
  q_tiles, kv_tiles = [], []
  skip = spec.index_ordered and q_len == kv_len
  for qi in range(num_tiles(q_len, block_q)):
    first_q, last_q = qi * block_q, min((qi + 1) * block_q, q_len) - 1
    for kj in range(num_tiles(kv_len, block_kv)):
      first_k, last_k = kj * block_kv, min((kj + 1) * block_kv, kv_len) - 1
      if skip and spec.causal and not has_prefix and first_k > last_q:
        continue  # every key after every query
      # Smallest i - j (keys behind) and j - i (keys ahead) over the ranges.
      behind, ahead = first_q - last_k, first_k - last_q
      if skip and spec.window is not None and (behind >= spec.window or
                                               ahead >= spec.ahead):
        continue
      q_tiles.append(qi)
      kv_tiles.append(kj)
  return np.asarray(q_tiles, np.int32), np.asarray(kv_tiles, np.int32)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one call (hashable: a custom_vjp static arg).

  Attributes:
    spec: The static mask.
    scale: Multiplies the raw scores.
    logit_softcap: Softcap of the scaled scores, or None.
    block_q: Queries per tile.
    block_kv: Keys per tile.
    q_len: Queries (unpadded).
    kv_len: Keys (unpadded).
    q_tiles: Query tile of each visited pair.
    kv_tiles: Key tile of each visited pair.
  """

  spec: MaskSpec
  scale: float
  logit_softcap: Optional[float]
  block_q: int
  block_kv: int
  q_len: int
  kv_len: int
  q_tiles: tuple[int, ...]
  kv_tiles: tuple[int, ...]

  def pairs(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scan inputs: query tile, key tile, and whether a query tile starts."""
    q_tiles = np.asarray(self.q_tiles, np.int32)
    starts = np.ones_like(q_tiles, bool)
    starts[1:] = q_tiles[1:] != q_tiles[:-1]
    return (jnp.asarray(q_tiles), jnp.asarray(self.kv_tiles, jnp.int32),
            jnp.asarray(starts))


# -- tiling ------------------------------------------------------------------


def _to_tiles(x: jax.Array, axis: int, block: int) -> jax.Array:
  """Cuts `axis` into tiles of `block` (zero-padded) and puts them first.

  E.g. [b, k, g, t, h] with axis 3 -> [ceil(t / block), b, k, g, block, h].
  Zero padding is segment id 0 (never seen) for the mask inputs.
  """
  length = x.shape[axis]
  count = num_tiles(length, block)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, count * block - length)
  x = jnp.pad(x, widths)
  x = x.reshape(x.shape[:axis] + (count, block) + x.shape[axis + 1:])
  return jnp.moveaxis(x, axis, 0)


def _from_tiles(x: jax.Array, axis: int, length: int) -> jax.Array:
  """Inverse of `_to_tiles`: the tiles back into `axis`, cut to `length`."""
  x = jnp.moveaxis(x, 0, axis)
  x = x.reshape(x.shape[:axis] + (-1,) + x.shape[axis + 2:])
  return jax.lax.slice_in_dim(x, 0, length, axis=axis)


def _tile(x: jax.Array, index: jax.Array) -> jax.Array:
  """Tile `index` of tiled `x`."""
  return jax.lax.dynamic_index_in_dim(x, index, axis=0, keepdims=False)


def _add_to_tile(x: jax.Array, index: jax.Array,
                 update: jax.Array) -> jax.Array:
  """`x` with `update` added to its tile `index` (in place inside a loop)."""
  return jax.lax.dynamic_update_index_in_dim(x, _tile(x, index) + update,
                                             index, axis=0)


class _TiledInputs:
  """Queries, keys, values and mask inputs cut into tiles, heads first.

  Attributes:
    plan: The call's static plan.
    query: [nq, b, k, g, block_q, h].
    key: [nk, b, k, block_kv, h].
    value: [nk, b, k, block_kv, h].
    mask: MaskInputs with [nq, b, block_q] / [nk, b, block_kv] arrays.
  """

  def __init__(self, plan: _Plan, query, key, value, mask: MaskInputs):
    self.plan = plan
    self.query = _to_tiles(_heads_first(query, key.shape[2]), 3,
                           plan.block_q)
    self.key = _to_tiles(key.transpose(0, 2, 1, 3), 2, plan.block_kv)
    self.value = _to_tiles(value.transpose(0, 2, 1, 3), 2, plan.block_kv)
    q_block, kv_block = plan.block_q, plan.block_kv
    tiled = lambda x, block: None if x is None else _to_tiles(x, 1, block)
    self.mask = MaskInputs(tiled(mask.query_positions, q_block),
                           tiled(mask.key_positions, kv_block),
                           tiled(mask.query_segment_ids, q_block),
                           tiled(mask.key_segment_ids, kv_block),
                           tiled(mask.query_prefix, q_block),
                           tiled(mask.key_prefix, kv_block))

  def tile_mask(self, qi: jax.Array, kj: jax.Array) -> jax.Array:
    """[b, 1, 1, block_q, block_kv] bool: what the tile's queries see."""
    m = self.mask
    pick = lambda x, i: None if x is None else _tile(x, i)
    visible = attention_mask(
        _tile(m.query_positions, qi), _tile(m.key_positions, kj),
        _tile(m.query_segment_ids, qi), _tile(m.key_segment_ids, kj),
        causal=self.plan.spec.causal, window=self.plan.spec.window,
        window_ahead=self.plan.spec.window_ahead,
        query_prefix=pick(m.query_prefix, qi),
        key_prefix=pick(m.key_prefix, kj))
    return visible[:, :, None]

  def tile_logits(self, qi: jax.Array, kj: jax.Array) -> jax.Array:
    """[b, k, g, block_q, block_kv] float32 softcapped scores (unmasked)."""
    scores = jnp.einsum('bkgqh,bksh->bkgqs', _tile(self.query, qi),
                        _tile(self.key, kj),
                        preferred_element_type=jnp.float32)
    return softcap(scores * self.plan.scale, self.plan.logit_softcap)


def _heads_first(x: jax.Array, num_kv_heads: int) -> jax.Array:
  """[b, t, n, ...] -> [b, k, g, t, ...]: query head n is (n // g, n % g)."""
  batch, length, num_heads = x.shape[:3]
  x = x.reshape((batch, length, num_kv_heads, num_heads // num_kv_heads)
                + x.shape[3:])
  return jnp.moveaxis(x, 1, 3)


def _heads_last(x: jax.Array) -> jax.Array:
  """Inverse of `_heads_first`: [b, k, g, t, ...] -> [b, t, n, ...]."""
  x = jnp.moveaxis(x, 3, 1)
  return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])


# -- forward -----------------------------------------------------------------


def _forward(plan: _Plan, query, key, value,
             mask: MaskInputs) -> tuple[jax.Array, jax.Array]:
  """Output [b, t, n, h] (query dtype) and logsumexp [b, k, g, t] (float32).

  A row that sees no key has output 0 and logsumexp -inf (its softmax
  weight when parts are merged: `merged_blocked_attention`).
  """
  tiles = _TiledInputs(plan, query, key, value, mask)
  num_q, batch, kv_heads, groups, block_q, head_dim = tiles.query.shape
  row_shape = (batch, kv_heads, groups, block_q)

  def step(carry, pair):
    running_max, running_sum, acc, out, lse = carry
    qi, kj, first_of_tile = pair
    # A new query tile: forget the previous tile's softmax state.
    running_max = jnp.where(first_of_tile, -jnp.inf, running_max)
    running_sum = jnp.where(first_of_tile, 0.0, running_sum)
    acc = jnp.where(first_of_tile, 0.0, acc)

    logits = jnp.where(tiles.tile_mask(qi, kj), tiles.tile_logits(qi, kj),
                       -jnp.inf)
    new_max = jnp.maximum(running_max, logits.max(axis=-1))
    # While a row has seen no key its maximum is -inf; subtracting 0 instead
    # keeps exp(-inf - -inf) = NaN out (every term is then exp(-inf) = 0).
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    correction = jnp.exp(running_max - safe_max)
    probs = jnp.exp(logits - safe_max[..., None])
    running_sum = running_sum * correction + probs.sum(axis=-1)
    value_tile = _tile(tiles.value, kj)
    acc = acc * correction[..., None] + jnp.einsum(
        'bkgqs,bksh->bkgqh', probs.astype(value_tile.dtype), value_tile,
        preferred_element_type=jnp.float32)

    # Written at every step; the last pair of a query tile writes the final
    # value (the division is cheap next to the tile's matmuls).
    seen = running_sum > 0  # rows that have seen a key
    safe_sum = jnp.where(seen, running_sum, 1.0)
    out = jax.lax.dynamic_update_index_in_dim(
        out, acc / safe_sum[..., None], qi, axis=0)
    row_lse = jnp.where(seen, safe_max + jnp.log(safe_sum), -jnp.inf)
    lse = jax.lax.dynamic_update_index_in_dim(lse, row_lse, qi, axis=0)
    return (new_max, running_sum, acc, out, lse), None

  init = (jnp.full(row_shape, -jnp.inf, jnp.float32),
          jnp.zeros(row_shape, jnp.float32),
          jnp.zeros(row_shape + (head_dim,), jnp.float32),
          jnp.zeros((num_q,) + row_shape + (head_dim,), jnp.float32),
          jnp.full((num_q,) + row_shape, -jnp.inf, jnp.float32))
  (_, _, _, out, lse), _ = jax.lax.scan(step, init, plan.pairs())
  out = _heads_last(_from_tiles(out, 3, plan.q_len)).astype(query.dtype)
  return out, _from_tiles(lse, 3, plan.q_len)


# -- backward ----------------------------------------------------------------


def _backward(plan: _Plan, query, key, value, mask: MaskInputs, out, lse,
              d_out) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Gradients w.r.t. query, key and value, FlashAttention-2 style.

  `out` and `lse` are the softmax's whole output and logsumexp: for merged
  attention, those of all parts together, which makes each part's
  gradient its share of the one softmax's.

  Per tile: probs = exp(logits - lse) (0 where masked), then
    d_value += probs^T d_out,
    d_logits = probs * (d_out . value - rowsum(d_out * out)),
  through the softcap's derivative 1 - tanh^2 and the scale to d_query and
  d_key.
  """
  tiles = _TiledInputs(plan, query, key, value, mask)
  num_kv_heads = key.shape[2]
  # [b, k, g, t]: rowsum(d_out * out), the softmax's correction term.
  delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32),
                  axis=-1)
  delta = _to_tiles(_heads_first(delta, num_kv_heads), 3, plan.block_q)
  lse = _to_tiles(lse, 3, plan.block_q)
  d_out = _to_tiles(_heads_first(d_out, num_kv_heads), 3, plan.block_q)
  cap = plan.logit_softcap

  def step(carry, pair):
    d_query, d_key, d_value = carry
    qi, kj, _ = pair
    logits = tiles.tile_logits(qi, kj)
    probs = jnp.where(tiles.tile_mask(qi, kj),
                      jnp.exp(logits - _tile(lse, qi)[..., None]), 0.0)
    d_out_tile = _tile(d_out, qi)
    query_tile = _tile(tiles.query, qi)
    key_tile, value_tile = _tile(tiles.key, kj), _tile(tiles.value, kj)

    d_value_tile = jnp.einsum('bkgqs,bkgqh->bksh',
                              probs.astype(d_out_tile.dtype), d_out_tile,
                              preferred_element_type=jnp.float32)
    d_probs = jnp.einsum('bkgqh,bksh->bkgqs', d_out_tile, value_tile,
                         preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - _tile(delta, qi)[..., None])
    if cap is not None:
      d_logits *= 1.0 - jnp.square(logits / cap)  # tanh' = 1 - tanh^2
    d_scores = (d_logits * plan.scale).astype(query_tile.dtype)
    d_query_tile = jnp.einsum('bkgqs,bksh->bkgqh', d_scores, key_tile,
                              preferred_element_type=jnp.float32)
    d_key_tile = jnp.einsum('bkgqs,bkgqh->bksh', d_scores, query_tile,
                            preferred_element_type=jnp.float32)
    return (_add_to_tile(d_query, qi, d_query_tile),
            _add_to_tile(d_key, kj, d_key_tile),
            _add_to_tile(d_value, kj, d_value_tile)), None

  init = (jnp.zeros(tiles.query.shape, jnp.float32),
          jnp.zeros(tiles.key.shape, jnp.float32),
          jnp.zeros(tiles.value.shape, jnp.float32))
  (d_query, d_key, d_value), _ = jax.lax.scan(step, init, plan.pairs())
  d_query = _heads_last(_from_tiles(d_query, 3, plan.q_len))
  kv_back = lambda x: _from_tiles(x, 2, plan.kv_len).transpose(0, 2, 1, 3)
  return (d_query.astype(query.dtype), kv_back(d_key).astype(key.dtype),
          kv_back(d_value).astype(value.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(plan: _Plan, query, key, value, mask: MaskInputs):
  """The output of `_forward`, with the recomputing gradient below."""
  return _forward(plan, query, key, value, mask)[0]


def _attention_fwd(plan, query, key, value, mask):
  out, lse = _forward(plan, query, key, value, mask)
  return out, (query, key, value, mask, out, lse)


def _attention_bwd(plan, residuals, d_out):
  query, key, value, mask, out, lse = residuals
  grads = _backward(plan, query, key, value, mask, out, lse, d_out)
  # The mask inputs are integers and booleans: no cotangent.
  return grads + (None,)


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      mask: MaskInputs, spec: MaskSpec, *, scale: float,
                      logit_softcap: Optional[float] = None,
                      block_q: Optional[int] = None,
                      block_kv: Optional[int] = None) -> jax.Array:
  """Tiled attention with an online softmax; the function of `dense_attention`.

  Args:
    query: [b, t, n, h].
    key: [b, s, k, h].
    value: [b, s, k, h].
    mask: Positions, segment ids, prefix flags.
    spec: Causality, window, and whether tiles may be skipped by index.
    scale: Multiplies the raw scores.
    logit_softcap: Softcap of the scaled scores, before masking.
    block_q: Queries per tile (default `DEFAULT_BLOCK_Q`; at most t).
    block_kv: Keys per tile (default `DEFAULT_BLOCK_KV`; at most s).

  Returns:
    [b, t, n, h] in the query's dtype; 0 for a query that sees no key.
  """
  plan = _plan(query, key, mask, spec, scale, logit_softcap, block_q,
               block_kv)
  return _attention(plan, query, key, value, mask)


def _plan(query, key, mask: MaskInputs, spec: MaskSpec, scale: float,
          logit_softcap: Optional[float], block_q: Optional[int],
          block_kv: Optional[int]) -> _Plan:
  """The static plan of one call: tile sizes and the pairs to visit."""
  q_len, kv_len = query.shape[1], key.shape[1]
  block_q = min(block_q or DEFAULT_BLOCK_Q, q_len)
  block_kv = min(block_kv or DEFAULT_BLOCK_KV, kv_len)
  q_tiles, kv_tiles = tile_pairs(spec, mask.has_prefix, q_len, kv_len,
                                 block_q, block_kv)
  return _Plan(spec, float(scale), logit_softcap, block_q, block_kv, q_len,
               kv_len, tuple(q_tiles.tolist()), tuple(kv_tiles.tolist()))


# -- merged attention ----------------------------------------------------------


def _merge(outs, lses):
  """One softmax's output and logsumexp from its parts'.

  Each part's output is normalised over its own keys; weighted by
  exp(lse_part - lse) they sum to the output over all keys. A row that sees
  no key in any part gets output 0 and logsumexp 0 (nothing reads it).

  Args:
    outs: Per part [b, t, n, h].
    lses: Per part [b, k, g, t] float32, -inf where the part has no key.
  """
  top = functools.reduce(jnp.maximum, lses)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = [jnp.exp(lse - top) for lse in lses]
  total = functools.reduce(jnp.add, weights)
  safe_total = jnp.where(total > 0, total, 1.0)
  out = functools.reduce(jnp.add, [
      _heads_last((w / safe_total)[..., None]) * o.astype(jnp.float32)
      for w, o in zip(weights, outs)])
  lse = jnp.where(total > 0, top + jnp.log(safe_total), 0.0)
  return out.astype(outs[0].dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _merged(plans, query, keys, values, masks):
  """`_merge` of each part's `_forward`, with the recomputing gradient."""
  return _merged_fwd(plans, query, keys, values, masks)[0]


def _merged_fwd(plans, query, keys, values, masks):
  parts = [_forward(*args) for args in zip(plans, [query] * len(plans), keys,
                                           values, masks)]
  out, lse = _merge(*zip(*parts))
  return out, (query, keys, values, masks, out, lse)


def _merged_bwd(plans, residuals, d_out):
  query, keys, values, masks, out, lse = residuals
  d_query, d_keys, d_values = None, [], []
  for plan, key, value, mask in zip(plans, keys, values, masks):
    dq, dk, dv = _backward(plan, query, key, value, mask, out, lse, d_out)
    d_query = dq if d_query is None else d_query + dq
    d_keys.append(dk)
    d_values.append(dv)
  return d_query, tuple(d_keys), tuple(d_values), (None,) * len(masks)


_merged.defvjp(_merged_fwd, _merged_bwd)


def merged_blocked_attention(
    query: jax.Array,
    parts: Sequence[tuple[jax.Array, jax.Array, MaskInputs, MaskSpec]],
    *, scale: float, logit_softcap: Optional[float] = None,
    block_q: Optional[int] = None,
    block_kv: Optional[int] = None) -> jax.Array:
  """One softmax over several key sets, each tiled with its own mask.

  T5Gemma 2's merged attention without the joined score matrix: each part
  (the decoder's own causal, windowed keys; the encoder's) runs the tiled
  online softmax of `blocked_attention` with its own tile skipping, and the
  parts' outputs combine exactly by their logsumexps (`_merge`). The
  gradient runs each part's backward pass against the merged output and
  logsumexp, which is each part's share of the one softmax's gradient.

  Args:
    query: [b, t, n, h].
    parts: (key [b, s_i, k, h], value [b, s_i, k, h], mask, spec) per key
      set.
    scale, logit_softcap, block_q, block_kv: As `blocked_attention`.

  Returns:
    [b, t, n, h] in the query's dtype; 0 for a query that sees no key.
  """
  plans, keys, values, masks = [], [], [], []
  for key, value, mask, spec in parts:
    plans.append(_plan(query, key, mask, spec, scale, logit_softcap, block_q,
                       block_kv))
    keys.append(key)
    values.append(value)
    masks.append(mask)
  return _merged(tuple(plans), query, tuple(keys), tuple(values), tuple(masks))

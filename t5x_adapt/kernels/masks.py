"""Attention masks, all built from positions and segment ids.

Every mask used in the project is one call of `attention_mask`:

* causal (decoder, decoder-only): `causal=True`;
* bidirectional (encoder): `causal=False`;
* causal sliding window, `q - W < k <= q`: `causal=True, window=W`;
* two-sided sliding window, `|q - k| < W` (T5Gemma encoder local layers):
  `causal=False, window=W`; a lopsided one, `q - W < k < q + A` (T5Gemma 2
  splits its window around the query): `causal=False, window=W,
  window_ahead=A`;
* padding and packing: segment id 0 is padding, keys attend only within their
  own segment;
* prefix-LM: `causal=True` plus `query_prefix` / `key_prefix` flags (seqio's
  `decoder_causal_attention`): prefix tokens see the whole prefix.

Positions, not array indices, decide order and distance, so the same function
serves packed batches (positions restart per segment) and decoding with a
ring-buffer cache (slots hold their token's position; -1 marks an empty slot).
"""

from typing import Optional

import jax


def attention_mask(query_positions: jax.Array,
                   key_positions: jax.Array,
                   query_segment_ids: jax.Array,
                   key_segment_ids: jax.Array,
                   *,
                   causal: bool,
                   window: Optional[int] = None,
                   window_ahead: Optional[int] = None,
                   query_prefix: Optional[jax.Array] = None,
                   key_prefix: Optional[jax.Array] = None) -> jax.Array:
  """Boolean mask [batch, 1, q_length, k_length]: True where attention is allowed.

  Args:
    query_positions: [batch, q_length] int positions of the queries.
    key_positions: [batch, k_length] int positions of the keys.
    query_segment_ids: [batch, q_length]; 0 marks padding.
    key_segment_ids: [batch, k_length]; 0 marks padding (never attended to).
    causal: Whether a query may only see keys at or before its position.
    window: Sliding-window size W: only keys with q - k < W are seen, and
      (unless `window_ahead` says otherwise) k - q < W.
    window_ahead: Keys ahead of the query are seen while k - q < this
      (default `window`); a causal mask sees none ahead anyway.
    query_prefix: [batch, q_length] bool, queries inside the prefix.
    key_prefix: [batch, k_length] bool, keys inside the prefix.

  Returns:
    The mask, broadcastable over heads.
  """
  q_pos = query_positions[:, :, None]
  k_pos = key_positions[:, None, :]
  k_seg = key_segment_ids[:, None, :]
  mask = (query_segment_ids[:, :, None] == k_seg) & (k_seg > 0)
  if causal:
    visible = k_pos <= q_pos
    if query_prefix is not None:
      visible |= query_prefix[:, :, None] & key_prefix[:, None, :]
    mask &= visible
  if window is not None:
    ahead = window if window_ahead is None else window_ahead
    mask &= (q_pos - k_pos < window) & (k_pos - q_pos < ahead)
  return mask[:, None, :, :]

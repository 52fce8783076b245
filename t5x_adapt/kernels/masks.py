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

The attention kernels take a mask in two halves, `MaskInputs` (the arrays)
and `MaskSpec` (the static kind), from which each builds what it needs;
`dense_mask` is the boolean array of both.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

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


class MaskInputs(NamedTuple):
  """The dynamic half of a mask: the arrays `attention_mask` reads.

  Attributes:
    query_positions: [b, t] int positions of the queries.
    key_positions: [b, s] int positions of the keys (-1: an empty cache slot).
    query_segment_ids: [b, t]; 0 is padding.
    key_segment_ids: [b, s]; 0 is padding.
    query_prefix: Optional [b, t] bool prefix-LM flags.
    key_prefix: Optional [b, s] bool prefix-LM flags.
  """

  query_positions: jax.Array
  key_positions: jax.Array
  query_segment_ids: jax.Array
  key_segment_ids: jax.Array
  query_prefix: Optional[jax.Array] = None
  key_prefix: Optional[jax.Array] = None

  @property
  def has_prefix(self) -> bool:
    return self.query_prefix is not None


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """The static half of a mask.

  Attributes:
    causal: Queries see keys at or before their position.
    window: Sliding window W (q - k < W and k - q < W), None for global
      attention.
    index_ordered: Positions advance by one with the array index inside
      every segment, and queries and keys are the same tokens (self-attention
      over a training or prefill batch, packed or padded). Kernels may then
      skip tiles from indices alone; a decoding cache (a ring buffer) or
      cross-attention is not index-ordered.
    window_ahead: For a lopsided two-sided window, the bound on k - q
      instead of W (T5Gemma 2's encoder); None: W.
  """

  causal: bool
  window: Optional[int] = None
  index_ordered: bool = False
  window_ahead: Optional[int] = None

  @property
  def ahead(self) -> Optional[int]:
    """The bound on k - q of a windowed mask (None without a window)."""
    if self.window is None:
      return None
    return self.window if self.window_ahead is None else self.window_ahead

  def describe(self) -> str:
    kind = 'causal' if self.causal else 'bidirectional'
    if self.window is not None:
      kind += f' window {self.window}'
      if not self.causal and self.ahead != self.window:
        kind += f' (ahead {self.ahead})'
    return kind


def dense_mask(mask: MaskInputs, spec: MaskSpec) -> jax.Array:
  """The boolean [b, 1, t, s] mask of both halves (`attention_mask`)."""
  return attention_mask(mask.query_positions, mask.key_positions,
                        mask.query_segment_ids, mask.key_segment_ids,
                        causal=spec.causal, window=spec.window,
                        window_ahead=spec.window_ahead,
                        query_prefix=mask.query_prefix,
                        key_prefix=mask.key_prefix)

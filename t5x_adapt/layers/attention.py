"""Grouped-query attention: self, cross and merged, with decoding caches."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_adapt.kernels.attention import dot_product_attention
from t5x_adapt.kernels.attention import merged_attention
from t5x_adapt.kernels.masks import MaskInputs, MaskSpec
from t5x_adapt.kernels.softcap import softcap
from t5x_adapt.layers.dense import Projection
from t5x_adapt.layers.norms import RMSNorm
from t5x_adapt.layers.rope import apply_rope

__all__ = ['Attention', 'softcap']


def _heads_first(x: jax.Array) -> jax.Array:
  """[b, s, k, h] -> [b, k, s, h], the decoding caches' layout."""
  return x.transpose(0, 2, 1, 3)


class Attention(nn.Module):
  """Multi-head attention with MHA / GQA / MQA, Gemma style.

  Self-attention applies RoPE (`rope_base`) to queries and keys; cross-attention
  (`rope_base=None`) does not and is always global. Key/value projections take
  whatever width `inputs_kv` has, so cross-attention of an unbalanced model
  projects from the encoder width.

  Decoding (`decode=True`) keeps, per layer, a cache of `cache_length` slots
  used as a ring buffer: row r's slot `n % cache_length` holds its token `n`,
  together with the token's position (-1 while empty), and `cache_index`
  [batch] counts each row's tokens, so rows may be at different steps (a
  serving engine's slots). A sliding-window layer needs only `window` slots.
  Keys and values are cached heads first ([batch, kv_heads, slots,
  head_dim]): the layout the score matmuls read, so no step copies a cache.
  Cross-attention caches the encoder keys and values the first time it is
  called (when the cache collection is created), and reads them afterwards:
  later calls need no encoder output.

  Merged attention (`merged=True`, T5Gemma 2's decoder) is self-attention
  whose queries also see the encoder output: its keys and values come from
  the same key/value projections (and key norm), without RoPE, and join the
  self keys in one softmax, unmasked but for padding and segments. There are
  no cross-attention weights; the encoder keys are cached like
  cross-attention's.

  Attributes:
    num_heads: Query heads.
    num_kv_heads: Key/value heads.
    head_dim: Width of one head.
    query_scale: Multiplies the raw scores.
    attn_logit_softcap: Softcap of the scores, applied before masking.
    use_qk_norm: RMSNorm of each query and key head (Gemma 3).
    rope_base: RoPE base; None for cross-attention.
    rope_scale: RoPE scaling factor (linear, or Llama 3's with
      `rope_llama3`).
    rope_llama3: Llama 3 RoPE scaling (`layers.rope.inverse_frequencies`).
    qkv_bias: Biases on the query, key and value projections (Qwen 2).
    norm_style: The QK norms' parameterisation ('gemma' or 'plain').
    causal: Causal self-attention (decoder) or bidirectional (encoder).
    window: Sliding window of this layer, None for a global layer.
    window_ahead: Bound on k - q of a bidirectional window (`MaskSpec`).
    merged: Self-attention that also attends to `encoded` (see above).
    rms_norm_eps: Epsilon of the QK norms.
    attention_impl: `t5x_adapt.kernels` implementation ('dense', 'blocked',
      'splash', 'cudnn', 'auto').
    dtype: Activation dtype.
    param_dtype: Parameter dtype.
  """

  num_heads: int
  num_kv_heads: int
  head_dim: int
  query_scale: float
  attn_logit_softcap: Optional[float] = None
  use_qk_norm: bool = False
  rope_base: Optional[float] = 10_000.0
  rope_scale: float = 1.0
  rope_llama3: Optional[tuple[float, float, int]] = None
  qkv_bias: bool = False
  norm_style: str = 'gemma'
  causal: bool = True
  window: Optional[int] = None
  window_ahead: Optional[int] = None
  merged: bool = False
  rms_norm_eps: float = 1e-6
  attention_impl: str = 'dense'
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @property
  def is_cross_attention(self) -> bool:
    return self.rope_base is None

  def _projection(self, name, features, axes):
    return Projection(features, axes, use_bias=self.qkv_bias,
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      name=name)

  def _qk_norm(self, name):
    return RMSNorm(self.rms_norm_eps, 'head_dim', self.param_dtype,
                   style=self.norm_style, name=name)

  def _rope(self, x, positions):
    return apply_rope(x, positions, self.rope_base, self.rope_scale,
                      self.rope_llama3)

  def _kv_projector(self):
    """inputs [batch, kv_len, kv_embed] -> (key, value), before RoPE, each
    [batch, kv_len, kv_heads, head_dim]. Its layers are made once, so
    merged attention applies them to both the decoder and the encoder."""
    shape = (self.num_kv_heads, self.head_dim)
    axes = ('embed', 'kv_heads', 'head_dim')
    key_projection = self._projection('key', shape, axes)
    value_projection = self._projection('value', shape, axes)
    key_norm = self._qk_norm('key_norm') if self.use_qk_norm else None

    def project(inputs_kv):
      key = key_projection(inputs_kv)
      if key_norm is not None:
        key = key_norm(key)
      return key, value_projection(inputs_kv)
    return project

  @nn.compact
  def __call__(self,
               inputs_q: jax.Array,
               inputs_kv: jax.Array,
               query_positions: jax.Array,
               key_positions: jax.Array,
               query_segment_ids: jax.Array,
               key_segment_ids: jax.Array,
               query_prefix: Optional[jax.Array] = None,
               key_prefix: Optional[jax.Array] = None,
               decode: bool = False,
               cache_length: Optional[int] = None,
               index_ordered: bool = True,
               encoded: Optional[jax.Array] = None,
               encoder_positions: Optional[jax.Array] = None,
               encoder_segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """Attends from `inputs_q` [batch, q_len, embed] to `inputs_kv` [batch, kv_len, kv_embed].

    Args:
      inputs_q: Query-side activations.
      inputs_kv: Key/value-side activations (the same array for
        self-attention, the encoder output for cross-attention).
      query_positions: [batch, q_len] positions.
      key_positions: [batch, kv_len] positions.
      query_segment_ids: [batch, q_len]; 0 is padding.
      key_segment_ids: [batch, kv_len]; 0 is padding.
      query_prefix: Optional [batch, q_len] prefix-LM flags.
      key_prefix: Optional [batch, kv_len] prefix-LM flags.
      decode: Read and update the decoding cache.
      cache_length: Slots of a global layer's self-attention cache (total
        decoding length); created on the first decoding call.
      index_ordered: The tokens' positions follow their indices inside
        contiguous segments (`kernels.masks.MaskSpec`).
      encoded: Merged attention only: the encoder output
        [batch, enc_len, embed].
      encoder_positions: Merged attention only: [batch, enc_len].
      encoder_segment_ids: Merged attention only: [batch, enc_len]; 0 is
        padding.

    Returns:
      [batch, q_len, embed].
    """
    query = self._projection('query', (self.num_heads, self.head_dim),
                             ('embed', 'heads', 'head_dim'))(inputs_q)
    if self.use_qk_norm:
      query = self._qk_norm('query_norm')(query)
    if not self.is_cross_attention:
      query = self._rope(query, query_positions)
    query = nn.with_logical_constraint(
        query, ('batch', 'length', 'heads', 'head_dim'))

    own_query_segment_ids = query_segment_ids
    project_kv = self._kv_projector()
    if decode and self.is_cross_attention:
      key, value, key_segment_ids = self._cached_cross_kv(
          project_kv, inputs_kv, key_segment_ids)
      # Cross-attention masks by segment alone: key positions play no part.
      key_positions = jnp.zeros_like(key_segment_ids)
    else:
      key, value = project_kv(inputs_kv)
      if not self.is_cross_attention:
        key = self._rope(key, key_positions)
    if decode and not self.is_cross_attention:
      key, value, key_positions, key_segment_ids, key_prefix = (
          self._update_self_cache(key, value, key_positions, key_segment_ids,
                                  key_prefix, cache_length))
      query_segment_ids = (query_segment_ids > 0).astype(jnp.int32)

    # Self-attention over the call's own tokens laid out in order is
    # index-ordered (kernels may skip tiles by index); a decoding cache or
    # cross-attention is not.
    self_over_own_tokens = not (decode or self.is_cross_attention)
    spec = MaskSpec(causal=self.causal and not self.is_cross_attention,
                    window=None if self.is_cross_attention else self.window,
                    window_ahead=None if self.is_cross_attention else
                    self.window_ahead,
                    index_ordered=self_over_own_tokens and index_ordered)
    mask = MaskInputs(query_positions, key_positions, query_segment_ids,
                      key_segment_ids,
                      None if self.is_cross_attention else query_prefix,
                      None if self.is_cross_attention else key_prefix)
    # Decoding caches keep keys and values heads first ([b, k, s, h]).
    if self.merged:
      encoder_part = self._encoder_part(
          project_kv, encoded, encoder_positions, encoder_segment_ids,
          query_positions, own_query_segment_ids, decode)
      out = merged_attention(query, [(key, value, mask, spec), encoder_part],
                             scale=self.query_scale,
                             logit_softcap=self.attn_logit_softcap,
                             kv_heads_first=decode,
                             impl=self.attention_impl)
    else:
      out = dot_product_attention(query, key, value, mask, spec,
                                  scale=self.query_scale,
                                  logit_softcap=self.attn_logit_softcap,
                                  impl=self.attention_impl,
                                  kv_heads_first=decode)
    out = nn.with_logical_constraint(
        out, ('batch', 'length', 'heads', 'head_dim'))
    # The output projection has no bias in any supported family.
    return Projection((inputs_q.shape[-1],), ('heads', 'head_dim', 'embed'),
                      contract=2, dtype=self.dtype,
                      param_dtype=self.param_dtype, name='out')(out)

  def _encoder_part(self, project_kv, encoded, encoder_positions,
                    encoder_segment_ids, query_positions, query_segment_ids,
                    decode):
    """Merged attention's encoder keys: (key, value, mask, spec)."""
    if decode:
      key, value, encoder_segment_ids = self._cached_cross_kv(
          project_kv, encoded, encoder_segment_ids, prefix='encoder_')
      # The encoder keys are unmasked but for padding: positions play no
      # part.
      encoder_positions = jnp.zeros_like(encoder_segment_ids)
    elif encoded is None:
      raise ValueError('merged attention needs the encoder output')
    else:
      key, value = project_kv(encoded)
    mask = MaskInputs(query_positions, encoder_positions, query_segment_ids,
                      encoder_segment_ids)
    return key, value, mask, MaskSpec(causal=False)

  def _cached_cross_kv(self, project_kv, inputs_kv, key_segment_ids,
                       prefix: str = 'cached_'):
    """Encoder keys/values [b, k, s, h], projected once per encoder
    output."""
    if self.has_variable('cache', prefix + 'key'):
      key, value = None, None
    elif inputs_kv is None:
      raise ValueError(f'{self.name}: the first decoding call needs the '
                       'encoder output (it fills the encoder key cache)')
    else:
      key, value = (_heads_first(x) for x in project_kv(inputs_kv))
    cached_key = self.variable('cache', prefix + 'key', lambda: key)
    cached_value = self.variable('cache', prefix + 'value', lambda: value)
    cached_segments = self.variable('cache', prefix + 'segment_ids',
                                    lambda: key_segment_ids)
    return cached_key.value, cached_value.value, cached_segments.value

  def _update_self_cache(self, key, value, key_positions, key_segment_ids,
                         key_prefix, cache_length):
    """Returns cache + new keys for attention (heads first: [b, k, s, h]),
    and writes the new keys."""
    batch, new_len, _, _ = key.shape
    if self.has_variable('cache', 'cached_key'):
      slots = self.get_variable('cache', 'cached_key').shape[2]
    elif cache_length is None:
      raise ValueError(f'{self.name}: the first decoding call needs '
                       'cache_length')
    else:
      slots = cache_length if self.window is None else min(cache_length,
                                                           self.window)
    kv_shape = (batch, self.num_kv_heads, slots, self.head_dim)
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, kv_shape,
                               key.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                 kv_shape, value.dtype)
    cached_pos = self.variable('cache', 'cached_positions', jnp.full,
                               (batch, slots), -1, jnp.int32)
    index = self.variable('cache', 'cache_index', jnp.zeros, (batch,),
                          jnp.int32)
    rows = jnp.arange(batch)[:, None]

    new_pos = jnp.where(key_segment_ids > 0, key_positions, -1)
    if new_len == 1:
      # One decoding step: write each row's token into its slot, then attend
      # over the cache in place. The slot's previous token is out of the
      # window (local layers) or the slot is empty (global layers), so
      # nothing the query may see is lost, and no copy of the cache is made.
      write = (index.value % slots)[:, None]
    else:
      # Only the newest `slots` tokens survive a write; writing fewer keeps
      # the scatter free of duplicate slots.
      kept = min(new_len, slots)
      write = (index.value[:, None] + new_len - kept + jnp.arange(kept)) % slots
      all_key = jnp.concatenate([cached_key.value, _heads_first(key)],
                                axis=2)
      all_value = jnp.concatenate([cached_value.value, _heads_first(value)],
                                  axis=2)
      all_pos = jnp.concatenate([cached_pos.value, new_pos], axis=1)
      all_prefix = None
      if key_prefix is not None:
        # Prefix flags only matter among the tokens of one (prefill) call.
        all_prefix = jnp.concatenate(
            [jnp.zeros((batch, slots), bool), key_prefix], axis=1)
    kept = write.shape[1]
    # [rows, :, write] selects [b, kept, k, h]: the new keys as they come.
    cached_key.value = cached_key.value.at[rows, :, write].set(
        key[:, -kept:])
    cached_value.value = cached_value.value.at[rows, :, write].set(
        value[:, -kept:])
    cached_pos.value = cached_pos.value.at[rows, write].set(
        new_pos[:, -kept:])
    index.value = index.value + new_len
    if new_len == 1:
      # A single query's prefix flag shows it nothing causality does not.
      return (cached_key.value, cached_value.value, cached_pos.value,
              (cached_pos.value >= 0).astype(jnp.int32), None)
    return (all_key, all_value, all_pos, (all_pos >= 0).astype(jnp.int32),
            all_prefix)

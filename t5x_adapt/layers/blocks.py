"""One Gemma block: sandwich-normed self-attention, optional cross-attention, MLP.

A decoder block attends to the encoder output in one of two ways
(`encoder_attention`): 'cross', a cross-attention sublayer of its own
(T5Gemma), or 'merged', its self-attention's queries also seeing the encoder
keys (T5Gemma 2: no extra weights).
"""

from typing import Optional

import flax.linen as nn
import jax

from t5x_adapt.config import StackConfig
from t5x_adapt.layers.attention import Attention
from t5x_adapt.layers.mlp import GatedMLP
from t5x_adapt.layers.norms import RMSNorm

ENCODER_ATTENTION = (None, 'cross', 'merged')


class Block(nn.Module):
  """`h = h + PostNorm(Sublayer(PreNorm(h)))` for each sublayer (Gemma), or
  `h = h + Sublayer(PreNorm(h))` without `config.post_norms` (Llama, Qwen,
  Mistral).

  The decoder of a T5Gemma encoder-decoder adds a cross-attention sublayer
  between self-attention and the MLP; T5Gemma 2's merges it into
  self-attention; the encoder and the decoder-only stack have neither.

  Attributes:
    config: The stack's configuration.
    layer: Index of this block in the stack (decides local / global).
    causal: Causal (decoder) or bidirectional (encoder) self-attention.
    encoder_attention: How the block reads the encoder output: None (it
      does not), 'cross' (a cross-attention sublayer) or 'merged'.
    deterministic: Disable dropout.
    decode: Use and update the decoding caches.
    cache_length: Total decoding length (slots of a global layer's cache).
    index_ordered: Positions follow indices inside contiguous segments
      (`Stack`'s argument).
  """

  config: StackConfig
  layer: int
  causal: bool = True
  encoder_attention: Optional[str] = None
  deterministic: bool = True
  decode: bool = False
  cache_length: Optional[int] = None
  index_ordered: bool = True

  def _norm(self, name):
    return RMSNorm(self.config.rms_norm_eps, 'embed',
                   self.config.weight_dtype, style=self.config.norm_style,
                   name=name)

  def _post_norm(self, name, h):
    return self._norm(name)(h) if self.config.post_norms else h

  def _attention(self, name, rope, window, window_ahead=None, merged=False):
    cfg = self.config
    rope_base, rope_scale, rope_llama3 = rope
    return Attention(
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, query_scale=cfg.query_scale,
        attn_logit_softcap=cfg.attn_logit_softcap,
        use_qk_norm=cfg.use_qk_norm, rope_base=rope_base,
        rope_scale=rope_scale, rope_llama3=rope_llama3,
        qkv_bias=cfg.qkv_bias, norm_style=cfg.norm_style,
        causal=self.causal, window=window,
        window_ahead=window_ahead, merged=merged,
        rms_norm_eps=cfg.rms_norm_eps, attention_impl=cfg.attention_impl,
        dtype=cfg.activation_dtype,
        param_dtype=cfg.weight_dtype, name=name)

  def _residual(self, x, branch):
    branch = nn.Dropout(self.config.dropout_rate)(
        branch, deterministic=self.deterministic)
    return nn.with_logical_constraint(x + branch,
                                      ('batch', 'length', 'embed'))

  @nn.compact
  def __call__(self,
               x: jax.Array,
               positions: jax.Array,
               segment_ids: jax.Array,
               prefix: Optional[jax.Array] = None,
               encoded: Optional[jax.Array] = None,
               encoder_positions: Optional[jax.Array] = None,
               encoder_segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """[batch, length, embed] -> [batch, length, embed]."""
    cfg = self.config
    if self.encoder_attention not in ENCODER_ATTENTION:
      raise ValueError(f'encoder_attention {self.encoder_attention!r}: '
                       f'choose one of {ENCODER_ATTENTION}')
    merged = self.encoder_attention == 'merged'
    h = self._norm('pre_self_attention_norm')(x)
    h = self._attention('self_attention', cfg.layer_rope(self.layer),
                        *cfg.layer_window_bounds(self.layer, self.causal),
                        merged=merged)(
                            h, h, positions, positions, segment_ids,
                            segment_ids, prefix, prefix, decode=self.decode,
                            cache_length=self.cache_length,
                            index_ordered=self.index_ordered,
                            encoded=encoded,
                            encoder_positions=encoder_positions,
                            encoder_segment_ids=encoder_segment_ids)
    h = self._post_norm('post_self_attention_norm', h)
    x = self._residual(x, h)

    if self.encoder_attention == 'cross':
      h = self._norm('pre_cross_attention_norm')(x)
      h = self._attention('cross_attention', (None, 1.0, None), None)(
          h, encoded, positions, encoder_positions, segment_ids,
          encoder_segment_ids, decode=self.decode)
      h = self._post_norm('post_cross_attention_norm', h)
      x = self._residual(x, h)

    h = self._norm('pre_mlp_norm')(x)
    h = GatedMLP(cfg.mlp_dim, cfg.mlp_activation, cfg.activation_dtype,
                 cfg.weight_dtype, name='mlp')(h)
    h = self._post_norm('post_mlp_norm', h)
    return self._residual(x, h)

"""Top-level Flax modules: the decoder-only transformer and the encoder-decoder.

Both are built from `t5x_adapt.layers.Stack`; an encoder is a bidirectional
stack that returns hidden states, a decoder a causal stack with
cross-attention and the tied LM head. Parameter trees:

  decoder-only:     {'decoder': stack}
  encoder-decoder:  {'encoder': stack, 'decoder': stack (+ cross_attention,
                    unless merged into self-attention: T5Gemma 2)}

so adapting a decoder-only checkpoint copies one subtree into two.
"""

from typing import Optional

import flax.linen as nn
import jax

from t5x_adapt.config import EncoderDecoderConfig, StackConfig
from t5x_adapt.layers import Stack
from t5x_adapt.layers.stack import embedder_of


class DecoderOnlyTransformer(nn.Module):
  """Gemma 2 / Gemma 3 decoder-only language model."""

  config: StackConfig

  def setup(self):
    self.decoder = Stack(self.config, causal=True)

  def __call__(self,
               tokens: jax.Array,
               positions: jax.Array,
               segment_ids: jax.Array,
               prefix: Optional[jax.Array] = None,
               deterministic: bool = True,
               decode: bool = False,
               cache_length: Optional[int] = None,
               return_hidden: bool = False,
               first_logit: int = 0,
               index_ordered: bool = True) -> jax.Array:
    """[batch, length] tokens -> float32 logits [batch, length, vocab].

    With `first_logit`, only positions from it on get logits;
    `index_ordered`: see `Stack`.
    """
    return self.decoder(tokens, positions, segment_ids, prefix,
                        deterministic=deterministic, decode=decode,
                        cache_length=cache_length, return_hidden=return_hidden,
                        first_logit=first_logit, index_ordered=index_ordered)


class EncoderDecoderTransformer(nn.Module):
  """T5Gemma (balanced or unbalanced) or T5Gemma 2 encoder-decoder."""

  config: EncoderDecoderConfig

  def setup(self):
    # Tied tables are one array (and one end-of-image vector), owned here:
    # params['token_embedder'], read by both stacks and the LM head.
    embedder = None
    if self.config.tie_embeddings:
      self.token_embedder = embedder_of(self.config.decoder, name=None)
      embedder = self.token_embedder
    self.encoder = Stack(self.config.encoder, causal=False,
                         produce_logits=False, embedder=embedder)
    self.decoder = Stack(self.config.decoder, causal=True,
                         encoder_attention=self.config.encoder_attention,
                         embedder=embedder)

  def encode(self,
             tokens: jax.Array,
             positions: jax.Array,
             segment_ids: jax.Array,
             deterministic: bool = True) -> jax.Array:
    """[batch, enc_length] -> final-normed [batch, enc_length, enc_embed]."""
    return self.encoder(tokens, positions, segment_ids,
                        deterministic=deterministic)

  def decode(self,
             encoded: jax.Array,
             encoder_positions: jax.Array,
             encoder_segment_ids: jax.Array,
             tokens: jax.Array,
             positions: jax.Array,
             segment_ids: jax.Array,
             deterministic: bool = True,
             decode: bool = False,
             cache_length: Optional[int] = None,
             return_hidden: bool = False) -> jax.Array:
    """Decoder pass over `tokens` [batch, length] -> logits [batch, length, vocab]."""
    return self.decoder(tokens, positions, segment_ids, None, encoded,
                        encoder_positions, encoder_segment_ids,
                        deterministic=deterministic, decode=decode,
                        cache_length=cache_length, return_hidden=return_hidden)

  def __call__(self,
               encoder_tokens: jax.Array,
               encoder_positions: jax.Array,
               encoder_segment_ids: jax.Array,
               decoder_tokens: jax.Array,
               decoder_positions: jax.Array,
               decoder_segment_ids: jax.Array,
               deterministic: bool = True,
               return_hidden: bool = False) -> jax.Array:
    """Encodes, then decodes: float32 logits [batch, dec_length, vocab], or
    with `return_hidden` the decoder's final-normed hidden states
    [batch, dec_length, embed] (for `t5x_adapt.kernels.lm_head_loss`)."""
    encoded = self.encode(encoder_tokens, encoder_positions,
                          encoder_segment_ids, deterministic)
    return self.decode(encoded, encoder_positions, encoder_segment_ids,
                       decoder_tokens, decoder_positions, decoder_segment_ids,
                       deterministic, return_hidden=return_hidden)

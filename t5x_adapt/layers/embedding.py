"""Token embedding (scaled by sqrt(d_model) in Gemma), tied to the LM head."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_adapt.kernels.lm_head_loss import lm_head_logits


class Embed(nn.Module):
  """Embedding table used both to embed tokens and as the tied output layer.

  With `eoi_token_id` (T5Gemma 2), that token embeds as a vector of its own,
  `eoi_embedding` (zeros at first, not scaled), and the table's row is used
  by the LM head only.

  Attributes:
    vocab_size: Rows of the table.
    features: Model width.
    eoi_token_id: The token with its own embedding vector, or None.
    scale: Multiply embeddings by sqrt(features) (Gemma; not Llama / Qwen).
    dtype: Activation dtype.
    param_dtype: Parameter dtype.
  """

  vocab_size: int
  features: int
  eoi_token_id: Optional[int] = None
  scale: bool = True
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    if self.eoi_token_id is not None:
      self.eoi_embedding = self.param(
          'eoi_embedding',
          nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                       ('embed',)),
          (self.features,), self.param_dtype)
    self.embedding = self.param(
        'embedding',
        nn.with_logical_partitioning(
            nn.initializers.normal(stddev=self.features**-0.5),
            ('vocab', 'embed')),
        (self.vocab_size, self.features), self.param_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Embeds `tokens` [batch, length] -> [batch, length, embed]."""
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
    if self.scale:
      # Gemma rounds the normaliser to the activation dtype first.
      x = x * jnp.asarray(self.features**0.5, dtype=self.dtype)
    if self.eoi_token_id is None:
      return x
    return jnp.where((tokens == self.eoi_token_id)[..., None],
                     self.eoi_embedding.astype(self.dtype), x)

  def attend(self, x: jax.Array,
             softcap: Optional[float] = None) -> jax.Array:
    """Tied LM head: [batch, length, embed] -> float32 [batch, length, vocab]
    (`lm_head_logits`, the one definition of the head)."""
    return lm_head_logits(x, self.embedding, softcap, self.dtype)

"""Token embedding, scaled by sqrt(d_model), tied to the LM head."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_adapt.kernels.lm_head_loss import lm_head_logits


class Embed(nn.Module):
  """Embedding table used both to embed tokens and as the tied output layer.

  Attributes:
    vocab_size: Rows of the table.
    features: Model width.
    dtype: Activation dtype.
    param_dtype: Parameter dtype.
  """

  vocab_size: int
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        'embedding',
        nn.with_logical_partitioning(
            nn.initializers.normal(stddev=self.features**-0.5),
            ('vocab', 'embed')),
        (self.vocab_size, self.features), self.param_dtype)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Embeds `tokens` [batch, length] -> [batch, length, embed]."""
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)
    # Gemma rounds the normaliser to the activation dtype before multiplying.
    return x * jnp.asarray(self.features**0.5, dtype=self.dtype)

  def attend(self, x: jax.Array,
             softcap: Optional[float] = None) -> jax.Array:
    """Tied LM head: [batch, length, embed] -> float32 [batch, length, vocab]
    (`lm_head_logits`, the one definition of the head)."""
    return lm_head_logits(x, self.embedding, softcap, self.dtype)

"""Token embedding, scaled by sqrt(d_model), tied to the LM head."""

import flax.linen as nn
import jax
import jax.numpy as jnp


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

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied LM head: [batch, length, embed] -> [batch, length, vocab]."""
    return jnp.einsum('ble,ve->blv', x, self.embedding.astype(self.dtype))

"""Gated GELU MLP: `down(gelu_tanh(gate(x)) * up(x))`."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_adapt.layers.dense import Projection


class GeGLU(nn.Module):
  """Gemma's feed-forward block.

  Attributes:
    hidden_dim: Width of the gated hidden layer.
    dtype: Activation dtype.
    param_dtype: Parameter dtype.
  """

  hidden_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dense(self, name, features, axes):
    return Projection((features,), axes, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[batch, length, embed] -> [batch, length, embed]."""
    gate = self._dense('gate', self.hidden_dim, ('embed', 'mlp'))(x)
    up = self._dense('up', self.hidden_dim, ('embed', 'mlp'))(x)
    hidden = jax.nn.gelu(gate, approximate=True) * up
    hidden = nn.with_logical_constraint(hidden, ('batch', 'length', 'mlp'))
    return self._dense('down', x.shape[-1], ('mlp', 'embed'))(hidden)

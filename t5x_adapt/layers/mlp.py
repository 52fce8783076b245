"""Gated MLP: `down(act(gate(x)) * up(x))`, GeGLU (Gemma) or SwiGLU."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_adapt.layers.dense import Projection

ACTIVATIONS = {
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),  # GeGLU
    'silu': jax.nn.silu,  # SwiGLU (Llama, Qwen, Mistral)
}


class GatedMLP(nn.Module):
  """The feed-forward block of every supported family.

  Attributes:
    hidden_dim: Width of the gated hidden layer.
    activation: 'gelu_tanh' (GeGLU) or 'silu' (SwiGLU).
    dtype: Activation dtype.
    param_dtype: Parameter dtype.
  """

  hidden_dim: int
  activation: str = 'gelu_tanh'
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
    hidden = ACTIVATIONS[self.activation](gate) * up
    hidden = nn.with_logical_constraint(hidden, ('batch', 'length', 'mlp'))
    return self._dense('down', x.shape[-1], ('mlp', 'embed'))(hidden)

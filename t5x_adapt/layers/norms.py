"""RMSNorm, with Gemma's `(1 + scale)` parameterisation or a plain weight."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """`x * rsqrt(mean(x^2) + eps) * w`, computed in float32.

  Gemma (`style='gemma'`): `w = 1 + scale`, the scale initialised to zero;
  Llama / Qwen / Mistral (`style='plain'`): `w = scale`, initialised to one.
  Either way a fresh norm is the identity scaling.

  Attributes:
    eps: Added to the mean square.
    axis_name: Logical axis name of the normalised (last) dimension.
    param_dtype: Dtype of the scale parameter.
    style: 'gemma' or 'plain'.
  """

  eps: float = 1e-6
  axis_name: str = 'embed'
  param_dtype: jnp.dtype = jnp.float32
  style: str = 'gemma'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    plain = self.style == 'plain'
    init = nn.initializers.ones_init() if plain else (
        nn.initializers.zeros_init())
    scale = self.param(
        'scale', nn.with_logical_partitioning(init, (self.axis_name,)),
        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(
        jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    weight = scale.astype(jnp.float32)
    return (normed * (weight if plain else 1.0 + weight)).astype(x.dtype)

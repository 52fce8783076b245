"""RMSNorm with Gemma's `(1 + scale)` parameterisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """`x * rsqrt(mean(x^2) + eps) * (1 + scale)`, computed in float32.

  The scale is initialised to zero, so a fresh norm is the identity scaling.

  Attributes:
    eps: Added to the mean square.
    axis_name: Logical axis name of the normalised (last) dimension.
    param_dtype: Dtype of the scale parameter.
  """

  eps: float = 1e-6
  axis_name: str = 'embed'
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param(
        'scale',
        nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                     (self.axis_name,)),
        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(
        jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (normed * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)

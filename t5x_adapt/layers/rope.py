"""Rotary position embedding, rotate-half convention (as Gemma)."""

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, base: float,
               scale: float = 1.0) -> jax.Array:
  """Rotates `x` [batch, length, heads, head_dim] by `positions` [batch, length].

  The first and second halves of the head dimension form the rotated pairs.
  Frequencies are computed in float32 and cast to the activation dtype;
  `scale` > 1 is linear RoPE scaling (frequencies divided by it).
  """
  head_dim = x.shape[-1]
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (base**exponents) / scale  # [head_dim / 2]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)  # [batch, length, head_dim]
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return x * cos + rotated * sin

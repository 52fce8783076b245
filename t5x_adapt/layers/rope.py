"""Rotary position embedding, rotate-half convention (Gemma, Llama, Qwen)."""

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def inverse_frequencies(head_dim: int, base: float, scale: float = 1.0,
                        llama3: Optional[tuple[float, float, int]] = None
                        ) -> np.ndarray:
  """float32 [head_dim / 2] rotation frequencies.

  `scale` divides them all (linear scaling), unless `llama3` =
  (low_freq_factor, high_freq_factor, original_max_positions) gives Llama 3's
  scaling: wavelengths beyond `original / low` are divided by `scale`, those
  below `original / high` kept, and those between interpolated smoothly
  (computed as transformers does, in float32).
  """
  exponents = np.arange(0, head_dim, 2).astype(np.float32) / np.float32(
      head_dim)
  inv_freq = (np.float32(1.0) / np.float32(base)**exponents).astype(np.float32)
  if llama3 is None:
    return (inv_freq / np.float32(scale)).astype(np.float32)
  low, high, original = llama3
  wavelength = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelength > original / low, inv_freq / np.float32(scale),
                    inv_freq).astype(np.float32)
  smooth = ((original / wavelength - low) / (high - low)).astype(np.float32)
  smoothed = (1 - smooth) * scaled / np.float32(scale) + smooth * scaled
  medium = ~(wavelength < original / high) & ~(wavelength > original / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, base: float,
               scale: float = 1.0,
               llama3: Optional[tuple[float, float, int]] = None
               ) -> jax.Array:
  """Rotates `x` [batch, length, heads, head_dim] by `positions` [batch, length].

  The first and second halves of the head dimension form the rotated pairs.
  Frequencies (`inverse_frequencies`) and angles are float32, cos and sin
  cast to the activation dtype.
  """
  inv_freq = jnp.asarray(inverse_frequencies(x.shape[-1], base, scale,
                                             llama3))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)  # [batch, length, head_dim]
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return x * cos + rotated * sin

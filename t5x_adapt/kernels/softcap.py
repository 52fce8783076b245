"""Gemma 2's logit softcap, shared by the attention kernels (on the scaled
scores) and the LM head (on the final logits)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def softcap(x: jax.Array, cap: Optional[float]) -> jax.Array:
  """`cap * tanh(x / cap)`, or `x` when `cap` is None."""
  if cap is None:
    return x
  return jnp.tanh(x / cap) * cap

"""Decoding loops over a cached single-step function.

A step function maps `(tokens [b, 1], positions [b, 1], cache)` to
`(logits [b, vocab], cache)`; the loop is a `lax.fori_loop`, so one
compilation serves every step.
"""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

StepFn = Callable[[jax.Array, jax.Array, dict], tuple[jax.Array, dict]]


def right_align(tokens: jax.Array, valid: jax.Array,
                extra: Optional[jax.Array] = None):
  """Moves each row's valid tokens to the right end (left padding).

  Args:
    tokens: [b, t] tokens.
    valid: [b, t] bool, the tokens to keep (in order).
    extra: Optional [b, t] per-token features moved alongside.

  Returns:
    (tokens, valid as int32, extra), each [b, t], padding on the left.
  """
  # Stable sort: invalid tokens first, valid ones keep their order.
  order = jnp.argsort(valid.astype(jnp.int32), axis=-1, stable=True)
  gather = lambda x: jnp.take_along_axis(x, order, axis=-1)
  aligned_valid = gather(valid)
  aligned = jnp.where(aligned_valid, gather(tokens), 0)
  moved = None if extra is None else jnp.where(aligned_valid, gather(extra), 0)
  return aligned, aligned_valid.astype(jnp.int32), moved


def greedy_loop(step: StepFn, first_logits: jax.Array, cache: dict,
                next_positions: jax.Array, num_tokens: int,
                eos_id: int) -> jax.Array:
  """Greedy decoding of `num_tokens` tokens after a prefill.

  Args:
    step: The cached single-step function.
    first_logits: [b, vocab] logits of the prefill's last position.
    cache: The cache after the prefill.
    next_positions: [b] position of the first generated token.
    num_tokens: Tokens to generate.
    eos_id: End-of-sequence id; a row emits 0 (padding) after it.

  Returns:
    [b, num_tokens] generated tokens.
  """
  batch = first_logits.shape[0]
  token = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)
  done = token == eos_id
  out = jnp.zeros((batch, num_tokens), jnp.int32).at[:, 0].set(token)

  def body(i, carry):
    out, token, done, cache = carry
    positions = (next_positions + i - 1)[:, None]
    logits, cache = step(token[:, None], positions, cache)
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    token = jnp.where(done, 0, token)
    return out.at[:, i].set(token), token, done | (token == eos_id), cache

  out, _, _, _ = jax.lax.fori_loop(1, num_tokens, body,
                                   (out, token, done, cache))
  return out

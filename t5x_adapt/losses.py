"""Token-level losses."""

from typing import Optional

import jax
import jax.numpy as jnp


def cross_entropy(logits: jax.Array,
                  targets: jax.Array,
                  weights: Optional[jax.Array] = None,
                  z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """Weighted mean cross-entropy of `logits` [b, t, v] against `targets` [b, t].

  Args:
    logits: float32 logits.
    targets: Integer targets.
    weights: [b, t] loss weights; defaults to `targets > 0`.
    z_loss: Coefficient of the `log(Z)^2` auxiliary loss (PaLM).

  Returns:
    (loss, metrics): the loss averaged over weighted tokens, and a dict with
    `loss`, `z_loss`, `accuracy`, `num_tokens`.
  """
  if weights is None:
    weights = (targets > 0)
  weights = weights.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  nll = log_z - target_logit
  num_tokens = jnp.maximum(jnp.sum(weights), 1.0)
  xent = jnp.sum(nll * weights) / num_tokens
  aux = z_loss * jnp.sum(jnp.square(log_z) * weights) / num_tokens
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {
      'loss': xent + aux,
      'cross_entropy': xent,
      'z_loss': aux,
      'accuracy': jnp.sum(correct * weights) / num_tokens,
      'num_tokens': jnp.sum(weights),
  }
  return xent + aux, metrics


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) in float32: [..., v], [...] -> [...] (e.g. [b, t, v],
  [b, t] -> [b, t] for scoring; [b, v], [b] -> [b] for a decoding step)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]

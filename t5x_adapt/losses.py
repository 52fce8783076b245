"""Token-level losses.

The per-token math lives here once: `token_losses` (nll, log Z, whether the
argmax is right) and `soft_cross_entropy` (distillation) map logits
[..., v] to [...] values; `weighted_sums` reduces them over weighted tokens,
and `cross_entropy_metrics` / `distillation_metrics` turn the sums into the
loss and its metrics. `cross_entropy` runs these on whole logits;
`t5x_adapt.kernels.lm_head_loss` runs the same functions chunk by chunk of
the sequence and adds up the sums, so both paths mean the same loss.
"""

from typing import Mapping, Optional

import jax
import jax.numpy as jnp


def default_weights(targets: jax.Array,
                    weights: Optional[jax.Array]) -> jax.Array:
  """float32 loss weights [b, t]: `weights`, or `targets > 0`."""
  if weights is None:
    weights = targets > 0
  return weights.astype(jnp.float32)


def token_losses(logits: jax.Array, targets: jax.Array) -> dict:
  """Per-token hard-label terms: [..., v] logits, [...] targets.

  Returns:
    {'nll': -log p(target), 'log_z_sq': log(Z)^2, 'correct': 1.0 where the
    argmax is the target}, each float32 [...].
  """
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None],
                                     axis=-1)[..., 0]
  correct = jnp.argmax(logits, axis=-1) == targets
  return {'nll': log_z - target_logit, 'log_z_sq': jnp.square(log_z),
          'correct': correct.astype(jnp.float32)}


def soft_cross_entropy(student_logits: jax.Array,
                       teacher_logits: jax.Array,
                       temperature: float = 1.0,
                       top_k: Optional[int] = None) -> jax.Array:
  """`-T^2 sum_x P_T(x) log P_S(x)` per token: [..., v] x 2 -> [...].

  Args:
    student_logits: [..., v] float32.
    teacher_logits: [..., v] float32 (no gradient flows into them).
    temperature: Softens both distributions; the loss is scaled by
      temperature**2 so its gradients keep their size.
    top_k: Keep the teacher's k most likely tokens (renormalised).
  """
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  if top_k is not None:
    kth = jax.lax.top_k(teacher_logits, top_k)[0][..., -1:]
    teacher_logits = jnp.where(teacher_logits >= kth, teacher_logits, -jnp.inf)
  teacher_probs = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  student_log_probs = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  # 0 * log p is 0 where the teacher gives a token no mass (one-hot, top-k).
  return -jnp.sum(
      jnp.where(teacher_probs > 0, teacher_probs * student_log_probs, 0.0),
      axis=-1) * temperature**2


def weighted_sums(per_token: Mapping[str, jax.Array],
                  weights: jax.Array) -> dict:
  """{name: sum(value * weights)} and 'weight': sum(weights); all scalars."""
  sums = {name: jnp.sum(value * weights) for name, value in per_token.items()}
  sums['weight'] = jnp.sum(weights)
  return sums


def cross_entropy_metrics(sums: Mapping[str, jax.Array],
                          z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """(loss, metrics) of summed `token_losses` (`weighted_sums`)."""
  num_tokens = jnp.maximum(sums['weight'], 1.0)
  xent = sums['nll'] / num_tokens
  aux = z_loss * sums['log_z_sq'] / num_tokens
  metrics = {
      'loss': xent + aux,
      'cross_entropy': xent,
      'z_loss': aux,
      'accuracy': sums['correct'] / num_tokens,
      'num_tokens': sums['weight'],
  }
  return xent + aux, metrics


def distillation_metrics(sums: Mapping[str, jax.Array],
                         label_weight: float = 0.0,
                         z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """(loss, metrics) of summed `token_losses` plus a summed `soft` term.

  The soft term has weight `1 - label_weight`, the hard-label cross-entropy
  `label_weight`; the metrics are `cross_entropy_metrics`' with `loss` and
  `distillation` (the soft term).
  """
  _, metrics = cross_entropy_metrics(sums, z_loss)
  soft = sums['soft'] / jnp.maximum(sums['weight'], 1.0)
  loss = ((1.0 - label_weight) * soft +
          label_weight * metrics['cross_entropy'] + metrics['z_loss'])
  return loss, dict(metrics, loss=loss, distillation=soft)


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
    `loss`, `cross_entropy`, `z_loss`, `accuracy`, `num_tokens`.
  """
  sums = weighted_sums(token_losses(logits, targets),
                       default_weights(targets, weights))
  return cross_entropy_metrics(sums, z_loss)


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(target) in float32: [..., v], [...] -> [...] (e.g. [b, t, v],
  [b, t] -> [b, t] for scoring; [b, v], [b] -> [b] for a decoding step)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]

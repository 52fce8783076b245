"""Learning-rate schedules and optax optimizers, configurable from gin.

Parameter selection (weight-decay exclusion, freezing, the adaptation
warm-up) is by regular expression over '/'-joined parameter paths such as
`decoder/layers/block_0/cross_attention/query/kernel`.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import gin
import jax
import jax.numpy as jnp
import optax

from t5x_adapt.param_paths import param_paths


def match_tree(params, patterns: Sequence[str]) -> Any:
  """Tree of bools: whether each parameter's path matches any pattern."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map(
      lambda path: any(c.search(path) for c in compiled), param_paths(params))


class _HoldState(NamedTuple):
  count: jax.Array


def hold_until(steps: int, held: Sequence[str]) -> optax.GradientTransformation:
  """Zeroes the updates of parameters matching `held` for the first `steps` steps.

  Placed before gradient clipping it keeps the held parameters' gradients out
  of the global norm; placed last it zeroes their updates, weight decay
  included, so they stay bitwise unchanged. Adam's moments of held
  parameters see only zero gradients, so they start from zero afterwards
  (the shared bias correction then acts as a short implicit warm-up).
  """
  def init(params):
    del params
    return _HoldState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params
    holding = state.count < steps
    mask = match_tree(updates, held)
    updates = jax.tree_util.tree_map(
        lambda u, m: jnp.where(holding, jnp.zeros_like(u), u) if m else u,
        updates, mask)
    return updates, _HoldState(count=jnp.minimum(state.count + 1, steps))

  return optax.GradientTransformation(init, update)


def _complement(patterns: Sequence[str]) -> str:
  """One regex matching every path that matches none of `patterns`."""
  return '^(?!.*(?:' + '|'.join(f'(?:{p})' for p in patterns) + '))'


@gin.configurable
def schedule(kind: str = 'cosine',
             peak: float = 1e-3,
             warmup_steps: int = 100,
             total_steps: int = 10_000,
             end_fraction: float = 0.1) -> optax.Schedule:
  """Linear warm-up, then cosine decay, inverse square root, or constant."""
  if kind == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, max(warmup_steps, 1), max(total_steps, warmup_steps + 1),
        end_value=peak * end_fraction)
  warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
  if kind == 'constant':
    return optax.join_schedules([warmup, optax.constant_schedule(peak)],
                                [warmup_steps])
  if kind == 'rsqrt':
    def rsqrt(step):
      return peak * jnp.sqrt(max(warmup_steps, 1) /
                             jnp.maximum(step, max(warmup_steps, 1)))
    return optax.join_schedules([warmup, rsqrt], [warmup_steps])
  raise ValueError(f'unknown schedule {kind!r} (cosine, rsqrt, constant)')


@gin.configurable
def optimizer(name: str = 'adamw',
              learning_rate: optax.ScalarOrSchedule = None,
              b1: float = 0.9,
              b2: float = 0.95,
              eps: float = 1e-8,
              weight_decay: float = 0.0,
              no_decay: Sequence[str] = (r'norm/scale$',),
              clip_norm: float | None = 1.0,
              frozen: Sequence[str] = (),
              warmup_trainable: Sequence[str] = (r'cross_attention',),
              warmup_trainable_steps: int = 0
              ) -> optax.GradientTransformation:
  """AdamW or Adafactor with clipping, decay masks and frozen parameters.

  Args:
    name: 'adamw' or 'adafactor'.
    learning_rate: Number or schedule; defaults to `schedule()`.
    b1: Adam first-moment decay.
    b2: Adam second-moment decay.
    eps: Adam epsilon.
    weight_decay: Decoupled weight decay.
    no_decay: Parameter-path regexes exempt from weight decay.
    clip_norm: Global gradient-norm clip (None: no clipping).
    frozen: Parameter-path regexes whose updates are always zero.
    warmup_trainable: Parameter-path regexes that alone train during the
      first `warmup_trainable_steps` steps (the unbalanced adaptation
      warm-up: cross-attention and its norms); every other parameter is held
      bitwise unchanged until then, and out of the clipping norm.
    warmup_trainable_steps: Length of that warm-up (0: none).

  Returns:
    The optax transformation.
  """
  learning_rate = schedule() if learning_rate is None else learning_rate

  def decay_mask(params):
    return jax.tree_util.tree_map(lambda m: not m,
                                  match_tree(params, no_decay))

  if name == 'adamw':
    base = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps,
                       weight_decay=weight_decay, mask=decay_mask)
  elif name == 'adafactor':
    base = optax.adafactor(learning_rate, weight_decay_rate=weight_decay or
                           None, weight_decay_mask=decay_mask)
  else:
    raise ValueError(f'unknown optimizer {name!r} (adamw, adafactor)')
  steps = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
  if warmup_trainable_steps:
    held = [_complement(warmup_trainable)]
    hold = lambda: hold_until(warmup_trainable_steps, held)
    tx = optax.chain(hold(), *steps, base, hold())
  else:
    tx = optax.chain(*steps, base)
  if frozen:
    labels = lambda params: jax.tree_util.tree_map(
        lambda m: 'frozen' if m else 'trained', match_tree(params, frozen))
    tx = optax.multi_transform(
        {'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx

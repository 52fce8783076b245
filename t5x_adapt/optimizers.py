"""Learning-rate schedules and optax optimizers, configurable from gin.

Parameter selection (weight-decay exclusion, freezing) is by regular
expression over '/'-joined parameter paths such as
`decoder/layers/block_0/cross_attention/query/kernel`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import optax


def param_paths(params) -> Any:
  """Tree of '/'-joined path strings, shaped like `params`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: '/'.join(str(getattr(k, 'key', k)) for k in path),
      params)


def match_tree(params, patterns: Sequence[str]) -> Any:
  """Tree of bools: whether each parameter's path matches any pattern."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree_util.tree_map(
      lambda path: any(c.search(path) for c in compiled), param_paths(params))


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
              frozen: Sequence[str] = ()) -> optax.GradientTransformation:
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
    frozen: Parameter-path regexes whose updates are zero (e.g. everything
      but cross-attention during the adaptation warm-up).

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
  tx = optax.chain(*steps, base)
  if frozen:
    labels = lambda params: jax.tree_util.tree_map(
        lambda m: 'frozen' if m else 'trained', match_tree(params, frozen))
    tx = optax.multi_transform(
        {'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx

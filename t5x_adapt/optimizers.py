"""Learning-rate schedules and optax optimizers, configurable from gin.

Parameter selection (weight-decay exclusion, freezing, the adaptation
warm-up) is by regular expression over '/'-joined parameter paths such as
`decoder/layers/block_0/cross_attention/query/kernel`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple, Sequence

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


# The one embedding table of a model with tied tables (`EncoderDecoderConfig.
# tie_embeddings`): a top-level subtree that every stack reads.
TIED_TABLE = 'token_embedder'


def check_tied_table_frozen_whole(params, frozen: Sequence[str]) -> None:
  """Refuses freezing a tied table for one stack only.

  A tied table is one array that the encoder, the decoder and the LM head
  all read (`params['token_embedder']`). A pattern written for a stack's
  own table (`'^encoder/'` covers `encoder/token_embedder/embedding` in an
  untied model) cannot freeze it for that stack alone, and silently
  training it would break what the pattern says.

  Raises:
    ValueError: a pattern covers a stack's table by its per-stack path but
      not the tied table itself; the message says how to write either.
  """
  # optax also asks for labels of placeholders (`tree_map_params`).
  if not isinstance(params, Mapping) or TIED_TABLE not in params:
    return
  compiled = [(p, re.compile(p)) for p in frozen]
  for path in param_paths_of(params[TIED_TABLE]):
    whole = f'{TIED_TABLE}/{path}'
    if any(c.search(whole) for _, c in compiled):
      continue
    for stack in sorted(set(params) - {TIED_TABLE}):
      per_stack = f'{stack}/{whole}'
      for pattern, c in compiled:
        if c.search(per_stack):
          raise ValueError(
              f'frozen pattern {pattern!r} covers {per_stack}, but the '
              f'model ties its tables: {whole} is one array that every '
              f'stack and the LM head read, so it cannot be frozen for '
              f'{stack} alone. Freeze it for all ({f"^{TIED_TABLE}/"!r}) '
              f'or leave it out of the pattern (e.g. '
              f'{f"^{stack}/(?!{TIED_TABLE}/)"!r}).')


def param_paths_of(tree) -> list[str]:
  """The '/'-joined paths of a subtree's leaves."""
  return jax.tree_util.tree_leaves(param_paths(tree))


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
    frozen: Parameter-path regexes whose updates are always zero. A tied
      embedding table freezes whole or not at all
      (`check_tied_table_frozen_whole`).
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
    def labels(params):
      check_tied_table_frozen_whole(params, frozen)
      return jax.tree_util.tree_map(lambda m: 'frozen' if m else 'trained',
                                    match_tree(params, frozen))
    tx = optax.multi_transform(
        {'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx

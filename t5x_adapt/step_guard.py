"""The step guard: a train step from bad numbers is not applied.

Inside the jitted step (`Trainer._step`) the guard looks at what the step
computed: the loss, the global gradient norm, the norm of the parameters
the update would give and, optionally, the loss against its running mean.
A step with any of them wrong is not applied: parameters and optimizer state
stay as they were (so a checkpoint never holds non-finite parameters, and
the optimizer's own step count, hence its schedule, does not advance), while
`TrainState.step` advances as the batch was consumed. The guard's counters
live in the TrainState (`GuardState`), so they are checkpointed and a
resumed run counts on.

On the host, `train.Loop` reports every skipped step (progress bar, a line
in metrics.jsonl, the `skipped_steps` scalar) and stops after
`max_consecutive_skips` in a row with `TrainingDiverged`, which names the
step and the last good checkpoint.

Reasons a step is skipped (bits of the `skip_reasons` metric):
  loss        the loss is NaN or infinite
  grad_norm   the gradient norm is NaN or infinite (a NaN anywhere in the
              gradients makes the norm NaN)
  params      with finite gradients, the updated parameters' norm would
              not be finite (an update that overflows)
  loss_spike  with `spike_factor` k: the loss exceeds k times the running
              mean of the applied steps' losses (after `spike_warmup_steps`
              applied steps)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax
import gin
import jax
import jax.numpy as jnp

SKIP_REASONS = ('loss', 'grad_norm', 'params', 'loss_spike')  # Bit i.
_SAYS = {'loss': 'loss not finite', 'grad_norm': 'gradient norm not finite',
         'params': 'updated parameters not finite',
         'loss_spike': 'loss spike'}


class TrainingDiverged(RuntimeError):
  """Too many consecutive train steps were not applied."""


@flax.struct.dataclass
class GuardState:
  """The guard's counters, part of the TrainState (all scalars)."""

  consecutive: jax.Array  # int32: skipped steps in a row, up to this one
  skipped: jax.Array      # int32: skipped steps in all
  applied: jax.Array      # int32: applied steps (the running mean's count)
  loss_mean: jax.Array    # float32: running mean of applied steps' losses


def _select(apply: jax.Array, new: Any, old: Any) -> Any:
  """`new` where `apply`, else `old`, leaf by leaf (bitwise either way)."""
  return jax.tree_util.tree_map(lambda n, o: jnp.where(apply, n, o), new, old)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StepGuard:
  """Which steps are not applied, and when training gives up.

  Args:
    max_consecutive_skips: Training stops (`TrainingDiverged`) after this
      many skipped steps in a row.
    spike_factor: Skip a step whose loss exceeds this many times the running
      mean of the applied losses (None: no spike check).
    spike_decay: Decay of that running mean (an exponential moving average
      started at the first applied loss).
    spike_warmup_steps: Applied steps before the spike check starts (early
      losses fall fast and their mean is noisy).
  """

  max_consecutive_skips: int = 5
  spike_factor: Optional[float] = None
  spike_decay: float = 0.99
  spike_warmup_steps: int = 20

  def __post_init__(self):
    if self.max_consecutive_skips < 1:
      raise ValueError('StepGuard.max_consecutive_skips must be >= 1, got '
                       f'{self.max_consecutive_skips}')
    if self.spike_factor is not None and self.spike_factor <= 1:
      raise ValueError('StepGuard.spike_factor must be > 1 (or None), got '
                       f'{self.spike_factor}')

  def init(self) -> GuardState:
    zero = jnp.zeros((), jnp.int32)
    return GuardState(consecutive=zero, skipped=zero, applied=zero,
                      loss_mean=jnp.zeros((), jnp.float32))

  def _reasons(self, guard: GuardState, loss, grad_norm, param_norm):
    """int32 bit mask of SKIP_REASONS that hold."""
    grads_finite = jnp.isfinite(grad_norm)
    # Non-finite gradients make non-finite parameters: name only the cause.
    bad = [~jnp.isfinite(loss), ~grads_finite,
           grads_finite & ~jnp.isfinite(param_norm)]
    if self.spike_factor is not None:
      bad.append((guard.applied >= self.spike_warmup_steps)
                 & (loss > self.spike_factor * guard.loss_mean))
    else:
      bad.append(jnp.zeros((), bool))
    return sum(b.astype(jnp.int32) << i for i, b in enumerate(bad))

  def _counted(self, guard: GuardState, apply, loss) -> GuardState:
    mean = jnp.where(guard.applied == 0, loss,
                     self.spike_decay * guard.loss_mean
                     + (1 - self.spike_decay) * loss)
    skipped = 1 - apply.astype(jnp.int32)
    return GuardState(
        consecutive=jnp.where(apply, 0, guard.consecutive + 1),
        skipped=guard.skipped + skipped,
        applied=guard.applied + apply.astype(jnp.int32),
        loss_mean=jnp.where(apply, mean.astype(jnp.float32), guard.loss_mean))

  def __call__(self, guard: GuardState, loss, grad_norm, new_param_norm,
               new, old):
    """Decides a step (traced inside the train step).

    Args:
      guard: The counters before this step.
      loss: The step's loss (float scalar).
      grad_norm: Global norm of its gradients.
      new_param_norm: Global norm of the parameters the update gives.
      new: (params, opt_state) the update gives.
      old: (params, opt_state) before the step.

    Returns:
      ((params, opt_state) to keep, the new GuardState, metrics: `skipped`
      (0 or 1), `skip_reasons` (bit mask of SKIP_REASONS), `skipped_steps`,
      `consecutive_skips`).
    """
    reasons = self._reasons(guard, loss, grad_norm, new_param_norm)
    apply = reasons == 0
    guard = self._counted(guard, apply, loss)
    metrics = {'skipped': 1 - apply.astype(jnp.int32),
               'skip_reasons': reasons, 'skipped_steps': guard.skipped,
               'consecutive_skips': guard.consecutive}
    return _select(apply, new, old), guard, metrics

  # ---------------------------------------------------------------- host --

  def stopped(self, consecutive: int) -> bool:
    return consecutive >= self.max_consecutive_skips


def reason_names(reasons: int) -> list[str]:
  """The SKIP_REASONS set in a `skip_reasons` bit mask."""
  return [name for i, name in enumerate(SKIP_REASONS) if reasons >> i & 1]


def describe(reasons: Sequence[str]) -> str:
  """'loss not finite, gradient norm not finite' for ['loss', 'grad_norm']."""
  return ', '.join(_SAYS[name] for name in reasons)


def diverged_message(step: int, consecutive: int, reasons: Sequence[str],
                     last_checkpoint: Optional[str]) -> str:
  """What `TrainingDiverged` says: the steps, why, where to go back to."""
  first = step - consecutive + 1
  where = (f'the last good checkpoint is {last_checkpoint}'
           if last_checkpoint else 'no checkpoint was written yet')
  return (f'training stopped at step {step}: {consecutive} consecutive steps '
          f'({first} to {step}) were not applied (the last: '
          f'{describe(reasons)}); the parameters are those after step '
          f'{first - 1} and {where}. Lower the learning rate or check the '
          'data, then resume.')

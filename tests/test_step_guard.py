"""The step guard (t5x_adapt.step_guard) inside the real jitted train step.

A non-finite loss is injected at a chosen step by a model wrapper that
scales the real loss by a per-batch factor (NaN or inf poisons the loss and
every gradient, as a bad batch or an overflow would). The end-to-end run
(`--gin.LEARNING_RATE=1e9`, stop after N, strict metrics.jsonl) is in
tests/test_reliability.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import train_steps_worker as worker
from t5x_adapt import step_guard

LOSS, GRAD_NORM, PARAMS, SPIKE = (1 << i for i in range(4))


class _ScaledLoss:
  """The model, its loss multiplied by the batch's `loss_scale` (per row)."""

  def __init__(self, model):
    self._model = model

  def __getattr__(self, name):
    return getattr(self._model, name)

  def loss_fn(self, params, batch, rng, **kwargs):
    batch = dict(batch)
    scale = jnp.mean(batch.pop('loss_scale'))
    loss, metrics = self._model.loss_fn(params, batch, rng, **kwargs)
    return loss * scale, metrics


def _trainer(guard=None, tx=None):
  trainer = worker.make_trainer('gemma2_tiny')
  if guard is not None:
    trainer.guard = guard
  if tx is not None:
    trainer.optimizer = tx
  trainer.model = _ScaledLoss(trainer.model)
  return trainer


def _batch(step, scale=1.0):
  batch = worker.make_batch(False, step)
  batch['loss_scale'] = np.full((worker.BATCH_SIZE,), scale, np.float32)
  return batch


def _host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _assert_equal(actual, expected):
  leaves = jax.tree_util.tree_leaves_with_path(expected)
  for (path, want), got in zip(leaves, jax.tree_util.tree_leaves(actual)):
    np.testing.assert_array_equal(got, want, err_msg=str(path))


def _run(trainer, scales):
  """Steps over batches 1.. with these loss scales; (states, metrics)."""
  state = trainer.init_state()
  states, metrics = [_host(state)], []
  for step, scale in enumerate(scales, start=1):
    state, m = trainer.train_step(state, _batch(step, scale))
    states.append(_host(state))
    metrics.append(_host(m))
  return states, metrics


@pytest.fixture(scope='module')
def poisoned_at_3():
  """Steps 1-5; step 3's loss is NaN, step 4's is +inf."""
  return _run(_trainer(), [1.0, 1.0, np.nan, np.inf, 1.0])


def test_a_non_finite_step_leaves_params_and_optimizer_state_unchanged(
    poisoned_at_3):
  states, metrics = poisoned_at_3
  for step in (3, 4):
    before, after = states[step - 1], states[step]
    _assert_equal(after.params, before.params)
    _assert_equal(after.opt_state, before.opt_state)
    assert int(after.step) == step  # The batch was consumed.
  # Steps around them did train.
  for step in (1, 2, 5):
    assert not np.array_equal(states[step].params['decoder']['final_norm'][
        'scale'], states[step - 1].params['decoder']['final_norm']['scale'])
  assert np.isnan(metrics[2]['loss']) and np.isinf(metrics[3]['loss'])
  assert np.isfinite(metrics[2]['param_norm'])  # Of the kept parameters.


def test_the_counters_name_each_skipped_step_and_reason(poisoned_at_3):
  states, metrics = poisoned_at_3
  skipped = [int(m['skipped']) for m in metrics]
  consecutive = [int(m['consecutive_skips']) for m in metrics]
  total = [int(m['skipped_steps']) for m in metrics]
  print(f'\nskipped {skipped}, consecutive {consecutive}, total {total}, '
        f'reasons {[int(m["skip_reasons"]) for m in metrics]}')
  assert skipped == [0, 0, 1, 1, 0]
  assert consecutive == [0, 0, 1, 2, 0]
  assert total == [0, 0, 1, 2, 2]
  # NaN loss: NaN gradients; the parameters are not blamed for them.
  assert int(metrics[2]['skip_reasons']) == LOSS | GRAD_NORM
  assert step_guard.reason_names(int(metrics[3]['skip_reasons'])) == [
      'loss', 'grad_norm']
  guard = states[-1].guard
  assert (int(guard.skipped), int(guard.consecutive), int(guard.applied)) == (
      2, 0, 3)


def test_a_skipped_step_leaves_no_trace(poisoned_at_3):
  """Skipping batches 3 and 4 trains on as if they had never come: batch
  5 applied to the state after step 2 gives the same parameters (the
  models here have no dropout; the schedule counts applied updates)."""
  states, _ = poisoned_at_3
  trainer = _trainer()
  state = trainer.init_state()
  for step in (1, 2, 5):
    state, _ = trainer.train_step(state, _batch(step))
  _assert_equal(_host(state.params), states[5].params)
  _assert_equal(_host(state.opt_state), states[5].opt_state)


def test_an_update_that_overflows_is_not_applied():
  """Finite loss and gradients, but SGD at a learning rate of 1e25 pushes
  the parameters' norm past float32: only the `params` reason."""
  states, metrics = _run(_trainer(tx=optax.sgd(1e25)), [1.0, 1.0])
  assert np.isfinite(metrics[1]['loss']) and np.isfinite(
      metrics[1]['grad_norm'])
  assert int(metrics[1]['skip_reasons']) == PARAMS
  _assert_equal(states[2].params, states[1].params)


@pytest.mark.slow
def test_a_loss_spike_is_skipped_when_asked():
  guard = step_guard.StepGuard(spike_factor=3.0, spike_warmup_steps=2)
  states, metrics = _run(_trainer(guard), [1.0, 1.0, 1.0, 10.0, 2.0])
  reasons = [int(m['skip_reasons']) for m in metrics]
  print(f'\nlosses {[round(float(m["loss"]), 3) for m in metrics]}, '
        f'reasons {reasons}')
  # 10x the loss is a spike; 2x is not (under 3x the running mean).
  assert reasons == [0, 0, 0, SPIKE, 0]
  _assert_equal(states[4].params, states[3].params)
  # Without spike_factor the same steps all apply.
  _, metrics = _run(_trainer(), [1.0, 1.0, 1.0, 10.0])
  assert [int(m['skipped']) for m in metrics] == [0, 0, 0, 0]


def test_bad_guard_settings_are_named():
  with pytest.raises(ValueError, match='max_consecutive_skips must be >= 1'):
    step_guard.StepGuard(max_consecutive_skips=0)
  with pytest.raises(ValueError, match='spike_factor must be > 1'):
    step_guard.StepGuard(spike_factor=0.5)


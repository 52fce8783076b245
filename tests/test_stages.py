"""The stage runner's losses (t5x_adapt/stages.py) and the metrics reader
(t5x_adapt/summaries.py).

`LossOnBatches` must give the number the demo's table and the paper's
curves were computed with before it reused `eval.LossEvaluator`: the
token-weighted mean of `cross_entropy` over the batches, one jitted
`loss_fn` call per batch.
"""

import jax
import numpy as np
import pytest

from t5x_adapt import gin_utils
from t5x_adapt import stages
from t5x_adapt import summaries
from t5x_adapt.distillation import DistillationModel


def _batches(vocab, count=3, batch=4, inputs=12, targets=10):
  """Unpacked PrefixLM-shaped batches with ragged padding."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(count):
    enc = rng.integers(3, vocab, (batch, inputs), dtype=np.int32)
    tgt = rng.integers(3, vocab, (batch, targets), dtype=np.int32)
    for row, (n_in, n_tgt) in enumerate(zip(rng.integers(3, inputs, batch),
                                            rng.integers(2, targets, batch))):
      enc[row, n_in:] = 0
      tgt[row, n_tgt:] = 0
    dec = np.concatenate([np.full((batch, 1), 2, np.int32), tgt[:, :-1]], 1)
    out.append({'encoder_input_tokens': enc, 'decoder_input_tokens': dec,
                'decoder_target_tokens': tgt,
                'decoder_loss_weights': (tgt > 0).astype(np.int32)})
  return out


def _mean_by_hand(loss_fn, params, batches) -> float:
  """The demo's former `mean_loss`: float64 sums of per-batch metrics."""
  step = jax.jit(lambda p, b: loss_fn(p, b)[1])
  total = tokens = 0.0
  for batch in batches:
    metrics = jax.device_get(step(params, batch))
    total += float(metrics['cross_entropy']) * float(metrics['num_tokens'])
    tokens += float(metrics['num_tokens'])
  return total / tokens


@pytest.fixture(scope='module')
def student():
  return DistillationModel(gin_utils.load_model('t5gemma_tiny').config)


def test_loss_on_batches_is_the_token_weighted_mean(student):
  batches = _batches(student.config.vocab_size)
  params = student.get_initial_variables(jax.random.PRNGKey(1), {})['params']
  by_hand = _mean_by_hand(lambda p, b: student.loss_fn(p, b, None), params,
                          batches)
  assert stages.LossOnBatches(student, batches)(params) == pytest.approx(
      by_hand, rel=1e-6)


def test_the_teacher_is_scored_on_the_students_batches(student):
  batches = _batches(student.config.vocab_size)
  teacher = student.teacher.get_initial_variables(jax.random.PRNGKey(2),
                                                  {})['params']
  loss = stages.LossOnBatches(stages.Teacher(student), batches)
  assert loss(teacher) == pytest.approx(
      _mean_by_hand(student.teacher_loss, teacher, batches), rel=1e-6)


def test_read_metrics_filters_and_curve_keeps_a_steps_last_value(tmp_path):
  log = summaries.MetricsLog(tmp_path, 'metrics.jsonl')
  records = [{'step': 10, 'loss': 3.0}, {'step': 10, 'eval_loss': 2.5},
             {'step': 20, 'loss': float('nan')},
             # A resumed run writes step 10 again.
             {'step': 10, 'eval_loss': 2.4}, {'step': 20, 'eval_loss': 2.0}]
  for record in records:
    log.write(record, 'train', record['step'], {})
  log.close()
  path = tmp_path / 'metrics.jsonl'
  assert summaries.read_metrics(path)[2] == {'step': 20, 'loss': None}
  evals = summaries.read_metrics(path, 'eval_loss')
  assert [r['eval_loss'] for r in evals] == [2.5, 2.4, 2.0]
  assert summaries.curve(evals, 'eval_loss') == [(10, 2.4), (20, 2.0)]
  assert summaries.curve(summaries.read_metrics(path), 'loss') == [
      (10, 3.0), (20, None)]

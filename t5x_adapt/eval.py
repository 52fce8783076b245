r"""Evaluation of checkpoints: perplexity and the tasks' own metrics.

  python -m t5x_adapt.eval \
    --gin_file=gin/runs/eval.gin --gin_file=gin/models/t5gemma_tiny.gin \
    --gin.MODEL_DIR="'/tmp/run'" --gin.MIXTURE_OR_TASK_NAME="'sentiment_spm8k'" \
    --gin.TASK_FEATURE_LENGTHS="{'inputs': 64, 'targets': 8}" \
    --gin.BATCH_SIZE=8

`evaluate()` takes one checkpoint (`checkpoint_path`), or every complete
checkpoint of MODEL_DIR/checkpoints that has no results yet, in step order,
and reports for each task of the mixture, over its split's examples
(unpacked, as the model's `FEATURE_CONVERTER_CLS(pack=False)` makes them):

  - `cross_entropy` (mean per target token, `model.loss_fn`), `perplexity`
    (its exp), `token_accuracy` and `target_tokens`;
  - the task's own metrics, through `seqio.Evaluator`: generation metrics
    (`predict_batch`, decoded, the task's postprocessor, its metric_fns),
    ranking metrics (`score_batch`, seqio's score_metric_fns) and metrics
    of decodes with their scores (`predict_batch_with_aux`).

Process 0 writes OUTPUT_DIR/<task>/<step>.json (the record of what has
been evaluated), a line per task and step in OUTPUT_DIR/results.jsonl, and
TensorBoard scalars in OUTPUT_DIR/<task>; OUTPUT_DIR defaults to
MODEL_DIR/eval, next to training's own `eval` scalars.

The model runs on global batches over the mesh (`t5x_adapt.sharded`), so
every process computes the same metrics. The evaluators serve training
too: `LossEvaluator` is train.py's validation loss and `MetricEvaluator`
its in-loop task metrics (`train.eval_metrics`).
"""

from __future__ import annotations

if __name__ == '__main__':
  from t5x_adapt import host_memory
  host_memory.use_huge_pages()
  # `python -m t5x_adapt.eval`: run the importable module, so that gin knows
  # `evaluate` once, as t5x_adapt.eval.evaluate (not __main__.evaluate).
  from t5x_adapt import eval as _eval  # pylint: disable=import-self
  _eval.main()

import collections
import functools
import json
import math
import os
import pathlib
from typing import Callable, Iterable, Mapping, Optional, Sequence

import gin
import jax
from jax.experimental import multihost_utils
import numpy as np
import seqio
import tensorflow as tf

from t5x_adapt import checkpoints
from t5x_adapt import cli
from t5x_adapt import decoding
from t5x_adapt import distributed
from t5x_adapt import summaries
from t5x_adapt.sharded import HostBatch, PADDING_INDEX, ShardedModel
from t5x_adapt.sharded import host_batches, indexed_batches, predict_indexed

RESULTS_FILE = 'results.jsonl'
# loss_fn sums (LossEvaluator's names) -> names in evaluation results, apart
# from the tasks' own metrics (t5's `accuracy` is per example, in percent).
LOSS_METRIC_NAMES = {'loss': 'cross_entropy', 'perplexity': 'perplexity',
                     'accuracy': 'token_accuracy', 'tokens': 'target_tokens'}

def loss_dataset(task: seqio.Task, task_feature_lengths: Mapping[str, int],
                 feature_converter: seqio.FeatureConverter,
                 split: str = 'validation',
                 num_examples: Optional[int] = None,
                 seed: int = 0) -> tf.data.Dataset:
  """A task split's first examples as unpacked model features, in order.

  Returns:
    (index, features) pairs, cached in memory after the first pass.
  """
  dataset = task.get_dataset(sequence_length=dict(task_feature_lengths),
                             split=split, shuffle=False, num_epochs=1,
                             seed=seed, use_cached=False)
  if num_examples:
    dataset = dataset.take(num_examples)
  return feature_converter(dataset, task_feature_lengths).enumerate().cache()


# ----------------------------------------------------------- evaluators --


def _perplexity(cross_entropy: float) -> float:
  try:
    return math.exp(cross_entropy)
  except OverflowError:
    return float('inf')


class LossEvaluator:
  """Mean cross-entropy per target token, its perplexity, token accuracy.

  Args:
    sharded: The model's jitted calls.
    batches: Returns a fresh iterable of this process's rows of each global
      batch (rows that must not count carry zero loss weights).
  """

  def __init__(self, sharded: ShardedModel,
               batches: Callable[[], Iterable[HostBatch]]):
    self._sharded = sharded
    self._batches = batches

  def __call__(self, params) -> dict[str, float]:
    """{'loss', 'perplexity', 'accuracy', 'tokens'} over every batch."""
    totals = collections.Counter()  # Python floats: float64 sums.
    for batch in self._batches():
      for name, value in self._sharded.loss_sums(params, batch).items():
        totals[name] += float(value)
    tokens = max(totals['tokens'], 1.0)
    loss = totals['loss'] / tokens
    return {'loss': loss, 'perplexity': _perplexity(loss),
            'accuracy': totals['accuracy'] / tokens,
            'tokens': totals['tokens']}


def _scalars(task: str, metrics: Mapping[str, object]) -> dict[str, float]:
  """A task's metric values as floats; non-scalars (texts...) are left out."""
  out = {}
  for name, value in metrics.items():
    value = getattr(value, 'value', value)  # seqio.metrics.Scalar
    try:
      out[name] = float(value)
    except (TypeError, ValueError):
      cli.say(f'{task}: metric {name!r} is not a scalar '
              f'({type(value).__name__}); not reported')
  return out


class MetricEvaluator:
  """The tasks' own metrics, computed by `seqio.Evaluator`.

  Args:
    sharded: The model's jitted calls.
    mixture_or_task_name: Tasks without metric functions are skipped.
    task_feature_lengths: Task feature lengths; `targets` is also the
      number of tokens decoded.
    batch_size: Global batch size.
    split: The split evaluated.
    num_examples: The first examples of each task (None: all).
    options: Decoding (None: the model's, else gin's `DecodeOptions()`).
    seed: Seeds sampling (decoding) and seqio's preprocessing.
  """

  def __init__(self, sharded: ShardedModel, mixture_or_task_name: str,
               task_feature_lengths: Mapping[str, int], batch_size: int,
               split: str = 'validation',
               num_examples: Optional[int] = None,
               options: Optional[decoding.DecodeOptions] = None,
               seed: int = 0):
    self._sharded = sharded
    self._batch_size = batch_size
    self._max_decode_length = task_feature_lengths['targets']
    self._options = (options or sharded.model.decode_options
                     or decoding.DecodeOptions())
    self._seed = seed
    converter = sharded.model.FEATURE_CONVERTER_CLS(pack=False)
    self._evaluator = seqio.Evaluator(
        mixture_or_task_name, converter, eval_split=split, seed=seed,
        sequence_length=dict(task_feature_lengths),
        num_examples=num_examples, async_compute_metrics=False)

  @property
  def task_names(self) -> list[str]:
    """The tasks that have metrics (and the split)."""
    return [task.name for task in self._evaluator.eval_tasks]

  def _predictions(self, params, dataset):
    return predict_indexed(self._sharded, params, dataset, self._batch_size,
                           self._max_decode_length, self._options, self._seed)

  def _predict(self, params, dataset, model_feature_shapes=None):
    del model_feature_shapes
    return [(i, tokens) for i, tokens, _ in
            self._predictions(params, dataset)]

  def _predict_with_aux(self, params, dataset, model_feature_shapes=None):
    del model_feature_shapes
    predictions = self._predictions(params, dataset)
    return ([(i, tokens) for i, tokens, _ in predictions],
            {'scores': [score for _, _, score in predictions]})

  def _score(self, params, dataset, model_feature_shapes=None):
    del model_feature_shapes
    scores = []
    for indices, batch in indexed_batches(dataset, self._batch_size,
                                          self._sharded.partitioner):
      scores.extend((int(i), float(s)) for i, s in
                    zip(indices, self._sharded.scores(params, batch))
                    if i != PADDING_INDEX)
    return scores

  def __call__(self, params, step: int) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of the tasks with metrics."""
    if not self.task_names:
      return {}
    metrics, _ = self._evaluator.evaluate(
        compute_metrics=True, step=step,
        predict_fn=functools.partial(self._predict, params),
        score_fn=functools.partial(self._score, params),
        predict_with_aux_fn=functools.partial(self._predict_with_aux, params))
    return {task: _scalars(task, values)
            for task, values in metrics.result().items()}


# -------------------------------------------------------------- results --


class ResultsWriter:
  """<task>/<step>.json, results.jsonl and TensorBoard scalars (process 0).

  Args:
    output_dir: Where results go (created).
  """

  def __init__(self, output_dir: pathlib.Path):
    self._dir = output_dir
    self._enabled = distributed.is_main_process()
    self._log = summaries.MetricsLog(output_dir, RESULTS_FILE)

  def write(self, step: int, checkpoint: str,
            results: Mapping[str, Mapping[str, float]]) -> None:
    if not self._enabled:
      return
    for task, metrics in results.items():
      record = {'step': step, 'task': task, 'checkpoint': checkpoint,
                'metrics': dict(metrics)}
      path = result_path(self._dir, task, step)
      path.parent.mkdir(parents=True, exist_ok=True)
      # Written whole, then renamed: a step counts as evaluated only once
      # its file is complete.
      partial = path.with_name(f'{step}.json.tmp')
      partial.write_text(json.dumps(record, indent=1) + '\n')
      os.replace(partial, path)
      self._log.write(record, task, step, metrics)

  def close(self) -> None:
    self._log.close()


def result_path(output_dir: pathlib.Path, task: str, step: int
                ) -> pathlib.Path:
  return output_dir / task / f'{step}.json'


# ----------------------------------------------------------- checkpoints --


def _step_of(checkpoint: pathlib.Path) -> int:
  """A training step directory's step (`.../checkpoints/<step>`), else 0."""
  return int(checkpoint.name) if checkpoint.name.isdigit() else 0


def _run_dir_of(checkpoint: pathlib.Path) -> Optional[pathlib.Path]:
  """MODEL_DIR of a training step directory, None for other checkpoints."""
  if checkpoint.name.isdigit() and (
      checkpoint.parent.name == checkpoints.training.CHECKPOINT_DIR):
    return checkpoint.parent.parent
  return None


def _evaluated(steps: Sequence[int], output_dir: pathlib.Path,
               task_names: Sequence[str]) -> np.ndarray:
  """Whether every task has a result file, per step (process 0 decides)."""
  done = np.array([all(result_path(output_dir, task, step).exists()
                       for task in task_names) for step in steps], bool)
  if jax.process_count() > 1:
    done = multihost_utils.broadcast_one_to_all(done)
  return np.asarray(done, bool)


def checkpoints_to_evaluate(checkpoint_path: Optional[str],
                            model_dir: Optional[str],
                            output_dir: pathlib.Path,
                            task_names: Sequence[str]
                            ) -> list[tuple[int, pathlib.Path]]:
  """(step, checkpoint) pairs: the one given, or MODEL_DIR's new ones."""
  if checkpoint_path:
    path = pathlib.Path(checkpoint_path)
    return [(_step_of(path), path)]
  directory = pathlib.Path(model_dir) / checkpoints.training.CHECKPOINT_DIR
  steps = checkpoints.training.complete_steps(directory)
  if not steps:
    raise FileNotFoundError(f'no complete checkpoint in {directory}')
  done = _evaluated(steps, output_dir, task_names)
  skipped = [step for step, d in zip(steps, done) if d]
  if skipped:
    cli.say(f'Already evaluated in {output_dir}: steps {skipped}')
  return [(step, directory / str(step))
          for step, d in zip(steps, done) if not d]


def _output_dir(output_dir: Optional[str], model_dir: Optional[str],
                checkpoint_path: Optional[str]) -> pathlib.Path:
  if output_dir:
    return pathlib.Path(output_dir)
  run_dir = (pathlib.Path(model_dir) if model_dir else
             _run_dir_of(pathlib.Path(checkpoint_path)))
  if run_dir is None:
    raise ValueError(f'evaluate: give output_dir (OUTPUT_DIR) for checkpoint '
                     f'{checkpoint_path}, which is not a training step '
                     'directory (MODEL_DIR/checkpoints/<step>)')
  return run_dir / 'eval'


# ------------------------------------------------------------ evaluate --


def _eval_tasks(mixture_or_task_name: str, split: str) -> list[seqio.Task]:
  tasks = seqio.get_subtasks(seqio.get_mixture_or_task(mixture_or_task_name))
  with_split = [task for task in tasks if split in task.splits]
  if not with_split:
    raise ValueError(f'no task of {mixture_or_task_name!r} has a {split!r} '
                     f'split (tasks: {[t.name for t in tasks]})')
  return with_split


def _merge(loss: Mapping[str, Mapping[str, float]],
           task_metrics: Mapping[str, Mapping[str, float]]
           ) -> dict[str, dict[str, float]]:
  """Loss metrics (renamed) and the tasks' own, per task."""
  results = {}
  for task, metrics in loss.items():
    results[task] = {LOSS_METRIC_NAMES[k]: v for k, v in metrics.items()}
    for name, value in task_metrics.get(task, {}).items():
      if name in results[task]:
        raise ValueError(f'task {task}: its metric {name!r} has the name of '
                         'a loss metric')
      results[task][name] = value
  return results


def _format(metrics: Mapping[str, float]) -> str:
  return ', '.join(f'{name} {value:.4g}' for name, value in metrics.items())


@gin.configurable
def evaluate(mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
             batch_size: int = gin.REQUIRED,
             checkpoint_path: Optional[str] = None,
             model_dir: Optional[str] = None,
             output_dir: Optional[str] = None,
             split: str = 'validation',
             num_examples: Optional[int] = None,
             vocab_size: Optional[int] = None,
             seed: int = 0) -> dict[int, dict[str, dict[str, float]]]:
  """Evaluates the gin-configured model's checkpoints; see the module doc.

  Args:
    mixture_or_task_name: seqio task or mixture; each of its tasks that has
      `split` is evaluated.
    task_feature_lengths: e.g. {'inputs': 512, 'targets': 128}; examples
      are trimmed to them, and `targets` tokens are decoded.
    batch_size: Global batch size.
    checkpoint_path: One checkpoint: a training step directory
      (MODEL_DIR/checkpoints/<step>) or a parameter checkpoint.
    model_dir: Without `checkpoint_path`: a training run whose complete
      checkpoints are evaluated, those without results skipped.
    output_dir: Where results go (default MODEL_DIR/eval, or the eval
      directory of the checkpoint's run).
    split: The split evaluated.
    num_examples: The first examples of each task (None: all).
    vocab_size: Model vocabulary (None: see `cli.build_model`).
    seed: Seeds sampling and seqio's preprocessing.

  Returns:
    {step: {task: {metric: value}}} of the checkpoints evaluated now.
  """
  if not (checkpoint_path or model_dir):
    raise ValueError('evaluate: give checkpoint_path (CHECKPOINT_PATH) or '
                     'model_dir (MODEL_DIR)')
  output = _output_dir(output_dir, model_dir, checkpoint_path)
  tasks = _eval_tasks(mixture_or_task_name, split)  # Prepares the data.
  pending = checkpoints_to_evaluate(checkpoint_path, model_dir, output,
                                    [task.name for task in tasks])
  if not pending:
    return {}

  model = cli.build_model(mixture_or_task_name, vocab_size)
  sharded = ShardedModel.on_gin_mesh(model, batch_size)
  converter = model.FEATURE_CONVERTER_CLS(pack=False)
  loss_evaluators = {}
  for task in tasks:
    dataset = loss_dataset(task, task_feature_lengths, converter, split,
                           num_examples, seed)
    loss_evaluators[task.name] = LossEvaluator(sharded, functools.partial(
        host_batches, dataset, batch_size, sharded.partitioner))
  metric_evaluator = MetricEvaluator(
      sharded, mixture_or_task_name, task_feature_lengths, batch_size, split,
      num_examples, seed=seed)

  writer = ResultsWriter(output)
  results = {}
  try:
    for step, path in pending:
      params = sharded.restore(path)
      loss = {task: evaluator(params)
              for task, evaluator in loss_evaluators.items()}
      results[step] = _merge(loss, metric_evaluator(params, step))
      writer.write(step, str(path), results[step])
      for task, metrics in results[step].items():
        cli.say(f'step {step} {task}: {_format(metrics)}')
  finally:
    writer.close()
  return results


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Command-line entry point (argv defaults to sys.argv)."""
  cli.run(evaluate, argv)

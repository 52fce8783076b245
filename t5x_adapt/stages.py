"""Training stages run one after another in this process, and their losses.

The demo (`t5x_adapt.demo`) and the paper experiment
(`t5x_adapt.experiments.paper`) are chains of stages: each a
`t5x_adapt.train` run of the project's gin files in its own MODEL_DIR,
reused when its final checkpoint exists, so that a chain stopped anywhere
continues where it was. Between stages they score checkpoints on fixed
validation batches:

  final = run_stage(root / 'adapted', files, steps, task, bindings)
  batches = validation_batches(task, lengths, converter, batch_size, count)
  loss = LossOnBatches(model, batches)(load.load_params(final, model))

`LossOnBatches` is `eval.LossEvaluator` (what training's validation loss
and `t5x_adapt.eval` report) on fixed batches; `Teacher` scores a
distillation model's decoder-only teacher on the student's batches the same
way.
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import gin
import jax
import numpy as np
import seqio

from t5x_adapt import eval as eval_lib
from t5x_adapt import gin_utils
from t5x_adapt import partitioning
from t5x_adapt import sharded as sharded_lib
from t5x_adapt import train as train_lib
from t5x_adapt.data import pipeline

Batch = dict[str, np.ndarray]


# --------------------------------------------------------------- stages --


class StageStopped(RuntimeError):
  """A stage's training returned before its last step."""


def final_checkpoint(model_dir: pathlib.Path, steps: int) -> pathlib.Path:
  """The last checkpoint a stage of `steps` steps leaves in `model_dir`."""
  return model_dir / train_lib.CHECKPOINT_DIR / str(steps)


def run_stage(model_dir: pathlib.Path, files: Sequence[str], steps: int,
              task: str, bindings: Sequence[str] = ()) -> pathlib.Path:
  """Trains one stage with gin `files` (reused when already complete).

  The global gin config is replaced by the stage's: `files`, then
  MODEL_DIR, TRAIN_STEPS and MIXTURE_OR_TASK_NAME, then `bindings`.

  Args:
    model_dir: The stage's MODEL_DIR.
    files: Gin files, in command-line order.
    steps: TRAIN_STEPS.
    task: MIXTURE_OR_TASK_NAME.
    bindings: Further gin bindings (they win over the three above).

  Returns:
    The final checkpoint's step directory.

  Raises:
    StageStopped: training returned before its last step (a SIGTERM: it
      saved where it was, and running the stage again resumes there).
  """
  final = final_checkpoint(model_dir, steps)
  if not final.exists():
    gin.clear_config()
    gin_utils.parse_gin(files, [
        f"MODEL_DIR = '{model_dir}'", f'TRAIN_STEPS = {steps}',
        f"MIXTURE_OR_TASK_NAME = '{task}'", *bindings])
    train_lib.train()
    if not final.exists():
      raise StageStopped(
          f'{model_dir}: training stopped before step {steps} (no {final}); '
          'it saved its last step: run again to resume')
  return final


# --------------------------------------------------------------- losses --


def validation_batches(task: str, lengths: dict[str, int],
                       converter: seqio.FeatureConverter, batch_size: int,
                       count: int) -> list[Batch]:
  """The first `count` validation batches of `task`, in order: the same
  batches for every model scored on them (build `converter` unpacked)."""
  dataset = pipeline.get_dataset(task, lengths, converter, batch_size,
                                 split='validation', shuffle=False,
                                 num_epochs=1)
  return list(dataset.take(count).as_numpy_iterator())


class Teacher:
  """A distillation model's teacher, scored as a model on the student's
  batches: its loss on their targets given their inputs
  (`DistillationModel.teacher_loss`); parameters are the teacher's.

  Args:
    student: A `t5x_adapt.distillation.DistillationModel`.
  """

  def __init__(self, student):
    self._student = student

  def loss_fn(self, params, batch, dropout_rng):
    del dropout_rng  # Scoring runs without dropout.
    return self._student.teacher_loss(params, batch)

  def logical_axes(self):
    return self._student.teacher.logical_axes()


class LossOnBatches:
  """Mean cross-entropy per target token of parameters on fixed batches.

  `eval.LossEvaluator` over `batches`, compiled once for every parameter
  set scored. A model is anything with `loss_fn(params, batch, rng) ->
  (loss, metrics)` and `logical_axes()`: a `t5x_adapt.models` model (its
  hard-label loss) or a `Teacher`.

  Args:
    model: The model scored.
    batches: Whole batches (this one process's), each weighed by its
      target tokens.
    partitioner: Mesh and rules; default one device, as a plain `jax.jit`
      runs.
  """

  def __init__(self, model, batches: Sequence[Batch],
               partitioner: Optional[partitioning.Partitioner] = None):
    # Explicit sizes: a stage's gin mesh bindings do not apply here.
    partitioner = partitioner or partitioning.Partitioner(
        data=1, fsdp=1, tensor=1, devices=jax.local_devices()[:1])
    self._sharded = sharded_lib.ShardedModel(
        model, partitioner, partitioner.shardings(model.logical_axes()))
    self._evaluator = eval_lib.LossEvaluator(self._sharded, lambda: batches)

  def __call__(self, params) -> float:
    """The token-weighted mean loss of `params` over the batches."""
    params = jax.device_put(params, self._sharded.param_shardings)
    return self._evaluator(params)['loss']

"""The batches a run compiles its step for are the batches its data makes.

`t5x_adapt.precompile` compiles a step without reading data, from
`Trainer.batch_shapes` (the model's feature converter's ranks and lengths);
`t5x_adapt.train` compiles from the same call and checks its dataset
against it. Here the two meet: for a language model, an encoder-decoder and
a classifier (whose label is a scalar per row), precompile's shapes equal
those of the global batches train's pipeline yields.
"""

import numpy as np
import pytest

import tasks  # pylint: disable=unused-import  # registers the seqio tasks
from t5x_adapt import classification
from t5x_adapt import gin_utils
from t5x_adapt import optimizers
from t5x_adapt import partitioning
from t5x_adapt import train as train_lib
from t5x_adapt import trainer as trainer_lib

BATCH = 4

RUNS = {
    'lm': ('gemma2_tiny', 'corpus_lm_spm8k', {'targets': 32}),
    'prefix_lm': ('gemma2_tiny', 'corpus_prefix_lm_spm8k',
                  {'inputs': 16, 'targets': 16}),
    'encoder_decoder': ('t5gemma_tiny', 'corpus_prefix_lm_spm8k',
                        {'inputs': 24, 'targets': 16}),
    'classification': ('t5gemma_tiny', 'sentiment_cls_spm8k',
                       {'inputs': 24}),
}


def _model(preset, task):
  model = gin_utils.load_model(preset)
  if task.startswith('sentiment_cls'):
    return classification.classification_model(model, num_classes=3)
  return model


@pytest.mark.parametrize('run', sorted(RUNS))
def test_precompiled_batch_is_the_batch_train_reads(run):
  preset, task, lengths = RUNS[run]
  model = _model(preset, task)
  trainer = trainer_lib.Trainer(model, partitioning.Partitioner(),
                                optimizers.optimizer(learning_rate=1e-3))
  compiled_for = trainer.batch_shapes(lengths, BATCH)
  dataset, _ = train_lib._datasets(  # pylint: disable=protected-access
      model.feature_converter(), task, lengths, BATCH, eval_steps=0)
  batch = next(dataset.as_numpy_iterator())
  read = {k: (v.shape, v.dtype) for k, v in batch.items()}
  assert read == {k: (v.shape, np.dtype(v.dtype))
                  for k, v in compiled_for.items()}
  if run == 'classification':
    assert read['label'][0] == (BATCH,)  # a scalar per row, not (B, 1)
  train_lib._check_batch_shapes(  # pylint: disable=protected-access
      dataset, compiled_for)


def test_a_dataset_that_differs_is_named():
  model = gin_utils.load_model('gemma2_tiny')
  dataset, _ = train_lib._datasets(  # pylint: disable=protected-access
      model.feature_converter(), 'corpus_lm_spm8k', {'targets': 32}, BATCH,
      eval_steps=0)
  wrong = model.batch_shapes({'targets': 16}, BATCH)
  with pytest.raises(ValueError, match="feature 'decoder_input_tokens'"):
    train_lib._check_batch_shapes(  # pylint: disable=protected-access
        dataset, wrong)

"""SuperGLUE over TFDS (needs a TFDS download), cast as classification.

Inputs are t5's text casting of each task; the integer `label` feature is kept
for a classification head, and the label name is the text target so the same
task also works text-to-text with t5's metrics. t5 is imported when a task
first reads data or scores (`t5_lib`), not to register the tasks.
"""

import functools

import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from t5x_adapt.tasks import t5_lib
from t5x_adapt.tasks.vocabularies import VOCABULARIES

TASKS = ('boolq', 'cb', 'copa', 'rte', 'wic', 'wsc', 'multirc')
_BUILDER_NAMES = {'wsc': 'wsc.fixed'}
VERSION = '1.0.2'
# t5 has no metric entry for WSC: SuperGLUE scores it by accuracy.
_METRICS = {'wsc': [t5_lib.accuracy]}


def __getattr__(name):
  # `super_glue.glue_utils`: t5's module, imported on first use.
  if name == 'glue_utils':
    return t5_lib.module('data.glue_utils')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def _builder_config(name):
  configs = {c.name: c for c in tfds.text.SuperGlue.builder_configs.values()}
  return configs[_BUILDER_NAMES.get(name, name)]


def _register(task, vocab_name, vocabulary):
  config = _builder_config(task)
  features = {'inputs': seqio.Feature(vocabulary, add_eos=True),
              'targets': seqio.Feature(vocabulary, add_eos=True)}
  seqio.TaskRegistry.add(
      f'super_glue_{task}_cls_{vocab_name}',
      source=seqio.TfdsDataSource(
          tfds_name=f'super_glue/{config.name}:{VERSION}'),
      preprocessors=[
          functools.partial(
              _with_label,
              text_preprocessor=functools.partial(_text, config=config),
              label_names=tuple(config.label_classes)),
          seqio.preprocessors.tokenize,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=features,
      postprocess_fn=functools.partial(_postprocess, config=config),
      metric_fns=[functools.partial(_metrics, task=task)])


def _text(dataset, config):
  """t5's text casting of the SuperGLUE task of builder `config`."""
  glue_utils = t5_lib.module('data.glue_utils')
  return glue_utils.get_glue_text_preprocessor(config)(dataset)


def _postprocess(output, config, **kwargs):
  """t5's postprocessor of the SuperGLUE task of builder `config`."""
  glue_utils = t5_lib.module('data.glue_utils')
  return glue_utils.get_glue_postprocess_fn(config)(output, **kwargs)


def _metrics(targets, predictions, task):
  """t5's metrics of `task`, merged (as seqio merges a task's metrics)."""
  functions = (_METRICS.get(task) or
               t5_lib.module('data.glue_utils').get_super_glue_metric(task))
  results = {}
  for function in functions:
    results.update(function(targets, predictions))
  return results


def _with_label(dataset, text_preprocessor, label_names):
  """t5's text casting, plus the integer `label` of the target's name."""
  names = tf.constant(label_names)

  def add_label(x):
    index = tf.where(tf.equal(names, x['targets']))[:, 0]
    label = tf.cond(tf.size(index) > 0, lambda: index[0],
                    lambda: tf.constant(-1, tf.int64))
    return dict(x, label=label)

  return text_preprocessor(dataset).map(add_label)


for _vocab_name, (_vocabulary, _) in VOCABULARIES.items():
  for _task in TASKS:
    _register(_task, _vocab_name, _vocabulary)
  seqio.MixtureRegistry.add(
      f'super_glue_cls_{_vocab_name}',
      [f'super_glue_{t}_cls_{_vocab_name}' for t in TASKS], default_rate=1.0)

"""Movie-review sentiment (real, offline): text-to-text and classification."""

import functools

import seqio
import tensorflow as tf

from t5x_adapt.data import sources
from t5x_adapt.data.sources_seqio import LABELLED, PreparedSource
from t5x_adapt.tasks import t5_lib
from t5x_adapt.tasks.vocabularies import VOCABULARIES

LABELS = ('negative', 'positive')


def source(ensure_vocabulary):
  """The sentiment reviews (text, integer label, id), prepared on first use."""
  return PreparedSource(
      lambda: {split: sources.sentiment_pattern(split)
               for split in ('train', 'validation', 'test')},
      LABELLED, ensure_vocabulary)


@seqio.map_over_dataset
def _to_text(example, prefix='sentiment: '):
  """inputs: 'sentiment: <text>', targets: the label's name."""
  return {
      'inputs': tf.strings.join([prefix, example['text']]),
      'targets': tf.gather(tf.constant(LABELS), example['label']),
      'label': example['label'],
      'id': example['id'],
  }


def _register(vocab_name, vocabulary, ensure):
  features = {'inputs': seqio.Feature(vocabulary, add_eos=True),
              'targets': seqio.Feature(vocabulary, add_eos=True)}
  postprocess = functools.partial(t5_lib.string_label_to_class_id,
                                  label_classes=LABELS)
  seqio.TaskRegistry.add(
      f'sentiment_{vocab_name}', source=source(ensure),
      preprocessors=[_to_text, seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features=features, postprocess_fn=postprocess,
      metric_fns=[t5_lib.accuracy])
  seqio.TaskRegistry.add(
      f'sentiment_cls_{vocab_name}', source=source(ensure),
      preprocessors=[functools.partial(_to_text, prefix=''),
                     seqio.preprocessors.tokenize,
                     seqio.preprocessors.append_eos_after_trim],
      output_features=features, postprocess_fn=postprocess,
      metric_fns=[t5_lib.accuracy])


for _name, (_vocabulary, _ensure) in VOCABULARIES.items():
  _register(_name, _vocabulary, _ensure)

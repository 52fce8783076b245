"""Instruction tuning (SFT) tasks in Gemma's turn template, from offline data.

  sft_sentiment_{v}     prompt "Is this review positive or negative?\\n<review>",
                        response "positive" / "negative"; accuracy of the
                        generated label
  sft_continuation_{v}  prompt: an instruction and three sentences of the
                        corpus, response: the sentence that follows them;
                        ROUGE of the generated sentence against it
  sft_mixture_{v}       both, in equal proportions (instruction tuning on
                        more than one kind of request)

The template and how each vocabulary spells its markers:
`t5x_adapt.data.sft`. Splits are the sources' (train, validation).
"""


import seqio
import tensorflow as tf

from t5x_adapt.data import sft
from t5x_adapt.tasks import corpus
from t5x_adapt.tasks import sentiment
from t5x_adapt.tasks import t5_lib
from t5x_adapt.tasks.vocabularies import VOCABULARIES

SENTIMENT_QUESTION = 'Is this review positive or negative?\n'
CONTINUATION_INSTRUCTION = 'Continue the passage with its next sentence.\n'
CONTEXT_SENTENCES = 3


@seqio.map_over_dataset
def _sentiment_exchange(example):
  return {'prompt': tf.strings.join([SENTIMENT_QUESTION, example['text']]),
          'response': tf.gather(tf.constant(sentiment.LABELS),
                                example['label']),
          'label': example['label'], 'id': example['id']}


def _sentences(text: tf.Tensor) -> tf.Tensor:
  """A document's sentences: [n] strings, white space folded."""
  text = tf.strings.regex_replace(text, r'\s+', ' ')
  # A unit separator after each sentence end marks where to split.
  marked = tf.strings.regex_replace(text, r'([.!?]) ', '\\1\x1f')
  sentences = tf.strings.strip(tf.strings.split(marked, '\x1f'))
  return tf.boolean_mask(sentences, tf.strings.length(sentences) > 0)


def _continuation_exchanges(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """Each document -> disjoint (CONTEXT_SENTENCES sentences, next one)."""
  group = CONTEXT_SENTENCES + 1

  def exchanges(example):
    sentences = _sentences(example['text'])
    count = tf.size(sentences) // group
    groups = tf.reshape(sentences[:count * group], [count, group])
    passages = tf.strings.reduce_join(groups[:, :-1], axis=1, separator=' ')
    return tf.data.Dataset.from_tensor_slices({
        'prompt': tf.strings.join([CONTINUATION_INSTRUCTION, passages]),
        'response': groups[:, -1]})

  return dataset.flat_map(exchanges)


def _label_of_response(text, **kwargs):
  return t5_lib.string_label_to_class_id(
      sft.strip_end_of_turn(text), label_classes=sentiment.LABELS, **kwargs)


def _register(vocab_name, vocabulary, ensure):
  # The prompt ends where the model starts to speak: no EOS after it.
  features = {'inputs': seqio.Feature(vocabulary, add_eos=False),
              'targets': seqio.Feature(vocabulary, add_eos=True)}
  steps = [sft.format_turns, seqio.preprocessors.append_eos_after_trim]
  seqio.TaskRegistry.add(
      f'sft_sentiment_{vocab_name}', source=sentiment.source(ensure),
      preprocessors=[_sentiment_exchange, *steps],
      output_features=features, postprocess_fn=_label_of_response,
      metric_fns=[t5_lib.accuracy])
  seqio.TaskRegistry.add(
      f'sft_continuation_{vocab_name}', source=corpus.source(ensure),
      preprocessors=[_continuation_exchanges, *steps],
      output_features=features, postprocess_fn=sft.strip_end_of_turn,
      metric_fns=[t5_lib.rouge])
  seqio.MixtureRegistry.add(
      f'sft_mixture_{vocab_name}',
      [f'sft_sentiment_{vocab_name}', f'sft_continuation_{vocab_name}'],
      default_rate=1.0)


for _name, (_vocabulary, _ensure) in VOCABULARIES.items():
  _register(_name, _vocabulary, _ensure)

"""Vocabularies: special ids, sentinels, mode tokens, reproducible training."""

import itertools

import pytest
import seqio
import tensorflow as tf

import tasks  # pylint: disable=unused-import
from t5x_adapt.data import sources
from t5x_adapt.data import vocab as vocab_lib
from tasks import super_glue


def _check_layout(vocabulary, size, modes):
  processor = vocabulary.tokenizer
  assert vocabulary.vocab_size == size
  assert [processor.pad_id(), processor.eos_id(), processor.bos_id(),
          processor.unk_id()] == [0, 1, 2, 3]
  assert vocab_lib.mode_token_ids(vocabulary) == modes
  sentinels = vocab_lib.sentinel_ids(vocabulary, 100)
  assert sentinels[0] == size - 1
  assert all(processor.is_control(i) for i in sentinels)
  # Text that spells a sentinel or mode piece is never encoded as one.
  reserved = set(sentinels) | set(modes.values())
  text = ' '.join(processor.id_to_piece(i) for i in sorted(reserved)[:20])
  assert not reserved & set(vocabulary.encode(text))


def test_corpus_vocabulary():
  vocabulary = vocab_lib.corpus_vocabulary()
  _check_layout(vocabulary, 8192, {'R': 4, 'S': 5, 'X': 6})
  assert vocab_lib.num_sentinels(vocabulary) == 100
  text = 'Now is the winter of our discontent, 1592.'
  assert vocabulary.decode(vocabulary.encode(text)) == text


def test_gemma3_vocabulary():
  vocabulary = vocab_lib.gemma3_vocabulary()
  _check_layout(vocabulary, 262144, {'R': 6, 'S': 7, 'X': 8})
  # <unused99> .. <unused6241> end the vocabulary (ids 256001 .. 262143).
  count = vocab_lib.num_sentinels(vocabulary)
  assert count == 6143
  processor = vocabulary.tokenizer
  assert processor.id_to_piece(262144 - count) == '<unused99>'
  assert processor.id_to_piece(262143) == '<unused6241>'


def test_corpus_model_is_reproducible(tmp_path):
  docs = list(itertools.islice(sources.corpus_text('train'), 60))
  first = vocab_lib.train_corpus_model(docs, tmp_path / 'a.model',
                                       vocab_size=1024)
  second = vocab_lib.train_corpus_model(docs, tmp_path / 'b.model',
                                        vocab_size=1024)
  assert first.read_bytes() == second.read_bytes()


def test_super_glue_casting_runs_offline():
  """The SuperGLUE path (t5's text casting + label) on hand-made RTE rows."""
  rows = {'premise': ['A man plays a guitar.', 'It rains.'],
          'hypothesis': ['Someone makes music.', 'The sun shines.'],
          'label': [0, 1], 'idx': [0, 1]}
  config = super_glue._builder_config('rte')  # pylint: disable=protected-access
  cast = super_glue._with_label(  # pylint: disable=protected-access
      tf.data.Dataset.from_tensor_slices(rows),
      text_preprocessor=super_glue.glue_utils.get_glue_text_preprocessor(
          config), label_names=tuple(config.label_classes))
  examples = list(cast.as_numpy_iterator())
  assert [e['label'] for e in examples] == [0, 1]
  assert examples[0]['inputs'] == (
      b'rte hypothesis: Someone makes music. premise: A man plays a guitar.')
  assert [e['targets'] for e in examples] == [b'entailment',
                                              b'not_entailment']
  names = seqio.MixtureRegistry.get('super_glue_cls_spm8k').tasks
  assert len(names) == 7

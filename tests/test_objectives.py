"""UL2 and PrefixLM objectives on real corpus text, and bad input."""

import collections

import numpy as np
import pytest
import seqio
import tensorflow as tf

import tasks  # pylint: disable=unused-import
from t5x_adapt.data import objectives
from t5x_adapt.data import sources
from t5x_adapt.data import vocab as vocab_lib

CHUNK = 2048        # long enough for 64-token spans to reach their mean
NUM_EXAMPLES = 1000  # 500 real chunks, each corrupted with two seeds
NUM_CHUNKS = 500
# Real token ids are < 8192; a pass-through vocabulary of this size puts the
# sentinels (vocab_size - 1 - i) far above them and has enough for every span.
SENTINEL_BASE = 100_000
MODES = {'R': 4, 'S': 5, 'X': 6}


@pytest.fixture(scope='module')
def chunks():
  """500 real chunks of CHUNK corpus tokens (several per document)."""
  task = seqio.get_mixture_or_task('corpus_lm_spm8k')
  ds = task.get_dataset({'targets': CHUNK}, 'train', shuffle=False)
  out = [x['targets'] for x in ds.as_numpy_iterator()
         if len(x['targets']) == CHUNK]
  assert len(out) >= NUM_CHUNKS
  return out[:NUM_CHUNKS]


def _corrupt(chunks, denoiser, seed):
  vocabulary = seqio.PassThroughVocabulary(SENTINEL_BASE)
  features = {'inputs': seqio.Feature(vocabulary),
              'targets': seqio.Feature(vocabulary)}
  ds = tf.data.Dataset.from_generator(
      lambda: ({'targets': c} for c in chunks),
      output_signature={'targets': tf.TensorSpec([None], tf.int32)})
  with seqio.utils.map_seed_manager(seed):
    out = objectives.ul2_objective(ds, {}, features, denoisers=[denoiser],
                                   mode_tokens=MODES)
  return list(out.as_numpy_iterator())


def _is_sentinel(token):
  return token >= SENTINEL_BASE - 10_000


def _reconstruct(inputs, targets):
  """Puts each sentinel's span from the targets back into the inputs."""
  spans, current = {}, None
  for token in targets:
    if _is_sentinel(token):
      current = spans.setdefault(int(token), [])
    else:
      current.append(int(token))
  out = []
  for token in inputs:
    out.extend(spans[int(token)] if _is_sentinel(token) else [int(token)])
  return out


@pytest.mark.parametrize('denoiser', objectives.UL2_DENOISERS, ids=str)
def test_ul2_denoiser(chunks, denoiser):
  noise, spans = 0, 0
  for seed, chunk_group in enumerate((chunks, chunks)):
    for original, ex in zip(chunk_group, _corrupt(chunk_group, denoiser, seed)):
      inputs, targets = ex['inputs'], ex['targets']
      assert inputs[0] == MODES[denoiser.mode]
      if denoiser.mean_span_length is None:
        assert list(inputs[1:]) + list(targets) == list(original)
        noise += len(targets)
        spans += 1
      else:
        assert _reconstruct(inputs[1:], targets) == list(original)
        num_spans = sum(map(_is_sentinel, targets))
        noise += len(targets) - num_spans
        spans += num_spans
  rate = noise / (NUM_EXAMPLES * CHUNK)
  print(f'{denoiser.mode}(mu={denoiser.mean_span_length}, '
        f'r={denoiser.noise_density}): corruption rate {rate:.4f}, '
        f'mean span {noise / spans:.2f}')
  assert rate == pytest.approx(denoiser.noise_density, rel=0.1)
  if denoiser.mean_span_length is not None:
    assert noise / spans == pytest.approx(denoiser.mean_span_length, rel=0.1)


def test_ul2_mixture_rates_and_task(chunks):
  """The task draws denoisers by rate and leads inputs with mode tokens."""
  task = seqio.get_mixture_or_task('corpus_ul2_spm8k')
  ds = task.get_dataset({'inputs': 256, 'targets': 256}, 'train',
                        shuffle=True, seed=1)
  counts = collections.Counter()
  modes = vocab_lib.mode_token_ids(task.output_features['targets'].vocabulary)
  for ex in ds.take(1000).as_numpy_iterator():
    denoiser = objectives.UL2_DENOISERS[ex['denoiser']]
    counts[ex['denoiser']] += 1
    assert ex['inputs'][0] == modes[denoiser.mode]
    assert len(ex['inputs']) <= 256 and len(ex['targets']) <= 256
  for i, d in enumerate(objectives.UL2_DENOISERS):
    assert counts[i] / 1000 == pytest.approx(d.rate, abs=0.05), counts


def test_prefix_lm_halves_rebuild_the_chunk():
  """inputs + targets == the chunk the LM task yields at the same place."""
  lengths = {'inputs': 64, 'targets': 64}
  prefix = seqio.get_mixture_or_task('corpus_prefix_lm_spm8k').get_dataset(
      lengths, 'validation', shuffle=False)
  lm = seqio.get_mixture_or_task('corpus_lm_spm8k').get_dataset(
      {'targets': 128}, 'validation', shuffle=False)
  checked = 0
  for ex, chunk in zip(prefix.take(300).as_numpy_iterator(),
                       lm.take(300).as_numpy_iterator()):
    assert list(ex['inputs']) + list(ex['targets']) == list(chunk['targets'])
    if len(chunk['targets']) == 128:
      assert len(ex['inputs']) == len(ex['targets']) == 64
      checked += 1
  assert checked > 250


def test_bad_input_is_handled_and_counted():
  """Empty, huge, invalid-UTF-8 and sentinel-like documents never crash."""
  stats = collections.Counter()
  raw = [b'', b'   \n\n ', b'caf\xc3\xa9 \xff\xfe broken bytes',
         '<extra_id_0> [NLU] <unused3> look like sentinels'.encode(),
         ('All the world is a stage. ' * 2000).encode()]
  docs = [t for t in (sources.clean_text(r, stats) for r in raw) if t]
  assert stats['empty'] == 2 and stats['invalid_utf8'] >= 1
  assert stats['sentinel_like'] >= 3
  vocabulary = vocab_lib.corpus_vocabulary()
  features = {'inputs': seqio.Feature(vocabulary, add_eos=False),
              'targets': seqio.Feature(vocabulary, add_eos=False)}
  ds = tf.data.Dataset.from_tensor_slices({'targets': docs})
  ds = seqio.preprocessors.tokenize(ds, features)
  ds = objectives.split_into_chunks(ds, {'inputs': 128, 'targets': 128},
                                    objective='ul2')
  with seqio.utils.map_seed_manager(0):
    ds = objectives.ul2_objective(ds, {}, features)
  examples = list(ds.as_numpy_iterator())
  reserved = set(vocab_lib.sentinel_ids(vocabulary, 100)) | set(
      vocab_lib.mode_token_ids(vocabulary).values())
  # The long document became many chunks; text never became a reserved id.
  assert len(examples) > 100
  tokenized = seqio.preprocessors.tokenize(
      tf.data.Dataset.from_tensor_slices({'targets': docs}), features)
  for ex in tokenized.as_numpy_iterator():
    assert not reserved & set(ex['targets'].tolist())
  print(f'cleaning: {dict(stats)}; {len(examples)} UL2 examples')


def test_sentinel_budget_is_checked():
  vocabulary = vocab_lib.corpus_vocabulary()
  with pytest.raises(ValueError, match='sentinels'):
    objectives.check_sentinels(objectives.UL2_DENOISERS, 4096, vocabulary)
  objectives.check_sentinels(objectives.UL2_DENOISERS, 512, vocabulary)

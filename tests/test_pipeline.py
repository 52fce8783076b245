"""Input pipeline: exact resumption, hosts' rows of one global stream, and
seqio sharding."""

import collections

import numpy as np
import pytest

import tasks  # pylint: disable=unused-import
from t5x_adapt.data import feature_converters
from t5x_adapt.data import pipeline


def _ul2_batches(**kwargs):
  return pipeline.get_dataset(
      'corpus_ul2_spm8k', {'inputs': 64, 'targets': 64},
      feature_converters.EncDecFeatureConverter(pack=True), batch_size=4,
      seed=3, shard_index=0, num_shards=1, **kwargs)


def _assert_same(batches, expected):
  assert len(batches) == len(expected)
  for got, want in zip(batches, expected):
    assert got.keys() == want.keys()
    for key in got:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_resume_reads_the_same_batches(tmp_path):
  n, m = 3, 4
  reference = pipeline.InputIterator(_ul2_batches())
  expected = [next(reference) for _ in range(n + m)]

  first = pipeline.InputIterator(_ul2_batches())
  head = [next(first) for _ in range(n)]
  first.save(tmp_path / 'input')
  del first  # a new process would start from scratch

  resumed = pipeline.InputIterator(_ul2_batches())
  resumed.restore(tmp_path / 'input')
  tail = [next(resumed) for _ in range(m)]
  _assert_same(head + tail, expected)
  # Batches differ from each other, so equality above is not vacuous.
  assert not np.array_equal(expected[0]['encoder_input_tokens'],
                            expected[1]['encoder_input_tokens'])


@pytest.mark.slow
def test_hosts_read_their_rows_and_share_one_position(tmp_path):
  """Two hosts' rows make each global batch; one position resumes any host."""
  n, m = 2, 3
  reference = pipeline.InputIterator(_ul2_batches())
  expected = [next(reference) for _ in range(n + m)]

  hosts = [pipeline.InputIterator(_ul2_batches(), rows=slice(0, 2)),
           pipeline.InputIterator(_ul2_batches(), rows=slice(2, 4))]
  for want in expected[:n]:
    first, second = (next(host) for host in hosts)
    assert first['encoder_input_tokens'].shape[0] == 2
    _assert_same([{k: np.concatenate([first[k], second[k]]) for k in first}],
                 [want])
  hosts[0].save(tmp_path / 'input')  # What process 0 saves for all.

  # Resumed on one host (whole batches), then on two again.
  whole = pipeline.InputIterator(_ul2_batches())
  whole.restore(tmp_path / 'input')
  _assert_same([next(whole) for _ in range(m)], expected[n:])
  second_host = pipeline.InputIterator(_ul2_batches(), rows=slice(2, 4))
  second_host.restore(tmp_path / 'input')
  _assert_same([next(second_host)],
               [{k: v[2:4] for k, v in expected[n].items()}])


def test_restore_without_saved_state_is_a_clear_error(tmp_path):
  iterator = pipeline.InputIterator(_ul2_batches())
  with pytest.raises(FileNotFoundError, match='no saved input position'):
    iterator.restore(tmp_path)


def _examples(task, split, lengths, converter, **shard):
  ds = pipeline.get_dataset(task, lengths, converter, batch_size=1,
                            split=split, shuffle=False, num_epochs=1, **shard)
  key = ('encoder_input_tokens' if 'inputs' in lengths
         else 'decoder_target_tokens')
  return collections.Counter(
      tuple(b[key][0].tolist()) for b in ds.as_numpy_iterator())


@pytest.mark.parametrize('task,split,lengths,converter', [
    # 2 validation files: seqio shards by file.
    ('corpus_lm_spm8k', 'validation', {'targets': 128},
     feature_converters.DecoderFeatureConverter(pack=False)),
    # 1 file: seqio shards by example.
    ('sentiment_spm8k', 'validation', {'inputs': 64, 'targets': 4},
     feature_converters.EncDecFeatureConverter(pack=False)),
])
def test_two_shards_cover_the_stream_once(task, split, lengths, converter):
  whole = _examples(task, split, lengths, converter, shard_index=0,
                    num_shards=1)
  shards = [_examples(task, split, lengths, converter, shard_index=i,
                      num_shards=2) for i in range(2)]
  print(f'{task}: {sum(whole.values())} examples, shards '
        f'{[sum(s.values()) for s in shards]}')
  assert all(shards)
  assert shards[0] + shards[1] == whole  # every example, with multiplicity

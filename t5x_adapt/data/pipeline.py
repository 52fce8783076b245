"""Input pipelines: seqio datasets, batched, sharded per host, resumable.

`get_dataset` builds a deterministic, shuffled (seeded), host-sharded stream
of model-feature batches. `InputIterator` yields numpy batches and saves or
restores its position with a tf.data iterator checkpoint, so training resumes
on exactly the batch it would have read next.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional

import gin
import jax
import numpy as np
import seqio
import tensorflow as tf


@gin.configurable
def get_dataset(mixture_or_task_name: str,
                task_feature_lengths: Mapping[str, int],
                feature_converter: seqio.FeatureConverter,
                batch_size: int,
                split: str = 'train',
                shuffle: bool = True,
                seed: Optional[int] = 0,
                num_epochs: Optional[int] = None,
                shard_index: Optional[int] = None,
                num_shards: Optional[int] = None) -> tf.data.Dataset:
  """Batches of model features from a seqio task or mixture.

  Args:
    mixture_or_task_name: Registered seqio task or mixture.
    task_feature_lengths: e.g. {'inputs': 512, 'targets': 512}.
    feature_converter: Packs and shapes task features into model features.
    batch_size: Examples per batch on this host.
    split: Dataset split.
    shuffle: Shuffle (deterministically from `seed`).
    seed: Seed of shuffling and of random preprocessing (UL2 noise).
    num_epochs: None repeats forever.
    shard_index: This host's shard; defaults to `jax.process_index()`.
    num_shards: Number of shards; defaults to `jax.process_count()`.

  Returns:
    A tf.data.Dataset of dicts of [batch_size, length] int32 arrays.
  """
  shard_info = seqio.ShardInfo(
      index=jax.process_index() if shard_index is None else shard_index,
      num_shards=jax.process_count() if num_shards is None else num_shards)
  dataset = seqio.get_dataset(
      mixture_or_task_name, task_feature_lengths=task_feature_lengths,
      dataset_split=split, shuffle=shuffle, num_epochs=num_epochs,
      feature_converter=feature_converter, shard_info=shard_info, seed=seed,
      use_cached=False)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


class InputIterator:
  """numpy batches from a tf.data.Dataset, with a saveable position."""

  def __init__(self, dataset: tf.data.Dataset):
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return jax.tree_util.tree_map(lambda x: x.numpy(), next(self._iterator))

  @staticmethod
  def _prefix(directory) -> str:
    return os.path.join(os.fspath(directory),
                        f'input_state-{jax.process_index():05d}')

  def save(self, directory) -> str:
    """Writes the position into `directory` (one file set per host)."""
    os.makedirs(directory, exist_ok=True)
    return self._checkpoint.write(self._prefix(directory))

  def restore(self, directory) -> None:
    """Continues from the position saved in `directory`."""
    prefix = self._prefix(directory)
    if not tf.io.gfile.exists(prefix + '.index'):
      raise FileNotFoundError(f'{directory}: no saved input position '
                              f'({prefix}.index)')
    self._checkpoint.read(prefix).assert_consumed()

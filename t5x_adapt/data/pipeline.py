"""Input pipelines: seqio datasets, batched, resumable, host-independent.

`get_dataset` builds a deterministic, shuffled (seeded) stream of
model-feature batches. `InputIterator` yields numpy batches and saves or
restores its position with a tf.data iterator checkpoint, so training resumes
on exactly the batch it would have read next.

Multi-host: every host builds the same stream of GLOBAL batches (the whole
stream, seqio shard 0 of 1, batched at the global batch size, the same seed)
and keeps only its rows of each (`InputIterator(dataset, rows=...)`, the
rows from `distributed.process_rows`), so the global batches do not depend
on the number of hosts. The rows are cut in numpy, outside the tf.data
graph, so the tf.data iterator and its saved position are the same on every
host: one saved position serves any number of hosts, and a run resumed on
another host count reads the same batches in the same order.

The cost: every host reads and preprocesses every example of every global
batch, so N hosts do N times the input work that per-host shards would, and
each host's pipeline must keep up with the whole job's tokens per second,
not its 1 / N (`benchmarks/data_throughput.py` measures a pipeline's rate).

  dataset = get_dataset(task, lengths, converter, global_batch_size)
  rows = distributed.process_rows(partitioner.batch_sharding,
                                  global_batch_size)
  iterator = InputIterator(dataset, rows)  # this host's rows of each batch
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
                shard_index: int = 0,
                num_shards: int = 1) -> tf.data.Dataset:
  """Batches of model features from a seqio task or mixture.

  Args:
    mixture_or_task_name: Registered seqio task or mixture.
    task_feature_lengths: e.g. {'inputs': 512, 'targets': 512}.
    feature_converter: Packs and shapes task features into model features.
    batch_size: Examples per batch (for training: the global batch, which
      every host reads whole; see the module docstring).
    split: Dataset split.
    shuffle: Shuffle (deterministically from `seed`).
    seed: Seed of shuffling and of random preprocessing (UL2 noise).
    num_epochs: None repeats forever.
    shard_index: Which seqio shard of the stream to read (default 0 of 1,
      the whole stream, which is what every training host reads).
    num_shards: Number of seqio shards of the stream.

  Returns:
    A tf.data.Dataset of dicts of [batch_size, length] int32 arrays.
  """
  shard_info = seqio.ShardInfo(index=shard_index, num_shards=num_shards)
  dataset = seqio.get_dataset(
      mixture_or_task_name, task_feature_lengths=task_feature_lengths,
      dataset_split=split, shuffle=shuffle, num_epochs=num_epochs,
      feature_converter=feature_converter, shard_info=shard_info, seed=seed,
      use_cached=False)
  dataset = dataset.batch(batch_size, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  return dataset.with_options(options).prefetch(tf.data.AUTOTUNE)


INPUT_STATE = 'input_state'  # The saved position's file prefix.


class InputIterator:
  """numpy batches from a tf.data.Dataset, with a saveable position.

  Args:
    dataset: Batches of features (dicts of [batch, ...] tensors).
    rows: This host's rows of each batch (`distributed.process_rows`);
      None keeps whole batches. The tf.data iterator (and the position it
      saves) is the same whatever the rows.
  """

  def __init__(self, dataset: tf.data.Dataset, rows: Optional[slice] = None):
    self._iterator = iter(dataset)
    self._checkpoint = tf.train.Checkpoint(iterator=self._iterator)
    self._rows = rows

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = jax.tree_util.tree_map(lambda x: x.numpy(), next(self._iterator))
    if self._rows is None:
      return batch
    # numpy, not tf.data: the iterator stays the same on every host.
    return jax.tree_util.tree_map(lambda x: x[self._rows], batch)

  @staticmethod
  def _prefix(directory) -> str:
    return os.path.join(os.fspath(directory), INPUT_STATE)

  def save(self, directory) -> str:
    """Writes the position into `directory` (the same on every host)."""
    os.makedirs(directory, exist_ok=True)
    return self._checkpoint.write(self._prefix(directory))

  def restore(self, directory) -> None:
    """Continues from the position saved in `directory`."""
    prefix = self._prefix(directory)
    if not tf.io.gfile.exists(prefix + '.index'):
      prefix = self._single_host_prefix(directory)
    if prefix is None:
      raise FileNotFoundError(f'{directory}: no saved input position '
                              f'({self._prefix(directory)}.index)')
    self._checkpoint.read(prefix).assert_consumed()

  @staticmethod
  def _single_host_prefix(directory) -> Optional[str]:
    """The position a lone host saved before positions were shared
    (`input_state-00000`): the same stream, so it resumes as well. Older
    multi-host positions (one per host's shard) do not."""
    def prefix(host):
      return os.path.join(os.fspath(directory), f'{INPUT_STATE}-{host:05d}')
    if tf.io.gfile.exists(prefix(0) + '.index') and not tf.io.gfile.exists(
        prefix(1) + '.index'):
      return prefix(0)
    return None

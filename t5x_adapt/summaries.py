"""TensorBoard scalars without the `tensorboard` package (training, eval)."""

from __future__ import annotations

import pathlib
from typing import Mapping


class ScalarSummaries:
  """TensorBoard scalars in one log directory.

  Writes the events `tf.summary.scalar` writes (a float tensor with the
  `scalars` plugin's metadata) through TensorFlow's own summary writer, so
  it needs no `tensorboard` package (only to view them).
  """

  def __init__(self, logdir: pathlib.Path):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    self._tf = tf
    self._writer = tf.summary.create_file_writer(str(logdir))
    self._metadata = tf.compat.v1.SummaryMetadata()
    self._metadata.plugin_data.plugin_name = 'scalars'

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    tf = self._tf
    with self._writer.as_default():
      for name, value in values.items():
        tf.summary.write(name, tf.constant(float(value), tf.float32),
                         step=step, metadata=self._metadata)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()

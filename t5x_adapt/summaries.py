"""Metrics on disk: JSON lines and TensorBoard scalars (training, eval).

`MetricsLog` is what train.py's metrics.jsonl and eval.py's results.jsonl
are written with: a JSON line per record in one file, and TensorBoard
scalars in log directories beside it, by the main process only.
`read_metrics` reads such a file back, `curve` one scalar of it by step.

The lines are strict JSON (RFC 8259), readable by any parser: a NaN or
infinite value (a diverging loss, say) is written as `null`. TensorBoard
gets the value itself.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Mapping, Sequence

from t5x_adapt import distributed


def strict_json(value: Any) -> Any:
  """`value` with every non-finite float (NaN, +-inf) replaced by None."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, Mapping):
    return {k: strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json(v) for v in value]
  return value


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


class MetricsLog:
  """JSON lines in `directory/jsonl_name`, TensorBoard scalars beside them.

  Only the main process writes (elsewhere every call does nothing); files
  and log directories are created on first use.

  Args:
    directory: Where the JSON-lines file and the log directories go.
    jsonl_name: The JSON-lines file, appended to.
  """

  def __init__(self, directory: pathlib.Path, jsonl_name: str):
    self._directory = pathlib.Path(directory)
    self._jsonl_name = jsonl_name
    self._enabled = distributed.is_main_process()
    self._jsonl = None
    self._summaries: dict[str, ScalarSummaries] = {}

  def write(self, record: Mapping[str, Any], logdir: str, step: int,
            scalars: Mapping[str, float]) -> None:
    """`record` as one JSON line; `scalars` at `step` in `directory/logdir`."""
    if not self._enabled:
      return
    if self._jsonl is None:
      self._directory.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(self._directory / self._jsonl_name, 'a',
                         encoding='utf-8')
    self._jsonl.write(json.dumps(strict_json(record), allow_nan=False)
                      + '\n')
    self._jsonl.flush()
    if logdir not in self._summaries:
      self._summaries[logdir] = ScalarSummaries(self._directory / logdir)
    self._summaries[logdir].scalars(step, scalars)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    for summaries in self._summaries.values():
      summaries.close()


def read_metrics(path: str | os.PathLike,
                 *keys: str) -> list[dict[str, Any]]:
  """The records of a JSON-lines file `MetricsLog` wrote, in order.

  Args:
    path: The file (a run's metrics.jsonl, an evaluation's results.jsonl).
    *keys: Only the records that have every one of these keys (e.g.
      'eval_loss': training's validation lines).

  Returns:
    One dict per line; a non-finite value reads as None.
  """
  lines = pathlib.Path(path).read_text(encoding='utf-8').splitlines()
  records = [json.loads(line) for line in lines if line.strip()]
  return [r for r in records if all(key in r for key in keys)]


def curve(records: Sequence[Mapping[str, Any]],
          key: str) -> list[tuple[int, Any]]:
  """(step, value) of `key` in step order, from the records that have it.

  A run resumed from an earlier checkpoint writes its steps again: a step's
  last value counts.
  """
  points = {r['step']: r[key] for r in records if key in r}
  return sorted(points.items())

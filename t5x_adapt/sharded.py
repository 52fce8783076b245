"""A model's calls outside training, sharded over the mesh, on global batches.

  sharded = ShardedModel.on_gin_mesh(model, batch_size)
  params = sharded.restore(checkpoint)            # any kind (`convert.load`)
  for indices, batch in indexed_batches(dataset, batch_size, partitioner):
    tokens, scores = sharded.predict(params, batch, length, options, rng)

Batches are global: every process reads the whole (small) dataset, feeds
its rows of each batch (`distributed.process_rows`) to functions jitted
with the Partitioner's input and output shardings (`Partitioner.jit`, as
the train step is), and gets the whole batch's outputs back replicated, so
every process sees the same results. A short last batch is filled with
copies of its first row that weigh nothing (`PADDING_INDEX`). Evaluation
(`t5x_adapt.eval`), inference (`t5x_adapt.infer`), serving and training's
validation use these. With weight quantization switched on in gin
(`quantization.WeightQuantization.qtype = 'int8'`, `gin/quantize/int8.gin`),
`on_gin_mesh` holds the projections' kernels quantized: `restore` reads a
float checkpoint and quantizes it on the mesh.
"""

from __future__ import annotations

import functools
import os
from typing import Iterator, Optional

import jax
import numpy as np
import tensorflow as tf

from t5x_adapt import decoding
from t5x_adapt import distributed
from t5x_adapt import partitioning
from t5x_adapt import quantization as quantization_lib
from t5x_adapt.convert import load

PADDING_INDEX = -1  # Index of the rows that fill a short last batch.

HostBatch = dict[str, np.ndarray]  # this process's rows: {feature: [rows, L]}


# -------------------------------------------------------------- batches --


def check_batch_size(batch_size: int,
                     partitioner: partitioning.Partitioner) -> None:
  """Raises unless global batches split over the mesh's batch axes."""
  if batch_size % partitioner.data_parallel_size:
    raise ValueError(
        f'batch size {batch_size} does not split over the '
        f'{partitioner.data_parallel_size} data-parallel devices of mesh '
        f'{dict(partitioner.mesh.shape)}')


def _fill(indices: np.ndarray, features: HostBatch,
          batch_size: int) -> tuple[np.ndarray, HostBatch]:
  """A short last batch, filled with copies of its first row.

  Copies rather than zeros: an all-padding row has no token to attend to.
  The copies get index PADDING_INDEX and no loss weight (classification
  batches: label -1, which their loss ignores).
  """
  missing = batch_size - len(indices)
  if not missing:
    return indices, features
  features = {k: np.concatenate([v, np.repeat(v[:1], missing, axis=0)])
              for k, v in features.items()}
  indices = np.concatenate([indices, np.full(missing, PADDING_INDEX)])
  filler = indices == PADDING_INDEX
  if 'decoder_loss_weights' in features:
    features['decoder_loss_weights'][filler] = 0
  if 'label' in features:
    features['label'][filler] = -1
  return indices, features


def indexed_batches(dataset: tf.data.Dataset, batch_size: int,
                    partitioner: partitioning.Partitioner
                    ) -> Iterator[tuple[np.ndarray, HostBatch]]:
  """Global batches of an enumerated dataset; this process's rows of each.

  Args:
    dataset: Unbatched (index, model features) pairs, as seqio.Evaluator
      caches them (`Dataset.enumerate()` of a feature converter's output).
    batch_size: Examples per global batch; the last batch is filled up.
    partitioner: Its batch sharding says which rows are this process's.

  Yields:
    (indices [batch_size]: every row's example index, PADDING_INDEX for
    fill rows; this process's rows of the features {name: [rows, length]}).
  """
  check_batch_size(batch_size, partitioner)
  rows = distributed.process_rows(partitioner.batch_sharding, batch_size)
  for indices, features in dataset.batch(batch_size).as_numpy_iterator():
    indices, features = _fill(indices, features, batch_size)
    yield indices, {k: v[rows] for k, v in features.items()}


def host_batches(dataset: tf.data.Dataset, batch_size: int,
                 partitioner: partitioning.Partitioner) -> Iterator[HostBatch]:
  """`indexed_batches` without the indices (fill rows weigh nothing)."""
  for _, batch in indexed_batches(dataset, batch_size, partitioner):
    yield batch


# ---------------------------------------------------------- model calls --


class ShardedModel:
  """A model's loss sums, scores and decodes, jitted over the mesh.

  Every function takes this process's rows of a global batch, shards them
  (`Partitioner.shard_batch`) and returns the whole batch's results as
  numpy arrays (replicated outputs, so every process gets them all).

  Args:
    model: A `t5x_adapt.models` model.
    partitioner: Mesh and logical-axis rules.
    param_shardings: Tree of shardings of the parameters passed in.
  """

  def __init__(self, model, partitioner: partitioning.Partitioner,
               param_shardings,
               quantization: Optional[
                   quantization_lib.WeightQuantization] = None):
    self.model = model
    self.partitioner = partitioner
    self.param_shardings = param_shardings
    self.quantization = (quantization if quantization is not None
                         and quantization.enabled else None)
    self._jit = functools.partial(
        partitioner.jit,
        in_shardings=(param_shardings, partitioner.batch_sharding,
                      partitioner.replicated),
        out_shardings=partitioner.replicated)
    self._loss_sums = self._jit(self._loss_sums_fn)
    self._scores = self._jit(lambda params, batch, _: model.score_batch(
        params, batch))
    self._token_scores = {}
    self._predicts = {}

  @classmethod
  def on_gin_mesh(cls, model, batch_size: int) -> ShardedModel:
    """On the gin-configured Partitioner's mesh, parameters sharded by their
    logical axes, quantized as gin says (`WeightQuantization`); checks
    that `batch_size` splits over the mesh."""
    partitioner = partitioning.Partitioner()
    check_batch_size(batch_size, partitioner)
    quantization = quantization_lib.WeightQuantization()
    axes = (quantization_lib.quantized_axes(model, quantization)
            if quantization.enabled else model.logical_axes())
    return cls(model, partitioner, partitioner.shardings(axes), quantization)

  def restore(self, checkpoint: str | os.PathLike):
    """A checkpoint's parameters (any kind), onto `param_shardings`
    (quantized there, when this model holds them so)."""
    if self.quantization is None:
      return load.load_params(checkpoint, self.model,
                              shardings=self.param_shardings)
    params = load.load_params(
        checkpoint, self.model,
        shardings=self.partitioner.shardings(self.model.logical_axes()))
    return self.quantize(params)

  def quantize(self, params):
    """Float parameters -> this model's quantized ones, on the mesh."""
    quantize = functools.partial(quantization_lib.quantize, self.model,
                                 config=self.quantization)
    return jax.jit(quantize, out_shardings=self.param_shardings,
                   donate_argnums=0)(params)

  def _loss_sums_fn(self, params, batch, _):
    _, metrics = self.model.loss_fn(params, batch, None)
    tokens = metrics['num_tokens']
    return {'loss': metrics['cross_entropy'] * tokens,
            'accuracy': metrics['accuracy'] * tokens, 'tokens': tokens}

  def _run(self, fn, params, host_batch: HostBatch, rng=None):
    # The same key on every process, made a global (replicated) array.
    rng = jax.make_array_from_process_local_data(
        self.partitioner.replicated,
        np.asarray(jax.random.PRNGKey(0) if rng is None else rng))
    return jax.device_get(
        fn(params, self.partitioner.shard_batch(host_batch), rng))

  def loss_sums(self, params, host_batch: HostBatch) -> dict[str, float]:
    """Summed cross-entropy and correct tokens, and the target tokens."""
    return self._run(self._loss_sums, params, host_batch)

  def scores(self, params, host_batch: HostBatch) -> np.ndarray:
    """Target log-likelihood of every row: [batch]."""
    return self._run(self._scores, params, host_batch)

  def token_scores(self, params, host_batch: HostBatch,
                   last: Optional[int] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per target token of every row (of its `last` ones, when given):
    (log-likelihood [batch, length], whether it is the argmax [batch,
    length]); `BaseModel.score_tokens`."""
    if last not in self._token_scores:
      self._token_scores[last] = self._jit(
          lambda params, batch, _: self.model.score_tokens(params, batch,
                                                           last))
    return self._run(self._token_scores[last], params, host_batch)

  def predict(self, params, host_batch: HostBatch, max_decode_length: int,
              options: decoding.DecodeOptions,
              rng: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Decodes every row: (tokens [batch, max_decode_length], scores
    [batch]) of `predict_batch_with_aux`."""
    key = (max_decode_length, options)
    if key not in self._predicts:
      def predict(params, batch, rng):
        tokens, aux = self.model.predict_batch_with_aux(
            params, batch, max_decode_length, options, rng)
        return tokens, aux['scores']
      self._predicts[key] = self._jit(predict)
    return self._run(self._predicts[key], params, host_batch, rng)


def predict_indexed(sharded: ShardedModel, params, dataset: tf.data.Dataset,
                    batch_size: int, max_decode_length: int,
                    options: decoding.DecodeOptions, seed: int = 0
                    ) -> list[tuple[int, list[int], float]]:
  """(index, tokens, score) of every example of an enumerated dataset."""
  rng = jax.random.PRNGKey(seed)
  out = []
  batches = indexed_batches(dataset, batch_size, sharded.partitioner)
  for number, (indices, batch) in enumerate(batches):
    tokens, scores = sharded.predict(params, batch, max_decode_length,
                                     options, jax.random.fold_in(rng, number))
    out.extend((int(i), row.tolist(), float(s))
               for i, row, s in zip(indices, tokens, scores)
               if i != PADDING_INDEX)
  return out

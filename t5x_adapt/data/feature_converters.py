"""seqio feature converters with Gemma's BOS as the decoder start token.

seqio shifts targets right to make decoder inputs and puts `bos_id` first;
Gemma-family models (and transformers' T5Gemma) start decoding from BOS = 2,
so these converters use it. Packing is seqio's. The classification
converters shape `inputs` + integer `label` for `t5x_adapt.classification`.

seqio's length check is off by default (`apply_length_check=False`):
`seqio.get_dataset` has already cut every feature to its length, and the
padding gives each model feature its length, so the check could not fail,
while its extra `map`, traced for every dataset built, costs seconds in a run
that builds many (the paper experiment's).
"""

from typing import Mapping

import jax
import numpy as np
import seqio
import tensorflow as tf

from t5x_adapt.data.vocab import BOS_ID


class EncDecFeatureConverter(seqio.EncDecFeatureConverter):
  """Encoder-decoder features; decoder inputs start with BOS."""

  def __init__(self, pack: bool = True, bos_id: int = BOS_ID,
               apply_length_check: bool = False, **kwargs):
    super().__init__(pack=pack, bos_id=bos_id,
                     apply_length_check=apply_length_check, **kwargs)


class DecoderFeatureConverter(seqio.DecoderFeatureConverter):
  """Decoder-only features (causal LM, or prefix-LM when `inputs` exist)."""

  def __init__(self, pack: bool = True, bos_id: int = BOS_ID,
               apply_length_check: bool = False, **kwargs):
    super().__init__(pack=pack, bos_id=bos_id,
                     apply_length_check=apply_length_check, **kwargs)


class EncoderClassificationFeatureConverter(seqio.FeatureConverter):
  """`inputs` + integer `label` -> `encoder_input_tokens`, `label`.

  For the classifiers of `t5x_adapt.classification`: one example per row,
  never packed (the head reads each row's last token), padded on the right.
  Task feature lengths name only `inputs`; the scalar label has no length.
  """

  TASK_FEATURES = {
      'inputs': seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
      'label': seqio.FeatureConverter.FeatureSpec(dtype=tf.int64, rank=0),
  }
  MODEL_FEATURES = {
      'encoder_input_tokens': seqio.FeatureConverter.FeatureSpec(
          dtype=tf.int32),
      'label': seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0),
  }
  PACKING_FEATURE_DTYPES = {}
  TOKENS_KEY = 'encoder_input_tokens'

  def __init__(self, pack: bool = False, bos_id: int = BOS_ID,
               apply_length_check: bool = False, **kwargs):
    # The trainer asks every converter to pack; a row holds one label, so
    # classification rows are never packed, whatever `pack` says.
    del pack
    super().__init__(pack=False, bos_id=bos_id,
                     apply_length_check=apply_length_check, **kwargs)

  def __call__(self, ds, task_feature_lengths):
    return super().__call__(ds, {**task_feature_lengths, 'label': 1})

  def _tokens(self, inputs):
    return inputs

  def _convert_features(self, ds, task_feature_lengths):
    def convert(example):
      return {self.TOKENS_KEY: self._tokens(example['inputs']),
              'label': tf.cast(example['label'], tf.int32)}
    ds = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
    return seqio.utils.trim_and_pad_dataset(
        ds, {self.TOKENS_KEY: task_feature_lengths['inputs']})

  def get_model_feature_lengths(self, task_feature_lengths):
    return {self.TOKENS_KEY: task_feature_lengths['inputs'], 'label': 1}


class DecoderClassificationFeatureConverter(
    EncoderClassificationFeatureConverter):
  """`inputs` + integer `label` -> `decoder_input_tokens`, `label`.

  Decoder inputs start with BOS, as in decoder-only pretraining; BOS +
  inputs is cut to the `inputs` length.
  """

  MODEL_FEATURES = {
      'decoder_input_tokens': seqio.FeatureConverter.FeatureSpec(
          dtype=tf.int32),
      'label': seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0),
  }
  TOKENS_KEY = 'decoder_input_tokens'

  def _tokens(self, inputs):
    return tf.concat([[self.bos_id], inputs], axis=0)


def batch_shapes(converter: seqio.FeatureConverter,
                 task_feature_lengths: Mapping[str, int],
                 batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """The batches `converter` makes, as ShapeDtypeStructs: `[batch]` for a
  scalar feature (a class label), `[batch, length]` for a sequence.

  What training compiles its step for, and what `t5x_adapt.precompile`
  compiles without reading any data: ranks and dtypes come from the
  converter's `MODEL_FEATURES` (packing features are int32 sequences).
  """
  lengths = converter.get_model_feature_lengths(task_feature_lengths)
  shapes = {}
  for name, length in lengths.items():
    spec = converter.MODEL_FEATURES.get(name)
    rank = 1 if spec is None else spec.rank
    dtype = np.int32 if spec is None else spec.dtype.as_numpy_dtype
    shapes[name] = jax.ShapeDtypeStruct((batch_size, *(length,) * rank),
                                        dtype)
  return shapes

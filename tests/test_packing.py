"""Packed batches: segment ids / positions, and per-segment logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from t5x_adapt import gin_utils
from t5x_adapt.data import feature_converters

LENGTHS = {'inputs': 48, 'targets': 40}
RNG = np.random.default_rng(0)


def _examples(with_inputs: bool):
  """Examples of different lengths (longer than the tiny window of 8)."""
  sizes = [(13, 9), (11, 17), (20, 6)]
  return [dict({'targets': RNG.integers(3, 500, t).astype(np.int32)},
               **({'inputs': RNG.integers(3, 500, i).astype(np.int32)}
                  if with_inputs else {}))
          for i, t in sizes]


def _convert(converter, examples, lengths):
  keys = examples[0].keys()
  ds = tf.data.Dataset.from_generator(
      lambda: iter(examples),
      output_signature={k: tf.TensorSpec([None], tf.int32) for k in keys})
  packed = next(converter(ds, lengths).as_numpy_iterator())
  return {k: v[None] for k, v in packed.items()}


def _random_params(model):
  params = model.get_initial_variables(jax.random.PRNGKey(0), {})['params']
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _segment(batch, prefix, segment):
  """Mask of one packed segment's positions."""
  return batch[f'{prefix}_segment_ids'][0] == segment


def _alone(batch, masks):
  """One segment as an unpacked batch, right-padded to the packed length.

  Padding keeps every call the same shape (one compilation) and exercises
  padding masks at the same time.
  """
  out = {}
  for key, mask in masks.items():
    row = np.zeros_like(batch[key][0])
    row[:mask.sum()] = batch[key][0][mask]
    out[key] = row[None]
  return out


def _relative_error(packed, alone, mask):
  packed = np.asarray(packed)[0][mask]
  alone = np.asarray(alone)[0][:mask.sum()]
  return np.abs(packed - alone).max() / np.abs(alone).max()


def test_encoder_decoder_packing():
  model = gin_utils.load_model('t5gemma_tiny')
  params = _random_params(model)
  examples = _examples(with_inputs=True)
  batch = _convert(feature_converters.EncDecFeatureConverter(pack=True),
                   examples, LENGTHS)
  logits = jax.jit(model.compute_logits)
  packed_logits = logits(params, batch)
  for segment, example in enumerate(examples, start=1):
    enc = _segment(batch, 'encoder', segment)
    dec = _segment(batch, 'decoder', segment)
    np.testing.assert_array_equal(batch['encoder_input_tokens'][0][enc],
                                  example['inputs'])
    np.testing.assert_array_equal(batch['encoder_positions'][0][enc],
                                  np.arange(enc.sum()))
    np.testing.assert_array_equal(batch['decoder_positions'][0][dec],
                                  np.arange(dec.sum()))
    targets = batch['decoder_target_tokens'][0][dec]
    np.testing.assert_array_equal(targets, example['targets'])
    inputs = batch['decoder_input_tokens'][0][dec]
    assert inputs[0] == 2  # BOS starts every packed segment
    alone = _alone(batch, {'encoder_input_tokens': enc,
                           'decoder_input_tokens': dec,
                           'decoder_target_tokens': dec})
    error = _relative_error(packed_logits, logits(params, alone), dec)
    print(f'encoder-decoder segment {segment}: relative error {error:.2e}')
    assert error <= 1e-5


@pytest.mark.parametrize('prefix_lm', [False, True])
def test_decoder_only_packing(prefix_lm):
  model = gin_utils.load_model('gemma3_tiny')
  params = _random_params(model)
  examples = _examples(with_inputs=prefix_lm)
  lengths = {'inputs': 48, 'targets': 40} if prefix_lm else {'targets': 64}
  batch = _convert(feature_converters.DecoderFeatureConverter(pack=True),
                   examples, lengths)
  logits = jax.jit(model.compute_logits)
  packed_logits = logits(params, batch)
  for segment, example in enumerate(examples, start=1):
    keep = _segment(batch, 'decoder', segment)
    expected = np.concatenate([example.get('inputs', []), example['targets']])
    np.testing.assert_array_equal(batch['decoder_target_tokens'][0][keep],
                                  expected)
    np.testing.assert_array_equal(batch['decoder_positions'][0][keep],
                                  np.arange(keep.sum()))
    keys = ['decoder_input_tokens', 'decoder_target_tokens']
    if prefix_lm:
      keys.append('decoder_causal_attention')
    alone = _alone(batch, {k: keep for k in keys})
    if prefix_lm:  # the prefix is the inputs plus the BOS before them
      assert alone['decoder_causal_attention'].sum() == len(example['inputs']) + 1
    error = _relative_error(packed_logits, logits(params, alone), keep)
    print(f'decoder-only prefix_lm={prefix_lm} segment {segment}: '
          f'relative error {error:.2e}')
    assert error <= 1e-5

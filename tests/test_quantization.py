"""int8 / int4 weight-only projections (`t5x_adapt.quantization`).

The quantized model computes exactly what the float model computes with the
dequantized kernels (so the matmul reads the quantized values and scales as
stored), stays close to the float model, decodes and scores through
`predict_batch` / `score_batch`, through the gin switch of `ShardedModel`
and through the serving engine (served = `predict_batch` on the same
quantized parameters).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from t5x_adapt import checkpoints
from t5x_adapt import gin_utils
from t5x_adapt import quantization
from t5x_adapt import sharded as sharded_lib
from t5x_adapt.config import config_to_dict

INT8 = quantization.WeightQuantization('int8')


def _batch(model, seed=0):
  rng = np.random.RandomState(seed)
  batch = {'decoder_input_tokens': rng.randint(1, 200, (2, 12))}
  batch['decoder_target_tokens'] = batch['decoder_input_tokens']
  if model.is_encoder_decoder:
    batch['encoder_input_tokens'] = rng.randint(1, 200, (2, 16))
  return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


def _dequantized(model, params):
  """The float tree whose kernels are the quantized ones' values."""
  shapes = model.param_shapes()

  def restore(tree, like):
    return {k: (qwix.dequantize(v.array).reshape(like[k].shape)
                if quantization.is_quantized(v) else
                restore(v, like[k]) if isinstance(v, dict) else v)
            for k, v in tree.items()}
  return restore(params, shapes)


@pytest.fixture(scope='module', params=[
    't5gemma_tiny', 'gemma2_tiny',
    pytest.param('t5gemma2_tiny', marks=pytest.mark.slow),
    pytest.param('llama_tiny', marks=pytest.mark.slow)])
def quantized(request):
  model = gin_utils.load_model(request.param)
  params = jax.jit(model.get_initial_variables)(jax.random.PRNGKey(0))['params']
  return model, params, jax.jit(
      lambda p: quantization.quantize(model, p, INT8))(params)


def test_every_projection_is_found_with_what_it_contracts():
  model = gin_utils.load_model('t5gemma_tiny')
  contractions = quantization.projection_contractions(model)
  kernels = [path for path, _ in
             jax.tree_util.tree_flatten_with_path(model.param_shapes())[0]
             if path[-1].key == 'kernel']
  assert len(contractions) == len(kernels)
  assert contractions['decoder/layers/block_0/cross_attention/out'] == 2
  assert contractions['encoder/layers/block_0/self_attention/query'] == 1
  assert contractions['decoder/layers/block_0/mlp/down'] == 1


def test_kernels_are_int8_with_a_scale_per_output_channel(quantized):
  model, params, qparams = quantized
  leaves = jax.tree_util.tree_leaves(qparams, is_leaf=quantization.is_quantized)
  kernels = [x for x in leaves if quantization.is_quantized(x)]
  assert len(kernels) == len(quantization.projection_contractions(model))
  for kernel in kernels:
    assert kernel.array.qvalue.dtype == jnp.int8
    assert kernel.array.scale.dtype == jnp.float32
    # One scale per (layer and) output channel, 1 on the inputs.
    assert kernel.array.scale.shape[-2] == 1
    assert kernel.array.scale.shape[-1] == kernel.shape[-1]
  # The embedding table stays float32.
  embedders = [x for p, x in jax.tree_util.tree_flatten_with_path(
      qparams, is_leaf=quantization.is_quantized)[0]
               if p[-1].key == 'embedding']
  assert embedders and all(x.dtype == jnp.float32 for x in embedders)
  float_kernels = sum(
      x.nbytes for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
      if p[-1].key == 'kernel')
  assert sum(k.array.qvalue.nbytes for k in kernels) * 4 == float_kernels


def test_quantized_logits_are_those_of_the_dequantized_kernels(quantized):
  model, params, qparams = quantized
  batch = _batch(model)
  logits = jax.jit(model.compute_logits)
  ours = np.asarray(logits(qparams, batch))
  np.testing.assert_allclose(ours, np.asarray(logits(_dequantized(model, qparams),
                                                     batch)),
                             rtol=1e-5, atol=1e-5)
  full = np.asarray(logits(params, batch))
  error = np.linalg.norm(ours - full) / np.linalg.norm(full)
  print(f'\nint8 vs float32 relative logit error (norms) {error:.2e}')
  # Random tiny models amplify rounding (their real-model figure:
  # benchmarks/int8_quality.py); a wrong scale or layout is O(1).
  assert 0 < error < 0.1


def test_predict_and_score_take_quantized_parameters(quantized):
  model, _, qparams = quantized
  batch = _batch(model)
  features = {model.INPUTS_FEATURE: batch[model.INPUTS_FEATURE]}
  predict = jax.jit(lambda p: model.predict_batch(p, features,
                                                  max_decode_length=8))
  np.testing.assert_array_equal(np.asarray(predict(qparams)),
                                np.asarray(predict(_dequantized(model, qparams))))
  score = jax.jit(model.score_batch)
  np.testing.assert_allclose(np.asarray(score(qparams, batch)),
                             np.asarray(score(_dequantized(model, qparams), batch)),
                             rtol=1e-5, atol=1e-4)


def test_int4_halves_int8_and_blocks_beat_channels(quantized):
  model, params, qparams = quantized
  int4 = quantization.quantize(model, params,
                               quantization.WeightQuantization('int4'))
  blocks = quantization.quantize(
      model, params, quantization.WeightQuantization('int4', tile_size=16))
  kernels = [x for x in jax.tree_util.tree_leaves(
      int4, is_leaf=quantization.is_quantized)
             if quantization.is_quantized(x)]
  assert all(k.array.qvalue.dtype == jnp.int4 for k in kernels)
  def kernel_bytes(tree):
    return sum(quantization.num_bytes({'kernel': x}) for x in
               jax.tree_util.tree_leaves(tree, is_leaf=quantization.is_quantized)
               if quantization.is_quantized(x))
  # Half the values' bytes; the scales are the same.
  assert kernel_bytes(int4) < 0.6 * kernel_bytes(qparams)
  # Blocks of inputs get their own scales, never larger than a channel's:
  # the kernels come back closer.
  def kernel_error(tree):
    restored = _dequantized(model, tree)
    pairs = [(restored_leaf, leaf) for (path, leaf), restored_leaf in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree_util.tree_leaves(restored)) if path[-1].key == 'kernel']
    return (np.sqrt(sum(np.sum((np.asarray(a) - np.asarray(b)) ** 2)
                        for a, b in pairs)) /
            np.sqrt(sum(np.sum(np.asarray(b) ** 2) for _, b in pairs)))
  errors = [kernel_error(int4), kernel_error(blocks)]
  int8_error = kernel_error(qparams)
  print(f'\nrelative kernel error: int4 per channel {errors[0]:.3e}, '
        f'int4 blocks of 16 inputs {errors[1]:.3e}, int8 {int8_error:.3e}')
  assert 0 < errors[1] < errors[0]
  # 16 times finer steps than int4's.
  assert 0 < int8_error < errors[0] / 8


def test_the_gin_switch_quantizes_what_sharded_model_restores(tmp_path):
  model = gin_utils.load_model('t5gemma_tiny')
  params = jax.jit(model.get_initial_variables)(jax.random.PRNGKey(0))['params']
  checkpoints.save_params(tmp_path / 'ckpt', params,
                          metadata={'config': config_to_dict(model.config)})
  import gin  # pylint: disable=g-import-not-at-top
  with gin.unlock_config():
    gin.bind_parameter('WeightQuantization.qtype', 'int8')
  try:
    sharded = sharded_lib.ShardedModel.on_gin_mesh(model, 2)
  finally:
    with gin.unlock_config():
      gin.clear_config()
  restored = sharded.restore(tmp_path / 'ckpt')
  expected = quantization.quantize(model, params, INT8)
  leaves = jax.tree_util.tree_leaves(restored,
                                     is_leaf=quantization.is_quantized)
  assert any(quantization.is_quantized(x) for x in leaves)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
      restored, expected)


def test_served_int8_equals_predict_batch_on_int8():
  from test_serving_engine import Setup, MAX_PROMPT  # pylint: disable=g-import-not-at-top
  from t5x_adapt.serving.engine import SamplingParams  # pylint: disable=g-import-not-at-top
  setup = Setup('t5gemma_tiny')
  setup.params = quantization.quantize(setup.model, setup.params, INT8)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(3, setup.vocab_size,
                         rng.randint(1, MAX_PROMPT + 1)).tolist()
             for _ in range(8)]
  outputs = setup.engine().generate(
      prompts, SamplingParams(max_tokens=8, ignore_eos=True))
  for prompt, output in zip(prompts, outputs):
    assert output.token_ids == setup.reference(prompt)[:8]


def test_bad_qtype_is_refused():
  with pytest.raises(ValueError, match="qtype must be one of"):
    quantization.WeightQuantization('int3')

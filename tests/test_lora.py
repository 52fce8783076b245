"""LoRA adapters (`t5x_adapt.lora`, through qwix) on both model kinds.

Fresh adapters leave the logits bitwise unchanged; adapters with a nonzero
B, merged into the kernels, give the logits of the adapted model; the
default targets reach self, cross and merged attention and the MLP of both
stacks but never the embedding table; what cannot work is refused by name.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_adapt import gin_utils
from t5x_adapt import lora
from t5x_adapt import quantization

PRESETS = ['t5gemma_tiny', 'gemma2_tiny',
           pytest.param('t5gemma2_tiny', marks=pytest.mark.slow)]


def _batch(model, seed=0):
  rng = np.random.RandomState(seed)
  batch = {'decoder_input_tokens': rng.randint(1, 200, (2, 12))}
  if model.is_encoder_decoder:
    batch['encoder_input_tokens'] = rng.randint(1, 200, (2, 16))
  return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


def _logits(model, params, batch):
  return np.asarray(jax.jit(model.compute_logits)(params, batch))


@pytest.fixture(scope='module', params=PRESETS)
def adapted(request):
  """(base model, its params, LoRA model, joined params) of a preset."""
  model = gin_utils.load_model(request.param)
  base = jax.jit(model.get_initial_variables)(jax.random.PRNGKey(0))['params']
  config = lora.LoraConfig(rank=4, alpha=8.0)
  lora_model = lora.LoraModel(model, config)
  params = lora.init_adapters(lora_model, base, jax.random.PRNGKey(1))
  return model, base, lora_model.adapted, params


def test_fresh_adapters_give_the_base_logits_exactly(adapted):
  model, base, lora_model, params = adapted
  batch = _batch(model)
  ours, theirs = _logits(lora_model, params, batch), _logits(model, base, batch)
  if getattr(model.config, 'encoder_attention', None) == 'merged':
    # T5Gemma 2: the encoder's output is bitwise that of the base (checked
    # below), but XLA compiles the merged-attention program with the zero
    # adapter terms in it differently: float32 round-off in the logits.
    np.testing.assert_array_equal(
        np.asarray(jax.jit(lora_model.encode)(params, batch)),
        np.asarray(jax.jit(model.encode)(base, batch)))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-5)
  else:
    np.testing.assert_array_equal(ours, theirs)
  kept, _ = lora.split_adapters(params)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: bool((a == b).all()), kept, base))


def test_merged_adapters_give_the_adapted_logits(adapted):
  model, base, lora_model, params = adapted
  kept, adapters = lora.split_adapters(params)
  rng = np.random.RandomState(2)
  adapters = jax.tree_util.tree_map(
      lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype),
      adapters)
  trained = lora.join(kept, adapters)
  batch = _batch(model, seed=3)
  with_adapters = _logits(lora_model, trained, batch)
  merged = _logits(model, lora.merge_adapters(trained,
                                              lora_model.lora_config), batch)
  assert np.abs(with_adapters - _logits(model, base, batch)).max() > 1e-3
  np.testing.assert_allclose(merged, with_adapters, rtol=1e-4, atol=1e-4)


def test_default_targets_cover_attention_and_mlp_not_the_table(adapted):
  model, _, lora_model, params = adapted
  modules = lora.adapted_modules(params)
  assert modules == lora.targeted_modules(model, lora_model.lora_config)
  assert not any('embed' in m for m in modules)
  names = {m.split('/')[-2] + '/' + m.split('/')[-1] for m in modules}
  assert {'mlp/gate', 'mlp/up', 'mlp/down', 'self_attention/query',
          'self_attention/key', 'self_attention/value',
          'self_attention/out'} <= names
  if model.is_encoder_decoder:
    assert any(m.startswith('encoder/') for m in modules)
  _, adapters = lora.split_adapters(params)
  rank = lora_model.lora_config.rank
  for a in jax.tree_util.tree_leaves(adapters):
    assert rank in a.shape[-2:]


def test_cross_attention_is_a_target_of_t5gemma():
  model = gin_utils.load_model('t5gemma_tiny')
  modules = lora.targeted_modules(model, lora.LoraConfig())
  assert 'decoder/layers/block_0/cross_attention/key' in modules


def test_adapter_bytes_are_a_small_share():
  model = gin_utils.load_model('gemma2_tiny')
  shapes = model.param_shapes()
  lora_model = lora.with_lora(model, lora.LoraConfig(rank=2))
  _, adapters = lora.split_adapters(lora_model.param_shapes())
  assert 0 < quantization.num_bytes(adapters) < 0.2 * quantization.num_bytes(
      shapes)


def test_targets_that_select_nothing_are_refused():
  model = gin_utils.load_model('gemma2_tiny')
  lora_model = lora.LoraModel(model, lora.LoraConfig(targets='.*/nothing'))
  with pytest.raises(ValueError, match='selects no projection'):
    lora.init_adapters(lora_model, {}, jax.random.PRNGKey(0))


def _grads_reach_every_adapter(lora_model, base, trained, batch):
  """Every adapter leaf gets a nonzero gradient (A and B both nonzero)."""
  trained = jax.tree_util.tree_map(lambda x: x + 0.01, trained)
  grads = jax.jit(jax.grad(lambda t: lora_model.loss_fn(
      t, batch, None, base_params=base)[0]))(trained)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  return [jax.tree_util.keystr(p) for p, g in flat
          if not np.abs(np.asarray(g)).max() > 0]


def _targets_batch(model):
  batch = _batch(model)
  return {**batch, 'decoder_target_tokens': batch['decoder_input_tokens']}


def test_bfloat16_projections_take_adapters():
  """The bfloat16 matmul runs as a plain dot_general under LoRA: fresh
  adapters still give the base's logits bitwise, and gradients reach
  every adapter."""
  model = gin_utils.load_model('t5gemma_tiny', dtype='bfloat16')
  base = jax.jit(model.get_initial_variables)(jax.random.PRNGKey(0))['params']
  lora_model = lora.LoraModel(model, lora.LoraConfig(rank=4))
  frozen, trained = lora_model.start(base, jax.random.PRNGKey(1))
  batch = _batch(model)
  np.testing.assert_array_equal(
      _logits(lora_model.adapted, lora.join(frozen, trained), batch),
      _logits(model, base, batch))
  assert not _grads_reach_every_adapter(lora_model, frozen, trained,
                                        _targets_batch(model))


@pytest.mark.parametrize('qtype,tile_size', [('int8', None), ('int4', 16)])
def test_qlora_adapters_reach_every_target(qtype, tile_size):
  """On a quantized base (per channel, or per block of inputs) qwix finds
  every kernel: fresh adapters give the quantized base's logits, and
  gradients reach every adapter."""
  model = gin_utils.load_model('t5gemma_tiny')
  base = jax.jit(model.get_initial_variables)(jax.random.PRNGKey(0))['params']
  config = lora.LoraConfig(rank=4, base_qtype=qtype, base_tile_size=tile_size)
  lora_model = lora.LoraModel(model, config)
  frozen, trained = lora_model.start(base, jax.random.PRNGKey(1))
  frozen = lora_model.freeze(frozen)
  quantized = quantization.quantize(model, base, config.base_quantization)
  batch = _batch(model)
  np.testing.assert_array_equal(
      _logits(lora_model.adapted, lora.join(frozen, trained), batch),
      _logits(model, quantized, batch))
  assert not _grads_reach_every_adapter(lora_model, frozen, trained,
                                        _targets_batch(model))


def test_eager_application_is_refused_where_it_would_miss_kernels():
  """Scanned stacks trace their layers even eagerly (the adapters apply);
  an unrolled stack applied outside jit would leave them out: refused."""
  model = gin_utils.load_model('gemma2_tiny', scan_layers=False)
  base = jax.jit(model.get_initial_variables)(jax.random.PRNGKey(0))['params']
  lora_model = lora.LoraModel(model, lora.LoraConfig(rank=2))
  params = lora.init_adapters(lora_model, base, jax.random.PRNGKey(1))
  assert 'decoder/layer_0/self_attention/query' in lora.adapted_modules(params)
  with pytest.raises(RuntimeError, match='outside jax.jit .*layer_0'):
    lora_model.adapted.compute_logits(params, _batch(model))


def test_bad_rank_is_refused():
  with pytest.raises(ValueError, match='rank'):
    lora.LoraConfig(rank=0)

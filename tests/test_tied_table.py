"""Tied embedding tables are one array: tree, gradient norm, freezing.

`EncoderDecoderConfig.tie_embeddings` (every T5Gemma 2, and T5Gemma with
TIE_EMBEDDINGS) gives the model one table at `params['token_embedder']`,
which the encoder, the decoder and the LM head read. So the gradient the
trainer clips and logs is that of the true parameters (the table's counted
once), and a freeze pattern cannot cover it for one stack alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_adapt import gin_utils
from t5x_adapt import optimizers
from t5x_adapt import partitioning
from t5x_adapt import trainer as trainer_lib

TIED = {'t5gemma2_tiny': [],
        't5gemma_tiny': ['EncoderDecoderConfig.tie_embeddings = True']}


def _model(preset):
  return gin_utils.load_model(preset, TIED[preset])


def _batch(model, seed=0, batch=2, length=12):
  rng = np.random.default_rng(seed)
  vocab = model.config.vocab_size
  tokens = lambda: rng.integers(3, vocab, (batch, length)).astype(np.int32)
  targets = tokens()
  inputs = np.concatenate([np.full((batch, 1), 2, np.int32),
                           targets[:, :-1]], axis=1)
  return {'encoder_input_tokens': tokens(), 'decoder_input_tokens': inputs,
          'decoder_target_tokens': targets,
          'decoder_loss_weights': np.ones_like(targets)}


@pytest.mark.parametrize('preset', sorted(TIED))
def test_one_table_in_the_tree(preset):
  model = _model(preset)
  shapes = model.param_shapes()
  assert 'token_embedder' in shapes
  for stack in ('encoder', 'decoder'):
    assert 'token_embedder' not in shapes[stack]
  table = shapes['token_embedder']['embedding']
  assert table.shape == (model.config.vocab_size,
                         model.config.decoder.embed_dim)
  # The untied model keeps a table per stack.
  untied = gin_utils.load_model('t5gemma_tiny').param_shapes()
  assert 'token_embedder' not in untied
  assert all('token_embedder' in untied[s] for s in ('encoder', 'decoder'))


def test_logged_gradient_norm_is_the_true_gradients():
  """The trainer's `grad_norm` is the global norm of the gradient of the
  loss in the true parameters (the tied table once), and clipping uses it."""
  model = _model('t5gemma2_tiny')
  trainer = trainer_lib.Trainer(
      model, partitioning.Partitioner(),
      optimizers.optimizer(learning_rate=1e-3, clip_norm=1.0))
  state = trainer.init_state()
  batch = _batch(model)
  params = jax.device_get(state.params)
  grads = jax.grad(lambda p: model.loss_fn(p, batch, None)[0])(params)
  _, metrics = trainer.train_step(state, batch)
  np.testing.assert_allclose(float(metrics['grad_norm']),
                             float(optax.tree.norm(grads)), rtol=1e-5)
  assert float(jnp.abs(grads['token_embedder']['embedding']).sum()) > 0


def test_freezing_a_stacks_table_is_refused_with_a_clear_error():
  model = _model('t5gemma2_tiny')
  trainer = trainer_lib.Trainer(
      model, partitioning.Partitioner(),
      optimizers.optimizer(learning_rate=1e-3, frozen=('^encoder/',)))
  with pytest.raises(ValueError, match=r"'\^encoder/' covers "
                     r'encoder/token_embedder/embedding.*\^encoder/\(\?!'):
    trainer.init_state()


def test_a_stack_frozen_without_the_table_leaves_the_table_training():
  model = _model('t5gemma2_tiny')
  trainer = trainer_lib.Trainer(
      model, partitioning.Partitioner(),
      optimizers.optimizer(learning_rate=1e-2,
                           frozen=('^encoder/(?!token_embedder/)',)))
  state = trainer.init_state()
  before = jax.device_get(state.params)
  state, _ = trainer.train_step(state, _batch(model))
  after = jax.device_get(state.params)
  for old, new in zip(jax.tree_util.tree_leaves(before['encoder']),
                      jax.tree_util.tree_leaves(after['encoder'])):
    np.testing.assert_array_equal(old, new)
  assert not np.array_equal(before['token_embedder']['embedding'],
                            after['token_embedder']['embedding'])

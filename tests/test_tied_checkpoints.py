"""Checkpoints of models with tied tables (one `params['token_embedder']`).

A tied model's checkpoint written before its table was one array keeps a
copy per stack (`encoder/token_embedder`, `decoder/token_embedder`), in its
parameters and in each optimizer moment: it still restores (parameters and
training state, either layout), converted to the one table from the
decoder's copy, with a message. The converters' rules target the one table
once; a tied table reads into a stack's own (an encoder classifier), and a
transformers T5Gemma's two tables into a tied model.
"""

import dataclasses
import logging
import pathlib
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hf_fixtures as hf
from t5x_adapt import checkpoints
from t5x_adapt import convert
from t5x_adapt import gin_utils
from t5x_adapt import optimizers
from t5x_adapt import partitioning
from t5x_adapt import trainer as trainer_lib
from t5x_adapt.classification import EncoderClassificationModel
from t5x_adapt.convert import load
from t5x_adapt.convert import registry
from t5x_adapt.convert.__main__ import main as convert_cli

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from train_cli import FakeIterator  # pylint: disable=g-import-not-at-top

TIED = {'t5gemma2_tiny': [],
        't5gemma_tiny': ['EncoderDecoderConfig.tie_embeddings = True']}
CONVERTED = 'converted: the checkpoint has an embedding table per stack'


@pytest.fixture(autouse=True)
def _no_gin_bindings():
  """A preset's gin bindings stay active after `load_model`, and the
  converters build configurable configs: each test starts without them."""
  gin.clear_config()
  yield
  gin.clear_config()


def _model(preset='t5gemma2_tiny', scan_layers=True):
  return gin_utils.load_model(preset, TIED[preset], scan_layers=scan_layers)


def _params(model, seed=0):
  """Random params of the model's shapes (any values do here)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
      model.param_shapes())


def _two_copies(tree, encoder_copy=None):
  """A one-table tree as it was saved before: the table in both stacks (the
  encoder's replaced by `encoder_copy` if given), none at the top."""
  tree = dict(tree)
  table = tree.pop('token_embedder')
  return {**tree,
          'encoder': {**tree['encoder'],
                      'token_embedder': encoder_copy or table},
          'decoder': {**tree['decoder'], 'token_embedder': table}}


def _assert_equal(actual, expected):
  assert (jax.tree_util.tree_structure(actual) ==
          jax.tree_util.tree_structure(expected))
  jax.tree_util.tree_map(
      lambda a, e: np.testing.assert_array_equal(np.asarray(a),
                                                 np.asarray(e)),
      actual, expected)


def _messages(caplog):
  return [r.getMessage() for r in caplog.records if CONVERTED in
          r.getMessage()]


# ------------------------------------------------------------- parameters --


@pytest.mark.parametrize('preset', sorted(TIED))
@pytest.mark.parametrize('saved_scanned', [True, False])
@pytest.mark.parametrize('model_scanned', [True, False])
def test_two_copy_params_checkpoint_restores(preset, saved_scanned,
                                             model_scanned, tmp_path,
                                             caplog):
  saved_model = _model(preset, saved_scanned)
  params = _params(saved_model)
  checkpoints.save_params(tmp_path / 'old', _two_copies(params),
                          metadata=saved_model.config)
  model = _model(preset, model_scanned)
  expected = checkpoints.restore_params(
      checkpoints.save_params(tmp_path / 'new', params), model)
  with caplog.at_level(logging.WARNING):
    restored = load.load_params(tmp_path / 'old', model)
  _assert_equal(restored, expected)
  assert 'token_embedder' not in restored['encoder']
  assert 'token_embedder' not in restored['decoder']
  _assert_equal(restored['token_embedder'], params['token_embedder'])
  (message,) = _messages(caplog)
  assert 'from decoder/token_embedder' in message
  assert 'encoder/token_embedder was bitwise equal to it' in message


def test_differing_copies_take_the_decoders_and_say_so(tmp_path, caplog):
  model = _model()
  params = _params(model)
  encoder_copy = jax.tree_util.tree_map(lambda x: x + 1,
                                        params['token_embedder'])
  checkpoints.save_params(tmp_path / 'old',
                          _two_copies(params, encoder_copy))
  with caplog.at_level(logging.WARNING):
    restored = checkpoints.restore_params(tmp_path / 'old', model)
  _assert_equal(restored['token_embedder'], params['token_embedder'])
  (message,) = _messages(caplog)
  assert 'the copies DIFFER, encoder/token_embedder' in message


def test_two_copy_checkpoint_restores_onto_shardings(tmp_path):
  model = _model()
  params = _params(model)
  checkpoints.save_params(tmp_path / 'old', _two_copies(params))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = jax.tree_util.tree_map(lambda _: sharding, params)
  restored = load.load_params(tmp_path / 'old', model, shardings=shardings)
  _assert_equal(restored, params)
  assert restored['token_embedder']['embedding'].sharding == sharding


def test_two_copy_checkpoint_converts_and_exports(tmp_path, caplog):
  """`model_and_params` (the model from the metadata) and `orbax-to-hf`
  read an old checkpoint as the new one."""
  model = _model()
  params = _params(model)
  checkpoints.save_params(tmp_path / 'old', _two_copies(params),
                          metadata={'config': model.config})
  checkpoints.save_params(tmp_path / 'new', params,
                          metadata={'config': model.config})
  _, old = load.model_and_params(tmp_path / 'old')
  _, new = load.model_and_params(tmp_path / 'new')
  _assert_equal(old, new)
  with caplog.at_level(logging.WARNING):
    assert convert_cli(
        ['orbax-to-hf', str(tmp_path / 'old'), str(tmp_path / 'hf_old')]) == 0
  assert _messages(caplog)
  assert convert_cli(
      ['orbax-to-hf', str(tmp_path / 'new'), str(tmp_path / 'hf_new')]) == 0
  for name in ('model.safetensors', 'config.json'):
    assert ((tmp_path / 'hf_old' / name).read_bytes() ==
            (tmp_path / 'hf_new' / name).read_bytes())


def test_untied_checkpoint_is_not_converted(tmp_path, caplog):
  model = gin_utils.load_model('t5gemma_tiny')
  params = _params(model)
  checkpoints.save_params(tmp_path / 'ckpt', params)
  with caplog.at_level(logging.WARNING):
    _assert_equal(checkpoints.restore_params(tmp_path / 'ckpt', model),
                  params)
  assert not _messages(caplog)


def test_tied_table_into_an_encoder_classifier(tmp_path):
  """The classifier's encoder has its own table: a tied checkpoint's (orbax
  or transformers) one table is read into it."""
  model = _model()
  params = _params(model)
  path = hf.save(hf.t5gemma2(layers=2), tmp_path / 'hf')
  hf_model, hf_params = convert.load_hf(path, text_only=True)
  cases = ((checkpoints.save_params(tmp_path / 'ckpt', params), model,
            params), (path, hf_model, hf_params))
  for path, backbone, source in cases:
    classifier = EncoderClassificationModel(backbone.config, num_classes=3)
    read = classifier.params_from_checkpoint(str(path), load.load_params)
    _assert_equal(read['encoder']['token_embedder'],
                  source['token_embedder'])
    assert 'token_embedder' not in read


def test_t5gemma_checkpoint_into_a_tied_model(tmp_path, caplog):
  """A transformers T5Gemma has a table per stack: a tied model reads the
  decoder's (the LM head) and says the encoder's is left unread."""
  path = hf.save(hf.t5gemma(layers=2), tmp_path / 'hf')
  model, untied = convert.load_hf(path)
  tied = type(model)(dataclasses.replace(model.config, tie_embeddings=True))
  with caplog.at_level(logging.WARNING):
    params = load.load_params(path, tied)
  _assert_equal(params['token_embedder'],
                untied['decoder']['token_embedder'])
  (message,) = _messages(caplog)
  assert 'encoder/token_embedder left unread' in message


# ------------------------------------------------------------------ rules --


@pytest.mark.parametrize('preset', sorted(TIED))
def test_tied_rules_target_the_one_table_once(preset):
  """Every rule targets a distinct path; the table's reads one name (the
  stored table's) and, where the class stores a copy per stack, writes the
  others."""
  config = _model(preset, scan_layers=False).config
  rules = registry.writer(registry.TRANSFORMERS, config).rules(config)
  targets = [r.target for r in rules]
  assert len(targets) == len(set(targets))
  assert not [t for t in targets if t[1:2] == ('token_embedder',)]
  (table,) = [r for r in rules if r.target == ('token_embedder',
                                               'embedding')]
  if preset == 't5gemma2_tiny':  # One table, stored with the encoder.
    assert table.source == 'model.encoder.embed_tokens.weight'
    assert not table.aliases
  else:  # A table per stack: the decoder's read, both written.
    assert table.source == 'model.decoder.embed_tokens.weight'
    assert table.aliases == ('model.encoder.embed_tokens.weight',)


# ---------------------------------------------------------- training state --


def _trainer(model):
  return trainer_lib.Trainer(model, partitioning.Partitioner(),
                             optimizers.optimizer(learning_rate=1e-3))


def _old_state(state):
  """A TrainState as saved before: every params-shaped tree (the
  parameters, Adam's moments) with the table copied into both stacks."""
  keys = set(state.params)
  like = lambda node: isinstance(node, dict) and set(node) == keys
  return jax.tree_util.tree_map(
      lambda node: _two_copies(node) if like(node) else node, state,
      is_leaf=like)


@pytest.mark.parametrize('scan_layers', [True, False])
def test_two_copy_training_state_resumes(scan_layers, tmp_path, caplog):
  model = _model(scan_layers=scan_layers)
  trainer = _trainer(model)
  state = trainer.init_state()
  # Moments that are not zeros, so that reading them is seen.
  state = state.replace(opt_state=jax.tree_util.tree_map(
      lambda x: x + 0.5 if x.dtype == jnp.float32 else x, state.opt_state))
  manager = checkpoints.training.CheckpointManager(tmp_path, async_save=False)
  try:
    manager.save(3, _old_state(jax.device_get(state)), FakeIterator(7))
    manager.wait()
    target = checkpoints.training.abstract_tree(trainer.state_shapes(),
                                                trainer.state_shardings())
    iterator = FakeIterator()
    with caplog.at_level(logging.WARNING):
      step, restored = manager.restore_latest(target, iterator)
  finally:
    manager.close()
  assert step == 3 and iterator.position == 7
  _assert_equal(restored, state)
  (mu,) = [s.mu for s in jax.tree_util.tree_leaves(
      restored.opt_state, is_leaf=lambda s: isinstance(
          s, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert set(mu) == {'token_embedder', 'encoder', 'decoder'}
  assert 'token_embedder' not in mu['encoder']
  (message,) = _messages(caplog)
  assert str(tmp_path / '3') in message
  # It trains on from there.
  batch = {'encoder_input_tokens': np.full((2, 8), 5, np.int32),
           'decoder_input_tokens': np.full((2, 8), 6, np.int32),
           'decoder_target_tokens': np.full((2, 8), 7, np.int32),
           'decoder_loss_weights': np.ones((2, 8), np.float32)}
  trainer.train_step(restored, batch)


def test_unconvertible_training_state_names_the_way_on(tmp_path):
  """A two-copy state whose optimizer state does not fit the converted
  target is an error that says to start from its parameters, which do
  restore."""
  model = _model()
  trainer = _trainer(model)
  state = jax.device_get(trainer.init_state())
  old = _old_state(state)
  # An optimizer state of another shape than the trainer's (no moments).
  old = old.replace(opt_state=optax.sgd(0.1).init(old.params))
  manager = checkpoints.training.CheckpointManager(tmp_path, async_save=False)
  try:
    manager.save(1, old, FakeIterator())
    manager.wait()
    target = checkpoints.training.abstract_tree(trainer.state_shapes(),
                                                trainer.state_shardings())
    with pytest.raises(checkpoints.CheckpointError,
                       match="INIT_CHECKPOINT=\"'.*/1'\""):
      manager.restore(1, target)
  finally:
    manager.close()
  _assert_equal(load.load_params(tmp_path / '1', model), state.params)

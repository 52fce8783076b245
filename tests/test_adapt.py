"""Adaptation of decoder-only checkpoints into encoder-decoders (t5x_adapt.adapt)
and the unbalanced cross-attention warm-up (optimizers.warmup_trainable_steps).

Run with `-s` to see the figures.
"""

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from t5x_adapt import adapt
from t5x_adapt import demo
from t5x_adapt import gin_utils
from t5x_adapt import optimizers
from t5x_adapt import partitioning
from t5x_adapt import stages
from t5x_adapt import trainer as trainer_lib
from t5x_adapt.convert import load
from t5x_adapt.models import DecoderOnlyModel

import hf_fixtures


def _flat(tree):
  return {'/'.join(k): np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(tree).items()}


def _source(stack, seed):
  """Random decoder-only params of `stack`, every tensor distinct."""
  params = DecoderOnlyModel(stack).get_initial_variables(
      jax.random.PRNGKey(seed), {})['params']
  # Norm scales start at 0 everywhere: redraw them so copies are traceable.
  return jax.tree_util.tree_map(
      lambda x: x + jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape),
      params)


def _check_stack(adapted, prefix, source, skip=()):
  """Every parameter of `prefix` equals the source's, bitwise."""
  checked = 0
  for path, value in adapted.items():
    if not path.startswith(prefix) or any(s in path for s in skip):
      continue
    np.testing.assert_array_equal(
        value, source['decoder/' + path[len(prefix):]], err_msg=path)
    checked += 1
  return checked


@pytest.fixture(scope='module')
def balanced():
  model = gin_utils.load_model('t5gemma_tiny')
  source = _source(model.config.encoder, seed=1)
  return model, source, adapt.adapt_params(model, source)


def test_balanced_copies_every_tensor_from_its_source(balanced):
  model, source, params = balanced
  adapted, source = _flat(params), _flat(source)
  encoder = _check_stack(adapted, 'encoder/', source)
  decoder = _check_stack(adapted, 'decoder/', source, skip=('cross_',))
  assert encoder == len(source) and decoder == len(source)
  fresh = _flat(model.get_initial_variables(jax.random.PRNGKey(0),
                                            {})['params'])
  cross = [p for p in adapted if 'cross_attention/' in p]
  for path in cross:  # cross-attention = the same layer's self-attention
    np.testing.assert_array_equal(
        adapted[path], adapted[path.replace('cross_attention',
                                            'self_attention')], err_msg=path)
  norms = [p for p in adapted if 'cross_attention_norm' in p]
  for path in norms:  # fresh: scale 0, the identity
    np.testing.assert_array_equal(adapted[path], fresh[path])
    assert not adapted[path].any()
  assert len(cross) == 2 * 4 and len(norms) == 2 * 2  # 2 scanned blocks
  print(f'\nbalanced: {encoder} encoder and {decoder} decoder tensors copied, '
        f'{len(cross)} cross-attention kernels from self-attention')


def test_unbalanced_takes_each_stack_from_its_own_checkpoint():
  model = gin_utils.load_model('t5gemma_tiny_unbalanced')
  config = model.config
  assert not config.is_balanced
  big, small = _source(config.encoder, 3), _source(config.decoder, 5)
  params = adapt.adapt_params(model, big, small, seed=7)
  adapted = _flat(params)
  assert _check_stack(adapted, 'encoder/', _flat(big)) == len(_flat(big))
  assert _check_stack(adapted, 'decoder/', _flat(small),
                      skip=('cross_',)) == len(_flat(small))
  fresh = _flat(model.get_initial_variables(jax.random.PRNGKey(7),
                                            {})['params'])
  for path in (p for p in adapted if 'cross_' in p):
    np.testing.assert_array_equal(adapted[path], fresh[path], err_msg=path)
  key = adapted['decoder/layers/block_0/cross_attention/key/kernel']
  query = adapted['decoder/layers/block_0/cross_attention/query/kernel']
  # K/V read the encoder width, Q the decoder width (leading axis: periods).
  assert key.shape[1] == config.encoder.embed_dim != query.shape[1]


def test_self_attention_init_needs_a_balanced_model():
  model = gin_utils.load_model('t5gemma_tiny_unbalanced')
  with pytest.raises(ValueError, match='encoder width 96 differs'):
    adapt.resolve_cross_attention_init(model.config, 'self_attention')
  with pytest.raises(ValueError, match="choose one of"):
    adapt.resolve_cross_attention_init(model.config, 'copy')


def test_wrong_sources_are_named(balanced):
  model, source, _ = balanced
  flat = flax.traverse_util.flatten_dict(source)
  missing = dict(flat)
  del missing[('decoder', 'final_norm', 'scale')]
  with pytest.raises(ValueError, match='coder/final_norm/scale: the '
                     '(en|de)coder source has no decoder/final_norm/scale'):
    adapt.adapt_params(model, flax.traverse_util.unflatten_dict(missing))
  wrong = dict(flat)
  wrong[('decoder', 'final_norm', 'scale')] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r'final_norm/scale has shape \(3,\), '
                     r'the model needs \(64,\)'):
    adapt.adapt_params(model, flax.traverse_util.unflatten_dict(wrong))
  extra = dict(flat)
  extra[('decoder', 'lm_head', 'kernel')] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match='does not use.*lm_head'):
    adapt.adapt_params(model, flax.traverse_util.unflatten_dict(extra))


def test_t5gemma2_from_a_transformers_gemma3(tmp_path):
  """Gemma 3 (a transformers directory) -> T5Gemma 2: every tensor is its
  source's (merged attention adds none), the tables are one, the
  end-of-image vectors start at zero; the result exported with save_hf is
  transformers' T5Gemma2ForConditionalGeneration, with our logits."""
  import transformers  # pylint: disable=g-import-not-at-top
  from t5x_adapt import convert  # pylint: disable=g-import-not-at-top
  from t5x_adapt.config import EncoderDecoderConfig  # pylint: disable=g-import-not-at-top
  from t5x_adapt.models import EncoderDecoderModel  # pylint: disable=g-import-not-at-top
  path = hf_fixtures.save(hf_fixtures.gemma3(), tmp_path / 'gemma3')
  gemma3, source = convert.load_hf(path)
  stack = gemma3.config.replace(bidirectional_window='split',
                                eoi_token_id=hf_fixtures.EOI)
  model = EncoderDecoderModel(EncoderDecoderConfig(
      stack, stack, tie_embeddings=True, encoder_attention='merged'))
  params = adapt.Adaptation(str(path)).init_params(model)
  adapted, source = _flat(params), _flat(source)
  # One table, the source's, outside both stacks; a fresh end-of-image
  # vector beside it.
  for prefix in ('encoder/', 'decoder/'):
    assert _check_stack(adapted, prefix, source) == len(source) - 1
  assert not adapted['token_embedder/eoi_embedding'].any()
  assert len(adapted) == 2 * (len(source) - 1) + 2
  np.testing.assert_array_equal(adapted['token_embedder/embedding'],
                                source['decoder/token_embedder/embedding'])

  convert.save_hf(model, params, tmp_path / 't5gemma2')
  reference = hf_fixtures.load(tmp_path / 't5gemma2',
                               transformers.T5Gemma2ForConditionalGeneration)
  batch = hf_fixtures.seq2seq_batch(seed=2)
  error = hf_fixtures.relative_error(
      model.compute_logits(params, batch),
      hf_fixtures.seq2seq_logits(reference, batch),
      batch['decoder_target_tokens'] > 0)
  print(f'\nGemma 3 -> T5Gemma 2, exported: relative error {error:.2e}')
  assert error <= 1e-4


@pytest.mark.parametrize('encoder_attention', ['cross', 'merged'])
def test_llama_source_into_an_encoder_decoder(encoder_attention, tmp_path):
  """A Llama (transformers, Llama 3 RoPE, untied head) adapted into a
  T5Gemma-style encoder-decoder (cross-attention from self-attention) and a
  merged-attention one: every tensor is its source's; the encoder leaves the
  untied head; fresh cross-attention norms are the identity (ones)."""
  from t5x_adapt import convert  # pylint: disable=g-import-not-at-top
  from t5x_adapt.config import EncoderDecoderConfig  # pylint: disable=g-import-not-at-top
  from t5x_adapt.models import EncoderDecoderModel  # pylint: disable=g-import-not-at-top
  path = hf_fixtures.save(hf_fixtures.plain_family('llama'), tmp_path / 'l')
  llama, source = convert.load_hf(path)
  stack = llama.config
  assert stack.rope_llama3 is not None and not stack.tie_lm_head
  model = EncoderDecoderModel(EncoderDecoderConfig(
      stack, stack, encoder_attention=encoder_attention))
  params = adapt.Adaptation(str(path)).init_params(model)
  adapted, source = _flat(params), _flat(source)
  assert _check_stack(adapted, 'encoder/', source) == len(source) - 1
  assert not any('lm_head' in p for p in adapted if p.startswith('encoder/'))
  assert _check_stack(adapted, 'decoder/', source,
                      skip=('cross_',)) == len(source)
  cross = [p for p in adapted if '/cross_attention/' in p]
  norms = [p for p in adapted if 'cross_attention_norm' in p]
  if encoder_attention == 'merged':
    assert not cross and not norms
  else:
    assert len(cross) == 4 and norms  # q, k, v, out (scanned: one leaf each)
    for p in cross:
      np.testing.assert_array_equal(
          adapted[p], adapted[p.replace('cross_attention', 'self_attention')])
    for p in norms:  # only pre-norms in a Llama block
      assert 'pre_' in p and np.all(adapted[p] == 1.0)
  batch = hf_fixtures.seq2seq_batch(seed=1)
  assert np.isfinite(np.asarray(model.compute_logits(params, batch))).all()


def test_hf_source_is_checked_against_the_stack(tmp_path):
  """An HF checkpoint loads for its own architecture; another names fields."""
  from t5x_adapt import convert  # pylint: disable=g-import-not-at-top
  path = hf_fixtures.save(hf_fixtures.gemma2(layers=4), tmp_path / 'g2')
  own, reference = convert.load_hf(path)
  loaded = load.load_decoder_only(path, own.config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, reference)
  model = gin_utils.load_model('t5gemma_tiny')
  with pytest.raises(ValueError, match=r'does not fit the model stack '
                     r'\(vocab_size: checkpoint 128, model 512'):
    load.load_decoder_only(path, model.config.encoder)


def test_a_loaded_source_is_not_read_again(balanced, tmp_path):
  """The teacher train.py read first serves as the adaptation's source."""
  model, source, expected = balanced
  absent = str(tmp_path / 'never-read')
  stack = model.config.encoder
  params = adapt.Adaptation(absent).init_params(
      model, loaded={absent: (stack, source)})
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, expected)
  with pytest.raises(FileNotFoundError, match='never-read'):
    adapt.Adaptation(absent).init_params(
        model, loaded={absent: (stack.replace(scan_layers=False), source)})


# ------------------------------------------------------------- step-0 loss --


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A gemma2_tiny trained briefly on the corpus, and PrefixLM batches."""
  cfg = demo.DemoConfig(batch_size=16, eval_batches=4, pretrain_length=64)
  run_dir = tmp_path_factory.mktemp('demo')
  source = stages.run_stage(
      run_dir / 'decoder_only', demo.DECODER_ONLY_FILES, 100,
      demo.PRETRAIN_TASK, demo.run_bindings(cfg, {'targets': 64}) +
      ['EVAL_EVERY = 0', 'SAVE_EVERY = 100', 'WARMUP_STEPS = 10'])
  return source, demo.validation_batches(cfg)


@pytest.mark.slow
def test_adapted_step0_loss_is_far_below_random_init(pretrained):
  source, batches = pretrained
  student = demo.adapted_model()
  adapted = adapt.Adaptation(str(source)).init_params(student)
  random = student.get_initial_variables(jax.random.PRNGKey(0), {})['params']
  teacher = load.load_decoder_only(source, student.teacher.config)
  hard = stages.LossOnBatches(student, batches)
  teacher_loss = stages.LossOnBatches(stages.Teacher(student), batches)
  losses = {'teacher': teacher_loss(teacher), 'adapted': hard(adapted),
            'random': hard(random)}
  print('\nPrefixLM target loss at step 0 (nats/token): ' +
        ', '.join(f'{k} {v:.3f}' for k, v in losses.items()))
  assert losses['random'] > np.log(8192) - 0.5
  assert losses['adapted'] < losses['random'] - 1.5
  assert losses['teacher'] < losses['adapted']


# ------------------------------------------------------------------ warm-up --


def _batch(seed, batch=4, length=12):
  rng = np.random.default_rng(seed)
  targets = rng.integers(3, 512, (batch, length)).astype(np.int32)
  return {'encoder_input_tokens': rng.integers(3, 512, (batch, length)
                                               ).astype(np.int32),
          'decoder_input_tokens': np.pad(targets, ((0, 0), (1, 0)),
                                         constant_values=2)[:, :-1],
          'decoder_target_tokens': targets,
          'decoder_loss_weights': np.ones_like(targets)}


def test_warmup_trains_only_cross_attention_for_k_steps():
  warmup = 3
  model = gin_utils.load_model('t5gemma_tiny_unbalanced')
  optimizer = optimizers.optimizer(
      learning_rate=1e-2, weight_decay=0.1, warmup_trainable_steps=warmup)
  trainer = trainer_lib.Trainer(model, partitioning.Partitioner(), optimizer)
  batch = _batch(0)
  state = trainer.init_state()
  previous = _flat(jax.device_get(state.params))
  for step in range(1, warmup + 2):
    state, _ = trainer.train_step(state, _batch(step))
    current = _flat(jax.device_get(state.params))
    changed = {p for p in current if not np.array_equal(current[p],
                                                        previous[p])}
    cross = {p for p in current if 'cross_attention' in p}
    if step <= warmup:
      assert changed == cross, (step, sorted(changed ^ cross)[:4])
    else:
      assert changed == set(current), sorted(set(current) - changed)[:4]
    previous = current
  print(f'\nwarm-up: {len(cross)} cross-attention tensors trained for '
        f'{warmup} steps while {len(current) - len(cross)} stayed bitwise '
        'unchanged; then all changed')


def test_held_parameters_stay_out_of_the_clipping_norm():
  """During the warm-up the global norm is that of the trained leaves."""
  grads = {'decoder': {'cross_attention': jnp.full((4,), 3.0),
                       'mlp': jnp.full((4,), 100.0)}}
  tx = optax.chain(
      optimizers.hold_until(1, [optimizers._complement(['cross_attention'])]),
      optax.clip_by_global_norm(1.0))
  updates, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(updates['decoder']['cross_attention'], 0.5)
  assert not np.asarray(updates['decoder']['mlp']).any()


@pytest.mark.parametrize('preset', ['t5gemma_tiny', 't5gemma2_tiny'])
def test_tied_embeddings_are_one_table_trained_by_both_stacks(preset):
  """T5Gemma with tied tables, and T5Gemma 2 (its end-of-image vector tied
  too): one array, the source's, that both stacks read and train."""
  model = gin_utils.load_model(preset, [
      'EncoderDecoderConfig.tie_embeddings = True'])
  assert model.config.tie_embeddings
  source = _source(model.config.encoder.as_decoder_only(), seed=11)
  params = adapt.adapt_params(model, source)
  assert not any('token_embedder' in params[stack] for stack in
                 ('encoder', 'decoder'))
  np.testing.assert_array_equal(params['token_embedder']['embedding'],
                                source['decoder']['token_embedder']['embedding'])
  trainer = trainer_lib.Trainer(
      model, partitioning.Partitioner(),
      optimizers.optimizer(learning_rate=1e-2, weight_decay=0.1))
  state = trainer.init_state(params=params)
  table = lambda s, name='embedding': np.asarray(
      s.params['token_embedder'][name])
  before = table(state)
  batches = [_batch(step) for step in range(3)]
  if model.config.decoder.eoi_token_id is not None:
    for b in batches:  # the end-of-image token in both stacks' inputs
      b['encoder_input_tokens'][:, 1] = model.config.encoder.eoi_token_id
      b['decoder_input_tokens'][:, 2] = model.config.decoder.eoi_token_id
  for b in batches:
    state, _ = trainer.train_step(state, b)
  assert not np.array_equal(table(state), before)
  if model.config.decoder.eoi_token_id is not None:
    assert table(state, 'eoi_embedding').any()
  # A fresh tied model has one table too.
  fresh = model.get_initial_variables(jax.random.PRNGKey(3))['params']
  assert set(fresh) == {'encoder', 'decoder', 'token_embedder'}


@pytest.mark.slow
def test_adapt_cli_writes_an_exportable_checkpoint(pretrained, tmp_path):
  from t5x_adapt import checkpoints  # pylint: disable=g-import-not-at-top
  from t5x_adapt.config import config_from_dict  # pylint: disable=g-import-not-at-top
  from t5x_adapt.models import model_for_config  # pylint: disable=g-import-not-at-top
  source, _ = pretrained
  out = tmp_path / 'adapted'
  assert adapt.main(['t5gemma_tiny', str(source), str(out),
                     '--vocab_size', '8192']) == 0
  metadata = checkpoints.read_info(out)['metadata']
  model = model_for_config(config_from_dict(metadata['config']))
  written = checkpoints.restore_params(out, model)
  expected = adapt.Adaptation(str(source)).init_params(model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, written, expected)
  assert adapt.main(['gemma2_tiny', str(source), str(tmp_path / 'x')]) == 1

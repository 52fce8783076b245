"""The sequence-chunked LM head + loss (t5x_adapt.kernels.lm_head_loss).

Chunked must equal whole logits in value, metrics and gradients (float32,
1e-6 relative) for every loss the models train with, on chunk lengths that
divide the length and ones that do not (padded), with zero loss weights and
a final logit softcap; then through tiny real models; and it must need far
less memory: compile-time temp bytes of a value-and-grad step with a Gemma
sized vocabulary.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_adapt import distillation
from t5x_adapt import gin_utils
from t5x_adapt import losses
from t5x_adapt import models
from t5x_adapt.kernels import lm_head_loss
from t5x_adapt.kernels.lm_head_loss import Head
from test_distillation import packed_batch

RTOL = 1e-6
SOFTCAP, TEACHER_SOFTCAP = 30.0, 20.0

# name: (distillation options or None for cross-entropy, z_loss)
LOSSES = {
    'xent': (None, 0.0),
    'xent_z': (None, 1e-3),
    'kd_t1': (dict(temperature=1.0), 0.0),
    'kd_t2': (dict(temperature=2.0), 1e-3),
    'kd_top_k': (dict(temperature=2.0, top_k=5), 0.0),
    'kd_label': (dict(label_weight=0.3, top_k=7), 1e-3),
}


def _relative(actual, expected) -> float:
  """The worst leaf's |actual - expected| / |expected| (L2 norms)."""
  pairs = zip(jax.tree_util.tree_leaves(actual),
              jax.tree_util.tree_leaves(expected))
  return max(float(np.linalg.norm(np.asarray(a) - np.asarray(e)) /
                   max(np.linalg.norm(np.asarray(e)), 1e-30))
             for a, e in pairs)


@functools.lru_cache(maxsize=None)
def _head_inputs(b=2, t=12, e=8, e_t=6, v=50):
  """Student and teacher hidden/table, targets, weights with zeros."""
  rng = np.random.default_rng(0)
  arrays = dict(hidden=rng.normal(size=(b, t, e)) * 2,
                table=rng.normal(size=(v, e)),
                teacher_hidden=rng.normal(size=(b, t, e_t)) * 2,
                teacher_table=rng.normal(size=(v, e_t)))
  arrays = {k: jnp.asarray(x, jnp.float32) for k, x in arrays.items()}
  arrays['targets'] = jnp.asarray(rng.integers(1, v, (b, t)), jnp.int32)
  weights = rng.integers(0, 2, (b, t)).astype(np.float32)
  weights[1, -3:] = 0  # a zero-weight tail, as padding gives
  arrays['weights'] = jnp.asarray(weights)
  return arrays


def _loss(name, chunk_length):
  """(hidden, table) -> (loss, metrics) of loss `name`, whole or chunked."""
  kd, z_loss = LOSSES[name]
  x = _head_inputs()
  teacher = Head(x['teacher_hidden'], x['teacher_table'], TEACHER_SOFTCAP)

  def loss(hidden, table):
    student = Head(hidden, table, SOFTCAP)
    args = (x['targets'], x['weights'])
    if chunk_length is None and kd is None:
      return losses.cross_entropy(student.logits(), *args, z_loss)
    if chunk_length is None:
      return distillation.distillation_loss(
          student.logits(), teacher.logits(), *args, z_loss=z_loss, **kd)
    if kd is None:
      return lm_head_loss.chunked_cross_entropy(
          student, *args, chunk_length=chunk_length, z_loss=z_loss)
    return lm_head_loss.chunked_distillation_loss(
        student, teacher, *args, chunk_length=chunk_length, z_loss=z_loss,
        **kd)
  return loss


@functools.lru_cache(maxsize=None)
def _value_and_grads(name, chunk_length):
  """((loss, metrics), (d hidden, d table)) of `_loss`; the whole-logits
  reference is computed once for both chunk lengths."""
  x = _head_inputs()
  fn = jax.jit(jax.value_and_grad(_loss(name, chunk_length), argnums=(0, 1),
                                  has_aux=True))
  return fn(x['hidden'], x['table'])


@pytest.mark.parametrize('chunk_length', [4, 5])
@pytest.mark.parametrize('name', list(LOSSES))
def test_chunked_equals_whole(name, chunk_length):
  """Values, every metric, d/d hidden and d/d table; 5 pads 12 to 15."""
  (loss, metrics), grads = _value_and_grads(name, None)
  (c_loss, c_metrics), c_grads = _value_and_grads(name, chunk_length)
  assert set(c_metrics) == set(metrics)
  errors = {'loss': _relative(c_loss, loss),
            'metrics': _relative(c_metrics, metrics),
            'd_hidden': _relative(c_grads[0], grads[0]),
            'd_table': _relative(c_grads[1], grads[1])}
  print(f'\n{name} chunk {chunk_length}: ' + ', '.join(
      f'{k} {v:.1e}' for k, v in errors.items()))
  assert all(np.asarray(g).any() for g in grads)
  assert max(errors.values()) < RTOL, errors


def test_teacher_gets_no_gradient_in_the_chunked_loss():
  x = _head_inputs()

  def loss(teacher_hidden, teacher_table):
    return lm_head_loss.chunked_distillation_loss(
        Head(x['hidden'], x['table']), Head(teacher_hidden, teacher_table),
        x['targets'], x['weights'], chunk_length=4)[0]
  grads = jax.grad(loss, argnums=(0, 1))(x['teacher_hidden'],
                                         x['teacher_table'])
  assert not any(np.asarray(g).any() for g in grads)


def test_chunked_loss_rejects_mismatched_lengths():
  x = _head_inputs()
  with pytest.raises(ValueError, match=r'\(2, 12, 8\).*\(2, 11\)'):
    lm_head_loss.chunked_cross_entropy(Head(x['hidden'], x['table']),
                                       x['targets'][:, :11], chunk_length=4)


def test_chunk_length_settings():
  gemma_vocab = 262144
  assert lm_head_loss.auto_chunk_length(4096, gemma_vocab) == 64
  assert lm_head_loss.auto_chunk_length(64, gemma_vocab) is None
  assert lm_head_loss.auto_chunk_length(1023, gemma_vocab) == 33  # 3*11*31
  assert lm_head_loss.auto_chunk_length(1021, gemma_vocab) == 64  # prime
  assert lm_head_loss.auto_chunk_length(8, 2**23) == 2
  resolve = lm_head_loss.resolve_chunk_length
  assert resolve(None, 4096, gemma_vocab) is None
  assert resolve('auto', 4096, gemma_vocab) == 64
  assert resolve(64, 4096, gemma_vocab) == 64
  assert resolve(64, 20, gemma_vocab) == 20
  for bad in (0, -3, 'whole', 2.5, True):
    with pytest.raises(ValueError, match='loss_chunk_length'):
      lm_head_loss.check_chunk_setting(bad)


# Through the models: tiny gin presets, a packed batch of test_distillation.


@pytest.fixture(scope='module')
def tiny_configs():
  """The tiny presets cut to one local+global period (faster compiles)."""
  return {name: gin_utils.load_model(name).config.map_stacks(num_layers=2)
          for name in ('t5gemma_tiny', 'gemma2_tiny')}


def _random_params(model, scale, seed):
  """Normal(0, scale) parameters of the model's shapes (an equality test
  needs no real init, and this skips compiling one)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(size=s.shape) * scale, s.dtype),
      model.param_shapes())


def _decoder_only_batch():
  """Two rows of 20 tokens, the second with right padding."""
  rng = np.random.default_rng(3)
  targets = rng.integers(3, 512, (2, 20)).astype(np.int32)
  targets[1, 14:] = 0
  inputs = np.concatenate([np.full((2, 1), 2, np.int32), targets[:, :-1]], 1)
  inputs[1, 15:] = 0
  return {'decoder_input_tokens': inputs, 'decoder_target_tokens': targets,
          'decoder_loss_weights': (targets > 0).astype(np.float32)}


def _model_value_and_grads(model, params, batch, *extra):
  fn = jax.jit(jax.value_and_grad(
      lambda p: model.loss_fn(p, batch, None, *extra), has_aux=True))
  return fn(params)


MODEL_CASES = {
    'decoder_only': ('gemma2_tiny', models.DecoderOnlyModel, {}),
    'encoder_decoder': ('t5gemma_tiny', models.EncoderDecoderModel,
                        dict(z_loss=1e-3)),
    'distillation': ('t5gemma_tiny', distillation.DistillationModel,
                     dict(temperature=2.0, top_k=7, label_weight=0.3,
                          z_loss=1e-3)),
}


@pytest.mark.parametrize('case', [
    'decoder_only', 'distillation',
    # Distillation runs the same student path (and more): this one is slow.
    pytest.param('encoder_decoder', marks=pytest.mark.slow)])
def test_models_chunked_equals_whole(case, tiny_configs):
  """loss_fn with loss_chunk_length=None vs 8 (20 targets: padded)."""
  preset, cls, kwargs = MODEL_CASES[case]
  whole = cls(tiny_configs[preset], loss_chunk_length=None, **kwargs)
  chunked = cls(tiny_configs[preset], loss_chunk_length=8, **kwargs)
  batch = (_decoder_only_batch() if case == 'decoder_only'
           else packed_batch()[0])
  assert chunked.loss_chunk(20) == 8 and whole.loss_chunk(20) is None
  params = _random_params(whole, 0.1, 0)
  # A sharper teacher, so its distributions differ between positions.
  extra = ((_random_params(whole.teacher, 0.3, 1),)
           if case == 'distillation' else ())
  (loss, metrics), grads = _model_value_and_grads(whole, params, batch,
                                                  *extra)
  (c_loss, c_metrics), c_grads = _model_value_and_grads(chunked, params,
                                                        batch, *extra)
  errors = {'loss': _relative(c_loss, loss),
            'metrics': _relative(c_metrics, metrics),
            'grads': _relative(c_grads, grads)}
  print(f'\n{case}: loss {float(loss):.6f}; ' + ', '.join(
      f'{k} {v:.1e}' for k, v in errors.items()))
  assert set(c_metrics) == set(metrics)
  assert max(errors.values()) < RTOL, errors


def test_gin_binds_loss_chunk_length():
  model = gin_utils.load_model('t5gemma_tiny', [
      'import t5x_adapt.distillation', 'MODEL = @DistillationModel()',
      'DistillationModel.config = @EncoderDecoderConfig()',
      'DistillationModel.loss_chunk_length = 8'])
  assert isinstance(model, distillation.DistillationModel)
  assert model.loss_chunk_length == 8
  assert gin_utils.load_model('gemma2_tiny').loss_chunk_length == 'auto'


def _step_temp_bytes(model, batch_size, length) -> int:
  """Compile-time temp bytes of jit(value_and_grad(loss_fn)) on shapes."""
  shapes = {k: (batch_size, length) for k in (
      'decoder_input_tokens', 'decoder_target_tokens')}
  params = model.param_shapes()
  batch = {k: jax.ShapeDtypeStruct(s, jnp.int32) for k, s in shapes.items()}
  step = jax.jit(jax.value_and_grad(
      lambda p, b: model.loss_fn(p, b, None)[0]))
  compiled = step.lower(params, batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_step_needs_far_less_memory(tiny_configs):
  """A 2-layer stack with Gemma's vocabulary, 1024 targets: the whole
  logits are 1 GiB a row; 'auto' (64 positions a chunk) stays near the
  table's own size."""
  config = tiny_configs['gemma2_tiny'].replace(vocab_size=262144,
                                               num_layers=2)
  whole = _step_temp_bytes(
      models.DecoderOnlyModel(config, loss_chunk_length=None), 1, 1024)
  chunked = _step_temp_bytes(models.DecoderOnlyModel(config), 1, 1024)
  factor = whole / chunked
  print(f'\nvalue_and_grad temp bytes, vocab 262144, 1024 targets: whole '
        f'{whole / 2**20:.0f} MiB, chunked (auto) {chunked / 2**20:.0f} MiB: '
        f'{factor:.1f}x less')
  assert whole > 2**30 and factor > 8

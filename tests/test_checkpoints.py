"""Orbax save/restore of params (t5x_adapt.checkpoints)."""

import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5x_adapt import checkpoints
from t5x_adapt import gin_utils
from t5x_adapt import layout
from t5x_adapt.config import EncoderDecoderConfig, config_from_dict
from t5x_adapt.checkpoints import errors

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PRESETS = ('gemma2_tiny', 't5gemma_tiny')


def _model(preset, scan_layers=True, **overrides):
  return gin_utils.load_model(preset, scan_layers=scan_layers, **overrides)


def _params(model, seed=0):
  """Random params of the model's shapes (flax's init is slow, and any
  values do for checkpoints)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
      model.param_shapes())


def _batch(model, seed=0):
  tokens = np.random.default_rng(seed).integers(3, 512, (2, 12), np.int32)
  batch = {'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens}
  if isinstance(model.config, EncoderDecoderConfig):
    batch['encoder_input_tokens'] = tokens[:, ::-1].copy()
  return batch


def _assert_trees_equal(actual, expected):
  assert (jax.tree_util.tree_structure(actual) ==
          jax.tree_util.tree_structure(expected))
  for a, e in zip(jax.tree_util.tree_leaves(actual),
                  jax.tree_util.tree_leaves(expected)):
    assert a.dtype == e.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.mark.parametrize('preset', PRESETS)
@pytest.mark.parametrize('scan_layers', [True, False])
def test_round_trip_is_bitwise(preset, scan_layers, tmp_path):
  model = _model(preset, scan_layers)
  params = _params(model)
  checkpoints.save_params(tmp_path / 'ckpt', params, metadata=model.config)
  _assert_trees_equal(checkpoints.restore_params(tmp_path / 'ckpt', model),
                      params)
  info = checkpoints.read_info(tmp_path / 'ckpt')
  assert info['layout'] == ('scanned' if scan_layers else 'unrolled')
  assert config_from_dict(info['metadata']) == model.config
  # Only the checkpoint is left: no staging or backup directories.
  assert sorted(os.listdir(tmp_path)) == ['ckpt']


def test_restore_casts_to_the_model_dtype(tmp_path):
  bf16_model = _model('gemma2_tiny', param_dtype='bfloat16')
  params = _params(bf16_model)
  checkpoints.save_params(tmp_path / 'ckpt', params)
  model = _model('gemma2_tiny')
  restored = checkpoints.restore_params(tmp_path / 'ckpt', model)
  _assert_trees_equal(restored, jax.tree_util.tree_map(
      lambda x: x.astype(jnp.float32), params))


@pytest.mark.parametrize('preset', PRESETS)
@pytest.mark.parametrize('saved_scanned', [True, False])
def test_restore_into_the_other_layout(preset, saved_scanned, tmp_path):
  saved_model = _model(preset, saved_scanned)
  other_model = _model(preset, not saved_scanned)
  params = _params(saved_model)
  checkpoints.save_params(tmp_path / 'ckpt', params)
  restored = checkpoints.restore_params(tmp_path / 'ckpt', other_model)
  expected = layout.to_model_layout(params, other_model.config)
  _assert_trees_equal(restored, expected)
  batch = _batch(saved_model)
  np.testing.assert_allclose(
      other_model.compute_logits(restored, batch),
      saved_model.compute_logits(params, batch), rtol=1e-5, atol=1e-5)


def test_missing_path_names_it(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere'):
    checkpoints.restore_params(tmp_path / 'nowhere', _model('gemma2_tiny'))


def test_other_preset_names_first_missing_parameter(tmp_path):
  checkpoints.save_params(tmp_path / 'ckpt', _params(_model('gemma2_tiny')))
  with pytest.raises(errors.MissingTensorError) as info:
    checkpoints.restore_params(tmp_path / 'ckpt', _model('gemma3_tiny'))
  message = str(info.value)
  assert str(tmp_path / 'ckpt') in message
  # gemma3_tiny has QK norms (one period of six layers), gemma2_tiny has none.
  assert "'decoder/layers/block_0/self_attention/key_norm/scale'" in message
  assert '(1, 16)' in message
  assert "'decoder/layers/block_0/mlp/down/kernel'" in message
  assert '(2, 128, 64)' in message and '(1, 128, 64)' in message
  assert isinstance(info.value, ValueError)


def test_other_vocab_names_both_shapes(tmp_path):
  checkpoints.save_params(tmp_path / 'ckpt', _params(_model('gemma2_tiny')))
  with pytest.raises(errors.ShapeMismatchError) as info:
    checkpoints.restore_params(tmp_path / 'ckpt',
                               _model('gemma2_tiny', vocab_size=256))
  message = str(info.value)
  assert "'decoder/token_embedder/embedding'" in message
  assert '(512, 64)' in message and '(256, 64)' in message


def test_encoder_decoder_checkpoint_into_decoder_only(tmp_path):
  checkpoints.save_params(tmp_path / 'ckpt', _params(_model('t5gemma_tiny')))
  with pytest.raises(errors.UnexpectedTensorError) as info:
    checkpoints.restore_params(tmp_path / 'ckpt', _model('gemma2_tiny'))
  assert "'decoder/layers/block_0/cross_attention/" in str(info.value)


def _fail_after_writing(monkeypatch, written):
  """Makes orbax raise once the array files are written, before commit."""
  def finalize(self, directory):
    written.extend(os.listdir(directory))
    raise OSError('disk full (simulated)')
  monkeypatch.setattr(ocp.StandardCheckpointHandler, 'finalize', finalize)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
  model = _model('gemma2_tiny')
  old = _params(model, seed=0)
  checkpoints.save_params(tmp_path / 'ckpt', old)
  written = []
  _fail_after_writing(monkeypatch, written)
  with pytest.raises(OSError, match='simulated'):
    checkpoints.save_params(tmp_path / 'ckpt', _params(model, seed=1))
  assert written, 'the simulated failure should come after files are written'
  monkeypatch.undo()
  _assert_trees_equal(checkpoints.restore_params(tmp_path / 'ckpt', model),
                      old)
  assert sorted(os.listdir(tmp_path)) == ['ckpt']


def test_unserialisable_params_keep_previous_checkpoint(tmp_path):
  model = _model('gemma2_tiny')
  old = _params(model)
  checkpoints.save_params(tmp_path / 'ckpt', old)
  bad = dict(old, decoder=dict(old['decoder'], extra=object()))
  with pytest.raises(ValueError):
    checkpoints.save_params(tmp_path / 'ckpt', bad)
  with pytest.raises(TypeError, match='not JSON serialisable'):
    checkpoints.save_params(tmp_path / 'ckpt', old, metadata=object())
  _assert_trees_equal(checkpoints.restore_params(tmp_path / 'ckpt', model),
                      old)
  assert sorted(os.listdir(tmp_path)) == ['ckpt']


def test_save_over_new_checkpoint_replaces_it(tmp_path):
  model = _model('gemma2_tiny')
  checkpoints.save_params(tmp_path / 'ckpt', _params(model, seed=0))
  new = _params(model, seed=1)
  checkpoints.save_params(tmp_path / 'ckpt', new)
  _assert_trees_equal(checkpoints.restore_params(tmp_path / 'ckpt', model),
                      new)
  assert sorted(os.listdir(tmp_path)) == ['ckpt']


def test_save_refuses_to_replace_other_directories(tmp_path):
  (tmp_path / 'data').mkdir()
  (tmp_path / 'data' / 'notes.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='not a checkpoint'):
    checkpoints.save_params(tmp_path / 'data',
                            _params(_model('gemma2_tiny')))
  assert (tmp_path / 'data' / 'notes.txt').read_text() == 'keep me'


def test_interrupted_replace_is_named(tmp_path):
  # A crash between the two renames leaves only the renamed-aside backup.
  checkpoints.save_params(tmp_path / 'ckpt', _params(_model('gemma2_tiny')))
  os.rename(tmp_path / 'ckpt', tmp_path / '.ckpt.old')
  with pytest.raises(FileNotFoundError, match=r'\.ckpt\.old'):
    checkpoints.restore_params(tmp_path / 'ckpt', _model('gemma2_tiny'))
  # The next successful save removes the backup.
  checkpoints.save_params(tmp_path / 'ckpt', _params(_model('gemma2_tiny')))
  assert sorted(os.listdir(tmp_path)) == ['ckpt']


@pytest.mark.parametrize('content', ['empty', 'other files'])
def test_restore_from_a_non_checkpoint_directory(tmp_path, content):
  path = tmp_path / 'not_a_checkpoint'
  path.mkdir()
  if content == 'other files':
    (path / 'config.json').write_text('{}')
  with pytest.raises(errors.CorruptCheckpointError, match='not_a_checkpoint'):
    checkpoints.restore_params(path, _model('gemma2_tiny'))


@pytest.mark.parametrize('saved_scanned', [True, False])
def test_restore_onto_one_device_mesh(saved_scanned, tmp_path):
  saved_model = _model('gemma2_tiny', saved_scanned)
  model = _model('gemma2_tiny', True)
  params = _params(saved_model)
  checkpoints.save_params(tmp_path / 'ckpt', params)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                           ('data', 'model'))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec())
  shardings = jax.tree_util.tree_map(lambda _: sharding,
                                     model.param_shapes())
  restored = checkpoints.restore_params(tmp_path / 'ckpt', model,
                                        shardings=shardings)
  _assert_trees_equal(restored,
                      layout.to_model_layout(params, model.config))
  for leaf in jax.tree_util.tree_leaves(restored):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


_EIGHT_DEVICE_SCRIPT = textwrap.dedent('''
    import sys
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from t5x_adapt import checkpoints, gin_utils, layout

    def spec(shape):
      # 'model' on the last axis divisible by 4, 'data' on another by 2.
      axes = [None] * len(shape)
      for i in reversed(range(len(shape))):
        if shape[i] % 4 == 0:
          axes[i] = 'model'
          break
      for i in range(len(shape)):
        if axes[i] is None and shape[i] % 2 == 0:
          axes[i] = 'data'
          break
      return PartitionSpec(*axes)

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ('data', 'model'))
    expected = dict(np.load(sys.argv[2]))
    for scan_layers in (True, False):
      model = gin_utils.load_model('gemma2_tiny', scan_layers=scan_layers)
      shardings = jax.tree_util.tree_map(
          lambda s: NamedSharding(mesh, spec(s.shape)),
          model.param_shapes())
      restored = checkpoints.restore_params(sys.argv[1], model,
                                            shardings=shardings)
      for path, leaf in jax.tree_util.tree_leaves_with_path(restored):
        sharding = NamedSharding(mesh, spec(leaf.shape))
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (
            path, leaf.sharding, sharding)
      unrolled = layout.to_unrolled(restored, model.config)
      for path, leaf in jax.tree_util.tree_leaves_with_path(unrolled):
        name = '/'.join(k.key for k in path)
        np.testing.assert_array_equal(np.asarray(leaf), expected[name])
    print('restored onto 2x4 mesh')
''')


def test_restore_onto_eight_device_mesh(tmp_path):
  model = _model('gemma2_tiny')
  params = _params(model)
  checkpoints.save_params(tmp_path / 'ckpt', params)
  unrolled = layout.to_unrolled(params, model.config)
  np.savez(tmp_path / 'expected.npz', **{
      '/'.join(k.key for k in path): np.asarray(leaf)
      for path, leaf in jax.tree_util.tree_leaves_with_path(unrolled)})
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS='--xla_force_host_platform_device_count=8',
             PYTHONPATH=os.pathsep.join(
                 [str(REPO_ROOT), os.environ.get('PYTHONPATH', '')]))
  result = subprocess.run(
      [sys.executable, '-c', _EIGHT_DEVICE_SCRIPT, str(tmp_path / 'ckpt'),
       str(tmp_path / 'expected.npz')],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'restored onto 2x4 mesh' in result.stdout

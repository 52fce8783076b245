"""Training never goes on silently from bad state: a diverging run stops,
metrics stay JSON, corrupt checkpoints are found, a failed save loses
nothing (t5x_adapt.step_guard, summaries, checkpoints.integrity,
checkpoints.training).

The guard inside the jitted step is tested on its own in
tests/test_step_guard.py; here the real CLI runs (tests/train_cli.py), and
the checkpoint manager on small trees.
"""

import contextlib
import logging
import pathlib
import resource
import shutil
import signal

import jax
import numpy as np
import pytest

import train_cli
from t5x_adapt import checkpoints
from t5x_adapt import summaries
from t5x_adapt.checkpoints import integrity


# ------------------------------------------------------- diverging runs --


@pytest.mark.slow
def test_a_diverging_run_stops_after_n_skipped_steps(tmp_path, compile_cache):
  """--gin.LEARNING_RATE=1e9: the loss is NaN from step 3; with N = 3 the
  run stops at step 5, names the last checkpoint, and wrote no NaNs."""
  result = train_cli.train(
      compile_cache, tmp_path, 30, *train_cli.FAST, 'SAVE_EVERY=2',
      'LEARNING_RATE=1e9', 'StepGuard.max_consecutive_skips=3', check=False)
  print('\n' + result.stderr.strip().splitlines()[-2][:400])
  assert result.returncode == 1, result.stderr[-3000:]
  assert ('error: training stopped at step 5: 3 consecutive steps (3 to 5) '
          'were not applied (the last: loss not finite') in result.stderr
  assert (f'the parameters are those after step 2 and the last good '
          f'checkpoint is {tmp_path / "checkpoints" / "4"}') in result.stderr
  for step in (3, 4, 5):
    assert f'step {step} not applied: loss not finite' in result.stderr

  lines = train_cli.metrics(tmp_path)  # Strict: NaN would be an error.
  skips = [m for m in lines if 'skipped' in m]
  assert [m['step'] for m in skips] == [3, 4, 5]
  assert all(m['loss'] is None and 'loss' in m['skipped'] for m in skips)
  assert [m['consecutive_skips'] for m in skips] == [1, 2, 3]
  logged = {m['step']: m for m in lines if 'skipped' not in m}
  assert logged[3]['loss'] is None and logged[3]['skipped_steps'] == 1

  # No checkpoint holds a non-finite number; steps 2 and 4 hold the same
  # parameters (nothing was applied in between).
  assert train_cli.steps(tmp_path) == [2, 4]
  at_2, at_4 = (train_cli.flatten(train_cli.saved_state(tmp_path, s))
                for s in (2, 4))
  floats = {k: v for k, v in at_4.items() if v.dtype.kind == 'f'}
  assert any('/params/' in k for k in floats)
  for key, value in floats.items():
    assert np.all(np.isfinite(value)), key
    if '/params/' in key:
      np.testing.assert_array_equal(value, at_2[key], err_msg=key)
  assert int(at_4['/guard/skipped']) == 2


def test_metrics_lines_write_non_finite_values_as_null(tmp_path):
  log = summaries.MetricsLog(tmp_path, 'metrics.jsonl')
  log.write({'step': 1, 'loss': float('nan'), 'grad_norm': float('inf'),
             'accuracy': 0.5, 'per_task': [float('-inf'), 1.0]}, 'train', 1,
            {'loss': float('nan'), 'accuracy': 0.5})
  log.close()
  text = (tmp_path / 'metrics.jsonl').read_text()
  assert 'NaN' not in text and 'Infinity' not in text
  assert train_cli.metrics(tmp_path) == [
      {'step': 1, 'loss': None, 'grad_norm': None, 'accuracy': 0.5,
       'per_task': [None, 1.0]}]
  assert list((tmp_path / 'train').glob('events.out.tfevents.*'))


# ---------------------------------------------------- corrupt checkpoints --


def _save_steps(directory, steps):
  manager = checkpoints.training.CheckpointManager(directory, keep=None)
  for step in steps:
    manager.save(step, {'w': np.arange(4096, dtype=np.float32) * step},
                 train_cli.FakeIterator(step))
  manager.close()


def _largest_data_file(step_dir) -> pathlib.Path:
  """The biggest array file of a step (never the checksum listing)."""
  files = [p for p in (pathlib.Path(step_dir) / 'state').rglob('*')
           if p.is_file() and '/d/' in p.as_posix()]
  return max(files, key=lambda p: p.stat().st_size)


def _corrupt(file: pathlib.Path, how: str) -> None:
  data = bytearray(file.read_bytes())
  if how == 'flipped':
    data[len(data) // 2] ^= 0x01  # One bit.
  else:
    del data[len(data) // 2:]
  file.write_bytes(bytes(data))


_TARGET = {'w': jax.ShapeDtypeStruct((4096,), np.float32)}


@pytest.mark.parametrize('how', ['flipped', 'truncated'])
def test_a_corrupt_latest_checkpoint_is_named_and_the_previous_restored(
    tmp_path, how, caplog):
  _save_steps(tmp_path, [1, 2, 3])
  bad = _largest_data_file(tmp_path / '3')
  _corrupt(bad, how)
  manager = checkpoints.training.CheckpointManager(tmp_path, keep=None)
  iterator = train_cli.FakeIterator()
  with caplog.at_level(logging.ERROR):
    step, state = manager.restore_latest(_TARGET, iterator)
  message = ' '.join(r.getMessage() for r in caplog.records)
  print(f'\n{message}')
  assert (step, iterator.position) == (2, 2)
  np.testing.assert_array_equal(state['w'], np.arange(4096) * 2.0)
  assert f'CORRUPT CHECKPOINT: {bad}: ' in message
  assert ('SHA-256 mismatch' if how == 'flipped' else '(truncated)') in message
  # Moved aside, out of the step numbers; step 3 can be written again.
  aside = [p.name for p in tmp_path.iterdir() if p.name.startswith('3.')]
  assert len(aside) == 1 and aside[0].startswith('3.corrupt-'), aside
  assert manager.all_steps() == [1, 2]
  manager.save(3, {'w': np.zeros(4096, np.float32)}, iterator)
  manager.wait()
  assert manager.all_steps() == [1, 2, 3]
  assert integrity.verify(tmp_path / '3')
  manager.close()


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path):
  _save_steps(tmp_path, [1, 2])
  for step in (1, 2):
    _corrupt(_largest_data_file(tmp_path / str(step)), 'flipped')
  manager = checkpoints.training.CheckpointManager(tmp_path)
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match='every checkpoint is corrupt'):
    manager.restore_latest(_TARGET)
  manager.close()


def test_a_malformed_checksum_listing_counts_as_corrupt(tmp_path):
  _save_steps(tmp_path, [1, 2])
  listing = tmp_path / '2' / integrity.CHECKSUMS_FILE
  listing.write_text('{"format": "t5x_adapt.checksums", "files": {"x": {}}}')
  manager = checkpoints.training.CheckpointManager(tmp_path, keep=None)
  step, _ = manager.restore_latest(_TARGET)
  manager.close()
  assert step == 1
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match='not a t5x_adapt.checksums listing'):
    integrity.verify(next(tmp_path.glob('2.corrupt-*')))


def test_a_checkpoint_without_checksums_restores_unverified(tmp_path, caplog):
  """Checkpoints of older versions have no listing: read, with a warning."""
  _save_steps(tmp_path, [1])
  (tmp_path / '1' / integrity.CHECKSUMS_FILE).unlink()
  manager = checkpoints.training.CheckpointManager(tmp_path)
  with caplog.at_level(logging.WARNING):
    step, _ = manager.restore_latest(_TARGET)
  manager.close()
  assert step == 1
  assert 'are not verified' in caplog.text


def test_an_older_train_state_gets_fresh_guard_counters(tmp_path):
  """A TrainState saved before the step guard restores, counters at 0."""
  from t5x_adapt import step_guard  # pylint: disable=g-import-not-at-top
  from t5x_adapt import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  manager = checkpoints.training.CheckpointManager(tmp_path)
  manager.save(7, {'step': np.int32(7), 'params': {'w': np.ones(3, 'f4')},
                   'opt_state': {'mu': np.zeros(3, 'f4')}},
               train_cli.FakeIterator(7))
  manager.wait()
  spec = lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  guard = step_guard.StepGuard().init()
  target = trainer_lib.TrainState(
      step=spec(np.int32(0)), params={'w': spec(np.ones(3, 'f4'))},
      opt_state={'mu': spec(np.ones(3, 'f4'))},
      guard=jax.tree_util.tree_map(spec, guard))
  state = manager.restore(7, target, defaults={'guard': guard})
  manager.close()
  assert int(state.step) == 7 and int(state.guard.skipped) == 0
  np.testing.assert_array_equal(state.params['w'], np.ones(3))


def test_a_corrupt_params_checkpoint_is_an_error_naming_the_file(tmp_path):
  from t5x_adapt import gin_utils  # pylint: disable=g-import-not-at-top
  model = gin_utils.load_model('gemma2_tiny')
  params = model.get_initial_variables(jax.random.PRNGKey(0), {})['params']
  path = checkpoints.save_params(tmp_path / 'ckpt', params)
  assert (path / integrity.CHECKSUMS_FILE).exists()
  files = [p for p in path.rglob('*') if p.is_file() and '/d/' in
           p.as_posix()]
  bad = max(files, key=lambda p: p.stat().st_size)
  _corrupt(bad, 'flipped')
  with pytest.raises(checkpoints.CorruptCheckpointError,
                     match=f'{bad}: contents changed'):
    checkpoints.restore_params(path, model)


@contextlib.contextmanager
def _files_limited_to(size: int):
  """Every write past `size` bytes of a file fails with EFBIG, as on a full
  or size-limited disk (RLIMIT_FSIZE, SIGXFSZ ignored)."""
  handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  limits = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
  try:
    yield
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    signal.signal(signal.SIGXFSZ, handler)


def test_an_async_save_that_fails_names_its_step_and_keeps_the_previous(
    tmp_path):
  """The arrays are written in orbax's background thread; its failure
  surfaces at the next wait as a CheckpointSaveError naming the step."""
  state = {'w': np.random.RandomState(0).rand(1 << 20).astype(np.float32)}
  manager = checkpoints.training.CheckpointManager(tmp_path, keep=None)
  manager.save(1, state, train_cli.FakeIterator(1))
  manager.wait()
  with _files_limited_to(1 << 20):  # The 4 MiB array does not compress.
    manager.save(2, state, train_cli.FakeIterator(2))
    with pytest.raises(checkpoints.CheckpointSaveError) as error:
      manager.wait()
  print(f'\n{error.value}'[:600])
  assert str(error.value).startswith(f'{tmp_path}: saving step 2 failed (')
  assert str(error.value).endswith(
      f'the newest checkpoint, {tmp_path / "1"}, is intact')
  assert manager.all_steps() == [1]
  restored = manager.restore(1, {'w': jax.ShapeDtypeStruct((1 << 20,),
                                                           np.float32)})
  np.testing.assert_array_equal(restored['w'], state['w'])
  manager.close()


# ------------------------------------------- corrupt and failed, via CLI --

_BINDINGS = (*train_cli.FAST, 'SAVE_EVERY=5')


@pytest.fixture(scope='module')
def ten_steps(tmp_path_factory, compile_cache):
  """A 10-step run, checkpoints at 5 and 10 (the reference)."""
  model_dir = tmp_path_factory.mktemp('reliability') / 'reference'
  train_cli.train(compile_cache, model_dir, 10, *_BINDINGS)
  return model_dir


@pytest.mark.slow
def test_training_resumes_from_the_newest_checkpoint_that_verifies(
    ten_steps, tmp_path, compile_cache):
  model_dir = tmp_path / 'run'
  shutil.copytree(ten_steps, model_dir)
  bad = _largest_data_file(model_dir / 'checkpoints' / '10')
  _corrupt(bad, 'flipped')
  result = train_cli.train(compile_cache, model_dir, 10, *_BINDINGS)
  print('\n' + next(line for line in result.stderr.splitlines()
                    if 'CORRUPT' in line)[:400])
  assert f'CORRUPT CHECKPOINT: {bad}: contents changed' in result.stderr
  assert (f'Resuming from {model_dir / "checkpoints" / "5"}'
          in result.stderr)
  # Steps 6-10 ran again, exactly as the first time, and 10 is whole again.
  losses, reference = (train_cli.train_losses(d) for d in (model_dir,
                                                           ten_steps))
  assert losses == reference
  assert train_cli.steps(model_dir) == [5, 10]
  assert integrity.verify(model_dir / 'checkpoints' / '10')
  assert list((model_dir / 'checkpoints').glob('10.corrupt-*'))

  # The corrupt step as an init checkpoint: a clear error naming the file.
  aside = next((model_dir / 'checkpoints').glob('10.corrupt-*'))
  result = train_cli.train(
      compile_cache, tmp_path / 'init', 2, *_BINDINGS,
      f'INIT_CHECKPOINT="{aside}"', check=False)
  assert result.returncode == 1
  assert f'error: {aside / bad.relative_to(model_dir / "checkpoints" / "10")}'\
         f': contents changed' in result.stderr, result.stderr[-2000:]


# The disk fills while step 10 is written: every file write past 1 MiB fails
# (RLIMIT_FSIZE; SIGXFSZ ignored, so the writes return EFBIG), as on a full
# or size-limited file system.
_FULL_DISK_AT_10 = """
import resource, signal, sys
from t5x_adapt import checkpoints, train
save = checkpoints.training.CheckpointManager.save
def save_on_a_full_disk(self, step, *args, **kwargs):
  if step == 10:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE,
                       (1 << 20, resource.RLIM_INFINITY))
  save(self, step, *args, **kwargs)
checkpoints.training.CheckpointManager.save = save_on_a_full_disk
train.main(['train'] + sys.argv[1:])
"""


@pytest.mark.slow
def test_a_save_on_a_full_disk_fails_clearly_and_keeps_the_previous(
    ten_steps, tmp_path, compile_cache):
  model_dir = tmp_path / 'run'
  result = train_cli.train(compile_cache, model_dir, 10, *_BINDINGS,
                           driver=_FULL_DISK_AT_10, check=False)
  error = next((line for line in result.stderr.splitlines()
                if line.startswith('error: ')), result.stderr[-3000:])
  print(f'\n{error[:600]}')
  assert result.returncode == 1
  assert error.startswith(f'error: {model_dir / "checkpoints"}: saving step '
                          '10 failed (')
  assert error.endswith(f'no part of it became a checkpoint and the newest '
                        f'checkpoint, {model_dir / "checkpoints" / "5"}, is '
                        'intact')
  assert train_cli.steps(model_dir) == [5]
  assert integrity.verify(model_dir / 'checkpoints' / '5')
  # With space again, the run resumes from step 5 and ends as the reference.
  result = train_cli.train(compile_cache, model_dir, 10, *_BINDINGS)
  assert f'Resuming from {model_dir / "checkpoints" / "5"}' in result.stderr
  assert train_cli.steps(model_dir) == [5, 10]
  assert train_cli.train_losses(model_dir) == train_cli.train_losses(
      ten_steps)

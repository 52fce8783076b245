"""The training entry point: CLI runs, checkpoints, exact resume, SIGTERM,
resharding onto another mesh (t5x_adapt.train, t5x_adapt.checkpoints.training).

Runs are real `python -m t5x_adapt.train` subprocesses on tiny presets. Kills
are made deterministic by small driver programs that wrap one function of the
checkpoint modules and SIGKILL their own process at the chosen moment. All
subprocesses share a persistent XLA compilation cache, so only the first run
of each model and mesh pays for compiling.
"""

import json
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from t5x_adapt import checkpoints
from t5x_adapt import gin_utils

from train_cli import DECODER_ONLY, ENCODER_DECODER, FAST, REPO_ROOT
from train_cli import FakeIterator as _FakeIterator
from train_cli import args as _args
from train_cli import env as _env
from train_cli import flatten as _flatten
from train_cli import metrics as _metrics
from train_cli import saved_state as _saved_state
from train_cli import steps as _steps
from train_cli import train as _train
from train_cli import train_losses as _train_losses


# ------------------------------------------------------------ CLI runs --


def _check_run(model_dir, result, steps):
  model_dir = pathlib.Path(model_dir)
  metrics = _metrics(model_dir)
  train = [m for m in metrics if 'loss' in m]
  assert [m['step'] for m in train] == list(range(2, steps + 1, 2))
  for m in train:
    assert np.isfinite(m['loss']) and m['tokens_per_second'] > 0
    assert 0 < m['mfu'] < 1 and m['learning_rate'] > 0
  evals = [m for m in metrics if 'eval_loss' in m]
  assert [m['step'] for m in evals] == [3, 6]
  assert all(np.isfinite(m['eval_loss']) for m in evals)
  config = (model_dir / 'config.gin').read_text()
  assert f"MODEL_DIR = '{model_dir}'" in config
  for kind, tag in (('train', b'loss'), ('eval', b'loss')):
    events = list((model_dir / kind).glob('events.out.tfevents.*'))
    assert events and any(tag in e.read_bytes() for e in events), kind
  assert _steps(model_dir) == [3, 6]
  assert 'compiled step memory: argument' in result.stderr
  assert 'tok/s=' in result.stderr and 'mfu=' in result.stderr


@pytest.fixture(scope='module')
def decoder_only_run(tmp_path_factory, compile_cache):
  model_dir = tmp_path_factory.mktemp('run') / 'decoder_only'
  preset, task = DECODER_ONLY
  result = _train(compile_cache, model_dir, 6, *FAST, 'LOG_EVERY=2',
                  'EVAL_EVERY=3', 'EVAL_STEPS=1', 'SAVE_EVERY=3',
                  preset=preset, task=task)
  return model_dir, result


def test_cli_decoder_only(decoder_only_run):
  model_dir, result = decoder_only_run
  _check_run(model_dir, result, 6)
  assert 'Model vocabulary: 512 -> 8192' in result.stderr


@pytest.mark.slow
def test_cli_encoder_decoder(tmp_path, compile_cache):
  preset, task = ENCODER_DECODER
  result = _train(compile_cache, tmp_path, 6, *FAST, 'LOG_EVERY=2',
                  'EVAL_EVERY=3', 'EVAL_STEPS=1', 'SAVE_EVERY=3',
                  'TASK_FEATURE_LENGTHS={"inputs": 64, "targets": 64}',
                  preset=preset, task=task)
  _check_run(tmp_path, result, 6)


# -------------------------------------------------------------- resume --

# Saves as usual, then SIGKILLs itself once step 5 is committed.
_KILL_AFTER_SAVE = """
import os, signal, sys
from t5x_adapt import checkpoints, train
save = checkpoints.training.CheckpointManager.save
def save_then_die(self, step, *args, **kwargs):
  save(self, step, *args, **kwargs)
  if step == 5:
    self.wait()
    os.kill(os.getpid(), signal.SIGKILL)
checkpoints.training.CheckpointManager.save = save_then_die
train.main(['train'] + sys.argv[1:])
"""

# SIGKILLs itself in the middle of writing step 10 (after the input position,
# while the state may still be in flight).
_KILL_DURING_SAVE = """
import os, signal, sys
from t5x_adapt import checkpoints, train
save = checkpoints.training.InputStateHandler.save
def save_and_die(self, directory, args):
  save(self, directory, args)
  if '/10.orbax-checkpoint-tmp' in str(directory):
    os.kill(os.getpid(), signal.SIGKILL)
checkpoints.training.InputStateHandler.save = save_and_die
train.main(['train'] + sys.argv[1:])
"""


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_exact(tmp_path, compile_cache):
  bindings = (*FAST, 'SAVE_EVERY=5')
  reference, resumed = tmp_path / 'reference', tmp_path / 'resumed'
  _train(compile_cache, reference, 10, *bindings)

  # Killed right after the step-5 checkpoint is committed.
  killed = _train(compile_cache, resumed, 10, *bindings,
                  driver=_KILL_AFTER_SAVE, check=False)
  assert killed.returncode == -signal.SIGKILL
  assert _steps(resumed) == [5]

  # Resumed, then killed while writing step 10: step 5 stays the latest.
  killed = _train(compile_cache, resumed, 10, *bindings,
                  driver=_KILL_DURING_SAVE, check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert 'Resuming from' in killed.stderr
  leftovers = [p.name for p in (resumed / 'checkpoints').iterdir()]
  assert any(name.startswith('10.') for name in leftovers), leftovers
  assert _steps(resumed) == [5]

  # Resumed again from step 5, to the end.
  result = _train(compile_cache, resumed, 10, *bindings)
  assert f'Resuming from {resumed / "checkpoints" / "5"}' in result.stderr
  assert _steps(resumed) == [5, 10]

  expected, actual = _saved_state(reference, 10), _saved_state(resumed, 10)
  flat_expected = _flatten(expected)
  flat_actual = _flatten(actual)
  assert flat_actual.keys() == flat_expected.keys()
  assert any('params' in k for k in flat_actual)
  for key, value in flat_expected.items():
    assert np.array_equal(flat_actual[key], value), key
  # The resumed runs logged the same losses as the reference at every step.
  assert _train_losses(resumed) == _train_losses(reference)


def test_restore_skips_incomplete_step_directories(tmp_path):
  state = {'w': np.arange(6, dtype=np.float32).reshape(2, 3)}
  manager = checkpoints.training.CheckpointManager(tmp_path, keep=2)
  manager.save(4, state, _FakeIterator(4))
  manager.close()
  # A half-copied step directory, and an uncommitted orbax one.
  shutil.copytree(tmp_path / '4' / 'state', tmp_path / '9' / 'state')
  shutil.copytree(tmp_path / '4', tmp_path / '12.orbax-checkpoint-tmp-1')
  manager = checkpoints.training.CheckpointManager(tmp_path, keep=2)
  assert manager.latest_step() == 4
  iterator = _FakeIterator()
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored = manager.restore(4, target, iterator)
  manager.close()
  np.testing.assert_array_equal(restored['w'], state['w'])
  assert iterator.position == 4


def test_keeps_latest_and_best(tmp_path):
  manager = checkpoints.training.CheckpointManager(tmp_path, keep=2)
  losses = {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 2.5}
  for step, loss in losses.items():
    metrics = None if loss is None else {'eval_loss': loss}
    manager.save(step, {'w': np.full(3, step, np.float32)},
                 _FakeIterator(step), metrics=metrics)
  manager.wait()
  assert manager.all_steps() == [2, 4, 5]
  assert manager.best_step() == 2 and manager.best_loss() == 1.0
  manager.close()


# ----------------------------------------------------------- preemption --


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path,
                                                          compile_cache):
  command = [sys.executable, '-m', 't5x_adapt.train',
             *_args(tmp_path, 1000, *FAST, 'SAVE_EVERY=1000')]
  process = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(compile_cache),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  metrics_file = tmp_path / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and process.poll() is None:
    if (metrics_file.exists() and
        len(metrics_file.read_text().splitlines()) >= 2):
      break
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 0, stderr[-3000:]
  last = max(_train_losses(tmp_path))
  assert 2 <= last < 1000
  assert _steps(tmp_path) == [last]
  assert f'SIGTERM: saved step {last}, stopping' in stderr


# ------------------------------------------------------------- reshard --

# Trains on, and prints the per-device shard shapes of two large weights (and
# of the embedding's Adam moment) as restored and after the step.
_RESHARD = """
import json, sys
import jax
from t5x_adapt import checkpoints, train
restore = checkpoints.training.CheckpointManager.restore
shapes = {}
def shard_shapes(state):
  emb = state.params['decoder']['token_embedder']['embedding']
  gate = state.params['decoder']['layers']['block_0']['mlp']['gate']['kernel']
  mu = state.opt_state[1][0].mu['decoder']['token_embedder']['embedding']
  return {name: [list(s.data.shape) for s in x.addressable_shards]
          for name, x in (('embedding', emb), ('gate', gate), ('mu', mu))}
def restore_and_record(self, *args, **kwargs):
  state = restore(self, *args, **kwargs)
  shapes['restored'] = shard_shapes(state)
  return state
checkpoints.training.CheckpointManager.restore = restore_and_record
train_fn = train.train
def train_and_record():
  state = train_fn()
  shapes['trained'] = shard_shapes(state)
  shapes['devices'] = jax.device_count()
  print('SHAPES', json.dumps(shapes), flush=True)
  return state
train.train = train_and_record
train.main(['train'] + sys.argv[1:])
"""


@pytest.mark.slow
def test_restore_onto_another_mesh_reshards(decoder_only_run, tmp_path,
                                            compile_cache):
  source, _ = decoder_only_run
  model_dir = tmp_path / 'run'
  shutil.copytree(source, model_dir)
  result = _train(compile_cache, model_dir, 7, *FAST, 'DATA_PARALLELISM=2',
                  'FSDP_PARALLELISM=2', 'TENSOR_PARALLELISM=2',
                  driver=_RESHARD, devices=8)
  assert f'Resuming from {model_dir / "checkpoints" / "6"}' in result.stderr
  line = next(l for l in result.stdout.splitlines() if l.startswith('SHAPES'))
  shapes = json.loads(line[len('SHAPES'):])
  assert shapes['devices'] == 8
  # embedding [vocab, embed] -> (tensor, fsdp); gate [layers, embed, mlp]
  # -> (None, fsdp, tensor); the Adam moment follows its parameter.
  expected = {'embedding': [4096, 32], 'gate': [2, 32, 64],
              'mu': [4096, 32]}
  for when in ('restored', 'trained'):
    for name, shape in expected.items():
      assert shapes[when][name] == [shape] * 8, (when, name)
  assert 7 in _train_losses(model_dir)
  assert _steps(model_dir)[-1] == 7


# ------------------------------------------------------------- finetune --


@pytest.mark.slow
def test_finetune_starts_from_a_training_checkpoint(decoder_only_run,
                                                    tmp_path, compile_cache):
  source, _ = decoder_only_run
  init = source / 'checkpoints' / '6'
  result = _train(compile_cache, tmp_path, 2, *FAST,
                  f'INIT_CHECKPOINT="{init}"', run='finetune')
  assert f'Initialising parameters from {init}' in result.stderr
  assert "schedule.kind = %SCHEDULE" in (tmp_path / 'config.gin').read_text()
  assert sorted(_train_losses(tmp_path)) == [1, 2]
  # restore_params reads exactly the parameters of a training checkpoint.
  model = gin_utils.load_model('gemma2_tiny', vocab_size=8192)
  params = checkpoints.restore_params(init, model)
  saved = _flatten(_saved_state(source, 6)['params'])
  for key, value in _flatten(params).items():
    assert np.array_equal(value, saved[key]), key


@pytest.mark.slow
def test_save_initial_saves_the_state_training_starts_from(decoder_only_run,
                                                           tmp_path,
                                                           compile_cache):
  source, _ = decoder_only_run
  init = source / 'checkpoints' / '6'
  _train(compile_cache, tmp_path, 2, *FAST, 'SAVE_EVERY=2',
         f'INIT_CHECKPOINT="{init}"', 'train.save_initial=True',
         run='finetune')
  assert _steps(tmp_path) == [0, 2]
  start = _flatten(_saved_state(tmp_path, 0)['params'])
  for key, value in _flatten(_saved_state(source, 6)['params']).items():
    assert np.array_equal(value, start[key]), key

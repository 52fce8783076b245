"""Multi-host training on one machine: two hosts train as one does.

`python -m t5x_adapt.train` itself, through the launch scripts: two local
processes with 4 simulated CPU devices each (launch/train_multiprocess_cpu.sh;
`t5x_adapt.distributed.initialize`, gloo collectives) against one process
with 8 (launch/train_local.sh), with the same gin settings on the same
data=2, fsdp=2, tensor=2 mesh. Every host reads the same global batches and
feeds its rows of each (`t5x_adapt.data.pipeline`), so:

  - 10 steps on 2 hosts log the losses of the first 10 of 20 steps on 1 host;
  - those 10 steps on 2 hosts, resumed in the same MODEL_DIR for 10 more on
    1 host (the input position is saved once, for any number of hosts), log
    the losses of the 20 steps on 1 host.

The three runs (about 3.5 minutes on 2 CPU cores) are shared by the tests
(module fixtures) and marked slow. Run with `-s` to see the figures.

The in-process tests cover `initialize`'s argument and environment handling
without starting anything.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from t5x_adapt import distributed
from train_steps_worker import FAST_COMPILE_FLAGS

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RTOL = 1e-5
STEPS = 20
MESH = {'DATA_PARALLELISM': '2', 'FSDP_PARALLELISM': '2',
        'TENSOR_PARALLELISM': '2'}
# Tiny lengths and batch; a validation loss at steps 10 and 20; one
# checkpoint at step 10 to resume from. The schedule is pinned to STEPS so
# that a 10-step run follows the first half of the 20-step one.
GIN = ("--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 32}",
       '--gin.BATCH_SIZE=8', '--gin.LOG_EVERY=1', '--gin.EVAL_EVERY=10',
       '--gin.EVAL_STEPS=1', '--gin.SAVE_EVERY=10', '--gin.WARMUP_STEPS=5',
       f'--gin.schedule.total_steps={STEPS}')


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def _launch(model_dir: pathlib.Path, steps: int, hosts: int) -> str:
  """Trains t5gemma_tiny on `hosts` processes (8 devices in all); its log."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('JAX_', 'SLURM_', 'TPU_'))}
  env.update(MESH, PYTHON=sys.executable, PRESET='t5gemma_tiny',
             MODEL_DIR=str(model_dir), TRAIN_STEPS=str(steps),
             JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             XLA_FLAGS=FAST_COMPILE_FLAGS)
  if hosts == 1:
    script = 'launch/train_local.sh'
    env['XLA_FLAGS'] += ' --xla_force_host_platform_device_count=8'
  else:  # The script adds the device count.
    script = 'launch/train_multiprocess_cpu.sh'
    env.update(NUM_PROCESSES=str(hosts), DEVICES_PER_PROCESS=str(8 // hosts),
               PORT=str(_free_port()))
  result = subprocess.run(['bash', script, *GIN], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
  if result.returncode:
    logs = ''.join(f'\n--- {log}:\n' + log.read_text()[-3000:] for log in
                   sorted((model_dir / 'process_logs').glob('*.log')))
    pytest.fail(f'{script} exited with {result.returncode}:\n'
                f'{result.stderr[-3000:]}{logs}')
  return result.stderr


def _logged(model_dir: pathlib.Path) -> dict[str, dict[int, float]]:
  """{'loss': {step: value}, 'eval_loss': {step: value}} of metrics.jsonl."""
  out = {'loss': {}, 'eval_loss': {}}
  lines = (model_dir / 'metrics.jsonl').read_text().splitlines()
  for line in map(json.loads, lines):
    for key in out:
      if key in line:
        assert line['step'] not in out[key], f'{key} logged twice: {line}'
        out[key][line['step']] = line[key]
  return out


def _compare(name: str, got, reference) -> None:
  """Asserts equal losses at every step `got` logged; prints the figures."""
  for key, values in got.items():
    steps = sorted(values)
    mine = np.array([values[s] for s in steps])
    ref = np.array([reference[key][s] for s in steps])
    rel = np.max(np.abs(mine - ref) / np.abs(ref))
    where = steps if len(steps) < 3 else f'{steps[0]}..{steps[-1]}'
    print(f'\n{name}, {key} at steps {where}:'
          f'\n  1 host:  {np.round(ref, 6).tolist()}'
          f'\n  {name}: {np.round(mine, 6).tolist()}'
          f'\n  max relative difference: {rel:.2e}')
    np.testing.assert_allclose(mine, ref, rtol=RTOL, atol=0, err_msg=key)


@pytest.fixture(scope='module')
def one_host(tmp_path_factory):
  """What 20 steps on 1 host x 8 devices log: the reference."""
  model_dir = tmp_path_factory.mktemp('multihost') / 'one_host'
  _launch(model_dir, STEPS, hosts=1)
  return _logged(model_dir)


@pytest.fixture(scope='module')
def two_hosts(tmp_path_factory):
  """(MODEL_DIR, what it logged) of 10 steps on 2 hosts x 4 devices."""
  model_dir = tmp_path_factory.mktemp('multihost') / 'two_hosts'
  _launch(model_dir, STEPS // 2, hosts=2)
  return model_dir, _logged(model_dir)


@pytest.fixture(scope='module')
def resumed(two_hosts):
  """(log, what MODEL_DIR logged) after 10 more steps on 1 host."""
  model_dir, _ = two_hosts
  log = _launch(model_dir, STEPS, hosts=1)
  return log, _logged(model_dir)


@pytest.mark.slow
def test_two_hosts_log_the_losses_of_one(one_host, two_hosts):
  model_dir, logged = two_hosts
  # Process 0 alone writes: one line per step, not one per process.
  assert sorted(logged['loss']) == list(range(1, STEPS // 2 + 1))
  assert sorted(logged['eval_loss']) == [STEPS // 2]
  assert (model_dir / 'process_logs' / 'process_1.log').exists()
  _compare('2 hosts', logged, one_host)


@pytest.mark.slow
def test_resuming_on_another_host_count_reads_on(one_host, two_hosts,
                                                 resumed):
  model_dir, _ = two_hosts
  # One input position, written once for both hosts, read by the one.
  saved = model_dir / 'checkpoints' / str(STEPS // 2) / 'input'
  assert {p.name.split('.')[0] for p in saved.glob('input_state*')} == {
      'input_state'}
  log, logged = resumed
  assert f'Resuming from {saved.parent}' in log
  assert 'starts from its beginning' not in log
  assert sorted(logged['loss']) == list(range(1, STEPS + 1))
  assert sorted(logged['eval_loss']) == [STEPS // 2, STEPS]
  _compare('2 hosts, then 1', logged, one_host)


# ------------------------------------------------ initialize(), in-process --

_ENV = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
        distributed.ENV_PROCESS_ID, *distributed.SLURM_VARS)


@pytest.fixture
def clean_env(monkeypatch):
  for var in _ENV:
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setattr(distributed, '_on_cloud_tpu_vm', lambda: False)
  return monkeypatch


def test_single_process_initializes_nothing(clean_env):
  del clean_env
  assert not distributed.initialize()
  assert not jax.distributed.is_initialized()
  assert distributed.initialize('127.0.0.1:1234', 1, 0) is False
  assert not jax.distributed.is_initialized()


def test_mode_no_never_initializes(clean_env):
  clean_env.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1')
  assert not distributed.initialize(num_processes=2, process_id=0, mode='no')
  assert not jax.distributed.is_initialized()


def test_a_one_task_slurm_step_is_a_single_process(clean_env):
  for var in distributed.SLURM_VARS:
    clean_env.setenv(var, '0')
  clean_env.setenv('SLURM_NTASKS', '1')
  assert not distributed.initialize()
  assert not jax.distributed.is_initialized()


@pytest.mark.parametrize('kwargs, env, message', [
    ({'num_processes': 2, 'process_id': 0}, {}, 'no coordinator address'),
    ({'mode': 'sometimes'}, {}, "mode must be 'auto', 'yes' or 'no'"),
    ({'coordinator_address': '127.0.0.1:1'}, {}, 'needs num_processes'),
    ({'coordinator_address': '127.0.0.1:1', 'num_processes': 2,
      'process_id': 2}, {}, r'outside \[0, 2\)'),
    ({}, {'JAX_COORDINATOR_ADDRESS': '127.0.0.1:1',
          'JAX_NUM_PROCESSES': '2', 'JAX_PROCESS_ID': '-1'},
     r'outside \[0, 2\)'),
    ({}, {'JAX_NUM_PROCESSES': 'two'}, 'not an integer'),
])
def test_bad_settings_are_clear_errors(clean_env, kwargs, env, message):
  for var, value in env.items():
    clean_env.setenv(var, value)
  with pytest.raises(ValueError, match=message):
    distributed.initialize(**kwargs)
  assert not jax.distributed.is_initialized()


def test_process_rows_of_a_single_process():
  from t5x_adapt import partitioning  # pylint: disable=g-import-not-at-top
  sharding = partitioning.Partitioner().batch_sharding
  assert distributed.process_rows(sharding, 8) == slice(0, 8)

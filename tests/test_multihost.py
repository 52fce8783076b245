"""Multi-host training on one machine: two processes = one process.

Two local processes with 4 simulated CPU devices each, joined by
`t5x_adapt.distributed.initialize` (`jax.distributed` with gloo collectives),
train the tiny encoder-decoder for 5 steps on a data=2, fsdp=2, tensor=2
mesh; each feeds only its half of every global batch through
`Partitioner.shard_batch` (`jax.make_array_from_process_local_data`). Their
losses must equal those of one process with 8 devices on the same mesh and
batches. All three processes (tests/train_steps_worker.py) run at once. Run
with `-s` to see the figures.

The in-process tests cover `initialize`'s argument and environment handling
without starting anything. The two-process tests take about a minute on
2 CPU cores (marked slow).
"""

import json
import socket

import jax
import numpy as np
import pytest

from t5x_adapt import distributed
import train_steps_worker as worker

RTOL = 1e-5
MESH = '2,2,2'
# The encoder-decoder (the larger program); tests/test_trainer.py checks both
# presets across meshes. Add 'gemma2_tiny' here for both (about +50% time).
PRESETS = (worker.MODELS[0],)
JOBS = json.dumps([{'preset': preset} for preset in PRESETS])


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """(one process with 8 devices, [process 0, process 1] with 4 each)."""
  log_dir = tmp_path_factory.mktemp('multihost')
  address = f'127.0.0.1:{_free_port()}'
  started = [worker.start(['--devices', '8', '--mesh', MESH, '--jobs', JOBS],
                          log_dir, 'single')]
  started += [worker.start(['--devices', '4', '--mesh', MESH, '--jobs', JOBS,
                            '--coordinator_address', address,
                            '--num_processes', '2', '--process_id', str(i)],
                           log_dir, f'process{i}') for i in range(2)]
  single, *processes = worker.wait_all(started)
  return single, processes


@pytest.mark.slow
def test_processes_join_and_feed_their_half(results):
  single, processes = results
  assert (single['process_count'], single['device_count']) == (1, 8)
  for index, result in enumerate(processes):
    assert result['process_index'] == index
    assert (result['process_count'], result['device_count']) == (2, 8)
    for run in result['runs'].values():
      assert run['rows'] == [4 * index, 4 * index + 4]


@pytest.mark.slow
@pytest.mark.parametrize('preset', PRESETS)
def test_two_processes_give_the_losses_of_one(results, preset):
  single, processes = results
  reference = single['runs'][preset]['losses']
  first, second = (p['runs'][preset]['losses'] for p in processes)
  rel = np.max(np.abs(np.subtract(first, reference)) / np.abs(reference))
  print(f'\n{preset} losses, 1 process x 8 devices:  '
        f'{np.round(reference, 7).tolist()}'
        f'\n{preset} losses, 2 processes x 4 devices: '
        f'{np.round(first, 7).tolist()}'
        f'\n{preset} max relative difference: {rel:.2e}')
  assert first == second  # the loss is one replicated global value
  assert len(first) == 5
  np.testing.assert_allclose(first, reference, rtol=RTOL, atol=0)


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

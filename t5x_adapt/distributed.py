"""Multi-process (multi-host) start-up: `jax.distributed` from flags or env.

Every process of a multi-host job calls `initialize()` once, before anything
touches a device; the entry points (`python -m t5x_adapt.train`, `.eval`,
`.infer`) do so in `t5x_adapt.cli.run`, from its `--distributed`,
`--coordinator_address`, `--num_processes` and `--process_id` flags. Where
the settings come from, first match wins:

  1. Arguments (the launcher's `--coordinator_address`, `--num_processes`,
     `--process_id` flags).
  2. Environment: `JAX_COORDINATOR_ADDRESS` (`host:port` of process 0),
     `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`.
  3. A SLURM job step with more than one task (`srun`): JAX reads
     `SLURM_JOB_ID`, `SLURM_NTASKS`, `SLURM_PROCID`, ... itself.
  4. A Cloud TPU VM: JAX asks the TPU metadata server for the pod's workers
     (or, on GKE, reads `TPU_WORKER_HOSTNAMES`; JAX reads that variable only
     on a TPU VM, so it needs no rule of its own here).

Otherwise the job is a single process and nothing is initialised
(`mode='yes'` calls `jax.distributed.initialize` regardless, for clusters
that JAX detects and this module does not; `mode='no'` never does). On CPU
the cross-process collectives use gloo, so N local processes with simulated
devices (`XLA_FLAGS=--xla_force_host_platform_device_count=K`) behave like N
hosts: see `launch/train_multiprocess_cpu.sh`.

  # in a launcher, before any device is used:
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id, mode=FLAGS.distributed)
  rows = distributed.process_rows(partitioner.batch_sharding, batch_size)

Input pipelines stay independent of the number of hosts: every process reads
the same global batches and keeps its `process_rows` of each
(`t5x_adapt.data.pipeline`).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax

ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'
SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS',
              'SLURM_PROCID', 'SLURM_LOCALID')


def _env_int(name: str) -> Optional[int]:
  value = os.environ.get(name, '').strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name}={value!r} is not an integer') from None


def _in_slurm_job() -> bool:
  """True inside an `srun` step of more than one task."""
  if not all(v in os.environ for v in SLURM_VARS):
    return False
  return (_env_int('SLURM_NTASKS') or 1) > 1


def _on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM (where JAX finds the pod's workers itself)."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False))


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               mode: str = 'auto',
               cpu_collectives: Optional[str] = 'gloo') -> bool:
  """Joins this process to a multi-process JAX job, if it is part of one.

  Call it before anything touches a device. Idempotent: a second call (or one
  after `jax.distributed.initialize`) changes nothing.

  Args:
    coordinator_address: `host:port` of process 0's coordinator service;
      default `$JAX_COORDINATOR_ADDRESS`.
    num_processes: Processes in the job; default `$JAX_NUM_PROCESSES`.
    process_id: This process's index, 0-based; default `$JAX_PROCESS_ID`.
    mode: 'auto' (initialise when a coordinator is given or a SLURM job step
      or Cloud TPU VM is detected), 'yes' (always; JAX detects what is not
      given) or 'no' (never).
    cpu_collectives: Cross-process collectives of the CPU backend ('gloo',
      'mpi'); None leaves JAX's default. Only the CPU backend reads it.

  Returns:
    True when the distributed runtime is up, False for a single process.

  Raises:
    ValueError: An incomplete or inconsistent explicit configuration.
  """
  if mode not in ('auto', 'yes', 'no'):
    raise ValueError(f"mode must be 'auto', 'yes' or 'no', got {mode!r}")
  if mode == 'no':
    return False
  if jax.distributed.is_initialized():
    return True
  address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
  count = num_processes if num_processes is not None else _env_int(
      ENV_NUM_PROCESSES)
  index = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
  cluster = _in_slurm_job() or _on_cloud_tpu_vm()
  if mode == 'auto':
    if address is None and count is None and index is None and not cluster:
      return False
    if address is not None and count == 1 and index in (None, 0):
      return False
    if not cluster:
      _check(address, count, index)
  if cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', cpu_collectives)
  logging.info('jax.distributed: process %s of %s, coordinator %s', index,
               count, address)
  jax.distributed.initialize(coordinator_address=address,
                             num_processes=count, process_id=index)
  return True


def _check(address: Optional[str], count: Optional[int],
           index: Optional[int]) -> None:
  """Validates an explicit configuration (outside SLURM and TPU pods)."""
  if address is None:
    raise ValueError(f'no coordinator address: give --coordinator_address or '
                     f'${ENV_COORDINATOR} (num_processes={count}, '
                     f'process_id={index})')
  if count is None or index is None:
    raise ValueError(
        f'a coordinator address needs num_processes and process_id '
        f'(got {count}, {index}; flags --num_processes / --process_id or '
        f'${ENV_NUM_PROCESSES} / ${ENV_PROCESS_ID})')
  if count < 1:
    raise ValueError(f'num_processes must be >= 1, got {count}')
  if not 0 <= index < count:
    raise ValueError(f'process_id {index} is outside [0, {count})')


def is_main_process() -> bool:
  """True on process 0, the one that writes logs, summaries and configs."""
  return jax.process_index() == 0


def process_rows(batch_sharding: jax.sharding.Sharding,
                 global_batch_size: int) -> slice:
  """Rows of the global batch this process feeds to `shard_batch`.

  `jax.make_array_from_process_local_data` takes, on every process, the rows
  its devices hold, in order. Which rows those are follows from the mesh; on
  the usual meshes process i holds the i-th contiguous `1 / process_count`
  of the rows.

  Args:
    batch_sharding: The sharding of batch arrays (rank >= 1, the batch dim
      first), e.g. `Partitioner.batch_sharding`.
    global_batch_size: Examples per global batch.

  Returns:
    This process's rows of the batch dimension.

  Raises:
    ValueError: When the rows are not one contiguous range.
  """
  rank = len(getattr(batch_sharding, 'spec', ())) or 1
  shape = (global_batch_size,) + (1,) * (rank - 1)
  rows = set()
  for index in batch_sharding.addressable_devices_indices_map(shape).values():
    rows.update(range(*index[0].indices(global_batch_size)))
  lo, hi = min(rows), max(rows) + 1
  if len(rows) != hi - lo:
    raise ValueError(f'process {jax.process_index()} holds non-contiguous '
                     f'batch rows {sorted(rows)}')
  return slice(lo, hi)

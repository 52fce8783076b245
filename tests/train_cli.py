"""Runs of the training CLI for the tests: a real `python -m t5x_adapt.train`
subprocess on tiny presets, and readers of what it leaves in MODEL_DIR.

All subprocesses of a test session share a persistent XLA compilation cache
(the `compile_cache` fixture of conftest.py), so only the first run of each
model and mesh pays for compiling.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5x_adapt import checkpoints

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# Small shapes keep every step well under a second on the 2-core CPU.
FAST = ('TASK_FEATURE_LENGTHS={"targets": 64}', 'BATCH_SIZE=8', 'LOG_EVERY=1',
        'EVAL_EVERY=0')
DECODER_ONLY = ('gemma2_tiny', 'corpus_lm_spm8k')
ENCODER_DECODER = ('t5gemma_tiny', 'corpus_prefix_lm_spm8k')


def env(compile_cache, devices=1):
  """The environment of a training subprocess: CPU, `devices` of them."""
  variables = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu',
                   JAX_COMPILATION_CACHE_DIR=str(compile_cache),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                   PYTHONPATH=str(REPO_ROOT))
  variables['XLA_FLAGS'] = (
      f'--xla_force_host_platform_device_count={devices}')
  return variables


def args(model_dir, steps, *bindings, preset='gemma2_tiny',
         task='corpus_lm_spm8k', run='pretrain'):
  """Command-line flags: the run and preset gin files, then `bindings`."""
  flags = [f'--gin_file=gin/runs/{run}.gin',
           f'--gin_file=gin/models/{preset}.gin',
           f'--gin.MODEL_DIR="{model_dir}"', f'--gin.TRAIN_STEPS={steps}',
           f'--gin.MIXTURE_OR_TASK_NAME="{task}"']
  return flags + [f'--gin.{b}' for b in bindings]


def train(compile_cache, model_dir, steps, *bindings, driver=None,
          devices=1, check=True, **kwargs):
  """Runs the CLI (or `driver`, which calls it) to completion."""
  command_args = args(model_dir, steps, *bindings, **kwargs)
  if driver is None:
    command = [sys.executable, '-m', 't5x_adapt.train', *command_args]
  else:
    command = [sys.executable, '-c', textwrap.dedent(driver), *command_args]
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300,
                          env=env(compile_cache, devices))
  if check and result.returncode:
    pytest.fail(f'training exited with {result.returncode}:\n'
                f'{result.stderr[-4000:]}')
  return result


def _not_json(constant):
  raise ValueError(f'{constant} is not JSON (RFC 8259)')


def metrics(model_dir):
  """metrics.jsonl, parsed strictly: NaN / Infinity are errors."""
  lines = (pathlib.Path(model_dir) / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line, parse_constant=_not_json) for line in lines]


def train_losses(model_dir):
  """{step: loss} of the train log lines."""
  return {m['step']: m['loss'] for m in metrics(model_dir)
          if 'loss' in m and 'skipped' not in m}


def steps(model_dir):
  """Complete checkpoint steps, as the manager sees them."""
  manager = checkpoints.training.CheckpointManager(
      pathlib.Path(model_dir) / 'checkpoints')
  try:
    return manager.all_steps()
  finally:
    manager.close()


def saved_state(model_dir, step):
  """The TrainState tree of a checkpoint, as numpy arrays."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    return checkpointer.restore(
        pathlib.Path(model_dir) / 'checkpoints' / str(step) / 'state')
  finally:
    checkpointer.close()


def flatten(tree, prefix=''):
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f'{prefix}/{key}'))
    return out
  if isinstance(tree, (list, tuple)):
    out = {}
    for i, value in enumerate(tree):
      out.update(flatten(value, f'{prefix}/{i}'))
    return out
  return {prefix: np.asarray(tree)}


class FakeIterator:
  """Stands in for InputIterator: a position in a file per host."""

  def __init__(self, position=0):
    self.position = position

  def save(self, directory):
    os.makedirs(directory, exist_ok=True)
    pathlib.Path(directory, 'position').write_text(str(self.position))

  def restore(self, directory):
    self.position = int(pathlib.Path(directory, 'position').read_text())

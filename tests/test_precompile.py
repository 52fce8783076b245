"""`python -m t5x_adapt.precompile`: a run's training step compiled for a TPU
topology on this CPU machine (libtpu from the `tpu` extra), its per-chip
memory against the chip's HBM, and a clear failure when it does not fit."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from t5x_adapt import gin_utils
from t5x_adapt import optimizers
from t5x_adapt import partitioning
from t5x_adapt import precompile
from t5x_adapt import trainer as trainer_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_RECIPE = 'gin/adapt/t5gemma_tiny_prefixlm_kd.gin'


@pytest.mark.parametrize('name, grid, chips, accelerator_type', [
    ('v5p-8', (2, 2, 1), 4, 'v5p-8'),
    ('v5p-128', (4, 4, 4), 64, 'v5p-128'),
    ('v5p-256', (4, 4, 8), 128, 'v5p-256'),
    ('v5e-256', (16, 16), 256, 'v5e-256'),
    ('v6e-64', (8, 8), 64, 'v6e-64'),
    ('v5p:2x2x1', (2, 2, 1), 4, 'v5p-8'),
])
def test_topology_names(name, grid, chips, accelerator_type):
  topology = precompile.parse_topology(name)
  assert topology.grid == grid
  assert topology.num_chips == chips
  assert topology.accelerator_type == accelerator_type


@pytest.mark.parametrize('name, message', [
    ('v7x-8', 'unknown topology'),
    ('v5p-12', 'v5p-8, v5p-16'),
    ('v5e:2x2x2', '2 dimensions'),
])
def test_bad_topology_names_say_what_exists(name, message):
  with pytest.raises(ValueError, match=message):
    precompile.parse_topology(name)


def test_libtpu_describes_the_slice_without_a_tpu():
  devices = precompile.parse_topology('v5p:2x2x1').devices()
  assert len(devices) == 4
  assert {d.platform for d in devices} == {'tpu'}


def _precompile(tmp_path, *args):
  report = tmp_path / 'report.json'
  result = subprocess.run(
      [sys.executable, '-m', 't5x_adapt.precompile',
       f'--gin_file={TINY_RECIPE}', f'--json={report}', *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
  return result, (json.loads(report.read_text()) if report.exists() else None)


def test_tiny_recipe_compiles_for_v5p_2x2x1_and_reports_memory(tmp_path):
  result, report = _precompile(
      tmp_path, '--topology=v5p:2x2x1',
      # auto on a TPU: splash for the student (lengths of a tile at least),
      # blocked for the teacher (its sequence is not index-ordered; forcing
      # splash there raises).
      "--gin.StackConfig.attention_impl='auto'",
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 128, 'targets': 128}")
  assert result.returncode == 0, result.stderr[-3000:]
  lines = {line.split()[0]: line for line in result.stdout.splitlines()
           if line.strip()}
  assert 'v5p-8 (v5p:2x2x1, 4 chips)' in lines['topology']
  assert 'of 95.74 GiB HBM: fits' in lines['total']
  assert report['fits'] and report['chips'] == 4
  # Data parallel over the 4 chips: each holds the student, Adam's two
  # moments and the teacher (float32), plus its rows of the batch.
  student = report['parameters']
  assert report['argument_bytes'] >= 4 * 3 * student
  assert report['temp_bytes'] > 0
  assert report['total_bytes'] == (report['argument_bytes'] +
                                   report['output_bytes'] -
                                   report['alias_bytes'] +
                                   report['temp_bytes'])
  # Splash ran through Mosaic: forward, dq and dkv kernels per attention
  # layer kind of the student and the teacher's forward.
  assert report['mosaic_kernels'] >= 3
  assert report['analytic_flops'] > 0


@pytest.mark.slow
def test_a_step_that_does_not_fit_fails_naming_the_chip(tmp_path):
  result, report = _precompile(
      tmp_path, '--topology=v5e:1x1', '--gin.BATCH_SIZE=2048',
      "--gin.TASK_FEATURE_LENGTHS={'inputs': 2048, 'targets': 2048}")
  assert result.returncode == 1
  assert report is None
  assert 'does not fit v5e-1 (15.75 GiB HBM per chip)' in result.stderr


def test_fsdp_shards_the_lm_head_logits_by_batch():
  """The LM head's logits stay split over the batch under FSDP: the mesh is
  the abstract mesh of tracing, so the logical constraints on activations
  apply (under the legacy `with mesh:` they were silently dropped and XLA
  built the whole global batch's logits on every chip)."""
  model = gin_utils.load_model(
      'gemma2_tiny', ['DecoderOnlyModel.loss_chunk_length = None'],
      vocab_size=32768)
  topology = precompile.parse_topology('v5p:2x2x1')
  partitioner = partitioning.Partitioner(data=1, fsdp=-1,
                                         devices=topology.devices())
  trainer = trainer_lib.Trainer(model, partitioner,
                                optimizers.optimizer(learning_rate=1e-3))
  compiled = trainer.compile_step(trainer.batch_shapes({'targets': 128}, 8))
  hlo = compiled.as_text()
  assert 'f32[2,128,32768]' in hlo  # each chip's 2 rows
  assert '[8,128,32768]' not in hlo  # never the global batch's


def test_importing_with_libtpu_but_no_tpu_is_quiet_and_uses_the_cpu():
  # A user's environment: no platform chosen (conftest picks the CPU for
  # the tests), none of the variables this process's import of t5x_adapt
  # set.
  env = {k: v for k, v in os.environ.items()
         if not k.startswith('TPU_') and k not in (
             'ALLOW_MULTIPLE_LIBTPU_LOAD', 'JAX_PLATFORMS')}
  result = subprocess.run(
      [sys.executable, '-c',
       'import t5x_adapt, jax; print(jax.default_backend())'],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == 'cpu'
  for noise in ('TPU_WORKER_HOSTNAMES', 'TPU_ACCELERATOR_TYPE',
                'libtpu_init_utils'):
    assert noise not in result.stderr


@pytest.mark.parametrize('recipe', sorted(
    p.name for p in (REPO_ROOT / 'gin' / 'adapt').glob('t5gemma_*.gin')
    if 'tiny' not in p.name))
def test_every_pod_recipe_names_its_topology(recipe):
  text = (REPO_ROOT / 'gin' / 'adapt' / recipe).read_text()
  assert "include 'gin/adapt/pod.gin'" in text
  line = next(l for l in text.splitlines() if l.startswith('# Topology: '))
  name = line.removeprefix('# Topology: ').split('.')[0]
  assert precompile.parse_topology(name).chip.name == 'v5p'
  assert f'--topology={name}' in text

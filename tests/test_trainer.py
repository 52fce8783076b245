"""Trainer and Partitioner: mesh-independence, sharding, accumulation, freezing.

Training runs happen in subprocesses (tests/train_steps_worker.py), one per
device configuration, because the number of simulated CPU devices is fixed
when JAX starts. The module starts all of them at once on first use, so they
overlap; each test waits for the run it reads. Every run trains from seed 0
on the same deterministic numpy batches with AdamW (constant learning rate
3e-3, clipping at 1.0) in float32.

  one_device:   both tiny presets, 5 steps; and the encoder-decoder with
                everything but the decoder's cross-attention frozen, 2 steps.
  eight_device: both presets on 8 simulated devices, data=2, fsdp=2,
                tensor=2, 5 steps, plus per-device shard shapes.
  accumulate:   the encoder-decoder with k = 1, 2 and 4 microbatches, 2 steps
                of plain SGD (learning rate 1).

Gradient accumulation is checked with SGD because its update is linear in the
gradient: Adam's first step is about lr * sign(g), so on entries whose
gradient is near zero (|g| ~ eps) it turns float32 round-off in g into
parameter differences of order lr, however exact the accumulation is.

The runs take about a minute on 2 CPU cores, so the tests that read them are
marked slow. Run with `-s` to see the figures.
"""

import json

import jax
import numpy as np
import optax
import pytest

from t5x_adapt import gin_utils
from t5x_adapt import optimizers
from t5x_adapt import partitioning
from t5x_adapt import trainer as trainer_lib
import train_steps_worker as worker

ENC_DEC, DEC_ONLY = worker.MODELS
ACCUMULATION_STEPS = 2  # compared after the second step
# Everything but the decoder's cross-attention: the adaptation warm-up.
FROZEN = (r'^(?!decoder/layers/block_\d+/cross_attention/)',)
RTOL = 1e-5

RUNS = {
    'one_device': ('1', '1,1,1', [
        {'preset': ENC_DEC}, {'preset': DEC_ONLY},
        {'preset': ENC_DEC, 'name': 'frozen', 'steps': 2,
         'optimizer_kwargs': {'frozen': FROZEN, 'weight_decay': 0.1},
         'save_after': [0, 2]}]),
    'eight_device': ('8', '2,2,2', [
        {'preset': ENC_DEC, 'shards': True},
        {'preset': DEC_ONLY, 'shards': True}]),
    'accumulate': ('1', '1,1,1', [
        {'preset': ENC_DEC, 'name': f'k{k}', 'microbatches': k,
         'optimizer': 'sgd', 'steps': ACCUMULATION_STEPS,
         'save_after': [0, ACCUMULATION_STEPS]} for k in (1, 2, 4)]),
}


class _Runs:
  """The worker subprocesses of this module, started together."""

  def __init__(self, tmp_dir):
    self.dir = tmp_dir
    self._started = {
        name: worker.start(['--devices', devices, '--mesh', mesh,
                            '--jobs', json.dumps(jobs),
                            '--out_dir', str(tmp_dir)], tmp_dir, name)
        for name, (devices, mesh, jobs) in RUNS.items()}
    self._results = {}

  def __getitem__(self, name: str) -> dict:
    if name not in self._results:
      self._results[name] = worker.wait_all([self._started[name]])[0]
    return self._results[name]

  def params(self, name: str, step: int) -> dict:
    with np.load(self.dir / f'{name}_step{step}.npz') as data:
      return dict(data)

  def stop(self):
    worker.stop(list(self._started.values()))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  started = _Runs(tmp_path_factory.mktemp('train_runs'))
  yield started
  started.stop()


def _max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


def _max_rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


# ------------------------------------------------------------ partitioner --


def test_mesh_shape_fills_minus_one():
  assert partitioning.mesh_shape(8, -1, 2, 2) == (2, 2, 2)
  assert partitioning.mesh_shape(8, 2, -1, 1) == (2, 4, 1)
  assert partitioning.mesh_shape(8, 1, 1, -1) == (1, 1, 8)
  assert partitioning.mesh_shape(8, 2, 2, 2) == (2, 2, 2)
  assert partitioning.mesh_shape(1, -1, 1, 1) == (1, 1, 1)


def test_partitioner_fills_data_with_every_device():
  count = len(jax.devices())
  partitioner = partitioning.Partitioner()  # data=-1: every device
  assert dict(partitioner.mesh.shape) == {'data': count, 'fsdp': 1,
                                          'tensor': 1}
  assert partitioner.data_parallel_size == count


@pytest.mark.parametrize('num_devices, sizes, message', [
    (8, (-1, -1, 2), 'at most one mesh axis may be -1'),
    (8, (3, -1, 1), r'8 devices do not split into the fixed mesh axes'),
    (8, (2, 2, 1), r'needs 4 devices, 8 available'),
    (4, (2, 2, 2), r'needs 8 devices, 4 available'),
])
def test_mesh_shape_errors(num_devices, sizes, message):
  with pytest.raises(ValueError, match=message):
    partitioning.mesh_shape(num_devices, *sizes)


def test_partitioner_too_many_devices_is_a_clear_error():
  count = len(jax.devices())
  with pytest.raises(ValueError,
                     match=f'needs {2 * count} devices, {count} available'):
    partitioning.Partitioner(data=count, fsdp=2, tensor=1)




def test_adam_moments_take_their_own_parameter_sharding():
  """Moments are sharded like their own parameter, matched by path.

  t5gemma_s_s is multi-head (heads == kv_heads): its query and key kernels
  share a shape but not a sharding, so a match by shape would mix them up.
  Only eval_shape runs; nothing is allocated.
  """
  model = gin_utils.load_model('t5gemma_s_s')
  state_trainer = trainer_lib.Trainer(model, partitioning.Partitioner(),
                                      optimizers.optimizer('adamw', 1e-3))
  shardings = state_trainer.state_shardings()
  attention = shardings.params['decoder']['layers']['block_0'][
      'self_attention']
  assert attention['query']['kernel'].spec != attention['key']['kernel'].spec
  param_specs = jax.tree_util.tree_map(lambda s: s.spec, shardings.params)
  for moment in ('mu', 'nu'):
    moment_specs = jax.tree_util.tree_map(
        lambda s: s.spec, optax.tree_utils.tree_get(shardings.opt_state,
                                                    moment))
    assert moment_specs == param_specs, moment


# ------------------------------------------------ acceptance 1: mesh-free --


@pytest.mark.slow
@pytest.mark.parametrize('preset', worker.MODELS)
def test_one_and_eight_devices_give_the_same_losses(runs, preset):
  one = runs['one_device']
  eight = runs['eight_device']
  assert (one['device_count'], eight['device_count']) == (1, 8)
  a = one['runs'][preset]['losses']
  b = eight['runs'][preset]['losses']
  print(f'\n{preset} losses, 1 device:  {np.round(a, 7).tolist()}'
        f'\n{preset} losses, 8 devices: {np.round(b, 7).tolist()}'
        f'\n{preset} max relative difference: {_max_rel(b, a):.2e}')
  assert len(a) == len(b) == 5
  np.testing.assert_allclose(b, a, rtol=RTOL, atol=0)
  assert a[0] != a[-1]  # it trains


# Per-device shard shapes on the 2x2x2 mesh, as DEFAULT_RULES say: embed over
# fsdp, vocab / heads / mlp over tensor, layers / kv_heads / head_dim
# replicated. Global shapes of gemma2_tiny: embed 64, mlp 128, vocab 512,
# 4 heads (2 KV heads) of 16, 2 scanned layers per block.
EXPECTED_SHARDS = {
    'token_embedder/embedding': ([512, 64], [256, 32]),  # vocab, embed
    'layers/block_0/mlp/gate/kernel': ([2, 64, 128], [2, 32, 64]),
    'layers/block_1/mlp/down/kernel': ([2, 128, 64], [2, 64, 32]),
    'layers/block_0/self_attention/query/kernel': ([2, 64, 4, 16],
                                                   [2, 32, 2, 16]),
    'layers/block_0/self_attention/key/kernel': ([2, 64, 2, 16],
                                                 [2, 32, 2, 16]),
    'layers/block_1/self_attention/out/kernel': ([2, 4, 16, 64],
                                                 [2, 2, 16, 32]),
    'layers/block_0/pre_mlp_norm/scale': ([2, 64], [2, 32]),
    'final_norm/scale': ([64], [32]),
}


@pytest.mark.slow
@pytest.mark.parametrize('preset, stack', [(DEC_ONLY, 'decoder'),
                                           (ENC_DEC, 'encoder'),
                                           (ENC_DEC, 'decoder')])
def test_shard_shapes_follow_the_rules(runs, preset, stack):
  shards = runs['eight_device']['runs'][preset]['shards']
  for name, (global_shape, shard_shape) in EXPECTED_SHARDS.items():
    path = f'{stack}/{name}'
    got = shards[path]
    assert got['global'] == global_shape, path
    assert got['shard'] == shard_shape, (path, got)
    assert got['adam_mu_shard'] == shard_shape, (path, got)
  if preset == ENC_DEC and stack == 'decoder':
    cross = shards['decoder/layers/block_0/cross_attention/query/kernel']
    assert cross['shard'] == [2, 32, 2, 16]
  embedding = shards[f'{stack}/token_embedder/embedding']
  gate = shards[f'{stack}/layers/block_0/mlp/gate/kernel']
  print(f'\n{preset} {stack} on data=2, fsdp=2, tensor=2: embedding '
        f'{embedding["global"]} -> {embedding["shard"]} per device, mlp '
        f'gate {gate["global"]} -> {gate["shard"]}')


# --------------------------------------- acceptance 4: gradient accumulation --


@pytest.mark.slow
@pytest.mark.parametrize('k', [2, 4])
def test_gradient_accumulation_matches_the_full_batch(runs, k):
  full = runs['accumulate']['runs']['k1']
  accumulated = runs['accumulate']['runs'][f'k{k}']
  reference = runs.params('k1', ACCUMULATION_STEPS)
  params = runs.params(f'k{k}', ACCUMULATION_STEPS)
  initial = runs.params('k1', 0)
  assert params.keys() == reference.keys()
  param_diff = max(_max_abs(params[p], reference[p]) for p in reference)
  update = max(_max_abs(reference[p], initial[p]) for p in reference)
  print(f'\nk={k} microbatches vs the full batch of {worker.BATCH_SIZE}: '
        f'losses {accumulated["losses"]} vs {full["losses"]} (max relative '
        f'difference {_max_rel(accumulated["losses"], full["losses"]):.2e}), '
        f'gradient norms max relative difference '
        f'{_max_rel(accumulated["grad_norms"], full["grad_norms"]):.2e}, '
        f'parameters after {ACCUMULATION_STEPS} SGD steps max absolute '
        f'difference {param_diff:.2e} (largest update {update:.2e})')
  np.testing.assert_allclose(accumulated['losses'], full['losses'], rtol=RTOL,
                             atol=0)
  np.testing.assert_allclose(accumulated['grad_norms'], full['grad_norms'],
                             rtol=RTOL, atol=0)
  for path in reference:
    np.testing.assert_allclose(params[path], reference[path], rtol=RTOL,
                               atol=RTOL, err_msg=path)
  assert update > 1e-2  # the steps moved the parameters


# ----------------------------------------------------------------- freezing --


@pytest.mark.slow
def test_frozen_parameters_are_bitwise_unchanged(runs):
  assert len(runs['one_device']['runs']['frozen']['losses']) == 2
  before = runs.params('frozen', 0)
  after = runs.params('frozen', 2)
  trained = [p for p in before if '/cross_attention/' in p]
  frozen = [p for p in before if p not in trained]
  assert len(trained) == 8 and len(frozen) > 40
  for path in frozen:
    np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  changed = [float(np.mean(after[p] != before[p])) for p in trained]
  assert min(changed) > 0.99, dict(zip(trained, changed))
  print(f'\nfrozen: {len(frozen)} parameters bitwise unchanged; in the '
        f'{len(trained)} trained cross-attention kernels at least '
        f'{min(changed):.1%} of the entries changed')


def test_fresh_model_shapes_inside_a_mesh_context():
  """A library user may first ask a model for its shapes inside
  `Partitioner.context()` (the loaders build models there): the trace must
  not depend on the caller's mesh and rules."""
  model = gin_utils.load_model('gemma2_tiny', vocab_size=72, num_layers=3)
  partitioner = partitioning.Partitioner()
  with partitioner.context():
    shapes = model.param_shapes()
    axes = model.logical_axes()
  assert (jax.tree_util.tree_structure(shapes) ==
          jax.tree_util.tree_structure(
              axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
  assert shapes['decoder']['token_embedder']['embedding'].shape[0] == 72

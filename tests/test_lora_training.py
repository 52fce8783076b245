"""LoRA runs (`gin/finetune/lora.gin`) and their export for `peft`.

A real `python -m t5x_adapt.train` run tunes adapters alone on an SFT task:
the response loss falls, the checkpoints and the optimizer state hold the
adapters alone (their bytes printed), the base never changes. Adapters
exported as a PEFT directory, loaded by `peft` onto the transformers
export of the base, give our logits; merged through `save_hf`, too.

Run with `-s` to see the losses and errors.
"""

import json
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import train_cli
from t5x_adapt import checkpoints
from t5x_adapt import gin_utils
from t5x_adapt import lora
from t5x_adapt import lora_runs
from t5x_adapt import optimizers
from t5x_adapt import partitioning
from t5x_adapt import quantization
from t5x_adapt import trainer as trainer_lib
from t5x_adapt.config import config_to_dict
from t5x_adapt.convert import peft_adapters
from t5x_adapt.convert.hf import save_hf

peft = pytest.importorskip('peft')

TASK = 'sft_sentiment_spm8k'
VOCAB = 8192  # The task's.
STEPS = 50
CROSS_AND_MLP = (r'.*/cross_attention/(query|key|value|out)'
                 r'|.*/mlp/(gate|up|down)')


def _save_base(preset, path):
  model = gin_utils.load_model(preset, vocab_size=VOCAB)
  params = jax.jit(model.get_initial_variables)(jax.random.PRNGKey(0))
  checkpoints.save_params(path, params['params'],
                          metadata={'config': config_to_dict(model.config)})
  return model


@pytest.fixture(scope='module', params=[
    't5gemma_tiny', pytest.param('gemma2_tiny', marks=pytest.mark.slow)])
def lora_run(request, tmp_path_factory, compile_cache):
  """(preset, base checkpoint, MODEL_DIR, the run's stderr) of 50 LoRA SFT
  steps on a base checkpoint."""
  preset = request.param
  root = tmp_path_factory.mktemp(f'lora_{preset}')
  base_dir, model_dir = root / 'base', root / 'run'
  _save_base(preset, base_dir)
  stderr = _run_cli(compile_cache, model_dir, base_dir, preset,
                    '--gin_file=gin/finetune/lora.gin')
  return preset, base_dir, model_dir, stderr


def _run_cli(compile_cache, model_dir, base_dir, preset, *extra):
  flags = [f'--gin_file=gin/models/{preset}.gin',
           '--gin_file=gin/finetune/sft.gin', *extra,
           f'--gin.MIXTURE_OR_TASK_NAME="{TASK}"',
           f'--gin.INIT_CHECKPOINT="{base_dir}"',
           f'--gin.MODEL_DIR="{model_dir}"', f'--gin.TRAIN_STEPS={STEPS}',
           '--gin.BATCH_SIZE=8', '--gin.LOG_EVERY=1', '--gin.EVAL_EVERY=0',
           f'--gin.SAVE_EVERY={STEPS}',
           '--gin.TASK_FEATURE_LENGTHS={"inputs": 64, "targets": 16}']
  result = subprocess.run(
      [sys.executable, '-m', 't5x_adapt.train', *flags],
      cwd=train_cli.REPO_ROOT, capture_output=True, text=True, timeout=600,
      env=train_cli.env(compile_cache))
  if result.returncode:
    pytest.fail(f'run failed:\n{result.stderr[-4000:]}')
  return result.stderr


def _bytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))


def test_lora_run_lowers_the_response_loss(lora_run):
  preset, _, model_dir, _ = lora_run
  losses = train_cli.train_losses(model_dir)
  first = np.mean([losses[s] for s in range(1, 6)])
  last = np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)])
  print(f'\n{preset} LoRA SFT response loss: steps 1-5 {first:.3f}, '
        f'steps {STEPS - 4}-{STEPS} {last:.3f}')
  assert last < first - 1.0


def test_lora_checkpoints_and_optimizer_state_are_the_adapters(lora_run):
  """The saved state's parameters are adapters only; AdamW's moments are
  two copies of them (plus step counts), and the run printed their size."""
  preset, _, model_dir, stderr = lora_run
  state = train_cli.saved_state(model_dir, STEPS)
  params = train_cli.flatten(state['params'])
  assert params and all(re.search(r'kernel_lora_[ab]$', k) for k in params)
  moments = {k: v for k, v in train_cli.flatten(state['opt_state']).items()
             if v.ndim}
  assert _bytes(moments) == 2 * _bytes(params)
  printed = re.search(r'optimizer state ([\d.,]+) MiB', stderr).group(1)
  opt_bytes = _bytes(train_cli.flatten(state['opt_state']))
  assert float(printed) == pytest.approx(round(opt_bytes / 2**20, 2))
  print(f'\n{preset}: adapters {_bytes(params):,} bytes, optimizer state '
        f'{opt_bytes:,} bytes ({printed} MiB printed)')


@pytest.mark.parametrize('qtype', ['int4', pytest.param(
    'int8', marks=pytest.mark.slow)])
def test_qlora_run_holds_the_base_quantized_and_lowers_the_loss(
    qtype, tmp_path, compile_cache):
  """QLoRA (gin/finetune/qlora.gin): the frozen base's kernels in int4
  (blocks of 64 inputs) or int8, its bytes printed; the loss falls."""
  preset = 't5gemma_tiny'
  model = _save_base(preset, tmp_path / 'base')
  stderr = _run_cli(compile_cache, tmp_path / 'run', tmp_path / 'base',
                    preset, '--gin_file=gin/finetune/qlora.gin',
                    f'--gin.QLORA_QTYPE="{qtype}"')
  losses = train_cli.train_losses(tmp_path / 'run')
  first = np.mean([losses[s] for s in range(1, 6)])
  last = np.mean([losses[s] for s in range(STEPS - 4, STEPS + 1)])
  config = lora.LoraConfig(base_qtype=qtype, base_tile_size=64)
  frozen = lora.LoraModel(model, config).frozen_models()['base_params']
  expected = quantization.num_bytes(frozen.param_shapes())
  float_bytes = quantization.num_bytes(model.param_shapes())
  printed = float(re.search(r'frozen base_params ([\d.,]+) MiB',
                            stderr).group(1))
  print(f'\nQLoRA {qtype}: base {expected:,} bytes ({printed} MiB printed; '
        f'float32 {float_bytes:,}), loss steps 1-5 {first:.3f}, steps '
        f'{STEPS - 4}-{STEPS} {last:.3f}')
  assert printed == pytest.approx(round(expected / 2**20, 2))
  assert expected < float_bytes
  assert last < first - 1.0


def _random_batch(model):
  rng = np.random.RandomState(0)
  batch = {'decoder_input_tokens': rng.randint(1, 200, (2, 12))}
  if model.is_encoder_decoder:
    batch['encoder_input_tokens'] = rng.randint(1, 200, (2, 16))
  return {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}


def test_train_steps_leave_the_base_bitwise_unchanged():
  """The trainer's own steps: adapters move, the frozen base does not (it
  is an argument of the step, not donated, never updated)."""
  model = gin_utils.load_model('t5gemma_tiny')
  base = jax.jit(model.get_initial_variables)(jax.random.PRNGKey(0))['params']
  lora_model = lora.LoraModel(model, lora.LoraConfig(rank=4))
  frozen, trained = lora_model.start(base, jax.random.PRNGKey(1))
  before = jax.tree_util.tree_map(np.array, frozen)
  trainer = trainer_lib.Trainer(lora_model, partitioning.Partitioner(),
                                optimizers.optimizer(learning_rate=1e-2))
  state = trainer.init_state(params=trained)
  batch = {**_random_batch(model),
           'decoder_target_tokens': _random_batch(model)[
               'decoder_input_tokens']}
  for _ in range(3):
    state, _ = trainer.train_step(state, batch, {'base_params': frozen})
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: np.array_equal(a, np.asarray(b)), before, frozen))
  moved = [float(np.abs(np.asarray(x)).max()) for p, x in
           jax.tree_util.tree_flatten_with_path(state.params)[0]
           if p[-1].key == 'kernel_lora_b']
  assert moved and min(moved) > 0


# ------------------------------------------------------------------ PEFT --


def _hf_logits(directory, model, batch, adapter=None):
  auto = (transformers.AutoModelForSeq2SeqLM if model.is_encoder_decoder
          else transformers.AutoModelForCausalLM)
  hf_model = auto.from_pretrained(directory, dtype=torch.float32)
  if adapter is not None:
    hf_model = peft.PeftModel.from_pretrained(hf_model, adapter)
  hf_model.eval()
  tokens = {k: torch.tensor(np.asarray(v)) for k, v in batch.items()}
  with torch.no_grad():
    if model.is_encoder_decoder:
      out = hf_model(input_ids=tokens['encoder_input_tokens'],
                     decoder_input_ids=tokens['decoder_input_tokens'])
    else:
      out = hf_model(input_ids=tokens['decoder_input_tokens'])
  return out.logits.numpy()


def _relative_error(theirs, ours):
  return float(np.abs(theirs - ours).max() / np.abs(ours).max())


@pytest.mark.parametrize('preset,targets', [
    ('t5gemma_tiny', CROSS_AND_MLP),
    ('gemma2_tiny', None),
    pytest.param('t5gemma2_tiny', None, marks=pytest.mark.slow),
])
def test_peft_round_trip(preset, targets, tmp_path):
  """Ours with adapters vs transformers + peft on the exported base with
  the exported adapter directory; the merged export gives the same."""
  model = gin_utils.load_model(preset)
  base = jax.jit(model.get_initial_variables)(jax.random.PRNGKey(0))['params']
  config = lora.LoraConfig(rank=4, alpha=8.0, targets=targets)
  lora_model = lora.LoraModel(model, config)
  kept, adapters = lora.split_adapters(
      lora.init_adapters(lora_model, base, jax.random.PRNGKey(1)))
  rng = np.random.RandomState(2)
  adapters = jax.tree_util.tree_map(
      lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype),
      adapters)
  params = lora.join(kept, adapters)
  batch = _random_batch(model)
  ours = np.asarray(jax.jit(lora_model.adapted.compute_logits)(params, batch))
  base_logits = np.asarray(jax.jit(model.compute_logits)(base, batch))

  save_hf(model, base, tmp_path / 'base')
  peft_adapters.save_peft(model, adapters, config, tmp_path / 'adapter')
  theirs = _hf_logits(tmp_path / 'base', model, batch, tmp_path / 'adapter')
  save_hf(model, lora.merge_adapters(params, config), tmp_path / 'merged')
  merged = _hf_logits(tmp_path / 'merged', model, batch)
  error, merged_error = (_relative_error(theirs, ours),
                         _relative_error(merged, theirs))
  print(f'\n{preset}: peft vs ours max relative logit error {error:.2e}, '
        f'merged save_hf vs peft {merged_error:.2e} (adapters moved the '
        f'logits by {np.abs(ours - base_logits).max():.2f})')
  assert np.abs(ours - base_logits).max() > 0.1
  assert error <= 1e-4
  assert merged_error <= 1e-4
  if targets == CROSS_AND_MLP:
    names = json.loads((tmp_path / 'adapter' / peft_adapters.CONFIG_FILE
                        ).read_text())['target_modules']
    assert names and all(re.search(r'(cross_attn|mlp)\.', n) for n in names)


@pytest.mark.parametrize('lora_run', ['t5gemma_tiny'], indirect=True)
def test_a_runs_adapters_export_and_merge_through_the_cli(lora_run,
                                                          tmp_path):
  """`python -m t5x_adapt.lora_runs export|merge` on the trained run: peft on the
  exported base = ours = the merged checkpoint."""
  _, _, model_dir, _ = lora_run
  for command, out in (('export', tmp_path / 'export'),
                       ('merge', tmp_path / 'merged')):
    subprocess.run([sys.executable, '-m', 't5x_adapt.lora_runs', command,
                    str(model_dir), str(out)] + (['--hf'] if command ==
                                                 'merge' else []),
                   cwd=train_cli.REPO_ROOT, check=True, capture_output=True)
  run = lora_runs.read_run(model_dir)
  model = run.model.base
  batch = _random_batch(model)
  ours = np.asarray(jax.jit(run.model.adapted.compute_logits)(run.params,
                                                               batch))
  theirs = _hf_logits(tmp_path / 'export' / 'base', model, batch,
                      tmp_path / 'export' / 'adapter')
  merged = _hf_logits(tmp_path / 'merged', model, batch)
  assert _relative_error(theirs, ours) <= 1e-4
  assert _relative_error(merged, ours) <= 1e-4


def test_lora_run_without_a_base_is_refused(tmp_path, compile_cache):
  flags = train_cli.args(tmp_path / 'lora', 2, preset='gemma2_tiny',
                         task=TASK) + ['--gin_file=gin/finetune/lora.gin']
  result = subprocess.run([sys.executable, '-m', 't5x_adapt.train', *flags],
                          cwd=train_cli.REPO_ROOT, capture_output=True,
                          text=True, timeout=300,
                          env=train_cli.env(compile_cache))
  assert result.returncode
  assert 'a LoRA run needs a base to tune' in result.stderr


@pytest.mark.slow
def test_lora_over_prefixlm_kd_adaptation(tmp_path, compile_cache):
  """lora.gin over the PrefixLM + KD recipe: the base is the adaptation of
  the decoder-only source (saved once as MODEL_DIR/lora_base), the teacher
  the source; both frozen beside the adapters; the run merges."""
  source = tmp_path / 'source'
  _save_base('gemma2_tiny', source)
  model_dir = tmp_path / 'run'
  flags = ['--gin_file=gin/adapt/t5gemma_tiny_prefixlm_kd.gin',
           '--gin_file=gin/finetune/lora.gin',
           f'--gin.SOURCE_CHECKPOINT="{source}"',
           f'--gin.MODEL_DIR="{model_dir}"', '--gin.TRAIN_STEPS=10',
           '--gin.BATCH_SIZE=8', '--gin.EVAL_EVERY=0', '--gin.SAVE_EVERY=10']
  result = subprocess.run(
      [sys.executable, '-m', 't5x_adapt.train', *flags],
      cwd=train_cli.REPO_ROOT, capture_output=True, text=True, timeout=600,
      env=train_cli.env(compile_cache))
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'frozen teacher_params' in result.stderr
  assert 'frozen base_params' in result.stderr
  run = lora_runs.read_run(model_dir)
  # The saved base is the adaptation: the encoder's first query kernel is
  # the source's.
  source_params = checkpoints.restore_params(
      source, gin_utils.load_model('gemma2_tiny', vocab_size=VOCAB))
  np.testing.assert_array_equal(
      np.asarray(run.base['encoder']['layers']['block_0']['self_attention'][
          'query']['kernel']),
      np.asarray(source_params['decoder']['layers']['block_0'][
          'self_attention']['query']['kernel']))
  merged = run.merged()
  assert set(merged) == set(run.model.base.param_shapes())


@pytest.mark.slow
def test_lora_classifier_trains_its_head_beside_the_adapters(
    tmp_path, compile_cache):
  """LORA_TRAINED = 'classifier/.*': the fresh head trains in full, the
  backbone through its adapters; the checkpoint holds both, nothing else."""
  _save_base('t5gemma_tiny', tmp_path / 'base')
  flags = ['--gin_file=gin/models/t5gemma_tiny.gin',
           '--gin_file=gin/finetune/classification.gin',
           '--gin_file=gin/finetune/lora.gin',
           '--gin.BACKBONE=@EncoderDecoderModel()', '--gin.NUM_CLASSES=2',
           '--gin.MIXTURE_OR_TASK_NAME="sentiment_cls_spm8k"',
           f'--gin.INIT_CHECKPOINT="{tmp_path / "base"}"',
           f'--gin.MODEL_DIR="{tmp_path / "run"}"', '--gin.TRAIN_STEPS=10',
           '--gin.LORA_TRAINED="classifier/.*"', '--gin.BATCH_SIZE=8',
           '--gin.EVAL_EVERY=0', '--gin.SAVE_EVERY=10']
  result = subprocess.run(
      [sys.executable, '-m', 't5x_adapt.train', *flags],
      cwd=train_cli.REPO_ROOT, capture_output=True, text=True, timeout=600,
      env=train_cli.env(compile_cache))
  assert result.returncode == 0, result.stderr[-4000:]
  params = train_cli.flatten(train_cli.saved_state(tmp_path / 'run',
                                                   10)['params'])
  heads = [k for k in params if k.startswith('/classifier/')]
  assert heads and all(k in heads or re.search(r'kernel_lora_[ab]$', k)
                       for k in params)
  assert any(re.search(r'kernel_lora_[ab]$', k) for k in params)

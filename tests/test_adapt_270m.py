"""The 270M-270M recipe adapts the real Gemma 3 270M (slow: ~0.6B parameters).

Runs gin/adapt/t5gemma_270m_270m_prefixlm_kd.gin, the file a TPU user would
launch, through `python -m t5x_adapt.train` on this CPU with short sequences,
float32 and no rematerialisation, and checks that the distillation loss and
the validation loss fall.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from t5x_adapt import assets

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
STEPS = 6


@pytest.mark.slow
def test_270m_recipe_adapts_the_real_gemma3_270m(tmp_path):
  assets.gemma3_270m_gguf()  # fetched once, outside the timed run
  model_dir = tmp_path / 't5gemma_270m'
  command = [
      sys.executable, '-m', 't5x_adapt.train',
      '--gin_file=gin/adapt/t5gemma_270m_270m_prefixlm_kd.gin',
      f'--gin.MODEL_DIR="{model_dir}"', f'--gin.TRAIN_STEPS={STEPS}',
      '--gin.TASK_FEATURE_LENGTHS={"inputs": 32, "targets": 32}',
      '--gin.BATCH_SIZE=2', "--gin.StackConfig.dtype='float32'",
      "--gin.StackConfig.remat_policy='none'", '--gin.FSDP_PARALLELISM=1',
      '--gin.LEARNING_RATE=1e-4', '--gin.WARMUP_STEPS=1',
      "--gin.SCHEDULE='constant'", '--gin.LOG_EVERY=1', '--gin.EVAL_EVERY=2',
      '--gin.EVAL_STEPS=2', '--gin.SAVE_EVERY=1000', '--gin.KEEP=1']
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=1500)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'Adapting' in result.stderr and 'gemma-3-270m' in result.stderr
  lines = [json.loads(x) for x in
           (model_dir / 'metrics.jsonl').read_text().splitlines()]
  train = [x['loss'] for x in lines if 'loss' in x]
  evals = [x['eval_loss'] for x in lines if 'eval_loss' in x]
  print(f'\n270M-270M PrefixLM + KD: distillation loss per step '
        f'{" ".join(f"{x:.3f}" for x in train)}; validation loss at steps '
        f'2, 4, 6: {" ".join(f"{x:.3f}" for x in evals)}')
  assert len(train) == STEPS and len(evals) == STEPS // 2
  assert np.mean(train[-2:]) < np.mean(train[:2])
  assert evals[-1] < evals[0]


# Adapts the real 270M into 270M-270M and loads its teacher, through the
# sharded loader, in a fresh process; prints the peak RSS and the bytes.
_LOAD_270M = '''
import json, resource, time
import jax
from t5x_adapt import adapt, assets, gin_utils, partitioning
from t5x_adapt.convert import load
from t5x_adapt.distillation import DistillationModel
path = str(assets.gemma3_270m_gguf())
student = DistillationModel(gin_utils.load_model(
    't5gemma_270m_270m', param_dtype='float32').config)
partitioner = partitioning.Partitioner()
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
started = time.perf_counter()
with partitioner.context():  # As train.py: the teacher, then the student.
  teacher = load.load_params(path, student.teacher,
                             shardings=partitioner.shardings(
                                 student.teacher.logical_axes()))
  params = adapt.Adaptation(path).init_params(
      student, partitioner.shardings(student.logical_axes()),
      loaded={path: (student.teacher.config, teacher)})
jax.block_until_ready((params, teacher))
nbytes = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
distinct = {id(x): x.nbytes
            for x in jax.tree_util.tree_leaves((params, teacher))}
print(json.dumps({
    'student_bytes': nbytes(params), 'teacher_bytes': nbytes(teacher),
    'distinct_bytes': sum(distinct.values()), 'baseline_rss': baseline,
    'peak_rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    'seconds': time.perf_counter() - started}))
'''


@pytest.mark.slow
def test_270m_adaptation_and_teacher_load_within_1_5x_of_their_bytes():
  assets.gemma3_270m_gguf()
  result = subprocess.run([sys.executable, '-c', _LOAD_270M], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-4000:]
  figures = json.loads(result.stdout.strip().splitlines()[-1])
  total = figures['student_bytes'] + figures['teacher_bytes']
  ratio = figures['peak_rss'] / total
  gib = 2**30
  print(f'\n270M -> 270M-270M + teacher through the sharded loader in '
        f'{figures["seconds"]:.0f} s: peak RSS {figures["peak_rss"] / gib:.2f}'
        f' GiB (process before loading {figures["baseline_rss"] / gib:.2f} '
        f'GiB) vs float32 student {figures["student_bytes"] / gib:.2f} GiB + '
        f'teacher {figures["teacher_bytes"] / gib:.2f} GiB = '
        f'{total / gib:.2f} GiB: {ratio:.2f}x (distinct arrays '
        f'{figures["distinct_bytes"] / gib:.2f} GiB: the encoder, the '
        'decoder and the teacher share the arrays of their one source)')
  assert ratio <= 1.5


@pytest.mark.slow
def test_270m_t5gemma2_trains_and_exports_to_transformers(tmp_path):
  """The real Gemma 3 270M becomes T5Gemma 2 270M-270M (UL2, merged
  attention, one table), trains a few steps on this CPU, and `save_hf`
  writes what transformers' T5Gemma2ForConditionalGeneration loads with our
  logits."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from t5x_adapt import checkpoints  # pylint: disable=g-import-not-at-top
  from t5x_adapt import convert  # pylint: disable=g-import-not-at-top
  from t5x_adapt import gin_utils  # pylint: disable=g-import-not-at-top
  assets.gemma3_270m_gguf()
  model_dir = tmp_path / 't5gemma2_270m'
  steps = 6
  command = [
      sys.executable, '-m', 't5x_adapt.train',
      '--gin_file=gin/adapt/t5gemma2_270m_270m_ul2.gin',
      f'--gin.MODEL_DIR="{model_dir}"', f'--gin.TRAIN_STEPS={steps}',
      '--gin.TASK_FEATURE_LENGTHS={"inputs": 32, "targets": 32}',
      '--gin.BATCH_SIZE=2', "--gin.StackConfig.dtype='float32'",
      "--gin.StackConfig.remat_policy='none'", '--gin.FSDP_PARALLELISM=1',
      '--gin.LEARNING_RATE=1e-4', '--gin.WARMUP_STEPS=1',
      "--gin.SCHEDULE='constant'", '--gin.LOG_EVERY=1', '--gin.EVAL_EVERY=0',
      f'--gin.SAVE_EVERY={steps}', '--gin.KEEP=1']
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=1500)
  assert result.returncode == 0, result.stderr[-4000:]
  train = [json.loads(x)['loss'] for x in
           (model_dir / 'metrics.jsonl').read_text().splitlines()
           if '"loss"' in x]
  assert len(train) == steps
  assert np.mean(train[-2:]) < np.mean(train[:2])

  model = gin_utils.load_model('t5gemma2_270m_270m', param_dtype='float32')
  params = checkpoints.restore_params(
      model_dir / 'checkpoints' / str(steps), model)
  convert.save_hf(model, params, tmp_path / 'hf')
  reference = transformers.T5Gemma2ForConditionalGeneration.from_pretrained(
      tmp_path / 'hf', dtype=torch.float32, attn_implementation='eager').eval()
  rng = np.random.default_rng(0)
  encoder = rng.integers(3, 256_000, (2, 40)).astype(np.int32)
  decoder = np.concatenate([np.full((2, 1), 2), rng.integers(
      3, 256_000, (2, 19))], axis=1).astype(np.int32)
  encoder[1, 30:] = 0
  decoder[1, 12:] = 0
  batch = {'encoder_input_tokens': encoder, 'decoder_input_tokens': decoder,
           'decoder_target_tokens': decoder}
  ours = np.asarray(model.compute_logits(params, batch))
  with torch.no_grad():
    theirs = reference(
        input_ids=torch.tensor(encoder, dtype=torch.long),
        attention_mask=torch.tensor(encoder > 0, dtype=torch.long),
        decoder_input_ids=torch.tensor(decoder, dtype=torch.long),
        decoder_attention_mask=torch.tensor(decoder > 0, dtype=torch.long)
    ).logits.numpy()
  valid = decoder > 0
  error = np.abs(ours - theirs)[valid].max() / np.abs(theirs[valid]).max()
  print(f'\n270M -> T5Gemma 2 270M-270M, UL2 loss per step '
        f'{" ".join(f"{x:.3f}" for x in train)}; exported to transformers: '
        f'maximum relative logit error {error:.2e}')
  assert error <= 1e-4

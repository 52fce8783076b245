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

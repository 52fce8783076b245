"""Evaluation and inference (t5x_adapt.eval, t5x_adapt.infer, launch scripts).

One tiny encoder-decoder (t5gemma_tiny) is trained for 40 steps on the
text-to-text sentiment task, with the task's metrics evaluated in the loop,
and checkpoints at steps 20 and 40. The launch scripts and the CLI then
evaluate and predict with those checkpoints, as subprocesses sharing a
persistent XLA compilation cache; the evaluators' figures are checked
in-process against `model.loss_fn`, `score_batch` and
`predict_batch_with_aux` called directly.
"""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import seqio

import tasks  # pylint: disable=unused-import
from t5x_adapt import eval as eval_lib
from t5x_adapt import gin_utils
from t5x_adapt import sharded as sharded_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TASK = 'sentiment_spm8k'
PREFIX_LM_TASK = 'corpus_prefix_lm_spm8k'
# 'positive' is 4 pieces + EOS: 8 target tokens hold either label.
LENGTHS = {'inputs': 64, 'targets': 8}
GIN_LENGTHS = "{'inputs': 64, 'targets': 8}"
PRESET = 't5gemma_tiny'
VOCAB_SIZE = 8192  # The tiny preset's vocabulary, fitted to spm8k.


@pytest.fixture(scope='module')
def compile_cache(tmp_path_factory):
  return tmp_path_factory.mktemp('xla_cache')


def _env(compile_cache, **variables):
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu',
              JAX_COMPILATION_CACHE_DIR=str(compile_cache),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
              PYTHONPATH=str(REPO_ROOT),
              XLA_FLAGS='--xla_force_host_platform_device_count=1',
              **variables)


def _run(command, compile_cache, **variables):
  result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300,
                          env=_env(compile_cache, **variables))
  if result.returncode:
    pytest.fail(f'{command[:3]} exited with {result.returncode}:\n'
                f'{result.stderr[-4000:]}')
  return result


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory, compile_cache):
  """A trained run: checkpoints 20 and 40, task metrics in the loop."""
  directory = tmp_path_factory.mktemp('eval') / 'run'
  _run([sys.executable, '-m', 't5x_adapt.train',
        '--gin_file=gin/runs/pretrain_encdec.gin',
        f'--gin_file=gin/models/{PRESET}.gin',
        f'--gin.MODEL_DIR="{directory}"', '--gin.TRAIN_STEPS=40',
        f'--gin.MIXTURE_OR_TASK_NAME="{TASK}"',
        f'--gin.TASK_FEATURE_LENGTHS={GIN_LENGTHS}', '--gin.BATCH_SIZE=8',
        '--gin.LOG_EVERY=10', '--gin.EVAL_EVERY=20', '--gin.EVAL_STEPS=2',
        '--gin.EVAL_METRICS=True', '--gin.SAVE_EVERY=20'], compile_cache)
  return directory


def _lines(path):
  return [json.loads(line) for line in
          pathlib.Path(path).read_text().splitlines()]


# ------------------------------------------------------------- training --


def test_training_evaluates_task_metrics_in_the_loop(model_dir):
  metrics = _lines(model_dir / 'metrics.jsonl')
  accuracy = {m['step']: m[f'eval_{TASK}/accuracy'] for m in metrics
              if f'eval_{TASK}/accuracy' in m}
  losses = {m['step']: m for m in metrics if 'eval_loss' in m}
  print(f'\nin-loop accuracy (t5, %) {accuracy}; validation perplexity '
        f'{ {s: round(m["eval_perplexity"], 3) for s, m in losses.items()} }')
  assert sorted(accuracy) == [20, 40]
  assert all(0 <= a <= 100 for a in accuracy.values())
  for m in losses.values():
    assert m['eval_perplexity'] == pytest.approx(math.exp(m['eval_loss']),
                                                 rel=1e-12)


# ----------------------------------------------------------------- eval --


def test_eval_script_writes_a_checkpoints_metrics(model_dir, compile_cache):
  result = _run(['launch/eval_local.sh'], compile_cache,
                CHECKPOINT_PATH=str(model_dir / 'checkpoints' / '40'),
                PRESET=PRESET, TASK=TASK, FEATURE_LENGTHS=GIN_LENGTHS,
                NUM_EXAMPLES='44', BATCH_SIZE='8')
  record = json.loads((model_dir / 'eval' / TASK / '40.json').read_text())
  metrics = record['metrics']
  print(f'\n{TASK} step 40, 44 examples: {metrics}')
  assert record['step'] == 40 and record['task'] == TASK
  # t5's accuracy is a percentage; the 44 examples make it a multiple of
  # 100 / 44.
  assert 0 <= metrics['accuracy'] <= 100
  assert metrics['accuracy'] * 44 / 100 == pytest.approx(
      round(metrics['accuracy'] * 44 / 100), abs=1e-9)
  assert metrics['perplexity'] == pytest.approx(
      math.exp(metrics['cross_entropy']), rel=1e-12)
  # Each target is the label's pieces and EOS, all weighed: 4 to 5 tokens.
  assert 4 * 44 <= metrics['target_tokens'] <= 5 * 44
  assert record in _lines(model_dir / 'eval' / 'results.jsonl')
  events = list((model_dir / 'eval' / TASK).glob('events.out.tfevents.*'))
  assert events and b'accuracy' in events[0].read_bytes()
  assert f'step 40 {TASK}: cross_entropy' in result.stderr


@pytest.mark.slow
def test_eval_every_checkpoint_once(model_dir, compile_cache):
  output = model_dir / 'eval'
  _run([sys.executable, '-m', 't5x_adapt.eval', '--gin_file=gin/runs/eval.gin',
        f'--gin_file=gin/models/{PRESET}.gin',
        f'--gin.MODEL_DIR="{model_dir}"',
        f'--gin.MIXTURE_OR_TASK_NAME="{PREFIX_LM_TASK}"',
        f'--gin.TASK_FEATURE_LENGTHS={GIN_LENGTHS}', '--gin.BATCH_SIZE=8',
        '--gin.NUM_EXAMPLES=16'], compile_cache)
  records = [r for r in _lines(output / 'results.jsonl')
             if r['task'] == PREFIX_LM_TASK]
  print(f'\n{PREFIX_LM_TASK} perplexity by step: '
        f'{ {r["step"]: round(r["metrics"]["perplexity"], 1) for r in records} }')
  assert [r['step'] for r in records] == [20, 40]
  for record in records:
    metrics = record['metrics']
    assert np.isfinite(metrics['perplexity']) and metrics['perplexity'] > 1
    # Each example's targets fill the 8 positions (PrefixLM chunks).
    assert metrics['target_tokens'] == 16 * 8
    assert (output / PREFIX_LM_TASK / f'{record["step"]}.json').exists()
  # A second pass finds nothing left to evaluate.
  assert eval_lib.checkpoints_to_evaluate(
      None, str(model_dir), output, [PREFIX_LM_TASK]) == []


def test_evaluators_agree_with_the_model_called_directly(model_dir):
  """Perplexity is exp of loss_fn's mean cross-entropy over the examples;
  score and decode-score metrics are the means of score_batch and
  predict_batch_with_aux; fill rows of the last batch count for nothing."""
  model = gin_utils.load_model(PRESET, vocab_size=VOCAB_SIZE)
  sharded = sharded_lib.ShardedModel.on_gin_mesh(model, batch_size=8)
  params = sharded.restore(model_dir / 'checkpoints' / '40')
  converter = model.FEATURE_CONVERTER_CLS(pack=False)
  # 21 examples: two full batches of 8, and 5 rows filled up to 8.
  dataset = eval_lib.loss_dataset(seqio.get_mixture_or_task(TASK), LENGTHS,
                                  converter, num_examples=21)
  reported = eval_lib.LossEvaluator(sharded, lambda: sharded_lib.host_batches(
      dataset, 8, sharded.partitioner))(params)

  examples = [features for _, features in dataset.as_numpy_iterator()]
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  _, direct = model.loss_fn(params, batch, None)
  cross_entropy = float(direct['cross_entropy'])
  expected = math.exp(cross_entropy)
  error = abs(reported['perplexity'] / expected - 1)
  print(f'\nperplexity {reported["perplexity"]:.6f}, exp(loss_fn) '
        f'{expected:.6f}, relative difference {error:.1e}; '
        f'{reported["tokens"]:.0f} target tokens')
  assert reported['tokens'] == float(direct['num_tokens'])
  assert error < 1e-5

  scores = np.asarray(model.score_batch(params, batch))
  decodes = jax.jit(model.predict_batch_with_aux, static_argnums=(2,))(
      params, batch, LENGTHS['targets'])
  metrics = eval_lib.MetricEvaluator(
      sharded, _scored_task(), LENGTHS, batch_size=8,
      num_examples=21)(params, step=40)[_scored_task()]
  print(f'mean score {metrics["mean_score"]:.6f} vs score_batch '
        f'{scores.mean():.6f}; mean decode score '
        f'{metrics["mean_decode_score"]:.6f} vs predict_batch_with_aux '
        f'{np.mean(decodes[1]["scores"]):.6f}')
  assert metrics['mean_score'] == pytest.approx(scores.mean(), rel=1e-5)
  assert metrics['mean_decode_score'] == pytest.approx(
      float(np.mean(decodes[1]['scores'])), rel=1e-5)


def _mean_score(targets, scores):
  """A ranking-style metric: seqio calls it with score_fn's outputs."""
  assert len(targets) == len(scores)
  return {'mean_score': float(np.mean(scores))}


def _mean_decode_score(targets, predictions, aux_values):
  """A metric of decodes with their scores (predict_with_aux_fn)."""
  assert len(targets) == len(predictions)
  return {'mean_decode_score': float(np.mean(aux_values['scores']))}


def _scored_task() -> str:
  """The sentiment task with a score metric and an aux-value metric."""
  name = f'{TASK}_test_scores'
  if name not in seqio.TaskRegistry.names():
    base = seqio.get_mixture_or_task(TASK)
    seqio.TaskRegistry.add(
        name, source=base.source, preprocessors=base.preprocessors,
        output_features=base.output_features,
        metric_fns=[_mean_score, _mean_decode_score])
  return name


# ---------------------------------------------------------------- infer --


def test_infer_script_writes_a_line_per_prompt(model_dir, compile_cache,
                                               tmp_path):
  prompts = ['sentiment: A wonderful, moving film.',
             'sentiment: Dull, and far too long.',
             'sentiment: I hated every minute of it.']
  prompts_file = tmp_path / 'prompts.txt'
  prompts_file.write_text('\n'.join(prompts[:2] + ['', prompts[2]]) + '\n')
  output = tmp_path / 'predictions.jsonl'
  _run(['launch/infer_local.sh'], compile_cache,
       CHECKPOINT_PATH=str(model_dir / 'checkpoints' / '40'), PRESET=PRESET,
       TASK=TASK, PROMPTS_FILE=str(prompts_file), OUTPUT_FILE=str(output),
       FEATURE_LENGTHS=GIN_LENGTHS, BATCH_SIZE='2')
  lines = _lines(output)
  print('\n' + '\n'.join(json.dumps(line) for line in lines))
  assert [line['inputs'] for line in lines] == prompts
  for line in lines:
    assert isinstance(line['prediction'], str)
    assert np.isfinite(line['score']) and line['score'] <= 0
    assert 'targets' not in line


# ----------------------------------------------------------- multi-host --


def _eval_command(model_dir, output_dir, *flags):
  return [sys.executable, '-m', 't5x_adapt.eval',
          '--gin_file=gin/runs/eval.gin', f'--gin_file=gin/models/{PRESET}.gin',
          f'--gin.CHECKPOINT_PATH="{model_dir / "checkpoints" / "40"}"',
          f'--gin.OUTPUT_DIR="{output_dir}"',
          f'--gin.MIXTURE_OR_TASK_NAME="{TASK}"',
          f'--gin.TASK_FEATURE_LENGTHS={GIN_LENGTHS}', '--gin.BATCH_SIZE=8',
          '--gin.NUM_EXAMPLES=21', *flags]


@pytest.mark.slow
def test_two_processes_evaluate_as_one(model_dir, compile_cache, tmp_path):
  """2 processes x 2 devices (data=2, fsdp=2) give one process's results;
  only process 0 writes."""
  _run(_eval_command(model_dir, tmp_path / 'one'), compile_cache)
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    address = '127.0.0.1:%d' % sock.getsockname()[1]
  env = _env(compile_cache)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  processes = [subprocess.Popen(
      _eval_command(model_dir, tmp_path / 'two', '--gin.DATA_PARALLELISM=2',
                    '--gin.FSDP_PARALLELISM=2',
                    f'--coordinator_address={address}', '--num_processes=2',
                    f'--process_id={index}'),
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for index in range(2)]
  outputs = [process.communicate(timeout=300) for process in processes]
  for process, (_, stderr) in zip(processes, outputs):
    assert process.returncode == 0, stderr[-3000:]
  assert f'step 40 {TASK}' in outputs[0][1]
  assert f'step 40 {TASK}' not in outputs[1][1]
  one, two = (json.loads((tmp_path / run / TASK / '40.json').read_text())
              ['metrics'] for run in ('one', 'two'))
  print(f'\n1 process: {one}\n2 processes: {two}')
  assert two.keys() == one.keys()
  for name, value in one.items():
    assert two[name] == pytest.approx(value, rel=1e-6), name

"""Pretrain a tiny decoder-only model from scratch on the corpus.

Runs `python -m t5x_adapt.train` with gin/runs/pretrain.gin and the
gemma2_tiny preset (its vocabulary fitted to the 8k corpus SentencePiece
model) on `corpus_lm_spm8k`, with the progress bar streamed to stderr. Then
prints a markdown table on stdout: the validation loss (nats per target
token, over the first --eval_steps validation batches) at each evaluation,
next to the cross-entropy of a unigram model on exactly the same tokens (the
token frequencies of the train split, add-one smoothed, applied to those
validation tokens), the run's last tokens/s and MFU, and whether the run's
TensorBoard event files exist. Run from the repository root:

  .venv/bin/python benchmarks/pretrain_tiny.py
  .venv/bin/python benchmarks/pretrain_tiny.py --steps 600 \
      --model_dir /tmp/pretrain_tiny
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

from common import REPO_ROOT, argument_parser, log  # pylint: disable=g-bad-import-order

# pylint: disable=g-import-not-at-top

TASK = 'corpus_lm_spm8k'
PRESET = 'gemma2_tiny'


def parse_args(argv=None) -> argparse.Namespace:
  parser = argument_parser(__doc__)
  parser.add_argument('--steps', type=int, default=300)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--length', type=int, default=128)
  parser.add_argument('--learning_rate', type=float, default=1e-2)
  parser.add_argument('--warmup_steps', type=int, default=30)
  parser.add_argument('--eval_every', type=int, default=100)
  parser.add_argument('--eval_steps', type=int, default=40,
                      help='validation batches per evaluation')
  parser.add_argument('--model_dir', type=pathlib.Path, default=None,
                      help='run directory (default: a fresh temporary one, '
                      'removed afterwards); an existing run resumes')
  return parser.parse_args(argv)


def pretrain(args, model_dir: pathlib.Path) -> str:
  """Runs the CLI, streaming its stderr; returns that stderr."""
  command = [
      sys.executable, '-m', 't5x_adapt.train',
      '--gin_file=gin/runs/pretrain.gin', f'--gin_file=gin/models/{PRESET}.gin',
      f'--gin.MODEL_DIR="{model_dir}"', f'--gin.TRAIN_STEPS={args.steps}',
      f'--gin.MIXTURE_OR_TASK_NAME="{TASK}"',
      f'--gin.TASK_FEATURE_LENGTHS={{"targets": {args.length}}}',
      f'--gin.BATCH_SIZE={args.batch_size}',
      f'--gin.LEARNING_RATE={args.learning_rate}',
      f'--gin.WARMUP_STEPS={args.warmup_steps}',
      f'--gin.EVAL_EVERY={args.eval_every}',
      f'--gin.EVAL_STEPS={args.eval_steps}',
      f'--gin.SAVE_EVERY={args.steps}']
  log(' '.join(command[1:]))
  process = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE,
                             text=True, env=dict(os.environ))
  captured = []
  while chunk := process.stderr.read(256):
    sys.stderr.write(chunk)
    captured.append(chunk)
  if process.wait():
    raise RuntimeError(f'training failed with exit code {process.returncode}')
  sys.stderr.write('\n')
  return ''.join(captured)


def unigram_cross_entropy(args) -> tuple[float, float, int]:
  """(cross-entropy on the eval tokens, train entropy, eval token count).

  The unigram model is the train split's token frequencies (add-one
  smoothed over the vocabulary); it is scored on the target tokens, weighted
  by `decoder_loss_weights`, of the same validation batches that the run
  evaluates on.
  """
  import numpy as np
  import seqio
  import tasks  # pylint: disable=unused-import  # registers the task
  from t5x_adapt.data import feature_converters
  from t5x_adapt.data import pipeline
  from t5x_adapt.data import sources

  vocabulary = seqio.get_mixture_or_task(TASK).output_features[
      'targets'].vocabulary
  size = vocabulary.vocab_size
  counts = np.ones(size, np.float64)
  for text in sources.corpus_text('train'):
    ids = vocabulary.tokenizer.EncodeAsIds(text)
    counts += np.bincount(ids, minlength=size)[:size]
  log_p = np.log(counts / counts.sum())
  entropy = float(-(np.exp(log_p) * log_p).sum())

  batches = pipeline.get_dataset(
      TASK, {'targets': args.length},
      feature_converters.DecoderFeatureConverter(pack=True), args.batch_size,
      split='validation', shuffle=False, num_epochs=None,
      shard_index=0, num_shards=1).take(args.eval_steps)
  nll, tokens = 0.0, 0.0
  for batch in batches.as_numpy_iterator():
    weights = batch['decoder_loss_weights'].astype(np.float64)
    nll -= float((log_p[batch['decoder_target_tokens']] * weights).sum())
    tokens += float(weights.sum())
  return nll / tokens, entropy, int(tokens)


def last_progress(stderr: str) -> str:
  """The progress bar's final state (tqdm redraws it with \\r)."""
  states = [s.strip() for s in stderr.replace('\n', '\r').split('\r')
            if 'tok/s=' in s]
  return states[-1] if states else '(no progress bar seen)'


def table(args, model_dir, stderr, unigram) -> str:
  from t5x_adapt import summaries
  cross_entropy, entropy, tokens = unigram
  evals = summaries.read_metrics(model_dir / 'metrics.jsonl', 'eval_loss')
  train = summaries.read_metrics(model_dir / 'metrics.jsonl', 'loss')
  events = {kind: sorted(p.name for p in (model_dir / kind).glob(
      'events.out.tfevents.*')) for kind in ('train', 'eval')}
  rows = [
      ('unigram entropy of the train split', f'{entropy:.3f}'),
      (f'unigram cross-entropy on the {tokens:,} validation tokens '
       '(train frequencies)', f'{cross_entropy:.3f}'),
  ]
  for m in evals:
    rows.append((f'validation loss after {m["step"]} steps',
                 f'{m["eval_loss"]:.3f} ({m["eval_loss"] - cross_entropy:+.3f}'
                 ' vs unigram)'))
  last = train[-1]
  rows += [
      (f'train loss at step {last["step"]}', f'{last["loss"]:.3f}'),
      ('tokens/s, MFU (last logging window)',
       f'{last["tokens_per_second"]:,.0f}, {100 * last["mfu"]:.2f}%'),
      ('TensorBoard event files (train, eval)',
       f'{len(events["train"])}, {len(events["eval"])}'),
      ('progress bar at the end', f'`{last_progress(stderr)}`'),
  ]
  lines = [f'Pretraining {PRESET} on {TASK}: {args.steps} steps of '
           f'{args.batch_size} x {args.length} tokens, nats per token', '',
           '| quantity | value |', '|---|---|']
  lines += [f'| {name} | {value} |' for name, value in rows]
  return '\n'.join(lines)


def main(argv=None) -> None:
  args = parse_args(argv)
  temporary = args.model_dir is None
  model_dir = (pathlib.Path(tempfile.mkdtemp(prefix='pretrain_tiny_'))
               if temporary else args.model_dir)
  try:
    stderr = pretrain(args, model_dir)
    log('unigram cross-entropy of the validation tokens')
    unigram = unigram_cross_entropy(args)
    print(table(args, model_dir, stderr, unigram))
  finally:
    if temporary:
      shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == '__main__':
  main()

r"""Inference: a checkpoint's predictions for a task's split or for prompts.

  python -m t5x_adapt.infer \
    --gin_file=gin/runs/infer.gin --gin_file=gin/models/t5gemma_tiny.gin \
    --gin.CHECKPOINT_PATH="'/tmp/run/checkpoints/300'" \
    --gin.MIXTURE_OR_TASK_NAME="'sentiment_spm8k'" \
    --gin.TASK_FEATURE_LENGTHS="{'inputs': 64, 'targets': 8}" \
    --gin.BATCH_SIZE=8 --gin.OUTPUT_FILE="'/tmp/predictions.jsonl'" \
    --gin.PROMPTS_FILE="'/tmp/prompts.txt'"   # or: the task's SPLIT

`infer()` reads its examples from `prompts_file` (one prompt a line, blank
lines skipped), tokenized with `vocabulary` (a SentencePiece model file) or
the task's `inputs` vocabulary, or else from each task's `split`. It decodes
them with `predict_batch_with_aux`, as gin's `DecodeOptions` say (greedy by
default; e.g. `--gin.DecodeOptions.method="'beam'"`), up to `targets`
tokens, on the Partitioner's mesh (`t5x_adapt.sharded.predict_indexed`), and
process 0 writes a JSON line per example, in order:

  {"inputs": "...", "prediction": "...", "score": -1.9, "targets": "...",
   "task": "..."}

`targets` and `task` come with a task's examples; `score` is the
prediction's log-probability (a beam's length-normalised score for beam
search).
"""

from __future__ import annotations

if __name__ == '__main__':
  from t5x_adapt import host_memory
  host_memory.use_huge_pages()
  # `python -m t5x_adapt.infer`: run the importable module, so that gin knows
  # `infer` once, as t5x_adapt.infer.infer (not __main__.infer).
  from t5x_adapt import infer as _infer  # pylint: disable=import-self
  _infer.main()

import dataclasses
import json
import pathlib
from typing import Mapping, Optional, Sequence

import gin
import numpy as np
import seqio
import tensorflow as tf

from t5x_adapt import cli
from t5x_adapt import decoding
from t5x_adapt import distributed
from t5x_adapt.data.vocab import EOS_ID
from t5x_adapt.sharded import ShardedModel, predict_indexed

# A prompt's targets: one token, never read. The feature converters need a
# `targets` feature, and the decoder-only one makes the prompt's last token
# a decoder input only when a target follows it.
PLACEHOLDER_TARGETS = (EOS_ID,)
TASK_FEATURES = ('inputs', 'targets')


@dataclasses.dataclass
class Examples:
  """Examples to predict and how to show them.

  Attributes:
    features: Unbatched task features (`inputs`, `targets`), int32.
    texts: Per example, in order: `inputs`, and `targets` and `task` when
      a task gave them.
    vocabulary: Decodes the predictions.
  """

  features: tf.data.Dataset
  texts: list[dict[str, str]]
  vocabulary: seqio.Vocabulary


def _prompt_ids(ids: Sequence[int], add_eos: bool, length: int) -> list[int]:
  """A prompt's token ids, cut to `length` with the EOS kept last."""
  ids = list(ids)[:length - int(add_eos)]
  return ids + [EOS_ID] if add_eos else ids


def prompt_examples(path: str, vocabulary: seqio.Vocabulary, add_eos: bool,
                    inputs_length: int) -> Examples:
  """The non-blank lines of a text file as prompts (encoder inputs, or a
  decoder-only model's prefix)."""
  lines = [line for line in
           pathlib.Path(path).read_text(encoding='utf-8').splitlines()
           if line.strip()]
  if not lines:
    raise ValueError(f'prompts file {path}: no prompts (no non-blank line)')
  prompts = [_prompt_ids(vocabulary.encode(line), add_eos, inputs_length)
             for line in lines]
  longer = sum(len(vocabulary.encode(line)) + add_eos > inputs_length
               for line in lines)
  if longer:
    cli.say(f'{path}: {longer} of {len(lines)} prompts cut to '
            f'{inputs_length} tokens')

  def generate():
    for ids in prompts:
      yield {'inputs': np.asarray(ids, np.int32),
             'targets': np.asarray(PLACEHOLDER_TARGETS, np.int32)}

  spec = tf.TensorSpec([None], tf.int32)
  features = tf.data.Dataset.from_generator(
      generate, output_signature={name: spec for name in TASK_FEATURES})
  return Examples(features, [{'inputs': line} for line in lines], vocabulary)


def _text(example: Mapping[str, np.ndarray], name: str,
          vocabulary: seqio.Vocabulary) -> str:
  """A feature's text: its pretokenized string, else its tokens decoded."""
  raw = example.get(f'{name}_pretokenized')
  if raw is not None:
    return raw.decode('utf-8') if isinstance(raw, bytes) else str(raw)
  return vocabulary.decode(example[name].tolist())


def task_examples(task: seqio.Task, split: str,
                  task_feature_lengths: Mapping[str, int],
                  num_examples: Optional[int], seed: int) -> Examples:
  """A task split's first examples, trimmed to the feature lengths."""
  if split not in task.splits:
    raise ValueError(f'task {task.name} has no split {split!r} (splits: '
                     f'{list(task.splits)})')
  dataset = task.get_dataset(sequence_length=dict(task_feature_lengths),
                             split=split, shuffle=False, num_epochs=1,
                             seed=seed, use_cached=False)
  if num_examples:
    dataset = dataset.take(num_examples)
  dataset = dataset.cache()
  output = task.output_features
  texts = [{**{name: _text(example, name, output[name].vocabulary)
               for name in TASK_FEATURES if name in output},
            'task': task.name}
           for example in dataset.as_numpy_iterator()]
  features = dataset.map(
      lambda example: {name: example[name] for name in output})
  return Examples(features, texts, output['targets'].vocabulary)


def _concatenate(parts: Sequence[Examples]) -> Examples:
  features = parts[0].features
  for part in parts[1:]:
    features = features.concatenate(part.features)
  return Examples(features, [t for part in parts for t in part.texts],
                  parts[0].vocabulary)


def _examples(mixture_or_task_name: Optional[str], split: str,
              prompts_file: Optional[str], vocabulary: Optional[str],
              add_eos: Optional[bool],
              task_feature_lengths: Mapping[str, int],
              num_examples: Optional[int], seed: int) -> Examples:
  """The prompts of `prompts_file`, else the tasks' examples."""
  task = (seqio.get_mixture_or_task(mixture_or_task_name)
          if mixture_or_task_name else None)
  if prompts_file:
    if vocabulary:
      vocab = seqio.SentencePieceVocabulary(vocabulary)
    elif task is not None:
      vocab = task.output_features['inputs'].vocabulary
    else:
      raise ValueError(f'infer: prompts file {prompts_file} needs a '
                       'vocabulary (VOCABULARY) or a task (MIXTURE_OR_TASK_'
                       'NAME) whose inputs vocabulary tokenizes it')
    if add_eos is None:  # As the task's inputs, else a bare prefix.
      add_eos = task is not None and task.output_features['inputs'].add_eos
    return prompt_examples(prompts_file, vocab, add_eos,
                           task_feature_lengths['inputs'])
  if task is None:
    raise ValueError('infer: give prompts_file (PROMPTS_FILE) or '
                     'mixture_or_task_name (MIXTURE_OR_TASK_NAME)')
  return _concatenate([
      task_examples(subtask, split, task_feature_lengths, num_examples, seed)
      for subtask in seqio.get_subtasks(task)])


def _write_lines(path: str, records: Sequence[Mapping[str, object]]) -> None:
  """JSON lines, written by process 0 only."""
  if not distributed.is_main_process():
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + '\n')


@gin.configurable
def infer(output_file: str = gin.REQUIRED,
          checkpoint_path: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          mixture_or_task_name: Optional[str] = None,
          split: str = 'validation',
          prompts_file: Optional[str] = None,
          vocabulary: Optional[str] = None,
          add_eos: Optional[bool] = None,
          num_examples: Optional[int] = None,
          vocab_size: Optional[int] = None,
          seed: int = 0) -> list[dict]:
  """Predicts for the gin-configured model; see the module docstring.

  Args:
    output_file: JSON lines, one per example.
    checkpoint_path: A training step directory (MODEL_DIR/checkpoints/<step>)
      or a parameter checkpoint.
    task_feature_lengths: {'inputs': L, 'targets': T}: prompts are cut to L
      tokens and T tokens are decoded.
    batch_size: Global batch size.
    mixture_or_task_name: The examples' task (without `prompts_file`), or
      the vocabulary of the prompts.
    split: The task split read.
    prompts_file: A text file of prompts, one a line.
    vocabulary: SentencePiece model file of the prompts (default: the
      task's inputs vocabulary).
    add_eos: End each prompt with EOS (default: as the task's inputs; False
      without a task, for a decoder-only model's prefix).
    num_examples: The first examples of each task (None: all).
    vocab_size: Model vocabulary (None: see `cli.build_model`).
    seed: Seeds sampling and seqio's preprocessing.

  Returns:
    The records written.
  """
  examples = _examples(mixture_or_task_name, split, prompts_file, vocabulary,
                       add_eos, task_feature_lengths, num_examples, seed)
  model = cli.build_model(mixture_or_task_name, vocab_size,
                          examples.vocabulary)
  sharded = ShardedModel.on_gin_mesh(model, batch_size)
  params = sharded.restore(checkpoint_path)
  converter = model.FEATURE_CONVERTER_CLS(pack=False)
  dataset = converter(examples.features, task_feature_lengths).enumerate()
  options = model.decode_options or decoding.DecodeOptions()
  predictions = predict_indexed(
      sharded, params, dataset, batch_size, task_feature_lengths['targets'],
      options, seed)
  records = [{**examples.texts[index],
              'prediction': examples.vocabulary.decode(tokens),
              'score': score}
             for index, tokens, score in predictions]
  _write_lines(output_file, records)
  cli.say(f'{len(records)} predictions -> {output_file}')
  return records


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Command-line entry point (argv defaults to sys.argv)."""
  cli.run(infer, argv)

"""Instruction tuning in Gemma's turn template (t5x_adapt.data.sft, tasks/sft.py).

Run with `-s` to see the losses.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import seqio
import tensorflow as tf

from t5x_adapt import stages
from t5x_adapt.data import feature_converters
from t5x_adapt.data import pipeline
from t5x_adapt.data import sft
from tasks import sft as sft_tasks
from tasks import vocabularies

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPE = 'gin/finetune/sft.gin'
LENGTHS = {'inputs': 64, 'targets': 16}
RESPONSES = ('negative<end_of_turn>', 'positive<end_of_turn>')


def _vocabulary(name):
  # The tasks' vocabularies read their model file lazily: make it first
  # (Gemma 3's is rebuilt from the GGUF on first use), whatever ran before.
  vocabularies.VOCABULARIES[name][1]()
  task = seqio.get_mixture_or_task(f'sft_sentiment_{name}')
  return task.output_features['inputs'].vocabulary


def _ids(vocabulary, parts):
  return sft.encode_parts(vocabulary, parts).numpy().tolist()


def _text(parts):
  return ''.join(p if isinstance(p, str) else p.numpy().decode()
                 for p in parts)


# ------------------------------------------------------------- template --


def test_template_text_is_gemmas():
  assert sft.template_text('Hi?', 'Hello.') == (
      '<start_of_turn>user\nHi?<end_of_turn>\n'
      '<start_of_turn>model\nHello.<end_of_turn>\n')
  prompt, response = sft.prompt_parts('Hi?'), sft.response_parts('Hello.')
  # Split where the model starts to speak; the closing newline only
  # separates turns.
  assert _text(prompt) + _text(response) + '\n' == sft.template_text(
      'Hi?', 'Hello.')
  assert _text(prompt).endswith('<start_of_turn>model\n')


def test_gemma3_has_the_turn_markers_as_single_ids():
  vocabulary = _vocabulary('gemma3')
  processor = vocabulary.tokenizer
  assert sft.turn_marker_ids(vocabulary) == {'<start_of_turn>': 105,
                                             '<end_of_turn>': 106}
  # Text never produces them (CONTROL pieces): they must be spliced in.
  assert 105 not in processor.encode('<start_of_turn>')
  ids = _ids(vocabulary, sft.prompt_parts('Is it good?'))
  expected = ([105] + processor.encode('user\nIs it good?') + [106] +
              processor.encode('\n') + [105] + processor.encode('model\n'))
  assert ids == expected
  assert ids[-3:] == [105, processor.piece_to_id('model'),
                      processor.piece_to_id('\n')]
  assert _ids(vocabulary, sft.response_parts('Yes.')) == (
      processor.encode('Yes.') + [106])
  pieces = ''.join(processor.id_to_piece(i) for i in ids).replace('▁', ' ')
  assert pieces == _text(sft.prompt_parts('Is it good?'))


def test_spm8k_spells_the_markers_as_text():
  vocabulary = _vocabulary('spm8k')
  assert sft.turn_marker_ids(vocabulary) is None
  parts = sft.prompt_parts('Is it good?')
  ids = _ids(vocabulary, parts)
  marker = vocabulary.encode('<start_of_turn>')
  assert len(marker) > 1
  assert ids[:len(marker)] == marker
  assert ids == sum((vocabulary.encode(_text([p])) for p in parts), [])
  # Its normaliser folds newlines into spaces.
  assert vocabulary.decode(ids).replace(' ', '') == (
      '<start_of_turn>userIsitgood?<end_of_turn><start_of_turn>model')


@pytest.mark.parametrize('vocab', ['spm8k', 'gemma3'])
def test_a_long_exchange_loses_text_not_markers(vocab):
  vocabulary = _vocabulary(vocab)
  parts = sft.prompt_parts('word ' * 100)
  full = _ids(vocabulary, parts)
  cut = sft.encode_parts(vocabulary, parts, 40,
                         sft.PROMPT_TEXT_PART).numpy().tolist()
  tail = _ids(vocabulary, parts[sft.PROMPT_TEXT_PART + 1:])
  assert len(cut) == 40 and len(full) > 40
  assert cut[-len(tail):] == tail and cut[:20] == full[:20]


# ------------------------------------------------------------- features --


def _task_examples(task_name, count):
  task = seqio.get_mixture_or_task(task_name)
  dataset = task.get_dataset(LENGTHS, split='validation', shuffle=False)
  return list(dataset.take(count).as_numpy_iterator())


def _batch(task_name, converter, batch_size=4, lengths=None):
  return next(pipeline.get_dataset(
      task_name, lengths or LENGTHS, converter, batch_size, split='validation',
      shuffle=False, num_epochs=1).as_numpy_iterator())


@pytest.mark.parametrize('vocab', ['spm8k', 'gemma3'])
def test_decoder_only_loss_weights_are_zero_exactly_on_the_prompt(vocab):
  task_name = f'sft_sentiment_{vocab}'
  examples = _task_examples(task_name, 4)
  batch = _batch(task_name,
                 feature_converters.DecoderFeatureConverter(pack=False))
  for row, example in enumerate(examples):
    prompt, response = list(example['inputs']), list(example['targets'])
    length = len(prompt) + len(response)
    np.testing.assert_array_equal(batch['decoder_target_tokens'][row][
        :length], prompt + response)
    weights = batch['decoder_loss_weights'][row]
    np.testing.assert_array_equal(
        weights, [0] * len(prompt) + [1] * len(response) +
        [0] * (len(weights) - length))
    # The prompt is the prefix of the prefix LM (the first target position
    # reads the prompt's last token).
    assert batch['decoder_causal_attention'][row].sum() == len(prompt) + 1


def test_packed_decoder_only_rows_weigh_each_response_only():
  task_name = 'sft_sentiment_spm8k'
  vocabulary = _vocabulary('spm8k')
  batch = _batch(task_name,
                 feature_converters.DecoderFeatureConverter(pack=True),
                 lengths={'inputs': 256, 'targets': 16})
  segments = 0
  for row in range(len(batch['decoder_target_tokens'])):
    tokens = batch['decoder_target_tokens'][row]
    weights = batch['decoder_loss_weights'][row]
    ids = batch['decoder_segment_ids'][row]
    for segment in set(ids.tolist()) - {0}:
      inside = ids == segment
      response = tokens[inside & (weights > 0)].tolist()
      prompt = tokens[inside & (weights == 0)].tolist()
      assert vocabulary.decode(response).replace(' ', '') in RESPONSES
      # spm8k: markers spelled as text, parts tokenized apart (spaces).
      prompt = vocabulary.decode(prompt).replace(' ', '')
      assert prompt.startswith('<start_of_turn>userIsthisreview')
      assert prompt.endswith('<end_of_turn><start_of_turn>model')
      segments += 1
  assert segments > 4  # packing put several exchanges in a row


def test_encoder_decoder_targets_are_only_the_response():
  task_name = 'sft_sentiment_gemma3'
  vocabulary = _vocabulary('gemma3')
  examples = _task_examples(task_name, 4)
  batch = _batch(task_name,
                 feature_converters.EncDecFeatureConverter(pack=False))
  for row, example in enumerate(examples):
    inputs = batch['encoder_input_tokens'][row]
    targets = batch['decoder_target_tokens'][row]
    inputs, targets = inputs[inputs > 0].tolist(), targets[targets > 0]
    assert inputs == example['inputs'].tolist()
    assert inputs[:1] == [105] and inputs[-3:-1] == [105, 4368]
    assert targets.tolist()[-2:] == [106, 1]  # <end_of_turn>, EOS
    label = sft.strip_end_of_turn(vocabulary.decode(targets.tolist()))
    assert label == ('negative', 'positive')[example['label']]
    assert batch['decoder_loss_weights'][row].sum() == len(targets)


def test_continuation_exchanges_follow_the_passage():
  example = _task_examples('sft_continuation_spm8k', 1)[0]
  prompt = example['inputs_pretokenized'].decode()
  assert prompt.startswith('<start_of_turn>user\nContinue the passage')
  assert prompt.endswith('<end_of_turn>\n<start_of_turn>model\n')
  assert example['targets_pretokenized']


def test_sentences_split_after_their_end_marks():
  sentences = sft_tasks._sentences(tf.constant('One. Two! Three?  Four.\nFive'))
  assert [s.decode() for s in sentences.numpy()] == [
      'One.', 'Two!', 'Three?', 'Four.', 'Five']


# ------------------------------------------------------------- training --


def _losses(model_dir):
  lines = (model_dir / 'metrics.jsonl').read_text().splitlines()
  return [json.loads(line)['loss'] for line in lines
          if 'loss' in json.loads(line)]


def _bindings(steps):
  return ['INIT_CHECKPOINT = None', f'TASK_FEATURE_LENGTHS = {LENGTHS}',
          'BATCH_SIZE = 8', 'LEARNING_RATE = 3e-3', 'WARMUP_STEPS = 2',
          'LOG_EVERY = 5', 'EVAL_EVERY = 0', f'SAVE_EVERY = {steps}']


def test_sft_steps_lower_the_loss_encoder_decoder(tmp_path):
  stages.run_stage(tmp_path, ('gin/models/t5gemma_tiny.gin', RECIPE), 30,
                   'sft_sentiment_spm8k', _bindings(30))
  losses = _losses(tmp_path)
  print(f'\nt5gemma_tiny SFT losses every 5 steps: '
        f'{[round(x, 3) for x in losses]}')
  assert losses[-1] < losses[0] - 1.0


@pytest.mark.slow
def test_sft_steps_lower_the_loss_decoder_only_cli(tmp_path):
  """`python -m t5x_adapt.train` with the SFT recipe."""
  command = [sys.executable, '-m', 't5x_adapt.train',
             '--gin_file=gin/models/gemma2_tiny.gin', f'--gin_file={RECIPE}',
             f"--gin.MODEL_DIR='{tmp_path}'", '--gin.TRAIN_STEPS=30',
             "--gin.MIXTURE_OR_TASK_NAME='sft_sentiment_spm8k'"]
  command += [f'--gin.{b.replace(" = ", "=", 1)}' for b in _bindings(30)]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  result = subprocess.run(command, cwd=REPO_ROOT, env=env, timeout=600,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  losses = _losses(tmp_path)
  print(f'\ngemma2_tiny SFT losses every 5 steps: '
        f'{[round(x, 3) for x in losses]}')
  assert losses[-1] < losses[0] - 1.0

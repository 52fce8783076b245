"""Classifiers on the last non-pad token (t5x_adapt.classification).

The slow tests fine-tune an adapted tiny encoder-decoder and the decoder-only
model it came from on the offline movie-review sentiment task with
gin/finetune/classification.gin and compare validation accuracy with the
majority-class rate. Run with `-s` to see the figures.
"""

import collections
import json
import math

import flax.traverse_util
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_adapt import adapt
from t5x_adapt import checkpoints
from t5x_adapt import classification
from t5x_adapt import demo
from t5x_adapt import gin_utils
from t5x_adapt import stages
from t5x_adapt import train as train_lib
from t5x_adapt.convert import load
from t5x_adapt.checkpoints import errors
from t5x_adapt.data import feature_converters
from t5x_adapt.data import pipeline

TASK = 'sentiment_cls_spm8k'
RECIPE = 'gin/finetune/classification.gin'
BACKBONES = {'t5gemma_tiny': '@EncoderDecoderModel()',
             'gemma2_tiny': '@DecoderOnlyModel()'}


def _classifier(preset, num_classes=3):
  backbone = gin_utils.load_model(preset)
  return classification.classification_model(backbone, num_classes)


def _init(model, seed=0):
  return model.get_initial_variables(jax.random.PRNGKey(seed), {})['params']


def _paths(tree):
  return {'/'.join(k) for k in flax.traverse_util.flatten_dict(tree)}


# ---------------------------------------------------------------- pooling --


def test_last_token_index_for_left_right_and_no_padding():
  segment_ids = jnp.array([[1, 1, 1, 0, 0],   # right padding
                           [0, 0, 1, 1, 1],   # left padding
                           [1, 1, 1, 1, 1],   # none
                           [0, 0, 0, 0, 0]])  # empty row
  np.testing.assert_array_equal(
      classification.last_token_index(segment_ids), [2, 4, 4, 0])


@pytest.mark.parametrize('preset', BACKBONES)
def test_head_reads_the_last_non_pad_token(preset):
  model = _classifier(preset)
  params = _init(model)
  key = model.tokens_key
  logits = jax.jit(lambda b: model.compute_logits(params, b))
  tokens = np.array([[2, 17, 5, 300, 41, 9]], np.int32)
  pad = np.zeros((1, 3), np.int32)
  plain = logits({key: tokens})
  variants = {
      'right padding': np.concatenate([tokens, pad], axis=1),
      'left padding': np.concatenate([pad, tokens], axis=1),
  }
  for name, padded in variants.items():
    np.testing.assert_allclose(logits({key: padded}), plain, rtol=1e-5,
                               atol=1e-6, err_msg=name)
  # In a batch, each row is pooled at its own last token.
  both = logits({key: np.concatenate(list(variants.values()))})
  np.testing.assert_allclose(both, np.concatenate([plain, plain]), rtol=1e-5,
                             atol=1e-6)
  changed = tokens.copy()
  changed[0, -1] = 42
  assert np.abs(logits({key: changed}) - plain).max() > 1e-4


def test_decoder_only_head_sees_every_input_token():
  """Causal attention: only the last token has seen the whole input."""
  model = _classifier('gemma2_tiny')
  params = _init(model)
  tokens = np.array([[2, 17, 5, 300, 41, 9]], np.int32)
  changed = tokens.copy()
  changed[0, 1] = 42
  outputs = [model.compute_logits(params, {'decoder_input_tokens': t})
             for t in (tokens, changed)]
  assert np.abs(outputs[0] - outputs[1]).max() > 1e-4


# ---------------------------------------------------------- parameters --


def test_encoder_classifier_has_the_encoder_and_a_head_only():
  model = _classifier('t5gemma_tiny', num_classes=3)
  assert isinstance(model, classification.EncoderClassificationModel)
  shapes = model.param_shapes()
  assert set(shapes) == {'encoder', 'classifier'}
  backbone = gin_utils.load_model('t5gemma_tiny').param_shapes()
  assert (jax.tree_util.tree_map(lambda s: s.shape, shapes['encoder']) ==
          jax.tree_util.tree_map(lambda s: s.shape, backbone['encoder']))
  assert not [p for p in _paths(shapes) if 'decoder' in p or 'cross' in p]
  assert shapes['classifier']['dense']['kernel'].shape == (64, 3)
  axes = model.logical_axes()['classifier']['dense']
  assert tuple(axes['kernel']) == ('embed', 'classes')
  assert tuple(axes['bias']) == ('classes',)


def test_decoder_only_classifier_has_the_decoder_and_a_head():
  model = _classifier('gemma2_tiny', num_classes=2)
  assert isinstance(model, classification.DecoderOnlyClassificationModel)
  shapes = model.param_shapes()
  backbone = gin_utils.load_model('gemma2_tiny').param_shapes()
  assert set(shapes) == {'decoder', 'classifier'}
  assert _paths(shapes['decoder']) == _paths(backbone['decoder'])


# ---------------------------------------------------------- checkpoints --


def test_init_from_an_encoder_decoder_checkpoint_reads_its_encoder(tmp_path):
  backbone = gin_utils.load_model('t5gemma_tiny')
  source = _init(backbone, seed=3)
  path = checkpoints.save_params(tmp_path / 'encdec', source)
  model = classification.classification_model(backbone, num_classes=2)
  params = load.initial_params(str(path), model)
  assert set(params) == {'encoder', 'classifier'}
  jax.tree_util.tree_map(np.testing.assert_array_equal, params['encoder'],
                         source['encoder'])
  jax.tree_util.tree_map(np.testing.assert_array_equal, params['classifier'],
                         model.fresh_head())
  # A decoder-only classifier cannot start from it: its decoder has
  # cross-attention.
  decoder_only = _classifier('gemma2_tiny')
  with pytest.raises(errors.UnexpectedTensorError, match='cross_attention'):
    load.initial_params(str(path), decoder_only)


def test_a_classifier_checkpoint_restores_whole(tmp_path):
  model = _classifier('gemma2_tiny', num_classes=2)
  params = _init(model, seed=5)
  path = checkpoints.save_params(tmp_path / 'cls', params)
  restored = load.initial_params(str(path), model)
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params)
  # Another classifier's checkpoint is not a backbone: strict, as ever.
  with pytest.raises(errors.MissingTensorError, match="first 'encoder/"):
    load.initial_params(str(path), _classifier('t5gemma_tiny'))


def test_a_checkpoint_without_the_stack_is_named(tmp_path):
  model = _classifier('gemma2_tiny')
  path = checkpoints.save_params(tmp_path / 'x', {'encoder': {
      'final_norm': {'scale': np.zeros(64, np.float32)}}})
  with pytest.raises(ValueError, match="no 'decoder' parameters"):
    load.initial_params(str(path), model)


# ------------------------------------------------------ loss and outputs --


def test_loss_accuracy_scores_and_predictions():
  model = _classifier('t5gemma_tiny', num_classes=3)
  params = _init(model)
  tokens = np.random.default_rng(0).integers(3, 512, (4, 7), np.int32)
  batch = {'encoder_input_tokens': tokens,
           'label': np.array([0, 2, 1, -1], np.int32)}
  log_probs = np.asarray(model.class_log_probs(params, batch))
  loss, metrics = model.loss_fn(params, batch, None)
  expected = -np.mean([log_probs[i, c] for i, c in enumerate((0, 2, 1))])
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert metrics['num_tokens'] == 3  # the unlabelled row does not count
  predictions = np.asarray(model.predict_batch(params, batch))
  np.testing.assert_array_equal(predictions, log_probs.argmax(-1))
  np.testing.assert_allclose(metrics['accuracy'],
                             np.mean(predictions[:3] == [0, 2, 1]))
  scores = np.asarray(model.score_batch(params, batch))
  np.testing.assert_allclose(scores[:3], [log_probs[0, 0], log_probs[1, 2],
                                          log_probs[2, 1]], rtol=1e-6)
  assert scores[3] == 0.0


# ------------------------------------------------------------- features --


@pytest.mark.parametrize('converter_cls, bos', [
    (feature_converters.EncoderClassificationFeatureConverter, []),
    (feature_converters.DecoderClassificationFeatureConverter, [2]),
])
def test_feature_converter_keeps_one_labelled_example_per_row(
    converter_cls, bos):
  import seqio  # pylint: disable=g-import-not-at-top
  task = seqio.get_mixture_or_task(TASK)
  examples = list(task.get_dataset({'inputs': 32}, split='validation',
                                   shuffle=False).take(4).as_numpy_iterator())
  batch = next(pipeline.get_dataset(
      TASK, {'inputs': 32}, converter_cls(pack=True), 4, split='validation',
      shuffle=False, num_epochs=1).as_numpy_iterator())
  assert set(batch) == {converter_cls.TOKENS_KEY, 'label'}
  for row, example in zip(range(4), examples):
    expected = np.array(bos + list(example['inputs']))[:32]
    tokens = batch[converter_cls.TOKENS_KEY][row]
    np.testing.assert_array_equal(tokens[:len(expected)], expected)
    assert not tokens[len(expected):].any()
    assert batch['label'][row] == example['label']


# ------------------------------------------------------ fine-tuning runs --


@pytest.fixture(scope='module')
def backbones(tmp_path_factory):
  """(decoder-only source, adapted encoder-decoder) checkpoints.

  gemma2_tiny trained briefly on the corpus (as tests/test_adapt.py), and
  its T5Gemma adaptation at step 0 (encoder and decoder from it,
  cross-attention from self-attention).
  """
  root = tmp_path_factory.mktemp('classification')
  cfg = demo.DemoConfig(batch_size=16, eval_batches=4, pretrain_length=64)
  source = stages.run_stage(
      root / 'decoder_only', demo.DECODER_ONLY_FILES, 100,
      demo.PRETRAIN_TASK, demo.run_bindings(cfg, {'targets': 64}) +
      ['EVAL_EVERY = 0', 'SAVE_EVERY = 100', 'WARMUP_STEPS = 10'])
  student = demo.adapted_model()
  adapted = checkpoints.save_params(
      root / 'adapted', adapt.Adaptation(str(source)).init_params(student))
  return root, source, adapted


FINETUNE_STEPS = 400
EVAL_BATCH = 32  # 33 batches of 32: the 1,056 validation reviews exactly


def _bindings(preset, init_checkpoint):
  return [f'BACKBONE = {BACKBONES[preset]}', 'NUM_CLASSES = 2',
          f"INIT_CHECKPOINT = '{init_checkpoint}'", 'LEARNING_RATE = 2e-3',
          "TASK_FEATURE_LENGTHS = {'inputs': 64}", f'BATCH_SIZE = {EVAL_BATCH}',
          f'EVAL_EVERY = {FINETUNE_STEPS}', 'EVAL_STEPS = 33',
          f'SAVE_EVERY = {FINETUNE_STEPS}']


def _finetune(model_dir, preset, init_checkpoint):
  """Fine-tunes with the recipe; (model, final params, metrics lines)."""
  files = (f'gin/models/{preset}.gin', RECIPE)
  bindings = _bindings(preset, init_checkpoint)
  final = stages.run_stage(model_dir, files, FINETUNE_STEPS, TASK, bindings)
  gin.clear_config()
  gin_utils.parse_gin(files, bindings)
  model = train_lib.build_model(TASK, None)
  lines = [json.loads(line) for line in
           (model_dir / train_lib.METRICS_FILE).read_text().splitlines()]
  return model, checkpoints.restore_params(final, model), lines


def _validation_accuracy(model, params):
  """(accuracy of predict_batch, labels) over the whole validation split."""
  converter = model.FEATURE_CONVERTER_CLS()
  batches = pipeline.get_dataset(TASK, {'inputs': 64}, converter, EVAL_BATCH,
                                 split='validation', shuffle=False,
                                 num_epochs=1)
  predict = jax.jit(model.predict_batch)
  correct, labels = 0, []
  for batch in batches.as_numpy_iterator():
    correct += int(np.sum(np.asarray(predict(params, batch)) ==
                          batch['label']))
    labels.extend(batch['label'].tolist())
  return correct / len(labels), labels


@pytest.mark.slow
def test_adapted_encoder_classifier_and_decoder_only_baseline(backbones):
  root, source, adapted = backbones
  results = {}
  for name, preset, init in (('adapted encoder (t5gemma_tiny)',
                              't5gemma_tiny', adapted),
                             ('decoder-only baseline (gemma2_tiny)',
                              'gemma2_tiny', source)):
    model, params, lines = _finetune(root / preset, preset, init)
    accuracy, labels = _validation_accuracy(model, params)
    final_eval = [l for l in lines if 'eval_accuracy' in l][-1]
    results[name] = (model, accuracy, final_eval)
  counts = collections.Counter(labels)
  majority = max(counts.values()) / len(labels)
  print(f'\nsentiment_cls_spm8k validation: {len(labels)} reviews, '
        f'labels {dict(sorted(counts.items()))}, majority rate '
        f'{majority:.3f}; {FINETUNE_STEPS} steps of {EVAL_BATCH} each')
  for name, (_, accuracy, final_eval) in results.items():
    print(f'  {name}: accuracy {accuracy:.3f}, validation loss '
          f'{final_eval["eval_loss"]:.3f}')
  assert len(labels) == 1056
  encoder_model, encoder_accuracy, encoder_eval = results[
      'adapted encoder (t5gemma_tiny)']
  assert isinstance(encoder_model,
                    classification.EncoderClassificationModel)
  assert encoder_accuracy > majority + 0.1
  # The trainer's validation pass saw the same 1,056 reviews.
  assert abs(encoder_eval['eval_accuracy'] - encoder_accuracy) < 2e-3
  _, baseline_accuracy, baseline_eval = results[
      'decoder-only baseline (gemma2_tiny)']
  assert baseline_eval['eval_loss'] < math.log(2) - 0.05  # it trained
  assert baseline_accuracy > majority

"""Logits parity with transformers (torch, float32) and the HF round trip."""

import jax
import numpy as np
import pytest
import safetensors.numpy
import transformers

import hf_fixtures as hf
from t5x_adapt import convert
from t5x_adapt.config import EncoderDecoderConfig
from t5x_adapt.convert import load
from t5x_adapt.models import EncoderDecoderModel

TOLERANCE = 1e-4

DECODER_ONLY = {
    'gemma2': (hf.gemma2, transformers.Gemma2ForCausalLM),
    'gemma3': (hf.gemma3, transformers.Gemma3ForCausalLM),
    **{name: (lambda name=name: hf.plain_family(name), classes[1])
       for name, classes in hf.PLAIN_FAMILIES.items()},
}
ENCODER_DECODER = {
    'balanced': dict(encoder_hidden=64, decoder_hidden=64),
    'unbalanced': dict(encoder_hidden=96, decoder_hidden=64),
}


@pytest.fixture(scope='module', params=sorted(DECODER_ONLY))
def decoder_only_checkpoint(request, tmp_path_factory):
  build, cls = DECODER_ONLY[request.param]
  path = hf.save(build(), tmp_path_factory.mktemp(request.param))
  return request.param, path, cls


@pytest.fixture(scope='module', params=sorted(ENCODER_DECODER))
def t5gemma_checkpoint(request, tmp_path_factory):
  path = hf.save(hf.t5gemma(**ENCODER_DECODER[request.param]),
                 tmp_path_factory.mktemp(request.param))
  return request.param, path


@pytest.fixture(scope='module')
def t5gemma2_checkpoint(tmp_path_factory):
  return hf.save(hf.t5gemma2(), tmp_path_factory.mktemp('t5gemma2'))


def _with_eoi(batch):
  """The batch with T5Gemma 2's end-of-image token in both stacks' inputs."""
  batch = {k: v.copy() for k, v in batch.items()}
  batch['encoder_input_tokens'][0, 2] = hf.EOI
  batch['decoder_input_tokens'][1, 3] = hf.EOI
  batch['decoder_target_tokens'][1, 2] = hf.EOI
  return batch


@pytest.mark.parametrize('scan_layers', [True, False])
def test_decoder_only_logits_match_transformers(decoder_only_checkpoint,
                                                scan_layers):
  name, path, cls = decoder_only_checkpoint
  reference_model = hf.load(path, cls)
  tokens = hf.padded_tokens(seed=3)
  reference = hf.decoder_only_logits(reference_model, tokens)
  model, params = convert.load_hf(path, scan_layers=scan_layers)
  ours = model.compute_logits(params, {'decoder_input_tokens': tokens})
  error = hf.relative_error(ours, reference, tokens > 0)
  print(f'{name} scan={scan_layers}: relative error {error:.2e}')
  assert error <= TOLERANCE


@pytest.mark.parametrize('scan_layers', [True, False])
def test_t5gemma_logits_match_transformers(t5gemma_checkpoint, scan_layers):
  name, path = t5gemma_checkpoint
  reference_model = hf.load(path, transformers.T5GemmaForConditionalGeneration)
  batch = hf.seq2seq_batch(seed=5)
  reference = hf.seq2seq_logits(reference_model, batch)
  model, params = convert.load_hf(path, scan_layers=scan_layers)
  ours = model.compute_logits(params, batch)
  error = hf.relative_error(ours, reference,
                            batch['decoder_target_tokens'] > 0)
  print(f't5gemma {name} scan={scan_layers}: relative error {error:.2e}')
  assert error <= TOLERANCE


@pytest.mark.parametrize('scan_layers', [True, False])
def test_t5gemma2_logits_match_transformers(t5gemma2_checkpoint, scan_layers):
  """Merged attention, the split encoder window (5 < 16 tokens), GQA, the
  end-of-image embedding, padded rows."""
  reference_model = hf.load(t5gemma2_checkpoint,
                            transformers.T5Gemma2ForConditionalGeneration)
  batch = _with_eoi(hf.seq2seq_batch(seed=5))
  reference = hf.seq2seq_logits(reference_model, batch)
  model, params = convert.load_hf(t5gemma2_checkpoint,
                                  scan_layers=scan_layers, text_only=True)
  assert model.config.encoder_attention == 'merged'
  ours = model.compute_logits(params, batch)
  error = hf.relative_error(ours, reference,
                            batch['decoder_target_tokens'] > 0)
  print(f't5gemma2 scan={scan_layers}: relative error {error:.2e}')
  assert error <= TOLERANCE


def test_t5gemma2_round_trip_and_vision_tower(t5gemma2_checkpoint, tmp_path):
  """load_hf -> save_hf -> transformers gives the same logits; a vision
  tower is named, and read past only when asked."""
  with pytest.raises(convert.UnsupportedArchitectureError,
                     match='vision tower.*text_only'):
    convert.load_hf(t5gemma2_checkpoint)
  cls = transformers.T5Gemma2ForConditionalGeneration
  model, params = convert.load_hf(t5gemma2_checkpoint, text_only=True)
  # One table in the tree, the checkpoint's (stored with the encoder).
  assert 'token_embedder' in params
  assert 'token_embedder' not in params['encoder']
  assert 'token_embedder' not in params['decoder']
  stored = safetensors.numpy.load_file(
      str(t5gemma2_checkpoint / 'model.safetensors'))
  np.testing.assert_array_equal(params['token_embedder']['embedding'],
                                stored['model.encoder.embed_tokens.weight'])
  np.testing.assert_array_equal(
      params['token_embedder']['eoi_embedding'],
      stored['model.encoder.embed_tokens.eoi_embedding'])
  convert.save_hf(model, params, tmp_path)
  batch = _with_eoi(hf.seq2seq_batch(seed=9))
  original = hf.seq2seq_logits(hf.load(t5gemma2_checkpoint, cls), batch)
  exported = hf.seq2seq_logits(hf.load(tmp_path, cls), batch)
  error = hf.relative_error(exported, original,
                            batch['decoder_target_tokens'] > 0)
  print(f't5gemma2 round trip: relative error {error:.2e}')
  assert error <= 1e-6


def test_decoder_only_round_trip(decoder_only_checkpoint, tmp_path):
  name, path, cls = decoder_only_checkpoint
  model, params = convert.load_hf(path)
  convert.save_hf(model, params, tmp_path)
  tokens = hf.padded_tokens(seed=7)
  original = hf.decoder_only_logits(hf.load(path, cls), tokens)
  exported = hf.decoder_only_logits(hf.load(tmp_path, cls), tokens)
  error = hf.relative_error(exported, original, tokens > 0)
  print(f'{name} round trip: relative error {error:.2e}')
  assert error <= 1e-6


def test_t5gemma_round_trip(t5gemma_checkpoint, tmp_path):
  name, path = t5gemma_checkpoint
  cls = transformers.T5GemmaForConditionalGeneration
  model, params = convert.load_hf(path)
  convert.save_hf(model, params, tmp_path)
  batch = hf.seq2seq_batch(seed=9)
  original = hf.seq2seq_logits(hf.load(path, cls), batch)
  exported = hf.seq2seq_logits(hf.load(tmp_path, cls), batch)
  error = hf.relative_error(exported, original,
                            batch['decoder_target_tokens'] > 0)
  print(f't5gemma {name} round trip: relative error {error:.2e}')
  assert error <= 1e-6


def test_t5gemma2_checkpoint_fits_a_model_like_the_presets(
    t5gemma2_checkpoint):
  """The T5Gemma 2 presets bind one StackConfig (window split, end-of-image
  token) to both stacks; a transformers checkpoint loads into that model."""
  model, params = convert.load_hf(t5gemma2_checkpoint, text_only=True)
  stack = model.config.encoder
  preset_like = EncoderDecoderModel(EncoderDecoderConfig(
      stack, stack, tie_embeddings=True, encoder_attention='merged'))
  loaded = load.load_params(t5gemma2_checkpoint, preset_like)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, params)

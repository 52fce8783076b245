"""`python -m t5x_adapt.convert`: HF -> Orbax -> HF keeps the logits."""

import json

import transformers

import hf_fixtures as hf
from t5x_adapt.convert.__main__ import main


def test_hf_orbax_hf_round_trip(tmp_path):
  source = hf.save(hf.t5gemma(encoder_hidden=96, decoder_hidden=64),
                   tmp_path / 'hf')
  assert main(['hf-to-orbax', str(source), str(tmp_path / 'orbax')]) == 0
  assert main(['orbax-to-hf', str(tmp_path / 'orbax'),
               str(tmp_path / 'exported')]) == 0
  cls = transformers.T5GemmaForConditionalGeneration
  batch = hf.seq2seq_batch(seed=11)
  original = hf.seq2seq_logits(hf.load(source, cls), batch)
  exported = hf.seq2seq_logits(hf.load(tmp_path / 'exported', cls), batch)
  assert hf.relative_error(exported, original,
                           batch['decoder_target_tokens'] > 0) <= 1e-6


def test_unknown_architecture_is_a_clear_error(tmp_path, capsys):
  source = hf.save(hf.gemma2(layers=2), tmp_path / 'hf')
  config = json.loads((source / 'config.json').read_text())
  config['architectures'] = ['PhiForCausalLM']
  (source / 'config.json').write_text(json.dumps(config))
  assert main(['hf-to-orbax', str(source), str(tmp_path / 'orbax')]) == 1
  error = capsys.readouterr().err
  assert "'PhiForCausalLM' is not supported" in error
  assert not (tmp_path / 'orbax').exists()


def test_t5gemma2_needs_text_only_and_round_trips(tmp_path, capsys):
  """A T5Gemma 2 checkpoint's vision tower is named; --text_only reads the
  text model, and orbax-to-hf writes T5Gemma2ForConditionalGeneration."""
  source = hf.save(hf.t5gemma2(), tmp_path / 'hf')
  assert main(['hf-to-orbax', str(source), str(tmp_path / 'orbax')]) == 1
  assert 'vision tower' in capsys.readouterr().err
  assert main(['hf-to-orbax', str(source), str(tmp_path / 'orbax'),
               '--text_only']) == 0
  assert main(['orbax-to-hf', str(tmp_path / 'orbax'),
               str(tmp_path / 'exported')]) == 0
  cls = transformers.T5Gemma2ForConditionalGeneration
  batch = hf.seq2seq_batch(seed=12)
  original = hf.seq2seq_logits(hf.load(source, cls), batch)
  exported = hf.seq2seq_logits(hf.load(tmp_path / 'exported', cls), batch)
  assert hf.relative_error(exported, original,
                           batch['decoder_target_tokens'] > 0) <= 1e-6

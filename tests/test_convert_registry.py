"""The converters' registry: one row per source, found by kind and name
(reading) or by the model (writing), configs that survive a round trip."""

import pytest

from t5x_adapt import gin_utils
from t5x_adapt.checkpoints import errors
from t5x_adapt.convert import load
from t5x_adapt.convert import registry

# Preset -> the transformers class that writes it.
WRITTEN_AS = {
    'gemma2_tiny': 'Gemma2ForCausalLM',
    'gemma3_tiny': 'Gemma3ForCausalLM',
    'llama_tiny': 'LlamaForCausalLM',
    'qwen2_tiny': 'Qwen2ForCausalLM',
    'qwen3_tiny': 'Qwen3ForCausalLM',
    'mistral_tiny': 'MistralForCausalLM',
    't5gemma_tiny_unbalanced': 'T5GemmaForConditionalGeneration',
    't5gemma2_tiny': 'T5Gemma2ForConditionalGeneration',
}


def test_one_row_per_source():
  assert registry.architectures(registry.TRANSFORMERS) == sorted(
      WRITTEN_AS.values())
  assert registry.architectures(registry.GGUF) == ['gemma3']
  row = registry.find(registry.TRANSFORMERS, 'Qwen2ForCausalLM', 'here')
  assert row.implied['qkv_bias'] and row.family == 'qwen2'


def test_a_row_is_registered_once():
  row = registry.find(registry.GGUF, 'gemma3', 'here')
  with pytest.raises(ValueError, match="'gemma3' is registered twice"):
    registry.register(row)


@pytest.mark.parametrize('preset', sorted(WRITTEN_AS))
def test_the_model_picks_its_row_and_its_config_round_trips(preset):
  config = gin_utils.load_model(preset).config
  row = registry.writer(registry.TRANSFORMERS, config)
  assert row.architecture == WRITTEN_AS[preset]
  written = row.write_config(config)
  assert written['architectures'] == [row.architecture]
  read = row.read_config(written, preset)
  assert read.is_encoder_decoder == config.is_encoder_decoder
  for name, stack in config.stacks().items():
    load.check_architecture(read.stacks()[name], stack, f'{preset} {name}')


def test_no_row_writes_cross_attention_over_gemma3_stacks():
  config = gin_utils.load_model('t5gemma3_tiny').config
  with pytest.raises(errors.UnsupportedArchitectureError,
                     match='T5Gemma2ForConditionalGeneration'):
    registry.writer(registry.TRANSFORMERS, config)


def test_a_stack_unlike_its_class_is_refused():
  config = gin_utils.load_model('gemma2_tiny').config.replace(
      mlp_activation='silu')
  row = registry.writer(registry.TRANSFORMERS, config)
  with pytest.raises(errors.UnsupportedArchitectureError,
                     match='Gemma2ForCausalLM has no equivalent of '
                     "mlp_activation='silu'"):
    row.write_config(config)

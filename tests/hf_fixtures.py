"""Small random transformers models, saved with `save_pretrained`.

Every parameter (norm scales included) is redrawn from a normal distribution
large enough that softcaps, QK norms and sliding windows change the logits,
so a parity test against these models can fail.
"""

import pathlib

import numpy as np
import torch
import transformers

VOCAB = 128
SEQ = 16
WINDOW = 5
EOI = VOCAB - 1  # T5Gemma 2's end-of-image token, inside the tiny vocabulary


def _randomize(model: torch.nn.Module, seed: int,
               norm_mean: float = 0.0) -> torch.nn.Module:
  """Every parameter redrawn; norms around `norm_mean` (Gemma's scale
  `1 + w` is centred by 0, the plain weight of Llama-style norms by 1)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      std = 0.5 if 'norm' in name else 0.15
      mean = norm_mean if 'norm' in name else 0.0
      param.copy_(mean + torch.randn(param.shape, generator=generator) * std)
  return model.eval()


def _module_kwargs(hidden, layers):
  return dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
              num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
              sliding_window=WINDOW, attn_logit_softcapping=5.0,
              final_logit_softcapping=3.0)


def gemma2(layers=4):
  config = transformers.Gemma2Config(**_module_kwargs(64, layers))
  return _randomize(transformers.Gemma2ForCausalLM(config), 0)


def _gemma3_kwargs(layers):
  kwargs = _module_kwargs(64, layers)
  kwargs.update(attn_logit_softcapping=None, final_logit_softcapping=None,
                rope_parameters={
                    'full_attention': {'rope_type': 'default',
                                       'rope_theta': 1_000_000.0},
                    'sliding_attention': {'rope_type': 'default',
                                          'rope_theta': 10_000.0}})
  return kwargs


def gemma3(layers=7):
  config = transformers.Gemma3TextConfig(**_gemma3_kwargs(layers))
  return _randomize(transformers.Gemma3ForCausalLM(config), 1)


def _plain_kwargs(layers):
  return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
              num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5)


# The Llama-style source families: (transformers config, model) classes and
# what each fixture sets to exercise its difference (Llama 3 RoPE scaling
# with an original context shorter than SEQ and an untied head; Qwen 2's
# QKV biases; Qwen 3's QK norm; Mistral's window shorter than SEQ).
PLAIN_FAMILIES = {
    'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        rope_parameters={'rope_type': 'llama3', 'rope_theta': 500_000.0,
                         'factor': 8.0, 'low_freq_factor': 1.0,
                         'high_freq_factor': 4.0,
                         'original_max_position_embeddings': 8},
        tie_word_embeddings=False)),
    'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True)),
    'qwen3': (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(tie_word_embeddings=True)),
    'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=WINDOW, tie_word_embeddings=False)),
}


def plain_family(name: str, layers=3):
  config_cls, model_cls, changes = PLAIN_FAMILIES[name]
  config = config_cls(**_plain_kwargs(layers), **changes)
  return _randomize(model_cls(config), 4, norm_mean=1.0)


def t5gemma2(layers=7):
  """Gemma 3 stacks, merged attention, one table; a tiny vision tower
  (T5Gemma2ForConditionalGeneration always has one)."""
  from transformers.models.t5gemma2 import configuration_t5gemma2 as c
  vision = transformers.SiglipVisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=1,
      num_attention_heads=2, image_size=28, patch_size=14)
  encoder = c.T5Gemma2EncoderConfig(
      text_config=c.T5Gemma2TextConfig(**_gemma3_kwargs(layers)),
      vision_config=vision, mm_tokens_per_image=4, eoi_token_index=EOI)
  decoder = c.T5Gemma2DecoderConfig(**_gemma3_kwargs(layers))
  config = transformers.T5Gemma2Config(encoder=encoder, decoder=decoder)
  return _randomize(transformers.T5Gemma2ForConditionalGeneration(config), 3)


def t5gemma(encoder_hidden=64, decoder_hidden=64, layers=4):
  encoder = transformers.T5GemmaModuleConfig(
      **_module_kwargs(encoder_hidden, layers))
  decoder = transformers.T5GemmaModuleConfig(
      **_module_kwargs(decoder_hidden, layers))
  config = transformers.T5GemmaConfig(encoder=encoder, decoder=decoder,
                                      vocab_size=VOCAB)
  return _randomize(transformers.T5GemmaForConditionalGeneration(config), 2)


def save(model, path: pathlib.Path) -> pathlib.Path:
  model.save_pretrained(path)
  return path


def load(path, cls):
  return cls.from_pretrained(path, attn_implementation='eager',
                             dtype=torch.float32).eval()


def padded_tokens(seed: int, lengths=(SEQ, 11, 6)) -> np.ndarray:
  """Right-padded random ids in [3, VOCAB), one row per length."""
  rng = np.random.default_rng(seed)
  tokens = np.zeros((len(lengths), SEQ), np.int32)
  for row, n in enumerate(lengths):
    tokens[row, :n] = rng.integers(3, VOCAB, n)
  return tokens


def decoder_only_logits(model, tokens: np.ndarray) -> np.ndarray:
  ids = torch.tensor(tokens, dtype=torch.long)
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=(ids != 0).long()).logits.numpy()


def seq2seq_batch(seed: int) -> dict:
  """Encoder inputs and BOS-started decoder inputs / targets, padded."""
  encoder = padded_tokens(seed)
  body = padded_tokens(seed + 1, lengths=(SEQ - 1, 9, 4))[:, :SEQ - 1]
  lengths = (body > 0).sum(axis=1)
  decoder_input = np.zeros((3, SEQ), np.int32)
  target = np.zeros((3, SEQ), np.int32)
  for row, n in enumerate(lengths):
    decoder_input[row, 0] = 2
    decoder_input[row, 1:n + 1] = body[row, :n]
    target[row, :n] = body[row, :n]
    target[row, n] = 1
  return {'encoder_input_tokens': encoder,
          'decoder_input_tokens': decoder_input,
          'decoder_target_tokens': target}


def seq2seq_logits(model, batch) -> np.ndarray:
  enc = torch.tensor(batch['encoder_input_tokens'], dtype=torch.long)
  dec = torch.tensor(batch['decoder_input_tokens'], dtype=torch.long)
  with torch.no_grad():
    return model(input_ids=enc, attention_mask=(enc != 0).long(),
                 decoder_input_ids=dec,
                 decoder_attention_mask=(dec != 0).long()).logits.numpy()


def relative_error(ours, reference, valid) -> float:
  """max |ours - reference| / max |reference| over valid positions."""
  ours = np.asarray(ours)[valid]
  reference = np.asarray(reference)[valid]
  return float(np.abs(ours - reference).max() / np.abs(reference).max())

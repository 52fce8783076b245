"""What the transformers classes we read and write are, in our terms.

Tensor names (`NameScheme`s), configs in and out (config.json's dict <->
StackConfig / EncoderDecoderConfig) and the factories of the registry rows
(`registry.Source`) that `hf.SOURCES` lists, one per class.

Window convention: transformers' T5Gemma encoder lets a local layer see
`|q - k| <= sliding_window`, our masks `|q - k| < window`, so the encoder's
window is stored one larger here than in the HF config. T5Gemma 2's encoder
splits its `sliding_window` W around the query (`bidirectional_window =
'split'`, `StackConfig`), the window stored as is.

T5Gemma 2 checkpoints carry a vision tower (SigLIP and a projector): its
row names it, the readers leave it unread (`text_only`), and its config
out writes a minimal, untrained one (`T5Gemma2ForConditionalGeneration`
always has one).
"""

from __future__ import annotations

import functools
from typing import Optional

from t5x_adapt.checkpoints import errors
from t5x_adapt.config import GLOBAL, LOCAL, EncoderDecoderConfig, StackConfig
from t5x_adapt.convert import registry
from t5x_adapt.convert.tables import NameScheme

_PROJECTIONS = {'query': 'q_proj', 'key': 'k_proj', 'value': 'v_proj',
                'out': 'o_proj', 'query_norm': 'q_norm', 'key_norm': 'k_norm'}
_ATTENTION = {'self_attention': 'self_attn.', 'cross_attention': 'cross_attn.'}
_MLP = {'gate': 'mlp.gate_proj', 'up': 'mlp.up_proj', 'down': 'mlp.down_proj'}

GEMMA_NAMES = NameScheme(
    embedding='embed_tokens', final_norm='norm', layer='layers.{i}.',
    norms={'pre_self_attention_norm': 'input_layernorm',
           'post_self_attention_norm': 'post_attention_layernorm',
           'pre_mlp_norm': 'pre_feedforward_layernorm',
           'post_mlp_norm': 'post_feedforward_layernorm'},
    attention=_ATTENTION, projections=_PROJECTIONS, mlp=_MLP)

T5GEMMA_NAMES = NameScheme(
    embedding='embed_tokens', final_norm='norm', layer='layers.{i}.',
    norms={'pre_self_attention_norm': 'pre_self_attn_layernorm',
           'post_self_attention_norm': 'post_self_attn_layernorm',
           'pre_cross_attention_norm': 'pre_cross_attn_layernorm',
           'post_cross_attention_norm': 'post_cross_attn_layernorm',
           'pre_mlp_norm': 'pre_feedforward_layernorm',
           'post_mlp_norm': 'post_feedforward_layernorm'},
    attention=_ATTENTION, projections=_PROJECTIONS, mlp=_MLP,
    eoi_embedding='embed_tokens.eoi_embedding')

# Llama-style blocks (Llama, Qwen 2, Qwen 3, Mistral): pre-norms only.
PLAIN_NAMES = NameScheme(
    embedding='embed_tokens', final_norm='norm', layer='layers.{i}.',
    norms={'pre_self_attention_norm': 'input_layernorm',
           'pre_mlp_norm': 'post_attention_layernorm'},
    attention=_ATTENTION, projections=_PROJECTIONS, mlp=_MLP)

# The StackConfig fields a Gemma block has whatever its config says (a
# row's `implied`), and a Llama-style one.
GEMMA_BLOCK = dict(mlp_activation='gelu_tanh', norm_style='gemma',
                   post_norms=True, scale_embeddings=True, qkv_bias=False,
                   tie_lm_head=True)
PLAIN_BLOCK = dict(mlp_activation='silu', norm_style='plain', post_norms=False,
                   scale_embeddings=False, attn_logit_softcap=None,
                   final_logit_softcap=None)

# The smallest SigLIP tower transformers builds: `save_hf` writes the text
# model, and T5Gemma2ForConditionalGeneration always has a tower.
_PLACEHOLDER_VISION = {
    'model_type': 'siglip_vision_model', 'hidden_size': 16,
    'intermediate_size': 32, 'num_hidden_layers': 1, 'num_attention_heads': 2,
    'image_size': 28, 'patch_size': 14, 'num_channels': 3,
    'layer_norm_eps': 1e-6, 'hidden_act': 'gelu_pytorch_tanh'}
_SPECIAL_TOKENS = {'pad_token_id': 0, 'eos_token_id': 1, 'bos_token_id': 2}


# ---------------------------------------------------------- shared pieces --


def _pattern(layer_types: list[str], source: str) -> tuple[str, ...]:
  """The shortest period that repeats to give `layer_types`."""
  kinds = [LOCAL if t == 'sliding_attention' else GLOBAL for t in layer_types]
  for period in range(1, len(kinds) + 1):
    if all(kinds[i] == kinds[i % period] for i in range(len(kinds))):
      return tuple(kinds[:period])
  raise errors.UnsupportedArchitectureError(f'{source}: bad layer_types')


def _rope(params: Optional[dict], source: str,
          kinds: tuple[str, ...] = ('default', 'linear')
          ) -> tuple[float, float, Optional[tuple]]:
  """(base, factor, Llama 3's (low, high, original) or None) of a
  rope_parameters dict whose rope_type is one of `kinds`."""
  params = params or {}
  kind = params.get('rope_type', 'default')
  if kind not in kinds:
    raise errors.UnsupportedArchitectureError(
        f'{source}: rope_type {kind!r} is not supported ({", ".join(kinds)})')
  factor = float(params.get('factor', 1.0)) if kind != 'default' else 1.0
  base = float(params.get('rope_theta', 10_000.0))
  scaling = None
  if kind == 'llama3':
    scaling = (float(params['low_freq_factor']),
               float(params['high_freq_factor']),
               int(params['original_max_position_embeddings']))
  return base, factor, scaling


def _layer_types(cfg: StackConfig) -> list[str]:
  return ['sliding_attention' if cfg.layer_kind(i) == LOCAL
          else 'full_attention' for i in range(cfg.num_layers)]


# ------------------------------------------------------ Gemma 2, Gemma 3 --


def stack_config_from_hf(hf: dict, source: str,
                         window_offset: int = 0) -> StackConfig:
  """One Gemma-style transformers (module) config -> StackConfig."""
  if hf.get('hidden_activation', 'gelu_pytorch_tanh') != 'gelu_pytorch_tanh':
    raise errors.UnsupportedArchitectureError(
        f'{source}: hidden_activation {hf["hidden_activation"]!r} '
        'is not supported (gelu_pytorch_tanh)')
  if hf.get('attention_bias') or hf.get('use_bidirectional_attention'):
    raise errors.UnsupportedArchitectureError(
        f'{source}: attention_bias / use_bidirectional_attention '
        'are not supported')
  rope = hf.get('rope_parameters') or {'rope_theta': hf.get('rope_theta',
                                                            10_000.0)}
  if 'full_attention' in rope:
    global_base, global_scale, _ = _rope(rope['full_attention'], source)
    local_base, local_scale, _ = _rope(rope.get('sliding_attention'), source)
  else:
    global_base, global_scale, _ = _rope(rope, source)
    local_base, local_scale = global_base, global_scale
  if local_scale != 1.0:
    raise errors.UnsupportedArchitectureError(
        f'{source}: RoPE scaling on local layers is not supported')
  num_layers = hf['num_hidden_layers']
  layer_types = hf.get('layer_types') or ['full_attention'] * num_layers
  window = hf.get('sliding_window')
  return StackConfig(
      vocab_size=hf['vocab_size'], num_layers=num_layers,
      embed_dim=hf['hidden_size'], mlp_dim=hf['intermediate_size'],
      num_heads=hf['num_attention_heads'],
      num_kv_heads=hf['num_key_value_heads'], head_dim=hf['head_dim'],
      query_pre_attn_scalar=hf['query_pre_attn_scalar'],
      attention_pattern=_pattern(layer_types[:num_layers], source),
      sliding_window=None if window is None else window + window_offset,
      rope_local_base=local_base, rope_global_base=global_base,
      rope_global_scale=global_scale,
      attn_logit_softcap=hf.get('attn_logit_softcapping'),
      final_logit_softcap=hf.get('final_logit_softcapping'),
      rms_norm_eps=hf['rms_norm_eps'])


def _gemma_rope(cfg: StackConfig, by_layer_type: bool) -> dict:
  """rope_parameters: one for all layers (Gemma 2) or one per layer type
  (Gemma 3)."""
  global_rope = {'rope_type': 'default', 'rope_theta': cfg.rope_global_base}
  if cfg.rope_global_scale != 1.0:
    global_rope = {'rope_type': 'linear', 'factor': cfg.rope_global_scale,
                   'rope_theta': cfg.rope_global_base}
  if by_layer_type:
    return {'full_attention': global_rope,
            'sliding_attention': {'rope_type': 'default',
                                  'rope_theta': cfg.rope_local_base}}
  if cfg.rope_local_base != cfg.rope_global_base or cfg.rope_global_scale != 1:
    raise errors.UnsupportedArchitectureError(
        'Gemma 2 style checkpoints have one RoPE base for all layers')
  return global_rope


def stack_config_to_hf(cfg: StackConfig, window_offset: int = 0,
                       rope_by_layer_type: bool = False) -> dict:
  """StackConfig -> the fields of a Gemma-style transformers (module)
  config; `rope_by_layer_type`: Gemma 3's RoPE parameters."""
  window = cfg.sliding_window
  return {
      'vocab_size': cfg.vocab_size, 'num_hidden_layers': cfg.num_layers,
      'hidden_size': cfg.embed_dim, 'intermediate_size': cfg.mlp_dim,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.head_dim,
      'query_pre_attn_scalar': cfg.query_pre_attn_scalar or cfg.head_dim,
      'sliding_window': 4096 if window is None else window - window_offset,
      'layer_types': _layer_types(cfg),
      'rope_parameters': _gemma_rope(cfg, rope_by_layer_type),
      'attn_logit_softcapping': cfg.attn_logit_softcap,
      'final_logit_softcapping': cfg.final_logit_softcap,
      'rms_norm_eps': cfg.rms_norm_eps,
      'hidden_activation': 'gelu_pytorch_tanh', 'attention_bias': False,
      'max_position_embeddings': 8192, 'tie_word_embeddings': True,
      **_SPECIAL_TOKENS,
  }


def gemma(architecture: str, model_type: str, family: str, *,
          qk_norm: bool = False,
          rope_by_layer_type: bool = False) -> registry.Source:
  """The row of a Gemma-style decoder-only class (Gemma 2, Gemma 3)."""
  return registry.Source(
      registry.TRANSFORMERS, architecture, family,
      config_in=stack_config_from_hf, names=GEMMA_NAMES,
      prefixes={'decoder': 'model.'},
      implied=dict(GEMMA_BLOCK, use_qk_norm=qk_norm),
      config_out=functools.partial(stack_config_to_hf,
                                   rope_by_layer_type=rope_by_layer_type),
      model_type=model_type, tied=('lm_head.weight',))


# ----------------------------------------------------------------- T5Gemma --


def _check_tied_head(hf: dict, source: str) -> None:
  if not hf.get('tie_word_embeddings', True):
    raise errors.UnsupportedArchitectureError(
        f'{source}: untied LM head is not supported')


def t5gemma_config_from_hf(hf: dict, source: str) -> EncoderDecoderConfig:
  """A T5GemmaConfig dict -> EncoderDecoderConfig (cross attention)."""
  _check_tied_head(hf, source)
  return EncoderDecoderConfig(
      stack_config_from_hf(hf['encoder'], source, window_offset=1),
      stack_config_from_hf(hf['decoder'], source))


def t5gemma_config_to_hf(config: EncoderDecoderConfig) -> dict:
  """The T5GemmaConfig dict of a T5Gemma model."""
  encoder = dict(stack_config_to_hf(config.encoder, window_offset=1),
                 model_type='t5_gemma_module', is_decoder=False)
  decoder = dict(stack_config_to_hf(config.decoder),
                 model_type='t5_gemma_module', is_decoder=True)
  return {'encoder': encoder, 'decoder': decoder,
          'vocab_size': config.decoder.vocab_size,
          'tie_word_embeddings': True, 'is_encoder_decoder': True,
          **_SPECIAL_TOKENS}


# --------------------------------------------------------------- T5Gemma 2 --


def t5gemma2_config_from_hf(hf: dict, source: str) -> EncoderDecoderConfig:
  """A T5Gemma2Config dict (text part) -> EncoderDecoderConfig."""
  encoder_hf = hf['encoder']
  eoi = encoder_hf.get('eoi_token_index', 256_000)
  _check_tied_head(hf, source)
  # Both stacks split the window, as the T5Gemma 2 presets bind it (one
  # scoped StackConfig for both): the decoder, causal, never uses it, and
  # so the checkpoint fits the presets' models (`load.check_architecture`).
  split = dict(bidirectional_window='split', eoi_token_id=eoi)
  return EncoderDecoderConfig(
      stack_config_from_hf(encoder_hf['text_config'], source).replace(**split),
      stack_config_from_hf(hf['decoder'], source).replace(**split),
      tie_embeddings=True, encoder_attention='merged')


def _t5gemma2_problems(config: EncoderDecoderConfig) -> list[str]:
  """What keeps `config` from being a T5Gemma 2 model."""
  enc, dec = config.encoder, config.decoder
  problems = []
  if not config.tie_embeddings:
    problems.append('tie_embeddings=False (T5Gemma 2 has one table)')
  if enc.bidirectional_window != 'split':
    problems.append(f"encoder bidirectional_window={enc.bidirectional_window!r}"
                    " (T5Gemma 2 splits it: 'split')")
  if enc.eoi_token_id is None or enc.eoi_token_id != dec.eoi_token_id:
    problems.append(f'eoi_token_id {enc.eoi_token_id} / {dec.eoi_token_id} '
                    '(T5Gemma 2 gives both stacks the same one)')
  return problems


def t5gemma2_config_to_hf(config: EncoderDecoderConfig) -> dict:
  """The T5Gemma2Config dict of a T5Gemma 2 model (text, placeholder
  vision tower)."""
  problems = _t5gemma2_problems(config)
  if problems:
    raise errors.UnsupportedArchitectureError(
        'not a T5Gemma 2 model: ' + '; '.join(problems))
  enc, dec = config.encoder, config.decoder
  text = dict(stack_config_to_hf(enc, rope_by_layer_type=True),
              model_type='t5gemma2_text')
  return {
      'encoder': {'model_type': 't5gemma2_encoder', 'text_config': text,
                  'vision_config': dict(_PLACEHOLDER_VISION),
                  'mm_tokens_per_image': 4,
                  'eoi_token_index': enc.eoi_token_id,
                  'tie_word_embeddings': True},
      'decoder': dict(stack_config_to_hf(dec, rope_by_layer_type=True),
                      model_type='t5gemma2_decoder'),
      'eoi_token_index': enc.eoi_token_id, 'vocab_size': dec.vocab_size,
      'tie_word_embeddings': True, 'is_encoder_decoder': True,
      **_SPECIAL_TOKENS}


# ------------------------------------- Llama, Qwen 2, Qwen 3 and Mistral --


def llama_config_from_hf(hf: dict, source: str, architecture: str,
                         layer_types: bool) -> StackConfig:
  """A Llama-style config dict -> StackConfig (see `llama_style`)."""
  unsupported = [name for name in ('mlp_bias', 'attention_bias')
                 if hf.get(name)]
  if hf.get('hidden_act', 'silu') != 'silu':
    unsupported.append(f'hidden_act {hf["hidden_act"]!r}')
  if unsupported:
    raise errors.UnsupportedArchitectureError(
        f'{source}: {", ".join(unsupported)} not supported for '
        f'{architecture}')
  rope = hf.get('rope_parameters') or dict(
      hf.get('rope_scaling') or {}, rope_theta=hf.get('rope_theta', 10_000.0))
  base, factor, llama3 = _rope(rope, source,
                               kinds=('default', 'linear', 'llama3'))
  num_layers = hf['num_hidden_layers']
  window = hf.get('sliding_window')
  if not layer_types or hf.get('use_sliding_window'):
    default_type = 'sliding_attention' if window else 'full_attention'
  else:
    default_type, window = 'full_attention', None
  types = hf.get('layer_types') or [default_type] * num_layers
  pattern = _pattern(types[:num_layers], source)
  head_dim = hf.get('head_dim') or hf['hidden_size'] // hf[
      'num_attention_heads']
  return StackConfig(
      vocab_size=hf['vocab_size'], num_layers=num_layers,
      embed_dim=hf['hidden_size'], mlp_dim=hf['intermediate_size'],
      num_heads=hf['num_attention_heads'],
      num_kv_heads=hf['num_key_value_heads'], head_dim=head_dim,
      query_pre_attn_scalar=head_dim, attention_pattern=pattern,
      sliding_window=window if LOCAL in pattern else None,
      rope_local_base=base, rope_global_base=base, rope_global_scale=factor,
      rope_llama3=llama3, rms_norm_eps=hf['rms_norm_eps'],
      tie_lm_head=hf.get('tie_word_embeddings', True))


def _llama_rope(cfg: StackConfig) -> dict:
  rope = {'rope_type': 'default', 'rope_theta': cfg.rope_global_base}
  if cfg.rope_llama3 is not None:
    low, high, original = cfg.rope_llama3
    return dict(rope, rope_type='llama3', factor=cfg.rope_global_scale,
                low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=original)
  if cfg.rope_global_scale != 1.0:
    return dict(rope, rope_type='linear', factor=cfg.rope_global_scale)
  return rope


def _llama_windows(cfg: StackConfig, architecture: str,
                   layer_types: bool) -> dict:
  """The config fields that say which layers slide a window."""
  local = [cfg.layer_kind(i) == LOCAL for i in range(cfg.num_layers)]
  window = {'sliding_window': cfg.sliding_window if any(local) else None}
  if layer_types:
    return dict(window, layer_types=_layer_types(cfg),
                use_sliding_window=any(local), max_window_layers=0)
  if any(local) and not all(local):
    raise errors.UnsupportedArchitectureError(
        f'{architecture} slides the window on every layer or none')
  return window


def llama_config_to_hf(cfg: StackConfig, architecture: str,
                       layer_types: bool) -> dict:
  """StackConfig of a Llama-style family -> its transformers config dict."""
  if cfg.query_scale != cfg.head_dim**-0.5:
    raise errors.UnsupportedArchitectureError(
        f'{architecture} has no equivalent of query_pre_attn_scalar='
        f'{cfg.query_pre_attn_scalar!r} (expected {cfg.head_dim})')
  return {
      'vocab_size': cfg.vocab_size, 'num_hidden_layers': cfg.num_layers,
      'hidden_size': cfg.embed_dim, 'intermediate_size': cfg.mlp_dim,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.head_dim,
      'hidden_act': 'silu', 'rms_norm_eps': cfg.rms_norm_eps,
      'rope_parameters': _llama_rope(cfg),
      'tie_word_embeddings': cfg.tie_lm_head, 'max_position_embeddings': 8192,
      **_llama_windows(cfg, architecture, layer_types),
  }


def llama_style(architecture: str, model_type: str, *, qkv_bias=False,
                qk_norm=False, layer_types=True) -> registry.Source:
  """The row of a Llama-style decoder-only class.

  Args:
    architecture: The transformers class.
    model_type: Its config's `model_type`, also our `StackConfig.family`.
    qkv_bias: Biases on the query, key and value projections (Qwen 2).
    qk_norm: RMSNorm of queries and keys (Qwen 3).
    layer_types: The config says which layers slide a window
      (`layer_types`, `use_sliding_window`); without (Mistral) a
      `sliding_window` applies to every layer.
  """
  options = dict(architecture=architecture, layer_types=layer_types)
  return registry.Source(
      registry.TRANSFORMERS, architecture, model_type,
      config_in=functools.partial(llama_config_from_hf, **options),
      names=PLAIN_NAMES, prefixes={'decoder': 'model.'},
      implied=dict(PLAIN_BLOCK, qkv_bias=qkv_bias, use_qk_norm=qk_norm),
      config_out=functools.partial(llama_config_to_hf, **options),
      model_type=model_type, lm_head='lm_head.weight',
      tied=('lm_head.weight',))

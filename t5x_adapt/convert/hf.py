"""Hugging Face transformers checkpoints: Gemma 2, Gemma 3 (text), T5Gemma,
T5Gemma 2 (text), and the decoder-only source families Llama, Qwen 2, Qwen 3
and Mistral.

`load_hf(path)` reads a directory written by `save_pretrained` (config.json +
safetensors, sharded or not); `save_hf(model, params, path)` writes one that
transformers loads. Tensor names come from the tables below; configs from the
small functions beside them.

Window convention: transformers' T5Gemma encoder lets a local layer see
`|q - k| <= sliding_window`, our masks `|q - k| < window`, so the encoder's
window is stored one larger here than in the HF config. T5Gemma 2's encoder
splits its `sliding_window` W around the query (`bidirectional_window =
'split'`, `StackConfig`), the window stored as is.

T5Gemma 2 checkpoints carry a vision tower (SigLIP and a projector); the text
model is what is read (`text_only`), and `save_hf` writes the text model
with a minimal, untrained vision tower in its config.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Optional

import numpy as np
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.numpy import save_file

from t5x_adapt import layout
from t5x_adapt.checkpoints import errors
from t5x_adapt.config import GLOBAL, LOCAL, EncoderDecoderConfig, StackConfig
from t5x_adapt.convert import lazy
from t5x_adapt.convert.tables import IDENTITY, NameScheme, Rule
from t5x_adapt.convert.tables import export_tensors, lazy_tensors, stack_rules
from t5x_adapt.models import model_for_config

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
    attention=_ATTENTION, projections=_PROJECTIONS, mlp=_MLP)

# Llama-style blocks (Llama, Qwen 2, Qwen 3, Mistral): pre-norms only.
PLAIN_NAMES = NameScheme(
    embedding='embed_tokens', final_norm='norm', layer='layers.{i}.',
    norms={'pre_self_attention_norm': 'input_layernorm',
           'pre_mlp_norm': 'post_attention_layernorm'},
    attention=_ATTENTION, projections=_PROJECTIONS, mlp=_MLP)


@dataclasses.dataclass(frozen=True)
class Family:
  """A Llama-style decoder-only family: its transformers class and what
  sets it apart (one row of `FAMILIES`)."""

  architecture: str
  model_type: str
  qkv_bias: bool = False
  qk_norm: bool = False


FAMILIES = {f.model_type: f for f in (
    Family('LlamaForCausalLM', 'llama'),
    Family('Qwen2ForCausalLM', 'qwen2', qkv_bias=True),
    Family('Qwen3ForCausalLM', 'qwen3', qk_norm=True),
    Family('MistralForCausalLM', 'mistral'),
)}
_FAMILY_OF_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}

# Architecture -> (family, tied LM head name).
_DECODER_ONLY = {
    'Gemma2ForCausalLM': ('gemma2', 'lm_head.weight'),
    'Gemma3ForCausalLM': ('gemma3', 'lm_head.weight'),
}
_ENCODER_DECODER = {
    'T5GemmaForConditionalGeneration': ('gemma2', 'lm_head.out_proj.weight'),
}
T5GEMMA2 = 'T5Gemma2ForConditionalGeneration'
# T5Gemma 2: the tensors tied to the encoder's table (absent from files
# transformers writes, ignored when present), and the vision tower's.
_T5GEMMA2_TIED = ('lm_head.out_proj.weight',
                  'model.decoder.embed_tokens.weight',
                  'model.decoder.embed_tokens.eoi_embedding')
_T5GEMMA2_VISION = ('model.encoder.vision_tower.',
                    'model.encoder.multi_modal_projector.')
# The smallest SigLIP tower transformers builds: `save_hf` writes the text
# model, and T5Gemma2ForConditionalGeneration always has a tower.
_PLACEHOLDER_VISION = {
    'model_type': 'siglip_vision_model', 'hidden_size': 16,
    'intermediate_size': 32, 'num_hidden_layers': 1, 'num_attention_heads': 2,
    'image_size': 28, 'patch_size': 14, 'num_channels': 3,
    'layer_norm_eps': 1e-6, 'hidden_act': 'gelu_pytorch_tanh'}
_MODEL_TYPES = {'gemma2': ('gemma2', 'Gemma2ForCausalLM'),
                'gemma3': ('gemma3_text', 'Gemma3ForCausalLM')}


# ----------------------------------------------------------------- configs --


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


def stack_config_from_hf(hf: dict, family: str, source: str,
                         window_offset: int = 0) -> StackConfig:
  """One transformers (module) config -> StackConfig."""
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
      use_qk_norm=family == 'gemma3', rms_norm_eps=hf['rms_norm_eps'],
      family=family)


def stack_config_to_hf(cfg: StackConfig, window_offset: int = 0) -> dict:
  """StackConfig -> the fields of a transformers (module) config."""
  layer_types = ['sliding_attention' if cfg.layer_kind(i) == LOCAL
                 else 'full_attention' for i in range(cfg.num_layers)]
  global_rope = {'rope_type': 'default', 'rope_theta': cfg.rope_global_base}
  if cfg.rope_global_scale != 1.0:
    global_rope = {'rope_type': 'linear', 'factor': cfg.rope_global_scale,
                   'rope_theta': cfg.rope_global_base}
  if cfg.family == 'gemma3':
    rope = {'full_attention': global_rope,
            'sliding_attention': {'rope_type': 'default',
                                  'rope_theta': cfg.rope_local_base}}
  else:
    if cfg.rope_local_base != cfg.rope_global_base or cfg.rope_global_scale != 1:
      raise errors.UnsupportedArchitectureError(
          'Gemma 2 style checkpoints have one RoPE base for all layers')
    rope = global_rope
  if (cfg.family == 'gemma3') != cfg.use_qk_norm:
    raise errors.UnsupportedArchitectureError(
        f'family {cfg.family!r} with use_qk_norm={cfg.use_qk_norm} has no '
        'transformers equivalent')
  window = cfg.sliding_window
  return {
      'vocab_size': cfg.vocab_size, 'num_hidden_layers': cfg.num_layers,
      'hidden_size': cfg.embed_dim, 'intermediate_size': cfg.mlp_dim,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.head_dim,
      'query_pre_attn_scalar': cfg.query_pre_attn_scalar or cfg.head_dim,
      'sliding_window': 4096 if window is None else window - window_offset,
      'layer_types': layer_types, 'rope_parameters': rope,
      'attn_logit_softcapping': cfg.attn_logit_softcap,
      'final_logit_softcapping': cfg.final_logit_softcap,
      'rms_norm_eps': cfg.rms_norm_eps,
      'hidden_activation': 'gelu_pytorch_tanh', 'attention_bias': False,
      'max_position_embeddings': 8192, 'pad_token_id': 0, 'eos_token_id': 1,
      'bos_token_id': 2, 'tie_word_embeddings': True,
  }


def t5gemma2_config_from_hf(hf: dict, source: str) -> EncoderDecoderConfig:
  """A T5Gemma2Config dict (text part) -> EncoderDecoderConfig."""
  encoder_hf = hf['encoder']
  eoi = encoder_hf.get('eoi_token_index', 256_000)
  if not hf.get('tie_word_embeddings', True):
    raise errors.UnsupportedArchitectureError(
        f'{source}: untied LM head is not supported')
  enc = stack_config_from_hf(encoder_hf['text_config'], 'gemma3', source)
  dec = stack_config_from_hf(hf['decoder'], 'gemma3', source)
  return EncoderDecoderConfig(
      enc.replace(bidirectional_window='split', eoi_token_id=eoi),
      dec.replace(eoi_token_id=eoi), tie_embeddings=True,
      encoder_attention='merged')


def t5gemma2_rules(cfg: EncoderDecoderConfig) -> list[Rule]:
  """T5Gemma 2's text tensors: both embedders read the encoder's table."""
  table = 'model.encoder.embed_tokens.'
  rules = (stack_rules(T5GEMMA_NAMES, 'model.encoder.', 'encoder',
                       cfg.encoder, False) +
           stack_rules(T5GEMMA_NAMES, 'model.decoder.', 'decoder',
                       cfg.decoder, False))
  rules = [Rule(table + 'weight', r.target, r.transform)
           if r.target[1:] == ('token_embedder', 'embedding') else r
           for r in rules]
  return rules + [Rule(table + 'eoi_embedding',
                       (stack, 'token_embedder', 'eoi_embedding'), IDENTITY)
                  for stack in ('encoder', 'decoder')]


def _t5gemma2_hf_config(config: EncoderDecoderConfig) -> dict:
  """The T5Gemma2Config dict of a T5Gemma 2 model (text, placeholder
  vision tower)."""
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
  if problems:
    raise errors.UnsupportedArchitectureError(
        'not a T5Gemma 2 model: ' + '; '.join(problems))
  text = dict(stack_config_to_hf(enc), model_type='t5gemma2_text')
  return {
      'architectures': [T5GEMMA2], 'model_type': 't5gemma2',
      'encoder': {'model_type': 't5gemma2_encoder', 'text_config': text,
                  'vision_config': dict(_PLACEHOLDER_VISION),
                  'mm_tokens_per_image': 4,
                  'eoi_token_index': enc.eoi_token_id,
                  'tie_word_embeddings': True},
      'decoder': dict(stack_config_to_hf(dec), model_type='t5gemma2_decoder'),
      'eoi_token_index': enc.eoi_token_id, 'vocab_size': dec.vocab_size,
      'tie_word_embeddings': True, 'is_encoder_decoder': True,
      'pad_token_id': 0, 'eos_token_id': 1, 'bos_token_id': 2}


def plain_stack_config_from_hf(hf: dict, family: Family,
                               source: str) -> StackConfig:
  """A Llama / Qwen 2 / Qwen 3 / Mistral config dict -> StackConfig."""
  unsupported = [name for name in ('mlp_bias', 'attention_bias')
                 if hf.get(name)]
  if hf.get('hidden_act', 'silu') != 'silu':
    unsupported.append(f'hidden_act {hf["hidden_act"]!r}')
  if unsupported:
    raise errors.UnsupportedArchitectureError(
        f'{source}: {", ".join(unsupported)} not supported for '
        f'{family.architecture}')
  rope = hf.get('rope_parameters') or dict(
      hf.get('rope_scaling') or {}, rope_theta=hf.get('rope_theta', 10_000.0))
  base, factor, llama3 = _rope(rope, source,
                               kinds=('default', 'linear', 'llama3'))
  num_layers = hf['num_hidden_layers']
  window = hf.get('sliding_window')
  if family.model_type == 'mistral' or hf.get('use_sliding_window'):
    default_type = 'sliding_attention' if window else 'full_attention'
  else:
    default_type, window = 'full_attention', None
  layer_types = hf.get('layer_types') or [default_type] * num_layers
  pattern = _pattern(layer_types[:num_layers], source)
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
      rope_llama3=llama3, attn_logit_softcap=None, final_logit_softcap=None,
      use_qk_norm=family.qk_norm, rms_norm_eps=hf['rms_norm_eps'],
      mlp_activation='silu', norm_style='plain', post_norms=False,
      scale_embeddings=False, qkv_bias=family.qkv_bias,
      tie_lm_head=hf.get('tie_word_embeddings', True),
      family=family.model_type)


def plain_stack_config_to_hf(cfg: StackConfig) -> dict:
  """StackConfig of a Llama-style family -> its transformers config dict."""
  family = FAMILIES[cfg.family]
  expected = dict(mlp_activation='silu', norm_style='plain', post_norms=False,
                  scale_embeddings=False, qkv_bias=family.qkv_bias,
                  use_qk_norm=family.qk_norm, attn_logit_softcap=None,
                  final_logit_softcap=None)
  differing = [f'{k}={getattr(cfg, k)!r} (expected {v!r})'
               for k, v in expected.items() if getattr(cfg, k) != v]
  if cfg.query_scale != cfg.head_dim**-0.5:
    differing.append(f'query_pre_attn_scalar={cfg.query_pre_attn_scalar!r}'
                     f' (expected {cfg.head_dim})')
  if differing:
    raise errors.UnsupportedArchitectureError(
        f'{family.architecture} has no equivalent of {", ".join(differing)}')
  rope = {'rope_type': 'default', 'rope_theta': cfg.rope_global_base}
  if cfg.rope_llama3 is not None:
    low, high, original = cfg.rope_llama3
    rope = dict(rope, rope_type='llama3', factor=cfg.rope_global_scale,
                low_freq_factor=low, high_freq_factor=high,
                original_max_position_embeddings=original)
  elif cfg.rope_global_scale != 1.0:
    rope = dict(rope, rope_type='linear', factor=cfg.rope_global_scale)
  local = [cfg.layer_kind(i) == LOCAL for i in range(cfg.num_layers)]
  hf = {
      'architectures': [family.architecture], 'model_type': cfg.family,
      'vocab_size': cfg.vocab_size, 'num_hidden_layers': cfg.num_layers,
      'hidden_size': cfg.embed_dim, 'intermediate_size': cfg.mlp_dim,
      'num_attention_heads': cfg.num_heads,
      'num_key_value_heads': cfg.num_kv_heads, 'head_dim': cfg.head_dim,
      'hidden_act': 'silu', 'rms_norm_eps': cfg.rms_norm_eps,
      'rope_parameters': rope, 'tie_word_embeddings': cfg.tie_lm_head,
      'max_position_embeddings': 8192,
      'sliding_window': cfg.sliding_window if any(local) else None,
  }
  if cfg.family != 'mistral':
    hf['layer_types'] = ['sliding_attention' if is_local else
                         'full_attention' for is_local in local]
    hf['use_sliding_window'] = any(local)
    hf['max_window_layers'] = 0
  elif any(local) and not all(local):
    raise errors.UnsupportedArchitectureError(
        'MistralForCausalLM slides the window on every layer or none')
  return hf


def _plain_rules(cfg: StackConfig) -> list[Rule]:
  rules = stack_rules(PLAIN_NAMES, 'model.', 'decoder', cfg, False)
  if not cfg.tie_lm_head:
    rules.append(Rule('lm_head.weight', ('decoder', 'lm_head', 'embedding'),
                      IDENTITY))
  return rules


def read_config(path: pathlib.Path) -> dict:
  return errors.read_json(path / 'config.json',
                          'is this a directory written by save_pretrained?')


def model_from_hf_config(hf: dict, source: str, scan_layers: bool = True):
  """(model, rules, tied LM head name) for a transformers config dict."""
  architectures = hf.get('architectures') or []
  arch = architectures[0] if architectures else None
  if arch in _DECODER_ONLY:
    family, head = _DECODER_ONLY[arch]
    cfg = stack_config_from_hf(hf, family, source).replace(
        scan_layers=scan_layers)
    rules = stack_rules(GEMMA_NAMES, 'model.', 'decoder', cfg, False)
    return model_for_config(cfg), rules, head
  if arch in _ENCODER_DECODER:
    family, head = _ENCODER_DECODER[arch]
    enc = stack_config_from_hf(hf['encoder'], family, source, window_offset=1)
    dec = stack_config_from_hf(hf['decoder'], family, source)
    if not hf.get('tie_word_embeddings', True):
      raise errors.UnsupportedArchitectureError(
          f'{source}: untied LM head is not supported')
    cfg = EncoderDecoderConfig(enc, dec).map_stacks(scan_layers=scan_layers)
    rules = (stack_rules(T5GEMMA_NAMES, 'model.encoder.', 'encoder',
                         cfg.encoder, False) +
             stack_rules(T5GEMMA_NAMES, 'model.decoder.', 'decoder',
                         cfg.decoder, True))
    return model_for_config(cfg), rules, head
  if arch == T5GEMMA2:
    cfg = t5gemma2_config_from_hf(hf, source).map_stacks(
        scan_layers=scan_layers)
    return model_for_config(cfg), t5gemma2_rules(cfg), None
  if arch in _FAMILY_OF_ARCHITECTURE:
    cfg = plain_stack_config_from_hf(hf, _FAMILY_OF_ARCHITECTURE[arch],
                                     source).replace(scan_layers=scan_layers)
    head = 'lm_head.weight' if cfg.tie_lm_head else None
    return model_for_config(cfg), _plain_rules(cfg), head
  supported = (sorted(_DECODER_ONLY) + sorted(_ENCODER_DECODER) + [T5GEMMA2]
               + sorted(_FAMILY_OF_ARCHITECTURE))
  raise errors.UnsupportedArchitectureError(
      f'{source}/config.json: architecture {arch!r} is not supported; '
      f'supported: {", ".join(supported)}')


# ----------------------------------------------------------------- tensors --


def _safetensors_files(path: pathlib.Path) -> list[str]:
  """The checkpoint's safetensors file names: the shard index's, or all."""
  index = path / 'model.safetensors.index.json'
  if not index.exists():
    files = sorted(p.name for p in path.glob('*.safetensors'))
    if not files:
      raise FileNotFoundError(f'{path}: no *.safetensors files')
    return files
  try:
    weight_map = json.loads(index.read_text())['weight_map']
    files = sorted(set(weight_map.values()))
  except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
    raise errors.CorruptCheckpointError(
        f'{index}: not a shard index (JSON with a "weight_map"): {e!r}') from e
  if not files:
    raise errors.CorruptCheckpointError(f'{index}: lists no shard files')
  absent = [name for name in files if not (path / name).exists()]
  if absent:
    raise FileNotFoundError(
        f'{path}: shard file(s) named in {index.name} are missing: '
        f'{", ".join(absent)}')
  return files


class _SafetensorsDir:
  """Name -> file lookup over the safetensors files of a checkpoint dir."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    files = _safetensors_files(path)
    self.handles = {}
    self.location = {}
    for name in files:
      file = path / name
      try:
        handle = safe_open(str(file), framework='numpy')
        keys = list(handle.keys())
      except (SafetensorError, OSError, ValueError) as e:
        raise errors.CorruptCheckpointError(
            f'{file}: cannot read: truncated or corrupt safetensors file '
            f'({e})') from e
      self.handles[name] = handle
      self.location.update({k: name for k in keys})

  def names(self):
    return self.location.keys()

  def read(self, name: str) -> np.ndarray:
    file = self.path / self.location[name]
    try:
      return self.handles[self.location[name]].get_tensor(name)
    except (SafetensorError, OSError, ValueError) as e:
      raise errors.CorruptCheckpointError(
          f'{file}: cannot read tensor {name!r}: truncated or corrupt '
          f'({e})') from e


def _expected_unrolled_shapes(model):
  unrolled = model.config.map_stacks(scan_layers=False)
  return model_for_config(unrolled).param_shapes()


def _ignorable(hf: dict, head: Optional[str], text_only: bool):
  """Names that may be in the checkpoint without a rule."""
  architectures = hf.get('architectures') or [None]
  if architectures[0] != T5GEMMA2:
    return lambda name: name == head

  def ignorable(name):
    return name in _T5GEMMA2_TIED or (text_only and
                                      name.startswith(_T5GEMMA2_VISION))
  return ignorable


def _check_vision(names, text_only: bool, source: str) -> None:
  vision = sorted(n for n in names if n.startswith(_T5GEMMA2_VISION))
  if vision and not text_only:
    raise errors.UnsupportedArchitectureError(
        f'{source}: the checkpoint has a vision tower ({len(vision)} tensors, '
        f'e.g. {vision[0]!r}), which t5x_adapt does not build; pass '
        'text_only=True (`python -m t5x_adapt.convert --text_only`) to read '
        'the text model without it')


def lazy_params(path: str | os.PathLike, scan_layers: bool = True,
                dtype=np.float32, text_only: bool = False):
  """A transformers checkpoint directory, opened but not read.

  Args:
    path: Directory with config.json and safetensors (as `save_pretrained`
      writes it).
    scan_layers: Layout of the returned tree (see `t5x_adapt.layout`).
    dtype: Parameter dtype.
    text_only: Read a T5Gemma 2 checkpoint's text model and leave its
      vision tower (without it, a vision tower is an error).

  Returns:
    (model, tree of `lazy.LazyTensor`s): a DecoderOnlyModel or
    EncoderDecoderModel, and its parameters to read (`lazy.place`).

  Raises:
    UnsupportedArchitectureError, MissingTensorError, UnexpectedTensorError,
    CorruptCheckpointError; ShapeMismatchError (and corrupt tensors) when a
    leaf is read.
  """
  path = pathlib.Path(path)
  hf = read_config(path)
  model, rules, head = model_from_hf_config(hf, str(path), scan_layers)
  tensors = _SafetensorsDir(path)
  _check_vision(tensors.names(), text_only, str(path))
  params = lazy_tensors(
      rules, tensors.read, tensors.names(), _expected_unrolled_shapes(model),
      str(path), ignorable=_ignorable(hf, head, text_only),
      dtype=dtype)
  return model, layout.to_model_layout(params, model.config,
                                       stack=lazy.stacked)


def load_hf(path: str | os.PathLike, scan_layers: bool = True,
            dtype=np.float32, text_only: bool = False):
  """Loads a transformers checkpoint directory into host memory.

  `text_only`: see `lazy_params`.

  Returns:
    (model, params): a DecoderOnlyModel or EncoderDecoderModel and its
    parameters (numpy). `convert.load` places them on a mesh instead.

  Raises:
    See `lazy_params`.
  """
  model, params = lazy_params(path, scan_layers, dtype, text_only)
  return model, lazy.place(params)


def save_hf(model, params, path: str | os.PathLike) -> pathlib.Path:
  """Writes `params` as a transformers checkpoint (config.json + safetensors).

  Encoder-decoders are written as T5GemmaForConditionalGeneration (cross
  attention, Gemma 2 stacks) or T5Gemma2ForConditionalGeneration (merged
  attention: the text model, with a placeholder vision tower that
  transformers initialises and text never reaches), decoder-only models as
  Gemma2ForCausalLM, Gemma3ForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM,
  Qwen3ForCausalLM or MistralForCausalLM by family.
  """
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  config = model.config
  unrolled = layout.to_unrolled(params, config)
  if isinstance(config, EncoderDecoderConfig) and (
      config.encoder_attention == 'merged'):
    rules = t5gemma2_rules(config)
    hf = _t5gemma2_hf_config(config)
  elif isinstance(config, EncoderDecoderConfig):
    for cfg in (config.encoder, config.decoder):
      if cfg.family != 'gemma2':
        raise errors.UnsupportedArchitectureError(
            'transformers has T5Gemma for Gemma 2 style stacks only, got '
            f'family {cfg.family!r} (T5Gemma 2, for Gemma 3 stacks, has '
            "merged attention: EncoderDecoderConfig.encoder_attention = "
            "'merged')")
    rules = (stack_rules(T5GEMMA_NAMES, 'model.encoder.', 'encoder',
                         config.encoder, False) +
             stack_rules(T5GEMMA_NAMES, 'model.decoder.', 'decoder',
                         config.decoder, True))
    encoder = dict(stack_config_to_hf(config.encoder, window_offset=1),
                   model_type='t5_gemma_module', is_decoder=False)
    decoder = dict(stack_config_to_hf(config.decoder),
                   model_type='t5_gemma_module', is_decoder=True)
    hf = {'architectures': ['T5GemmaForConditionalGeneration'],
          'model_type': 't5gemma', 'encoder': encoder, 'decoder': decoder,
          'vocab_size': config.decoder.vocab_size,
          'tie_word_embeddings': True, 'is_encoder_decoder': True,
          'pad_token_id': 0, 'eos_token_id': 1, 'bos_token_id': 2}
  elif config.family in FAMILIES:
    rules = _plain_rules(config)
    hf = plain_stack_config_to_hf(config)
  else:
    model_type, arch = _MODEL_TYPES[config.family]
    rules = stack_rules(GEMMA_NAMES, 'model.', 'decoder', config, False)
    hf = dict(stack_config_to_hf(config), architectures=[arch],
              model_type=model_type)
  hf['torch_dtype'] = 'float32'
  tensors = export_tensors(rules, unrolled)
  tmp = path / 'model.safetensors.tmp'
  save_file(tensors, str(tmp), metadata={'format': 'pt'})
  os.replace(tmp, path / 'model.safetensors')
  (path / 'config.json').write_text(json.dumps(hf, indent=2))
  return path

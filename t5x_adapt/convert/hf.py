"""Hugging Face transformers checkpoints: Gemma 2, Gemma 3 (text), T5Gemma,
T5Gemma 2 (text), and the decoder-only source families Llama, Qwen 2, Qwen 3
and Mistral.

`load_hf(path)` reads a directory written by `save_pretrained` (config.json +
safetensors, sharded or not); `save_hf(model, params, path)` writes one that
transformers loads. Each class is one row of `SOURCES` (`registry.Source`:
its config in and out, tensor names, tied and vision-tower tensors), built
from the pieces in `hf_families`; this module reads and writes the files.

T5Gemma 2 checkpoints carry a vision tower (SigLIP and a projector); the text
model is what is read (`text_only`), and `save_hf` writes the text model
with a minimal, untrained vision tower in its config.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
from safetensors import SafetensorError
from safetensors import safe_open
from safetensors.numpy import save_file

from t5x_adapt import layout
from t5x_adapt.checkpoints import errors
from t5x_adapt.convert import hf_families
from t5x_adapt.convert import lazy
from t5x_adapt.convert import registry
from t5x_adapt.convert.hf_families import GEMMA_BLOCK, T5GEMMA_NAMES
from t5x_adapt.convert.hf_families import gemma, llama_style
from t5x_adapt.convert.hf_families import t5gemma2_config_from_hf
from t5x_adapt.convert.hf_families import t5gemma2_config_to_hf
from t5x_adapt.convert.hf_families import t5gemma_config_from_hf
from t5x_adapt.convert.hf_families import t5gemma_config_to_hf
from t5x_adapt.convert.tables import export_tensors, lazy_tensors
from t5x_adapt.models import model_for_config

# Still importable from here: benchmarks/ build transformers configs with it.
stack_config_to_hf = hf_families.stack_config_to_hf

_ENCODER_DECODER = {'encoder': 'model.encoder.', 'decoder': 'model.decoder.'}

# One row per transformers class we read (and write).
SOURCES = (
    gemma('Gemma2ForCausalLM', 'gemma2', 'gemma2'),
    gemma('Gemma3ForCausalLM', 'gemma3_text', 'gemma3', qk_norm=True,
          rope_by_layer_type=True),
    registry.Source(
        registry.TRANSFORMERS, 'T5GemmaForConditionalGeneration', 'gemma2',
        config_in=t5gemma_config_from_hf, names=T5GEMMA_NAMES,
        prefixes=_ENCODER_DECODER, implied=dict(GEMMA_BLOCK, use_qk_norm=False),
        config_out=t5gemma_config_to_hf, model_type='t5gemma',
        encoder_attention='cross', tied=('lm_head.out_proj.weight',)),
    registry.Source(
        registry.TRANSFORMERS, 'T5Gemma2ForConditionalGeneration', 'gemma3',
        config_in=t5gemma2_config_from_hf, names=T5GEMMA_NAMES,
        prefixes=_ENCODER_DECODER, implied=dict(GEMMA_BLOCK, use_qk_norm=True),
        config_out=t5gemma2_config_to_hf, model_type='t5gemma2',
        encoder_attention='merged', tables_from='encoder',
        tied=('lm_head.out_proj.weight', 'model.decoder.embed_tokens.weight',
              'model.decoder.embed_tokens.eoi_embedding'),
        vision_tower=('model.encoder.vision_tower.',
                      'model.encoder.multi_modal_projector.'),
        module_renames=(('model.encoder.layers.',
                         'model.encoder.text_model.layers.'),)),
    llama_style('LlamaForCausalLM', 'llama'),
    llama_style('Qwen2ForCausalLM', 'qwen2', qkv_bias=True),
    llama_style('Qwen3ForCausalLM', 'qwen3', qk_norm=True),
    llama_style('MistralForCausalLM', 'mistral', layer_types=False),
)
registry.register(*SOURCES)


def read_config(path: pathlib.Path) -> dict:
  return errors.read_json(path / 'config.json',
                          'is this a directory written by save_pretrained?')


def find_source(hf: dict, where: str) -> registry.Source:
  """The row of a transformers config dict's class."""
  architectures = hf.get('architectures') or [None]
  return registry.find(registry.TRANSFORMERS, architectures[0], where)


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


def _unrolled_shapes(config):
  """Our parameter shapes and dtypes in the unrolled layout."""
  return model_for_config(config.map_stacks(scan_layers=False)).param_shapes()


def lazy_params(path: str | os.PathLike, scan_layers: bool = True,
                dtype=np.float32, text_only: bool = False):
  """A transformers checkpoint directory, opened but not read.

  Args:
    path: Directory with config.json and safetensors (as `save_pretrained`
      writes it).
    scan_layers: Layout of the returned tree (see `t5x_adapt.layout`).
    dtype: Parameter dtype: each tensor is cast to it once, when read.
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
  row = find_source(hf, str(path / 'config.json'))
  config = row.read_config(hf, str(path))
  tensors = _SafetensorsDir(path)
  row.check_vision_tower(tensors.names(), text_only, str(path))
  params = lazy_tensors(
      row.rules(config), tensors.read, tensors.names(),
      _unrolled_shapes(config), str(path),
      ignorable=lambda name: row.ignorable(name, text_only))
  model = model_for_config(config.map_stacks(scan_layers=scan_layers))
  params = layout.to_model_layout(params, model.config, stack=lazy.stacked)
  return model, lazy.astype(params, dtype)


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

  The class is the row of `SOURCES` that writes the model
  (`registry.writer`): encoder-decoders as T5GemmaForConditionalGeneration
  (cross attention, Gemma 2 stacks) or T5Gemma2ForConditionalGeneration
  (merged attention, Gemma 3 stacks: the text model, with a placeholder
  vision tower that transformers initialises and text never reaches),
  decoder-only models as Gemma2ForCausalLM, Gemma3ForCausalLM,
  LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM or MistralForCausalLM
  by family.

  Raises:
    UnsupportedArchitectureError: no transformers class computes the model.
  """
  path = pathlib.Path(path)
  config = model.config
  row = registry.writer(registry.TRANSFORMERS, config)
  hf = dict(row.write_config(config), torch_dtype='float32')
  tensors = export_tensors(row.rules(config),
                           layout.to_unrolled(params, config))
  path.mkdir(parents=True, exist_ok=True)
  tmp = path / 'model.safetensors.tmp'
  save_file(tensors, str(tmp), metadata={'format': 'pt'})
  os.replace(tmp, path / 'model.safetensors')
  (path / 'config.json').write_text(json.dumps(hf, indent=2))
  return path

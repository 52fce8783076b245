"""Gemma 3 GGUF checkpoints (llama.cpp's format), read with the `gguf` package.

Float tensors (F32, F16, BF16) are read as stored and cast once to the
parameter dtype; quantised ones are dequantised to float32 first (the only
way the format reads them; an approximation of the original bf16 weights).
`SOURCES` is the registry's row of each GGUF architecture we read (Gemma 3).
Facts the file does not store, or stores differently from us:

* norm weights already include Gemma's `+1` (we store `scale`, not `1+scale`);
* the LM head is tied to the token embedding;
* local layers use RoPE base 10,000 (only the global base is in the file);
* Gemma 3's pattern is five local layers then one global layer;
* the query scale is `head_dim ** -0.5`; there are no softcaps.
"""

from __future__ import annotations

import os
import pathlib

import jax.numpy as jnp
import numpy as np

from t5x_adapt import layout
from t5x_adapt.checkpoints import errors
from t5x_adapt.config import GLOBAL, LOCAL, StackConfig
from t5x_adapt.convert import lazy
from t5x_adapt.convert import registry
from t5x_adapt.convert.tables import NameScheme, UnitOffset
from t5x_adapt.convert.tables import lazy_tensors
from t5x_adapt.models import model_for_config

GEMMA3_GGUF_NAMES = NameScheme(
    embedding='token_embd', final_norm='output_norm', layer='blk.{i}.',
    norms={'pre_self_attention_norm': 'attn_norm',
           'post_self_attention_norm': 'post_attention_norm',
           'pre_mlp_norm': 'ffn_norm',
           'post_mlp_norm': 'post_ffw_norm'},
    attention={'self_attention': ''},
    projections={'query': 'attn_q', 'key': 'attn_k', 'value': 'attn_v',
                 'out': 'attn_output', 'query_norm': 'attn_q_norm',
                 'key_norm': 'attn_k_norm'},
    mlp={'gate': 'ffn_gate', 'up': 'ffn_up', 'down': 'ffn_down'},
    norm_transform=UnitOffset())

GEMMA3_PATTERN = (LOCAL,) * 5 + (GLOBAL,)
GEMMA3_LOCAL_ROPE_BASE = 10_000.0


def open_gguf(path: str | os.PathLike):
  """A `gguf.GGUFReader`, with a clear error for non-GGUF or truncated files."""
  import gguf  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such GGUF file')
  try:
    return gguf.GGUFReader(str(path))
  except (ValueError, OSError, IndexError, KeyError) as e:
    raise errors.CorruptCheckpointError(
        f'{path}: not a readable GGUF file (truncated or corrupt?): {e}'
    ) from e


def _field(reader, key: str, source: str):
  field = reader.fields.get(key)
  if field is None:
    raise errors.MissingTensorError(f'{source}: GGUF metadata lacks {key!r}')
  return field.contents()


def gemma3_config(reader, source: str) -> StackConfig:
  """A Gemma 3 GGUF file's metadata -> StackConfig."""
  get = lambda key: _field(reader, f'gemma3.{key}', source)
  embedding = next((t for t in reader.tensors if t.name == 'token_embd.weight'),
                   None)
  if embedding is None:
    raise errors.missing(source, ['token_embd.weight'])
  head_dim = int(get('attention.key_length'))
  return StackConfig(
      vocab_size=int(embedding.shape[1]), num_layers=int(get('block_count')),
      embed_dim=int(get('embedding_length')),
      mlp_dim=int(get('feed_forward_length')),
      num_heads=int(get('attention.head_count')),
      num_kv_heads=int(get('attention.head_count_kv')), head_dim=head_dim,
      query_pre_attn_scalar=head_dim, attention_pattern=GEMMA3_PATTERN,
      sliding_window=int(get('attention.sliding_window')),
      rope_local_base=GEMMA3_LOCAL_ROPE_BASE,
      rope_global_base=float(get('rope.freq_base')),
      attn_logit_softcap=None, final_logit_softcap=None,
      rms_norm_eps=float(get('attention.layer_norm_rms_epsilon')))


# One row per GGUF architecture we read.
SOURCES = (
    registry.Source(registry.GGUF, 'gemma3', 'gemma3',
                    config_in=gemma3_config, names=GEMMA3_GGUF_NAMES,
                    prefixes={'decoder': ''}, implied={'use_qk_norm': True}),
)
registry.register(*SOURCES)


def _reader(tensors: dict, source: str):
  """name -> the tensor as stored (floats) or dequantised to float32."""
  import gguf  # pylint: disable=g-import-not-at-top
  types = gguf.GGMLQuantizationType
  as_stored = {types.F32: np.float32, types.F16: np.float16,
               types.BF16: jnp.bfloat16}

  def read(name):
    tensor = tensors[name]
    if tensor.tensor_type in as_stored:  # BF16 comes as bytes: a view.
      return tensor.data.view(as_stored[tensor.tensor_type])
    try:
      return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except (ValueError, TypeError) as e:
      raise errors.CorruptCheckpointError(
          f'{source}: cannot dequantise tensor {name!r}: {e}') from e
  return read


def lazy_params(path: str | os.PathLike, scan_layers: bool = True,
                dtype=np.float32):
  """A GGUF file, opened but not read (tensors dequantised later).

  Args:
    path: The .gguf file.
    scan_layers: Layout of the returned tree.
    dtype: Parameter dtype: each tensor is cast to it once, when read.

  Returns:
    (DecoderOnlyModel, tree of `lazy.LazyTensor`s).
  """
  source = str(path)
  reader = open_gguf(path)
  row = registry.find(registry.GGUF,
                      _field(reader, 'general.architecture', source), source)
  config = row.read_config(reader, source)
  tensors = {t.name: t for t in reader.tensors}
  shapes = model_for_config(config.replace(scan_layers=False)).param_shapes()
  params = lazy_tensors(row.rules(config), _reader(tensors, source), tensors,
                        shapes, source,
                        ignorable=lambda name: row.ignorable(name, False))
  model = model_for_config(config.replace(scan_layers=scan_layers))
  params = layout.to_model_layout(params, model.config, stack=lazy.stacked)
  return model, lazy.astype(params, dtype)


def load_gguf(path: str | os.PathLike, scan_layers: bool = True):
  """Loads a Gemma 3 GGUF file into host memory.

  Args:
    path: The .gguf file.
    scan_layers: Layout of the returned params.

  Returns:
    (DecoderOnlyModel, params) with float32 dequantised parameters (numpy;
    `convert.load` places them on a mesh instead).
  """
  model, params = lazy_params(path, scan_layers)
  return model, lazy.place(params)

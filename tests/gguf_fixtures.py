"""Gemma 3 GGUF files written from named tensors, for loader tests."""

import pathlib
from typing import Callable, Mapping, Optional

import numpy as np


def write_gemma3_gguf(
    path: pathlib.Path, stack, tensors: Mapping[str, np.ndarray],
    add_tensor: Optional[Callable[..., None]] = None) -> pathlib.Path:
  """A Gemma 3 GGUF file: `stack`'s metadata and `tensors` by GGUF name.

  Args:
    path: The file to write.
    stack: The StackConfig the metadata describes.
    tensors: {GGUF tensor name: array} (`tables.export_tensors`).
    add_tensor: `add_tensor(writer, name, tensor)`, to store a tensor in a
      type of its own (quantised, say); default float32 as given.
  """
  import gguf  # pylint: disable=g-import-not-at-top
  writer = gguf.GGUFWriter(str(path), 'gemma3')
  for key, value in {'block_count': stack.num_layers,
                     'embedding_length': stack.embed_dim,
                     'feed_forward_length': stack.mlp_dim,
                     'attention.head_count': stack.num_heads,
                     'attention.head_count_kv': stack.num_kv_heads,
                     'attention.key_length': stack.head_dim,
                     'attention.value_length': stack.head_dim,
                     'attention.sliding_window': stack.sliding_window}.items():
    writer.add_uint32(f'gemma3.{key}', value)
  writer.add_float32('gemma3.rope.freq_base', stack.rope_global_base)
  writer.add_float32('gemma3.attention.layer_norm_rms_epsilon',
                     stack.rms_norm_eps)
  for name, tensor in tensors.items():
    if add_tensor is None:
      writer.add_tensor(name, tensor)
    else:
      add_tensor(writer, name, tensor)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path

"""LoRA adapters as a PEFT adapter directory, for `peft` + transformers.

`save_peft` writes `adapter_config.json` and `adapter_model.safetensors`,
the directory `peft.PeftModel.from_pretrained` loads onto the transformers
model that `save_hf` writes of the same base. Nothing else writes PEFT's
format from JAX (qwix keeps adapters as Flax parameters), so this module
does it by hand, from the same tensor tables the checkpoint export uses.

Each adapted kernel has one export rule (`convert.tables.Rule`): our kernel
`[*in, *out]` -> a torch Linear weight `[out', in']`, a transposition and a
reshape. Our adapters are `A [in_flat, r]` and `B [r, out_flat]`, with `in`
and `out` flattened as the kernel's dims; PEFT's are `lora_A.weight [r,
in']` and `lora_B.weight [out', r]`. Which flat index of ours each of the
Linear's rows and columns is follows from exporting a kernel of its own
flat indices through the rule, so any layout change the tables make (heads
split or merged, a transposition) carries over without a second table.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping, Optional

import jax
import numpy as np
from safetensors.numpy import save_file

from t5x_adapt import layout
from t5x_adapt.convert import registry
from t5x_adapt.convert import tables

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'


def _index_maps(rule: tables.Rule, kernel_shape, in_ndim: int):
  """(our `in` flat index of each Linear column, our `out` flat index of
  each Linear row) of the kernel that `rule` exports."""
  size = int(np.prod(kernel_shape))
  out_flat = int(np.prod(kernel_shape[in_ndim:]))
  exported = rule.transform.save(
      np.arange(size, dtype=np.float64).reshape(kernel_shape))
  if exported.ndim != 2 or not np.array_equal(exported, np.round(exported)):
    raise ValueError(f'{rule.source}: its export is not a 2-D relayout of '
                     f'the kernel, so adapters cannot follow it')
  exported = exported.astype(np.int64)
  columns, rows = exported[0] // out_flat, exported[:, 0] % out_flat
  # Each entry must be (row's out index, column's in index): a relayout.
  if not np.array_equal(exported,
                        columns[None, :] * out_flat + rows[:, None]):
    raise ValueError(f'{rule.source}: its export mixes the kernel\'s input '
                     'and output dims, so adapters cannot follow it')
  return columns, rows


def _get(tree: Mapping, path) -> Optional[Any]:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return None
    tree = tree[key]
  return tree


def peft_tensors(model, params: Mapping[str, Any]) -> tuple[dict, list[str]]:
  """({PEFT tensor name: array}, adapted module names) of the adapters in
  `params` (`t5x_adapt.lora`; the base may be there or not)."""
  config = model.config
  row = registry.writer(registry.TRANSFORMERS, config)
  unrolled = layout.to_unrolled(params, config)
  shapes = jax.eval_shape(lambda p: layout.to_unrolled(p, config),
                          model.param_shapes())
  tensors, modules = {}, []
  for rule in row.rules(config):
    if rule.target[-1] != 'kernel':
      continue
    a = _get(unrolled, (*rule.target[:-1], 'kernel_lora_a'))
    if a is None:
      continue
    b = np.asarray(_get(unrolled, (*rule.target[:-1], 'kernel_lora_b')),
                   np.float32)
    a = np.asarray(a, np.float32)
    kernel_shape = _get(shapes, rule.target).shape
    in_ndim = _in_ndim(kernel_shape, a.shape[0])
    columns, rows = _index_maps(rule, kernel_shape, in_ndim)
    module = row.module_name(rule.source)
    prefix = f'base_model.model.{module}'
    tensors[f'{prefix}.lora_A.weight'] = np.ascontiguousarray(a[columns].T)
    tensors[f'{prefix}.lora_B.weight'] = np.ascontiguousarray(b[:, rows].T)
    modules.append(module)
  return tensors, modules


def _in_ndim(kernel_shape, in_flat: int) -> int:
  """How many leading dims of the kernel its adapter's `in` flattens."""
  size = 1
  for i, dim in enumerate(kernel_shape):
    size *= dim
    if size == in_flat:
      return i + 1
  raise ValueError(f'adapter input {in_flat} matches no leading dims of the '
                   f'kernel {tuple(kernel_shape)}')


def save_peft(model, params: Mapping[str, Any], lora_config,
              path: str | os.PathLike,
              base_model_name_or_path: Optional[str] = None) -> pathlib.Path:
  """Writes the adapters of `params` as a PEFT LoRA directory.

  Args:
    model: The base model (not the LoRA one): its config picks the
      transformers class and tensor names, as `save_hf` does.
    params: Parameters with adapters (joined or adapters alone), scanned or
      unrolled.
    lora_config: `t5x_adapt.lora.LoraConfig` they were trained with.
    path: Output directory.
    base_model_name_or_path: Recorded in the config (PEFT's own field).

  Raises:
    ValueError: No adapters in `params`; trained base parameters
      (`LoraConfig.trained`) that PEFT would need as `modules_to_save`.
  """
  if lora_config.trained:
    raise ValueError('LoraConfig.trained parameters are not exported as '
                     'PEFT modules_to_save: merge them (python -m '
                     't5x_adapt.lora_runs merge) instead')
  tensors, modules = peft_tensors(model, params)
  if not modules:
    raise ValueError('no LoRA adapters in the parameters to export')
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  config = {
      'peft_type': 'LORA',
      'task_type': ('SEQ_2_SEQ_LM' if model.is_encoder_decoder
                    else 'CAUSAL_LM'),
      'base_model_name_or_path': base_model_name_or_path,
      'r': lora_config.rank,
      'lora_alpha': lora_config.alpha,
      'lora_dropout': lora_config.dropout,
      'target_modules': sorted(modules),
      'bias': 'none',
      'fan_in_fan_out': False,
      'use_rslora': False,
      'init_lora_weights': True,
      'inference_mode': True,
  }
  tmp = path / f'{WEIGHTS_FILE}.tmp'
  save_file(tensors, str(tmp), metadata={'format': 'pt'})
  os.replace(tmp, path / WEIGHTS_FILE)
  (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
  return path

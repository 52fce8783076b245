"""LoRA adapters on any model of the layer library, through qwix.

qwix (Google's JAX quantization library, pinned 0.1.8, which runs on the
pinned jax 0.10.2 / flax 0.12.8 linen) intercepts the `jax.lax.dot_general`
of every module whose path matches a rule and adds `x . A . B * alpha / rank`
to it, creating `kernel_lora_a [*scan, in, rank]` and `kernel_lora_b
[*scan, rank, out]` beside the kernel (`in` and `out` flattened, as
`kernels.matmul.matmul_2d` contracts them; scanned stacks get one adapter a
layer, stacked like the kernels). B starts at zero, so a model with fresh
adapters computes exactly what its base computes. This module adds what qwix
leaves to the framework: the gin-configured targets, adapters for an
existing base (`init_adapters`), the split into frozen base and trainable
adapters, and merging adapters into the base kernels.

Targets are a regular expression over module paths (`decoder/layers/
block_0/self_attention/query`; every family of the layer library uses the
same names). The default covers the attention projections (self, cross and
merged) and the MLP of both stacks, never the embedding table (the tied
table is the LM head too). With T5Gemma 2's merged attention the decoder's
key / value projections also project the encoder's output, so adapters
there change the keys and values the decoder reads from the encoder.

qwix finds the kernel of a `dot_general` by following the traced reshape
back to the parameter, so a LoRA model runs traced: under `jax.jit` (every
entry point of the framework jits) or inside a scanned stack. An unrolled
stack applied eagerly raises rather than silently leaving the adapters out.
Only float32 projections take adapters for now: inside `kernels.matmul.
narrow_matmul`'s custom gradient (the bfloat16 path) qwix cannot trace the
kernel back to its parameter, so a bfloat16 target is refused by name.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any, Mapping

import gin
import jax
import jax.numpy as jnp
import qwix
from qwix._src.utils import flax_util as qwix_flax_util

from t5x_adapt.param_paths import path_str

Params = Mapping[str, Any]

ADAPTER_SUFFIXES = ('_lora_a', '_lora_b')
DEFAULT_TARGETS = (r'.*/(self_attention|cross_attention|attention)/'
                   r'(query|key|value|out)|.*/mlp/(gate|up|down)')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get adapters, and their shape.

  Attributes:
    rank: Inner dimension of each adapter.
    alpha: The update is scaled by `alpha / rank`.
    dropout: Dropout on the adapter's input (training only, as PEFT does).
    targets: Regular expression matched in full against module paths.
  """
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = DEFAULT_TARGETS

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f'LoraConfig.rank must be >= 1, got {self.rank}')
    re.compile(self.targets)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class _JitOnlyLoraProvider(qwix.LoraProvider):
  """qwix's LoRA provider, refusing to run eagerly (where it could not find
  the kernels and would leave the adapters out without a word)."""

  def __init__(self, config: LoraConfig):
    super().__init__([qwix.LoraRule(module_path=config.targets,
                                    rank=config.rank, alpha=config.alpha,
                                    dropout=config.dropout)])
    self._targets = re.compile(config.targets)

  def dot_general(self, lhs, rhs, *args, **kwargs):
    path = '/'.join(map(str, qwix_flax_util.get_current_module_path()))
    if self._targets.fullmatch(path):
      if jnp.bfloat16 in (lhs.dtype, rhs.dtype):
        # Inside `narrow_matmul`'s custom gradient the kernel cannot be
        # traced back to its parameter.
        raise ValueError(
            f'LoRA on bfloat16 projections is not supported yet (module '
            f'{path}): run the model with dtype float32')
      if not isinstance(rhs, jax.core.Tracer):
        raise RuntimeError(
            f'LoRA model applied outside jax.jit (module {path}): wrap the '
            'call in jax.jit so the adapters can find their kernels')
    return super().dot_general(lhs, rhs, *args, **kwargs)


def with_lora(model, config: LoraConfig):
  """A copy of `model` whose module adds adapters to `config.targets`."""
  lora_model = copy.copy(model)
  lora_model.module = qwix.apply_lora_to_model(
      model.module, _JitOnlyLoraProvider(config))
  lora_model.lora_config = config
  return lora_model


def is_adapter(path: tuple[str, ...]) -> bool:
  return path[-1].endswith(ADAPTER_SUFFIXES)


def _filter_nested(params: Mapping, keep, prefix: tuple[str, ...]) -> dict:
  out = {}
  for name, value in params.items():
    path = (*prefix, name)
    if isinstance(value, Mapping):
      inner = _filter_nested(value, keep, path)
      if inner:
        out[name] = inner
    elif keep(path):
      out[name] = value
  return out


def split_adapters(params: Params) -> tuple[dict, dict]:
  """`params` -> (base parameters, adapters), two nested dicts."""
  return (_filter_nested(params, lambda p: not is_adapter(p), ()),
          _filter_nested(params, is_adapter, ()))


def join(base: Params, adapters: Params) -> dict:
  """The inverse of `split_adapters`."""
  out = dict(base)
  for name, value in adapters.items():
    out[name] = (join(base.get(name, {}), value)
                 if isinstance(value, Mapping) else value)
  return out


def adapted_modules(params: Params) -> list[str]:
  """Module paths carrying adapters, sorted."""
  _, adapters = split_adapters(params)
  paths = jax.tree_util.tree_flatten_with_path(adapters)[0]
  return sorted({path_str(p[:-1]) for p, _ in paths})


def targeted_modules(model, config: LoraConfig) -> list[str]:
  """Module paths of `model`'s kernels that `config.targets` selects."""
  paths = jax.tree_util.tree_flatten_with_path(model.param_shapes())[0]
  pattern = re.compile(config.targets)
  return sorted({path_str(p[:-1]) for p, _ in paths
                 if p[-1].key == 'kernel'
                 and pattern.fullmatch(path_str(p[:-1]))})


def init_adapters(lora_model, base_params: Params, rng: jax.Array) -> dict:
  """Fresh adapters for `base_params`: the joined parameters of
  `lora_model` (`with_lora`'s), B = 0 so its outputs equal the base's.

  Raises:
    ValueError: When a targeted projection got no adapter (it does not go
      through `jax.lax.dot_general` on its kernel), or nothing is targeted.
  """
  config = lora_model.lora_config
  variables = jax.jit(lora_model.get_initial_variables)(rng)
  _, adapters = split_adapters(variables['params'])
  wanted = targeted_modules(lora_model, config)
  got = adapted_modules(adapters)
  if not wanted:
    raise ValueError(f'LoraConfig.targets {config.targets!r} selects no '
                     'projection of the model')
  if missing := sorted(set(wanted) - set(got)):
    raise ValueError(f'targeted projections without adapters: {missing}')
  return join(base_params, adapters)


def merge_adapters(params: Params, config: LoraConfig) -> dict:
  """Base parameters with each adapter folded into its kernel:
  `kernel + (A . B) * alpha / rank`, reshaped to the kernel's shape."""
  base, adapters = split_adapters(params)

  def merge(tree, found, prefix):
    out = {}
    for name, value in tree.items():
      if isinstance(value, Mapping):
        out[name] = merge(value, found.get(name, {}), (*prefix, name))
      elif f'{name}_lora_a' in found:
        a, b = found[f'{name}_lora_a'], found[f'{name}_lora_b']
        delta = jnp.einsum('...ir,...ro->...io', a.astype(jnp.float32),
                           b.astype(jnp.float32)) * config.scale
        out[name] = (value.astype(jnp.float32)
                     + delta.reshape(value.shape)).astype(value.dtype)
      else:
        out[name] = value
    return out
  return merge(base, adapters, ())


def num_bytes(tree: Params) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))

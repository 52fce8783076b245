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
bfloat16 projections take adapters too: under LoRA the bfloat16 matmul
(`kernels.matmul.narrow_matmul`, whose custom gradient would hide the kernel
from qwix) runs as the plain `dot_general` it computes.

QLoRA: with `LoraConfig.base_qtype` the frozen base's projection kernels
are held quantized (`t5x_adapt.quantization`, int8 or int4 with per-block
scales) and dequantized as each matmul reads them; qwix finds such a
kernel by its shape (the stored `[in, out]` matrix the matmul reads). The
adapters are the same as on a float base (and merge into, or export onto,
the float base).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any, Mapping, Optional

import gin
import jax
import jax.numpy as jnp
import qwix
from qwix._src.utils import flax_util as qwix_flax_util

from t5x_adapt import quantization
from t5x_adapt.param_paths import path_str

Params = Mapping[str, Any]

ADAPTER_SUFFIXES = ('_lora_a', '_lora_b')
DEFAULT_TARGETS = (
    r'.*/(self_attention|cross_attention|attention)/(query|key|value|out)'
    r'|.*/mlp/(gate|up|down)')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which projections get adapters, and their shape.

  Attributes:
    rank: Inner dimension of each adapter.
    alpha: The update is scaled by `alpha / rank`.
    dropout: Dropout on the adapter's input (training only, as PEFT does).
    targets: Regular expression matched in full against module paths
      (None: `DEFAULT_TARGETS`).
    trained: Regular expression over parameter paths (`classifier/.*`) of
      base parameters trained in full beside the adapters (PEFT's
      `modules_to_save`); empty: none.
    base_qtype: QLoRA: the frozen base's projection kernels held quantized
      ('int8' or 'int4', `t5x_adapt.quantization`); None: float.
    base_tile_size: Inputs per scale of the quantized base (None: one per
      output channel; QLoRA's 4-bit base uses 64).
  """
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: Optional[str] = DEFAULT_TARGETS
  trained: str = ''
  base_qtype: Optional[str] = None
  base_tile_size: Optional[int] = None

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f'LoraConfig.rank must be >= 1, got {self.rank}')
    if self.targets is None:
      object.__setattr__(self, 'targets', DEFAULT_TARGETS)
    re.compile(self.targets)
    re.compile(self.trained)
    self.base_quantization  # pylint: disable=pointless-statement  # Checks.

  @property
  def base_quantization(self) -> quantization.WeightQuantization:
    return quantization.WeightQuantization(self.base_qtype,
                                           tile_size=self.base_tile_size)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class _JitOnlyLoraProvider(qwix.LoraProvider):
  """qwix's LoRA provider, refusing to run eagerly (where it could not find
  the kernels and would leave the adapters out without a word), and seeing
  through `kernels.matmul.narrow_matmul` (the bfloat16 path)."""

  def __init__(self, config: LoraConfig):
    super().__init__([qwix.LoraRule(module_path=config.targets,
                                    rank=config.rank, alpha=config.alpha,
                                    dropout=config.dropout)])
    self._targets = re.compile(config.targets)

  def get_intercept_map(self):
    return super().get_intercept_map() | {
        't5x_adapt.kernels.matmul.narrow_matmul': self._narrow_matmul}

  def _narrow_matmul(self, a, b):
    # What `narrow_matmul` computes (float32 accumulation, rounded once) as
    # one `dot_general` qwix can trace to its kernel; its custom gradient
    # would hide the kernel and leave the adapters without one. The
    # gradient here is autodiff's (slower on CPU, the same on TPU).
    return self.dot_general(a, b, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.float32).astype(
                                a.dtype)

  def dot_general(self, lhs, rhs, *args, **kwargs):
    path = '/'.join(map(str, qwix_flax_util.get_current_module_path()))
    if (self._targets.fullmatch(path)
        and not isinstance(rhs, jax.core.Tracer)):
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


class _FrozenPart:
  """The base's parameters that stay frozen (quantized for QLoRA): what the
  train step takes as `base_params` (shapes and axes for its shardings)."""

  def __init__(self, lora_model: 'LoraModel'):
    self._lora = lora_model

  def _frozen(self, of_quantized, of_float):
    """The frozen part of the base's tree: `of_quantized(base, config)`
    when the base is held quantized, else `of_float()`."""
    quantized = self._lora.lora_config.base_quantization
    tree = (of_quantized(self._lora.base, quantized) if quantized.enabled
            else of_float())
    return self._lora.split(tree)[0]

  def param_shapes(self):
    return self._frozen(quantization.quantized_shapes,
                        self._lora.base.param_shapes)

  def logical_axes(self):
    return self._frozen(quantization.quantized_axes,
                        self._lora.base.logical_axes)


class LoraModel:
  """A model trained through its adapters (and `LoraConfig.trained`).

  Its parameters are the adapters, with any base parameters that
  `LoraConfig.trained` names (a classifier's fresh head, as PEFT's
  `modules_to_save`). The rest of the base is a frozen further argument of
  the train step (`frozen_models`: `base_params`, beside a distillation
  teacher's `teacher_params`), sharded by the base's logical axes, never
  differentiated, never in the optimizer state or the training checkpoints.
  So the step computes no gradient of a frozen weight, and the optimizer
  state and the checkpoints are the adapters' size.

  Everything else (batches, feature converter, FLOP count, vocabulary) is
  the base model's. To run the tuned model, `adapted` takes all its
  parameters (`join`); `merge_adapters` folds the adapters into the base.

  Args:
    base: The model to tune (any model of `t5x_adapt.models`, a distillation
      or classification model included).
    config: Which projections get adapters, and what else trains.
  """

  def __init__(self, base, config: LoraConfig):
    self.base = base
    self.lora_config = config
    self.adapted = with_lora(base, config)
    self._trained = re.compile(config.trained) if config.trained else None

  def __getattr__(self, name):
    # Only reached for what this class does not define: the base's answers
    # (config, feature_converter, batch_shapes, train_step_flops, ...).
    if name in ('base', 'adapted'):
      raise AttributeError(name)
    return getattr(self.base, name)

  @property
  def teacher(self):
    return self.base.teacher

  def frozen_models(self) -> dict:
    return {**self.base.frozen_models(), 'base_params': _FrozenPart(self)}

  def is_trained(self, path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` (dict keys) trains."""
    return is_adapter(path) or bool(
        self._trained and self._trained.fullmatch('/'.join(path)))

  def split(self, params: Params) -> tuple[dict, dict]:
    """Parameters of `adapted` (or of the base) -> (frozen, trained)."""
    return (_filter_nested(params, lambda p: not self.is_trained(p), ()),
            _filter_nested(params, self.is_trained, ()))

  def param_shapes(self):
    """ShapeDtypeStructs of the trained parameters."""
    return self.split(self.adapted.param_shapes())[1]

  def logical_axes(self):
    """Logical axes of the trained parameters (adapters: those of the
    kernels they adapt)."""
    return self.split(self.adapted.logical_axes())[1]

  def get_initial_variables(self, rng: jax.Array, input_shapes=None):
    """Fresh trained parameters (adapters with B = 0). Under `jax.jit`, as
    the trainer runs it, the rest of the initialisation is dead code."""
    variables = self.adapted.get_initial_variables(rng, input_shapes)
    return {'params': self.split(variables['params'])[1]}

  def start(self, base_params: Params, rng: jax.Array) -> tuple[dict, dict]:
    """(frozen, trained) parameters to start from: fresh adapters on
    `base_params` (the base's whole tree, float), whose trained part they
    keep; the frozen part as it is (float: `freeze` quantizes it)."""
    self.check_targets()
    adapters = jax.jit(self.get_initial_variables)(rng)['params']
    _, adapters = split_adapters(adapters)
    return self.split(join(base_params, adapters))

  def freeze(self, frozen: Params) -> Params:
    """The frozen part as the step reads it: quantized for QLoRA."""
    quantized = self.lora_config.base_quantization
    if not quantized.enabled:
      return frozen
    return quantization.quantize(self.base, frozen, quantized)

  def check_targets(self) -> None:
    """Raises ValueError when the targets select no projection, or one that
    got no adapter (it does not go through `dot_general` on its kernel)."""
    wanted = targeted_modules(self.base, self.lora_config)
    got = adapted_modules(self.adapted.param_shapes())
    if not wanted:
      raise ValueError(f'LoraConfig.targets {self.lora_config.targets!r} '
                       'selects no projection of the model')
    if missing := sorted(set(wanted) - set(got)):
      raise ValueError(f'targeted projections without adapters: {missing}')

  def loss_fn(self, params, batch, dropout_rng, base_params=None, **frozen):
    """The adapted model's loss; `params` are the trained parameters."""
    if base_params is None:
      raise ValueError('LoraModel.loss_fn needs base_params (the trainer '
                       'passes them as a frozen argument)')
    return self.adapted.loss_fn(join(base_params, params), batch,
                                dropout_rng, **frozen)


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


def init_adapters(lora_model: LoraModel, base_params: Params,
                  rng: jax.Array) -> dict:
  """Fresh adapters (B = 0) joined to `base_params`: parameters of
  `lora_model.adapted` whose outputs equal the base's.

  Raises:
    ValueError: See `LoraModel.check_targets`.
  """
  return join(*lora_model.start(base_params, rng))


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

"""Weight-only quantized projections: int8 (or 4-bit) kernels.

Decoding reads every weight once per step, so its speed is bound by their
bytes (`benchmarks/decode.py`); int8 kernels are a quarter of float32's
bytes, int4 an eighth. The quantized tree is the model's, with each
targeted projection kernel replaced by what qwix (0.1.8, Google's JAX
quantization library) stores for a quantized weight: a `WithAux` holding a
`QArray` (absmax calibration, int8 / int4 values, float32 scales; qwix
dequantizes it). Each kernel is stored as the 2-D matrix `[*scan, in, out]`
that `kernels.matmul.matmul_2d` multiplies by (its contracted dimensions
flattened, then its output dimensions), with one scale per output channel
(and layer), or with `tile_size` one per block of inputs.
`layers.dense.Projection` dequantizes it and multiplies as usual; nothing
else of the model changes, so decoding, scoring, serving and a QLoRA base
(`t5x_adapt.lora`) take quantized parameters wherever they take float
ones. Storing the matrix the matmul reads is also what lets qwix's LoRA
find the kernel behind that matmul (by its shape, among the module's
parameters), so adapters on a quantized base are those of a float one.

Which dimensions a kernel contracts is a question for the model, not for
parameter names: `projection_contractions` asks every `Projection` while
the model is traced. (qwix's own PTQ provider quantizes weights as
intercepted matmuls meet them, but keeps them where they were: ours are
reshaped before the matmul, and PTQ refuses reshaped weights.)

Embedding tables (and with them a tied LM head) stay as they are.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from qwix._src.core import qarray
from qwix._src.providers import ptq

from t5x_adapt.layers import dense

Params = Mapping[str, Any]
QTYPES = {'int8': jnp.int8, 'int4': jnp.int4}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class WeightQuantization:
  """Which projection kernels are held quantized, and how.

  Attributes:
    qtype: None (float weights: the switch off), 'int8' or 'int4'.
    targets: Regular expression matched in full against the projections'
      module paths (`decoder/layers/block_0/mlp/up`); default: all.
    tile_size: None: one scale per output channel. An int: one per output
      channel and block of this many inputs of the flattened `[in, out]`
      matrix (QLoRA's 4-bit base uses blocks of 64).
  """
  qtype: Optional[str] = None
  targets: str = '.*'
  tile_size: Optional[int] = None

  def __post_init__(self):
    if self.qtype is not None and self.qtype not in QTYPES:
      raise ValueError(f'WeightQuantization.qtype must be one of '
                       f'{sorted(QTYPES)} or None, got {self.qtype!r}')
    re.compile(self.targets)

  @property
  def enabled(self) -> bool:
    return self.qtype is not None


_CONTRACTIONS = {}


def projection_contractions(model) -> dict[str, int]:
  """{module path of each projection: how many leading kernel dimensions
  it contracts}, from a trace of the model (nothing computed), kept by
  model class and module as `BaseModel` keeps its parameter shapes."""
  key = (type(model), model.module)
  if key not in _CONTRACTIONS:
    _CONTRACTIONS[key] = _trace_contractions(model)
  return dict(_CONTRACTIONS[key])


def _trace_contractions(model) -> dict[str, int]:
  found = {}

  def record(next_fun, args, kwargs, context):
    if (isinstance(context.module, dense.Projection)
        and context.method_name == '__call__'):
      found['/'.join(context.module.path)] = context.module.contract
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model._init(  # pylint: disable=protected-access
        jax.random.PRNGKey(0), model._init_args({})))  # pylint: disable=protected-access
  return found


def _kernels(model, config: WeightQuantization) -> dict[tuple, tuple]:
  """{kernel path (dict keys): (leading scan dims, contracted dims)} of
  the targeted projections."""
  pattern = re.compile(config.targets)
  out = {}
  for path, contract in projection_contractions(model).items():
    if pattern.fullmatch(path):
      keys = (*path.split('/'), 'kernel')
      # A scanned stack's kernels carry the layers first.
      out[keys] = (1 if 'layers' in keys else 0, contract)
  return out


def _map_kernels(tree: Params, kernels, fn, prefix=()) -> dict:
  out = {}
  for name, value in tree.items():
    path = (*prefix, name)
    if path in kernels:
      out[name] = fn(value, *kernels[path])
    elif isinstance(value, Mapping):
      out[name] = _map_kernels(value, kernels, fn, path)
    else:
      out[name] = value
  return out


def _how(config: WeightQuantization, scanned: int,
         in_size: int) -> qarray.HowToQuantize:
  """How a `[*scan, in, out]` matrix is quantized."""
  tiles = {}
  if config.tile_size is not None:
    if in_size % config.tile_size:
      raise ValueError(f'WeightQuantization.tile_size {config.tile_size} '
                       f'does not divide a kernel\'s input size {in_size}')
    tiles = {scanned: config.tile_size}
  return qarray.HowToQuantize(
      qtype=QTYPES[config.qtype],
      channelwise_axes=(*range(scanned), scanned + 1), tiled_axes=tiles)


def _matrix_shape(shape, scanned: int, contract: int) -> tuple[int, ...]:
  inputs = shape[scanned:scanned + contract]
  return (*shape[:scanned], math.prod(inputs),
          math.prod(shape[scanned + contract:]))


def quantize(model, params: Params, config: WeightQuantization) -> dict:
  """`params` with each targeted kernel a quantized `[*scan, in, out]`
  matrix (a qwix `WithAux`)."""

  def one(kernel, scanned, contract):
    matrix = kernel.astype(jnp.float32).reshape(
        _matrix_shape(kernel.shape, scanned, contract))
    how = _how(config, scanned, matrix.shape[scanned])
    return ptq.WithAux(qarray.quantize(matrix, how), how)
  return _map_kernels(params, _kernels(model, config), one)


def quantized_shapes(model, config: WeightQuantization):
  """ShapeDtypeStructs of `quantize`'s tree."""
  return jax.eval_shape(lambda p: quantize(model, p, config),
                        model.param_shapes())


def quantized_axes(model, config: WeightQuantization):
  """Logical axes of `quantize`'s tree. A flattened group of dimensions
  takes the name of its first (major) one: row-major flattening keeps each
  of that dimension's shards contiguous. Scales are not split over their
  inputs."""
  shapes = quantized_shapes(model, config)

  def one(spec: PartitionSpec, scanned, contract):
    names = tuple(spec)
    scan, inputs = names[:scanned], names[scanned:scanned + contract]
    outputs = names[scanned + contract:]
    return PartitionSpec(*scan, inputs[0], outputs[0]), PartitionSpec(
        *scan, None, outputs[0])

  specs = _map_kernels(model.logical_axes(), _kernels(model, config), one)

  def rebuild(shape_tree, spec_tree):
    out = {}
    for name, value in shape_tree.items():
      spec = spec_tree[name]
      if is_quantized(value):
        qvalue, scale = spec
        out[name] = value.replace(array=value.array.replace(
            qvalue=qvalue, scale=scale))
      elif isinstance(value, Mapping):
        out[name] = rebuild(value, spec)
      else:
        out[name] = spec
    return out
  return rebuild(shapes, specs)


def is_quantized(leaf) -> bool:
  return isinstance(leaf, ptq.WithAux)


def num_bytes(tree: Params) -> int:
  """Bytes of a parameter tree, quantized values counted at their bit
  width (int4: half a byte, whatever the host stores them in)."""
  total = 0
  for leaf in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized):
    if is_quantized(leaf):
      qvalue, scale = leaf.array.qvalue, leaf.array.scale
      bits = jnp.iinfo(qvalue.dtype).bits
      total += qvalue.size * bits // 8 + num_bytes({'scale': scale})
    else:
      total += leaf.size * jnp.dtype(leaf.dtype).itemsize
  return total

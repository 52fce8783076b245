"""Projections whose kernels (and optional biases) carry logical axis names."""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import qwix
from qwix._src.providers import ptq

from t5x_adapt.kernels.matmul import matmul_2d


def _dequantized(matrix: qwix.QArray) -> jax.Array:
  """A quantized `[in, out]` matrix in float32.

  What `qwix.dequantize` computes for int8 / int4 values, written so that
  the last operation is the multiply in the matrix's own shape: qwix's LoRA
  finds a matmul's kernel by following it back to that shape (a scale per
  block of inputs is repeated to it rather than the matrix split into
  blocks).
  """
  values, scale = matrix.qvalue.astype(jnp.float32), matrix.scale
  blocks = scale.shape[-2]
  if blocks > 1:
    scale = jnp.repeat(scale, values.shape[-2] // blocks, axis=-2)
  return values * scale


class Projection(nn.Module):
  """`x [..., *in] -> [..., *features]` by a kernel `[*in, *features]`.

  What `nn.DenseGeneral` computes (and initialises: LeCun normal over the
  flattened `[prod(in), prod(features)]` kernel, reshaped), with the kernel
  declared at its full rank. `nn.DenseGeneral` boxes the flattened kernel
  with the full-rank logical names, which breaks as soon as a mesh is
  active at initialisation (the names cannot constrain the flat array).

  Attributes:
    features: Output dimensions.
    axes: Logical names of the kernel's dimensions (inputs, then outputs).
    contract: Trailing input dimensions contracted.
    use_bias: Add a bias over the output dimensions (zeros at first; Qwen 2's
      query, key and value projections).
    dtype: Activation dtype (inputs and kernel are cast to it).
    param_dtype: Kernel dtype.
  """

  features: Sequence[int]
  axes: Sequence[str]
  contract: int = 1
  use_bias: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_shape = x.shape[x.ndim - self.contract:]
    features = tuple(self.features)

    def init(rng, shape, dtype):
      flat = (math.prod(in_shape), math.prod(features))
      return nn.initializers.lecun_normal()(rng, flat, dtype).reshape(shape)

    stored = (self.get_variable('params', 'kernel')
              if self.has_variable('params', 'kernel') else None)
    if isinstance(stored, ptq.WithAux):
      # Held quantized as the `[in, out]` matrix (`t5x_adapt.quantization`).
      kernel = _dequantized(stored.array).reshape(*in_shape, *features)
    else:
      kernel = self.param('kernel',
                          nn.with_logical_partitioning(init, self.axes),
                          (*in_shape, *features), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = matmul_2d(x, kernel, self.contract)
    if not self.use_bias:
      return y
    bias = self.param(
        'bias', nn.with_logical_partitioning(
            nn.initializers.zeros_init(), tuple(self.axes)[-len(features):]),
        features, self.param_dtype)
    return y + bias.astype(self.dtype)

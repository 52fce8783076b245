"""Contractions written as the 2-D matmuls XLA:CPU runs best."""

import math

import jax
import jax.numpy as jnp


def matmul_2d(x: jax.Array, kernel: jax.Array, contract: int) -> jax.Array:
  """`x [*lead, *in] . kernel [*in, *out] -> [*lead, *out]` as one 2-D matmul.

  The leading and the contracted dimensions are each flattened (free
  reshapes of row-major arrays), so the kernel gradient is one `[in, rows] x
  [rows, out]` matmul. Contracting several leading dimensions instead makes
  XLA:CPU transpose the output gradient (with the elementwise work fused into
  the transposing copy) before that matmul: it doubles the GeGLU MLP's
  backward time at `[8, 128, 512]`.

  Args:
    x: Inputs [*lead, *in].
    kernel: [*in, *out], `in` being its first `contract` dimensions.
    contract: How many trailing dimensions of `x` are contracted.
  """
  lead, inputs = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  outputs = kernel.shape[contract:]
  y = jnp.dot(x.reshape(math.prod(lead), math.prod(inputs)),
              kernel.reshape(math.prod(inputs), math.prod(outputs)))
  return y.reshape(*lead, *outputs)

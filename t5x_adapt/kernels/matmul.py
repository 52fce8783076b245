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
  backward time at `[8, 128, 512]`. bfloat16 operands go through
  `narrow_matmul`.

  Args:
    x: Inputs [*lead, *in].
    kernel: [*in, *out], `in` being its first `contract` dimensions.
    contract: How many trailing dimensions of `x` are contracted.
  """
  lead, inputs = x.shape[:x.ndim - contract], x.shape[x.ndim - contract:]
  outputs = kernel.shape[contract:]
  rows = x.reshape(math.prod(lead), math.prod(inputs))
  table = kernel.reshape(math.prod(inputs), math.prod(outputs))
  if rows.dtype == table.dtype == jnp.bfloat16:
    y = narrow_matmul(rows, table)
  else:
    # `dot_general` (what `jnp.dot` lowers to) called directly: qwix adds
    # LoRA adapters to intercepted `dot_general`s, not to `jnp.dot`s
    # (`t5x_adapt.lora`).
    dtype = jnp.result_type(rows, table)
    y = jax.lax.dot_general(rows.astype(dtype), table.astype(dtype),
                            (((1,), (0,)), ((), ())))
  return y.reshape(*lead, *outputs)


def _dot(a: jax.Array, b: jax.Array, contracting: tuple[int, int],
         dtype) -> jax.Array:
  """2-D `dot_general` over one dimension each, float32 accumulation."""
  dims = (((contracting[0],), (contracting[1],)), ((), ()))
  return jax.lax.dot_general(a, b, dims,
                             preferred_element_type=jnp.float32).astype(dtype)


@jax.custom_vjp
def narrow_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """`a [m, k] . b [k, n]` for bfloat16 operands, the result in bfloat16,
  every matmul (the gradient's too) accumulating in float32.

  XLA:CPU's bfloat16 dot with a bfloat16 result runs about half as fast as
  the same dot asked for a float32 result (2048^3: 189 against 375
  GFLOP/s; a decoding-shaped `[8, 512] x [512, 50257]`: 3.2 against 9.4
  GB/s; `benchmarks/matmul_paths.py`), so each matmul asks for float32 and
  rounds once. The gradient is written out because autodiff of that would
  contract the float32 cotangent with the bfloat16 operand: a float32 matmul
  after converting the operand. (Only 2-D dots: XLA:CPU's batched-dot thunk
  has no bfloat16 x bfloat16 -> float32, so attention's einsums stay as they
  are.)
  """
  return _dot(a, b, (1, 0), a.dtype)


def _narrow_forward(a: jax.Array, b: jax.Array):
  return narrow_matmul(a, b), (a, b)


def _narrow_backward(residuals, d_out: jax.Array):
  """d_a = d_out [m, n] . b^T, d_b = a^T . d_out, both bfloat16 operands."""
  a, b = residuals
  return _dot(d_out, b, (1, 1), a.dtype), _dot(a, d_out, (0, 0), b.dtype)


narrow_matmul.defvjp(_narrow_forward, _narrow_backward)

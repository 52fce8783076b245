"""kernels/matmul: 2-D matmuls, and bfloat16 ones that accumulate in float32."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_adapt.kernels.matmul import matmul_2d, narrow_matmul

BF16_EPS = 2.0**-7  # one bfloat16 ulp, relative


def _operands(shape_a, shape_b, dtype):
  a = jax.random.normal(jax.random.PRNGKey(0), shape_a, jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), shape_b, jnp.float32)
  return a.astype(dtype), b.astype(dtype)


def _exact(a, b):
  return np.asarray(a, np.float64) @ np.asarray(b, np.float64)


@pytest.mark.parametrize('m,k,n', [(1, 512, 300), (8, 64, 40), (33, 7, 5)])
def test_narrow_matmul_rounds_an_exact_product_once(m, k, n):
  a, b = _operands((m, k), (k, n), jnp.bfloat16)
  out = jax.jit(narrow_matmul)(a, b)
  assert out.dtype == jnp.bfloat16
  exact = _exact(a, b)
  # float32 accumulation, then one rounding: within one ulp of the exact
  # product.
  error = np.abs(np.asarray(out, np.float64) - exact)
  assert np.all(error <= BF16_EPS * np.abs(exact) + 1e-6 * np.abs(exact).max())


def test_narrow_matmul_gradient_is_the_exact_one_rounded():
  a, b = _operands((24, 96), (96, 16), jnp.bfloat16)
  d_out = jax.random.normal(jax.random.PRNGKey(2), (24, 16)).astype(
      jnp.bfloat16)
  _, vjp = jax.vjp(narrow_matmul, a, b)
  d_a, d_b = vjp(d_out)
  assert d_a.dtype == d_b.dtype == jnp.bfloat16
  for got, exact in ((d_a, _exact(d_out, np.asarray(b, np.float64).T)),
                     (d_b, _exact(np.asarray(a, np.float64).T, d_out))):
    error = np.abs(np.asarray(got, np.float64) - exact)
    assert np.all(error <= BF16_EPS * np.abs(exact) +
                  1e-6 * np.abs(exact).max())


def _dots(fn, *args):
  """(operand dtypes, result dtype) of every dot_general in the jaxpr of
  `fn(*args)`."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == 'dot_general':
        found.append((tuple(str(v.aval.dtype) for v in eqn.invars),
                      str(eqn.outvars[0].aval.dtype)))
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        visit(sub)

  visit(jax.make_jaxpr(fn)(*args).jaxpr)
  return found


def test_bfloat16_projection_gradient_has_only_bfloat16_matmuls():
  x, kernel = _operands((2, 6, 32), (32, 4, 8), jnp.bfloat16)

  def loss(x, kernel):
    return jnp.sum(matmul_2d(x, kernel, contract=1).astype(jnp.float32)**2)

  out = matmul_2d(x, kernel, contract=1)
  assert out.shape == (2, 6, 4, 8) and out.dtype == jnp.bfloat16
  dots = _dots(jax.grad(loss, (0, 1)), x, kernel)
  # The forward and the two gradient matmuls: each bfloat16 x bfloat16 (not
  # the float32 cotangent against a bfloat16 operand that autodiff of the
  # float32-result forward builds) with a float32 result (not the bfloat16
  # result of a plain `jnp.dot`, which XLA:CPU runs at half the rate).
  assert len(dots) == 3
  assert all(d == (('bfloat16', 'bfloat16'), 'float32') for d in dots), dots


def test_float32_matmul_2d_is_a_plain_dot():
  x, kernel = _operands((3, 5, 16), (16, 12), jnp.float32)
  np.testing.assert_array_equal(
      matmul_2d(x, kernel, contract=1),
      jnp.dot(x.reshape(15, 16), kernel).reshape(3, 5, 12))

"""Parameters not read yet, and their placement on a mesh one leaf at a time.

A converter opens a checkpoint file into a tree of `LazyTensor`s (shape,
dtype and a function that reads the tensor in a given dtype), converts that
tree's layout without reading anything (`stacked`: the scanned layout's
`layers` axis), and `place` then reads each leaf and puts it on its
sharding before reading the next. So host memory holds one tensor in
flight beyond what is already placed, and no device ever holds a whole
tree: each gets its shards of each leaf (`jax.make_array_from_callback`
asks only for the shards of this process's devices). A leaf's dtype is
decided before it is read (`astype`, free), so each tensor is cast once,
from its stored dtype straight into its parameter's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from t5x_adapt.checkpoints import errors


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A parameter to read later.

  Attributes:
    shape: Its shape in our layout.
    dtype: The dtype it is read as.
    load: dtype -> the array (in our layout, of `shape` and that dtype).
  """

  shape: tuple[int, ...]
  dtype: np.dtype
  load: Callable[[np.dtype], np.ndarray]

  def read(self) -> np.ndarray:
    return self.load(self.dtype)

  def astype(self, dtype) -> 'LazyTensor':
    """The same tensor, to be read as `dtype` (nothing is read now)."""
    return dataclasses.replace(self, dtype=np.dtype(dtype))


def stacked(leaves: Sequence[LazyTensor]) -> LazyTensor:
  """The leaves stacked on a new leading axis (read together, later)."""
  first = leaves[0]
  shape = (len(leaves), *first.shape)

  def load(dtype):
    out = np.empty(shape, dtype)  # Filled layer by layer.
    for i, leaf in enumerate(leaves):
      out[i] = leaf.load(dtype)
    return out

  return LazyTensor(shape, first.dtype, load)


def astype(tree: Any, dtype) -> Any:
  """Every lazy leaf of `tree`, to be read as `dtype` (nothing is read)."""
  return jax.tree_util.tree_map(lambda leaf: leaf.astype(dtype), tree)


def is_lazy(leaf: Any) -> bool:
  return isinstance(leaf, LazyTensor)


def place_leaf(array: np.ndarray,
               sharding: Optional[jax.sharding.Sharding]):
  """One host array onto its sharding (None: left on the host)."""
  if sharding is None:
    return array
  return jax.make_array_from_callback(array.shape, sharding,
                                      lambda index: array[index])


def place(tree: Any, shardings: Optional[Any] = None) -> Any:
  """Reads every lazy leaf and places it on its sharding, one at a time.

  Args:
    tree: Parameters: `LazyTensor`s or arrays.
    shardings: A tree of shardings of the same structure, or None to return
      numpy arrays on the host.

  Returns:
    The tree of placed arrays.
  """
  def one(leaf, sharding=None):
    if not is_lazy(leaf):
      return place_leaf(np.asarray(leaf), sharding)
    array = leaf.read()
    if tuple(array.shape) != tuple(leaf.shape) or array.dtype != leaf.dtype:
      raise errors.ShapeMismatchError(
          f'a reader returned {array.dtype}{list(array.shape)} for a tensor '
          f'of {leaf.dtype}{list(leaf.shape)}')
    return place_leaf(array, sharding)

  if shardings is None:
    return jax.tree_util.tree_map(one, tree)
  return jax.tree_util.tree_map(one, tree, shardings)

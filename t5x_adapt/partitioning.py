"""Device mesh and logical-axis rules: logical names -> mesh shardings.

Models annotate every parameter and main activation with logical axis names
(`batch, length, embed, heads, kv_heads, head_dim, mlp, vocab, layers`). The
`Partitioner` owns the mesh (`data`, `fsdp`, `tensor`) and the rules that map
those names onto mesh axes, in one place, overridable from gin. The trainer
asks it for shardings and never reasons about devices itself.

  data   - pure data parallelism (parameters replicated)
  fsdp   - data parallelism with parameters and optimizer state sharded
           (ZeRO-3 style) along their `embed` dimension
  tensor - Megatron-style tensor parallelism over heads and the MLP
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

MESH_AXES = ('data', 'fsdp', 'tensor')

# Logical axis -> mesh axis (or axes, or None: replicated). The batch is split
# over both data-parallel axes; kv_heads stays replicated because GQA/MQA
# models often have fewer KV heads than tensor-parallel devices.
DEFAULT_RULES = (
    ('batch', ('data', 'fsdp')),
    ('length', None),
    ('embed', 'fsdp'),
    ('vocab', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', None),
    ('head_dim', None),
    ('mlp', 'tensor'),
    ('layers', None),
)


def mesh_shape(num_devices: int, data: int, fsdp: int,
               tensor: int) -> tuple[int, int, int]:
  """Resolves one -1 ("the remaining devices") and checks the product."""
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f'at most one mesh axis may be -1, got {sizes}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'{num_devices} devices do not split into the fixed '
                       f'mesh axes {sizes}')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, sizes))} needs '
                     f'{math.prod(sizes)} devices, {num_devices} available')
  return tuple(sizes)


@gin.configurable
class Partitioner:
  """A mesh over the devices plus the logical-axis rules.

  Args:
    data: Size of the `data` axis (-1: remaining devices).
    fsdp: Size of the `fsdp` axis.
    tensor: Size of the `tensor` axis.
    rules: Logical axis rules; defaults to `DEFAULT_RULES`.
    devices: Devices to use (default: all, across hosts).
  """

  def __init__(self, data: int = -1, fsdp: int = 1, tensor: int = 1,
               rules: Optional[Sequence[tuple[str, Any]]] = None,
               devices: Optional[Sequence[jax.Device]] = None):
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(len(devices), data, fsdp, tensor)
    try:
      device_array = mesh_utils.create_device_mesh(
          shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
      device_array = np.asarray(devices).reshape(shape)
    self.mesh = Mesh(device_array, MESH_AXES)
    self.rules = tuple(rules if rules is not None else DEFAULT_RULES)

  @property
  def data_parallel_size(self) -> int:
    return self.mesh.shape['data'] * self.mesh.shape['fsdp']

  def sharding(self, spec: PartitionSpec) -> NamedSharding:
    """Mesh sharding of a logical PartitionSpec."""
    return NamedSharding(self.mesh,
                         nn.logical_to_mesh_axes(tuple(spec), self.rules))

  def shardings(self, logical_specs) -> Any:
    """Tree of logical PartitionSpecs -> tree of NamedShardings."""
    return jax.tree_util.tree_map(
        self.sharding, logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec))

  @property
  def batch_sharding(self) -> NamedSharding:
    """Splits a batch feature's first axis; fits any rank (a [batch] label
    as well as [batch, length] tokens)."""
    return self.sharding(PartitionSpec('batch'))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict:
    """This host's slice of a global batch -> global jax.Arrays."""
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
            for k, v in batch.items()}

  def activation_rules(self):
    """Context manager applying the rules to `nn.with_logical_constraint`."""
    return nn.logical_axis_rules(self.rules)

  def context(self) -> contextlib.ExitStack:
    """Mesh + logical rules, for tracing model code."""
    stack = contextlib.ExitStack()
    # `jax.set_mesh` makes the mesh the abstract mesh of tracing, which is
    # where Flax's `with_logical_constraint` looks for it: under the legacy
    # `with mesh:` every activation constraint would silently do nothing
    # (and XLA would pick, e.g., the LM head's sharding on its own).
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(self.activation_rules())
    return stack

  def jit(self, fn: Callable, in_shardings, out_shardings,
          donate_argnums: Sequence[int] = ()) -> 'MeshJit':
    """`jax.jit` with explicit shardings, traced on this mesh and rules.

    How the trainer (its state's initialisation and step) and a model's
    calls outside training (`t5x_adapt.sharded.ShardedModel`) are compiled
    over the mesh.
    """
    return MeshJit(jax.jit(fn, in_shardings=in_shardings,
                           out_shardings=out_shardings,
                           donate_argnums=tuple(donate_argnums)), self)


class MeshJit:
  """A jitted function whose calls and lowering run in its partitioner's
  context (so `nn.with_logical_constraint` sees the mesh and the rules)."""

  def __init__(self, jitted, partitioner: Partitioner):
    self._jitted = jitted
    self._partitioner = partitioner

  def __call__(self, *args):
    with self._partitioner.context():
      return self._jitted(*args)

  def lower(self, *args):
    with self._partitioner.context():
      return self._jitted.lower(*args)

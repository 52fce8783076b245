"""Which mesh and platform the code being traced is compiled for.

The attention kernels ask, to pick an implementation (`attention.resolve`)
and to run Pallas kernels in interpret mode off a TPU (`splash`). The target
is the mesh's, not the host's: `t5x_adapt.precompile` traces for a TPU
topology on a CPU host.
"""

from __future__ import annotations

import jax


def current_mesh():
  """The mesh being traced under: `jax.set_mesh`'s abstract mesh, else a
  legacy `with mesh:` one (None without either)."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh
  # A legacy `with mesh:` sets only the resource env, not the abstract mesh.
  from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  physical = mesh_lib.thread_resources.env.physical_mesh
  return None if physical.empty else physical


def target_platform(mesh=None) -> str:
  """The platform code is compiled for: the mesh's devices' (a TPU topology
  compiled for from a CPU host), else the default backend's."""
  mesh = mesh if mesh is not None else current_mesh()
  if mesh is not None:
    abstract = mesh if isinstance(mesh, jax.sharding.AbstractMesh) else (
        mesh.abstract_mesh)
    if abstract.abstract_device is not None:
      return abstract.abstract_device.platform
  return jax.default_backend()

"""Which matmul paths from JAX reach this CPU's matrix units: a side-by-side.

XLA:CPU (jaxlib 0.10.2) runs bfloat16 matmuls with its own kernels, which do
not use AMX tiles; torch's reach them through oneDNN. This script times, in
one run, the same matmuls through

  jnp        `jnp.dot` under jit (XLA:CPU) asked for a float32 result (as
             `kernels.matmul.narrow_matmul` asks for bfloat16 operands);
  jnp-same   the same with the result in the operands' dtype (plain
             `jnp.dot`: for bfloat16 about half as fast);
  torch      `torch.matmul`, a thread per core (oneDNN / MKL);
  onednn-ffi oneDNN's matmul primitive (the library behind torch's CPU
             bfloat16 matmuls, AMX included) called from a jitted JAX
             function through `jax.ffi` (benchmarks/ffi/onednn_matmul.cc,
             built here with g++ against jaxlib's FFI headers; needs `pip
             install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0`
             in the venv, and is skipped with a note otherwise),

in float32 and bfloat16, on three shapes: a 2048^3 square, a training
projection `[4096, 512] x [512, 2048]` (batch 8 x 512 tokens) and a
decoding LM head `[8, 512] x [512, 50257]` (reported as the GB/s at which it
reads its table). It prints the CPU's matrix-unit flags and each path's rate
against jnp float32, and checks the FFI path's result against numpy.

  .venv/bin/python benchmarks/matmul_paths.py
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import pathlib
import subprocess
import sys
import time
from typing import Callable

from common import REPO_ROOT, argument_parser, log  # pylint: disable=g-bad-import-order

# pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

SHAPES = {'square 2048^3': (2048, 2048, 2048),
          'projection [4096, 512] x [512, 2048]': (4096, 512, 2048),
          'LM head [8, 512] x [512, 50257]': (8, 512, 50257)}
DTYPES = ('float32', 'bfloat16')
CORES = len(os.sched_getaffinity(0))


def cpu_flags() -> str:
  """The matrix-relevant flags of /proc/cpuinfo and the model name."""
  try:
    text = pathlib.Path('/proc/cpuinfo').read_text()
  except OSError:
    return 'unknown CPU'
  model = next((l.split(':', 1)[1].strip() for l in text.splitlines()
                if l.startswith('model name')), 'unknown CPU')
  flags = next((l.split(':', 1)[1].split() for l in text.splitlines()
                if l.startswith('flags')), [])
  wanted = [f for f in flags if f.startswith('amx') or f in (
      'avx512f', 'avx512_bf16', 'avx512_vnni', 'avx2')]
  return f'{model}; flags: {", ".join(sorted(wanted)) or "none of interest"}'


def best_seconds(fn: Callable[[], object], repeats: int = 5) -> float:
  fn()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


# ------------------------------------------------------------------ paths --


def jnp_matmul(m: int, k: int, n: int, dtype: str, result=jnp.float32):
  a = jax.random.normal(jax.random.PRNGKey(0), (m, k), dtype)
  b = jax.random.normal(jax.random.PRNGKey(1), (k, n), dtype)
  dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=result))
  return lambda: jax.block_until_ready(dot(a, b))


def jnp_matmul_same_dtype(m: int, k: int, n: int, dtype: str):
  return jnp_matmul(m, k, n, dtype, result=None)


def torch_matmul(m: int, k: int, n: int, dtype: str):
  import torch
  torch.set_num_threads(CORES)  # as many as XLA's and oneDNN's pools
  a = torch.randn(m, k).to(getattr(torch, dtype))
  b = torch.randn(k, n).to(getattr(torch, dtype))
  return lambda: torch.matmul(a, b)


@dataclasses.dataclass(frozen=True)
class FfiMatmul:
  """A matmul library called through `jax.ffi`: its source here, the header
  and shared library a pip package puts in the environment, the packages."""
  name: str
  source: str
  header: str
  library: str
  packages: str
  symbol: str


FFI_MATMULS = (
    FfiMatmul('onednn-ffi', 'onednn_matmul.cc', 'dnnl.hpp', 'libdnnl.so.3',
              'onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0',
              'OnednnMatmul'),
)


def build_ffi(spec: FfiMatmul) -> str:
  """Builds (once, into the cache) and registers `spec` as the FFI target
  `spec.name`; returns '' or why it could not."""
  prefix = pathlib.Path(sys.prefix)
  header, library = prefix / 'include' / spec.header, prefix / 'lib'
  if not header.exists() or not (library / spec.library).exists():
    return f'not installed in this environment (pip install {spec.packages})'
  source = REPO_ROOT / 'benchmarks' / 'ffi' / spec.source
  digest = hashlib.sha256(source.read_bytes() +
                          jax.__version__.encode()).hexdigest()[:12]
  out = (pathlib.Path.home() / '.cache' / 't5x_adapt' / 'ffi' /
         f'{source.stem}-{digest}.so')
  if not out.exists():
    out.parent.mkdir(parents=True, exist_ok=True)
    command = ['g++', '-O2', '-std=c++17', '-shared', '-fPIC',
               f'-I{jax.ffi.include_dir()}', f'-I{header.parent}',
               str(source), '-o', f'{out}.tmp', f'-L{library}',
               f'-l:{spec.library}', f'-Wl,-rpath,{library}']
    log(f'building {out.name}')
    proc = subprocess.run(command, capture_output=True, text=True,
                          check=False)
    if proc.returncode:
      return f'g++ failed: {proc.stderr.strip()[-300:]}'
    os.replace(f'{out}.tmp', out)
  lib = ctypes.cdll.LoadLibrary(str(out))
  jax.ffi.register_ffi_target(spec.name,
                              jax.ffi.pycapsule(getattr(lib, spec.symbol)),
                              platform='cpu')
  return ''


def ffi_dot(target: str, a: jax.Array, b: jax.Array,
            transpose_a: bool = False, transpose_b: bool = False) -> jax.Array:
  """`op(a) [m, k] . op(b) [k, n] -> [m, n]` float32 through an FFI target,
  `op` transposing where asked (the target reads the buffer strided)."""
  m = a.shape[1] if transpose_a else a.shape[0]
  n = b.shape[0] if transpose_b else b.shape[1]
  call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((m, n), jnp.float32),
                          vmap_method='sequential')
  return call(a, b, transpose_a=transpose_a, transpose_b=transpose_b)


def ffi_matmul(target: str):
  def make(m: int, k: int, n: int, dtype: str):
    a = jax.random.normal(jax.random.PRNGKey(0), (m, k), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (k, n), dtype)
    dot = jax.jit(functools.partial(ffi_dot, target))
    return lambda: jax.block_until_ready(dot(a, b))
  return make


def ffi_error(target: str) -> float:
  """Largest |FFI - numpy| / max |numpy| over bf16 and f32 matmuls, with
  and without each operand transposed."""
  worst = 0.0
  for dtype in DTYPES:
    a = jax.random.normal(jax.random.PRNGKey(2), (96, 160), dtype)
    b = jax.random.normal(jax.random.PRNGKey(3), (160, 72), dtype)
    ref = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    for transpose_a in (False, True):
      for transpose_b in (False, True):
        dot = jax.jit(functools.partial(
            ffi_dot, target, transpose_a=transpose_a,
            transpose_b=transpose_b))
        got = np.asarray(dot(a.T if transpose_a else a,
                             b.T if transpose_b else b), np.float64)
        worst = max(worst,
                    float(np.abs(got - ref).max() / np.abs(ref).max()))
  return worst


# ------------------------------------------------------------------- main --


def main(argv=None) -> None:
  argument_parser(__doc__).parse_args(argv)
  paths = {'jnp': jnp_matmul, 'jnp-same': jnp_matmul_same_dtype,
           'torch': torch_matmul}
  skipped = {}
  for spec in FFI_MATMULS:
    why_not = build_ffi(spec)
    if why_not:
      skipped[spec.name] = why_not
    else:
      paths[spec.name] = ffi_matmul(spec.name)
  seconds = {}
  for shape_name, (m, k, n) in SHAPES.items():
    for dtype in DTYPES:
      for path, make in paths.items():
        log(f'{shape_name} {dtype} {path}')
        seconds[shape_name, dtype, path] = best_seconds(make(m, k, n, dtype))

  print(f'\n## Matmul paths on this CPU\n\n{cpu_flags()}; jax '
        f'{jax.__version__}; every path on the {CORES} cores (XLA\'s pool, '
        'torch threads, oneDNN\'s OpenMP team); best of 5.\n')
  columns = [(d, p) for d in DTYPES for p in paths]
  print('| shape | ' + ' | '.join(f'{p} {d}' for d, p in columns) + ' |')
  print('|---|' + '---:|' * len(columns))
  for shape_name, (m, k, n) in SHAPES.items():
    skinny = m < 64
    base = seconds[shape_name, 'float32', 'jnp']
    cells = []
    for dtype, path in columns:
      took = seconds[shape_name, dtype, path]
      if skinny:
        size = jnp.dtype(dtype).itemsize
        value = f'{size * k * n / took / 1e9:.1f} GB/s'
      else:
        value = f'{2 * m * k * n / took / 1e9:.0f} GFLOP/s'
      cells.append(f'{value} ({base / took:.2f}x)')
    print(f'| {shape_name} | ' + ' | '.join(cells) + ' |')
  print('\n(x: against jnp float32 on the same shape.)')
  print()
  for name, why_not in skipped.items():
    print(f'- {name}: not run: {why_not}.')
  for name in paths:
    if name.endswith('-ffi'):
      print(f'- {name} against numpy (float64): largest error '
            f'{ffi_error(name):.2e} of the largest entry.')


if __name__ == '__main__':
  main()

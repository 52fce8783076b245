"""Compiled temporary memory of dense vs blocked attention (compile only).

Prints a markdown table of XLA's `memory_analysis().temp_size_in_bytes` for
the forward pass and for forward + backward (the gradient w.r.t. query, key
and value of a scalar of the output) of `dense_attention` and
`blocked_attention` (tiles of 512), at the shapes of a Gemma 2/3 layer:
batch 1, 8 query heads over 4 key/value heads, head_dim 128, float32,
self-attention over a training batch (index-ordered, so blocked skips the
tiles the mask hides), softcap 50. Rows: causal sliding window 512 (a local
layer) and global causal, at 4096 and 2048 tokens, with the number of
(query, key) tiles blocked computes. Nothing runs; there are no timings.

  .venv/bin/python benchmarks/attention_memory.py    # ~15 s on CPU
"""

from __future__ import annotations

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# pylint: disable=g-import-not-at-top
import common  # puts the repository on sys.path
import jax
import jax.numpy as jnp

from t5x_adapt.kernels import blocked
from t5x_adapt.kernels.attention import dense_attention
from t5x_adapt.kernels.masks import MaskInputs, MaskSpec

BATCH, HEADS, KV_HEADS, HEAD_DIM = 1, 8, 4, 128
CASES = (('causal window 512', 4096, 512), ('global causal', 4096, None),
         ('causal window 512', 2048, 512), ('global causal', 2048, None))


def attention_fn(impl: str, length: int, window):
  """(query, key, value) -> output of `impl` over one packed-free batch."""
  positions = jnp.arange(length)[None].repeat(BATCH, 0)
  segments = jnp.ones((BATCH, length), jnp.int32)
  mask = MaskInputs(positions, positions, segments, segments)
  spec = MaskSpec(causal=True, window=window, index_ordered=True)
  fn = dense_attention if impl == 'dense' else blocked.blocked_attention

  def attend(query, key, value):
    return fn(query, key, value, mask, spec, scale=HEAD_DIM**-0.5,
              logit_softcap=50.0)
  return attend


def temp_bytes(impl: str, length: int, window, backward: bool) -> int:
  """Compiled temp bytes of the forward (or forward + backward) pass."""
  attend = attention_fn(impl, length, window)
  if backward:
    fn = jax.grad(lambda *qkv: jnp.sum(attend(*qkv)), argnums=(0, 1, 2))
  else:
    fn = attend
  shapes = (jax.ShapeDtypeStruct((BATCH, length, HEADS, HEAD_DIM),
                                 jnp.float32),
            jax.ShapeDtypeStruct((BATCH, length, KV_HEADS, HEAD_DIM),
                                 jnp.float32),
            jax.ShapeDtypeStruct((BATCH, length, KV_HEADS, HEAD_DIM),
                                 jnp.float32))
  compiled = jax.jit(fn).lower(*shapes).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def mib(size: int) -> str:
  return f'{size / 2**20:,.1f}'


def main():
  parser = common.argument_parser(__doc__)
  parser.parse_args()
  print(f'batch {BATCH}, {HEADS} heads over {KV_HEADS} kv heads, head_dim '
        f'{HEAD_DIM}, float32, tiles {blocked.DEFAULT_BLOCK_Q} x '
        f'{blocked.DEFAULT_BLOCK_KV}; XLA temp MiB on '
        f'{jax.default_backend()}\n')
  print('| mask | tokens | pass | dense | blocked | dense / blocked | '
        'tiles visited |')
  print('|---|---:|---|---:|---:|---:|---:|')
  for name, length, window in CASES:
    spec = MaskSpec(causal=True, window=window, index_ordered=True)
    block = min(blocked.DEFAULT_BLOCK_Q, length)
    visited = len(blocked.tile_pairs(spec, False, length, length, block,
                                     block)[0])
    tiles = blocked.num_tiles(length, block) ** 2
    for backward in (False, True):
      sizes = {}
      for impl in ('dense', 'blocked'):
        common.log(f'compiling {impl} {name} {length} '
                   f'{"fwd+bwd" if backward else "fwd"}')
        sizes[impl] = temp_bytes(impl, length, window, backward)
      factor = sizes['dense'] / max(sizes['blocked'], 1)
      print(f'| {name} | {length} | {"fwd+bwd" if backward else "fwd"} | '
            f'{mib(sizes["dense"])} | {mib(sizes["blocked"])} | '
            f'{factor:.1f}x | {visited} / {tiles} |', flush=True)


if __name__ == '__main__':
  main()

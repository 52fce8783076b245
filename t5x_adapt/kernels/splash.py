"""Pallas TPU splash attention behind `attention.dot_product_attention`.

Splash masks are static and index-based (`splash_attention_mask`), plus
dynamic segment ids (equal ids attend). `MaskSpec` maps onto them as

  causal                    CausalMask
  causal window W           LocalMask(window_size=(W - 1, 0))
  two-sided window W        LocalMask(window_size=(W - 1, W - 1))
  lopsided window W, A      LocalMask(window_size=(W - 1, A - 1))
  bidirectional             FullMask
  padding / packing         SegmentIds (padding is segment 0)

which equals the position-based mask only when positions advance with the
index inside every segment (`MaskSpec.index_ordered`). So splash serves
training / prefill self-attention, and cross-attention (FullMask + segment
ids, where positions do not matter). A causal or windowed mask that is not
index-ordered (a decoding cache) raises a ValueError naming mask and kernel:
decoding uses `dense` or `blocked`; nothing falls back silently.

Padding: splash lets a padding query (segment 0) see padding keys, where the
reference masks every key of a padding query; real queries never see
padding keys either way (their ids differ), and a padding query always sees
itself, so its (unread) output stays finite.

Prefix-LM (causal plus `prefix tokens see the whole prefix`, the prefix at
the start of each segment) is composed from two kernel calls, selected per
query:
  * non-prefix queries: the causal (windowed) mask is already exact, every
    prefix key of their segment lies before them;
  * prefix queries: a bidirectional (two-sided window) pass whose segment ids
    are remapped so that prefix queries see exactly the prefix keys of their
    segment (non-prefix tokens get ids -id - 1, which no prefix id equals;
    they see each other there, and that output is discarded).
That costs one extra bidirectional pass per prefix-LM layer.

GQA runs natively: `make_splash_mha` reads kv head h // (n / k) for query
head h, as the reference does. Lengths are padded up to a multiple of 128
(padded tokens get a segment id no real token has); block sizes are the
largest of 512 / 256 / 128 dividing the padded lengths.

Mosaic kernels are not partitioned by XLA, so under a mesh the call runs in
`jax.shard_map`: the batch and heads are split as the logical axis rules
(flax's, or `partitioning.DEFAULT_RULES`) map `batch` and `heads`; kv heads
follow the query heads' mesh axes when they divide evenly, otherwise (fewer
kv heads than tensor shards) every shard slices the one kv head its query
heads read. The sequence is never split. Without a mesh the kernel is
called directly. On a platform other than TPU (CPU tests) the kernels run in
Pallas interpret mode; the platform is the mesh's devices' when a mesh is
set (ahead-of-time compilation for a TPU topology from a CPU host), else the
default backend's.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_kernel as splash_kernel)
from jax.experimental.pallas.ops.tpu.splash_attention import (
    splash_attention_mask as splash_mask)
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from t5x_adapt.kernels.masks import MaskInputs, MaskSpec
from t5x_adapt.kernels.platform import current_mesh, target_platform

# Kernel tiles are multiples of the TPU lane width.
MIN_BLOCK = 128
DEFAULT_MAX_BLOCK = 512
# Segment id of the tokens padding a length up to a block multiple: real
# tokens have ids >= 0 (0: padding) and remapped prefix-pass ids are < -1
# for real segments, so these see only padding.
_LENGTH_PAD_SEGMENT = -1


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static description of one splash call (hashable, closed over)."""

  kind: str  # 'causal', 'local' or 'full'
  window: Optional[tuple[int, int]]  # LocalMask window_size
  prefix: bool  # compose the prefix-LM pass
  prefix_window: Optional[int]  # two-sided window of the prefix pass
  softcap: Optional[float]
  max_block: int
  interpret: bool


def _mask_kind(spec: MaskSpec, q_len: int,
               kv_len: int) -> tuple[str, Optional[tuple[int, int]]]:
  """The splash mask class (and LocalMask window) `spec` stands for."""
  if not spec.index_ordered:
    # (Prefix flags only widen causal masks, so a bidirectional one is
    # exact over any positions.)
    if spec.causal or spec.window is not None:
      raise ValueError(
          f'splash attention cannot serve a {spec.describe()} mask that is '
          'not index-ordered (a decoding cache, or a sequence laid out out '
          "of order such as the distillation teacher's): splash masks are "
          "index-based. Use attention_impl='dense' or 'blocked' for decoding,"
          " or 'auto', which picks blocked there.")
    return 'full', None
  if q_len != kv_len:
    raise ValueError(f'splash attention: an index-ordered ({spec.describe()})'
                     f' mask needs as many queries as keys, got {q_len} and '
                     f'{kv_len}')
  window = spec.window
  if spec.causal:
    if window is None:
      return 'causal', None
    return 'local', (window - 1, 0)
  if window is None:
    return 'full', None
  return 'local', (window - 1, spec.ahead - 1)


def _static_mask(kind: str, window: Optional[tuple[int, int]], q_len: int,
                 kv_len: int) -> splash_mask.Mask:
  shape = (q_len, kv_len)
  if kind == 'causal':
    return splash_mask.CausalMask(shape)
  if kind == 'local':
    return splash_mask.LocalMask(shape, window_size=window, offset=0)
  return splash_mask.FullMask(shape)


def _block(length: int, max_block: int) -> int:
  """The largest power-of-two multiple of MIN_BLOCK <= max_block dividing
  `length` (a multiple of MIN_BLOCK)."""
  block = MIN_BLOCK
  while block * 2 <= max_block and length % (block * 2) == 0:
    block *= 2
  return block


def _block_sizes(q_len: int, kv_len: int,
                 max_block: int) -> splash_kernel.BlockSizes:
  bq, bkv = _block(q_len, max_block), _block(kv_len, max_block)
  return splash_kernel.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv,
      block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
      block_q_dq=bq, block_kv_dq=bkv)


def _make_kernel(kind: str, window: Optional[tuple[int, int]], heads: int,
                 q_len: int, kv_len: int, cfg: _Config):
  """A splash MHA kernel over [heads, q_len, h] queries (GQA natively)."""
  head_mask = _static_mask(kind, window, q_len, kv_len)
  return splash_kernel.make_splash_mha(
      splash_mask.MultiHeadMask([head_mask] * heads),
      block_sizes=_block_sizes(q_len, kv_len, cfg.max_block),
      attn_logits_soft_cap=cfg.softcap, head_shards=1, q_seq_shards=1,
      interpret=cfg.interpret)


def _pad_to(x: jax.Array, axis: int, length: int, value) -> jax.Array:
  if x.shape[axis] == length:
    return x
  pads = [(0, 0)] * x.ndim
  pads[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, pads, constant_values=value)


def _round_up(length: int) -> int:
  return -(-length // MIN_BLOCK) * MIN_BLOCK


def _local_attention(cfg: _Config, query: jax.Array, key: jax.Array,
                     value: jax.Array, q_seg: jax.Array, kv_seg: jax.Array,
                     q_prefix: Optional[jax.Array] = None,
                     kv_prefix: Optional[jax.Array] = None) -> jax.Array:
  """Splash over one device's shard, in the entry point's layout.

  Args:
    cfg: Static mask and kernel settings.
    query: [b, t, n, h], already scaled.
    key: [b, s, k, h].
    value: [b, s, k, h].
    q_seg: [b, t] int32 segment ids.
    kv_seg: [b, s] int32 segment ids.
    q_prefix: Optional [b, t] bool prefix flags (cfg.prefix).
    kv_prefix: Optional [b, s] bool prefix flags.

  Returns:
    [b, t, n, h].
  """
  q_len, kv_len, heads = query.shape[1], key.shape[1], query.shape[2]
  q_pad, kv_pad = _round_up(q_len), _round_up(kv_len)
  # Splash wants [heads, seq, head_dim] per example.
  q = _pad_to(query, 1, q_pad, 0).transpose(0, 2, 1, 3)
  k = _pad_to(key, 1, kv_pad, 0).transpose(0, 2, 1, 3)
  v = _pad_to(value, 1, kv_pad, 0).transpose(0, 2, 1, 3)
  q_seg = _pad_to(q_seg, 1, q_pad, _LENGTH_PAD_SEGMENT)
  kv_seg = _pad_to(kv_seg, 1, kv_pad, _LENGTH_PAD_SEGMENT)

  def run(kind, window, q_ids, kv_ids):
    kernel = _make_kernel(kind, window, heads, q_pad, kv_pad, cfg)
    per_example = lambda *a: kernel(*a[:3], splash_kernel.SegmentIds(*a[3:]))
    return jax.vmap(per_example)(q, k, v, q_ids, kv_ids)  # [b, n, t, h]

  out = run(cfg.kind, cfg.window, q_seg, kv_seg)
  if cfg.prefix:
    q_prefix = _pad_to(q_prefix, 1, q_pad, False)
    kv_prefix = _pad_to(kv_prefix, 1, kv_pad, False)
    # Prefix queries see the prefix keys of their segment; everything else
    # moves to ids -id - 1 (< 0), which no prefix id (>= 0) equals.
    q_ids = jnp.where(q_prefix, q_seg, -q_seg - 1)
    kv_ids = jnp.where(kv_prefix, kv_seg, -kv_seg - 1)
    w = cfg.prefix_window
    prefix_out = run('full' if w is None else 'local',
                     None if w is None else (w - 1, w - 1), q_ids, kv_ids)
    out = jnp.where(q_prefix[:, None, :, None], prefix_out, out)
  return out.transpose(0, 2, 1, 3)[:, :q_len]


def _rules() -> Sequence[tuple[str, object]]:
  rules = nn.get_logical_axis_rules()
  if rules:
    return rules
  from t5x_adapt import partitioning  # pylint: disable=g-import-not-at-top
  return partitioning.DEFAULT_RULES


def _mesh_axes(logical: str, usable: dict[str, int], size: int) -> tuple:
  """Mesh axes the rules give `logical`, kept only while they divide `size`
  (shard_map needs even shards; an indivisible axis is replicated)."""
  axes = nn.logical_to_mesh_axes((logical,), _rules())[0]
  if axes is None:
    return ()
  kept = []
  for axis in (axes,) if isinstance(axes, str) else tuple(axes):
    if axis in usable and size % (math.prod(usable[a] for a in kept)
                                  * usable[axis]) == 0:
      kept.append(axis)
  return tuple(kept)


def _spec_entry(axes: tuple):
  return axes if axes else None


def _sharded(cfg: _Config, mesh, query, key, value, q_seg, kv_seg, prefix):
  """`_local_attention` under shard_map over `mesh` (or direct)."""
  manual = getattr(mesh, 'manual_axes', ())
  # Mosaic needs every axis manual, size-1 ones included.
  usable = {} if mesh is None else {
      name: size for name, size in mesh.shape.items() if name not in manual}
  args = (query, key, value, q_seg, kv_seg) + prefix
  if math.prod(usable.values()) == 1:
    return _local_attention(cfg, *args)
  batch, heads, kv_heads = query.shape[0], query.shape[2], key.shape[2]
  batch_axes = _mesh_axes('batch', usable, batch)
  head_axes = _mesh_axes('heads', usable, heads)
  head_shards = math.prod(usable[a] for a in head_axes)
  if kv_heads % head_shards == 0:
    kv_axes, slice_kv = head_axes, False
  elif head_shards % kv_heads == 0:
    # Fewer kv heads than head shards: each shard's query heads read one kv
    # head, which it slices from a replicated key / value.
    kv_axes, slice_kv = (), True
  else:
    head_axes, kv_axes, slice_kv = (), (), False
  b, h, kvh = (_spec_entry(batch_axes), _spec_entry(head_axes),
               _spec_entry(kv_axes))
  in_specs = (PartitionSpec(b, None, h, None),
              PartitionSpec(b, None, kvh, None),
              PartitionSpec(b, None, kvh, None),
              PartitionSpec(b, None), PartitionSpec(b, None))
  in_specs += (PartitionSpec(b, None),) * len(prefix)

  def body(q, k, v, *rest):
    if slice_kv:
      index = jax.lax.axis_index(head_axes) * kv_heads // head_shards
      k = jax.lax.dynamic_slice_in_dim(k, index, 1, axis=2)
      v = jax.lax.dynamic_slice_in_dim(v, index, 1, axis=2)
    return _local_attention(cfg, q, k, v, *rest)

  return jax.shard_map(
      body, mesh=mesh, in_specs=in_specs, out_specs=in_specs[0],
      axis_names=frozenset(usable), check_vma=False)(*args)


def splash_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     mask: MaskInputs, spec: MaskSpec, *, scale: float,
                     logit_softcap: Optional[float] = None,
                     interpret: Optional[bool] = None,
                     max_block: int = DEFAULT_MAX_BLOCK) -> jax.Array:
  """Splash attention with the entry point's signature (see module doc).

  Args:
    query: [b, t, n, h].
    key: [b, s, k, h].
    value: [b, s, k, h].
    mask: Positions (unused: splash masks are index-based), segment ids,
      prefix flags.
    spec: Causality, window, index order.
    scale: Multiplies the raw scores (folded into the query: splash does
      not scale).
    logit_softcap: Softcap of the scaled scores.
    interpret: Pallas interpret mode; default: off on TPU only.
    max_block: Largest kernel tile (a power-of-two multiple of 128).

  Returns:
    [b, t, n, h] in the query's dtype.

  Raises:
    ValueError: for a causal or windowed mask that is not index-ordered.
  """
  kind, window = _mask_kind(spec, query.shape[1], key.shape[1])
  prefix = spec.causal and mask.has_prefix
  mesh = current_mesh()
  if interpret is None:
    interpret = target_platform(mesh) != 'tpu'
  cfg = _Config(kind=kind, window=window, prefix=prefix,
                prefix_window=spec.window, softcap=logit_softcap,
                max_block=max_block, interpret=bool(interpret))
  query = query * jnp.asarray(scale, query.dtype)
  q_seg = mask.query_segment_ids.astype(jnp.int32)
  kv_seg = mask.key_segment_ids.astype(jnp.int32)
  flags = (mask.query_prefix.astype(bool),
           mask.key_prefix.astype(bool)) if prefix else ()
  return _sharded(cfg, mesh, query, key, value, q_seg, kv_seg, flags)

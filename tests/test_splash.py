"""Splash (TPU) and cuDNN (GPU) attention against the dense reference.

* Splash runs its real Pallas kernels in interpret mode on the CPU: outputs
  and gradients (query, key, value) must match `dense_attention` within
  RTOL relative in float32, on the rows of real tokens, for every mask the
  models use, GQA, softcap, packing with padding, prefix-LM (two composed
  kernel calls), cross-attention and lengths that are not a block multiple;
  and the same under shard_map on a 4-device CPU mesh (a subprocess).
* Splash compiles ahead of time for a v5p 2x2x1 TPU topology (libtpu, no
  TPU needed) for Gemma 2 / Gemma 3 style layers, packed and prefix-LM
  batches, forward and gradient, sharded over a mesh: the program must
  contain the Mosaic custom calls.
* cuDNN's argument mapping runs through JAX's XLA path of
  `jax.nn.dot_product_attention` (`implementation=None`) against dense; its
  unsupported softcap and float32 raise.
"""

import os
import subprocess
import sys
import time

import jax
from jax.experimental import topologies
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from t5x_adapt.kernels import cudnn
from t5x_adapt.kernels import splash
from t5x_adapt.kernels.attention import dense_attention
from t5x_adapt.kernels.masks import MaskInputs, MaskSpec
from t5x_adapt.partitioning import Partitioner

RTOL = 1e-5  # max |kernel - dense| / max |dense|, float32
BATCH, LENGTH, HEADS, KV_HEADS, HEAD_DIM = 2, 256, 4, 2, 128
SCALE = HEAD_DIM**-0.5


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual), np.asarray(expected)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def packed_batch(length: int = LENGTH, prefix: bool = False) -> MaskInputs:
  """Row 0: segments of 100 and 120 tokens, then padding; row 1: one
  sequence. Prefix flags mark the start of each segment."""
  seg = np.zeros((BATCH, length), np.int32)
  pos = np.zeros((BATCH, length), np.int32)
  flags = np.zeros((BATCH, length), bool)
  bounds = [(0, 0, 100, 30), (0, 100, min(220, length - 8), 10),
            (1, 0, length, 77)]
  for i, (row, start, stop, prefix_len) in enumerate(bounds):
    seg[row, start:stop] = 1 + i % 2
    pos[row, start:stop] = np.arange(stop - start)
    flags[row, start:start + prefix_len] = True
  as_jnp = lambda x: jnp.asarray(x)
  return MaskInputs(as_jnp(pos), as_jnp(pos), as_jnp(seg), as_jnp(seg),
                    as_jnp(flags) if prefix else None,
                    as_jnp(flags) if prefix else None)


def qkv(q_len: int, kv_len: int, q_gain: float = 1.0):
  keys = jax.random.split(jax.random.key(0), 3)
  query = q_gain * jax.random.normal(keys[0], (BATCH, q_len, HEADS, HEAD_DIM))
  key = jax.random.normal(keys[1], (BATCH, kv_len, KV_HEADS, HEAD_DIM))
  value = jax.random.normal(keys[2], (BATCH, kv_len, KV_HEADS, HEAD_DIM))
  return query, key, value


def outputs_and_grads(attend, query, key, value, real_rows):
  """Output and d(sum(out * w))/d(q, k, v), w zero on padding queries
  (whose outputs nothing reads and implementations may differ on)."""
  weights = jax.random.normal(jax.random.key(1), query.shape)
  weights = weights * real_rows[:, :, None, None]

  def loss(q, k, v):
    out = attend(q, k, v)
    return jnp.sum(out * weights), out

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, out), grads = grad_fn(query, key, value)
  return out, grads


def assert_matches_dense(kernel, mask, spec, q_len=LENGTH, kv_len=LENGTH,
                         softcap=None, q_gain=1.0):
  query, key, value = qkv(q_len, kv_len, q_gain)
  real = np.asarray(mask.query_segment_ids) > 0

  def run(fn, **kwargs):
    return outputs_and_grads(
        lambda q, k, v: fn(q, k, v, mask, spec, scale=SCALE,
                           logit_softcap=softcap, **kwargs),
        query, key, value, real)

  out, grads = run(kernel)
  ref_out, ref_grads = run(dense_attention)
  assert np.isfinite(np.asarray(out)).all()
  rows = real[:, :, None, None]
  errors = [relative_error(np.where(rows, out, 0), np.where(rows, ref_out, 0))]
  errors += [relative_error(g, r) for g, r in zip(grads, ref_grads)]
  assert max(errors) < RTOL, errors
  print(f'max relative error out/dq/dk/dv: {max(errors):.2e}')


def splash_128(*args, **kwargs):
  # Tiles of 128 make the 256 tokens span two tiles per side.
  return splash.splash_attention(*args, max_block=128, **kwargs)


# -- splash, interpret mode on CPU ---------------------------------------------


@pytest.mark.parametrize('causal,window,packed,ahead', [
    (True, None, False, None),  # decoder, GQA 4 / 2
    (True, 64, True, None),  # causal sliding window, packed
    (False, 64, True, None),  # encoder local layer, two-sided
    (False, 32, True, 33),  # T5Gemma 2's encoder: window 64 split
    (False, None, True, None),  # encoder global layer
])
def test_splash_matches_dense(causal, window, packed, ahead):
  mask = packed_batch()
  if not packed:
    ones = jnp.ones((BATCH, LENGTH), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))
    mask = MaskInputs(positions, positions, ones, ones)
  assert_matches_dense(splash_128, mask,
                       MaskSpec(causal, window, index_ordered=True,
                                window_ahead=ahead))


def test_splash_softcap():
  # Scores of ~+-100 so that the softcap of 50 bends them.
  assert_matches_dense(splash_128, packed_batch(),
                       MaskSpec(True, None, index_ordered=True),
                       softcap=50.0, q_gain=8.0)


@pytest.mark.parametrize('window', [None, 64])
def test_splash_prefix_lm(window):
  assert_matches_dense(splash_128, packed_batch(prefix=True),
                       MaskSpec(True, window, index_ordered=True))


def test_splash_cross_attention():
  """Not index-ordered but bidirectional: FullMask + segment ids, with fewer
  queries than keys (decoder over encoder)."""
  enc, dec = packed_batch(), packed_batch(length=128)
  mask = MaskInputs(dec.query_positions, enc.key_positions,
                    dec.query_segment_ids, enc.key_segment_ids)
  assert_matches_dense(splash_128, mask, MaskSpec(False), q_len=128)


@pytest.mark.slow
def test_splash_length_not_a_block_multiple():
  """200 tokens are padded up to 256 inside the kernel call."""
  assert_matches_dense(splash.splash_attention, packed_batch(200),
                       MaskSpec(True, 64, index_ordered=True),
                       q_len=200, kv_len=200)


def test_splash_rejects_a_decoding_cache():
  query, key, value = qkv(128, 256)
  mask = packed_batch()
  mask = mask._replace(query_positions=mask.query_positions[:, :128],
                       query_segment_ids=mask.query_segment_ids[:, :128])
  with pytest.raises(ValueError, match='splash.*causal window 64.*decoding'):
    splash.splash_attention(query, key, value, mask,
                            MaskSpec(True, 64, index_ordered=False),
                            scale=SCALE)


_SHARDED_SCRIPT = r'''
import sys
import jax, jax.numpy as jnp
import t5x_adapt.layers
from jax.sharding import PartitionSpec as P
from t5x_adapt.kernels import splash
from t5x_adapt.kernels.attention import dense_attention
from t5x_adapt.kernels.masks import MaskInputs, MaskSpec
from t5x_adapt.partitioning import Partitioner
assert jax.device_count() == 4, jax.devices()
part = Partitioner(data=1, fsdp=2, tensor=2)
b, t, n, h, kv_heads = 2, 256, 4, 128, int(sys.argv[1])
keys = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(keys[0], (b, t, n, h))
k, v = (jax.random.normal(x, (b, t, kv_heads, h)) for x in keys[1:3])
pos = jnp.tile(jnp.arange(t), (b, 1))
seg = jnp.ones((b, t), jnp.int32).at[0, 200:].set(0)
w = jax.random.normal(keys[3], (b, t, n, h)) * (seg > 0)[:, :, None, None]
mask = MaskInputs(pos, pos, seg, seg, pos < 50, pos < 50)
spec = MaskSpec(True, 64, index_ordered=True)
shardings = (part.sharding(P('batch', 'length', 'heads', 'head_dim')),
             *[part.sharding(P('batch', 'length', 'kv_heads', 'head_dim'))] * 2)
grads = []
for fn in (splash.splash_attention, dense_attention):
  loss = lambda q, k, v, fn=fn: jnp.sum(
      fn(q, k, v, mask, spec, scale=h**-0.5) * w)
  grad = jax.grad(loss, argnums=(0, 1, 2))
  grads.append(part.jit(grad, shardings, None)(q, k, v))
for got, want in zip(*grads):
  err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
  assert err < 1e-5, (kv_heads, err)
print('OK')
'''


@pytest.mark.parametrize(
    'kv_heads', [1, pytest.param(2, marks=pytest.mark.slow)])
def test_splash_under_shard_map_on_four_cpu_devices(kv_heads):
  """Batch over fsdp, heads over tensor (prefix-LM, causal window 64): one
  kv head sliced per shard, or kv heads split like the query heads;
  gradients equal dense's."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=4')
  result = subprocess.run([sys.executable, '-c', _SHARDED_SCRIPT,
                           str(kv_heads)], env=env,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-3000:]


# -- splash, compiled for a TPU topology -------------------------------------


@pytest.fixture(scope='module')
def tpu_partitioner():
  """A (data 1, fsdp 4, tensor 1) partitioner over v5p 2x2x1's 4 chips."""
  pytest.importorskip('libtpu')
  # Other processes on this host may hold libtpu (its lockfile).
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    topology = topologies.get_topology_desc(
        platform='tpu', topology_name='v5p:2x2x1',
        chips_per_host_bounds=(2, 2, 1), num_slices=1)
  except Exception as e:  # pylint: disable=broad-except
    pytest.skip(f'no TPU topology from libtpu: {e}')
  return lambda data, fsdp, tensor: Partitioner(
      data, fsdp, tensor, devices=topology.devices)


def compile_for_tpu(make_partitioner, mesh, spec, *, length, heads,
                    kv_heads, head_dim, softcap=None, prefix=False,
                    batch=4):
  """Compiles the value and gradient of a splash layer; returns the compiled
  program's text, memory analysis and compile seconds."""
  part = make_partitioner(*mesh)
  q_sharding = part.sharding(P('batch', 'length', 'heads', 'head_dim'))
  kv_sharding = part.sharding(P('batch', 'length', 'kv_heads', 'head_dim'))
  row_sharding = part.sharding(P('batch', 'length'))

  def loss(query, key, value, positions, segment_ids, flags):
    mask = MaskInputs(positions, positions, segment_ids, segment_ids,
                      flags if prefix else None, flags if prefix else None)
    out = splash.splash_attention(query, key, value, mask, spec,
                                  scale=head_dim**-0.5,
                                  logit_softcap=softcap)
    return jnp.sum(out.astype(jnp.float32))

  shardings = (q_sharding, kv_sharding, kv_sharding) + (row_sharding,) * 3
  shapes = [(batch, length, heads, head_dim)]
  shapes += [(batch, length, kv_heads, head_dim)] * 2 + [(batch, length)] * 3
  dtypes = [jnp.bfloat16] * 3 + [jnp.int32, jnp.int32, jnp.bool_]
  args = [jax.ShapeDtypeStruct(s, d, sharding=sh)
          for s, d, sh in zip(shapes, dtypes, shardings)]
  step = jax.value_and_grad(loss, argnums=(0, 1, 2))
  start = time.time()
  compiled = part.jit(step, shardings,
                      (part.replicated, shardings[:3])).lower(*args).compile()
  return compiled.as_text(), compiled.memory_analysis(), time.time() - start


TPU_CASES = {
    # Gemma 3 (1B-like): 4 q heads, 1 kv head, head_dim 256, 5:1 local.
    'gemma3_local': dict(mesh=(1, 4, 1), spec=MaskSpec(True, 512, True),
                         length=1024, heads=4, kv_heads=1, head_dim=256),
    'gemma3_global': dict(mesh=(1, 2, 2), spec=MaskSpec(True, None, True),
                          length=1024, heads=4, kv_heads=1, head_dim=256),
    # Gemma 2 (2B-like): softcap 50, window 4096 at 8192 tokens.
    'gemma2_local': dict(mesh=(1, 1, 4), spec=MaskSpec(True, 4096, True),
                         length=8192, heads=8, kv_heads=4, head_dim=256,
                         softcap=50.0, batch=1),
    'encoder_local_packed': dict(mesh=(1, 4, 1),
                                 spec=MaskSpec(False, 512, True),
                                 length=1024, heads=8, kv_heads=4,
                                 head_dim=256),
    'prefix_lm': dict(mesh=(1, 2, 2), spec=MaskSpec(True, None, True),
                      length=1024, heads=8, kv_heads=4, head_dim=256,
                      softcap=50.0, prefix=True),
}
SLOW_TPU_CASES = {'gemma2_local', 'encoder_local_packed'}


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=pytest.mark.slow) if n in SLOW_TPU_CASES else n
    for n in TPU_CASES])
def test_splash_compiles_for_tpu(tpu_partitioner, name):
  text, memory, seconds = compile_for_tpu(tpu_partitioner, **TPU_CASES[name])
  assert memory is not None
  # Forward, dq and dkv kernels (twice each for prefix-LM).
  calls = text.count('custom_call_target="tpu_custom_call"')
  assert calls == (6 if TPU_CASES[name].get('prefix') else 3), calls
  print(f'{name}: compiled in {seconds:.1f} s, '
        f'temp {memory.temp_size_in_bytes / 2**20:.0f} MiB')


# -- cuDNN's argument mapping, XLA path on CPU ---------------------------------


def cudnn_xla(*args, **kwargs):
  return cudnn.cudnn_attention(*args, implementation=None, **kwargs)


@pytest.mark.parametrize('spec,prefix', [
    (MaskSpec(True, None, True), False),
    (MaskSpec(True, 64, True), False),
    (MaskSpec(False, 64, True), False),
    (MaskSpec(False, None, True), False),
    (MaskSpec(True, 64, True), True),
    (MaskSpec(True, 64, False), False),  # a decoding cache: all in the mask
])
def test_cudnn_mapping_matches_dense(spec, prefix):
  assert_matches_dense(cudnn_xla, packed_batch(prefix=prefix), spec)


def test_cudnn_rejects_softcap_and_float32():
  query, key, value = qkv(LENGTH, LENGTH)
  spec = MaskSpec(True, None, True)
  with pytest.raises(ValueError, match='cudnn.*softcap'):
    cudnn_xla(query, key, value, packed_batch(), spec, scale=SCALE,
              logit_softcap=50.0)
  with pytest.raises(ValueError, match='cudnn.*bfloat16.*float32'):
    cudnn.cudnn_attention(query, key, value, packed_batch(), spec,
                          scale=SCALE)

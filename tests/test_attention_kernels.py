"""The blocked attention kernel against the dense reference.

`blocked_attention` must compute the function of `dense_attention`: outputs
and gradients (w.r.t. query, key and value) within 1e-5 relative, in float32,
for every mask of `kernels.masks`, GQA / MQA, softcap, packing, prefix-LM,
decoding caches and cross-attention, on the rows that see at least one key
(the dense reference gives a row that sees nothing the mean of the values, the
kernel zeros). Tiles of 8 or 16 make tiny shapes span several tiles, with
lengths that are not a multiple of the tile and windows shorter and longer
than one. The models then decode with `attention_impl='blocked'` (tiles of
4) and must give dense's tokens and logits (the encoder-decoder's test is
marked slow).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_adapt import gin_utils
from t5x_adapt.kernels import attention as attention_lib
from t5x_adapt.kernels import blocked
from t5x_adapt.kernels.attention import dense_attention
from t5x_adapt.kernels.attention import dot_product_attention
from t5x_adapt.kernels.masks import MaskInputs, MaskSpec, dense_mask

RTOL = 1e-5  # max |blocked - dense| / max |dense|
SCALE = 0.25


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual), np.asarray(expected)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


# -- inputs ------------------------------------------------------------------


def packed_rows(rng, batch: int, length: int, prefix: bool):
  """Positions, segment ids and prefix flags of packed, padded rows.

  Row r holds 3 segments of random lengths, positions restarting at 0 in
  each, then 0 to 6 padding tokens (segment 0). With `prefix`, each segment
  starts with a random number (0 to all) of prefix tokens, as seqio's
  `decoder_causal_attention`.
  """
  positions = np.zeros((batch, length), np.int32)
  segments = np.zeros((batch, length), np.int32)
  flags = np.zeros((batch, length), bool)
  for r in range(batch):
    used = length - rng.randint(0, 7)
    cuts = np.sort(rng.choice(np.arange(1, used), 2, replace=False))
    for seg, (start, stop) in enumerate(zip([0, *cuts], [*cuts, used])):
      positions[r, start:stop] = np.arange(stop - start)
      segments[r, start:stop] = seg + 1
      flags[r, start:start + rng.randint(0, stop - start + 1)] = True
  prefix_flags = jnp.asarray(flags) if prefix else None
  return (jnp.asarray(positions), jnp.asarray(segments), prefix_flags)


def self_attention_mask(rng, batch, length, rows: str) -> MaskInputs:
  """'plain' (one segment per row), 'packed', or 'prefix' (packed + flags)."""
  if rows == 'plain':
    positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
    segments = jnp.ones((batch, length), jnp.int32)
    return MaskInputs(positions, positions, segments, segments)
  positions, segments, flags = packed_rows(rng, batch, length,
                                           rows == 'prefix')
  return MaskInputs(positions, positions, segments, segments, flags, flags)


def qkv(rng, batch, q_len, kv_len, heads, kv_heads, head_dim=8):
  draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return (draw(batch, q_len, heads, head_dim),
          draw(batch, kv_len, kv_heads, head_dim),
          draw(batch, kv_len, kv_heads, head_dim))


# -- the comparison ----------------------------------------------------------


def output_and_grads(attention, query, key, value, cotangent):
  """Output and its VJP with `cotangent`: d(query, key, value)."""
  out, vjp = jax.vjp(attention, query, key, value)
  return out, vjp(cotangent)


def assert_blocked_matches_dense(query, key, value, mask, spec, *,
                                 logit_softcap=None, block_q=8, block_kv=8):
  """Blocked equals dense on the rows that see a key; returns the errors."""
  cotangent = jnp.asarray(
      np.random.RandomState(7).standard_normal(query.shape), jnp.float32)
  kwargs = dict(scale=SCALE, logit_softcap=logit_softcap)

  def dense(q, k, v):
    return dense_attention(q, k, v, mask, spec, **kwargs)

  def tiled(q, k, v):
    return blocked.blocked_attention(q, k, v, mask, spec, block_q=block_q,
                                     block_kv=block_kv, **kwargs)

  @jax.jit
  def both(query, key, value, cotangent):
    sees_a_key = dense_mask(mask, spec).any(axis=-1)[:, 0]  # [b, t]
    weights = sees_a_key[:, :, None, None].astype(jnp.float32)
    # Only the rows that see a key count (see the module doc).
    return weights, [output_and_grads(fn, query, key, value,
                                      cotangent * weights)
                     for fn in (dense, tiled)]

  weights, [(expected, expected_grads), (actual, actual_grads)] = both(
      query, key, value, cotangent)
  assert np.asarray(weights).any()
  names = ('d_query', 'd_key', 'd_value')
  for name, array in [('out', actual), *zip(names, actual_grads)]:
    assert np.isfinite(np.asarray(array)).all(), name
  errors = {'out': relative_error(actual * weights, expected * weights)}
  for name, a, e in zip(names, actual_grads, expected_grads):
    errors[name] = relative_error(a, e)
  print(errors)
  assert max(errors.values()) <= RTOL, errors
  return errors


# -- self-attention over a batch's own tokens --------------------------------

# (causal, window, rows, heads, kv_heads, softcap, length, block_q, block_kv,
#  index_ordered): windows shorter and longer than a tile, lengths that are
#  not a multiple of it, GQA, MQA and MHA; the last three visit every tile.
SELF_ATTENTION_CASES = [
    (True, None, 'packed', 4, 2, 50.0, 37, 8, 8, True),
    (False, None, 'packed', 4, 2, None, 37, 8, 16, True),
    (True, 5, 'packed', 4, 1, 50.0, 37, 8, 8, True),
    (True, 13, 'plain', 2, 2, 50.0, 37, 16, 8, True),
    (False, 5, 'packed', 4, 2, None, 37, 8, 8, True),
    (False, 13, 'packed', 4, 1, 50.0, 37, 8, 16, True),
    (True, None, 'prefix', 4, 2, 50.0, 37, 8, 8, True),
    (True, 5, 'prefix', 4, 2, None, 37, 8, 8, True),
    (True, 8, 'plain', 4, 2, None, 32, 8, 8, True),
    (True, 100, 'packed', 4, 1, 50.0, 37, 8, 8, True),
    (True, 5, 'packed', 4, 1, 50.0, 37, 8, 8, False),
    (False, None, 'packed', 4, 2, None, 37, 8, 16, False),
    (True, None, 'prefix', 4, 2, 50.0, 37, 8, 8, False),
]


def _case_id(case) -> str:
  causal, window, rows, heads, kv_heads, cap, length, bq, bkv, ordered = case
  return (f'{"causal" if causal else "bidir"}-window{window}-{rows}-'
          f'{heads}over{kv_heads}-cap{cap}-t{length}-tiles{bq}x{bkv}-'
          f'{"skipping" if ordered else "all_tiles"}')


@pytest.mark.parametrize(
    'causal,window,rows,heads,kv_heads,cap,length,block_q,block_kv,'
    'index_ordered', SELF_ATTENTION_CASES,
    ids=[_case_id(case) for case in SELF_ATTENTION_CASES])
def test_self_attention(causal, window, rows, heads, kv_heads, cap, length,
                        block_q, block_kv, index_ordered):
  rng = np.random.RandomState(length + heads + (window or 0))
  mask = self_attention_mask(rng, 2, length, rows)
  spec = MaskSpec(causal=causal, window=window, index_ordered=index_ordered)
  assert_blocked_matches_dense(*qkv(rng, 2, length, length, heads, kv_heads),
                               mask, spec, logit_softcap=cap,
                               block_q=block_q, block_kv=block_kv)


@pytest.mark.parametrize('window,ahead,ordered', [(3, 5, True), (5, 3, True),
                                                  (4, 5, False)])
def test_lopsided_window(window, ahead, ordered):
  """T5Gemma 2's encoder window: q - W < k < q + A, tiles skipped by it."""
  rng = np.random.RandomState(window * 10 + ahead)
  mask = self_attention_mask(rng, 2, 37, 'packed')
  spec = MaskSpec(causal=False, window=window, index_ordered=ordered,
                  window_ahead=ahead)
  assert_blocked_matches_dense(*qkv(rng, 2, 37, 37, 4, 2), mask, spec,
                               logit_softcap=None, block_q=4, block_kv=4)


# -- decoding caches and cross-attention (every tile) ------------------------


@pytest.mark.parametrize('new_tokens,window', [(1, None), (3, 5), (3, None)])
def test_decoding_cache(new_tokens, window):
  """Queries over a ring-buffer cache: slots out of order, some empty (-1)."""
  rng = np.random.RandomState(new_tokens)
  batch, slots = 2, 21
  slot_positions = np.stack([rng.permutation(slots) for _ in range(batch)])
  slot_positions[0, rng.choice(slots, 6, replace=False)] = -1
  key_positions = jnp.asarray(slot_positions, jnp.int32)
  key_segments = (key_positions >= 0).astype(jnp.int32)
  query_positions = jnp.asarray(
      np.stack([np.arange(new_tokens) + 10, np.arange(new_tokens) + 17]),
      jnp.int32)
  query_segments = jnp.ones_like(query_positions)
  mask = MaskInputs(query_positions, key_positions, query_segments,
                    key_segments)
  spec = MaskSpec(causal=True, window=window, index_ordered=False)
  assert_blocked_matches_dense(
      *qkv(rng, batch, new_tokens, slots, 4, 2), mask, spec,
      logit_softcap=50.0, block_q=8, block_kv=8)


def test_cross_attention():
  """Decoder queries over padded encoder keys: bidirectional, t != s."""
  rng = np.random.RandomState(3)
  batch, q_len, kv_len = 2, 10, 37
  query_positions = jnp.broadcast_to(jnp.arange(q_len), (batch, q_len))
  key_positions = jnp.broadcast_to(jnp.arange(kv_len), (batch, kv_len))
  key_segments = jnp.asarray(np.arange(kv_len)[None] < np.array([[37], [20]]),
                             jnp.int32)
  mask = MaskInputs(query_positions, key_positions,
                    jnp.ones((batch, q_len), jnp.int32), key_segments)
  spec = MaskSpec(causal=False)
  assert_blocked_matches_dense(*qkv(rng, batch, q_len, kv_len, 4, 1), mask,
                               spec, block_q=8, block_kv=16)


def test_rows_that_see_nothing_are_finite():
  """A padding row (and a whole padding batch row): zeros, finite grads."""
  rng = np.random.RandomState(4)
  mask = self_attention_mask(rng, 2, 20, 'packed')
  segments = mask.query_segment_ids.at[1].set(0)
  mask = mask._replace(query_segment_ids=segments, key_segment_ids=segments)
  spec = MaskSpec(causal=True, window=5, index_ordered=True)
  query, key, value = qkv(rng, 2, 20, 20, 4, 2)

  def loss(q, k, v):
    out = blocked.blocked_attention(q, k, v, mask, spec, scale=SCALE,
                                    logit_softcap=50.0, block_q=8,
                                    block_kv=8)
    return jnp.sum(out ** 2), out

  grads, out = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(
      query, key, value)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
  assert not np.asarray(grads[0][1]).any()


@pytest.mark.parametrize('dtype,rtol', [('float32', RTOL),
                                        ('bfloat16', 2e-2)])
def test_entry_point_dispatches_to_blocked(dtype, rtol):
  rng = np.random.RandomState(5)
  mask = self_attention_mask(rng, 1, 12, 'plain')
  spec = MaskSpec(causal=True, window=4, index_ordered=True)
  query, key, value = (x.astype(dtype) for x in qkv(rng, 1, 12, 12, 2, 1))
  kwargs = dict(scale=SCALE, logit_softcap=None)
  out, expected = jax.jit(lambda q, k, v: (
      dot_product_attention(q, k, v, mask, spec, impl='blocked', **kwargs),
      dense_attention(q, k, v, mask, spec, **kwargs)))(query, key, value)
  assert out.dtype == query.dtype
  assert relative_error(out.astype(jnp.float32),
                        expected.astype(jnp.float32)) <= rtol


# -- the static tile schedule ------------------------------------------------


def pair_count(spec, has_prefix=False, length=4096, block=512):
  q_tiles, _ = blocked.tile_pairs(spec, has_prefix, length, length, block,
                                  block)
  return len(q_tiles)


def test_tile_schedule_follows_the_visible_band():
  ordered = lambda causal, window=None: MaskSpec(causal, window, True)
  # 8 x 8 tiles of 512 at 4096 tokens.
  assert pair_count(ordered(True, 512)) == 8 + 7  # diagonal and one below
  assert pair_count(ordered(False, 512)) == 8 + 2 * 7
  assert pair_count(ordered(True)) == 8 * 9 // 2  # lower triangle
  assert pair_count(ordered(False)) == 64
  # Prefix keys may follow their queries: no causal skipping, the window
  # still skips.
  assert pair_count(ordered(True), has_prefix=True) == 64
  assert pair_count(ordered(True, 512), has_prefix=True) == 8 + 2 * 7
  # A decoding cache or cross-attention: every tile.
  assert pair_count(MaskSpec(True, 512)) == 64
  # Pairs come grouped by query tile, key tiles in order.
  q_tiles, kv_tiles = blocked.tile_pairs(ordered(True, 512), False, 4096,
                                         4096, 512, 512)
  assert list(q_tiles[:5]) == [0, 1, 1, 2, 2]
  assert list(kv_tiles[:5]) == [0, 0, 1, 1, 2]


@pytest.mark.parametrize('window,ahead', [(5, 9), (9, 5), (8, None)])
def test_tile_schedule_of_a_two_sided_window_is_the_visible_tiles(window,
                                                                   ahead):
  """Exactly the tiles holding a pair i - W < j < i + A (brute force)."""
  length, block = 64, 4
  spec = MaskSpec(False, window, True, window_ahead=ahead)
  i, j = np.meshgrid(np.arange(length), np.arange(length), indexing='ij')
  visible = (i - j < window) & (j - i < (ahead or window))
  tiles = visible.reshape(length // block, block, length // block,
                          block).any(axis=(1, 3))
  q_tiles, kv_tiles = blocked.tile_pairs(spec, False, length, length, block,
                                         block)
  np.testing.assert_array_equal(sorted(zip(q_tiles, kv_tiles)),
                                sorted(zip(*np.nonzero(tiles))))


# -- compiled memory ---------------------------------------------------------


def compiled_temp_bytes(attention, length, heads=8, kv_heads=4, head_dim=128):
  """Temp bytes of the compiled forward + backward of `attention`."""
  grad = jax.grad(lambda *qkv_: jnp.sum(attention(*qkv_)), argnums=(0, 1, 2))
  shape = lambda n: jax.ShapeDtypeStruct((1, length, n, head_dim),
                                         jnp.float32)
  compiled = jax.jit(grad).lower(shape(heads), shape(kv_heads),
                                 shape(kv_heads)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_memory_far_below_dense_at_4096_window_512():
  length = 4096
  positions = jnp.arange(length)[None]
  segments = jnp.ones((1, length), jnp.int32)
  mask = MaskInputs(positions, positions, segments, segments)
  spec = MaskSpec(causal=True, window=512, index_ordered=True)
  kwargs = dict(scale=SCALE, logit_softcap=50.0)
  dense_bytes = compiled_temp_bytes(
      lambda q, k, v: dense_attention(q, k, v, mask, spec, **kwargs), length)
  blocked_bytes = compiled_temp_bytes(
      lambda q, k, v: blocked.blocked_attention(q, k, v, mask, spec,
                                                **kwargs), length)
  print(f'fwd+bwd temp bytes at {length}, window 512: dense {dense_bytes:,}, '
        f'blocked {blocked_bytes:,} ({dense_bytes / blocked_bytes:.1f}x)')
  assert blocked_bytes * 4 <= dense_bytes


# -- the models, decoding with blocked attention -----------------------------

STEPS = 12  # generated tokens: more than the tiny presets' window of 8


def model_outputs(preset: str, impl: str) -> dict[str, np.ndarray]:
  """A tiny model's outputs with `impl` (tiles of 4: prompts are 12 wide).

  Returns:
    'tokens': predict_batch's greedy tokens [3, STEPS] of padded prompts
      (encoder inputs) of lengths 3, 12, 7;
    'cached': the cached decoding path's logits [3, STEPS, vocab] after the
      same prefill, fed random tokens;
    'logits': decoder-only only, uncached logits [2, 24, vocab] of packed
      rows with prefix-LM flags (the index-ordered path, tiles skipped);
    'real': [2, 24] the non-padding positions of those rows.
  """
  model = gin_utils.load_model(preset, attention_impl=impl)
  encdec = preset.startswith('t5')
  rng = np.random.RandomState(0)
  lengths = np.array([3, 12, 7])
  prompts = np.where(np.arange(12)[None] < lengths[:, None],
                     rng.randint(3, 512, (3, 12)), 0)
  prompts = {('encoder_input_tokens' if encdec else 'decoder_input_tokens'):
             jnp.asarray(prompts, jnp.int32)}
  forced = jnp.asarray(rng.randint(3, 512, (3, STEPS)), jnp.int32)
  shapes = {'decoder_input_tokens': (1, 8)}
  if encdec:
    shapes['encoder_input_tokens'] = (1, 8)
  params = model.get_initial_variables(jax.random.PRNGKey(1),
                                       shapes)['params']
  positions, segments, flags = packed_rows(rng, 2, 24, prefix=True)
  tokens = jnp.where(segments > 0, rng.randint(3, 512, (2, 24)), 0)
  packed = {'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens,
            'decoder_segment_ids': segments, 'decoder_positions': positions,
            'decoder_causal_attention': flags.astype(jnp.int32)}

  def run(params):
    outputs = {'tokens': model.predict_batch(params, prompts,
                                             max_decode_length=STEPS)}
    # The prefill of predict_batch, then its step fn, fed `forced`.
    prefill = model._prefill(  # pylint: disable=protected-access
        params, prompts, STEPS)

    def step(cache, inputs):
      token, k = inputs
      logits, cache = prefill.step(token[:, None],
                                   (prefill.next_positions + k)[:, None],
                                   cache)
      return cache, logits

    _, rest = jax.lax.scan(step, prefill.cache,
                           (forced[:, :-1].T, jnp.arange(STEPS - 1)))
    outputs['cached'] = jnp.concatenate(
        [prefill.first_logits[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)
    if not encdec:
      outputs['logits'] = model.compute_logits(params, packed)
    return outputs

  default_tiles = blocked.DEFAULT_BLOCK_Q, blocked.DEFAULT_BLOCK_KV
  blocked.DEFAULT_BLOCK_Q = blocked.DEFAULT_BLOCK_KV = 4
  try:
    outputs = jax.jit(run)(params)
  finally:
    blocked.DEFAULT_BLOCK_Q, blocked.DEFAULT_BLOCK_KV = default_tiles
  return {**{k: np.asarray(v) for k, v in outputs.items()},
          'real': np.asarray(segments) > 0}


@pytest.mark.parametrize('preset', [
    'gemma2_tiny',
    # ~40 s: compiles the encoder, and the decoder's self- and
    # cross-attention (their kernel paths are covered above).
    pytest.param('t5gemma_tiny', marks=pytest.mark.slow)])
def test_model_decoding_matches_dense(preset):
  actual = model_outputs(preset, 'blocked')
  expected = model_outputs(preset, 'dense')
  np.testing.assert_array_equal(actual['tokens'], expected['tokens'])
  assert len(set(expected['tokens'].ravel().tolist())) > 3  # not constant
  errors = {'cached': relative_error(actual['cached'], expected['cached'])}
  if 'logits' in expected:  # padding positions see nothing: left out
    real = expected['real']
    errors['logits'] = relative_error(actual['logits'][real],
                                      expected['logits'][real])
  print(errors)
  assert max(errors.values()) <= RTOL, errors


@pytest.mark.parametrize('platform, spec, length, softcap, dtype, expected', [
    ('tpu', MaskSpec(causal=True, window=512, index_ordered=True), 4096, 50.,
     jnp.bfloat16, 'splash'),
    ('tpu', MaskSpec(causal=False), 4096, None, jnp.bfloat16, 'splash'),
    ('tpu', MaskSpec(causal=True), 512, None, jnp.bfloat16, 'blocked'),
    ('tpu', MaskSpec(causal=True), 1, None, jnp.bfloat16, 'dense'),
    ('gpu', MaskSpec(causal=True, index_ordered=True), 4096, None,
     jnp.bfloat16, 'cudnn'),
    ('gpu', MaskSpec(causal=True, index_ordered=True), 4096, 50.,
     jnp.bfloat16, 'blocked'),
    ('gpu', MaskSpec(causal=True, index_ordered=True), 4096, None,
     jnp.float32, 'blocked'),
    ('cpu', MaskSpec(causal=True, index_ordered=True), 4096, None,
     jnp.float32, 'blocked'),
])
def test_auto_picks_a_kernel_that_runs_the_layer(platform, spec, length,
                                                 softcap, dtype, expected):
  assert attention_lib.resolve('auto', platform, spec=spec,
                               query_length=length, logit_softcap=softcap,
                               dtype=dtype) == expected


def test_an_unknown_implementation_is_named():
  with pytest.raises(ValueError, match="'flash'.*dense, blocked"):
    attention_lib.resolve('flash')


# -- the dense path's hand-written gradient ----------------------------------


@pytest.mark.parametrize('cap', [None, 50.0])
@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (4, 2)])
def test_dense_gradient_is_autodiffs_of_its_forward(cap, heads, kv_heads):
  """`dense_attention`'s custom VJP against JAX's autodiff of the same
  forward, padding rows (which see no key) included."""
  rng = np.random.RandomState(11)
  mask = self_attention_mask(rng, 2, 20, 'packed')
  segments = mask.query_segment_ids.at[1, 15:].set(0)
  mask = mask._replace(query_segment_ids=segments, key_segment_ids=segments)
  spec = MaskSpec(causal=True, window=6, index_ordered=True)
  query, key, value = qkv(rng, 2, 20, 20, heads, kv_heads)
  cotangent = jnp.asarray(rng.standard_normal(query.shape), jnp.float32)
  groups = heads // kv_heads

  def heads_first(q, k, v):
    q = q.reshape(2, 20, kv_heads, groups, 8).transpose(0, 2, 3, 1, 4)
    return q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

  boolean = dense_mask(mask, spec)
  by_hand = lambda *qkv_: attention_lib._attend(  # pylint: disable=protected-access
      *heads_first(*qkv_), boolean, SCALE, cap)
  autodiff = lambda *qkv_: attention_lib._attend_forward(  # pylint: disable=protected-access
      *heads_first(*qkv_), boolean, SCALE, cap)[0]
  out_cotangent = heads_first(cotangent, key, value)[0]
  expected_out, expected = output_and_grads(autodiff, query, key, value,
                                            out_cotangent)
  actual_out, actual = output_and_grads(by_hand, query, key, value,
                                        out_cotangent)
  assert relative_error(actual_out, expected_out) <= 1e-6
  for name, a, e in zip(('d_query', 'd_key', 'd_value'), actual, expected):
    assert relative_error(a, e) <= RTOL, (name, relative_error(a, e))


# -- merged attention (T5Gemma 2's decoder) ----------------------------------


def _merged_inputs(rng, heads, kv_heads, window, padded_encoder):
  """A decoder's packed causal self-attention part and an encoder part
  (its own packing; row 1's encoder wholly padding with `padded_encoder`,
  so that row's queries see their own keys alone)."""
  batch, q_len, enc_len = 2, 21, 19
  query, key, value = qkv(rng, batch, q_len, q_len, heads, kv_heads)
  _, enc_key, enc_value = qkv(rng, batch, q_len, enc_len, heads, kv_heads)
  own = self_attention_mask(rng, batch, q_len, 'packed')
  enc_positions, enc_segments, _ = packed_rows(rng, batch, enc_len, False)
  if padded_encoder:
    enc_segments = enc_segments.at[1].set(0)
  # A decoder segment reads the encoder segment of the same id.
  encoder = MaskInputs(own.query_positions, enc_positions,
                       own.query_segment_ids, enc_segments)
  parts = [(key, value, own, MaskSpec(causal=True, window=window,
                                      index_ordered=True)),
           (enc_key, enc_value, encoder, MaskSpec(causal=False))]
  return query, parts


@pytest.mark.parametrize('heads,kv_heads,window,cap,padded_encoder', [
    (4, 2, 5, None, False),
    (4, 1, None, 50.0, True),
    (4, 4, 12, 50.0, False),
])
def test_merged_attention_blocked_matches_dense(heads, kv_heads, window, cap,
                                                padded_encoder):
  """One softmax over the decoder's own keys and the encoder's, tiled part
  by part and merged by logsumexp, against the joined dense scores:
  outputs and gradients of the query and of both parts' keys and values."""
  rng = np.random.RandomState(13)
  query, parts = _merged_inputs(rng, heads, kv_heads, window, padded_encoder)
  cotangent = jnp.asarray(rng.standard_normal(query.shape), jnp.float32)
  sees = functools.reduce(jnp.logical_or, [
      dense_mask(mask, spec).any(axis=-1)[:, 0] for _, _, mask, spec in parts])
  weights = sees[:, :, None, None].astype(jnp.float32)

  def run(impl, block):
    def attention(q, k1, v1, k2, v2):
      joined = [(k1, v1, *parts[0][2:]), (k2, v2, *parts[1][2:])]
      if impl == 'dense':
        return attention_lib.merged_attention(q, joined, scale=SCALE,
                                              logit_softcap=cap)
      return blocked.merged_blocked_attention(
          q, joined, scale=SCALE, logit_softcap=cap, block_q=block,
          block_kv=block)
    args = (query, parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    out, vjp = jax.vjp(attention, *args)
    return out, vjp(cotangent * weights)

  expected, expected_grads = jax.jit(lambda: run('dense', None))()
  actual, actual_grads = jax.jit(lambda: run('blocked', 8))()
  names = ('d_query', 'd_key', 'd_value', 'd_encoder_key', 'd_encoder_value')
  errors = {'out': relative_error(actual * weights, expected * weights)}
  for name, a, e in zip(names, actual_grads, expected_grads):
    assert np.isfinite(np.asarray(a)).all(), name
    errors[name] = relative_error(a, e)
  print(errors)
  assert max(errors.values()) <= RTOL, errors


def test_merged_attention_impls():
  assert attention_lib.resolve_merged('auto', query_length=1) == 'dense'
  assert attention_lib.resolve_merged('auto', query_length=512) == 'blocked'
  assert attention_lib.resolve_merged('blocked') == 'blocked'
  with pytest.raises(ValueError, match="'splash' has no merged attention"):
    attention_lib.resolve_merged('splash')


@pytest.mark.slow  # ~30 s: two T5Gemma 2 gradients compiled
def test_t5gemma2_loss_and_gradients_match_dense():
  """T5Gemma 2 (merged attention, split encoder window) with every
  attention `blocked` (tiles of 4) vs `dense`: loss and parameter
  gradients on a padded batch."""
  rng = np.random.RandomState(17)
  lengths = np.array([[20, 12], [13, 7]])  # (encoder, decoder) tokens
  inputs = np.where(np.arange(20) < lengths[:, :1], rng.randint(3, 512,
                                                                 (2, 20)), 0)
  targets = np.where(np.arange(12) < lengths[:, 1:], rng.randint(3, 512,
                                                                  (2, 12)), 0)
  batch = {'encoder_input_tokens': jnp.asarray(inputs, jnp.int32),
           'decoder_input_tokens': jnp.asarray(
               np.concatenate([np.full((2, 1), 2), targets[:, :-1]], 1)
               * (targets > 0), jnp.int32),
           'decoder_target_tokens': jnp.asarray(targets, jnp.int32)}
  results = {}
  default_tiles = blocked.DEFAULT_BLOCK_Q, blocked.DEFAULT_BLOCK_KV
  blocked.DEFAULT_BLOCK_Q = blocked.DEFAULT_BLOCK_KV = 4
  try:
    for impl in ('dense', 'blocked'):
      model = gin_utils.load_model('t5gemma2_tiny', attention_impl=impl)
      params = model.get_initial_variables(jax.random.PRNGKey(3))['params']
      loss_and_grads = jax.jit(jax.value_and_grad(
          lambda p: model.loss_fn(p, batch, None)[0]))
      results[impl] = loss_and_grads(params)
  finally:
    blocked.DEFAULT_BLOCK_Q, blocked.DEFAULT_BLOCK_KV = default_tiles
  (loss, grads), (expected_loss, expected_grads) = (results['blocked'],
                                                    results['dense'])
  # A leaf no gradient reaches (the end-of-image vector) must stay zero.
  errors = jax.tree_util.tree_map(
      lambda a, e: (relative_error(a, e) if np.abs(np.asarray(e)).max() > 0
                    else float(np.abs(np.asarray(a)).max())),
      grads, expected_grads)
  worst = max(jax.tree_util.tree_leaves(errors))
  print(f'loss {float(loss):.6f} vs {float(expected_loss):.6f}; max rel. '
        f'gradient error {worst:.2e}')
  assert abs(float(loss) - float(expected_loss)) <= 1e-5 * abs(
      float(expected_loss))
  assert worst <= 1e-4

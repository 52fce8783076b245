"""Masks, RoPE and RMSNorm against brute-force numpy references.

Each reference is written from the definition (a double loop over query and
key, the rotate-half formula, the RMSNorm formula), not from the code under
test, so a wrong comparison, sign or axis makes these tests fail.
"""

import itertools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_adapt.config import StackConfig
from t5x_adapt.kernels.masks import attention_mask
from t5x_adapt.layers.norms import RMSNorm
from t5x_adapt.layers.rope import apply_rope

BATCH = 3
LENGTH = 13


def _visible(qp: int, kp: int, causal: bool, window: Optional[int],
             in_prefix: bool) -> bool:
  """Whether query position `qp` may see key position `kp` (same segment)."""
  if not causal:
    return window is None or abs(qp - kp) < window
  if window is None:
    return kp <= qp or in_prefix
  # The causal window q - W < k <= q; prefix pairs are bound by |q - k| < W.
  return qp - window < kp <= qp or (in_prefix and abs(qp - kp) < window)


def reference_mask(q_pos, k_pos, q_seg, k_seg, *, causal: bool,
                   window: Optional[int] = None, q_prefix=None,
                   k_prefix=None) -> np.ndarray:
  """Brute-force [batch, 1, q, k] mask, one (query, key) pair at a time."""
  batch, q_len = q_pos.shape
  k_len = k_pos.shape[1]
  out = np.zeros((batch, 1, q_len, k_len), bool)
  for b, q, k in itertools.product(range(batch), range(q_len), range(k_len)):
    if k_seg[b, k] == 0 or q_seg[b, q] != k_seg[b, k]:
      continue
    in_prefix = (q_prefix is not None and bool(q_prefix[b, q]) and
                 bool(k_prefix[b, k]))
    out[b, 0, q, k] = _visible(int(q_pos[b, q]), int(k_pos[b, k]), causal,
                               window, in_prefix)
  return out


def packed_example(rng: np.random.RandomState, length: int):
  """Positions restarting per segment, trailing padding (segment 0)."""
  positions = np.zeros((BATCH, length), np.int32)
  segments = np.zeros((BATCH, length), np.int32)
  for b in range(BATCH):
    used = length - rng.randint(0, 4)  # 0-3 pad tokens at the end
    cuts = np.sort(rng.choice(np.arange(1, used), size=b, replace=False))
    bounds = [0, *cuts.tolist(), used]
    for seg, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:]), 1):
      segments[b, start:stop] = seg
      positions[b, start:stop] = np.arange(stop - start)
  return positions, segments


def random_example(rng: np.random.RandomState, length: int):
  """Arbitrary positions (ties, jumps, any order) and segment ids in 0..2."""
  positions = rng.randint(-2, 3 * length, size=(BATCH, length))
  segments = rng.randint(0, 3, size=(BATCH, length))
  return positions.astype(np.int32), segments.astype(np.int32)


def check_mask(q_pos, k_pos, q_seg, k_seg, *, causal, window=None,
               prefix=None):
  """Compares `attention_mask` with the reference; returns the reference."""
  expected = reference_mask(q_pos, k_pos, q_seg, k_seg, causal=causal,
                            window=window, q_prefix=prefix, k_prefix=prefix)
  jax_prefix = None if prefix is None else jnp.asarray(prefix)
  got = attention_mask(jnp.asarray(q_pos), jnp.asarray(k_pos),
                       jnp.asarray(q_seg), jnp.asarray(k_seg), causal=causal,
                       window=window, query_prefix=jax_prefix,
                       key_prefix=jax_prefix)
  assert got.shape == expected.shape
  assert got.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(got), expected)
  # Guard against a degenerate example that could not tell masks apart.
  assert 0 < expected.sum() < expected.size
  return expected


@pytest.mark.parametrize('example', [packed_example, random_example])
@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('window', [None, 1, 3, 5])
@pytest.mark.parametrize('seed', [0, 1])
def test_self_attention_mask(example, causal, window, seed):
  rng = np.random.RandomState(seed)
  positions, segments = example(rng, LENGTH)
  check_mask(positions, positions, segments, segments, causal=causal,
             window=window)


@pytest.mark.parametrize('causal', [True, False])
@pytest.mark.parametrize('window', [None, 4])
def test_cross_shaped_mask(causal, window):
  """Different query and key lengths (cross-attention / decoding cache)."""
  rng = np.random.RandomState(7)
  q_pos, q_seg = random_example(rng, 5)
  k_pos, k_seg = random_example(rng, 11)
  check_mask(q_pos, k_pos, q_seg, k_seg, causal=causal, window=window)


def test_padding_is_never_attended():
  positions = np.tile(np.arange(6, dtype=np.int32), (BATCH, 1))
  segments = np.array([[1, 1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 1, 1],
                       [0, 0, 1, 1, 1, 1]], np.int32)
  mask = check_mask(positions, positions, segments, segments, causal=False)
  assert not mask[0, 0, :, 4:].any() and not mask[0, 0, 4:, :].any()
  assert not mask[2, 0, :, :2].any()
  assert mask[1].all()


def test_packed_segments_do_not_mix():
  # Two packed examples per row, positions restarting at 0.
  segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0]] * BATCH, np.int32)
  positions = np.array([[0, 1, 2, 0, 1, 2, 3, 0]] * BATCH, np.int32)
  mask = check_mask(positions, positions, segments, segments, causal=True)
  assert not mask[:, :, :3, 3:].any() and not mask[:, :, 3:, :3].any()
  # Token 3 (position 0 of segment 2) sees only itself.
  np.testing.assert_array_equal(mask[0, 0, 3], np.eye(8, dtype=bool)[3])


@pytest.mark.parametrize('window', [None, 3])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_prefix_lm_mask(window, seed):
  rng = np.random.RandomState(seed)
  positions, segments = packed_example(rng, LENGTH)
  prefix = np.zeros((BATCH, LENGTH), bool)
  for b in range(BATCH):
    # The first few tokens of every segment are its prefix.
    for seg in np.unique(segments[b][segments[b] > 0]):
      idx = np.flatnonzero(segments[b] == seg)
      prefix[b, idx[:rng.randint(0, len(idx) + 1)]] = True
  prefix[0, :4] = True  # make sure some prefix has more than one token
  mask = check_mask(positions, positions, segments, segments, causal=True,
                    window=window, prefix=prefix)
  if window is None:
    # A prefix query sees a later prefix key of its segment (row 0 is one
    # segment).
    assert segments[0, 0] == segments[0, 3] == 1
    assert mask[0, 0, 0, 3]


def test_prefix_lm_reference_is_not_causal():
  """The prefix part of the reference differs from plain causal masking."""
  positions = np.tile(np.arange(6, dtype=np.int32), (BATCH, 1))
  segments = np.ones((BATCH, 6), np.int32)
  prefix = np.zeros((BATCH, 6), bool)
  prefix[:, :3] = True
  causal = reference_mask(positions, positions, segments, segments,
                          causal=True)
  prefix_lm = reference_mask(positions, positions, segments, segments,
                             causal=True, q_prefix=prefix, k_prefix=prefix)
  expected_extra = np.zeros((6, 6), bool)
  expected_extra[np.triu_indices(3, 1)] = True
  np.testing.assert_array_equal(prefix_lm[0, 0] & ~causal[0, 0],
                                expected_extra)


def test_sliding_window_definitions():
  """Causal window is q - W < k <= q; the two-sided one is |q - k| < W."""
  positions = np.tile(np.arange(10, dtype=np.int32), (BATCH, 1))
  segments = np.ones((BATCH, 10), np.int32)
  causal = check_mask(positions, positions, segments, segments, causal=True,
                      window=3)[0, 0]
  two_sided = check_mask(positions, positions, segments, segments,
                         causal=False, window=3)[0, 0]
  np.testing.assert_array_equal(np.flatnonzero(causal[6]), [4, 5, 6])
  np.testing.assert_array_equal(np.flatnonzero(two_sided[6]),
                                [4, 5, 6, 7, 8])


@pytest.mark.parametrize('window', [4, 5, 8, 9])
def test_split_window_is_transformers_t5gemma2(window):
  """T5Gemma 2's encoder window (`bidirectional_window='split'`) sees what
  transformers' t5gemma2 mask function lets it see."""
  from transformers.models.t5gemma2 import modeling_t5gemma2
  rule = modeling_t5gemma2.sliding_window_mask_function(window,
                                                        is_causal=False)
  n = 3 * window
  expected = np.array([[bool(rule(0, 0, q, k)) for k in range(n)]
                       for q in range(n)])
  stack = StackConfig(attention_pattern=('local',), sliding_window=window,
                      bidirectional_window='split')
  behind, ahead = stack.layer_window_bounds(0, causal=False)
  positions = np.tile(np.arange(n, dtype=np.int32), (BATCH, 1))
  segments = np.ones((BATCH, n), np.int32)
  ours = np.asarray(attention_mask(
      positions, positions, segments, segments, causal=False,
      window=behind, window_ahead=ahead))[0, 0]
  np.testing.assert_array_equal(ours, expected)
  assert ours[n // 2].sum() == window  # W keys, split around the query
  # The causal decoder of the same stack keeps the plain causal window.
  assert stack.layer_window_bounds(0, causal=True) == (window, None)


def reference_rope(x: np.ndarray, positions: np.ndarray, base: float,
                   scale: float) -> np.ndarray:
  """Rotate-half RoPE in float64: pairs (i, i + d/2) rotate by pos * f_i."""
  x = x.astype(np.float64)
  half = x.shape[-1] // 2
  out = np.empty_like(x)
  for i in range(half):
    freq = base**(-2.0 * i / x.shape[-1]) / scale
    angle = positions.astype(np.float64)[:, :, None] * freq  # [b, t, 1]
    cos, sin = np.cos(angle), np.sin(angle)
    a, b = x[..., i], x[..., i + half]
    out[..., i] = a * cos - b * sin
    out[..., i + half] = b * cos + a * sin
  return out


@pytest.mark.parametrize('base,scale', [(10_000.0, 1.0), (1_000_000.0, 1.0),
                                        (1_000_000.0, 8.0),
                                        (10_000.0, 8.0)])
@pytest.mark.parametrize('head_dim', [8, 32])
def test_rope_matches_numpy(base, scale, head_dim):
  rng = np.random.RandomState(0)
  x = rng.randn(2, 7, 3, head_dim).astype(np.float32)
  positions = rng.randint(0, 300, size=(2, 7)).astype(np.int32)
  positions[0, 0] = 0
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), base,
                              scale))
  expected = reference_rope(x, positions, base, scale)
  # float32 angles of positions < 300 are accurate to ~2e-5 rad.
  np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
  # Position 0 is the identity; RoPE is a rotation (norm preserving).
  np.testing.assert_allclose(got[0, 0], x[0, 0], atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1),
                             np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_scale_and_base_matter():
  """The reference tells the scale factor and the base apart."""
  rng = np.random.RandomState(1)
  x = rng.randn(1, 5, 1, 16).astype(np.float32)
  positions = np.arange(5, dtype=np.int32)[None] * 37
  got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions),
                              1_000_000.0, 8.0))
  for base, scale in [(1_000_000.0, 1.0), (10_000.0, 8.0)]:
    assert np.abs(got - reference_rope(x, positions, base, scale)).max() > 1e-2


def test_rope_relative():
  """Scores of rotated queries and keys depend only on position offsets."""
  rng = np.random.RandomState(2)
  q = rng.randn(1, 1, 1, 16).astype(np.float32)
  k = rng.randn(1, 1, 1, 16).astype(np.float32)

  def score(qp, kp):
    rq = apply_rope(jnp.asarray(q), jnp.array([[qp]]), 10_000.0)
    rk = apply_rope(jnp.asarray(k), jnp.array([[kp]]), 10_000.0)
    return float(jnp.sum(rq * rk))

  np.testing.assert_allclose(score(5, 2), score(105, 102), rtol=1e-4)


@pytest.mark.parametrize('eps', [1e-6, 1e-2])
def test_rms_norm_matches_numpy(eps):
  rng = np.random.RandomState(3)
  x = (rng.randn(2, 5, 24) * 3.0).astype(np.float32)
  x[0, 0] = 0.0  # all zeros: eps keeps it finite
  scale = rng.randn(24).astype(np.float32)
  norm = RMSNorm(eps=eps)
  got = norm.apply({'params': {'scale': jnp.asarray(scale)}}, jnp.asarray(x))
  x64 = x.astype(np.float64)
  expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps)
  expected *= 1.0 + scale.astype(np.float64)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_init_and_dtype():
  x = jnp.asarray(np.random.RandomState(4).randn(3, 8), jnp.bfloat16)
  variables = nn.meta.unbox(RMSNorm().init(jax.random.PRNGKey(0), x))
  np.testing.assert_array_equal(variables['params']['scale'], np.zeros(8))
  got = RMSNorm().apply(variables, x)
  assert got.dtype == jnp.bfloat16
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), expected,
                             rtol=1e-2)

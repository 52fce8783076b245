"""Cached greedy decoding against uncached recomputation, in padded batches.

Both model types decode more tokens than the tiny presets' sliding window (8),
so the local layers' ring-buffer caches wrap around several times, and the
rows of a batch have different prompt (or encoder input) lengths.

The reference never touches the cache or padding: for each row on its own,
the full uncached `compute_logits` runs over the unpadded prompt followed by
the generated tokens (the encoder-decoder: the unpadded encoder input, and
the start token followed by the generated tokens). In a causal model the
logits at position `t` of that pass are those of the sequence cut after `t`,
so one pass per row yields the logits of every greedy step; the reference
greedy tokens are their argmax (`test_reference_is_causal` checks that the
future does not leak, the slow `test_literal_reference_loop` runs the literal
step-by-step loop).

Parameters are drawn at random (norm scales included) so that greedy decoding
does not collapse onto one repeated token; the tests assert that it does not,
otherwise they could not fail.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_adapt import gin_utils
from t5x_adapt.config import EncoderDecoderConfig
from t5x_adapt.networks import EncoderDecoderTransformer

EOS = 1
NUM_TOKENS = 20  # generated tokens: more than twice the window of 8
LENGTHS = (3, 12, 7)  # prompt / encoder input lengths; padded width 12
LOGITS_ATOL = 1e-5

DECODER_ONLY = ('gemma2_tiny', 'gemma3_tiny', 'llama_tiny', 'qwen2_tiny',
                'qwen3_tiny', 'mistral_tiny')
ENCODER_DECODER = ('t5gemma_tiny', 't5gemma_tiny_unbalanced',
                   't5gemma3_tiny', 't5gemma2_tiny')


def _fan_in(name: str, shape: tuple[int, ...]) -> int:
  """Input width of a kernel (a scanned one has a leading layer axis)."""
  if "['out']" in name:  # [heads, head_dim, embed]
    return shape[-3] * shape[-2]
  if any(f"['{proj}']" in name for proj in ('query', 'key', 'value')):
    return shape[-3]  # [embed, heads, head_dim]
  return shape[-2]  # MLP [in, out]


def random_params(model, input_shapes, seed: int):
  """Normal parameters that make greedy decoding vary but stay well-conditioned.

  Kernels: std 1.2 / sqrt(fan_in). Norm scales (init: zeros): std 0.5, mean 1
  for the post-norms, so the blocks outweigh the token's own embedding in the
  residual stream (with the tied head, a dominant embedding makes greedy
  repeat the last token). Embeddings: std 0.02, which keeps logits (std ~0.2)
  and their float32 round-off small. Heavier parameters (e.g. everything
  std 0.3) make these tiny models chaotic: a 1e-7 relative change of the
  parameters then moves logits by ~1e-4, more than the tolerance.
  Llama-style stacks (plain norm weights, no post-norms): norm weights mean
  1, std 0.5; their residual stream is unnormed, so kernels std
  0.8 / sqrt(fan_in).
  """
  rng = np.random.RandomState(seed)
  plain = any(stack.norm_style == 'plain'
              for stack in model.config.stacks().values())

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    mean = 0.0
    if name.endswith("['scale']"):
      std, mean = 0.5, (1.0 if 'post_' in name or plain else 0.0)
    elif name.endswith(("['embedding']", "['eoi_embedding']", "['bias']")):
      std = 0.02
    else:
      std = (0.8 if plain else 1.2) / np.sqrt(_fan_in(name, leaf.shape))
    value = mean + std * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(
      draw, model.param_shapes())


def padded_inputs(seed: int, vocab_size: int):
  """Right-padded [rows, max(LENGTHS)] tokens (ids >= 3), and the rows."""
  rng = np.random.RandomState(seed)
  rows = [rng.randint(3, vocab_size, size=n).astype(np.int32)
          for n in LENGTHS]
  padded = np.zeros((len(rows), max(LENGTHS)), np.int32)
  for r, row in enumerate(rows):
    padded[r, :len(row)] = row
  return padded, rows


def first_eos(tokens: np.ndarray) -> int:
  """Index of the first EOS, or the length when there is none."""
  hits = np.flatnonzero(tokens == EOS)
  return int(hits[0]) if hits.size else len(tokens)


def explicit_features(prefix: str, tokens: np.ndarray) -> dict:
  """One unpadded row: every token is real (even an id 0 the model made)."""
  tokens = jnp.asarray(tokens, jnp.int32)[None]
  return {f'{prefix}_input_tokens': tokens,
          f'{prefix}_segment_ids': jnp.ones_like(tokens),
          f'{prefix}_positions': jnp.arange(tokens.shape[1])[None]}


class Harness:
  """A preset's model, parameters, inputs and compiled functions.

  Attributes:
    model: The model.
    is_encdec: Whether it is an encoder-decoder.
    params: Random parameters.
    padded: [rows, width] right-padded prompts / encoder inputs.
    rows: The same, unpadded.
  """

  def __init__(self, preset: str):
    self.model = gin_utils.load_model(preset)
    self.is_encdec = isinstance(self.model.config, EncoderDecoderConfig)
    cfg = (self.model.config.decoder if self.is_encdec else
           self.model.config)
    # A window, where there is one, that the generated tokens overrun.
    assert cfg.sliding_window is None or cfg.sliding_window < NUM_TOKENS
    self.vocab_size = cfg.vocab_size
    self.padded, self.rows = padded_inputs(0, self.vocab_size)
    shapes = {'decoder_input_tokens': (1, 8)}
    if self.is_encdec:
      shapes['encoder_input_tokens'] = (1, 8)
    self.params = random_params(self.model, shapes, seed=1)
    self._predict = jax.jit(self._predict_fn)
    self._logits = jax.jit(self.model.compute_logits)
    self._cached = jax.jit(self._cached_logits_fn)

  # -- the code under test ---------------------------------------------------

  def _predict_fn(self, params, padded):
    key = 'encoder_input_tokens' if self.is_encdec else 'decoder_input_tokens'
    return self.model.predict_batch(params, {key: padded},
                                    max_decode_length=NUM_TOKENS)

  def predict(self, params=None) -> np.ndarray:
    """predict_batch on the padded batch: [rows, NUM_TOKENS]."""
    params = self.params if params is None else params
    return np.asarray(self._predict(params, jnp.asarray(self.padded)))

  # -- the reference ---------------------------------------------------------

  def reference_logits(self, row: int, generated: np.ndarray,
                       params=None) -> np.ndarray:
    """Uncached logits of every step of row `row`: [len(generated), vocab].

    Step k's logits predict `generated[k]` from the prompt and
    `generated[:k]`.
    """
    params = self.params if params is None else params
    context = generated[:-1]
    if self.is_encdec:
      decoder = np.concatenate([[self.model.decoder_start_id], context])
      batch = {**explicit_features('encoder', self.rows[row]),
               **explicit_features('decoder', decoder)}
      logits = self._logits(params, batch)[0]
    else:
      prompt = self.rows[row]
      batch = explicit_features('decoder',
                                np.concatenate([prompt, context]))
      logits = self._logits(params, batch)[0, len(prompt) - 1:]
    assert logits.shape == (len(generated), self.vocab_size)
    return np.asarray(logits)

  # -- the cache, driven directly ------------------------------------------

  def _cached_logits_fn(self, params, padded, forced):
    """Per-step cached logits [rows, steps, vocab], teacher-forced.

    Feeds `forced[:, k]` as the k-th generated token (no EOS handling), one
    token per `decode=True` call, after a prefill (decoder-only) or the
    start token (encoder-decoder).
    """
    valid = padded > 0
    steps = forced.shape[1]
    variables = {'params': params}
    if self.is_encdec:
      enc_positions = jnp.cumsum(valid, axis=1) - 1
      enc_batch = {'encoder_input_tokens': padded,
                   'encoder_segment_ids': valid.astype(jnp.int32),
                   'encoder_positions': jnp.maximum(enc_positions, 0)}
      encoded = self.model.encode(params, enc_batch)

      def call(cache, tokens, positions):
        logits, mutated = self.model.module.apply(
            {**variables, **cache}, encoded, enc_batch['encoder_positions'],
            enc_batch['encoder_segment_ids'], tokens, positions,
            jnp.ones_like(tokens), decode=True, cache_length=steps,
            mutable=['cache'], method=EncoderDecoderTransformer.decode)
        return logits[:, -1], mutated

      start = jnp.full((padded.shape[0], 1), self.model.decoder_start_id)
      first, cache = call({}, start, jnp.zeros_like(start))
      next_positions = jnp.ones((padded.shape[0],), jnp.int32)
    else:
      # Left-pad the prompts so that every row's last token is at the end.
      lengths = jnp.sum(valid, axis=1)
      width = padded.shape[1]
      shift = width - lengths
      src = jnp.arange(width)[None, :] - shift[:, None]
      aligned = jnp.where(src >= 0,
                          jnp.take_along_axis(padded, jnp.maximum(src, 0),
                                              axis=1), 0)
      aligned_valid = (src >= 0).astype(jnp.int32)

      def call(cache, tokens, positions, segments=None):
        segments = jnp.ones_like(tokens) if segments is None else segments
        logits, mutated = self.model.module.apply(
            {**variables, **cache}, tokens, positions, segments, None,
            decode=True, cache_length=width + steps - 1, mutable=['cache'])
        return logits[:, -1], mutated

      first, cache = call({}, aligned, jnp.maximum(src, 0), aligned_valid)
      next_positions = lengths

    def body(cache, inputs):
      token, k = inputs
      logits, cache = call(cache, token[:, None],
                           (next_positions + k)[:, None])
      return cache, logits

    _, rest = jax.lax.scan(body, cache,
                           (forced[:, :-1].T, jnp.arange(steps - 1)))
    return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)],
                           axis=1)

  def cached_logits(self, forced: np.ndarray, params=None) -> np.ndarray:
    params = self.params if params is None else params
    return np.asarray(self._cached(params, jnp.asarray(self.padded),
                                   jnp.asarray(forced, jnp.int32)))


@functools.lru_cache(maxsize=None)
def _harness(preset: str) -> Harness:
  return Harness(preset)


@pytest.fixture(scope='module', params=DECODER_ONLY + ENCODER_DECODER)
def harness(request):
  return _harness(request.param)


@pytest.fixture(scope='module')
def decoded(harness):
  """(predict_batch tokens, uncached reference logits per row)."""
  out = harness.predict()
  refs = [harness.reference_logits(r, out[r]) for r in range(len(out))]
  return out, refs


def test_generation_is_not_degenerate(harness, decoded):
  out, _ = decoded
  assert out.shape == (len(LENGTHS), NUM_TOKENS)
  for row in out:
    stop = first_eos(row)
    assert stop > NUM_TOKENS // 2, 'EOS too early to test the window'
    assert len(set(row[:stop].tolist())) > 1, row
  assert len(set(out.ravel().tolist())) >= 8, out
  assert len({tuple(row) for row in out.tolist()}) == len(out)


def test_greedy_matches_uncached_reference(harness, decoded):
  out, refs = decoded
  for r, (row, ref) in enumerate(zip(out, refs)):
    stop = first_eos(row)
    expected = np.argmax(ref, axis=-1)
    np.testing.assert_array_equal(row[:stop + 1], expected[:stop + 1],
                                  err_msg=f'row {r}')
    np.testing.assert_array_equal(row[stop + 1:], 0, err_msg=f'row {r}')


def test_cached_logits_match_uncached(harness, decoded):
  out, refs = decoded
  cached = harness.cached_logits(out)
  for r, ref in enumerate(refs):
    stop = min(first_eos(out[r]) + 1, NUM_TOKENS)
    diff = np.abs(cached[r, :stop] - ref[:stop]).max()
    assert diff <= LOGITS_ATOL, f'row {r}: max |cached - uncached| = {diff}'
  # The logits are far from constant, so the tolerance is meaningful.
  assert np.std(cached) > 0.05


def test_reference_is_causal(harness, decoded):
  """A step's reference logits do not depend on the tokens after it.

  So the logits at step k of the one-pass reference are those of the
  prompt and `generated[:k]` alone (the literal per-step loop, in
  `test_literal_reference_loop`, checks the cut sequences themselves).
  """
  out, refs = decoded
  row, cut = 1, NUM_TOKENS // 2
  changed = out[row].copy()
  changed[cut:] = np.random.RandomState(5).randint(3, harness.vocab_size,
                                                   NUM_TOKENS - cut)
  ref = harness.reference_logits(row, changed)  # same shape: no recompile
  np.testing.assert_allclose(ref[:cut + 1], refs[row][:cut + 1], rtol=0,
                             atol=1e-6)
  assert np.abs(ref[cut + 1:] - refs[row][cut + 1:]).max() > 1e-3


def _force_eos(harness, out):
  """Params under which a row emits EOS in the middle of its output.

  The EOS row of the decoder's LM head (its embedding, or its own table when
  untied) becomes 1.01 times that of a token `g` some row first generates
  at a middle step. The head then scores
  EOS above every token wherever `g` scored within 1% of the top; at that
  step `g` was the top, so the row ends there at the latest.
  """
  row, step = next((r, k) for k in range(NUM_TOKENS // 2, NUM_TOKENS - 2)
                   for r in range(len(out)) if out[r, k] not in out[r, :k])
  params = jax.tree_util.tree_map(lambda x: x, harness.params)  # new dicts
  embedder = harness.model.lm_head_params(params)
  embedding = embedder['embedding']
  embedder['embedding'] = embedding.at[EOS].set(
      1.01 * embedding[out[row, step]])
  return params


def test_eos_ends_a_row(harness, decoded):
  out, _ = decoded
  params = _force_eos(harness, out)
  eos_out = harness.predict(params)
  stops = [first_eos(row) for row in eos_out]
  assert any(0 < s < NUM_TOKENS - 2 for s in stops), eos_out
  for r, row in enumerate(eos_out):
    ref = harness.reference_logits(r, row, params)
    stop = stops[r]
    np.testing.assert_array_equal(row[:stop + 1],
                                  np.argmax(ref, axis=-1)[:stop + 1])
    # After its EOS a row emits padding only.
    np.testing.assert_array_equal(row[stop + 1:], 0)
    if stop < NUM_TOKENS - 1:
      # Left alone, the model would go on (ref[stop + 1] sees the EOS), so
      # the padding is the decoding loop's doing.
      assert np.argmax(ref[stop + 1]) != 0


@pytest.mark.slow
@pytest.mark.parametrize('preset,row', [('gemma3_tiny', 0),
                                        ('t5gemma_tiny_unbalanced', 2)])
def test_literal_reference_loop(preset, row):
  """The reference greedy loop, literally: one uncached pass per step.

  Each step compiles a new length, hence one row and ten steps (the
  decoder-only row's prompt of 3 then outgrows the window of 8; the
  encoder-decoder row's encoder input is padded in the batch).
  """
  h = _harness(preset)
  out = h.predict()
  generated = []
  for _ in range(10):
    context = np.asarray(generated + [0], np.int32)  # the 0 is not fed
    logits = h.reference_logits(row, context)[-1]
    generated.append(int(np.argmax(logits)))
  np.testing.assert_array_equal(out[row, :10], generated)

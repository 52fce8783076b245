"""Sampling and beam search, on fake step functions and on the tiny presets.

Fake step functions have known logits, so a test can enumerate or recompute
what the decoder may emit. The model tests decode a padded batch for longer
than the presets' sliding window (8), with random parameters
(`test_decoding.random_params`) under which greedy decoding does not repeat
one token; they compare beam search and sampling with greedy decoding, and
beam scores with the model's own `score_batch`. The last test compares
greedy decoding of a transformers T5Gemma checkpoint with its `generate`.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import hf_fixtures as hf
from t5x_adapt import convert
from t5x_adapt import decoding
from t5x_adapt.decoding import DecodeOptions
from test_decoding import Harness, first_eos, random_params

EOS = 1
NUM_TOKENS = 20  # more than twice the presets' window of 8
SCORE_ATOL = 1e-4
# Parameters under which greedy decoding of both presets varies (see
# test_beam_one_equals_greedy); some seeds make a t5gemma_tiny row repeat.
PARAM_SEED = 4
GREEDY = DecodeOptions()
BEAM_1 = DecodeOptions('beam', num_beams=1)
BEAM_4 = DecodeOptions('beam', num_beams=4, length_penalty=1.0)

# ------------------------------------------------ a hand-made beam search --

# Next-token probabilities given the two previous tokens [p2, p1, next] of a
# 6-token vocabulary (0 padding, 1 EOS, 2-5 words; 0 stands for "no token"
# before the first). Greedy takes 2 (p .5) and then never meets a likely
# EOS; beam search keeps 3 (p .3), which continues 3 -> 4 (p .8) -> EOS
# (p .9 after exactly 3, 4): [3, 4, EOS] has p .216, the best sequence.
VOCAB = 6
_UNIFORM = {1: .2, 2: .2, 3: .2, 4: .2, 5: .2}
_RULES = (  # (p2 or None for any, p1, distribution), later rules win
    (0, 0, {2: .5, 3: .3, 4: .1, 5: .06, 1: .04}),
    (None, 2, {4: .36, 5: .34, 3: .2, 2: .05, 1: .05}),
    (None, 3, {4: .8, 2: .05, 3: .05, 5: .05, 1: .05}),
    (None, 4, {2: .3, 3: .25, 5: .25, 4: .15, 1: .05}),
    (3, 4, {1: .9, 2: .025, 3: .025, 4: .025, 5: .025}),
)
# Row 1 of the fake batch renames the words, so its best is [4, 3, EOS].
_RENAME = np.array([0, 1, 5, 4, 3, 2])


def _distribution(probs: dict) -> np.ndarray:
  out = np.zeros(VOCAB)
  for token, p in probs.items():
    out[token] = p
  return out


def transition_log_probs() -> np.ndarray:
  """[2 rows, p2, p1, next] log-probabilities (-inf for padding)."""
  table = np.broadcast_to(_distribution(_UNIFORM), (VOCAB,) * 3).copy()
  for p2, p1, probs in _RULES:
    table[slice(None) if p2 is None else p2, p1] = _distribution(probs)
  renamed = table[np.ix_(_RENAME, _RENAME, _RENAME)]
  with np.errstate(divide='ignore'):
    return np.log(np.stack([table, renamed]))


def sequence_log_prob(table: np.ndarray, tokens) -> float:
  """log p of `tokens` under one row's [p2, p1, next] table."""
  p2 = p1 = 0
  total = 0.0
  for token in tokens:
    total += table[p2, p1, token]
    p2, p1 = p1, token
  return total


def brute_force_best(table: np.ndarray, num_tokens: int, alpha: float):
  """(score, tokens) of the best sequence of at most `num_tokens` tokens.

  Every word/EOS sequence of `num_tokens` tokens, cut after its first EOS,
  scored `log p / length ** alpha`.
  """
  best = (-np.inf, ())
  for seq in itertools.product(range(1, VOCAB), repeat=num_tokens):
    if EOS in seq:
      seq = seq[:seq.index(EOS) + 1]
    score = sequence_log_prob(table, seq) / len(seq)**alpha
    best = max(best, (score, seq))
  return best


def _fake_cache(previous: jax.Array, table_ids: jax.Array) -> dict:
  """A cache laid out as the models' caches are.

  The previous token lives in a scanned leaf ([periods, batch]) and in an
  unrolled one ([batch]); the row's table in a cross-attention leaf.
  """
  return {'decoder': {
      'layers': {'block_0': {'self_attention': {
          'cached_key': jnp.stack([previous, previous]),
          'cache_index': jnp.zeros((2,), jnp.int32)}}},
      'layer_2': {
          'self_attention': {'cached_key': previous,
                             'cache_index': jnp.zeros((), jnp.int32)},
          'cross_attention': {'cached_key': table_ids}}}}


def fake_markov_step(table: jax.Array):
  """A step function over `transition_log_probs` tables.

  Each of the two copies of the previous token picks half of the logits, so
  a cache row that is not moved with its beam changes them.
  """
  def step(tokens, positions, cache):
    del positions
    layer = cache['decoder']['layer_2']
    rows = layer['cross_attention']['cached_key']
    scanned = cache['decoder']['layers']['block_0']['self_attention'][
        'cached_key'][1]
    unrolled = layer['self_attention']['cached_key']
    current = tokens[:, 0]
    logits = 0.5 * (table[rows, scanned, current] +
                    table[rows, unrolled, current])
    return logits, _fake_cache(current, rows)
  return step


def fake_markov_search(options: DecodeOptions, num_tokens: int):
  """Decodes both rows of the fake batch; (tokens, scores) as `decode`."""
  table = jnp.asarray(transition_log_probs(), jnp.float32)
  rows = jnp.arange(2)
  prefill = decoding.Prefill(
      fake_markov_step(table), table[rows, 0, 0],
      _fake_cache(jnp.zeros((2,), jnp.int32), rows),
      jnp.zeros((2,), jnp.int32), num_tokens)
  return decoding.decode(prefill, options, EOS)


def _cut(tokens: np.ndarray) -> tuple:
  return tuple(tokens[:first_eos(tokens) + 1].tolist())


@pytest.mark.parametrize('alpha', [0.0, 1.0])
def test_beam_search_finds_the_brute_force_best(alpha):
  num_tokens = 6
  tables = transition_log_probs()
  options = DecodeOptions('beam', num_beams=4, length_penalty=alpha)
  beams, scores = jax.jit(fake_markov_search, static_argnums=(0, 1))(
      options, num_tokens)
  greedy, _ = fake_markov_search(GREEDY, num_tokens)
  beam_1, _ = fake_markov_search(dataclasses.replace(options, num_beams=1),
                                 num_tokens)
  for row, table in enumerate(tables):
    best_score, best = brute_force_best(table, num_tokens, alpha)
    print(f'row {row} alpha {alpha}: best {best} score {best_score:.4f}, '
          f'greedy {_cut(np.asarray(greedy[row]))}, beams '
          f'{[_cut(b) for b in np.asarray(beams[row])]} '
          f'{np.asarray(scores[row]).round(4).tolist()}')
    assert best == (tuple(_RENAME[[3, 4, 1]]) if row else (3, 4, 1))
    assert _cut(np.asarray(beams[row, 0])) == best
    assert abs(float(scores[row, 0]) - best_score) < 1e-5
    assert _cut(np.asarray(greedy[row])) != best
    np.testing.assert_array_equal(beam_1[row, 0], greedy[row])
    # Every beam's score is that of its own tokens (cache rows moved right).
    for tokens, score in zip(np.asarray(beams[row]), np.asarray(scores[row])):
      seq = _cut(tokens)
      assert np.all(tokens[len(seq):] == 0)
      expected = sequence_log_prob(table, seq) / len(seq)**alpha
      assert abs(score - expected) < 1e-5, (seq, score, expected)
    assert np.all(np.diff(np.asarray(scores[row])) <= 0)


# ------------------------------------------------------- fake sampling --

SAMPLE_VOCAB = 40
SAMPLE_ROWS = 16
SAMPLE_TOKENS = 12


def _sample_table() -> np.ndarray:
  """[position, previous token, vocab] logits; padding and EOS never win."""
  table = 3.0 * np.random.RandomState(4).standard_normal(
      (SAMPLE_TOKENS + 3, SAMPLE_VOCAB, SAMPLE_VOCAB))
  table[..., :EOS + 1] = -np.inf
  return table.astype(np.float32)


@functools.partial(jax.jit, static_argnums=0)
def fake_sample(options: DecodeOptions, rng: jax.Array):
  """Samples the fake batch (rows start at positions 0, 1, 2)."""
  table = jnp.asarray(_sample_table())
  starts = jnp.arange(SAMPLE_ROWS) % 3

  def step(tokens, positions, cache):
    return table[positions[:, 0], tokens[:, 0]], cache

  prefill = decoding.Prefill(step, table[starts, 0], {}, starts + 1,
                             SAMPLE_TOKENS)
  return decoding.decode(prefill, options, EOS, rng)[0]


def step_logits(tokens: np.ndarray) -> np.ndarray:
  """The logits each fake sampling step saw: [rows, steps, vocab]."""
  table = _sample_table()
  starts = np.arange(SAMPLE_ROWS) % 3
  previous = np.concatenate([np.zeros((SAMPLE_ROWS, 1), int), tokens[:, :-1]],
                            axis=1)
  positions = starts[:, None] + np.arange(SAMPLE_TOKENS)[None]
  return table[positions, previous]


def ranks(tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
  """Rank of each emitted token among its step's logits (0: the best)."""
  chosen = np.take_along_axis(logits, tokens[..., None], axis=-1)
  return np.sum(logits > chosen, axis=-1)


def outside_nucleus(tokens, logits, top_p, temperature) -> np.ndarray:
  """Whether each emitted token lies outside its step's top-p nucleus."""
  scaled = logits / temperature
  probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
  probs /= probs.sum(axis=-1, keepdims=True)
  chosen = np.take_along_axis(probs, tokens[..., None], axis=-1)
  mass_before = np.sum(np.where(probs > chosen, probs, 0.0), axis=-1)
  return mass_before >= top_p


def test_top_k_sampling_stays_in_the_top_k():
  rng = jax.random.PRNGKey(0)
  tokens = np.asarray(fake_sample(DecodeOptions('sample', top_k=3), rng))
  token_ranks = ranks(tokens, step_logits(tokens))
  counts = np.bincount(token_ranks.ravel())
  print(f'top-3 sampling: emitted ranks {counts.tolist()}')
  assert token_ranks.max() < 3
  assert np.all(counts[:3] > 0)  # it samples, and from all three
  # Without top-k the same check fails.
  free = np.asarray(fake_sample(DecodeOptions('sample'), rng))
  assert ranks(free, step_logits(free)).max() >= 3


def test_top_p_sampling_stays_in_the_nucleus():
  rng = jax.random.PRNGKey(1)
  top_p, temperature = 0.6, 1.5
  options = DecodeOptions('sample', top_p=top_p, temperature=temperature)
  tokens = np.asarray(fake_sample(options, rng))
  logits = step_logits(tokens)
  token_ranks = ranks(tokens, logits)
  print(f'top-p {top_p} sampling at temperature {temperature}: emitted '
        f'ranks {np.bincount(token_ranks.ravel()).tolist()}')
  assert not outside_nucleus(tokens, logits, top_p, temperature).any()
  assert token_ranks.max() >= 2
  # Without top-p the same check fails.
  free = np.asarray(fake_sample(
      DecodeOptions('sample', temperature=temperature), rng))
  assert outside_nucleus(free, step_logits(free), top_p, temperature).any()


# ------------------------------------------------------ the tiny presets --


class Preset(Harness):
  """`test_decoding`'s harness, with decoding options and beam scoring.

  Its parameters are redrawn with `PARAM_SEED`.
  """

  def __init__(self, name: str):
    super().__init__(name)
    shapes = {'decoder_input_tokens': (1, 8), 'encoder_input_tokens': (1, 8)}
    self.params = random_params(self.model, shapes, seed=PARAM_SEED)
    self._predict_with_aux = jax.jit(
        self.model.predict_batch_with_aux,
        static_argnames=('max_decode_length', 'options',
                         'return_all_decodes'))
    self._score = jax.jit(self.model.score_batch)
    self._decodes = {}

  def decode(self, options: DecodeOptions, rng=None):
    """(tokens, scores) of `predict_batch_with_aux`, all beams; memoised."""
    key = (options, None if rng is None else tuple(np.asarray(rng).tolist()))
    if key not in self._decodes:
      name = 'encoder' if self.is_encdec else 'decoder'
      tokens, aux = self._predict_with_aux(
          self.params, {f'{name}_input_tokens': jnp.asarray(self.padded)},
          max_decode_length=NUM_TOKENS, options=options, rng=rng,
          return_all_decodes=True)
      self._decodes[key] = (np.asarray(tokens), np.asarray(aux['scores']))
    return self._decodes[key]

  def model_log_probs(self, sequences: np.ndarray) -> np.ndarray:
    """`score_batch` of each row's continuations, up to EOS.

    Args:
      sequences: [rows, n, NUM_TOKENS] continuations of each row.

    Returns:
      [rows, n] sums of log-probabilities (uncached, one padded batch).
    """
    rows, n, _ = sequences.shape
    flat = sequences.reshape(rows * n, NUM_TOKENS)
    lengths = np.array([min(first_eos(s) + 1, NUM_TOKENS) for s in flat])
    prompts = np.repeat(self.padded, n, axis=0)
    if self.is_encdec:
      batch = {'encoder_input_tokens': prompts,
               **_teacher_forced(flat, self.model.decoder_start_id, lengths,
                                 first=0)}
    else:
      prompt_lengths = np.sum(prompts > 0, axis=1)
      full = np.zeros((rows * n, prompts.shape[1] + NUM_TOKENS), np.int32)
      for r, (prompt, length) in enumerate(zip(prompts, prompt_lengths)):
        full[r, :length] = prompt[:length]
        full[r, length:length + NUM_TOKENS] = flat[r]
      batch = _teacher_forced(full[:, 1:], full[:, 0], lengths,
                              first=prompt_lengths - 1)
    return np.asarray(self._score(self.params, batch)).reshape(rows, n)


def _teacher_forced(targets: np.ndarray, start, lengths, first) -> dict:
  """Decoder features that predict `targets` [b, t] behind `start` tokens.

  Every position is a real token (even a generated 0); the loss weights
  cover the `lengths` targets from index `first` on.
  """
  b, t = targets.shape
  inputs = np.concatenate(
      [np.broadcast_to(np.asarray(start, np.int32), (b,))[:, None],
       targets[:, :-1]], axis=1)
  index = np.arange(t)[None] - np.asarray(first).reshape(-1, 1)
  return {'decoder_input_tokens': inputs,
          'decoder_target_tokens': targets,
          'decoder_loss_weights': ((index >= 0) &
                                   (index < lengths[:, None])).astype(
                                       np.float32),
          'decoder_segment_ids': np.ones_like(inputs),
          'decoder_positions': np.broadcast_to(np.arange(t), (b, t))}


def _lengths(tokens: np.ndarray) -> np.ndarray:
  """Generated tokens up to and including EOS, per sequence."""
  return np.apply_along_axis(lambda s: min(first_eos(s) + 1, len(s)), -1,
                             tokens)


@functools.lru_cache(maxsize=None)
def _preset(name: str) -> Preset:
  return Preset(name)


@pytest.fixture(scope='module', params=['gemma2_tiny', 't5gemma_tiny'])
def preset(request):
  return _preset(request.param)


def test_beam_one_equals_greedy(preset):
  greedy, log_probs = preset.decode(GREEDY)
  beam, scores = preset.decode(BEAM_1)
  for row in greedy:
    assert len(set(row[:first_eos(row)].tolist())) > 3, row
  assert len({tuple(row) for row in greedy.tolist()}) == len(greedy)
  np.testing.assert_array_equal(beam[:, 0], greedy)
  # The beam score is the greedy log-probability, length-normalised.
  normalised = log_probs / _lengths(greedy)**BEAM_1.length_penalty
  np.testing.assert_allclose(scores[:, 0], normalised, rtol=0, atol=1e-5)


def test_beam_scores_are_the_models_scores(preset):
  beams, scores = preset.decode(BEAM_4)
  model = preset.model_log_probs(beams)
  undone = scores * _lengths(beams)**BEAM_4.length_penalty
  error = np.abs(undone - model).max()
  greedy, _ = preset.decode(GREEDY)
  print(f'beam 4: best scores {scores[:, 0].round(4).tolist()}, '
        f'max |score x length - score_batch| {error:.2e}; best beam differs '
        f'from greedy in {int(np.sum(np.any(beams[:, 0] != greedy, -1)))} '
        f'of {len(greedy)} rows')
  assert error <= SCORE_ATOL
  assert np.all(np.diff(scores, axis=1) <= 0)
  for row in beams:  # distinct hypotheses
    assert len({tuple(b) for b in row.tolist()}) == len(row)


@pytest.mark.parametrize('name,options', [
    ('gemma2_tiny', DecodeOptions('sample', temperature=0.0)),
    ('t5gemma_tiny', DecodeOptions('sample', top_k=1, top_p=0.5))])
def test_degenerate_sampling_is_greedy(name, options):
  preset = _preset(name)
  greedy, log_probs = preset.decode(GREEDY)
  sampled, sampled_log_probs = preset.decode(options, jax.random.PRNGKey(3))
  np.testing.assert_array_equal(sampled, greedy)
  np.testing.assert_allclose(sampled_log_probs, log_probs, atol=1e-6)


def test_sampling_depends_on_the_rng_alone():
  preset = _preset('gemma2_tiny')
  options = DecodeOptions('sample', temperature=1.0, top_p=0.95)
  first, log_probs = preset.decode(options, jax.random.PRNGKey(0))
  again = preset._predict_with_aux(  # pylint: disable=protected-access
      preset.params, {'decoder_input_tokens': jnp.asarray(preset.padded)},
      max_decode_length=NUM_TOKENS, options=options,
      rng=jax.random.PRNGKey(0))[0]
  other, _ = preset.decode(options, jax.random.PRNGKey(1))
  greedy, _ = preset.decode(GREEDY)
  np.testing.assert_array_equal(np.asarray(again), first)
  assert np.mean(first != other) > 0.5
  assert np.mean(first != greedy) > 0.5
  # The reported log-probabilities are the model's.
  model = preset.model_log_probs(first[:, None])[:, 0]
  np.testing.assert_allclose(log_probs, model, rtol=0, atol=SCORE_ATOL)


# ------------------------------------------------------------ transformers --


def _varied(model: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Redraws parameters much as `test_decoding.random_params` does.

  `hf_fixtures`' draw makes greedy decoding repeat one token, which a
  token-for-token comparison could not tell from a broken one; so do
  `random_params`' kernels (std 1.2 / sqrt(fan_in)) in this narrower model,
  hence std 2 / sqrt(fan_in).
  """
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in model.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if 'norm' in name:  # Gemma norms scale by (1 + weight)
        value = 0.5 * noise + (1.0 if 'post_' in name else 0.0)
      elif 'embed_tokens' in name:
        value = 0.02 * noise
      else:  # torch kernels are [out, in]
        value = 2.0 / param.shape[-1]**0.5 * noise
      param.copy_(value)
  return model.eval()


@pytest.mark.parametrize('name', ['t5gemma', 't5gemma2'])
def test_greedy_matches_transformers_generate(name, tmp_path):
  """T5Gemma (cross-attention) and T5Gemma 2 (merged attention)."""
  num_tokens = 16  # > the fixture's sliding window of 5
  build, cls = {
      't5gemma': (hf.t5gemma, transformers.T5GemmaForConditionalGeneration),
      't5gemma2': (hf.t5gemma2,
                   transformers.T5Gemma2ForConditionalGeneration)}[name]
  path = hf.save(_varied(build(), seed=4), tmp_path / name)
  reference = hf.load(path, cls)
  prompts = hf.padded_tokens(seed=7)  # right-padded, lengths 16, 11, 6
  ids = torch.tensor(prompts, dtype=torch.long)
  with torch.no_grad():
    expected = reference.generate(
        input_ids=ids, attention_mask=(ids != 0).long(), do_sample=False,
        num_beams=1, max_new_tokens=num_tokens).numpy()
  model, params = convert.load_hf(path, text_only=True)
  ours = np.asarray(model.predict_batch(
      params, {'encoder_input_tokens': jnp.asarray(prompts)}, num_tokens))

  # generate starts with the decoder start token, pads a finished row with
  # 0 (its pad id) and stops once every row has finished: drop the start
  # token and pad to `num_tokens` with 0, which predict_batch emits after EOS.
  assert np.all(expected[:, 0] == model.decoder_start_id)
  expected = expected[:, 1:]
  expected = np.pad(expected, ((0, 0), (0, num_tokens - expected.shape[1])))
  print('transformers generate:', expected.tolist())
  for row in expected:
    assert len(set(row[:first_eos(row)].tolist())) > 3, row
  np.testing.assert_array_equal(ours, expected)

"""Decoding loops over a cached single-step function.

A step function maps `(tokens [b, 1], positions [b, 1], cache)` to
`(logits [b, vocab], cache)`. Every loop here runs inside one
`lax.fori_loop` or `lax.while_loop`, so one compilation serves every step.

  greedy_loop / sample_loop   one token per row and step (`token_loop`
                              with an argmax or a temperature / top-k /
                              top-p sampler);
  beam_search                 `num_beams` hypotheses per row, flattened into
                              the step function's batch (row r's beams are
                              rows r * num_beams ... r * num_beams +
                              num_beams - 1).

A row emits 0 (padding) after its EOS. `DecodeOptions` picks one of them
(gin-configurable); `decode` runs it on a `Prefill`.

Cache layout (`t5x_adapt.layers`): a tree of per-layer arrays with the batch
axis first, except under a scanned stack's `layers` node, whose leaves carry
a leading period axis and the batch second. Each self-attention layer's
`cache_index` counts the tokens of each row ([batch], or [periods, batch]).
Cross-attention caches hold the encoder keys and values, identical across
the beams of a row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import gin
import jax
import jax.numpy as jnp

from t5x_adapt.losses import token_log_probs

StepFn = Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]]
# (logits [b, vocab], rng) -> tokens [b].
SelectFn = Callable[[jax.Array, jax.Array], jax.Array]

METHODS = ('greedy', 'sample', 'beam')


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DecodeOptions:
  """How `predict_batch` picks tokens (hashable: a static `jit` argument).

  Attributes:
    method: 'greedy', 'sample' (needs an rng) or 'beam'.
    temperature: Sampling divides the logits by it; 0 is greedy.
    top_k: Sample among the `top_k` most likely tokens (0: all).
    top_p: Sample from the smallest set of most likely tokens whose
      probability (after temperature and top-k) reaches `top_p` (1: all).
    num_beams: Beam width.
    length_penalty: Beam search ranks a hypothesis by
      `sum(log p) / length ** length_penalty`, `length` counting its tokens
      with the EOS (as transformers does): 0 ranks by total log-probability,
      1 by mean log-probability per token.
  """

  method: str = 'greedy'
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  num_beams: int = 4
  length_penalty: float = 1.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f'method {self.method!r} is not one of {METHODS}')
    if self.temperature < 0 or self.top_k < 0 or self.num_beams < 1:
      raise ValueError(f'temperature and top_k must be >= 0, num_beams >= 1: '
                       f'{self}')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'top_p must be in (0, 1]: {self.top_p}')

  @property
  def beams(self) -> int:
    """Hypotheses per row: the batch multiplier of the step function."""
    return self.num_beams if self.method == 'beam' else 1


class Prefill(NamedTuple):
  """Where decoding starts: what a model hands to `decode`.

  Attributes:
    step: The cached step function, for `batch * beams` rows.
    first_logits: [batch, vocab] logits of the first generated token.
    cache: The cache after the prefill, for `batch` rows.
    next_positions: [batch] position of the first generated token.
    num_tokens: Tokens to generate.
  """

  step: StepFn
  first_logits: jax.Array
  cache: Any
  next_positions: jax.Array
  num_tokens: int


def right_align(tokens: jax.Array, valid: jax.Array,
                extra: Optional[jax.Array] = None):
  """Moves each row's valid tokens to the right end (left padding).

  Args:
    tokens: [b, t] tokens.
    valid: [b, t] bool, the tokens to keep (in order).
    extra: Optional [b, t] per-token features moved alongside.

  Returns:
    (tokens, valid as int32, extra), each [b, t], padding on the left.
  """
  # Stable sort: invalid tokens first, valid ones keep their order.
  order = jnp.argsort(valid.astype(jnp.int32), axis=-1, stable=True)
  gather = lambda x: jnp.take_along_axis(x, order, axis=-1)
  aligned_valid = gather(valid)
  aligned = jnp.where(aligned_valid, gather(tokens), 0)
  moved = None if extra is None else jnp.where(aligned_valid, gather(extra), 0)
  return aligned, aligned_valid.astype(jnp.int32), moved


# ------------------------------------------------------- token selection --


def greedy_select(logits: jax.Array, rng: jax.Array) -> jax.Array:
  """The most likely token: [b, vocab] -> [b]."""
  del rng
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def _nucleus(sorted_logits: jax.Array, top_p: float) -> jax.Array:
  """Masks (-inf) the tokens outside the top-p nucleus.

  Args:
    sorted_logits: [b, n] logits in descending order.
    top_p: Probability mass to keep: a float, or [b, 1] one per row.

  Returns:
    [b, n]: a token stays if the tokens before it hold less than `top_p`,
    so the most likely token always stays.
  """
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  return jnp.where(mass_before < top_p, sorted_logits, -jnp.inf)


def sample_select(logits: jax.Array, rng: jax.Array, temperature: float = 1.0,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Samples one token per row: [b, vocab] -> [b].

  Temperature applies first, then top-k, then top-p among the top-k (as
  transformers' warpers do). Temperature 0 is greedy.
  """
  if temperature == 0:
    return greedy_select(logits, rng)
  logits = logits.astype(jnp.float32) / temperature
  if top_k == 0 and top_p >= 1:
    return jax.random.categorical(rng, logits).astype(jnp.int32)
  # Candidates in descending order; top-p needs them sorted anyway.
  candidates, indices = jax.lax.top_k(logits, top_k or logits.shape[-1])
  if top_p < 1:
    candidates = _nucleus(candidates, top_p)
  choice = jax.random.categorical(rng, candidates)
  return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]


def sample_rows(logits: jax.Array, keys: jax.Array, temperature: jax.Array,
                top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """`sample_select` with settings and a key per row: [b, vocab] -> [b].

  Row r draws with `keys[r]` alone, so its token does not depend on the
  other rows (a serving engine's slots, each a request of its own). Its
  warpers are `sample_select`'s, as arrays: temperature [b] (0: greedy),
  top_k [b] (0: all), top_p [b] (1: all).
  """
  greedy = greedy_select(logits, None)
  scale = jnp.where(temperature > 0, temperature, 1.0)[:, None]
  # Every row sorted: top-k and top-p cut a prefix of the sorted logits.
  candidates, indices = jax.lax.top_k(logits.astype(jnp.float32) / scale,
                                      logits.shape[-1])
  rank = jnp.arange(logits.shape[-1])
  candidates = jnp.where((top_k[:, None] == 0) | (rank < top_k[:, None]),
                         candidates, -jnp.inf)
  candidates = _nucleus(candidates, top_p[:, None])
  choice = jax.vmap(jax.random.categorical)(keys, candidates)
  sampled = jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]
  return jnp.where(temperature > 0, sampled, greedy)


# ---------------------------------------------------- one token per row --


def token_loop(step: StepFn, first_logits: jax.Array, cache: Any,
               next_positions: jax.Array, num_tokens: int, eos_id: int,
               select: SelectFn, rng: Optional[jax.Array] = None):
  """Generates `num_tokens` tokens after a prefill, choosing with `select`.

  Args:
    step: The cached single-step function.
    first_logits: [b, vocab] logits of the prefill's last position.
    cache: The cache after the prefill.
    next_positions: [b] position of the first generated token.
    num_tokens: Tokens to generate.
    eos_id: End-of-sequence id; a row emits 0 (padding) after it.
    select: Picks tokens [b] from logits [b, vocab] and an rng.
    rng: Key of the whole loop; step i uses `fold_in(rng, i)`.

  Returns:
    (tokens [b, num_tokens], log_probs [b]): the model's (untempered)
    log-probability of each row's tokens up to and including its EOS.
  """
  rng = jax.random.PRNGKey(0) if rng is None else rng

  def choose(logits, i, done):
    token = jnp.where(done, 0, select(logits, jax.random.fold_in(rng, i)))
    log_prob = jnp.where(done, 0.0, token_log_probs(logits, token))
    return token.astype(jnp.int32), log_prob, done | (token == eos_id)

  batch = first_logits.shape[0]
  token, score, done = choose(first_logits, 0, jnp.zeros((batch,), bool))
  out = jnp.zeros((batch, num_tokens), jnp.int32).at[:, 0].set(token)

  def body(i, carry):
    out, token, score, done, cache = carry
    positions = (next_positions + i - 1)[:, None]
    logits, cache = step(token[:, None], positions, cache)
    token, log_prob, done = choose(logits, i, done)
    return out.at[:, i].set(token), token, score + log_prob, done, cache

  out, _, score, _, _ = jax.lax.fori_loop(1, num_tokens, body,
                                          (out, token, score, done, cache))
  return out, score


def greedy_loop(step: StepFn, first_logits: jax.Array, cache: Any,
                next_positions: jax.Array, num_tokens: int,
                eos_id: int) -> jax.Array:
  """Greedy decoding: `token_loop` with argmax; returns [b, num_tokens]."""
  return token_loop(step, first_logits, cache, next_positions, num_tokens,
                    eos_id, greedy_select)[0]


def sample_loop(step: StepFn, first_logits: jax.Array, cache: Any,
                next_positions: jax.Array, num_tokens: int, eos_id: int,
                rng: jax.Array, temperature: float = 1.0, top_k: int = 0,
                top_p: float = 1.0):
  """Temperature / top-k / top-p sampling (`sample_select`) in `token_loop`.

  Returns:
    (tokens [b, num_tokens], log_probs [b]), as `token_loop`.
  """
  select = functools.partial(sample_select, temperature=temperature,
                             top_k=top_k, top_p=top_p)
  return token_loop(step, first_logits, cache, next_positions, num_tokens,
                    eos_id, select, rng)


# ------------------------------------------------------------ beam search --


def cache_batch_axis(path, leaf) -> Optional[int]:
  """The batch axis of a cache leaf (`tree_map_with_path`'s path), or None
  for a leaf shared by all rows."""
  keys = [getattr(entry, 'key', None) for entry in path]
  # `layers` is the layer scan of `t5x_adapt.layers.stack.Stack`: its caches
  # are [periods, batch, ...].
  axis = 1 if 'layers' in keys else 0
  return axis if leaf.ndim > axis else None


def _map_cache_rows(fn, cache: Any, skip_cross_attention: bool = False):
  """Applies `fn(leaf, axis)` to each cache leaf that has a batch axis."""
  def apply(path, leaf):
    axis = cache_batch_axis(path, leaf)
    keys = [getattr(e, 'key', '') or '' for e in path]
    # Cross-attention's cache, and merged attention's encoder keys.
    cross = 'cross_attention' in keys or keys[-1].startswith('encoder_')
    if axis is None or (skip_cross_attention and cross):
      return leaf
    return fn(leaf, axis)
  return jax.tree_util.tree_map_with_path(apply, cache)


def repeat_cache(cache: Any, num_beams: int) -> Any:
  """Each row's cache `num_beams` times in a row: batch b -> b * num_beams."""
  return _map_cache_rows(
      lambda leaf, axis: jnp.repeat(leaf, num_beams, axis=axis), cache)


def reorder_cache(cache: Any, rows: jax.Array) -> Any:
  """Row i of the new cache is row `rows[i]` of `cache`.

  Caches of the encoder keys stay: a row's beams share its encoder output.
  """
  return _map_cache_rows(lambda leaf, axis: jnp.take(leaf, rows, axis=axis),
                         cache, skip_cross_attention=True)


def length_normalize(log_probs: jax.Array, length: jax.Array,
                     length_penalty: float) -> jax.Array:
  """`log_probs / length ** length_penalty` (transformers' beam score)."""
  return log_probs / jnp.asarray(length, jnp.float32) ** length_penalty


class BeamState(NamedTuple):
  """Beam search hypotheses of b rows and k beams, n tokens long.

  Attributes:
    alive_tokens: [b, k, n] hypotheses without EOS (0 after the last token
      so far).
    alive_log_probs: [b, k] their log-probabilities (-inf: empty beam).
    finished_tokens: [b, k, n] hypotheses that ended with EOS (0 after it),
      best first.
    finished_scores: [b, k] their length-normalised scores (-inf: none).
    done: [b] the row has `k` finished hypotheses.
  """

  alive_tokens: jax.Array
  alive_log_probs: jax.Array
  finished_tokens: jax.Array
  finished_scores: jax.Array
  done: jax.Array


def _take_beams(tokens: jax.Array, index: jax.Array) -> jax.Array:
  """Gathers hypotheses: tokens [b, m, n], index [b, k] -> [b, k, n]."""
  return jnp.take_along_axis(tokens, index[..., None], axis=1)


def _best(tokens: jax.Array, scores: jax.Array, k: int):
  """The k best of m hypotheses: [b, m, n], [b, m] -> [b, k, n], [b, k]."""
  scores, index = jax.lax.top_k(scores, k)
  return _take_beams(tokens, index), scores


def _beam_step(state: BeamState, logits: jax.Array, i, eos_id: int,
               length_penalty: float):
  """Extends every alive hypothesis by one token (token index `i`).

  Like fairseq: the best 2k extensions of all k beams are candidates (so at
  least k do not end in EOS); those among the best k that end in EOS finish,
  the best k that do not stay alive. Finishing only from the best k makes
  beam 1 exactly greedy.

  Args:
    state: Hypotheses before token `i`.
    logits: [b, k, vocab] logits of token `i` for each alive hypothesis.
    i: Index of the new token.
    eos_id: End-of-sequence id.
    length_penalty: Exponent of the length normalisation.

  Returns:
    (new state, [b, k] the alive beam each new alive hypothesis extends).
  """
  batch, k, vocab = logits.shape
  log_probs = (state.alive_log_probs[..., None] +
               jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
  log_probs, index = jax.lax.top_k(log_probs.reshape(batch, k * vocab), 2 * k)
  parent, token = index // vocab, (index % vocab).astype(jnp.int32)
  candidates = _take_beams(state.alive_tokens, parent).at[:, :, i].set(token)
  is_eos = token == eos_id

  finishing = is_eos & (jnp.arange(2 * k) < k) & ~state.done[:, None]
  scores = jnp.where(finishing,
                     length_normalize(log_probs, i + 1, length_penalty),
                     -jnp.inf)
  finished_tokens, finished_scores = _best(
      jnp.concatenate([state.finished_tokens, candidates], axis=1),
      jnp.concatenate([state.finished_scores, scores], axis=1), k)

  alive_log_probs, pick = jax.lax.top_k(
      jnp.where(is_eos, -jnp.inf, log_probs), k)
  new_state = BeamState(
      _take_beams(candidates, pick), alive_log_probs, finished_tokens,
      finished_scores, state.done | (finished_scores[:, -1] > -jnp.inf))
  return new_state, jnp.take_along_axis(parent, pick, axis=1)


def _initial_beams(batch: int, k: int, num_tokens: int) -> BeamState:
  tokens = jnp.zeros((batch, k, num_tokens), jnp.int32)
  # One live beam: the others would only duplicate it.
  alive = jnp.full((batch, k), -jnp.inf).at[:, 0].set(0.0)
  return BeamState(tokens, alive, tokens, jnp.full((batch, k), -jnp.inf),
                   jnp.zeros((batch,), bool))


def beam_search(step: StepFn, first_logits: jax.Array, cache: Any,
                next_positions: jax.Array, num_tokens: int, eos_id: int,
                num_beams: int, length_penalty: float = 1.0):
  """Batched beam search after a prefill.

  Hypotheses rank by `sum(log p) / length ** length_penalty` (`length`:
  generated tokens, EOS included). A row stops once it holds `num_beams`
  finished hypotheses (transformers' `early_stopping=True`); the loop stops
  when every row has, or after `num_tokens` tokens, when the hypotheses
  still alive compete with the finished ones (length `num_tokens`).

  Args:
    step: The cached single-step function, on `batch * num_beams` rows.
    first_logits: [b, vocab] logits of the prefill's last position.
    cache: The cache after the prefill, on `b` rows (repeated here).
    next_positions: [b] position of the first generated token.
    num_tokens: Tokens to generate.
    eos_id: End-of-sequence id; hypotheses have 0 after it.
    num_beams: Beam width k.
    length_penalty: Exponent of the length normalisation.

  Returns:
    (tokens [b, k, num_tokens], scores [b, k]), best first.
  """
  batch, vocab = first_logits.shape
  k = num_beams
  positions = jnp.repeat(next_positions, k)[:, None] - 1
  beam_step = functools.partial(_beam_step, eos_id=eos_id,
                                length_penalty=length_penalty)
  # All beams start from the prefill, so the first choice needs no reorder.
  state, _ = beam_step(_initial_beams(batch, k, num_tokens),
                       jnp.broadcast_to(first_logits[:, None],
                                        (batch, k, vocab)), 0)

  def cond(carry):
    i, state, _ = carry
    return (i < num_tokens) & ~jnp.all(state.done)

  def body(carry):
    i, state, cache = carry
    tokens = state.alive_tokens[:, :, i - 1].reshape(batch * k, 1)
    logits, cache = step(tokens, positions + i, cache)
    state, parent = beam_step(state, logits.reshape(batch, k, vocab), i)
    rows = (parent + k * jnp.arange(batch)[:, None]).reshape(-1)
    return i + 1, state, reorder_cache(cache, rows)

  _, state, _ = jax.lax.while_loop(cond, body,
                                   (1, state, repeat_cache(cache, k)))
  # Rows without k finished hypotheses also rank their alive ones.
  alive_scores = jnp.where(
      state.done[:, None], -jnp.inf,
      length_normalize(state.alive_log_probs, num_tokens, length_penalty))
  return _best(
      jnp.concatenate([state.finished_tokens, state.alive_tokens], axis=1),
      jnp.concatenate([state.finished_scores, alive_scores], axis=1), k)


# --------------------------------------------------------------- dispatch --


def decode(prefill: Prefill, options: DecodeOptions, eos_id: int,
           rng: Optional[jax.Array] = None):
  """Runs the decoding method of `options` from `prefill`.

  Returns:
    (tokens, scores): greedy and sampling [b, n] and the log-probabilities
    [b] of the tokens up to EOS; beam search [b, k, n] and the
    length-normalised scores [b, k], best first.
  """
  args = (prefill.step, prefill.first_logits, prefill.cache,
          prefill.next_positions, prefill.num_tokens, eos_id)
  if options.method == 'beam':
    return beam_search(*args, options.num_beams, options.length_penalty)
  if options.method == 'greedy':
    return token_loop(*args, greedy_select)
  if rng is None:
    raise ValueError("decode method 'sample' needs an rng")
  return sample_loop(*args, rng, options.temperature, options.top_k,
                     options.top_p)

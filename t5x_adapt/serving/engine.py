"""Continuous batching over a fixed table of decode slots.

The engine keeps `num_slots` rows of decoding state (the model's cache, the
last token and position of each row, its sampling settings and key) and
loops:

  1. admit: each free slot takes the oldest waiting request. Its input is
     padded to a length bucket and prefilled alone (`model.prefill`): an
     encoder-decoder runs its encoder once for the request and caches the
     encoder's keys and values of every decoder layer (cross or merged
     attention); a decoder-only model runs its prompt into the cache. The
     prefill's row is written into the slot (an encoder key cache shorter
     than the table's is padded: padding is masked) and its first token is
     chosen;
  2. decode: one compiled step (`model.decode_step`) feeds every slot's last
     token at the slot's own position (caches keep one index per row), and
     picks each row's next token with the row's settings and key;
  3. retire: a request that met a stop condition (EOS, `max_tokens`, a stop
     string) or was cancelled frees its slot, which the next admission
     refills.

Steps are pipelined: step n + 1 is dispatched, reading step n's tokens
where they lie on the device, before the host hands out step n's tokens and
retires its requests, so that host work overlaps the device's. A request
that ends at step n has had step n + 1 computed for it as well; that token
is dropped (its slot was still occupied when the step was dispatched).

So a finished request never waits for the batch, a new one never waits for a
batch to end, and every mix of slots runs the same compiled step. Prefills
compile once per bucket. Sampling is reproducible per request: token i of a
request draws with `fold_in(PRNGKey(seed), i)` (`decoding.sample_rows`),
whatever else is in the table.

Written here rather than taken from a library: the JAX serving engines
(JetStream, MaxText's) and vLLM serve decoder-only models only; the engine
reuses the project's own model, cache and sampler, so what it decodes is
what `predict_batch` decodes (`tests/test_serving_engine.py`).

Thread use: `submit` and `cancel` may be called from any thread; one thread
runs `step` (or `run_forever`). `generate` is the synchronous Python API.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from t5x_adapt import decoding
from t5x_adapt.data.vocab import EOS_ID

FINISH_STOP = 'stop'  # EOS or a stop string (OpenAI's reason).
FINISH_LENGTH = 'length'  # max_tokens.
FINISH_ABORT = 'abort'  # cancelled (a client that went away).
FINISH_ERROR = 'error'  # the engine failed (logged).


class RequestError(ValueError):
  """A request the engine cannot serve; `field` names the culprit."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


class QueueFull(RuntimeError):
  """More waiting requests than the engine's queue holds."""


class Draining(RuntimeError):
  """The engine finishes what it has and takes no new request."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request picks its tokens and when it stops.

  Attributes:
    max_tokens: Tokens to generate at most.
    temperature: 0 is greedy; otherwise logits are divided by it and
      sampled.
    top_k: Sample among the `top_k` most likely tokens (0: all).
    top_p: Sample from the smallest set of most likely tokens holding
      `top_p` of the probability (1: all).
    seed: Seeds this request's draws (None: a fresh seed per request).
    stop: Strings that end the completion (not included in it).
    ignore_eos: Keep generating after EOS (benchmarks).
  """

  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: Optional[int] = None
  stop: tuple[str, ...] = ()
  ignore_eos: bool = False

  def check(self, max_new_tokens: int) -> None:
    """Raises `RequestError` naming the first invalid field."""
    if not 0 < self.max_tokens <= max_new_tokens:
      raise RequestError('max_tokens', f'max_tokens must be in [1, '
                         f'{max_new_tokens}] (the server\'s limit), got '
                         f'{self.max_tokens}')
    if self.temperature < 0:
      raise RequestError('temperature', 'temperature must be >= 0, got '
                         f'{self.temperature}')
    if self.top_k < 0:
      raise RequestError('top_k', f'top_k must be >= 0, got {self.top_k}')
    if not 0 < self.top_p <= 1:
      raise RequestError('top_p', f'top_p must be in (0, 1], got '
                         f'{self.top_p}')
    if any(not s for s in self.stop):
      raise RequestError('stop', 'stop strings must not be empty')


@dataclasses.dataclass
class Output:
  """What a request has produced so far (handed to its callback).

  Attributes:
    request_id: The request.
    token_ids: Every generated token so far (EOS excluded).
    new_token_ids: Those added since the previous output.
    text: The completion's text so far (with a vocabulary), cut before a
      stop string; held back while it may still become one.
    new_text: Text added since the previous output.
    finish_reason: None while running; 'stop', 'length' or 'abort'.
    prompt_tokens: Tokens of the request's input.
  """

  request_id: str
  token_ids: list[int]
  new_token_ids: list[int]
  text: str
  new_text: str
  finish_reason: Optional[str]
  prompt_tokens: int

  @property
  def finished(self) -> bool:
    return self.finish_reason is not None


@dataclasses.dataclass
class Request:
  """A prompt (token ids) and how to continue it."""

  request_id: str
  prompt_ids: list[int]
  sampling: SamplingParams
  on_output: Callable[[Output], None] = lambda output: None
  arrival: float = dataclasses.field(default_factory=time.monotonic)


@dataclasses.dataclass
class _Running:
  """A request in a slot."""

  request: Request
  token_ids: list[int] = dataclasses.field(default_factory=list)
  text_sent: int = 0  # Characters of text handed out.


@dataclasses.dataclass
class Stats:
  """Counters for /metrics (read without a lock: each is one int/float)."""

  waiting: int = 0
  busy_slots: int = 0
  num_slots: int = 0
  requests_finished: int = 0
  requests_cancelled: int = 0  # Stopped before they finished.
  tokens_generated: int = 0
  decode_steps: int = 0
  # Seconds from arrival to the first token, of the latest requests.
  time_to_first_token: collections.deque[float] = dataclasses.field(
      default_factory=lambda: collections.deque(maxlen=10_000))
  # (time, tokens_generated) after each decode step, the latest ones.
  progress: collections.deque[tuple[float, int]] = dataclasses.field(
      default_factory=lambda: collections.deque(maxlen=100_000))

  def tokens_per_second(self, window_s: float = 10.0) -> float:
    """Generated tokens a second over the last `window_s` seconds."""
    now = time.monotonic()
    recent = [(t, n) for t, n in list(self.progress) if now - t <= window_s]
    if len(recent) < 2:
      return 0.0
    (t0, n0), (t1, n1) = recent[0], recent[-1]
    return (n1 - n0) / max(t1 - t0, 1e-9)


def default_buckets(max_prompt_length: int, smallest: int = 16) -> list[int]:
  """Powers of two from `smallest` and the midpoints between them (16, 24,
  32, 48, 64, 96, ...), ending with `max_prompt_length`: a prompt is padded
  by less than a third of its length, with two compilations an octave."""
  buckets = []
  length = smallest
  while length < max_prompt_length:
    buckets += [n for n in (length, length * 3 // 2) if n < max_prompt_length]
    length *= 2
  return buckets + [max_prompt_length]


class Engine:
  """Continuous batching of one model's requests (see the module docstring).

  Args:
    model: A `t5x_adapt.models` model.
    params: Its parameters (placed: on one device or sharded over a mesh;
      the compiled functions follow their layout).
    num_slots: Rows decoded together.
    max_prompt_length: Longest input (tokens) a request may have.
    max_new_tokens: Most tokens a request may ask for.
    buckets: Input lengths the prefill compiles for (ascending, the last
      `max_prompt_length`); default `default_buckets`.
    vocabulary: Turns tokens into text (a `seqio.Vocabulary`); needed for
      stop strings and text outputs.
    max_waiting: Waiting requests held at most (`QueueFull` beyond).
    eos_id: End of sequence.
    partitioner: The mesh and logical-axis rules `params` are sharded by;
      the compiled functions are traced in its context, so the model's
      activation constraints hold (the slots split over the batch axes).
  """

  def __init__(self, model, params, *, num_slots: int = 8,
               max_prompt_length: int = 512, max_new_tokens: int = 256,
               buckets: Optional[Sequence[int]] = None,
               vocabulary: Any = None, max_waiting: int = 1024,
               eos_id: int = EOS_ID, partitioner: Any = None):
    self.model, self.params = model._decoding_model(params)  # pylint: disable=protected-access
    self.num_slots = num_slots
    self.max_prompt_length = max_prompt_length
    self.max_new_tokens = max_new_tokens
    self.buckets = list(buckets or default_buckets(max_prompt_length))
    if self.buckets != sorted(self.buckets) or (
        self.buckets[-1] != max_prompt_length):
      raise ValueError(f'buckets {self.buckets} must ascend to '
                       f'max_prompt_length {max_prompt_length}')
    self.vocabulary = vocabulary
    self.max_waiting = max_waiting
    self.eos_id = eos_id
    self.cache_length = self.model.decode_cache_length(max_prompt_length,
                                                       max_new_tokens)
    self.stats = Stats(num_slots=num_slots)
    self.draining = False

    self._lock = threading.Condition()
    self._waiting: collections.deque[Request] = collections.deque()
    self._cancelled: set[str] = set()
    self._slots: list[Optional[_Running]] = [None] * num_slots
    self._ids = itertools.count()
    # Host copies of the per-slot inputs of the decode step. A slot admitted
    # since the last dispatch feeds its first token from `_tokens`; the
    # others feed the previous step's token, still on the device.
    self._tokens = np.zeros(num_slots, np.int32)
    self._fresh = np.zeros(num_slots, bool)
    self._positions = np.zeros(num_slots, np.int32)
    self._keys = np.zeros((num_slots, 2), np.uint32)
    self._counts = np.zeros(num_slots, np.int32)
    self._temperature = np.zeros(num_slots, np.float32)
    self._top_k = np.zeros(num_slots, np.int32)
    self._top_p = np.ones(num_slots, np.float32)

    self.partitioner = partitioner
    self._prefill = self._on_mesh(jax.jit(self._prefill_fn))
    self._insert = self._on_mesh(jax.jit(self._insert_fn, donate_argnums=0))
    self._step = self._on_mesh(jax.jit(self._step_fn, donate_argnums=1))
    with self._context():
      self._cache = self._empty_table()
    # The step dispatched last: its tokens (on the device) and the requests
    # in its slots when it was dispatched.
    self._in_flight: Optional[tuple[jax.Array,
                                    list[Optional[_Running]]]] = None

  # ------------------------------------------------ compiled functions --

  def _context(self):
    return (self.partitioner.context() if self.partitioner is not None
            else contextlib.nullcontext())

  def _on_mesh(self, jitted):
    """`jitted`, called (and so traced) in the partitioner's context."""
    def call(*args):
      with self._context():
        return jitted(*args)
    return call

  def _select(self, logits, keys, counts, temperature, top_k, top_p):
    """Each row's token: greedy, or drawn with fold_in(key, count)."""
    step_keys = jax.vmap(jax.random.fold_in)(keys, counts)
    return jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: decoding.sample_rows(logits, step_keys, temperature, top_k,
                                     top_p),
        lambda: decoding.greedy_select(logits, None))

  def _prefill_fn(self, params, tokens, keys, temperature, top_k, top_p):
    """Input tokens [n, bucket] -> (first tokens [n], cache rows,
    next positions [n])."""
    logits, cache, next_positions = self.model.prefill(
        params, {self.model.INPUTS_FEATURE: tokens}, self.cache_length)
    first = self._select(logits, keys, jnp.zeros_like(next_positions),
                         temperature, top_k, top_p)
    return first, cache, next_positions

  @staticmethod
  def _insert_fn(table, rows, slot):
    """Writes prefill `rows` (batch 1) into row `slot` of the table,
    padding each leaf's other axes up to the table's (an encoder key cache
    of a shorter bucket: zero keys with segment id 0, masked)."""
    def put(path, leaf, row):
      axis = decoding.cache_batch_axis(path, leaf)
      pad = [(0, 0) if i == axis else (0, size - row.shape[i])
             for i, size in enumerate(leaf.shape)]
      start = [0] * leaf.ndim
      start[axis] = slot
      return jax.lax.dynamic_update_slice(
          leaf, jnp.pad(row, pad).astype(leaf.dtype), start)
    return jax.tree_util.tree_map_with_path(put, table, rows)

  def _step_fn(self, params, cache, previous, tokens, fresh, positions,
               keys, counts, temperature, top_k, top_p):
    """Feeds `tokens` where `fresh`, else the `previous` step's tokens."""
    tokens = jnp.where(fresh, tokens, previous)
    logits, cache = self.model.decode_step(params, tokens[:, None],
                                           positions[:, None], cache)
    return self._select(logits, keys, counts, temperature, top_k,
                        top_p), cache

  def _empty_table(self):
    """The slot table's cache: a prefill row's shapes at the longest
    bucket, `num_slots` rows, every slot empty (position -1)."""
    one = lambda dtype: jax.ShapeDtypeStruct((1,), dtype)
    _, rows, _ = jax.eval_shape(
        self._prefill_fn, self.params,
        jax.ShapeDtypeStruct((1, self.buckets[-1]), jnp.int32),
        jax.ShapeDtypeStruct((1, 2), jnp.uint32), one(jnp.float32),
        one(jnp.int32), one(jnp.float32))

    def empty(path, row):
      shape = list(row.shape)
      shape[decoding.cache_batch_axis(path, row)] = self.num_slots
      fill = -1 if getattr(path[-1], 'key', '') == 'cached_positions' else 0
      return jnp.full(shape, fill, row.dtype)
    return jax.tree_util.tree_map_with_path(empty, rows)

  # ------------------------------------------------------- requests --

  def bucket(self, length: int) -> int:
    """The compiled input length a `length`-token input is padded to."""
    return self.buckets[bisect.bisect_left(self.buckets, length)]

  def check_prompt(self, prompt_ids: Sequence[int]) -> None:
    """Raises `RequestError` for an input the engine cannot take."""
    if not prompt_ids:
      raise RequestError('prompt', 'the prompt is empty')
    if len(prompt_ids) > self.max_prompt_length:
      raise RequestError(
          'prompt', f'the prompt has {len(prompt_ids)} tokens; this '
          f'server takes at most {self.max_prompt_length} '
          '(max_prompt_length)')
    if min(prompt_ids) <= 0:
      raise RequestError('prompt', 'token ids must be > 0 (0 is padding)')

  def submit(self, prompt_ids: Sequence[int], sampling: SamplingParams,
             on_output: Callable[[Output], None] = lambda output: None,
             request_id: Optional[str] = None) -> str:
    """Queues a request; returns its id.

    Raises:
      RequestError: an invalid prompt or setting (the field is named).
      QueueFull: `max_waiting` requests are waiting.
      Draining: the engine takes no new requests.
    """
    self.check_prompt(prompt_ids)
    sampling.check(self.max_new_tokens)
    if sampling.stop and self.vocabulary is None:
      raise RequestError('stop', 'stop strings need a vocabulary')
    if request_id is None:
      request_id = f'req-{next(self._ids)}'
    with self._lock:
      if self.draining:
        raise Draining('the server is shutting down')
      if len(self._waiting) >= self.max_waiting:
        raise QueueFull(f'{len(self._waiting)} requests are waiting (the '
                        f'queue holds {self.max_waiting})')
      self._waiting.append(Request(request_id, list(prompt_ids), sampling,
                                   on_output))
      self.stats.waiting = len(self._waiting)
      self._lock.notify()
    return request_id

  def cancel(self, request_id: str) -> None:
    """Stops a request (waiting or running); its slot is freed."""
    with self._lock:
      self._cancelled.add(request_id)
      self._lock.notify()

  @property
  def has_work(self) -> bool:
    return (bool(self._waiting) or any(s is not None for s in self._slots)
            or self._in_flight is not None)

  # ----------------------------------------------------------- the loop --

  def step(self) -> None:
    """Admits waiting requests into free slots, dispatches a decode step
    for every busy slot, then hands out the previous step's tokens and
    retires the requests they finish."""
    self._drop_cancelled()
    self._admit()
    previous, self._in_flight = self._in_flight, None
    if any(s is not None for s in self._slots):
      self._in_flight = self._dispatch(previous)
    if previous is not None:
      self._hand_out(*previous)
    self.stats.busy_slots = sum(s is not None for s in self._slots)

  def run_forever(self, stop: threading.Event) -> None:
    """Steps while there is work, sleeps while there is none, until
    `stop` is set. A step that fails ends the requests in the slots (reason
    'error', logged) and the loop goes on with the others."""
    while not stop.is_set():
      with self._lock:
        if not self.has_work and not self._cancelled:
          self._lock.wait(timeout=0.1)
          continue
      try:
        self.step()
      except Exception:  # pylint: disable=broad-except
        logging.exception('engine step failed; ending the running requests')
        self._in_flight = None
        for slot, running in enumerate(self._slots):
          if running is not None:
            self._finish(slot, FINISH_ERROR, text='')

  def wake(self) -> None:
    with self._lock:
      self._lock.notify()

  def generate(self, prompts: Sequence[Sequence[int]],
               sampling: SamplingParams | Sequence[SamplingParams]
               ) -> list[Output]:
    """The final outputs of `prompts` (token ids), in order.

    The synchronous API: call it from the thread that would run `step`.
    """
    if isinstance(sampling, SamplingParams):
      sampling = [sampling] * len(prompts)
    finals = {}

    def keep(output):
      if output.finished:
        finals[output.request_id] = output
    ids = [self.submit(p, s, keep) for p, s in zip(prompts, sampling)]
    while len(finals) < len(ids):
      self.step()
    return [finals[i] for i in ids]

  def warmup(self) -> None:
    """Compiles every prefill bucket and the decode step (a two-token
    request per bucket), then clears the counters."""
    self.generate([[3] * length for length in self.buckets],
                  SamplingParams(max_tokens=2, ignore_eos=True))
    self.stats = Stats(num_slots=self.num_slots)

  def _drop_cancelled(self):
    with self._lock:
      cancelled, self._cancelled = self._cancelled, set()
      if not cancelled:
        return
      dropped = [r for r in self._waiting if r.request_id in cancelled]
      self._waiting = collections.deque(
          r for r in self._waiting if r.request_id not in cancelled)
      self.stats.waiting = len(self._waiting)
    for request in dropped:
      self.stats.requests_finished += 1
      self.stats.requests_cancelled += 1
      request.on_output(Output(request.request_id, [], [], '', '',
                               FINISH_ABORT, len(request.prompt_ids)))
    for slot, running in enumerate(self._slots):
      if running is not None and running.request.request_id in cancelled:
        self.stats.requests_cancelled += 1
        self._finish(slot, FINISH_ABORT)

  def _next_waiting(self) -> Optional[Request]:
    with self._lock:
      request = self._waiting.popleft() if self._waiting else None
      self.stats.waiting = len(self._waiting)
    return request

  def _admit(self):
    for slot in range(self.num_slots):
      if self._slots[slot] is not None:
        continue
      request = self._next_waiting()
      if request is None:
        return
      self._start(slot, request)

  def _start(self, slot: int, request: Request):
    """Prefills `request` into `slot` and hands out its first token."""
    sampling = request.sampling
    seed = (sampling.seed if sampling.seed is not None
            else np.random.randint(2**31))
    key = np.asarray(jax.random.PRNGKey(seed), np.uint32)
    tokens = np.zeros((1, self.bucket(len(request.prompt_ids))), np.int32)
    tokens[0, :len(request.prompt_ids)] = request.prompt_ids
    settings = (np.float32([sampling.temperature]),
                np.int32([sampling.top_k]), np.float32([sampling.top_p]))
    first, rows, next_positions = self._prefill(self.params, tokens,
                                                key[None], *settings)
    self._cache = self._insert(self._cache, rows, slot)
    self._slots[slot] = _Running(request)
    self._fresh[slot] = True
    self._keys[slot] = key
    self._positions[slot] = int(next_positions[0])
    self._counts[slot] = 1
    for array, value in zip(
        (self._temperature, self._top_k, self._top_p), settings):
      array[slot] = value[0]
    self.stats.time_to_first_token.append(time.monotonic() - request.arrival)
    self._emit(slot, int(first[0]))

  def _dispatch(self, previous):
    """Starts a decode step of every slot; returns (its tokens, the
    requests in its slots) without waiting for it."""
    previous_tokens = (previous[0] if previous is not None
                       else np.zeros_like(self._tokens))
    # Copies: the host arrays change while the step may still read them (a
    # CPU device may use a NumPy argument's memory in place).
    host = [array.copy() for array in (
        self._tokens, self._fresh, self._positions, self._keys, self._counts,
        self._temperature, self._top_k, self._top_p)]
    tokens, self._cache = self._step(self.params, self._cache,
                                     previous_tokens, *host)
    self._fresh[:] = False
    busy = [running is not None for running in self._slots]
    self._positions += busy
    self._counts += busy
    self.stats.decode_steps += 1
    return tokens, list(self._slots)

  def _hand_out(self, tokens: jax.Array,
                occupants: list[Optional[_Running]]) -> None:
    """Emits a finished step's tokens to the requests it decoded for that
    still hold their slots."""
    tokens = np.asarray(tokens)
    for slot, running in enumerate(occupants):
      if running is not None and self._slots[slot] is running:
        self._emit(slot, int(tokens[slot]))
    self.stats.progress.append((time.monotonic(),
                                self.stats.tokens_generated))

  # ------------------------------------------------------------ outputs --

  def _emit(self, slot: int, token: int):
    """Takes the slot's new token; retires the request if it is done."""
    running = self._slots[slot]
    sampling = running.request.sampling
    self._tokens[slot] = token
    if token == self.eos_id and not sampling.ignore_eos:
      self._finish(slot, FINISH_STOP)
      return
    running.token_ids.append(token)
    self.stats.tokens_generated += 1
    text, stopped = self._text(running)
    if stopped:
      self._finish(slot, FINISH_STOP, text, new_tokens=[token])
    elif len(running.token_ids) >= sampling.max_tokens:
      self._finish(slot, FINISH_LENGTH, text, new_tokens=[token])
    else:
      self._send(running, [token], self._safe_prefix(text, sampling), None)

  def _text(self, running: _Running) -> tuple[str, bool]:
    """(text so far, cut before a stop string; whether one was met)."""
    if self.vocabulary is None:
      return '', False
    text = self.vocabulary.decode(running.token_ids)
    cuts = [text.find(s) for s in running.request.sampling.stop]
    cuts = [c for c in cuts if c >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)

  @staticmethod
  def _safe_prefix(text: str, sampling: SamplingParams) -> str:
    """The text that can be handed out while decoding goes on: not the
    tail that may become a stop string, nor a half-decoded character."""
    hold = max((len(s) - 1 for s in sampling.stop), default=0)
    safe = text[:len(text) - hold] if hold else text
    return safe.rstrip('\ufffd')

  def _send(self, running: _Running, new_tokens: list[int], text: str,
            finish_reason: Optional[str]):
    new_text = text[running.text_sent:] if len(text) > running.text_sent \
        else ''
    running.text_sent = max(running.text_sent, len(text))
    request = running.request
    request.on_output(Output(request.request_id, list(running.token_ids),
                             new_tokens, text, new_text, finish_reason,
                             len(request.prompt_ids)))

  def _finish(self, slot: int, reason: str, text: Optional[str] = None,
              new_tokens: Sequence[int] = ()):
    running = self._slots[slot]
    if text is None:
      text = self._text(running)[0]
    self._slots[slot] = None
    self.stats.requests_finished += 1
    self._send(running, list(new_tokens), text, reason)

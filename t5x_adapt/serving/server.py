"""The OpenAI-compatible HTTP API over an `Engine` (FastAPI).

  POST /v1/completions        a prompt (text or token ids) -> a completion;
                              `stream` sends server-sent events
  POST /v1/chat/completions   messages in Gemma's turn template
                              (`data.sft.chat_parts`)
  POST /v1/embeddings         `BaseModel.embed`: the encoder's final-normed
                              states (a decoder-only model's last layer's)
                              averaged over the input tokens, L2-normalised
  GET  /v1/models, /health, /metrics (Prometheus' text format)

The engine runs in a thread of its own (`EngineThread`); a request hands it
a callback that puts the request's outputs on the request's asyncio queue.
Errors use OpenAI's body (`protocol.error`): 400 for an invalid or too long
request (the field named), 404 for another model's name, 429 when the queue
is full, 503 while draining. A client that goes away cancels its request,
which frees its slot; nothing else is affected.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import time
import uuid
from typing import Any, AsyncIterator, Optional, Sequence

import fastapi
from fastapi import responses
from fastapi.exceptions import RequestValidationError
import jax
import numpy as np
import prometheus_client
from prometheus_client import core as prometheus_core
from starlette import exceptions as starlette_exceptions

from t5x_adapt.data import sft
from t5x_adapt.serving import protocol
from t5x_adapt.serving.engine import (FINISH_ERROR, Draining, Engine,
                                      QueueFull, RequestError)

# How often a waiting handler checks that its client is still there.
DISCONNECT_POLL_S = 0.5


class EngineThread:
  """Runs `engine.run_forever` in a daemon thread."""

  def __init__(self, engine: Engine):
    self.engine = engine
    self._stop = threading.Event()
    self._thread = threading.Thread(target=engine.run_forever,
                                    args=(self._stop,), daemon=True,
                                    name='engine')

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    self._stop.set()
    self.engine.wake()
    self._thread.join()


class _EngineCollector:
  """The engine's counters, read at each scrape."""

  def __init__(self, engine: Engine):
    self.engine = engine

  def collect(self):
    stats = self.engine.stats
    gauge, counter = (prometheus_core.GaugeMetricFamily,
                      prometheus_core.CounterMetricFamily)
    yield gauge('t5x_adapt_queue_length', 'Requests waiting for a slot.',
                value=stats.waiting)
    yield gauge('t5x_adapt_slots_busy', 'Decode slots holding a request.',
                value=stats.busy_slots)
    yield gauge('t5x_adapt_slots', 'Decode slots.', value=stats.num_slots)
    yield gauge('t5x_adapt_tokens_per_second',
                'Generated tokens a second over the last 10 seconds.',
                value=stats.tokens_per_second())
    yield counter('t5x_adapt_generated_tokens', 'Tokens generated.',
                  value=stats.tokens_generated)
    yield counter('t5x_adapt_requests_finished', 'Requests finished.',
                  value=stats.requests_finished)
    yield counter('t5x_adapt_requests_cancelled',
                  'Requests stopped before they finished (a client gone).',
                  value=stats.requests_cancelled)
    yield counter('t5x_adapt_decode_steps', 'Decode steps run.',
                  value=stats.decode_steps)


class Embedder:
  """`model.embed` of the engine's model on token-id inputs, compiled per
  length bucket of the engine."""

  def __init__(self, engine: Engine):
    self.engine = engine
    model = engine.model
    self._embed = jax.jit(lambda params, tokens: model.embed(
        params, {model.INPUTS_FEATURE: tokens}))
    self.lock = threading.Lock()

  def warmup(self) -> None:
    """Compiles every bucket."""
    for length in self.engine.buckets:
      self([[3] * length])

  def __call__(self, inputs: Sequence[Sequence[int]]) -> np.ndarray:
    longest = max(len(ids) for ids in inputs)
    tokens = np.zeros((len(inputs), self.engine.bucket(longest)), np.int32)
    for row, ids in enumerate(inputs):
      tokens[row, :len(ids)] = ids
    with self.lock:
      return np.asarray(self._embed(self.engine.params, tokens))


def _validation_message(error: RequestValidationError) -> tuple[str, str]:
  """(message, param) of pydantic's first complaint, in plain words."""
  first = error.errors()[0]
  where = [str(part) for part in first.get('loc', ()) if part != 'body']
  param = '.'.join(where) or None
  kind = first.get('type', '')
  if kind == 'json_invalid':
    return f'malformed JSON: {first.get("msg", "")}', None
  if kind == 'extra_forbidden':
    return f'unknown parameter {param!r}', param
  if kind == 'missing':
    return f'missing parameter {param!r}', param
  return f'{param}: {first.get("msg", "invalid")}', param


class Server:
  """The API of one model (see the module docstring).

  Args:
    engine: The engine (run by an `EngineThread`).
    embedder: Embeddings of token ids.
    vocabulary: Tokenizes prompts, detokenizes completions.
    model_name: The model's name in the API.
    add_eos: End text prompts with EOS (an encoder input as in training).
    default_max_tokens: `max_tokens` of a request that names none.
  """

  def __init__(self, engine: Engine, embedder: Embedder, vocabulary: Any,
               model_name: str, add_eos: bool = False,
               default_max_tokens: int = 16):
    self.engine = engine
    self.embedder = embedder
    self.vocabulary = vocabulary
    self.model_name = model_name
    self.add_eos = add_eos
    self.default_max_tokens = min(default_max_tokens, engine.max_new_tokens)
    self.registry = prometheus_client.CollectorRegistry()
    self.registry.register(_EngineCollector(engine))
    self.time_to_first_token = prometheus_client.Histogram(
        't5x_adapt_time_to_first_token_seconds',
        'Seconds from a request\'s arrival to its first token.',
        buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
        registry=self.registry)
    self.app = self._build_app()

  # --------------------------------------------------------------- app --

  def _build_app(self) -> fastapi.FastAPI:
    app = fastapi.FastAPI(title='t5x_adapt', docs_url=None, redoc_url=None)

    def fail(status, message, param=None):
      return responses.JSONResponse(protocol.error(message, param, status),
                                    status_code=status)

    @app.exception_handler(starlette_exceptions.HTTPException)
    async def http_error(_, error):
      return fail(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_, error):
      return fail(400, *_validation_message(error))

    @app.exception_handler(RequestError)
    async def bad_request(_, error):
      return fail(400, str(error), error.field)

    @app.exception_handler(QueueFull)
    async def queue_full(_, error):
      return fail(429, str(error))

    @app.exception_handler(Draining)
    async def draining(_, error):
      return fail(503, str(error))

    @app.get('/health')
    async def health():
      if self.engine.draining:
        return responses.JSONResponse({'status': 'draining'},
                                      status_code=503)
      return {'status': 'ok'}

    @app.get('/metrics')
    async def metrics():
      return responses.Response(
          prometheus_client.generate_latest(self.registry),
          media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get('/v1/models')
    async def models():
      return {'object': 'list', 'data': [
          {'id': self.model_name, 'object': 'model', 'created': 0,
           'owned_by': 't5x_adapt'}]}

    @app.post('/v1/completions')
    async def completions(body: protocol.CompletionRequest,
                          request: fastapi.Request):
      self._check_model(body.model)
      if isinstance(body.prompt, str):
        ids = self.vocabulary.encode(body.prompt)
        ids = list(ids) + [self._eos] if self.add_eos else list(ids)
      else:
        ids = body.prompt
      return await self._generate(request, body, ids, chat=False)

    @app.post('/v1/chat/completions')
    async def chat(body: protocol.ChatRequest, request: fastapi.Request):
      self._check_model(body.model)
      try:
        parts = sft.chat_parts([(m.role, m.content) for m in body.messages])
      except ValueError as e:
        raise RequestError('messages', str(e)) from e
      ids = sft.encode_parts(self.vocabulary, parts).numpy().tolist()
      return await self._generate(request, body, ids, chat=True)

    @app.post('/v1/embeddings')
    async def embeddings(body: protocol.EmbeddingRequest):
      self._check_model(body.model)
      return await self._embeddings(body)

    return app

  @property
  def _eos(self) -> int:
    return self.engine.eos_id

  def _check_model(self, name: Optional[str]) -> None:
    if name not in (None, self.model_name):
      raise fastapi.HTTPException(404, f'no model {name!r} here (this '
                                  f'server serves {self.model_name!r})')

  # -------------------------------------------------------- generation --

  async def _generate(self, request: fastapi.Request, body, ids, chat: bool):
    if body.n != 1:
      raise RequestError('n', f'n must be 1, got {body.n}')
    self.engine.check_prompt(ids)
    sampling = body.sampling(self.default_max_tokens)
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue = asyncio.Queue()
    request_id = f'{"chatcmpl" if chat else "cmpl"}-{uuid.uuid4().hex}'
    arrival = time.monotonic()
    self.engine.submit(
        ids, sampling,
        lambda output: loop.call_soon_threadsafe(outputs.put_nowait, output),
        request_id=request_id)
    if body.stream:
      return responses.StreamingResponse(
          self._events(outputs, request_id, chat, body.include_usage,
                       arrival),
          media_type='text/event-stream')
    output = None
    try:
      while output is None or not output.finished:
        first = output is None
        output = await self._next(outputs, request)
        if output is None:
          return responses.Response(status_code=499)  # Client went away.
        if first:
          self.time_to_first_token.observe(time.monotonic() - arrival)
    finally:
      if output is None or not output.finished:
        self.engine.cancel(request_id)
    if output.finish_reason == FINISH_ERROR:
      return responses.JSONResponse(protocol.error(
          'the engine failed on this request (see the server log)', None,
          500), status_code=500)
    return protocol.completion(
        request_id, self.model_name, output.text, output.finish_reason,
        chat, protocol.usage(output.prompt_tokens, len(output.token_ids)))

  async def _next(self, outputs: asyncio.Queue, request: fastapi.Request):
    """The request's next output; None once its client has gone."""
    while True:
      try:
        return await asyncio.wait_for(outputs.get(), DISCONNECT_POLL_S)
      except asyncio.TimeoutError:
        if await request.is_disconnected():
          return None

  async def _events(self, outputs: asyncio.Queue, request_id: str,
                    chat: bool, include_usage: bool,
                    arrival: float) -> AsyncIterator[str]:
    """Server-sent events of a streamed completion; a client that goes
    away cancels the generator (Starlette), and so the request."""
    sse = lambda body: f'data: {json.dumps(body)}\n\n'
    output = None
    try:
      if chat:
        opening = protocol.completion(request_id, self.model_name, '', None,
                                      chat, chunk=True)
        opening['choices'][0]['delta']['role'] = 'assistant'
        yield sse(opening)
      while output is None or not output.finished:
        first = output is None
        output = await outputs.get()
        if first:
          self.time_to_first_token.observe(time.monotonic() - arrival)
        if output.new_token_ids or output.finished:
          # A chunk per token (its text may be empty, or held back while it
          # may become a stop string).
          yield sse(protocol.completion(
              request_id, self.model_name, output.new_text,
              output.finish_reason, chat, chunk=True))
      if include_usage:
        body = protocol.completion(request_id, self.model_name, '', None,
                                   chat, chunk=True)
        body['choices'] = []
        body['usage'] = protocol.usage(output.prompt_tokens,
                                       len(output.token_ids))
        yield sse(body)
      yield 'data: [DONE]\n\n'
    finally:
      if output is None or not output.finished:
        self.engine.cancel(request_id)

  # -------------------------------------------------------- embeddings --

  async def _embeddings(self, body: protocol.EmbeddingRequest):
    inputs = body.input
    if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
      inputs = [inputs]
    if not inputs:
      raise RequestError('input', 'input is empty')
    ids = [self.vocabulary.encode(x) if isinstance(x, str) else x
           for x in inputs]
    for i, row in enumerate(ids):
      try:
        self.engine.check_prompt(row)
      except RequestError as e:
        raise RequestError('input', f'input {i}: {e}') from e
    vectors = await asyncio.to_thread(self.embedder, ids)
    data = []
    for i, vector in enumerate(vectors):
      value = (base64.b64encode(vector.astype('<f4').tobytes()).decode()
               if body.encoding_format == 'base64' else vector.tolist())
      data.append({'object': 'embedding', 'index': i, 'embedding': value})
    tokens = sum(len(row) for row in ids)
    return {'object': 'list', 'data': data, 'model': self.model_name,
            'usage': {'prompt_tokens': tokens, 'total_tokens': tokens}}


@contextlib.contextmanager
def running(engine: Engine):
  """The engine's thread, started and stopped around the block."""
  thread = EngineThread(engine)
  thread.start()
  try:
    yield thread
  finally:
    thread.stop()

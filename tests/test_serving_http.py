"""The real server (`python -m t5x_adapt.serve`) in a subprocess, spoken to
over localhost by OpenAI's Python client and by raw HTTP.

The checkpoint is a tiny T5Gemma with random parameters (saved with its
config, so the server builds the model from the checkpoint) and the corpus
vocabulary. Completions are compared with `predict_batch` on the same
parameters in this process; embeddings with `BaseModel.embed`. Bad input
gets its status and a message naming the problem while other requests in
flight complete correctly; SIGTERM drains (the last test): new requests get
503 while those in flight finish.
"""

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import openai
import pytest

from t5x_adapt import checkpoints
from t5x_adapt import gin_utils
from t5x_adapt.data import sft
from t5x_adapt.data import vocab as vocab_lib
from test_decoding import random_params

MAX_PROMPT = 48
MAX_NEW = 256
NUM_SLOTS = 4
MAX_WAITING = 16
NAME = 'tiny'
REFERENCE_TOKENS = 32  # predict_batch decodes these (cut to max_tokens).
EOS = 1


class Served:
  """The server process and what the test compares it with."""

  def __init__(self, tmp_path, preset: str = 't5gemma_tiny'):
    self.vocabulary = vocab_lib.corpus_vocabulary()
    gin_utils.load_model(preset)
    self.model = gin_utils.model_from_config(
        vocab_size=self.vocabulary.vocab_size)
    self.params = random_params(
        self.model, {'encoder_input_tokens': (1, 8),
                     'decoder_input_tokens': (1, 8)}, seed=1)
    path = checkpoints.save_params(tmp_path / 'ckpt', self.params,
                                   metadata={'config': self.model.config})
    with socket.socket() as probe:
      probe.bind(('127.0.0.1', 0))
      self.port = probe.getsockname()[1]
    self.log = open(tmp_path / 'server.log', 'w+')
    args = [f'--gin.{name}={value}' for name, value in {
        'CHECKPOINT_PATH': repr(str(path)),
        'VOCABULARY': repr(str(vocab_lib.corpus_model_path())),
        'PORT': self.port, 'NUM_SLOTS': NUM_SLOTS,
        'MAX_PROMPT_LENGTH': MAX_PROMPT, 'MAX_NEW_TOKENS': MAX_NEW,
        'MAX_WAITING': MAX_WAITING, 'MODEL_NAME': repr(NAME),
        'DRAIN_TIMEOUT_S': 60}.items()]
    self.process = subprocess.Popen(
        [sys.executable, '-m', 't5x_adapt.serve',
         '--gin_file=gin/runs/serve.gin', *args],
        stdout=self.log, stderr=subprocess.STDOUT,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    inputs = self.model.INPUTS_FEATURE
    self._predict = jax.jit(lambda params, tokens: self.model.predict_batch(
        params, {inputs: tokens}, max_decode_length=REFERENCE_TOKENS))
    self._embed = jax.jit(lambda params, tokens: self.model.embed(
        params, {inputs: tokens}))
    self.wait_until_ready()
    self.client = openai.OpenAI(base_url=f'http://127.0.0.1:{self.port}/v1',
                                api_key='unused', max_retries=50)

  def output(self) -> str:
    self.log.seek(0)
    return self.log.read()

  def wait_until_ready(self, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        pytest.fail(f'the server exited:\n{self.output()}')
      try:
        if self.request('GET', '/health')[0] == 200:
          return
      except OSError:
        pass
      time.sleep(0.5)
    pytest.fail(f'the server did not start:\n{self.output()}')

  def request(self, method: str, path: str, body=None, raw: bytes = None):
    """(status, parsed JSON or text) of one HTTP request."""
    connection = http.client.HTTPConnection('127.0.0.1', self.port,
                                            timeout=120)
    data = raw if raw is not None else (
        None if body is None else json.dumps(body).encode())
    connection.request(method, path, body=data,
                       headers={'Content-Type': 'application/json'})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    try:
      return response.status, json.loads(text)
    except json.JSONDecodeError:
      return response.status, text

  def metric(self, name: str) -> float:
    _, text = self.request('GET', '/metrics')
    for line in text.splitlines():
      if line.startswith(name + ' '):
        return float(line.split()[1])
    raise KeyError(name)

  def reference_tokens(self, ids, max_tokens: int) -> list[int]:
    tokens = np.zeros((1, MAX_PROMPT), np.int32)
    tokens[0, :len(ids)] = ids
    assert max_tokens <= REFERENCE_TOKENS
    out = np.asarray(self._predict(self.params, tokens))[0]
    out = out.tolist()[:max_tokens]
    return out[:out.index(EOS)] if EOS in out else out

  def reference_text(self, ids, max_tokens: int) -> str:
    return self.vocabulary.decode(self.reference_tokens(ids, max_tokens))


  def stop(self):
    if self.process.poll() is None:
      self.process.kill()
      self.process.wait()
    self.log.close()


@pytest.fixture(scope='module')
def served(tmp_path_factory):
  served = Served(tmp_path_factory.mktemp('serve'))
  yield served
  served.stop()


def _prompts(count: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  return [(rng.randint(3, 8000, rng.randint(1, MAX_PROMPT + 1)).tolist(),
           int(rng.randint(1, 33))) for _ in range(count)]


def _complete(served, ids, max_tokens):
  return served.client.completions.create(
      model=NAME, prompt=ids, max_tokens=max_tokens, temperature=0)


def test_openai_client_completions_chat_and_embeddings(served):
  client = served.client
  assert [m.id for m in client.models.list().data] == [NAME]

  text = 'the quick brown fox'
  done = client.completions.create(model=NAME, prompt=text, max_tokens=12,
                                   temperature=0)
  ids = served.vocabulary.encode(text)
  assert done.choices[0].text == served.reference_text(ids, 12)
  assert done.usage.prompt_tokens == len(ids)

  messages = [{'role': 'system', 'content': 'Be brief.'},
              {'role': 'user', 'content': 'Name a colour.'}]
  chat_ids = sft.encode_parts(served.vocabulary, sft.chat_parts(
      [(m['role'], m['content']) for m in messages])).numpy().tolist()
  whole = client.chat.completions.create(model=NAME, messages=messages,
                                         max_tokens=20, temperature=0)
  stream = client.chat.completions.create(model=NAME, messages=messages,
                                          max_tokens=20, temperature=0,
                                          stream=True)
  chunks = list(stream)
  assert chunks[0].choices[0].delta.role == 'assistant'
  streamed = ''.join(c.choices[0].delta.content or '' for c in chunks)
  assert len(chunks) > 3
  assert streamed == whole.choices[0].message.content == (
      served.reference_text(chat_ids, 20))
  assert chunks[-1].choices[0].finish_reason == (
      whole.choices[0].finish_reason)

  inputs = ['a short text', 'another, somewhat longer, text to embed']
  vectors = np.asarray([e.embedding for e in client.embeddings.create(
      model=NAME, input=inputs).data])
  tokens = np.zeros((2, 16), np.int32)
  for row, text in enumerate(inputs):
    ids = served.vocabulary.encode(text)
    tokens[row, :len(ids)] = ids
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1, atol=1e-5)
  np.testing.assert_allclose(
      vectors, np.asarray(served._embed(served.params, tokens)), atol=1e-5)  # pylint: disable=protected-access


def _check_concurrent_requests(served):
  """64 greedy requests at once, in random order: each completion is
  predict_batch's on its prompt alone."""
  requests = _prompts(64)
  order = np.random.RandomState(1).permutation(len(requests))
  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    futures = {i: pool.submit(_complete, served, *requests[i]) for i in order}
  for i, (ids, max_tokens) in enumerate(requests):
    assert futures[i].result().choices[0].text == served.reference_text(
        ids, max_tokens), f'request {i}'


def test_concurrent_greedy_requests_match_predict_batch(served):
  _check_concurrent_requests(served)


@pytest.mark.slow
@pytest.mark.parametrize('preset', ['t5gemma_tiny_unbalanced',
                                    't5gemma2_tiny', 'gemma2_tiny',
                                    'gemma3_tiny'])
def test_concurrent_requests_for_every_model_kind(preset, tmp_path):
  served = Served(tmp_path, preset)
  try:
    _check_concurrent_requests(served)
  finally:
    served.stop()


def test_bad_input_gets_its_status_while_others_complete(served):
  requests = _prompts(8, seed=2)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    in_flight = [pool.submit(_complete, served, *r) for r in requests]
    url = '/v1/completions'
    cases = [
        ({'prompt': [5] * (MAX_PROMPT + 1)}, 400, 'at most 48'),
        ({'prompt': 'hi', 'max_tokens': 0}, 400, 'max_tokens must be'),
        ({'prompt': 'hi', 'frequency_penalty': 1}, 400,
         "unknown parameter 'frequency_penalty'"),
        ({'prompt': 'hi', 'model': 'other'}, 404, "no model 'other'"),
        ({'max_tokens': 3}, 400, "missing parameter 'prompt'"),
    ]
    for body, status, message in cases:
      got_status, got = served.request('POST', url, body)
      assert got_status == status, (body, got)
      assert message in got['error']['message'], got
    got_status, got = served.request('POST', url, raw=b'{"prompt": "hi"')
    assert got_status == 400 and 'malformed JSON' in got['error']['message']
    got_status, got = served.request(
        'POST', '/v1/chat/completions',
        {'messages': [{'role': 'robot', 'content': 'x'}]})
    assert got_status == 400 and got['error']['param'] == 'messages'

    # A client that goes away mid-stream: its slot is freed.
    cancelled = served.metric('t5x_adapt_requests_cancelled_total')
    connection = http.client.HTTPConnection('127.0.0.1', served.port)
    connection.request('POST', url, json.dumps(
        {'prompt': 'hi', 'max_tokens': MAX_NEW, 'ignore_eos': True,
         'stream': True}), headers={'Content-Type': 'application/json'})
    response = connection.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b'data: ')
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.monotonic() + 30
    while served.metric('t5x_adapt_requests_cancelled_total') == cancelled:
      assert time.monotonic() < deadline, 'the stream was not cancelled'
      time.sleep(0.1)

    # More requests than the queue holds.
    flood_body = {'prompt': [7, 8, 9], 'max_tokens': MAX_NEW,
                  'ignore_eos': True}
    count = 2 * (NUM_SLOTS + MAX_WAITING)
    with concurrent.futures.ThreadPoolExecutor(count) as flood_pool:
      flood = [flood_pool.submit(served.request, 'POST', url, flood_body)
               for _ in range(count)]
    statuses = [f.result()[0] for f in flood]
    full = [f.result()[1] for f in flood if f.result()[0] == 429]
    assert set(statuses) <= {200, 429} and full, statuses
    assert f'queue holds {MAX_WAITING}' in full[0]['error']['message']
    for future, (ids, max_tokens) in zip(in_flight, requests):
      assert future.result().choices[0].text == served.reference_text(
          ids, max_tokens)
  assert served.metric('t5x_adapt_slots_busy') == 0


def test_sigterm_drains_requests_in_flight(served):
  body = {'prompt': [11, 12, 13], 'max_tokens': MAX_NEW, 'ignore_eos': True}
  with concurrent.futures.ThreadPoolExecutor(12) as pool:
    long = [pool.submit(served.request, 'POST', '/v1/completions', body)
            for _ in range(3 * NUM_SLOTS)]
    deadline = time.monotonic() + 30
    while served.metric('t5x_adapt_slots_busy') < NUM_SLOTS:
      assert time.monotonic() < deadline
      time.sleep(0.05)
    served.process.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    status, got = served.request('POST', '/v1/completions',
                                 {'prompt': 'late', 'max_tokens': 2})
    assert status == 503, got
    assert served.request('GET', '/health')[0] == 503
    for future in long:
      status, got = future.result()
      assert status == 200
      assert got['usage']['completion_tokens'] == MAX_NEW
  # uvicorn ends by raising the signal it caught again (so the process
  # reports how it was stopped).
  assert served.process.wait(timeout=60) in (0, -signal.SIGTERM), (
      served.output())

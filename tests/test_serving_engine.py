"""The serving engine against `predict_batch`, request by request.

64 greedy requests of mixed prompt lengths and token budgets arrive in a
random order while others decode (continuous batching over 4 slots): each
completion must equal `predict_batch` greedy on that prompt alone, token for
token. Where they differ, the first differing step must be a near tie (its
two best logits within `TIE` of each other, from the uncached reference);
ties are counted and printed (none expected). The decoder-only presets'
sliding windows (8) are shorter than the generations, so their ring-buffer
caches wrap.

Sampling draws with a key per request: a request's tokens do not depend on
what else shares the slot table.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_adapt import gin_utils
from t5x_adapt.serving.engine import (FINISH_ABORT, FINISH_LENGTH, Engine,
                                      QueueFull, RequestError,
                                      SamplingParams)
from test_decoding import random_params

PRESETS = ('t5gemma_tiny', 't5gemma_tiny_unbalanced', 't5gemma2_tiny',
           'gemma2_tiny', 'gemma3_tiny')
NUM_REQUESTS = 64
MAX_PROMPT = 48
MAX_NEW = 24
TIE = 1e-5
EOS = 1


class Setup:
  """A preset's model, random parameters and a predict_batch reference."""

  def __init__(self, preset: str):
    self.model = gin_utils.load_model(preset)
    shapes = {'decoder_input_tokens': (1, 8)}
    if self.model.is_encoder_decoder:
      shapes['encoder_input_tokens'] = (1, 8)
    self.params = random_params(self.model, shapes, seed=1)
    self.vocab_size = self.model.config.decoder_stack.vocab_size
    self._predict = jax.jit(lambda params, tokens: self.model.predict_batch(
        params, {self.model.INPUTS_FEATURE: tokens},
        max_decode_length=MAX_NEW))
    self._logits = jax.jit(self.model.compute_logits)

  def engine(self, **kwargs) -> Engine:
    return Engine(self.model, self.params, num_slots=4,
                  max_prompt_length=MAX_PROMPT, max_new_tokens=MAX_NEW,
                  buckets=(16, 32, MAX_PROMPT), **kwargs)

  def reference(self, prompt) -> list[int]:
    """predict_batch greedy on `prompt` alone (padded to MAX_PROMPT)."""
    tokens = np.zeros((1, MAX_PROMPT), np.int32)
    tokens[0, :len(prompt)] = prompt
    return np.asarray(self._predict(self.params, tokens))[0].tolist()

  def top_two_gap(self, prompt, generated) -> float:
    """Gap of the two best logits of the token after `generated`
    (uncached, unpadded)."""
    prompt = jnp.asarray([prompt], jnp.int32)
    if self.model.is_encoder_decoder:
      decoder = jnp.asarray([[self.model.decoder_start_id] + generated],
                            jnp.int32)
      batch = {'encoder_input_tokens': prompt,
               'decoder_input_tokens': decoder,
               'decoder_target_tokens': decoder}
      position = len(generated)
    else:
      tokens = jnp.concatenate(
          [prompt, jnp.asarray([generated], jnp.int32)], axis=1)
      batch = {'decoder_input_tokens': tokens,
               'decoder_target_tokens': tokens}
      position = tokens.shape[1] - 1
    logits = np.asarray(self._logits(self.params, batch))[0, position]
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


@pytest.fixture(scope='module', params=PRESETS)
def setup(request):
  return Setup(request.param)


def _requests(vocab_size: int, seed: int = 0):
  rng = np.random.RandomState(seed)
  return [(rng.randint(3, vocab_size, rng.randint(1, MAX_PROMPT + 1)).tolist(),
           int(rng.randint(1, MAX_NEW + 1))) for _ in range(NUM_REQUESTS)]


def _until_eos(tokens, budget):
  tokens = tokens[:budget]
  return tokens[:tokens.index(EOS)] if EOS in tokens else tokens


def test_greedy_requests_under_load_match_predict_batch(setup):
  requests = _requests(setup.vocab_size)
  engine = setup.engine()
  finals = {}

  def keep(output):
    if output.finished:
      finals[output.request_id] = output
  # Random arrival: a few requests at a time, between decode steps.
  rng = np.random.RandomState(1)
  order = rng.permutation(NUM_REQUESTS)
  pending = list(order)
  while pending or engine.has_work:
    for _ in range(rng.randint(0, 4)):
      if pending:
        index = int(pending.pop())
        engine.submit(requests[index][0],
                      SamplingParams(max_tokens=requests[index][1]), keep,
                      request_id=str(index))
    engine.step()
  assert len(finals) == NUM_REQUESTS
  assert engine.stats.decode_steps < sum(n for _, n in requests) / 2, (
      'the slots did not decode together')

  ties, lengths = 0, []
  for index, (prompt, budget) in enumerate(requests):
    got = finals[str(index)].token_ids
    want = _until_eos(setup.reference(prompt), budget)
    lengths.append(len(want))
    if got == want:
      continue
    step = next(i for i, (a, b) in enumerate(zip(got + [-1], want + [-1]))
                if a != b)
    gap = setup.top_two_gap(prompt, want[:step])
    assert gap < TIE, (f'request {index} (prompt of {len(prompt)}) differs '
                       f'at step {step}: {got} vs {want}; top-2 gap {gap}')
    ties += 1
  print(f'{NUM_REQUESTS} requests, {ties} near ties, generated lengths '
        f'{min(lengths)}-{max(lengths)}')
  # Long generations overrun the windows (8) of the local layers.
  assert max(lengths) > 16


def test_sampling_is_reproducible_whatever_shares_the_table(setup):
  sampling = SamplingParams(max_tokens=MAX_NEW, temperature=0.9, top_k=50,
                            top_p=0.95, seed=7, ignore_eos=True)
  prompt = list(range(5, 25))
  alone = setup.engine().generate([prompt], sampling)[0].token_ids
  others = [(list(range(9, 9 + n)), SamplingParams(
      max_tokens=min(n, MAX_NEW), temperature=1.0, seed=n))
            for n in (3, 17, 30, 44)]
  crowd = setup.engine().generate(
      [others[0][0], prompt] + [p for p, _ in others[1:]],
      [others[0][1], sampling] + [s for _, s in others[1:]])
  assert crowd[1].token_ids == alone
  # A different seed draws differently (the test could fail).
  other_seed = setup.engine().generate(
      [prompt], SamplingParams(max_tokens=MAX_NEW, temperature=0.9,
                               top_k=50, top_p=0.95, seed=8,
                               ignore_eos=True))[0].token_ids
  assert other_seed != alone


@pytest.fixture(scope='module')
def tiny():
  return Setup('t5gemma_tiny')


def test_bad_requests_name_their_field(tiny):
  engine = tiny.engine(max_waiting=2)
  with pytest.raises(RequestError, match='at most 48') as error:
    engine.submit([5] * (MAX_PROMPT + 1), SamplingParams())
  assert error.value.field == 'prompt'
  for field, sampling in [('max_tokens', SamplingParams(max_tokens=0)),
                          ('max_tokens', SamplingParams(max_tokens=99)),
                          ('temperature', SamplingParams(temperature=-1)),
                          ('top_p', SamplingParams(top_p=0))]:
    with pytest.raises(RequestError) as error:
      engine.submit([5, 6], sampling)
    assert error.value.field == field
  engine.submit([5], SamplingParams())
  engine.submit([6], SamplingParams())
  with pytest.raises(QueueFull, match='queue holds 2'):
    engine.submit([7], SamplingParams())


def test_cancel_frees_the_slot_and_spares_the_others(tiny):
  engine = tiny.engine()
  outputs = {}
  keep = lambda output: outputs.__setitem__(output.request_id, output)
  prompts = [[5 + i] * (3 + i) for i in range(6)]
  sampling = SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)
  for i, prompt in enumerate(prompts):
    engine.submit(prompt, sampling, keep, request_id=str(i))
  for _ in range(3):
    engine.step()
  engine.cancel('1')  # Running.
  engine.cancel('5')  # Waiting.
  while engine.has_work:
    engine.step()
  assert outputs['1'].finish_reason == FINISH_ABORT
  assert len(outputs['1'].token_ids) < MAX_NEW
  assert outputs['5'].finish_reason == FINISH_ABORT
  assert engine.stats.requests_cancelled == 2
  for i in (0, 2, 3, 4):
    assert outputs[str(i)].finish_reason == FINISH_LENGTH
    assert (_until_eos(outputs[str(i)].token_ids, MAX_NEW) ==
            _until_eos(tiny.reference(prompts[i]), MAX_NEW))


MESH_WORKER = r'''
import json, sys
sys.path.insert(0, 'tests')
import jax
import numpy as np
from t5x_adapt import gin_utils, partitioning
from t5x_adapt.serving.engine import Engine, SamplingParams
from test_decoding import random_params

out = {}
for preset in ('t5gemma_tiny', 'gemma2_tiny'):
  model = gin_utils.load_model(preset)
  shapes = {'decoder_input_tokens': (1, 8), 'encoder_input_tokens': (1, 8)}
  params = random_params(model, shapes, seed=1)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(3, 500, rng.randint(1, 48)).tolist()
             for _ in range(12)]
  sampling = [SamplingParams(max_tokens=int(rng.randint(1, 24)))
              for _ in prompts]
  partitioner = partitioning.Partitioner(data=2, fsdp=2, tensor=2)
  sharded = jax.device_put(params, partitioner.shardings(model.logical_axes()))
  kwargs = dict(num_slots=4, max_prompt_length=48, max_new_tokens=24,
                buckets=(16, 48))
  meshed = Engine(model, sharded, partitioner=partitioner, **kwargs)
  alone = Engine(model, jax.device_put(params, jax.devices()[0]), **kwargs)
  out[preset] = [[o.token_ids for o in engine.generate(prompts, sampling)]
                 for engine in (meshed, alone)]
  leaf = jax.tree_util.tree_leaves(meshed.params)[0]
  out[preset].append(len(leaf.sharding.device_set))
print(json.dumps(out))
'''


@pytest.mark.slow
def test_one_device_against_eight():
  import json
  import os
  import subprocess
  import sys
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', MESH_WORKER], cwd=root,
                          env=env, capture_output=True, text=True,
                          timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for preset, (meshed, alone, devices) in out.items():
    assert devices == 8, preset
    assert meshed == alone, preset
    assert sum(len(tokens) for tokens in alone) > 24, preset

"""Serving: the continuous-batching server against static batches.

One workload, fixed here: `--requests` requests (256) with random token-id
prompts of 32-512 tokens and 8-256 new tokens each (uniform; EOS ignored),
greedy, float32, models with random weights (speed does not depend on
them). The S encoder-decoder is T5Gemma S-S with a 50,257-token vocabulary
(101.8M parameters, `common.s_s_config`), its decoder-only twin the S
decoder stack alone; B-S puts a B encoder (`t5gemma_b_b`'s) before the S
decoder, against the B decoder-only model.

(i) Saturation: every request offered at once; generated tokens a second of
  (a) the server (`python -m t5x_adapt.serve`, a subprocess; this process
      is the load generator: one stream a request, read with httpx),
  (b) `predict_batch` in static batches in arrival order, as `infer.py`
      runs it: encoder inputs padded to 512, each batch decoding its longest
      request's budget (rounded up to 32 tokens; compiled before timing),
  (c) transformers' `generate` in static batches (eager, 2 threads,
      `min_new_tokens` = `max_new_tokens` = the batch's longest budget),
  each at every slot count / batch size of `--slots`; the best is reported.
(ii) Latency: Poisson arrivals at 25%, 50% and 75% of (a)'s best saturation
  rate (`--latency_requests` each): time to first token (TTFT) and
  inter-token latency (ITL), p50 / p99, of (a) at its best slot count and of
  (b) at its best batch size. (b) runs as a static-batch server would: a
  batch of what is waiting starts when the previous ends, and its tokens
  arrive when it ends (TTFT = batch end - arrival; ITL = batch time /
  its decode length).
(iii) The paper's efficiency claim as users see it: saturation throughput of
  S-S against the S decoder-only model and of B-S against B decoder-only,
  on the server at (a)'s best slot count.

A plot of p99 TTFT against offered rate goes to `--plot` (not with
`--skip_latency`).

  .venv/bin/python benchmarks/serve.py                  # the whole run
  .venv/bin/python benchmarks/serve.py --requests 128 --slots 16,32 \\
      --hf_slots 16 --latency_requests 32               # a shorter one
  .venv/bin/python benchmarks/serve.py --slots 16,32 --skip_hf \\
      --skip_latency --skip_pairs                       # (i) without (c)
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Optional, Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# pylint: disable=g-import-not-at-top
import common  # puts the repository on sys.path
import numpy as np

PROMPT_RANGE = (32, 512)
NEW_TOKENS_RANGE = (8, 256)
RATE_FRACTIONS = (0.25, 0.5, 0.75)
STATIC_ROUND = 32  # A static batch's decode length rounds up to this.


@dataclasses.dataclass
class Workload:
  """Requests: prompt token ids and new-token budgets."""

  prompts: list[list[int]]
  new_tokens: list[int]

  def __len__(self):
    return len(self.prompts)

  @property
  def tokens(self) -> int:
    return sum(self.new_tokens)


def workload(count: int, vocab: int, seed: int) -> Workload:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(PROMPT_RANGE[0], PROMPT_RANGE[1] + 1, count)
  return Workload([rng.integers(3, vocab, n).tolist() for n in lengths],
                  rng.integers(NEW_TOKENS_RANGE[0], NEW_TOKENS_RANGE[1] + 1,
                               count).tolist())


@dataclasses.dataclass
class Run:
  """One system on one workload."""

  system: str
  size: int  # Slots or batch size.
  wall: float
  tokens: int
  ttft: list[float] = dataclasses.field(default_factory=list)
  itl: list[float] = dataclasses.field(default_factory=list)

  @property
  def tokens_per_s(self) -> float:
    return self.tokens / self.wall

  def percentile(self, name: str, q: float) -> float:
    return float(np.percentile(getattr(self, name), q))


# ------------------------------------------------------------ the models --


def configs() -> dict[str, object]:
  import dataclasses as dc
  from t5x_adapt import gin_utils
  s_s = common.s_s_config()
  b_b = gin_utils.load_model('t5gemma_b_b').config.map_stacks(
      vocab_size=common.S_S_VOCAB, dtype='float32', param_dtype='float32',
      scan_layers=True, remat_policy='none')
  return {'S-S': s_s, 'S decoder-only': s_s.decoder,
          'B-S': dc.replace(b_b, decoder=s_s.decoder),
          'B decoder-only': b_b.decoder}


def checkpoint(config, directory: pathlib.Path):
  """(path, model, params): random parameters saved with their config."""
  import jax
  from t5x_adapt import checkpoints
  from t5x_adapt.models import model_for_config
  model = model_for_config(config)
  params = model.get_initial_variables(jax.random.PRNGKey(0), {})['params']
  path = checkpoints.save_params(directory, params,
                                 metadata={'config': config})
  return path, model, params


# ------------------------------------------------------------ the server --


class ServerProcess:
  """`python -m t5x_adapt.serve` on a checkpoint, until `close`."""

  def __init__(self, path: pathlib.Path, slots: int, port: int,
               log: pathlib.Path):
    from t5x_adapt.data import vocab as vocab_lib
    vocab_lib.corpus_vocabulary()  # The server needs a tokenizer file.
    self.port = port
    self.log = open(log, 'w')
    args = {'CHECKPOINT_PATH': repr(str(path)),
            'VOCABULARY': repr(str(vocab_lib.corpus_model_path())),
            'PORT': port, 'NUM_SLOTS': slots, 'MAX_PROMPT_LENGTH': 512,
            'MAX_NEW_TOKENS': 256, 'MAX_WAITING': 4096,
            'MODEL_NAME': "'bench'"}
    self.process = subprocess.Popen(
        [sys.executable, '-m', 't5x_adapt.serve',
         '--gin_file=gin/runs/serve.gin',
         *[f'--gin.{k}={v}' for k, v in args.items()]],
        cwd=common.REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
      if self.process.poll() is not None:
        raise RuntimeError(f'the server exited; see {log}')
      try:
        urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2)
        return
      except OSError:
        time.sleep(1)
    raise RuntimeError(f'the server did not start; see {log}')

  def close(self):
    self.process.send_signal(signal.SIGTERM)
    self.process.wait(timeout=120)
    self.log.close()


async def _request(client, prompt, new_tokens, start_at, origin, run: Run):
  """One streamed completion; the times of its token chunks.

  Reads the server-sent events with httpx itself rather than through
  OpenAI's client (as vLLM's serving benchmark does): the load generator
  shares the 2 cores with the server, and building the client's objects for
  every chunk would take its CPU time from the server.
  """
  await asyncio.sleep(max(0.0, start_at - (time.perf_counter() - origin)))
  body = {'model': 'bench', 'prompt': prompt, 'max_tokens': new_tokens,
          'temperature': 0, 'stream': True, 'ignore_eos': True}
  sent = time.perf_counter()
  times = []  # The server streams a chunk per token.
  async with client.stream('POST', '/v1/completions', json=body) as response:
    if response.status_code != 200:
      raise RuntimeError(f'HTTP {response.status_code}: '
                         f'{(await response.aread()).decode()}')
    async for line in response.aiter_lines():
      if line.startswith('data: {') and json.loads(line[6:])['choices']:
        times.append(time.perf_counter())
  run.ttft.append(times[0] - sent)
  run.itl.extend(np.diff(times).tolist())
  run.tokens += len(times)


def drive(port: int, load: Workload, arrivals: Sequence[float], system: str,
          size: int) -> Run:
  """Sends `load` at `arrivals` (seconds from start) and times it."""
  import httpx2

  async def main():
    client = httpx2.AsyncClient(
        base_url=f'http://127.0.0.1:{port}', timeout=3600,
        limits=httpx2.Limits(max_connections=len(load) + 8,
                             max_keepalive_connections=len(load) + 8))
    run = Run(system, size, 0.0, 0)
    origin = time.perf_counter()
    await asyncio.gather(*[
        _request(client, p, n, t, origin, run)
        for p, n, t in zip(load.prompts, load.new_tokens, arrivals)])
    run.wall = time.perf_counter() - origin
    await client.aclose()
    return run
  return asyncio.run(main())


# --------------------------------------------------------- static batches --


class StaticPredict:
  """`predict_batch` over static batches of `size` rows."""

  def __init__(self, model, params, size: int):
    import jax
    self.model, self.params, self.size = model, params, size
    self._compiled = {}
    self._jit = jax.jit(model.predict_batch, static_argnums=2)

  def _fn(self, length: int):
    if length not in self._compiled:
      features = {self.model.INPUTS_FEATURE: np.zeros(
          (self.size, PROMPT_RANGE[1]), np.int32)}
      common.log(f'predict_batch batch {self.size}: compile {length} tokens')
      self._compiled[length] = self._jit.lower(
          self.params, features, length).compile()
    return self._compiled[length]

  @staticmethod
  def decode_length(budgets: Sequence[int]) -> int:
    return -(-max(budgets) // STATIC_ROUND) * STATIC_ROUND

  def prepare(self, load: Workload):
    for i in range(0, len(load), self.size):
      self._fn(self.decode_length(load.new_tokens[i:i + self.size]))

  def __call__(self, prompts, budgets):
    import jax
    tokens = np.zeros((self.size, PROMPT_RANGE[1]), np.int32)
    for row, prompt in enumerate(prompts):
      tokens[row, :len(prompt)] = prompt
    length = self.decode_length(budgets)
    jax.block_until_ready(self._fn(length)(
        self.params, {self.model.INPUTS_FEATURE: tokens}))
    return length


class StaticHF:
  """transformers' `generate` over static batches."""

  def __init__(self, config, size: int):
    import torch
    from decode import hf_model
    torch.set_num_threads(2)
    self.model, self.size = hf_model(config), size

  def __call__(self, prompts, budgets):
    import torch
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
      ids[row, :len(prompt)] = torch.tensor(prompt)
      mask[row, :len(prompt)] = 1
    n = max(budgets)
    with torch.no_grad():
      self.model.generate(input_ids=ids, attention_mask=mask,
                          do_sample=False, num_beams=1, max_new_tokens=n,
                          min_new_tokens=n)
    return n


def run_static(runner, load: Workload, arrivals: Sequence[float],
               system: str) -> Run:
  """A static-batch server: the next batch (up to `size` waiting requests,
  in arrival order) starts when the previous ends; its tokens arrive when
  it ends."""
  run = Run(system, runner.size, 0.0, load.tokens)
  origin = time.perf_counter()
  next_request = 0
  while next_request < len(load):
    now = time.perf_counter() - origin
    if arrivals[next_request] > now:
      time.sleep(arrivals[next_request] - now)
      now = arrivals[next_request]
    batch = [i for i in range(next_request, len(load))
             if arrivals[i] <= now][:runner.size]
    next_request = batch[-1] + 1
    started = time.perf_counter()
    length = runner([load.prompts[i] for i in batch],
                    [load.new_tokens[i] for i in batch])
    ended = time.perf_counter() - origin
    run.ttft += [ended - arrivals[i] for i in batch]
    run.itl += [(time.perf_counter() - started) / length] * len(batch)
  run.wall = time.perf_counter() - origin
  return run


def step_against_predict(model, params, static: StaticPredict,
                         repeats: int = 3) -> tuple[float, float]:
  """(engine step, predict_batch per token) in seconds at `static.size`
  rows: the engine's decode step with every slot busy (512-token prompts,
  `engine.step` as the server calls it), and predict_batch's time per
  decoded token ((t(256) - t(32)) / 224, the same prompts)."""
  from t5x_adapt.serving.engine import Engine, SamplingParams
  size = static.size
  engine = Engine(model, params, num_slots=size,
                  max_prompt_length=PROMPT_RANGE[1],
                  max_new_tokens=NEW_TOKENS_RANGE[1],
                  buckets=[PROMPT_RANGE[1]])
  prompts = workload(size, common.S_S_VOCAB, seed=2).prompts
  for prompt in prompts:
    engine.submit(prompt, SamplingParams(max_tokens=NEW_TOKENS_RANGE[1],
                                         ignore_eos=True))
  engine.step()  # Admits every request, decodes one token.
  engine.step()
  steps = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(10):
      engine.step()
    steps.append((time.perf_counter() - start) / 10)
  totals = {}
  for n in (32, 256):
    static._fn(n)  # pylint: disable=protected-access
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      static(prompts, [n] * size)
      times.append(time.perf_counter() - start)
    totals[n] = min(times)
  return min(steps), (totals[256] - totals[32]) / (256 - 32)


# ---------------------------------------------------------------- output --


def poisson(count: int, rate: float, seed: int) -> list[float]:
  rng = np.random.default_rng(seed)
  return np.cumsum(rng.exponential(1 / rate, count)).tolist()


def best(runs: Sequence[Run]) -> Run:
  return max(runs, key=lambda r: r.tokens_per_s)


def plot(latency: dict[str, list[tuple[float, Run]]], path: pathlib.Path):
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  figure, axes = plt.subplots(figsize=(6, 4))
  for system, points in latency.items():
    axes.plot([rate for rate, _ in points],
              [run.percentile('ttft', 99) for _, run in points], 'o-',
              label=system)
  axes.set_xlabel('offered load (requests/s)')
  axes.set_ylabel('p99 time to first token (s)')
  axes.set_yscale('log')
  axes.legend()
  axes.grid(alpha=0.3)
  figure.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=120)


def parse_args(argv=None):
  parser = common.argument_parser(__doc__)
  parser.add_argument('--requests', type=int, default=256)
  parser.add_argument('--slots', default='8,16,32',
                      help='slot counts / static batch sizes')
  parser.add_argument('--latency_requests', type=int, default=200)
  parser.add_argument('--skip_hf', action='store_true')
  parser.add_argument('--hf_slots', default=None,
                      help='batch sizes of (c) (default: --slots)')
  parser.add_argument('--skip_latency', action='store_true',
                      help='saturation only: no latency sweep, no plot')
  parser.add_argument('--skip_pairs', action='store_true',
                      help='leave out (iii)')
  parser.add_argument('--port', type=int, default=8437)
  parser.add_argument('--plot', default=str(
      common.REPO_ROOT / 'benchmarks' / 'out' / 'serve_latency.png'))
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  sizes = [int(s) for s in args.slots.split(',')]
  models = configs()
  load = workload(args.requests, common.S_S_VOCAB, seed=0)
  work = pathlib.Path(tempfile.mkdtemp(prefix='serve_bench_'))
  common.log(f'{len(load)} requests, {load.tokens} new tokens; '
             f'checkpoints in {work}')
  at_once = [0.0] * len(load)

  def serve(name, path, slots, runs):
    """Starts a server, drives it with each (load, arrivals) of `runs`."""
    server = ServerProcess(path, slots, args.port, work / f'{name}.log')
    try:
      out = []
      for load_, arrivals in runs:
        common.log(f'server {name}, {slots} slots: {len(load_)} requests')
        out.append(drive(args.port, load_, arrivals, 'server', slots))
      return out
    finally:
      server.close()

  # (i) Saturation.
  path, model, params = checkpoint(models['S-S'], work / 'S-S')
  saturation = {'server': [serve('S-S', path, n, [(load, at_once)])[0]
                           for n in sizes]}
  statics = {}
  saturation['predict_batch'] = []
  for n in sizes:
    statics[n] = StaticPredict(model, params, n)
    statics[n].prepare(load)
    common.log(f'predict_batch, batches of {n}')
    saturation['predict_batch'].append(
        run_static(statics[n], load, at_once, 'predict_batch'))
  if not args.skip_hf:
    saturation['transformers'] = []
    for n in ([int(x) for x in args.hf_slots.split(',')] if args.hf_slots
              else sizes):
      common.log(f'transformers generate, batches of {n}')
      saturation['transformers'].append(run_static(
          StaticHF(models['S-S'], n), load, at_once, 'transformers'))
  best_server = best(saturation['server'])
  best_static = best(saturation['predict_batch'])
  common.log(f'decode step vs predict_batch, {best_server.size} rows')
  if best_server.size not in statics:
    statics[best_server.size] = StaticPredict(model, params, best_server.size)
  step_times = step_against_predict(model, params,
                                    statics[best_server.size])

  # (ii) Latency at fractions of the server's saturation rate.
  latency_load = workload(args.latency_requests, common.S_S_VOCAB, seed=1)
  latency = ({} if args.skip_latency else
             sweep_latency(args, serve, path, statics, best_server,
                           best_static, load, latency_load))

  # (iii) Encoder-decoder against decoder-only, on the server.
  pairs = {'S-S': best_server}
  if not args.skip_pairs:
    for name in ('S decoder-only', 'B-S', 'B decoder-only'):
      path, _, _ = checkpoint(models[name], work / name.replace(' ', '_'))
      pairs[name] = serve(name, path, best_server.size,
                          [(load, at_once)])[0]

  if latency:
    plot(latency, pathlib.Path(args.plot))
  report(args, load, latency_load, saturation, latency, pairs, step_times,
         best_server.size)


def sweep_latency(args, serve, path, statics, best_server, best_static, load,
                  latency_load):
  """TTFT / ITL of the server and of static batches at fractions of the
  server's saturation request rate: {system: [(rate, Run)]}."""
  request_rate = len(load) / best_server.wall
  rates = [f * request_rate for f in RATE_FRACTIONS]
  arrivals = [poisson(len(latency_load), rate, seed=10 + k)
              for k, rate in enumerate(rates)]
  latency = {'server': list(zip(rates, serve(
      'S-S', path, best_server.size,
      [(latency_load, a) for a in arrivals]))), 'predict_batch': []}
  for rate, times in zip(rates, arrivals):
    common.log(f'predict_batch, batches of {best_static.size}, '
               f'{rate:.2f} requests/s')
    latency['predict_batch'].append((rate, run_static(
        statics[best_static.size], latency_load, times, 'predict_batch')))
  return latency


def report(args, load, latency_load, saturation, latency, pairs, step_times,
           slots):
  import jax
  print(f'\n## Serving on {jax.devices()[0].device_kind}, '
        f'{common.num_cores()} cores\n')
  print(f'{len(load)} requests (prompts {PROMPT_RANGE[0]}-{PROMPT_RANGE[1]} '
        f'tokens, {NEW_TOKENS_RANGE[0]}-{NEW_TOKENS_RANGE[1]} new tokens, '
        f'{load.tokens} in all), greedy, float32, S-S (101.8M). The load '
        'generator shares the 2 cores with the server.\n')
  print('### (i) Saturation: generated tokens/s\n')
  sizes = sorted({r.size for runs in saturation.values() for r in runs})
  print('| system | ' + ' | '.join(f'{n}' for n in sizes) + ' | best |')
  print('|---|' + '---:|' * (len(sizes) + 1))
  for system, runs in saturation.items():
    top = best(runs)
    by_size = {r.size: f'{r.tokens_per_s:.0f}' for r in runs}
    print(f'| {system} | ' + ' | '.join(by_size.get(n, '-') for n in sizes)
          + f' | {top.tokens_per_s:.0f} ({top.size}) |')
  server = best(saturation['server']).tokens_per_s
  for system, runs in saturation.items():
    if system != 'server':
      print(f'\nserver / {system}: {server / best(runs).tokens_per_s:.2f}x')
  step, per_token = step_times
  print(f'\nDecode step with all {slots} slots busy: {1e3 * step:.1f} ms; '
        f'predict_batch at batch {slots}: {1e3 * per_token:.1f} ms a token '
        f'({step / per_token:.2f}x)')
  if latency:
    report_latency(args, latency, latency_load)
  if len(pairs) > 1:
    report_pairs(pairs)


def report_latency(args, latency, latency_load):
  print(f'\n### (ii) Latency ({len(latency_load)} requests a rate)\n')
  print('| system | requests/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |')
  print('|---|---:|---:|---:|---:|---:|')
  for system, points in latency.items():
    for rate, run in points:
      print(f'| {system} ({run.size}) | {rate:.2f} | '
            f'{run.percentile("ttft", 50):.2f} s | '
            f'{run.percentile("ttft", 99):.2f} s | '
            f'{1e3 * run.percentile("itl", 50):.0f} ms | '
            f'{1e3 * run.percentile("itl", 99):.0f} ms |')
  print(f'\nplot: {args.plot}')


def report_pairs(pairs):
  print('\n### (iii) Encoder-decoder vs decoder-only, server saturation\n')
  print('| model | tokens/s |')
  print('|---|---:|')
  for name, run in pairs.items():
    print(f'| {name} | {run.tokens_per_s:.0f} |')
  if 'B decoder-only' in pairs:
    print(f'\nS-S / S decoder-only: {pairs["S-S"].tokens_per_s / pairs["S decoder-only"].tokens_per_s:.2f}x; '
          f'B-S / B decoder-only: {pairs["B-S"].tokens_per_s / pairs["B decoder-only"].tokens_per_s:.2f}x')


if __name__ == '__main__':
  main()

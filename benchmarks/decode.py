"""Greedy decoding speed: encoder-decoder vs decoder-only, ours vs transformers.

Prints a markdown table. Each pair is an encoder-decoder and the decoder-only
model of its decoder stack (the pairing of the T5Gemma adaptation, e.g. a
2B decoder-only model into 2B-2B):

  tiny   t5gemma_tiny and gemma2_tiny (the test presets);
  s      the T5Gemma S-S stacks (8 layers, d_model 512, MLP 1024, 8 heads)
         with a 50,257-token vocabulary, as in benchmarks/train_step.py:
         101.8M parameters encoder-decoder, ~47M decoder-only.

Each row is one model at one batch size, prompts (or encoder inputs) of 256
random tokens without padding, 64 new tokens (`--quick`: 64 and 16).

  ours          `predict_batch` (greedy, KV caches, scanned layers; float32
                unless `--dtypes` asks for more), jitted; the compile is
                timed apart.
  transformers  `generate(do_sample=False, num_beams=1)` of
                T5GemmaForConditionalGeneration / Gemma2ForCausalLM built
                from the same configuration: eager attention, the row's dtype,
                `torch.set_num_threads(2)`, `min_new_tokens` so that EOS
                does not end a row early.

Both generate 1 new token (the prefill: the prompt or encoder, and the first
token) and all of them; after a warm-up call each, `--repeats` rounds time
every call once, ours and transformers' interleaved, and the shortest time
counts. So

  decode tokens/s     = batch x (new - 1) / (time(new) - time(1)),
  end-to-end tokens/s = batch x new / time(new).

Each row also gets a weight-streaming floor: the bytes a greedy step must
read (every decoder parameter, the LM head included, and the keys and values
at the mean cache length, in the row's dtype) over the rate at which a
decoding-shaped float32 matmul `[batch, d_model] x [d_model, vocab]` reads
its table in the same run; "vs floor" is the decode tokens/s as a share of
that ceiling. (The bfloat16 matmul's own rate is printed too: XLA:CPU reads
bfloat16 tables slower, so it would flatter bfloat16 rows.)

`--dtypes float32,bfloat16` adds bfloat16 rows: parameters, activations and
caches in bfloat16, ours and transformers' (`dtype=torch.bfloat16`).
`int8` rows hold every projection kernel as int8 with per-channel scales
(`t5x_adapt.quantization`; activations, caches and the tied table float32)
against transformers' float32 model; their floor counts the int8 bytes.

  .venv/bin/python benchmarks/decode.py            # a few minutes
  .venv/bin/python benchmarks/decode.py --quick    # about a minute
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import pathlib
import sys
from typing import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# pylint: disable=g-import-not-at-top
import common  # puts the repository on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from t5x_adapt import gin_utils
from t5x_adapt import quantization
from t5x_adapt.config import EncoderDecoderConfig, StackConfig
from t5x_adapt.data.vocab import BOS_ID
from t5x_adapt.kernels.matmul import matmul_2d
from t5x_adapt.models import model_for_config


@dataclasses.dataclass
class Runner:
  """One implementation's blocking generate calls for one model and batch.

  Attributes:
    name: Row name.
    params: Parameter count.
    batch: Batch size.
    compile_s: Compile seconds of all calls (None: eager).
    calls: New tokens -> a call that generates them and blocks.
    step_bytes: Bytes one decoding step reads at least (see
      `step_bytes`; 0 where not counted).
    decoder_params: Parameters of the stack that runs once per new token
      (an encoder-decoder's decoder; 0 where not counted).
  """
  name: str
  params: int
  batch: int
  compile_s: float | None
  calls: dict[int, Callable[[], object]]
  step_bytes: int = 0
  decoder_params: int = 0


@dataclasses.dataclass
class Timing:
  """Seconds of one model at one batch: prefill (1 new token) and full."""
  runner: Runner
  new_tokens: int
  prefill_s: float
  total_s: float

  @property
  def decode_tokens_per_s(self) -> float:
    """NaN where timing noise exceeds the decoding time."""
    decode_s = self.total_s - self.prefill_s
    if decode_s <= 0:
      return float('nan')
    return self.runner.batch * (self.new_tokens - 1) / decode_s

  @property
  def end_to_end_tokens_per_s(self) -> float:
    return self.runner.batch * self.new_tokens / self.total_s


def measure(runners: list[Runner], new_tokens: int,
            repeats: int) -> list[Timing]:
  """Best wall time of each call, after one warm-up call each.

  The rounds interleave the runners, so that load from other processes on
  a shared machine falls on all of them alike; the shortest time counts
  since such load only ever adds time.
  """
  for runner in runners:
    for call in runner.calls.values():
      call()
  best = [dict.fromkeys(r.calls, float('inf')) for r in runners]
  for round_index in range(repeats):
    common.log(f'{", ".join(r.name for r in runners)}: round {round_index + 1}')
    for runner, seconds in zip(runners, best):
      for n, call in runner.calls.items():
        seconds[n] = min(seconds[n], common.timed(call)[1].wall)
  return [Timing(r, new_tokens, s[1], s[new_tokens])
          for r, s in zip(runners, best)]


def prompts(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
  """[batch, length] random ids behind BOS, no padding."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, vocab, (batch, length), dtype=np.int32)
  tokens[:, 0] = BOS_ID
  return tokens


def pairs() -> dict[str, EncoderDecoderConfig]:
  """The encoder-decoder configuration of each pair (float32, scanned)."""
  tiny = gin_utils.load_model('t5gemma_tiny').config
  return {'tiny': tiny.map_stacks(dtype='float32', param_dtype='float32',
                                  scan_layers=True, remat_policy='none'),
          's': common.s_s_config()}


def models(configs: dict[str, EncoderDecoderConfig], names: list[str],
           dtypes: list[str]) -> list[tuple[str, StackConfig |
                                             EncoderDecoderConfig, str]]:
  """(row name, config, dtype): each pair's encoder-decoder and
  decoder-only model in each dtype (parameters, activations and caches;
  'int8': float32 with int8 projection kernels)."""
  rows = []
  for pair in names:
    for dtype in dtypes:
      float_dtype = 'float32' if dtype == 'int8' else dtype
      encdec = configs[pair].map_stacks(dtype=float_dtype,
                                        param_dtype=float_dtype)
      suffix = '' if dtype == 'float32' else f' {dtype}'
      rows += [(f'{pair} encoder-decoder{suffix}', encdec, dtype),
               (f'{pair} decoder-only{suffix}', encdec.decoder, dtype)]
  return rows


def cpu_pressure() -> str:
  """The kernel's CPU pressure (share of time some task waited for a CPU,
  last minute), or '?' where /proc/pressure is missing."""
  try:
    with open('/proc/pressure/cpu') as f:
      return f.readline().split()[2].split('=')[1] + '%'
  except (OSError, IndexError):
    return '?'


# ------------------------------------------------------ weight-streaming floor --


def step_bytes(model, params, batch: int, length: int, new_tokens: int) -> int:
  """Bytes one greedy step reads at the least, each parameter at its
  dtype (int8 kernels at one byte; the caches in the activation dtype):
  every decoder
  parameter (the LM head included; an encoder-decoder's encoder is not run)
  and the keys and values its attention reads, at the mean cache length of
  the decoding (`length` prompt + half the new tokens for a decoder-only
  model; half the new tokens of self-attention plus the `length` encoder
  positions of cross-attention for an encoder-decoder)."""
  stack = model.config.decoder_stack
  weights = quantization.num_bytes(model.decoder_params(params))
  cached = new_tokens / 2 + length  # self-attention (+ cross-attention)
  kv = 2 * stack.num_layers * batch * stack.num_kv_heads * stack.head_dim
  return int(weights + stack.activation_dtype.itemsize * kv * cached)


def streaming_bandwidth(batch: int, embed_dim: int, vocab: int,
                        dtype: str = 'float32') -> float:
  """Bytes/s of a decoding-shaped matmul, `[batch, d] x [d, v]` in `dtype`
  as the model runs it (`matmul_2d`): the rate at which a step can read its
  weights here (best of 10)."""
  rows = jnp.ones((batch, embed_dim), dtype)
  table = jax.random.normal(jax.random.PRNGKey(0), (embed_dim, vocab), dtype)
  matmul = jax.jit(functools.partial(matmul_2d, contract=1))
  jax.block_until_ready(matmul(rows, table))
  best = min(common.timed(lambda: jax.block_until_ready(matmul(rows, table)))[1]
             .wall for _ in range(10))
  return table.dtype.itemsize * embed_dim * vocab / best


# --------------------------------------------------------------------- ours --


def ours_runner(name: str, config: StackConfig | EncoderDecoderConfig,
                batch: int, length: int, new_tokens: int,
                dtype: str = 'float32') -> Runner:
  """Our greedy `predict_batch`, compiled for 1 and `new_tokens` tokens
  (`dtype` 'int8': int8 projection kernels)."""
  model = model_for_config(config)
  features = {model.INPUTS_FEATURE: jnp.asarray(
      prompts(batch, length, config.vocab_size))}
  # Parameters do not depend on the batch shape: init on the default one.
  params = model.get_initial_variables(jax.random.PRNGKey(0), {})['params']
  if dtype == 'int8':
    params = quantization.quantize(
        model, params, quantization.WeightQuantization('int8'))
  calls, compile_s = {}, 0.0
  for n in (1, new_tokens):
    common.log(f'ours {name} batch {batch}: compile {n} new tokens')
    compiled, sample = common.timed(lambda n=n: jax.jit(
        model.predict_batch, static_argnums=2).lower(
            params, features, n).compile())
    compile_s += sample.wall
    calls[n] = lambda c=compiled: jax.block_until_ready(c(params, features))
  return Runner(name, common.count_params(params), batch, compile_s, calls,
                step_bytes(model, params, batch, length, new_tokens),
                common.count_params(model.decoder_params(params)))


# ------------------------------------------------------------ transformers --


def hf_model(config: StackConfig | EncoderDecoderConfig):
  """transformers' model of `config`, randomly initialised, eager, in the
  parameter dtype of `config`."""
  import torch
  import transformers
  from t5x_adapt.convert.hf import stack_config_to_hf
  if config.is_encoder_decoder:
    cls, hf_config = (transformers.T5GemmaForConditionalGeneration,
                      common.hf_config(config))
  else:
    cls, hf_config = (transformers.Gemma2ForCausalLM,
                      transformers.Gemma2Config(**stack_config_to_hf(config)))
  stack = config.decoder_stack
  torch.manual_seed(0)
  return cls._from_config(  # pylint: disable=protected-access
      hf_config, attn_implementation='eager',
      dtype=getattr(torch, stack.param_dtype)).eval()


def hf_runner(name: str, config: StackConfig | EncoderDecoderConfig,
              batch: int, length: int, new_tokens: int) -> Runner:
  """transformers' greedy `generate` on the same shapes."""
  import torch
  torch.set_num_threads(2)
  model = hf_model(config)
  ids = torch.tensor(prompts(batch, length, model.config.vocab_size),
                     dtype=torch.long)

  def generate(n):
    with torch.no_grad():
      return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                            do_sample=False, num_beams=1, max_new_tokens=n,
                            min_new_tokens=n)

  params = sum(p.numel() for p in model.parameters())
  return Runner(f'HF {name}', params, batch, None,
                {n: functools.partial(generate, n) for n in (1, new_tokens)})


# ------------------------------------------------------------------- table --


def floor_tokens_per_s(timing: Timing, bandwidth: float) -> float:
  """Decode tokens/s if every step only read its `step_bytes` at
  `bandwidth` bytes/s."""
  return timing.runner.batch * bandwidth / timing.runner.step_bytes


def print_table(rows: list[tuple[Timing, Timing | None, float]],
                length: int) -> None:
  """One line per (ours, transformers or None, streaming bytes/s)."""
  print('| model | params | batch | prompt + new | compile s | prefill s | '
        'total s | decode tok/s | end-to-end tok/s | HF prefill s | '
        'HF total s | HF decode tok/s | HF end-to-end tok/s | decode vs HF | '
        'MB read/step | floor tok/s | vs floor |')
  print('|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
        '---:|---:|---:|---:|')
  for ours, hf, bandwidth in rows:
    runner = ours.runner
    cells = [runner.name, f'{runner.params / 1e6:.1f}M', str(runner.batch),
             f'{length} + {ours.new_tokens}', f'{runner.compile_s:.1f}',
             f'{ours.prefill_s:.3f}', f'{ours.total_s:.3f}',
             f'{ours.decode_tokens_per_s:,.0f}',
             f'{ours.end_to_end_tokens_per_s:,.0f}']
    if hf is None:
      cells += ['-'] * 5
    else:
      cells += [f'{hf.prefill_s:.3f}', f'{hf.total_s:.3f}',
                f'{hf.decode_tokens_per_s:,.0f}',
                f'{hf.end_to_end_tokens_per_s:,.0f}',
                f'{ours.decode_tokens_per_s / hf.decode_tokens_per_s:.2f}x']
    floor = floor_tokens_per_s(ours, bandwidth)
    cells += [f'{runner.step_bytes / 1e6:,.0f}', f'{floor:,.0f}',
              f'{ours.decode_tokens_per_s / floor:.0%}']
    print('| ' + ' | '.join(cells) + ' |')


def parse_args(argv=None) -> argparse.Namespace:
  parser = common.argument_parser(__doc__)
  parser.add_argument('--quick', action='store_true',
                      help='prompts of 64, 16 new tokens, 2 timed calls')
  parser.add_argument('--repeats', type=int, default=None,
                      help='timed calls per measurement (default 3, 2 with '
                      '--quick)')
  parser.add_argument('--pairs', default='tiny,s',
                      help='comma-separated pairs to run: tiny, s')
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--skip_hf', action='store_true')
  parser.add_argument('--dtypes', default='float32',
                      help='comma-separated: float32, bfloat16 (parameters, '
                      'activations and caches in that dtype, ours and '
                      "transformers'), int8 (our projection kernels int8, "
                      "against transformers' float32)")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  length, new_tokens = (64, 16) if args.quick else (256, 64)
  repeats = args.repeats or (2 if args.quick else 3)
  batches = [int(b) for b in args.batches.split(',')]
  load_start, pressure_start = os.getloadavg()[0], cpu_pressure()
  configs = pairs()
  rows, bandwidths = [], {}
  for name, config, dtype in models(configs, args.pairs.split(','),
                                    args.dtypes.split(',')):
    for batch in batches:
      runners = [ours_runner(name, config, batch, length, new_tokens, dtype)]
      if not args.skip_hf:
        runners.append(hf_runner(name, config, batch, length, new_tokens))
      timings = measure(runners, new_tokens, repeats)
      stack = config.decoder_stack
      # The floor streams at the float32 rate whatever the dtype: XLA's
      # bfloat16 matvec reads its table slower than the float32 one, and
      # the floor is what the memory allows, not what one kernel reaches.
      for table_dtype in dict.fromkeys(('float32', stack.param_dtype)):
        key = (batch, stack.embed_dim, stack.vocab_size, table_dtype)
        if key not in bandwidths:
          bandwidths[key] = streaming_bandwidth(*key)
      rows.append((timings[0], timings[1] if len(timings) > 1 else None,
                   bandwidths[batch, stack.embed_dim, stack.vocab_size,
                              'float32']))

  versions = [f'jax {jax.__version__}']
  if not args.skip_hf:
    import torch
    import transformers
    versions += [f'torch {torch.__version__}',
                 f'transformers {transformers.__version__}']
  device = jax.devices()[0]
  print(f'\n## Greedy decoding on {device.platform} ({device.device_kind}), '
        f'{common.num_cores()} cores\n')
  print(f'{", ".join(versions)}; {args.dtypes}; best of {repeats} interleaved '
        'timed calls after a warm-up. Load average at start '
        f'{load_start:.2f}, at end {os.getloadavg()[0]:.2f}; CPU pressure '
        f'(time some task waited for a CPU, last minute) at start '
        f'{pressure_start}, at end {cpu_pressure()}: torch (OpenMP) slows '
        'down far more than XLA when another process holds a core. prefill = '
        '1 new token (the prompt or encoder and the first token); decode '
        'tok/s = batch x (new - 1) / (total - prefill). The floor: '
        'decode tok/s if a step only read its weights and KV cache (MB '
        'read/step) at the rate a float32 `[batch, d] x [d, vocab]` '
        'matmul streams its table in this run:\n')
  for (batch, embed, vocab, dtype), rate in bandwidths.items():
    print(f'- [{batch}, {embed}] x [{embed}, {vocab:,}] {dtype}: '
          f'{rate / 1e9:.1f} GB/s')
  print()
  print_table(rows, length)


if __name__ == '__main__':
  main()

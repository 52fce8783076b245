"""Training-step throughput and MFU on CPU, against transformers' T5Gemma.

Prints a markdown table with, per row: parameters, batch, analytic FLOPs per
step (`BaseModel.train_step_flops`: matmul FLOPs, forward + 2x
backward), compile time, step time, tokens/s, achieved GFLOP/s and MFU
(analytic FLOPs / step time / the device peak of `t5x_adapt.flops`, 90
GFLOP/s on CPU) and against a 2048^3 matmul timed in the same run, the
process's CPU seconds per step (user + sys, from getrusage: less sensitive to
other processes on the machine than wall time), and the speed-up over
transformers by wall time and by CPU seconds. Rows:

  tiny       the `t5gemma_tiny` preset, batch 8 x (128 inputs + 128 targets);
  s_s        a ~102M-parameter encoder-decoder: the T5Gemma S-S stacks (8 + 8
             layers, d_model 512, MLP 1024, 8 heads, 8 KV heads, head_dim 64)
             with a 50,257-token vocabulary instead of 256k (encoder and
             decoder embeddings are separate tables: 101.8M parameters),
             batch 8 x (512 + 512);
  hf         transformers' T5GemmaForConditionalGeneration on the same
             configuration (built with `convert.hf.stack_config_to_hf`),
             batch and lengths: eager attention (the only one it supports
             with softcapping), float32, AdamW, `torch.set_num_threads(2)`.

Our rows run `Trainer.compile_step` (compile time reported separately) with
`Partitioner()` on one CPU device, float32 parameters and activations,
scanned layers, AdamW with global-norm clipping (`optimizers.optimizer`);
transformers' step clips the same way. Every step is timed from dispatch to
`block_until_ready`. Tokens are inputs + targets (no padding).

Without remat the `s_s` step holds ~16 GiB (every layer's attention
probabilities and the [8, 512, 50257] logits and their gradients are kept for
the backward pass); when that does not fit in the memory available at the
time, the row falls back to `remat_policy='dots'` and says so
(`--no_fallback` to insist). transformers runs in a child process, so that
running out of memory there loses only its row.

`--bf16` adds bfloat16-activation rows (float32 parameters and optimizer):
`s_s bf16` (the `--remat` policy) and `hf bf16` (transformers under
`torch.autocast('cpu', torch.bfloat16)`), each compared with the other and
against a bfloat16 2048^3 matmul timed in the same run.

`--quick` shortens `s_s` and `hf` to 128 + 128 and times fewer steps.
`--profile` traces one `s_s` step with `jax.profiler` and prints where the
time goes (attention core, LM head, MLP, ...), and times the forward pass
alone. `--remat dots` adds an `s_s` row with rematerialised layers.

  .venv/bin/python benchmarks/train_step.py            # ~6-8 minutes
  .venv/bin/python benchmarks/train_step.py --quick    # ~2-3 minutes
  .venv/bin/python benchmarks/train_step.py --profile --skip_hf
  .venv/bin/python benchmarks/train_step.py --remat dots --bf16   # ~10 min
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import glob
import gzip
import json
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from typing import Callable, Optional

from common import S_S_VOCAB, Sample, argument_parser, count_params  # pylint: disable=g-bad-import-order
from common import elapsed, hf_config, log, make_batch, num_cores
from common import s_s_config, timed

# pylint: disable=g-import-not-at-top
import jax
import numpy as np

from t5x_adapt import flops as flops_lib
from t5x_adapt import gin_utils
from t5x_adapt import optimizers
from t5x_adapt import trainer as trainer_lib
from t5x_adapt.config import EncoderDecoderConfig
from t5x_adapt.models import EncoderDecoderModel
from t5x_adapt.partitioning import Partitioner

LEARNING_RATE = 1e-4


# ------------------------------------------------------------- measurement --


@dataclasses.dataclass
class Result:
  """One table row."""
  name: str
  params: int
  batch: int
  inputs: int
  targets: int
  step_flops: int
  compile_s: Optional[float]
  first: Sample
  steps: list[Sample]
  losses: list[float]
  note: str = ''
  memory: str = ''
  dtype: str = 'float32'

  @property
  def tokens(self) -> int:
    return self.batch * (self.inputs + self.targets)

  @property
  def step_s(self) -> float:
    return statistics.median(s.wall for s in self.steps)

  def mean(self, field: str) -> float:
    return statistics.mean(getattr(s, field) for s in self.steps)


def timed_steps(name: str, one_step: Callable[[], float], steps: int):
  """A first (compiling / warm-up) step, then `steps` timed ones.

  Returns:
    (losses of every step, the first step's Sample, the timed Samples).
  """
  loss, first = timed(one_step)
  losses, samples = [loss], []
  for i in range(steps):
    log(f'{name}: step {i + 1}/{steps}')
    loss, sample = timed(one_step)
    losses.append(loss)
    samples.append(sample)
  return losses, first, samples


# ---------------------------------------------------------------- our step --


@dataclasses.dataclass
class Prepared:
  """A compiled step with its state and batch, kept for profiling."""
  model: EncoderDecoderModel
  trainer: trainer_lib.Trainer
  compiled: object
  state: object
  batch: dict


def available_bytes() -> Optional[int]:
  """MemAvailable of /proc/meminfo (None where there is none)."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def step_bytes(compiled) -> Optional[int]:
  """Arguments + temporaries of a compiled step (outputs alias donated
  arguments), or None where XLA does not say."""
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if analysis is None:
    return None
  return (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes)


def compile_ours(config: EncoderDecoderConfig, host_batch: dict):
  """(trainer, compiled step, compile seconds) without allocating a state."""
  model = EncoderDecoderModel(config)
  partitioner = Partitioner(devices=jax.devices()[:1])
  trainer = trainer_lib.Trainer(
      model, partitioner, optimizers.optimizer(learning_rate=LEARNING_RATE))
  batch_structs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                   for k, v in host_batch.items()}
  compiled, sample = timed(lambda: trainer.compile_step(batch_structs))
  return trainer, compiled, sample.wall


def run_ours(name: str, config: EncoderDecoderConfig, batch: int, inputs: int,
             targets: int, steps: int, keep: bool = False,
             fallback_remat: Optional[str] = None):
  """Compiles and times our train step; returns (Result, Prepared or None).

  With `fallback_remat`, a step whose arguments + temporaries would not fit
  in the memory available now (less 1 GiB) is recompiled with that
  `remat_policy` instead, and the row says so.
  """
  host_batch = make_batch(batch, inputs, targets, config.decoder.vocab_size)
  input_shapes = {k: v.shape for k, v in host_batch.items()}
  log(f'{name}: compile')
  trainer, compiled, compile_s = compile_ours(config, host_batch)
  note = ''
  need, free = step_bytes(compiled), available_bytes()
  if (fallback_remat and need is not None and free is not None and
      need > free - 2**30):
    note = (f'remat_policy={fallback_remat}: without remat the step needs '
            f'{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB available')
    log(f'{name}: {note}')
    name = f'{name} (remat={fallback_remat})'
    config = config.map_stacks(remat_policy=fallback_remat)
    del compiled
    trainer, compiled, compile_s = compile_ours(config, host_batch)
  memory = trainer_lib.memory_summary(compiled)

  log(f'{name}: init state')
  state = trainer.init_state()
  params = count_params(state.params)
  device_batch = trainer.partitioner.shard_batch(host_batch)
  step_flops = trainer.model.train_step_flops(input_shapes)

  def one_step():
    nonlocal state
    state, metrics = compiled(state, device_batch)
    return float(jax.block_until_ready(metrics)['loss'])

  log(f'{name}: first step ({params / 1e6:.1f}M params)')
  losses, first, samples = timed_steps(name, one_step, steps)
  if not all(np.isfinite(losses)):
    raise RuntimeError(f'{name}: non-finite loss {losses}')
  result = Result(name, params, batch, inputs, targets, step_flops,
                  compile_s, first, samples, losses, note=note, memory=memory,
                  dtype=config.decoder.dtype)
  prepared = (Prepared(trainer.model, trainer, compiled, state, device_batch)
              if keep else None)
  return result, prepared


# ---------------------------------------------------------- transformers --


def run_hf(name: str, config: EncoderDecoderConfig, batch: int, inputs: int,
           targets: int, steps: int, dtype: str = 'float32') -> Result:
  """Times transformers' training step on the same config and batch shape.

  With `dtype='bfloat16'` the forward and loss run under
  `torch.autocast('cpu', torch.bfloat16)` (float32 parameters and optimizer,
  as for our bfloat16 row).
  """
  import torch
  import transformers
  torch.set_num_threads(2)
  torch.manual_seed(0)
  log(f'{name}: build transformers model')
  model = transformers.T5GemmaForConditionalGeneration._from_config(  # pylint: disable=protected-access
      hf_config(config), attn_implementation='eager', dtype=torch.float32)
  if model.config._attn_implementation != 'eager':  # pylint: disable=protected-access
    raise RuntimeError('expected eager attention, got '
                       f'{model.config._attn_implementation}')  # pylint: disable=protected-access
  model.train()
  params = sum(p.numel() for p in model.parameters())
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE,
                                betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
  host = make_batch(batch, inputs, targets, config.decoder.vocab_size)
  enc = torch.tensor(host['encoder_input_tokens'], dtype=torch.long)
  dec = torch.tensor(host['decoder_input_tokens'], dtype=torch.long)
  labels = torch.tensor(host['decoder_target_tokens'], dtype=torch.long)

  def autocast():
    if dtype == 'float32':
      return contextlib.nullcontext()
    return torch.autocast('cpu', dtype=getattr(torch, dtype))

  def one_step():
    with autocast():
      out = model(input_ids=enc, attention_mask=torch.ones_like(enc),
                  decoder_input_ids=dec,
                  decoder_attention_mask=torch.ones_like(dec),
                  labels=labels, use_cache=False)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss.item()

  log(f'{name}: warm-up step ({params / 1e6:.1f}M params)')
  losses, first, samples = timed_steps(name, one_step, steps)
  del model, optimizer
  gc.collect()
  return Result(name, params, batch, inputs, targets,
                EncoderDecoderModel(config).train_step_flops({
                    'encoder_input_tokens': (batch, inputs),
                    'decoder_target_tokens': (batch, targets)}),
                None, first, samples, losses,
                note='transformers eager, torch threads 2' +
                ('' if dtype == 'float32' else f', autocast {dtype}'),
                dtype=dtype)


def run_hf_child(name: str, length: int, steps: int,
                 dtype: str = 'float32') -> Optional[Result]:
  """`run_hf` in a subprocess, so that running out of memory there (the
  transformers step keeps every attention matrix) loses only its row."""
  command = [sys.executable, str(pathlib.Path(__file__).resolve()),
             '--hf_child', f'{name},{length},{steps},{dtype}']
  proc = subprocess.run(command, stdout=subprocess.PIPE, text=True,
                        check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode or not lines:
    log(f'{name}: child process failed (exit code {proc.returncode}; -9 is '
        'usually the OOM killer)')
    return None
  data = json.loads(lines[-1])
  data['first'] = Sample(**data['first'])
  data['steps'] = [Sample(**s) for s in data['steps']]
  return Result(**data)


# ----------------------------------------------------------------- profile --

_CONTROL_OPS = ('while', 'call', 'conditional', 'async-start', 'async-done')


def _hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """Instruction name -> (opcode, shape, metadata op_name)."""
  info = {}
  pattern = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+?) ([\w\-]+)\(')
  for line in hlo_text.splitlines():
    match = pattern.match(line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      info[match.group(1)] = (match.group(3), match.group(2),
                              op_name.group(1) if op_name else '')
  return info


def _bucket(name: str, shape: str, op_name: str, vocab: int) -> tuple[str, str]:
  """(part of the model, kind of kernel) of one executed HLO instruction."""
  if name.startswith(('ynn', 'dot', 'onednn', 'custom', 'xnn')):
    kind = 'matmul fusion'
  elif name.startswith(('copy', 'transpose')):
    kind = 'copy/transpose'
  else:
    kind = 'elementwise/reduce'
  if 'token_embedder.attend' in op_name and kind == 'matmul fusion':
    part = 'LM head matmuls'
  elif f'{vocab}' in shape or name.startswith('iota_reduce'):
    part = 'logits elementwise (softcap, log-softmax, argmax, grads)'
  elif '_attend' in op_name:
    part = 'attention core (QK^T, mask, softcap, softmax, PV)'
  elif '/mlp/' in op_name:
    part = 'MLP (GeGLU)'
  elif 'attention' in op_name:
    part = 'attention projections, RoPE'
  elif 'dynamic' in op_name or 'dynamic' in name:
    part = 'scan: stacking/slicing residuals'
  elif 'norm' in op_name:
    part = 'RMSNorms'
  else:
    part = 'other (optimizer, embeddings, ...)'
  return part, kind


def profile_step(prepared: Prepared, result: Result, vocab: int) -> str:
  """Traces one step; returns markdown: time per model part and kernel
  kind, the slowest kernels, and the forward pass alone."""
  out = []
  hlo = prepared.compiled.as_text()
  info = _hlo_instructions(hlo)
  with tempfile.TemporaryDirectory() as trace_dir:
    log('profile: tracing one step')
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    state, metrics = prepared.compiled(prepared.state, prepared.batch)
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    prepared.state = state
    files = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'),
                      recursive=True)
    if not files:
      return '\n(profile: no perfetto trace written)'
    with gzip.open(files[0]) as f:
      events = json.load(f)['traceEvents']
  per_op = collections.Counter()
  for event in events:
    name = event.get('name', '')
    if event.get('ph') != 'X' or name not in info:
      continue
    if info[name][0] in _CONTROL_OPS:
      continue
    per_op[name] += event.get('dur', 0) / 1e6
  total = sum(per_op.values())
  parts = collections.Counter()
  kinds = collections.Counter()
  for name, seconds in per_op.items():
    op, shape, op_name = info[name]
    part, kind = _bucket(name, shape, op_name, vocab)
    parts[part] += seconds
    kinds[(part, kind)] += seconds

  out.append(f'\n### Where the `{result.name}` step goes (one traced step, '
             f'{total:.1f} s of kernels)\n')
  out.append('| part | seconds | share | matmul | copy/transpose | '
             'elementwise |')
  out.append('|---|---:|---:|---:|---:|---:|')
  for part, seconds in parts.most_common():
    cols = [kinds[(part, k)] for k in
            ('matmul fusion', 'copy/transpose', 'elementwise/reduce')]
    out.append(f'| {part} | {seconds:.2f} | {seconds / total:.0%} | ' +
               ' | '.join(f'{c:.2f}' for c in cols) + ' |')
  out.append('\nSlowest kernels (summed over scan iterations):\n')
  out.append('| seconds | calls | kernel | shape | op |')
  out.append('|---:|---:|---|---|---|')
  calls = collections.Counter(
      e['name'] for e in events
      if e.get('ph') == 'X' and e.get('name') in per_op)
  for name, seconds in per_op.most_common(12):
    op, shape, op_name = info[name]
    short = '/'.join(op_name.split('/')[-3:])
    out.append(f'| {seconds:.2f} | {calls[name]} | {name} | {shape[:32]} | '
               f'{short[:80]} |')

  # Forward (loss) alone, for the forward : step ratio.
  model, params, batch = prepared.model, prepared.state.params, prepared.batch
  forward = jax.jit(lambda p, b: model.loss_fn(p, b, None)[0])
  with prepared.trainer.context():
    log('profile: compile forward')
    jax.block_until_ready(forward(params, batch))
    log('profile: time forward')
    walls = [timed(lambda: jax.block_until_ready(forward(params, batch)))[1]
             for _ in range(2)]
  fwd = min(s.wall for s in walls)
  out.append(f'\nForward (loss only, jitted): {fwd:.2f} s = '
             f'{fwd / result.step_s:.0%} of the step '
             f'({result.step_flops / 3 / fwd / 1e9:.0f} GFLOP/s on the forward '
             'third of the analytic FLOPs).')
  return '\n'.join(out)


# ------------------------------------------------------------------- table --


def hf_key(result: Result) -> tuple:
  """What a row and the transformers row it is compared with share."""
  return (result.params, result.batch, result.inputs, result.targets,
          result.dtype)


def print_table(results: list[Result], peak: float,
                measured: dict[str, float], hf_by_shape: dict) -> None:
  """`measured`: the jnp matmul FLOP/s of each dtype, `hf_by_shape`:
  transformers' rows by `hf_key`."""
  cores = num_cores()
  print('| row | params | batch x (in + tgt) | GFLOP/step | compile s | '
        'first step s | step s (median) | best step s | tokens/s | GFLOP/s | '
        'MFU | MFU vs matmul | CPU s/step | CPU util | sys s/step | '
        'vs HF (wall) | vs HF (CPU s) |')
  print('|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|'
        '---:|---:|---:|---:|')
  for r in results:
    hf = hf_by_shape.get(hf_key(r))
    cpu_s = r.mean('user') + r.mean('sys')
    if hf is None:
      speedup = cpu_speedup = '-'
    else:
      speedup = f'{hf.step_s / r.step_s:.2f}x'
      cpu_speedup = (f'{(hf.mean("user") + hf.mean("sys")) / cpu_s:.2f}x')
    util = cpu_s / (r.mean('wall') * cores)
    compile_s = f'{r.compile_s:.1f}' if r.compile_s is not None else '-'
    print(f'| {r.name} | {r.params / 1e6:.2f}M | {r.batch} x ({r.inputs} + '
          f'{r.targets}) | {r.step_flops / 1e9:,.1f} | {compile_s} | '
          f'{r.first.wall:.2f} | {r.step_s:.3f} | '
          f'{min(x.wall for x in r.steps):.3f} | '
          f'{r.tokens / r.step_s:,.0f} | '
          f'{r.step_flops / r.step_s / 1e9:.1f} | '
          f'{r.step_flops / r.step_s / peak:.1%} | '
          f'{r.step_flops / r.step_s / measured[r.dtype]:.1%} | '
          f'{cpu_s:.2f} | '
          f'{util:.0%} | '
          f'{r.mean("sys"):.2f} | {speedup} | {cpu_speedup} |')
  print()
  for r in results:
    walls = ', '.join(f'{s.wall:.3f}' for s in r.steps)
    faults = statistics.mean(s.minflt for s in r.steps)
    extra = f'; {r.note}' if r.note else ''
    memory = f'; XLA memory: {r.memory}' if r.memory else ''
    print(f'- {r.name}: {r.tokens:,} tokens/step, analytic '
          f'{r.step_flops:.4g} FLOP/step; timed steps [{walls}] s; '
          f'{faults:,.0f} minor page faults/step; losses '
          f'{", ".join(f"{l:.3f}" for l in r.losses)}{extra}{memory}')


def parse_args(argv=None) -> argparse.Namespace:
  parser = argument_parser(__doc__)
  parser.add_argument('--quick', action='store_true',
                      help='s_s and hf at 128 + 128, fewer timed steps')
  parser.add_argument('--steps', type=int, default=None,
                      help='timed steps of our rows (default 5 tiny / 3 s_s, '
                      '2 with --quick)')
  parser.add_argument('--hf_steps', type=int, default=None,
                      help='timed transformers steps after one warm-up '
                      '(default 2, 1 with --quick)')
  parser.add_argument('--skip_hf', action='store_true')
  parser.add_argument('--remat', choices=('none', 'dots', 'full'),
                      default='none', help='add an s_s row with this '
                      'remat_policy')
  parser.add_argument('--no_fallback', action='store_true',
                      help='run s_s without remat even when its step does '
                      'not fit in the available memory (by default it falls '
                      'back to remat_policy=dots and says so)')
  parser.add_argument('--profile', action='store_true',
                      help='trace one s_s step and time its forward')
  parser.add_argument('--bf16', action='store_true',
                      help='add bfloat16-activation rows: s_s (float32 '
                      'parameters, the --remat policy) and transformers '
                      'under torch.autocast')
  parser.add_argument('--hf_child', help=argparse.SUPPRESS)
  parser.add_argument('--peak_flops', type=float, default=None,
                      help='override the device peak (FLOP/s) used for MFU')
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.hf_child:
    name, length, steps, dtype = args.hf_child.split(',')
    result = run_hf(name, s_s_config(), 8, int(length), int(length),
                    int(steps), dtype)
    print(json.dumps(dataclasses.asdict(result)), flush=True)
    return
  quick = args.quick
  length = 128 if quick else 512
  tiny_steps = args.steps or (3 if quick else 5)
  s_steps = args.steps or (2 if quick else 3)
  hf_steps = args.hf_steps or (1 if quick else 2)
  peak = flops_lib.device_peak_flops(override=args.peak_flops)
  load_start = os.getloadavg()

  import flax
  import optax
  versions = [f'jax {jax.__version__}', f'flax {flax.__version__}',
              f'optax {optax.__version__}']
  if not args.skip_hf:
    import torch
    import transformers
    versions += [f'torch {torch.__version__}',
                 f'transformers {transformers.__version__}']
  log('measuring matmul rate')
  dtypes = ('float32', 'bfloat16') if args.bf16 else ('float32',)
  measured = {d: flops_lib.measured_matmul_flops(d) for d in dtypes}

  tiny = gin_utils.load_model('t5gemma_tiny').config
  s_s = s_s_config()
  tiny = tiny.map_stacks(dtype='float32', param_dtype='float32',
                         scan_layers=True, remat_policy='none')

  results = []
  result, _ = run_ours('tiny', tiny, 8, 128, 128, tiny_steps)
  results.append(result)
  result, prepared = run_ours(
      's_s', s_s, 8, length, length, s_steps, keep=args.profile,
      fallback_remat=None if args.no_fallback else 'dots')
  results.append(result)
  if args.profile:
    profile_result = result
  if args.remat != 'none':
    result, _ = run_ours(f's_s remat={args.remat}',
                         s_s.map_stacks(remat_policy=args.remat), 8, length,
                         length, s_steps)
    results.append(result)
  if args.bf16:
    result, _ = run_ours(
        's_s bf16', s_s.map_stacks(dtype='bfloat16', remat_policy=args.remat),
        8, length, length, s_steps,
        fallback_remat=(None if args.no_fallback or args.remat != 'none'
                        else 'dots'))
    results.append(result)
  hf_failed, profile_text = False, ''
  if not args.skip_hf:
    if args.profile:  # free the kept s_s state before transformers runs
      profile_text = profile_step(prepared, profile_result, S_S_VOCAB)
      prepared = None
    gc.collect()
    for dtype in dtypes:
      name = 'hf' if dtype == 'float32' else 'hf bf16'
      hf = run_hf_child(name, length, hf_steps, dtype)
      if hf is None:
        hf_failed = True
      else:
        results.append(hf)

  hf_by_shape = {hf_key(r): r for r in results if r.name.startswith('hf')}
  device = jax.devices()[0]
  print(f'\n## Train step on {device.platform} ({device.device_kind}), '
        f'{num_cores()} cores\n')
  rates = ', '.join(f'{d} {r / 1e9:.0f}' for d, r in measured.items())
  print(f'{", ".join(versions)}. float32 params (and activations, but for '
        f'the bf16 rows), AdamW, clip 1.0, scanned layers. MFU peak '
        f'{peak / 1e9:.0f} GFLOP/s (t5x_adapt.flops); a 2048^3 jnp matmul ran '
        f'at {rates} GFLOP/s in this run (best of 5; "MFU vs matmul" '
        'divides by the rate of the row\'s dtype). Load average at start '
        f'{load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f}. CPU util = '
        f'(user + sys CPU s) / (wall s x {num_cores()} cores).\n')
  print_table(results, peak, measured, hf_by_shape)
  if hf_failed:
    print('\n- hf: a transformers child process failed (see stderr); '
          'its row is missing.')
  if args.profile and prepared is not None:
    profile_text = profile_step(prepared, profile_result, S_S_VOCAB)
  if profile_text:
    print(profile_text)
  peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f'\nPeak RSS of this process (transformers runs in a child) '
        f'{peak_rss:.1f} GiB; total {elapsed():.0f} s.')


if __name__ == '__main__':
  main()

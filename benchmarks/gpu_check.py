"""GPU check of the attention kernels and a bf16 T5Gemma train step.

One run (under ~10 minutes on an H200) for a session that has a GPU:

1. Kernels. `cudnn` (`jax.nn.dot_product_attention(implementation='cudnn')`
   through `kernels.cudnn`) and `blocked` (`kernels.blocked`) against the
   `dense` reference, for causal, causal-window, two-sided-window and packed
   (segments + padding) masks with GQA: the max relative error of the
   output and of the gradients w.r.t. query, key and value, in float32 and
   bfloat16, against dense run in float32 on the same (rounded) inputs
   (`dense` in the same dtype gives the baseline error of that dtype), and
   the forward + backward time. cuDNN runs bf16 only: its float32 rows say
   so.
2. Train step. `gin_utils.load_model(MODEL, dtype='bfloat16',
   param_dtype='float32', remat_policy='full', attention_impl=IMPL)`, the
   project's `Trainer` / `Partitioner` on one device (as
   `benchmarks/train_step.py` builds them), AdamW; per implementation the
   compile time, median step time, tokens/s, and MFU (analytic matmul FLOPs
   `model.train_step_flops` / step time / the device peak of
   `t5x_adapt.flops`: 989 TFLOP/s bf16 dense on an H200).

Prints two markdown tables and writes them as JSON to `$OUT/gpu_check.json`
when `OUT` is set (or to `--json`). On a machine without a GPU the cuDNN
rows run JAX's XLA path of the same call (`implementation=None`, marked
`cudnn(xla)`), so the script can be checked end to end on a CPU:

  .venv/bin/python benchmarks/gpu_check.py                  # on the GPU
  .venv/bin/python benchmarks/gpu_check.py --model t5gemma_tiny --steps 2
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
import traceback
from typing import Callable

from common import argument_parser, count_params, log, make_batch  # pylint: disable=g-bad-import-order

# pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np

from t5x_adapt import flops as flops_lib
from t5x_adapt import gin_utils
from t5x_adapt.kernels import cudnn
from t5x_adapt.kernels.attention import dense_attention
from t5x_adapt.kernels.masks import MaskInputs, MaskSpec

# Gemma 3 1B-like attention: 8 query heads over 4 kv heads, head_dim 256.
HEADS, KV_HEADS, HEAD_DIM = 8, 4, 256
WINDOW = 512
MASKS = {
    'causal': (MaskSpec(True, None, True), False),
    'causal_window': (MaskSpec(True, WINDOW, True), False),
    'two_sided_window': (MaskSpec(False, WINDOW, True), True),
    'packed_causal': (MaskSpec(True, None, True), True),
}


def on_gpu() -> bool:
  return jax.default_backend() == 'gpu'


# ----------------------------------------------------------------- kernels --


def mask_inputs(batch: int, length: int, packed: bool) -> MaskInputs:
  """One sequence per row, or rows packed with 3 segments and padding."""
  positions = np.tile(np.arange(length, dtype=np.int32), (batch, 1))
  segments = np.ones((batch, length), np.int32)
  if packed:
    cuts = [0, length // 3, length // 2, length - length // 8]
    for i, (start, stop) in enumerate(zip(cuts, cuts[1:])):
      segments[:, start:stop] = i + 1
      positions[:, start:stop] = np.arange(stop - start)
    segments[:, cuts[-1]:] = 0
  pos, seg = jnp.asarray(positions), jnp.asarray(segments)
  return MaskInputs(pos, pos, seg, seg)


def kernel_fns() -> dict[str, Callable]:
  """Implementation name -> attention function (dense's signature)."""
  fns = {'dense': dense_attention}
  if on_gpu():
    fns['cudnn'] = cudnn.cudnn_attention
  else:
    fns['cudnn(xla)'] = lambda *a, **k: cudnn.cudnn_attention(
        *a, implementation=None, **k)
  try:
    from t5x_adapt.kernels import blocked
    fns['blocked'] = blocked.blocked_attention
  except ImportError as e:
    log(f'blocked attention unavailable: {e}')
  return fns


def grad_fn(fn, mask, spec, weights):
  """Jitted (out, (dq, dk, dv)) of sum(out * weights)."""
  def loss(q, k, v):
    out = fn(q, k, v, mask, spec, scale=HEAD_DIM**-0.5)
    return jnp.sum(out.astype(jnp.float32) * weights), out
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def relative_error(actual, expected) -> float:
  actual = np.asarray(actual, np.float32)
  expected = np.asarray(expected, np.float32)
  return float(np.abs(actual - expected).max() / np.abs(expected).max())


def time_call(fn: Callable[[], object], repeats: int = 5) -> float:
  """Median seconds of `fn()` (which returns arrays), after a warm-up."""
  jax.block_until_ready(fn())
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    samples.append(time.perf_counter() - start)
  return statistics.median(samples)


def check_kernels(batch: int, length: int) -> list[dict]:
  """Rows of the kernel table: impl x mask x dtype errors and times."""
  keys = jax.random.split(jax.random.key(0), 4)
  q32 = jax.random.normal(keys[0], (batch, length, HEADS, HEAD_DIM))
  k32, v32 = (jax.random.normal(x, (batch, length, KV_HEADS, HEAD_DIM))
              for x in keys[1:3])
  rows = []
  for mask_name, (spec, packed) in MASKS.items():
    mask = mask_inputs(batch, length, packed)
    real = (mask.query_segment_ids > 0)[:, :, None, None]
    # Zero cotangents on padding rows, whose outputs nothing reads.
    weights = jax.random.normal(keys[3], q32.shape) * real
    for dtype in (jnp.float32, jnp.bfloat16):
      q, k, v = (x.astype(dtype) for x in (q32, k32, v32))
      exact = [q.astype(jnp.float32), k.astype(jnp.float32),
               v.astype(jnp.float32)]
      (_, ref_out), ref_grads = grad_fn(dense_attention, mask, spec,
                                        weights)(*exact)
      ref_out = jnp.where(real, ref_out, 0)
      for impl, fn in kernel_fns().items():
        row = dict(impl=impl, mask=mask_name, dtype=jnp.dtype(dtype).name)
        rows.append(row)
        try:
          step = grad_fn(fn, mask, spec, weights)
          (_, out), grads = step(q, k, v)
          row['out'] = relative_error(jnp.where(real, out, 0), ref_out)
          for name, got, want in zip(('dq', 'dk', 'dv'), grads, ref_grads):
            row[name] = relative_error(got, want)
          row['ms'] = 1e3 * time_call(lambda s=step: s(q, k, v))
        except (ValueError, NotImplementedError, RuntimeError) as e:
          row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0]}'
        log(f'kernel {row}')
  return rows


# -------------------------------------------------------------- train step --


@dataclasses.dataclass
class StepResult:
  impl: str
  params: int
  tokens: int
  step_flops: int
  compile_s: float
  step_s: float
  losses: list[float]
  peak: float
  memory: str

  def row(self) -> dict:
    tokens_per_s = self.tokens / self.step_s
    mfu = self.step_flops / self.step_s / self.peak
    return dict(impl=self.impl, params_M=self.params / 1e6,
                tokens=self.tokens, compile_s=self.compile_s,
                step_ms=1e3 * self.step_s, tokens_per_s=tokens_per_s,
                tflops=self.step_flops / self.step_s / 1e12, mfu=mfu,
                losses=self.losses, memory=self.memory)


def train_step(model_name: str, impl: str, batch: int, inputs: int,
               targets: int, steps: int, peak: float) -> StepResult:
  """Compiles and times the model's bf16 train step with `impl`."""
  from train_step import compile_ours
  from t5x_adapt import trainer as trainer_lib
  model = gin_utils.load_model(model_name, dtype='bfloat16',
                               param_dtype='float32', remat_policy='full',
                               attention_impl=impl)
  config = model.config
  host_batch = make_batch(batch, inputs, targets, config.decoder.vocab_size)
  input_shapes = {k: v.shape for k, v in host_batch.items()}
  log(f'train {impl}: compile')
  trainer, compiled, compile_s = compile_ours(config, host_batch)
  state = trainer.init_state()
  device_batch = trainer.partitioner.shard_batch(host_batch)
  losses, times = [], []
  for i in range(steps + 1):  # the first step warms up, untimed
    start = time.perf_counter()
    state, metrics = compiled(state, device_batch)
    losses.append(float(jax.block_until_ready(metrics)['loss']))
    if i:
      times.append(time.perf_counter() - start)
    log(f'train {impl}: step {i}, loss {losses[-1]:.4f}')
  if not np.all(np.isfinite(losses)):
    raise RuntimeError(f'train {impl}: non-finite losses {losses}')
  return StepResult(impl, count_params(state.params),
                    batch * (inputs + targets),
                    trainer.model.train_step_flops(input_shapes), compile_s,
                    statistics.median(times), losses, peak,
                    trainer_lib.memory_summary(compiled))


# ------------------------------------------------------------------ output --


def table(rows: list[dict], columns: list[str]) -> str:
  def cell(value):
    if isinstance(value, float):
      return f'{value:.3g}'
    return '' if value is None else str(value)
  lines = ['| ' + ' | '.join(columns) + ' |',
           '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(cell(r.get(c)) for c in columns) + ' |'
            for r in rows]
  return '\n'.join(lines)


def parse_args(argv=None):
  parser = argument_parser(__doc__)
  parser.add_argument('--model', default='t5gemma_1b_1b',
                      help='gin preset of the train step')
  parser.add_argument('--train_impls', default=None,
                      help='comma-separated attention_impl values of the '
                      'train step (default: cudnn,blocked on a GPU, '
                      'blocked,dense elsewhere)')
  parser.add_argument('--batch', type=int, default=None,
                      help='train batch (default 8 on a GPU, 2 elsewhere)')
  parser.add_argument('--inputs', type=int, default=None,
                      help='encoder length (default 1024 / 64)')
  parser.add_argument('--targets', type=int, default=None,
                      help='decoder length (default 1024 / 64)')
  parser.add_argument('--steps', type=int, default=5,
                      help='timed train steps per implementation')
  parser.add_argument('--kernel_batch', type=int, default=2)
  parser.add_argument('--kernel_length', type=int, default=None,
                      help='kernel check length (default 2048 / 256)')
  parser.add_argument('--skip_kernels', action='store_true')
  parser.add_argument('--skip_train', action='store_true')
  parser.add_argument('--peak_flops', type=float, default=None,
                      help='device peak FLOP/s for MFU (default: by kind)')
  parser.add_argument('--json', default=None,
                      help='output file (default $OUT/gpu_check.json)')
  args = parser.parse_args(argv)
  gpu = on_gpu()
  args.train_impls = (args.train_impls or
                      ('cudnn,blocked' if gpu else 'blocked,dense')).split(',')
  args.batch = args.batch or (8 if gpu else 2)
  args.inputs = args.inputs or (1024 if gpu else 64)
  args.targets = args.targets or (1024 if gpu else 64)
  args.kernel_length = args.kernel_length or (2048 if gpu else 256)
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  device = jax.devices()[0]
  report = dict(device=device.device_kind, backend=jax.default_backend(),
                jax=jax.__version__, args=vars(args), kernels=[], train=[])
  log(f'{device.device_kind} ({jax.default_backend()})')
  if not args.skip_kernels:
    report['kernels'] = check_kernels(args.kernel_batch, args.kernel_length)
    print(f'\nKernels vs dense (float32 reference), batch '
          f'{args.kernel_batch} x {args.kernel_length}, {HEADS}/{KV_HEADS} '
          f'heads, head_dim {HEAD_DIM}, window {WINDOW}:\n')
    print(table(report['kernels'], ['impl', 'mask', 'dtype', 'out', 'dq',
                                    'dk', 'dv', 'ms', 'error']))
  if not args.skip_train:
    peak = flops_lib.device_peak_flops(device, args.peak_flops)
    for impl in args.train_impls:
      try:
        result = train_step(args.model, impl, args.batch, args.inputs,
                            args.targets, args.steps, peak)
        report['train'].append(result.row())
      except Exception as e:  # pylint: disable=broad-except
        # One implementation failing (say cuDNN on a shape) keeps the rest.
        log(f'train {impl} failed:\n{traceback.format_exc()}')
        report['train'].append(dict(impl=impl, error=f'{type(e).__name__}: '
                                    f'{str(e).splitlines()[0][:200]}'))
    print(f'\nTrain step: {args.model}, bf16 activations, float32 params, '
          f'remat full, batch {args.batch} x ({args.inputs} + '
          f'{args.targets}), peak {peak / 1e12:.3g} TFLOP/s:\n')
    print(table(report['train'], ['impl', 'params_M', 'compile_s', 'step_ms',
                                  'tokens_per_s', 'tflops', 'mfu', 'error']))
  path = args.json or (os.path.join(os.environ['OUT'], 'gpu_check.json')
                       if os.environ.get('OUT') else None)
  if path:
    with open(path, 'w') as f:
      json.dump(report, f, indent=1, default=str)
    log(f'wrote {path}')


if __name__ == '__main__':
  main()

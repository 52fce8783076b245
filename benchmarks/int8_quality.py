"""int8 weights against float32 on the adapted model `make demo` trains.

Teacher-forced over the PrefixLM validation split's targets (every batch of
it, unpacked, as the demo's table scores them): the share of target
positions where the int8 model's argmax equals the float32 model's, and
both validation perplexities. The int8 model holds every projection kernel
as int8 with one float32 scale per output channel (`t5x_adapt.quantization`,
what `gin/quantize/int8.gin` switches on for decoding, scoring and serving);
the tied embedding table stays float32.

  .venv/bin/python -m t5x_adapt.demo          # trains runs/demo (minutes)
  .venv/bin/python benchmarks/int8_quality.py [--run_dir runs/demo]
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# pylint: disable=g-import-not-at-top
import common  # puts the repository on sys.path
import jax
import jax.numpy as jnp
import numpy as np

from t5x_adapt import checkpoints
from t5x_adapt import demo
from t5x_adapt import quantization
from t5x_adapt.convert import load


def compare(model, params, quantized, batches) -> dict[str, float]:
  """Argmax agreement over weighted target positions, and both models'
  token-weighted mean cross-entropy (perplexity = its exp)."""
  @jax.jit
  def one(p, q, batch):
    logits_p = model.compute_logits(p, batch)
    logits_q = model.compute_logits(q, batch)
    weights = batch['decoder_loss_weights'] > 0
    agree = jnp.sum((logits_p.argmax(-1) == logits_q.argmax(-1)) & weights)
    _, metrics_p = model.loss_fn(p, batch, None)
    _, metrics_q = model.loss_fn(q, batch, None)
    tokens = metrics_p['num_tokens']
    return (agree, tokens, metrics_p['cross_entropy'] * tokens,
            metrics_q['cross_entropy'] * tokens)

  totals = np.zeros(4)
  for batch in batches:
    totals += np.asarray(jax.device_get(one(params, quantized, batch)),
                         np.float64)
  agree, tokens, loss_p, loss_q = totals
  return {'agreement': agree / tokens, 'tokens': tokens,
          'float32_loss': loss_p / tokens, 'int8_loss': loss_q / tokens}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--run_dir', default=demo.DemoConfig().run_dir)
  args = parser.parse_args(argv)
  run_dir = pathlib.Path(args.run_dir)
  manager = checkpoints.training.CheckpointManager(
      run_dir / 'adapted' / checkpoints.training.CHECKPOINT_DIR)
  step = manager.latest_step()
  if step is None:
    sys.exit(f'{run_dir}/adapted has no checkpoint: run the demo first')
  model = demo.adapted_model()
  params = load.load_params(manager.directory / str(step), model)
  config = quantization.WeightQuantization('int8')
  quantized = jax.jit(lambda p: quantization.quantize(model, p, config))(
      params)
  # The whole validation split (a count beyond its batches takes them all).
  batches = demo.validation_batches(
      demo.DemoConfig(run_dir=str(run_dir), eval_batches=10**6))
  result = compare(model, params, quantized, batches)
  ppl_p, ppl_q = np.exp(result['float32_loss']), np.exp(result['int8_loss'])
  print(f'\n## int8 weights vs float32: the demo\'s adapted model '
        f'(step {step}), {common.num_cores()} cores\n')
  print(f'Teacher-forced over the validation split: {len(batches)} batches, '
        f'{int(result["tokens"]):,} target tokens. Parameter bytes: float32 '
        f'{quantization.num_bytes(params):,}, int8 '
        f'{quantization.num_bytes(quantized):,} (projection kernels int8, '
        'per-channel float32 scales; the tied table float32).\n')
  print('| weights | argmax agreement with float32 | validation loss | '
        'perplexity | perplexity vs float32 |')
  print('|---|---:|---:|---:|---:|')
  print(f'| float32 | 100% | {result["float32_loss"]:.4f} | {ppl_p:.3f} | - |')
  print(f'| int8 | {100 * result["agreement"]:.2f}% | '
        f'{result["int8_loss"]:.4f} | {ppl_q:.3f} | '
        f'{100 * (ppl_q / ppl_p - 1):+.2f}% |')


if __name__ == '__main__':
  main()

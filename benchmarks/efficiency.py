"""The paper's efficiency claim, measured: greedy decode latency by architecture.

T5Gemma's claim is about quality per inference cost: an encoder-decoder
reads its prompt once with a bidirectional encoder and then decodes with its
decoder alone, so (a) an N-N encoder-decoder decodes about as fast as the N
decoder-only model it was adapted from, and (b) an unbalanced big-small
model (the paper's 9B-2B) runs at about the latency of small-small (2B-2B),
far below the big decoder-only model (9B), while its big encoder gives it
most of the big model's quality.

This benchmark times one generation (batch 1, random weights and prompts:
the time does not depend on the values) of four models built from two
Gemma 2 style stacks, small and big (by default the T5Gemma S and B stacks,
8 / 12 layers, width 512 / 768: the big decoder-only model has 2.6x the
small one's parameters; 9B over 2B is 3.5x), with a 50,257-token vocabulary
as in `train_step.py` and `decode.py`:

  small decoder-only   the small stack as a causal LM;
  big decoder-only     the big stack as a causal LM;
  small-small          encoder and decoder the small stack;
  big-small            a big encoder, a small decoder (cross-attention keys
                       and values project from the big width).

Per model it prints parameters, those of the stack that runs once per new
token (an encoder-decoder's decoder, with the cross-attention key and value
projections, which run only at the prefill), the analytic forward FLOPs of the whole
generation (`t5x_adapt.flops`: prompt + new tokens through the decoder-only
model, or prompt through the encoder and new tokens through the decoder), the
prefill time (prompt and first token), the whole generation, the time per new
token after the first and the latency against the small decoder-only model.
Calls of the four models interleave and the shortest of `--repeats` counts
(see `decode.measure`). `--plot` writes the stacked prefill / decode bars.

  .venv/bin/python benchmarks/efficiency.py --plot docs/efficiency_latency.png
  .venv/bin/python benchmarks/efficiency.py --quick
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# pylint: disable=g-import-not-at-top
import common  # puts the repository on sys.path; malloc on huge pages
import decode
import jax

from t5x_adapt import gin_utils
from t5x_adapt.config import EncoderDecoderConfig, StackConfig
from t5x_adapt.models import model_for_config

VOCAB = common.S_S_VOCAB
STACKS = {'s': 't5gemma_s_s', 'b': 't5gemma_b_b', 'l': 't5gemma_l_l',
          'ml': 't5gemma_ml_ml'}


def stack(size: str, dtype: str) -> StackConfig:
  """The `size` T5Gemma stack with the benchmark vocabulary."""
  config = gin_utils.load_model(STACKS[size]).config.decoder
  return config.replace(vocab_size=VOCAB, dtype=dtype, param_dtype=dtype,
                        scan_layers=True, remat_policy='none')


def architectures(small: StackConfig, big: StackConfig, small_name: str,
                  big_name: str) -> list[tuple[str, StackConfig |
                                              EncoderDecoderConfig]]:
  """(label, config) of the four models, the reference (small decoder-only)
  first."""
  def encdec(encoder, decoder):
    return EncoderDecoderConfig(encoder=encoder, decoder=decoder)
  return [(f'{small_name} decoder-only', small),
          (f'{big_name} decoder-only', big),
          (f'{small_name}-{small_name}', encdec(small, small)),
          (f'{big_name}-{small_name}', encdec(big, small))]


def print_table(timings: list[decode.Timing], configs: list, prompt: int,
                new_tokens: int) -> None:
  """One markdown row per model, latencies against the first model's."""
  reference = timings[0]
  print('| model | params | decoder params | GFLOP/generation | '
        'prefill s | total s | ms/new token | latency vs '
        f'{reference.runner.name} |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|')
  for timing, config in zip(timings, configs):
    runner = timing.runner
    per_token = (timing.total_s - timing.prefill_s) / (new_tokens - 1)
    flops = model_for_config(config).generation_flops(prompt, new_tokens)
    print(f'| {runner.name} | {runner.params / 1e6:.1f}M | '
          f'{runner.decoder_params / 1e6:.1f}M | '
          f'{flops / 1e9:.1f} | '
          f'{timing.prefill_s:.3f} | {timing.total_s:.3f} | '
          f'{per_token * 1e3:.1f} | '
          f'{timing.total_s / reference.total_s:.2f}x |')


def plot(timings: list[decode.Timing], path: pathlib.Path, title: str) -> None:
  """Horizontal bars: prefill and decoding time of each model."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = [t.runner.name for t in timings][::-1]
  prefill = [t.prefill_s for t in timings][::-1]
  rest = [t.total_s - t.prefill_s for t in timings][::-1]
  fig, ax = plt.subplots(figsize=(7, 2.8))
  ax.barh(names, prefill, color='#4c72b0', label='prefill (prompt + 1st token)')
  ax.barh(names, rest, left=prefill, color='#dd8452',
          label='decoding the other tokens')
  for y, (p, r) in enumerate(zip(prefill, rest)):
    ax.text(p + r, y, f' {p + r:.2f} s', va='center', fontsize=8)
  ax.set_xlabel('seconds per generation (batch 1)')
  ax.set_title(title, fontsize=9)
  ax.set_xlim(0, max(p + r for p, r in zip(prefill, rest)) * 1.18)
  ax.legend(fontsize=8, loc='lower right')
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
  parser = common.argument_parser(__doc__)
  parser.add_argument('--small', default='s', choices=sorted(STACKS))
  parser.add_argument('--big', default='b', choices=sorted(STACKS))
  parser.add_argument('--prompt', type=int, default=None,
                      help='prompt tokens (default 512, 64 with --quick)')
  parser.add_argument('--new_tokens', type=int, default=None,
                      help='generated tokens (default 128, 16 with --quick)')
  parser.add_argument('--repeats', type=int, default=None,
                      help='timed rounds (default 3, 2 with --quick)')
  parser.add_argument('--dtype', default='float32',
                      choices=('float32', 'bfloat16'))
  parser.add_argument('--quick', action='store_true')
  parser.add_argument('--plot', type=pathlib.Path, default=None,
                      help='write the latency bars to this PNG')
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  prompt = args.prompt or (64 if args.quick else 512)
  new_tokens = args.new_tokens or (16 if args.quick else 128)
  if new_tokens < 2:
    raise ValueError(f'--new_tokens {new_tokens}: at least 2 (the time per '
                     'new token is taken after the first)')
  repeats = args.repeats or (2 if args.quick else 3)
  load_start = os.getloadavg()[0]
  small, big = stack(args.small, args.dtype), stack(args.big, args.dtype)
  models = architectures(small, big, args.small.upper(), args.big.upper())
  runners = [decode.ours_runner(name, config, 1, prompt, new_tokens)
             for name, config in models]
  timings = decode.measure(runners, new_tokens, repeats)

  device = jax.devices()[0]
  print(f'\n## Decode latency by architecture on {device.platform} '
        f'({device.device_kind}), {common.num_cores()} cores\n')
  print(f'jax {jax.__version__}; {args.dtype}; batch 1, {prompt} prompt '
        f'tokens, {new_tokens} new (greedy, KV caches); best of {repeats} '
        f'interleaved calls; load average at start {load_start:.2f}, at end '
        f'{os.getloadavg()[0]:.2f}. Stacks: {args.small.upper()} '
        f'{small.num_layers} layers d{small.embed_dim}, {args.big.upper()} '
        f'{big.num_layers} layers d{big.embed_dim}; vocabulary {VOCAB:,}.\n')
  print_table(timings, [config for _, config in models], prompt, new_tokens)
  if args.plot:
    plot(timings, args.plot,
         f'{args.dtype}, batch 1, {prompt} prompt + {new_tokens} new tokens, '
         f'{common.num_cores()} CPU cores')
    print(f'\nPlot: {args.plot}')


if __name__ == '__main__':
  main()

"""Per-chip memory of every pod recipe, compiled for its TPU topology.

Runs `python -m t5x_adapt.precompile` (one process per compilation, one at a
time) for each recipe of gin/adapt at its own batch and lengths on the
topology its header names, and for the 2B-2B PrefixLM + KD recipe also with
dense attention and / or whole logits, and prints a markdown table
(argument + output + temp per chip against the chip's HBM). Compile only:
nothing runs on a TPU, and there are no timings. About 2-6 minutes per
compilation on a 2-core CPU.

  .venv/bin/python benchmarks/pod_memory.py [--only 2b_2b] [--json out.json]
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

# pylint: disable=g-import-not-at-top
import common

GiB = 2**30
DENSE = "--gin.StackConfig.attention_impl='dense'"
WHOLE = '--gin.DistillationModel.loss_chunk_length=None'
WHOLE_UL2 = '--gin.EncoderDecoderModel.loss_chunk_length=None'

# (recipe, topology, label of the variant, extra flags)
RUNS = (
    ('t5gemma_2b_2b_prefixlm_kd', 'v5p-128', 'splash + chunked', ()),
    ('t5gemma_2b_2b_prefixlm_kd', 'v5p-128', 'dense + chunked', (DENSE,)),
    ('t5gemma_2b_2b_prefixlm_kd', 'v5p-128', 'splash + whole', (WHOLE,)),
    ('t5gemma_2b_2b_prefixlm_kd', 'v5p-128', 'dense + whole',
     (DENSE, WHOLE)),
    ('t5gemma_2b_2b_ul2', 'v5p-128', 'splash + chunked', ()),
    ('t5gemma_9b_2b_prefixlm_kd', 'v5p-256', 'splash + chunked', ()),
    ('t5gemma_9b_2b_ul2', 'v5p-256', 'splash + chunked', ()),
    ('t5gemma_9b_9b_prefixlm_kd', 'v5p-256', 'splash + chunked', ()),
    ('t5gemma_9b_9b_ul2', 'v5p-256', 'splash + chunked', ()),
    ('t5gemma_270m_270m_prefixlm_kd', 'v5p-8', 'splash + chunked', ()),
    ('t5gemma_270m_270m_ul2', 'v5p-8', 'splash + chunked', ()),
)


def compile_one(recipe: str, topology: str, flags: tuple[str, ...]):
  """The precompile report (a dict), or the reason it failed."""
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / 'report.json'
    result = subprocess.run(
        [sys.executable, '-m', 't5x_adapt.precompile',
         f'--gin_file=gin/adapt/{recipe}.gin', f'--topology={topology}',
         f'--json={path}', *flags],
        cwd=common.REPO_ROOT, capture_output=True, text=True)
    if path.exists():
      return json.loads(path.read_text())
    lines = [l for l in result.stderr.splitlines() if 'does not fit' in l or
             'RESOURCE_EXHAUSTED' in l or 'Error' in l]
    return {'error': ' '.join(lines[-2:]) or result.stderr[-500:]}


def row(recipe, topology, label, report) -> str:
  if 'error' in report:
    return f'| {recipe} | {topology} | {label} | | | | failed: ' \
           f'{report["error"][:200]} |'
  batch = report['batch']
  inputs = batch.get('encoder_input_tokens', [0, 0])[1]
  targets = batch['decoder_target_tokens']
  shape = f'{targets[0]} x ({inputs} + {targets[1]})'
  gib = lambda n: f'{n / GiB:,.1f}'
  return (f'| {recipe} | {topology} | {label} | {shape} | '
          f'{gib(report["argument_bytes"] + report["output_bytes"] - report["alias_bytes"])} | '
          f'{gib(report["temp_bytes"])} | {gib(report["total_bytes"])} of '
          f'{gib(report["hbm_bytes"])}: '
          f'{"fits" if report["fits"] else "does not fit"} |')


def main():
  parser = common.argument_parser(__doc__)
  parser.add_argument('--only', default='', help='substring of the recipes')
  parser.add_argument('--json', help='write every report to this file')
  args = parser.parse_args()
  header = ('| recipe | topology | attention + logits | batch x (inputs + '
            'targets) | state + outputs GiB | temp GiB | total GiB per chip |'
            '\n|---|---|---|---|---|---|---|')
  rows, reports = [], []
  for recipe, topology, label, flags in RUNS:
    if args.only not in recipe:
      continue
    common.log(f'{recipe} on {topology}, {label}')
    report = compile_one(recipe, topology, flags)
    reports.append(dict(report, recipe=recipe, label=label))
    rows.append(row(recipe, topology, label, report))
    common.log(rows[-1])
  print(header)
  print('\n'.join(rows))
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(reports, indent=1))


if __name__ == '__main__':
  main()

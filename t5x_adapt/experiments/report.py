"""The paper experiment's report: summary table, the five claims, plots.

`write(root, results, candidates)` turns the raw results of
`paper.experiment` into

  results.json            everything measured, with the summary and claims
  results.md              the table (mean ± sample std over the fine-tuning
                          seeds) and, per claim, its comparisons and verdict
  quality_vs_steps.png    PrefixLM validation loss against adaptation steps
  quality_vs_latency.png  fine-tuned quality against greedy decode latency

A comparison holds when the means differ in the paper's direction; it is
"beyond seed noise" when the difference exceeds the root sum of squares of
the two standard deviations. A claim is "reproduced" when every comparison
holds, "not reproduced" when none does, "mixed" otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import statistics
from typing import Mapping, Sequence

SENTIMENT = 'sft_sentiment_spm8k'
CONTINUATION = 'sft_continuation_spm8k'


@dataclasses.dataclass(frozen=True)
class Metric:
  """A summary column: how it is read from a fine-tuning result."""
  key: str
  label: str
  higher_is_better: bool
  unit: str = ''


METRICS = (
    Metric('prefix_lm_loss', 'PrefixLM val. loss (after adaptation)', False),
    Metric('classification_accuracy', 'classification acc.', True, '%'),
    Metric('sft_sentiment_accuracy', 'SFT sentiment acc. (generated)', True,
           '%'),
    Metric('sft_continuation_loss', 'SFT continuation response loss', False),
    Metric('sft_continuation_rouge', 'SFT continuation ROUGE-Lsum', True),
)
METRIC = {m.key: m for m in METRICS}

# Each candidate's architecture in the latency table.
ARCHITECTURE = {'encdec_small_small': 'small-small',
                'encdec_large_small': 'large-small',
                'decoder_only_small': 'small decoder-only'}


def _stats(values: Sequence[float]) -> dict:
  values = [float(v) for v in values]
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return {'mean': statistics.fmean(values), 'std': std, 'n': len(values),
          'values': values}


def summarise(results: Mapping, candidates) -> dict[str, dict]:
  """{candidate: {metric: {'mean', 'std', 'n', 'values'}}}."""
  summary = {}
  for candidate in candidates:
    row = {'prefix_lm_loss': _stats(
        [results['curves'][candidate.name]['loss'][-1]])}
    runs = results['finetune'].get(candidate.name)
    if runs:
      row['classification_accuracy'] = _stats(
          [100 * r['accuracy'] for r in runs['classification']])
      row['sft_sentiment_accuracy'] = _stats(
          [r[SENTIMENT]['accuracy'] for r in runs['sft']])
      row['sft_continuation_loss'] = _stats(
          [r[CONTINUATION]['cross_entropy'] for r in runs['sft']])
      row['sft_continuation_rouge'] = _stats(
          [r[CONTINUATION]['rougeLsum'] for r in runs['sft']])
    row['latency_ms'] = 1e3 * results['latency'][
        ARCHITECTURE.get(candidate.model, '')]['seconds'] if (
            candidate.model in ARCHITECTURE) else float('nan')
    summary[candidate.name] = row
  return summary


def compare(summary: Mapping, metric: str, better: str, worse: str) -> dict:
  """Whether `better` beats `worse` on `metric` in the paper's direction."""
  a, b = summary[better][metric], summary[worse][metric]
  difference = a['mean'] - b['mean']
  holds = difference > 0 if METRIC[metric].higher_is_better else difference < 0
  noise = math.hypot(a['std'], b['std'])
  return {'metric': metric, 'better': better, 'worse': worse,
          'values': [a['mean'], b['mean']], 'stds': [a['std'], b['std']],
          'difference': difference, 'holds': bool(holds),
          'beyond_noise': bool(holds and abs(difference) > noise
                               and noise > 0)}


FINETUNED = ('classification_accuracy', 'sft_sentiment_accuracy',
             'sft_continuation_loss', 'sft_continuation_rouge')
GENERATION = ('sft_sentiment_accuracy', 'sft_continuation_loss',
              'sft_continuation_rouge')

# (number, statement, [(part, better, worse, metrics)])
CLAIMS = (
    (1, 'Adaptation beats training the encoder-decoder from scratch for the '
        'same compute (and converges fast)',
     [('', 'small_small_prefixlm_kd', 'small_small_scratch',
       ('prefix_lm_loss',))]),
    (2, 'PrefixLM + KD is better for generation, UL2 for the encoder '
        'representation',
     [('generation', 'small_small_prefixlm_kd', 'small_small_ul2',
       GENERATION),
      ('representation', 'small_small_ul2', 'small_small_prefixlm_kd',
       ('classification_accuracy',))]),
    (3, 'After fine-tuning the encoder-decoder beats the decoder-only model '
        'of similar inference cost',
     [('', 'small_small_prefixlm_kd', 'small_decoder_only', FINETUNED)]),
    (4, 'An unbalanced large-small model beats the balanced small-small one, '
        'at about its latency',
     [('', 'large_small_warmup', 'small_small_prefixlm_kd',
       ('prefix_lm_loss', *FINETUNED))]),
    (5, 'For unbalanced models a short cross-attention warm-up helps',
     [('', 'large_small_warmup', 'large_small',
       ('prefix_lm_loss', *FINETUNED))]),
)


def _verdict(comparisons: Sequence[dict]) -> str:
  held = sum(c['holds'] for c in comparisons)
  if held == len(comparisons):
    return 'reproduced'
  return 'not reproduced' if held == 0 else 'mixed'


def claims(results: Mapping, summary: Mapping) -> list[dict]:
  """Each claim's comparisons, verdict per part, and its extra facts."""
  out = []
  for number, statement, parts in CLAIMS:
    claim = {'number': number, 'statement': statement, 'parts': []}
    for part, better, worse, metrics in parts:
      comparisons = [compare(summary, m, better, worse) for m in metrics]
      claim['parts'].append({'part': part, 'comparisons': comparisons,
                             'verdict': _verdict(comparisons)})
    claim['notes'] = _notes(number, results, summary)
    out.append(claim)
  return out


def _notes(number: int, results: Mapping, summary: Mapping) -> list[str]:
  """The facts beside a claim's comparisons: convergence, latency."""
  latency = {name: row['latency_ms'] for name, row in summary.items()}
  if number == 1:
    adapted = results['curves']['small_small_prefixlm_kd']
    scratch = results['curves']['small_small_scratch']
    return [f'PrefixLM validation loss at step {s}: adapted {a:.3f}, '
            f'scratch {b:.3f}' for s, a, b in zip(
                adapted['steps'], adapted['loss'], scratch['loss'])]
  if number == 3:
    return [f'decode latency: small-small '
            f'{latency["small_small_prefixlm_kd"]:.1f} ms, small decoder-only '
            f'{latency["small_decoder_only"]:.1f} ms']
  if number == 4:
    ratio = (latency['large_small_warmup'] /
             latency['small_small_prefixlm_kd'])
    return [f'decode latency: large-small {latency["large_small_warmup"]:.1f}'
            f' ms, small-small {latency["small_small_prefixlm_kd"]:.1f} ms '
            f'({ratio:.2f}x)']
  return []


# ---------------------------------------------------------------- writing --


def _cell(stats: dict | None) -> str:
  if not stats:
    return '-'
  if stats['n'] == 1:
    return f'{stats["mean"]:.3f}'
  return f'{stats["mean"]:.2f} ± {stats["std"]:.2f}'


def markdown(results: Mapping, summary: Mapping, claim_list, candidates
             ) -> str:
  """The table and the claims, as markdown."""
  sources = results['sources']
  seeds = len(results['settings']['finetune_seeds'])
  lines = [
      f'Sources (PrefixLM validation loss, targets given the prefix): '
      f'small {sources["small"]["loss"]:.3f}, large '
      f'{sources["large"]["loss"]:.3f}.', '',
      f'Fine-tuned columns: mean ± sample std over {seeds} seeds.', '',
      '| model | ' + ' | '.join(m.label for m in METRICS) +
      ' | decode latency (ms) |',
      '|---|' + '---:|' * (len(METRICS) + 1)]
  for candidate in candidates:
    row = summary[candidate.name]
    cells = [_cell(row.get(m.key)) for m in METRICS]
    lines.append(f'| {candidate.label} | ' + ' | '.join(cells) +
                 f' | {row["latency_ms"]:.1f} |')
  lines += ['', 'Claims (direction at this scale):', '']
  label = {c.name: c.label for c in candidates}
  for claim in claim_list:
    verdicts = '; '.join(
        f'{p["part"] + ": " if p["part"] else ""}{p["verdict"]}'
        for p in claim['parts'])
    lines.append(f'{claim["number"]}. {claim["statement"]}: **{verdicts}**.')
    for part in claim['parts']:
      for c in part['comparisons']:
        metric = METRIC[c['metric']]
        sign = 'holds' if c['holds'] else 'does not hold'
        noise = ' (beyond seed noise)' if c['beyond_noise'] else ''
        lines.append(
            f'   - {metric.label}: {label[c["better"]]} '
            f'{c["values"][0]:.3f} vs {label[c["worse"]]} '
            f'{c["values"][1]:.3f}: {sign}{noise}')
    lines += [f'   - {note}' for note in claim['notes']]
  return '\n'.join(lines) + '\n'


def plot_steps(path: pathlib.Path, results: Mapping, candidates) -> None:
  """PrefixLM validation loss of each candidate against its steps."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7.5, 4.8))
  for candidate in candidates:
    curve = results['curves'][candidate.name]
    ax.plot(curve['steps'], curve['loss'], marker='o', markersize=3,
            label=candidate.label)
  for size, style in (('small', ':'), ('large', '--')):
    ax.axhline(results['sources'][size]['loss'], color='gray',
               linestyle=style, label=f'{size} decoder-only source')
  ax.set_xlabel('training step (adaptation, scratch, or continued)')
  ax.set_ylabel('PrefixLM validation loss (nats/target token)')
  ax.set_title('Quality against steps')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_latency(path: pathlib.Path, summary: Mapping, candidates) -> None:
  """Fine-tuned quality against decode latency (the paper's figure)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = ('sft_continuation_loss', 'sft_sentiment_accuracy',
            'classification_accuracy')
  fig, axes = plt.subplots(1, len(panels), figsize=(13, 4.2))
  for ax, key in zip(axes, panels):
    for index, candidate in enumerate(c for c in candidates if c.finetuned):
      row = summary[candidate.name]
      ax.errorbar(row['latency_ms'], row[key]['mean'], yerr=row[key]['std'],
                  marker='os^vD'[index % 5], capsize=3, linestyle='none',
                  label=candidate.label)
    ax.set_xlabel('greedy decode latency (ms)')
    ax.set_ylabel(METRIC[key].label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle('Fine-tuned quality against inference latency '
               '(mean ± std over seeds)')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write(root: pathlib.Path, results: dict, candidates) -> None:
  """Adds summary and claims to `results`; writes every file; prints."""
  summary = summarise(results, candidates)
  results['summary'] = summary
  results['claims'] = claims(results, summary)
  text = markdown(results, summary, results['claims'], candidates)
  (root / 'results.json').write_text(json.dumps(results, indent=1))
  (root / 'results.md').write_text(text)
  plot_steps(root / 'quality_vs_steps.png', results, candidates)
  plot_latency(root / 'quality_vs_latency.png', summary, candidates)
  print('\n' + text, flush=True)
  print(f'Written: {root}/results.json, results.md, quality_vs_steps.png, '
        'quality_vs_latency.png', flush=True)

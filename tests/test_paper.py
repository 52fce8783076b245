"""The paper experiment (t5x_adapt/experiments/paper.py).

The quick grid (gin/experiments/paper_quick.gin) runs every stage of the full
one at tiny sizes: each must leave its numbers, the report its files, and a
second run must reuse every stage.
"""

import json
import math

import gin
import pytest

from t5x_adapt import eval as eval_lib
from t5x_adapt import gin_utils
from t5x_adapt import stages as stages_lib
from t5x_adapt import train as train_lib
from t5x_adapt.experiments import paper
from t5x_adapt.experiments import report


def _quick(root, *bindings):
  gin.clear_config()
  gin_utils.parse_gin([paper.QUICK_FILE], [f"RUN_DIR = '{root}'", *bindings])
  settings = paper.Settings()
  return settings, paper.experiment()


@pytest.fixture(scope='module')
def quick_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('paper_quick')
  settings, results = _quick(root)
  return root, settings, results


def _finite(value):
  return isinstance(value, float) and math.isfinite(value)


def test_every_stage_produced_its_numbers(quick_run):
  _, settings, results = quick_run
  assert all(_finite(results['sources'][s]['loss']) for s in paper.SOURCES)
  checkpoints = list(range(0, settings.adapt_steps + 1, settings.save_every))
  for candidate in paper.CANDIDATES:
    curve = results['curves'][candidate.name]
    assert curve['steps'] == checkpoints, candidate.name
    assert all(map(_finite, curve['loss'])), candidate.name
  seeds = len(settings.finetune_seeds)
  finetuned = [c.name for c in paper.CANDIDATES if c.finetuned]
  assert sorted(results['finetune']) == sorted(finetuned)
  for name in finetuned:
    runs = results['finetune'][name]
    assert len(runs['classification']) == len(runs['sft']) == seeds
    for run in runs['classification']:
      assert 0.0 <= run['accuracy'] <= 1.0 and _finite(run['loss'])
    for run in runs['sft']:
      assert 0.0 <= run[report.SENTIMENT]['accuracy'] <= 100.0
      assert _finite(run[report.CONTINUATION]['cross_entropy'])
      assert 0.0 <= run[report.CONTINUATION]['rougeLsum'] <= 100.0
  assert sorted(results['latency']) == sorted(paper.LATENCY_MODELS)
  assert all(r['seconds'] > 0 for r in results['latency'].values())
  assert results['total_seconds'] > 0


def test_the_report_has_the_table_the_claims_and_the_plots(quick_run):
  root, _, results = quick_run
  assert json.loads((root / 'results.json').read_text())['claims']
  text = (root / 'results.md').read_text()
  for candidate in paper.CANDIDATES:
    assert f'| {candidate.label} |' in text
  claims = results['claims']
  assert [c['number'] for c in claims] == [1, 2, 3, 4, 5]
  for claim in claims:
    assert f'{claim["number"]}. {claim["statement"]}' in text
    for part in claim['parts']:
      assert part['verdict'] in ('reproduced', 'mixed', 'not reproduced')
  for name in ('quality_vs_steps.png', 'quality_vs_latency.png'):
    assert (root / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_a_rerun_reuses_every_stage(quick_run, monkeypatch):
  root, _, results = quick_run

  def refuse(*args, **kwargs):
    raise AssertionError('a finished stage ran again')

  monkeypatch.setattr(train_lib, 'train', refuse)
  monkeypatch.setattr(eval_lib, 'evaluate', refuse)
  monkeypatch.setattr(paper, 'decode_latency', refuse)
  # In this process, where the patches reach.
  _, again = _quick(root, 'experiment.workers = 1')
  for key in ('sources', 'curves', 'finetune', 'latency', 'summary'):
    assert again[key] == results[key], key


# ------------------------------------------------------------- the grid --


def test_the_candidates_train_for_the_same_steps_and_tokens():
  gin.clear_config()
  gin_utils.parse_gin([paper.DEFAULT_FILE])
  settings = paper.Settings()
  sources = {'small': '/s', 'large': '/l'}
  stages = {c.name: paper.adaptation_stage(settings, c, sources)
            for c in paper.CANDIDATES}
  assert {s.steps for s in stages.values()} == {settings.adapt_steps}
  prefix_tokens = sum(settings.prefix_lm_lengths.values())
  assert (f"TASK_FEATURE_LENGTHS = {{'targets': {prefix_tokens}}}"
          in stages['small_decoder_only'].bindings)
  warmup = (f'CROSS_ATTENTION_WARMUP_STEPS = '
            f'{settings.cross_attention_warmup_steps}')
  assert settings.cross_attention_warmup_steps > 0
  assert warmup in stages['large_small_warmup'].bindings
  assert not any('WARMUP_STEPS = ' in b and 'CROSS' in b
                 for b in stages['large_small'].bindings)
  for name in ('large_small_warmup', 'large_small'):
    assert "SOURCE_CHECKPOINT = '/l'" in stages[name].bindings
    assert "DECODER_SOURCE_CHECKPOINT = '/s'" in stages[name].bindings
  assert not any('CHECKPOINT' in b
                 for b in stages['small_small_scratch'].bindings)
  assert len(settings.finetune_seeds) >= 3


def test_the_command_line_picks_the_grid():
  full = f'--gin_file={paper.DEFAULT_FILE}'
  quick = f'--gin_file={paper.QUICK_FILE}'
  assert paper.command_line(['paper']) == ['paper', full]
  assert paper.command_line(['paper', '--quick', '--gin.X=1']) == [
      'paper', '--gin.X=1', quick]
  assert paper.command_line(['paper', '--gin_file=a.gin', '--quick']) == [
      'paper', '--gin_file=a.gin', quick]


def test_a_comparison_follows_the_metric_direction_and_the_seed_noise():
  def row(mean, std):
    return {'mean': mean, 'std': std}
  summary = {'a': {'sft_continuation_loss': row(2.0, 0.1),
                   'classification_accuracy': row(70.0, 1.0)},
             'b': {'sft_continuation_loss': row(2.5, 0.1),
                   'classification_accuracy': row(70.5, 1.0)}}
  lower = report.compare(summary, 'sft_continuation_loss', 'a', 'b')
  assert lower['holds'] and lower['beyond_noise']
  higher = report.compare(summary, 'classification_accuracy', 'a', 'b')
  assert not higher['holds'] and not higher['beyond_noise']
  within = report.compare(summary, 'classification_accuracy', 'b', 'a')
  assert within['holds'] and not within['beyond_noise']
  assert report._verdict([lower, higher]) == 'mixed'
  assert report._verdict([lower, within]) == 'reproduced'
  assert report._verdict([higher]) == 'not reproduced'


def test_a_stage_stopped_before_its_last_step_stops_the_grid(tmp_path,
                                                             monkeypatch):
  # What a SIGTERM leaves: `train` returns (having saved an earlier step)
  # without the final checkpoint; the next stage must not read it.
  monkeypatch.setattr(train_lib, 'train', lambda: None)
  gin.clear_config()
  gin_utils.parse_gin([paper.QUICK_FILE])
  stage = paper.source_stage(paper.Settings(), 'small')
  with pytest.raises(stages_lib.StageStopped, match='stopped before step 6'):
    stages_lib.run_stage(tmp_path / stage.path, stage.files, stage.steps,
                         stage.task, stage.bindings)

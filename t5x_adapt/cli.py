"""What the command-line entry points share.

  python -m t5x_adapt.<train|eval|infer> --gin_file=RUN.gin \
    --gin_file=gin/models/PRESET.gin --gin.NAME=VALUE ...

For the gin-configured commands (train, eval, infer): flags (`--gin_file`,
`--gin_bindings` and T5X's `--gin.NAME=VALUE` shorthand; the multi-host
flags), `jax.distributed` start-up (by `t5x_adapt.distributed.initialize`),
printing on process 0, and the run's model with its vocabulary fitted to
the task.

For every command, the console scripts that pip installs (`t5x-adapt-train`,
`-eval`, `-infer`, `-adapt`, `-convert`, `-precompile`, `-serve`,
`-harness`;
`COMMANDS`): each does what `python -m t5x_adapt.<module>` does. A console
script imports this module before the command may restart itself on huge pages
(`t5x_adapt.host_memory`), so it imports nothing heavy (JAX, TensorFlow) at
module level: the functions that need them import them.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import tqdm

from t5x_adapt import gin_utils
from t5x_adapt import host_memory

if TYPE_CHECKING:
  import seqio

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
  from t5x_adapt import distributed  # pylint: disable=g-import-not-at-top
  if distributed.is_main_process():
    tqdm.tqdm.write(message, file=sys.stderr)


# ---------------------------------------------------------------- model --


def _task_vocab_size(mixture_or_task_name: str) -> int:
  import seqio  # pylint: disable=g-import-not-at-top,redefined-outer-name
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


def _stops() -> tuple[type[Exception], ...]:
  """Errors whose message says all a user needs: printed without a
  traceback."""
  # pylint: disable=g-import-not-at-top
  from t5x_adapt import step_guard
  from t5x_adapt.checkpoints import errors
  return (step_guard.TrainingDiverged, errors.CheckpointSaveError,
          errors.CorruptCheckpointError)


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

  from t5x_adapt import distributed  # pylint: disable=g-import-not-at-top

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
    except _stops() as e:  # A run that stops for a reason it explains.
      sys.exit(f'error: {e}')

  app.run(main, argv=rewrite_gin_args(sys.argv if argv is None else argv))


# ------------------------------------------------------------- commands --

# Console script -> (module whose main() it runs, whether `python -m` of
# that module restarts on huge pages first, as its `__main__` block does).
COMMANDS = {
    't5x-adapt-train': ('t5x_adapt.train', True),
    't5x-adapt-eval': ('t5x_adapt.eval', True),
    't5x-adapt-infer': ('t5x_adapt.infer', True),
    't5x-adapt-adapt': ('t5x_adapt.adapt', False),
    't5x-adapt-convert': ('t5x_adapt.convert.__main__', False),
    't5x-adapt-precompile': ('t5x_adapt.precompile', False),
    't5x-adapt-serve': ('t5x_adapt.serve', True),
    't5x-adapt-harness': ('t5x_adapt.harness', True),
}


def run_command(name: str) -> Optional[int]:
  """Does what `python -m` does for the module of console script `name`.

  Args:
    name: A key of `COMMANDS`.

  Returns:
    The exit status the module's main() returns (None: 0).
  """
  module_name, huge_pages = COMMANDS[name]
  if huge_pages:
    host_memory.use_huge_pages()  # Restarts the process: before JAX loads.
  module = importlib.import_module(module_name)
  # absl's --help prints the docstring of `__main__`, here the script's.
  sys.modules['__main__'].__doc__ = module.__doc__
  return module.main()


def _command(name: str) -> Callable[[], Optional[int]]:
  def main() -> Optional[int]:
    return run_command(name)

  main.__doc__ = f'The `{name}` console script.'
  return main


# The console scripts' entry points (setup.py).
train_command = _command('t5x-adapt-train')
eval_command = _command('t5x-adapt-eval')
infer_command = _command('t5x-adapt-infer')
adapt_command = _command('t5x-adapt-adapt')
convert_command = _command('t5x-adapt-convert')
precompile_command = _command('t5x-adapt-precompile')
serve_command = _command('t5x-adapt-serve')
harness_command = _command('t5x-adapt-harness')

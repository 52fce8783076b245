"""Training checkpoints: the whole TrainState and the input position, by orbax.

`checkpoints.params` holds parameter-only checkpoints (conversion, init
checkpoints; its `restore_params` also reads the parameters of a step
written here); this module holds what training needs to resume exactly,
and the layout of a step directory.
A `CheckpointManager` over `MODEL_DIR/checkpoints` writes one directory per
step:

  checkpoints/<step>/state/   TrainState (params, opt_state, step), orbax
                              StandardSave: sharded, restorable onto any mesh
  checkpoints/<step>/input/   input_state.*: the tf.data iterator position
                              (`InputIterator.save`), the same on every host,
                              so process 0 writes it and every host reads it
  checkpoints/<step>/_CHECKPOINT_METADATA   orbax: commit time, eval metrics
  checkpoints/<step>/t5x_adapt_checksums.json   size and SHA-256 of every
                              other file (`t5x_adapt.checkpoints.integrity`)

Atomicity: orbax writes a step into `<step>.orbax-checkpoint-tmp-<time>` and
renames it to `<step>` only after every host has finished writing every item
(and the main process has written the checksums), so a process killed
during a save, or a save that fails (a full disk), leaves the earlier steps
as they were; a failed save is a `CheckpointSaveError` naming the step and
the newest intact one. `latest_step` additionally skips step directories
that are not complete (no commit timestamp, or an item missing), e.g. a
half-copied directory.

Tied tables: a tied model's state saved with a copy of its embedding
table per stack (written before the table was one array) is converted on
`restore`, in its parameters and optimizer moments (`embeddings`).

Integrity: `restore` verifies the step's checksums first. `restore_latest`
goes back from the newest step to the newest one that verifies, moving each
corrupt one aside (to `<step>.corrupt-<time>`, kept for inspection) with an
error in the log that names the file.

Saving is asynchronous: `save` returns once the arrays are copied to host
memory, and the files are written in a background thread while training goes
on (the next `save`, `wait` and `close` wait for it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import TYPE_CHECKING, Any, Mapping, Optional

from absl import logging
from etils import epath
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from t5x_adapt import distributed
from t5x_adapt.checkpoints import embeddings
from t5x_adapt.checkpoints import errors
from t5x_adapt.checkpoints import integrity

if TYPE_CHECKING:  # The handler only calls the iterator's save/restore.
  from t5x_adapt.data.pipeline import InputIterator

CHECKPOINT_DIR = 'checkpoints'  # MODEL_DIR/checkpoints/<step>
STATE = 'state'    # <step>/state: the TrainState
PARAMS = 'params'  # its parameters (what `restore_params` reads of a step)
INPUT = 'input'
BEST_METRIC = 'eval_loss'  # Lower is better.
_STEP_METADATA = '_CHECKPOINT_METADATA'


# ------------------------------------------------- input position handler --


class InputStateHandler(ocp.CheckpointHandler):
  """Saves and restores an `InputIterator`'s position.

  Every host reads the same global batches (`t5x_adapt.data.pipeline`), so
  their iterator positions are equal: process 0 writes the one position into
  the item directory (which orbax creates and commits with the rest of the
  step) and every process restores it, whatever the number of hosts then.
  """

  def save(self, directory: epath.Path, args: 'InputSave'):
    if distributed.is_main_process():
      args.iterator.save(os.fspath(directory))

  def restore(self, directory: epath.Path,
              args: 'InputRestore') -> InputIterator:
    try:
      args.iterator.restore(os.fspath(directory))
    except FileNotFoundError as e:  # e.g. written before positions were shared
      logging.warning('%s; the input pipeline starts from its beginning', e)
    return args.iterator

  def metadata(self, directory: epath.Path) -> None:
    return None


@ocp.args.register_with_handler(InputStateHandler, for_save=True)
@dataclasses.dataclass
class InputSave(ocp.args.CheckpointArgs):
  iterator: InputIterator


@ocp.args.register_with_handler(InputStateHandler, for_restore=True)
@dataclasses.dataclass
class InputRestore(ocp.args.CheckpointArgs):
  iterator: InputIterator


# -------------------------------------------------------------- manager --


def _loss(metrics: Mapping[str, float]) -> float:
  """The ranking metric of a checkpoint (+inf: saved without an eval, or
  with a non-finite one, which is never the best)."""
  loss = float(metrics.get(BEST_METRIC, float('inf')))
  return loss if math.isfinite(loss) else float('inf')


def abstract_tree(shapes: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: a restore target."""
  return jax.tree_util.tree_map(
      lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                               sharding=sharding),
      shapes, shardings)


def is_complete(step_dir: epath.PathLike) -> bool:
  """Whether a step directory is a committed, whole checkpoint."""
  step_dir = epath.Path(step_dir)
  try:
    metadata = json.loads((step_dir / _STEP_METADATA).read_text())
  except (OSError, ValueError):
    return False
  return bool(metadata.get('commit_timestamp_nsecs')) and all(
      (step_dir / item).is_dir() for item in (STATE, INPUT))


def complete_steps(directory: epath.PathLike) -> list[int]:
  """Steps of the complete checkpoints in `directory`, ascending.

  Only reads: unlike opening a `CheckpointManager`, it neither creates the
  directory nor removes the temporary directory of a save in progress, so
  an evaluator may list the checkpoints of a run that is still training.
  """
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(int(path.name) for path in directory.iterdir()
                if path.name.isdigit() and is_complete(path))


class CheckpointManager:
  """Saves and restores (TrainState, input position) pairs by step.

  Args:
    directory: Where step directories go (`MODEL_DIR/checkpoints`).
    keep: Number of most recent checkpoints kept (None: all).
    keep_best: Also keep the checkpoint with the lowest `eval_loss` among
      those saved with metrics.
    async_save: Write files in a background thread.
  """

  def __init__(self, directory: epath.PathLike, keep: Optional[int] = 3,
               keep_best: bool = True, async_save: bool = True):
    self.directory = epath.Path(directory)
    self.keep_best = keep_best
    preserve = [policies.LatestN(n=keep)]
    if keep_best:
      preserve.append(policies.BestN(get_metric_fn=_loss, reverse=True, n=1,
                                     keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(preserve),
        # Only with a best_fn does orbax write each step's metrics to disk.
        best_fn=_loss if keep_best else None, best_mode='min',
        enable_async_checkpointing=async_save,
        # A killed save leaves a tmp directory; remove it when we start again.
        cleanup_tmp_directories=True,
        temporary_path_class=integrity.ChecksummedTemporaryPath,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._in_flight: Optional[int] = None  # The step an async save writes.

  def all_steps(self) -> list[int]:
    """Steps of complete checkpoints, ascending."""
    self._manager.reload()
    return sorted(step for step in self._manager.all_steps()
                  if is_complete(self.directory / str(step)))

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None."""
    steps = self.all_steps()
    skipped = sorted(set(self._manager.all_steps()) - set(steps))
    if skipped:
      logging.warning('ignoring incomplete checkpoint directories for steps '
                      '%s in %s', skipped, self.directory)
    return steps[-1] if steps else None

  def _losses(self) -> dict[int, float]:
    """{step: eval loss} of the complete checkpoints saved with one."""
    losses = {step: _loss(self._manager.metrics(step) or {})
              for step in self.all_steps()}
    return {step: loss for step, loss in losses.items()
            if loss != float('inf')}

  def best_step(self) -> Optional[int]:
    """The complete checkpoint with the lowest eval loss, or None."""
    losses = self._losses()
    return min(losses, key=losses.get) if losses else None

  def best_loss(self) -> float:
    """The lowest eval loss of a kept checkpoint (inf: none)."""
    return min(self._losses().values(), default=float('inf'))

  def save(self, step: int, state: Any, iterator: InputIterator,
           metrics: Optional[Mapping[str, float]] = None) -> None:
    """Starts saving `state` and `iterator`'s position as `step`.

    Returns once the state is copied off the devices, so the caller may
    donate or overwrite its buffers; the write finishes in the background.
    """
    if step in self._manager.all_steps():
      return  # Already saved (e.g. a final save right after a periodic one).
    self.wait()  # An earlier save's error is that save's.
    self._in_flight = step
    with self._naming_failures():
      self._manager.save(
          step,
          args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                     INPUT: InputSave(iterator)}),
          metrics=dict(metrics or {}) if self.keep_best else None,
          force=True)

  def restore(self, step: int, target: Any,
              iterator: Optional[InputIterator] = None,
              defaults: Optional[Mapping[str, Any]] = None) -> Any:
    """Restores the TrainState of `step` onto `target`'s shardings.

    Args:
      step: A step of `all_steps()`.
      target: Tree of ShapeDtypeStructs with shardings (`abstract_tree`);
        the arrays are read (resharded as needed) onto those shardings.
      defaults: Values of top-level fields of `target` (a TrainState) that
        checkpoints of older versions lack (e.g. `guard`), used for them.
      iterator: If given, moved to the input position saved with `step`
        (the same for any number of hosts), or left at its start, with a
        warning, if the step has none (e.g. one saved before the position
        became host-independent, as per-host `input_state-<process>`).

    A tied model's state saved with a copy of the table per stack (before
    the table was one array) is converted, parameters and every optimizer
    tree shaped like them, to the decoder's copy, with a warning
    (`embeddings`).

    Returns:
      The restored TrainState.

    Raises:
      CorruptCheckpointError: a file of the step differs from its checksum.
      CheckpointError: a two-copy state whose optimizer state does not fit
        the converted target (the message says to start from its
        parameters).
    """
    step_dir = self.directory / str(step)
    integrity.verify_on_main(step_dir)
    saved = ocp.StandardCheckpointHandler().metadata(step_dir / STATE)
    absent = {k: v for k, v in (defaults or {}).items() if k not in saved}
    item = target
    if absent:
      item = {name: getattr(target, name) for name in
              (f.name for f in dataclasses.fields(target))
              if name not in absent}
    # A tied model's state saved with a table per stack (before the table
    # was one array): read as saved, then made the model's (`embeddings`).
    params = getattr(target, PARAMS, None)
    tables = embeddings.Relocation()
    if params is not None and PARAMS in saved:
      tables = embeddings.plan(embeddings.paths(saved[PARAMS]),
                               embeddings.paths(params))
    model_item = item
    if tables:
      item = embeddings.state_to_checkpoint(item, params, tables)
    args = {STATE: ocp.args.StandardRestore(item)}
    if iterator is not None:
      args[INPUT] = InputRestore(iterator)
    with self._naming_conversion_failures(step_dir, tables):
      restored = self._manager.restore(step,
                                       args=ocp.args.Composite(**args))
    state = restored[STATE]
    if tables:
      read = state[PARAMS] if absent else state.params
      embeddings.report(str(step_dir), tables,
                        *embeddings.to_model(read, tables))
      state = embeddings.state_to_model(model_item, state, params, tables)
    if absent:
      logging.warning('%s predates %s; they start from their defaults',
                      step_dir, sorted(absent))
      return target.replace(**state, **absent)
    return state

  @contextlib.contextmanager
  def _naming_conversion_failures(self, step_dir: epath.Path,
                                  tables: embeddings.Relocation):
    """A state whose tables were to be converted but did not restore (an
    optimizer state that is not the parameters' shape around the table)
    is an error that says how to go on: from its parameters alone."""
    try:
      yield
    except (ValueError, KeyError, TypeError) as e:
      if not tables or isinstance(e, errors.CheckpointError):
        raise
      raise errors.CheckpointError(
          f'{step_dir}: saved with a copy of the tied embedding table per '
          'stack (before the table was one array), and its training state '
          f'could not be converted ({e}). Start a run in a new MODEL_DIR '
          'from its parameters instead, which are converted (the optimizer '
          "state starts afresh): --gin.INIT_CHECKPOINT=\"'"
          f"{step_dir}'\"") from e

  def restore_latest(self, target: Any,
                     iterator: Optional[InputIterator] = None,
                     defaults: Optional[Mapping[str, Any]] = None
                     ) -> Optional[tuple[int, Any]]:
    """(step, TrainState) of the newest checkpoint whose files verify.

    `target`, `iterator`, `defaults`: as for `restore`.

    A newer checkpoint whose checksums fail is logged as an error naming the
    file, moved aside to `<step>.corrupt-<time>` and passed over.

    Returns:
      None when there is no complete checkpoint.

    Raises:
      CorruptCheckpointError: every checkpoint is corrupt (training never
        silently starts over).
    """
    steps = self.all_steps()
    if not steps:
      return None
    failures = []
    for step in reversed(steps):
      try:
        return step, self.restore(step, target, iterator, defaults)
      except errors.CorruptCheckpointError as e:
        moved = self._move_aside(step)
        logging.error('CORRUPT CHECKPOINT: %s. Moved it to %s; resuming from '
                      'an older checkpoint instead.', e, moved)
        failures.append(str(e))
    raise errors.CorruptCheckpointError(
        f'{self.directory}: every checkpoint is corrupt ('
        + '; '.join(failures) + ')')

  def _move_aside(self, step: int) -> epath.Path:
    """Renames a corrupt step directory out of the way of the step numbers."""
    source = self.directory / str(step)
    moved = self.directory / f'{step}.corrupt-{time.time_ns()}'
    failure = None
    if distributed.is_main_process():
      try:
        source.rename(moved)
      except OSError as e:
        failure = e
    # Every process reaches the barrier, whatever the rename met.
    ocp.multihost.sync_global_processes(f't5x_adapt_corrupt_{step}')
    if failure is not None:
      raise errors.CheckpointSaveError(
          f'{source} is corrupt and could not be moved aside: {failure}')
    self._manager.reload()
    return moved

  @contextlib.contextmanager
  def _naming_failures(self):
    """Turns a failed save into a CheckpointSaveError naming its step."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-exception-caught
      step, self._in_flight = self._in_flight, None
      latest = self.latest_step()
      intact = ('no earlier checkpoint exists' if latest is None else
                f'the newest checkpoint, {self.directory / str(latest)}, is '
                'intact')
      raise errors.CheckpointSaveError(
          f'{self.directory}: saving step {step} failed ({e}); no part of '
          f'it became a checkpoint and {intact}') from e

  def wait(self) -> None:
    """Blocks until pending saves are committed.

    Raises:
      CheckpointSaveError: a pending save failed.
    """
    with self._naming_failures():
      self._manager.wait_until_finished()
    self._in_flight = None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


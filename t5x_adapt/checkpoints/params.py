"""Orbax checkpoints of model parameters, restorable into either layer layout.

A checkpoint is a directory written by orbax (`StandardCheckpointHandler`)
holding the parameter tree as it was given, plus `t5x_adapt.json`, which
records the layout of each stack ('scanned' or 'unrolled', see
`t5x_adapt.layout`) and optional user metadata such as the model config:

  save_params(path, params, metadata=model.config)
  params = restore_params(path, model)            # in the model's layout
  params = restore_params(path, model, shardings=tree_of_shardings)
  encoder = restore_params(path, model, subtrees=('encoder',))  # only these
  read_info(path)['metadata']

Every file of a checkpoint has its size and SHA-256 in
`t5x_adapt_checksums.json` (`t5x_adapt.checkpoints.integrity`), checked by
`restore_params` before it reads anything: a corrupt file is an error that
names it.

Saving never leaves a half-written checkpoint at `path`: orbax writes into a
staging directory next to `path` (itself through an orbax temporary directory
that is renamed when complete), and only a complete checkpoint is renamed to
`path`. An existing checkpoint at `path` is first renamed aside and deleted
once the new one is in place; if the process dies between those two renames,
the previous checkpoint survives as `.<name>.old` beside `path` (the error of
`restore_params` names it, and the next successful save removes it). Paths
are local (POSIX rename semantics).

`restore_params` reads the saved layout from the checkpoint's own tree (orbax
metadata), so a plain orbax checkpoint of a params tree restores as well; the
copy in `t5x_adapt.json` is for people and other tools.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import shutil
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from t5x_adapt import layout
from t5x_adapt.checkpoints import embeddings
from t5x_adapt.checkpoints import errors
from t5x_adapt.checkpoints import integrity
from t5x_adapt.checkpoints import training
from t5x_adapt.config import config_to_dict
from t5x_adapt.param_paths import path_str

INFO_FILE = 't5x_adapt.json'
INFO_FORMAT = 't5x_adapt.params'
INFO_VERSION = 1
SCANNED = 'scanned'
UNROLLED = 'unrolled'

# Files that mark a directory as a checkpoint `save_params` may replace.
_CHECKPOINT_MARKERS = (INFO_FILE, '_METADATA', '_CHECKPOINT_METADATA')

Params = Any


# ----------------------------------------------------------------- layouts --


def flat_shapes(tree) -> dict[str, tuple[int, ...]]:
  """{'decoder/final_norm/scale': shape} of every leaf."""
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {path_str(p): tuple(getattr(leaf, 'shape', ()))
          for p, leaf in leaves}


def _stack_layouts(paths) -> dict[str, str]:
  """{stack name: 'scanned' | 'unrolled'} from flat parameter paths."""
  out = {}
  for path in paths:
    stack, _, rest = path.partition('/')
    if stack in layout.STACK_NAMES:
      scanned = rest.startswith('layers/') or out.get(stack) == SCANNED
      out[stack] = SCANNED if scanned else UNROLLED
  return out


def _summary(stack_layouts: Mapping[str, str]) -> str:
  kinds = set(stack_layouts.values()) or {UNROLLED}
  return kinds.pop() if len(kinds) == 1 else 'mixed'


def _config_with_layouts(config, stack_layouts: Mapping[str, str]):
  """`config` with each stack's `scan_layers` set to its saved layout."""
  return config.with_stacks({
      name: cfg.replace(scan_layers=stack_layouts.get(name, UNROLLED) ==
                        SCANNED)
      for name, cfg in config.stacks().items()})


# -------------------------------------------------------------------- save --


def _jsonable(obj):
  """json.dumps hook: model configs, other dataclasses, numpy scalars."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    if hasattr(obj, 'is_encoder_decoder'):  # A model config, either kind:
      return config_to_dict(obj)  # readable back with `config_from_dict`.
    return dataclasses.asdict(obj)
  if isinstance(obj, np.generic):
    return obj.item()
  raise TypeError(f'metadata value {obj!r} ({type(obj).__name__}) is not '
                  'JSON serialisable')


def _info_text(params, metadata) -> str:
  stack_layouts = _stack_layouts(flat_shapes(params))
  info = {'format': INFO_FORMAT, 'version': INFO_VERSION,
          'layout': _summary(stack_layouts), 'stack_layouts': stack_layouts,
          'metadata': metadata}
  return json.dumps(info, indent=2, default=_jsonable)


def _backup_path(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(f'.{path.name}.old')


def _check_replaceable(path: pathlib.Path) -> None:
  """Refuses to replace anything but a checkpoint or an empty directory."""
  if not path.exists():
    return
  if path.is_dir() and (not any(path.iterdir()) or any(
      (path / marker).exists() for marker in _CHECKPOINT_MARKERS)):
    return
  raise FileExistsError(f'{path} exists and is not a checkpoint; not '
                        'replacing it')


def _move_into_place(new: pathlib.Path, path: pathlib.Path) -> None:
  """Renames the complete checkpoint `new` to `path`, replacing any old one.

  POSIX cannot rename a directory over a non-empty one, so the old checkpoint
  is renamed aside first and deleted only once the new one is in place.
  """
  backup = _backup_path(path)
  if path.exists():
    # With `path` intact, a backup is left over from an earlier save.
    shutil.rmtree(backup, ignore_errors=True)
    os.rename(path, backup)
  os.rename(new, path)
  shutil.rmtree(backup, ignore_errors=True)


def _checkpointer() -> ocp.Checkpointer:
  # Synchronous: save returns only once the checkpoint is finalised on disk.
  return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def save_params(path: str | os.PathLike, params: Params, *,
                metadata: Optional[Any] = None) -> pathlib.Path:
  """Writes `params` to the checkpoint directory `path`, atomically.

  Args:
    path: Checkpoint directory. An existing checkpoint (or empty directory)
      there is replaced only once the new one is complete; anything else there
      is an error.
    params: Parameter tree (`{'decoder': ...}` or `{'encoder': ...,
      'decoder': ...}`) in either layout.
    metadata: JSON-serialisable value stored in `t5x_adapt.json`; model
      configs (anywhere in it) are stored with `config.config_to_dict`, other
      dataclasses as `dataclasses.asdict` dicts.

  Returns:
    The checkpoint path.

  Raises:
    FileExistsError: `path` holds something other than a checkpoint.
    TypeError: `metadata` is not JSON serialisable (nothing is written).
  """
  path = pathlib.Path(path).absolute()
  info = _info_text(params, metadata)  # Fails before anything is written.
  _check_replaceable(path)
  staging = path.with_name(f'.{path.name}.saving')
  new = staging / 'checkpoint'
  primary = ocp.multihost.is_primary_host(0)
  if primary:
    shutil.rmtree(staging, ignore_errors=True)  # Left by a crashed save.
    staging.mkdir(parents=True)
  ocp.multihost.sync_global_processes('t5x_adapt_save_params_start')
  try:
    checkpointer = _checkpointer()
    try:
      checkpointer.save(new, args=ocp.args.StandardSave(params))
    finally:
      checkpointer.close()
    if primary:
      (new / INFO_FILE).write_text(info)
      integrity.write(new)
      _move_into_place(new, path)
  finally:
    if primary:
      shutil.rmtree(staging, ignore_errors=True)
  ocp.multihost.sync_global_processes('t5x_adapt_save_params_done')
  return path


# ----------------------------------------------------------------- restore --


def _check_exists(path: pathlib.Path) -> None:
  if path.exists():
    return
  message = f'{path}: no such checkpoint'
  backup = _backup_path(path)
  if backup.exists():
    message += (f'; an interrupted save left the previous checkpoint at '
                f'{backup}')
  raise FileNotFoundError(message)


def read_info(path: str | os.PathLike) -> dict:
  """The contents of a checkpoint's `t5x_adapt.json` (layout, metadata)."""
  path = pathlib.Path(path)
  _check_exists(path)
  return errors.read_json(path / INFO_FILE, 'not written by save_params?')


def _params_item(path: pathlib.Path) -> tuple[pathlib.Path, Optional[str]]:
  """(orbax tree directory, key of the params in it or None).

  A `save_params` checkpoint is the params tree itself; a training
  checkpoint's step directory holds a TrainState whose `params` we read.
  """
  state = path / training.STATE
  if not (path / '_METADATA').exists() and state.is_dir():
    return state, training.PARAMS
  return path, None


def _saved_shapes(checkpointer, path: pathlib.Path,
                  subtree: Optional[str] = None) -> dict:
  """Flat {parameter path: shape} of the checkpoint, from orbax metadata."""
  try:
    tree = checkpointer.metadata(path).item_metadata
  except (OSError, ValueError) as e:
    raise errors.CorruptCheckpointError(
        f'{path}: cannot read orbax metadata: {e}') from e
  if tree is None:
    raise errors.CorruptCheckpointError(
        f'{path}: not an orbax checkpoint (no tree metadata)')
  if subtree is not None:
    if subtree not in tree:
      raise errors.CorruptCheckpointError(
          f'{path}: a training state without {subtree!r}')
    tree = tree[subtree]
  return flat_shapes(tree)


def _restore_tree(checkpointer, path: pathlib.Path, subtree: Optional[str],
                  abstract, partial: bool = False):
  """Reads the params tree, or only the `subtree` of a training state.

  `partial`: `abstract` holds only some of the saved parameters.
  """
  if subtree is None and not partial:
    return checkpointer.restore(path,
                                args=ocp.args.StandardRestore(abstract))
  item = abstract if subtree is None else {subtree: abstract}
  reader = ocp.PyTreeCheckpointer()
  try:
    restored = reader.restore(path, args=ocp.args.PyTreeRestore(
        item=item, partial_restore=True,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item)))
  finally:
    reader.close()
  return restored if subtree is None else restored[subtree]


def mismatch_error(path, saved: dict, expected: dict):
  """The error for a checkpoint tree that differs from the model's, or None."""
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  reshaped = sorted(k for k in set(saved) & set(expected)
                    if saved[k] != expected[k])
  if not (missing or unexpected or reshaped):
    return None
  problems = []
  if missing:
    name = missing[0]
    problems.append(f'{len(missing)} missing, first {name!r} (the model '
                    f'expects shape {expected[name]})')
  if unexpected:
    name = unexpected[0]
    problems.append(f'{len(unexpected)} unexpected, first {name!r} (shape '
                    f'{saved[name]} in the checkpoint)')
  if reshaped:
    name = reshaped[0]
    problems.append(f'{len(reshaped)} with another shape, first {name!r}: '
                    f'checkpoint {saved[name]}, model {expected[name]}')
  message = (f'{path}: the checkpoint does not match the model\'s '
             f'parameters: {"; ".join(problems)}')
  cls = (errors.MissingTensorError if missing else
         errors.UnexpectedTensorError if unexpected else
         errors.ShapeMismatchError)
  return cls(message)


def _propagated_shardings(convert, model_shapes, shardings):
  """Shardings of `convert`'s outputs given inputs sharded as `shardings`.

  Lets a checkpoint in the other layout restore straight onto the mesh: a
  stacked kernel gets its layers' sharding with the layer axis replicated,
  an unstacked one its stack's sharding without it.
  """
  lowered = jax.jit(convert).lower(
      training.abstract_tree(model_shapes, shardings))
  return lowered.compile().output_shardings


def _saved_layout_shardings(shardings, same_layout, to_saved, model_shapes,
                            target):
  """Shardings to read the checkpoint onto, in the layout it was saved in."""
  if shardings is None:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree_util.tree_map(lambda _: device, target)
  if same_layout:
    return shardings
  return _propagated_shardings(to_saved, model_shapes, shardings)


def saved_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
  """Flat {parameter path: shape} of a checkpoint, from its metadata.

  `path` is a `save_params` checkpoint or a training step directory; nothing
  but metadata is read.
  """
  path = pathlib.Path(path).absolute()
  _check_exists(path)
  checkpointer = _checkpointer()
  try:
    return _saved_shapes(checkpointer, *_params_item(path))
  finally:
    checkpointer.close()


def only_subtrees(tree, subtrees: Optional[Sequence[str]]):
  """The top-level `subtrees` of a parameter tree (all of it for None)."""
  if tree is None or subtrees is None:
    return tree
  return {name: tree[name] for name in subtrees}


def restore_params(path: str | os.PathLike, model, *,
                   shardings: Optional[Any] = None,
                   subtrees: Optional[Sequence[str]] = None) -> Params:
  """Restores a `save_params` checkpoint into `model`'s parameter layout.

  The checkpoint may be in either layout; it is read in the layout it was
  saved in and then converted (`t5x_adapt.layout`). Arrays are cast to the
  model's parameter dtype. Embedding tables are read where the checkpoint
  keeps them (`embeddings`): a tied model's checkpoint written with a copy
  per stack gives the model's one table its decoder copy, with a warning
  (that says whether the copies were equal); a stack's own table (an
  encoder classifier's) is read from a tied checkpoint's one.

  Args:
    path: Checkpoint directory, or a training checkpoint's step directory
      (`MODEL_DIR/checkpoints/<step>`), whose parameters are read.
    model: A DecoderOnlyModel or EncoderDecoderModel (or any model with
      `param_shapes` and a config); its config gives the expected tree,
      shapes, dtypes and layout.
    shardings: Optional tree of `jax.sharding.Sharding`s with the structure of
      the model's params; arrays are restored directly onto them. By default
      everything lands on the first local device.
    subtrees: Restore only these top-level subtrees of the model's tree
      (e.g. `('encoder',)`: an encoder-decoder checkpoint's encoder, its
      decoder unread). They must match the checkpoint's exactly; other
      subtrees, of the model or of the checkpoint, are ignored.

  Returns:
    The parameter tree (only `subtrees`, when given), in the model's layout.

  Raises:
    FileNotFoundError: nothing at `path`.
    MissingTensorError, UnexpectedTensorError, ShapeMismatchError (all
      ValueErrors): the checkpoint's tree differs from the model's; the
      message names the first differing parameter path and its shapes.
    CorruptCheckpointError: `path` is not a readable orbax checkpoint, or
      one of its files differs from its checksum (the error names it).
  """
  path = pathlib.Path(path).absolute()
  _check_exists(path)
  integrity.verify_on_main(path)
  model_shapes = only_subtrees(model.param_shapes(), subtrees)
  shardings = only_subtrees(shardings, subtrees)
  item_path, subtree = _params_item(path)
  checkpointer = _checkpointer()
  try:
    saved = _saved_shapes(checkpointer, item_path, subtree)
    # The checkpoint may keep the embedding tables elsewhere than the model
    # (copies of a tied table, from before it was one array; a tied table
    # read into a stack's own): read them where they are, move them after.
    tables = embeddings.plan(saved, flat_shapes(model_shapes))
    if subtrees is not None:
      saved = {k: v for k, v in saved.items()
               if k.partition('/')[0] in subtrees or tables.reads(k)}
    saved_layouts = _stack_layouts(k for k in saved if not tables.reads(k))
    to_saved = functools.partial(
        layout.to_model_layout,
        config=_config_with_layouts(model.config, saved_layouts))
    target = jax.eval_shape(to_saved, model_shapes)
    error = mismatch_error(path, saved, flat_shapes(
        embeddings.to_checkpoint(target, tables)))
    if error is not None:
      raise error
    same_layout = saved_layouts == _stack_layouts(flat_shapes(model_shapes))
    target_shardings = _saved_layout_shardings(
        shardings, same_layout, to_saved, model_shapes, target)
    restored = _restore_tree(
        checkpointer, item_path, subtree,
        embeddings.to_checkpoint(
            training.abstract_tree(target, target_shardings), tables),
        partial=subtrees is not None)
  finally:
    checkpointer.close()
  if tables:
    restored, spares = embeddings.to_model(restored, tables)
    embeddings.report(str(path), tables, restored, spares)
  if same_layout:
    return restored
  to_model = functools.partial(layout.to_model_layout, config=model.config)
  if shardings is None:
    return to_model(restored)
  return jax.jit(to_model, out_shardings=shardings)(restored)

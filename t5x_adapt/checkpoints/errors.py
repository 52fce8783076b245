"""Errors raised while reading or writing checkpoints.

Each names the file and the tensor or field at fault, so a user can tell a
wrong path from a corrupt download from an unsupported architecture.
"""


class CheckpointError(ValueError):
  """Base class of checkpoint conversion errors."""


class UnsupportedArchitectureError(CheckpointError):
  """config.json names a model class or option this project cannot load."""


class MissingTensorError(CheckpointError):
  """The checkpoint lacks tensors the architecture needs."""


class UnexpectedTensorError(CheckpointError):
  """The checkpoint holds tensors the architecture has no place for."""


class ShapeMismatchError(CheckpointError):
  """A tensor's shape disagrees with the shape the config implies."""


class CorruptCheckpointError(CheckpointError):
  """A file is truncated, corrupt or not in the expected format."""


class CheckpointSaveError(RuntimeError):
  """Writing a checkpoint failed (a full disk, say); earlier ones are kept."""


def _listing(names, limit=8):
  names = sorted(names)
  shown = ', '.join(repr(n) for n in names[:limit])
  more = len(names) - limit
  return shown + (f' and {more} more' if more > 0 else '')


def missing(source, names) -> MissingTensorError:
  return MissingTensorError(
      f'{source}: missing {len(names)} tensor(s): {_listing(names)}')


def unexpected(source, names) -> UnexpectedTensorError:
  return UnexpectedTensorError(
      f'{source}: {len(names)} unexpected tensor(s): {_listing(names)}')


def read_json(file, hint: str) -> dict:
  """Parses a JSON file; a missing or invalid file is a clear error.

  Args:
    file: pathlib.Path of the file.
    hint: Appended to the missing-file message, e.g. what writes the file.
  """
  import json  # pylint: disable=g-import-not-at-top
  if not file.exists():
    raise FileNotFoundError(f'{file.parent}: no {file.name} ({hint})')
  try:
    return json.loads(file.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CorruptCheckpointError(f'{file}: not valid JSON: {e}') from e

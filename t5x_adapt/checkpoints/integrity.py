"""Checksums of a checkpoint's files: written at commit, verified on restore.

Orbax's atomic rename keeps a killed save from leaving a step that looks
whole; it cannot tell that a committed file changed later (a flipped bit on
disk, a truncated copy). So every checkpoint carries `CHECKSUMS_FILE`, the
size and SHA-256 of each of its files:

  {"format": "t5x_adapt.checksums", "version": 1, "algorithm": "sha256",
   "files": {"state/manifest.ocdbt": {"size": 1234, "sha256": "9f86..."},
             ...}}

Training checkpoints get it inside orbax's temporary directory, just before
the rename that commits the step (`ChecksummedTemporaryPath`), so a
committed step always has it; `save_params` writes it before moving its
checkpoint into place. Not covered are the files orbax rewrites after that
moment: `_CHECKPOINT_METADATA` (commit time, metrics) and the commit marker;
they are checked by being parsed.

`verify` reads every listed file back and raises `CorruptCheckpointError`
naming the first that is missing, has another size, or another checksum.
A checkpoint written before checksums existed verifies as "unverified"
(False), with a warning. Files not listed (a copy tool's litter) are
ignored.

Cost: the main process hashes the checkpoint once when it is committed (in
the background thread of an asynchronous save) and once before reading it,
at the disk's read rate (SHA-256 runs at about 1-2 GB/s a core).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
from typing import Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
from orbax.checkpoint._src.path import atomicity

from t5x_adapt.checkpoints import errors

CHECKSUMS_FILE = 't5x_adapt_checksums.json'
FORMAT = 't5x_adapt.checksums'
VERSION = 1
# Rewritten by orbax after the checksums are taken (see the module docstring).
_UNCOVERED = frozenset({CHECKSUMS_FILE, '_CHECKPOINT_METADATA',
                        atomicity.COMMIT_SUCCESS_FILE})
_CHUNK = 8 << 20


def _sha256(file: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(file, 'rb') as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _covered_files(directory: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in directory.rglob('*')
                if p.is_file() and p.name not in _UNCOVERED)


def write(directory: os.PathLike) -> pathlib.Path:
  """Writes the checksums of `directory`'s files into it (atomically)."""
  directory = pathlib.Path(directory)
  files = {p.relative_to(directory).as_posix():
           {'size': p.stat().st_size, 'sha256': _sha256(p)}
           for p in _covered_files(directory)}
  text = json.dumps({'format': FORMAT, 'version': VERSION,
                     'algorithm': 'sha256', 'files': files}, indent=1)
  target = directory / CHECKSUMS_FILE
  partial = target.with_name(target.name + '.partial')
  partial.write_text(text)
  os.replace(partial, target)
  return target


def _listed(directory: pathlib.Path) -> Optional[dict]:
  """The checksum listing of `directory`, None if it has none."""
  file = directory / CHECKSUMS_FILE
  if not file.exists():
    return None
  listing = errors.read_json(file, 'written with the checkpoint')
  files = None
  if isinstance(listing, dict) and listing.get('format') == FORMAT:
    files = listing.get('files')
  if not isinstance(files, dict) or not all(
      isinstance(entry, dict) and isinstance(entry.get('size'), int)
      and isinstance(entry.get('sha256'), str) for entry in files.values()):
    raise errors.CorruptCheckpointError(f'{file}: not a {FORMAT} listing')
  return files


def _check_file(file: pathlib.Path, expected: dict) -> Optional[str]:
  """What is wrong with `file` (None: nothing)."""
  if not file.is_file():
    return 'missing'
  size = file.stat().st_size
  if size != expected['size']:
    return (f'{size} bytes, {expected["size"]} when written'
            + (' (truncated)' if size < expected['size'] else ''))
  if _sha256(file) != expected['sha256']:
    return 'contents changed since it was written (SHA-256 mismatch)'
  return None


def verify(directory: os.PathLike) -> bool:
  """Checks every file of a checkpoint against its listed checksum.

  Args:
    directory: A training step directory or a `save_params` checkpoint.

  Returns:
    True when every listed file matches; False when the checkpoint has no
    checksums (written before they existed), with a warning.

  Raises:
    CorruptCheckpointError: naming the first file that is missing, has
      another size or another checksum.
  """
  directory = pathlib.Path(directory)
  files = _listed(directory)
  if files is None:
    logging.warning('%s has no %s (written by an older version?): its files '
                    'are not verified', directory, CHECKSUMS_FILE)
    return False
  for name, expected in sorted(files.items()):
    problem = _check_file(directory / name, expected)
    if problem:
      raise errors.CorruptCheckpointError(
          f'{directory / name}: {problem}; the checkpoint {directory} is '
          'corrupt')
  return True


def verify_on_main(directory: os.PathLike) -> bool:
  """`verify` by process 0 alone, its verdict shared with every process.

  The files are on storage every process sees, so one reading suffices.
  """
  if jax.process_count() == 1:
    return verify(directory)
  # Every process reaches the broadcast, whatever process 0 met.
  failure, verified = None, False
  if jax.process_index() == 0:
    try:
      verified = verify(directory)
    except Exception as e:  # pylint: disable=broad-exception-caught
      failure = e
  corrupt = isinstance(failure, errors.CorruptCheckpointError)
  status = int(multihost_utils.broadcast_one_to_all(np.int32(
      2 if corrupt else 3 if failure is not None else int(verified))))
  if failure is not None:
    raise failure
  if status == 2:
    raise errors.CorruptCheckpointError(
        f'{directory}: process 0 found a corrupt file (its log names it)')
  if status == 3:
    raise OSError(f'{directory}: process 0 could not verify the checkpoint '
                  '(its log says why)')
  return bool(status)


class ChecksummedTemporaryPath(atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic rename, with the step's checksums written just before.

  Orbax also finalizes each item directory (`state`, `input`) through this
  class; only a step directory (named by its number) gets checksums, once
  all its items are in it. Orbax calls `finalize` on the primary process
  only, after every process has written its files.
  """

  async def finalize(self):
    final = epath.Path(self.get_final())
    if final.name.isdigit():
      await asyncio.to_thread(write, pathlib.Path(self.get()))
    await super().finalize()

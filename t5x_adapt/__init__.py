"""t5x_adapt: decoder-only -> encoder-decoder adaptation (T5Gemma) in JAX.

Importing the package loads nothing heavy and does two things that must come
before what they act on, which may be the importer's very next line:

* With libtpu installed but no TPU attached, it sets the `TPU_*` variables
  that keep libtpu quiet (`_quiet_libtpu_without_a_tpu`): libtpu reads them
  when JAX first initialises its backends, so they cannot wait for a
  command's `main`.
* It makes TensorFlow (imported by seqio and TFDS, whoever imports them)
  quiet from its first import on (`_quiet_tensorflow_import`): the native
  log lines printed while it loads ("oneDNN custom operations are on",
  "Could not find cuda drivers", absl's "All log messages before
  absl::InitializeLog()") are filtered from stderr, since TensorFlow's
  bundled absl logs them before it reads TF_CPP_MIN_LOG_LEVEL; and, as the
  import starts, that variable is set to 3 unless the user set it (its
  runtime's "failed call to cuInit" and the like), as JAX's import sets it
  to 1. TF_CPP_MIN_LOG_LEVEL=0 turns both off.
"""

import contextlib
import glob
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import threading


def _quiet_libtpu_without_a_tpu() -> None:
  """With libtpu installed (the `tpu` extra, for ahead-of-time compilation)
  but no TPU attached, libtpu's start-up would query a metadata server and
  print errors about unknown worker hostnames before JAX falls back to the
  CPU. Saying there is one local worker keeps it quiet; compiling for a TPU
  topology (`t5x_adapt.precompile`) still works. Without a chip to share,
  several processes (multi-process tests) may load libtpu at once. On a TPU
  VM, and without libtpu, nothing is set.
  """
  if glob.glob('/dev/accel*') or os.path.exists('/dev/vfio'):
    return
  if importlib.util.find_spec('libtpu') is None:
    return
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


# What TensorFlow's native libraries print on import: absl records
# (`I0000 00:00:1796618766.643643 5635 port.cc:153] oneDNN custom operations
# are on...`, `... cudart_stub.cc:31] Could not find cuda drivers...`), the
# older timestamped form, and absl's notice that logging is not initialised.
_BANNER = re.compile(
    rb'[IWE]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\] '
    rb'|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] '
    rb'|WARNING: All log messages before absl::InitializeLog\(\)')


def _forward_lines(source: int, target: int) -> None:
  """Copies lines from file descriptor `source` to `target` until EOF, less
  the banner lines."""
  pending = b''
  while chunk := os.read(source, 1 << 16):
    *lines, pending = (pending + chunk).split(b'\n')
    for line in lines:
      if not _BANNER.match(line):
        os.write(target, line + b'\n')
  if pending and not _BANNER.match(pending):
    os.write(target, pending)


@contextlib.contextmanager
def _banner_free_stderr():
  """Inside the block, file descriptor 2 (where native code logs) is a pipe
  whose lines a thread forwards to the real stderr as they come, less the
  banners: a message of a crash inside the block still gets out."""
  sys.stderr.flush()
  try:
    stderr = os.dup(2)
  except OSError:  # No stderr (a daemon): nothing to filter.
    yield
    return
  source, sink = os.pipe()
  os.dup2(sink, 2)
  os.close(sink)
  forwarder = threading.Thread(target=_forward_lines, args=(source, stderr),
                               daemon=True)
  forwarder.start()
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(stderr, 2)  # Closes the pipe's last write end: EOF.
    # A child process started inside would hold the pipe open: do not wait
    # for it.
    forwarder.join(timeout=5)
    if not forwarder.is_alive():
      os.close(source)
    os.close(stderr)


# The user's setting, read before JAX's import sets a default of 1
# (`jax/__init__.py`), under which TensorFlow would show its errors.
_USER_TF_LOG_LEVEL = os.environ.get('TF_CPP_MIN_LOG_LEVEL')


def _default_tensorflow_log_level(level: str) -> None:
  """Sets TF_CPP_MIN_LOG_LEVEL to `level` unless the user set it. It stays
  set: TensorFlow reads it at its first log line, which may come long after
  its import (the "failed call to cuInit" of its first op on a machine
  without a GPU)."""
  if _USER_TF_LOG_LEVEL is None:
    os.environ['TF_CPP_MIN_LOG_LEVEL'] = level


class _BannerFreeLoader(importlib.abc.Loader):
  """Runs a module's loader quietly: TensorFlow's log level, no banners."""

  def __init__(self, loader, finder):
    self._loader = loader
    self._finder = finder

  def __getattr__(self, name):
    return getattr(self._loader, name)

  def create_module(self, spec):
    return self._loader.create_module(spec)

  def exec_module(self, module):
    with contextlib.suppress(ValueError):  # Loaded once: the finder goes.
      sys.meta_path.remove(self._finder)
    _default_tensorflow_log_level('3')
    try:
      with _banner_free_stderr():
        self._loader.exec_module(module)
    finally:  # Whoever inspects the module later sees its own loader.
      module.__loader__ = module.__spec__.loader = self._loader


class _BannerFreeImport(importlib.abc.MetaPathFinder):
  """Gives `tensorflow` a `_BannerFreeLoader` until it is loaded (a mere
  `find_spec` probe leaves the finder in place)."""

  def find_spec(self, name, path=None, target=None):
    if name != 'tensorflow':
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path, target)
    if spec is not None and spec.loader is not None:
      spec.loader = _BannerFreeLoader(spec.loader, self)
    return spec


def _quiet_tensorflow_import() -> None:
  """Makes TensorFlow's first import quiet (see the module docstring),
  unless it is imported already or its logs are asked for."""
  if 'tensorflow' in sys.modules:
    return
  if _USER_TF_LOG_LEVEL == '0':
    return
  sys.meta_path.insert(0, _BannerFreeImport())


_quiet_libtpu_without_a_tpu()
_quiet_tensorflow_import()

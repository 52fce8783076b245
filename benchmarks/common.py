"""What every benchmark script shares: the repository on sys.path, quiet
TensorFlow, malloc on huge pages (as the commands have it), timestamped
progress lines and the argument parser."""

import argparse
import os
import pathlib
import sys
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from t5x_adapt import host_memory  # pylint: disable=g-import-not-at-top

# Before JAX is imported: re-executes with malloc on huge pages.
host_memory.use_huge_pages()

START = time.perf_counter()


def elapsed() -> float:
  """Seconds since the benchmark started."""
  return time.perf_counter() - START


def log(message: str) -> None:
  """Progress line on stderr, with the time since start."""
  print(f'[{elapsed():6.1f}s] {message}', file=sys.stderr, flush=True)


def argument_parser(doc: str) -> argparse.ArgumentParser:
  """A parser described by the first paragraph of the script's docstring."""
  return argparse.ArgumentParser(
      description=doc.split('\n\n', 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)

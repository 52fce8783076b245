"""Host memory of a command: glibc's malloc on transparent huge pages.

XLA:CPU allocates each step's large buffers (activations, logits, their
gradients: hundreds of MiB) with malloc and frees them when the step ends.
glibc serves allocations that large with fresh `mmap`s and unmaps them on
free, so every step faults its working set in again, 4 KiB at a time: for
the 102M-parameter benchmark model at 8 x (128 + 128) tokens, 0.7M page
faults and about 2 s of system time per step (`benchmarks/train_step.py`).
With glibc's `glibc.malloc.hugetlb=1` tunable those mappings are madvised
for transparent huge pages, which cuts the faults 250-fold.

Tunables are read when a process starts, so the commands (`train`, `eval`,
`infer`, the demo, the paper experiment, the benchmarks) call
`use_huge_pages()` first thing: it re-executes the process with the tunable
added to `GLIBC_TUNABLES` (child processes inherit it). Nothing happens where
it cannot help: another C library, transparent huge pages `never`, or the
tunable already set. `T5X_ADAPT_HUGE_PAGES=0` turns it off.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Optional

TUNABLE = 'glibc.malloc.hugetlb=1'
_TUNABLES_VAR = 'GLIBC_TUNABLES'
_OPT_OUT_VAR = 'T5X_ADAPT_HUGE_PAGES'
_THP_SETTING = '/sys/kernel/mm/transparent_hugepage/enabled'


def transparent_huge_pages() -> Optional[str]:
  """The kernel's mode (`always`, `madvise`, `never`), None if unknown."""
  try:
    with open(_THP_SETTING) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
  """`environ` with `TUNABLE` added to GLIBC_TUNABLES (kept if present)."""
  env = dict(environ)
  current = [t for t in env.get(_TUNABLES_VAR, '').split(':') if t]
  if not any(t.startswith('glibc.malloc.hugetlb=') for t in current):
    current.append(TUNABLE)
  env[_TUNABLES_VAR] = ':'.join(current)
  return env


def wanted(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether this process should be re-executed with the tunable."""
  if environ.get(_OPT_OUT_VAR, '1') == '0':
    return False
  if sys.platform != 'linux' or platform.libc_ver()[0] != 'glibc':
    return False
  if transparent_huge_pages() in (None, 'never'):
    return False
  return with_tunable(environ) != dict(environ)


def use_huge_pages() -> None:
  """Re-executes this command with the tunable, unless it is set already.

  Call it before importing JAX (a re-execution starts the process again).
  """
  if wanted():
    os.execve(sys.executable, sys.orig_argv, with_tunable(os.environ))

"""malloc on transparent huge pages (t5x_adapt/host_memory.py)."""

import os
import subprocess
import sys

import pytest

from t5x_adapt import host_memory

# A child that re-executes itself through `use_huge_pages`, then mallocs and
# touches 256 MiB (through libc: numpy would madvise huge pages itself) and
# prints GLIBC_TUNABLES and the minor page faults that took.
_CHILD = """
import ctypes, os, resource
from t5x_adapt import host_memory
host_memory.use_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(256 << 20), 1, 256 << 20)
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(os.environ.get('GLIBC_TUNABLES', ''), after - before)
"""


def _child(**env) -> tuple[str, int]:
  environ = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  out = subprocess.run([sys.executable, '-c', _CHILD],
                       env={**environ, **env}, check=True,
                       capture_output=True, text=True).stdout.split()
  return (out[0] if len(out) == 2 else ''), int(out[-1])


def test_the_tunable_joins_the_ones_already_set():
  env = host_memory.with_tunable({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert env['GLIBC_TUNABLES'] == (
      f'glibc.malloc.arena_max=2:{host_memory.TUNABLE}')
  assert host_memory.with_tunable({})['GLIBC_TUNABLES'] == host_memory.TUNABLE


def test_a_hugetlb_setting_of_the_users_is_kept():
  env = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}
  assert host_memory.with_tunable(env) == env
  assert not host_memory.wanted(env)


def test_the_opt_out_and_a_set_tunable_need_no_restart():
  assert not host_memory.wanted({'T5X_ADAPT_HUGE_PAGES': '0'})
  assert not host_memory.wanted({'GLIBC_TUNABLES': host_memory.TUNABLE})


@pytest.mark.skipif(host_memory.transparent_huge_pages() in (None, 'never')
                    or not host_memory.wanted({}),
                    reason='no transparent huge pages or no glibc here')
def test_a_command_restarts_itself_with_huge_pages_and_faults_less():
  tunables, faults = _child()
  assert host_memory.TUNABLE in tunables.split(':')
  opted_out, faults_without = _child(T5X_ADAPT_HUGE_PAGES='0')
  assert host_memory.TUNABLE not in opted_out.split(':')
  # 256 MiB is 65,536 pages of 4 KiB and 128 of 2 MiB.
  assert faults_without > 50_000, faults_without
  assert faults < faults_without / 20, (faults, faults_without)

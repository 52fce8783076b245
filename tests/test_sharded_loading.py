"""The one loader places every leaf on the mesh as it reads it.

On 8 simulated devices (fsdp=4, tensor=2; tests/sharded_loading_worker.py in
a subprocess) `t5gemma_tiny_unbalanced` is adapted from a transformers
directory, a Gemma-3-style GGUF file and our orbax checkpoint, and the
distillation teacher is loaded; the balanced `t5gemma_tiny` is adapted from
one transformers directory (both stacks and the cross-attention from the
same arrays). Every leaf must carry the partitioner's
sharding, the sourced leaves must equal their sources, and no device may
ever have held the whole tree: the fullest device's peak, sampled during the
load, stays under three quarters of the tree's bytes (a whole tree
committed to one device would hold all of it; the control, which does just
that, must fail the same check). Run with `-s` to see the figures.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # see the README, "Tests"

WORKER = pathlib.Path(__file__).with_name('sharded_loading_worker.py')
# A device holding the whole tree would be at 1.0. A sharded load of these
# tiny models puts about a quarter of the tree on the fullest device (small
# replicated norms and GQA key/value heads); an orbax checkpoint saved in
# another stack layout is converted after the read, so for a moment each
# device holds its shards in both layouts (0.50 measured for the teacher).
MAX_FRACTION_ON_ONE_DEVICE = 0.75


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS='--xla_force_host_platform_device_count=8')
  done = subprocess.run(
      [sys.executable, str(WORKER), str(tmp_path_factory.mktemp('sources'))],
      env=env, capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, done.stderr[-4000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def _fraction(result) -> float:
  return result['peak_device_bytes'] / result['tree_bytes']


LOADS = ('adapt_transformers', 'adapt_gguf', 'adapt_orbax',
         'adapt_balanced_transformers', 'teacher_transformers',
         'teacher_orbax')


@pytest.mark.parametrize('load', LOADS)
def test_every_leaf_is_sharded_and_no_device_held_the_tree(report, load):
  assert report['device_count'] == 8
  result = report['results'][load]
  print(f'\n{load}: {result["leaves"]} leaves, tree {result["tree_bytes"]:,} '
        f'bytes, fullest device peak {result["peak_device_bytes"]:,} '
        f'({_fraction(result):.2f} of the tree)')
  assert result['shardings_ok']
  assert result['values_ok']
  assert 0 < _fraction(result) < MAX_FRACTION_ON_ONE_DEVICE


def test_the_check_catches_a_tree_on_one_device(report):
  result = report['results']['control']
  print(f'\ncontrol (one device, then resharded): fullest device peak '
        f'{_fraction(result):.2f} of the tree')
  assert result['shardings_ok']
  assert _fraction(result) >= 1.0

"""t5x_adapt: decoder-only -> encoder-decoder adaptation (T5Gemma) in JAX."""

import glob
import os


def _quiet_libtpu_without_a_tpu() -> None:
  """With libtpu installed (the `tpu` extra, for ahead-of-time compilation)
  but no TPU attached, libtpu's start-up would query a metadata server and
  print errors about unknown worker hostnames before JAX falls back to the
  CPU. Saying there is one local worker keeps it quiet; compiling for a TPU
  topology (`t5x_adapt.precompile`) still works. Without a chip to share,
  several processes (multi-process tests) may load libtpu at once. On a TPU
  VM nothing is set.
  """
  if glob.glob('/dev/accel*') or os.path.exists('/dev/vfio'):
    return
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-8')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


_quiet_libtpu_without_a_tpu()

"""A clean start-up: no absl / TensorFlow / XLA banner line on stderr.

TensorFlow (imported by seqio and TFDS) logs through its own absl before it
reads TF_CPP_MIN_LOG_LEVEL, and gin logs an error for each place it looks
for a file in vain; `t5x_adapt/__init__.py` and `t5x_adapt/gin_utils.py`
quiet them. The commands run as a new user would run them: from another
directory, without TF_CPP_MIN_LOG_LEVEL or JAX_PLATFORMS.
"""

import os
import pathlib
import re
import subprocess
import sys

import t5x_adapt

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# A line of absl's C++ or Python log format (`I0000 00:00:1796618766.64 5635
# port.cc:153] ...`, `E1207 04:50:11.41 1396 resource_reader.py:55] ...`),
# TF's older one, absl's pre-initialisation notice, and the messages seen.
BANNER = re.compile(
    r'^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ '
    r'|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] '
    r'|^WARNING:absl:'
    r'|absl::InitializeLog|oneDNN|cudart_stub|cuInit|Path not found'
    r'|rebuild TensorFlow')


def banners(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if BANNER.search(line)]


def normal_env(compile_cache=None) -> dict[str, str]:
  """A user's environment: none of the tests' quieting variables."""
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'JAX_PLATFORMS', 'XLA_FLAGS')}
  env['PYTHONPATH'] = str(REPO_ROOT)
  if compile_cache is not None:
    env['JAX_COMPILATION_CACHE_DIR'] = str(compile_cache)
  return env


def run(args, cwd, env, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_the_banner_pattern_knows_the_lines_seen():
  seen = [
      'WARNING: All log messages before absl::InitializeLog() is called are '
      'written to STDERR',
      'I0000 00:00:1796618766.643643    5635 port.cc:153] oneDNN custom '
      'operations are on.',
      'I0000 00:00:1796618766.648797    5635 cudart_stub.cc:31] Could not '
      'find cuda drivers on your machine, GPU will not be used.',
      'E0000 00:00:1796619011.409638    7076 cuda_platform.cc:52] failed '
      'call to cuInit: INTERNAL: CUDA error',
      'E1207 04:50:11.410051 139678220991360 resource_reader.py:55] Path '
      'not found: gin/runs/pretrain.gin',
  ]
  assert banners('\n'.join(seen)) == seen
  # The package's own filter drops the native ones.
  native_filter = t5x_adapt._BANNER  # pylint: disable=protected-access
  native = [s for s in seen if 'resource_reader' not in s]
  assert all(native_filter.match(s.encode()) for s in native)
  ours = 'Model vocabulary: 512 -> 8192\nTraining from scratch'
  assert not banners(ours)
  assert not native_filter.match(ours.encode())


def test_native_lines_are_filtered_and_the_rest_forwarded(capfd):
  with t5x_adapt._banner_free_stderr():  # pylint: disable=protected-access
    os.write(2, b'I0000 00:00:1796618766.643643    5635 port.cc:153] oneDNN '
             b'custom operations are on.\nkept\nWARNING: All log messages '
             b'before absl::InitializeLog() is called are written to STDERR\n'
             b'kept too')
  assert capfd.readouterr().err == 'kept\nkept too'


def test_help_prints_no_banner(tmp_path):
  result = run(['-m', 't5x_adapt.train', '--help'], tmp_path, normal_env())
  assert 'python -m t5x_adapt.train' in result.stdout
  assert not banners(result.stderr), result.stderr


def test_a_tiny_run_prints_no_banner(tmp_path, compile_cache):
  """Two steps of the tiny decoder-only preset on the embedded corpus, with
  the gin files found from outside the checkout."""
  model_dir = tmp_path / 'run'
  args = ['-m', 't5x_adapt.train', '--gin_file=gin/runs/pretrain.gin',
          '--gin_file=gin/models/gemma2_tiny.gin',
          f'--gin.MODEL_DIR="{model_dir}"', '--gin.TRAIN_STEPS=2',
          '--gin.MIXTURE_OR_TASK_NAME="corpus_lm_spm8k"',
          '--gin.TASK_FEATURE_LENGTHS={"targets": 64}', '--gin.BATCH_SIZE=8',
          '--gin.LOG_EVERY=1', '--gin.EVAL_EVERY=0']
  result = run(args, tmp_path, normal_env(compile_cache))
  assert result.returncode == 0, result.stderr[-4000:]
  assert (model_dir / 'metrics.jsonl').exists()
  assert 'Training from scratch' in result.stderr
  assert not banners(result.stderr), result.stderr

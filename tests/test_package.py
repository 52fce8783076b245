"""The installable package: its wheel, gin search path, tasks, commands.

The slow test installs the wheel into a fresh virtual environment outside
the checkout (its dependencies reused from this one through a `.pth` file,
so nothing is downloaded) and runs a preset load and
`t5x-adapt-precompile` from another directory.
"""

import configparser
import importlib
import importlib.util
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile

import gin
import pytest

from t5x_adapt import cli
from t5x_adapt import gin_utils
from test_startup import banners

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
_ANYWHERE = shutil.ignore_patterns('__pycache__', '*.egg-info', '.pytest_cache')
_AT_THE_TOP = {'.git', '.venv', 'runs', 'build', 'dist'}


def _not_source(directory, names):
  """What a fresh clone does not hold (for shutil.copytree)."""
  ignored = _ANYWHERE(directory, names)
  if pathlib.Path(directory) == REPO_ROOT:
    ignored |= _AT_THE_TOP & set(names)
  return ignored


@pytest.fixture(scope='module')
def wheel(tmp_path_factory):
  """The package's wheel, built from a copy of the checkout (a build in the
  checkout would leave build/ and *.egg-info there)."""
  root = tmp_path_factory.mktemp('wheel')
  source = root / 'source'
  shutil.copytree(REPO_ROOT, source, ignore=_not_source)
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps',
                  '--no-build-isolation', '-w', str(root / 'dist'),
                  str(source)], check=True, capture_output=True, timeout=300)
  return next((root / 'dist').glob('t5x_adapt-*.whl'))


def _entry_points(wheel_path):
  with zipfile.ZipFile(wheel_path) as archive:
    name = next(n for n in archive.namelist()
                if n.endswith('.dist-info/entry_points.txt'))
    parser = configparser.ConfigParser()
    parser.read_string(archive.read(name).decode())
  return dict(parser['console_scripts'])


def test_the_wheel_carries_the_gin_tree_and_no_top_level_tasks(wheel):
  names = zipfile.ZipFile(wheel).namelist()
  carried = {n.removeprefix('t5x_adapt/') for n in names
             if n.startswith('t5x_adapt/gin/')}
  in_repo = {str(p.relative_to(REPO_ROOT))
             for p in (REPO_ROOT / 'gin').rglob('*.gin')}
  assert carried == in_repo
  assert 't5x_adapt/tasks/corpus.py' in names
  assert not [n for n in names if n.startswith('tasks/')]


def test_installing_it_pulls_in_no_second_seqio_or_tfds(wheel):
  """t5's declared dependencies are seqio-nightly, tfds-nightly and
  mesh-tensorflow[transformer] (tensorflow-datasets again): the wheel's
  requirements name none of them, nor t5 (tasks/t5_lib.py)."""
  with zipfile.ZipFile(wheel) as archive:
    name = next(n for n in archive.namelist()
                if n.endswith('.dist-info/METADATA'))
    metadata = archive.read(name).decode()
  required = {re.split(r'[\s<>=!~\[;(]', line.split(':', 1)[1].strip())[0]
              for line in metadata.splitlines()
              if line.startswith('Requires-Dist:')}
  assert {'seqio', 'tensorflow-datasets', 'jax'} <= required
  assert not required & {'t5', 'seqio-nightly', 'tfds-nightly',
                         'mesh-tensorflow'}


def test_each_console_command_runs_its_modules_main(wheel):
  entry_points = _entry_points(wheel)
  assert set(entry_points) == set(cli.COMMANDS) == {
      f't5x-adapt-{c}' for c in
      ('train', 'eval', 'infer', 'adapt', 'convert', 'precompile', 'serve',
       'harness')}
  for name, target in entry_points.items():
    module, function = target.split(':')
    assert callable(getattr(importlib.import_module(module), function))
    assert callable(importlib.import_module(cli.COMMANDS[name][0]).main)


def test_tasks_keeps_its_old_name_in_the_checkout():
  import tasks  # pylint: disable=g-import-not-at-top
  from tasks import sft  # pylint: disable=g-import-not-at-top
  import t5x_adapt.tasks  # pylint: disable=g-import-not-at-top
  assert sft is t5x_adapt.tasks.sft
  assert tasks.corpus is t5x_adapt.tasks.corpus


def test_a_task_without_t5_says_how_to_install_it(monkeypatch):
  from t5x_adapt.tasks import t5_lib  # pylint: disable=g-import-not-at-top
  for name in ('t5', 't5.evaluation', 't5.evaluation.metrics'):
    monkeypatch.setitem(sys.modules, name, None)
  with pytest.raises(ModuleNotFoundError, match=t5_lib.INSTALL):
    t5_lib.accuracy(['a'], ['a'])


def test_checkout_root_is_found_from_inside_only(tmp_path):
  assert gin_utils.checkout_root(REPO_ROOT / 'gin' / 'models') == REPO_ROOT
  assert gin_utils.checkout_root(tmp_path) is None
  assert gin_utils.GIN_ROOT == gin_utils.REPO_ROOT == REPO_ROOT


def test_gin_files_are_found_quietly_from_another_directory(
    tmp_path, monkeypatch, caplog):
  monkeypatch.chdir(tmp_path)
  recipe = 'gin/adapt/t5gemma_tiny_prefixlm_kd.gin'
  assert gin_utils.preset_path(recipe) == REPO_ROOT / recipe
  assert gin_utils.preset_path('gemma2_tiny') == (
      REPO_ROOT / 'gin' / 'models' / 'gemma2_tiny.gin')
  with caplog.at_level(logging.INFO):
    try:
      # Its include of gin/models/stacks/... misses in the working directory.
      model = gin_utils.load_model('gin/models/t5gemma_tiny.gin')
    finally:
      gin.clear_config()
  assert model.config is not None
  assert not [r for r in caplog.records if 'Path not found' in r.getMessage()]


_LAYERS = """
from t5x_adapt import gin_utils
print(gin_utils.load_model('gemma2_tiny').config.num_layers)
"""


def test_a_checkout_you_are_in_wins(tmp_path):
  """A checkout's own preset is used when the working directory is inside
  it; what it lacks still comes from the package's gin root."""
  checkout = tmp_path / 'other_checkout'
  (checkout / 't5x_adapt').mkdir(parents=True)
  (checkout / 'setup.py').write_text('')
  (checkout / 'gin' / 'models').mkdir(parents=True)
  (checkout / 'gin' / 'models' / 'gemma2_tiny.gin').write_text(
      textwrap.dedent("""\
          import t5x_adapt.models
          include 'gin/models/stacks/gemma2_tiny.gin'
          gemma2_tiny/StackConfig.num_layers = 6
          MODEL = @DecoderOnlyModel()
          DecoderOnlyModel.config = @gemma2_tiny/StackConfig()
          """))
  inside = checkout / 'runs'
  inside.mkdir()
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  layers = [subprocess.run([sys.executable, '-c', _LAYERS], cwd=cwd, env=env,
                           capture_output=True, text=True, check=True,
                           timeout=300).stdout.split()[-1]
            for cwd in (inside, tmp_path)]
  assert layers == ['6', '4']


# Run in the fresh environment: where the package and its gin files are,
# whether `tasks` can be imported, and a preset that builds.
_INSTALLED = """
import importlib.util
import t5x_adapt
from t5x_adapt import gin_utils
model = gin_utils.load_model('t5gemma_2b_2b')
print(t5x_adapt.__file__)
print(gin_utils.GIN_ROOT)
print(importlib.util.find_spec('tasks'))
print(type(model).__name__)
"""


def _fresh_venv(path: pathlib.Path) -> pathlib.Path:
  """A virtual environment whose site-packages reuse this environment's."""
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(path)],
                 check=True, timeout=120)
  python = path / 'bin' / 'python'
  site = subprocess.run(
      [python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
      check=True, capture_output=True, text=True).stdout.strip()
  pathlib.Path(site, '_reused_dependencies.pth').write_text(
      sysconfig.get_path('purelib') + '\n')
  return python


@pytest.mark.slow
def test_pip_install_works_outside_the_checkout(tmp_path, wheel):
  python = _fresh_venv(tmp_path / 'venv')
  subprocess.run([sys.executable, '-m', 'pip', '--python', str(python),
                  'install', '-q', '--no-deps', '--no-index', str(wheel)],
                 check=True, capture_output=True, timeout=300)
  site = pathlib.Path(subprocess.run(
      [python, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))'],
      check=True, capture_output=True, text=True).stdout.strip())
  assert (site / 't5x_adapt' / 'gin' / 'models' / 'stacks').is_dir()
  assert not (site / 'tasks').exists()

  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  # A user's environment: no path to the checkout, no tests' quieting.
  env = {k: v for k, v in os.environ.items() if k not in (
      'PYTHONPATH', 'TF_CPP_MIN_LOG_LEVEL', 'JAX_PLATFORMS', 'XLA_FLAGS')}
  result = subprocess.run([python, '-c', _INSTALLED], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  package, gin_root, tasks_spec, model = result.stdout.split('\n')[:4]
  assert package.startswith(str(site))
  assert gin_root == str(site / 't5x_adapt')
  assert tasks_spec == 'None'
  assert model == 'EncoderDecoderModel'
  assert not banners(result.stderr), result.stderr

  if importlib.util.find_spec('libtpu') is None:
    pytest.skip('libtpu (the tpu extra) is not installed')
  result = subprocess.run(
      [python.parent / 't5x-adapt-precompile',
       '--gin_file=gin/adapt/t5gemma_tiny_prefixlm_kd.gin', '--topology=v5p-8'],
      cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'fits' in result.stdout
  assert not banners(result.stderr), result.stderr

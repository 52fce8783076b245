"""The README's code runs, so its quick tour cannot go stale.

Every ```python block of README.md runs in a fresh interpreter, in a
temporary directory, with the checkpoint paths it names pointed at tiny
fixtures this module writes (`PLACEHOLDERS`). A line that ends with
`# not run by the tests` is left out (it needs a download or a pod).

Every ```sh command is at least parsed: a `python -m t5x_adapt...` or
`python benchmarks/...` command runs with `--help` appended (absl and
argparse reject an unknown flag before printing help, with an error), its gin files must
exist and parse with its bindings; a launch script must exist and pass
`bash -n`; a make target must exist in the Makefile; a `curl` call of the
server's API must send a valid request body to one of its endpoints.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import gin
import pytest

from t5x_adapt import gin_utils
import hf_fixtures

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / 'README.md').read_text()
NOT_RUN = '# not run by the tests'
# The README's placeholder paths -> what the tests put there.
T5GEMMA_DIR = '/path/to/checkpoint'


def _blocks(language: str) -> list[str]:
  return re.findall(rf'^```{language}\n(.*?)^```', README, re.M | re.S)


def _runnable(block: str) -> str:
  return '\n'.join(line for line in block.splitlines()
                   if not line.rstrip().endswith(NOT_RUN))


@pytest.fixture(scope='module')
def t5gemma_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('readme') / 't5gemma'
  return hf_fixtures.save(hf_fixtures.t5gemma(), path)


def _run_python(code: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3',
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get(
                 'PYTHONPATH', '')]))
  return subprocess.run([sys.executable, '-c', code], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900,
                        check=False)


@pytest.mark.parametrize('index', range(len(_blocks('python'))))
def test_python_block_runs(index, t5gemma_dir, tmp_path):
  code = _runnable(_blocks('python')[index])
  code = code.replace("'/tmp/", f"'{tmp_path}/")
  code = code.replace(T5GEMMA_DIR, str(t5gemma_dir))
  result = _run_python(code, tmp_path)
  assert result.returncode == 0, (
      f'README python block {index} failed:\n{code}\n--- stderr ---\n'
      f'{result.stderr[-4000:]}')


# ----------------------------------------------------------------- shell --


def _commands() -> list[list[str]]:
  """Each command of the sh blocks as argv, environment assignments first."""
  commands = []
  for block in _blocks('sh'):
    joined = block.replace('\\\n', ' ')
    for line in joined.splitlines():
      line = line.split(' #')[0].strip()
      if line and not line.startswith('#'):
        commands.append(shlex.split(line))
  return commands


def _without_env(argv: list[str]) -> list[str]:
  while argv and re.match(r'^[A-Z_]+=', argv[0]):
    argv = argv[1:]
  return argv


def _gin_args(args: list[str]) -> tuple[list[str], list[str]]:
  files = [a.split('=', 1)[1] for a in args if a.startswith('--gin_file=')]
  bindings = [a[len('--gin.'):].replace('=', ' = ', 1)
              for a in args if a.startswith('--gin.')]
  return files, bindings


def _command_id(argv):
  return ' '.join(_without_env(argv))[:60]


COMMANDS = _commands()


def test_the_readme_shows_commands():
  assert len(COMMANDS) >= 10


@pytest.mark.parametrize('argv', COMMANDS, ids=_command_id)
def test_shell_command_parses(argv, tmp_path):
  argv = _without_env(argv)
  program = argv[0]
  if program == 'make':
    targets = re.findall(r'^([\w.-]+):', (ROOT / 'Makefile').read_text(),
                         re.M)
    assert argv[1] in targets
    return
  if program.startswith('launch/'):
    assert (ROOT / program).exists(), program
    subprocess.run(['bash', '-n', str(ROOT / program)], check=True)
    return
  if program == 'curl':
    _check_api_call(argv[1:])
    return
  assert program.endswith('python'), f'unknown program {program!r}'
  args = argv[1:]
  files, bindings = _gin_args(args)
  for file in files:
    assert (ROOT / file).exists(), f'no gin file {file}'
  if files:
    gin.clear_config()
    gin_utils.parse_gin(files, bindings)
    gin.clear_config()
  if args[0] == '-m' and _is_absl_cli(args[1]):
    # absl acts on --help as soon as it reads it: parse the flags instead.
    code = _PARSE_FLAGS.format(module=args[1], args=args[2:])
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            check=False, env=_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return
  script = ([sys.executable, '-m', args[1]] + args[2:] if args[0] == '-m'
            else [sys.executable, str(ROOT / args[0])] + args[1:])
  result = subprocess.run(script + ['--help'], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False, env=_ENV)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'usage' in result.stdout.lower(), result.stdout[-3000:]


def _check_api_call(args: list[str]) -> None:
  """A curl call of the server's API: its body is a valid request of the
  endpoint it names."""
  from t5x_adapt.serving import protocol  # pylint: disable=g-import-not-at-top
  requests = {'/v1/completions': protocol.CompletionRequest,
              '/v1/chat/completions': protocol.ChatRequest,
              '/v1/embeddings': protocol.EmbeddingRequest}
  url = next(a for a in args if not a.startswith('-') and '/' in a)
  path = '/' + url.split('/', 1)[1]
  assert path in requests, f'no endpoint {path}'
  body = args[args.index('-d') + 1]
  requests[path].model_validate_json(body)


_ENV = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
# Defines the module's flags, then parses the command's arguments as the
# entry point would (its own `command_line` rewriting first, where it has
# one, then `cli.rewrite_gin_args`): an unknown flag raises.
_PARSE_FLAGS = """
import {module} as entry
from absl import flags
from t5x_adapt import cli
argv = ['prog', *{args!r}]
argv = getattr(entry, 'command_line', list)(argv)
flags.FLAGS(cli.rewrite_gin_args(argv))
"""


def _is_absl_cli(module: str) -> bool:
  """Entry points run through `t5x_adapt.cli.run` (absl flags, gin)."""
  path = ROOT / (module.replace('.', '/') + '.py')
  return path.exists() and 'cli.run(' in path.read_text()

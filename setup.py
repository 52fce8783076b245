"""t5x_adapt: decoder-only -> encoder-decoder adaptation (T5Gemma) in JAX.

`pip install .` (or `pip install '.[tpu]'`) installs the `t5x_adapt` package
with its gin files and console commands; t5 comes separately, with
`pip install --no-deps t5==0.9.4` (requirements.txt says why). The top-level
`tasks` package of a checkout is not installed: the tasks are
`t5x_adapt.tasks`.
"""

import pathlib

import setuptools

# Console script -> module:function (t5x_adapt/cli.py: each does what
# `python -m` does for its module).
_COMMANDS = ('train', 'eval', 'infer', 'adapt', 'convert', 'precompile',
             'serve', 'harness')


def _requirements(name):
  lines = pathlib.Path(__file__).with_name(name).read_text().splitlines()
  return [l.split('#')[0].strip() for l in lines if l.split('#')[0].strip()]


setuptools.setup(
    name='t5x_adapt',
    version='0.1.0',
    description=('Pretrain, adapt (decoder-only -> encoder-decoder), '
                 'fine-tune and evaluate Gemma-family models in JAX/Flax.'),
    python_requires='>=3.11',
    packages=[*setuptools.find_packages(include=['t5x_adapt', 't5x_adapt.*']),
              't5x_adapt.gin'],
    # The repository's gin/ tree (its only copy) goes into the wheel as
    # t5x_adapt/gin/, which t5x_adapt.gin_utils puts on gin's search path.
    package_dir={'t5x_adapt.gin': 'gin'},
    package_data={'t5x_adapt': ['py.typed'], 't5x_adapt.gin': ['**/*.gin']},
    install_requires=_requirements('requirements.txt'),
    extras_require={
        'test': _requirements('requirements-test.txt'),
        # libtpu: compile steps for TPU topologies on any machine
        # (`t5x-adapt-precompile`), and run on TPUs.
        'tpu': _requirements('requirements-tpu.txt'),
        # lm-evaluation-harness: `t5x-adapt-harness` (t5x_adapt/harness.py).
        'eval': _requirements('requirements-eval.txt'),
    },
    entry_points={'console_scripts': [
        f't5x-adapt-{name} = t5x_adapt.cli:{name}_command'
        for name in _COMMANDS]},
)

"""t5x_adapt: decoder-only -> encoder-decoder adaptation (T5Gemma) in JAX."""

import pathlib

import setuptools


def _requirements(name):
  lines = pathlib.Path(__file__).with_name(name).read_text().splitlines()
  return [l.split('#')[0].strip() for l in lines if l.split('#')[0].strip()]


setuptools.setup(
    name='t5x_adapt',
    version='0.1.0',
    description=('Pretrain, adapt (decoder-only -> encoder-decoder), '
                 'fine-tune and evaluate Gemma-family models in JAX/Flax.'),
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['t5x_adapt', 't5x_adapt.*',
                                               'tasks', 'tasks.*']),
    install_requires=_requirements('requirements.txt'),
    extras_require={
        'test': _requirements('requirements-test.txt'),
        # libtpu: compile steps for TPU topologies on any machine
        # (`python -m t5x_adapt.precompile`), and run on TPUs.
        'tpu': _requirements('requirements-tpu.txt'),
    },
    package_data={'t5x_adapt': ['py.typed']},
)

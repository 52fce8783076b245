"""The install ends with one consistent copy of seqio and tensorflow_datasets."""

import importlib.metadata as metadata

import pytest


def _installed(name):
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


@pytest.mark.parametrize('nightly', ['seqio-nightly', 'tfds-nightly'])
def test_no_nightly_copies(nightly):
  assert _installed(nightly) is None, (
      f'{nightly} is installed and overwrites the pinned package; '
      'install t5 with --no-deps (see Makefile)')


def test_pinned_versions_import():
  import seqio  # pylint: disable=g-import-not-at-top
  import t5.data.preprocessors  # pylint: disable=g-import-not-at-top,unused-import
  import t5.evaluation.metrics  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  assert _installed('seqio') == '0.0.20'
  assert _installed('tensorflow-datasets') == '4.9.10'
  assert _installed('t5') == '0.9.4'
  assert tfds.__version__ == '4.9.10'
  assert hasattr(seqio, 'EncDecFeatureConverter')

"""The parts of t5 the tasks use, imported when a task first needs them.

pip cannot install t5 as a dependency: its declared dependencies
(`seqio-nightly`, `tfds-nightly`, and `tensorflow-datasets` again through
`mesh-tensorflow[transformer]`) put second copies of seqio and
tensorflow_datasets over the pinned ones. It is installed on its own with
`pip install --no-deps t5==0.9.4` (the Makefile does; tests/test_install.py
checks the result). Registering the tasks does not need it, so a package
installed without t5 still loads presets, compiles steps ahead of time
(`t5x-adapt-precompile`) and parses every recipe; reading a task's data
through t5's preprocessors, scoring its predictions and the SuperGLUE tasks
need it, and say how to install it.

The wrappers keep the signatures that seqio inspects (a metric's
`targets, predictions`; a preprocessor's `sequence_length`,
`output_features`), and call t5's function, gin bindings and all.
"""

import importlib
from types import ModuleType

INSTALL = 'pip install --no-deps t5==0.9.4'


def module(name: str) -> ModuleType:
  """`t5.<name>` (e.g. 'data.preprocessors'), or an error saying how to
  install t5."""
  try:
    return importlib.import_module(f't5.{name}')
  except ModuleNotFoundError as e:
    if (e.name or '').partition('.')[0] != 't5':
      raise  # Something t5 imports is missing: say that instead.
    raise ModuleNotFoundError(
        f'this task needs t5, which is installed without its declared '
        f'dependencies (see t5x_adapt/tasks/t5_lib.py): {INSTALL}',
        name='t5') from e


def span_corruption(dataset, sequence_length, output_features):
  """t5's `span_corruption` (T5's pretraining objective)."""
  return module('data.preprocessors').span_corruption(
      dataset, sequence_length=sequence_length,
      output_features=output_features)


def string_label_to_class_id(string_label, label_classes, **kwargs):
  """t5's postprocessor: the index of `string_label` in `label_classes`."""
  return module('data.postprocessors').string_label_to_class_id(
      string_label, label_classes=label_classes, **kwargs)


def accuracy(targets, predictions):
  """t5's accuracy metric (in percent)."""
  return module('evaluation.metrics').accuracy(targets, predictions)


def rouge(targets, predictions):
  """t5's ROUGE metrics (rouge1, rouge2, rougeLsum)."""
  return module('evaluation.metrics').rouge(targets, predictions)

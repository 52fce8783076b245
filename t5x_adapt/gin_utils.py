"""Gin plumbing: parse config files and build the model a preset names.

Model presets live in `gin/models/<preset>.gin`. Each binds the macro `MODEL`
to a model (`@DecoderOnlyModel()` or `@EncoderDecoderModel()`) whose config
names one or two scoped stacks from `gin/models/stacks/`. Paths in gin files
and on the command line are written relative to a gin root, a directory that
holds `gin/`:

  include 'gin/models/stacks/gemma2_2b.gin'
  python -m t5x_adapt.train --gin_file=gin/adapt/t5gemma_tiny_prefixlm_kd.gin

Where the gin files come from. The repository's top-level `gin/` directory
is their only source. A wheel carries it as package data: setup.py maps it
to `t5x_adapt/gin/` (`package_dir`), so an installed package is its own gin
root (`<site-packages>/t5x_adapt/gin/models/...`). `parse_gin` registers
these gin search paths, searched in this order:

  1. the working directory (gin's own first place);
  2. the checkout the working directory is in, if any (its root: the
     directory with `setup.py`, `t5x_adapt/` and `gin/models/`);
  3. `GIN_ROOT`: the checkout this module lives in (a checkout, or an
     editable install of one), else the installed package directory.

So `gin/...` paths resolve from any directory, and a checkout's files win
when you are inside it. `REPO_ROOT` is `GIN_ROOT`'s older name.

Typical use:

  model = gin_utils.load_model('t5gemma_9b_2b', dtype='bfloat16')
  shapes = model.param_shapes()
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import pathlib
from typing import Any, Iterable, Optional, Sequence

import gin

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def checkout_root(path: pathlib.Path) -> Optional[pathlib.Path]:
  """The root of the t5x_adapt checkout that `path` is in, or None."""
  for directory in (path, *path.parents):
    if ((directory / 'setup.py').is_file() and
        (directory / 't5x_adapt').is_dir() and
        (directory / 'gin' / 'models').is_dir()):
      return directory
  return None


GIN_ROOT = checkout_root(PACKAGE_DIR.parent) or PACKAGE_DIR
REPO_ROOT = GIN_ROOT
MODELS_DIR = GIN_ROOT / 'gin' / 'models'
MODEL_MACRO = 'MODEL'

# Modules whose import registers the configurables the gin files name.
CONFIGURABLE_MODULES = ('t5x_adapt.config', 't5x_adapt.models')

_search_path_added = False


@functools.cache
def gin_roots() -> tuple[pathlib.Path, ...]:
  """The gin roots searched after the working directory, in order (the
  working directory's checkout as it was on the first call)."""
  roots = [checkout_root(pathlib.Path.cwd()), GIN_ROOT]
  return tuple(dict.fromkeys(root for root in roots if root is not None))


_GIN_RESOURCE_READER = os.path.join('gin', 'resource_reader.py')


class _QuietSearch(logging.Filter):
  """Drops gin's "Path not found" errors: its package-resource reader logs
  one for each place a relative path is looked for in vain (the working
  directory first), even when the next place has the file. A file found
  nowhere still fails, with gin's IOError."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.pathname.endswith(_GIN_RESOURCE_READER) and
                str(record.msg).startswith('Path not found'))


def _register() -> None:
  """Adds the gin roots to gin's search path (once) and imports the modules
  that hold configurables."""
  global _search_path_added
  if not _search_path_added:
    for root in gin_roots():
      gin.add_config_file_search_path(str(root))
    logging.getLogger().addFilter(_QuietSearch())
    _search_path_added = True
  for module in CONFIGURABLE_MODULES:
    importlib.import_module(module)


def parse_gin(files: Iterable[str | pathlib.Path],
              bindings: Sequence[str] = (),
              finalize: bool = False) -> None:
  """Parses gin `files`, then `bindings`, into the global gin config.

  Adds to whatever is already bound (call `gin.clear_config()` first for a
  fresh config). Relative paths, here and in `include` statements, are looked
  up in the working directory and then under `gin_roots()`.

  Args:
    files: Gin files, parsed in order.
    bindings: Extra bindings such as `"StackConfig.dtype = 'bfloat16'"`,
      parsed after the files so they override them.
    finalize: Lock the config afterwards (`gin.finalize()`), as a launcher
      does before training.
  """
  _register()
  gin.parse_config_files_and_bindings(
      [str(f) for f in files], list(bindings), finalize_config=finalize)


def list_presets() -> list[str]:
  """Names of the model presets in `gin/models/` (without `.gin`)."""
  return sorted(path.stem for path in MODELS_DIR.glob('*.gin'))


def _find(relative: pathlib.Path) -> Optional[pathlib.Path]:
  """`relative` in the working directory, else under the first gin root
  that has it (gin's search order)."""
  for root in (pathlib.Path(), *gin_roots()):
    if (root / relative).exists():
      return root / relative
  return None


def preset_path(preset_or_path: str | pathlib.Path) -> pathlib.Path:
  """The gin file of a preset name (`'gemma2_2b'`) or a path to a gin file."""
  text = str(preset_or_path)
  if text.endswith('.gin') or '/' in text:
    path = _find(pathlib.Path(text))  # An absolute path stays as it is.
    if path is None:
      raise FileNotFoundError(f'no gin file {text!r}')
    return path
  path = _find(pathlib.Path('gin', 'models', f'{text}.gin'))
  if path is None:
    raise ValueError(f'unknown model preset {text!r}; presets: '
                     f'{", ".join(list_presets())}')
  return path


def _evaluate(value: Any, **kwargs) -> Any:
  """Calls a gin reference `@fn()` (in its scope) with `kwargs` on top of its
  bindings; returns other values as they are."""
  if isinstance(value, gin.config.ConfigurableReference) and value.evaluate:
    return value.scoped_configurable_fn(**kwargs)
  if kwargs:
    raise TypeError(f'cannot apply overrides to a {type(value).__name__} '
                    f'bound to %{MODEL_MACRO}; bind it as @Model()')
  return value


def model_from_config(macro: str = MODEL_MACRO, **overrides) -> Any:
  """Builds the model bound to `%macro` in the current gin config.

  Args:
    macro: Name of the macro holding the model reference.
    **overrides: `StackConfig` fields set on every stack of the model's
      config (e.g. `dtype='bfloat16'`, `scan_layers=False`).

  Returns:
    The model object.
  """
  reference = gin.query_parameter(f'{macro}/gin.macro.value')
  model = _evaluate(reference)
  if overrides:
    # The other arguments of the model keep their gin bindings.
    model = _evaluate(reference, config=model.config.map_stacks(**overrides))
  return model


def load_model(preset_or_path: str | pathlib.Path,
               bindings: Sequence[str] = (),
               **overrides) -> Any:
  """Builds the model of a preset in a fresh gin config.

  Clears the global gin config, parses the preset file and `bindings`, and
  builds the model bound to `MODEL`. The preset's bindings stay active
  afterwards (so `gin.operative_config_str()` describes the model); calling
  again replaces them.

  Args:
    preset_or_path: A preset name from `list_presets()` (`'gemma2_2b'`) or a
      path to a gin file that binds `MODEL`.
    bindings: Extra gin bindings parsed after the preset.
    **overrides: `StackConfig` fields set on every stack (applied after the
      gin bindings), e.g. `dtype='bfloat16'`.

  Returns:
    A `DecoderOnlyModel` or `EncoderDecoderModel`.
  """
  path = preset_path(preset_or_path)
  gin.clear_config()
  parse_gin([path], bindings)
  return model_from_config(**overrides)


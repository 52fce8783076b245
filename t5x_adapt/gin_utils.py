"""Gin plumbing: parse config files and build the model a preset names.

Model presets live in `gin/models/<preset>.gin`. Each binds the macro `MODEL`
to a model (`@DecoderOnlyModel()` or `@EncoderDecoderModel()`) whose config
names one or two scoped stacks from `gin/models/stacks/`. Include paths in gin
files are written relative to the repository root, which `parse_gin`
registers as a gin search path:

  include 'gin/models/stacks/gemma2_2b.gin'

Typical use:

  model = gin_utils.load_model('t5gemma_9b_2b', dtype='bfloat16')
  shapes = model.param_shapes()
"""

from __future__ import annotations

import importlib
import pathlib
from typing import Any, Iterable, Sequence

import gin

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / 'gin' / 'models'
MODEL_MACRO = 'MODEL'

# Modules whose import registers the configurables the gin files name.
CONFIGURABLE_MODULES = ('t5x_adapt.config', 't5x_adapt.models')

_search_path_added = False


def _register() -> None:
  """Adds the repository root to gin's search path (once) and imports the
  modules that hold configurables."""
  global _search_path_added
  if not _search_path_added:
    gin.add_config_file_search_path(str(REPO_ROOT))
    _search_path_added = True
  for module in CONFIGURABLE_MODULES:
    importlib.import_module(module)


def parse_gin(files: Iterable[str | pathlib.Path],
              bindings: Sequence[str] = (),
              finalize: bool = False) -> None:
  """Parses gin `files`, then `bindings`, into the global gin config.

  Adds to whatever is already bound (call `gin.clear_config()` first for a
  fresh config). Relative paths, here and in `include` statements, are looked
  up in the working directory and then under `REPO_ROOT`.

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


def preset_path(preset_or_path: str | pathlib.Path) -> pathlib.Path:
  """The gin file of a preset name (`'gemma2_2b'`) or a path to a gin file."""
  text = str(preset_or_path)
  if text.endswith('.gin') or '/' in text:
    path = pathlib.Path(text)
    if not path.is_absolute() and not path.exists():
      path = REPO_ROOT / path
    if not path.exists():
      raise FileNotFoundError(f'no gin file {text!r}')
    return path
  path = MODELS_DIR / f'{text}.gin'
  if not path.exists():
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


"""One loader: a model's parameters from any checkpoint, placed as read.

  params = load.load_params(path, model, shardings=shardings)
  encoder = load.load_params(path, model, shardings=..., subtrees=('encoder',))
  model, params = load.model_and_params(path)   # the model it describes

Kinds (`checkpoint_kind`): our Orbax checkpoints (a `save_params` directory
or a training step directory `MODEL_DIR/checkpoints/<step>`), transformers
directories (config.json + safetensors), GGUF files and the gemma library's
Orbax checkpoints (`gemma_lib`: Kaggle's Flax releases, read for the model
a caller names, since they carry no config). Ours are restored
by orbax straight onto the shardings (each host reads the shards of its own
devices). Transformers, GGUF and gemma library tensors are read one at a
time, converted in host memory (layout, and one cast from the stored dtype
straight to the model's parameter dtype) and placed with their sharding
before the next is read (`lazy.place`), so no device ever holds a whole
tree and the host holds one tensor in flight. (Each host reads the whole
of each tensor it holds a shard of: these tensors need a layout change
before they can be cut.)

Embedding tables are read where the checkpoint keeps them and moved to
where the model does (`checkpoints.embeddings`): a tied model reads the
decoder's table of a checkpoint with one per stack (an Orbax checkpoint
written before the tied table was one array, converted with a warning; a
transformers T5Gemma), and an encoder classifier reads a tied checkpoint's
one table into its stack's own.

A transformers or GGUF checkpoint must have the model's architecture: each
StackConfig field that says what a stack computes (all but its run fields,
`StackConfig.architecture`) is compared (`check_architecture`) and every
differing one is named.

Everything that starts a model from a checkpoint comes here: INIT_CHECKPOINT
(`initial_params`, the classifiers' backbone included), the distillation
teacher, evaluation and inference, and the adaptation sources
(`t5x_adapt.adapt`).
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Optional, Sequence

import jax

from t5x_adapt import checkpoints
from t5x_adapt import layout
from t5x_adapt.checkpoints import embeddings
from t5x_adapt.checkpoints.params import flat_shapes, mismatch_error
from t5x_adapt.checkpoints.params import only_subtrees
from t5x_adapt.config import StackConfig, config_from_dict
from t5x_adapt.convert import gemma_lib
from t5x_adapt.convert import gguf
from t5x_adapt.convert import hf
from t5x_adapt.convert import lazy
from t5x_adapt.convert import registry
from t5x_adapt.models import DecoderOnlyModel, model_for_config

Params = Any

ORBAX = 'orbax'
TRANSFORMERS = registry.TRANSFORMERS
GGUF = registry.GGUF
GEMMA_LIB = gemma_lib.GEMMA_LIB


def checkpoint_kind(path: str | os.PathLike) -> str:
  """'gguf' (a .gguf file), 'transformers' (config.json), 'gemma_lib' (the
  gemma library's Orbax tree, `gemma_lib.looks_like`) or 'orbax' (ours)."""
  path = pathlib.Path(path)
  if path.suffix == '.gguf':
    return GGUF
  if (path / 'config.json').exists():
    return TRANSFORMERS
  if gemma_lib.looks_like(path):
    return GEMMA_LIB
  return ORBAX


# ------------------------------------------------------------ architecture --


def same_architecture(a: StackConfig, b: StackConfig) -> bool:
  """Whether two stacks compute the same function (run fields aside)."""
  return a.architecture() == b.architecture()


def _same(a, b) -> bool:
  # Checkpoints store floats such as rms_norm_eps in float32.
  if isinstance(a, float) and isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-6)
  return a == b


def check_architecture(source: StackConfig, target: StackConfig,
                       where: str) -> None:
  """Raises ValueError naming every field in which `source` != `target`."""
  source_fields, target_fields = source.architecture(), target.architecture()
  differing = [f'{name}: checkpoint {source_fields[name]!r}, model '
               f'{target_fields[name]!r}' for name in source_fields
               if not _same(source_fields[name], target_fields[name])]
  if differing:
    raise ValueError(f'{where}: the checkpoint does not fit the model '
                     f'stack ({"; ".join(differing)})')


def _check_stacks(loaded_config, config, names: Optional[Sequence[str]],
                  where: str) -> None:
  """The checkpoint has the model's stacks (or `names`), with its fields."""
  loaded, target = (c.stacks() for c in (loaded_config, config))
  if names is None:
    fits = set(loaded) == set(target)
  else:
    fits = set(names) <= set(loaded)
  if not fits:
    kind = ('an encoder-decoder' if loaded_config.is_encoder_decoder
            else 'a decoder-only model')
    raise ValueError(f'{where}: the checkpoint is {kind} (stacks '
                     f'{sorted(loaded)}); the model needs '
                     f'{sorted(names or target)}')
  for name in names or target:
    check_architecture(loaded[name], target[name], f'{where} ({name})'
                       if loaded_config.is_encoder_decoder else where)


# ------------------------------------------------------------------ loading --


def lazy_params(path: str | os.PathLike, scan_layers: bool = True,
                text_only: bool = False):
  """(model, tree of float32 `lazy.LazyTensor`s) of a transformers or GGUF
  file; `text_only`: see `hf.lazy_params` (GGUF files have no vision
  tower)."""
  kind = checkpoint_kind(path)
  if kind == GGUF:
    return gguf.lazy_params(path, scan_layers)
  if kind == TRANSFORMERS:
    return hf.lazy_params(path, scan_layers, text_only=text_only)
  if kind == GEMMA_LIB:
    raise ValueError(f'{path}: a gemma library checkpoint does not say '
                     'which model it holds (use load_params with the model)')
  raise ValueError(f'{path}: an orbax checkpoint has no lazy reader '
                   '(use load_params)')


def _lazy_model_params(path, model, subtrees):
  """A transformers / GGUF checkpoint as `model`'s lazy parameter tree
  (`model` has no vision tower, so a checkpoint's is left unread); each
  leaf is read straight into the model's parameter dtype."""
  if checkpoint_kind(path) == GEMMA_LIB:
    # No config to check: the model says what the tensors compute.
    tree = gemma_lib.lazy_tree(gemma_lib.Checkpoint(path), model)
  else:
    loaded, tree = lazy_params(path, scan_layers=False, text_only=True)
    _check_stacks(loaded.config, model.config, subtrees, str(path))
  expected = only_subtrees(model.param_shapes(), subtrees)
  # A table per stack into a tied model (T5Gemma), or a tied table into a
  # stack's own (an encoder classifier of T5Gemma 2): moved, not read.
  tables = embeddings.plan(flat_shapes(tree), flat_shapes(expected))
  tree, _ = embeddings.to_model(tree, tables)
  embeddings.report(str(path), tables)
  tree = layout.to_model_layout(only_subtrees(tree, subtrees), model.config,
                                stack=lazy.stacked)
  error = mismatch_error(path, flat_shapes(tree), flat_shapes(expected))
  if error is not None:
    raise error
  return jax.tree_util.tree_map(lambda leaf, like: leaf.astype(like.dtype),
                                tree, expected)


def load_params(path: str | os.PathLike, model, *,
                shardings: Optional[Any] = None,
                subtrees: Optional[Sequence[str]] = None) -> Params:
  """`model`'s parameters from a checkpoint of any kind.

  Args:
    path: An orbax checkpoint of ours (`save_params` directory or training
      step directory), a transformers directory or a `.gguf` file.
    model: The model they are for: its tree, layout and parameter dtype.
    shardings: Tree of shardings of the model's parameters; each leaf is
      placed on its own as it is read (None: on the first device for
      orbax, numpy on the host for the others).
    subtrees: Only these top-level subtrees (e.g. `('encoder',)`).

  Returns:
    The parameters (only `subtrees`, when given).

  Raises:
    ValueError: the checkpoint's architecture or tree differs from the
      model's (the fields or the first differing tensor are named).
    FileNotFoundError, CheckpointError: unreadable checkpoints.
  """
  if checkpoint_kind(path) == ORBAX:
    return checkpoints.restore_params(path, model, shardings=shardings,
                                      subtrees=subtrees)
  tree = _lazy_model_params(path, model, subtrees)
  return lazy.place(tree, only_subtrees(shardings, subtrees))


def load_decoder_only(path: str | os.PathLike, stack: StackConfig,
                      shardings: Optional[Any] = None) -> Params:
  """`{'decoder': stack}` parameters of a decoder-only checkpoint.

  `stack` is the architecture the checkpoint must have; its `scan_layers`
  and `param_dtype` decide the returned layout and dtype.
  """
  return load_params(path, DecoderOnlyModel(stack), shardings=shardings)


def model_and_params(path: str | os.PathLike, scan_layers: bool = True,
                     text_only: bool = False):
  """(model, host parameters) of the model a checkpoint describes.

  Orbax checkpoints need the model config in their metadata (as
  `python -m t5x_adapt.convert` and `python -m t5x_adapt.adapt` write it)
  and keep the layout it names; `scan_layers` and `text_only` are for the
  other kinds.
  """
  if checkpoint_kind(path) != ORBAX:
    model, tree = lazy_params(path, scan_layers, text_only)
    return model, lazy.place(tree)
  metadata = checkpoints.read_info(path).get('metadata') or {}
  if 'config' not in metadata:
    raise checkpoints.CheckpointError(
        f'{path}: no model config in the checkpoint metadata')
  model = model_for_config(config_from_dict(metadata['config']))
  return model, checkpoints.restore_params(path, model)


def model_of(path: str | os.PathLike, scan_layers: bool = True):
  """The model a checkpoint describes, its parameters unread; None for an
  Orbax checkpoint without a config in its metadata (a training step
  directory: its model is the run's gin preset) and for the gemma
  library's checkpoints (which carry none)."""
  kind = checkpoint_kind(path)
  if kind == GEMMA_LIB:
    return None
  if kind != ORBAX:
    return lazy_params(path, scan_layers, text_only=True)[0]
  metadata = checkpoints.read_info(path).get('metadata') or {}
  if 'config' not in metadata:
    return None
  return model_for_config(config_from_dict(metadata['config']))


def initial_params(path: str | os.PathLike, model,
                   shardings: Optional[Any] = None):
  """The parameters `model` starts training from, read from `path` (any
  checkpoint kind), each leaf onto its sharding.

  The model says how its tree relates to the checkpoint's
  (`BaseModel.params_from_checkpoint`: the same tree, or a classifier's
  backbone stack and a fresh head); this module does the reading.
  """
  return model.params_from_checkpoint(str(path), load_params, shardings)

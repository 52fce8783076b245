"""The gemma library's Flax checkpoints (Kaggle): Gemma 2, Gemma 3, T5Gemma.

Google's `gemma` package (and its `gemma.research.t5gemma`, the T5Gemma
authors' code) saves a model's parameter tree as an Orbax checkpoint, in its
own names and layouts. The layouts it reads, all read here:

* nested, as `model.init()` makes it: `{'embedder': {'input_embedding'},
  'layer_0': {'attn': {'q_einsum': {'w'}, ...}, 'mlp': {'gating_einsum',
  'linear'}, 'pre_attention_norm': {'scale'}, ...}, 'final_norm'}`, and for
  T5Gemma the same under `encoder` and `decoder`, the decoder's layers with
  `cross_attn` and `pre/post_cross_attention_norm`;
* flat, as the official checkpoints were released: `{'transformer/layer_0/
  attn/q_einsum': {'w'}, 'transformer/layer_0/mlp/gating_einsum': {'w'},
  ...}`;
* a kauldron training state, whose `params` are one of the above.
(The library's internal stacked layout is refused with a message.)

What differs from our layout, tensor by tensor (`rules`):

* attention: `q_einsum` [heads, embed, head_dim] (ours [embed, heads,
  head_dim]); `kv_einsum` [2, kv_heads, embed, head_dim], or for multi-head
  presets one fused `qkv_einsum` [3, heads, embed, head_dim]; `attn_vec_einsum`
  [heads, head_dim, embed] is ours;
* MLP: `gating_einsum` [2, embed, mlp] (gate, then up), or transposed
  [2, mlp, embed] where the library sets `transpose_gating_einsum` (Gemma 2
  9B and 27B, every Gemma 3), told apart by shape; `linear` is our `down`;
* the table: Gemma 2's has 256,128 rows, 256,000 of them used: a model of
  256,000 tokens reads the first rows (trimmed), one of 256,128 keeps them
  all, as the model's `vocab_size` asks;
* norms store `scale` for `x * (1 + scale)`, as ours do.

The checkpoints carry no config: the model reading one says what it
computes (`load.load_params(path, model)`; a preset with
`python -m t5x_adapt.convert gemma-to-orbax --preset`). Without one
(`load.model_of`), the preset whose tensors have the checkpoint's shapes is
found among `gin/models/` (`find_preset`); the shapes check every tensor,
not the settings that have no tensor (softcaps, windows, RoPE), which the
preset's family fixes. Each tensor is read on its own (an Orbax partial
restore), converted, and placed (`lazy.place`).

Written here: no library converts these checkpoints to another layout
(the gemma package loads them into its own modules only).
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from t5x_adapt.checkpoints import errors
from t5x_adapt.config import StackConfig
from t5x_adapt.convert.tables import IDENTITY, Rule, Transform, Transpose
from t5x_adapt.convert.tables import lazy_tensors
from t5x_adapt.models import model_for_config

GEMMA_LIB = 'gemma_lib'  # The kind of checkpoint (`load.checkpoint_kind`).

# Our norms -> the library's module names.
_NORMS = {
    'pre_self_attention_norm': 'pre_attention_norm',
    'post_self_attention_norm': 'post_attention_norm',
    'pre_cross_attention_norm': 'pre_cross_attention_norm',
    'post_cross_attention_norm': 'post_cross_attention_norm',
    'pre_mlp_norm': 'pre_ffw_norm',
    'post_mlp_norm': 'post_ffw_norm',
}
_ATTENTION = {'self_attention': 'attn', 'cross_attention': 'cross_attn'}
_KAULDRON_STATE = {'collections', 'opt_state', 'params', 'step'}
# Subtrees of a multimodal checkpoint that the text model leaves.
_VISION = ('vision_encoder/', 'embedder/mm_')


# -------------------------------------------------------------- layouts --


class HeadsFirst(Transform):
  """The library's [heads, embed, head_dim] <-> ours [embed, heads,
  head_dim]."""

  def load(self, x, target_shape):
    return x.transpose(1, 0, 2)

  def save(self, x):
    return x.transpose(1, 0, 2)

  def source_shape(self, target_shape):
    embed, heads, head_dim = target_shape
    return (heads, embed, head_dim)


class Part(Transform):
  """Part `index` of a tensor that stacks `count` (fused q/k/v, gate and
  up), in the layout of `inner`."""

  def __init__(self, index: int, count: int, inner: Transform = IDENTITY):
    self.index, self.count, self.inner = index, count, inner

  def load(self, x, target_shape):
    return self.inner.load(x[self.index], target_shape)

  def source_shape(self, target_shape):
    return (self.count, *self.inner.source_shape(target_shape))


class FirstRows(Transform):
  """A table of `rows` rows, of which the model uses the first."""

  def __init__(self, rows: int):
    self.rows = rows

  def load(self, x, target_shape):
    return x[:target_shape[0]]

  def source_shape(self, target_shape):
    return (self.rows, *target_shape[1:])


# ------------------------------------------------------------- checkpoint --


def _item_metadata(path: pathlib.Path):
  checkpointer = ocp.Checkpointer(ocp.StandardCheckpointHandler())
  try:
    return checkpointer.metadata(path).item_metadata
  except (OSError, ValueError) as e:
    raise errors.CorruptCheckpointError(
        f'{path}: cannot read orbax metadata: {e}') from e
  finally:
    checkpointer.close()


def _tree_paths(tree, prefix=()) -> dict[tuple[str, ...], Any]:
  """{key path: leaf} of a nested mapping."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_tree_paths(value, prefix + (key,)))
    else:
      out[prefix + (key,)] = value
  return out


def _name(keys: tuple[str, ...]) -> str:
  """Our name of a saved leaf: '/'-joined, the flat layout's `transformer/`
  and its MLP kernels' `w` dropped, so both layouts read alike."""
  parts = '/'.join(keys).split('/')
  if parts[0] == 'transformer':
    parts = parts[1:]
  if len(parts) > 2 and parts[-3] == 'mlp' and parts[-1] == 'w':
    parts = parts[:-1]
  return '/'.join(parts)


def looks_like(path: str | os.PathLike) -> bool:
  """Whether `path` is an Orbax checkpoint of the gemma library's tree
  (not one of ours, which say so in `t5x_adapt.json`)."""
  path = pathlib.Path(path)
  if (path / 't5x_adapt.json').exists() or not (path / '_METADATA').exists():
    return False
  try:
    tree = _item_metadata(path)
  except errors.CorruptCheckpointError:
    return False
  tree, _ = _params_tree(tree)
  keys = set(tree.keys())
  return ('embedder' in keys or any(k.startswith('transformer/') for k in keys)
          or ('encoder' in keys and 'decoder' in keys and
              'embedder' in tree['encoder']))


def _params_tree(tree) -> tuple[Any, tuple[str, ...]]:
  """The parameter tree of a saved tree (a kauldron training state keeps
  it under `params`) and its key path."""
  if set(tree.keys()) == _KAULDRON_STATE:
    return tree['params'], ('params',)
  return tree, ()


class Checkpoint:
  """A gemma library checkpoint: its tensors' shapes, and each read alone.

  Args:
    path: The Orbax checkpoint directory.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path).absolute()
    if not self.path.exists():
      raise FileNotFoundError(f'{self.path}: no such checkpoint')
    tree, self._root = _params_tree(_item_metadata(self.path))
    leaves = _tree_paths(tree)
    if any('stacked_layers' in '/'.join(keys) for keys in leaves):
      raise errors.UnsupportedArchitectureError(
          f'{self.path}: the gemma library\'s stacked layout; save it '
          'nested first (gm.ckpts.load_params, then save_params)')
    self._keys = {_name(keys): keys for keys in leaves}
    self.shapes = {name: tuple(leaves[keys].shape)
                   for name, keys in self._keys.items()}

  @functools.lru_cache(maxsize=1)  # q, k and v of a fused tensor in a row
  def read(self, name: str) -> np.ndarray:
    """One tensor, as stored (an Orbax partial restore)."""
    keys = self._root + self._keys[name]
    item = {}
    node = item
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = np.zeros((), np.float32)  # structure only
    args = ocp.args.PyTreeRestore(
        item=item, partial_restore=True,
        restore_args=jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item))
    reader = ocp.PyTreeCheckpointer()
    try:
      restored = reader.restore(self.path, args=args)
    finally:
      reader.close()
    for key in keys:
      restored = restored[key]
    return np.asarray(restored)


# ----------------------------------------------------------------- rules --


def _mlp_rules(shapes: Mapping[str, tuple], layer: str, ours: tuple,
               stack: StackConfig) -> list[Rule]:
  name = layer + 'mlp/gating_einsum'
  transposed = shapes.get(name) == (2, stack.mlp_dim, stack.embed_dim)
  if transposed and stack.mlp_dim == stack.embed_dim:
    raise errors.UnsupportedArchitectureError(
        f'{name}: a square gating kernel; cannot tell whether transposed')
  inner = Transpose() if transposed else IDENTITY
  return [Rule(name, ours + ('mlp', 'gate', 'kernel'), Part(0, 2, inner)),
          Rule(name, ours + ('mlp', 'up', 'kernel'), Part(1, 2, inner)),
          Rule(layer + 'mlp/linear', ours + ('mlp', 'down', 'kernel'),
               IDENTITY)]


def _attention_rules(shapes: Mapping[str, tuple], module: str, ours: tuple,
                     stack: StackConfig) -> list[Rule]:
  rules = []
  if module + 'qkv_einsum/w' in shapes:
    rules += [Rule(module + 'qkv_einsum/w', ours + (proj, 'kernel'),
                   Part(i, 3, HeadsFirst()))
              for i, proj in enumerate(('query', 'key', 'value'))]
  else:
    rules += [Rule(module + 'q_einsum/w', ours + ('query', 'kernel'),
                   HeadsFirst())]
    rules += [Rule(module + 'kv_einsum/w', ours + (proj, 'kernel'),
                   Part(i, 2, HeadsFirst()))
              for i, proj in enumerate(('key', 'value'))]
  rules.append(Rule(module + 'attn_vec_einsum/w', ours + ('out', 'kernel'),
                    IDENTITY))
  if stack.use_qk_norm:
    rules += [Rule(module + f'_{n}/scale', ours + (n, 'scale'), IDENTITY)
              for n in ('query_norm', 'key_norm')]
  return rules


def stack_rules(shapes: Mapping[str, tuple], prefix: str, target: str,
                stack: StackConfig, cross_attention: bool,
                embedder: tuple[str, ...]) -> list[Rule]:
  """Every tensor of one stack, named as saved under `prefix`, for our
  unrolled layout; `shapes` (the checkpoint's) say which layouts it
  uses."""
  table = prefix + 'embedder/input_embedding'
  rows = shapes.get(table, (stack.vocab_size,))[0]
  if rows < stack.vocab_size:
    raise errors.ShapeMismatchError(
        f'{table}: {rows} rows, fewer than the model\'s vocabulary '
        f'({stack.vocab_size})')
  rules = [Rule(table, embedder + ('embedding',), FirstRows(rows)),
           Rule(prefix + 'final_norm/scale', (target, 'final_norm', 'scale'),
                IDENTITY)]
  attentions = ['self_attention'] + (['cross_attention'] if cross_attention
                                     else [])
  for i in range(stack.num_layers):
    layer, ours = f'{prefix}layer_{i}/', (target, f'layer_{i}')
    for norm, name in _NORMS.items():
      if 'cross' not in norm or cross_attention:
        if 'post' not in norm or stack.post_norms:
          rules.append(Rule(layer + name + '/scale', ours + (norm, 'scale'),
                            IDENTITY))
    for attention in attentions:
      rules += _attention_rules(shapes, layer + _ATTENTION[attention] + '/',
                                ours + (attention,), stack)
    rules += _mlp_rules(shapes, layer, ours, stack)
  return rules


def rules(config, shapes: Mapping[str, tuple]) -> list[Rule]:
  """Every tensor of a model of `config` in a checkpoint of `shapes`."""
  if config.is_encoder_decoder:
    if config.encoder_attention != 'cross' or config.tie_embeddings:
      raise errors.UnsupportedArchitectureError(
          'the gemma library has T5Gemma (cross-attention, a table per '
          'stack), not this encoder-decoder')
    return [rule for name in ('encoder', 'decoder') for rule in stack_rules(
        shapes, f'{name}/', name, config.stacks()[name],
        name == 'decoder', config.embedder_path(name))]
  return stack_rules(shapes, '', 'decoder', config, False,
                     config.embedder_path('decoder'))


def _vision(name: str) -> bool:
  return any(name.startswith(p) or f'/{p}' in name for p in _VISION)


def lazy_tree(checkpoint: Checkpoint, model, text_only: bool = True):
  """`model`'s unrolled parameter tree of `lazy.LazyTensor`s, read from
  the checkpoint as placed (names and shapes checked now).

  Raises:
    MissingTensorError, UnexpectedTensorError: the checkpoint's tensors are
      not the model's (a vision tower is unexpected unless `text_only`).
    ShapeMismatchError: when a tensor of another shape is read.
  """
  config = model.config.map_stacks(scan_layers=False)
  shapes = model_for_config(config).param_shapes()
  return lazy_tensors(
      rules(config, checkpoint.shapes), checkpoint.read, checkpoint.shapes,
      shapes, str(checkpoint.path),
      ignorable=lambda name: text_only and _vision(name))


def fits(checkpoint: Checkpoint, model) -> bool:
  """Whether the checkpoint's tensors are exactly `model`'s, shapes
  included (a larger table than the model's vocabulary fits)."""
  config = model.config.map_stacks(scan_layers=False)
  try:
    expected = rules(config, checkpoint.shapes)
  except errors.CheckpointError:
    return False
  available = {n for n in checkpoint.shapes if not _vision(n)}
  if {r.source for r in expected} != available:
    return False
  targets = model_for_config(config).param_shapes()
  for rule in expected:
    target = functools.reduce(lambda t, k: t[k], rule.target, targets)
    wanted = rule.transform.source_shape(tuple(target.shape))
    if checkpoint.shapes[rule.source] != wanted:
      return False
    if isinstance(rule.transform, FirstRows) and wanted[0] < target.shape[0]:
      return False
  return True


def find_preset(checkpoint: Checkpoint,
                presets: Optional[Iterable[str]] = None) -> str:
  """The preset (`gin/models/<name>.gin`) whose tensors the checkpoint has.

  Raises:
    UnsupportedArchitectureError: none or several fit (named).
  """
  from t5x_adapt import gin_utils  # pylint: disable=g-import-not-at-top
  found = []
  for preset in presets or gin_utils.list_presets():
    model = gin_utils.load_model(preset)
    family = {s.family for s in model.config.stacks().values()}
    if family <= {'gemma2', 'gemma3'} and fits(checkpoint, model):
      found.append(preset)
  if len(found) != 1:
    raise errors.UnsupportedArchitectureError(
        f'{checkpoint.path}: a gemma library checkpoint carries no config, '
        f'and {"no preset" if not found else "several presets"} of '
        f'gin/models/ fit{" (" + ", ".join(found) + ")" if found else ""} '
        'its tensors; name the model (--preset)')
  return found[0]

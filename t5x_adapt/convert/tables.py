"""Table-driven tensor mapping between external checkpoints and our params.

A checkpoint format is a `NameScheme` (how it spells each tensor of a Gemma
block) plus per-tensor `Transform`s (how its layout differs from ours). From
those, `stack_rules` lists one `Rule` per tensor of a stack; loading and
saving walk the same rules in opposite directions, so HF import, HF export and
GGUF import share one table each and no per-tensor branches.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Optional

import numpy as np

from t5x_adapt.checkpoints import errors
from t5x_adapt.config import StackConfig
from t5x_adapt.convert import lazy


class Transform:
  """Layout change of one tensor: external <-> ours (unrolled layout).

  `load` gets the tensor in its stored dtype; the reader casts the result
  once, to the dtype of our parameter (`lazy_tensors`).
  """

  def load(self, x: np.ndarray, target_shape) -> np.ndarray:
    return x

  def save(self, x: np.ndarray) -> np.ndarray:
    return x

  def source_shape(self, target_shape) -> tuple[int, ...]:
    return tuple(target_shape)


class Transpose(Transform):
  """torch Linear [out, in] <-> our kernel [in, out]."""

  def load(self, x, target_shape):
    return x.T

  def save(self, x):
    return x.T

  def source_shape(self, target_shape):
    return tuple(reversed(target_shape))


class SplitHeads(Transform):
  """torch q/k/v Linear [heads * head_dim, embed] <-> ours
  [embed, heads, head_dim]."""

  def load(self, x, target_shape):
    return x.T.reshape(target_shape)

  def save(self, x):
    return x.reshape(x.shape[0], -1).T

  def source_shape(self, target_shape):
    embed, heads, head_dim = target_shape
    return (heads * head_dim, embed)


class MergeHeads(Transform):
  """torch o Linear [embed, heads * head_dim] <-> ours
  [heads, head_dim, embed]."""

  def load(self, x, target_shape):
    return x.T.reshape(target_shape)

  def save(self, x):
    return x.reshape(-1, x.shape[-1]).T

  def source_shape(self, target_shape):
    heads, head_dim, embed = target_shape
    return (embed, heads * head_dim)


class SplitHeadsBias(Transform):
  """torch q/k/v bias [heads * head_dim] <-> ours [heads, head_dim]."""

  def load(self, x, target_shape):
    return x.reshape(target_shape)

  def save(self, x):
    return x.reshape(-1)

  def source_shape(self, target_shape):
    return (int(np.prod(target_shape)),)


class UnitOffset(Transform):
  """Norm weights stored as `1 + scale` (GGUF) <-> ours as `scale`."""

  def load(self, x, target_shape):
    # In float32 whatever the stored and target dtypes, so that a bfloat16
    # load is the float32 one cast (a bfloat16 subtraction rounds twice).
    return x.astype(np.float32, copy=False) - np.float32(1.0)

  def save(self, x):
    return x + 1.0


IDENTITY = Transform()


@dataclasses.dataclass(frozen=True)
class NameScheme:
  """How one checkpoint format spells the tensors of a stack.

  `{i}` in `layer` is the layer index. Our sublayer names (keys) map to the
  format's names (values); every name is followed by `suffix`, except
  `eoi_embedding` (the end-of-image vector of a stack with an
  `eoi_token_id`, named in full; None: the format has none).
  """

  embedding: str
  final_norm: str
  layer: str
  norms: Mapping[str, str]
  attention: Mapping[str, str]
  projections: Mapping[str, str]
  mlp: Mapping[str, str]
  suffix: str = '.weight'
  bias_suffix: str = '.bias'
  norm_transform: Transform = IDENTITY
  eoi_embedding: Optional[str] = None


_PROJECTION_TRANSFORMS = {
    'query': SplitHeads(), 'key': SplitHeads(), 'value': SplitHeads(),
    'out': MergeHeads(),
}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One tensor: its external name, our path and the layout transform.

  `aliases`: other names the checkpoint format gives the same tensor (one
  table that two stacks read, where the format stores a copy per stack):
  written with it on export, left unread on import.
  """

  source: str
  target: tuple[str, ...]
  transform: Transform
  aliases: tuple[str, ...] = ()


def stack_rules(scheme: NameScheme, source_prefix: str, target: str,
                cfg: StackConfig, cross_attention: bool,
                embedder: Optional[tuple[str, ...]] = None) -> list[Rule]:
  """Every tensor of one stack (unrolled layout).

  `embedder`: our path of the stack's token embedding (`embedder_path` of
  the model's config: the model's one table when the stacks share it);
  None: the stack's own, `(target, 'token_embedder')`.
  """
  s = scheme.suffix
  embedder = embedder or (target, 'token_embedder')
  rules = [
      Rule(source_prefix + scheme.embedding + s, embedder + ('embedding',),
           IDENTITY),
      Rule(source_prefix + scheme.final_norm + s,
           (target, 'final_norm', 'scale'), scheme.norm_transform),
  ]
  if cfg.eoi_token_id is not None:
    rules.append(_eoi_rule(scheme, source_prefix, target, embedder))
  attentions = ['self_attention'] + (['cross_attention'] if cross_attention
                                     else [])
  projections = ['query', 'key', 'value', 'out']
  if cfg.use_qk_norm:
    projections += ['query_norm', 'key_norm']
  for i in range(cfg.num_layers):
    layer = source_prefix + scheme.layer.format(i=i)
    ours = (target, f'layer_{i}')
    for norm, name in scheme.norms.items():
      if 'cross' in norm and not cross_attention:
        continue
      rules.append(Rule(layer + name + s, ours + (norm, 'scale'),
                        scheme.norm_transform))
    for attention in attentions:
      for proj in projections:
        is_norm = proj.endswith('norm')
        name = layer + scheme.attention[attention] + scheme.projections[proj]
        rules.append(Rule(
            name + s,
            ours + (attention, proj, 'scale' if is_norm else 'kernel'),
            scheme.norm_transform if is_norm else
            _PROJECTION_TRANSFORMS[proj]))
        if cfg.qkv_bias and proj in ('query', 'key', 'value'):
          rules.append(Rule(name + scheme.bias_suffix,
                            ours + (attention, proj, 'bias'),
                            SplitHeadsBias()))
    for part, name in scheme.mlp.items():
      rules.append(Rule(layer + name + s, ours + ('mlp', part, 'kernel'),
                        Transpose()))
  return rules


def _eoi_rule(scheme: NameScheme, source_prefix: str, target: str,
              embedder: tuple[str, ...]) -> Rule:
  if scheme.eoi_embedding is None:
    raise errors.UnsupportedArchitectureError(
        f'stack {target!r} has an end-of-image token (eoi_token_id), '
        'which this checkpoint format has no tensor for')
  return Rule(source_prefix + scheme.eoi_embedding,
              embedder + ('eoi_embedding',), IDENTITY)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def lazy_tensors(rules: Iterable[Rule],
                 read: Callable[[str], np.ndarray],
                 available: Iterable[str],
                 target_shapes,
                 source: str,
                 ignorable: Callable[[str], bool] = lambda name: False) -> dict:
  """Our tree (unrolled) of `LazyTensor`s, one per rule; names checked now.

  Nothing is read here: each leaf reads its tensor when placed
  (`lazy.place`), checks its shape then, and casts it once, from the dtype
  it is stored in to the dtype asked of the leaf (its target's, unless
  changed with `lazy.astype`).

  Args:
    rules: The tensors to read.
    read: name -> array (numpy-convertible) in the dtype it is stored in.
    available: Names present in the checkpoint.
    target_shapes: Our parameter tree (unrolled) of ShapeDtypeStructs.
    source: File or directory name, for error messages.
    ignorable: Names that may be present without a rule (buffers, tied heads).

  Raises:
    MissingTensorError, UnexpectedTensorError; ShapeMismatchError when a
    leaf is read.
  """
  rules = list(rules)
  available = set(available)
  wanted = {r.source for r in rules}
  if wanted - available:
    raise errors.missing(source, wanted - available)
  copies = {alias for r in rules for alias in r.aliases}
  extra = {n for n in available - wanted - copies if not ignorable(n)}
  if extra:
    raise errors.unexpected(source, extra)

  def loader(rule, target_shape):
    def load(dtype):
      array = np.asarray(read(rule.source))
      expected = rule.transform.source_shape(target_shape)
      if tuple(array.shape) != expected:
        raise errors.ShapeMismatchError(
            f'{source}: tensor {rule.source!r} has shape '
            f'{tuple(array.shape)}, the config implies {expected}')
      return rule.transform.load(array, target_shape).astype(dtype,
                                                             copy=False)
    return load

  params = {}
  for rule in rules:
    target = _get(target_shapes, rule.target)
    shape = tuple(target.shape)
    _set(params, rule.target, lazy.LazyTensor(
        shape, np.dtype(target.dtype), loader(rule, shape)))
  return params


def export_tensors(rules: Iterable[Rule], params) -> dict[str, np.ndarray]:
  """Our params (unrolled) -> {external name: array}, each alias of a rule
  (a copy the format stores) included."""
  tensors = {}
  for r in rules:
    array = np.ascontiguousarray(
        r.transform.save(np.asarray(_get(params, r.target), np.float32)))
    tensors.update({name: array for name in (r.source, *r.aliases)})
  return tensors

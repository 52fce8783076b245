"""Where a checkpoint keeps its token embedding tables, and where the model.

A model with tied tables (`EncoderDecoderConfig.tie_embeddings`) has one,
`params['token_embedder']` (its `embedding` and, with an end-of-image token,
`eoi_embedding`); other models have one per stack,
`params[stack]['token_embedder']`. A checkpoint may keep them otherwise:

* a tied model's checkpoint written before the model had one array holds a
  copy per stack (`encoder/token_embedder`, `decoder/token_embedder`; equal
  by construction, the gradients were summed), in its parameters and in
  each optimizer moment;
* a transformers T5Gemma checkpoint has a table per stack, also when the
  model reading it ties them;
* a tied checkpoint read by a model with a table per stack (the encoder
  classifier, `subtrees=('encoder',)`; an untied model).

The readers (`params.restore_params`, `training.CheckpointManager.restore`,
`convert.load`) ask `plan` how the two differ, read the checkpoint as it is
arranged (`to_checkpoint` of their restore target) and move the tables to
the model's places (`to_model`):

  the model's one table <- the checkpoint's decoder copy (the LM head); the
                           other copies are dropped, said in a warning
                           (`report`) that also says whether they differed
  a stack's own table   <- the checkpoint's one table
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Mapping, Optional

from absl import logging
import jax
import jax.numpy as jnp

from t5x_adapt.param_paths import path_str

Location = tuple[str, ...]
TABLE = 'token_embedder'
TIED: Location = (TABLE,)
STACKS = ('encoder', 'decoder')
# A checkpoint's copies of a tied table, the one it is read from first:
# the decoder's, which is the LM head.
_PREFERRED: tuple[Location, ...] = (('decoder', TABLE), ('encoder', TABLE))


def _name(location: Location) -> str:
  return '/'.join(location)


def locations(paths: Iterable[str]) -> set[Location]:
  """The table locations among flat parameter paths ('decoder/...')."""
  found = set()
  for path in paths:
    parts = tuple(path.split('/'))
    for location in (TIED, *_PREFERRED):
      if parts[:len(location)] == location and len(parts) > len(location):
        found.add(location)
  return found


@dataclasses.dataclass(frozen=True)
class Relocation:
  """How a checkpoint's tables map onto a model's.

  Attributes:
    sources: {model location: checkpoint location read into it}, for the
      model's tables that the checkpoint keeps elsewhere.
    spares: Checkpoint copies of a table that no model table reads (the
      encoder's copy of a tied table): read to be compared with the one
      that is (`report`), then dropped.
  """

  sources: Mapping[Location, Location] = dataclasses.field(
      default_factory=dict)
  spares: tuple[Location, ...] = ()

  def __bool__(self) -> bool:
    return bool(self.sources)

  @property
  def ties(self) -> bool:
    """Whether copies of the checkpoint become the model's one table."""
    return TIED in self.sources

  def reads(self, path: str) -> bool:
    """Whether a checkpoint path lies under a location read for another."""
    parts = tuple(path.split('/'))
    return any(parts[:len(loc)] == loc
               for loc in (*self.sources.values(), *self.spares))


def plan(saved_paths: Iterable[str], model_paths: Iterable[str]
         ) -> Relocation:
  """How to read the tables of a checkpoint (flat `saved_paths`) into a
  model's tree (flat `model_paths`, as much of it as is read); empty when
  they agree, or when the checkpoint has none to offer (the mismatch is
  then the reader's error)."""
  saved, wanted = locations(saved_paths), locations(model_paths)
  sources = {}
  for location in sorted(wanted - saved):
    candidates = _PREFERRED if location == TIED else (TIED,)
    found = [c for c in candidates if c in saved]
    if found:
      sources[location] = found[0]
  spares = ()
  if TIED in sources:
    spares = tuple(loc for loc in _PREFERRED if loc in saved and
                   loc not in wanted and loc != sources[TIED])
  return Relocation(sources, spares)


def paths(tree) -> list[str]:
  """The flat paths ('decoder/final_norm/scale') of a tree's leaves."""
  return [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _get(tree, location: Location):
  for key in location:
    tree = tree[key]
  return tree


def _without(tree: Mapping, location: Location) -> dict:
  """`tree` (copied where it changes) without the subtree at `location`."""
  head, *rest = location
  out = dict(tree)
  if rest:
    out[head] = _without(tree[head], tuple(rest))
  else:
    out.pop(head, None)
  return out


def _with(tree: Mapping, location: Location, value) -> dict:
  """`tree` (copied where it changes) with `value` at `location`."""
  head, *rest = location
  out = dict(tree)
  out[head] = _with(tree.get(head, {}), tuple(rest), value) if rest else value
  return out


def to_checkpoint(tree: Mapping, relocation: Relocation) -> dict:
  """A tree in the model's arrangement (restore targets: shapes, shardings)
  -> the checkpoint's: each table moved to its checkpoint location, and
  the spares given the same leaves."""
  out = dict(tree)
  for location, source in relocation.sources.items():
    value = _get(tree, location)
    out = _with(_without(out, location), source, value)
    if location == TIED:
      for spare in relocation.spares:
        out = _with(out, spare, value)
  return out


def _copy(leaf):
  """A new buffer of an array (a table read into two places must not be
  one buffer: a step that donates its state would donate it twice); lazy
  leaves are read once per place anyway."""
  return leaf.copy() if hasattr(leaf, 'copy') else leaf


def to_model(tree: Mapping, relocation: Relocation
             ) -> tuple[dict, dict[Location, Any]]:
  """A tree as the checkpoint arranges it -> the model's arrangement.

  Returns:
    (the tree, {spare location: its subtree, dropped from the tree}).
  """
  spares = {loc: _get(tree, loc) for loc in relocation.spares}
  out = dict(tree)
  for spare in relocation.spares:
    out = _without(out, spare)
  used = set()
  for location, source in relocation.sources.items():
    value = _get(tree, source)
    if source in used:
      value = jax.tree_util.tree_map(_copy, value)
    used.add(source)
    out = _with(out, location, value)
  for source in used - set(relocation.sources):
    out = _without(out, source)
  return _pruned(out), spares


def _pruned(tree: dict) -> dict:
  """Without the stacks a move left empty."""
  return {k: v for k, v in tree.items()
          if not (k in STACKS and isinstance(v, Mapping) and not v)}


def _params_like(params: Mapping) -> Callable[[Any], bool]:
  """Whether a node is a tree shaped like `params` (by its top-level keys:
  the parameters, an optimizer moment)."""
  keys = set(params)
  return lambda node: isinstance(node, Mapping) and set(node) == keys


def state_to_checkpoint(state, params: Mapping, relocation: Relocation):
  """A training state in the model's arrangement (a restore target) -> the
  checkpoint's: `to_checkpoint` of the parameters (`params`, the model's)
  and of every tree in the state shaped like them (Adam's moments)."""
  like = _params_like(params)
  return jax.tree_util.tree_map(
      lambda node: to_checkpoint(node, relocation) if like(node) else node,
      state, is_leaf=like)


def state_to_model(template, restored, params: Mapping,
                   relocation: Relocation):
  """`restored`, read into `state_to_checkpoint(template, params, ...)`,
  in the model's arrangement of `template` again (spare copies dropped)."""
  like = _params_like(params)
  return jax.tree_util.tree_map(
      lambda node, read: to_model(read, relocation)[0] if like(node)
      else read, template, restored, is_leaf=like)


def equal(a, b) -> bool:
  """Whether two table subtrees are bitwise equal (on their devices)."""
  leaves_a, leaves_b = (jax.tree_util.tree_leaves(t) for t in (a, b))
  return len(leaves_a) == len(leaves_b) and all(
      x.shape == y.shape and bool(jnp.array_equal(x, y))
      for x, y in zip(leaves_a, leaves_b))


def report(where: str, relocation: Relocation, tree=None,
           spares: Optional[Mapping[Location, Any]] = None,
           log: Callable[..., None] = logging.warning) -> Optional[str]:
  """Warns that a checkpoint's copies became the model's one table.

  Args:
    where: The checkpoint, for the message.
    relocation: The plan; nothing is said unless it `ties` copies.
    tree: The tree read, in the model's arrangement (`to_model`), whose
      table `spares` are compared with.
    spares: The dropped copies as read (`to_model`); None: left unread.
    log: Where the message goes.

  Returns:
    The message, or None.
  """
  if not relocation.ties:
    return None
  source = relocation.sources[TIED]
  copies = ', '.join(_name(loc) for loc in (source, *relocation.spares))
  message = (f'{where}: converted: the checkpoint has an embedding table '
             f'per stack ({copies}), the model has one tied table, {TABLE}, '
             f'now read from {_name(source)} (the LM head)')
  dropped = ', '.join(_name(loc) for loc in relocation.spares)
  if spares is None:
    if dropped:
      message += f'; {dropped} left unread'
  else:
    differing = [_name(loc) for loc, copy in spares.items()
                 if not equal(_get(tree, TIED), copy)]
    if differing:
      message += (f'; the copies DIFFER, {", ".join(differing)} (not equal '
                  f'to {_name(source)}) dropped')
    elif dropped:
      message += f'; {dropped} was bitwise equal to it, dropped'
  log('%s', message)
  return message

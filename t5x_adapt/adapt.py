"""Adaptation: a decoder-only checkpoint becomes an encoder-decoder (T5Gemma,
T5Gemma 2).

The encoder-decoder's parameters are assembled from decoder-only ones:

  encoder/...                        <- encoder source  decoder/...
  decoder/... (self-attention, MLP,  <- decoder source  decoder/...
               norms, embedding)
  decoder/.../cross_attention/...    <- decoder source  .../self_attention/...
                                        (balanced, 'self_attention' mode), or
                                        a fresh random init ('random' mode)
  decoder/.../{pre,post}_cross_attention_norm  <- fresh init (the identity:
                                        scale 0 for Gemma's norms, 1 for
                                        Llama-style ones, as the reference
                                        implementations do)
  token_embedder/...                 <- decoder source  decoder/token_embedder
                                        (tied tables: one array, the
                                        decoder's, which is the LM head)
  */token_embedder/eoi_embedding     <- fresh init (zeros, as transformers'
                                        T5Gemma 2)

T5Gemma 2 (`encoder_attention = 'merged'`) has no cross-attention: its
decoder's self-attention reads the encoder output with the same projections,
so every tensor but the end-of-image embedding comes from the source.

With `EncoderDecoderConfig.tie_embeddings` the model has one table, the
decoder source's, read by both stacks (`params['token_embedder']`).

Balanced models (2B-2B) take both stacks from one checkpoint; unbalanced ones
(9B-2B) take the encoder from the large checkpoint and the decoder from the
small one, and their cross-attention is random (its key/value projections
read the encoder width). The decoder-only sources may be our checkpoints
(`checkpoints.save_params` or a training step directory), transformers
directories or GGUF files, read by the one loader (`convert.load`) straight
onto the shardings of the leaves they become. `assembly_plan` says where
each leaf comes from (checked on shapes, before anything is read),
`assemble` builds the tree from it, and the leaves that start fresh are
initialised alone, under jit, on their shardings.

In training (`train.py`), `train.adaptation = @Adaptation()` initialises a run
that has no checkpoint of its own yet; the unbalanced warm-up (only
cross-attention trains for the first K steps) is the optimizer's
`warmup_trainable_steps`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.traverse_util
import gin
import jax

from t5x_adapt import checkpoints
from t5x_adapt.config import EncoderDecoderConfig, StackConfig
from t5x_adapt.config import config_to_dict
from t5x_adapt.convert import load
from t5x_adapt.models import DecoderOnlyModel, EncoderDecoderModel
from t5x_adapt.models import model_for_config

Params = Any

SELF_ATTENTION = 'self_attention'
RANDOM = 'random'
AUTO = 'auto'
CROSS_ATTENTION_INITS = (AUTO, SELF_ATTENTION, RANDOM)

Key = tuple[str, ...]
Origin = Optional[tuple[str, Key]]  # (source name, key in it) or None: fresh


def _flat(tree) -> dict[Key, Any]:
  return flax.traverse_util.flatten_dict(tree)


def resolve_cross_attention_init(config: EncoderDecoderConfig,
                                 mode: str) -> str:
  """'auto' -> 'self_attention' for balanced models, else 'random'."""
  if mode not in CROSS_ATTENTION_INITS:
    raise ValueError(f'cross_attention_init {mode!r}: choose one of '
                     f'{CROSS_ATTENTION_INITS}')
  if mode == AUTO:
    return SELF_ATTENTION if config.is_balanced else RANDOM
  if mode == SELF_ATTENTION and not config.is_balanced:
    raise ValueError(
        'cross_attention_init=self_attention needs a balanced model; the '
        f'encoder width {config.encoder.embed_dim} differs from the decoder '
        f'width {config.decoder.embed_dim} (use random)')
  return mode


def _source_key(key: Key, copy_cross_attention: bool) -> Origin:
  """Where an encoder-decoder parameter comes from: (source, source key).

  Returns None for parameters that keep their fresh initialisation.
  """
  stack, *rest = key
  if rest[-1] == 'eoi_embedding':
    return None
  if stack == 'token_embedder':  # Tied: the decoder's table (the LM head).
    return 'decoder', ('decoder', stack, *rest)
  if stack == 'encoder':
    return 'encoder', ('decoder', *rest)
  if any(part.endswith('cross_attention_norm') for part in rest):
    return None
  if 'cross_attention' in rest:
    if not copy_cross_attention:
      return None
    rest = [SELF_ATTENTION if p == 'cross_attention' else p for p in rest]
  return 'decoder', ('decoder', *rest)


def _unread_by(key: Key, parts: tuple[str, ...]) -> bool:
  """Whether a source key lies under any of `parts`."""
  return any(part in key for part in parts)


def assembly_plan(target: Mapping[Key, Any],
                  sources: Mapping[str, Mapping[Key, Any]],
                  copy_cross_attention: bool) -> dict[Key, Origin]:
  """Where each encoder-decoder leaf comes from, checked by path and shape.

  Args:
    target: The encoder-decoder's flat leaves (arrays or ShapeDtypeStructs).
    sources: {'encoder': flat leaves, 'decoder': flat leaves} of the
      decoder-only sources (arrays or shapes).
    copy_cross_attention: Cross-attention from self-attention (balanced).

  Returns:
    {target key: (source name, source key), or None for a fresh leaf}.

  Raises:
    ValueError: a source tensor is missing, has the wrong shape, or a source
      tensor was left unused; the parameter path and shapes are named.
  """
  used = {name: set() for name in sources}
  plan = {}
  for key, value in target.items():
    origin = plan[key] = _source_key(key, copy_cross_attention)
    if origin is None:
      continue
    name, source_key = origin
    path = '/'.join(key)
    if source_key not in sources[name]:
      raise ValueError(f'{path}: the {name} source has no '
                       f'{"/".join(source_key)}')
    tensor = sources[name][source_key]
    if tuple(tensor.shape) != tuple(value.shape):
      raise ValueError(f'{path}: source {"/".join(source_key)} has shape '
                       f'{tuple(tensor.shape)}, the model needs '
                       f'{tuple(value.shape)}')
    used[name].add(source_key)
  # An encoder has no LM head: an untied one of its source goes unused, and
  # so does its table where the model has one tied table (the decoder's).
  unread = ('lm_head', 'token_embedder') if (
      'token_embedder', 'embedding') in target else ('lm_head',)
  for name, flat in sources.items():
    unused = sorted('/'.join(k) for k in set(flat) - used[name]
                    if not (name == 'encoder' and _unread_by(k, unread)))
    if unused:
      raise ValueError(f'the {name} source has tensors the encoder-decoder '
                       f'does not use: {unused[:5]}')
  return plan


def _fresh_leaves(model: EncoderDecoderModel, keys, seed: int,
                  shardings: Optional[Mapping[Key, Any]]) -> dict[Key, Any]:
  """The leaves `keys` of a fresh init, computed alone, on their shardings.

  Under jit, the initialisers of every other leaf are dead code: nothing
  but these leaves is ever allocated.
  """
  keys = list(keys)

  def init():
    fresh = _flat(model.get_initial_variables(jax.random.PRNGKey(seed),
                                              {})['params'])
    return {'/'.join(k): fresh[k] for k in keys}

  out_shardings = None if shardings is None else {
      '/'.join(k): shardings[k] for k in keys}
  leaves = jax.jit(init, out_shardings=out_shardings)()
  return {k: leaves['/'.join(k)] for k in keys}


def assemble(plan: Mapping[Key, Origin],
             sources: Mapping[str, Mapping[Key, Any]],
             fresh: Mapping[Key, Any],
             shardings: Optional[Mapping[Key, Any]] = None) -> Params:
  """The encoder-decoder tree the plan describes (no tensor is copied:
  a source leaf that serves two targets is one array, resharded where the
  second target's sharding differs)."""
  out = {}
  for key, origin in plan.items():
    value = fresh[key] if origin is None else sources[origin[0]][origin[1]]
    if shardings is not None and getattr(value, 'sharding',
                                         None) != shardings[key]:
      value = jax.device_put(value, shardings[key])
    out[key] = value
  return flax.traverse_util.unflatten_dict(out)


def adapt_params(model: EncoderDecoderModel, encoder_source: Params,
                 decoder_source: Optional[Params] = None, *,
                 cross_attention_init: str = AUTO, seed: int = 0,
                 shardings: Optional[Params] = None) -> Params:
  """Encoder-decoder parameters for `model` from decoder-only parameters.

  Args:
    model: The target encoder-decoder.
    encoder_source: `{'decoder': stack}` parameters for the encoder, in the
      layout of `model.config.encoder`.
    decoder_source: The same for the decoder (default: `encoder_source`).
    cross_attention_init: 'self_attention', 'random' or 'auto' (the former
      for balanced models, the latter otherwise).
    seed: Seed of the freshly initialised parameters.
    shardings: Optional tree of the model's parameter shardings; fresh
      leaves are made on them, source leaves placed there if they are not.

  Returns:
    The parameter tree, in the model's layout.
  """
  mode = resolve_cross_attention_init(model.config, cross_attention_init)
  sources = {'encoder': _flat(encoder_source),
             'decoder': _flat(decoder_source or encoder_source)}
  plan = assembly_plan(_flat(model.param_shapes()), sources,
                       copy_cross_attention=mode == SELF_ATTENTION)
  flat_shardings = None if shardings is None else _flat(shardings)
  fresh = _fresh_leaves(model, [k for k, o in plan.items() if o is None],
                        seed, flat_shardings)
  return assemble(plan, sources, fresh, flat_shardings)


def _source_shardings(plan: Mapping[Key, Origin], served: Sequence[str],
                      source_keys: Sequence[Key],
                      shardings: Optional[Params]) -> Optional[Params]:
  """Shardings of a source's leaves (`source_keys`): those of the first
  target each feeds as any of the `served` sources (one read may serve
  both stacks), replicated for a leaf that feeds none (an encoder source's
  untied LM head, or its table where the model ties them)."""
  if shardings is None:
    return None
  flat = _flat(shardings)
  fed = {}
  for name in served:  # The first served source's targets first.
    for key, origin in plan.items():
      if origin is not None and origin[0] == name:
        fed.setdefault(origin[1], flat[key])
  mesh = next(iter(flat.values())).mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return flax.traverse_util.unflatten_dict(
      {key: fed.get(key, replicated) for key in source_keys})


def _same_tree(a: StackConfig, b: StackConfig) -> bool:
  """Whether two stacks' parameters are the same tree: architecture, layout
  and dtype."""
  return (load.same_architecture(a, b) and a.scan_layers == b.scan_layers
          and a.weight_dtype == b.weight_dtype)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Adaptation:
  """Initialises an encoder-decoder run from decoder-only checkpoints.

  Attributes:
    checkpoint: The decoder-only checkpoint of the encoder (and of the
      decoder, unless `decoder_checkpoint` is given): a `.gguf` file, a
      transformers directory, or one of our checkpoints.
    decoder_checkpoint: The decoder's checkpoint for unbalanced models.
    cross_attention_init: 'auto', 'self_attention' or 'random'.
    seed: Seed of the randomly initialised parameters.
  """

  checkpoint: str
  decoder_checkpoint: Optional[str] = None
  cross_attention_init: str = AUTO
  seed: int = 0

  def init_params(self, model: EncoderDecoderModel,
                  shardings: Optional[Params] = None,
                  loaded: Optional[Mapping[str, Any]] = None) -> Params:
    """The adapted parameters of `model`, each leaf read onto its sharding.

    Sources are read through `convert.load` straight onto the shardings of
    the encoder-decoder leaves they become (the same checkpoint once, when
    both stacks come from it); fresh leaves are initialised on theirs.

    Args:
      model: The encoder-decoder.
      shardings: Optional tree of its parameter shardings.
      loaded: {path: (stack, `{'decoder': stack}` parameters)} already read
        (the distillation teacher, usually the encoder's checkpoint): a
        source of the same path and architecture is taken from there
        instead of being read again.
    """
    config = model.config
    stacks = {'encoder': config.encoder.as_decoder_only(),
              'decoder': config.decoder.as_decoder_only()}
    paths = {'encoder': self.checkpoint,
             'decoder': self.decoder_checkpoint or self.checkpoint}
    mode = resolve_cross_attention_init(config, self.cross_attention_init)
    source_shapes = {name: _flat(DecoderOnlyModel(stack).param_shapes())
                     for name, stack in stacks.items()}
    plan = assembly_plan(_flat(model.param_shapes()), source_shapes,
                         copy_cross_attention=mode == SELF_ATTENTION)
    one_read = paths['decoder'] == paths['encoder'] and _same_tree(
        stacks['encoder'], stacks['decoder'])
    sources = {}
    for name in ('encoder', 'decoder'):
      if name == 'decoder' and one_read:
        sources['decoder'] = sources['encoder']
        continue
      served = ('encoder', 'decoder') if one_read else (name,)
      source_shardings = _source_shardings(plan, served, source_shapes[name],
                                           shardings)
      stack, params = (loaded or {}).get(paths[name], (None, None))
      if stack is not None and _same_tree(stack, stacks[name]):
        sources[name] = params if shardings is None else jax.device_put(
            params, source_shardings)
        continue
      sources[name] = load.load_decoder_only(paths[name], stacks[name],
                                             source_shardings)
    return adapt_params(model, sources['encoder'], sources['decoder'],
                        cross_attention_init=mode, seed=self.seed,
                        shardings=shardings)


# -------------------------------------------------------------------- CLI --


def main(argv=None) -> int:
  """`python -m t5x_adapt.adapt PRESET SOURCE OUT`: adapted params to Orbax.

  The checkpoint carries the model config (so `python -m t5x_adapt.convert
  orbax-to-hf` exports it) and starts training through
  `--gin.INIT_CHECKPOINT`.
  """
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from t5x_adapt import gin_utils  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog='python -m t5x_adapt.adapt',
      description='Build encoder-decoder parameters from decoder-only ones.')
  parser.add_argument('preset', help='encoder-decoder preset, e.g. '
                      't5gemma_270m_270m, or a gin file binding MODEL')
  parser.add_argument('source', help='decoder-only checkpoint (GGUF, '
                      'transformers directory or ours)')
  parser.add_argument('out', help='Orbax checkpoint directory to write')
  parser.add_argument('--decoder_source', help='decoder checkpoint '
                      '(unbalanced models)')
  parser.add_argument('--cross_attention_init', default=AUTO,
                      choices=CROSS_ATTENTION_INITS)
  parser.add_argument('--tie_embeddings', action='store_true')
  parser.add_argument('--vocab_size', type=int,
                      help="the sources' vocabulary, when not the preset's")
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  overrides = {'vocab_size': args.vocab_size} if args.vocab_size else {}
  model = gin_utils.load_model(args.preset, **overrides)
  if not model.is_encoder_decoder:
    print(f'error: {args.preset} is not an encoder-decoder preset',
          file=sys.stderr)
    return 1
  if args.tie_embeddings:
    model = model_for_config(model.config.replace(tie_embeddings=True))
  adaptation = Adaptation(args.source, args.decoder_source,
                          args.cross_attention_init, args.seed)
  try:
    params = adaptation.init_params(model)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  path = checkpoints.save_params(
      args.out, params, metadata={'config': config_to_dict(model.config),
                                  'adapted_from': dataclasses.asdict(
                                      adaptation)})
  print(f'wrote {path}')
  return 0


if __name__ == '__main__':
  import sys  # pylint: disable=g-import-not-at-top
  sys.exit(main())

"""Adaptation: a decoder-only checkpoint becomes an encoder-decoder (T5Gemma).

The encoder-decoder's parameters are assembled from decoder-only ones:

  encoder/...                        <- encoder source  decoder/...
  decoder/... (self-attention, MLP,  <- decoder source  decoder/...
               norms, embedding)
  decoder/.../cross_attention/...    <- decoder source  .../self_attention/...
                                        (balanced, 'self_attention' mode), or
                                        a fresh random init ('random' mode)
  decoder/.../{pre,post}_cross_attention_norm  <- fresh init (scale 0, i.e.
                                        the identity, as the reference
                                        implementations do)

With `EncoderDecoderConfig.tie_embeddings` the encoder's table is the
decoder's (they then train as one; see `EncoderDecoderModel.tie_gradients`).

Balanced models (2B-2B) take both stacks from one checkpoint; unbalanced ones
(9B-2B) take the encoder from the large checkpoint and the decoder from the
small one, and their cross-attention is random (its key/value projections
read the encoder width). The decoder-only sources may be our checkpoints
(`checkpoints.save_params` or a training step directory), transformers
directories or GGUF files (`load_decoder_only`).

In training (`train.py`), `train.adaptation = @Adaptation()` initialises a run
that has no checkpoint of its own yet; the unbalanced warm-up (only
cross-attention trains for the first K steps) is the optimizer's
`warmup_trainable_steps`.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Optional

import flax.traverse_util
import gin
import jax
import numpy as np

from t5x_adapt import checkpoints
from t5x_adapt.config import EncoderDecoderConfig, StackConfig
from t5x_adapt.config import config_to_dict
from t5x_adapt.models import DecoderOnlyModel, EncoderDecoderModel

Params = Any

SELF_ATTENTION = 'self_attention'
RANDOM = 'random'
AUTO = 'auto'
CROSS_ATTENTION_INITS = (AUTO, SELF_ATTENTION, RANDOM)

# StackConfig fields that describe how a model runs, not what it computes:
# a source may differ from the target in these.
_RUN_FIELDS = ('dtype', 'param_dtype', 'scan_layers', 'remat_policy',
               'dropout_rate')


# ---------------------------------------------------------------- sources --


def _architecture(cfg: StackConfig) -> dict:
  fields = config_to_dict(cfg)
  for name in _RUN_FIELDS:
    fields.pop(name)
  return fields


def _same(a, b) -> bool:
  # Checkpoints store floats such as rms_norm_eps in float32.
  if isinstance(a, float) and isinstance(b, float):
    return math.isclose(a, b, rel_tol=1e-6)
  return a == b


def check_architecture(source: StackConfig, target: StackConfig,
                       where: str) -> None:
  """Raises ValueError naming every field in which `source` != `target`."""
  source_fields, target_fields = _architecture(source), _architecture(target)
  differing = [f'{name}: checkpoint {source_fields[name]!r}, model '
               f'{target_fields[name]!r}' for name in source_fields
               if not _same(source_fields[name], target_fields[name])]
  if differing:
    raise ValueError(f'{where}: the checkpoint does not fit the model '
                     f'stack ({"; ".join(differing)})')


def load_decoder_only(path: str | pathlib.Path, stack: StackConfig,
                      shardings: Optional[Any] = None) -> Params:
  """Decoder-only parameters `{'decoder': stack}` for a stack config.

  Args:
    path: A `.gguf` file, a transformers directory (config.json +
      safetensors), or one of our checkpoints (save_params directory or
      `MODEL_DIR/checkpoints/<step>`).
    stack: The architecture the checkpoint must have; its `scan_layers`
      decides the returned layout.
    shardings: Optional shardings of the returned tree (our checkpoints are
      then restored straight onto them).

  Returns:
    The parameters, in `stack`'s layout.

  Raises:
    ValueError: the checkpoint's architecture differs from `stack` (every
      differing field is named), or it is not a decoder-only model.
    FileNotFoundError, CheckpointError: unreadable checkpoints.
  """
  from t5x_adapt import convert  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  model = DecoderOnlyModel(stack)
  if path.suffix == '.gguf':
    loaded, params = convert.load_gguf(path, scan_layers=stack.scan_layers)
  elif (path / 'config.json').exists():
    loaded, params = convert.load_hf(path, scan_layers=stack.scan_layers)
  else:
    return checkpoints.restore_params(path, model, shardings=shardings)
  if not isinstance(loaded, DecoderOnlyModel):
    raise ValueError(f'{path}: adaptation needs a decoder-only checkpoint, '
                     f'found a {type(loaded).__name__}')
  check_architecture(loaded.config, stack, str(path))
  params = jax.tree_util.tree_map(
      lambda x: np.asarray(x, stack.weight_dtype), params)
  return params if shardings is None else jax.device_put(params, shardings)


# ------------------------------------------------------------- assembling --


def _flat(tree) -> dict[tuple[str, ...], Any]:
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


def _source_key(key: tuple[str, ...], copy_cross_attention: bool):
  """Where an encoder-decoder parameter comes from: (source, source key).

  Returns None for parameters that keep their fresh initialisation.
  """
  stack, *rest = key
  if stack == 'encoder':
    return 'encoder', ('decoder', *rest)
  if any(part.endswith('cross_attention_norm') for part in rest):
    return None
  if 'cross_attention' in rest:
    if not copy_cross_attention:
      return None
    rest = [SELF_ATTENTION if p == 'cross_attention' else p for p in rest]
  return 'decoder', ('decoder', *rest)


def assemble(fresh: Params, encoder_source: Params, decoder_source: Params,
             copy_cross_attention: bool) -> Params:
  """Encoder-decoder params from two decoder-only trees (see module doc).

  Args:
    fresh: A freshly initialised encoder-decoder tree: the template, and the
      values of everything no source provides.
    encoder_source: `{'decoder': stack}` of the encoder's checkpoint.
    decoder_source: `{'decoder': stack}` of the decoder's checkpoint.
    copy_cross_attention: Copy each layer's self-attention into its
      cross-attention (balanced models).

  Returns:
    The encoder-decoder parameter tree (same structure as `fresh`).

  Raises:
    ValueError: a source tensor is missing, has the wrong shape, or a source
      tensor was left unused; the parameter path and shapes are named.
  """
  sources = {'encoder': _flat(encoder_source), 'decoder': _flat(decoder_source)}
  used = {name: set() for name in sources}
  out = {}
  for key, value in _flat(fresh).items():
    origin = _source_key(key, copy_cross_attention)
    if origin is None:
      out[key] = value
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
    out[key] = tensor
    used[name].add(source_key)
  for name, flat in sources.items():
    unused = sorted('/'.join(k) for k in set(flat) - used[name])
    if unused:
      raise ValueError(f'the {name} source has tensors the encoder-decoder '
                       f'does not use: {unused[:5]}')
  return flax.traverse_util.unflatten_dict(out)


def adapt_params(model: EncoderDecoderModel, encoder_source: Params,
                 decoder_source: Optional[Params] = None, *,
                 cross_attention_init: str = AUTO, seed: int = 0) -> Params:
  """Encoder-decoder parameters for `model` from decoder-only parameters.

  Args:
    model: The target encoder-decoder.
    encoder_source: `{'decoder': stack}` parameters for the encoder, in the
      layout of `model.config.encoder`.
    decoder_source: The same for the decoder (default: `encoder_source`).
    cross_attention_init: 'self_attention', 'random' or 'auto' (the former
      for balanced models, the latter otherwise).
    seed: Seed of the freshly initialised parameters.

  Returns:
    The parameter tree, in the model's layout.
  """
  mode = resolve_cross_attention_init(model.config, cross_attention_init)
  fresh = model.get_initial_variables(jax.random.PRNGKey(seed), {})['params']
  if decoder_source is None:
    decoder_source = encoder_source
  params = assemble(fresh, encoder_source, decoder_source,
                    copy_cross_attention=mode == SELF_ATTENTION)
  if model.config.tie_embeddings:  # One table: the decoder's (the LM head).
    params['encoder']['token_embedder'] = dict(
        params['decoder']['token_embedder'])
  return params


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
                  shardings: Optional[Any] = None) -> Params:
    """The adapted parameters of `model` (placed on `shardings`)."""
    config = model.config
    encoder = load_decoder_only(self.checkpoint, config.encoder)
    decoder = encoder
    if self.decoder_checkpoint or (_architecture(config.encoder) !=
                                   _architecture(config.decoder)):
      decoder = load_decoder_only(self.decoder_checkpoint or self.checkpoint,
                                  config.decoder)
    params = adapt_params(model, encoder, decoder,
                          cross_attention_init=self.cross_attention_init,
                          seed=self.seed)
    return params if shardings is None else jax.device_put(params, shardings)


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
  if not isinstance(model, EncoderDecoderModel):
    print(f'error: {args.preset} is not an encoder-decoder preset',
          file=sys.stderr)
    return 1
  if args.tie_embeddings:
    model = EncoderDecoderModel(model.config.replace(tie_embeddings=True))
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

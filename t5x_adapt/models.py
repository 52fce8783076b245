"""Models in T5X's interface: loss, scoring and decoding around a Flax module.

A model owns its Flax module, its loss, its scoring and decoding, and the
seqio feature converter that shapes its batches (`FEATURE_CONVERTER_CLS`).
The trainer knows nothing of architectures. Batches carry seqio's model
features (token 0 is padding):

  encoder-decoder: encoder_input_tokens, decoder_input_tokens,
                   decoder_target_tokens, decoder_loss_weights,
                   optional encoder/decoder_segment_ids and _positions.
  decoder-only:    decoder_input_tokens, decoder_target_tokens,
                   decoder_loss_weights, optional decoder_segment_ids,
                   decoder_positions, decoder_causal_attention (prefix-LM).
"""

from __future__ import annotations

import abc
import copy
import functools
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import seqio

from t5x_adapt import decoding
from t5x_adapt import flops
from t5x_adapt import layout
from t5x_adapt.config import EncoderDecoderConfig, StackConfig
from t5x_adapt.data import feature_converters
from t5x_adapt.data.vocab import BOS_ID, EOS_ID
from t5x_adapt.kernels import lm_head_loss
from t5x_adapt.losses import cross_entropy, token_log_probs, token_losses
from t5x_adapt.networks import DecoderOnlyTransformer
from t5x_adapt.networks import EncoderDecoderTransformer

Batch = Mapping[str, jax.Array]
Params = Any



def padding_aware_positions(segment_ids: jax.Array) -> jax.Array:
  """0-based positions counting only non-pad tokens: [b, t] -> [b, t]."""
  valid = (segment_ids > 0).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)


def stack_inputs(batch: Batch, prefix: str, tokens_key: str,
                 validity_key: Optional[str] = None):
  """(tokens, positions, segment_ids) of one stack from a feature batch.

  Without packing features, segment ids mark non-pad tokens (of
  `validity_key`, e.g. the targets, when the inputs start with a 0 token) and
  positions count non-pad tokens, so left and right padding both work.
  """
  tokens = batch[tokens_key]
  segment_ids = batch.get(f'{prefix}_segment_ids')
  if segment_ids is None:
    reference = batch.get(validity_key, tokens) if validity_key else tokens
    segment_ids = (reference > 0).astype(jnp.int32)
  positions = batch.get(f'{prefix}_positions')
  if positions is None:
    positions = padding_aware_positions(segment_ids)
  return tokens, positions, segment_ids


# (model class, module) -> boxed abstract variables, the one cache of
# parameter shapes (`BaseModel._abstract_variables`).
_ABSTRACT_VARIABLES: dict[tuple, Any] = {}


def _unboxed(tree):
  """Boxed (axis-annotated) leaves -> their values, without the sharding
  constraint `nn.meta.unbox` applies under a mesh (these are shapes)."""
  return jax.tree_util.tree_map(
      lambda leaf: (leaf.unbox(apply_constraint=False)
                    if isinstance(leaf, nn.meta.AxisMetadata) else leaf),
      tree, is_leaf=lambda leaf: isinstance(leaf, nn.meta.AxisMetadata))


def shapes_key(input_shapes: Mapping[str, tuple[int, ...]]) -> tuple:
  """A hashable key of {feature: shape}."""
  return tuple(sorted((name, tuple(shape))
                      for name, shape in input_shapes.items()))


class BaseModel(abc.ABC):
  """Common interface of the decoder-only and encoder-decoder models.

  What the trainer, the entry points and the FLOP count need to know of a
  model, the model says: `teacher` (a distillation teacher, else None),
  `params_from_checkpoint`, `train_step_flops` and
  `config.vocab_size`.

  Args:
    module: The Flax module.
    z_loss: Coefficient of the `log(Z)^2` auxiliary loss.
    eos_id: End of sequence in decoding.
    decode_options: Decoding settings (None: `DecodeOptions()`'s gin
      bindings at each call).
    loss_chunk_length: How `loss_fn` computes the LM head: None builds the
      whole float32 logits [b, t, vocab]; an int computes them that many
      target positions at a time, recomputed in the backward pass
      (`t5x_adapt.kernels.lm_head_loss`: same loss and gradients, memory of
      one chunk); 'auto' chunks when a row's logits exceed
      `lm_head_loss.AUTO_MAX_LOGITS` (`auto_chunk_length`).
    unroll_decoding: Decode (`predict_batch*`) with the stacks' layers
      unrolled, the parameters of a scanned model split per layer first.
      Under `nn.scan` every decoding step slices (copies) each layer's
      weights out of the stacked arrays before reading them, which doubles
      the bytes a weight-bound step moves (`benchmarks/decode.py`: 1.5x the
      step time at the S size on CPU); the price is a decoding compile that
      grows with depth.
  """

  FEATURE_CONVERTER_CLS: type[seqio.FeatureConverter]
  # The feature that carries a request's input: the encoder's tokens, or a
  # decoder-only model's prompt (`predict_batch`, scoring, serving).
  INPUTS_FEATURE: str
  # The feature whose length `predict_batch` decodes by default.
  DEFAULT_LENGTH_FEATURE: str
  # A decoder-only model whose parameters the train step takes as a further
  # argument (`t5x_adapt.distillation`); None: no teacher.
  teacher: Optional['DecoderOnlyModel'] = None

  def __init__(self, module: nn.Module, *, z_loss: float = 0.0,
               eos_id: int = EOS_ID,
               decode_options: Optional[decoding.DecodeOptions] = None,
               loss_chunk_length: lm_head_loss.ChunkSetting = 'auto',
               unroll_decoding: bool = True):
    self.module = module
    self.unroll_decoding = unroll_decoding
    self.z_loss = z_loss
    self.eos_id = eos_id
    # None: `DecodeOptions()` at each call, i.e. its gin bindings.
    self.decode_options = decode_options
    self.loss_chunk_length = lm_head_loss.check_chunk_setting(
        loss_chunk_length)

  @property
  def config(self):
    return self.module.config

  def frozen_models(self) -> dict[str, 'BaseModel']:
    """Models whose parameters the train step takes as further arguments,
    by the `loss_fn` keyword they go to (never differentiated, never
    checkpointed): a distillation teacher's `teacher_params`; a LoRA
    model's `base_params` (`t5x_adapt.lora`)."""
    return {} if self.teacher is None else {'teacher_params': self.teacher}

  @property
  def is_encoder_decoder(self) -> bool:
    return self.config.is_encoder_decoder

  def feature_converter(self) -> seqio.FeatureConverter:
    """The converter of this model's training batches (packed where the
    model packs)."""
    return self.FEATURE_CONVERTER_CLS(pack=True)  # pylint: disable=not-callable

  def batch_shapes(self, task_feature_lengths: Mapping[str, int],
                   batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch: what `feature_converter` makes of tasks
    with these feature lengths, `batch_size` rows."""
    return feature_converters.batch_shapes(
        self.feature_converter(), task_feature_lengths, batch_size)

  def decoder_params(self, params: Params) -> Params:
    """The parameters one decoding step reads (the encoder's excluded)."""
    shared = {key: params[key] for key in params
              if key not in self.config.stacks()}  # A tied table.
    return {'decoder': params['decoder'], **shared}

  @abc.abstractmethod
  def _init_args(self, input_shapes: Mapping[str, tuple[int, ...]]) -> Batch:
    """A dummy batch of the given shapes for `module.init`."""

  def get_initial_variables(
      self, rng: jax.Array,
      input_shapes: Optional[Mapping[str, tuple[int, ...]]] = None
  ) -> dict[str, Params]:
    """Initialises parameters; returns `{'params': tree of arrays}`.

    `input_shapes` (T5X's signature) does not change the parameters: they
    are the same for every batch shape.
    """
    variables = self._init(rng, self._init_args(input_shapes or {}))
    return {'params': nn.meta.unbox(variables['params'])}

  def _abstract_variables(self):
    """The boxed variables of `module.init`, traced once per model.

    Everything traced, nothing run: this works under any mesh, also one of
    devices this process cannot run on (`t5x_adapt.precompile`). A run asks
    for shapes and axes many times (shardings, loaders, the adaptation, the
    models it builds again for evaluation) and a trace of a deep unscanned
    model takes a second or more. Parameters do not depend on the batch's
    shapes, so the trace is of a dummy batch, and it is kept by model class
    and module (modules are equal when their configurations are).

    The trace runs without logical-axis rules: what it yields (shapes,
    dtypes, axis names) does not depend on a mesh, and under a caller's
    `Partitioner.context()` the activation constraints would ask for
    shardings of the dummy batch, which has none.
    """
    key = (type(self), self.module)
    if key not in _ABSTRACT_VARIABLES:
      with nn.logical_axis_rules(()):
        _ABSTRACT_VARIABLES[key] = jax.eval_shape(lambda: self._init(
            jax.random.PRNGKey(0), self._init_args({})))
    return _ABSTRACT_VARIABLES[key]

  def logical_axes(self):
    """Logical axis names of every parameter, as a tree of PartitionSpecs."""
    return nn.get_partition_spec(self._abstract_variables())['params']

  def param_shapes(self):
    """Parameter ShapeDtypeStructs, without allocating anything."""
    return _unboxed(self._abstract_variables()['params'])

  @abc.abstractmethod
  def _init(self, rng, batch):
    """`module.init` on a dummy batch."""

  @abc.abstractmethod
  def train_step_flops(self, batch_shapes: Mapping[str, tuple[int, ...]]
                       ) -> int:
    """Matmul FLOPs of one train step on batches of these feature shapes
    (forward + backward, `t5x_adapt.flops`)."""

  def generation_flops(self, input_length: int, new_tokens: int) -> int:
    """Forward matmul FLOPs of one example's generation: `input_length`
    input (prompt or encoder) tokens, then `new_tokens` decoded with a KV
    cache (each position runs once; logits only where generated)."""
    raise NotImplementedError(f'{type(self).__name__} does not generate')

  def params_from_checkpoint(self, path: str, read: Callable[..., Params],
                            shardings: Optional[Params] = None) -> Params:
    """The parameters to start training from, read from `path`.

    Models whose tree differs from their checkpoints' (classifiers) say
    here how to start from them; `convert.load.initial_params` calls this.

    Args:
      path: Any checkpoint kind (ours, a transformers directory, a GGUF
        file).
      read: `convert.load.load_params` (handed in: the converters build
        models, so models do not import them): `read(path, model,
        shardings=..., subtrees=...)` reads each leaf onto its sharding.
      shardings: Optional shardings of this model's parameters.
    """
    return read(path, self, shardings=shardings)

  @abc.abstractmethod
  def compute_logits(self, params: Params, batch: Batch,
                     dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """float32 logits [batch, target_length, vocab]."""

  def compute_hidden(self, params: Params, batch: Batch,
                     dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """The final-normed hidden states [batch, target_length, embed] that
    `compute_logits` feeds to the LM head."""
    raise NotImplementedError(f'{type(self).__name__} has no LM head')

  def lm_head_params(self, params: Params) -> Params:
    """The subtree whose `embedding` is the LM head: the decoder's token
    embedding (the model's one table when tied), or its own `lm_head`."""
    path = (self.config.embedder_path('decoder')
            if self.config.decoder_stack.tie_lm_head
            else ('decoder', 'lm_head'))
    return functools.reduce(lambda tree, key: tree[key], path, params)

  def lm_head(self, params: Params,
              hidden: jax.Array) -> lm_head_loss.Head:
    """The LM head of this model's decoder on `hidden` [b, t, e]."""
    config = self.config.decoder_stack
    return lm_head_loss.Head(hidden, self.lm_head_params(params)['embedding'],
                             config.final_logit_softcap,
                             config.activation_dtype)

  def loss_chunk(self, target_length: int) -> Optional[int]:
    """Target positions per chunk of the LM head in `loss_fn` (None: the
    whole logits); see `loss_chunk_length`."""
    return lm_head_loss.resolve_chunk_length(
        self.loss_chunk_length, target_length, self.config.vocab_size)

  def loss_fn(self, params: Params, batch: Batch,
              dropout_rng: Optional[jax.Array]) -> tuple[jax.Array, dict]:
    """Mean cross-entropy over weighted target tokens, and metrics."""
    targets = batch['decoder_target_tokens']
    weights = batch.get('decoder_loss_weights')
    chunk = self.loss_chunk(targets.shape[1])
    if chunk is None:
      logits = self.compute_logits(params, batch, dropout_rng)
      return cross_entropy(logits, targets, weights, self.z_loss)
    head = self.lm_head(params,
                        self.compute_hidden(params, batch, dropout_rng))
    return lm_head_loss.chunked_cross_entropy(
        head, targets, weights, chunk_length=chunk, z_loss=self.z_loss)

  def score_batch(self, params: Params, batch: Batch) -> jax.Array:
    """Sum of target log-likelihoods per example: [batch]."""
    logits = self.compute_logits(params, batch)
    targets = batch['decoder_target_tokens']
    weights = batch.get('decoder_loss_weights', targets > 0)
    return jnp.sum(token_log_probs(logits, targets) * weights, axis=-1)

  def score_tokens(self, params: Params, batch: Batch,
                   last: Optional[int] = None
                   ) -> tuple[jax.Array, jax.Array]:
    """Per target token: (log p(target) float32 [b, t], whether the target
    is the argmax bool [b, t]), what likelihood benchmarks ask of a model
    (the log-likelihood of a continuation and whether greedy decoding
    would produce it).

    `last`: only the last `last` target positions ([b, last]), the LM head
    applied to those alone (a short continuation after a long context).
    """
    targets = batch['decoder_target_tokens']
    if last is None:
      logits = self.compute_logits(params, batch)
    else:
      targets = targets[:, -last:]
      hidden = self.compute_hidden(params, batch)[:, -last:]
      logits = self.lm_head(params, hidden).logits()
    terms = token_losses(logits.astype(jnp.float32), targets)
    return -terms['nll'], terms['correct'] > 0

  def input_states(self, params: Params, batch: Batch) -> jax.Array:
    """Final-normed states [b, length, embed] of the `INPUTS_FEATURE`
    tokens: the encoder's, or a decoder-only model's last layer's."""
    raise NotImplementedError

  def embed(self, params: Params, batch: Batch) -> jax.Array:
    """Text embeddings [b, embed]: `input_states` averaged over the
    non-pad input tokens, L2-normalised (the server's /v1/embeddings)."""
    states = self.input_states(params, batch).astype(jnp.float32)
    valid = (batch[self.INPUTS_FEATURE] > 0)[..., None]
    mean = (jnp.sum(states * valid, axis=1) /
            jnp.maximum(jnp.sum(valid, axis=1), 1))
    return mean / jnp.maximum(
        jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-12)

  # -- decoding: a prefill fills a cache, a step extends it by a token. --

  def decode_cache_length(self, input_length: int, new_tokens: int) -> int:
    """Slots of a global self-attention cache for `new_tokens` tokens after
    an input (prompt or encoder input) of `input_length` tokens."""
    raise NotImplementedError(f'{type(self).__name__} does not decode')

  def prefill(self, params: Params, batch: Batch, cache_length: int
              ) -> tuple[jax.Array, Any, jax.Array]:
    """Runs the prompt (or the encoder and the start token) into a cache.

    Args:
      params: Model parameters.
      batch: Model features (`INPUTS_FEATURE` and its positions / segments).
      cache_length: Slots of the global self-attention caches
        (`decode_cache_length`).

    Returns:
      (first_logits [b, vocab]: of the first generated token, cache: for b
      rows, next_positions [b]: the position at which the first generated
      token is fed back).
    """
    raise NotImplementedError(f'{type(self).__name__} does not decode')

  def decode_step(self, params: Params, tokens: jax.Array,
                  positions: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    """Feeds one token per row: tokens, positions [b, 1] -> (logits
    [b, vocab], cache). Rows are independent: each keeps its own cache index
    and position, and an encoder-decoder's row reads the encoder keys its
    prefill cached."""
    raise NotImplementedError(f'{type(self).__name__} does not decode')

  def _prefill(self, params: Params, batch: Batch,
               max_decode_length: Optional[int]) -> decoding.Prefill:
    """`prefill` for `max_decode_length` tokens (None: the length of the
    batch's decoder feature), with `decode_step` as the step function (it
    serves any number of beams: a beam is a row)."""
    input_length = batch[self.INPUTS_FEATURE].shape[1]
    max_decode_length = (max_decode_length or
                         batch[self.DEFAULT_LENGTH_FEATURE].shape[1])
    logits, cache, next_positions = self.prefill(
        params, batch,
        self.decode_cache_length(input_length, max_decode_length))
    return decoding.Prefill(functools.partial(self.decode_step, params),
                            logits, cache, next_positions, max_decode_length)

  def predict_batch(self, params: Params, batch: Batch,
                    max_decode_length: Optional[int] = None,
                    options: Optional[decoding.DecodeOptions] = None,
                    rng: Optional[jax.Array] = None) -> jax.Array:
    """Continuation tokens [batch, max_decode_length] (the best beam).

    Greedy unless `options` (or the model's `decode_options`, or the gin
    bindings of `DecodeOptions`) say otherwise; 0 after EOS.
    """
    return self.predict_batch_with_aux(params, batch, max_decode_length,
                                       options, rng)[0]

  def predict_batch_with_aux(
      self, params: Params, batch: Batch,
      max_decode_length: Optional[int] = None,
      options: Optional[decoding.DecodeOptions] = None,
      rng: Optional[jax.Array] = None,
      return_all_decodes: bool = False) -> tuple[jax.Array, dict]:
    """Continuation tokens and their scores.

    Args:
      params: Model parameters.
      batch: Model features (the prompts / encoder inputs).
      max_decode_length: Tokens to generate.
      options: Decoding method and its settings.
      rng: Key of sampling (required there, unused otherwise).
      return_all_decodes: Beam search returns every beam.

    Returns:
      (tokens [batch, length], {'scores': [batch]}): log-probabilities of
      the tokens up to EOS for greedy and sampling, the length-normalised
      score (see `DecodeOptions.length_penalty`) for beam search. With
      `return_all_decodes`, beam search gives tokens [batch, beams, length]
      and scores [batch, beams], best first.
    """
    options = options or self.decode_options or decoding.DecodeOptions()
    model, params = self._decoding_model(params)
    prefill = model._prefill(  # pylint: disable=protected-access
        params, batch, max_decode_length)
    tokens, scores = decoding.decode(prefill, options, self.eos_id, rng)
    if options.method == 'beam' and not return_all_decodes:
      tokens, scores = tokens[:, 0], scores[:, 0]
    return tokens, {'scores': scores}

  def _decoding_model(self, params: Params) -> tuple['BaseModel', Params]:
    """(model, params) to decode with: see `unroll_decoding`."""
    if not self.unroll_decoding or not any(
        stack.scan_layers for stack in self.config.stacks().values()):
      return self, params
    model = copy.copy(self)
    model.module = self.module.clone(
        config=self.config.map_stacks(scan_layers=False))
    return model, layout.to_unrolled(params, self.config)

  def _rngs(self, dropout_rng):
    return None if dropout_rng is None else {'dropout': dropout_rng}


@gin.configurable
class DecoderOnlyModel(BaseModel):
  """Gemma-style language model (causal LM or prefix-LM)."""

  FEATURE_CONVERTER_CLS = feature_converters.DecoderFeatureConverter
  INPUTS_FEATURE = 'decoder_input_tokens'
  DEFAULT_LENGTH_FEATURE = 'decoder_input_tokens'

  def __init__(self, config: StackConfig = gin.REQUIRED, **kwargs):
    super().__init__(DecoderOnlyTransformer(config), **kwargs)

  def _init_args(self, input_shapes):
    shape = input_shapes.get('decoder_input_tokens', (1, 8))
    return {'decoder_input_tokens': jnp.ones(shape, jnp.int32)}

  def _init(self, rng, batch):
    return self.module.init(rng, *self._inputs(batch))

  def _inputs(self, batch):
    tokens, positions, segment_ids = stack_inputs(
        batch, 'decoder', 'decoder_input_tokens', 'decoder_target_tokens')
    prefix = batch.get('decoder_causal_attention')
    if prefix is not None:
      prefix = prefix > 0
    return tokens, positions, segment_ids, prefix

  def compute_logits(self, params, batch, dropout_rng=None):
    return self._forward(params, batch, dropout_rng)

  def compute_hidden(self, params, batch, dropout_rng=None):
    return self._forward(params, batch, dropout_rng, return_hidden=True)

  def input_states(self, params, batch):
    # Causal states: a token's state sees the tokens before it.
    return self.compute_hidden(params, batch)

  def _forward(self, params, batch, dropout_rng, **kwargs):
    return self.module.apply({'params': params}, *self._inputs(batch),
                             deterministic=dropout_rng is None,
                             rngs=self._rngs(dropout_rng), **kwargs)

  def train_step_flops(self, batch_shapes):
    batch, length = batch_shapes['decoder_target_tokens']
    return flops.TRAIN_PASSES * batch * flops.decoder_only_flops(
        self.config, length)

  def generation_flops(self, input_length, new_tokens):
    return flops.decoder_only_flops(self.config, input_length + new_tokens,
                                    logit_positions=new_tokens)

  def decode_cache_length(self, input_length, new_tokens):
    return input_length + new_tokens

  def prefill(self, params, batch, cache_length):
    """Prefills the cache with each row's prompt.

    The prompt of a row is its non-pad `decoder_input_tokens` (restricted to
    `decoder_causal_attention` when given), moved to the right end of the
    batch's length so that only the last position needs logits (the LM head
    over a whole prompt would cost as much as its blocks).
    """
    tokens = batch['decoder_input_tokens']
    prompt_mask = tokens > 0
    prefix = batch.get('decoder_causal_attention')
    if prefix is not None:
      prompt_mask &= prefix > 0
    prompt, prompt_valid, prompt_prefix = decoding.right_align(
        tokens, prompt_mask, prefix)
    if prompt_prefix is not None:
      prompt_prefix = prompt_prefix > 0
    logits, mutated = self.module.apply(
        {'params': params}, prompt, padding_aware_positions(prompt_valid),
        prompt_valid, prompt_prefix, decode=True, cache_length=cache_length,
        first_logit=prompt.shape[1] - 1, mutable=['cache'])
    return (logits[:, -1], mutated['cache'],
            jnp.sum(prompt_valid, axis=-1))

  def decode_step(self, params, tokens, positions, cache):
    logits, mutated = self.module.apply(
        {'params': params, 'cache': cache}, tokens, positions,
        jnp.ones_like(tokens), decode=True, mutable=['cache'])
    return logits[:, -1], mutated['cache']


@gin.configurable
class EncoderDecoderModel(BaseModel):
  """T5Gemma encoder-decoder."""

  FEATURE_CONVERTER_CLS = feature_converters.EncDecFeatureConverter
  INPUTS_FEATURE = 'encoder_input_tokens'
  DEFAULT_LENGTH_FEATURE = 'decoder_target_tokens'

  def __init__(self, config: EncoderDecoderConfig = gin.REQUIRED,
               decoder_start_id: int = BOS_ID, **kwargs):
    super().__init__(EncoderDecoderTransformer(config), **kwargs)
    self.decoder_start_id = decoder_start_id

  def train_step_flops(self, batch_shapes):
    batch, inputs = batch_shapes['encoder_input_tokens']
    targets = batch_shapes['decoder_target_tokens'][1]
    return flops.TRAIN_PASSES * batch * flops.encoder_decoder_flops(
        self.config, inputs, targets)

  def generation_flops(self, input_length, new_tokens):
    return flops.encoder_decoder_flops(self.config, input_length, new_tokens)

  def _init_args(self, input_shapes):
    enc = input_shapes.get('encoder_input_tokens', (1, 8))
    dec = input_shapes.get('decoder_input_tokens', (1, 8))
    return {'encoder_input_tokens': jnp.ones(enc, jnp.int32),
            'decoder_input_tokens': jnp.ones(dec, jnp.int32)}

  def _init(self, rng, batch):
    return self.module.init(rng, *self._encoder_inputs(batch),
                            *self._decoder_inputs(batch))

  def _encoder_inputs(self, batch):
    return stack_inputs(batch, 'encoder', 'encoder_input_tokens')

  def _decoder_inputs(self, batch):
    return stack_inputs(batch, 'decoder', 'decoder_input_tokens',
                        'decoder_target_tokens')

  def compute_logits(self, params, batch, dropout_rng=None):
    return self._forward(params, batch, dropout_rng)

  def compute_hidden(self, params, batch, dropout_rng=None):
    return self._forward(params, batch, dropout_rng, return_hidden=True)

  def _forward(self, params, batch, dropout_rng, **kwargs):
    return self.module.apply({'params': params}, *self._encoder_inputs(batch),
                             *self._decoder_inputs(batch),
                             deterministic=dropout_rng is None,
                             rngs=self._rngs(dropout_rng), **kwargs)

  def input_states(self, params, batch):
    return self.encode(params, batch)

  def encode(self, params, batch) -> jax.Array:
    """Final-normed encoder output [batch, enc_length, enc_embed]."""
    return self.module.apply({'params': params}, *self._encoder_inputs(batch),
                             method=EncoderDecoderTransformer.encode)

  def decode_cache_length(self, input_length, new_tokens):
    del input_length  # The decoder caches its own tokens only.
    return new_tokens

  def prefill(self, params, batch, cache_length):
    """Encodes once and decodes the start token, caching the encoder's
    keys and values for the decoder (cross or merged attention)."""
    encoder = self._encoder_inputs(batch)[1:]
    encoded = self.encode(params, batch)
    start = jnp.full((encoded.shape[0], 1), self.decoder_start_id, jnp.int32)
    logits, mutated = self.module.apply(
        {'params': params}, encoded, *encoder, start, jnp.zeros_like(start),
        jnp.ones_like(start), decode=True, cache_length=cache_length,
        mutable=['cache'], method=EncoderDecoderTransformer.decode)
    return (logits[:, -1], mutated['cache'],
            jnp.ones((encoded.shape[0],), jnp.int32))

  def decode_step(self, params, tokens, positions, cache):
    # The encoder's keys are in the cache: no encoder output is needed.
    logits, mutated = self.module.apply(
        {'params': params, 'cache': cache}, None, None, None, tokens,
        positions, jnp.ones_like(tokens), decode=True, mutable=['cache'],
        method=EncoderDecoderTransformer.decode)
    return logits[:, -1], mutated['cache']


def model_for_config(config: StackConfig | EncoderDecoderConfig,
                     **kwargs) -> BaseModel:
  """The model class that fits `config` (what converters build)."""
  if config.is_encoder_decoder:
    return EncoderDecoderModel(config, **kwargs)
  return DecoderOnlyModel(config, **kwargs)

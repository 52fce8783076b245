"""Classifiers on a backbone's last non-pad token (T5Gemma's SuperGLUE setup).

Every task is cast as classification: a head (dropout + linear) reads the
representation of the last non-pad input token and all parameters are
fine-tuned with softmax cross-entropy over the classes. The representation is
the final-normed encoder output for encoder-decoders (the decoder is not
used) and the decoder's final-normed hidden state for decoder-only
baselines (causal, so only the last token has seen the whole input).

Parameter trees (the backbone's stack under its usual name, plus the head):

  EncoderClassificationModel:     {'encoder': stack, 'classifier': head}
  DecoderOnlyClassificationModel: {'decoder': stack, 'classifier': head}

An encoder-decoder's decoder is left out, so no parameter trains without a
gradient; `params_from_checkpoint` therefore reads only the backbone's stack of
a pretrained or adapted checkpoint (ours, a transformers directory or a GGUF
file: `convert.load.load_params(..., subtrees=...)`) and starts the head
fresh, and `t5x_adapt.train` calls it for `INIT_CHECKPOINT`.

Batches (`data.feature_converters.*ClassificationFeatureConverter`):
`encoder_input_tokens` or `decoder_input_tokens` [batch, length] (token 0
is padding, on either side) and `label` [batch] (negative: unlabelled, no
loss). Gin: `classification_model` builds the classifier that fits a preset's
model (`gin/finetune/classification.gin`).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp

from t5x_adapt import checkpoints
from t5x_adapt import flops
from t5x_adapt import models
from t5x_adapt.config import StackConfig
from t5x_adapt.convert import load
from t5x_adapt.data import feature_converters
from t5x_adapt.layers import Stack
from t5x_adapt.losses import cross_entropy

HEAD = 'classifier'


def last_token_index(segment_ids: jax.Array) -> jax.Array:
  """Index of each row's last non-pad token: [batch, length] -> [batch].

  Works for left and right padding alike; an all-padding row gives 0.
  """
  positions = jnp.arange(segment_ids.shape[1])
  return jnp.max(jnp.where(segment_ids > 0, positions, 0), axis=-1)


def last_token(hidden: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Each row's last non-pad hidden state: [b, t, d], [b, t] -> [b, d]."""
  index = last_token_index(segment_ids)[:, None, None]
  return jnp.take_along_axis(hidden, index, axis=1)[:, 0]


class ClassificationHead(nn.Module):
  """Dropout, then a linear map to class logits.

  Attributes:
    num_classes: Number of classes.
    dropout_rate: Dropout on the pooled representation.
    param_dtype: Parameter dtype.
  """

  num_classes: int
  dropout_rate: float = 0.0
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled: jax.Array,
               deterministic: bool = True) -> jax.Array:
    """[batch, embed] -> float32 logits [batch, num_classes]."""
    x = nn.Dropout(self.dropout_rate)(pooled, deterministic=deterministic)
    # Small weights: the fresh head starts near the uniform distribution,
    # yet its logits depend on the input from the first step.
    return nn.Dense(
        self.num_classes, dtype=jnp.float32, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.normal(stddev=0.02), ('embed', 'classes')),
        bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), ('classes',)),
        name='dense')(x.astype(jnp.float32))


class StackClassifier(nn.Module):
  """One stack (encoder or decoder-only) and a head on its last token.

  Attributes:
    config: The stack's configuration.
    stack_name: Name of the stack's subtree, as in the backbone's tree.
    causal: Causal self-attention (decoder-only) or bidirectional (encoder).
    num_classes: Number of classes.
    dropout_rate: Dropout of the head.
  """

  config: StackConfig
  stack_name: str
  causal: bool
  num_classes: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, tokens: jax.Array, positions: jax.Array,
               segment_ids: jax.Array,
               deterministic: bool = True) -> jax.Array:
    """[batch, length] tokens -> float32 logits [batch, num_classes]."""
    hidden = Stack(self.config, causal=self.causal, produce_logits=False,
                   name=self.stack_name)(tokens, positions, segment_ids,
                                         deterministic=deterministic)
    head = ClassificationHead(self.num_classes, self.dropout_rate,
                              self.config.weight_dtype, name=HEAD)
    return head(last_token(hidden, segment_ids), deterministic)


class ClassificationModel(models.BaseModel):
  """A classifier in T5X's model interface (see the module docstring).

  Subclasses name the backbone stack that reads the inputs.

  Args:
    config: The backbone's config, as its preset builds it (the
      encoder-decoder's whole config for an encoder classifier).
    num_classes: Number of classes.
    dropout_rate: Dropout of the head (the stack's is its config's).
    head_seed: Seed of a fresh head in `init_from_checkpoint`.
  """

  STACK: str
  CAUSAL: bool

  def __init__(self, config, num_classes: int = gin.REQUIRED,
               dropout_rate: float = 0.1, head_seed: int = 0):
    self._config = config
    self.num_classes = num_classes
    self.head_seed = head_seed
    super().__init__(StackClassifier(self.stack_config, self.STACK,
                                     self.CAUSAL, num_classes, dropout_rate))

  @property
  def config(self):
    return self._config

  @property
  def stack_config(self) -> StackConfig:
    return self._config

  @property
  def tokens_key(self) -> str:
    return f'{self.STACK}_input_tokens'

  def _init_args(self, input_shapes):
    shape = input_shapes.get(self.tokens_key, (1, 8))
    return {self.tokens_key: jnp.ones(shape, jnp.int32)}

  def _init(self, rng, batch):
    return self.module.init(rng, *self._inputs(batch))

  def _inputs(self, batch):
    return models.stack_inputs(batch, self.STACK, self.tokens_key)

  def compute_logits(self, params, batch, dropout_rng=None) -> jax.Array:
    """float32 class logits [batch, num_classes]."""
    return self.module.apply({'params': params}, *self._inputs(batch),
                             deterministic=dropout_rng is None,
                             rngs=self._rngs(dropout_rng))

  def loss_fn(self, params, batch, dropout_rng):
    """Mean cross-entropy over labelled examples, and metrics.

    The metrics are the token-level ones (`losses.cross_entropy`) with one
    "token" per labelled example: `accuracy` is classification accuracy and
    `num_tokens` the number of labelled examples (the trainer's weights).
    """
    logits = self.compute_logits(params, batch, dropout_rng)
    labels = batch['label']
    return cross_entropy(logits[:, None], jnp.maximum(labels, 0)[:, None],
                         (labels >= 0)[:, None])

  def class_log_probs(self, params, batch) -> jax.Array:
    """log p(class | inputs): [batch, num_classes]."""
    return jax.nn.log_softmax(self.compute_logits(params, batch), axis=-1)

  def score_batch(self, params, batch) -> jax.Array:
    """log p(label | inputs) per example: [batch] (0 where unlabelled)."""
    labels = batch['label']
    log_probs = self.class_log_probs(params, batch)
    picked = jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[:, None],
                                 axis=-1)[:, 0]
    return jnp.where(labels >= 0, picked, 0.0)

  def predict_batch_with_aux(self, params, batch, max_decode_length=None,
                             options=None, rng=None,
                             return_all_decodes=False):
    """Class ids [batch], with {'scores': their log-probabilities [batch],
    'log_probs': [batch, num_classes]}; nothing is decoded, so the decoding
    arguments are ignored."""
    del max_decode_length, options, rng, return_all_decodes
    log_probs = self.class_log_probs(params, batch)
    return jnp.argmax(log_probs, axis=-1), {
        'scores': jnp.max(log_probs, axis=-1), 'log_probs': log_probs}

  def train_step_flops(self, batch_shapes):
    """One stack's step (the head's matmul is negligible)."""
    batch, length = batch_shapes[self.tokens_key]
    return flops.TRAIN_PASSES * batch * flops.stack_flops(
        self.stack_config, length, causal=self.CAUSAL)

  def _prefill(self, params, batch, max_decode_length, beams):
    raise NotImplementedError(f'{type(self).__name__} classifies; it has no '
                              'decoder to prefill')

  def fresh_head(self) -> models.Params:
    """Newly initialised head parameters (seeded by `head_seed`)."""
    head = ClassificationHead(self.num_classes,
                              param_dtype=self.stack_config.weight_dtype)
    pooled = jnp.zeros((1, self.stack_config.embed_dim), jnp.float32)
    variables = head.init(jax.random.PRNGKey(self.head_seed), pooled)
    return nn.meta.unbox(variables['params'])

  def params_from_checkpoint(self, path: str, read,
                            shardings: Optional[models.Params] = None
                            ) -> models.Params:
    """The parameters to fine-tune, from the checkpoint at `path`.

    A classifier's checkpoint (ours, with a head) restores whole. A
    backbone's (a pretrained decoder-only model, an adapted encoder-decoder:
    `save_params`, a training step directory, a transformers directory or a
    GGUF file) gives this model's stack -- nothing else of it is read --
    and the head starts fresh.

    Args:
      path: The checkpoint.
      read: `convert.load.load_params`.
      shardings: Optional shardings of this model's parameters.

    Returns:
      The parameter tree.

    Raises:
      ValueError: the checkpoint has no `STACK` subtree, or it does not
        match this model's stack (the message names the first difference).
    """
    if load.checkpoint_kind(path) == load.ORBAX:
      saved = {name.partition('/')[0]
               for name in checkpoints.saved_shapes(path)}
      if HEAD in saved:
        return read(path, self, shardings=shardings)
      if self.STACK not in saved:
        raise ValueError(f'{path}: no {self.STACK!r} parameters to start '
                         f'{type(self).__name__} from (it has '
                         f'{sorted(saved)})')
    params = read(path, self, shardings=shardings, subtrees=(self.STACK,))
    head = self.fresh_head()
    params[HEAD] = head if shardings is None else jax.device_put(
        head, shardings[HEAD])
    return params


@gin.configurable
class EncoderClassificationModel(ClassificationModel):
  """T5Gemma's encoder (of an EncoderDecoderConfig) with a head."""

  FEATURE_CONVERTER_CLS = (
      feature_converters.EncoderClassificationFeatureConverter)
  STACK = 'encoder'
  CAUSAL = False

  @property
  def stack_config(self) -> StackConfig:
    return self._config.encoder


@gin.configurable
class DecoderOnlyClassificationModel(ClassificationModel):
  """A decoder-only model (causal) with a head: the baseline."""

  FEATURE_CONVERTER_CLS = (
      feature_converters.DecoderClassificationFeatureConverter)
  STACK = 'decoder'
  CAUSAL = True


@gin.configurable
def classification_model(backbone: models.BaseModel = gin.REQUIRED,
                         num_classes: int = gin.REQUIRED,
                         dropout_rate: float = 0.1,
                         config=None) -> ClassificationModel:
  """The classifier that fits `backbone`'s kind.

  Args:
    backbone: The preset's model: an EncoderDecoderModel gives an encoder
      classifier, a DecoderOnlyModel a decoder-only one. Only its config is
      used.
    num_classes: Number of classes.
    dropout_rate: Dropout of the head.
    config: Replaces the backbone's config (`gin_utils.model_from_config`
      passes it to override stack fields such as the vocabulary size).

  Returns:
    An EncoderClassificationModel or DecoderOnlyClassificationModel.
  """
  config = config or backbone.config
  cls = (EncoderClassificationModel if config.is_encoder_decoder
         else DecoderOnlyClassificationModel)
  return cls(config, num_classes=num_classes, dropout_rate=dropout_rate)

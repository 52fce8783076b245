"""Knowledge distillation from a decoder-only teacher (T5Gemma's PrefixLM + KD).

The student is an encoder-decoder reading `inputs` and predicting `targets`;
the teacher is the decoder-only model it was adapted from. For target t the
teacher must see the same left context, `inputs + targets[:t]`, so the teacher
reads one sequence per example,

  [BOS, in_1, ..., in_n, tg_1, ..., tg_m-1]     positions 0 .. n+m-1

and its logits at `in_n, tg_1, ..., tg_m-1` are the next-token distributions
of `tg_1 .. tg_m`. In the batch this is the concatenation of

  A = encoder tokens shifted right per segment, BOS first  [b, enc_length]
  B = decoder inputs, each segment's BOS replaced by its
      last input token                                     [b, dec_length]

with the encoder's and decoder's segment ids, and positions that continue
from each segment's input length into its targets. Attention masks are built
from positions and segment ids (`kernels/masks.py`), so this one layout is
right for packed batches too; the teacher's logits are `B`'s, aligned with
the targets.

The loss is the soft cross-entropy `-sum_x P_T(x) log P_S(x)` over weighted
target tokens, optionally with a temperature (both distributions, loss scaled
by T^2 as in Hinton et al.), top-k truncation of the teacher, and mixing with
the hard-label cross-entropy. Defaults: pure distillation, T = 1, no top-k.
"""

from __future__ import annotations

from typing import Optional

import gin
import jax
import jax.numpy as jnp

from t5x_adapt import flops
from t5x_adapt import losses
from t5x_adapt.config import EncoderDecoderConfig, StackConfig
from t5x_adapt.losses import cross_entropy
from t5x_adapt.data.vocab import BOS_ID
from t5x_adapt.kernels import lm_head_loss
from t5x_adapt.models import Batch, DecoderOnlyModel
from t5x_adapt.models import EncoderDecoderModel, Params, stack_inputs


def teacher_sequence(batch: Batch, bos_id: int = BOS_ID):
  """The teacher's (tokens, positions, segment_ids), each [b, enc + dec length].

  See the module docstring; the teacher's logits from position `enc_length`
  on predict `decoder_target_tokens`.
  """
  enc_tokens, enc_pos, enc_seg = stack_inputs(batch, 'encoder',
                                              'encoder_input_tokens')
  dec_inputs, dec_pos, dec_seg = stack_inputs(
      batch, 'decoder', 'decoder_input_tokens', 'decoder_target_tokens')

  # A: each input segment shifted right by one, BOS first.
  shifted = jnp.pad(enc_tokens, ((0, 0), (1, 0)))[:, :-1]
  first = jnp.where(enc_pos == 0, bos_id, shifted)
  first = jnp.where(enc_seg > 0, first, 0)

  # For every decoder position, its segment's inputs: [b, dec, enc].
  same = (dec_seg[:, :, None] == enc_seg[:, None, :]) & (enc_seg[:, None, :] > 0)
  input_length = jnp.sum(same, axis=-1)
  last = jnp.max(jnp.where(same, jnp.arange(enc_tokens.shape[1]), 0), axis=-1)
  last_token = jnp.take_along_axis(enc_tokens, last, axis=-1)
  last_token = jnp.where(input_length > 0, last_token, bos_id)

  # B: decoder inputs whose segment-start BOS becomes the last input token.
  second = jnp.where((dec_pos == 0) & (dec_seg > 0), last_token, dec_inputs)
  tokens = jnp.concatenate([first, second], axis=1)
  positions = jnp.concatenate([enc_pos, dec_pos + input_length], axis=1)
  segment_ids = jnp.concatenate([enc_seg, dec_seg], axis=1)
  return tokens, positions, segment_ids


def distillation_loss(student_logits: jax.Array,
                      teacher_logits: jax.Array,
                      targets: jax.Array,
                      weights: Optional[jax.Array] = None,
                      *,
                      temperature: float = 1.0,
                      top_k: Optional[int] = None,
                      label_weight: float = 0.0,
                      z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """Soft cross-entropy of the student against the teacher, per target token.

  Args:
    student_logits: [b, t, v] float32.
    teacher_logits: [b, t, v] float32 (no gradient flows into them).
    targets: [b, t] target ids (for the hard-label term and metrics).
    weights: [b, t] loss weights; defaults to `targets > 0`.
    temperature: Softens both distributions; the soft loss is scaled by
      temperature**2 so its gradients keep their size.
    top_k: Keep the teacher's k most likely tokens (renormalised).
    label_weight: Weight of the hard-label cross-entropy; the soft loss has
      `1 - label_weight`.
    z_loss: Coefficient of the student's `log(Z)^2` penalty.

  Returns:
    (loss, metrics): metrics has the hard-label `cross_entropy` and
    `accuracy` of the student, `distillation` (the soft term), `loss` and
    `num_tokens`, as `losses.cross_entropy`.
  """
  per_token = losses.token_losses(student_logits, targets)
  per_token['soft'] = losses.soft_cross_entropy(
      student_logits, teacher_logits, temperature, top_k)
  sums = losses.weighted_sums(per_token,
                              losses.default_weights(targets, weights))
  return losses.distillation_metrics(sums, label_weight, z_loss)


@gin.configurable
class DistillationModel(EncoderDecoderModel):
  """An encoder-decoder student trained on a decoder-only teacher's outputs.

  The teacher's parameters are not part of the student's: the trainer passes
  them to `loss_fn` as `teacher_params` (sharded like the student, no
  gradient, evaluated inside the same jitted step). Without them `loss_fn`
  is the plain hard-label loss, so evaluation needs no teacher.

  Args:
    config: The student.
    teacher_config: The teacher's stack; default: the encoder's (the model
      the encoder was adapted from: the only one for balanced models, the
      larger one for unbalanced ones).
    temperature, top_k, label_weight: See `distillation_loss`.
    **kwargs: `EncoderDecoderModel` arguments; `loss_chunk_length` also
      chunks the teacher's LM head (`kernels.lm_head_loss`).
  """

  def __init__(self, config: EncoderDecoderConfig = gin.REQUIRED,
               teacher_config: Optional[StackConfig] = None,
               temperature: float = 1.0, top_k: Optional[int] = None,
               label_weight: float = 0.0, **kwargs):
    super().__init__(config, **kwargs)
    teacher_config = teacher_config or config.encoder.as_decoder_only()
    if teacher_config.vocab_size != config.decoder.vocab_size:
      raise ValueError(f'teacher vocabulary {teacher_config.vocab_size} != '
                       f'student vocabulary {config.decoder.vocab_size}')
    self.teacher = DecoderOnlyModel(teacher_config)
    self.temperature = temperature
    self.top_k = top_k
    self.label_weight = label_weight

  def train_step_flops(self, batch_shapes):
    """The student's step and the teacher's forward pass: BOS + inputs +
    the decoder inputs, logits for the targets only."""
    batch, inputs = batch_shapes['encoder_input_tokens']
    targets = batch_shapes['decoder_target_tokens'][1]
    return super().train_step_flops(batch_shapes) + batch * (
        flops.decoder_only_flops(self.teacher.config, inputs + targets,
                                 logit_positions=targets))

  def teacher_logits(self, teacher_params: Params, batch: Batch) -> jax.Array:
    """The teacher's float32 logits for each target position [b, t, v]."""
    return self._teacher_forward(
        teacher_params, batch,
        first_logit=batch['encoder_input_tokens'].shape[1])

  def teacher_head(self, teacher_params: Params,
                   batch: Batch) -> lm_head_loss.Head:
    """The teacher's LM head on its hidden states at the target positions
    [b, t, e_t] (what `teacher_logits` computes the logits of)."""
    hidden = self._teacher_forward(teacher_params, batch, return_hidden=True)
    enc_length = batch['encoder_input_tokens'].shape[1]
    return self.teacher.lm_head(teacher_params, hidden[:, enc_length:])

  def _teacher_forward(self, teacher_params, batch, **kwargs):
    tokens, positions, segment_ids = teacher_sequence(batch,
                                                      self.decoder_start_id)
    # A segment's inputs (in A) and targets (in B) lie apart, other segments
    # and padding between them: positions do not follow indices, so no
    # attention kernel may skip tiles by index (a sliding window measured in
    # indices would drop keys the position-based mask shows).
    return self.teacher.module.apply(
        {'params': teacher_params}, tokens, positions, segment_ids,
        index_ordered=False, **kwargs)

  def teacher_loss(self, teacher_params: Params, batch: Batch):
    """The teacher's own (loss, metrics) on the batch's targets."""
    return cross_entropy(self.teacher_logits(teacher_params, batch),
                         batch['decoder_target_tokens'],
                         batch.get('decoder_loss_weights'))

  def loss_fn(self, params: Params, batch: Batch,
              dropout_rng: Optional[jax.Array],
              teacher_params: Optional[Params] = None):
    """Distillation loss (hard-label loss without `teacher_params`)."""
    if teacher_params is None:
      return super().loss_fn(params, batch, dropout_rng)
    targets = batch['decoder_target_tokens']
    weights = batch.get('decoder_loss_weights')
    options = dict(temperature=self.temperature, top_k=self.top_k,
                   label_weight=self.label_weight, z_loss=self.z_loss)
    chunk = self.loss_chunk(targets.shape[1])
    if chunk is None:
      return distillation_loss(
          self.compute_logits(params, batch, dropout_rng),
          self.teacher_logits(teacher_params, batch), targets, weights,
          **options)
    student = self.lm_head(params,
                           self.compute_hidden(params, batch, dropout_rng))
    return lm_head_loss.chunked_distillation_loss(
        student, self.teacher_head(teacher_params, batch), targets, weights,
        chunk_length=chunk, **options)

"""The tied LM head, and its loss computed chunk by chunk of the sequence.

`lm_head_logits` is the one definition of the head: `softcap(hidden @
embedding.T)` in float32 (`Embed.attend`, hence every `Stack`, uses it).

With a large vocabulary the whole float32 logits [b, t, v] are the biggest
tensor of a train step (Gemma's 262144 tokens at 4096 targets: 4.3 GB a
sequence, again for a distillation teacher, plus softmaxes and gradients).
`chunked_cross_entropy` and `chunked_distillation_loss` never build them: a
`lax.scan` over chunks of `chunk_length` target positions computes each
chunk's logits [b, c, v] (the student's and the teacher's), the per-token
terms of `t5x_adapt.losses` on them, and adds up their weighted sums. Each
chunk runs under `jax.checkpoint`, so the backward pass recomputes a chunk's
logits instead of keeping them: peak memory is a few [b, c, v] buffers. The
sums go through the same reductions as the whole-logits losses
(`losses.cross_entropy_metrics`, `losses.distillation_metrics`), so loss,
metrics and gradients are the same up to float rounding of the sums.

A length the chunk does not divide is padded with zero-weight positions.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from t5x_adapt import losses
from t5x_adapt.kernels.softcap import softcap as apply_softcap
from t5x_adapt.kernels.matmul import matmul_2d

# 'auto' chunks when a row's logits (target length * vocab) exceed this, in
# chunks of at most this many logits per row: 64 MiB of float32 a row, 64
# positions of Gemma's 262144-token vocabulary (a few rows of them fill a
# TPU's 128-row matmul tiles).
AUTO_MAX_LOGITS = 2**24

ChunkSetting = Optional[Union[int, str]]


def lm_head_logits(hidden: jax.Array, embedding: jax.Array,
                   softcap: Optional[float] = None,
                   dtype: Any = jnp.float32) -> jax.Array:
  """Tied LM head: [b, t, e] x [v, e] -> float32 logits [b, t, v].

  Args:
    hidden: Final-normed hidden states [b, t, e].
    embedding: The embedding table [v, e]; cast to `dtype` for the matmul.
    softcap: `cap * tanh(logits / cap)` on the float32 logits, or None.
    dtype: The activation dtype of the matmul.
  """
  # One 2-D matmul over the flattened tokens: a [b, t] contraction in the
  # table's gradient would make XLA:CPU transpose the logits' gradient with
  # the softcap's backward fused in.
  logits = matmul_2d(hidden, embedding.astype(dtype).T, contract=1)
  logits = apply_softcap(logits.astype(jnp.float32), softcap)
  return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))


class Head(NamedTuple):
  """The arguments of `lm_head_logits` for one model's targets.

  Attributes:
    hidden: Final-normed hidden states [b, t, e], aligned with the targets.
    embedding: The tied table [v, e].
    softcap: The final logit softcap (None: none).
    dtype: Activation dtype of the matmul.
  """

  hidden: jax.Array
  embedding: jax.Array
  softcap: Optional[float] = None
  dtype: Any = jnp.float32

  def logits(self) -> jax.Array:
    """The whole float32 logits [b, t, v] (the reference path)."""
    return lm_head_logits(*self)


def auto_chunk_length(length: int, vocab: int,
                      max_logits: int = AUTO_MAX_LOGITS) -> Optional[int]:
  """The chunk length 'auto' picks, or None when whole logits are small.

  The largest divisor of `length` with `chunk * vocab <= max_logits` (at
  least 1), unless that is under half the largest allowed chunk (a length
  with no fitting divisor, e.g. a prime): then the largest allowed chunk,
  the last one padded.
  """
  if length * vocab <= max_logits:
    return None
  largest = max(1, max_logits // vocab)
  divisor = max(c for c in range(1, largest + 1) if length % c == 0)
  return divisor if 2 * divisor >= largest else largest


def check_chunk_setting(setting: ChunkSetting) -> ChunkSetting:
  """`setting` if it is None, 'auto' or a positive int, else ValueError."""
  if setting is None or setting == 'auto':
    return setting
  if isinstance(setting, int) and not isinstance(setting, bool) and (
      setting > 0):
    return setting
  raise ValueError(f'loss_chunk_length must be None, "auto" or a positive '
                   f'int, not {setting!r}')


def resolve_chunk_length(setting: ChunkSetting, length: int,
                         vocab: int) -> Optional[int]:
  """The chunk length of a `loss_chunk_length` setting for `length` targets
  (None: whole logits)."""
  if check_chunk_setting(setting) == 'auto':
    return auto_chunk_length(length, vocab)
  return setting if setting is None else min(setting, length)


def _split(x: jax.Array, chunk_length: int) -> jax.Array:
  """[b, t, ...] -> [n, b, c, ...], zero-padded to n * c positions."""
  b, t = x.shape[:2]
  n = -(-t // chunk_length)
  pad = [(0, 0), (0, n * chunk_length - t)] + [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, pad)
  return x.reshape(b, n, chunk_length, *x.shape[2:]).swapaxes(0, 1)


def _chunk_sums(heads: tuple[Head, ...], targets: jax.Array,
                weights: jax.Array, temperature: float,
                top_k: Optional[int]) -> dict:
  """Weighted sums of one chunk's per-token terms (`losses`).

  Args:
    heads: The student's head on the chunk [b, c, e], and optionally the
      teacher's.
    targets: [b, c] target ids.
    weights: [b, c] float32 loss weights.
    temperature, top_k: See `losses.soft_cross_entropy`.
  """
  logits = heads[0].logits()
  per_token = losses.token_losses(logits, targets)
  if len(heads) > 1:
    per_token['soft'] = losses.soft_cross_entropy(
        logits, heads[1].logits(), temperature, top_k)
  return losses.weighted_sums(per_token, weights)


def chunked_sums(student: Head, targets: jax.Array,
                 weights: Optional[jax.Array], chunk_length: int,
                 teacher: Optional[Head] = None, temperature: float = 1.0,
                 top_k: Optional[int] = None) -> dict:
  """`losses.weighted_sums` of the per-token terms, one chunk at a time.

  Args:
    student: The student's head; hidden [b, t, e].
    targets: [b, t] target ids.
    weights: [b, t] loss weights; defaults to `targets > 0`.
    chunk_length: Target positions per chunk.
    teacher: The teacher's head (hidden [b, t, e_t]); adds the `soft` sum.
    temperature, top_k: See `losses.soft_cross_entropy`.

  Returns:
    Scalar sums 'nll', 'log_z_sq', 'correct', 'weight' (and 'soft').
  """
  heads = (student,)
  if teacher is not None:
    # No gradient into the teacher: its cotangents are never even formed.
    heads += (teacher._replace(
        hidden=jax.lax.stop_gradient(teacher.hidden),
        embedding=jax.lax.stop_gradient(teacher.embedding)),)
  for name, head in zip(('student', 'teacher'), heads):
    if head.hidden.shape[:2] != targets.shape:
      raise ValueError(f'{name} hidden states {head.hidden.shape} do not '
                       f'match the targets {targets.shape}')
  if chunk_length < 1:
    raise ValueError(f'chunk_length must be positive, not {chunk_length}')
  weights = losses.default_weights(targets, weights)
  tables = tuple(head.embedding for head in heads)
  xs = (tuple(_split(head.hidden, chunk_length) for head in heads),
        _split(targets, chunk_length), _split(weights, chunk_length))

  # Only a chunk's inputs are saved; its logits are recomputed backwards.
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def sums_of(tables, xs):
    hiddens, chunk_targets, chunk_weights = xs
    chunk_heads = tuple(head._replace(hidden=hidden, embedding=table)
                        for head, hidden, table in zip(heads, hiddens, tables))
    return _chunk_sums(chunk_heads, chunk_targets, chunk_weights,
                       temperature, top_k)

  def step(total, xs):
    return jax.tree_util.tree_map(jnp.add, total, sums_of(tables, xs)), None

  first = jax.tree_util.tree_map(lambda x: x[0], xs)
  zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(sums_of, tables, first))
  total, _ = jax.lax.scan(step, zeros, xs)
  return total


def chunked_cross_entropy(student: Head, targets: jax.Array,
                          weights: Optional[jax.Array] = None, *,
                          chunk_length: int,
                          z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """`losses.cross_entropy` of the student's logits, never built whole.

  Args:
    student: The head; hidden [b, t, e].
    targets: [b, t] target ids.
    weights: [b, t] loss weights; defaults to `targets > 0`.
    chunk_length: Target positions per chunk.
    z_loss: Coefficient of the `log(Z)^2` auxiliary loss.

  Returns:
    (loss, metrics) as `losses.cross_entropy`.
  """
  sums = chunked_sums(student, targets, weights, chunk_length)
  return losses.cross_entropy_metrics(sums, z_loss)


def chunked_distillation_loss(
    student: Head, teacher: Head, targets: jax.Array,
    weights: Optional[jax.Array] = None, *, chunk_length: int,
    temperature: float = 1.0, top_k: Optional[int] = None,
    label_weight: float = 0.0, z_loss: float = 0.0) -> tuple[jax.Array, dict]:
  """`distillation.distillation_loss`, neither model's logits built whole.

  Args:
    student: The student's head; hidden [b, t, e].
    teacher: The teacher's head; hidden [b, t, e_t] at the same targets (no
      gradient flows into it).
    targets: [b, t] target ids.
    weights: [b, t] loss weights; defaults to `targets > 0`.
    chunk_length: Target positions per chunk.
    temperature, top_k: See `losses.soft_cross_entropy`.
    label_weight, z_loss: See `losses.distillation_metrics`.

  Returns:
    (loss, metrics) as `distillation.distillation_loss`.
  """
  sums = chunked_sums(student, targets, weights, chunk_length, teacher,
                      temperature, top_k)
  return losses.distillation_metrics(sums, label_weight, z_loss)

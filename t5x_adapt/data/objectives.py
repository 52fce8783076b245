"""Pretraining objectives as seqio preprocessors: UL2, PrefixLM, causal LM.

All of them run after tokenization on a `targets` feature holding one chunk of
a document (see `chunk_lengths`) and are configurable from gin.

* UL2 (Tay et al. 2022): a mixture of denoisers. R and X denoisers corrupt
  random spans (t5's `random_spans_noise_mask`) and replace each span by a
  sentinel in the inputs (t5's `noise_span_to_unique_sentinel`); the targets
  hold the spans, each after its sentinel. The S denoiser is a prefix-LM cut
  with about `noise_density` of the tokens in the targets. A mode token
  ([NLU] for R, [S2S] for S, [NLG] for X) leads every input.
* PrefixLM (T5Gemma): the chunk is cut into inputs and targets in proportion
  to their feature lengths (two equal halves when they are equal).
* Causal LM: the chunk is the target (decoder-only pretraining, the teacher).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Optional, Sequence

import gin
import seqio
from t5.data import preprocessors as t5_preprocessors
import tensorflow as tf

from t5x_adapt.data import vocab as vocab_lib


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """One UL2 denoiser.

  Attributes:
    mode: 'R' (regular spans), 'S' (sequential, prefix LM) or 'X' (extreme).
    noise_density: Fraction of the chunk's tokens that become targets.
    mean_span_length: Mean corrupted span length (None for S).
    rate: Mixing weight of this denoiser.
  """

  mode: str
  noise_density: float
  mean_span_length: Optional[float] = None
  rate: float = 1.0

  @property
  def max_target_fraction(self) -> float:
    """Upper bound of len(targets) / len(chunk), sentinels included."""
    if self.mean_span_length is None:
      return min(1.0, 1.5 * self.noise_density)
    return self.noise_density * (1.0 + 1.0 / self.mean_span_length)

  def num_spans(self, length: int) -> int:
    """Corrupted spans in a chunk of `length` tokens (as t5 computes it)."""
    if self.mean_span_length is None:
      return 1
    noise = min(max(round(length * self.noise_density), 1), length - 1)
    return max(round(noise / self.mean_span_length), 1)


# UL2's mixture of denoisers; S is sampled 20% of the time, the six span
# denoisers share the rest.
UL2_DENOISERS = (
    Denoiser('R', 0.15, 3.0, rate=0.8 / 6),
    Denoiser('R', 0.15, 8.0, rate=0.8 / 6),
    Denoiser('S', 0.25, None, rate=0.2),
    Denoiser('X', 0.5, 3.0, rate=0.8 / 6),
    Denoiser('X', 0.5, 8.0, rate=0.8 / 6),
    Denoiser('X', 0.15, 64.0, rate=0.8 / 6),
    Denoiser('X', 0.5, 64.0, rate=0.8 / 6),
)


def ul2_chunk_length(inputs_length: int, targets_length: int,
                     denoisers: Sequence[Denoiser] = UL2_DENOISERS) -> int:
  """Longest chunk whose corrupted inputs and targets fit every denoiser.

  Inputs never exceed chunk + 1 (the mode token); targets need
  `max_target_fraction` of the chunk plus EOS.
  """
  fraction = max(d.max_target_fraction for d in denoisers)
  return min(inputs_length - 1, int((targets_length - 1) / fraction))


def check_sentinels(denoisers: Sequence[Denoiser], chunk_length: int,
                    vocabulary: seqio.Vocabulary,
                    available: Optional[int] = None) -> None:
  """Raises if a denoiser needs more sentinels than the vocabulary reserves."""
  available = available or vocab_lib.num_sentinels(vocabulary)
  for d in denoisers:
    needed = d.num_spans(chunk_length)
    if needed > available:
      raise ValueError(
          f'UL2 denoiser {d} makes {needed} spans in a {chunk_length}-token '
          f'chunk, but the vocabulary reserves {available} sentinels; use '
          'shorter sequences or a vocabulary with more sentinels')


def _span_denoise(tokens, denoiser, vocabulary, seeds):
  mask = t5_preprocessors.random_spans_noise_mask(
      tf.size(tokens), denoiser.noise_density, seeds=seeds[:2],
      mean_noise_span_length=denoiser.mean_span_length)
  inputs = t5_preprocessors.noise_span_to_unique_sentinel(
      tokens, mask, vocabulary, seeds=None)
  targets = t5_preprocessors.nonnoise_span_to_unique_sentinel(
      tokens, mask, vocabulary, seeds=None)
  return inputs, targets


def _sequential_denoise(tokens, denoiser, seeds):
  """S denoiser: a prefix-LM cut, target fraction ~ U(0.5 d, 1.5 d)."""
  fraction = tf.random.stateless_uniform(
      [], seed=seeds[0], minval=0.5 * denoiser.noise_density,
      maxval=min(1.0, 1.5 * denoiser.noise_density))
  length = tf.size(tokens)
  num_targets = tf.cast(tf.round(tf.cast(length, tf.float32) * fraction),
                        tf.int32)
  num_targets = tf.clip_by_value(num_targets, 1, tf.maximum(length - 1, 1))
  return tokens[:length - num_targets], tokens[length - num_targets:]


@gin.configurable
def ul2_objective(dataset: tf.data.Dataset,
                  sequence_length: Mapping[str, int],
                  output_features: Mapping[str, seqio.Feature],
                  denoisers: Sequence[Denoiser] = UL2_DENOISERS,
                  mode_tokens: Optional[Mapping[str, int]] = None,
                  ) -> tf.data.Dataset:
  """Applies one denoiser, drawn by rate, to each chunk in `targets`.

  Args:
    dataset: Examples with a tokenized `targets` chunk.
    sequence_length: Unused (chunks are cut before); kept for seqio.
    output_features: Their `targets` vocabulary gives sentinels and modes.
    denoisers: The mixture.
    mode_tokens: {'R': id, 'S': id, 'X': id}; defaults to the vocabulary's.

  Returns:
    Examples with `inputs` ([mode] + corrupted chunk) and `targets`.
  """
  del sequence_length
  vocabulary = output_features['targets'].vocabulary
  modes = mode_tokens or vocab_lib.mode_token_ids(vocabulary)
  logits = tf.math.log([d.rate for d in denoisers])[None, :]

  @seqio.map_over_dataset(num_seeds=2)
  def corrupt(features, seeds):
    tokens = features['targets']
    choice = tf.random.stateless_categorical(
        logits, 1, seed=seeds[0], dtype=tf.int32)[0, 0]
    split = tf.random.experimental.stateless_split(seeds[1], 2)

    def branch(d):
      if d.mean_span_length is None:
        inputs, targets = _sequential_denoise(tokens, d, split)
      else:
        inputs, targets = _span_denoise(tokens, d, vocabulary, split)
      mode = tf.constant([modes[d.mode]], tokens.dtype)
      return tf.concat([mode, inputs], 0), targets

    inputs, targets = tf.switch_case(
        choice, [functools.partial(branch, d) for d in denoisers])
    return dict(features, inputs=inputs, targets=targets,
                denoiser=choice)

  return corrupt(dataset)


@gin.configurable
def prefix_lm_objective(dataset: tf.data.Dataset,
                        sequence_length: Mapping[str, int],
                        output_features=None) -> tf.data.Dataset:
  """Cuts each chunk into `inputs` and `targets` (T5Gemma's PrefixLM).

  The cut point is at the fraction inputs_length / (inputs + targets lengths)
  of the chunk, so full chunks split exactly into the two feature lengths.
  """
  del output_features
  share = sequence_length['inputs'] / (sequence_length['inputs'] +
                                       sequence_length['targets'])

  @seqio.map_over_dataset
  def cut(features):
    tokens = features['targets']
    length = tf.size(tokens)
    point = tf.cast(tf.math.ceil(tf.cast(length, tf.float32) * share),
                    tf.int32)
    point = tf.clip_by_value(point, 1, tf.maximum(length - 1, 1))
    return dict(features, inputs=tokens[:point], targets=tokens[point:])

  return cut(dataset)


def chunk_lengths(objective: str, inputs_length: int,
                  targets_length: int) -> int:
  """Tokens per document chunk that an objective consumes."""
  if objective == 'ul2':
    return ul2_chunk_length(inputs_length, targets_length)
  if objective == 'prefix_lm':
    return inputs_length + targets_length
  if objective in ('lm', 'span_corruption'):
    return targets_length
  raise ValueError(f'unknown objective {objective!r}')


@gin.configurable
def split_into_chunks(dataset: tf.data.Dataset,
                      sequence_length: Mapping[str, int],
                      output_features=None,
                      objective: str = gin.REQUIRED,
                      min_chunk_tokens: int = 8) -> tf.data.Dataset:
  """Splits tokenized documents into chunks sized for `objective`.

  Documents far longer than a sequence become many chunks; the short tail of
  a document (under `min_chunk_tokens`) is dropped.
  """
  del output_features
  length = chunk_lengths(objective, sequence_length.get('inputs', 0),
                         sequence_length['targets'])
  dataset = t5_preprocessors.split_tokens(
      dataset, max_tokens_per_segment=length, feature_key='targets')
  return dataset.filter(lambda x: tf.size(x['targets']) >= min_chunk_tokens)

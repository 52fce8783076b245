"""Instruction tuning (SFT) data in Gemma's turn template, as seqio steps.

One exchange of a prompt and a response is written

  <start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n{response}<end_of_turn>\\n

and split where the model starts to speak, so the loss covers the response
only:

  inputs   <start_of_turn>user\\n{prompt}<end_of_turn>\\n<start_of_turn>model\\n
  targets  {response}<end_of_turn>  (then EOS, by the task's feature)

An encoder-decoder reads `inputs` in its encoder and learns `targets`. A
decoder-only model reads one sequence, inputs then targets
(`feature_converters.DecoderFeatureConverter` with `inputs`: seqio's
prefix-LM converter), whose `decoder_loss_weights` are zero on the inputs;
seqio also marks the inputs with `decoder_causal_attention`, so the prompt is
read bidirectionally (prefix LM). The template's closing newline only
separates turns, so single-turn targets end at `<end_of_turn>`; EOS ends
decoding.

The template's parts are tokenized one by one, as transformers' tokenizer
does around special tokens, and a too long exchange loses the end of its
prompt text or of its response, never the markers around them. How the
markers are spelled depends on the vocabulary. Gemma 3's has
`<start_of_turn>` and `<end_of_turn>` as single pieces (ids 105 and 106,
CONTROL pieces, so text never produces them): they are spliced in as ids. A
vocabulary without them (the corpus model `spm8k`) spells them as text,
several ordinary pieces (the same ones wherever they stand); its normaliser
also turns newlines into spaces.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import seqio
import tensorflow as tf

START_OF_TURN = '<start_of_turn>'
END_OF_TURN = '<end_of_turn>'
MARKERS = (START_OF_TURN, END_OF_TURN)

Part = Union[str, tf.Tensor]


def turn_marker_ids(vocabulary: seqio.Vocabulary) -> Optional[dict[str, int]]:
  """{marker: id} where `vocabulary` has both markers as single pieces.

  None means the markers are spelled as text.
  """
  tokenizer = getattr(vocabulary, 'tokenizer', None)
  if tokenizer is None:
    return None
  ids = {marker: tokenizer.piece_to_id(marker) for marker in MARKERS}
  if all(tokenizer.id_to_piece(i) == m for m, i in ids.items()):
    return ids
  return None


def prompt_parts(prompt: Part) -> list[Part]:
  """The user turn and the opening of the model's turn (the inputs)."""
  return [START_OF_TURN, tf.strings.join(['user\n', prompt]), END_OF_TURN,
          '\n', START_OF_TURN, 'model\n']


def response_parts(response: Part) -> list[Part]:
  """The model's answer and the end of its turn (the targets)."""
  return [response, END_OF_TURN]


# The parts cut when an exchange is too long: the user's text, the answer.
PROMPT_TEXT_PART = 1
RESPONSE_PART = 0


# Chat roles -> the template's turn names (Gemma has no system turn).
TURN_NAMES = {'user': 'user', 'assistant': 'model', 'model': 'model'}
SYSTEM_ROLES = ('system', 'developer')


def chat_parts(messages: Sequence[tuple[str, str]]) -> list[str]:
  """A conversation of (role, text) messages as template parts, ending
  with the opening of the model's turn (what the model continues).

  System (or developer) text opens the first user turn, as Gemma's own chat
  template does.

  Raises:
    ValueError: an unknown role, or a conversation that does not end with
      a user turn.
  """
  system = [text for role, text in messages if role in SYSTEM_ROLES]
  turns = [(role, text) for role, text in messages if role not in SYSTEM_ROLES]
  for role, _ in turns:
    if role not in TURN_NAMES:
      raise ValueError(f'unknown role {role!r} (roles: user, assistant, '
                       f'system)')
  if not turns or TURN_NAMES[turns[-1][0]] != 'user':
    raise ValueError('the last message must be a user message')
  parts = []
  for i, (role, text) in enumerate(turns):
    if i == 0 and system and role == 'user':
      text = '\n\n'.join(system + [text])
    parts += [START_OF_TURN, f'{TURN_NAMES[role]}\n{text}', END_OF_TURN, '\n']
  return parts + [START_OF_TURN, 'model\n']


def template_text(prompt: str, response: str) -> str:
  """The whole exchange as text, the template's closing newline included."""
  return (f'{START_OF_TURN}user\n{prompt}{END_OF_TURN}\n'
          f'{START_OF_TURN}model\n{response}{END_OF_TURN}\n')


def encode_parts(vocabulary: seqio.Vocabulary, parts: Sequence[Part],
                 max_length: Optional[int] = None,
                 cut_part: int = 0) -> tf.Tensor:
  """int32 token ids of template `parts` (markers and text), one by one.

  Args:
    vocabulary: Markers it has as single pieces become their ids; others
      are tokenized as text.
    parts: Markers and text.
    max_length: Cut part `cut_part` so that everything fits (None: no cut).
    cut_part: Index of the part to cut.

  Returns:
    [length] ids.
  """
  ids = turn_marker_ids(vocabulary) or {}
  pieces = [tf.constant([ids[part]], tf.int32)
            if isinstance(part, str) and part in ids
            else vocabulary.encode_tf(part) for part in parts]
  if max_length is not None:
    others = sum(tf.size(p) for i, p in enumerate(pieces) if i != cut_part)
    pieces[cut_part] = pieces[cut_part][:tf.maximum(max_length - others, 0)]
  return tf.concat(pieces, axis=0)


def _joined(parts: Sequence[Part]) -> tf.Tensor:
  return tf.strings.join(list(parts))


def _room(feature: seqio.Feature, sequence_length, key: str):
  """Tokens the template may take in `key` (None: unlimited)."""
  length = (sequence_length or {}).get(key)
  return None if length is None else length - int(feature.add_eos)


def format_turns(dataset: tf.data.Dataset,
                 output_features: Mapping[str, seqio.Feature],
                 sequence_length: Optional[Mapping[str, int]] = None
                 ) -> tf.data.Dataset:
  """{'prompt', 'response'} text -> tokenized `inputs` and `targets`.

  Replaces `seqio.preprocessors.tokenize` in an SFT task; the task's
  `targets` feature adds EOS (`append_eos_after_trim` after this step).
  With `sequence_length`, the prompt text and the response are cut to fit
  (room left for EOS), so the markers always stay. `inputs_pretokenized` /
  `targets_pretokenized` keep the (uncut) template text and bare response.
  Other features pass through.
  """
  inputs_feature = output_features['inputs']
  targets_feature = output_features['targets']
  inputs_room = _room(inputs_feature, sequence_length, 'inputs')
  targets_room = _room(targets_feature, sequence_length, 'targets')

  def format_one(example):
    prompt = prompt_parts(example['prompt'])
    out = {k: v for k, v in example.items()
           if k not in ('prompt', 'response')}
    out.update(
        inputs=encode_parts(inputs_feature.vocabulary, prompt, inputs_room,
                            PROMPT_TEXT_PART),
        targets=encode_parts(targets_feature.vocabulary,
                             response_parts(example['response']),
                             targets_room, RESPONSE_PART),
        inputs_pretokenized=_joined(prompt),
        targets_pretokenized=example['response'])
    return out

  return dataset.map(format_one, num_parallel_calls=tf.data.AUTOTUNE)


def strip_end_of_turn(text: str, **unused_kwargs) -> str:
  """A decoded response without the end-of-turn marker (spelled as text in
  vocabularies that lack it) and surrounding white space."""
  del unused_kwargs
  return text.split(END_OF_TURN)[0].strip()

"""Rebuilds a SentencePiece model from a GGUF file's tokenizer metadata.

A GGUF (llama.cpp's file format) of a Gemma model carries no
`tokenizer.model`, only the vocabulary as metadata: each piece's text, score
and type, plus the special token ids. `gguf_tokenizer` turns that back into a
SentencePiece `ModelProto`, so `sentencepiece.SentencePieceProcessor` and
`seqio.SentencePieceVocabulary` can load it.

Gemma's tokenizer is a byte-fallback BPE with an identity normalizer and no
dummy prefix. Two things in the GGUF are not as SentencePiece wants them:

* Runs of 2 to 31 spaces (ids 138-167 in Gemma 3) are spelled with literal
 spaces (' ') and typed USER_DEFINED. SentencePiece turns every space of the
 input into '▁' (U+2581) before it matches pieces, so pieces spelled with
 ' ' could never match and a run of spaces came out as one '▁' per space.
 They are respelled with '▁' and typed NORMAL, so that BPE builds them from
 single spaces like any other merge (which is also how transformers' GGUF
 loader treats them). Kept USER_DEFINED, SentencePiece would instead match
 the longest run greedily, which differs for runs over 31 spaces (40
 spaces: 31 + 9 greedily, 16 + 24 by BPE).
* `<unk>` is typed CONTROL, but SentencePiece needs exactly one UNKNOWN piece.

BPE merge priority follows the order of the pieces in the file: each NORMAL
piece gets the score `-index`. For the NORMAL pieces of a Gemma GGUF this
orders them exactly as their own scores do, and it ranks the respelled space
runs (which carry a placeholder score of -1000) where their ids put them.
"""

import dataclasses
import os
import pathlib
import tempfile
from typing import Any, Sequence

import gguf
import numpy as np
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

_GGUF_MAGIC = b'GGUF'
_SPACE = ' '
_ESCAPED_SPACE = '\u2581'  # '▁', how SentencePiece writes a space.

# GGUF token types (llama.cpp's llama_token_type) share SentencePiece's
# numbering: 1 NORMAL, 2 UNKNOWN, 3 CONTROL, 4 USER_DEFINED, 5 UNUSED, 6 BYTE.
_PieceType = sentencepiece_model_pb2.ModelProto.SentencePiece.Type
_VALID_TYPES = frozenset(_PieceType.values())

_TOKENS = 'tokenizer.ggml.tokens'
_SCORES = 'tokenizer.ggml.scores'
_TOKEN_TYPE = 'tokenizer.ggml.token_type'
_MODEL = 'tokenizer.ggml.model'
_UNK_ID = 'tokenizer.ggml.unknown_token_id'
_BOS_ID = 'tokenizer.ggml.bos_token_id'
_EOS_ID = 'tokenizer.ggml.eos_token_id'
_PAD_ID = 'tokenizer.ggml.padding_token_id'
_ADD_SPACE_PREFIX = 'tokenizer.ggml.add_space_prefix'
# llama.cpp's name for a SentencePiece-style vocabulary.
_SENTENCEPIECE_MODEL = 'llama'


@dataclasses.dataclass(frozen=True)
class GGUFVocab:
  """The tokenizer metadata of a GGUF file.

  Attributes:
    pieces: each token's text, in id order.
    scores: each token's score.
    types: each token's GGUF type (same numbers as SentencePiece's).
    unk_id: id of the unknown token.
    bos_id: id of the beginning-of-sequence token, or -1 if none.
    eos_id: id of the end-of-sequence token, or -1 if none.
    pad_id: id of the padding token, or -1 if none.
    add_space_prefix: whether a space is put before the text.
  """
  pieces: Sequence[str]
  scores: np.ndarray
  types: np.ndarray
  unk_id: int
  bos_id: int
  eos_id: int
  pad_id: int
  add_space_prefix: bool


def gguf_tokenizer(gguf_path: str | os.PathLike[str],
                   out_path: str | os.PathLike[str]) -> pathlib.Path:
  """Writes a SentencePiece model rebuilt from a GGUF's tokenizer metadata.

  Args:
    gguf_path: a GGUF file with a SentencePiece-style ('llama') vocabulary,
      such as a Gemma 3 GGUF.
    out_path: where to write the `.model` file; its directory is created
      if needed, and the file is replaced atomically.

  Returns:
    `out_path` as a `pathlib.Path`.

  Raises:
    FileNotFoundError: if `gguf_path` does not exist.
    ValueError: naming the file, if it is not a GGUF file, lacks a
      tokenizer field, or its vocabulary is not one SentencePiece can
      represent.
  """
  gguf_path = pathlib.Path(gguf_path)
  vocab = read_gguf_vocab(gguf_path)
  proto = build_model_proto(vocab)
  serialized = proto.SerializeToString()
  _check_loadable(serialized, gguf_path)
  out_path = pathlib.Path(out_path)
  _write_atomically(out_path, serialized)
  return out_path


def read_gguf_vocab(gguf_path: str | os.PathLike[str]) -> GGUFVocab:
  """Reads the tokenizer metadata of a GGUF file.

  Args:
    gguf_path: the GGUF file.

  Returns:
    The file's vocabulary and special token ids.

  Raises:
    FileNotFoundError: if `gguf_path` does not exist.
    ValueError: naming the file, if it is not GGUF, lacks a tokenizer
      field, or describes a vocabulary other than SentencePiece's.
  """
  gguf_path = pathlib.Path(gguf_path)
  reader = _open_reader(gguf_path)
  model = _read_scalar(reader, _MODEL, gguf_path)
  if model != _SENTENCEPIECE_MODEL:
    raise ValueError(
        f'{gguf_path}: {_MODEL} is {model!r}; only SentencePiece '
        f'vocabularies ({_SENTENCEPIECE_MODEL!r}) can be rebuilt.')
  pieces = _read_strings(reader, _TOKENS, gguf_path)
  scores = _read_numbers(reader, _SCORES, gguf_path, np.float32)
  types = _read_numbers(reader, _TOKEN_TYPE, gguf_path, np.int32)
  _check_lengths(gguf_path, len(pieces), scores, types)
  return GGUFVocab(
      pieces=pieces,
      scores=scores,
      types=types,
      unk_id=int(_read_scalar(reader, _UNK_ID, gguf_path)),
      bos_id=int(_read_scalar(reader, _BOS_ID, gguf_path, default=-1)),
      eos_id=int(_read_scalar(reader, _EOS_ID, gguf_path, default=-1)),
      pad_id=int(_read_scalar(reader, _PAD_ID, gguf_path, default=-1)),
    # Gemma GGUFs state False; a file without the key is taken to be
    # Gemma-like too.
      add_space_prefix=bool(
          _read_scalar(reader, _ADD_SPACE_PREFIX, gguf_path,
                       default=False)),
  )


def build_model_proto(vocab: GGUFVocab) -> sentencepiece_model_pb2.ModelProto:
  """Builds a byte-fallback BPE SentencePiece model from a GGUF vocabulary.

  Args:
    vocab: the vocabulary read by `read_gguf_vocab`.

  Returns:
    The SentencePiece model.
  """
  proto = sentencepiece_model_pb2.ModelProto()
  for index, (text, gguf_type) in enumerate(zip(vocab.pieces, vocab.types)):
    piece = proto.pieces.add()
    piece.piece, piece.type = _piece_text_and_type(
        index, text, int(gguf_type), vocab.unk_id)
    # Only NORMAL pieces take part in BPE merges; the rest keep the
    # file's score, which SentencePiece does not use for them.
    if piece.type == _PieceType.NORMAL:
      piece.score = -float(index)
    else:
      piece.score = float(vocab.scores[index])
  _set_trainer_spec(proto.trainer_spec, vocab)
  _set_normalizer_spec(proto.normalizer_spec, vocab)
  return proto


def _piece_text_and_type(index: int, text: str, gguf_type: int,
                         unk_id: int) -> tuple[str, int]:
  """Returns a piece's SentencePiece spelling and type."""
  if index == unk_id:
    # The GGUF types <unk> CONTROL; SentencePiece needs it UNKNOWN.
    return text, _PieceType.UNKNOWN
  if gguf_type not in _VALID_TYPES:
    # llama.cpp has no other types; an odd value is best left unused.
    return text, _PieceType.UNUSED
  if gguf_type == _PieceType.UNKNOWN:
    # Only the piece at unk_id may be UNKNOWN in SentencePiece.
    return text, _PieceType.CONTROL
  if text and text.strip(_SPACE) == '':
    # A run of spaces spelled with ' ': SentencePiece only ever sees '▁'
    # in its normalized input, so respell it and let BPE build it from
    # single spaces, like any other NORMAL piece.
    return text.replace(_SPACE, _ESCAPED_SPACE), _PieceType.NORMAL
  return text, gguf_type


def _set_trainer_spec(spec: Any, vocab: GGUFVocab) -> None:
  """Fills the TrainerSpec: model type, byte fallback and special ids.

  Encoding reads only the model type, `byte_fallback` and the special ids
  and pieces. The digit and whitespace options below do not change how a
  BPE model encodes (checked against this module's tests); they record how
  Gemma's tokenizer was trained, for anyone reading the model.
  """
  spec.model_type = sentencepiece_model_pb2.TrainerSpec.BPE
  spec.vocab_size = len(vocab.pieces)
  spec.byte_fallback = True
  spec.split_digits = True
  spec.allow_whitespace_only_pieces = True
  spec.split_by_whitespace = True
  spec.treat_whitespace_as_suffix = False
  for name in ('unk', 'bos', 'eos', 'pad'):
    token_id = getattr(vocab, f'{name}_id')
    setattr(spec, f'{name}_id', token_id)
    # SentencePiece finds bos/eos/pad by piece text, so it must match.
    if 0 <= token_id < len(vocab.pieces):
      setattr(spec, f'{name}_piece', vocab.pieces[token_id])


def _set_normalizer_spec(spec: Any, vocab: GGUFVocab) -> None:
  """Makes the normalizer only turn spaces into '▁', as Gemma's does."""
  spec.name = 'identity'
  spec.precompiled_charsmap = b''
  spec.add_dummy_prefix = vocab.add_space_prefix
  spec.remove_extra_whitespaces = False
  spec.escape_whitespaces = True


def _open_reader(gguf_path: pathlib.Path) -> gguf.GGUFReader:
  """Opens a GGUF file, with a clear error for anything that is not one."""
  if not gguf_path.is_file():
    raise FileNotFoundError(f'No GGUF file at {gguf_path}.')
  with open(gguf_path, 'rb') as handle:
    magic = handle.read(len(_GGUF_MAGIC))
  if magic != _GGUF_MAGIC:
    raise ValueError(
        f'{gguf_path} is not a GGUF file (it starts with {magic!r}, not '
        f'{_GGUF_MAGIC!r}).')
  try:
    return gguf.GGUFReader(gguf_path)
  except (ValueError, IndexError, KeyError) as error:
    # A truncated or corrupt header shows up as any of these.
    raise ValueError(f'{gguf_path} is not a valid GGUF file: {error}') \
        from error


def _field(reader: gguf.GGUFReader, key: str,
           gguf_path: pathlib.Path) -> gguf.ReaderField:
  field = reader.get_field(key)
  if field is None:
    raise ValueError(f'{gguf_path} has no tokenizer field {key!r}.')
  return field


def _read_scalar(reader: gguf.GGUFReader, key: str, gguf_path: pathlib.Path,
                 default: Any = None) -> Any:
  """Reads a string, number or bool field; `default` if absent and given."""
  if default is not None and reader.get_field(key) is None:
    return default
  field = _field(reader, key, gguf_path)
  if len(field.types) != 1:
    raise ValueError(f'{gguf_path}: field {key!r} is not a single value.')
  value = field.parts[field.data[0]]
  if field.types[0] == gguf.GGUFValueType.STRING:
    return bytes(value).decode('utf-8')
  return value[0].item()


def _read_strings(reader: gguf.GGUFReader, key: str,
                  gguf_path: pathlib.Path) -> list[str]:
  """Reads an array of strings, decoding each straight from the file."""
  field = _field(reader, key, gguf_path)
  _check_array_type(field, key, gguf_path, gguf.GGUFValueType.STRING)
  parts = field.parts
  return [bytes(parts[index]).decode('utf-8') for index in field.data]


def _read_numbers(reader: gguf.GGUFReader, key: str, gguf_path: pathlib.Path,
                  dtype: type[np.generic]) -> np.ndarray:
  """Reads an array of numbers into one numpy array of `dtype`."""
  field = _field(reader, key, gguf_path)
  _check_array_type(field, key, gguf_path)
  if not field.data:
    return np.zeros(0, dtype)
  # Each element is a one-item view into the mapped file; joining them at
  # once is far faster than converting them one by one.
  return np.concatenate([field.parts[i] for i in field.data]).astype(dtype)


def _check_array_type(field: gguf.ReaderField, key: str,
                      gguf_path: pathlib.Path,
                      item_type: gguf.GGUFValueType | None = None) -> None:
  """Checks that `field` is an array (of `item_type`, if given)."""
  is_array = field.types and field.types[0] == gguf.GGUFValueType.ARRAY
  if not is_array or (item_type is not None and
                      field.types[1:] not in ([], [item_type])):
    raise ValueError(
        f'{gguf_path}: field {key!r} has type {field.types}, expected an '
        f'array{f" of {item_type.name}" if item_type else ""}.')


def _check_lengths(gguf_path: pathlib.Path, count: int, scores: np.ndarray,
                   types: np.ndarray) -> None:
  if not len(scores) == len(types) == count:
    raise ValueError(
        f'{gguf_path}: {_TOKENS}, {_SCORES} and {_TOKEN_TYPE} have '
        f'{count}, {len(scores)} and {len(types)} entries; they must '
        f'agree.')


def _check_loadable(serialized: bytes, gguf_path: pathlib.Path) -> None:
  """Fails early, naming the source, if SentencePiece rejects the model."""
  try:
    sentencepiece.SentencePieceProcessor(model_proto=serialized)
  except (RuntimeError, OSError) as error:
    raise ValueError(
        f'The SentencePiece model rebuilt from {gguf_path} does not load: '
        f'{error}') from error


def _write_atomically(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same folder."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name,
                                  suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as handle:
      handle.write(data)
    os.chmod(tmp_name, 0o644)
    os.replace(tmp_name, path)
  finally:
    pathlib.Path(tmp_name).unlink(missing_ok=True)

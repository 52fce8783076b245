"""Vocabularies: the Gemma 3 SentencePiece model and a corpus-trained one.

Both follow Gemma's special ids (pad 0, eos 1, bos 2, unk 3) and T5's sentinel
convention (t5.data.preprocessors.sentinel_id): sentinel i is id
`vocab_size - 1 - i`, so t5's span-corruption functions work unchanged. Both
reserve three UL2 mode tokens.

* Gemma 3 (262,144 pieces): its 6,242 `<unusedN>` pieces are CONTROL pieces,
  which text never produces: `<unused0>` .. `<unused98>` are ids 6 .. 104 and
  `<unused99>` .. `<unused6241>` end the vocabulary (ids 256001 .. 262143).
  Sentinels are therefore `<unused6241>`, `<unused6240>`, ... (6,143 of
  them) and the mode tokens [NLU], [S2S], [NLG] are `<unused0>`,
  `<unused1>`, `<unused2>` (ids 6, 7, 8).
* The corpus model (8,192 pieces) is trained here from the corpus train split
  with a fixed seed; its mode tokens are CONTROL pieces `[NLU]`, `[S2S]`,
  `[NLG]` (ids 4-6) and its last 100 ids are CONTROL pieces `<extra_id_99>` ...
  `<extra_id_0>`.
"""

from __future__ import annotations

import functools
import pathlib
import tempfile
from typing import Iterable

import seqio
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from t5x_adapt import assets

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
NUM_SENTINELS = 100
CORPUS_VOCAB_SIZE = 8192
CORPUS_SEED = 0
# UL2 denoiser family -> mode token piece.
CORPUS_MODE_PIECES = {'R': '[NLU]', 'S': '[S2S]', 'X': '[NLG]'}
GEMMA3_MODE_PIECES = {'R': '<unused0>', 'S': '<unused1>', 'X': '<unused2>'}

_Piece = sentencepiece_model_pb2.ModelProto.SentencePiece


def mode_token_ids(vocabulary: seqio.SentencePieceVocabulary) -> dict[str, int]:
  """{'R': id, 'S': id, 'X': id} of the UL2 mode tokens of `vocabulary`."""
  processor = vocabulary.tokenizer
  for pieces in (CORPUS_MODE_PIECES, GEMMA3_MODE_PIECES):
    ids = {k: processor.piece_to_id(p) for k, p in pieces.items()}
    if all(processor.id_to_piece(i) == pieces[k] for k, i in ids.items()):
      return ids
  raise ValueError(f'{vocabulary.sentencepiece_model_file}: no UL2 mode '
                   'tokens (expected [NLU]/[S2S]/[NLG] or <unused0..2>)')


def num_sentinels(vocabulary: seqio.SentencePieceVocabulary) -> int:
  """Trailing CONTROL pieces that serve as sentinels (mode tokens excluded)."""
  processor = vocabulary.tokenizer
  reserved = set(mode_token_ids(vocabulary).values())
  count = 0
  for token in range(vocabulary.vocab_size - 1, -1, -1):
    if not processor.is_control(token) or token in reserved:
      break
    count += 1
  return count


def sentinel_ids(vocabulary: seqio.Vocabulary, count: int) -> list[int]:
  """The first `count` sentinel ids, as t5's preprocessors assign them."""
  return [vocabulary.vocab_size - 1 - i for i in range(count)]


def gemma3_model_path() -> pathlib.Path:
  """Where Gemma 3's SentencePiece model is cached (it may not exist yet)."""
  return assets.gemma3_270m_dir() / assets.GEMMA3_TOKENIZER_FILENAME


def gemma3_model_file() -> pathlib.Path:
  """Gemma 3's SentencePiece model, rebuilt from the real 270M GGUF once."""
  from t5x_adapt.convert import gguf_tokenizer  # pylint: disable=g-import-not-at-top
  path = gemma3_model_path()
  if not path.exists():
    gguf_tokenizer(assets.gemma3_270m_gguf(), path)
  return path


@functools.cache
def gemma3_vocabulary() -> seqio.SentencePieceVocabulary:
  """Gemma 3's tokenizer as a seqio vocabulary (built on first use)."""
  return seqio.SentencePieceVocabulary(str(gemma3_model_file()))


def train_corpus_model(texts: Iterable[str], out: pathlib.Path,
                       vocab_size: int = CORPUS_VOCAB_SIZE,
                       seed: int = CORPUS_SEED) -> pathlib.Path:
  """Trains the corpus SentencePiece model and appends the sentinels.

  Args:
    texts: Training documents (their lines are the training sentences).
    out: Where to write the `.model` file.
    vocab_size: Total ids, sentinels included.
    seed: SentencePiece's random seed (sampling of sentences).

  Returns:
    `out`.
  """
  out = pathlib.Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  sentencepiece.set_random_generator_seed(seed)
  with tempfile.TemporaryDirectory() as tmp:
    corpus = pathlib.Path(tmp) / 'corpus.txt'
    with corpus.open('w', encoding='utf-8') as f:
      for text in texts:
        for line in text.splitlines():
          if line.strip():
            f.write(line.strip() + '\n')
    prefix = pathlib.Path(tmp) / 'spm'
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix),
        vocab_size=vocab_size - NUM_SENTINELS, model_type='unigram',
        character_coverage=1.0, byte_fallback=True, split_digits=True,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        control_symbols=list(CORPUS_MODE_PIECES.values()),
        input_sentence_size=300_000, shuffle_input_sentence=True,
        num_threads=1, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto.FromString(
        pathlib.Path(f'{prefix}.model').read_bytes())
  # Temporary paths would make the file differ from run to run.
  proto.trainer_spec.input[:] = ['corpus.txt']
  proto.trainer_spec.model_prefix = 'corpus_spm'
  for i in reversed(range(NUM_SENTINELS)):
    proto.pieces.append(_Piece(piece=f'<extra_id_{i}>', score=0.0,
                               type=_Piece.CONTROL))
  tmp_out = out.with_suffix('.tmp')
  tmp_out.write_bytes(proto.SerializeToString())
  tmp_out.replace(out)
  return out


def corpus_model_path() -> pathlib.Path:
  from t5x_adapt.data import sources  # pylint: disable=g-import-not-at-top
  return sources.data_dir() / f'corpus_spm{CORPUS_VOCAB_SIZE // 1024}k.model'


@functools.cache
def corpus_vocabulary() -> seqio.SentencePieceVocabulary:
  """The corpus-trained vocabulary; trained on first use, then cached."""
  from t5x_adapt.data import sources  # pylint: disable=g-import-not-at-top
  path = corpus_model_path()
  if not path.exists():
    sources.prepare()
    train_corpus_model(sources.corpus_text('train'), path)
  return seqio.SentencePieceVocabulary(str(path))


def checkpoint_vocabulary(checkpoint_path: str,
                          vocabulary: str | None = None
                          ) -> seqio.SentencePieceVocabulary:
  """The vocabulary a checkpoint's text is tokenized with.

  Args:
    checkpoint_path: Any checkpoint the one loader reads.
    vocabulary: A SentencePiece model file; when given, it wins.

  Returns:
    `vocabulary`'s, else the checkpoint's own: a transformers directory's
    `tokenizer.model`, a GGUF file's tokenizer (rebuilt as a SentencePiece
    model, `convert.gguf_tokenizer`), the `tokenizer.model` beside a gemma
    library checkpoint (Kaggle's layout). Our Orbax checkpoints carry none
    yet.

  Raises:
    ValueError: naming the checkpoint, when it has no SentencePiece
      tokenizer and no `vocabulary` is given.
  """
  if vocabulary:
    return seqio.SentencePieceVocabulary(str(vocabulary))
  path = pathlib.Path(checkpoint_path)
  if path.suffix == '.gguf':
    # The function: `convert` exports it under its module's name.
    from t5x_adapt.convert import gguf_tokenizer  # pylint: disable=g-import-not-at-top
    out = pathlib.Path(tempfile.mkdtemp()) / f'{path.stem}.model'
    return seqio.SentencePieceVocabulary(str(gguf_tokenizer(path, out)))
  if (path / 'tokenizer.model').exists():
    return seqio.SentencePieceVocabulary(str(path / 'tokenizer.model'))
  ours = (path / 't5x_adapt.json').exists()
  if ((path / '_METADATA').exists() and not ours
      and (path.parent / 'tokenizer.model').exists()):
    # An Orbax tree not written by us, with a tokenizer beside it: Kaggle's
    # layout of the gemma library's checkpoints.
    return seqio.SentencePieceVocabulary(str(path.parent / 'tokenizer.model'))
  raise ValueError(
      f'{checkpoint_path}: no SentencePiece tokenizer in the checkpoint '
      '(tokenizer.model of a transformers directory, or a GGUF file); give '
      'a vocabulary (VOCABULARY: a SentencePiece model file)')

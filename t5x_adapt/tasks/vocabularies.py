"""The vocabularies tasks are registered with, by name suffix."""

import seqio

from t5x_adapt.data import vocab


def _corpus():
  return seqio.SentencePieceVocabulary(str(vocab.corpus_model_path()))


def _gemma3():
  return seqio.SentencePieceVocabulary(str(vocab.gemma3_model_path()))


# name -> (vocabulary (loaded lazily by seqio), function that makes its file)
VOCABULARIES = {
    'spm8k': (_corpus(), vocab.corpus_vocabulary),
    'gemma3': (_gemma3(), vocab.gemma3_vocabulary),
}

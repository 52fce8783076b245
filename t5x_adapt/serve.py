r"""Serves a checkpoint over an OpenAI-compatible HTTP API.

  python -m t5x_adapt.serve --gin_file=gin/runs/serve.gin \
    --gin.CHECKPOINT_PATH="'/tmp/t5gemma-2b-2b'" --gin.PORT=8000

  curl localhost:8000/v1/completions -H 'Content-Type: application/json' \
    -d '{"prompt": "Translate to German: Hello", "max_tokens": 32}'

The checkpoint is any the one loader reads (`convert.load`): a transformers
directory or a GGUF file (model and tokenizer from the file), or our Orbax
checkpoint (its model from its metadata, else from the gin preset given with
`--gin_file=gin/models/<preset>.gin`; tokenizer: VOCABULARY, a SentencePiece
model file). Parameters are placed on the gin-configured mesh.

The engine (`serving.engine`) decodes `NUM_SLOTS` requests at a time with
continuous batching; every prefill bucket and the decode step are compiled
before the server reports ready. The API: `serving.server`. SIGTERM drains:
new requests get 503, those in flight finish (within DRAIN_TIMEOUT_S), then
the process exits.
"""

from __future__ import annotations

if __name__ == '__main__':
  from t5x_adapt import host_memory
  host_memory.use_huge_pages()
  from t5x_adapt import serve as _serve  # pylint: disable=import-self
  _serve.main()

import threading
import time
from typing import Optional, Sequence

import gin
import uvicorn

from t5x_adapt import cli
from t5x_adapt.convert import load
from t5x_adapt.data import vocab as vocab_lib
from t5x_adapt.serving import server as server_lib
from t5x_adapt.serving.engine import Engine
from t5x_adapt.sharded import ShardedModel


class _DrainingServer(uvicorn.Server):
  """uvicorn, whose first SIGTERM / SIGINT drains the engine before the
  usual graceful shutdown (a second one stops at once)."""

  def __init__(self, config: uvicorn.Config, engine: Engine,
               drain_timeout_s: float):
    super().__init__(config)
    self.engine = engine
    self.drain_timeout_s = drain_timeout_s

  def handle_exit(self, sig, frame) -> None:
    if self.engine.draining:
      super().handle_exit(sig, frame)
      return
    self.engine.draining = True
    cli.say(f'draining: finishing the requests in flight (at most '
            f'{self.drain_timeout_s:g} s)')
    threading.Thread(target=self._exit_when_drained, args=(sig, frame),
                     daemon=True).start()

  def _exit_when_drained(self, sig, frame) -> None:
    deadline = time.monotonic() + self.drain_timeout_s
    while self.engine.has_work and time.monotonic() < deadline:
      time.sleep(0.05)
    super().handle_exit(sig, frame)


def _model(checkpoint_path: str, vocabulary, vocab_size: Optional[int]):
  """The checkpoint's own model, else the gin preset's."""
  model = load.model_of(checkpoint_path)
  if model is not None:
    return model
  try:
    return cli.build_model(None, vocab_size, vocabulary)
  except (ValueError, KeyError) as e:
    raise ValueError(
        f'{checkpoint_path} does not say which model it holds: give its '
        'preset (--gin_file=gin/models/<preset>.gin)') from e


@gin.configurable
def serve(checkpoint_path: str = gin.REQUIRED,
          vocabulary: Optional[str] = None,
          host: str = '127.0.0.1',
          port: int = 8000,
          num_slots: int = 8,
          max_prompt_length: int = 512,
          max_new_tokens: int = 256,
          buckets: Optional[Sequence[int]] = None,
          max_waiting: int = 1024,
          model_name: Optional[str] = None,
          add_eos: bool = False,
          default_max_tokens: int = 16,
          drain_timeout_s: float = 30.0,
          vocab_size: Optional[int] = None) -> None:
  """Loads the checkpoint, compiles, and serves until SIGTERM.

  Args:
    checkpoint_path: Any checkpoint the one loader reads.
    vocabulary: SentencePiece model file (default: the checkpoint's).
    host: Address to listen on.
    port: Port to listen on.
    num_slots: Requests decoded together (must split over the mesh's data
      axes).
    max_prompt_length: Longest prompt (encoder input) in tokens.
    max_new_tokens: Most tokens a request may ask for.
    buckets: Prompt lengths compiled for (default: `engine.default_buckets`).
    max_waiting: Requests queued at most (429 beyond).
    model_name: The model's name in the API (default: the checkpoint's
      file name).
    add_eos: End text prompts with EOS.
    default_max_tokens: `max_tokens` of a request that gives none.
    drain_timeout_s: How long SIGTERM waits for the requests in flight.
    vocab_size: Model vocabulary of a gin preset (None: see
      `cli.build_model`).
  """
  vocab = vocab_lib.checkpoint_vocabulary(checkpoint_path, vocabulary)
  model = _model(checkpoint_path, vocab, vocab_size)
  sharded = ShardedModel.on_gin_mesh(model, num_slots)
  params = sharded.restore(checkpoint_path)
  engine = Engine(model, params, num_slots=num_slots,
                  max_prompt_length=max_prompt_length,
                  max_new_tokens=max_new_tokens, buckets=buckets,
                  vocabulary=vocab, max_waiting=max_waiting,
                  partitioner=sharded.partitioner)
  del params  # The engine holds the layout it decodes with.
  embedder = server_lib.Embedder(engine)
  cli.say(f'compiling {len(engine.buckets)} prefill buckets '
          f'{engine.buckets} and the decode step ({num_slots} slots)')
  start = time.monotonic()
  engine.warmup()
  embedder.warmup()
  cli.say(f'compiled in {time.monotonic() - start:.0f} s')
  name = model_name or str(checkpoint_path).rstrip('/').split('/')[-1]
  server = server_lib.Server(engine, embedder, vocab, name, add_eos=add_eos,
                             default_max_tokens=default_max_tokens)
  config = uvicorn.Config(server.app, host=host, port=port,
                          log_level='warning',
                          timeout_graceful_shutdown=int(drain_timeout_s))
  with server_lib.running(engine):
    cli.say(f'serving {name!r} on http://{host}:{port}')
    _DrainingServer(config, engine, drain_timeout_s).run()


def main(argv: Optional[Sequence[str]] = None) -> None:
  """Command-line entry point (argv defaults to sys.argv)."""
  cli.run(serve, argv)

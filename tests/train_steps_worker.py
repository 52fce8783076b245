"""Runs train steps of tiny models on a given mesh; prints the results as JSON.

The training tests start this script in a subprocess for every device
configuration, since the number of simulated CPU devices is fixed when JAX
starts. Every run trains a tiny preset from the same seed on the same
deterministic numpy batches (`make_batch`), so runs on different meshes must
give the same losses.

  python tests/train_steps_worker.py --devices=8 --mesh=2,2,2 \
      --jobs='[{"preset": "gemma2_tiny", "steps": 5}]'

One process only: multi-host training is tested through the real entry
point (`python -m t5x_adapt.train` on several processes,
tests/test_multihost.py).

A job is a JSON object: `preset`, `steps` (5), `microbatches` (1),
`optimizer` ('adamw' or 'sgd'), `optimizer_kwargs` (for adamw, e.g. `frozen`
regexes, `weight_decay`), `save_after` (steps after which the parameters go
to `<out_dir>/<name>_step<k>.npz`; 0 is the initial state), `shards` (report
per-device shard shapes), `name` (defaults to the preset). The last line of
stdout is one JSON object: `runs` (name -> losses, grad_norms, shards) and
`device_count`.
"""

import argparse
import json
import os
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

MODELS = ('t5gemma_tiny', 'gemma2_tiny')
BATCH_SIZE = 8
ENCODER_LENGTH = 12
DECODER_LENGTH = 10
VOCAB_SIZE = 512  # of the tiny presets
LEARNING_RATE = 3e-3
SGD_LEARNING_RATE = 1.0
DATA_SEED = 1234
# Cheaper XLA:CPU compilation (about 2x); every configuration uses it, and it
# does not change what is computed.
FAST_COMPILE_FLAGS = ('--xla_backend_optimization_level=0 '
                      '--xla_llvm_disable_expensive_passes=true')


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--devices', type=int, default=1,
                      help='simulated CPU devices in this process')
  parser.add_argument('--mesh', default='1,1,1', help='data,fsdp,tensor')
  parser.add_argument('--jobs', default=json.dumps(
      [{'preset': m} for m in MODELS]), help='JSON list of jobs')
  parser.add_argument('--out_dir', default=None,
                      help='where `save_after` writes parameters')
  return parser.parse_args(argv)


def make_batch(encoder_decoder: bool, step: int,
               batch_size: int = BATCH_SIZE) -> dict:
  """A deterministic global batch (numpy) with right padding of varied length.

  Rows hold different numbers of target tokens, so a token-weighted loss
  differs from a mean of per-microbatch means.

  Args:
    encoder_decoder: Add encoder inputs.
    step: Selects the batch; the same step gives the same batch everywhere.
    batch_size: Examples.

  Returns:
    Feature name -> int32 array [batch_size, length].
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(DATA_SEED + step)

  def tokens(length):
    values = rng.randint(4, VOCAB_SIZE, size=(batch_size, length))
    lengths = length - rng.randint(0, length // 2, size=(batch_size, 1))
    return np.where(np.arange(length) < lengths, values, 0).astype(np.int32)

  targets = tokens(DECODER_LENGTH)
  inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)), constant_values=2)
  batch = {'decoder_target_tokens': targets,
           'decoder_input_tokens': np.where(targets > 0, inputs, 0),
           'decoder_loss_weights': (targets > 0).astype(np.int32)}
  if encoder_decoder:
    batch['encoder_input_tokens'] = tokens(ENCODER_LENGTH)
  return batch


def input_shapes(encoder_decoder: bool, batch_size: int = BATCH_SIZE) -> dict:
  """The shapes of `make_batch`'s model inputs."""
  shapes = {'decoder_input_tokens': (batch_size, DECODER_LENGTH)}
  if encoder_decoder:
    shapes['encoder_input_tokens'] = (batch_size, ENCODER_LENGTH)
  return shapes


def make_trainer(preset: str, mesh=(1, 1, 1), microbatches: int = 1,
                 optimizer: str = 'adamw', **optimizer_kwargs):
  """A Trainer for a tiny preset, float32, constant learning rate.

  Args:
    preset: Model preset name.
    mesh: (data, fsdp, tensor) sizes.
    microbatches: Gradient accumulation steps.
    optimizer: 'adamw' (`optimizers.optimizer`, learning rate
      `LEARNING_RATE`) or 'sgd' (plain `optax.sgd`: updates linear in the
      gradient, learning rate `SGD_LEARNING_RATE`).
    **optimizer_kwargs: For 'adamw': `frozen`, `weight_decay`, ...

  Returns:
    The `Trainer`.
  """
  # pylint: disable=g-import-not-at-top
  import optax
  from t5x_adapt import gin_utils
  from t5x_adapt import optimizers
  from t5x_adapt import partitioning
  from t5x_adapt import trainer as trainer_lib
  model = gin_utils.load_model(preset)
  data, fsdp, tensor = mesh
  partitioner = partitioning.Partitioner(data=data, fsdp=fsdp, tensor=tensor)
  if optimizer == 'sgd':
    tx = optax.sgd(SGD_LEARNING_RATE)
  else:
    tx = optimizers.optimizer(optimizer, learning_rate=LEARNING_RATE,
                              **optimizer_kwargs)
  return trainer_lib.Trainer(model, partitioner, tx,
                             num_microbatches=microbatches, seed=0)


def save_params(params, path: pathlib.Path) -> None:
  """Writes a (fully addressable) parameter tree as path -> array npz."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  np.savez(path, **_by_path(params, np.asarray))


def _by_path(tree, fn) -> dict:
  """'/'-joined parameter path -> fn(leaf)."""
  import jax  # pylint: disable=g-import-not-at-top
  from t5x_adapt import optimizers  # pylint: disable=g-import-not-at-top
  paths = jax.tree_util.tree_leaves(optimizers.param_paths(tree))
  return {p: fn(l) for p, l in zip(paths, jax.tree_util.tree_leaves(tree))}


def shard_shapes(state) -> dict:
  """Parameter path -> {global, shard, adam_mu_shard} shapes (lists)."""
  import optax  # pylint: disable=g-import-not-at-top
  shard = lambda leaf: list(leaf.sharding.shard_shape(leaf.shape))
  result = {p: {'global': list(l.shape), 'shard': shard(l)}
            for p, l in _by_path(state.params, lambda l: l).items()}
  mu = optax.tree_utils.tree_get(state.opt_state, 'mu')
  for path, mu_shard in _by_path(mu, shard).items():
    result[path]['adam_mu_shard'] = mu_shard
  return result


def run_job(job: dict, mesh, out_dir=None) -> dict:
  """Trains one job; returns its losses (and shard shapes if asked)."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v
            for k, v in job.get('optimizer_kwargs', {}).items()}
  trainer = make_trainer(job['preset'], mesh, job.get('microbatches', 1),
                         job.get('optimizer', 'adamw'), **kwargs)
  enc_dec = hasattr(trainer.model.config, 'encoder')
  name, steps = job.get('name', job['preset']), job.get('steps', 5)
  save_after = set(job.get('save_after', ()))

  def maybe_save(step, state):
    if step in save_after:
      save_params(state.params, pathlib.Path(out_dir) / f'{name}_step{step}')

  state = trainer.init_state()
  losses, grad_norms = [], []
  for step in range(steps):
    maybe_save(step, state)
    state, metrics = trainer.train_step(
        state, trainer.partitioner.shard_batch(make_batch(enc_dec, step)))
    losses.append(float(metrics['loss']))
    grad_norms.append(float(metrics['grad_norm']))
  maybe_save(steps, state)
  result = {'losses': losses, 'grad_norms': grad_norms}
  if job.get('shards'):
    result['shards'] = shard_shapes(state)
  return result


# ------------------------------------------------ used by the tests (parent) --


def start(args, log_dir: pathlib.Path, name: str):
  """Starts this script with `args`; stdout and stderr go to files.

  Returns:
    (Popen, stdout path, stderr path).
  """
  import subprocess  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3')
  env.pop('XLA_FLAGS', None)
  out, err = log_dir / f'{name}.out', log_dir / f'{name}.err'
  with open(out, 'w') as stdout, open(err, 'w') as stderr:
    proc = subprocess.Popen([sys.executable, __file__, *args], cwd=REPO_ROOT,
                            env=env, stdout=stdout, stderr=stderr)
  return proc, out, err


def wait_all(started, timeout: float = 600.0) -> list:
  """Waits for started workers; returns their JSON results, in order.

  Stops all of them as soon as one fails or the time runs out.

  Raises:
    RuntimeError: A worker failed or timed out; with its stderr's tail.
  """
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p, _, _ in started):
      failed = [s for s in started if s[0].poll() not in (None, 0)]
      if failed or time.monotonic() > deadline:
        _, _, err = (failed or started)[0]
        raise RuntimeError(f'worker {err.stem} failed or timed out:\n'
                           + err.read_text()[-4000:])
      time.sleep(0.2)
    for proc, _, err in started:
      if proc.returncode:
        raise RuntimeError(f'worker {err.stem} failed:\n'
                           + err.read_text()[-4000:])
    return [json.loads(out.read_text().strip().splitlines()[-1])
            for _, out, _ in started]
  finally:
    stop(started)


def stop(started) -> None:
  """Kills those of the started workers that still run."""
  for proc, _, _ in started:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def main(argv=None) -> None:
  args = _parse_args(argv)
  os.environ['XLA_FLAGS'] = ' '.join([
      os.environ.get('XLA_FLAGS', ''), FAST_COMPILE_FLAGS,
      f'--xla_force_host_platform_device_count={args.devices}'])
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  # pylint: disable=g-import-not-at-top
  import jax
  mesh = tuple(int(s) for s in args.mesh.split(','))
  runs = {}
  for job in json.loads(args.jobs):
    runs[job.get('name', job['preset'])] = run_job(job, mesh, args.out_dir)
  print(json.dumps({'device_count': jax.device_count(), 'runs': runs}),
        flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])

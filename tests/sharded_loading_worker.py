"""Loads checkpoints onto 8 simulated devices and reports how (JSON, stdout).

Started by tests/test_sharded_loading.py in a subprocess (the number of CPU
devices is fixed when JAX starts). On a data=1, fsdp=4, tensor=2 mesh it
adapts `t5gemma_tiny_unbalanced` from decoder-only sources of three kinds (a
transformers directory written by `convert.save_hf`, a Gemma-3-style GGUF
file, and our orbax checkpoint), and loads the distillation teacher. For
each load it reports:

  shardings_ok  every leaf has the partitioner's sharding
  values_ok     every sourced leaf equals its source tensor (bitwise; GGUF,
                which stores norms as 1 + scale, within 1e-6)
  peak_device_bytes, tree_bytes
                the most bytes any one device held in arrays made during the
                load (sampled after every placed leaf and by a thread every
                millisecond) against the bytes of the whole loaded tree

A `control` entry measures a loader that reads the tree onto one device and
then reshards it, so the test can show its check tells the two apart.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python tests/sharded_loading_worker.py OUT_DIR
"""

import collections
import json
import pathlib
import sys
import threading

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
  sys.path.insert(0, str(REPO_ROOT))

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.traverse_util
import jax
import numpy as np

import gguf_fixtures
from t5x_adapt import adapt
from t5x_adapt import checkpoints
from t5x_adapt import gin_utils
from t5x_adapt import layout
from t5x_adapt import partitioning
from t5x_adapt.config import EncoderDecoderConfig
from t5x_adapt.convert import gguf as gguf_lib
from t5x_adapt.convert import hf
from t5x_adapt.convert import lazy
from t5x_adapt.convert import load
from t5x_adapt.convert.tables import export_tensors, stack_rules
from t5x_adapt.distillation import DistillationModel
from t5x_adapt.models import DecoderOnlyModel

MESH = {'data': 1, 'fsdp': 4, 'tensor': 2}


class DeviceBytes:
  """Peak bytes per device of the arrays created while it is active."""

  def __init__(self):
    self.peak = collections.Counter()
    self._before = set()
    self._stop = threading.Event()
    self._thread = None

  def sample(self) -> None:
    held = collections.Counter()
    for array in jax.live_arrays():
      if id(array) in self._before or array.is_deleted():
        continue
      for shard in array.addressable_shards:
        held[str(shard.device)] += shard.data.nbytes
    for device, size in held.items():
      self.peak[device] = max(self.peak[device], size)

  def _poll(self) -> None:
    while not self._stop.wait(0.001):
      self.sample()

  def __enter__(self):
    self._before = {id(a) for a in jax.live_arrays()}
    self._thread = threading.Thread(target=self._poll, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self.sample()
    self._stop.set()
    self._thread.join()


_SAMPLERS = []
_place_leaf = lazy.place_leaf


def _sampled_place_leaf(array, sharding):
  placed = _place_leaf(array, sharding)
  for sampler in _SAMPLERS:
    sampler.sample()
  return placed


lazy.place_leaf = _sampled_place_leaf


def _measure(fn):
  """(result, peak bytes on the fullest device) of a loading call."""
  with DeviceBytes() as sampler:
    _SAMPLERS.append(sampler)
    try:
      result = fn()
    finally:
      _SAMPLERS.remove(sampler)
  return result, max(sampler.peak.values(), default=0)


def _tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))


def _shardings_ok(tree, shardings) -> bool:
  ok = jax.tree_util.tree_map(lambda x, s: x.sharding == s, tree, shardings)
  return all(jax.tree_util.tree_leaves(ok))


def _gguf_style(stack):
  """A stack in the conventions a Gemma 3 GGUF file implies."""
  return stack.replace(
      family='gemma3', use_qk_norm=True,
      attention_pattern=gguf_lib.GEMMA3_PATTERN,
      rope_local_base=gguf_lib.GEMMA3_LOCAL_ROPE_BASE,
      query_pre_attn_scalar=stack.head_dim, attn_logit_softcap=None,
      final_logit_softcap=None)


def write_gguf(path: pathlib.Path, stack, params) -> pathlib.Path:
  """Decoder-only float32 parameters as a Gemma 3 GGUF file."""
  rules = stack_rules(gguf_lib.GEMMA3_GGUF_NAMES, '', 'decoder', stack, False)
  unrolled = DecoderOnlyModel(stack.replace(scan_layers=False))
  return gguf_fixtures.write_gemma3_gguf(path, stack, export_tensors(
      rules, layout.to_unrolled(params, unrolled.config)))


def _random_source(stack, seed):
  model = DecoderOnlyModel(stack)
  params = model.get_initial_variables(jax.random.PRNGKey(seed), {})['params']
  # Every tensor nonzero and distinct (fresh norms are all zeros).
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 100), len(leaves))
  leaves = [np.asarray(jax.random.normal(k, x.shape, x.dtype))
            for k, x in zip(keys, leaves)]
  return model, jax.tree_util.tree_unflatten(tree, leaves)


def _write(kind, root: pathlib.Path, name, model, params):
  path = root / f'{kind}_{name}'
  if kind == 'transformers':
    return hf.save_hf(model, params, path)
  if kind == 'gguf':
    return write_gguf(path.with_suffix('.gguf'), model.config, params)
  return checkpoints.save_params(path, params)


def _values_ok(adapted, sources, atol: float = 0.0,
               copy_cross_attention: bool = False) -> bool:
  """Each encoder / decoder leaf that has a source equals it (bitwise by
  default; GGUF stores norms as `1 + scale`, which rounds)."""
  plan = adapt.assembly_plan(
      flax.traverse_util.flatten_dict(adapted),
      {n: flax.traverse_util.flatten_dict(s) for n, s in sources.items()},
      copy_cross_attention=copy_cross_attention)
  flat = flax.traverse_util.flatten_dict(adapted)
  return all(np.allclose(np.asarray(flat[key]),
                         np.asarray(flax.traverse_util.flatten_dict(
                             sources[origin[0]])[origin[1]]),
                         rtol=0, atol=atol)
             for key, origin in plan.items() if origin is not None)


def adapt_from(kind, root, model, partitioner):
  config = model.config
  if kind == 'gguf':
    config = EncoderDecoderConfig(_gguf_style(config.encoder),
                                  _gguf_style(config.decoder))
    model = type(model)(config)
  sources, paths = {}, {}
  for seed, name in enumerate(('encoder', 'decoder')):
    source_model, sources[name] = _random_source(getattr(config, name), seed)
    paths[name] = str(_write(kind, root, name, source_model, sources[name]))
  shardings = partitioner.shardings(model.logical_axes())
  adaptation = adapt.Adaptation(paths['encoder'], paths['decoder'])
  with partitioner.context():
    params, peak = _measure(
        lambda: adaptation.init_params(model, shardings))
  return {'shardings_ok': _shardings_ok(params, shardings),
          'values_ok': _values_ok(params, sources,
                                  atol=1e-6 if kind == 'gguf' else 0.0),
          'peak_device_bytes': peak, 'tree_bytes': _tree_bytes(params),
          'leaves': len(jax.tree_util.tree_leaves(params))}, paths


def adapt_balanced(root, partitioner):
  """t5gemma_tiny from one transformers directory: both stacks and the
  cross-attention from the same arrays."""
  model = gin_utils.load_model('t5gemma_tiny')
  source_model, source = _random_source(model.config.encoder, seed=3)
  path = str(_write('transformers', root, 'balanced', source_model, source))
  shardings = partitioner.shardings(model.logical_axes())
  with partitioner.context():
    params, peak = _measure(
        lambda: adapt.Adaptation(path).init_params(model, shardings))
  return {'shardings_ok': _shardings_ok(params, shardings),
          'values_ok': _values_ok(params, {'encoder': source,
                                           'decoder': source},
                                  copy_cross_attention=True),
          'peak_device_bytes': peak, 'tree_bytes': _tree_bytes(params),
          'leaves': len(jax.tree_util.tree_leaves(params))}


def load_teacher(path, model, partitioner):
  teacher = DistillationModel(model.config).teacher
  shardings = partitioner.shardings(teacher.logical_axes())
  params, peak = _measure(
      lambda: load.load_params(path, teacher, shardings=shardings))
  return {'shardings_ok': _shardings_ok(params, shardings),
          'values_ok': True, 'peak_device_bytes': peak,
          'tree_bytes': _tree_bytes(params),
          'leaves': len(jax.tree_util.tree_leaves(params))}


def control(path, model, partitioner):
  """The old way: the whole tree onto one device, then resharded."""
  teacher = DistillationModel(model.config).teacher
  shardings = partitioner.shardings(teacher.logical_axes())

  def one_device_then_reshard():
    host = load.load_params(path, teacher)
    on_one = jax.device_put(host, jax.devices()[0])
    return jax.device_put(on_one, shardings)

  params, peak = _measure(one_device_then_reshard)
  return {'shardings_ok': _shardings_ok(params, shardings), 'values_ok': True,
          'peak_device_bytes': peak, 'tree_bytes': _tree_bytes(params),
          'leaves': len(jax.tree_util.tree_leaves(params))}


def main(out_dir: str) -> None:
  root = pathlib.Path(out_dir)
  partitioner = partitioning.Partitioner(**MESH)
  model = gin_utils.load_model('t5gemma_tiny_unbalanced')
  results = {}
  for kind in ('transformers', 'gguf', 'orbax'):
    results[f'adapt_{kind}'], paths = adapt_from(kind, root, model,
                                                 partitioner)
    if kind != 'gguf':
      results[f'teacher_{kind}'] = load_teacher(paths['encoder'], model,
                                                partitioner)
  results['adapt_balanced_transformers'] = adapt_balanced(root, partitioner)
  results['control'] = control(str(root / 'transformers_encoder'), model,
                               partitioner)
  print(json.dumps({'device_count': jax.device_count(), 'results': results}))


if __name__ == '__main__':
  main(sys.argv[1])

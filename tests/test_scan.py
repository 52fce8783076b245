"""Scanned vs unrolled layer stacks: same function, convertible parameters.

For each tiny preset the parameters are initialised in the scanned layout,
converted with `layout.to_unrolled`, and the unrolled model must compute the
same logits; `layout.to_model_layout` must round-trip bitwise. Gemma 3's
period of six layers leaves a remainder at depth 8 or 13, so those variants
cover the scan followed by unrolled leftover layers.

The compile-time table (run with `-s` to see it) is informational only: the
assertions are on the size of the lowered program, which is deterministic.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t5x_adapt import gin_utils
from t5x_adapt import layout
from t5x_adapt.config import EncoderDecoderConfig

BATCH = 2
LENGTH = 20  # longer than the tiny presets' sliding window (8)

# (preset, StackConfig overrides, expected (scanned periods, remainder) per
# stack): the expectations pin the cases down, so a preset change that turns
# a remainder case into a plain one shows up here.
CASES = [
    ('gemma2_tiny', {}, {'decoder': (2, 0)}),
    ('gemma3_tiny', {'num_layers': 8}, {'decoder': (1, 2)}),
    ('t5gemma_tiny_unbalanced', {}, {'encoder': (3, 0), 'decoder': (2, 0)}),
    ('t5gemma3_tiny', {'num_layers': 13},
     {'encoder': (2, 1), 'decoder': (2, 1)}),
]


def _is_encoder_decoder(model) -> bool:
  return isinstance(model.config, EncoderDecoderConfig)


def _input_shapes(model) -> dict:
  shapes = {'decoder_input_tokens': (BATCH, LENGTH)}
  if _is_encoder_decoder(model):
    shapes['encoder_input_tokens'] = (BATCH, LENGTH + 3)
  return shapes


def _random_params(model, seed: int, std: float = 0.1):
  """Parameters of the model's (scanned or unrolled) layout, drawn afresh.

  Every leaf, norm scales included (init zeros them), is normal with `std`:
  small enough to keep float32 round-off between the two layouts well below
  the tolerance, large enough that every layer matters. numpy draws them, as
  `get_initial_variables` would spend seconds compiling the tiny model's init.
  """
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(std * rng.standard_normal(s.shape), s.dtype),
      model.param_shapes())


def _batch(model) -> dict:
  """A right-padded batch whose rows have different lengths."""
  rng = np.random.RandomState(0)
  batch = {}
  for name, (b, t) in _input_shapes(model).items():
    tokens = rng.randint(3, _vocab_size(model), size=(b, t))
    tokens[1, t - 5:] = 0
    batch[name] = jnp.asarray(tokens, jnp.int32)
  batch['decoder_target_tokens'] = batch['decoder_input_tokens']
  return batch


def _vocab_size(model) -> int:
  return model.config.stacks()['decoder'].vocab_size


def _structure_with_shapes(tree):
  return jax.tree_util.tree_map(lambda x: (x.shape, jnp.dtype(x.dtype)),
                                tree)


def _assert_bitwise_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize('preset,overrides,expected', CASES,
                         ids=[c[0] + ''.join(f'-{v}' for v in c[1].values())
                              for c in CASES])
def test_scanned_equals_unrolled(preset, overrides, expected):
  scanned_model = gin_utils.load_model(preset, scan_layers=True,
                                       **overrides)
  unrolled_model = gin_utils.load_model(preset, scan_layers=False,
                                        **overrides)
  cfgs = scanned_model.config.stacks()
  assert {name: (cfg.num_periods, cfg.num_layers % cfg.period)
          for name, cfg in cfgs.items()} == expected

  params = _random_params(scanned_model, seed=1)
  for name, (periods, remainder) in expected.items():
    stack = params[name]
    assert layout.is_scanned(stack)
    first = jax.tree_util.tree_leaves(stack['layers'])[0]
    assert first.shape[0] == periods
    leftover = sorted(k for k in stack if k.startswith('layer_'))
    num_layers = cfgs[name].num_layers
    assert leftover == sorted(f'layer_{i}' for i in
                              range(num_layers - remainder, num_layers))

  unrolled = layout.to_unrolled(params, scanned_model.config)
  # The converted tree is exactly what the unrolled model itself creates.
  assert _structure_with_shapes(unrolled) == _structure_with_shapes(
      unrolled_model.param_shapes())
  for name, cfg in cfgs.items():
    assert sorted(k for k in unrolled[name] if k.startswith('layer_')) == (
        sorted(f'layer_{i}' for i in range(cfg.num_layers)))

  batch = _batch(scanned_model)
  scanned_logits = jax.jit(scanned_model.compute_logits)(params, batch)
  unrolled_logits = jax.jit(unrolled_model.compute_logits)(unrolled, batch)
  assert scanned_logits.shape == (BATCH, LENGTH, _vocab_size(scanned_model))
  assert np.all(np.isfinite(np.asarray(scanned_logits)))
  assert float(jnp.std(scanned_logits)) > 0.1  # not a degenerate model
  diff = float(jnp.max(jnp.abs(unrolled_logits - scanned_logits)))
  print(f'\n{preset} {overrides}: max |scanned - unrolled| = {diff:.2e}')
  assert diff <= 1e-5

  # Round trips, bitwise.
  _assert_bitwise_equal(
      layout.to_model_layout(unrolled, scanned_model.config), params)
  _assert_bitwise_equal(
      layout.to_model_layout(params, unrolled_model.config), unrolled)
  _assert_bitwise_equal(
      layout.to_model_layout(unrolled, unrolled_model.config), unrolled)
  _assert_bitwise_equal(
      layout.to_model_layout(params, scanned_model.config), params)


def test_layer_mapping_is_not_permuted():
  """Unrolled layer i is period i // P, block i % P of the scanned tree."""
  model = gin_utils.load_model('t5gemma3_tiny', num_layers=13)
  cfg = model.config.decoder
  params = _random_params(model, seed=2)
  unrolled = layout.to_unrolled(params, model.config)['decoder']
  scanned = params['decoder']
  path = ('self_attention', 'query', 'kernel')

  def leaf(tree):
    for key in path:
      tree = tree[key]
    return np.asarray(tree)

  for i in range(cfg.num_periods * cfg.period):
    period, block = divmod(i, cfg.period)
    np.testing.assert_array_equal(
        leaf(unrolled[f'layer_{i}']),
        leaf(scanned['layers'][f'block_{block}'])[period])
  np.testing.assert_array_equal(leaf(unrolled['layer_12']),
                                leaf(scanned['layer_12']))


def _compile_loss(num_layers: int, scan_layers: bool):
  """(compile seconds, lowered program size in characters) of the loss."""
  model = gin_utils.load_model('gemma2_tiny', num_layers=num_layers,
                               scan_layers=scan_layers)
  params = model.param_shapes()
  spec = jax.ShapeDtypeStruct((BATCH, 16), jnp.int32)
  batch = {'decoder_input_tokens': spec, 'decoder_target_tokens': spec}
  loss = jax.jit(lambda p, b: model.loss_fn(p, b, None)[0])
  start = time.perf_counter()
  lowered = loss.lower(params, batch)
  lowered.compile()
  return time.perf_counter() - start, len(lowered.as_text())


def test_compile_time_is_flat_in_depth():
  results = {(n, scan): _compile_loss(n, scan)
             for n in (2, 24) for scan in (True, False)}
  print('\nLoss lower+compile wall time (s) / lowered program size (kchars),'
        ' gemma2_tiny:')
  print(f'{"layers":>8} {"scanned":>16} {"unrolled":>16}')
  for n in (2, 24):
    cells = [f'{results[n, s][0]:6.2f}s {results[n, s][1] / 1e3:6.0f}k'
             for s in (True, False)]
    print(f'{n:>8} {cells[0]:>16} {cells[1]:>16}')
  size = {key: value[1] for key, value in results.items()}
  # Program size is deterministic; wall time is not asserted on.
  assert size[24, True] < 1.1 * size[2, True]
  assert size[24, False] > 5 * size[2, False]
  assert size[24, False] > 5 * size[24, True]

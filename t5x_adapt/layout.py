"""Conversion between the scanned and the unrolled parameter layouts.

A stack's blocks live either under `layers/block_{j}` with a leading axis over
periods (scanned) or under `layer_{i}` (unrolled); see `layers/stack.py`.
Checkpoint converters work in the unrolled layout and call `to_model_layout`
(with `stack=` for trees of leaves not read yet, `convert.lazy`); orbax
checkpoints restore into either layout through these functions, under jit
with the target shardings.
"""

from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from t5x_adapt.config import StackConfig

STACK_NAMES = ('encoder', 'decoder')
Stack = Callable[[Sequence[Any]], Any]  # a leaf of each period -> stacked


def is_scanned(stack_params: Mapping[str, Any]) -> bool:
  return 'layers' in stack_params


def unroll_stack(stack_params: Mapping[str, Any], cfg: StackConfig) -> dict:
  """Scanned -> unrolled layout of one stack (no-op if already unrolled)."""
  if not is_scanned(stack_params):
    return dict(stack_params)
  out = {k: v for k, v in stack_params.items() if k != 'layers'}
  for j, block in stack_params['layers'].items():
    offset = int(j.removeprefix('block_'))
    for p in range(cfg.num_periods):
      out[f'layer_{p * cfg.period + offset}'] = jax.tree_util.tree_map(
          lambda x, p=p: x[p], block)
  return out


def scan_stack(stack_params: Mapping[str, Any], cfg: StackConfig,
               stack: Stack = jnp.stack) -> dict:
  """Unrolled -> scanned layout of one stack (no-op if already scanned)."""
  if is_scanned(stack_params) or cfg.num_periods == 0:
    return dict(stack_params)
  scanned_layers = cfg.num_periods * cfg.period
  out = {k: v for k, v in stack_params.items()
         if not (k.startswith('layer_') and
                 int(k.removeprefix('layer_')) < scanned_layers)}
  out['layers'] = {
      f'block_{j}': jax.tree_util.tree_map(
          lambda *xs: stack(xs),
          *[stack_params[f'layer_{p * cfg.period + j}']
            for p in range(cfg.num_periods)])
      for j in range(cfg.period)
  }
  return out


def to_unrolled(params: Mapping[str, Any], config) -> dict:
  """Whole model -> unrolled layout."""
  cfgs = config.stacks()
  return {name: unroll_stack(sub, cfgs[name]) if name in cfgs else sub
          for name, sub in params.items()}


def to_model_layout(params: Mapping[str, Any], config,
                    stack: Stack = jnp.stack) -> dict:
  """Whole model -> the layout its config asks for (`scan_layers`)."""
  cfgs = config.stacks()
  out = {}
  for name, sub in params.items():
    if name not in cfgs:
      out[name] = sub
    elif cfgs[name].scan_layers:
      out[name] = scan_stack(sub, cfgs[name], stack)
    else:
      out[name] = unroll_stack(sub, cfgs[name])
  return out

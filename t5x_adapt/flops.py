"""Analytic FLOPs of a train step, for throughput and MFU.

Matmul FLOPs only (2 per multiply-add), as is customary for MFU: every
projection and MLP weight once per token it touches, attention scores and
values per (query, visible key) pair, the tied LM head per decoder token. A
train step costs three forward passes (forward + 2x backward); a
distillation teacher adds one forward pass (no backward). Each model says
which of these formulas its step costs (`BaseModel.train_step_flops`).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from t5x_adapt.config import EncoderDecoderConfig, StackConfig

# bf16 dense matmul peaks, FLOP/s per device, by `device_kind` prefix.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v6': 918e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100': 312e12,
}
_MATMUL_SIZE = 2048
TRAIN_PASSES = 3  # forward + backward (twice the forward's matmuls)


def measured_matmul_flops(dtype=jnp.float32) -> float:
  """FLOP/s of a 2048^3 matmul on the default device (best of 5).

  CPUs have no datasheet peak worth quoting (it depends on the cores, their
  vector units and XLA's kernels), so their MFU is taken against this. Each
  dtype is measured once per process.

  Args:
    dtype: Operand dtype; float32 unless a bfloat16 row is compared against
      the bfloat16 rate. The product accumulates in float32, as the model's
      bfloat16 matmuls do (`kernels.matmul.narrow_matmul`).
  """
  return _measured_matmul_flops(jnp.dtype(dtype).name)


@functools.cache
def _measured_matmul_flops(dtype: str) -> float:
  x = jax.random.normal(jax.random.PRNGKey(0), (_MATMUL_SIZE,) * 2, dtype)
  matmul = jax.jit(lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32))
  matmul(x).block_until_ready()
  best = float('inf')
  for _ in range(5):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * _MATMUL_SIZE**3 / best


def device_peak_flops(device=None, override: float | None = None) -> float:
  """Peak FLOP/s of one device (configurable with `override`).

  Accelerators: the datasheet figure by device kind. Other devices (CPU):
  the measured matmul rate, shared among this process's devices (simulated
  CPU devices share the same cores).
  """
  if override:
    return override
  kind = (device or jax.devices()[0]).device_kind
  for prefix, peak in PEAK_FLOPS.items():
    if kind.lower().startswith(prefix.lower()):
      return peak
  return measured_matmul_flops() / jax.local_device_count()


def _layer_weight_flops(cfg: StackConfig, kv_width: int | None = None) -> int:
  """Forward FLOPs per token of one block's weights (no attention scores)."""
  d, heads, kv, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attention = 2 * d * heads * hd * 2 + 2 * d * kv * hd * 2  # q, o; k, v
  mlp = 2 * d * cfg.mlp_dim * 3
  return attention + mlp


def _attention_flops(cfg: StackConfig, queries: int, keys: int,
                     causal: bool) -> int:
  """Forward FLOPs of scores and weighted values over a whole sequence."""
  total = 0
  for layer in range(cfg.num_layers):
    window, ahead = cfg.layer_window_bounds(layer, causal)
    ahead = window if ahead is None else ahead
    visible = keys if window is None else min(keys, (window if causal else
                                                     window + ahead - 1))
    if causal:
      visible = min(visible, (keys + 1) / 2 if window is None else visible)
    total += 4 * cfg.num_heads * cfg.head_dim * queries * visible
  return int(total)


def decoder_only_flops(cfg: StackConfig, length: int,
                       logit_positions: int | None = None) -> int:
  """Forward FLOPs of one sequence of `length` tokens, the LM head on
  `logit_positions` of them (default: all)."""
  logits = length if logit_positions is None else logit_positions
  return (stack_flops(cfg, length, causal=True)
          + 2 * cfg.embed_dim * cfg.vocab_size * logits)


def encoder_decoder_flops(config: EncoderDecoderConfig, inputs: int,
                          targets: int) -> int:
  """Forward FLOPs of one example with `inputs` / `targets` tokens."""
  enc, dec = config.encoder, config.decoder
  encoder = enc.num_layers * _layer_weight_flops(enc) * inputs
  encoder += _attention_flops(enc, inputs, inputs, causal=False)
  decoder = dec.num_layers * _layer_weight_flops(dec) * targets
  decoder += _attention_flops(dec, targets, targets, causal=True)
  hd = dec.num_heads * dec.head_dim
  kv = dec.num_kv_heads * dec.head_dim
  # Merged attention (T5Gemma 2) reuses the self-attention's queries and
  # output projection; cross-attention has its own.
  own_q_o = config.encoder_attention == 'cross'
  cross = dec.num_layers * (own_q_o * 2 * 2 * dec.embed_dim * hd * targets
                            + 2 * 2 * enc.embed_dim * kv * inputs  # k, v
                            + 4 * hd * targets * inputs)           # scores
  head = 2 * dec.embed_dim * dec.vocab_size * targets
  return encoder + decoder + cross + head


def stack_flops(cfg: StackConfig, length: int, causal: bool) -> int:
  """Forward FLOPs of one stack's blocks over `length` tokens, no LM head."""
  return (cfg.num_layers * _layer_weight_flops(cfg) * length
          + _attention_flops(cfg, length, length, causal))


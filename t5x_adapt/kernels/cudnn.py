"""cuDNN flash attention (`jax.nn.dot_product_attention`) for GPUs.

`MaskSpec` maps onto the arguments of `jax.nn.dot_product_attention` as

  causal                    is_causal=True (cuDNN skips the upper triangle)
  causal window W           is_causal=True, local_window_size=(W - 1, 0)
  two-sided window W        in the boolean `mask` (cuDNN has no right window
                            without causal masking)
  padding / packing         boolean `mask` [b, 1, t, s]: same segment, and
                            the key not padding
  prefix-LM                 the whole mask in `mask` (causal OR prefix is no
                            cuDNN mask type)

`is_causal` and the window are index-based, so they are used only when the
mask is index-ordered (`MaskSpec.index_ordered`); otherwise (a decoding
cache, cross-attention) the whole position-based mask goes into `mask`,
which is exact for every case. cuDNN turns `mask` into an additive bias of
[b, 1, t, s] in the activation dtype: packing costs that much memory (the
score tensor itself is never materialised).

GQA is native ([b, t, n, h] queries, [b, s, k, h] keys). Not supported, with
a ValueError naming cuDNN: the attention logit softcap (Gemma 2) and float32
activations (cuDNN runs fp16 / bf16 only). Partitioning is cuDNN's own (the
custom call carries partitioning rules), so no shard_map is needed.

`implementation=None` runs the same argument mapping through JAX's XLA
reference of `dot_product_attention`, so CPU tests check the mapping.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from t5x_adapt.kernels.masks import MaskInputs, MaskSpec, attention_mask
from t5x_adapt.kernels.masks import dense_mask

_HALF_DTYPES = (jnp.bfloat16, jnp.float16)


def _check(query: jax.Array, spec: MaskSpec,
           logit_softcap: Optional[float], implementation: Optional[str]):
  if logit_softcap is not None:
    raise ValueError(
        f'cudnn attention does not support the attention logit softcap '
        f'({logit_softcap}, Gemma 2); use attention_impl=\'blocked\' or '
        f"'dense' ({spec.describe()} mask)")
  if implementation == 'cudnn' and query.dtype not in _HALF_DTYPES:
    raise ValueError(
        f'cudnn attention runs in bfloat16 / float16 only, got {query.dtype} '
        "activations; set dtype='bfloat16' or use attention_impl='blocked'")


def _mask_arguments(mask: MaskInputs, spec: MaskSpec) -> dict:
  """`jax.nn.dot_product_attention` keyword arguments expressing the mask."""
  native = spec.index_ordered and not (spec.causal and mask.has_prefix)
  if not native:
    return dict(mask=dense_mask(mask, spec))
  if spec.causal:
    window = None if spec.window is None else (spec.window - 1, 0)
    segments = attention_mask(mask.query_positions, mask.key_positions,
                              mask.query_segment_ids, mask.key_segment_ids,
                              causal=False)
    return dict(mask=segments, is_causal=True, local_window_size=window)
  # Bidirectional: the (two-sided) window joins the segment mask.
  return dict(mask=dense_mask(mask, spec))


def cudnn_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    mask: MaskInputs, spec: MaskSpec, *, scale: float,
                    logit_softcap: Optional[float] = None,
                    implementation: Optional[str] = 'cudnn') -> jax.Array:
  """cuDNN attention with the entry point's signature (see module doc).

  Args:
    query: [b, t, n, h].
    key: [b, s, k, h].
    value: [b, s, k, h].
    mask: Positions, segment ids, prefix flags.
    spec: Causality, window, index order.
    scale: Multiplies the raw scores.
    logit_softcap: Must be None (cuDNN has no softcap).
    implementation: 'cudnn'; None runs JAX's XLA path of the same call
      (CPU tests of the argument mapping).

  Returns:
    [b, t, n, h] in the query's dtype.

  Raises:
    ValueError: for a softcap, or float32 activations with cuDNN.
  """
  _check(query, spec, logit_softcap, implementation)
  return jax.nn.dot_product_attention(
      query, key, value, scale=scale, implementation=implementation,
      **_mask_arguments(mask, spec))

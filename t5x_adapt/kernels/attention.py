"""Softmax attention behind one switch (`impl`), with the mask given by
positions and segment ids rather than as an array.

Every implementation computes the same function: for query head n (reading
key/value head n // groups, GQA as transformers),

  out[b, t, n] = sum_s softmax_s(softcap(scale * q[b, t, n] . k[b, s, n // g])
                                 masked by `kernels.masks.attention_mask`)
                 * v[b, s, n // g]

A query that sees no key (padding) gets a finite output nothing reads (the
dense reference: the mean of the values, its masked scores being equal; the
kernels may give zeros); tests compare the rows that see a key.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from t5x_adapt.kernels.masks import MaskInputs, MaskSpec, dense_mask
from t5x_adapt.kernels.platform import target_platform
from t5x_adapt.kernels.softcap import softcap

IMPLEMENTATIONS = ('dense', 'blocked', 'splash', 'cudnn', 'auto')
# `auto` keeps calls with fewer queries than this (decoding) dense.
AUTO_DENSE_BELOW = 128


def resolve(impl: str, platform: Optional[str] = None, *,
            spec: Optional[MaskSpec] = None,
            query_length: Optional[int] = None,
            logit_softcap: Optional[float] = None,
            dtype: Optional[jnp.dtype] = None) -> str:
  """The implementation `impl` stands for on `platform` (the target's).

  `auto`: dense for a few queries (decoding steps: their scores are one
  row); on TPUs splash where its index-based masks apply (training and
  prefill self-attention, cross-attention), blocked otherwise (a prefill
  against a decoding cache); on GPUs cudnn, unless the layer has a softcap
  or float32 activations, which cuDNN cannot run; blocked elsewhere.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention_impl {impl!r}; choose one of '
                     f'{", ".join(IMPLEMENTATIONS)}')
  if impl != 'auto':
    return impl
  if query_length is not None and query_length < AUTO_DENSE_BELOW:
    return 'dense'
  platform = platform or target_platform()
  if platform == 'tpu':
    index_masks_apply = spec is None or spec.index_ordered or not (
        spec.causal or spec.window)
    return 'splash' if index_masks_apply else 'blocked'
  cudnn_runs = logit_softcap is None and dtype in (jnp.bfloat16, jnp.float16)
  return 'cudnn' if platform == 'gpu' and cudnn_runs else 'blocked'


def dense_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                    mask: MaskInputs, spec: MaskSpec, *, scale: float,
                    logit_softcap: Optional[float] = None,
                    kv_heads_first: bool = False) -> jax.Array:
  """The reference: the whole score tensor, softmax in float32.

  Args:
    query: [b, t, n, h].
    key: [b, s, k, h], or [b, k, s, h] with `kv_heads_first`.
    value: As `key`.
    mask: Positions, segment ids, prefix flags.
    spec: Causality and window.
    scale: Multiplies the raw scores.
    logit_softcap: Softcap of the scaled scores, before masking.
    kv_heads_first: Keys and values come heads first, the layout the score
      matmuls read (decoding caches are kept so: a cache transposed at
      every step would be copied whole at every step).

  Returns:
    [b, t, n, h] in the query's dtype.
  """
  return _dense(query, key, value, dense_mask(mask, spec), scale=scale,
                logit_softcap=logit_softcap, kv_heads_first=kv_heads_first)


def resolve_merged(impl: str, *, query_length: Optional[int] = None) -> str:
  """The implementation of merged attention `impl` stands for: `dense` or
  `blocked` (`auto`: dense for a few queries, blocked otherwise, on every
  platform). Splash and cuDNN have no merged form: asking for them raises.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'unknown attention_impl {impl!r}; choose one of '
                     f'{", ".join(IMPLEMENTATIONS)}')
  if impl == 'auto':
    few = query_length is not None and query_length < AUTO_DENSE_BELOW
    return 'dense' if few else 'blocked'
  if impl not in ('dense', 'blocked'):
    raise ValueError(f'attention_impl {impl!r} has no merged attention '
                     "(T5Gemma 2's decoder): use 'blocked', 'dense' or "
                     "'auto'")
  return impl


def merged_attention(query: jax.Array,
                     parts: Sequence[tuple[jax.Array, jax.Array, MaskInputs,
                                           MaskSpec]],
                     *, scale: float,
                     logit_softcap: Optional[float] = None,
                     kv_heads_first: bool = False,
                     impl: str = 'dense') -> jax.Array:
  """One softmax over several key sets, each with its own mask.

  T5Gemma 2's merged attention: a decoder query attends over its own
  (causal, windowed) keys and the encoder's (global) in one softmax.
  `dense` joins the [b, k, g, t, s1 + s2] scores; `blocked` tiles each part
  and merges the parts by their logsumexps
  (`blocked.merged_blocked_attention`); see `resolve_merged`.

  Args:
    query: [b, t, n, h].
    parts: (key [b, s_i, k, h], value [b, s_i, k, h], mask, spec) per key
      set ([b, k, s_i, h] with `kv_heads_first`).
    scale: Multiplies the raw scores.
    logit_softcap: Softcap of the scaled scores, before masking.
    kv_heads_first: See `dense_attention`.
    impl: 'dense', 'blocked' or 'auto'.

  Returns:
    [b, t, n, h] in the query's dtype.
  """
  impl = resolve_merged(impl, query_length=query.shape[1])
  if impl == 'blocked':
    from t5x_adapt.kernels import blocked  # pylint: disable=g-import-not-at-top
    if kv_heads_first:  # The kernel takes [b, s, k, h].
      parts = [(k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), m, spec)
               for k, v, m, spec in parts]
    return blocked.merged_blocked_attention(query, parts, scale=scale,
                                            logit_softcap=logit_softcap)
  axis = 2 if kv_heads_first else 1
  key = jnp.concatenate([part[0] for part in parts], axis=axis)
  value = jnp.concatenate([part[1] for part in parts], axis=axis)
  mask = jnp.concatenate([dense_mask(part[2], part[3]) for part in parts],
                         axis=-1)
  return _dense(query, key, value, mask, scale=scale,
                logit_softcap=logit_softcap, kv_heads_first=kv_heads_first)


def _dense(query, key, value, mask, *, scale, logit_softcap,
           kv_heads_first=False):
  """`dense_attention` under a boolean mask [b, 1, t, s]."""
  batch, q_len, num_heads, head_dim = query.shape
  num_kv_heads = key.shape[1 if kv_heads_first else 2]
  groups = num_heads // num_kv_heads
  # Heads move in front of the sequence once, on the small q/k/v tensors,
  # so that neither score einsum needs a transpose of the large
  # [b, k, g, t, s] score tensor (or of its gradient).
  query = query.reshape(batch, q_len, num_kv_heads, groups,
                        head_dim).transpose(0, 2, 3, 1, 4)
  if not kv_heads_first:
    key = key.transpose(0, 2, 1, 3)  # [b, k, s, h]
    value = value.transpose(0, 2, 1, 3)  # [b, k, s, h]
  out = _attend(query, key, value, mask, scale, logit_softcap)
  out = out.transpose(0, 3, 1, 2, 4)  # [b, t, k, g, h]
  return out.reshape(batch, q_len, num_heads, head_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(query, key, value, mask, scale, logit_softcap):
  """Softmax attention over heads-first tensors; the gradient by hand.

  Args:
    query: [b, k, g, t, h].
    key, value: [b, k, s, h].
    mask: Boolean [b, 1, t, s].
    scale, logit_softcap: As `dense_attention`.

  Returns:
    [b, k, g, t, h] in the value's dtype.
  """
  return _attend_forward(query, key, value, mask, scale, logit_softcap)[0]


def _attend_forward(query, key, value, mask, scale, logit_softcap):
  scores = jnp.einsum('bkgth,bksh->bkgts', query, key) * scale
  capped = softcap(scores, logit_softcap)
  scores = jnp.where(mask[:, :, None], capped,
                     jnp.finfo(capped.dtype).min)  # mask: [b, 1, 1, t, s]
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  out = jnp.einsum('bkgts,bksh->bkgth', probs.astype(value.dtype), value)
  saved_capped = capped if logit_softcap is not None else None
  return out, (query, key, value, mask, probs, saved_capped)


def _contract_queries(small: jax.Array, big: jax.Array) -> jax.Array:
  """`einsum('bkgth,bkgts->bksh')` as a [h, (g t)] x [(g t), s] matmul.

  `jnp.einsum` would put the big operand first (its `s` leads the output),
  making XLA:CPU transpose it; here only the small [h, s] result is.
  """
  dims = (((2, 3), (2, 3)), ((0, 1), (0, 1)))
  return jax.lax.dot_general(small, big, dims).swapaxes(-1, -2)


def _attend_backward(scale, logit_softcap, residuals, d_out):
  """What autodiff computes, with each [t, s] tensor entering its matmuls
  with `s` minor: XLA:CPU would otherwise transpose the probabilities and
  the score gradient (with their elementwise work fused in, slowly) before
  the key and value gradients."""
  query, key, value, mask, probs, capped = residuals
  d_probs = jnp.einsum('bkgth,bksh->bkgts', d_out, value).astype(jnp.float32)
  d_value = _contract_queries(d_out, probs.astype(value.dtype))
  d_scores = probs * (d_probs - jnp.sum(d_probs * probs, -1, keepdims=True))
  d_scores = jnp.where(mask[:, :, None], d_scores, 0.0)
  if logit_softcap is not None:
    d_scores = d_scores * (1.0 - jnp.square(capped / logit_softcap))
  d_scores = d_scores.astype(query.dtype)
  d_query = jnp.einsum('bkgts,bksh->bkgth', d_scores, key) * scale
  d_key = _contract_queries(query, d_scores) * scale
  return (d_query.astype(query.dtype), d_key.astype(key.dtype),
          d_value.astype(value.dtype), None)


_attend.defvjp(_attend_forward, _attend_backward)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: MaskInputs, spec: MaskSpec, *, scale: float,
                          logit_softcap: Optional[float] = None,
                          impl: str = 'dense',
                          kv_heads_first: bool = False) -> jax.Array:
  """Attention by the implementation `impl` names (see the package doc).

  Shapes as `dense_attention`. A mask or softcap an implementation cannot
  express raises a ValueError naming both.
  """
  impl = resolve(impl, spec=spec, query_length=query.shape[1],
                 logit_softcap=logit_softcap, dtype=query.dtype)
  if impl == 'dense':
    return dense_attention(query, key, value, mask, spec, scale=scale,
                           logit_softcap=logit_softcap,
                           kv_heads_first=kv_heads_first)
  if kv_heads_first:  # The other kernels take [b, s, k, h].
    key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
  if impl == 'blocked':
    from t5x_adapt.kernels import blocked  # pylint: disable=g-import-not-at-top
    return blocked.blocked_attention(query, key, value, mask, spec,
                                     scale=scale, logit_softcap=logit_softcap)
  if impl == 'splash':
    from t5x_adapt.kernels import splash  # pylint: disable=g-import-not-at-top
    return splash.splash_attention(query, key, value, mask, spec, scale=scale,
                                   logit_softcap=logit_softcap)
  from t5x_adapt.kernels import cudnn  # pylint: disable=g-import-not-at-top
  return cudnn.cudnn_attention(query, key, value, mask, spec, scale=scale,
                               logit_softcap=logit_softcap)

"""Attention kernels and the memory-bounded LM-head loss.

`attention.dot_product_attention` is the one entry point of every attention
layer; `StackConfig.attention_impl` picks its implementation:

  dense    the reference: the whole [b, k, g, t, s] score tensor (XLA)
  blocked  query x key tiles with an online softmax, tiles the mask hides
           entirely skipped (jnp/XLA, any platform)
  splash   Pallas TPU splash attention (interpret mode on CPU, for tests)
  cudnn    `jax.nn.dot_product_attention(implementation='cudnn')` on GPUs
  auto     splash on TPU, cudnn on GPU, blocked elsewhere

What the implementations share lies below them, so that `attention` may
import them and none imports `attention`: the mask and its two halves
(`masks.MaskInputs`, `masks.MaskSpec`), the target platform (`platform`)
and the logit softcap (`softcap`).
"""

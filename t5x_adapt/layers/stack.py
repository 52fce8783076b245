"""A stack of Gemma blocks: embed -> blocks -> final norm (-> tied LM head).

The blocks repeat with the local/global period of the attention pattern, so
the stack scans one *period* (e.g. local+global for Gemma 2, five locals and a
global for Gemma 3) over `num_layers // period` repetitions; layers left over
when the period does not divide the depth are unrolled after the scan. Compile
time is therefore flat in depth. With `scan_layers=False` every block is
unrolled. Parameter layouts:

  scanned:  layers/block_{j}/...   (leading 'layers' axis = period index)
            layer_{i}/...          (the unrolled remainder, absolute index)
  unrolled: layer_{i}/...          for every layer i

`t5x_adapt.layout` converts between the two.
"""

from typing import Optional

import flax.linen as nn
import jax

from t5x_adapt.config import StackConfig
from t5x_adapt.layers.blocks import Block
from t5x_adapt.layers.embedding import Embed
from t5x_adapt.layers.norms import RMSNorm

_REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Period(nn.Module):
  """One period of the attention pattern: the body of the layer scan."""

  config: StackConfig
  causal: bool
  encoder_attention: Optional[str]
  deterministic: bool = True
  decode: bool = False
  cache_length: Optional[int] = None
  index_ordered: bool = True

  @nn.compact
  def __call__(self, x, positions, segment_ids, prefix, encoded,
               encoder_positions, encoder_segment_ids):
    for j in range(self.config.period):
      x = Block(self.config, layer=j, causal=self.causal,
                encoder_attention=self.encoder_attention,
                deterministic=self.deterministic, decode=self.decode,
                cache_length=self.cache_length,
                index_ordered=self.index_ordered, name=f'block_{j}')(
                    x, positions, segment_ids, prefix, encoded,
                    encoder_positions, encoder_segment_ids)
    return x, None


def _maybe_remat(module_cls, policy: str, scanned: bool):
  if policy == 'none':
    return module_cls
  if policy not in _REMAT_POLICIES:
    raise ValueError(f'unknown remat_policy {policy!r}; choose none, '
                     f'{", ".join(_REMAT_POLICIES)}')
  return nn.remat(module_cls, policy=_REMAT_POLICIES[policy],
                  prevent_cse=not scanned)


def embedder_of(cfg: StackConfig, name: str = 'token_embedder') -> Embed:
  """The token embedding (and tied LM head) of a stack configured so."""
  return Embed(cfg.vocab_size, cfg.embed_dim, cfg.eoi_token_id,
               cfg.scale_embeddings, cfg.activation_dtype, cfg.weight_dtype,
               name=name)


class Stack(nn.Module):
  """Encoder, decoder or decoder-only stack, by its flags.

  Attributes:
    config: The stack's configuration.
    causal: Causal self-attention (decoders) or bidirectional (encoder).
    encoder_attention: How blocks attend to an encoder output: None, 'cross'
      or 'merged' (`layers.blocks`).
    produce_logits: End with the tied LM head (decoders) or return the
      final-normed hidden states (encoder).
    embedder: The token embedding of both stacks of an encoder-decoder with
      tied tables (owned by the model, `EncoderDecoderConfig.tie_embeddings`);
      None: the stack's own `token_embedder`.
  """

  config: StackConfig
  causal: bool = True
  encoder_attention: Optional[str] = None
  produce_logits: bool = True
  embedder: Optional[Embed] = None

  @nn.compact
  def __call__(self,
               tokens: jax.Array,
               positions: jax.Array,
               segment_ids: jax.Array,
               prefix: Optional[jax.Array] = None,
               encoded: Optional[jax.Array] = None,
               encoder_positions: Optional[jax.Array] = None,
               encoder_segment_ids: Optional[jax.Array] = None,
               deterministic: bool = True,
               decode: bool = False,
               cache_length: Optional[int] = None,
               return_hidden: bool = False,
               first_logit: int = 0,
               index_ordered: bool = True) -> jax.Array:
    """Runs the stack.

    Args:
      tokens: [batch, length] token ids.
      positions: [batch, length] RoPE positions.
      segment_ids: [batch, length]; 0 is padding.
      prefix: Optional [batch, length] prefix-LM flags.
      encoded: [batch, enc_length, enc_embed] encoder output (decoder only).
      encoder_positions: [batch, enc_length].
      encoder_segment_ids: [batch, enc_length]; 0 is padding.
      deterministic: Disable dropout.
      decode: Use and update the decoding cache.
      cache_length: Total decoding length (cache slots of global layers).
      return_hidden: Return final-normed hidden states instead of logits.
      first_logit: Compute logits only from this position on (a distillation
        teacher needs them for the targets only).
      index_ordered: Each segment's tokens are contiguous and their positions
        advance by one with the index (seqio's packed or padded batches), so
        attention kernels may skip tiles by index (`kernels.MaskSpec`).
        False for sequences laid out otherwise (the distillation teacher's:
        a segment's inputs and targets lie apart).

    Returns:
      float32 logits [batch, length - first_logit, vocab], or hidden states
      [batch, length, embed].
    """
    cfg = self.config
    embedder = self.embedder or embedder_of(cfg)
    x = embedder(tokens)
    x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    block_args = (positions, segment_ids, prefix, encoded, encoder_positions,
                  encoder_segment_ids)
    flags = dict(deterministic=deterministic, decode=decode,
                 cache_length=cache_length, index_ordered=index_ordered)

    first_unrolled = 0
    if cfg.scan_layers and cfg.num_periods > 0:
      scanned = nn.scan(
          _maybe_remat(Period, cfg.remat_policy, scanned=True),
          variable_axes={'params': 0, 'cache': 0},
          split_rngs={'params': True, 'dropout': True},
          in_axes=(nn.broadcast,) * len(block_args),
          length=cfg.num_periods,
          metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = scanned(cfg, self.causal, self.encoder_attention, **flags,
                     name='layers')(x, *block_args)
      first_unrolled = cfg.num_periods * cfg.period
    block_cls = _maybe_remat(Block, cfg.remat_policy, scanned=False)
    for i in range(first_unrolled, cfg.num_layers):
      x = block_cls(cfg, layer=i, causal=self.causal,
                    encoder_attention=self.encoder_attention, **flags,
                    name=f'layer_{i}')(x, *block_args)

    x = RMSNorm(cfg.rms_norm_eps, 'embed', cfg.weight_dtype,
                style=cfg.norm_style, name='final_norm')(x)
    if return_hidden or not self.produce_logits:
      return x
    head = embedder if cfg.tie_lm_head else Embed(
        cfg.vocab_size, cfg.embed_dim, dtype=cfg.activation_dtype,
        param_dtype=cfg.weight_dtype, name='lm_head')
    return head.attend(x[:, first_logit:], cfg.final_logit_softcap)

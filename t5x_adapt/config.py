"""Architecture configuration of a transformer stack.

One `StackConfig` describes one stack of blocks: the decoder-only model has
one, an encoder-decoder has two (an encoder and a decoder, which may differ
in size: the unbalanced T5Gemma models). The defaults are Gemma's; a few
settings give the other source families (Llama, Qwen 2, Qwen 3, Mistral:
SwiGLU, plain RMSNorm weights, no post-norms, unscaled embeddings, QKV
biases, an untied LM head, Llama 3 RoPE scaling). Gin binds these
dataclasses in the preset files under `gin/models/`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import gin
import jax.numpy as jnp

LOCAL = 'local'
GLOBAL = 'global'
MLP_ACTIVATIONS = ('gelu_tanh', 'silu')
NORM_STYLES = ('gemma', 'plain')


def _run_field(default):
  """A `StackConfig` field that says how a stack runs (dtypes, layout,
  kernels, regularisation), not which function it computes: checkpoints and
  converters compare architectures without them (`StackConfig.run_fields`).
  """
  return dataclasses.field(default=default, metadata={'run': True})


@gin.configurable
@dataclasses.dataclass(frozen=True)
class StackConfig:
  """Hyper-parameters of one stack of Gemma blocks.

  Attributes:
    vocab_size: Number of rows of the embedding table.
    num_layers: Number of transformer blocks.
    embed_dim: Model width (d_model).
    mlp_dim: Hidden width of the GeGLU MLP.
    num_heads: Query heads.
    num_kv_heads: Key/value heads (GQA when fewer than `num_heads`).
    head_dim: Width of one attention head.
    query_pre_attn_scalar: Scores are scaled by `query_pre_attn_scalar**-0.5`;
      defaults to `head_dim`.
    attention_pattern: The repeating period of layer kinds, e.g.
      `('local', 'global')` for Gemma 2, five locals then a global for Gemma 3.
      Layer `i` has kind `attention_pattern[i % len(attention_pattern)]`.
    sliding_window: Window of the local layers (`None`: all layers global).
      A causal layer sees the `sliding_window` keys up to its query; a
      bidirectional one as `bidirectional_window` says.
    bidirectional_window: How a bidirectional (encoder) local layer lays
      its window W around the query: 'symmetric' sees |q - k| < W (2W - 1
      keys; T5Gemma's encoder, whose transformers config says W - 1);
      'split' sees W keys, (W + 1) // 2 up to and including the query and
      W // 2 after it (T5Gemma 2's encoder, as transformers' t5gemma2
      masks it).
    rope_local_base: RoPE base of local layers.
    rope_global_base: RoPE base of global layers.
    rope_global_scale: RoPE scaling factor of global layers: linear
      (positions are divided by it; Gemma 3 4B uses 8), or Llama 3's with
      `rope_llama3`.
    rope_llama3: Llama 3's frequency-dependent RoPE scaling of global layers,
      `(low_freq_factor, high_freq_factor, original_max_position_embeddings)`
      with `rope_global_scale` as its factor; None: linear scaling.
    attn_logit_softcap: `c * tanh(s / c)` on attention scores, before masking.
    final_logit_softcap: The same on the output logits (decoders only).
    use_qk_norm: Per-head RMSNorm of queries and keys (Gemma 3).
    eoi_token_id: A token embedded by a vector of its own instead of its
      table row (T5Gemma 2's end-of-image token, 256000), or None.
    rms_norm_eps: Epsilon of every RMSNorm.
    mlp_activation: The gated MLP's activation: 'gelu_tanh' (GeGLU, Gemma)
      or 'silu' (SwiGLU, Llama, Qwen, Mistral).
    norm_style: 'gemma' (`x * (1 + scale)`, scale initialised to 0) or
      'plain' (`x * scale`, initialised to 1).
    post_norms: Gemma's sandwich norms after each sublayer; without them a
      block has only pre-norms (Llama).
    scale_embeddings: Multiply embeddings by sqrt(embed_dim) (Gemma).
    qkv_bias: Biases on the query, key and value projections (Qwen 2).
    tie_lm_head: The LM head is the embedding table; otherwise a table of
      its own (`lm_head`).
    family: The transformers class family on export: 'gemma2', 'gemma3',
      'llama', 'qwen2', 'qwen3' or 'mistral'.
    dtype: Activation dtype.
    param_dtype: Parameter dtype.
    scan_layers: Stack the repeating period with `nn.scan` (flat compile time).
    remat_policy: `'none'`, `'full'` or `'dots'` (save matmul outputs).
    dropout_rate: Dropout on residual branches.
    attention_impl: How attention runs (`t5x_adapt.kernels`): 'dense' (the
      reference), 'blocked', 'splash' (TPU), 'cudnn' (GPU) or 'auto'.
  """

  vocab_size: int = 256000
  num_layers: int = 26
  embed_dim: int = 2304
  mlp_dim: int = 9216
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 256
  query_pre_attn_scalar: Optional[float] = None
  attention_pattern: tuple[str, ...] = (LOCAL, GLOBAL)
  sliding_window: Optional[int] = 4096
  bidirectional_window: str = 'symmetric'
  rope_local_base: float = 10_000.0
  rope_global_base: float = 10_000.0
  rope_global_scale: float = 1.0
  rope_llama3: Optional[tuple[float, float, int]] = None
  attn_logit_softcap: Optional[float] = 50.0
  final_logit_softcap: Optional[float] = 30.0
  use_qk_norm: bool = False
  eoi_token_id: Optional[int] = None
  rms_norm_eps: float = 1e-6
  mlp_activation: str = 'gelu_tanh'
  norm_style: str = 'gemma'
  post_norms: bool = True
  scale_embeddings: bool = True
  qkv_bias: bool = False
  tie_lm_head: bool = True
  family: str = 'gemma2'
  # Run fields (`RUN_FIELDS`): how the stack runs, not what it computes.
  dtype: str = _run_field('float32')
  param_dtype: str = _run_field('float32')
  scan_layers: bool = _run_field(True)
  remat_policy: str = _run_field('none')
  dropout_rate: float = _run_field(0.0)
  attention_impl: str = _run_field('dense')

  # A model's config is a StackConfig (decoder-only) or an
  # EncoderDecoderConfig; both answer the questions below, so no code outside
  # the configs and models asks which one it has.
  is_encoder_decoder = False

  def __post_init__(self):
    # Gin hands lists where the dataclass wants tuples.
    object.__setattr__(self, 'attention_pattern',
                       tuple(self.attention_pattern))
    if self.rope_llama3 is not None:
      object.__setattr__(self, 'rope_llama3', tuple(self.rope_llama3))
    for name, value, choices in (
        ('mlp_activation', self.mlp_activation, MLP_ACTIVATIONS),
        ('norm_style', self.norm_style, NORM_STYLES)):
      if value not in choices:
        raise ValueError(f'{name} must be one of {choices}, got {value!r}')
    for kind in self.attention_pattern:
      if kind not in (LOCAL, GLOBAL):
        raise ValueError(f'attention_pattern entries must be {LOCAL!r} or '
                         f'{GLOBAL!r}, got {kind!r}')
    if self.bidirectional_window not in ('symmetric', 'split'):
      raise ValueError("bidirectional_window must be 'symmetric' or 'split',"
                       f' got {self.bidirectional_window!r}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_heads={self.num_heads} is not a multiple of '
                       f'num_kv_heads={self.num_kv_heads}')

  @classmethod
  def run_fields(cls) -> tuple[str, ...]:
    """Fields that say how the stack runs, not what it computes."""
    return tuple(f.name for f in dataclasses.fields(cls)
                 if f.metadata.get('run'))

  def architecture(self) -> dict:
    """The fields that decide the function the stack computes."""
    run = set(self.run_fields())
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in run}

  @property
  def query_scale(self) -> float:
    scalar = self.query_pre_attn_scalar or self.head_dim
    return float(scalar) ** -0.5

  @property
  def period(self) -> int:
    return len(self.attention_pattern)

  @property
  def num_periods(self) -> int:
    """Whole repetitions of the pattern: the scanned part of the stack."""
    return self.num_layers // self.period

  def layer_kind(self, layer: int) -> str:
    return self.attention_pattern[layer % self.period]

  def layer_window(self, layer: int) -> Optional[int]:
    return self.sliding_window if self.layer_kind(layer) == LOCAL else None

  def layer_window_bounds(self, layer: int, causal: bool
                          ) -> tuple[Optional[int], Optional[int]]:
    """(window, window_ahead) of layer `layer` (`kernels.masks`): its keys
    satisfy q - k < window and k - q < window_ahead (None: window)."""
    window = self.layer_window(layer)
    if window is None or causal or self.bidirectional_window == 'symmetric':
      return window, None
    return (window + 1) // 2, window // 2 + 1

  def layer_rope(self, layer: int) -> tuple[float, float, Optional[tuple]]:
    """(base, scale factor, Llama 3 scaling or None) of layer `layer`'s
    RoPE (`layers.rope.apply_rope`)."""
    if self.layer_kind(layer) == LOCAL:
      return self.rope_local_base, 1.0, None
    return self.rope_global_base, self.rope_global_scale, self.rope_llama3

  @property
  def activation_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @property
  def weight_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.param_dtype)

  def replace(self, **changes) -> 'StackConfig':
    return dataclasses.replace(self, **changes)

  def as_decoder_only(self) -> 'StackConfig':
    """The decoder-only stack this one is adapted (and distilled) from: the
    same, less what only an encoder-decoder's stacks have (T5Gemma 2's split
    encoder window and end-of-image embedding)."""
    return self.replace(bidirectional_window='symmetric', eoi_token_id=None)

  @property
  def decoder_stack(self) -> 'StackConfig':
    """The stack that produces the output tokens (this one)."""
    return self

  def embedder_path(self, stack: str = 'decoder') -> tuple[str, ...]:
    """Where the token embedding lives in the parameter tree."""
    return (stack, 'token_embedder')

  def stacks(self) -> dict[str, 'StackConfig']:
    """{parameter subtree name: stack}: the decoder-only model's one."""
    return {'decoder': self}

  def with_stacks(self, stacks: dict[str, 'StackConfig']) -> 'StackConfig':
    """The config with its stacks replaced (the inverse of `stacks`)."""
    return stacks['decoder']

  def map_stacks(self, **changes) -> 'StackConfig':
    """The same model with `changes` applied to every stack."""
    return self.replace(**changes)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EncoderDecoderConfig:
  """A T5Gemma or T5Gemma 2 encoder-decoder: two stacks, possibly of
  different sizes.

  The decoder's cross-attention reads the final-normed encoder output; its key
  and value projections take the encoder width as input, so an unbalanced
  model (e.g. 9B encoder, 2B decoder) needs nothing else. T5Gemma 2 merges
  cross-attention into the decoder's self-attention (`encoder_attention`),
  whose key/value projections then read the encoder output too, so both
  stacks must be as wide.

  Attributes:
    encoder: The encoder stack.
    decoder: The decoder stack (its embedding is tied to the LM head).
    tie_embeddings: One embedding table for the encoder, the decoder and
      the LM head (T5Gemma 2 ties them): a single array (with the
      end-of-image vector, if any) at `params['token_embedder']`, read by
      both stacks, so its gradient is the sum of both paths and it is
      stored, clipped and updated once (`embedder_path`).
    encoder_attention: How the decoder reads the encoder output: 'cross'
      (a cross-attention sublayer per block, T5Gemma) or 'merged' (T5Gemma
      2: one softmax over the self and encoder keys, see
      `layers.attention.Attention`).
  """

  encoder: StackConfig = dataclasses.field(default_factory=StackConfig)
  decoder: StackConfig = dataclasses.field(default_factory=StackConfig)
  tie_embeddings: bool = False
  encoder_attention: str = 'cross'

  is_encoder_decoder = True

  def __post_init__(self):
    if self.tie_embeddings:
      for field in ('embed_dim', 'eoi_token_id', 'scale_embeddings'):
        mine, theirs = (getattr(self.encoder, field),
                        getattr(self.decoder, field))
        if mine != theirs:
          raise ValueError(f'tie_embeddings needs one embedding for both '
                           f'stacks: encoder {field}={mine!r}, decoder '
                           f'{field}={theirs!r}')
    if self.encoder_attention not in ('cross', 'merged'):
      raise ValueError("encoder_attention must be 'cross' or 'merged', got "
                       f'{self.encoder_attention!r}')
    if self.encoder_attention == 'merged' and not self.is_balanced:
      raise ValueError('merged attention projects the encoder output with '
                       "the decoder's key/value projections: it needs equal "
                       f'widths, got encoder {self.encoder.embed_dim} and '
                       f'decoder {self.decoder.embed_dim}')
    if self.encoder.vocab_size != self.decoder.vocab_size:
      raise ValueError('encoder and decoder must share a vocabulary: '
                       f'{self.encoder.vocab_size} != '
                       f'{self.decoder.vocab_size}')

  @property
  def is_balanced(self) -> bool:
    return self.encoder.embed_dim == self.decoder.embed_dim

  def replace(self, **changes) -> 'EncoderDecoderConfig':
    return dataclasses.replace(self, **changes)

  @property
  def vocab_size(self) -> int:
    return self.decoder.vocab_size

  @property
  def decoder_stack(self) -> StackConfig:
    """The stack that produces the output tokens."""
    return self.decoder

  def embedder_path(self, stack: str) -> tuple[str, ...]:
    """Where `stack`'s token embedding lives in the parameter tree: the
    model's one table when tied, else the stack's own."""
    return ('token_embedder',) if self.tie_embeddings else (
        stack, 'token_embedder')

  def stacks(self) -> dict[str, StackConfig]:
    """{parameter subtree name: stack}."""
    return {'encoder': self.encoder, 'decoder': self.decoder}

  def with_stacks(self, stacks: dict[str, StackConfig]
                  ) -> 'EncoderDecoderConfig':
    """The config with its stacks replaced (the inverse of `stacks`)."""
    return self.replace(**stacks)

  def map_stacks(self, **changes) -> 'EncoderDecoderConfig':
    """The same model with `changes` applied to both stacks."""
    return self.with_stacks({name: stack.replace(**changes)
                             for name, stack in self.stacks().items()})


def config_to_dict(config: StackConfig | EncoderDecoderConfig) -> dict:
  """JSON-ready dict of a config (stored beside checkpoints)."""
  if config.is_encoder_decoder:
    return {'encoder': config_to_dict(config.encoder),
            'decoder': config_to_dict(config.decoder),
            'tie_embeddings': config.tie_embeddings,
            'encoder_attention': config.encoder_attention}
  return dict(dataclasses.asdict(config),
              attention_pattern=list(config.attention_pattern))


def config_from_dict(data: dict) -> StackConfig | EncoderDecoderConfig:
  """Inverse of `config_to_dict`; unknown fields are an error."""
  if {'encoder', 'decoder'} <= set(data):
    return EncoderDecoderConfig(config_from_dict(data['encoder']),
                                config_from_dict(data['decoder']),
                                data.get('tie_embeddings', False),
                                data.get('encoder_attention', 'cross'))
  known = {f.name for f in dataclasses.fields(StackConfig)}
  unknown = set(data) - known
  if unknown:
    raise ValueError(f'unknown StackConfig fields: {sorted(unknown)}')
  return StackConfig(**data)

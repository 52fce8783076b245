"""Every model preset under gin/models/ builds, and has the right size.

Parameter shapes come from `jax.eval_shape` (nothing is allocated), so even
the 27B and 9B-9B presets are cheap. Each count is checked against

  * an analytic count written here from the architecture table below,
    independently of the model code (exact: a missing or extra parameter of
    any kind changes it), and
  * for the decoder-only Gemma models, the published parameter counts.

The table of counts, with the published figures and build times, is
`python benchmarks/presets.py`.
"""

import dataclasses
import functools
import math
from typing import Optional

import jax
import pytest

from t5x_adapt import gin_utils
from t5x_adapt.models import DecoderOnlyModel, EncoderDecoderModel

INPUT_SHAPES = {'decoder_input_tokens': (1, 8), 'encoder_input_tokens': (1, 8)}

G2 = dict(family='gemma2', pattern=('local', 'global'), softcaps=(50.0, 30.0),
          qk_norm=False, rope=(10_000.0, 10_000.0, 1.0))
G3 = dict(family='gemma3', pattern=('local',) * 5 + ('global',),
          softcaps=(None, None), qk_norm=True,
          rope=(10_000.0, 1_000_000.0, 1.0))


def _plain(family, theta, scale=1.0, window=False, **changes):
  """A Llama-style family's stack style."""
  return dict(family=family, pattern=('local',) if window else ('global',),
              softcaps=(None, None), qk_norm=False,
              rope=(theta, theta, scale), plain=True, **changes)


@dataclasses.dataclass(frozen=True)
class Arch:
  """What the papers and model cards say about one stack."""
  layers: int
  d: int
  mlp: int
  heads: int
  kv: int
  head_dim: int
  vocab: int
  window: int
  qpas: int  # query_pre_attn_scalar
  family: str
  pattern: tuple
  softcaps: tuple  # (attention logits, final logits)
  qk_norm: bool
  rope: tuple  # (local base, global base, global scale factor)
  plain: bool = False  # Llama-style block: pre-norms only, SwiGLU
  qkv_bias: bool = False
  tied: bool = True  # the LM head is the embedding table


def _arch(layers, d, mlp, heads, kv, head_dim, vocab, window, qpas, style,
          **changes):
  return Arch(layers, d, mlp, heads, kv, head_dim, vocab, window, qpas,
              **{**style, **changes})


# Gemma 2 (arXiv 2408.00118), Gemma 3 (arXiv 2503.19786, HF configs) and the
# T5Gemma mT5-size stacks (arXiv 2504.06225).
ARCH = {
    'gemma2_2b': _arch(26, 2304, 9216, 8, 4, 256, 256000, 4096, 256, G2),
    'gemma2_9b': _arch(42, 3584, 14336, 16, 8, 256, 256000, 4096, 256, G2),
    'gemma2_27b': _arch(46, 4608, 36864, 32, 16, 128, 256000, 4096, 144, G2),
    'gemma3_270m': _arch(18, 640, 2048, 4, 1, 256, 262144, 512, 256, G3),
    'gemma3_1b': _arch(26, 1152, 6912, 4, 1, 256, 262144, 512, 256, G3),
    'gemma3_4b': _arch(34, 2560, 10240, 8, 4, 256, 262144, 1024, 256, G3,
                       rope=(10_000.0, 1_000_000.0, 8.0)),
    'gemma2_s': _arch(8, 512, 1024, 8, 8, 64, 256000, 4096, 64, G2),
    'gemma2_b': _arch(12, 768, 2048, 12, 12, 64, 256000, 4096, 64, G2),
    'gemma2_l': _arch(24, 1024, 2816, 16, 16, 64, 256000, 4096, 64, G2),
    'gemma2_ml': _arch(26, 1152, 6912, 4, 4, 256, 256000, 4096, 256, G2),
    'gemma2_xl': _arch(24, 2048, 5120, 32, 32, 64, 256000, 4096, 64, G2),
    'gemma2_tiny': _arch(4, 64, 128, 4, 2, 16, 512, 8, 16, G2),
    'gemma2_tiny_wide': _arch(6, 96, 192, 6, 3, 16, 512, 8, 16, G2),
    'gemma3_tiny': _arch(6, 64, 128, 4, 1, 16, 512, 8, 16, G3),
    # Llama 3.2 1B, Qwen2.5 0.5B, Qwen3 0.6B, Mistral 7B v0.1 (HF configs).
    'llama3_2_1b': _arch(16, 2048, 8192, 32, 8, 64, 128256, None, 64,
                         _plain('llama', 500_000.0, 32.0)),
    'qwen2_5_0_5b': _arch(24, 896, 4864, 14, 2, 64, 151936, None, 64,
                          _plain('qwen2', 1e6, qkv_bias=True)),
    'qwen3_0_6b': _arch(28, 1024, 3072, 16, 8, 128, 151936, None, 128,
                        _plain('qwen3', 1e6), qk_norm=True),
    'mistral_7b': _arch(32, 4096, 14336, 32, 8, 128, 32000, 4096, 128,
                        _plain('mistral', 10_000.0, window=True),
                        tied=False),
    'llama_tiny': _arch(3, 64, 128, 4, 2, 16, 512, None, 16,
                        _plain('llama', 500_000.0, 8.0), tied=False),
    'qwen2_tiny': _arch(3, 64, 128, 4, 2, 16, 512, None, 16,
                        _plain('qwen2', 1e6, qkv_bias=True)),
    'qwen3_tiny': _arch(3, 64, 128, 4, 2, 16, 512, None, 16,
                        _plain('qwen3', 1e6), qk_norm=True),
    'mistral_tiny': _arch(3, 64, 128, 4, 2, 16, 512, 8, 16,
                          _plain('mistral', 10_000.0, window=True),
                          tied=False),
}

# preset: (encoder stack or None for decoder-only, decoder stack)
PRESETS = {
    'gemma2_2b': (None, 'gemma2_2b'),
    'gemma2_9b': (None, 'gemma2_9b'),
    'gemma2_27b': (None, 'gemma2_27b'),
    'gemma3_270m': (None, 'gemma3_270m'),
    'gemma3_1b': (None, 'gemma3_1b'),
    'gemma3_4b': (None, 'gemma3_4b'),
    'gemma2_tiny': (None, 'gemma2_tiny'),
    'gemma3_tiny': (None, 'gemma3_tiny'),
    't5gemma_2b_2b': ('gemma2_2b', 'gemma2_2b'),
    't5gemma_9b_9b': ('gemma2_9b', 'gemma2_9b'),
    't5gemma_9b_2b': ('gemma2_9b', 'gemma2_2b'),
    't5gemma_s_s': ('gemma2_s', 'gemma2_s'),
    't5gemma_b_b': ('gemma2_b', 'gemma2_b'),
    't5gemma_l_l': ('gemma2_l', 'gemma2_l'),
    't5gemma_ml_ml': ('gemma2_ml', 'gemma2_ml'),
    't5gemma_xl_xl': ('gemma2_xl', 'gemma2_xl'),
    't5gemma_270m_270m': ('gemma3_270m', 'gemma3_270m'),
    't5gemma_1b_1b': ('gemma3_1b', 'gemma3_1b'),
    't5gemma_tiny': ('gemma2_tiny', 'gemma2_tiny'),
    't5gemma_tiny_unbalanced': ('gemma2_tiny_wide', 'gemma2_tiny'),
    't5gemma3_tiny': ('gemma3_tiny', 'gemma3_tiny'),
    't5gemma2_tiny': ('gemma3_tiny', 'gemma3_tiny'),
    't5gemma2_270m_270m': ('gemma3_270m', 'gemma3_270m'),
    't5gemma2_1b_1b': ('gemma3_1b', 'gemma3_1b'),
    't5gemma2_4b_4b': ('gemma3_4b', 'gemma3_4b'),
    'llama3_2_1b': (None, 'llama3_2_1b'),
    'qwen2_5_0_5b': (None, 'qwen2_5_0_5b'),
    'qwen3_0_6b': (None, 'qwen3_0_6b'),
    'mistral_7b': (None, 'mistral_7b'),
    'llama_tiny': (None, 'llama_tiny'),
    'qwen2_tiny': (None, 'qwen2_tiny'),
    'qwen3_tiny': (None, 'qwen3_tiny'),
    'mistral_tiny': (None, 'mistral_tiny'),
}
# T5Gemma 2: merged attention (no cross-attention weights), one table for
# encoder, decoder and head, and an end-of-image vector per embedder.
T5GEMMA2 = {name for name in PRESETS if name.startswith('t5gemma2_')}
# The released T5Gemma 2 models add a SigLIP vision encoder of about 417M
# parameters (arXiv 2512.14856); it is not built here, so only text counts
# are checked (the totals with the tower are printed).
VISION_TOWER = 417e6

# Published totals of the decoder-only models (model cards / technical
# reports; Gemma 3 4B: the language model without its vision encoder).
PUBLISHED = {
    'gemma2_2b': 2.61e9,
    'gemma2_9b': 9.24e9,
    'gemma2_27b': 27.2e9,
    'gemma3_270m': 268e6,
    'gemma3_1b': 1.0e9,
    'gemma3_4b': 3.88e9,
    'llama3_2_1b': 1.24e9,
    'qwen2_5_0_5b': 0.49e9,
    'qwen3_0_6b': 0.6e9,
    'mistral_7b': 7.24e9,
}
PUBLISHED_RTOL = 0.01

# The T5Gemma paper's figure for 9B-2B. It does not match the architecture
# as described (a 9B encoder with its own embedding, 9.24B, + a 2B decoder
# with its embedding tied to the LM head, 2.61B, + cross-attention with K/V
# projected from width 3584, 0.44B: about 12.3B), so it is only printed.
PAPER_ONLY = {'t5gemma_9b_2b': 10.4e9}


def _attention_params(a: Arch, kv_width: int) -> int:
  q_and_out = 2 * a.d * a.heads * a.head_dim
  k_and_v = 2 * kv_width * a.kv * a.head_dim
  qk_norms = 2 * a.head_dim if a.qk_norm else 0
  return q_and_out + k_and_v + qk_norms


def analytic_stack_params(a: Arch, cross_kv_width: Optional[int] = None) -> int:
  """Embedding (tied to the LM head of a decoder) + blocks + final norm.

  A block: self-attention, GeGLU MLP (gate, up, down) and four sandwich
  norms; a decoder block of an encoder-decoder adds cross-attention (keys and
  values projected from the encoder width) and its two norms.
  """
  norms = 2 if a.plain else 4  # Llama-style blocks have pre-norms only
  biases = (a.heads + 2 * a.kv) * a.head_dim if a.qkv_bias else 0
  block = _attention_params(a, a.d) + biases + 3 * a.d * a.mlp + norms * a.d
  if cross_kv_width is not None:
    block += _attention_params(a, cross_kv_width) + biases + norms // 2 * a.d
  tables = 1 if a.tied else 2
  return tables * a.vocab * a.d + a.layers * block + a.d


def analytic_params(preset: str) -> int:
  """Parameters in the tree (T5Gemma 2's tied table counted once)."""
  encoder, decoder = PRESETS[preset]
  if encoder is None:
    return analytic_stack_params(ARCH[decoder])
  if preset in T5GEMMA2:  # No cross-attention; one table + end-of-image.
    table = ARCH[decoder].vocab * ARCH[decoder].d + ARCH[decoder].d
    return sum(analytic_stack_params(ARCH[s]) + ARCH[s].d
               for s in (encoder, decoder)) - table
  return (analytic_stack_params(ARCH[encoder]) +
          analytic_stack_params(ARCH[decoder], cross_kv_width=ARCH[encoder].d))


def _leaves(tree):
  """(path string, leaf) pairs of a parameter tree."""
  return [('/'.join(str(getattr(k, 'key', k)) for k in path), leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


@dataclasses.dataclass
class Built:
  model: object
  shapes: dict
  count: int


@functools.lru_cache(maxsize=None)
def build(preset: str) -> Built:
  model = gin_utils.load_model(preset)
  shapes = model.param_shapes()
  count = sum(math.prod(leaf.shape) for _, leaf in _leaves(shapes))
  return Built(model, shapes, count)


def test_preset_table_is_complete():
  assert sorted(PRESETS) == gin_utils.list_presets()


def _check_stack(config, name):
  a = ARCH[name]
  assert (config.num_layers, config.embed_dim, config.mlp_dim,
          config.num_heads, config.num_kv_heads, config.head_dim,
          config.vocab_size) == (a.layers, a.d, a.mlp, a.heads, a.kv,
                                 a.head_dim, a.vocab), name
  assert config.family == a.family, name
  assert config.attention_pattern == a.pattern, name
  assert config.sliding_window == a.window, name
  assert config.query_scale == pytest.approx(a.qpas**-0.5), name
  assert (config.attn_logit_softcap,
          config.final_logit_softcap) == a.softcaps, name
  assert config.use_qk_norm == a.qk_norm, name
  assert (config.rope_local_base, config.rope_global_base,
          config.rope_global_scale) == a.rope, name
  assert (config.norm_style == 'plain') == a.plain, name
  assert config.post_norms != a.plain, name
  assert config.mlp_activation == ('silu' if a.plain else 'gelu_tanh'), name
  assert config.scale_embeddings != a.plain, name
  assert config.qkv_bias == a.qkv_bias and config.tie_lm_head == a.tied, name


@pytest.mark.parametrize('preset', sorted(PRESETS))
def test_preset(preset):
  built = build(preset)
  encoder, decoder = PRESETS[preset]
  if encoder is None:
    assert type(built.model) is DecoderOnlyModel
    _check_stack(built.model.config, decoder)
    assert set(built.shapes) == {'decoder'}
  else:
    assert type(built.model) is EncoderDecoderModel
    _check_stack(built.model.config.encoder, encoder)
    _check_stack(built.model.config.decoder, decoder)
    tied = {'token_embedder'} if built.model.config.tie_embeddings else set()
    assert set(built.shapes) == {'encoder', 'decoder'} | tied
  assert built.count == analytic_params(preset)
  if preset in T5GEMMA2:
    config = built.model.config
    assert (config.encoder_attention, config.tie_embeddings) == ('merged',
                                                                 True)
    assert config.encoder.bidirectional_window == 'split'
    assert config.encoder.eoi_token_id == config.decoder.eoi_token_id
    unique = built.count  # the tied table and end-of-image vector, once
    print(f'\n{preset}: {unique / 1e6:.1f}M text parameters (one table), '
          f'{(unique + VISION_TOWER) / 1e6:.0f}M with the vision encoder')
  if preset in PUBLISHED:
    assert built.count == pytest.approx(PUBLISHED[preset], rel=PUBLISHED_RTOL)


@pytest.mark.parametrize('preset, encoder_width, decoder_width',
                         [('t5gemma_9b_2b', 3584, 2304),
                          ('t5gemma_tiny_unbalanced', 96, 64)])
def test_unbalanced_cross_attention_widths(preset, encoder_width,
                                           decoder_width):
  """Cross-attention K/V read the encoder width; Q and out the decoder's."""
  leaves = _leaves(build(preset).shapes['decoder'])
  by_name = {}  # e.g. 'key/kernel' -> one leaf per scanned group / layer
  for path, leaf in leaves:
    if '/cross_attention/' in path:
      name = path.split('/cross_attention/')[1]
      by_name.setdefault(name, []).append(leaf)
  assert by_name, 'no cross-attention parameters'
  for name in ('key/kernel', 'value/kernel'):
    for leaf in by_name[name]:  # [(layers,) in, kv_heads, head_dim]
      assert leaf.shape[-3] == encoder_width, (name, leaf.shape)
  for leaf in by_name['query/kernel']:  # [(layers,) in, heads, head_dim]
    assert leaf.shape[-3] == decoder_width, leaf.shape
  for leaf in by_name['out/kernel']:  # [(layers,) heads, head_dim, out]
    assert leaf.shape[-1] == decoder_width, leaf.shape
  # The encoder keeps its own embedding at its own width.
  encoder = dict(_leaves(build(preset).shapes['encoder']))
  assert encoder['token_embedder/embedding'].shape[-1] == encoder_width


def test_unbalanced_is_the_sum_of_its_parts():
  """9B-2B = Gemma 2 9B + Gemma 2 2B + the decoder's cross-attention."""
  nine, two = ARCH['gemma2_9b'], ARCH['gemma2_2b']
  cross = two.layers * (_attention_params(two, nine.d) + 2 * two.d)
  assert build('t5gemma_9b_2b').count == (
      build('gemma2_9b').count + build('gemma2_2b').count + cross)


def test_load_model_overrides_and_bindings():
  model = gin_utils.load_model('gemma3_tiny', dtype='bfloat16',
                               scan_layers=False)
  assert model.config.dtype == 'bfloat16' and not model.config.scan_layers
  assert model.config.num_layers == ARCH['gemma3_tiny'].layers

  model = gin_utils.load_model(
      't5gemma_tiny_unbalanced', remat_policy='full',
      bindings=["StackConfig.param_dtype = 'bfloat16'",
                'EncoderDecoderModel.z_loss = 1e-4'])
  for stack in (model.config.encoder, model.config.decoder):
    assert stack.remat_policy == 'full' and stack.param_dtype == 'bfloat16'
  assert model.z_loss == 1e-4
  assert model.config.encoder.embed_dim == ARCH['gemma2_tiny_wide'].d

  # A fresh config each call; a path works as well as a preset name.
  model = gin_utils.load_model(gin_utils.MODELS_DIR / 't5gemma_tiny.gin')
  assert model.config.encoder.param_dtype == 'float32'
  assert model.z_loss == 0.0
  model = gin_utils.load_model('gin/models/gemma2_tiny.gin')
  assert type(model) is DecoderOnlyModel

  with pytest.raises(ValueError, match='unknown model preset'):
    gin_utils.load_model('gemma2_3b')

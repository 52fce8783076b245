"""The gemma library's Flax checkpoints, read by the one loader.

Random tiny models are built and run by the gemma library's own modules
(`gemma.gm.nn` for Gemma 2 and Gemma 3, `gemma.research.t5gemma` for
T5Gemma, balanced and unbalanced, with separate and fused q/k/v), saved as
the library saves them (Orbax `StandardCheckpointer`, `gm.ckpts.save_params`;
the flat layout of the official releases by the library's own
`flatten_and_remap_params`), loaded here with the matching preset, and
their logits compared with the library's forward pass.

The library (gemma 3.3.0, the version PyPI serves for Python 3.11) is
installed by `make test` beside the virtual environment, not into it
(`requirements-gemma-lib.txt`: its dependencies, installed without theirs,
would pull the whole of kauldron's stack).
"""

import importlib.util
import pathlib
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from t5x_adapt import gin_utils
from t5x_adapt.checkpoints import errors
from t5x_adapt.convert import gemma_lib
from t5x_adapt.convert import load
from t5x_adapt.data import vocab as vocab_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
LIBRARY = ROOT / '.venv' / 'gemma_lib'
if LIBRARY.is_dir() and str(LIBRARY) not in sys.path:
  sys.path.append(str(LIBRARY))  # after the venv's own packages

gm_nn = pytest.importorskip('gemma.gm.nn', reason='make test installs it')
# pylint: disable=g-import-not-at-top,wrong-import-position
from gemma.gm.nn import _config as gm_config
from gemma.gm.nn import _modules as gm_modules
from gemma.gm.nn import _transformer as gm_transformer
from gemma.research.t5gemma import modules as t5_modules
from gemma.research.t5gemma import t5gemma as t5_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

LOCAL = gm_modules.AttentionType.LOCAL_SLIDING
GLOBAL = gm_modules.AttentionType.GLOBAL
TABLE_ROWS = 520  # a padded table: the presets use its first 512 rows
VOCAB = 512
TOLERANCE = 1e-4


def _compat():
  """The library's `gm/ckpts/_compat.py` (its package imports kauldron's
  training stack, which does not run beside the pinned jax)."""
  import gemma  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(gemma.__file__).parent / 'gm' / 'ckpts' / '_compat.py'
  spec = importlib.util.spec_from_file_location('gemma_ckpts_compat', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _save(params, path, flat=False):
  """As `gm.ckpts.save_params` saves (flat: as the releases are laid out)."""
  if flat:
    params = {f'transformer/{k}': v for k, v in
              _compat().flatten_and_remap_params(params).items()}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, params)
  checkpointer.wait_until_finished()
  return path


def _random(params, seed):
  """float32 parameters redrawn large enough that every tensor matters."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      0.3 * jax.random.normal(k, x.shape, jnp.float32)
      for k, x in zip(keys, leaves)])


def _error(got, expected):
  return float(np.max(np.abs(got - expected)) / np.max(np.abs(expected)))


def _tokens(shape, seed):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 3, VOCAB)


# --------------------------------------------------------- decoder-only --

GEMMA2 = dict(
    num_embed=TABLE_ROWS, embed_dim=64, hidden_dim=128, num_heads=4,
    head_dim=16, num_kv_heads=2, final_logit_softcap=30.0,
    use_post_attn_norm=True, use_post_ffw_norm=True,
    attention_types=(LOCAL, GLOBAL) * 2, attn_logits_soft_cap=50.0,
    sliding_window_size=8)
GEMMA3 = dict(
    num_embed=TABLE_ROWS, embed_dim=64, hidden_dim=128, num_heads=4,
    head_dim=16, num_kv_heads=1, final_logit_softcap=None,
    use_post_attn_norm=True, use_post_ffw_norm=True, use_qk_norm=True,
    attention_types=(LOCAL,) * 5 + (GLOBAL,), sliding_window_size=8,
    transpose_gating_einsum=True, local_base_frequency=10_000,
    global_base_frequency=1_000_000)


def _library_decoder(settings, shape, tokens_seed, params_seed):
  """A decoder-only model of the library's: (tokens of `shape`, its random
  float32 parameters, its logits of the tokens)."""
  library = gm_transformer.Transformer(
      config=gm_config.TransformerConfig(**settings), dtype=jnp.float32)
  tokens = _tokens(shape, tokens_seed)
  params = _random(library.init(jax.random.PRNGKey(0), tokens)['params'],
                   params_seed)
  return tokens, params, np.asarray(
      library.apply({'params': params}, tokens).logits)


@pytest.mark.parametrize('preset,settings,flat', [
    ('gemma2_tiny', GEMMA2, False),
    ('gemma2_tiny', GEMMA2, True),
    ('gemma3_tiny', GEMMA3, True),
], ids=['gemma2-nested', 'gemma2-flat', 'gemma3-flat'])
def test_decoder_only_logits_match_the_library(preset, settings, flat,
                                               tmp_path):
  # 24 tokens: longer than the sliding window.
  tokens, params, expected = _library_decoder(settings, (2, 24), 0, 1)
  path = _save(params, tmp_path / 'checkpoint', flat)
  assert load.checkpoint_kind(path) == load.GEMMA_LIB

  model = gin_utils.load_model(preset)
  ours = load.load_params(path, model)
  got = np.asarray(model.compute_logits(
      ours, {'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens}))
  # The table's padding rows are left: the model's vocabulary is 512.
  error = _error(got, expected[..., :VOCAB])
  print(f'{preset} ({"flat" if flat else "nested"}): max relative logit '
        f'error {error:.2e}')
  assert error < TOLERANCE


def test_padded_table_kept_when_the_model_asks(tmp_path):
  tokens, params, expected = _library_decoder(GEMMA2, (1, 12), 2, 3)
  path = _save(params, tmp_path / 'checkpoint')
  model = gin_utils.load_model('gemma2_tiny', vocab_size=TABLE_ROWS)
  got = np.asarray(model.compute_logits(
      load.load_params(path, model),
      {'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens}))
  assert got.shape[-1] == TABLE_ROWS
  assert _error(got, expected) < TOLERANCE


# ------------------------------------------------------------- T5Gemma --


def _t5gemma_stack(num_layers, embed_dim, num_heads, num_kv_heads, cross,
                   encoder_dim):
  return t5_modules.TransformerConfig(
      num_layers=num_layers, num_embed=TABLE_ROWS, embed_dim=embed_dim,
      hidden_dim=2 * embed_dim, num_heads=num_heads, head_dim=16,
      num_kv_heads=num_kv_heads, final_logit_softcap=30.0,
      use_post_attn_norm=True, use_post_ffw_norm=True,
      attention_types=(t5_modules.AttentionType.LOCAL_SLIDING,
                       t5_modules.AttentionType.GLOBAL) * (num_layers // 2),
      attn_logits_soft_cap=50.0, sliding_window_size=8,
      enable_cross_attention=cross, bidirectional=not cross,
      kv_embed_dim=encoder_dim if cross else None)


# (preset, its gin overrides, encoder (layers, embed, heads, kv heads),
# decoder's)
T5GEMMA = {
    'balanced': ('t5gemma_tiny', [], (4, 64, 4, 2), (4, 64, 4, 2)),
    'unbalanced': ('t5gemma_tiny_unbalanced', [], (6, 96, 6, 3),
                   (4, 64, 4, 2)),
    # Multi-head attention: the library fuses q, k and v.
    'fused-qkv': ('t5gemma_tiny', ['gemma2_tiny/StackConfig.num_kv_heads = 4'],
                  (4, 64, 4, 4), (4, 64, 4, 4)),
}


@pytest.mark.parametrize('case', list(T5GEMMA))
def test_t5gemma_logits_match_the_library(case, tmp_path):
  preset, bindings, encoder, decoder = T5GEMMA[case]
  config = t5_lib.T5GemmaConfig(
      encoder_config=_t5gemma_stack(*encoder, cross=False, encoder_dim=None),
      decoder_config=_t5gemma_stack(*decoder, cross=True,
                                    encoder_dim=encoder[1]))
  library = t5_lib.T5Gemma(config, dtype=jnp.float32)
  inputs, targets = _tokens((2, 20), 4), _tokens((2, 12), 5)
  variables = library.init(jax.random.PRNGKey(0), target_tokens=targets,
                           input_tokens=inputs)
  params = _random(variables['params'], 6)
  expected = np.asarray(library.apply(
      {'params': params}, target_tokens=targets, input_tokens=inputs).logits)
  path = _save(params, tmp_path / 'checkpoint')

  model = gin_utils.load_model(preset, bindings)
  ours = load.load_params(path, model)
  got = np.asarray(model.compute_logits(ours, {
      'encoder_input_tokens': inputs, 'decoder_input_tokens': targets,
      'decoder_target_tokens': targets}))
  error = _error(got, expected[..., :VOCAB])
  print(f'T5Gemma {case}: max relative logit error {error:.2e}')
  assert error < TOLERANCE


# -------------------------------------------------------------- errors --


def test_a_model_of_other_shapes_is_refused_by_name(tmp_path):
  library = gm_transformer.Transformer(
      config=gm_config.TransformerConfig(**GEMMA2), dtype=jnp.float32)
  tokens = _tokens((1, 8), 7)
  path = _save(library.init(jax.random.PRNGKey(0), tokens)['params'],
               tmp_path / 'checkpoint')
  with pytest.raises(errors.CheckpointError,
                     match=r"'layer_0/mlp/\w+' has shape"):
    load.load_params(path, gin_utils.load_model(
        'gemma2_tiny', ['gemma2_tiny/StackConfig.mlp_dim = 96']))
  with pytest.raises(errors.CheckpointError, match='_query_norm'):
    load.load_params(path, gin_utils.load_model('gemma3_tiny'))
  with pytest.raises(errors.CheckpointError,
                     match='520 rows, fewer than .* vocabulary .1024'):
    load.load_params(path, gin_utils.load_model('gemma2_tiny',
                                                vocab_size=1024))


def test_the_preset_is_found_from_the_tensors(tmp_path):
  library = gm_transformer.Transformer(
      config=gm_config.TransformerConfig(**GEMMA3), dtype=jnp.float32)
  tokens = _tokens((1, 8), 8)
  path = _save(library.init(jax.random.PRNGKey(0), tokens)['params'],
               tmp_path / 'checkpoint', flat=True)
  checkpoint = gemma_lib.Checkpoint(path)
  assert gemma_lib.find_preset(
      checkpoint, ['gemma2_tiny', 'gemma3_tiny', 't5gemma_tiny']) == (
          'gemma3_tiny')
  assert load.model_of(path) is None  # no config: the caller names one
  # Kaggle's layout: the tokenizer beside the checkpoint directory.
  shutil.copy(vocab_lib.gemma3_model_file(), tmp_path / 'tokenizer.model')
  vocabulary = vocab_lib.checkpoint_vocabulary(str(path))
  assert vocabulary.sentencepiece_model_file == str(tmp_path /
                                                    'tokenizer.model')


def test_convert_command_writes_our_checkpoint(tmp_path):
  from t5x_adapt.convert import __main__ as convert  # pylint: disable=g-import-not-at-top
  tokens, params, expected = _library_decoder(GEMMA2, (1, 12), 9, 9)
  source = _save(params, tmp_path / 'checkpoint', flat=True)
  out = tmp_path / 'ours'
  assert convert.main(['gemma-to-orbax', str(source), str(out),
                       '--preset', 'gemma2_tiny']) == 0
  model, ours = load.model_and_params(out)
  got = np.asarray(model.compute_logits(
      ours, {'decoder_input_tokens': tokens, 'decoder_target_tokens': tokens}))
  assert _error(got, expected[..., :VOCAB]) < TOLERANCE

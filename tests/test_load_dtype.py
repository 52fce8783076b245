"""Each tensor is cast once, when read, straight into its parameter's dtype.

A bfloat16 load equals a float32 load cast to bfloat16, bit for bit, for
every way a tensor can be stored: transformers safetensors in float32 and
in bfloat16, and GGUF tensors in F32, F16, BF16 and a quantised type
(Q8_0, dequantised to float32 first); the GGUF norms (stored as
`1 + scale`) keep their float32 subtraction.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import gguf_fixtures
import hf_fixtures as hf
from t5x_adapt import convert
from t5x_adapt.config import StackConfig
from t5x_adapt.convert import gguf as gguf_lib
from t5x_adapt.convert import lazy
from t5x_adapt.convert import load
from t5x_adapt.convert import registry
from t5x_adapt.convert.tables import export_tensors
from t5x_adapt.models import model_for_config

BF16 = jnp.bfloat16


def _assert_bitwise_cast(narrow, wide, dtype=BF16):
  """Every leaf of `narrow` has `dtype` and the bits of `wide` cast to it."""
  narrow_leaves, narrow_tree = jax.tree_util.tree_flatten(narrow)
  wide_leaves, wide_tree = jax.tree_util.tree_flatten(wide)
  assert narrow_tree == wide_tree
  for a, b in zip(narrow_leaves, wide_leaves):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == dtype and b.dtype == np.float32
    np.testing.assert_array_equal(a.view(np.uint16),
                                  b.astype(dtype).view(np.uint16))


def _hf_fixture(name):
  if name == 'gemma3_stored_bf16':
    return hf.gemma3().to(torch.bfloat16)
  if name == 'llama':  # untied head, plain norms
    return hf.plain_family('llama')
  return {'gemma3': hf.gemma3, 't5gemma2': hf.t5gemma2}[name]()


@pytest.fixture(scope='module', params=['gemma3', 'gemma3_stored_bf16',
                                        'llama', 't5gemma2'])
def hf_checkpoint(request, tmp_path_factory):
  return hf.save(_hf_fixture(request.param),
                 tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize('scan_layers', [True, False])
def test_hf_bf16_load_is_the_float32_load_cast(hf_checkpoint, scan_layers):
  model, wide = convert.load_hf(hf_checkpoint, scan_layers=scan_layers,
                                text_only=True)
  _, narrow = convert.load_hf(hf_checkpoint, scan_layers=scan_layers,
                              dtype=BF16, text_only=True)
  _assert_bitwise_cast(narrow, wide)
  bf16_model = model_for_config(model.config.map_stacks(
      param_dtype='bfloat16'))
  _assert_bitwise_cast(load.load_params(hf_checkpoint, bf16_model), wide)


# -------------------------------------------------------------------- GGUF --

# GGUF tensor type of each tensor, by the end of its name; the rest F32.
_GGUF_TYPES = {'token_embd.weight': 'F16', 'attn_q.weight': 'BF16',
               'attn_k.weight': 'F16', 'ffn_up.weight': 'Q8_0',
               'ffn_down.weight': 'Q8_0'}
_NUMPY_TYPES = {'F32': np.float32, 'F16': np.float16}


def _gguf_stack() -> StackConfig:
  """A tiny stack as a Gemma 3 GGUF file describes one."""
  return StackConfig(
      vocab_size=64, num_layers=6, embed_dim=64, mlp_dim=128, num_heads=2,
      num_kv_heads=1, head_dim=32, query_pre_attn_scalar=32,
      attention_pattern=gguf_lib.GEMMA3_PATTERN, sliding_window=4,
      rope_local_base=gguf_lib.GEMMA3_LOCAL_ROPE_BASE,
      rope_global_base=1e6, attn_logit_softcap=None,
      final_logit_softcap=None, use_qk_norm=True, family='gemma3',
      scan_layers=False)


def _random_params(stack: StackConfig):
  shapes = model_for_config(stack).param_shapes()
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_unflatten(tree, [
      rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def _add_tensor(writer, name, tensor):
  import gguf  # pylint: disable=g-import-not-at-top
  kind = next((t for end, t in _GGUF_TYPES.items() if name.endswith(end)),
              'F32')
  if kind in _NUMPY_TYPES:
    writer.add_tensor(name, tensor.astype(_NUMPY_TYPES[kind]))
    return
  qtype = gguf.GGMLQuantizationType[kind]
  writer.add_tensor(name, gguf.quants.quantize(tensor, qtype),
                    raw_dtype=qtype)


def _write_gguf(path, stack):
  """A Gemma 3 GGUF file of random parameters, tensors of mixed types."""
  rules = registry.find(registry.GGUF, 'gemma3', 'test').rules(stack)
  return gguf_fixtures.write_gemma3_gguf(
      path, stack, export_tensors(rules, _random_params(stack)), _add_tensor)


@pytest.fixture(scope='module')
def gguf_checkpoint(tmp_path_factory):
  return _write_gguf(tmp_path_factory.mktemp('gguf') / 'tiny.gguf',
                     _gguf_stack())


def test_gguf_file_has_every_kind_of_tensor(gguf_checkpoint):
  reader = gguf_lib.open_gguf(gguf_checkpoint)
  kinds = {t.tensor_type.name for t in reader.tensors}
  assert kinds == {'F32', 'F16', 'BF16', 'Q8_0'}


@pytest.mark.parametrize('scan_layers', [True, False])
def test_gguf_bf16_load_is_the_float32_load_cast(gguf_checkpoint,
                                                 scan_layers):
  model, wide = convert.load_gguf(gguf_checkpoint, scan_layers=scan_layers)
  load.check_architecture(model.config, _gguf_stack(), 'the GGUF file')
  _, lazy_tree = gguf_lib.lazy_params(gguf_checkpoint, scan_layers, BF16)
  _assert_bitwise_cast(lazy.place(lazy_tree), wide)
  bf16_model = model_for_config(model.config.replace(param_dtype='bfloat16'))
  _assert_bitwise_cast(load.load_params(gguf_checkpoint, bf16_model), wide)

"""Bad transformers and GGUF checkpoints raise the errors of checkpoints/errors.py.

Each test damages a copy of a good checkpoint in one way and checks both the
exception type and that the message names the file or tensor at fault.
"""

import json
import pathlib
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_fixtures as hf
from t5x_adapt import assets
from t5x_adapt import convert
from t5x_adapt.checkpoints import errors

WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'


@pytest.fixture(scope='module')
def good_checkpoint(tmp_path_factory):
  """A tiny random Gemma2ForCausalLM written by save_pretrained."""
  return hf.save(hf.gemma2(layers=2), tmp_path_factory.mktemp('good'))


@pytest.fixture(scope='module')
def good_sharded_checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp('sharded')
  hf.gemma2(layers=2).save_pretrained(path, max_shard_size='100KB')
  assert (path / INDEX).exists()
  return path


@pytest.fixture
def checkpoint(good_checkpoint, tmp_path):
  """A copy of the good checkpoint that a test may damage."""
  return pathlib.Path(shutil.copytree(good_checkpoint, tmp_path / 'ckpt'))


def _rewrite_tensors(path, change):
  """Applies `change` to the {name: array} dict of the weights file."""
  tensors = load_file(path / WEIGHTS)
  change(tensors)
  save_file(tensors, path / WEIGHTS, metadata={'format': 'pt'})


def _edit_config(path, change):
  config = json.loads((path / 'config.json').read_text())
  change(config)
  (path / 'config.json').write_text(json.dumps(config))


def test_good_checkpoint_loads(checkpoint):
  model, _ = convert.load_hf(checkpoint)
  assert model.config.num_layers == 2


# ------------------------------------------------------------------ tensors --


def test_missing_tensor(checkpoint):
  name = 'model.layers.1.self_attn.k_proj.weight'
  _rewrite_tensors(checkpoint, lambda tensors: tensors.pop(name))
  with pytest.raises(errors.MissingTensorError, match=name) as info:
    convert.load_hf(checkpoint)
  assert str(checkpoint) in str(info.value)


def test_unexpected_tensor(checkpoint):
  name = 'model.layers.0.mlp.extra_proj.weight'
  _rewrite_tensors(checkpoint, lambda tensors: tensors.update(
      {name: np.zeros((3, 4), np.float32)}))
  with pytest.raises(errors.UnexpectedTensorError, match=name) as info:
    convert.load_hf(checkpoint)
  assert str(checkpoint) in str(info.value)


def test_wrong_shape(checkpoint):
  name = 'model.layers.0.mlp.up_proj.weight'

  def drop_a_row(tensors):
    assert tensors[name].shape == (128, 64)
    tensors[name] = tensors[name][:-1]

  _rewrite_tensors(checkpoint, drop_a_row)
  with pytest.raises(errors.ShapeMismatchError, match=name) as info:
    convert.load_hf(checkpoint)
  message = str(info.value)
  assert '(127, 64)' in message and '(128, 64)' in message


# -------------------------------------------------------------------- files --


def test_truncated_safetensors(checkpoint):
  weights = checkpoint / WEIGHTS
  data = weights.read_bytes()
  weights.write_bytes(data[:len(data) // 2])
  with pytest.raises(errors.CorruptCheckpointError, match='truncated') as info:
    convert.load_hf(checkpoint)
  assert str(weights) in str(info.value)


@pytest.mark.parametrize('where', ['header length', 'header json'])
def test_garbage_safetensors_header(checkpoint, where):
  weights = checkpoint / WEIGHTS
  data = bytearray(weights.read_bytes())
  # The file starts with the header's length (8 bytes), then its JSON.
  start = 0 if where == 'header length' else 8
  data[start:start + 32] = b'\xff' * 32
  weights.write_bytes(bytes(data))
  with pytest.raises(errors.CorruptCheckpointError) as info:
    convert.load_hf(checkpoint)
  assert str(weights) in str(info.value)


def test_no_safetensors(checkpoint):
  (checkpoint / WEIGHTS).unlink()
  with pytest.raises(FileNotFoundError, match='safetensors') as info:
    convert.load_hf(checkpoint)
  assert str(checkpoint) in str(info.value)


def test_missing_shard(good_sharded_checkpoint, tmp_path):
  path = pathlib.Path(shutil.copytree(good_sharded_checkpoint, tmp_path / 'c'))
  shard = sorted(path.glob('model-*.safetensors'))[-1]
  shard.unlink()
  with pytest.raises(FileNotFoundError, match=shard.name):
    convert.load_hf(path)


@pytest.mark.parametrize('text', ['{"weight_map": ', '{}'])
def test_corrupt_shard_index(good_sharded_checkpoint, tmp_path, text):
  path = pathlib.Path(shutil.copytree(good_sharded_checkpoint, tmp_path / 'c'))
  (path / INDEX).write_text(text)
  with pytest.raises(errors.CorruptCheckpointError, match=INDEX):
    convert.load_hf(path)


# ------------------------------------------------------------------- config --


def test_unknown_architecture(checkpoint):
  _edit_config(checkpoint,
               lambda config: config.update(architectures=['PhiForCausalLM']))
  with pytest.raises(errors.UnsupportedArchitectureError,
                     match='PhiForCausalLM') as info:
    convert.load_hf(checkpoint)
  message = str(info.value)
  assert str(checkpoint / 'config.json') in message
  for supported in ('Gemma2ForCausalLM', 'Gemma3ForCausalLM',
                    'T5GemmaForConditionalGeneration',
                    'T5Gemma2ForConditionalGeneration', 'LlamaForCausalLM',
                    'Qwen2ForCausalLM', 'Qwen3ForCausalLM',
                    'MistralForCausalLM'):
    assert supported in message


def test_missing_config(checkpoint):
  (checkpoint / 'config.json').unlink()
  with pytest.raises(FileNotFoundError, match='config.json') as info:
    convert.load_hf(checkpoint)
  assert str(checkpoint) in str(info.value)


def test_invalid_config_json(checkpoint):
  (checkpoint / 'config.json').write_text('{"architectures": [')
  with pytest.raises(errors.CorruptCheckpointError) as info:
    convert.load_hf(checkpoint)
  assert str(checkpoint / 'config.json') in str(info.value)


# --------------------------------------------------------------------- GGUF --


def test_truncated_gguf(tmp_path):
  # 1 MB of a real file stops inside its metadata (the tokenizer vocabulary).
  with open(assets.gemma3_270m_gguf(), 'rb') as real:
    prefix = real.read(1 << 20)
  path = tmp_path / 'truncated.gguf'
  path.write_bytes(prefix)
  with pytest.raises(errors.CorruptCheckpointError) as info:
    convert.load_gguf(path)
  assert str(path) in str(info.value)


def test_not_a_gguf_file(tmp_path):
  path = tmp_path / 'model.gguf'
  path.write_bytes(b'this is not a GGUF file\n' * 100)
  with pytest.raises(errors.CorruptCheckpointError, match='magic') as info:
    convert.load_gguf(path)
  assert str(path) in str(info.value)


def test_missing_gguf_file(tmp_path):
  path = tmp_path / 'absent.gguf'
  with pytest.raises(FileNotFoundError, match='absent.gguf'):
    convert.load_gguf(path)


def test_gguf_of_another_architecture(tmp_path):
  import gguf  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'llama.gguf'
  writer = gguf.GGUFWriter(str(path), 'llama')
  writer.add_block_count(1)
  writer.add_tensor('token_embd.weight', np.zeros((8, 4), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(errors.UnsupportedArchitectureError,
                     match="'llama'") as info:
    convert.load_gguf(path)
  assert str(path) in str(info.value)

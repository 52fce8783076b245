"""Checkpoint interop: transformers (import and export) and GGUF (import).

  load.load_params(path, model, shardings=...)  any kind, onto the mesh
  load_hf(path) -> (model, params)              host memory
  save_hf(model, params, path)
  load_gguf(path) -> (model, params)            host memory
  gguf_tokenizer(gguf_path, out_path) -> SentencePiece model path

The errors are `t5x_adapt.checkpoints.errors`' (re-exported here).
"""

from t5x_adapt.checkpoints.errors import CheckpointError
from t5x_adapt.checkpoints.errors import CorruptCheckpointError
from t5x_adapt.checkpoints.errors import MissingTensorError
from t5x_adapt.checkpoints.errors import ShapeMismatchError
from t5x_adapt.checkpoints.errors import UnexpectedTensorError
from t5x_adapt.checkpoints.errors import UnsupportedArchitectureError
from t5x_adapt.convert.gguf_tokenizer import gguf_tokenizer
from t5x_adapt.convert.hf import load_hf
from t5x_adapt.convert.hf import save_hf
from t5x_adapt.convert.gguf import load_gguf
